"""One scraper per pool: a lease in Redis that one replica holds at a time.

The lease is the string key ``<pool prefix>scrape`` (sidecar/keys.py ``pool_prefix``, so it shares
the pool's hash tag) holding the owner's replica id, with a TTL in Redis:

- take it: ``SET key owner NX PX ttl`` (only if nobody holds it);
- renew it: ``PEXPIRE key ttl`` only while the value is still ours;
- give it up (graceful stop): ``DEL key`` only while the value is still ours.

"Only while still ours" is a WATCH / GET / MULTI / EXEC transaction, so a replica whose lease ran
out (paused, partitioned) and was taken by another can never extend or delete the new holder's
lease. A transaction rather than a Lua script because every lua/*.lua script names its keys only
through the generated contract (sidecar/contract.py, checked by tests/test_contract.py), where
this key is not declared (yet); a WATCH transaction runs the same on one server, Sentinel, Redis
Cluster (redis-py's cluster pipeline supports WATCH on one slot) and fakeredis.

Time is Redis's: the key expires on the server's clock. The holder's own belief is local and
conservative: it holds the lease until ``ttl`` after it *sent* the command that took or renewed it,
which is never later than the key's expiry on the server (the server set that expiry when the
command arrived, at or after it was sent). So while a replica believes it holds the lease, the key
holds its id and no other replica can take it; clock *rates* are assumed equal over one ttl.

Timing (defaults): ttl 800 ms, renewed every ttl/3; a replica that does not hold the lease tries to
take it every scrape interval (50 ms). When the holder dies, the key expires at most ttl after its
last renewal, so another replica takes over within ttl + one retry interval + one round trip,
under a second; a graceful stop deletes the key and the takeover is one retry interval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import WatchError

from sidecar import contract
from sidecar.keys import pool_prefix

__all__ = ["SCRAPE_LEASE_SUFFIX", "ScrapeLease", "scrape_lease_key"]

log = logging.getLogger(__name__)

SCRAPE_LEASE_SUFFIX = contract.SCRAPE
DEFAULT_TTL_S = 0.8


def scrape_lease_key(pool: str) -> str:
    """The pool's scrape lease key: under the pool prefix, so in the pool's hash slot."""
    return pool_prefix(pool) + SCRAPE_LEASE_SUFFIX


class ScrapeLease:
    """A replica's handle on its pool's scrape lease."""

    def __init__(
        self,
        client: Any,
        pool: str,
        owner: str,
        ttl: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 0.003:
            raise ValueError("scrape lease ttl must be at least 3 ms")
        self._client = client
        self.key = scrape_lease_key(pool)
        self.owner = owner
        # The value as a client without and with decode_responses returns it.
        self._owner_bytes = owner.encode()
        self.ttl = ttl
        self._ttl_ms = int(ttl * 1000)
        self._clock = clock
        # Local clock: until when this replica may act as the holder.
        self._valid_until = float("-inf")

    @property
    def renew_interval(self) -> float:
        return self.ttl / 3

    def held(self) -> bool:
        """Whether this replica may scrape now (no Redis call)."""
        return self._clock() < self._valid_until

    def remaining(self) -> float:
        return max(0.0, self._valid_until - self._clock())

    async def hold(self) -> bool:
        """Take the lease, or renew it if this replica holds it; whether it holds it now.

        A Redis error propagates and leaves the belief as it was: it still ends ``ttl`` after the
        last confirmed take or renewal, so an unreachable Redis stops this replica in time."""
        sent = self._clock()
        ok = False
        if self.held():
            ok = await self._if_ours(lambda pipe: pipe.pexpire(self.key, self._ttl_ms))
            if not ok:
                # Taken by another, or gone (Redis restarted empty): try to take it below.
                log.warning("scrape lease %s: renewal found it not ours any more", self.key)
                self._valid_until = float("-inf")
        if not ok:
            ok = bool(await self._client.set(self.key, self.owner, nx=True, px=self._ttl_ms))
            if ok:
                log.info("scrape lease %s: taken by %s", self.key, self.owner)
        self._valid_until = sent + self.ttl if ok else float("-inf")
        return ok

    async def release(self) -> None:
        """Give the lease up, so another replica takes over within one retry interval."""
        if not self.held():
            return
        self._valid_until = float("-inf")
        if await self._if_ours(lambda pipe: pipe.delete(self.key)):
            log.info("scrape lease %s: released by %s", self.key, self.owner)

    async def _if_ours(self, queue: Callable[[Any], object]) -> bool:
        """Runs the command ``queue`` adds to a transaction if the key still holds our id."""
        async with self._client.pipeline(transaction=True) as pipe:
            await pipe.watch(self.key)
            if await pipe.get(self.key) not in (self._owner_bytes, self.owner):
                await pipe.unwatch()
                return False
            pipe.multi()
            queue(pipe)
            try:
                (result,) = await pipe.execute()
            except WatchError:
                return False  # changed between our GET and EXEC: not ours any more
            return bool(result)
