"""The fleet: workers, their lifecycle, connections to them, model discovery and metrics scrapes;
imports the core.
"""
