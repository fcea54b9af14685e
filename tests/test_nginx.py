"""nginx in front of the sidecar's gateway check, for real: auth_request, deny mapping, leases.

Each test runs deploy/examples/nginx.conf (addresses, paths and worker count rewritten) with the
nginx binary, the sidecar in-process (embedded store unless stated) and a simulated model server as
nginx's upstream. Clients talk to nginx only. nginx is required: without it these tests fail (CI
installs it through .ci/system-deps), they are never skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import Config, load_config
from sidecar.http.app import Server
from sidecar.options import ServeOptions
from sidecar.simulator import Arrival, SimulatedModel, start_app
from sidecar.state import read_state
from tests.http_harness import eventually
from tests.redis_proc import RedisProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_CONF = ROOT / "deploy" / "examples" / "nginx.conf"
RELAY = ROOT / "deploy" / "examples" / "nginx_release_relay.py"
CHAT = "/v1/chat/completions"
# Classification headers are for the sidecar only: the model server must not get them.
CLASSIFICATION = (
    "x-workload-id",
    "x-workload-criticality",
    "x-gateway-inference-objective",
    "x-gateway-inference-ttl",
    "x-llm-d-inference-fairness-id",
    "x-llm-d-inference-objective",
    "x-llm-d-inference-ttl",
)


@pytest.fixture(scope="session")
def nginx_bin() -> str:
    """The nginx binary; fails (never skips) when it is missing or lacks auth_request."""
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )
    if found is None:
        pytest.fail(
            "nginx is not installed, and tests/test_nginx.py runs it for real: run .ci/system-deps "
            "(apt-get install nginx-light)",
            pytrace=False,
        )
    built = subprocess.run([found, "-V"], capture_output=True, text=True, check=False)
    if "--with-http_auth_request_module" not in built.stderr + built.stdout:
        pytest.fail(f"{found} was built without the auth_request module", pytrace=False)
    return found


def sidecar_config(**overrides: Any) -> Config:
    """maxConcurrency 2; leases checked every 100 ms so an expiry shows up at once."""
    raw: dict[str, Any] = {
        "saturationDetector": {"parameters": {"maxConcurrency": 2}},
        # Long enough that a loaded CI machine finishes the steps before a lease runs out.
        "redis": {"ticketLease": "8s", "maintenanceInterval": "100ms"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return load_config(raw)


def render_conf(
    prefix: Path, *, port: int, sidecar_port: int, model_port: int, relay_port: int | None
) -> str:
    """The example config on test ports, with every file it writes inside ``prefix``."""
    text = EXAMPLE_CONF.read_text()
    temp_paths = "".join(
        f"    {name}_temp_path {prefix}/tmp/{name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    replacements = [
        ("worker_processes auto;", "worker_processes 1;"),
        ("pid /run/nginx.pid;", f"pid {prefix}/nginx.pid;"),
        ("error_log /var/log/nginx/error.log warn;", f"error_log {prefix}/error.log info;"),
        ("access_log /var/log/nginx/access.log;", f"access_log {prefix}/access.log;"),
        ("listen 80;", f"listen 127.0.0.1:{port};"),
        ("server 127.0.0.1:8080;", f"server 127.0.0.1:{sidecar_port};"),
        ("server 127.0.0.1:8000;", f"server 127.0.0.1:{model_port};"),
        ("http {\n", "http {\n" + temp_paths),
    ]
    for old, new in replacements:
        assert text.count(old) == 1, f"{EXAMPLE_CONF} no longer has exactly one {old!r}"
        text = text.replace(old, new)
    release_line = re.compile(r"^ *access_log syslog:server=127\.0\.0\.1:5514,.*\n", re.MULTILINE)
    assert len(release_line.findall(text)) == 1, f"{EXAMPLE_CONF}: release access_log line moved"
    if relay_port is None:
        return release_line.sub("", text)
    return text.replace("syslog:server=127.0.0.1:5514", f"syslog:server=127.0.0.1:{relay_port}")


async def wait_until_listening(port: int, proc: asyncio.subprocess.Process, prefix: Path) -> None:
    deadline = time.monotonic() + 10
    while True:
        if proc.returncode is not None:
            raise AssertionError(f"nginx exited with {proc.returncode}: {read_logs(prefix)}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"nginx never listened on {port}: {read_logs(prefix)}"
                ) from None
            await asyncio.sleep(0.02)
            continue
        writer.close()
        await writer.wait_closed()
        return


def read_logs(prefix: Path, names: tuple[str, ...] = ("nginx.err", "error.log")) -> str:
    parts = []
    for name in names:
        path = prefix / name
        if path.exists():
            parts.append(f"--- {name}\n{path.read_text(errors='replace')}")
    return "\n".join(parts)


@contextlib.asynccontextmanager
async def child_process(
    argv: list[str], prefix: Path, name: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A process of the test's own, output in ``prefix``/name.out|err; SIGTERM, then SIGKILL."""
    with (prefix / f"{name}.out").open("wb") as out, (prefix / f"{name}.err").open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    async with asyncio.timeout(10):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A directory nginx's workers can reach even when they run as 'nobody' (root runs)."""
    path = Path(tempfile.mkdtemp(prefix="sidecar-nginx-"))
    path.chmod(0o755)
    (path / "tmp").mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def release_relay(sidecar: str, prefix: Path) -> AsyncIterator[int]:
    """deploy/examples/nginx_release_relay.py on a free UDP port; yields the port."""
    argv = [sys.executable, str(RELAY), "--listen", "127.0.0.1:0", "--sidecar", sidecar]
    async with child_process(argv, prefix, "relay") as proc:
        deadline = time.monotonic() + 20
        ready = re.compile(r"udp://127\.0\.0\.1:(\d+)")
        while (found := ready.search((prefix / "relay.out").read_text())) is None:
            if proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"release relay did not start: {read_logs(prefix, ('relay.err',))}"
                )
            await asyncio.sleep(0.02)
        yield int(found.group(1))


@dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> dict[str, Any]:
        decoded: dict[str, Any] = msgspec.json.decode(self.body)
        return decoded


def header(arrival: Arrival, name: str) -> str | None:
    """A header as the model server received it (names compared case-insensitively)."""
    return CIMultiDict(arrival.headers).get(name)


@dataclass
class Gateway:
    """nginx on ``url``, the sidecar behind its auth_request, the model server behind both."""

    server: Server
    model: SimulatedModel
    session: aiohttp.ClientSession
    url: str
    sidecar: str
    prefix: Path
    statuses: list[int] = field(default_factory=list)
    sidecar_running: bool = True

    async def send(self, headers: Mapping[str, str] | None = None, path: str = CHAT) -> Reply:
        """A chat completion through nginx, as workload 'chat' unless ``headers`` say otherwise."""
        sent = {"x-workload-id": "chat", **(headers or {})}
        async with self.session.post(self.url + path, json={"model": "sim"}, headers=sent) as r:
            reply = Reply(r.status, CIMultiDict(r.headers), await r.read())
        self.statuses.append(reply.status)
        return reply

    async def release(self, ticket: str) -> bool:
        """The admission API's release, as the model server (or anyone holding it) would call it."""
        url = f"{self.sidecar}/admission/v1/release"
        async with self.session.post(url, json={"ticket": ticket}) as r:
            assert r.status == 200, await r.text()
            released: bool = (await r.json())["released"]
            return released

    async def inflight(self) -> int:
        return (await read_state(self.server.service.controller.store)).inflight

    async def queued(self) -> int:
        return (await read_state(self.server.service.controller.store)).queued

    async def inflight_is(self, count: int) -> bool:
        return await self.inflight() == count

    async def queued_is(self, count: int) -> bool:
        return await self.queued() == count

    def hold_upstream(self) -> asyncio.Event:
        """Requests reaching the model server wait until the returned event is set."""
        gate = asyncio.Event()
        self.model.gate = gate
        return gate

    async def stop_sidecar(self) -> None:
        self.sidecar_running = False
        await self.server.shutdown()

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def assert_no_internal_errors(self, *, check_may_fail: bool = False) -> None:
        """nginx answered no client with a 500, and (unless expected) every check got through."""
        assert 500 not in self.statuses, self.statuses
        if not check_may_fail:
            assert "auth request unexpected status" not in self.error_log()


