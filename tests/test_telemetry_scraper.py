"""The scrape loop against the fake vLLM server, the endpoint sources, and the Redis scrape lease
that lets one replica at a time scrape a pool (on a real redis-server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import fakeredis
import pytest
from redis import asyncio as aioredis

from sidecar.simulator import SimulatedModel, start_app
from sidecar.telemetry.dialects import TGI, VLLM
from sidecar.telemetry.endpoints import DnsEndpoints, EndpointsConfig, endpoint_source
from sidecar.telemetry.lease import ScrapeLease, scrape_lease_key
from sidecar.telemetry.saturation import PoolSaturation, UtilizationParameters
from sidecar.telemetry.scraper import PARAMETER_KEYS, DetectorSettings, Scraper, ScrapeSettings
from tests.http_harness import eventually
from tests.redis_proc import RedisProcess, free_port

POOL = "telemetry-test"

Call = tuple[float, int, int]


@dataclass
class RecordingSink:
    """A SampleSink that records its calls and lets a test wait for one."""

    calls: list[Call] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def __call__(self, saturation: float, stale_endpoints: int, endpoints: int) -> None:
        async with self._changed:
            self.calls.append((saturation, stale_endpoints, endpoints))
            self._changed.notify_all()

    async def next_call(self, predicate: Callable[[Call], bool], timeout: float = 5.0) -> Call:
        """The first call from now on that satisfies ``predicate``."""
        start = len(self.calls)

        def found() -> bool:
            return any(predicate(c) for c in self.calls[start:])

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(found), timeout)
        return next(c for c in self.calls[start:] if predicate(c))


@dataclass
class ModelServer:
    model: SimulatedModel
    base_url: str
    port: int


@pytest.fixture
async def model_server() -> AsyncIterator[ModelServer]:
    model = SimulatedModel(latency_s=0.01)
    runner, port = await start_app(model.app())
    try:
        yield ModelServer(model, f"http://127.0.0.1:{port}", port)
    finally:
        await runner.cleanup()


@pytest.fixture
async def redis_url(redis_server: RedisProcess) -> AsyncIterator[str]:
    client = aioredis.from_url(redis_server.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    yield redis_server.url


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[Callable[[], Any]]:
    """Makes Redis clients (one per replica), closed after the test."""
    made: list[Any] = []

    def make() -> Any:
        client = aioredis.from_url(redis_url)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_scraper(client: Any, params: dict[str, Any], owner: str) -> tuple[Scraper, RecordingSink]:
    settings = DetectorSettings.from_parameters(params)
    lease = ScrapeLease(client, POOL, owner, ttl=settings.scrape.lease_ttl)
    sink = RecordingSink()
    return Scraper(settings, endpoint_source(settings.endpoints), lease, sink), sink


@asynccontextmanager
async def running(*scrapers: Scraper) -> AsyncIterator[dict[Scraper, asyncio.Task[None]]]:
    tasks = {s: asyncio.create_task(s.run()) for s in scrapers}
    try:
        yield tasks
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        for s in scrapers:
            await s.aclose()


def post_all(session: aiohttp.ClientSession, url: str, n: int) -> list[asyncio.Task[int]]:
    async def post() -> int:
        async with session.post(f"{url}/v1/chat/completions", json={"max_tokens": 4}) as r:
            await r.read()
            return r.status

    return [asyncio.create_task(post()) for _ in range(n)]


# --- Settings -----------------------------------------------------------------------------------


def test_settings_from_the_configs_parameters() -> None:
    settings = DetectorSettings.from_parameters(
        {
            "endpointsFromDNS": "vllm-headless.llm.svc.cluster.local:8000",
            "dnsRefreshInterval": "10s",
            "metricsPath": "/v1/metrics",
            "modelServer": "tgi",
            "queueDepthThreshold": 3,
            "scrapeInterval": "100ms",
            "scrapeTimeout": "80ms",
            "scrapeLeaseTTL": "1s",
        }
    )
    assert settings.dialect is TGI
    assert settings.saturation == UtilizationParameters(queue_depth_threshold=3)
    assert settings.endpoints == EndpointsConfig(
        from_dns=("http", "vllm-headless.llm.svc.cluster.local", 8000),
        dns_refresh_interval=10.0,
        metrics_path="/v1/metrics",
    )
    assert settings.scrape == ScrapeSettings(interval=0.1, timeout=0.08, lease_ttl=1.0)


def test_settings_defaults() -> None:
    settings = DetectorSettings.from_parameters({"endpoints": ["http://10.0.0.7:8000/"]})
    assert settings.dialect is VLLM
    assert settings.saturation == UtilizationParameters()
    assert settings.endpoints == EndpointsConfig(endpoints=("http://10.0.0.7:8000",))
    assert settings.scrape == ScrapeSettings(interval=0.05, timeout=0.15, lease_ttl=0.8)
    assert "maxConcurrency" not in PARAMETER_KEYS


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "exactly one of endpoints, endpointsFromDNS"),
        ({"endpoints": ["http://a:1"], "endpointsFromDNS": "b:1"}, "exactly one of"),
        ({"endpoints": []}, "^endpoints: must be a non-empty list"),
        ({"endpoints": ["a:1"]}, r"^endpoints\[0\]: must look like http://host:port"),
        ({"endpoints": ["http://a:1/metrics"]}, r"^endpoints\[0\]: no path"),
        ({"endpoints": ["http://a:1", "http://a:1"]}, "^endpoints: lists an endpoint twice"),
        ({"endpoints": ["http://a:99999"]}, r"^endpoints\[0\]: bad port"),
        ({"endpointsFromDNS": "svc"}, "^endpointsFromDNS: needs a port"),
        ({"endpoints": ["http://a:1"], "dnsRefreshInterval": "1s"}, "^dnsRefreshInterval: only"),
        ({"endpointsFromDNS": "svc:80", "dnsRefreshInterval": 0}, "^dnsRefreshInterval: must"),
        ({"endpoints": ["http://a:1"], "metricsPath": "metrics"}, "^metricsPath:"),
        ({"endpoints": ["http://a:1"], "modelServer": "triton"}, "^modelServer: unknown"),
        ({"endpoints": ["http://a:1"], "scrapeInterval": "0s"}, "^scrapeInterval:"),
        ({"endpoints": ["http://a:1"], "scrapeLeaseTTL": "100ms"}, "^scrapeLeaseTTL:"),
        ({"endpoints": ["http://a:1"], "maxConcurrency": 4}, "^maxConcurrency: unknown"),
    ],
)
def test_bad_settings_name_their_key(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DetectorSettings.from_parameters(params)


# --- Endpoints from DNS -------------------------------------------------------------------------


async def test_dns_endpoints_resolve_localhost_and_re_resolve_on_schedule() -> None:
    clock = FakeClock()
    source = DnsEndpoints(
        ("http", "localhost", 8000), "/metrics", refresh_interval=5.0, clock=clock
    )
    try:
        urls = await source.urls()
        assert "http://127.0.0.1:8000/metrics" in urls
        assert set(urls) <= {"http://127.0.0.1:8000/metrics", "http://[::1]:8000/metrics"}
        assert source.resolutions == 1
        clock.now += 4.9
        assert await source.urls() == urls
        await source.wait_refreshed()
        assert source.resolutions == 1  # not due yet
        clock.now += 0.1
        assert await source.urls() == urls  # the old list, while the new one resolves
        await source.wait_refreshed()
        assert source.resolutions == 2
    finally:
        await source.aclose()


async def test_a_name_that_does_not_resolve_is_an_empty_pool() -> None:
    source = DnsEndpoints(("http", "no-such-host.invalid", 8000))
    try:
        assert await source.urls() == ()
        assert source.resolutions == 0
    finally:
        await source.aclose()


@pytest.mark.redis
async def test_scraper_scrapes_every_address_of_a_dns_name(clients: Callable[[], Any]) -> None:
    model = SimulatedModel(latency_s=0.01)
    port = free_port()
    # Bound on every address "localhost" has, so each resolved endpoint answers.
    runner, _ = await start_app(model.app(), host="localhost", port=port)
    try:
        scraper, sink = make_scraper(clients(), {"endpointsFromDNS": f"localhost:{port}"}, "r1")
        async with running(scraper):
            saturation, stale, endpoints = await sink.next_call(lambda c: True)
        resolved = await DnsEndpoints(("http", "localhost", port)).resolve()
        assert (saturation, stale, endpoints) == (0.0, 0, len(resolved))
        assert model.metrics_scrapes >= len(resolved)
    finally:
        await runner.cleanup()


# --- The scrape lease -----------------------------------------------------------------------------


@pytest.mark.redis
async def test_lease_is_one_holders_at_a_time(clients: Callable[[], Any]) -> None:
    a, b = ScrapeLease(clients(), POOL, "r1"), ScrapeLease(clients(), POOL, "r2")
    redis = clients()
    key = scrape_lease_key(POOL)
    assert key == "as:{telemetry-test}:scrape" == a.key
    assert await a.hold() is True and a.held()
    assert await b.hold() is False and not b.held()
    assert await redis.get(key) == b"r1"
    assert 0 < await redis.pttl(key) <= 800
    await redis.pexpire(key, 200)
    assert await a.hold() is True  # renewed: the TTL is back to the full lease
    assert await redis.pttl(key) > 700
    await a.release()
    assert not a.held() and await redis.exists(key) == 0
    assert await b.hold() is True


async def test_lease_works_on_the_embedded_store() -> None:
    server = fakeredis.FakeServer()
    a_client, b_client = (fakeredis.FakeAsyncRedis(server=server) for _ in range(2))
    try:
        a, b = ScrapeLease(a_client, POOL, "r1"), ScrapeLease(b_client, POOL, "r2")
        assert await a.hold() and not await b.hold()
        assert await a.hold()  # the renewal transaction (WATCH / MULTI) runs on fakeredis
        await a.release()
        assert await b.hold()
    finally:
        await a_client.aclose()
        await b_client.aclose()


@pytest.mark.redis
async def test_a_lapsed_holder_cannot_renew_or_delete_the_new_holders_lease(
    clients: Callable[[], Any],
) -> None:
    clock = FakeClock()  # frozen: "a" is paused and still believes it holds the lease
    a = ScrapeLease(clients(), POOL, "r1", ttl=0.1, clock=clock)
    b = ScrapeLease(clients(), POOL, "r2", ttl=0.9)
    redis = clients()
    assert await a.hold()

    async def b_takes_over() -> bool:
        return await b.hold()

    await eventually(b_takes_over, timeout=2.0)  # "a"'s key expires in Redis
    assert a.held()
    await a.release()  # gives up nothing that is not its own
    assert await redis.get(a.key) == b"r2"
    assert a.held() is False
    clock.now -= 1.0  # pretend, again, that "a" is within its lease
    assert await a.hold() is False  # the renewal sees another owner (and SET NX fails)
    assert await redis.get(a.key) == b"r2"
    assert await redis.pttl(a.key) > 500  # untouched by "a"


@pytest.mark.redis
async def test_a_holder_retakes_a_lease_redis_lost(clients: Callable[[], Any]) -> None:
    lease = ScrapeLease(clients(), POOL, "r1")
    redis = clients()
    assert await lease.hold()
    await redis.flushall()  # Redis restarted empty
    assert await lease.hold() is True
    assert await redis.get(lease.key) == b"r1"


# --- The scraper against the fake vLLM server ---------------------------------------------------


@pytest.mark.redis
async def test_saturation_follows_the_servers_waiting_queue_and_fails_closed(
    model_server: ModelServer, clients: Callable[[], Any]
) -> None:
    model = model_server.model
    model.batch_slots = 1
    model.gate = asyncio.Event()
    scraper, sink = make_scraper(clients(), {"endpoints": [model_server.base_url]}, "r1")
    async with aiohttp.ClientSession() as session, running(scraper):
        assert await sink.next_call(lambda c: True) == (0.0, 0, 1)
        # One request runs (held by the gate), ten wait inside the server: 10 / 5 = 2.
        requests = post_all(session, model_server.base_url, 11)
        await eventually(lambda: model.waiting == 10)
        saturation, stale, endpoints = await sink.next_call(lambda c: c[0] >= 1)
        assert (stale, endpoints) == (0, 1)
        assert saturation == pytest.approx(2.0)
        # The server drains: saturation falls below 1 (the running one's KV share is tiny).
        model.gate.set()
        assert await asyncio.gather(*requests) == [200] * 11
        saturation, stale, _ = await sink.next_call(lambda c: c[0] < 1)
        assert stale == 0 and saturation < 0.01
        # /metrics stops answering: once the last sample is older than 200 ms the endpoint is
        # stale and the pool fails closed at exactly 1.0, with the stale count saying why.
        failures = scraper.scrape_failures
        model.metrics_failure = "hang"
        assert await sink.next_call(lambda c: c[1] > 0) == (1.0, 1, 1)
        assert scraper.scrape_failures > failures
        assert scraper.last == PoolSaturation(1.0, 1, 1, 0)
        # It answers again: fresh at once.
        model.restore_metrics()
        assert await sink.next_call(lambda c: c[1] == 0) == (0.0, 0, 1)


@pytest.mark.redis
async def test_an_endpoint_answering_503_goes_stale(
    model_server: ModelServer, clients: Callable[[], Any]
) -> None:
    other = SimulatedModel()
    runner, port = await start_app(other.app())
    try:
        endpoints = [model_server.base_url, f"http://127.0.0.1:{port}"]
        scraper, sink = make_scraper(clients(), {"endpoints": endpoints}, "r1")
        async with running(scraper):
            assert await sink.next_call(lambda c: True) == (0.0, 0, 2)
            other.metrics_failure = "unavailable"
            # One of two endpoints fails closed: (1.0 + 0.0) / 2.
            assert await sink.next_call(lambda c: c[1] > 0) == (0.5, 1, 2)
    finally:
        await runner.cleanup()


@pytest.mark.redis
async def test_hold_last_keeps_a_stale_endpoint_for_the_bound_then_fails_closed(
    model_server: ModelServer, clients: Callable[[], Any]
) -> None:
    params = {
        "endpoints": [model_server.base_url],
        "stalenessPolicy": "holdLast",
        "holdLastFor": "600ms",
    }
    scraper, sink = make_scraper(clients(), params, "r1")
    async with running(scraper):
        await sink.next_call(lambda c: True)
        model_server.model.metrics_failure = "hang"
        held = await sink.next_call(lambda c: c[1] > 0)
        assert held == (0.0, 1, 1) and scraper.last is not None and scraper.last.held == 1
        assert await sink.next_call(lambda c: c[0] == 1.0) == (1.0, 1, 1)
        assert scraper.last.held == 0
        model_server.model.restore_metrics()


@pytest.mark.redis
async def test_three_scrapers_share_one_lease_and_another_takes_over_within_a_second(
    model_server: ModelServer, clients: Callable[[], Any]
) -> None:
    params = {"endpoints": [model_server.base_url]}
    made = [make_scraper(clients(), params, f"r{i}") for i in (1, 2, 3)]
    scrapers = [s for s, _ in made]
    sinks = dict(made)
    async with running(*scrapers) as tasks:
        # Twenty samples' worth of time: exactly one scraper scraped, the others stood by.
        await eventually(lambda: sum(len(s.calls) for s in sinks.values()) >= 20)
        active = [s for s in scrapers if s.rounds > 0]
        assert len(active) == 1
        (holder,) = active
        assert model_server.model.metrics_scrapes == holder.scrapes == holder.rounds
        # The holder dies (stops without releasing): another one takes over within a second.
        tasks[holder].cancel()
        await asyncio.gather(tasks[holder], return_exceptions=True)
        died = time.monotonic()
        others = [s for s in scrapers if s is not holder]
        waits = [asyncio.create_task(sinks[s].next_call(lambda c: True)) for s in others]
        done, pending = await asyncio.wait(waits, timeout=3.0, return_when="FIRST_COMPLETED")
        took_over = time.monotonic() - died
        for w in pending:
            w.cancel()
        assert done, "nobody took over"
        assert took_over < 1.0
        # Still one at a time: of the two left, one scrapes.
        await eventually(lambda: sum(s.rounds for s in others) >= 10)
        assert len([s for s in others if s.rounds > 0]) == 1
        (successor,) = (s for s in others if s.rounds > 0)
        # A graceful stop releases the lease: the last one takes over within a few rounds.
        tasks[successor].cancel()
        await asyncio.gather(tasks[successor], return_exceptions=True)
        await successor.lease.release()
        released = time.monotonic()
        (last,) = (s for s in others if s is not successor)
        await sinks[last].next_call(lambda c: True, timeout=3.0)
        assert time.monotonic() - released < 0.3


@pytest.mark.redis
async def test_the_loop_survives_a_failing_sink_and_an_unreachable_redis(
    model_server: ModelServer,
) -> None:
    calls: list[Call] = []
    failed = asyncio.Event()

    async def flaky_sink(saturation: float, stale: int, endpoints: int) -> None:
        calls.append((saturation, stale, endpoints))
        if len(calls) == 1:
            failed.set()
            raise RuntimeError("the store is down")

    settings = DetectorSettings.from_parameters({"endpoints": [model_server.base_url]})
    dead = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.05)
    live_server = RedisProcess().start()
    live = aioredis.from_url(live_server.url)
    try:
        down = Scraper(
            settings, endpoint_source(settings.endpoints), ScrapeLease(dead, POOL, "r1"), flaky_sink
        )
        up = Scraper(
            settings, endpoint_source(settings.endpoints), ScrapeLease(live, POOL, "r2"), flaky_sink
        )
        async with running(down, up):
            await asyncio.wait_for(failed.wait(), 5.0)
            await eventually(lambda: len(calls) >= 3 and down.loop_errors >= 3)
        assert up.loop_errors >= 1  # the sink's error, logged; the loop went on
        assert down.rounds == 0  # never held the lease without Redis
    finally:
        await dead.aclose()
        await live.aclose()
        live_server.stop()
