"""Releases admission tickets when nginx has finished a request.

nginx's auth_request has no completion callback, so a slot taken through the sidecar's gateway check
is a lease (redis.ticketLease). nginx.conf beside this file makes nginx write one syslog line per
finished request that holds a ticket (``access_log syslog:... admission_release
if=$admission_ticket``); the log phase runs once the response has been sent or the client has gone.
This relay receives those UDP datagrams and POSTs each ticket to the sidecar's
``/admission/v1/release``, so the slot is freed when the response ends rather than when its lease
runs out.

A lost datagram or a failed release costs only time: the lease still expires. Run one relay per
nginx host, bound to loopback (anyone who can send it datagrams can release slots), with the
sidecar's Python environment (it needs aiohttp):

    python nginx_release_relay.py --listen 127.0.0.1:5514 --sidecar http://127.0.0.1:8080

It prints ``listening on udp://HOST:PORT`` once it is ready (``--listen 127.0.0.1:0`` picks a port).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import signal

import aiohttp

log = logging.getLogger("nginx_release_relay")

RELEASE_PATH = "/admission/v1/release"
# Tickets are sidecar item ids; anything else in a datagram is ignored.
TICKET = re.compile(r"[A-Za-z0-9._~:/@+=-]{1,128}")
QUEUE_LIMIT = 10_000


def parse_ticket(datagram: bytes) -> str | None:
    """The ticket of one nginx syslog line: ``<190>Nov 28 08:00:00 admission: 0000000000000042``."""
    text = datagram.decode("ascii", errors="replace").strip()
    if not text.startswith("<") or " " not in text:
        return None
    ticket = text.rsplit(None, 1)[-1]
    return ticket if TICKET.fullmatch(ticket) else None


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, queue: asyncio.Queue[str]) -> None:
        self.queue = queue
        self.dropped = 0

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        ticket = parse_ticket(data)
        if ticket is None:
            log.debug("ignored datagram %r", data[:200])
            return
        try:
            self.queue.put_nowait(ticket)
        except asyncio.QueueFull:
            # The sidecar is not keeping up; the lease will free this slot.
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("release queue full: %d tickets left to their leases", self.dropped)


async def _release(session: aiohttp.ClientSession, url: str, ticket: str) -> None:
    try:
        async with session.post(url, json={"ticket": ticket}) as response:
            if response.status != 200:
                log.warning("release %s: HTTP %d", ticket, response.status)
            elif not (await response.json()).get("released", False):
                log.debug("release %s: already free (lease expired or released)", ticket)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("release %s failed (%s); its lease will expire instead", ticket, exc)


async def _worker(queue: asyncio.Queue[str], session: aiohttp.ClientSession, url: str) -> None:
    while True:
        ticket = await queue.get()
        try:
            await _release(session, url, ticket)
        finally:
            queue.task_done()


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected host:port, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(listen: tuple[str, int], sidecar: str, workers: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    queue: asyncio.Queue[str] = asyncio.Queue(maxsize=QUEUE_LIMIT)
    transport, _ = await loop.create_datagram_endpoint(lambda: _Receiver(queue), local_addr=listen)
    timeout = aiohttp.ClientTimeout(total=5, sock_connect=1)
    connector = aiohttp.TCPConnector(limit=workers)
    url = sidecar.rstrip("/") + RELEASE_PATH
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            tasks = [asyncio.create_task(_worker(queue, session, url)) for _ in range(workers)]
            host, port = transport.get_extra_info("sockname")[:2]
            print(f"listening on udp://{host}:{port}, releasing to {url}", flush=True)
            await stop.wait()
            transport.close()
            # Release what was already received, briefly; the leases cover the rest.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await queue.join()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--listen", type=parse_hostport, default=("127.0.0.1", 5514), help="UDP host:port"
    )
    parser.add_argument(
        "--sidecar", default="http://127.0.0.1:8080", help="admission-sidecar data port URL"
    )
    parser.add_argument("--workers", type=int, default=16, help="concurrent release calls")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(serve(args.listen, args.sidecar, args.workers))


if __name__ == "__main__":
    main()
