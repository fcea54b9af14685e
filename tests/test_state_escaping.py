"""The state view (/state, ``status``) shows the lanes of flows whose ids are escaped in keys."""

from __future__ import annotations

from sidecar.keys import escape_id
from sidecar.state import read_state
from tests.conftest import Backend, make_config

# Each character is valid in an id but escaped in keys (sidecar/keys.py VALID_ID vs escape_id).
FLOWS = ["team/a", "host:8080", "user@x", "a+b", "k=v", "~tilde", "plain"]


async def test_round_robin_lanes_of_escaped_flows_are_listed(backend: Backend) -> None:
    rr = {"fairnessPolicy": {"type": "round-robin-fairness-policy"}}
    store = backend.store(make_config(limit=1, flowControl={"defaultPriorityBand": rr}))
    await store.configure(now=0)
    args = {"band": 0, "workload": "", "criticality": 3, "byte_size": 1, "ttl_ms": 60_000}
    await store.enqueue(now=1000, flow="holder", **args)  # takes the only slot
    for flow in FLOWS:
        await store.enqueue(now=1000, flow=escape_id(flow), **args)
    (band,) = (await read_state(store, now=1000)).bands
    assert sorted(f.flow for f in band.flows) == sorted(FLOWS)
    assert sorted(lane.flow for lane in band.lanes) == sorted(FLOWS)
