"""A replica in its own process, for kill tests: takes slots, queues one request, then idles.

Usage: python -m tests.replica_proc REDIS_URL SLOTS   (prints "ready" once it holds its slots)
"""

from __future__ import annotations

import asyncio
import sys

from sidecar.controller import FlowController
from sidecar.request import FlowControlRequest
from sidecar.store import PoolStore
from sidecar.store.connect import connect
from tests.conftest import make_config


async def main(url: str, slots: int) -> None:
    cfg = make_config(limit=slots, redis={"leaseTimeout": "1s", "heartbeatInterval": "200ms"})
    client, inbox = connect(url, timeout_s=1.0)
    ctrl = FlowController(PoolStore(client, cfg, "doomed", inbox_client=inbox))
    await ctrl.start()
    for n in range(slots):
        await ctrl.enqueue_and_wait(FlowControlRequest(request_id=f"held-{n}"))
    queued = await ctrl.submit(FlowControlRequest(request_id="queued", ttl_ms=60_000))
    assert queued.admission is None
    print("ready", flush=True)
    await asyncio.Event().wait()  # until SIGKILL


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
