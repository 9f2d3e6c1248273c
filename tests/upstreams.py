"""Small real upstream servers for cases real Triton cannot stage on demand (slow answers,
server-sent-event streams). Each runs uvicorn in a background thread on a free port."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.tools.procs import free_port


class ThreadedUpstream:
    """A Starlette app (from :meth:`app`) served by uvicorn in a background thread on a free
    port; a context manager."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> Starlette:
        raise NotImplementedError

    def __enter__(self) -> Self:
        config = uvicorn.Config(self.app(), host="127.0.0.1", port=self.port,
                                log_level="error", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{type(self).__name__} upstream did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(timeout=10)


class SlowTriton(ThreadedUpstream):
    """Answers like a Triton serving model ``slow``: infer waits ``delay_s`` (or the
    ``delay_s`` request parameter), ``generate_stream`` sends ``chunks`` SSE events
    ``chunk_gap_s`` apart. Counts requests started and finished."""

    def __init__(self, delay_s: float = 0.5, chunks: int = 5, chunk_gap_s: float = 0.3) -> None:
        self.delay_s = delay_s
        self.chunks = chunks
        self.chunk_gap_s = chunk_gap_s
        super().__init__()
        self.started = 0
        self.finished = 0
        self.cancelled = 0
        self.in_flight = 0
        self.max_in_flight = 0

    def app(self) -> Starlette:
        async def ok(request: Request) -> Response:
            return Response(status_code=200)

        async def index(request: Request) -> Response:
            return JSONResponse([{"name": "slow", "version": "1", "state": "READY"}])

        async def infer(request: Request) -> Response:
            body = await request.body()
            delay = self.delay_s
            try:
                delay = float(json.loads(body).get("parameters", {}).get("delay_s", delay))
            except (ValueError, AttributeError):
                pass
            self.started += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline:
                    await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
                    if await request.is_disconnected():
                        # The gateway closed the connection: its client went away.
                        self.cancelled += 1
                        return Response(status_code=499)
            finally:
                self.in_flight -= 1
            self.finished += 1
            return JSONResponse({"model_name": "slow", "model_version": "1", "outputs": []})

        async def stream(request: Request) -> Response:
            async def events() -> AsyncIterator[bytes]:
                for i in range(self.chunks):
                    yield f"data: {json.dumps({'index': i, 't': time.time()})}\n\n".encode()
                    await asyncio.sleep(self.chunk_gap_s)

            return StreamingResponse(events(), media_type="text/event-stream")

        return Starlette(routes=[
            Route("/v2/health/ready", ok),
            Route("/v2/health/live", ok),
            Route("/v2/models/slow/ready", ok),
            Route("/v2/repository/index", index, methods=["POST"]),
            Route("/v2/models/slow/infer", infer, methods=["POST"]),
            Route("/v2/models/slow/generate_stream", stream, methods=["POST"]),
        ])
