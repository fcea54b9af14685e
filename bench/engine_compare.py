"""The lean engine next to the engine it replaced: Redis CPU and commands per admission.

The baseline is an earlier commit of this repository (default ``BASELINE``: the last one before
the lean Redis layout of issue 8), unpacked with ``git archive`` into a temporary directory, so
its Lua scripts and Python run exactly as they were. Each round runs both engines one after the
other, each in a child process with its own redis-server, through the bench code of its own tree
(``bench.redis_bench.load_round`` for CPU, ``bench.commands`` for command counts), so machine
noise hits both alike; the figures are medians over the rounds.

    python -m bench.engine_compare [--baseline REV] [--rounds N] [--seconds S] [--quick]
                                   [--instructions] [--sequential] [--interleaved]
                                   [--blocks N] [--block-steps S]

CPU time on a shared machine (a VM whose neighbours take its cores) moves by tens of percent
from run to run, for both engines. ``--instructions`` adds a figure that does not: the machine
instructions Redis executes per admission, counted by valgrind's callgrind on a redis-server of
its own, for the same request mix, one engine after the other (exact, so one round is enough).
``--sequential`` adds CPU time measured as the instructions are, with one client stepping the
pools (no load processes contending with Redis for the cores): steadier than the load rounds,
and unlike the instruction count it charges what memory stalls cost (docs/scaling.md).
``--interleaved`` measures that CPU time with the engines taking turns block by block: one
child per engine stays up with its pools ready, and the two step ``--block-steps`` steps each in
turn (old, new, new, old, ...) for ``--blocks`` blocks per kind, so a neighbour that takes the
cores for a few seconds slows both alike. It reports the ratio over all blocks and the spread of
the blocks' own ratios; rounds of whole runs (``--sequential``) move by ±15 %, this by a few.

Needs the repository's git history (a clone, not an export); without it the script says so and
exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
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


# The single-client children's pools: two of 64 admissions per step, each stepped in turn, prepared
# and warmed by `warm` steps (run in the child's tree, through that tree's own bench code).
_TWO_POOLS = """
import asyncio
from bench.redis_bench import LoadDriver, LoadSpec

async def ready_drivers(client, kind, tag, warm):
    specs = [LoadSpec("", kind, f"{tag}-{kind}-{j}", f"{tag}-{j}", 64, 7 * j) for j in range(2)]
    drivers = [LoadDriver(client, spec) for spec in specs]
    for d in drivers:
        await d.prepare()
    for _ in range(warm):
        for d in drivers:
            await d.step()
    return drivers
"""


# The two pools, and Redis's CPU seconds so far (user + system, main thread), for the CPU children.
_CPU_READING = (
    _TWO_POOLS
    + """
import json, sys
from redis.asyncio import Redis
from tests.redis_proc import RedisProcess

async def cpu_s(client):
    i = await client.info("cpu")
    return float(i["used_cpu_user_main_thread"]) + float(i["used_cpu_sys_main_thread"])
"""
)


# Run in a tree's root: Redis CPU (user + system, main thread) per admission for each kind, with
# one client stepping two pools in turn, as the instruction count does: Redis works only while
# the client waits for it, so nothing contends for the cores and rounds agree far better than
# load rounds do.
_SEQUENTIAL_CHILD = (
    _CPU_READING
    + """
async def main(steps, kinds):
    server = RedisProcess().start()
    client = Redis.from_url(server.url)
    try:
        result = {}
        for kind in kinds:
            drivers = await ready_drivers(client, kind, "sq", 5)
            made, before = sum(d.made for d in drivers), await cpu_s(client)
            for _ in range(steps):
                for d in drivers:
                    await d.step()
            spent = await cpu_s(client) - before
            result[kind] = spent * 1e6 / (sum(d.made for d in drivers) - made)
            await client.flushall()
        print(json.dumps(result))
    finally:
        await client.aclose()
        server.stop()

asyncio.run(main(int(sys.argv[1]), sys.argv[2:]))
"""
)


# Run in a tree's root: Redis instructions per admission for each kind, counted by callgrind on a
# redis-server of its own: counters zeroed after a warm-up, dumped after `steps` steps.
_INSTRUCTIONS_CHILD = (
    _TWO_POOLS
    + """
import glob, json, os, re, socket, subprocess, sys, tempfile
from redis.asyncio import Redis

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def control(pid, flag):
    subprocess.run(["callgrind_control", flag, str(pid)], check=True, capture_output=True)

