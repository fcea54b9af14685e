"""An in-process sidecar (both ports) in front of a simulated upstream, for HTTP tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from sidecar.config import Config
from sidecar.http.app import Server
from sidecar.options import Secret, ServeOptions
from sidecar.simulator import SimulatedModel, start_app
from tests.redis_proc import free_port


@dataclass
class Stack:
    server: Server
    upstream: SimulatedModel
    session: aiohttp.ClientSession
    data: str
    admin: str

    async def state(self) -> dict[str, Any]:
        async with self.session.get(f"{self.admin}/state") as r:
            body: dict[str, Any] = await r.json()
            return body


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    """Waits for a condition that no event announces (e.g. a request reaching the queue)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def running_stack(
    config: Config,
    upstream: SimulatedModel | None = None,
    redis_url: str | None = None,
    *,
    ticket_secret: bytes | None = None,
    admin_token: bytes | None = None,
    replica_id: str = "test",
) -> AsyncIterator[Stack]:
    """Both ports of one replica in front of ``upstream``; a ticket secret and an admin token
    when given (None: not configured)."""
    model = upstream or SimulatedModel(latency_s=0.05)
    runner, port = await start_app(model.app())
    try:
        data_port, admin_port = free_port(), free_port()
        options = ServeOptions(
            config=config,
            listen=("127.0.0.1", data_port),
            admin_listen=("127.0.0.1", admin_port),
            redis_url=redis_url,
            upstream=f"http://127.0.0.1:{port}",
            replica_id=replica_id,
            ticket_secret=None if ticket_secret is None else Secret(ticket_secret),
            admin_token=None if admin_token is None else Secret(admin_token),
        )
        server = Server(options)
        # Whatever fails from here on, the replica's Redis clients and its loops are closed.
        try:
            await server.start()
            async with aiohttp.ClientSession() as session:
                try:
                    yield Stack(
                        server,
                        model,
                        session,
                        f"http://127.0.0.1:{data_port}",
                        f"http://127.0.0.1:{admin_port}",
                    )
                finally:
                    if model.gate is not None:
                        model.gate.set()
        finally:
            await server.shutdown()
    finally:
        await runner.cleanup()


def secured_stack(
    config: Config,
    *,
    ticket_secret: bytes | None = None,
    admin_token: bytes | None = None,
    redis_url: str | None = None,
) -> AbstractAsyncContextManager[Stack]:
    """``running_stack`` with an upstream that answers at once."""
    return running_stack(
        config,
        SimulatedModel(latency_s=0),
        redis_url,
        ticket_secret=ticket_secret,
        admin_token=admin_token,
    )
