"""Test-side readers of a pool's in-flight and queued records, whatever keys hold them.

In-flight slots live in one hash per owner replica (held:<number>) plus the ticket-held ones
(leased); queued records in bucket hashes (items:<bucket>); sidecar/contract.py has the layout.
"""

from __future__ import annotations

from typing import Any

from sidecar import contract


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def inflight_records(client: Any, prefix: str) -> dict[str, str]:
    """Every in-flight slot of the pool: item id -> its record."""
    out: dict[str, str] = {}
    keys = [_text(k) async for k in client.scan_iter(match=prefix + contract.HELD + "*")]
    for key in [*keys, prefix + contract.LEASED]:
        out.update({_text(k): _text(v) for k, v in (await client.hgetall(key)).items()})
    out.pop(contract.POOL_LAYOUT, None)  # a held hash's layout field, not a slot
    return out


async def queued_records(client: Any, prefix: str) -> dict[str, str]:
    """Every queued item of the pool: item id -> its record."""
    out: dict[str, str] = {}
    async for raw in client.scan_iter(match=prefix + contract.ITEMS + "*"):
        key = _text(raw)
        bucket = int(key[len(prefix + contract.ITEMS) :])
        for field, record in (await client.hgetall(key)).items():
            seq = bucket * contract.ITEM_BUCKET + int(_text(field))
            out[contract.item_id(seq)] = _text(record)
    return out


async def queued_record(client: Any, prefix: str, item_id: str) -> str | None:
    key, field = contract.items_key(int(item_id))
    raw = await client.hget(prefix + key, field)
    return None if raw is None else _text(raw)


async def inflight_by_owner(client: Any, prefix: str) -> dict[str, int]:
    """In-flight slots per owner replica id: a replica's held slots and the tickets it issued
    (a number whose replica id is gone shows as '#<number>')."""
    pool = {_text(k): _text(v) for k, v in (await client.hgetall(prefix + contract.POOL)).items()}
    owners: dict[str, int] = {}
    async for raw in client.scan_iter(match=prefix + contract.HELD + "*"):
        key = _text(raw)
        number = key[len(prefix + contract.HELD) :]
        owner = pool.get(contract.OWNER_ID + number, "#" + number)
        layout = int(await client.hexists(key, contract.POOL_LAYOUT))
        owners[owner] = owners.get(owner, 0) + int(await client.hlen(key)) - layout
    for record in (await client.hgetall(prefix + contract.LEASED)).values():
        owner = contract.LEASED_RECORD.parse(_text(record))["owner"]
        owners[owner] = owners.get(owner, 0) + 1
    return owners
