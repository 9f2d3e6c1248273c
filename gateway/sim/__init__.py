"""The Triton simulator: many simulated KServe v2 workers in one process (a tool, not part of
the gateway's runtime). :mod:`~gateway.sim.core` and :mod:`~gateway.sim.infer` are pure;
:mod:`~gateway.sim.server` holds :class:`SimFleet` and :class:`SimFleetThread`;
``python -m gateway sim`` is :mod:`~gateway.sim.cli`."""
