"""Load-aware gateway and admission-control proxy for Triton (KServe v2) inference fleets."""

__version__ = "0.1.0"
