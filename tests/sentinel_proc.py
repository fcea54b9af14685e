"""A Sentinel-managed deployment owned by a test: a primary, its replica and redis-sentinel
processes, all on free loopback ports, so a test can kill the primary and watch a failover; a relay
that makes the replica miss writes; and a server that hangs up mid-call."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from tests.redis_proc import RedisProcess, free_port

SERVICE = "mymaster"


def start_sentinel(
    directory: Path,
    primary_port: int,
    *,
    quorum: int = 1,
    down_after_ms: int | None = None,
    failover_timeout_ms: int | None = None,
) -> RedisProcess:
    """One sentinel watching ``SERVICE`` on 127.0.0.1:``primary_port``.

    A sentinel is redis-server started with --sentinel on a config file it can rewrite (it records
    the replicas, peers and failovers it learns about), so each one gets its own directory.
    """
    port = free_port()
    home = directory / f"sentinel-{port}"
    home.mkdir(parents=True)
    lines = [
        f"port {port}",
        "bind 127.0.0.1",
        f"dir {home}",
        f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} {quorum}",
    ]
    if down_after_ms is not None:
        lines.append(f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}")
    if failover_timeout_ms is not None:
        lines.append(f"sentinel failover-timeout {SERVICE} {failover_timeout_ms}")
        # Only one replica here; the setting is spelled out because a failover test reads it.
        lines.append(f"sentinel parallel-syncs {SERVICE} 1")
    conf = home / "sentinel.conf"
    conf.write_text("\n".join(lines) + "\n")
    return RedisProcess(port=port, extra=["--sentinel"]).start_with_config(conf)


@dataclass
class SentinelDeployment:
    """A primary, one replica and three sentinels (quorum 2) that fail over within seconds."""

    directory: Path
    primary: RedisProcess = field(init=False)
    replica: RedisProcess = field(init=False)
    sentinels: list[RedisProcess] = field(default_factory=list)

    def start(
        self,
        *,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        relay: Relay | None = None,
    ) -> None:
        """Starts everything; with ``relay``, the replica's link to the primary goes through it."""
        # No delay before the replica's first full sync (the default waits 5 s for more replicas).
        self.primary = RedisProcess(extra=["--repl-diskless-sync-delay", "0"]).start()
        try:
            link = self.primary.port
            if relay is not None:
                relay.target, link = self.primary.port, relay.port
            self.replica = RedisProcess(extra=["--replicaof", "127.0.0.1", str(link)]).start()
            for _ in range(3):
                self.sentinels.append(
                    start_sentinel(
                        self.directory,
                        self.primary.port,
                        quorum=2,
                        down_after_ms=down_after_ms,
                        failover_timeout_ms=failover_timeout_ms,
                    )
                )
        except RuntimeError:
            self.kill()
            raise

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def kill(self) -> None:
        for s in self.sentinels:
            s.kill()
        for server in (getattr(self, "replica", None), getattr(self, "primary", None)):
            if server is not None:
                server.kill()

    async def sentinel_views(self) -> list[dict[str, Any]]:
        """What each sentinel believes about ``SERVICE`` (SENTINEL MASTER); {} if it cannot say."""
        views: list[dict[str, Any]] = []
        for s in self.sentinels:
            client = aioredis.Redis(port=s.port, socket_timeout=1.0, decode_responses=True)
            try:
                view = await client.sentinel_master(SERVICE)
                views.append(view if isinstance(view, dict) else {})
            except RedisError:
                views.append({})
            finally:
                await client.aclose()
        return views

    async def ready_for_failover(self) -> bool:
        """Every sentinel sees the primary up, its replica and both peers, and the replica is in
        sync: only then can a quorum agree that the primary is down and promote the replica."""
        for view in await self.sentinel_views():
            if view.get("port") != self.primary.port or view.get("is_sdown"):
                return False
            if view.get("num-slaves") != 1 or view.get("num-other-sentinels") != 2:
                return False
        client = aioredis.Redis(port=self.replica.port, socket_timeout=1.0)
        try:
            info = await client.info("replication")
        finally:
            await client.aclose()
        return bool(info.get("master_link_status") == "up")

    async def in_sync(self) -> bool:
        """The replica has applied everything the primary has written so far."""
        offsets = []
        for server in (self.primary, self.replica):
            client = aioredis.Redis(port=server.port, socket_timeout=1.0)
            try:
                info = await client.info("replication")
            finally:
                await client.aclose()
            key = "master_repl_offset" if server is self.primary else "slave_repl_offset"
            offsets.append(int(info.get(key, -1)))
        return offsets[0] == offsets[1] >= 0

    async def promoted(self, port: int) -> bool:
        """Every sentinel names 127.0.0.1:``port`` as the primary and that server says it is one."""
        for view in await self.sentinel_views():
            if view.get("port") != port or view.get("is_sdown") or view.get("is_odown"):
                return False
        client = aioredis.Redis(port=port, socket_timeout=1.0)
        try:
            info = await client.info("replication")
        finally:
            await client.aclose()
        return bool(info.get("role") == "master")


class Relay:
    """A TCP relay on the replication link. ``cut`` makes the replica miss what the primary writes
    from then on, as a replica lagging behind does when its primary dies: Redis replicates
    asynchronously, so a write acknowledged to a client may never reach the replica."""

    def __init__(self) -> None:
        self.target = 0  # the primary's port, set before the replica connects
        self.port = 0
        self.cut_off = False
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def cut(self) -> None:
        """From now on the primary's bytes are dropped; the replica's still reach the primary."""
        self.cut_off = True

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:  # the primary is gone: the replica keeps trying, and failing
            writer.close()
            return
        self._writers.append(up_writer)
        await asyncio.gather(
            self._pipe(reader, up_writer, droppable=False),
            self._pipe(up_reader, writer, droppable=True),
            return_exceptions=True,
        )

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, droppable: bool
    ) -> None:
        try:
            while data := await source.read(65536):
                if droppable and self.cut_off:
                    continue
                sink.write(data)
                await sink.drain()
        finally:
            # One side closed (the primary died): the link breaks both ways, as TCP's would.
            sink.close()

    async def stop(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class HangUp:
    """A server that dies mid-call: it answers handshakes (CLIENT SETINFO) with +OK, then hangs
    up on the first of ``commands`` it receives. Counts how many of those reached it."""

    def __init__(self, *commands: str) -> None:
        # As a command name travels in RESP: a bulk string of its own.
        self.tokens = [f"${len(c)}\r\n{c}\r\n".encode() for c in commands]
        self.received = 0
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                hits = sum(chunk.upper().count(t) for t in self.tokens)
                if hits:
                    self.received += hits
                    return
                commands = sum(line.startswith(b"*") for line in chunk.split(b"\r\n"))
                writer.write(b"+OK\r\n" * commands)
                await writer.drain()
        finally:
            writer.close()

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *_exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
