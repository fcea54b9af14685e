"""Hostile input against a running ``serve`` process on a real Redis (issue 7, part 5).

Requests are written byte by byte over raw sockets, so they carry what an HTTP client library
would refuse to send: non-UTF-8 header values, repeated and oversized headers, odd methods and
paths, garbage JSON for the admission API. The upstream stays up and Redis stays up throughout,
so no documented 5xx applies: every answer must be below 500. At the end the process must be
alive, Redis must hold only keys of the configured pool, the workload registry must respect
``maxTracked`` and the metric label values must be capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sidecar import contract
from sidecar.keys import VALID_ID
from sidecar.metrics import Metrics
from sidecar.simulator import SimulatedModel, start_app
from tests.redis_proc import RedisProcess, free_port

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parents[1]
POOL = "hostile"
PREFIX = f"as:{{{POOL}}}:".encode()
MAX_TRACKED = 20
# Metrics caps workload and flow label values at this many; the rest report as "other".
LABEL_LIMIT: int = inspect.signature(Metrics).parameters["workload_label_limit"].default
TIMEOUT_S = 15.0
_T = TypeVar("_T")

CLASSIFICATION_HEADERS = [
    "x-workload-context",
    "x-workload-id",
    "x-workload-criticality",
    "x-gateway-inference-fairness-id",
    "x-gateway-inference-objective",
    "x-gateway-inference-ttl",
    "x-llm-d-inference-fairness-id",
    "x-llm-d-inference-objective",
    "x-llm-d-inference-ttl",
    "x-request-id",
    "x-admission-deny-status",
]
# The request framing is ours to write (a wrong Content-Length only makes the socket hang).
FRAMING_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "connection", "expect", "host", "upgrade"}
)
ROUTES = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/admission/v1/admit",
    "/admission/v1/release",
    "/admission/v1/renew",
    "/admission/v1/check",
    "/admission/v1/check/v1/chat/completions",
]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"]
TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


# Strategies ---------------------------------------------------------------------------------


def _wire(text: str) -> bytes:
    """Text as raw header bytes: lone surrogates become invalid UTF-8; CR and LF cannot appear
    inside a field (they would end it), so they are dropped."""
    return text.encode("utf-8", "surrogatepass").replace(b"\r", b"").replace(b"\n", b"")


def mostly(common: st.SearchStrategy[_T], rare: st.SearchStrategy[_T]) -> st.SearchStrategy[_T]:
    """``common`` four times in five. Inputs the HTTP parser rejects (control characters, unknown
    methods, oversized lines) never reach the sidecar's code: they must not crowd out the rest."""
    return st.integers(0, 4).flatmap(lambda n: rare if n == 0 else common)


# No control characters (the HTTP parser answers 400 before the sidecar sees them); lone
# surrogates, other scripts, braces, colons, pipes and percent signs all pass.
texts = st.text(st.characters(exclude_categories=["Cc"]), max_size=60)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)
ids = st.from_regex(VALID_ID, fullmatch=True) | texts
criticalities = st.integers(-(2**70), 2**70).map(str) | st.floats().map(str) | texts
durations = st.sampled_from(["1ms", "250ms", "5s", "2m", "1h", "1.5", "0", "-1s", ".5", "1e9"])
contexts = st.one_of(
    st.builds(
        lambda wid, crit: json.dumps({"workload_id": wid, "criticality": crit}),
        ids | json_values,
        json_values,
    ),
    json_values.map(json.dumps),
    texts,
)
values_by_header = {
    "x-workload-context": contexts,
    "x-workload-id": ids,
    "x-workload-criticality": criticalities,
    "x-gateway-inference-fairness-id": ids,
    "x-llm-d-inference-fairness-id": ids,
    "x-gateway-inference-objective": ids,
    "x-llm-d-inference-objective": ids,
    "x-gateway-inference-ttl": durations | texts,
    "x-llm-d-inference-ttl": durations | texts,
    "x-request-id": ids,
    "x-admission-deny-status": st.integers(0, 1000).map(str) | texts,
}
any_value = mostly(
    texts.map(_wire),
    st.one_of(
        st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        # Around aiohttp's and the decoder's length caps (8190 and 8192 bytes).
        st.integers(8000, 9000).map(lambda n: b"v" * n),
    ),
)
header_names = mostly(
    st.sampled_from(CLASSIFICATION_HEADERS),
    st.text(TOKEN, min_size=1, max_size=30).filter(lambda n: n.lower() not in FRAMING_HEADERS),
)