@contextlib.asynccontextmanager
async def gateway(
    nginx_bin: str, config: Config, *, relay: bool = False, redis_url: str | None = None
) -> AsyncIterator[Gateway]:
    model = SimulatedModel(latency_s=0.01)
    model_runner, model_port = await start_app(model.app())
    sidecar_port, admin_port, port = free_port(), free_port(), free_port()
    server = Server(
        ServeOptions(
            config=config,
            listen=("127.0.0.1", sidecar_port),
            admin_listen=("127.0.0.1", admin_port),
            redis_url=redis_url,
            upstream=None,  # check mode only: nginx forwards to the model server itself
            replica_id="nginx-test",
        )
    )
    sidecar = f"http://127.0.0.1:{sidecar_port}"
    gw: Gateway | None = None
    try:
        await server.start()
        with scratch_dir() as prefix:
            async with contextlib.AsyncExitStack() as stack:
                relay_port = (
                    await stack.enter_async_context(release_relay(sidecar, prefix))
                    if relay
                    else None
                )
                conf = prefix / "nginx.conf"
                conf.write_text(
                    render_conf(
                        prefix,
                        port=port,
                        sidecar_port=sidecar_port,
                        model_port=model_port,
                        relay_port=relay_port,
                    )
                )
                argv = [nginx_bin, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]
                proc = await stack.enter_async_context(child_process(argv, prefix, "nginx"))
                await wait_until_listening(port, proc, prefix)
                session = await stack.enter_async_context(aiohttp.ClientSession())
                gw = Gateway(server, model, session, f"http://127.0.0.1:{port}", sidecar, prefix)
                try:
                    yield gw
                finally:
                    if model.gate is not None:
                        model.gate.set()
    finally:
        if gw is None or gw.sidecar_running:
            await server.shutdown()
        await model_runner.cleanup()


def assert_denied(reply: Reply, status: int, outcome: str, reason: str) -> None:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["x-admission-outcome"] == outcome
    assert reply.headers["x-admission-reason"] == reason
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert (body["outcome"], body["reason"]) == (outcome, reason)
    assert "x-admission-ticket" not in reply.headers


async def test_admits_while_capacity_lasts_then_429_until_a_slot_is_released(
    nginx_bin: str,
) -> None:
    async with gateway(nginx_bin, sidecar_config()) as gw:
        gate = gw.hold_upstream()
        held = [
            asyncio.create_task(
                gw.send({"x-request-id": f"held-{i}", "x-workload-criticality": "4"})
            )
            for i in range(2)
        ]
        await eventually(lambda: len(gw.model.arrivals) == 2)
        # The model server got both, with their tickets and ids, without the sidecar's headers.
        tickets = [header(a, "x-admission-ticket") for a in gw.model.arrivals]
        assert all(tickets) and len(set(tickets)) == 2, tickets
        assert sorted(header(a, "x-request-id") or "" for a in gw.model.arrivals) == [
            "held-0",
            "held-1",
        ]
        for arrival in gw.model.arrivals:
            assert arrival.path == CHAT
            assert not any(header(arrival, name) for name in CLASSIFICATION), arrival.headers
        assert await gw.inflight() == 2
        state = await read_state(gw.server.service.controller.store)
        assert [w.workload_id for w in state.workloads] == ["chat"]  # headers reached the check

        # Both slots taken: a request that may wait 100 ms is turned away with a 429, not a 500.
        denied = await gw.send({"x-gateway-inference-ttl": "100ms"})
        assert_denied(denied, 429, "evicted_ttl", "evicted_ttl")
        assert denied.headers["retry-after"] == "1"
        assert len(gw.model.arrivals) == 2

        gate.set()
        for reply in await asyncio.gather(*held):
            assert reply.status == 200, reply.body
            assert reply.headers["x-admission-outcome"] == "dispatched"
            assert reply.headers["x-admission-wait-ms"].isdigit()
            assert reply.headers["x-request-id"] in {"held-0", "held-1"}
            assert "x-admission-ticket" not in reply.headers
            assert reply.json()["object"] == "chat.completion"

        # The responses have ended, but auth_request cannot tell the sidecar (no relay here): the
        # slots are leases, still held.
        assert await gw.inflight() == 2
        again = await gw.send({"x-gateway-inference-ttl": "100ms"})
        assert_denied(again, 429, "evicted_ttl", "evicted_ttl")

        # Released through the admission API with the ticket the model server got: room again.
        assert tickets[0] is not None and tickets[1] is not None
        assert await gw.release(tickets[0]) is True
        assert await gw.release(tickets[0]) is False  # idempotent
        admitted = await gw.send({"x-gateway-inference-ttl": "100ms"})
        assert admitted.status == 200, admitted.body
        assert len(gw.model.arrivals) == 3

        # Nobody releases the other two: the next request waits in the queue until the older
        # lease (ticketLease 8s) expires, and is then admitted.
        assert await gw.inflight() == 2
        late = await gw.send({"x-gateway-inference-ttl": "20s"})
        assert late.status == 200, late.body
        assert late.headers["x-admission-outcome"] == "dispatched"
        assert await gw.release(tickets[1]) is False  # its lease had run out
        gw.assert_no_internal_errors()


