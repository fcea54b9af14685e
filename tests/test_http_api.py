"""Admission API, header handling (never a 500), admin endpoints, and Redis failure modes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.metrics import LabelCap
from sidecar.simulator import SimulatedModel
from sidecar.store.scripts import function_name
from tests.conftest import make_config
from tests.http_harness import Stack, eventually, running_stack
from tests.redis_proc import RedisProcess

API = "/admission/v1"
BAD_HEADERS = [
    {"x-workload-context": "{not json"},
    {"x-workload-context": "[1, 2]"},
    {"x-workload-context": '{"workload_id": "a{b}", "criticality": 3}'},
    {"x-workload-id": "x" * 5000},
    {"x-workload-id": "bad id with spaces"},
    {"x-workload-criticality": "banana"},
    {"x-workload-id": "ok", "x-workload-criticality": "99"},
    {"x-gateway-inference-fairness-id": "{tag}"},
    {"x-gateway-inference-objective": "no-such-objective"},
    {"x-gateway-inference-ttl": "forever"},
    {"x-request-id": "bad\tid"},
]


async def test_admit_release_renew_round_trip() -> None:
    async with running_stack(make_config(limit=1)) as stack:
        async with stack.session.post(
            f"{stack.data}{API}/admit", headers={"x-workload-id": "w"}
        ) as r:
            assert r.status == 200
            ticket = await r.json()
        assert ticket["outcome"] == "dispatched" and ticket["lease_ms"] == 60_000
        # The only slot is held: a short-TTL admit is refused with 429 and the outcome named.
        async with stack.session.post(
            f"{stack.data}{API}/admit", headers={"x-gateway-inference-ttl": "50ms"}
        ) as r:
            assert r.status == 429
            assert r.headers["x-admission-outcome"] == "evicted_ttl"
            assert r.headers["Retry-After"] == "1"
        async with stack.session.post(
            f"{stack.data}{API}/renew", json={"ticket": ticket["ticket"], "lease": "10s"}
        ) as r:
            assert r.status == 200 and (await r.json()) == {"renewed": True}
        async with stack.session.post(
            f"{stack.data}{API}/release", json={"ticket": ticket["ticket"]}
        ) as r:
            assert (await r.json()) == {"released": True}
        async with stack.session.post(
            f"{stack.data}{API}/release", json={"ticket": ticket["ticket"]}
        ) as r:
            assert (await r.json()) == {"released": False}  # idempotent
        async with stack.session.post(
            f"{stack.data}{API}/renew", json={"ticket": ticket["ticket"]}
        ) as r:
            assert r.status == 404


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"ticket": 5}', b'{"ticket": "x", "extra": 1}', b"[]"],
)
async def test_api_bad_bodies_are_400(body: bytes) -> None:
    async with running_stack(make_config(limit=1)) as stack:
        for route in ("release", "renew"):
            async with stack.session.post(f"{stack.data}{API}/{route}", data=body) as r:
                assert r.status == 400
                assert "invalid JSON body" in (await r.json())["message"]


async def test_admit_lease_above_ticket_lease_is_400() -> None:
    async with (
        running_stack(make_config(limit=1)) as stack,
        stack.session.post(f"{stack.data}{API}/admit", json={"lease": "2h"}) as r,
    ):
        assert r.status == 400
        assert "ticketLease" in (await r.json())["message"]


@pytest.mark.parametrize("headers", BAD_HEADERS)
async def test_malformed_headers_fall_back_in_lenient_mode(headers: dict[str, str]) -> None:
    async with (
        running_stack(make_config(limit=2)) as stack,
        stack.session.post(f"{stack.data}/v1/echo", headers=headers, data=b"x") as r,
    ):
        assert r.status == 200
        assert r.headers["x-admission-outcome"] == "dispatched"


@pytest.mark.parametrize("headers", BAD_HEADERS)
async def test_malformed_headers_are_400_naming_the_header_in_strict_mode(
    headers: dict[str, str],
) -> None:
    async with running_stack(make_config(limit=2, strictHeaders=True)) as stack:
        for url in (f"{stack.data}/v1/echo", f"{stack.data}{API}/admit"):
            async with stack.session.post(url, headers=headers) as r:
                assert r.status == 400
                body = await r.json()
                assert body["reason"] == "bad_header"
                assert any(name in body["message"] for name in headers)


async def test_admin_endpoints() -> None:
    async with running_stack(make_config(limit=2)) as stack:
        async with stack.session.get(f"{stack.data}/v1/x", headers={"x-workload-id": "w1"}) as r:
            assert r.status == 200
        async with stack.session.get(f"{stack.admin}/healthz") as r:
            assert r.status == 200
        async with stack.session.get(f"{stack.admin}/readyz") as r:
            assert r.status == 200
        state = await stack.state()
        assert state["max_concurrency"] == 2 and state["workloads"][0]["workload_id"] == "w1"
        async with stack.session.get(f"{stack.admin}/metrics") as r:
            text = await r.text()
        for name in (
            "inference_extension_flow_control_request_queue_duration_seconds",
            "inference_extension_flow_control_queue_size",
            "inference_extension_flow_control_pool_saturation",
            'inference_extension_flow_control_request_outcomes_total{inference_pool="default",outcome="dispatched"',
            'admission_sidecar_workload_request_rate{inference_pool="default",workload_id="w1"}',
            'admission_sidecar_redis_script_duration_seconds_count{script="enqueue"}',
        ):
            assert name in text, name


async def test_workload_label_cardinality_is_capped() -> None:
    async with running_stack(make_config(limit=200)) as stack:
        stack.server.service.metrics.workload_label = LabelCap(3)
        for i in range(6):
            async with stack.session.get(f"{stack.data}/v1/x", headers={"x-workload-id": f"w{i}"}):
                pass
        async with stack.session.get(f"{stack.admin}/metrics") as r:
            text = await r.text()
    lines = [
        ln
        for ln in text.splitlines()
        if ln.startswith("admission_sidecar_workload_active_requests{")
    ]
    labels = {ln.split('workload_id="')[1].split('"')[0] for ln in lines}
    assert len(labels) == 4 and "other" in labels


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    server = RedisProcess().start()
    yield server
    server.kill()


async def _get(stack: Stack) -> tuple[int, str]:
    async with stack.session.get(f"{stack.data}/v1/x") as r:
        await r.read()
        return r.status, r.headers.get(
            "x-admission-reason", r.headers.get("x-admission-outcome", "")
        )


def count_admissions(stack: Stack) -> list[int]:
    """Counts the admission scripts (enqueue, or a coalesced batch) the store's client sends to
    Redis, attempts that fail included; heartbeat and maintenance calls are not counted."""
    client = stack.server.service.controller.store.client
    admission = {function_name("enqueue"), function_name("batch")}
    calls = [0]
    fcall = client.fcall

    def counting(function: str, *args: Any) -> Any:
        if function in admission:
            calls[0] += 1
        return fcall(function, *args)

    client.fcall = counting
    return calls


@pytest.mark.redis
async def test_redis_down_fails_closed_and_an_open_breaker_refuses_without_calling_redis(
    own_redis: RedisProcess,
) -> None:
    cfg = make_config(limit=4, redis={"failureMode": "closed", "timeout": "250ms"})
    async with running_stack(cfg, SimulatedModel(latency_s=0), redis_url=own_redis.url) as stack:
        breaker = stack.server.service.breaker
        calls = count_admissions(stack)
        assert await _get(stack) == (200, "dispatched")
        assert calls[0] > 0  # the counter sees the client's script calls
        own_redis.kill()
        # No half-open trial while refusals are counted, however slow the machine is.
        breaker.cooldown_s = 3600.0
        for _ in range(10):
            assert await _get(stack) == (503, "store_unavailable")
            if breaker.is_open:
                break
        assert breaker.is_open
        tried = calls[0]
        refusals = [await _get(stack) for _ in range(15)]
        assert refusals == [(503, "store_unavailable")] * 15
        # Once the breaker is open, a refusal does not call Redis at all.
        assert calls[0] == tried
        async with stack.session.get(f"{stack.admin}/readyz") as r:
            assert r.status == 503
        own_redis.start()  # same port, empty
        breaker.cooldown_s = 0.0  # the next request is the trial

        async def admitted() -> bool:
            return (await _get(stack))[0] == 200

        await eventually(admitted)
        async with stack.session.get(f"{stack.admin}/metrics") as r:
            assert 'admission_sidecar_failure_mode_decisions_total{mode="closed"' in await r.text()


@pytest.mark.redis
async def test_redis_down_fails_open_and_forwards(own_redis: RedisProcess) -> None:
    cfg = make_config(limit=4, redis={"failureMode": "open", "timeout": "250ms"})
    model = SimulatedModel(latency_s=0)
    async with running_stack(cfg, model, redis_url=own_redis.url) as stack:
        own_redis.kill()
        results = await asyncio.gather(*(_get(stack) for _ in range(10)))
        assert results == [(200, "fail_open")] * 10
        own_redis.start()

        async def admitted() -> bool:
            return (await _get(stack))[1] == "dispatched"

        await eventually(admitted)
    assert len(model.arrivals) >= 11


async def test_admit_counts_the_declared_bytes_not_the_json_body() -> None:
    cfg = make_config(limit=1, flowControl={"maxBytes": 1000})
    async with running_stack(cfg) as stack:
        async with stack.session.post(f"{stack.data}{API}/admit", json={"bytes": 10}) as r:
            assert r.status == 200  # holds the only slot
        # 2000 declared bytes cannot queue under maxBytes 1000, whatever the JSON body's size.
        async with stack.session.post(f"{stack.data}{API}/admit", json={"bytes": 2000}) as r:
            assert r.status == 429
            assert r.headers["x-admission-outcome"] == "rejected_capacity"
