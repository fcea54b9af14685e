"""Redis clients from a URL, and the embedded in-process store when there is no URL.

URLs: ``redis://``, ``rediss://`` (TLS), ``unix://`` for one server; ``redis+cluster://host:port``
(or ``rediss+cluster://``) for Redis Cluster; ``redis+sentinel://host:port[,host:port]/service``
for a Sentinel-managed primary. Credentials and TLS options come from the URL, as redis-py
reads them.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fakeredis
from redis import asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel

log = logging.getLogger(__name__)

# Blocking pops wait this long; their client's socket timeout must be longer.
INBOX_SOCKET_TIMEOUT_S = 5.0
EMBEDDED_MAX_CONNECTIONS = 1_000_000


def mask_url(url: str) -> str:
    """The URL with its password replaced, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def connect(url: str, timeout_s: float, max_connections: int = 64) -> tuple[Any, Any]:
    """A client for scripts (short timeouts) and one for the blocking inbox pop.

    The script client's pool is bounded and blocking: under a burst, calls wait (up to the timeout)
    for a connection instead of opening hundreds or failing with "Too many connections".
    """
    scheme = urlsplit(url).scheme
    if scheme.endswith("+cluster"):
        base = url.replace("+cluster", "", 1)
        opts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        cluster = RedisCluster.from_url(base, **opts)
        cluster_inbox = RedisCluster.from_url(base, socket_timeout=INBOX_SOCKET_TIMEOUT_S)
        return cluster, cluster_inbox
    if scheme.endswith("+sentinel"):
        return _sentinel(url, timeout_s)
    # No automatic retries (redis-py's client default is 10): a retried enqueue could take two
    # places, and retries would stretch the bounded timeout. PoolStore retries what is idempotent.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
    client = aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it
    inbox = aioredis.from_url(
        url, socket_timeout=INBOX_SOCKET_TIMEOUT_S, socket_connect_timeout=timeout_s, retry=None
    )
    return client, inbox


def _sentinel(url: str, timeout_s: float) -> tuple[Any, Any]:
    parts = urlsplit(url)
    hosts = []
    for hostport in parts.netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = hostport.partition(":")
        hosts.append((host, int(port or 26379)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("a sentinel URL names the service: redis+sentinel://host:port/service")
    service = path[0]
    extra: dict[str, Any] = {"db": int(path[1])} if len(path) > 1 else {}
    if parts.password:
        extra["password"] = parts.password
    if parts.username:
        extra["username"] = parts.username
    sentinel = Sentinel(hosts, socket_timeout=timeout_s, **extra)  # type: ignore[no-untyped-call]
    client = sentinel.master_for(service, redis_class=_SentinelManaged, socket_timeout=timeout_s)
    inbox = sentinel.master_for(
        service, redis_class=_SentinelManaged, socket_timeout=INBOX_SOCKET_TIMEOUT_S
    )
    client.sentinel_group = inbox.sentinel_group = sentinel
    return client, inbox


class _SentinelManaged(aioredis.Redis):
    """A primary found through Sentinel; closing it also closes the connections to the sentinels."""

    sentinel_group: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel_group is not None:
            for s in self.sentinel_group.sentinels:
                await s.aclose()


def embedded() -> tuple[Any, Any]:
    """An in-process store (fakeredis with Lua): one replica, state gone when the process ends."""
    server = fakeredis.FakeServer()
    # In-process "connections" cost nothing; the cap only has to exceed any burst of requests.
    client = fakeredis.FakeAsyncRedis(server=server, max_connections=EMBEDDED_MAX_CONNECTIONS)
    return client, fakeredis.FakeAsyncRedis(server=server)