async def main(steps, kinds):
    out_dir, port = tempfile.mkdtemp(prefix="callgrind-"), free_port()
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/cg.%p",
         "redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=out_dir)
    client = Redis.from_url(f"redis://127.0.0.1:{port}")
    try:
        for _ in range(600):
            try:
                await client.ping()
                break
            except Exception:
                await asyncio.sleep(0.1)
        result = {}
        for kind in kinds:
            drivers = await ready_drivers(client, kind, "cg", 3)
            control(server.pid, "-z")
            await client.ping()  # wakes the server, which then takes the command
            made = sum(d.made for d in drivers)
            for _ in range(steps):
                for d in drivers:
                    await d.step()
            made = sum(d.made for d in drivers) - made
            before = set(glob.glob(f"{out_dir}/cg.*"))
            control(server.pid, "-d")
            await client.ping()
            dump = None
            for _ in range(600):
                fresh = set(glob.glob(f"{out_dir}/cg.*")) - before
                if fresh:
                    dump = sorted(fresh)[-1]
                    text = open(dump).read()
                    found = re.search(r"^(?:summary|totals): (\\d+)", text, re.M)
                    if found:
                        break
                await asyncio.sleep(0.1)
            else:
                raise SystemExit("callgrind wrote no dump")
            result[kind] = int(found.group(1)) / made
            await client.flushall()
        print(json.dumps(result))
    finally:
        await client.aclose()
        server.terminate()
        server.wait(60)

asyncio.run(main(int(sys.argv[1]), sys.argv[2:]))
"""
)


# Run in a tree's root: the pools of one kind, stepped when told. Each line on stdin is a number
# of steps; each answer is the Redis CPU seconds (user + system, main thread) they took and the
# admissions they made, as JSON. An empty line ends it.
_BLOCKS_CHILD = (
    _CPU_READING
    + """
async def main(kind):
    server = RedisProcess().start()
    client = Redis.from_url(server.url)
    try:
        drivers = await ready_drivers(client, kind, "il", 5)
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            made, before = sum(d.made for d in drivers), await cpu_s(client)
            for _ in range(int(line)):
                for d in drivers:
                    await d.step()
            spent = await cpu_s(client) - before
            print(json.dumps([spent, sum(d.made for d in drivers) - made]), flush=True)
    finally:
        await client.aclose()
        server.stop()

asyncio.run(main(sys.argv[1]))
"""
)


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


def sequential_round(root: Path, steps: int) -> dict[str, float]:
    out = _run(root, ["-c", _SEQUENTIAL_CHILD, str(steps), *KINDS], timeout=600)
    figures: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return figures


def instructions_round(root: Path, steps: int) -> dict[str, float]:
    """Redis instructions per admission of each kind, in the tree ``root`` (callgrind)."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise CompareError("--instructions needs valgrind (apt-get install valgrind)")
    out = _run(root, ["-c", _INSTRUCTIONS_CHILD, str(steps), *KINDS], timeout=900)
    figures: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return figures


@dataclass
class Interleaved:
    """One kind, the engines taking turns: Redis CPU per admission over all blocks, and each
    block's new / old ratio."""

    us: dict[str, float]  # engine -> µs per admission
    block_ratios: list[float]

    @property
    def ratio(self) -> float:
        return self.us["new"] / self.us["old"]


