"""Tools around the gateway, not imported by `gateway serve`: the embedded real-Triton fleet,
the demo, process helpers shared by tests and benchmarks."""
