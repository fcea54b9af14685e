"""Security basics: signed tickets, the admin token, request-body limits, no leaked credentials."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from sidecar.config import ConfigError
from sidecar.http.api import API_BODY_LIMIT
from sidecar.http.limits import BodyTooLarge, capped
from sidecar.options import read_secret
from sidecar.simulator import SimulatedModel, start_app
from sidecar.state import read_state
from sidecar.store.connect import mask_url
from sidecar.tickets import SIGNATURE_BYTES, TicketSigner, ticket_signer
from tests.conftest import make_config
from tests.http_harness import Stack, eventually, running_stack, secured_stack
from tests.redis_proc import RedisProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
API = "/admission/v1"
SECRET = b"pool-secret-0123456789"
TOKEN = b"admin-token-9876543210"


async def inflight(stack: Stack) -> int:
    return (await read_state(stack.server.service.controller.store)).inflight


async def admit(stack: Stack) -> str:
    async with stack.session.post(f"{stack.data}{API}/admit") as r:
        assert r.status == 200, await r.text()
        ticket: str = (await r.json())["ticket"]
        return ticket


# Tickets ------------------------------------------------------------------------------------------


def test_a_ticket_verifies_only_with_its_pool_and_secret() -> None:
    signer = TicketSigner(SECRET, "pool-a")
    ticket = signer.issue("0000000000000042")
    item_id, _, signature = ticket.rpartition(".")
    assert item_id == "0000000000000042"
    assert len(signature) >= 22 and "=" not in signature  # >= 16 bytes, base64url unpadded
    assert SIGNATURE_BYTES >= 16
    assert signer.verify(ticket) == "0000000000000042"
    assert TicketSigner(SECRET, "pool-b").verify(ticket) is None
    assert TicketSigner(b"another secret", "pool-a").verify(ticket) is None
    assert ticket_signer(SECRET, "pool-a").verify(ticket) == "0000000000000042"
    assert "pool-secret" not in repr(signer)


@pytest.mark.parametrize(
    "ticket",
    ["", ".", "42", "42.", ".abc", "43.AAAAAAAAAAAAAAAAAAAAAA", "42.é", "\ud800.x", "4" * 5000],
)
def test_malformed_tickets_do_not_verify(ticket: str) -> None:
    assert TicketSigner(SECRET, "p").verify(ticket) is None


def forged_tickets(genuine: str, pool: str) -> list[str]:
    item_id, _, signature = genuine.rpartition(".")
    changed = ("B" if signature[0] == "A" else "A") + signature[1:]
    return [
        item_id,  # an unsigned item id (the old ticket format)
        f"{item_id}.{changed}",  # one character of the signature changed
        TicketSigner(b"another secret", pool).issue(item_id),  # another pool's secret
        TicketSigner(SECRET, "other-pool").issue(item_id),  # same secret, other pool
        "not a ticket",
        "",
    ]


async def test_forged_tickets_get_403_and_change_nothing() -> None:
    async with secured_stack(make_config(limit=1), ticket_secret=SECRET) as stack:
        genuine = await admit(stack)
        assert await inflight(stack) == 1
        for forged in forged_tickets(genuine, "default"):
            for route in ("release", "renew"):
                async with stack.session.post(
                    f"{stack.data}{API}/{route}", json={"ticket": forged}
                ) as r:
                    assert r.status == 403, (route, forged)
                    assert r.headers["x-admission-reason"] == "bad_ticket"
                    assert (await r.json())["reason"] == "bad_ticket"
            assert await inflight(stack) == 1
        async with stack.session.post(f"{stack.data}{API}/release", json={"ticket": genuine}) as r:
            assert await r.json() == {"released": True}
        assert await inflight(stack) == 0


async def test_check_endpoint_issues_signed_tickets() -> None:
    async with secured_stack(make_config(limit=1), ticket_secret=SECRET) as stack:
        async with stack.session.get(f"{stack.data}{API}/check/v1/chat") as r:
            assert r.status == 200
            ticket = r.headers["x-admission-ticket"]
        assert TicketSigner(SECRET, "default").verify(ticket) is not None
        async with stack.session.post(f"{stack.data}{API}/release", json={"ticket": ticket}) as r:
            assert await r.json() == {"released": True}


@pytest.fixture
def shared_redis() -> Iterator[RedisProcess]:
    server = RedisProcess().start()
    yield server
    server.kill()


@pytest.mark.redis
async def test_replicas_sharing_the_secret_accept_each_others_tickets(
    shared_redis: RedisProcess,
) -> None:
    cfg = make_config(limit=2)
    url = shared_redis.url
    async with (
        secured_stack(cfg, ticket_secret=SECRET, redis_url=url) as a,
        secured_stack(cfg, ticket_secret=SECRET, redis_url=url) as b,
        secured_stack(cfg, ticket_secret=b"not the pool's secret", redis_url=url) as stranger,
    ):
        ticket = await admit(a)
        async with stranger.session.post(
            f"{stranger.data}{API}/release", json={"ticket": ticket}
        ) as r:
            assert r.status == 403
        assert await inflight(a) == 1
        async with b.session.post(f"{b.data}{API}/renew", json={"ticket": ticket}) as r:
            assert r.status == 200 and await r.json() == {"renewed": True}
        async with b.session.post(f"{b.data}{API}/release", json={"ticket": ticket}) as r:
            assert await r.json() == {"released": True}
        assert await inflight(a) == 0


async def test_without_a_secret_a_replica_warns_and_its_tickets_still_work(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="sidecar.tickets"):
        async with running_stack(make_config(limit=1)) as stack:
            ticket = await admit(stack)
            async with stack.session.post(
                f"{stack.data}{API}/release", json={"ticket": ticket}
            ) as r:
                assert await r.json() == {"released": True}
    warnings = [r.getMessage() for r in caplog.records if r.name == "sidecar.tickets"]
    assert len(warnings) == 1 and "only through this replica" in warnings[0]


# Secrets from flags, files and the environment ----------------------------------------------------


def _args(**flags: str) -> argparse.Namespace:
    return argparse.Namespace(**{"ticket_secret_file": None, "admin_token_file": None, **flags})


def test_secrets_come_from_a_file_or_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"  from-file\n")
    env = {"SIDECAR_TICKET_SECRET": "inline"}
    assert read_secret(_args(), {}, "ticket_secret_file") is None
    from_env = read_secret(_args(), env, "ticket_secret_file")
    assert from_env is not None and from_env.reveal() == b"inline"
    from_file = read_secret(_args(), {"SIDECAR_ADMIN_TOKEN_FILE": str(path)}, "admin_token_file")
    assert from_file is not None and from_file.reveal() == b"from-file"  # stripped
    # The flag wins over the environment.
    flagged = read_secret(_args(ticket_secret_file=str(path)), env, "ticket_secret_file")
    assert flagged is not None and flagged.reveal() == b"from-file"
    assert repr(flagged) == str(flagged) == "Secret('***')"


def test_bad_secret_settings_fail_without_showing_the_secret(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    both = {"SIDECAR_TICKET_SECRET": "inline-xyz", "SIDECAR_TICKET_SECRET_FILE": str(empty)}
    cases = [
        (both, "not both"),
        ({"SIDECAR_TICKET_SECRET_FILE": str(empty)}, "is empty"),
        ({"SIDECAR_TICKET_SECRET_FILE": str(tmp_path / "missing")}, "cannot read"),
    ]
    for env, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            read_secret(_args(), env, "ticket_secret_file")
        assert "inline-xyz" not in str(err.value)


# Admin token --------------------------------------------------------------------------------------


async def test_state_requires_the_admin_token_and_probes_stay_open() -> None:
    async with secured_stack(make_config(limit=1), admin_token=TOKEN) as stack:
        refused = [
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Bearer"},
            {"Authorization": f"Basic {TOKEN.decode()}"},
            {"Authorization": f"Bearer {TOKEN.decode()}x"},
        ]
        for headers in refused:
            async with stack.session.get(f"{stack.admin}/state", headers=headers) as r:
                assert r.status == 401, headers
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
                assert "max_concurrency" not in await r.text()
        auth = {"Authorization": f"Bearer {TOKEN.decode()}"}
        async with stack.session.get(f"{stack.admin}/state", headers=auth) as r:
            assert r.status == 200 and (await r.json())["max_concurrency"] == 1
        for path in ("/healthz", "/readyz", "/metrics"):
            async with stack.session.get(f"{stack.admin}{path}") as r:
                assert r.status == 200, path


async def test_without_a_token_state_is_open() -> None:
    async with running_stack(make_config(limit=1)) as stack:
        assert (await stack.state())["max_concurrency"] == 1


# Request-body limits ------------------------------------------------------------------------------


def test_the_default_body_limit_is_16_mi() -> None:
    assert make_config().server.max_request_body == 16 * 2**20


async def test_capped_passes_chunks_and_raises_past_the_limit() -> None:
    async def chunks(*sizes: int) -> AsyncIterator[bytes]:
        for size in sizes:
            yield b"x" * size

    assert [len(c) async for c in capped(chunks(3, 4, 3), 10)] == [3, 4, 3]
    assert [len(c) async for c in capped(chunks(300, 400), 0)] == [300, 400]  # 0 = unlimited
    seen: list[int] = []
    with pytest.raises(BodyTooLarge):
        async for chunk in capped(chunks(3, 4, 4, 5), 10):
            seen.append(len(chunk))
    assert seen == [3, 4]  # the chunk that crosses the limit is not passed on


def assert_too_large(r: aiohttp.ClientResponse, body: dict[str, str]) -> None:
    assert r.status == 413
    assert r.headers["x-admission-reason"] == "body_too_large"
    assert body["reason"] == "body_too_large"


async def test_oversized_body_gets_413_before_admission() -> None:
    cfg = make_config(limit=1, server={"maxRequestBody": "1Ki"})
    async with running_stack(cfg, SimulatedModel(latency_s=0)) as stack:
        holder = await admit(stack)  # the only slot: an admitted request would have to queue
        async with stack.session.post(f"{stack.data}/v1/echo", data=b"x" * 1025) as r:
            assert_too_large(r, await r.json())
        state = await stack.state()
        assert state["queued"] == 0 and state["inflight"] == 1 and state["workloads"] == []
        assert stack.upstream.arrivals == []
        async with stack.session.post(f"{stack.data}{API}/release", json={"ticket": holder}):
            pass
        async with stack.session.post(f"{stack.data}/v1/echo", data=b"x" * 1024) as r:
            assert r.status == 200  # at the limit is fine
        assert len(stack.upstream.arrivals) == 1


async def test_the_check_is_exempt_and_zero_means_unlimited() -> None:
    cfg = make_config(limit=2, server={"maxRequestBody": "1Ki"})
    # An auth subrequest may declare the original request's length; the check reads no body.
    async with (
        running_stack(cfg, SimulatedModel(latency_s=0)) as stack,
        stack.session.post(f"{stack.data}{API}/check/v1/echo", data=b"x" * 4096) as r,
    ):
        assert r.status == 200 and "x-admission-ticket" in r.headers
    unlimited = make_config(limit=1, server={"maxRequestBody": 0})
    async with (
        running_stack(unlimited, SimulatedModel(latency_s=0)) as stack,
        stack.session.post(f"{stack.data}/v1/echo", data=b"x" * 2**20) as r,
    ):
        assert r.status == 200


async def test_admission_api_bodies_are_capped_with_or_without_content_length() -> None:
    async with running_stack(make_config(limit=1)) as stack:
        big = b'{"ticket": "' + b"x" * API_BODY_LIMIT + b'"}'

        async def chunked() -> AsyncIterator[bytes]:
            for start in range(0, len(big), 8192):
                yield big[start : start + 8192]

        for data in (big, chunked()):
            async with stack.session.post(f"{stack.data}{API}/release", data=data) as r:
                assert_too_large(r, await r.json())
        assert await inflight(stack) == 0


# Credentials never leak ---------------------------------------------------------------------------

PASSWORD = "s3cret-redis-password-4711"
TICKET_SECRET = "ticket-secret-never-printed-0815"
ADMIN_TOKEN = "admin-token-never-printed-1234"
SECRETS = (PASSWORD, TICKET_SECRET, ADMIN_TOKEN)


def test_mask_url_hides_every_credential_form() -> None:
    cases = {
        f"redis://:{PASSWORD}@h:6379/0": "redis://:***@h:6379/0",
        f"redis://user:{PASSWORD}@h:6379/0": "redis://user:***@h:6379/0",
        f"rediss://user:p@{PASSWORD}@h/0": "rediss://user:***@h/0",
        f"redis://{PASSWORD}@h/0": "redis://***@h/0",
        f"redis+sentinel://:{PASSWORD}@s1:26379,s2:26379/mymaster/0": (
            "redis+sentinel://:***@s1:26379,s2:26379/mymaster/0"
        ),
        f"rediss://h/0?ssl_ca_certs=/ca.pem&password={PASSWORD}": (
            "rediss://h/0?ssl_ca_certs=/ca.pem&password=***"
        ),
        "redis://h:6379/0": "redis://h:6379/0",
        "unix:///run/redis.sock?db=1": "unix:///run/redis.sock?db=1",
    }
    for url, masked in cases.items():
        assert mask_url(url) == masked


@pytest.fixture
def password_redis() -> Iterator[RedisProcess]:
    server = RedisProcess(extra=["--requirepass", PASSWORD]).start()
    yield server
    server.kill()


def run_cli(*argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout + done.stderr


class Collected:
    """Everything the sidecar showed to anyone: responses, command output."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.texts: list[str] = []

    async def request(self, method: str, url: str, **kwargs: object) -> int:
        async with self.session.request(method, url, **kwargs) as r:  # type: ignore[arg-type]
            self.texts.append(f"{r.status} {dict(r.headers)} {await r.text()}")
            return r.status


