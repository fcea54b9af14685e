"""An OpenAI-like upstream that records when each request started and ended, and who sent it.

It answers ``/v1/chat/completions`` after a service time drawn from ``service_s``, or the body's
``service_ms`` (a long generation), as JSON, or as an SSE stream of chunks when the body says
``"stream": true``. Like vLLM, it stops working on a
request whose connection dropped and counts it as ended then: the handler is cancelled
(``handler_cancellation``) and the end is recorded in ``finally``.

The load generator names the replica it sent a request to in ``x-request-id``
(``r<replica>.<client>.<n>``), which the sidecar forwards; that is how a start is attributed.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import msgspec
from aiohttp import web

CHUNKS = 6  # SSE chunks per streamed answer, spread over its service time


@dataclass
class UpstreamRecord:
    request_id: str
    replica: int  # -1 when the id does not name one
    start: float  # time.monotonic()
    end: float = -1.0  # -1 while running
    cancelled: bool = False  # the connection dropped before the answer was complete


class ChatBody(msgspec.Struct):
    stream: bool = False
    service_ms: int = 0  # the load generator asks for long generations this way


def replica_of(request_id: str) -> int:
    head = request_id.split(".", 1)[0]
    return int(head[1:]) if head[:1] == "r" and head[1:].isdigit() else -1


class RecordingUpstream:
    def __init__(self, service_s: tuple[float, float], seed: int) -> None:
        self.service_s = service_s
        self.random = random.Random(seed)
        self.records: list[UpstreamRecord] = []
        self.running = 0
        self.peak = 0
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completion)
        return app

    async def start(self, port: int) -> str:
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        try:
            body = msgspec.json.decode(await request.read() or b"{}", type=ChatBody)
        except msgspec.DecodeError:
            return web.json_response({"error": "bad body"}, status=400)
        rid = request.headers.get("x-request-id", "")
        record = UpstreamRecord(rid, replica_of(rid), time.monotonic())
        self.records.append(record)
        self.running += 1
        self.peak = max(self.peak, self.running)
        service = body.service_ms / 1000 or self.random.uniform(*self.service_s)
        try:
            if not body.stream:
                await asyncio.sleep(service)
                return web.json_response(
                    {"id": rid, "object": "chat.completion",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]}
                )  # fmt: skip
            return await self._stream(request, rid, service)
        except asyncio.CancelledError:
            record.cancelled = True
            raise
        except ConnectionResetError:  # the sidecar dropped the connection mid-stream
            record.cancelled = True
            return web.Response(status=499)  # never sent: the connection is gone
        finally:
            record.end = time.monotonic()
            self.running -= 1

    async def _stream(self, request: web.Request, rid: str, service: float) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(CHUNKS):
            await asyncio.sleep(service / CHUNKS)
            chunk = {"id": rid, "choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}
            await response.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
