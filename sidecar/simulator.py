"""A simulated OpenAI-compatible model server, for the demo, tests and benchmarks.

``/v1/chat/completions`` and ``/v1/completions`` answer after ``latency_s`` (plus a per-token delay
when streaming, as SSE ``data:`` chunks ending with ``data: [DONE]``); anything else echoes a small
JSON body. It records the order requests arrive in and the peak number served at once, and it can
make requests wait on a gate so a test decides when they finish.

``GET /metrics`` serves vLLM-format Prometheus gauges whose values follow the server's real load:
with ``batch_slots`` set, at most that many requests run at once and the rest wait inside the
server, first come first served; a request also waits while its estimated tokens
(sidecar/tokens.py) do not fit in the KV cache beside the running ones (as vLLM's scheduler waits
for free KV blocks; a request alone always runs). KV usage is the running requests' estimated
tokens (prompt plus the whole completion budget, held from start to end) over
``kv_capacity_tokens``, clamped to 1. ``metrics_failure`` makes /metrics hang or answer 503, as a
dead or broken endpoint does.

The names, types and labels are vLLM's own (vllm-project/vllm, vllm/v1/metrics/loggers.py,
``PrometheusStatLogger``: gauges with ``labelnames = ["model_name", "engine"]``, valued the served
model name and the engine index, here "0"; help texts after the ones there):

    vllm:num_requests_running   gauge  requests in model execution batches
    vllm:num_requests_waiting   gauge  requests waiting to be processed
    vllm:kv_cache_usage_perc    gauge  KV-cache usage, 0..1 ("1 means 100 percent usage")
    vllm:gpu_cache_usage_perc   gauge  the same value under the older name: the only one before
                                       vLLM 0.9.2 (and in vllm/engine/metrics.py of the V0
                                       engine, whose series carry model_name only), deprecated in
                                       0.9.2, hidden behind --show-hidden-metrics-for-version in
                                       0.11, to be removed in 0.12 (so say loggers.py's comments)

Other servers' equivalents, for the detector's dialects (none of which this server speaks):

- SGLang (python/sglang/srt/metrics/collector.py, ``SchedulerMetricsCollector``; gauges labelled
  ``model_name``, newer versions add ``engine_type`` and rank labels): ``sglang:num_queue_reqs``
  (waiting), ``sglang:num_running_reqs`` (running), ``sglang:token_usage`` (the used fraction of
  the KV token pool; llm-d reads it as KV-cache utilisation).
- TGI (router/src/server.rs ``describe_gauge!``, backends/v3/src/queue.rs and backend.rs;
  docs/source/reference/metrics.md): ``tgi_queue_size`` (waiting), ``tgi_batch_current_size``
  (running), ``tgi_batch_current_max_tokens`` (token budget of the current batch); TGI exports no
  KV-cache utilisation gauge.
- llm-d's model-server protocol (llm-d/llm-d-router docs/plugin-metric-protocol.md and
  pkg/epp/framework/plugins/datalayer/extractor/metrics/factories.go) maps TotalQueuedRequests /
  TotalRunningRequests / KVCacheUtilization to ``vllm:num_requests_waiting`` /
  ``vllm:num_requests_running`` / ``vllm:kv_cache_usage_perc`` and to ``sglang:num_queue_reqs`` /
  ``sglang:num_running_reqs`` / ``sglang:token_usage`` (also trtllm-serve and Triton TensorRT-LLM
  names); it lists no TGI mapping.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from sidecar.tokens import TokenEstimator

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
GPU_CACHE_USAGE = "vllm:gpu_cache_usage_perc"  # the older name of KV_CACHE_USAGE
_HELP = {
    RUNNING: "Number of requests in model execution batches.",
    WAITING: "Number of requests waiting to be processed.",
    KV_CACHE_USAGE: "KV-cache usage. 1 means 100 percent usage.",
    GPU_CACHE_USAGE: (
        "GPU KV-cache usage. 1 means 100 percent usage. "
        "DEPRECATED: Use vllm:kv_cache_usage_perc instead."
    ),
}
# "hang": /metrics never answers (until restore_metrics()); "unavailable": it answers 503.
MetricsFailure = Literal["hang", "unavailable"]


class ChatRequest(msgspec.Struct):
    model: str = "sim"
    stream: bool = False
    max_tokens: int = 8


@dataclass
class Arrival:
    """One request as the upstream saw it."""

    path: str
    headers: dict[str, str]
    at: float
    concurrent: int


@dataclass(eq=False)
class _Waiter:
    """A request waiting inside the server for a batch slot and room in the KV cache."""

    tokens: int
    started: asyncio.Future[None]


@dataclass
class SimulatedModel:
    latency_s: float = 0.2
    token_delay_s: float = 0.02
    arrivals: list[Arrival] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    in_flight: int = 0
    peak: int = 0
    # When set, requests wait for it after arriving (tests release them by hand).
    gate: asyncio.Event | None = None
    on_arrival: Callable[[Arrival], Awaitable[None]] | None = None
    # When set, a streamed response is cut (connection aborted) after this many chunks: a model
    # server dying mid-response.
    fail_after_chunks: int | None = None
    # The model_name label of /metrics (vLLM's served model name).
    model_name: str = "sim"
    # Requests run at once; the rest wait inside the server. None: every request runs at once and
    # none waits (nor for KV room), the plain pass-through the other tests rely on.
    batch_slots: int | None = None
    # KV cache size in tokens; usage = estimated tokens of running requests / this.
    kv_capacity_tokens: int = 16_384
    token_estimator: TokenEstimator = field(default_factory=TokenEstimator)
    # Which KV gauges /metrics carries: both, as vLLM 0.9.2 to 0.11 did, or one of them.
    kv_metric_names: tuple[str, ...] = (KV_CACHE_USAGE, GPU_CACHE_USAGE)
    metrics_failure: MetricsFailure | None = None
    # GET /metrics received, answered or not.
    metrics_scrapes: int = 0
    # Estimated tokens (sidecar/tokens.py) of the requests inside the server, and their peak.
    tokens_in_flight: int = 0
    peak_tokens: int = 0
    # Requests holding a batch slot, and their estimated tokens.
    running: int = 0
    running_tokens: int = 0
    _waiters: deque[_Waiter] = field(default_factory=deque, init=False, repr=False)
    _restored: asyncio.Event | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        unknown = set(self.kv_metric_names) - {KV_CACHE_USAGE, GPU_CACHE_USAGE}
        if unknown:
            raise ValueError(f"unknown KV metric names: {sorted(unknown)}")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completion)
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        app.on_shutdown.append(self._release_hung_scrapes)
        return app

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def kv_cache_usage(self) -> float:
        return min(1.0, self.running_tokens / max(1, self.kv_capacity_tokens))

    def restore_metrics(self) -> None:
        """/metrics answers again, including the scrapes left hanging."""
        self.metrics_failure = None
        if self._restored is not None:
            self._restored.set()
            self._restored = None

    def metrics_text(self) -> bytes:
        """The /metrics page as it reads now."""
        registry = CollectorRegistry(auto_describe=True)
        registry.register(_VllmGauges(self))
        return generate_latest(registry)

    async def _metrics(self, request: web.Request) -> web.Response:
        self.metrics_scrapes += 1
        if self.metrics_failure == "hang":
            if self._restored is None:
                self._restored = asyncio.Event()
            await self._restored.wait()
        if self.metrics_failure is not None:
            # "unavailable", or a hang ended by shutdown rather than by restore_metrics().
            return web.Response(status=503, text="metrics unavailable")
        return web.Response(
            body=self.metrics_text(), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4}
        )

    async def _release_hung_scrapes(self, app: web.Application) -> None:
        # A hanging handler would hold the runner's cleanup for its whole shutdown timeout.
        if self._restored is not None:
            self._restored.set()
            self._restored = None

    def _fits(self, tokens: int) -> bool:
        if self.batch_slots is None:
            return True
        if self.running >= self.batch_slots:
            return False
        return self.running == 0 or self.running_tokens + tokens <= self.kv_capacity_tokens

    def _start(self, tokens: int) -> None:
        self.running += 1
        self.running_tokens += tokens

    def _stop(self, tokens: int) -> None:
        self.running -= 1
        self.running_tokens -= tokens
        self._schedule()

    def _schedule(self) -> None:
        # First come first served: a head that does not fit holds back those behind it.
        while self._waiters and self._fits(self._waiters[0].tokens):
            waiter = self._waiters.popleft()
            self._start(waiter.tokens)
            waiter.started.set_result(None)

    async def _run_when_scheduled(self, tokens: int) -> None:
        if not self._waiters and self._fits(tokens):
            self._start(tokens)
            return
        waiter = _Waiter(tokens, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await waiter.started
        except BaseException:
            if waiter.started.done() and not waiter.started.cancelled():
                self._stop(tokens)  # started just as it was cancelled
            else:
                self._waiters.remove(waiter)
                self._schedule()
            raise

    async def _arrive(self, request: web.Request, tokens: int = 0) -> Arrival:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.tokens_in_flight += tokens
        self.peak_tokens = max(self.peak_tokens, self.tokens_in_flight)
        headers = {k.lower(): v for k, v in request.headers.items()}
        arrival = Arrival(request.path, headers, time.monotonic(), self.in_flight)
        self.arrivals.append(arrival)
        if self.on_arrival is not None:
            await self.on_arrival(arrival)
        try:
            await self._run_when_scheduled(tokens)
        except BaseException:
            self.in_flight -= 1  # the client left while the request waited in the server
            self.tokens_in_flight -= tokens
            raise
        try:
            if self.gate is not None:
                await self.gate.wait()
        except BaseException:
            self.in_flight -= 1
            self.tokens_in_flight -= tokens
            self._stop(tokens)
            raise
        return arrival

    def _leave(self, request: web.Request, tokens: int = 0) -> None:
        self.in_flight -= 1
        self.tokens_in_flight -= tokens
        self.finished.append(request.headers.get("x-request-id", ""))
        self._stop(tokens)

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = msgspec.json.decode(raw or b"{}", type=ChatRequest)
        except msgspec.DecodeError:
            return web.json_response({"error": "bad request body"}, status=400)
        tokens = self.token_estimator.total(raw)
        await self._arrive(request, tokens)
        try:
            await asyncio.sleep(self.latency_s)
            if not body.stream:
                return web.json_response(
                    {
                        "id": "cmpl-sim",
                        "object": "chat.completion",
                        "model": body.model,
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": "ok"}}
                        ],
                    }
                )
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i in range(body.max_tokens):
                if i == self.fail_after_chunks and request.transport is not None:
                    request.transport.abort()
                    return response
                chunk = {
                    "id": "cmpl-sim",
                    "choices": [{"index": 0, "delta": {"content": f"t{i} "}}],
                }
                await response.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")
                await asyncio.sleep(self.token_delay_s)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            self._leave(request, tokens)

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        tokens = self.token_estimator.total(body)
        await self._arrive(request, tokens)
        try:
            await asyncio.sleep(self.latency_s)
            return web.json_response(
                {"path": request.path, "method": request.method, "bytes": len(body)}
            )
        finally:
            self._leave(request, tokens)


class _VllmGauges(Collector):
    """The vLLM gauges of one SimulatedModel, read when collected."""

    def __init__(self, model: SimulatedModel) -> None:
        self._model = model

    def collect(self) -> Iterator[Metric]:
        m = self._model
        values = {RUNNING: float(m.running), WAITING: float(m.waiting)}
        values.update(dict.fromkeys(m.kv_metric_names, m.kv_cache_usage))
        for name, value in values.items():
            family = GaugeMetricFamily(name, _HELP[name], labels=["model_name", "engine"])
            family.add_metric([m.model_name, "0"], value)
            yield family


async def start_app(
    app: web.Application, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Serves an app on a free port; returns the runner (cleanup() stops it) and the port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, int(runner.addresses[0][1])
