"""The simulated model server's vLLM-format /metrics: names, types and labels as vLLM writes them,
and values that follow the requests really waiting and running inside it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sidecar.simulator import (
    GPU_CACHE_USAGE,
    KV_CACHE_USAGE,
    RUNNING,
    WAITING,
    SimulatedModel,
    start_app,
)
from sidecar.tokens import TokenEstimator
from tests.http_harness import eventually

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
LABELS = {"model_name": MODEL, "engine": "0"}
# ceil(396 / 4) + 4 (one message) prompt tokens + 97 completion tokens = 200 estimated tokens.
BODY_200_TOKENS = {"messages": [{"role": "user", "content": "x" * 396}], "max_tokens": 97}


@dataclass
class Server:
    model: SimulatedModel
    session: aiohttp.ClientSession
    url: str

    async def page(self) -> tuple[str, str]:
        async with self.session.get(f"{self.url}/metrics") as r:
            assert r.status == 200
            return r.headers["Content-Type"], await r.text()

    async def gauges(self) -> dict[str, float]:
        """Each family of /metrics by name, with its one sample's value; checks type and labels."""
        _, text = await self.page()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            assert family.type == "gauge", family.name
            (sample,) = family.samples
            assert sample.name == family.name and sample.labels == LABELS
            values[family.name] = sample.value
        return values

    def post(self, body: dict[str, Any] = BODY_200_TOKENS) -> asyncio.Task[int]:
        async def send() -> int:
            async with self.session.post(f"{self.url}/v1/chat/completions", json=body) as r:
                await r.read()
                return r.status

        return asyncio.create_task(send())


