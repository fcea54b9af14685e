"""Coalesces the enqueue and release calls of concurrent requests into one round trip.

A Python client spends about as much CPU on one Redis round trip as a bare proxy spends on a whole
request, so under load one script call per request cannot keep up. Calls made in the same event-loop
turn are queued here and sent together as one batch.lua call (each operation still runs exactly as
its own script would, in order, atomically). An idle replica pays nothing: a lone call goes out on
the next loop turn as its ordinary script.

Errors reach every caller of the failed batch as StoreError. A caller cancelled while its operation
is on the wire does not stop the operation, and the replies' outcomes for other requests reach them
through the store's sink (sidecar/store/pool.py) whatever happens to the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

# Bounds the time one batch holds Redis (each operation is a few hundred microseconds at most).
MAX_BATCH = 128
# Two batches on the wire: one executing in Redis while the next is encoded or decoded here.
MAX_IN_FLIGHT = 2

Operation = tuple[str, list[object]]  # (tag, fields): contract.OP_* and the fields of its record
Sender = Callable[[Sequence[Operation]], Awaitable[list[Any]]]


class Coalescer:
    """Queues operations; flushes them per loop turn through ``send`` (one reply per operation)."""

    def __init__(self, send: Sender) -> None:
        self._send = send
        self._queue: list[tuple[Operation, asyncio.Future[Any]]] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, op: Operation) -> asyncio.Future[Any]:
        """Queues ``op``; the future gets its reply. Awaiting it through asyncio.shield keeps
        the reply for the future's callbacks when the awaiting caller is cancelled."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((op, future))
        if not self._scheduled and self._in_flight < MAX_IN_FLIGHT:
            self._scheduled = True
            # After the callbacks already ready in this turn: they may add to the same batch.
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        while self._queue and self._in_flight < MAX_IN_FLIGHT:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Operation, asyncio.Future[Any]]]) -> None:
        try:
            replies = await self._send([op for op, _ in batch])
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), reply in zip(batch, replies, strict=True):
                if not future.done():
                    future.set_result(reply)
        finally:
            self._in_flight -= 1
            # What queued up while this batch was on the wire goes next.
            if self._queue and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
