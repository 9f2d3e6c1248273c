"""DNS discovery: a name resolving to several addresses becomes the worker list."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx

from gateway.sim.server import SimFleetThread
from gateway.tools.gatewayproc import GatewayProcess


def test_localhost_discovery_routes_to_the_resolved_workers(tmp_path: Path) -> None:
    with SimFleetThread(workers=1) as sim:
        port = sim.ports[0]
        addresses = {info[4][0] for info in socket.getaddrinfo("localhost", port,
                                                               type=socket.SOCK_STREAM)}
        cfg = {"discovery": {"dns_name": "localhost", "port": port, "metrics_port": port,
                             "interval_s": 0.5},
               "models": {"simple": {}},
               "health": {"interval_s": 0.3, "rise": 1, "fall": 1}}
        with GatewayProcess(cfg, tmp_path) as gw:
            gw.wait_for(lambda: len(gw.status()["workers"]) == len(addresses),
                        what="every resolved address becomes a worker")
            ids = {w["id"] for w in gw.status()["workers"]}
            assert f"127.0.0.1:{port}" in ids
            gw.wait_for(lambda: gw.worker_status(f"127.0.0.1:{port}")["ready"],
                        what="the simulator's address is ready")
            body = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                                "data": [1.0] * 16}]}
            r = httpx.post(gw.url + "/v2/models/simple/infer", json=body, timeout=10)
            assert r.status_code == 200, r.text
            assert r.json()["outputs"][0]["data"][0] == 2.0