@asynccontextmanager
async def serving(
    model: SimulatedModel, *, cancel_on_disconnect: bool = False
) -> AsyncIterator[Server]:
    if cancel_on_disconnect:
        # As a real server does when a client goes away; start_app keeps aiohttp's default (off).
        runner = web.AppRunner(model.app(), access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = int(runner.addresses[0][1])
    else:
        runner, port = await start_app(model.app())
    try:
        async with aiohttp.ClientSession() as session:
            yield Server(model, session, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def release_running(model: SimulatedModel) -> None:
    """Lets the requests now held at the gate finish, and holds the next ones again."""
    assert model.gate is not None
    model.gate.set()
    model.gate.clear()


def finished_count(model: SimulatedModel, n: int) -> Callable[[], bool]:
    return lambda: len(model.finished) == n


def gated(**kwargs: Any) -> SimulatedModel:
    return SimulatedModel(latency_s=0, model_name=MODEL, gate=asyncio.Event(), **kwargs)


async def test_the_page_has_vllms_names_types_help_and_labels() -> None:
    async with serving(SimulatedModel(model_name=MODEL)) as server:
        content_type, text = await server.page()
        assert content_type.startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert set(families) == {RUNNING, WAITING, KV_CACHE_USAGE, GPU_CACHE_USAGE}
        assert families[RUNNING].documentation == "Number of requests in model execution batches."
        assert families[WAITING].documentation == "Number of requests waiting to be processed."
        assert (
            families[KV_CACHE_USAGE].documentation == "KV-cache usage. 1 means 100 percent usage."
        )
        assert "DEPRECATED" in families[GPU_CACHE_USAGE].documentation
        for name in families:
            assert f"# TYPE {name} gauge\n" in text
        assert await server.gauges() == dict.fromkeys(families, 0.0)
        assert server.model.metrics_scrapes == 2


async def test_waiting_running_and_kv_follow_the_load_and_drain_to_zero() -> None:
    model = gated(batch_slots=2, kv_capacity_tokens=1000)
    async with serving(model) as server:
        clients = [server.post() for _ in range(5)]
        await eventually(lambda: model.waiting == 3)
        assert await server.gauges() == {
            RUNNING: 2,
            WAITING: 3,
            KV_CACHE_USAGE: 0.4,
            GPU_CACHE_USAGE: 0.4,
        }
        for finished, running, waiting in [(2, 2, 1), (4, 1, 0), (5, 0, 0)]:
            release_running(model)
            await eventually(finished_count(model, finished))
            kv = running * 200 / 1000
            assert await server.gauges() == {
                RUNNING: running,
                WAITING: waiting,
                KV_CACHE_USAGE: kv,
                GPU_CACHE_USAGE: kv,
            }
        assert await asyncio.gather(*clients) == [200] * 5
        assert model.peak == 5 and model.running_tokens == 0


async def test_a_request_waits_for_room_in_the_kv_cache_even_with_a_slot_free() -> None:
    model = gated(batch_slots=8, kv_capacity_tokens=500)
    async with serving(model) as server:
        clients = [server.post() for _ in range(3)]
        await eventually(lambda: model.waiting == 1)
        # Two requests of 200 tokens fit in 500; the third would not.
        assert (await server.gauges())[RUNNING] == 2
        release_running(model)
        await eventually(lambda: len(model.finished) == 2)
        assert await server.gauges() == {
            RUNNING: 1,
            WAITING: 0,
            KV_CACHE_USAGE: 0.4,
            GPU_CACHE_USAGE: 0.4,
        }
        release_running(model)
        assert await asyncio.gather(*clients) == [200] * 3


async def test_a_request_larger_than_the_cache_runs_alone_and_usage_stops_at_one() -> None:
    model = gated(batch_slots=4, kv_capacity_tokens=100)
    async with serving(model) as server:
        clients = [server.post(), server.post()]
        await eventually(lambda: model.running == 1 and model.waiting == 1)
        assert (await server.gauges())[KV_CACHE_USAGE] == 1.0
        release_running(model)
        await eventually(lambda: len(model.finished) == 1 and model.running == 1)
        release_running(model)
        assert await asyncio.gather(*clients) == [200, 200]
        assert (await server.gauges())[KV_CACHE_USAGE] == 0.0


async def test_without_batch_slots_nothing_waits_and_kv_counts_every_request() -> None:
    model = gated(kv_capacity_tokens=16_000)
    async with serving(model) as server:
        clients = [server.post() for _ in range(4)]
        await eventually(lambda: model.running == 4)
        assert await server.gauges() == {
            RUNNING: 4,
            WAITING: 0,
            KV_CACHE_USAGE: 800 / 16_000,
            GPU_CACHE_USAGE: 800 / 16_000,
        }
        release_running(model)
        assert await asyncio.gather(*clients) == [200] * 4


async def test_the_estimate_comes_from_the_configured_estimator() -> None:
    estimator = TokenEstimator(default_completion_tokens=50)
    model = gated(batch_slots=1, kv_capacity_tokens=1000, token_estimator=estimator)
    async with serving(model) as server:
        # No max_tokens: 1 + 4 prompt tokens + the default 50.
        client = server.post({"messages": [{"role": "user", "content": "abcd"}]})
        await eventually(lambda: model.running == 1)
        assert model.running_tokens == 55
        release_running(model)
        assert await client == 200


async def test_a_client_that_leaves_while_waiting_gives_its_place_up() -> None:
    model = gated(batch_slots=1)
    async with serving(model, cancel_on_disconnect=True) as server:
        first = server.post()
        await eventually(lambda: model.running == 1)
        leaver = server.post()
        await eventually(lambda: model.waiting == 1)
        leaver.cancel()
        await eventually(lambda: model.waiting == 0)
        third = server.post()
        await eventually(lambda: model.waiting == 1)
        release_running(model)
        await eventually(lambda: len(model.finished) == 1 and model.running == 1)
        release_running(model)
        assert [await first, await third] == [200, 200]
        assert model.running == 0 and model.running_tokens == 0 and len(model.finished) == 2


async def test_a_hanging_metrics_endpoint_answers_once_restored() -> None:
    model = SimulatedModel(model_name=MODEL, metrics_failure="hang")
    async with serving(model) as server:
        scrape = asyncio.create_task(server.page())
        await eventually(lambda: model.metrics_scrapes == 1)
        await asyncio.sleep(0)
        assert not scrape.done()
        model.restore_metrics()
        content_type, _ = await scrape
        assert content_type.startswith("text/plain")
        assert (await server.gauges())[RUNNING] == 0


async def test_a_scrape_left_hanging_is_answered_503_at_shutdown() -> None:
    model = SimulatedModel(model_name=MODEL, metrics_failure="hang")
    runner, port = await start_app(model.app())
    async with aiohttp.ClientSession() as session:

        async def status() -> int:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
                return r.status

        scrape = asyncio.create_task(status())
        await eventually(lambda: model.metrics_scrapes == 1)
        await runner.cleanup()
        assert await scrape == 503


async def test_an_unavailable_metrics_endpoint_answers_503_until_restored() -> None:
    model = SimulatedModel(model_name=MODEL, metrics_failure="unavailable")
    async with serving(model) as server:
        async with server.session.get(f"{server.url}/metrics") as r:
            assert r.status == 503
        model.restore_metrics()
        assert (await server.gauges())[WAITING] == 0
        assert model.metrics_scrapes == 2


@pytest.mark.parametrize("names", [(KV_CACHE_USAGE,), (GPU_CACHE_USAGE,)])
async def test_the_page_can_carry_one_kv_name_as_newer_or_older_vllm_does(
    names: tuple[str, ...],
) -> None:
    async with serving(SimulatedModel(model_name=MODEL, kv_metric_names=names)) as server:
        assert set(await server.gauges()) == {RUNNING, WAITING, *names}


def test_an_unknown_kv_metric_name_is_refused() -> None:
    with pytest.raises(ValueError, match="vllm:kv_cache_usage"):
        SimulatedModel(kv_metric_names=("vllm:kv_cache_usage",))
