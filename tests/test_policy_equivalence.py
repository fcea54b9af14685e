"""Property: the Lua scripts dispatch in exactly the order the Python reference policy gives."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.outcome import ScriptStatus
from tests.conftest import Backend, make_config
from tests.reference_model import PoolModel

WORKLOADS = ["", "alpha", "beta", "gamma", "delta"]
TTL = 3_600_000

enqueue_op = st.tuples(
    st.just("enqueue"),
    st.integers(0, 3000),  # ms after the previous operation
    st.sampled_from([0, 0, 0, 7]),  # band
    st.sampled_from(["f1", "f2"]),  # flow
    st.sampled_from(WORKLOADS),
    st.integers(1, 5),  # criticality
)
release_op = st.tuples(st.just("release"), st.integers(0, 3000))
operations = st.lists(st.one_of(enqueue_op, enqueue_op, release_op), min_size=20, max_size=80)

# A short rate window so histories cross bucket boundaries often.
REGISTRY = {"workloadRegistry": {"requestRateWindow": "5s", "emaAlpha": 0.3}}
CONFIGS: dict[str, dict[str, Any]] = {
    "workload-aware": {
        **REGISTRY,
        "flowControl": {
            "defaultPriorityBand": {
                "orderingPolicy": {
                    "type": "workload-aware-ordering-policy",
                    "parameters": {"maxWaitTimeSeconds": 20, "maxRequestRate": 2},
                }
            }
        },
    },
    "aging-round-robin": {
        **REGISTRY,
        "flowControl": {
            "defaultPriorityBand": {
                "fairnessPolicy": {"type": "round-robin-fairness-policy"},
                "orderingPolicy": {
                    "type": "workload-aware-ordering-policy",
                    "parameters": {
                        "maxWaitTimeSeconds": 10,
                        "maxRequestRate": 3,
                        "agingWeight": 0.3,
                    },
                },
            }
        },
    },
    "edf": {
        "flowControl": {"defaultPriorityBand": {"orderingPolicy": {"type": "edf-ordering-policy"}}}
    },
}


async def run_both(
    backend: Backend, raw_config: dict[str, Any], ops: list[Any], limit: int
) -> tuple[list[int], list[int]]:
    """Runs one history of enqueues and releases on the scripts and on the model, then releases
    everything; returns both dispatch orders (as sequence numbers)."""
    cfg = make_config(limit=limit, **raw_config)
    await backend.client().flushall()
    store = backend.store(cfg)
    await store.configure(now=0)
    model = PoolModel(cfg)
    seq_of: dict[str, int] = {}
    id_of: dict[int, str] = {}
    lua_order: list[int] = []
    model_order: list[int] = []
    held: list[int] = []
    now = 10_000
    ops = ops + [("release", 500)] * len(ops)
    for op in ops:
        now += op[1]
        # Re-rank at this instant, as the maintenance tick does, so no score is stale.
        await store.maintain(1, force=True, now=now)
        if op[0] == "enqueue":
            _, _, band, flow, wid, crit = op
            ttl = TTL - 1000 * crit  # distinct deadlines per criticality, for EDF
            reply = await store.enqueue(
                band=band,
                flow=flow,
                workload=wid,
                criticality=crit,
                byte_size=1,
                ttl_ms=ttl,
                now=now,
            )
            seq, dispatched = model.enqueue(now, band, flow, wid, crit, ttl)
            seq_of[reply.item_id], id_of[seq] = seq, reply.item_id
            if reply.status is ScriptStatus.DISPATCHED:
                lua_order.append(seq)
                held.append(seq)
        elif held:
            reply = await store.release(id_of[held.pop(0)], now=now)
            dispatched = model.release(now)
        else:
            continue
        for d in reply.deliveries:
            lua_order.append(seq_of[d.item_id])
            held.append(seq_of[d.item_id])
        model_order.extend(dispatched)
    return lua_order, model_order


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(
    config_name=st.sampled_from(sorted(CONFIGS)),
    ops=operations,
    limit=st.integers(1, 3),
)
async def test_lua_dispatch_order_equals_reference(
    backend: Backend, config_name: str, ops: list[Any], limit: int
) -> None:
    lua, model = await run_both(backend, CONFIGS[config_name], ops, limit)
    assert lua == model
    # Every request was dispatched exactly once by the end.
    assert sorted(lua) == list(range(1, 1 + sum(op[0] == "enqueue" for op in ops)))
