"""The decision core: pure functions and state machines over snapshots (time is an argument);
imports nothing outside this package.
"""
