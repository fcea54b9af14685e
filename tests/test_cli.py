"""The command line: option precedence, check-config, status."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import build_parser, main
from sidecar.config import ConfigError
from sidecar.controller import FlowController
from sidecar.options import resolve
from sidecar.request import FlowControlRequest
from sidecar.store import PoolStore
from sidecar.store.connect import connect
from sidecar.workload import WorkloadContext
from tests.conftest import make_config
from tests.redis_proc import RedisProcess

ROOT = Path(__file__).resolve().parents[1]


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_flags_win_over_env_which_wins_over_the_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "pool: from-file\nserver: {listen: '127.0.0.1:1111', adminListen: '127.0.0.1:2222', "
        "upstream: 'http://file', replicaId: file}\nredis: {url: 'redis://file:1'}\n"
    )
    env = {
        "SIDECAR_CONFIG": str(cfg),
        "SIDECAR_LISTEN": "127.0.0.1:3333",
        "SIDECAR_POOL": "from-env",
        "REDIS_URL": "redis://env:1",
        "SIDECAR_REPLICA_ID": "env",
    }
    opts = resolve(serve_args("--listen", "0.0.0.0:4444", "--upstream", "http://flag/"), env)
    assert opts.listen == ("0.0.0.0", 4444)  # flag
    assert opts.config.pool == "from-env"  # env over file
    assert opts.redis_url == "redis://env:1"
    assert opts.admin_listen == ("127.0.0.1", 2222)  # file
    assert opts.upstream == "http://flag"
    assert opts.replica_id.startswith("env-") and len(opts.replica_id) == len("env-") + 6
    # Each process gets its own suffix, so a restart never inherits a dead process's slots.
    assert resolve(serve_args(), env).replica_id != opts.replica_id


def test_no_redis_url_means_embedded() -> None:
    assert resolve(serve_args(), {}).redis_url is None


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--listen", "nope"], "listen"),
        (["--pool", "a{b}"], "pool"),
        (["--replica-id", "bad id"], "replica id"),
    ],
)
def test_bad_options_name_the_option(argv: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve(serve_args(*argv), {})


def test_check_config_prints_the_effective_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "flowControl: {priorityBands: [{priority: 5,"
        " orderingPolicy: {type: edf-ordering-policy}}]}\n"
    )
    assert main(["check-config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "effectiveBands" in out and "edf-ordering-policy" in out and "maxWaitTimeSeconds" in out


def test_check_config_reports_errors_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("flowControl: {maxRequestz: 1}\n")
    assert main(["check-config", str(cfg)]) == 2
    assert "maxRequestz" in capsys.readouterr().err


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    for command in ("serve", "demo", "status", "check-config"):
        assert command in done.stdout


@pytest.mark.redis
async def test_status_shows_the_live_pool(redis_server: RedisProcess) -> None:
    client, inbox = connect(redis_server.url, timeout_s=5.0)
    await client.flushall()
    ctrl = FlowController(PoolStore(client, make_config(limit=1), "r1", inbox_client=inbox))
    await ctrl.start(loops=False)
    await ctrl.enqueue_and_wait(
        FlowControlRequest(request_id="a", workload=WorkloadContext("chat", 5))
    )
    await ctrl.submit(FlowControlRequest(request_id="b", workload=WorkloadContext("batch", 1)))
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "status", "--redis-url", redis_server.url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "in flight 1/1" in done.stdout
    assert "queued 1" in done.stdout
    assert "batch" in done.stdout and "chat" in done.stdout
    assert "workload-aware-ordering-policy" in done.stdout
    await client.aclose()
    await inbox.aclose()
