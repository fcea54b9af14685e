"""Header values never reach another key, leave the pool's hash slot, or grow Redis unbounded."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from sidecar.classify import classify
from sidecar.controller import FlowController
from sidecar.keys import escape_id, is_valid_id
from sidecar.request import FlowControlRequest
from sidecar.workload import WorkloadContext
from tests.conftest import Backend, make_config

HOSTILE = [
    "{other}",
    "a}b{c",
    "tenant:as:{default}:cfg",
    "line\nbreak",
    "\r\nSET x y",
    "x" * 10_240,
    "ü-日本-🚀",
    "a|b|c|d",
    "%7B",
    "",
    " ",
    "../../etc",
]


@pytest.mark.parametrize("value", ["{x}", "a:b", "a|b", "%", "ü", "a b", "\n"])
def test_escaping_removes_every_key_separator(value: str) -> None:
    escaped = escape_id(value)
    assert not set(escaped) & set("{}:| \n")
    assert escaped != value or value.isalnum()


def test_escaping_is_injective_on_lookalikes() -> None:
    values = ["a:b", "a%3Ab", "a_b", "a.b", "a-b", "A:B"]
    assert len({escape_id(v) for v in values}) == len(values)


async def test_hostile_ids_stay_inside_the_pool_slot(backend: Backend) -> None:
    store = backend.store(make_config(limit=1))
    ctrl = FlowController(store)
    await ctrl.start(loops=False)
    slot = key_slot(store.prefix.encode())
    for value in HOSTILE:
        # Through the header decoder (lenient): hostile ids fall back to anonymous / default flow.
        headers = {"x-workload-id": value, "x-gateway-inference-fairness-id": value}
        decoded = classify(
            headers,
            pool="default",
            objectives={},
            default_ttl_ms=1000,
            max_ttl_ms=1000,
            strict=False,
        )
        # And straight into the engine, as a library user might, bypassing the decoder.
        direct = FlowControlRequest(
            request_id="r", fairness_id=value, workload=WorkloadContext(value, 3), ttl_ms=1000
        )
        for request in (decoded, direct):
            admission = await ctrl.enqueue_and_wait(request)
            await ctrl.release(admission.item_id)
    keys = [k for k in await store.client.keys("*")]
    assert keys, "the pool wrote its state"
    for key in keys:
        assert key.startswith(store.prefix.encode()), key
        assert key_slot(key) == slot, key
        assert len(key) < 200, key
    # Only valid ids became workloads; everything else counted as anonymous.
    tracked = {m.decode() for m in await store.client.zrange(store.key("workloads"), 0, -1)}
    assert tracked == {escape_id(v) for v in HOSTILE if is_valid_id(v)}
    await ctrl.stop()
