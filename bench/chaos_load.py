"""The chaos run's load: closed-loop clients above capacity, spread over the replicas.

Clients differ the way real ones do: keep-alive or ``Connection: close`` (aiohttp
``TCPConnector(force_close=True)``), patient or giving up after a second or two, streaming or not,
with several workloads, criticalities and short queue TTLs. A connection refused (a killed
replica) is retried on the next replica under a new request id. Every attempt that reached a
replica ends as one ``ClientRecord``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import msgspec

WORKLOADS = ("chat", "search", "agent", "batch")
PATIENT_TIMEOUT_S = 30.0  # bounds even a patient client
GIVE_UP_S = (0.8, 2.0)  # clients that give up wait this long at most
TTL_S = (0.3, 2.0)  # short queue TTLs (x-gateway-inference-ttl) on a share of the requests
TTL_SHARE = 0.3
STREAM_SHARE = 0.5
# Long generations (a service time beyond leaseTimeout, asked of the upstream in the body): the
# only requests that can still run at the upstream when a paused replica's lease lapses.
LONG_SHARE = 0.02
BACKOFF_S = 0.05  # after a fast refusal (503, every replica refusing), so no client spins
DRAIN_S = 15.0  # requests still unanswered this long after the load stops are cut


@dataclass
class ClientRecord:
    request_id: str
    replica: int
    sent: float  # time.monotonic()
    done: float = -1.0
    # response | reset_killed (its replica was SIGKILLed) | reset_paused (SIGSTOPped meanwhile)
    # | reset_other | gave_up | unfinished
    kind: str = "unfinished"
    status: int = 0
    outcome: str = ""  # x-admission-outcome ("" when the response had none)
    reason: str = ""  # x-admission-reason
    stream: bool = False
    service_ms: int = 0  # asked of the upstream; 0: its usual 100-300 ms
    body_ok: bool = True  # a 200's body was whole (JSON decoded, SSE ended with [DONE])
    error: str = ""


@dataclass
class LoadStats:
    records: list[ClientRecord] = field(default_factory=list)
    refused: int = 0  # connection refused, retried on another replica
    all_refused: int = 0  # every replica refused at once


class Generations:
    """How many times each replica was SIGKILLed (a reset is expected if the count moved), and
    SIGSTOPped (a woken replica aborts what it no longer owns: expected too)."""

    def __init__(self, replicas: int) -> None:
        self.kills = [0] * replicas
        self.pauses = [0] * replicas

    def killed(self, replica: int) -> None:
        self.kills[replica] += 1

    def paused(self, replica: int) -> None:
        self.pauses[replica] += 1


class Client:
    def __init__(
        self,
        n: int,
        urls: Sequence[str],
        gens: Generations,
        stats: LoadStats,
        rng: random.Random,
        long_s: tuple[float, float],
    ) -> None:
        self.n, self.urls, self.gens, self.stats, self.rng = n, urls, gens, stats, rng
        self.long_s = long_s
        self.keep_alive = n % 2 == 0
        self.gives_up = n % 4 == 3
        # The kill count of each replica when this client last finished a request on it: a
        # pooled keep-alive connection opened before a kill is dead.
        self.last_gen = list(gens.kills)
        self.seq = 0

    async def run(self, until: float) -> None:
        connector = aiohttp.TCPConnector(force_close=not self.keep_alive, limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            while time.monotonic() < until:
                if not await self.one(session):
                    await asyncio.sleep(BACKOFF_S)

    def _headers(self, rid: str) -> dict[str, str]:
        headers = {
            "x-request-id": rid,
            "x-workload-id": self.rng.choice(WORKLOADS),
            "x-workload-criticality": str(self.rng.randint(1, 5)),
        }
        if self.rng.random() < TTL_SHARE:
            headers["x-gateway-inference-ttl"] = f"{self.rng.uniform(*TTL_S):.2f}"
        return headers

    async def one(self, session: aiohttp.ClientSession) -> bool:
        """One request, retried on the next replica while refused; False after a fast refusal."""
        first = self.rng.randrange(len(self.urls))
        stream = self.rng.random() < STREAM_SHARE
        long = self.rng.random() < LONG_SHARE
        service_ms = int(self.rng.uniform(*self.long_s) * 1000) if long else 0
        timeout = self.rng.uniform(*GIVE_UP_S) if self.gives_up else PATIENT_TIMEOUT_S
        self.seq += 1
        for attempt in range(len(self.urls)):
            replica = (first + attempt) % len(self.urls)
            rid = f"r{replica}.c{self.n}.n{self.seq}.a{attempt}"
            record = ClientRecord(
                rid, replica, time.monotonic(), stream=stream, service_ms=service_ms
            )
            gen, paused = self.gens.kills[replica], self.gens.pauses[replica]
            try:
                await self._send(session, record, timeout)
            except aiohttp.ClientConnectorError:
                self.stats.refused += 1
                continue
            except TimeoutError:  # before ClientError: aiohttp's timeouts are both
                record.kind = "gave_up"
            except (aiohttp.ClientError, ConnectionError) as exc:
                record.kind = (
                    "reset_killed"
                    if self._expected(replica, gen)
                    else "reset_paused"
                    if self.gens.pauses[replica] != paused
                    else "reset_other"
                )
                record.error = f"{type(exc).__name__}: {exc}"
            except asyncio.CancelledError:
                record.done = time.monotonic()
                self.stats.records.append(record)
                raise
            record.done = time.monotonic()
            self.stats.records.append(record)
            self.last_gen[replica] = self.gens.kills[replica]
            return record.kind != "response" or record.status != 503
        self.stats.all_refused += 1
        return False

    def _expected(self, replica: int, gen_at_send: int) -> bool:
        killed_meanwhile = self.gens.kills[replica] != gen_at_send
        stale_connection = self.keep_alive and self.last_gen[replica] != gen_at_send
        return killed_meanwhile or stale_connection

    async def _send(
        self, session: aiohttp.ClientSession, record: ClientRecord, give_up_s: float
    ) -> None:
        body: dict[str, object] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        body["stream"] = record.stream
        if record.service_ms:
            body["service_ms"] = record.service_ms
        async with session.post(
            self.urls[record.replica] + "/v1/chat/completions",
            json=body,
            headers=self._headers(record.request_id),
            timeout=aiohttp.ClientTimeout(total=give_up_s),
        ) as resp:
            raw = await resp.read()
            record.kind = "response"
            record.status = resp.status
            record.outcome = resp.headers.get("x-admission-outcome", "")
            record.reason = resp.headers.get("x-admission-reason", "")
            if resp.status == 200:
                record.body_ok = _whole(raw, record.stream)


def _whole(raw: bytes, stream: bool) -> bool:
    if stream:
        return raw.endswith(b"data: [DONE]\n\n")
    try:
        msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return False
    return True


async def run_load(
    urls: Sequence[str],
    clients: int,
    until: float,
    gens: Generations,
    seed: int,
    long_s: tuple[float, float],
) -> LoadStats:
    """Runs ``clients`` closed-loop clients until ``until``, then lets them finish (bounded).

    ``long_s`` is the service time range of the long generations."""
    stats = LoadStats()
    tasks = [
        asyncio.create_task(
            Client(n, urls, gens, stats, random.Random(seed * 1000 + n), long_s).run(until)
        )
        for n in range(clients)
    ]
    try:
        await asyncio.wait(tasks, timeout=max(until - time.monotonic(), 0) + DRAIN_S)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return stats
