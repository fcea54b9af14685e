"""What each model server calls "requests waiting" and "KV-cache utilisation" on its /metrics.

A dialect names the one gauge whose samples count the requests queued inside the server and the
gauges, tried in order, whose samples give the fraction (0..1) of its KV cache in use. The names
are llm-d's model-server protocol mapping (llm-d/llm-d-router, docs/plugin-metric-protocol.md and
``defaultEngineConfigs`` in pkg/epp/framework/plugins/datalayer/extractor/metrics/factories.go),
each checked against the server's own source:

- vLLM (vllm-project/vllm, vllm/v1/metrics/loggers.py, ``PrometheusStatLogger``: gauges labelled
  ``model_name`` and ``engine``, one series per data-parallel engine; the V0 engine's
  vllm/engine/metrics.py has the same names labelled ``model_name`` only):
  ``vllm:num_requests_waiting``; ``vllm:kv_cache_usage_perc`` ("KV-cache usage. 1 means 100
  percent usage."), with the older ``vllm:gpu_cache_usage_perc`` as fallback: the V0 engine's
  only KV gauge, still written beside the new one by V1 ("Deprecated in 0.9 - Renamed as
  vllm:kv_cache_usage_perc", later hidden behind --show-hidden-metrics-for-version). llm-d lists
  only the new name; the fallback keeps older servers from reading as "missing" (and so failing
  closed forever).
- SGLang (sgl-project/sglang, python/sglang/srt/metrics/collector.py,
  ``SchedulerMetricsCollector``: gauges labelled with whatever labels the scheduler passes,
  ``model_name`` among them): ``sglang:num_queue_reqs`` ("The number of requests in the
  waiting queue."), ``sglang:token_usage`` (the used fraction of the KV token pool, which llm-d
  reads as KV-cache utilisation).
- TGI (huggingface/text-generation-inference, backends/v3/src/queue.rs and backends/v2/src/
  queue.rs set ``tgi_queue_size``; router/src/server.rs ``describe_gauge!``; docs/source/
  reference/metrics.md): ``tgi_queue_size`` ("Current queue size"), unlabelled. TGI exports no
  KV-cache utilisation gauge (its gauges are ``tgi_queue_size``, ``tgi_batch_current_size``,
  ``tgi_batch_current_max_tokens``, ``tgi_batch_max_total_tokens``), and llm-d's protocol lists
  no TGI mapping. The TGI dialect is therefore waiting-only: an endpoint scores
  ``waiting / queueDepthThreshold`` and ``kvCacheUtilThreshold`` plays no part.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Dialect:
    """The metric names of one model server."""

    name: str
    waiting: str
    # Tried in order; the first one present gives the value. Empty: the server has no KV gauge.
    kv_usage: tuple[str, ...]

    @property
    def has_kv_usage(self) -> bool:
        return bool(self.kv_usage)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return (self.waiting, *self.kv_usage)


VLLM = Dialect(
    "vllm",
    waiting="vllm:num_requests_waiting",
    kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
)
SGLANG = Dialect("sglang", waiting="sglang:num_queue_reqs", kv_usage=("sglang:token_usage",))
TGI = Dialect("tgi", waiting="tgi_queue_size", kv_usage=())

# Config values (``modelServer``), named as llm-d names its engine types where it has one.
DIALECTS: dict[str, Dialect] = {d.name: d for d in (VLLM, SGLANG, TGI)}
DEFAULT_DIALECT = VLLM.name


def dialect(name: str) -> Dialect:
    """The dialect configured as ``name``; ValueError names the known ones."""
    try:
        return DIALECTS[name]
    except KeyError:
        raise ValueError(f"unknown model server {name!r}; known: {', '.join(DIALECTS)}") from None
