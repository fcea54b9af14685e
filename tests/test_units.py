"""Durations and sizes as the config writes them (sidecar/units.py)."""

from __future__ import annotations

import pytest

from sidecar.units import parse_duration, parse_size

DURATIONS = [
    pytest.param("250ms", 0.25, id="ms"),
    pytest.param("30s", 30.0, id="s"),
    pytest.param("5m", 300.0, id="m"),
    pytest.param("1h", 3600.0, id="h"),
    pytest.param("1.5h", 5400.0, id="fractional-h"),
    pytest.param("0.5s", 0.5, id="fractional-s"),
    pytest.param("0s", 0.0, id="zero-with-unit"),
    pytest.param("10", 10.0, id="bare-string-is-seconds"),
    pytest.param("2.5", 2.5, id="bare-fractional-string"),
    pytest.param(" 30s ", 30.0, id="padded"),
    pytest.param("30 s", 30.0, id="space-before-unit"),
    pytest.param(0, 0.0, id="int-zero"),
    pytest.param(10, 10.0, id="int"),
    pytest.param(2.5, 2.5, id="float"),
]

BAD_DURATIONS = [
    pytest.param(True, id="true"),
    pytest.param(False, id="false"),
    pytest.param(-1, id="negative-int"),
    pytest.param(-0.5, id="negative-float"),
    pytest.param("-1s", id="negative-string"),
    pytest.param("", id="empty"),
    pytest.param("   ", id="blank"),
    pytest.param("5 parsecs", id="unknown-unit"),
    pytest.param("3x", id="bad-unit"),
    pytest.param("30S", id="unit-is-case-sensitive"),
    pytest.param("1d", id="days"),
    pytest.param("1h30m", id="compound"),
    pytest.param("1e3", id="exponent"),
    pytest.param("s", id="unit-only"),
    pytest.param(None, id="none"),
    pytest.param([30], id="list"),
    pytest.param(
        float("nan"),
        id="nan",
    ),
    pytest.param(
        float("inf"),
        id="inf",
    ),
]

SIZES = [
    pytest.param("4096", 4096, id="bare-string"),
    pytest.param(4096, 4096, id="int"),
    pytest.param(0, 0, id="zero"),
    pytest.param("1B", 1, id="byte-suffix"),
    pytest.param("10K", 10_000, id="K"),
    pytest.param("1M", 10**6, id="M"),
    pytest.param("1G", 10**9, id="G"),
    pytest.param("1T", 10**12, id="T"),
    pytest.param("1KB", 1000, id="KB"),
    pytest.param("1Ki", 1024, id="Ki"),
    pytest.param("512Mi", 536_870_912, id="Mi"),
    pytest.param("1Gi", 1_073_741_824, id="Gi"),
    pytest.param("1Ti", 2**40, id="Ti"),
    pytest.param("1KiB", 1024, id="KiB"),
    pytest.param("1.5Ki", 1536, id="fractional-Ki"),
    pytest.param(" 10 K ", 10_000, id="padded"),
    pytest.param(
        "9007199254740993",
        2**53 + 1,
        id="bare-string-above-2**53",
    ),
]

BAD_SIZES = [
    pytest.param(True, id="true"),
    pytest.param(False, id="false"),
    pytest.param(-1, id="negative-int"),
    pytest.param("-1", id="negative-string"),
    pytest.param(1.5, id="float"),
    pytest.param("", id="empty"),
    pytest.param("12Q", id="unknown-suffix"),
    pytest.param("1k", id="lowercase-k"),
    pytest.param("1P", id="peta"),
    pytest.param("1e3", id="exponent"),
    pytest.param("5 parsecs", id="words"),
    pytest.param("Gi", id="suffix-only"),
    pytest.param(None, id="none"),
    pytest.param(
        "0.5",
        id="fractional-bytes",
    ),
]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert type(parse_duration(text)) is float


@pytest.mark.parametrize("value", BAD_DURATIONS)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize(("text", "size"), SIZES)
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size
    assert type(parse_size(text)) is int


@pytest.mark.parametrize("value", BAD_SIZES)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(value)
