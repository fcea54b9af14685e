"""A simulated OpenAI-compatible model server, for the demo, tests and benchmarks.

``/v1/chat/completions`` and ``/v1/completions`` answer after ``latency_s`` (plus a per-token delay
when streaming, as SSE ``data:`` chunks ending with ``data: [DONE]``); anything else echoes a small
JSON body. It records the order requests arrive in and the peak number served at once, and it can
make requests wait on a gate so a test decides when they finish.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
from aiohttp import web


class ChatRequest(msgspec.Struct):
    model: str = "sim"
    stream: bool = False
    max_tokens: int = 8


@dataclass
class Arrival:
    """One request as the upstream saw it."""

    path: str
    headers: dict[str, str]
    at: float
    concurrent: int


@dataclass
class SimulatedModel:
    latency_s: float = 0.2
    token_delay_s: float = 0.02
    arrivals: list[Arrival] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    in_flight: int = 0
    peak: int = 0
    # When set, requests wait for it after arriving (tests release them by hand).
    gate: asyncio.Event | None = None
    on_arrival: Callable[[Arrival], Awaitable[None]] | None = None
    # When set, a streamed response is cut (connection aborted) after this many chunks: a model
    # server dying mid-response.
    fail_after_chunks: int | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completion)
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        return app

    async def _arrive(self, request: web.Request) -> Arrival:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        headers = {k.lower(): v for k, v in request.headers.items()}
        arrival = Arrival(request.path, headers, time.monotonic(), self.in_flight)
        self.arrivals.append(arrival)
        if self.on_arrival is not None:
            await self.on_arrival(arrival)
        if self.gate is not None:
            await self.gate.wait()
        return arrival

    def _leave(self, request: web.Request) -> None:
        self.in_flight -= 1
        self.finished.append(request.headers.get("x-request-id", ""))

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = msgspec.json.decode(raw or b"{}", type=ChatRequest)
        except msgspec.DecodeError:
            return web.json_response({"error": "bad request body"}, status=400)
        await self._arrive(request)
        try:
            await asyncio.sleep(self.latency_s)
            if not body.stream:
                return web.json_response(
                    {
                        "id": "cmpl-sim",
                        "object": "chat.completion",
                        "model": body.model,
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": "ok"}}
                        ],
                    }
                )
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i in range(body.max_tokens):
                if i == self.fail_after_chunks and request.transport is not None:
                    request.transport.abort()
                    return response
                chunk = {
                    "id": "cmpl-sim",
                    "choices": [{"index": 0, "delta": {"content": f"t{i} "}}],
                }
                await response.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")
                await asyncio.sleep(self.token_delay_s)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            self._leave(request)

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        await self._arrive(request)
        try:
            await asyncio.sleep(self.latency_s)
            return web.json_response(
                {"path": request.path, "method": request.method, "bytes": len(body)}
            )
        finally:
            self._leave(request)


async def start_app(
    app: web.Application, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Serves an app on a free port; returns the runner (cleanup() stops it) and the port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, int(runner.addresses[0][1])
