"""``rediss://`` for real: redis-server on a TLS-only port with a certificate of a CA made here."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.controller import FlowController
from sidecar.errors import StoreError
from sidecar.request import FlowControlRequest
from sidecar.state import read_state
from sidecar.store import PoolStore
from sidecar.store.connect import connect
from tests.conftest import make_config
from tests.redis_proc import RedisProcess, free_port

pytestmark = pytest.mark.redis
# A fresh P-256 key (fast to make), not encrypted.
NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    openssl(
        "req", "-x509", *NEW_KEY, "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}"
    )
    return key, cert


def make_server_cert(directory: Path, ca_key: Path, ca_cert: Path) -> tuple[Path, Path]:
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("req", *NEW_KEY, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
            "-out", cert, "-days", "2", "-extfile", ext)  # fmt: skip
    return key, cert


class TlsRedis(RedisProcess):
    """redis-server listening with TLS only (``--port 0``); readiness is a PING over TLS."""

    def __init__(self, directory: Path) -> None:
        ca_key, self.ca = make_ca(directory, "ca")
        key, cert = make_server_cert(directory, ca_key, self.ca)
        port = free_port()
        super().__init__(
            port=port,
            extra=["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
                   "--tls-key-file", str(key), "--tls-ca-cert-file", str(self.ca),
                   "--tls-auth-clients", "no"],
        )  # fmt: skip

    def tls_url(self, ca: Path) -> str:
        """redis-py reads ``ssl_ca_certs`` (and the other ``ssl_*`` options) from the query."""
        return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={ca}"

    def _wait_ready(self) -> None:
        context = ssl.create_default_context(cafile=str(self.ca))
        # No event crosses the process boundary: poll the port until it answers.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw,
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as s,
                ):
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"TLS redis-server on port {self.port} did not start")


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path)
    server.start()
    yield server
    server.kill()


async def test_admit_and_release_over_tls(tls_redis: TlsRedis) -> None:
    client, inbox = connect(tls_redis.tls_url(tls_redis.ca), timeout_s=2.0)
    ctrl = FlowController(PoolStore(client, make_config(limit=1), "tls", inbox_client=inbox))
    try:
        await ctrl.start()
        for n in range(2):  # the second admit reuses the released slot (limit 1)
            admission = await ctrl.enqueue_and_wait(FlowControlRequest(request_id=f"tls-{n}"))
            assert admission.admitted
            assert await ctrl.release(admission.item_id)
        assert (await read_state(ctrl.store)).inflight == 0  # plain commands over TLS too
    finally:
        await ctrl.stop()
        await client.aclose()
        await inbox.aclose()


async def test_a_server_certificate_of_another_ca_is_refused(
    tls_redis: TlsRedis, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    _, other_ca = make_ca(other, "other-ca")
    client, inbox = connect(tls_redis.tls_url(other_ca), timeout_s=2.0)
    ctrl = FlowController(PoolStore(client, make_config(limit=1), "tls", inbox_client=inbox))
    try:
        # A bound on the test, not a timing assertion: a hang would fail it instead of stalling.
        async with asyncio.timeout(20):
            with pytest.raises(StoreError, match="certificate verify failed"):
                await ctrl.start(loops=False)
            with pytest.raises(StoreError):
                await ctrl.enqueue_and_wait(FlowControlRequest(request_id="never"))
    finally:
        await client.aclose()
        await inbox.aclose()