@st.composite
def header_lines(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    lines: list[tuple[bytes, bytes]] = []
    for _ in range(draw(st.integers(0, 8))):
        name = draw(header_names)
        # Header names are case-insensitive: flip the case of some letters.
        flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
        name = "".join(c.upper() if f else c for c, f in zip(name, flips, strict=True))
        typed = values_by_header.get(name.lower())
        value = draw(any_value if typed is None else mostly(typed.map(_wire), any_value))
        lines.append((name.encode(), value))
    return lines


api_bodies = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "ticket": ids | json_values,
            "lease": durations | st.floats() | st.integers() | json_values,
            "bytes": st.integers(-(2**70), 2**70) | json_values,
            "extra": json_values,
        },
    ).map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
)
bodies = mostly(
    st.one_of(
        st.just(b""),
        api_bodies,
        st.binary(max_size=4096),
        st.builds(
            lambda stream, tokens: json.dumps({"stream": stream, "max_tokens": tokens}).encode(),
            st.booleans(),
            st.integers(-5, 5),
        ),
    ),
    # Up to 2 MiB, past any body limit a deployment is likely to set.
    st.integers(0, 2 * 1024 * 1024).map(lambda n: b"{" * n),
)
paths = mostly(
    st.sampled_from(ROUTES),
    st.one_of(
        st.builds(
            lambda r, t: r + t, st.sampled_from(ROUTES), st.text(TOKEN + "/%?=&:", max_size=30)
        ),
        st.binary(min_size=1, max_size=60).map(
            lambda b: "/" + "".join(f"%{x:02X}" if x < 0x21 or x > 0x7E else chr(x) for x in b)
        ),
    ),
)
methods = mostly(st.sampled_from(METHODS), st.sampled_from(["PROPFIND", "PURGE", "BREW", "get"]))


@dataclass(frozen=True)
class RawRequest:
    method: str
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunked: bool

    def named_deny_statuses(self) -> set[int]:
        """Statuses asked for with x-admission-deny-status: the check endpoint answers a denial
        with the status this header names, anything from 400 to 599 (sidecar/http/api.py)."""
        return {
            int(value)
            for name, value in self.headers
            if name.lower() == b"x-admission-deny-status" and value.strip(b" \t").isdigit()
        }

    def encode(self) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1".encode(), b"Host: 127.0.0.1"]
        lines += [name + b": " + value for name, value in self.headers]
        lines.append(b"Connection: close")
        if self.chunked:
            lines.append(b"Transfer-Encoding: chunked")
            half = len(self.body) // 2
            parts = [p for p in (self.body[:half], self.body[half:]) if p]
            framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        else:
            lines.append(b"Content-Length: %d" % len(self.body))
            framed = self.body
        return b"\r\n".join(lines) + b"\r\n\r\n" + framed


requests = st.builds(
    RawRequest,
    method=methods,
    path=paths,
    headers=header_lines(),
    body=bodies,
    chunked=st.booleans(),
)


# The running replica ------------------------------------------------------------------------


def exchange(port: int, raw: bytes) -> bytes:
    """Sends one request and reads until the server closes (the request asks it to)."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as s:
        # The server may answer early (e.g. 400 before the body) and close: keep that answer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(raw)
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    """The final status (interim 1xx responses skipped); 0 if the server sent no response."""
    while match := re.match(rb"HTTP/1\.[01] (\d{3})", response):
        status = int(match[1])
        if status >= 200:
            return status
        response = response.partition(b"\r\n\r\n")[2]
    return 0


def get(port: int, path: str) -> tuple[int, str]:
    raw = exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    return status_of(raw), raw.partition(b"\r\n\r\n")[2].decode(errors="replace")


class ThreadedUpstream:
    """The simulated model server on its own event loop thread (the test itself is blocking)."""

    def __init__(self) -> None:
        self.model = SimulatedModel(latency_s=0.0, token_delay_s=0.0)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._runner, self.port = self._call(start_app(self.model.app()))

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=TIMEOUT_S)

    def stop(self) -> None:
        self._call(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=TIMEOUT_S)
        self._loop.close()


@dataclass
class Replica:
    proc: subprocess.Popen[bytes]
    port: int
    admin: int
    log: Path
    redis_url: str

    def log_tail(self) -> str:
        # The log quotes hostile bytes: not necessarily UTF-8.
        return self.log.read_bytes()[-4000:].decode(errors="replace")

    def assert_alive(self) -> None:
        assert self.proc.poll() is None, self.log_tail()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 2 * TIMEOUT_S
        while True:
            self.assert_alive()
            with contextlib.suppress(OSError):  # not listening yet
                if get(self.admin, "/readyz")[0] == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"replica not ready:\n{self.log_tail()}")
            # Polling: there is no event to wait on across processes.
            time.sleep(0.05)


@pytest.fixture(scope="module", params=["lenient", "strict"])
def hostile_replica(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replica]:
    """One replica per header mode: lenient falls back, strict answers 400 naming the header."""
    tmp = tmp_path_factory.mktemp(f"hostile-{request.param}")
    config = tmp / "config.yaml"
    # Capacity far above what the test sends: tickets taken by /admit are never released, and a
    # saturated pool would only make requests wait out their TTL.
    config.write_text(
        f"""
