"""gRPC with the minimal configuration: a gateway whose YAML names no model, in front of
PyTriton workers whose repository index is empty — every model is learned on first use, over
gRPC, exactly as over HTTP (one catalogue: ``GatewayService.resolve``).

Fleet: two equal PyTriton workers with the standard test models and the extra worker of
``tests.test_grpc`` (``repeat``: decoupled; ``slow``: holds a request for ``MS``
milliseconds). Each case names models the gateway has not seen through its config, and is
compared with what one Triton answers directly: sync, aio, ``stream_infer``, the decoupled
model, unknown models and versions, deadlines.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from gateway.tools.local import TritonFleet
from tests import test_grpc
from tests.test_grpc import (
    STREAM_TIMEOUT_S,
    ExtraWorker,
    GrpcGatewayProcess,
    add_sub_counts,
    add_sub_inputs,
    error_of,
    identity_inputs,
    in_flight,
    scalar_input,
    stream_results,
    warm_up,
    worker_entry,
)

pytestmark = [pytest.mark.triton, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def fleet() -> Iterator[TritonFleet]:
    with TritonFleet(2, service_times_ms=[1.0, 1.0]) as f:
        yield f


@pytest.fixture(scope="module")
def extra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExtraWorker]:
    worker = ExtraWorker(tmp_path_factory.mktemp("extra") / "extra.log")
    try:
        worker.start()
        yield worker
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def gateway(fleet: TritonFleet, extra: ExtraWorker,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcGatewayProcess]:
    """The minimal configuration plus ``listen.grpc_port`` and each worker's ``grpc_url``:
    no ``models:`` section at all."""
    workers = [worker_entry(w.http_url, w.metrics_url, f"127.0.0.1:{w.ports.grpc}")
               for w in fleet.workers]
    workers.append(worker_entry(f"http://127.0.0.1:{extra.http}",
                                f"http://127.0.0.1:{extra.metrics}/metrics",
                                f"127.0.0.1:{extra.grpc}"))
    gw = GrpcGatewayProcess({"workers": workers}, Path(tmp_path_factory.mktemp("gw")))
    assert "models" not in gw.config
    gw.start()
    gw.wait_for(lambda: gw.status()["fleet"]["workers_ready"] == 3, timeout_s=30,
                what="all workers ready")
    try:
        yield gw
    finally:
        gw.stop()


# The client fixtures of tests/test_grpc.py, over this module's gateway, fleet and extra
# worker (pytest resolves a fixture's own fixtures in the module that uses it).
via_gateway = test_grpc.via_gateway
direct = test_grpc.direct
direct_extra = test_grpc.direct_extra


def same_error(gw_call: Any, direct_call: Any, *args: Any, **kwargs: Any) -> tuple[str, str]:
    """Both raise the same status and message; returns them."""
    got, want = error_of(gw_call, *args, **kwargs), error_of(direct_call, *args, **kwargs)
    assert (got.status(), got.message()) == (want.status(), want.message())
    return str(got.status()), str(got.message())


# -- the workers really list nothing: discovery is what finds the models -----------------------
def test_the_workers_index_is_empty(direct: grpcclient.InferenceServerClient) -> None:
    assert list(direct.get_model_repository_index().models) == []


# -- health and model questions -----------------------------------------------------------------
def test_model_ready_first_use_and_unknowns_like_triton(
        via_gateway: grpcclient.InferenceServerClient,
        direct: grpcclient.InferenceServerClient) -> None:
    assert via_gateway.is_server_live() and via_gateway.is_server_ready()
    assert via_gateway.is_model_ready("add_sub") is direct.is_model_ready("add_sub") is True
    assert via_gateway.is_model_ready("add_sub", "1") is True
    for name, version in (("no_such_model", ""), ("add_sub", "9")):
        assert via_gateway.is_model_ready(name, version) is \
            direct.is_model_ready(name, version) is False


def test_metadata_and_config_of_a_model_never_named(
        via_gateway: grpcclient.InferenceServerClient,
        direct: grpcclient.InferenceServerClient) -> None:
    assert via_gateway.get_model_metadata("identity") == direct.get_model_metadata("identity")
    got, want = (c.get_model_config("strings").config for c in (via_gateway, direct))
    assert (got.name, got.max_batch_size, list(got.input), list(got.output)) == \
        (want.name, want.max_batch_size, list(want.input), list(want.output))


@pytest.mark.parametrize(("name", "version"), [("no_such_model", ""), ("add_sub", "9")])
def test_unknown_model_or_version_metadata_and_config_like_triton(
        name: str, version: str, via_gateway: grpcclient.InferenceServerClient,
        direct: grpcclient.InferenceServerClient) -> None:
    status, message = same_error(via_gateway.get_model_metadata, direct.get_model_metadata,
                                 name, version)
    assert status == "StatusCode.NOT_FOUND" and "unknown model" in message
    same_error(via_gateway.get_model_config, direct.get_model_config, name, version)


# -- inference ----------------------------------------------------------------------------------
def test_sync_infer_of_a_model_never_named(via_gateway: grpcclient.InferenceServerClient,
                                           direct: grpcclient.InferenceServerClient) -> None:
    text = np.array([[b"hello"], [b"grpc"]], dtype=np.object_)
    i = grpcclient.InferInput("TEXT", [2, 1], "BYTES")
    i.set_data_from_numpy(text)
    got = via_gateway.infer("strings", [i], request_id="s-1")
    want = direct.infer("strings", [i], request_id="s-1")
    assert got.get_response().id == "s-1"
    for out in ("UPPER", "LENGTH"):
        np.testing.assert_array_equal(got.as_numpy(out), want.as_numpy(out))


def test_sync_infer_of_a_version(via_gateway: grpcclient.InferenceServerClient,
                                 direct: grpcclient.InferenceServerClient) -> None:
    got = via_gateway.infer("add_sub", add_sub_inputs(2), model_version="1")
    want = direct.infer("add_sub", add_sub_inputs(2), model_version="1")
    assert got.get_response().model_version == want.get_response().model_version == "1"
    np.testing.assert_array_equal(got.as_numpy("OUTPUT0"), want.as_numpy("OUTPUT0"))


@pytest.mark.parametrize(("name", "version"), [("no_such_model", ""), ("add_sub", "9")])
def test_unknown_model_or_version_infer_like_triton(
        name: str, version: str, via_gateway: grpcclient.InferenceServerClient,
        direct: grpcclient.InferenceServerClient) -> None:
    status, _ = same_error(via_gateway.infer, direct.infer, name, add_sub_inputs(),
                           model_version=version)
    assert status == "StatusCode.NOT_FOUND"


async def test_aio_client_with_no_models_named(gateway: GrpcGatewayProcess,
                                               fleet: TritonFleet) -> None:
    async with grpcaio.InferenceServerClient(gateway.grpc_target) as gw, \
            grpcaio.InferenceServerClient(f"127.0.0.1:{fleet.workers[1].ports.grpc}") as dc:
        assert await gw.is_model_ready("identity")
        assert await gw.get_model_metadata("overhead") == await dc.get_model_metadata(
            "overhead")
        results = await asyncio.gather(*(gw.infer("identity", identity_inputs(t),
                                                  request_id=f"aio-{t}")
                                         for t in ("FP32", "INT64", "BYTES")))
        for t, result in zip(("FP32", "INT64", "BYTES"), results, strict=True):
            assert result.get_response().id == f"aio-{t}"
            want = await dc.infer("identity", identity_inputs(t))
            np.testing.assert_array_equal(result.as_numpy(f"OUTPUT_{t}"),
                                          want.as_numpy(f"OUTPUT_{t}"))
        for name in ("no_such_model_aio", "identity"):
            version = "" if name != "identity" else "7"
            with pytest.raises(InferenceServerException) as got:
                await gw.infer(name, identity_inputs("FP32"), model_version=version)
            with pytest.raises(InferenceServerException) as want:
                await dc.infer(name, identity_inputs("FP32"), model_version=version)
            assert (got.value.status(), got.value.message()) == \
                (want.value.status(), want.value.message())


# -- streaming ----------------------------------------------------------------------------------
def test_stream_infer_of_a_model_never_named(via_gateway: grpcclient.InferenceServerClient,
                                             direct: grpcclient.InferenceServerClient) -> None:
    requests = [(f"s{k}", add_sub_inputs(1 + k % 3)) for k in range(6)]
    got = stream_results(via_gateway, "add_sub", requests, len(requests))
    want = stream_results(direct, "add_sub", requests, len(requests))
    assert sorted(r for r, _ in got) == sorted(r for r, _ in want)
    by_id = dict(want)
    for rid, value in got:
        np.testing.assert_array_equal(value, by_id[rid])


def test_stream_unknown_model_and_version_errors_like_triton(
        via_gateway: grpcclient.InferenceServerClient,
        direct: grpcclient.InferenceServerClient) -> None:
    def errors(client: grpcclient.InferenceServerClient) -> list[str]:
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            client.async_stream_infer("no_such_model", add_sub_inputs(), request_id="x")
            client.async_stream_infer("add_sub", add_sub_inputs(), request_id="v",
                                      model_version="9")
            client.async_stream_infer("add_sub", add_sub_inputs(), request_id="y")
            seen = [answers.get(timeout=STREAM_TIMEOUT_S) for _ in range(3)]
        finally:
            client.stop_stream()
        assert seen[2][1] is None and seen[2][0].get_response().id == "y"
        return [error.message() for _, error in seen[:2]]

    assert errors(via_gateway) == errors(direct)


def test_decoupled_model_never_named_streams_every_response(
        via_gateway: grpcclient.InferenceServerClient,
        direct_extra: grpcclient.InferenceServerClient, gateway: GrpcGatewayProcess) -> None:
    requests = [("r3", scalar_input("COUNT", 3)), ("r2", scalar_input("COUNT", 2))]
    got = stream_results(via_gateway, "repeat", requests, 5)
    want = stream_results(direct_extra, "repeat", requests, 5)
    for answers in (got, want):
        flat = [(rid, int(v.reshape(-1)[0])) for rid, v in answers]
        assert [i for rid, i in flat if rid == "r3"] == [0, 1, 2]
        assert [i for rid, i in flat if rid == "r2"] == [0, 1]
    gateway.wait_for(lambda: in_flight(gateway) == 0, timeout_s=5, what="slots released")


# -- deadlines ----------------------------------------------------------------------------------
def test_a_deadline_the_gateway_cannot_meet_is_deadline_exceeded(
        via_gateway: grpcclient.InferenceServerClient, gateway: GrpcGatewayProcess) -> None:
    """The gateway knows ``slow`` at 300 ms takes about that long on its worker: a request
    with 60 ms left is refused at once — DEADLINE_EXCEEDED, as Triton answers, not
    UNAVAILABLE (a retry with the same deadline cannot help)."""
    for _ in range(3):
        via_gateway.infer("slow", scalar_input("MS", 300))
    err = error_of(via_gateway.infer, "slow", scalar_input("MS", 300), client_timeout=0.06)
    assert err.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "ms left" in err.message(), err.message()  # the gateway's refusal, not the client's
    gateway.wait_for(lambda: in_flight(gateway) == 0, timeout_s=5, what="slots released")


def test_a_deadline_that_runs_out_while_waiting_is_deadline_exceeded(
        gateway: GrpcGatewayProcess) -> None:
    with grpcclient.InferenceServerClient(gateway.grpc_target) as a, \
            grpcclient.InferenceServerClient(gateway.grpc_target) as b:
        holder: queue.Queue[Any] = queue.Queue()
        a.async_infer("slow", scalar_input("MS", 1500),
                      callback=lambda result, error: holder.put((result, error)))
        gateway.wait_for(lambda: in_flight(gateway) == 1, timeout_s=5, what="held")
        err = error_of(b.infer, "slow", scalar_input("MS", 10), client_timeout=0.4)
        assert err.status() == "StatusCode.DEADLINE_EXCEEDED"
        _, error = holder.get(timeout=STREAM_TIMEOUT_S)
        assert error is None
    gateway.wait_for(lambda: in_flight(gateway) == 0, timeout_s=5, what="slots released")


# -- fleet-wide answers and balancing -----------------------------------------------------------
def test_index_and_statistics_know_the_discovered_models(
        via_gateway: grpcclient.InferenceServerClient) -> None:
    via_gateway.infer("add_sub", add_sub_inputs())
    names = {m.name for m in via_gateway.get_model_repository_index().models}
    assert {"add_sub", "strings", "identity"} <= names
    stats = via_gateway.get_inference_statistics("add_sub").model_stats
    assert sum(int(s.inference_count) for s in stats) >= 1


async def test_one_channel_spreads_over_both_workers(gateway: GrpcGatewayProcess,
                                                     fleet: TritonFleet) -> None:
    # Measured warm, as tests/test_grpc.py's balance: a worker's first answers through a
    # new connection take hundreds of milliseconds on a busy box, and load-aware routing
    # avoids it until its estimate decays (seconds) — a cold gateway sent 96 % to one.
    await asyncio.to_thread(warm_up, gateway, fleet)
    before = await asyncio.to_thread(add_sub_counts, fleet)
    total = 200
    async with grpcaio.InferenceServerClient(gateway.grpc_target) as gw:
        sem = asyncio.Semaphore(8)

        async def one() -> None:
            async with sem:
                await gw.infer("add_sub", add_sub_inputs())

        await asyncio.gather(*(one() for _ in range(total)))
    after = await asyncio.to_thread(add_sub_counts, fleet)
    shares = [(a - b) / total for a, b in zip(after, before, strict=True)]
    assert sum(shares) == pytest.approx(1.0)
    # Per request, not pinned to the channel's connection (a connection-level balancer gives
    # one worker 100 %). How evenly is load-aware routing's call between equal workers on a
    # shared CPU (see test_grpc.test_one_channel_is_balanced_per_request): warm, 15-85 % here.
    assert min(shares) >= 0.05, shares