async def test_release_relay_frees_each_slot_when_its_response_ends(nginx_bin: str) -> None:
    # A 60 s lease: any slot freed within this test was freed by the relay, not by expiry.
    config = sidecar_config(redis={"ticketLease": "60s"})
    async with gateway(nginx_bin, config, relay=True) as gw:
        # Three times maxConcurrency in a row, each admitted long before any lease could expire.
        for _ in range(6):
            reply = await gw.send({"x-gateway-inference-ttl": "10s"})
            assert reply.status == 200, reply.body
        await eventually(lambda: gw.inflight_is(0))

        # A slot stays taken while its response runs, and is freed once it has ended.
        gate = gw.hold_upstream()
        held = [asyncio.create_task(gw.send()) for _ in range(2)]
        await eventually(lambda: len(gw.model.arrivals) == 8)
        denied = await gw.send({"x-gateway-inference-ttl": "100ms"})
        assert_denied(denied, 429, "evicted_ttl", "evicted_ttl")
        gate.set()
        assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
        await eventually(lambda: gw.inflight_is(0))

        # A client that goes away while the model server is answering frees its slot as well.
        gate = gw.hold_upstream()
        leaving = asyncio.create_task(gw.send())
        await eventually(lambda: len(gw.model.arrivals) == 9)
        assert await gw.inflight() == 1
        leaving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leaving
        await eventually(lambda: gw.inflight_is(0))
        gate.set()
        gw.assert_no_internal_errors()


async def test_llm_d_headers_reach_the_check_and_never_the_model_server(nginx_bin: str) -> None:
    async with gateway(nginx_bin, sidecar_config(objectives={"premium": 100})) as gw:
        llm_d = {
            "x-llm-d-inference-fairness-id": "tenant-a",
            "x-llm-d-inference-objective": "premium",
            "x-llm-d-inference-ttl": "20s",
        }
        gate = gw.hold_upstream()
        held = [asyncio.create_task(gw.send(llm_d)) for _ in range(2)]
        await eventually(lambda: len(gw.model.arrivals) == 2)
        for arrival in gw.model.arrivals:
            assert not any(header(arrival, name) for name in CLASSIFICATION), arrival.headers
        # Queued under the llm-d fairness id and objective the check was given.
        waiting = asyncio.create_task(gw.send(llm_d))
        await eventually(lambda: gw.queued_is(1))
        state = await read_state(gw.server.service.controller.store)
        assert [(b.priority, [f.flow for f in b.flows]) for b in state.bands if b.flows] == [
            (100, ["tenant-a"])
        ]
        # The llm-d TTL header too: without it this would wait the default 30 s.
        denied = await gw.send({"x-llm-d-inference-ttl": "100ms"})
        assert_denied(denied, 429, "evicted_ttl", "evicted_ttl")
        gate.set()
        assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
        assert await gw.release(header(gw.model.arrivals[0], "x-admission-ticket") or "") is True
        assert (await waiting).status == 200
        gw.assert_no_internal_errors()


