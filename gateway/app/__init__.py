"""The composition root: builds the parts from a configuration and wires them; imports every layer
below the data planes.
"""
