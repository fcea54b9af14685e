"""Reading "requests waiting" and "KV-cache utilisation" off each model server's /metrics page."""

from __future__ import annotations

import pytest

from sidecar.simulator import GPU_CACHE_USAGE, SimulatedModel
from sidecar.telemetry.dialects import DIALECTS, SGLANG, TGI, VLLM, dialect
from sidecar.telemetry.parse import MetricsParseError, ParsedMetrics, parse_metrics

# As vLLM's V1 engine writes it with two data-parallel engines (vllm/v1/metrics/loggers.py):
# per-engine series, histograms and counters between the gauges, both KV gauges.
VLLM_PAGE = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 9637.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 4.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 4.0
# HELP vllm:gpu_cache_usage_perc {gpu_help}
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.25
vllm:gpu_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.5
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.3
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.6
# HELP vllm:request_queue_time_seconds Histogram of time spent in WAITING phase for request.
# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_bucket{engine="0",le="0.3",model_name="m"} 12.0
vllm:request_queue_time_seconds_bucket{engine="0",le="+Inf",model_name="m"} 15.0
vllm:request_queue_time_seconds_count{engine="0",model_name="m"} 15.0
vllm:request_queue_time_seconds_sum{engine="0",model_name="m"} 2.5
""".replace(
    "{gpu_help}",
    # vLLM's help text, its missing space included.
    "GPU KV-cache usage. 1 means 100 percent usage."
    "DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
)

# vLLM's V0 engine (vllm/engine/metrics.py): model_name only, and only the older KV gauge.
VLLM_V0_PAGE = """\
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="facebook/opt-125m"} 2.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="facebook/opt-125m"} 0.42
"""

# SGLang's scheduler gauges (python/sglang/srt/metrics/collector.py); two series each, as two
# schedulers of one server write them (the rank label names here are illustrative).
SGLANG_PAGE = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{dp_rank="0",model_name="qwen/qwen2.5-7b",tp_rank="0"} 8.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{dp_rank="0",model_name="qwen/qwen2.5-7b",tp_rank="0"} 0.71
sglang:token_usage{dp_rank="1",model_name="qwen/qwen2.5-7b",tp_rank="0"} 0.35
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{dp_rank="0",model_name="qwen/qwen2.5-7b",tp_rank="0"} 6.0
sglang:num_queue_reqs{dp_rank="1",model_name="qwen/qwen2.5-7b",tp_rank="0"} 1.0
# HELP sglang:num_queue_reqs_total A look-alike name that must not be counted.
# TYPE sglang:num_queue_reqs_total counter
sglang:num_queue_reqs_total{model_name="qwen/qwen2.5-7b"} 99.0
"""

# TGI's router (metrics-exporter-prometheus; router/src/server.rs): unlabelled gauges, no KV gauge.
TGI_PAGE = """\
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 4
# TYPE tgi_queue_size gauge
tgi_queue_size 9
# TYPE tgi_batch_current_max_tokens gauge
tgi_batch_current_max_tokens 12000
# TYPE tgi_request_queue_duration histogram
tgi_request_queue_duration_bucket{le="0.005"} 0
tgi_request_queue_duration_bucket{le="+Inf"} 40
tgi_request_queue_duration_sum 1.25
tgi_request_queue_duration_count 40
"""


def test_each_dialect_names_the_servers_metrics() -> None:
    assert dialect("vllm") is VLLM and set(DIALECTS) == {"vllm", "sglang", "tgi"}
    assert VLLM.waiting == "vllm:num_requests_waiting"
    assert VLLM.kv_usage == ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    assert (SGLANG.waiting, SGLANG.kv_usage) == ("sglang:num_queue_reqs", ("sglang:token_usage",))
    assert (TGI.waiting, TGI.kv_usage, TGI.has_kv_usage) == ("tgi_queue_size", (), False)
    with pytest.raises(ValueError, match="unknown model server 'triton'"):
        dialect("triton")


def test_vllm_sums_waiting_over_engines_and_takes_the_fullest_cache() -> None:
    assert parse_metrics(VLLM_PAGE, VLLM) == ParsedMetrics(7.0, 0.6, "vllm:kv_cache_usage_perc")


def test_vllm_falls_back_to_the_older_kv_gauge() -> None:
    assert parse_metrics(VLLM_V0_PAGE, VLLM) == ParsedMetrics(2.0, 0.42, GPU_CACHE_USAGE)


def test_vllm_page_of_the_fake_server_parses() -> None:
    page = SimulatedModel(kv_metric_names=(GPU_CACHE_USAGE,)).metrics_text().decode()
    assert parse_metrics(page, VLLM) == ParsedMetrics(0.0, 0.0, GPU_CACHE_USAGE)


def test_sglang_ranks_fold_and_look_alike_names_do_not_count() -> None:
    assert parse_metrics(SGLANG_PAGE, SGLANG) == ParsedMetrics(7.0, 0.71, "sglang:token_usage")


def test_tgi_reads_waiting_only() -> None:
    assert parse_metrics(TGI_PAGE, TGI) == ParsedMetrics(9.0, None, None)


def test_a_missing_metric_reads_none() -> None:
    assert parse_metrics(TGI_PAGE, VLLM) == ParsedMetrics(None, None, None)
    no_kv = VLLM_V0_PAGE.split("# HELP vllm:gpu_cache_usage_perc")[0]
    assert parse_metrics(no_kv, VLLM) == ParsedMetrics(2.0, None, None)
    assert parse_metrics("", SGLANG) == ParsedMetrics(None, None, None)


def test_values_that_are_no_count_are_dropped() -> None:
    page = (
        'vllm:num_requests_waiting{engine="0"} NaN\n'
        'vllm:num_requests_waiting{engine="1"} 2\n'
        'vllm:kv_cache_usage_perc{engine="0"} -0.5\n'
        'vllm:kv_cache_usage_perc{engine="1"} +Inf\n'
    )
    # The new KV gauge has no usable series, and there is no old one: KV usage is missing.
    assert parse_metrics(page, VLLM) == ParsedMetrics(2.0, None, None)
    assert parse_metrics("tgi_queue_size NaN\n", TGI) == ParsedMetrics(None, None, None)


def test_sample_timestamps_are_accepted() -> None:
    assert parse_metrics("tgi_queue_size 3 1700000000000\n", TGI).waiting == 3.0


@pytest.mark.parametrize(
    "page",
    [
        'vllm:num_requests_waiting{engine="0" 3\n',
        "vllm:num_requests_waiting three\n",
        "vllm:num_requests_waiting\n",
    ],
)
def test_a_malformed_page_is_an_error(page: str) -> None:
    with pytest.raises(MetricsParseError):
        parse_metrics(page, VLLM)


def test_malformed_lines_of_other_metrics_do_not_matter() -> None:
    page = "some_other_metric{broken 1\n" + TGI_PAGE
    assert parse_metrics(page, TGI).waiting == 9.0
