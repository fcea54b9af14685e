"""Real `admission-sidecar serve` processes: three replicas on one Redis, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from sidecar.simulator import SimulatedModel, start_app
from tests.http_harness import eventually
from tests.redis_proc import RedisProcess, free_port

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parents[1]


class Replica:
    def __init__(self, redis_url: str, upstream: str, config: Path, name: str) -> None:
        self.port, self.admin = free_port(), free_port()
        self.log = config.parent / f"{name}.log"
        env = {**os.environ, "REDIS_URL": redis_url, "SIDECAR_REPLICA_ID": name}
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sidecar",
                "serve",
                "--config",
                str(config),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--admin-listen",
                f"127.0.0.1:{self.admin}",
                "--upstream",
                upstream,
            ],
            cwd=ROOT,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ready(self, session: aiohttp.ClientSession) -> None:
        async def check() -> bool:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                async with session.get(f"http://127.0.0.1:{self.admin}/readyz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(check, timeout=20)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._out.close()


@pytest.fixture
def redis_for_replicas() -> Iterator[RedisProcess]:
    server = RedisProcess().start()
    yield server
    server.kill()


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[SimulatedModel, str]]:
    model = SimulatedModel(latency_s=0.1)
    runner, port = await start_app(model.app())
    yield model, f"http://127.0.0.1:{port}"
    if model.gate is not None:
        model.gate.set()
    await runner.cleanup()


def write_config(tmp_path: Path, limit: int, grace: str = "30s") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""
saturationDetector: {{parameters: {{maxConcurrency: {limit}}}}}
flowControl: {{defaultRequestTTL: 60s}}
server: {{shutdownGracePeriod: {grace}}}
redis: {{leaseTimeout: 2s, heartbeatInterval: 200ms, maintenanceInterval: 200ms}}
"""
    )
    return path


async def test_three_replicas_enforce_one_global_limit(
    tmp_path: Path, redis_for_replicas: RedisProcess, upstream: tuple[SimulatedModel, str]
) -> None:
    model, upstream_url = upstream
    config = write_config(tmp_path, limit=3)
    replicas = [Replica(redis_for_replicas.url, upstream_url, config, f"r{i}") for i in range(3)]
    try:
        async with aiohttp.ClientSession() as session:
            for r in replicas:
                await r.ready(session)

            async def one(n: int) -> int:
                headers = {"x-workload-id": f"w{n % 4}", "x-workload-criticality": str(1 + n % 5)}
                async with session.post(
                    f"{replicas[n % 3].url}/v1/chat/completions", json={}, headers=headers
                ) as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(one(n) for n in range(90)))
    finally:
        for r in replicas:
            r.stop()
    assert statuses == [200] * 90
    assert len(model.arrivals) == 90
    assert model.peak <= 3
    assert model.peak == 3  # the limit was reached, so it was the limit that held


async def test_sigterm_drains_then_exits(
    tmp_path: Path, redis_for_replicas: RedisProcess, upstream: tuple[SimulatedModel, str]
) -> None:
    model, upstream_url = upstream
    model.gate = asyncio.Event()
    replica = Replica(redis_for_replicas.url, upstream_url, write_config(tmp_path, 2, "20s"), "r")
    try:
        async with aiohttp.ClientSession() as session:
            await replica.ready(session)
            running = asyncio.create_task(
                session.post(f"{replica.url}/v1/chat/completions", json={})
            )
            await eventually(lambda: len(model.arrivals) == 1)
            replica.proc.send_signal(signal.SIGTERM)

            async def not_ready() -> bool:
                async with session.get(f"http://127.0.0.1:{replica.admin}/readyz") as r:
                    return r.status == 503

            await eventually(not_ready)
            async with session.get(f"{replica.url}/v1/models") as r:
                assert r.status == 503
                assert r.headers["x-admission-reason"] == "shutting_down"
            assert replica.proc.poll() is None  # still finishing the admitted request
            model.gate.set()
            response = await running
            assert response.status == 200
            await response.read()
            response.release()
        code = await asyncio.to_thread(replica.proc.wait, 20)
        assert code == 0
    finally:
        replica.stop()
    assert "stopped (drained)" in replica.log.read_text()