async def test_client_leaving_while_queued_takes_its_request_out_of_the_queue(
    nginx_bin: str,
) -> None:
    async with gateway(nginx_bin, sidecar_config()) as gw:
        gw.hold_upstream()
        held = [asyncio.create_task(gw.send()) for _ in range(2)]
        await eventually(lambda: len(gw.model.arrivals) == 2)
        waiting = asyncio.create_task(gw.send({"x-gateway-inference-ttl": "30s"}))
        await eventually(lambda: gw.queued_is(1))
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        # nginx closes the check's connection; the sidecar drops the request long before its TTL.
        await eventually(lambda: gw.queued_is(0), timeout=5)
        assert gw.model.gate is not None
        gw.model.gate.set()
        assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
        assert len(gw.model.arrivals) == 2
        gw.assert_no_internal_errors()


async def test_full_queue_is_429_rejected_capacity_at_once(nginx_bin: str) -> None:
    async with gateway(nginx_bin, sidecar_config(flowControl={"maxRequests": 1})) as gw:
        gate = gw.hold_upstream()
        held = [asyncio.create_task(gw.send()) for _ in range(2)]
        await eventually(lambda: len(gw.model.arrivals) == 2)
        queued = asyncio.create_task(gw.send({"x-gateway-inference-ttl": "30s"}))
        await eventually(lambda: gw.queued_is(1))
        full = await gw.send({"x-gateway-inference-ttl": "30s"})
        assert_denied(full, 429, "rejected_capacity", "rejected_capacity")
        assert full.headers["retry-after"] == "1"
        # Refused on arrival, not after its TTL: the request queued before it with the same TTL
        # is still waiting.
        assert not queued.done() and await gw.queued_is(1)
        gate.set()
        assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
        # The queued one gets a slot when a lease is released.
        assert await gw.release(header(gw.model.arrivals[0], "x-admission-ticket") or "") is True
        assert (await queued).status == 200
        gw.assert_no_internal_errors()


async def test_shutting_down_and_unreachable_sidecar_are_503_not_500(nginx_bin: str) -> None:
    async with gateway(nginx_bin, sidecar_config()) as gw:
        ok = await gw.send()
        assert ok.status == 200

        gw.server.service.draining = True  # what SIGTERM does first
        draining = await gw.send()
        assert_denied(draining, 503, "rejected_other", "shutting_down")
        assert draining.headers["retry-after"] == "1"
        gw.server.service.draining = False

        await gw.stop_sidecar()
        gone = await gw.send()
        assert gone.status == 503, gone.body
        assert gone.headers["x-admission-reason"] == "sidecar_unreachable"
        assert gone.headers["retry-after"] == "1"
        assert gone.json()["reason"] == "sidecar_unreachable"
        assert len(gw.model.arrivals) == 1  # failing closed: nothing went through unadmitted
        gw.assert_no_internal_errors(check_may_fail=True)


async def test_malformed_header_in_strict_mode_is_400(nginx_bin: str) -> None:
    async with gateway(nginx_bin, sidecar_config(strictHeaders=True)) as gw:
        bad = await gw.send({"x-workload-criticality": "very"})
        assert_denied(bad, 400, "rejected_other", "bad_header")
        assert "retry-after" not in bad.headers
        assert (await gw.send({"x-workload-criticality": "5"})).status == 200
        gw.assert_no_internal_errors()


@pytest.mark.redis
async def test_store_unavailable_is_503_when_failing_closed(nginx_bin: str) -> None:
    redis = RedisProcess().start()
    try:
        config = sidecar_config(redis={"timeout": "200ms"})
        async with gateway(nginx_bin, config, redis_url=redis.url) as gw:
            assert (await gw.send()).status == 200
            redis.kill()
            down = await gw.send()
            assert_denied(down, 503, "rejected_other", "store_unavailable")
            assert len(gw.model.arrivals) == 1
            gw.assert_no_internal_errors()
    finally:
        redis.kill()


