"""Durations (``250ms``, ``30s``, ``5m``, ``1h``) and sizes (``512Mi``, ``1Gi``, ``10K``)."""

from __future__ import annotations

import math
import re
from fractions import Fraction

_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*")
_DURATION_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?)?B?\s*")
# Nothing we configure needs more than a year; anything larger is a typo, not a setting.
_MAX_SECONDS = 366 * 86400.0
_SIZE_SCALE = {
    None: 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def parse_duration(value: object) -> float:
    """Seconds from a duration string or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    try:
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION.fullmatch(value)):
            seconds = float(m.group(1)) * _DURATION_SCALE[m.group(2)]
        else:
            raise ValueError(f"not a duration: {value!r} (use e.g. 250ms, 30s, 5m, 1h)")
    except OverflowError:
        raise ValueError("duration is too large") from None
    if not math.isfinite(seconds) or seconds > _MAX_SECONDS:
        raise ValueError(f"duration must be finite and at most a year: {value!r}")
    if seconds < 0:
        raise ValueError(f"duration must not be negative: {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from a size string (SI or IEC suffix) or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value)):
        # Exact arithmetic: "0.5Ki" is 512 bytes; "0.5" bytes is no size (0 would mean unlimited).
        exact = Fraction(m.group(1)) * _SIZE_SCALE[m.group(2)]
        if exact.denominator != 1:
            raise ValueError(f"size is not a whole number of bytes: {value!r}")
        size = int(exact)
    else:
        raise ValueError(f"not a size: {value!r} (use e.g. 4096, 512Mi, 1Gi)")
    if size < 0:
        raise ValueError(f"size must not be negative: {value!r}")
    return size
