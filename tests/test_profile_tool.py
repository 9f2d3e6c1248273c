"""loadtest.profile's arithmetic: py-spy's collapsed stacks charged to modules."""

from __future__ import annotations

import pytest

from loadtest.profile import by_module, module_of


@pytest.mark.parametrize(("frame", "module"), [
    ("_infer (/work/main/gateway/http/proxy.py:322)", "gateway.http.proxy"),
    ("_infer (gateway/http/proxy.py:322)", "gateway.http.proxy"),   # relative, as py-spy says
    ("send (/x/.venv/lib/python3.11/site-packages/uvicorn/protocols/http/h.py:5)", "uvicorn"),
    ("observe (/x/site-packages/prometheus_client/metrics.py:685)", "prometheus_client"),
    ("run (/usr/lib/python3.11/asyncio/runners.py:118)", "asyncio"),
    ("Runner.run (asyncio/runners.py:118)", "asyncio"),
    ("send (uvicorn/protocols/http/httptools_impl.py:522)", "uvicorn"),
    ("<native>", "<native>"),
])
def test_module_of(frame: str, module: str) -> None:
    assert module_of(frame) == module


def test_by_module_own_adds_up_and_inclusive_counts_each_module_once() -> None:
    raw = "\n".join([
        "main (/a/gateway/server.py:1);_infer (/a/gateway/http/proxy.py:2) 6",
        "main (/a/gateway/server.py:1);_infer (/a/gateway/http/proxy.py:2);"
        "decide (/a/gateway/core/routing.py:3);_x (/a/gateway/core/routing.py:4) 3",
        "main (/a/gateway/server.py:1) 1",
        "garbage line",
    ])
    own, inclusive, total = by_module(raw)
    assert total == 10
    assert own == {"gateway.http.proxy": 0.6, "gateway.core.routing": 0.3,
                   "gateway.server": 0.1}
    assert abs(sum(own.values()) - 1.0) < 1e-9
    assert inclusive["gateway.server"] == 1.0
    assert inclusive["gateway.core.routing"] == 0.3      # two frames, one count
    assert by_module("") == ({}, {}, 0)