async def test_check_endpoint_status_contract(nginx_bin: str) -> None:
    """What nginx and Envoy rely on, asked directly: 200 + ticket, else the (chosen) deny status."""
    async with gateway(nginx_bin, sidecar_config(redis={"ticketLease": "60s"})) as gw:
        check = f"{gw.sidecar}/admission/v1/check/v1/chat/completions?stream=1"

        async def ask(**headers: str) -> CIMultiDictProxy[str] | int:
            sent = {"x-workload-id": "direct", "x-gateway-inference-ttl": "50ms", **headers}
            async with gw.session.get(check, headers=sent) as r:
                await r.read()
                return r.headers if r.status == 200 else r.status

        admitted = [await ask(), await ask()]
        for got in admitted:
            assert isinstance(got, CIMultiDictProxy), got
            assert got["x-admission-outcome"] == "dispatched"
            assert got["x-admission-ticket"] and got["x-admission-wait-ms"].isdigit()
        assert await ask() == 429
        assert await ask(**{"x-admission-deny-status": "403"}) == 403
        assert await ask(**{"x-admission-deny-status": "401"}) == 401
        assert await ask(**{"x-admission-deny-status": "418"}) == 418
        # Only 4xx can be asked for (a refusal never reads as the sidecar failing); anything else
        # leaves the outcome's own status.
        for ignored in ("200", "302", "500", "599", "600", "forbidden", ""):
            assert await ask(**{"x-admission-deny-status": ignored}) == 429
        for got in admitted:
            assert isinstance(got, CIMultiDictProxy)
            assert await gw.release(got["x-admission-ticket"]) is True


def test_relay_reads_tickets_from_nginx_syslog_lines_only() -> None:
    spec = importlib.util.spec_from_file_location("nginx_release_relay", RELAY)
    assert spec is not None and spec.loader is not None
    relay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(relay)
    assert relay.parse_ticket(b"<190>Nov 28 08:40:48 admission: 0000000000000042") == (
        "0000000000000042"
    )
    assert relay.parse_ticket(b"<190>Nov 28 08:40:48 admission: 0000000000000042\n") == (
        "0000000000000042"
    )
    for junk in (b"", b"0000000000000042", b"<190>", b"<190>Nov 28 admission: a b;c", b"\xff\xfe"):
        assert relay.parse_ticket(junk) is None, junk


# --- proxy mode: deploy/examples/nginx-proxy.conf (the beside-nginx overlay's config) ------------

PROXY_CONF = ROOT / "deploy" / "examples" / "nginx-proxy.conf"


def render_proxy_conf(prefix: Path, *, port: int, sidecar_port: int) -> str:
    """The proxy-mode config on test ports, with every file it writes inside ``prefix``."""
    text = PROXY_CONF.read_text().replace("_temp_path /tmp/", f"_temp_path {prefix}/tmp/")
    replacements = [
        ("worker_processes auto;", "worker_processes 1;"),
        ("pid /tmp/nginx.pid;", f"pid {prefix}/nginx.pid;"),
        ("error_log /dev/stderr warn;", f"error_log {prefix}/error.log info;"),
        ("access_log /dev/stdout;", f"access_log {prefix}/access.log;"),
        ("listen 8000;", f"listen 127.0.0.1:{port};"),
        ("server 127.0.0.1:8080;", f"server 127.0.0.1:{sidecar_port};"),
    ]
    for old, new in replacements:
        assert text.count(old) == 1, f"{PROXY_CONF} no longer has exactly one {old!r}"
        text = text.replace(old, new)
    return text


@dataclass
class ConnectionCounter:
    """A TCP relay in front of the sidecar that counts the connections nginx opens to it."""

    target: int
    accepted: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        both = [
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ]
        self.tasks.update(both)
        await asyncio.gather(*both)
        self.tasks.difference_update(both)


