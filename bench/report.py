"""One row of BENCHMARKS.md: a measurement, the figures behind it, its ratio and its target."""

from __future__ import annotations

import msgspec


class Row(msgspec.Struct, kw_only=True):
    number: int  # the row number of the benchmark issue's table (1..8)
    measurement: str  # what was measured, one line
    ours: str  # our figure(s), absolute, e.g. "8,412 req/s" or "p50 1.9 ms, p99 6.1 ms"
    baseline: str  # the side-by-side baseline's figure(s), or "-"
    result: str  # the judged figure: a ratio ("0.84") or a difference ("+0.6 ms")
    target: str  # e.g. ">= 0.8", "p50 <= +1 ms, p99 <= +5 ms", "report"
    passed: bool | None  # None when the row only reports
    notes: str = ""  # how it was measured, or why it misses and what would fix it


def markdown_table(rows: list[Row]) -> str:
    head = "| # | measurement | ours | baseline | result | target | verdict |\n"
    head += "|---|---|---|---|---|---|---|\n"
    body = ""
    for r in sorted(rows, key=lambda r: r.number):
        verdict = "report" if r.passed is None else ("PASS" if r.passed else "MISS")
        body += (
            f"| {r.number} | {r.measurement} | {r.ours} | {r.baseline} | {r.result} | "
            f"{r.target} | {verdict} |\n"
        )
    return head + body
