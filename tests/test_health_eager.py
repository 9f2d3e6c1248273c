"""Health probes are answered in the callback that parsed them (gateway.server), so a herd's
tasks queued in the same instant do not delay them — and they answer exactly as before."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from gateway.http.frontend import _resume
from gateway.sim.core import WorkerSpec
from gateway.sim.server import SimFleetThread
from gateway.tools.gatewayproc import GatewayProcess


def test_resume_carries_on_a_coroutine_started_by_hand() -> None:
    async def main() -> list[str]:
        seen: list[str] = []
        gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def handler() -> None:
            seen.append("start")
            seen.append(await gate)
            await asyncio.sleep(0)          # a bare yield too
            seen.append("end")

        coro = handler()
        awaited = coro.send(None)           # runs up to the future
        assert awaited is gate and seen == ["start"]
        task = asyncio.create_task(_resume(coro, awaited))
        gate.set_result("woken")
        await task
        return seen

    assert asyncio.run(main()) == ["start", "woken", "end"]


def test_resume_passes_cancellation_and_errors_on() -> None:
    async def main() -> tuple[str, str]:
        loop = asyncio.get_running_loop()
        outcomes = []
        for how in ("cancel task", "future fails"):
            gate: asyncio.Future[None] = loop.create_future()
            caught: list[str] = []

            async def handler(gate: asyncio.Future[None] = gate,
                              caught: list[str] = caught) -> None:
                try:
                    await gate
                except asyncio.CancelledError:
                    caught.append("cancelled")
                    raise
                except RuntimeError as exc:
                    caught.append(str(exc))

            coro = handler()
            task = asyncio.create_task(_resume(coro, coro.send(None)))
            await asyncio.sleep(0)
            if how == "cancel task":
                task.cancel()
            else:
                gate.set_exception(RuntimeError("boom"))
            with pytest.raises(asyncio.CancelledError) if how == "cancel task" else \
                    _nothing():
                await task
            outcomes.append(caught[0])
        return outcomes[0], outcomes[1]

    assert asyncio.run(main()) == ("cancelled", "boom")


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def exchange(port: int, payload: bytes, expect: int) -> bytes:
    """Send ``payload`` on one connection; read ``expect`` whole responses (each head and
    its Content-Length of body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        data = b""
        got = 0
        end = 0                     # where the responses read so far end
        while got < expect:
            head_end = data.find(b"\r\n\r\n", end)
            if head_end >= 0:
                length = 0
                for line in data[end:head_end].split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if len(data) >= head_end + 4 + length:
                    end = head_end + 4 + length
                    got += 1
                    continue
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_health_answers_are_unchanged_pipelined_and_kept_alive(tmp_path: Path) -> None:
    with SimFleetThread([WorkerSpec(slots=2)]) as sim:
        cfg = {"workers": [{"url": f"http://127.0.0.1:{sim.ports[0]}"}],
               "health": {"interval_s": 0.2, "rise": 1}}
        with GatewayProcess(cfg, tmp_path) as gw:
            gw.wait_for(lambda: gw.status()["fleet"]["workers_ready"] == 1, what="ready")
            one = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
            live = b"GET /v2/health/live?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            meta = b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n"
            # four pipelined requests on one connection: answered in order
            data = exchange(gw.port, meta + one + live + one, 4)
            heads = data.split(b"HTTP/1.1 ")[1:]
            assert [h[:3] for h in heads] == [b"200"] * 4
            assert b'"name"' in heads[0]          # the server metadata, before them
            for head in heads[1:]:
                lower = head.lower()
                assert b"content-length: 0\r\n" in lower
                assert b"date: " in lower and b"x-request-id: " in lower
            # POST is not the fast path; it answers as before (after a fast one, in order)
            post = exchange(gw.port, one + b"POST /v2/health/ready HTTP/1.1\r\nHost: x\r\n"
                                           b"Content-Length: 0\r\n\r\n", 2)
            assert post.count(b"HTTP/1.1 ") == 2 and post.startswith(b"HTTP/1.1 200")