pool: {POOL}
strictHeaders: {str(request.param == "strict").lower()}
saturationDetector: {{parameters: {{maxConcurrency: 100000}}}}
flowControl: {{defaultRequestTTL: 2s, maxRequestTTL: 5s}}
workloadRegistry: {{maxTracked: {MAX_TRACKED}}}
redis: {{ticketLease: 30s}}
"""
    )
    server = RedisProcess().start()
    upstream: ThreadedUpstream | None = None
    proc: subprocess.Popen[bytes] | None = None
    try:
        upstream = ThreadedUpstream()
        log = tmp / "serve.log"
        port, admin = free_port(), free_port()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable, "-m", "sidecar", "serve",
                    "--config", str(config),
                    "--redis-url", server.url,
                    "--upstream", f"http://127.0.0.1:{upstream.port}",
                    "--listen", f"127.0.0.1:{port}",
                    "--admin-listen", f"127.0.0.1:{admin}",
                    "--replica-id", "hostile",
                ],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        replica = Replica(proc, port, admin, log, server.url)
        replica.wait_ready()
        yield replica
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if upstream is not None:
            upstream.stop()
        server.kill()


def label_values(metrics: str, label: str) -> set[str]:
    return set(re.findall(rf'{label}="((?:[^"\\]|\\.)*)"', metrics))


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests)
def test_hostile_requests_are_answered_below_500(
    hostile_replica: Replica, request: RawRequest
) -> None:
    raw = request.encode()
    response = exchange(hostile_replica.port, raw)
    status = status_of(response)
    event(f"status {status}")  # --hypothesis-show-statistics: how far the inputs got
    # Every request gets an answer, and none is a 5xx it did not ask for.
    assert 200 <= status < 500 or status in request.named_deny_statuses(), (
        raw[:600],
        response[:600],
    )
    hostile_replica.assert_alive()


def test_after_the_flood_the_replica_is_alive_and_the_pool_bounded(
    hostile_replica: Replica,
) -> None:
    """Shares the module's replica: what the hypothesis test sent counts too, if it ran first."""
    # Far more distinct valid ids than the registry tracks and the metrics label, under every
    # header that carries one: the bounds must hold whatever hypothesis happened to draw.
    for n in range(LABEL_LIMIT + 50):
        headers = [
            (b"x-workload-id", b"flood-w%d" % n),
            (b"x-gateway-inference-fairness-id", b"flood-f%d" % n),
            (b"x-llm-d-inference-fairness-id", b"flood-l%d" % n),
        ]
        if n % 2:
            headers.append((b"x-workload-context", b'{"workload_id": "ctx-%d"}' % n))
        flood = RawRequest("GET", "/v1/x", headers, b"", chunked=False)
        assert status_of(exchange(hostile_replica.port, flood.encode())) == 200
    hostile_replica.assert_alive()
    assert get(hostile_replica.admin, "/healthz")[0] == 200
    assert get(hostile_replica.admin, "/readyz")[0] == 200
    # The only tracebacks allowed are aiohttp's own log of requests its parser refused (400):
    # anything else is an exception in a handler or in a background loop.
    records = re.split(rb"\n(?=\d{4}-\d\d-\d\d )", hostile_replica.log.read_bytes())
    unexpected = [r for r in records if b"Traceback" in r and b"aiohttp.http_exceptions." not in r]
    assert unexpected == [], b"\n".join(unexpected)[:4000]

    client = redis.Redis.from_url(hostile_replica.redis_url)
    try:
        keys = list(client.scan_iter(count=1000))
        tracked = client.zcard(PREFIX + b"workloads")
        held = [k for k in keys if k.startswith(PREFIX + b"held:")]
        # (Less the layout field each held hash carries: contract.POOL_LAYOUT.)
        layouts = sum(client.hexists(k, contract.POOL_LAYOUT) for k in held)
        inflight = sum(client.hlen(k) for k in held) - layouts + client.hlen(PREFIX + b"leased")
        leased = client.zcard(PREFIX + b"leases")
        pool: dict[bytes, bytes] = client.hgetall(PREFIX + b"pool")  # type: ignore[assignment]
        band_bytes = [int(v) for k, v in pool.items() if k.startswith(b"b:")]
    finally:
        client.close()
    # Every slot left is a ticket with a lease (no hostile lease made one that never expires),
    # and no declared size went negative (which would let later requests past maxBytes).
    assert inflight == leased
    assert all(b >= 0 for b in band_bytes)
    assert keys
    assert [k for k in keys if not k.startswith(PREFIX)] == []
    registry = [k for k in keys if k.startswith(PREFIX + b"w:")]
    # The cap was reached (so it is the cap that held), and never passed.
    assert tracked == MAX_TRACKED
    assert len(registry) <= MAX_TRACKED

    status, metrics = get(hostile_replica.admin, "/metrics")
    assert status == 200
    workloads = label_values(metrics, "workload_id")
    flows = label_values(metrics, "fairness_id")
    assert 0 < len(workloads) <= MAX_TRACKED + 1
    assert len(flows) <= LABEL_LIMIT + 1 and "other" in flows
