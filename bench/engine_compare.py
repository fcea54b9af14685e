"""The lean engine next to the engine it replaced: Redis CPU and commands per admission.

The baseline is an earlier commit of this repository (default ``BASELINE``: the last one before
the lean Redis layout of issue 8), unpacked with ``git archive`` into a temporary directory, so
its Lua scripts and Python run exactly as they were. Each round runs both engines one after the
other, each in a child process with its own redis-server, through the bench code of its own tree
(``bench.redis_bench.load_round`` for CPU, ``bench.commands`` for command counts), so machine
noise hits both alike; the figures are medians over the rounds.

    python -m bench.engine_compare [--baseline REV] [--rounds N] [--seconds S] [--quick]

Needs the repository's git history (a clone, not an export); without it the script says so and
exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# The engine before the lean layout: one items hash, lane and deadline zsets, owner sets.
BASELINE = "d43985f"
KINDS = ("fast", "fast-batch", "queued", "queued-batch")
ROOT = Path(__file__).resolve().parent.parent

# Run in a tree's root: one load round of each kind on a private redis-server, as JSON.
_CPU_CHILD = """
import asyncio, json, sys
from bench.redis_bench import LoadShape, default_workers, load_round
from tests.redis_proc import RedisProcess

async def main(seconds, kinds):
    server = RedisProcess().start()
    try:
        shape = LoadShape(seconds, default_workers(), 2, 64)
        out = {}
        for kind in kinds:
            r = await load_round(server.url, kind, shape)
            out[kind] = r.us_per_admission
        print(json.dumps(out))
    finally:
        server.stop()

asyncio.run(main(float(sys.argv[1]), sys.argv[2:]))
"""


class CompareError(RuntimeError):
    pass


def unpack(rev: str, into: Path) -> Path:
    """The tree of ``rev`` in ``into``."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise CompareError(f"cannot read {rev} from git history: {exc}") from exc
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _run(root: Path, args: Sequence[str], timeout: float) -> str:
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise CompareError(f"{' '.join(args[:2])} in {root} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def cpu_round(root: Path, seconds: float) -> dict[str, float]:
    out = _run(root, ["-c", _CPU_CHILD, str(seconds), *KINDS], timeout=120 + 10 * seconds)
    figures: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return figures


_PATH = re.compile(r"(fast|queued) path:\s+([\d.]+) commands per admission")


def command_counts(root: Path) -> dict[str, float]:
    out = _run(root, ["-m", "bench.commands"], timeout=300)
    return {m.group(1): float(m.group(2)) for m in _PATH.finditer(out)}


@dataclass
class Comparison:
    rounds: dict[str, dict[str, list[float]]]  # engine -> kind -> µs per admission
    commands: dict[str, dict[str, float]]  # engine -> path -> commands per admission

    def us(self, engine: str, kind: str) -> float:
        return statistics.median(self.rounds[engine][kind])

    def table(self, baseline: str) -> str:
        lines = [
            f"Redis CPU per admission, lean engine vs {baseline} (median of "
            f"{len(self.rounds['new'][KINDS[0]])} alternating rounds):",
            "",
            "| load | before µs/adm | after µs/adm | after / before |",
            "|---|---:|---:|---:|",
        ]
        for kind in KINDS:
            old, new = self.us("old", kind), self.us("new", kind)
            lines.append(f"| {kind} | {old:.1f} | {new:.1f} | {new / old:.2f} |")
        lines += [
            "",
            "| path | before commands/adm | after commands/adm |",
            "|---|---:|---:|",
        ]
        for path in ("fast", "queued"):
            old_n, new_n = self.commands["old"].get(path), self.commands["new"].get(path)
            lines.append(f"| {path} | {old_n} | {new_n} |")
        return "\n".join(lines)


def compare(baseline: str, rounds: int, seconds: float) -> Comparison:
    with tempfile.TemporaryDirectory(prefix="engine-baseline-") as tmp:
        roots = {"old": unpack(baseline, Path(tmp)), "new": ROOT}
        figures: dict[str, dict[str, list[float]]] = {e: {k: [] for k in KINDS} for e in roots}
        for _ in range(rounds):
            for engine, root in roots.items():
                for kind, us in cpu_round(root, seconds).items():
                    figures[engine][kind].append(us)
        commands = {engine: command_counts(root) for engine, root in roots.items()}
    return Comparison(figures, commands)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_compare", description=__doc__)
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the old engine")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per load round")
    parser.add_argument("--quick", action="store_true", help="one short round (smoke run)")
    args = parser.parse_args(argv)
    rounds, seconds = (1, 0.5) if args.quick else (args.rounds, args.seconds)
    try:
        result = compare(args.baseline, rounds, seconds)
    except CompareError as exc:
        print(f"engine_compare: {exc}", file=sys.stderr)
        return 2
    print(result.table(args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
