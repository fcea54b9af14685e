"""The typed workload context a request carries straight to the ordering policy."""

from __future__ import annotations

import msgspec

MIN_CRITICALITY = 1
MAX_CRITICALITY = 5
DEFAULT_CRITICALITY = 3


class WorkloadContext(msgspec.Struct, frozen=True):
    """Who sent a request and how much it matters (criticality 1..5, 5 highest).

    Decoded once from headers and passed on the request object; never copied into a metadata map.
    """

    workload_id: str
    criticality: int = DEFAULT_CRITICALITY


def normalise_criticality(value: object) -> int:
    """Criticality outside 1..5 or not an integer falls back to 3, as the reference does."""
    if isinstance(value, bool) or not isinstance(value, int):
        return DEFAULT_CRITICALITY
    if MIN_CRITICALITY <= value <= MAX_CRITICALITY:
        return value
    return DEFAULT_CRITICALITY
