"""Runs every benchmark on loopback and writes BENCHMARKS.md.

    python -m bench.run [--quick] [--output BENCHMARKS.md]

Each figure is a ratio measured side by side in one run (the machines are shared and noisy);
absolute numbers are shown but not judged. Rows follow the benchmark issue's table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from bench import dispatch_depth, http_bench, redis_bench
from bench.report import Row, markdown_table

DEPTHS = (100, 100_000)


async def depth_row(quick: bool) -> Row:
    depths = [100, 2_000] if quick else list(DEPTHS)
    rates = await dispatch_depth.run(
        depths=depths, steps=100 if quick else 3000, rounds=1 if quick else 3, redis_url=None
    )
    shallow, deep = rates[depths[0]], rates[depths[1]]
    ratio = deep / shallow
    return Row(
        number=4,
        measurement=f"dispatch rate, {depths[1]:,} queued vs {depths[0]:,} queued",
        ours=f"{deep:,.0f} dispatches/s",
        baseline=f"{shallow:,.0f} dispatches/s",
        result=f"{ratio:.2f}",
        target=">= 0.8",
        passed=ratio >= 0.8,
        notes="release+enqueue steps at constant depth, 50 workloads x 5 criticalities x 2 flows; "
        "best of the rounds, depths alternating (python -m bench.dispatch_depth for detail)",
    )


def machine() -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    redis = shutil.which("redis-server")
    redis_version = (
        subprocess.run([redis, "--version"], capture_output=True, text=True).stdout.strip()
        if redis
        else "not installed"
    )
    versions = ", ".join(
        f"{name} {metadata.version(name)}"
        for name in ("aiohttp", "redis", "hiredis", "msgspec", "uvloop")
        if _installed(name)
    )
    return [
        f"- cores: {os.cpu_count()} ({cpu})",
        f"- {platform.system()} {platform.release()}, Python {platform.python_version()}",
        f"- {redis_version}",
        f"- {versions}",
    ]


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def render(rows: list[Row], quick: bool, seconds: float) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Made by `make bench` (`python -m bench.run`) on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        + (" — QUICK smoke run, figures not representative" if quick else "")
        + f", in {seconds:.0f} s.",
        "Every judged figure is a ratio (or a difference) measured side by side in one run on "
        "this machine; absolute numbers are shown, not judged.",
        "",
        "## Machine",
        "",
        *machine(),
        "",
        "## Results",
        "",
        markdown_table(rows),
        "Where a target is missed, the profiles that show why and what would close the gap are in "
        "[docs/performance.md](docs/performance.md).",
        "",
        "## How each row was measured",
        "",
    ]
    for r in sorted(rows, key=lambda r: r.number):
        lines.append(f"{r.number}. **{r.measurement}** — {r.notes}")
    lines += [
        "",
        "## Commands",
        "",
        "```",
        "make bench                      # everything, writes BENCHMARKS.md",
        "python -m bench.http_bench      # rows 1, 2, 3, 5",
        "python -m bench.dispatch_depth  # row 4",
        "python -m bench.redis_bench     # rows 6, 7, 8",
        "```",
        "",
    ]
    return "\n".join(lines)


async def run_all(quick: bool) -> list[Row]:
    rows = list(await http_bench.run(quick=quick))
    rows.append(await depth_row(quick))
    rows += await redis_bench.run(quick=quick)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes (smoke run)")
    parser.add_argument("--output", default="BENCHMARKS.md")
    args = parser.parse_args(argv)
    started = time.monotonic()
    rows = asyncio.run(run_all(args.quick))
    text = render(rows, args.quick, time.monotonic() - started)
    Path(args.output).write_text(text)
    print(text)
    # A missed target is a finding written into the report, not a failure of the command.
    return 0


if __name__ == "__main__":
    sys.exit(main())
