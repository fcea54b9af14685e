"""Loading and validating the YAML configuration (sidecar/config.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import (
    Config,
    ConfigError,
    FailureMode,
    ResolvedBand,
    load_config,
    load_config_file,
)
from sidecar.outcome import ScriptStatus
from sidecar.policies import (
    FcfsOrdering,
    GlobalStrictFairness,
    RoundRobinFairness,
    WorkloadAwareOrdering,
)
from sidecar.store.pool import encode_config
from tests.conftest import Backend, make_config

# The example of the docs, verbatim: it must keep loading exactly as written.
EXAMPLE = """\
pool: default
strictHeaders: false
flowControl:
  maxRequests: 10000            # all queued requests of the pool; 0 = unlimited
  maxBytes: 1Gi
  defaultRequestTTL: 30s
  maxRequestTTL: 5m
  defaultPriorityBand:
    maxRequests: 5000
    maxBytes: 512Mi
    fairnessPolicy: {type: global-strict-fairness-policy}
    orderingPolicy: {type: workload-aware-ordering-policy}
  priorityBands:
    - priority: 100
      orderingPolicy:
        type: workload-aware-ordering-policy
        parameters: {waitTimeWeight: 0.4, criticalityWeight: 0.4, requestRateWeight: 0.2,
                     maxWaitTimeSeconds: 60, maxRequestRate: 100, agingWeight: 0}
    - priority: -1
      fairnessPolicy: {type: round-robin-fairness-policy}
      orderingPolicy: {type: fcfs-ordering-policy}
saturationDetector:
  type: concurrency-detector
  parameters: {maxConcurrency: 64}
objectives: {premium: 100, batch: -1}
workloadRegistry: {requestRateWindow: 60s, emaAlpha: 0.2, idleTimeout: 5m, maxTracked: 10000}
redis: {failureMode: closed, timeout: 250ms, leaseTimeout: 10s}
"""

# The example's band 100 spells out the reference defaults.
REFERENCE_WEIGHTS = WorkloadAwareOrdering(
    wait_time_weight=0.4,
    criticality_weight=0.4,
    request_rate_weight=0.2,
    max_wait_time_seconds=60.0,
    max_request_rate=100.0,
    aging_weight=0.0,
)


@pytest.fixture
def example() -> Config:
    return load_config(EXAMPLE)


def test_example_pool_limits(example: Config) -> None:
    fc = example.flow_control
    assert example.pool == "default"
    assert example.strict_headers is False
    assert fc.max_requests == 10_000
    assert fc.max_bytes == 1_073_741_824  # 1Gi
    assert fc.default_request_ttl == 30.0
    assert fc.max_request_ttl == 300.0
    assert example.max_concurrency == 64
    assert example.objectives == {"premium": 100, "batch": -1}


def test_example_listed_bands(example: Config) -> None:
    template_caps = {"max_requests": 5000, "max_bytes": 536_870_912}  # 512Mi
    premium = ResolvedBand(
        priority=100, fairness=GlobalStrictFairness(), ordering=REFERENCE_WEIGHTS, **template_caps
    )
    sheddable = ResolvedBand(
        priority=-1, fairness=RoundRobinFairness(), ordering=FcfsOrdering(), **template_caps
    )
    assert example.bands == {100: premium, -1: sheddable}
    assert example.band(100) == premium
    assert example.band(-1) == sheddable


def test_example_unlisted_band_uses_template(example: Config) -> None:
    assert example.band(7) == ResolvedBand(
        priority=7,
        max_requests=5000,
        max_bytes=536_870_912,
        fairness=GlobalStrictFairness(),
        ordering=WorkloadAwareOrdering(),
    )


def test_example_registry_and_redis(example: Config) -> None:
    reg = example.workload_registry
    assert (reg.request_rate_window, reg.ema_alpha, reg.idle_timeout, reg.max_tracked) == (
        60.0,
        0.2,
        300.0,
        10_000,
    )
    r = example.redis
    assert r.url is None
    assert r.failure_mode is FailureMode.CLOSED
    assert r.timeout == 0.25
    assert r.lease_timeout == 10.0


def test_example_same_from_bytes_and_mapping(example: Config) -> None:
    assert load_config(EXAMPLE.encode()) == example
    assert load_config(yaml.safe_load(EXAMPLE)) == example


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(None, id="none"),
        pytest.param("", id="empty-str"),
        pytest.param(b"", id="empty-bytes"),
        pytest.param("# comments only\n", id="comments-only"),
        pytest.param({}, id="empty-mapping"),
    ],
)
def test_empty_config_is_defaults(data: str | bytes | dict[str, Any] | None) -> None:
    cfg = load_config(data)
    assert cfg == Config()
    assert cfg.pool == "default"
    assert cfg.max_concurrency == 64
    assert cfg.bands == {}
    assert cfg.band(0) == ResolvedBand(
        priority=0,
        max_requests=0,
        max_bytes=0,
        fairness=GlobalStrictFairness(),
        ordering=WorkloadAwareOrdering(),
    )
    assert cfg.redis.failure_mode is FailureMode.CLOSED
    # The pool's queue is bounded by default; bands add no cap of their own unless configured.
    assert (cfg.flow_control.max_requests, cfg.flow_control.max_bytes) == (10_000, 2**30)


def test_band_inherits_only_what_it_leaves_out() -> None:
    cfg = load_config(
        """
        flowControl:
          defaultPriorityBand: {maxRequests: 5, maxBytes: 1Ki,
                                orderingPolicy: {type: edf-ordering-policy}}
          priorityBands:
            - {priority: 3, maxBytes: 2Ki, fairnessPolicy: {type: round-robin-fairness-policy}}
        """
    )
    band = cfg.band(3)
    assert (band.max_requests, band.max_bytes) == (5, 2048)
    assert band.fairness == RoundRobinFairness()
    assert band.ordering.type_name == "edf-ordering-policy"


# --- defaultNegativePriorityBand (llm-d: apix/config/v1alpha1/endpointpickerconfig_types.go) ------

NEGATIVE_TEMPLATE = """
flowControl:
  defaultPriorityBand: {maxRequests: 100, maxBytes: 1Mi,
                        fairnessPolicy: {type: round-robin-fairness-policy}}
  defaultNegativePriorityBand: {maxRequests: 2, orderingPolicy: {type: fcfs-ordering-policy}}
  priorityBands:
    - {priority: -1, maxRequests: 7}
