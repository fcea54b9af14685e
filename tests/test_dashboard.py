"""The Grafana dashboard and the alert rules query only series a running sidecar really exports.

A real ``admission-sidecar serve`` process (on a real Redis, so that Redis can fail) gets traffic
that produces every series the dashboard and the rules use: dispatched and TTL-evicted requests,
then, with Redis killed, store errors, an open circuit breaker and fail-open decisions. Its live
/metrics is read after each phase, and every PromQL expression of deploy/grafana/, of
k8s/base/prometheusrule.yaml and of the autoscaling rule in k8s/README.md is checked against it:
each expression must parse (promql-parser, a PromQL parser), each metric name must be exported,
each label it matches or groups by must exist on that metric, and each label value it matches
exactly must have been seen. The only series from elsewhere are listed in EXTERNAL, with their
source.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import promql_parser as promql
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sidecar.simulator import SimulatedModel, start_app
from tests.http_harness import eventually
from tests.redis_proc import RedisProcess
from tests.test_serve_processes import Replica

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
RULES = ROOT / "k8s" / "base" / "prometheusrule.yaml"
NOTES = ROOT / "k8s" / "README.md"
JOB = "admission-sidecar"  # servicemonitor.yaml's jobLabel value; tests/test_deploy_files.py
# Labels Prometheus puts on every series it scrapes through a ServiceMonitor (target labels).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}
# Series the rules read from other exporters, with the labels they have there.
EXTERNAL: dict[str, dict[str, set[str] | None]] = {
    # Prometheus itself: 1 when the last scrape of a target succeeded.
    "up": {},
    # kube-state-metrics (kube-prometheus-stack installs it).
    "kube_pod_status_ready": {"condition": {"true", "false", "unknown"}, "uid": None},
}
# Grafana's variables, as Grafana would substitute them.
VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "${datasource}": "prometheus"}


# --- what an expression queries, from its syntax tree -------------------------------------------


@dataclass
class Query:
    """What one PromQL expression reads: metric -> matchers, plus the labels it groups by."""

    matchers: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    grouping: set[str] = field(default_factory=set)

    def visit(self, node: object) -> None:
        if isinstance(node, promql.VectorSelector):
            assert node.name, f"a selector without a metric name: {node}"
            self.matchers.setdefault(node.name, []).extend(
                (m.name, OPS[str(m.op)], m.value) for m in node.matchers.matchers
            )
        elif isinstance(node, promql.AggregateExpr) and node.modifier is not None:
            self.grouping |= set(node.modifier.labels)
        elif isinstance(node, promql.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                self.grouping |= set(node.modifier.matching.labels)
            self.grouping |= set(node.modifier.group_labels or ())


# MatchOp is not hashable: its str() is "MatchOp.Equal" and so on.
OPS = {"MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~", "MatchOp.NotRe": "!~"}


def parse(expr: str) -> Query:
    """The selectors and grouping labels of ``expr``; a syntax error raises ValueError."""
    for variable, value in VARIABLES.items():
        expr = expr.replace(variable, value)
    query = Query()
    # Grafana's label_values(selector, label) variable query: not PromQL, but made of it.
    if found := re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", expr, re.DOTALL):
        expr, label = found.groups()
        query.grouping.add(label)
    promql.walk(promql.parse(expr), query.visit)
    return query


def test_reader_names_metrics_labels_and_values() -> None:
    query = parse(
        'sum by (le, script) (rate(a_bucket{job="x", script=~"e.*"}[$__rate_interval])) / '
        "max(b offset 1h) > 0 and on (pod) up"
    )
    assert query.matchers == {
        "a_bucket": [("job", "=", "x"), ("script", "=~", "e.*")],
        "b": [],
        "up": [],
    }
    assert query.grouping == {"le", "script", "pod"}
    with pytest.raises(ValueError, match="parenthesis"):
        parse("sum by (le (a)")


# --- what the sidecar exports -------------------------------------------------------------------


@dataclass
class Exported:
    """Sample names of a /metrics page, with the labels and label values each carries."""

    labels: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    values: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))

    def add(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.labels[sample.name] |= set(sample.labels)
                for label, value in sample.labels.items():
                    self.values[(sample.name, label)].add(value)

    def problems(self, expr: str) -> list[str]:
        """Why ``expr`` would query something that does not exist; empty if it would not."""
        query = parse(expr)
        found: list[str] = []
        known: set[str] = set(TARGET_LABELS)
        for metric, matchers in query.matchers.items():
            external = EXTERNAL.get(metric)
            if external is None and metric not in self.labels:
                found.append(f"metric {metric} is not exported")
                continue
            labels = set(external) if external is not None else self.labels[metric]
            known |= labels
            for label, op, value in matchers:
                if label not in labels | TARGET_LABELS:
                    found.append(f"{metric} has no label {label}")
                elif op == "=" and "$" not in value:
                    seen = self._values(metric, label, external)
                    if seen is not None and value not in seen:
                        found.append(f'{metric}{{{label}="{value}"}} never seen: {sorted(seen)}')
        found += [f"grouping by {label}: no such label" for label in query.grouping - known]
        return found

    def _values(
        self, metric: str, label: str, external: dict[str, set[str] | None] | None
    ) -> set[str] | None:
        if label == "job":
            return {JOB}
        if label in TARGET_LABELS:
            return None  # set by the cluster, not known here
        if external is not None:
            return external.get(label)
        return self.values[(metric, label)]


# --- the expressions under test -----------------------------------------------------------------


def _dashboard_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if (key == "expr" and isinstance(value, str)) or (
                key == "query" and isinstance(value, str) and value.startswith("label_values(")
            ):
                yield value
            else:
                yield from _dashboard_exprs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _dashboard_exprs(value)


def dashboard_exprs() -> list[tuple[str, str]]:
    return [
        (path.name, expr)
        for path in DASHBOARDS
        for expr in _dashboard_exprs(json.loads(path.read_text()))
    ]


def rule_exprs() -> list[tuple[str, str]]:
    (rule,) = [d for d in yaml.safe_load_all(RULES.read_text()) if d]
    return [
        (r.get("alert") or r["record"], r["expr"])
        for group in rule["spec"]["groups"]
        for r in group["rules"]
    ]


def adapter_exprs() -> list[tuple[str, str]]:
    """The prometheus-adapter rule k8s/README.md suggests for scaling on queue size, with the
    adapter's template fields filled in as it would."""
    blocks = re.findall(r"```yaml\n(.*?)```", NOTES.read_text(), re.DOTALL)
    rules = [r for b in blocks for d in yaml.safe_load_all(b) if isinstance(d, list) for r in d]
    assert rules, "k8s/README.md shows no prometheus-adapter rule"
    found = []
    for rule in rules:
        series = parse(rule["seriesQuery"])
        (metric,) = series.matchers
        filled = rule["metricsQuery"].replace("<<.Series>>", metric)
        filled = filled.replace("<<.LabelMatchers>>", 'namespace="default"')
        found += [("adapter seriesQuery", rule["seriesQuery"]), ("adapter metricsQuery", filled)]
    return found


