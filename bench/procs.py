"""Processes the chaos run owns: one redis-server and N ``serve`` replicas, all on loopback.

Each can be killed, paused and restarted on the same ports. bench/ ships as its own tool, so this
does not reuse the tests' helpers.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A process must answer within this long after it is started, or the run is broken.
START_TIMEOUT_S = 30.0
POLL_S = 0.02


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int, probe: bytes, expect: tuple[bytes, ...]) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.settimeout(0.5)
            s.sendall(probe)
            return s.recv(256).startswith(expect)
    except OSError:
        return False


async def wait_answering(
    port: int, probe: bytes, expect: tuple[bytes, ...], proc: subprocess.Popen[bytes]
) -> None:
    """Polls until the port answers ``probe`` (no event crosses a process boundary)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not await asyncio.to_thread(_answers, port, probe, expect):
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"port {port} did not answer within {START_TIMEOUT_S:.0f}s")
        await asyncio.sleep(POLL_S)


def spawn(args: list[str], log: Path | None, banner: str = "") -> subprocess.Popen[bytes]:
    """Starts a child with a clean environment (no SIDECAR_/REDIS_ settings leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "REDIS_"))}
    if log is None:
        return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with log.open("a") as out:
        out.write(banner)
        out.flush()
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


class Owned:
    """One child process; ``kill`` is safe to call at any time, also twice."""

    proc: subprocess.Popen[bytes] | None = None

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # A stopped process dies of SIGKILL all the same; SIGCONT first is not needed.
            self.proc.kill()
        self.proc.wait()
        self.proc = None


class RedisServer(Owned):
    """redis-server on 127.0.0.1, persisting nothing, so a restart comes back empty."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.dir = workdir

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.dir)]  # fmt: skip
        self.proc = spawn(args, None)
        await wait_answering(self.port, b"PING\r\n", (b"+PONG",), self.proc)

    async def restart_empty(self) -> None:
        self.kill()
        await self.start()


class Replica(Owned):
    """One ``python -m sidecar serve`` process; a restart is a new process on the same ports."""

    def __init__(self, index: int, redis_url: str, upstream: str, config: Path) -> None:
        self.index = index
        self.name = f"chaos-r{index}"  # the serve process appends a random suffix
        self.port, self.admin = free_port(), free_port()
        self.redis_url, self.upstream, self.config = redis_url, upstream, config
        self.log_path = config.parent / f"{self.name}.log"
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        args = [sys.executable, "-m", "sidecar", "serve", "--config", str(self.config),
                "--redis-url", self.redis_url, "--upstream", self.upstream,
                "--listen", f"127.0.0.1:{self.port}", "--admin-listen", f"127.0.0.1:{self.admin}",
                "--replica-id", self.name]  # fmt: skip
        self.proc = spawn(args, self.log_path, f"--- start {self.starts}\n")
        self.starts += 1
        probe = b"GET /readyz HTTP/1.0\r\n\r\n"
        await wait_answering(self.admin, probe, (b"HTTP/1.0 200", b"HTTP/1.1 200"), self.proc)

    async def restart(self) -> None:
        self.kill()
        await self.start()


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="sidecar-chaos-"))
