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
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

log = logging.getLogger(__name__)

# Blocking pops wait this long; their client's socket timeout must be longer.
INBOX_SOCKET_TIMEOUT_S = 5.0
EMBEDDED_MAX_CONNECTIONS = 1_000_000


# Query parameters that redis-py hands to the connection as credentials.
_SECRET_PARAMS = frozenset({"password", "ssl_password"})


def mask_url(url: str) -> str:
    """The URL with its credentials replaced, for logs and printed config.

    Masks the password of ``user:pass@`` and ``:pass@`` (also before a sentinel's host list), a
    lone ``name@`` (it may be a password), and password query parameters."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    userinfo, at, hosts = parts.netloc.rpartition("@")
    params = [p.partition("=") for p in parts.query.split("&") if p]
    if not at and not any(name.lower() in _SECRET_PARAMS for name, _, _ in params):
        return url  # nothing to mask (urlunsplit would also turn unix:///path into unix:/path)
    netloc = parts.netloc
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hosts}" if colon else f"***@{hosts}"
    query = "&".join(
        f"{name}=***" if name.lower() in _SECRET_PARAMS else f"{name}{eq}{value}"
        for name, eq, value in params
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


# Every client speaks RESP2, whatever redis-py's default: the replies the store parses (script
# replies, where Lua's false is a nil, not a boolean) are RESP2's, and redis-py 8.2 made RESP3
# (a HELLO 3 on every new connection) its default.
PROTOCOL = 2


def connect(url: str, timeout_s: float, max_connections: int = 64) -> tuple[Any, Any]:
    """A client for scripts (short timeouts) and one for the blocking inbox pop.

    The script client's pool is bounded and blocking: under a burst, calls wait (up to the timeout)
    for a connection instead of opening hundreds or failing with "Too many connections".
    """
    scheme = urlsplit(url).scheme
    if scheme.endswith("+cluster"):
        base = url.replace("+cluster", "", 1)
        # RedisCluster retries a command 10 times on a connection error or a timeout by default,
        # after which an enqueue may have run twice; the next call re-reads the topology anyway.
        opts = {"socket_connect_timeout": timeout_s, "retry": _no_retry(), "protocol": PROTOCOL}
        cluster = RedisCluster.from_url(base, socket_timeout=timeout_s, **opts)
        cluster_inbox = RedisCluster.from_url(base, socket_timeout=INBOX_SOCKET_TIMEOUT_S, **opts)
        return cluster, cluster_inbox
    if scheme.endswith("+sentinel"):
        return _sentinel(url, timeout_s, max_connections)
    # No automatic retries (redis-py's client default is 10): a retried enqueue could take two
    # places, and retries would stretch the bounded timeout. PoolStore retries what is idempotent.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        protocol=PROTOCOL,
    )
    client = aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it
    inbox = aioredis.from_url(
        url,
        socket_timeout=INBOX_SOCKET_TIMEOUT_S,
        socket_connect_timeout=timeout_s,
        retry=None,
        protocol=PROTOCOL,
    )
    return client, inbox


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def _sentinel(url: str, timeout_s: float, max_connections: int) -> tuple[Any, Any]:
    """Clients that ask the sentinels for the primary whenever they open a connection.

    After a failover redis-py's sentinel pool finds the new primary by itself: a command on a
    connection to the old one fails (once, never retried), and the next connection asks again.
    """
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
    timeouts: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "protocol": PROTOCOL,
    }
    # The sentinels' own clients would otherwise retry 10 times with back-off: one dead sentinel
    # early in the URL would then hold every new connection for seconds (minutes if its address
    # drops packets: each try waits the 5 s default connect timeout). Failing fast moves on to the
    # next sentinel, and redis-py then asks the one that answered first.
    # (Typed from redis-py 8.2 on; untyped before.)
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        hosts, sentinel_kwargs={**timeouts, "retry": _no_retry()}, **timeouts, **extra
    )
    # Commands on the primary are not retried either (as for one server, see connect()).
    client = sentinel.master_for(
        service,
        redis_class=_SentinelManaged,
        connection_pool_class=_BlockingSentinelPool,
        max_connections=max_connections,
        timeout=timeout_s,
        retry=_no_retry(),
    )
    inbox = sentinel.master_for(
        service,
        redis_class=_SentinelManaged,
        socket_timeout=INBOX_SOCKET_TIMEOUT_S,
        retry=_no_retry(),
    )
    client.sentinel_group = inbox.sentinel_group = sentinel
    return client, inbox


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel's pool, bounded and blocking like the one-server pool (connect() says why)."""


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