def test_dashboard_and_rules_cover_what_operators_watch() -> None:
    assert DASHBOARDS, "no dashboard in deploy/grafana/"
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        titles = [p["title"] for p in dashboard["panels"] if p["type"] != "row"]
        assert len(titles) == len(set(titles)), f"{path.name}: two panels share a title"
        for panel in dashboard["panels"]:
            if panel["type"] != "row":
                assert panel["targets"] and panel["description"], panel["title"]
    exprs = " ".join(e for _, e in dashboard_exprs())
    for metric in (
        "llm_d_epp_flow_control_queue_size",
        "llm_d_epp_flow_control_request_queue_duration_seconds_bucket",
        "admission_sidecar_workload_average_wait_seconds",
        "llm_d_epp_flow_control_requests_total",
        "llm_d_epp_flow_control_pool_saturation",
        "admission_sidecar_pool_inflight_requests",
        "admission_sidecar_redis_script_duration_seconds_bucket",
        "admission_sidecar_redis_errors_total",
        "admission_sidecar_redis_circuit_open",
        "admission_sidecar_failure_mode_decisions_total",
    ):
        assert metric in exprs, f"no panel shows {metric}"
    alerts = {name for name, _ in rule_exprs()}
    assert {
        "AdmissionPoolSaturated",
        "AdmissionEvictedTTLRising",
        "AdmissionRedisCircuitOpen",
        "AdmissionRedisErrors",
        "AdmissionSidecarReplicaNotReady",
    } <= alerts