"""


def test_negative_template_serves_unlisted_negative_priorities() -> None:
    cfg = load_config(NEGATIVE_TEMPLATE)
    # What the negative template leaves out (maxBytes, fairness) comes from defaultPriorityBand.
    assert cfg.band(-5) == ResolvedBand(
        priority=-5,
        max_requests=2,
        max_bytes=1_048_576,
        fairness=RoundRobinFairness(),
        ordering=FcfsOrdering(),
    )
    assert cfg.band(-5) == cfg.template_band(-5)


def test_negative_template_leaves_zero_positive_and_listed_bands_alone() -> None:
    cfg = load_config(NEGATIVE_TEMPLATE)
    for priority in (0, 3):
        band = cfg.band(priority)
        assert (band.max_requests, band.ordering) == (100, WorkloadAwareOrdering())
    # As in llm-d, a template only fills in priorities that priorityBands does not list; a listed
    # negative band inherits from defaultPriorityBand like every listed band.
    listed = cfg.band(-1)
    assert (listed.max_requests, listed.ordering) == (7, WorkloadAwareOrdering())


def test_without_negative_template_negative_priorities_use_the_default_template() -> None:
    cfg = load_config("flowControl: {defaultPriorityBand: {maxRequests: 9}}")
    assert cfg.flow_control.default_negative_priority_band is None
    assert cfg.band(-3).max_requests == 9
    assert cfg.band(-3) == cfg.template_band(-3)


def test_negative_template_goes_to_lua_only_when_configured() -> None:
    with_template = dict(pairs(encode_config(load_config(NEGATIVE_TEMPLATE))))
    assert with_template["band:-*"].split("|")[:4] == ["rr", "fcfs", "2", "1048576"]
    assert with_template["band:*"].split("|")[:4] == ["rr", "wa", "100", "1048576"]
    assert "band:-*" not in dict(pairs(encode_config(load_config(""))))


def pairs(flat: list[str]) -> list[tuple[str, str]]:
    return list(zip(flat[::2], flat[1::2], strict=True))


async def test_store_caps_an_unlisted_negative_band_by_the_negative_template(
    backend: Backend,
) -> None:
    # maxConcurrency 1: the first request takes the slot, later ones queue against the band caps.
    store = backend.store(make_config(limit=1, **load_config_raw(NEGATIVE_TEMPLATE)))
    await store.configure(now=0)

    async def enqueue(band: int, now: int) -> ScriptStatus:
        reply = await store.enqueue(
            band=band, flow="f", workload="", criticality=3, byte_size=1, ttl_ms=60_000, now=now
        )
        return reply.status

    assert await enqueue(0, 1) is ScriptStatus.DISPATCHED
    # -5 is not listed: the negative template's maxRequests 2 applies.
    assert [await enqueue(-5, 2 + i) for i in range(3)] == [
        ScriptStatus.QUEUED,
        ScriptStatus.QUEUED,
        ScriptStatus.REJECTED_CAPACITY,
    ]
    # -1 is listed (maxRequests 7) and 4 is positive (defaultPriorityBand, 100): neither is capped
    # at 2.
    assert {await enqueue(-1, 10 + i) for i in range(3)} == {ScriptStatus.QUEUED}
    assert {await enqueue(4, 20 + i) for i in range(3)} == {ScriptStatus.QUEUED}
    # A replica restarting with the same configuration while -5 has queued requests: -5 keeps
    # the negative template's policies, so this is no policy change.
    assert not await store.configure(now=30)


def load_config_raw(document: str) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(document)
    return raw


# What pytest.raises throws when nothing was raised: the input is accepted though it must not be.
_WA = "orderingPolicy: {type: workload-aware-ordering-policy, parameters: "

# (YAML document, pattern the ConfigError message must contain: the offending key or path)
BAD_CONFIGS = [
    pytest.param("bogus: 1", r"unknown field `bogus`", id="unknown-top-level-key"),
    pytest.param(
        "flowControl: {maxRequestz: 1}",
        r"unknown field `maxRequestz` - at `flowControl`",
        id="unknown-flow-control-key",
    ),
    pytest.param(
        "workloadRegistry: {foo: 1}",
        r"unknown field `foo` - at `workloadRegistry`",
        id="unknown-registry-key",
    ),
    pytest.param(
        "flowControl: {priorityBands: [{priority: 1, orderingPolicy: {type: lifo}}]}",
        r"flowControl\.priorityBands\[0\]: unknown ordering policy 'lifo'",
        id="unknown-ordering-type",
    ),
    pytest.param(
        "flowControl: {defaultPriorityBand: {fairnessPolicy: {type: lottery}}}",
        r"flowControl\.defaultPriorityBand: unknown fairness policy 'lottery'",
        id="unknown-fairness-type",
    ),
    pytest.param(
        "flowControl: {defaultPriorityBand: {orderingPolicy: {parameters: {}}}}",
        r"missing required field `type` - at `flowControl\.defaultPriorityBand\.orderingPolicy`",
        id="policy-without-type",
    ),
    pytest.param(
        "flowControl: {priorityBands: [{priority: 1, "
        "orderingPolicy: {type: fcfs-ordering-policy, parameters: {depth: 1}}}]}",
        r"flowControl\.priorityBands\[0\]: fcfs-ordering-policy parameters: .*`depth`",
        id="unknown-policy-parameter",
    ),
    pytest.param(
        "flowControl: {defaultPriorityBand: {" + _WA + "{waitTimeWeigth: 1}}}}",
        r"flowControl\.defaultPriorityBand: workload-aware-ordering-policy .*`waitTimeWeigth`",
        id="misspelt-workload-aware-parameter",
    ),
    pytest.param(
        "flowControl: {defaultRequestTTL: 3x}",
        r"'3x'.* - at `flowControl\.defaultRequestTTL`",
        id="bad-duration",
    ),
    pytest.param(
        "flowControl: {maxBytes: 12Q}",
        r"'12Q'.* - at `flowControl\.maxBytes`",
        id="bad-size",
    ),
    pytest.param(
        "flowControl: {priorityBands: [{priority: 1, maxBytes: -5}]}",
        r"must not be negative: -5 - at `flowControl\.priorityBands\[0\]\.maxBytes`",
        id="negative-band-bytes",
    ),
    pytest.param(
        "flowControl: {maxRequests: -1}",
        r"flowControl\.maxRequests: must be >= 0",
        id="negative-max-requests",
    ),
    pytest.param(
        "flowControl: {priorityBands: [{priority: 1, maxRequests: -1}]}",
        r"flowControl\.priorityBands\[0\]\.maxRequests: must be >= 0",
        id="negative-band-max-requests",
    ),
    pytest.param(
        "flowControl: {defaultPriorityBand: {maxRequests: -1}}",
        r"flowControl\.defaultPriorityBand\.maxRequests",
        id="negative-template-max-requests",
    ),
    pytest.param(
        "flowControl: {defaultNegativePriorityBand: {maxRequests: -1}}",
        r"flowControl\.defaultNegativePriorityBand\.maxRequests: must be >= 0",
        id="negative-band-template-max-requests",
    ),
    pytest.param(
        "flowControl: {defaultNegativePriorityBand: {orderingPolicy: {type: lifo}}}",
        r"flowControl\.defaultNegativePriorityBand: unknown ordering policy 'lifo'",
        id="negative-band-template-unknown-policy",
    ),
    pytest.param(
        "flowControl: {defaultNegativePriorityBand: {maxRequestz: 1}}",
        r"unknown field `maxRequestz` - at `flowControl\.defaultNegativePriorityBand`",
        id="negative-band-template-unknown-key",
    ),
    pytest.param(
        "flowControl: {priorityBands: [{priority: 5}, {priority: 5}]}",
        r"flowControl\.priorityBands\[1\]\.priority: 5 is listed twice",
        id="duplicate-priority",
    ),
    pytest.param(
        "flowControl: {priorityBands: [{maxRequests: 1}]}",
        r"flowControl\.priorityBands\[0\]\.priority: required",
        id="band-without-priority",
    ),
    pytest.param(
        "flowControl: {defaultRequestTTL: 10m, maxRequestTTL: 5m}",
        r"flowControl\.defaultRequestTTL: must not exceed maxRequestTTL",
        id="default-ttl-above-max",
    ),
    pytest.param(
        "flowControl: {defaultRequestTTL: 0}",
        r"flowControl\.defaultRequestTTL",
        id="zero-ttl",
    ),
    pytest.param(
        "flowControl: {defaultRequestTTL: .nan}",
        r"flowControl\.defaultRequestTTL",
        id="nan-ttl",
    ),
    pytest.param(
        "flowControl: {maxRequestTTL: 1" + "0" * 400 + "}",
        r"flowControl\.maxRequestTTL",
        id="huge-ttl",
    ),
    pytest.param(
        "workloadRegistry: {emaAlpha: 0}",
        r"workloadRegistry\.emaAlpha: must be in \(0, 1\]",
        id="ema-alpha-zero",
    ),
    pytest.param(
        "workloadRegistry: {emaAlpha: 2}",
        r"workloadRegistry\.emaAlpha: must be in \(0, 1\]",
        id="ema-alpha-two",
    ),
    pytest.param(
        "workloadRegistry: {maxTracked: -1}",
        r"workloadRegistry\.maxTracked",
        id="negative-max-tracked",
    ),
    pytest.param(
        "saturationDetector: {parameters: {maxConcurrency: 0}}",
        r"saturationDetector\.parameters\.maxConcurrency: must be an integer >= 1",
        id="max-concurrency-zero",
    ),
    pytest.param(
        "saturationDetector: {parameters: {maxConcurrency: x}}",
        r"saturationDetector\.parameters\.maxConcurrency: must be an integer >= 1",
        id="max-concurrency-str",
    ),
    pytest.param(
        "saturationDetector: {parameters: {maxConcurrency: true}}",
        r"saturationDetector\.parameters\.maxConcurrency: must be an integer >= 1",
        id="max-concurrency-bool",
    ),
    pytest.param(
        "saturationDetector: {type: concurrency-detector, parameters: {}}",
        r"saturationDetector\.parameters\.maxConcurrency: required in requests mode",
        id="max-concurrency-missing",
    ),
    pytest.param(
        "saturationDetector: {parameters: {concurrencyMode: tokens, maxConcurrency: 4}}",
        r"saturationDetector\.parameters\.maxTokenConcurrency: required in tokens mode",
        id="max-token-concurrency-missing",
    ),
    pytest.param(
        "saturationDetector: {parameters: {concurrencyMode: bytes, maxConcurrency: 4}}",
        r"saturationDetector\.parameters\.concurrencyMode: 'bytes' is not one of",
        id="concurrency-mode-unknown",
    ),
    pytest.param(
        "saturationDetector: {parameters: {maxConcurrency: 4, headroom: -0.1}}",
        r"saturationDetector\.parameters\.headroom: must be a number >= 0",
        id="headroom-negative",
    ),
    pytest.param(
        "saturationDetector: {type: utilization-detector, parameters: {endpoints: []}}",
        r"saturationDetector\.parameters\.endpoints",
        id="utilization-no-endpoints",
    ),
    pytest.param(
        "saturationDetector: {type: utilization-detector,"
        " parameters: {endpoints: ['http://a:1'], queueDepthThreshold: 0}}",
        r"saturationDetector\.parameters\.queueDepthThreshold",
        id="utilization-bad-threshold",
    ),
    pytest.param(
        "saturationDetector: {type: queue-detector}",
        r"saturationDetector\.type: unknown 'queue-detector'",
        id="unknown-detector-type",
    ),
    pytest.param(
        "saturationDetector: {parameters: {maxConcurrency: 8, maxTokens: 10}}",
        r"saturationDetector\.parameters: unknown key 'maxTokens'",
        id="unknown-detector-parameter",
    ),
    pytest.param('pool: "a{b}"', r"pool: 'a\{b\}'", id="pool-with-braces"),
    pytest.param('pool: ""', r"pool: ''", id="empty-pool"),
    pytest.param("pool: default\nflowControl: [\n", r"(?s)not valid YAML.*line 3", id="bad-yaml"),
    pytest.param("[1, 2]", r"Expected `object`, got `array`", id="not-a-mapping"),
    pytest.param(
        "redis: {failureMode: sideways}",
        r"'sideways' - at `redis\.failureMode`",
        id="bad-failure-mode",
    ),
    pytest.param("redis: {timeout: 0}", r"redis\.timeout: must be > 0", id="zero-redis-timeout"),
    pytest.param(
        "redis: {leaseTimeout: 1s, heartbeatInterval: 1s}",
        r"redis\.leaseTimeout: must exceed redis\.heartbeatInterval",
        id="lease-not-above-heartbeat",
    ),
    pytest.param(
        "redis: {maintenanceInterval: 0}",
        r"redis\.maintenanceInterval",
        id="zero-maintenance-interval",
    ),
    pytest.param(
        "flowControl: {defaultPriorityBand: {" + _WA + "{maxWaitTimeSeconds: 0}}}}",
        r"flowControl\.defaultPriorityBand: workload-aware-ordering-policy .*maxWaitTimeSeconds",
        id="zero-max-wait",
    ),
    pytest.param(
        "flowControl: {defaultPriorityBand: {" + _WA + "{maxRequestRate: .nan}}}}",
        r"flowControl\.defaultPriorityBand: workload-aware-ordering-policy .*maxRequestRate",
        id="nan-max-request-rate",
    ),
    pytest.param(
        "flowControl: {priorityBands: [{priority: 1, " + _WA + "{agingWeight: -1}}}]}",
        r"flowControl\.priorityBands\[0\]: workload-aware-ordering-policy .*agingWeight",
        id="negative-aging-weight",
    ),
    pytest.param(
        "flowControl: {priorityBands: [{priority: 1, " + _WA + "{waitTimeWeight: -0.1}}}]}",
        r"flowControl\.priorityBands\[0\]: workload-aware-ordering-policy .*waitTimeWeight",
        id="negative-weight",
    ),
]


@pytest.mark.parametrize(("document", "names"), BAD_CONFIGS)
def test_bad_config_names_the_key(document: str, names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        load_config(document)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_load_config_file(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(EXAMPLE)
    assert load_config_file(path) == load_config(EXAMPLE)
    assert load_config_file(str(path)) == load_config(EXAMPLE)


def test_load_config_file_validates(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("flowControl: {maxRequestz: 1}\n")
    with pytest.raises(ConfigError, match="maxRequestz"):
        load_config_file(path)


@pytest.mark.parametrize("name", ["missing.yaml", "."], ids=["missing", "directory"])
def test_load_config_file_unreadable(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config_file(path)


def test_detector_type_defaults_to_concurrency_detector() -> None:
    cfg = load_config("saturationDetector: {parameters: {maxConcurrency: 8}}")
    assert cfg.saturation_detector.type == "concurrency-detector"
    assert cfg.max_concurrency == 8
