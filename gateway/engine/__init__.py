"""The admission and dispatch shell: carries out the core's decisions over the fleet (queue, rate
limits, batching, table sync); imports the core and the fleet.
"""