# --- against a live serve ------------------------------------------------------------------------

CONFIG = """
saturationDetector: {parameters: {maxConcurrency: 1}}
flowControl: {maxRequests: 100, defaultRequestTTL: 30s}
redis: {failureMode: open, timeout: 200ms, heartbeatInterval: 200ms, maintenanceInterval: 200ms}
"""


async def queue_size_shown(session: aiohttp.ClientSession, admin: int) -> bool:
    async with session.get(f"http://127.0.0.1:{admin}/metrics") as r:
        return "\nllm_d_epp_flow_control_queue_size{" in await r.text()


@pytest.fixture
async def live_metrics(tmp_path: Path) -> AsyncIterator[Exported]:
    """/metrics of a real serve: after normal traffic, then after Redis went away."""
    model = SimulatedModel(latency_s=0.01)
    runner, port = await start_app(model.app())
    redis = RedisProcess().start()
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    replica = Replica(redis.url, f"http://127.0.0.1:{port}", config, "dash")
    exported = Exported()
    try:
        async with aiohttp.ClientSession() as session:
            await replica.ready(session)

            async def send(workload: str, **headers: str) -> int:
                sent = {"x-workload-id": workload, **headers}
                async with session.post(
                    f"{replica.url}/v1/chat/completions", json={}, headers=sent
                ) as r:
                    await r.read()
                    return r.status

            async def scrape() -> None:
                async with session.get(f"http://127.0.0.1:{replica.admin}/metrics") as r:
                    assert r.status == 200
                    exported.add(await r.text())

            assert [await send(w) for w in ("chat", "batch", "chat")] == [200, 200, 200]
            # The only slot held: a request that may wait 100 ms is evicted after its TTL.
            model.gate = asyncio.Event()
            held = asyncio.create_task(send("chat"))
            await eventually(lambda: len(model.arrivals) == 4)
            assert await send("batch", **{"x-llm-d-inference-ttl": "100ms"}) == 429
            # One request queued while the pool-wide queue gauges are scraped.
            queued = asyncio.create_task(send("batch"))
            await eventually(lambda: queue_size_shown(session, replica.admin))
            await scrape()
            model.gate.set()
            assert [await held, await queued] == [200, 200]

            # Redis gone, failureMode open: forwarded unadmitted, then the breaker opens.
            redis.kill()
            assert [await send("chat") for _ in range(5)] == [200] * 5
            await scrape()
            yield exported
    finally:
        replica.stop()
        redis.kill()
        if model.gate is not None:
            model.gate.set()
        await runner.cleanup()


@pytest.mark.redis
async def test_every_query_reads_exported_series(live_metrics: Exported) -> None:
    # The traffic above produced what the queries select on (a sanity check of the fixture).
    assert "EvictedTTL" in live_metrics.values[("llm_d_epp_flow_control_requests_total", "outcome")]
    assert "open" in live_metrics.values[("admission_sidecar_failure_mode_decisions_total", "mode")]
    problems = {
        f"{where}: {expr.strip()}": found
        for where, expr in [*dashboard_exprs(), *rule_exprs(), *adapter_exprs()]
        if (found := live_metrics.problems(expr))
    }
    assert not problems, json.dumps(problems, indent=2)


@pytest.mark.redis
async def test_a_wrong_name_label_or_value_is_caught(live_metrics: Exported) -> None:
    assert live_metrics.problems("rate(llm_d_epp_flow_control_request_total[5m])") == [
        "metric llm_d_epp_flow_control_request_total is not exported"
    ]
    assert live_metrics.problems('admission_sidecar_redis_circuit_open{script="x"}') == [
        "admission_sidecar_redis_circuit_open has no label script"
    ]
    (wrong_value,) = live_metrics.problems(
        'llm_d_epp_flow_control_requests_total{outcome="evicted_ttl"}'
    )
    assert "never seen" in wrong_value
    assert live_metrics.problems("sum by (workload_id) (llm_d_epp_flow_control_queue_size)") == [
        "grouping by workload_id: no such label"
    ]