@dataclass
class ProxyGateway:
    """nginx on ``url`` proxying to the sidecar (proxy mode), which forwards to the model server."""

    server: Server
    model: SimulatedModel
    session: aiohttp.ClientSession
    url: str
    counter: ConnectionCounter

    async def send(self, headers: Mapping[str, str] | None = None, **body: Any) -> Reply:
        sent = {"x-workload-id": "chat", **(headers or {})}
        payload = {"model": "sim", **body}
        async with self.session.post(self.url + CHAT, json=payload, headers=sent) as r:
            return Reply(r.status, CIMultiDict(r.headers), await r.read())

    async def inflight_is(self, count: int) -> bool:
        return (await read_state(self.server.service.controller.store)).inflight == count


@contextlib.asynccontextmanager
async def proxy_gateway(nginx_bin: str, config: Config) -> AsyncIterator[ProxyGateway]:
    model = SimulatedModel(latency_s=0.01, token_delay_s=0.001)
    model_runner, model_port = await start_app(model.app())
    sidecar_port, admin_port, port = free_port(), free_port(), free_port()
    server = Server(
        ServeOptions(
            config=config,
            listen=("127.0.0.1", sidecar_port),
            admin_listen=("127.0.0.1", admin_port),
            redis_url=None,
            upstream=f"http://127.0.0.1:{model_port}",
            replica_id="nginx-proxy-test",
        )
    )
    counter = ConnectionCounter(sidecar_port)
    relay = await asyncio.start_server(counter.handle, "127.0.0.1", 0)
    relay_port = relay.sockets[0].getsockname()[1]
    try:
        await server.start()
        with scratch_dir() as prefix:
            conf = prefix / "nginx.conf"
            conf.write_text(render_proxy_conf(prefix, port=port, sidecar_port=relay_port))
            argv = [nginx_bin, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]
            async with (
                child_process(argv, prefix, "nginx") as proc,
                aiohttp.ClientSession() as session,
            ):
                await wait_until_listening(port, proc, prefix)
                try:
                    yield ProxyGateway(server, model, session, f"http://127.0.0.1:{port}", counter)
                finally:
                    if model.gate is not None:
                        model.gate.set()
    finally:
        relay.close()
        for task in list(counter.tasks):
            task.cancel()
        await server.shutdown()
        await model_runner.cleanup()


async def test_proxy_mode_streams_and_keeps_connections_to_the_sidecar_alive(
    nginx_bin: str,
) -> None:
    async with proxy_gateway(nginx_bin, sidecar_config()) as gw:
        for i in range(5):
            reply = await gw.send({"x-request-id": f"r{i}"}, stream=True, max_tokens=3)
            assert reply.status == 200, reply.body
            assert reply.headers["x-admission-outcome"] == "dispatched"
            assert reply.headers["x-request-id"] == f"r{i}"
            assert reply.headers["content-type"].startswith("text/event-stream")
            assert reply.body.count(b"data: ") == 4 and reply.body.endswith(b"data: [DONE]\n\n")
        # proxy_http_version 1.1 + keepalive: five requests, one connection to the sidecar.
        assert gw.counter.accepted == 1
        assert len(gw.model.arrivals) == 5
        for arrival in gw.model.arrivals:
            assert not any(header(arrival, name) for name in CLASSIFICATION), arrival.headers
        await eventually(lambda: gw.inflight_is(0))


async def test_proxy_mode_passes_the_sidecars_refusals_and_hides_its_api(nginx_bin: str) -> None:
    async with proxy_gateway(nginx_bin, sidecar_config()) as gw:
        gate = asyncio.Event()
        gw.model.gate = gate
        held = [asyncio.create_task(gw.send()) for _ in range(2)]
        await eventually(lambda: len(gw.model.arrivals) == 2)
        denied = await gw.send({"x-gateway-inference-ttl": "100ms"})
        assert denied.status == 429, denied.body
        assert denied.headers["x-admission-outcome"] == "evicted_ttl"
        assert denied.headers["retry-after"] == "1"
        # A client leaving mid-response frees its slot: nginx closes its sidecar connection.
        leaving = held.pop()
        leaving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leaving
        await eventually(lambda: gw.inflight_is(1))
        gate.set()
        assert (await held[0]).status == 200
        await eventually(lambda: gw.inflight_is(0))
        async with gw.session.post(f"{gw.url}/admission/v1/admit") as r:
            assert r.status == 404  # the admission API is for gateways, not clients
