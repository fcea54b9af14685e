"""An HTTP/1.1 load generator meant to run in a process of its own, printing one JSON line.

    python -m bench.loadgen URL [--connections N] [--duration S] [--warmup S] [--rate R]
                           [--method M] [--body TEXT] [--header 'name: value']... [--pairs]

Closed loop (no ``--rate``): N keep-alive connections each send the next request as soon as the
previous answer arrives; the figure is throughput. Open loop (``--rate R``): requests are due at a
fixed rate whatever the answers do, spread over N connections; a request's latency runs from the
moment it was due (so a slow server is not excused by the load generator holding back, as wrk2
measures). ``--pairs`` drives the admission API: each unit is POST ``<URL>/admission/v1/admit``
then POST ``<URL>/admission/v1/release`` with the ticket from the first answer.

Only what is answered after ``--warmup`` counts. The output holds ``requests`` (units: requests,
or admit+release pairs), ``errors`` (non-2xx, dropped connections, unanswered at the end), ``rps``
(units per second), latency percentiles in ms, and ``http_calls``: every call answered, the warmup
included (what the server did while the load generator ran, to divide its CPU time by).

The client is a bare asyncio protocol (uvloop when installed) rather than aiohttp's client: that
one spends about as much CPU per request as the server under test, and on a two-core machine the
load generator would then take the server's CPU and flatten every ratio towards 1.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Sequence
from typing import cast
from urllib.parse import urlsplit

import msgspec

ADMIT_PATH = "/admission/v1/admit"
RELEASE_PATH = "/admission/v1/release"
# Requests still unanswered this long after the run are counted as errors.
DRAIN_S = 2.0
# How often the open-loop scheduler wakes; due requests are sent in the batch that wakes them.
# libuv timers count whole milliseconds: a shorter sleep would spin.
TICK_S = 0.001


class Result(msgspec.Struct, kw_only=True):
    requests: int  # counted units: requests, or admit+release pairs with --pairs
    http_calls: int  # every HTTP call answered, warmup included
    errors: int
    duration_s: float
    rps: float  # units per second
    p50_ms: float  # latency percentiles; 0 when nothing was answered
    p99_ms: float
    mean_ms: float
    max_ms: float
    first_error: str = ""


class HttpError(Exception):
    pass


class Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HttpError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None or self.waiter.done():
            return
        try:
            parsed = parse_response(self.buffer)
        except HttpError as exc:
            self.waiter.set_exception(exc)
            return
        if parsed is not None:
            status, body, used = parsed
            del self.buffer[:used]
            self.waiter.set_result((status, body))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.transport is None:
            raise HttpError("not connected")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        try:
            return await self.waiter
        finally:
            self.waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def parse_response(buf: bytearray) -> tuple[int, bytes, int] | None:
    """(status, body, bytes used) once a whole response is in ``buf``; None until then."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).split(b"\r\n")
    try:
        status = int(head[0].split(b" ", 2)[1])
    except (IndexError, ValueError) as exc:
        raise HttpError(f"bad status line {head[0]!r}") from exc
    length = -1
    chunked = False
    for line in head[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    start = end + 4
    if chunked:
        return _parse_chunked(buf, status, start)
    if length < 0:
        raise HttpError("response without content-length is not supported")
    if len(buf) < start + length:
        return None
    return status, bytes(buf[start : start + length]), start + length


def _parse_chunked(buf: bytearray, status: int, pos: int) -> tuple[int, bytes, int] | None:
    body = bytearray()
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
        data_start = line_end + 2
        if size == 0:
            # No trailers are expected: the last chunk is followed by one empty line.
            if len(buf) < data_start + 2:
                return None
            return status, bytes(body), data_start + 2
        if len(buf) < data_start + size + 2:
            return None
        body += buf[data_start : data_start + size]
        pos = data_start + size + 2


def build_request(method: str, host: str, path: str, headers: Sequence[str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *headers]
    if body or method in {"POST", "PUT", "PATCH"}:
        lines.append(f"Content-Length: {len(body)}")
        if not any(h.lower().startswith("content-type:") for h in headers):
            lines.append("Content-Type: application/json")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Ticket(msgspec.Struct):
    ticket: str


class Run:
    """Counters shared by the workers of one run."""

    def __init__(self, warmup_until: float) -> None:
        self.warmup_until = warmup_until
        self.latencies: list[float] = []
        self.calls = 0
        self.errors = 0
        self.first_error = ""

    def error(self, what: str) -> None:
        if time.perf_counter() >= self.warmup_until:
            self.errors += 1
            if not self.first_error:
                self.first_error = what

    def done(self, started: float) -> None:
        now = time.perf_counter()
        if now >= self.warmup_until:
            self.latencies.append(now - started)


class LoadGenerator:
    def __init__(
        self,
        url: str,
        *,
        method: str = "GET",
        body: bytes = b"",
        headers: Sequence[str] = (),
        pairs: bool = False,
    ) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        hostport = f"{self.host}:{self.port}"
        self.pairs = pairs
        if pairs:
            base = parts.path.rstrip("/")
            self.admit = build_request("POST", hostport, base + ADMIT_PATH, headers, b"")
            self.release_head = f"POST {base}{RELEASE_PATH} HTTP/1.1\r\nHost: {hostport}\r\n"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.raw = build_request(method, hostport, path, headers, body)

    async def connect(self, n: int) -> list[Connection]:
        loop = asyncio.get_running_loop()
        conns = []
        for _ in range(n):
            _, conn = await loop.create_connection(Connection, self.host, self.port)
            conns.append(conn)
        return conns

    async def unit(self, conn: Connection, run: Run) -> None:
        """One request, or one admit+release pair; raises HttpError on a failed call."""
        if not self.pairs:
            await self._call(conn, self.raw, run)
            return
        body = await self._call(conn, self.admit, run)
        payload = msgspec.json.encode(msgspec.json.decode(body, type=Ticket))
        release = self.release_head.encode() + (
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload)
        )
        await self._call(conn, release + payload, run)

    async def _call(self, conn: Connection, raw: bytes, run: Run) -> bytes:
        status, body = await conn.request(raw)
        run.calls += 1
        if not 200 <= status < 300:
            raise HttpError(f"status {status}: {body[:200]!r}")
        return body

    async def closed_loop(self, conns: list[Connection], run: Run, until: float) -> None:
        async def worker(conn: Connection) -> None:
            while time.perf_counter() < until:
                started = time.perf_counter()
                try:
                    await self.unit(conn, run)
                except (HttpError, msgspec.DecodeError) as exc:
                    run.error(str(exc))
                    if conn.transport is None:
                        return
                    continue
                run.done(started)

        await asyncio.gather(*(worker(c) for c in conns))

    async def open_loop(
        self, conns: list[Connection], run: Run, start: float, until: float, rate: float
    ) -> None:
        due: asyncio.Queue[float] = asyncio.Queue()

        async def worker(conn: Connection) -> None:
            while (at := await due.get()) >= 0:
                try:
                    await self.unit(conn, run)
                except (HttpError, msgspec.DecodeError) as exc:
                    run.error(str(exc))
                    if conn.transport is None:
                        return
                    continue
                run.done(at)

        workers = [asyncio.create_task(worker(c)) for c in conns]
        sent = 0
        while (now := time.perf_counter()) < until:
            # Request i is due at start + i / rate: all those due by now are sent now.
            target = int((now - start) * rate) + 1
            for i in range(sent, target):
                due.put_nowait(start + i / rate)
            sent = max(sent, target)
            await asyncio.sleep(TICK_S)
        # Requests still due when the time is up were never sent: the server fell behind.
        while not due.empty():
            due.get_nowait()
            run.error("not sent: every connection was busy until the end")
        for _ in workers:
            due.put_nowait(-1.0)
        _, pending = await asyncio.wait(workers, timeout=DRAIN_S)
        for task in pending:
            task.cancel()
            run.error("unanswered at the end")


async def generate(
    url: str,
    *,
    connections: int,
    duration_s: float,
    warmup_s: float,
    rate: float | None,
    method: str = "GET",
    body: bytes = b"",
    headers: Sequence[str] = (),
    pairs: bool = False,
) -> Result:
    gen = LoadGenerator(url, method=method, body=body, headers=headers, pairs=pairs)
    conns = await gen.connect(connections)
    start = time.perf_counter()
    run = Run(start + warmup_s)
    until = start + warmup_s + duration_s
    try:
        if rate is None:
            await gen.closed_loop(conns, run, until)
        else:
            await gen.open_loop(conns, run, start, until, rate)
    finally:
        for conn in conns:
            conn.close()
    elapsed = max(time.perf_counter(), until) - run.warmup_until
    lat = sorted(run.latencies)
    return Result(
        requests=len(lat),
        http_calls=run.calls,
        errors=run.errors,
        duration_s=round(elapsed, 3),
        rps=len(lat) / elapsed if elapsed > 0 else 0.0,
        p50_ms=percentile(lat, 0.50) * 1000,
        p99_ms=percentile(lat, 0.99) * 1000,
        mean_ms=(sum(lat) / len(lat) * 1000) if lat else 0.0,
        max_ms=(lat[-1] * 1000) if lat else 0.0,
        first_error=run.first_error,
    )


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (0 when empty: JSON has no NaN)."""
    if not ordered:
        return 0.0
    rank = max(math.ceil(q * len(ordered)), 1)
    return ordered[rank - 1]


def run_loop(coro: object) -> None:
    """Runs ``coro`` on uvloop where installed (every process of the bench does the same)."""
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds run but not counted")
    parser.add_argument("--rate", type=float, default=None, help="open loop: units per second")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body", default="", help="request body (text)")
    parser.add_argument("--header", action="append", default=[], help="'name: value', repeatable")
    parser.add_argument("--pairs", action="store_true", help="admission API admit+release pairs")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--connections must be >= 1, --duration > 0, --warmup >= 0")
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be > 0")
    out: list[Result] = []

    async def go() -> None:
        out.append(
            await generate(
                args.url,
                connections=args.connections,
                duration_s=args.duration,
                warmup_s=args.warmup,
                rate=args.rate,
                method=args.method.upper(),
                body=args.body.encode(),
                headers=args.header,
                pairs=args.pairs,
            )
        )

    run_loop(go())
    sys.stdout.buffer.write(msgspec.json.encode(out[0]) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