class _BlockChild:
    """A child that steps one engine's pools when told (_BLOCKS_CHILD)."""

    def __init__(self, root: Path, kind: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(root)}
        self.root = root
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BLOCKS_CHILD, kind],
            cwd=root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if self._line() != "ready":
            raise self._failed()

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def _failed(self) -> CompareError:
        self.proc.kill()
        _, err = self.proc.communicate(timeout=60)
        return CompareError(f"the block child in {self.root} failed:\n{err[-2000:]}")

    def block(self, steps: int) -> tuple[float, int]:
        """Redis CPU seconds and admissions of ``steps`` steps."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        line = self._line()
        if not line:
            raise self._failed()
        spent, made = json.loads(line)
        return float(spent), int(made)

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
        try:
            self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


def interleaved_run(roots: dict[str, Path], kind: str, blocks: int, steps: int) -> Interleaved:
    """``blocks`` blocks of ``steps`` steps per engine, the engines in turn (old, new, new, old,
    ...), each in a child of its own tree that stays up between blocks."""
    children: dict[str, _BlockChild] = {}
    try:
        for engine in ("old", "new"):
            children[engine] = _BlockChild(roots[engine], kind)
        spent = {"old": 0.0, "new": 0.0}
        made = {"old": 0, "new": 0}
        ratios = []
        for b in range(blocks):
            order = ("old", "new") if b % 2 == 0 else ("new", "old")
            us = {}
            for engine in order:
                cpu, n = children[engine].block(steps)
                spent[engine] += cpu
                made[engine] += n
                us[engine] = cpu / n
            if us["old"] > 0:
                ratios.append(us["new"] / us["old"])
        return Interleaved({e: spent[e] * 1e6 / made[e] for e in spent}, ratios)
    finally:
        for child in children.values():
            child.close()


_PATH = re.compile(r"(fast|queued) path:\s+([\d.]+) commands per admission")


def command_counts(root: Path) -> dict[str, float]:
    out = _run(root, ["-m", "bench.commands"], timeout=300)
    return {m.group(1): float(m.group(2)) for m in _PATH.finditer(out)}


@dataclass
class Comparison:
    rounds: dict[str, dict[str, list[float]]]  # engine -> kind -> µs per admission
    commands: dict[str, dict[str, float]]  # engine -> path -> commands per admission
    # engine -> kind -> Redis instructions per admission (callgrind), when asked for
    instructions: dict[str, dict[str, float]] | None = None
    # engine -> kind -> µs per admission, one client and nothing contending, when asked for
    sequential: dict[str, dict[str, list[float]]] | None = None
    # kind -> the engines taking turns block by block, when asked for
    interleaved: dict[str, Interleaved] | None = None

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
        if self.sequential is not None:
            seq = self.sequential
            lines += [
                "",
                "Redis CPU per admission, one client stepping the pools, nothing contending "
                f"(median of {len(seq['new'][KINDS[0]])} alternating rounds):",
                "",
                "| load | before µs/adm | after µs/adm | after / before |",
                "|---|---:|---:|---:|",
            ]
            for kind in KINDS:
                old_s, new_s = (statistics.median(seq[e][kind]) for e in ("old", "new"))
                lines.append(f"| {kind} | {old_s:.1f} | {new_s:.1f} | {new_s / old_s:.2f} |")
        if self.interleaved is not None:
            first = next(iter(self.interleaved.values()))
            lines += [
                "",
                "Redis CPU per admission, the engines taking turns block by block (one client "
                f"each, {len(first.block_ratios)} blocks per engine):",
                "",
                "| load | before µs/adm | after µs/adm | after / before | blocks' ratios: "
                "median (quartiles) |",
                "|---|---:|---:|---:|---:|",
            ]
            for kind, run in self.interleaved.items():
                q1, q2, q3 = statistics.quantiles(run.block_ratios, n=4)
                lines.append(
                    f"| {kind} | {run.us['old']:.1f} | {run.us['new']:.1f} | {run.ratio:.3f} | "
                    f"{q2:.3f} ({q1:.3f}–{q3:.3f}) |"
                )
        if self.instructions is not None:
            lines += [
                "",
                "Redis instructions per admission (callgrind, exact; one round):",
                "",
                "| load | before k instr/adm | after k instr/adm | after / before |",
                "|---|---:|---:|---:|",
            ]
            for kind in KINDS:
                old_i, new_i = self.instructions["old"][kind], self.instructions["new"][kind]
                lines.append(
                    f"| {kind} | {old_i / 1000:.1f} | {new_i / 1000:.1f} | {new_i / old_i:.2f} |"
                )
        return "\n".join(lines)


def compare(
    baseline: str,
    rounds: int,
    seconds: float,
    instruction_steps: int = 0,
    sequential_steps: int = 0,
    blocks: tuple[int, int] | None = None,
) -> Comparison:
    """``instruction_steps`` > 0: also count instructions over that many steps per kind;
    ``sequential_steps`` > 0: also measure CPU with one client over that many, each round;
    ``blocks`` (count, steps): also measure CPU with the engines taking turns."""
    with tempfile.TemporaryDirectory(prefix="engine-baseline-") as tmp:
        roots = {"old": unpack(baseline, Path(tmp)), "new": ROOT}
        figures: dict[str, dict[str, list[float]]] = {e: {k: [] for k in KINDS} for e in roots}
        sequential: dict[str, dict[str, list[float]]] | None = None
        if sequential_steps > 0:
            sequential = {e: {k: [] for k in KINDS} for e in roots}
        for _ in range(rounds):
            for engine, root in roots.items():
                for kind, us in cpu_round(root, seconds).items():
                    figures[engine][kind].append(us)
                if sequential is not None:
                    for kind, us in sequential_round(root, sequential_steps).items():
                        sequential[engine][kind].append(us)
        commands = {engine: command_counts(root) for engine, root in roots.items()}
        interleaved = None
        if blocks is not None:
            interleaved = {kind: interleaved_run(roots, kind, *blocks) for kind in KINDS}
        instructions = None
        if instruction_steps > 0:
            instructions = {
                engine: instructions_round(root, instruction_steps)
                for engine, root in roots.items()
            }
    return Comparison(figures, commands, instructions, sequential, interleaved)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_compare", description=__doc__)
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the old engine")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per load round")
    parser.add_argument("--quick", action="store_true", help="one short round (smoke run)")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count Redis instructions per admission with valgrind's callgrind (exact)",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="also measure Redis CPU with one client stepping the pools (steadier than load)",
    )
    parser.add_argument(
        "--interleaved",
        action="store_true",
        help="also measure Redis CPU with the engines taking turns block by block (steadiest)",
    )
    parser.add_argument("--blocks", type=int, default=60, help="blocks per kind (--interleaved)")
    parser.add_argument("--block-steps", type=int, default=3, help="steps per block")
    args = parser.parse_args(argv)
    rounds, seconds = (1, 0.5) if args.quick else (args.rounds, args.seconds)
    steps = (2 if args.quick else 10) if args.instructions else 0
    sequential_steps = (5 if args.quick else 150) if args.sequential else 0
    blocks = None
    if args.interleaved:
        blocks = (4, 1) if args.quick else (args.blocks, args.block_steps)
    try:
        result = compare(args.baseline, rounds, seconds, steps, sequential_steps, blocks)
    except CompareError as exc:
        print(f"engine_compare: {exc}", file=sys.stderr)
        return 2
    print(result.table(args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