@pytest.mark.redis
async def test_no_credential_appears_in_logs_state_metrics_or_commands(
    password_redis: RedisProcess, tmp_path: Path
) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{password_redis.port}/0"
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"redis:\n  url: {url}\n  timeout: 250ms\n  heartbeatInterval: 200ms\n")
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    model = SimulatedModel(latency_s=0)
    model_runner, model_port = await start_app(model.app())
    port, admin = free_port(), free_port()
    log_path = tmp_path / "serve.log"
    env = {
        **os.environ,
        "SIDECAR_TICKET_SECRET": TICKET_SECRET,
        "SIDECAR_ADMIN_TOKEN_FILE": str(token_file),
    }
    argv = [sys.executable, "-m", "sidecar", "--log-level", "debug", "serve", "--config"]
    argv += [str(config), "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"]
    argv += ["--upstream", f"http://127.0.0.1:{model_port}"]
    with log_path.open("w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    data, adm = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        async with aiohttp.ClientSession() as session:
            seen = Collected(session)

            async def ready() -> bool:
                assert proc.poll() is None, log_path.read_text()
                try:
                    return await seen.request("GET", f"{adm}/readyz") == 200
                except aiohttp.ClientError:
                    return False

            await eventually(ready, timeout=20)

            async def exercise(up: bool) -> None:
                async with session.post(f"{data}{API}/admit") as r:
                    seen.texts.append(await r.text())
                    ticket = (await r.json())["ticket"] if r.status == 200 else "x.y"
                await seen.request("POST", f"{data}{API}/renew", json={"ticket": ticket})
                await seen.request("POST", f"{data}{API}/release", json={"ticket": ticket})
                await seen.request("POST", f"{data}{API}/release", json={"ticket": "forged.x"})
                await seen.request("GET", f"{data}/v1/models")
                await seen.request("GET", f"{data}{API}/check/v1/chat")
                await seen.request("GET", f"{adm}/readyz")
                assert await seen.request("GET", f"{adm}/state", headers=auth) == (
                    200 if up else 503
                )
                await seen.request("GET", f"{adm}/state")
                await seen.request("GET", f"{adm}/metrics")
                seen.texts.append(run_cli("status", "--redis-url", url))
                seen.texts.append(run_cli("status", "--redis-url", url, "--json"))
                seen.texts.append(run_cli("check-config", str(config)))

            await exercise(up=True)
            assert "redis://:***@" in seen.texts[-1]  # check-config printed the masked URL
            password_redis.kill()
            await exercise(up=False)
            # The replica's loops log their store errors too.
            await eventually(lambda: "heartbeat:" in log_path.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
        await model_runner.cleanup()
    log = log_path.read_text()
    assert " DEBUG " in log and "redis://:***@127.0.0.1" in log
    for secret in SECRETS:
        assert secret not in log
        for text in seen.texts:
            assert secret not in text, text
