"""upstream.default_slots: auto — per-worker slots derived from the models' instances."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gateway.core.config import parse_config
from gateway.core.schema import ConfigError
from gateway.fleet.monitor import instance_count
from gateway.sim.core import SimModel, WorkerSpec
from gateway.sim.server import SimFleetThread
from gateway.tools.gatewayproc import GatewayProcess


@pytest.mark.parametrize(("config", "instances"), [
    ({"instance_group": [{"kind": "KIND_GPU", "count": 2, "gpus": [0, 1]}]}, 4),
    ({"instance_group": [{"kind": "KIND_CPU", "count": 3},
                         {"kind": "KIND_GPU", "count": 1}]}, 4),
    ({"max_batch_size": 8}, 1),
    ({"instance_group": [{"kind": "KIND_GPU", "count": 0}]}, 1),
    ("not a config", 0),
])
def test_instance_count(config: object, instances: int) -> None:
    assert instance_count(config) == instances


def test_default_slots_accepts_a_number_or_auto() -> None:
    base = {"workers": [{"url": "http://a:1"}]}
    assert parse_config({**base, "upstream": {"default_slots": "auto"}}).upstream \
        .default_slots == "auto"
    with pytest.raises(ConfigError) as info:
        parse_config({**base, "upstream": {"default_slots": "many"}})
    assert info.value.path == "upstream.default_slots"


def test_auto_slots_follow_the_workers_model_instances(tmp_path: Path) -> None:
    batcher = SimModel(dynamic_batching=True)
    with SimFleetThread([WorkerSpec(slots=1, models=(batcher,))] * 2) as sim:
        cfg = {"workers": [{"url": f"http://127.0.0.1:{sim.ports[0]}"},
                           {"url": f"http://127.0.0.1:{sim.ports[1]}", "slots": 7}],
               "models": {"simple": {}}, "upstream": {"default_slots": "auto"},
               "health": {"interval_s": 0.2, "rise": 1}, "scrape": {"enabled": False}}
        with GatewayProcess(cfg, tmp_path) as gw:
            auto_id, fixed_id = (f"127.0.0.1:{p}" for p in sim.ports)
            # One instance with Triton's dynamic batcher on (max_batch_size 64): 64 requests
            # execute at once, one more waits; explicit slots win.
            gw.wait_for(lambda: gw.worker_status(auto_id)["slots"] == 65,
                        what="slots derived from the instance group")
            assert gw.worker_status(fixed_id)["slots"] == 7


def test_auto_slots_for_a_model_without_dynamic_batching(tmp_path: Path) -> None:
    """One instance, no dynamic batcher: one request executes, one waits — 2 slots; the rest
    waits in the gateway's queue. This is the default (no `default_slots` in the YAML)."""
    model = SimModel(dynamic_batching=False)
    with SimFleetThread([WorkerSpec(slots=1, models=(model,)), WorkerSpec(slots=4)]) as sim:
        cfg = {"workers": [{"url": f"http://127.0.0.1:{p}"} for p in sim.ports],
               "health": {"interval_s": 0.2, "rise": 1}, "scrape": {"enabled": False}}
        with GatewayProcess(cfg, tmp_path) as gw:
            wid = f"127.0.0.1:{sim.ports[0]}"
            gw.wait_for(lambda: gw.worker_status(wid)["slots"] == 2,
                        what="slots derived from the instance group")
            # the simulator's default: its 4 slots are 4 instances, no dynamic batcher
            four = f"127.0.0.1:{sim.ports[1]}"
            gw.wait_for(lambda: gw.worker_status(four)["slots"] == 8,
                        what="4 instances: 4 execute, 4 wait")
            learned = gw.worker_status(four)
            assert learned["capacity_units"] == 4 and learned["slots_source"] == "learned"
            metrics = httpx.get(gw.url + "/metrics", timeout=10).text
            assert f'gateway_worker_capacity_units{{worker="{four}"}} 4.0' in metrics
