"""The sidecar's settings: one YAML document, decoded with msgspec, validated at start-up.

Every field has a default; unknown keys and bad values fail with a message naming the key.
"""

from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import Any

import msgspec
import yaml

from sidecar.keys import VALID_POOL
from sidecar.policies import FairnessPolicy, OrderingPolicy, build_fairness, build_ordering
from sidecar.units import parse_duration, parse_size


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key."""


class Duration(float):
    """Seconds; written in YAML as ``30s``, ``250ms``, ``5m`` or a number of seconds."""


class ByteSize(int):
    """Bytes; written in YAML as ``512Mi``, ``1Gi`` or a number of bytes."""


class _Struct(msgspec.Struct, forbid_unknown_fields=True, rename="camel", kw_only=True):
    pass


class PluginSpec(_Struct):
    """A plugin reference as GIE writes it: ``{type: name, parameters: {...}}``."""

    type: str
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class BandConfig(_Struct):
    """One priority band. Fields left out inherit from ``defaultPriorityBand``."""

    priority: int | None = None
    # Queued requests / bytes of this band; 0 = unlimited.
    max_requests: int | None = None
    max_bytes: ByteSize | None = None
    fairness_policy: PluginSpec | None = None
    ordering_policy: PluginSpec | None = None


class ResolvedBand(msgspec.Struct, frozen=True, kw_only=True):
    """A band with every field filled in and its policies built."""

    priority: int
    max_requests: int
    max_bytes: int
    fairness: FairnessPolicy
    ordering: OrderingPolicy


class FlowControlConfig(_Struct):
    # All queued requests / bytes of the pool; 0 = unlimited. Bounded by default: every queued
    # request also holds a connection open at the gateway, so an unbounded queue fails elsewhere.
    max_requests: int = 10_000
    max_bytes: ByteSize = ByteSize(2**30)
    default_request_ttl: Duration = msgspec.field(default=Duration(30.0), name="defaultRequestTTL")
    max_request_ttl: Duration = msgspec.field(default=Duration(300.0), name="maxRequestTTL")
    default_priority_band: BandConfig = msgspec.field(default_factory=BandConfig)
    # llm-d's template for priorities below zero that priorityBands does not list (e.g. a small
    # maxRequests, so sheddable traffic is refused at once under saturation). Absent: those use
    # defaultPriorityBand, as in llm-d. Fields it leaves out inherit from defaultPriorityBand (llm-d
    # fills them from its system defaults instead; ours are what defaultPriorityBand falls back to).
    default_negative_priority_band: BandConfig | None = None
    priority_bands: list[BandConfig] = msgspec.field(default_factory=list)


class SaturationDetectorConfig(_Struct):
    type: str = "concurrency-detector"  # or "utilization-detector" (sidecar/telemetry/)
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: {"maxConcurrency": 64})


class RegistryConfig(_Struct):
    request_rate_window: Duration = Duration(60.0)
    ema_alpha: float = 0.2
    idle_timeout: Duration = Duration(300.0)
    # Workloads tracked at once; new ones beyond this are scored as anonymous until others expire.
    max_tracked: int = 10_000


class FailureMode(enum.StrEnum):
    CLOSED = "closed"  # 503 at once while Redis is unreachable
    OPEN = "open"  # forward without admission while Redis is unreachable (counted)


class RedisConfig(_Struct):
    url: str | None = None  # absent -> embedded in-process store (single replica)
    failure_mode: FailureMode = FailureMode.CLOSED
    timeout: Duration = Duration(0.25)  # per Redis call
    max_connections: int = 64  # per replica; calls beyond it wait for a free connection
    lease_timeout: Duration = Duration(10.0)  # a replica silent this long loses its items
    heartbeat_interval: Duration = Duration(1.0)
    maintenance_interval: Duration = Duration(1.0)  # also bounds how stale a score can get
    # Slots taken through the gateway check endpoint are leases that expire unless renewed.
    ticket_lease: Duration = Duration(60.0)
    # After Redis lost the pool's data, nothing is dispatched for this long, so every live replica
    # re-registers the slots it still holds before anything new is admitted. Absent: two
    # heartbeat intervals plus two call timeouts (a replica notices at its next heartbeat at the
    # latest). The embedded store cannot lose its data and holds nothing.
    recovery_hold: Duration | None = None

    @property
    def recovery_hold_s(self) -> float:
        if self.recovery_hold is not None:
            return float(self.recovery_hold)
        return 2 * float(self.heartbeat_interval) + 2 * float(self.timeout)


class ServerConfig(_Struct):
    """Where the process listens and forwards; flags and env vars override these."""

    listen: str = "127.0.0.1:8080"
    admin_listen: str = "127.0.0.1:9090"
    upstream: str | None = None
    # A prefix: each process adds a random suffix, so a restarted replica never inherits (and so
    # never strands) the slots of the process it replaces.
    replica_id: str | None = None
    # After SIGTERM: not ready at once, then admitted requests get this long to finish.
    shutdown_grace_period: Duration = Duration(30.0)
    # Largest request body the data port accepts (413 beyond, before admission); 0 = unlimited.
    max_request_body: ByteSize = ByteSize(16 * 2**20)


class Config(_Struct):
    pool: str = "default"
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    strict_headers: bool = False
    flow_control: FlowControlConfig = msgspec.field(default_factory=FlowControlConfig)
    saturation_detector: SaturationDetectorConfig = msgspec.field(
        default_factory=SaturationDetectorConfig
    )
    objectives: dict[str, int] = msgspec.field(default_factory=dict)
    workload_registry: RegistryConfig = msgspec.field(default_factory=RegistryConfig)
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)

    @property
    def max_concurrency(self) -> int:
        """The concurrency detector's limit; 0 under the utilization detector (no fixed limit:
        the model servers' own metrics decide)."""
        return int(self.saturation_detector.parameters.get("maxConcurrency", 0))

    @property
    def utilization(self) -> bool:
        return self.saturation_detector.type == UTILIZATION_DETECTOR

    @property
    def concurrency_mode(self) -> str:
        """requests, tokens or hybrid (the concurrency detector); '' for the utilization one."""
        if self.utilization:
            return ""
        return str(self.saturation_detector.parameters.get("concurrencyMode", "requests"))

    @property
    def counts_tokens(self) -> bool:
        """Requests need a token estimate (tokens or hybrid mode)."""
        return self.concurrency_mode in ("tokens", "hybrid")

    def _with_headroom(self, key: str) -> int:
        p = self.saturation_detector.parameters
        return math.floor(int(p[key]) * (1 + float(p.get("headroom", 0.0))))

    @property
    def request_limit(self) -> int | None:
        """Requests in flight allowed (headroom included); None: no request limit."""
        if self.concurrency_mode not in ("requests", "hybrid"):
            return None
        return self._with_headroom("maxConcurrency")

    @property
    def token_limit(self) -> int | None:
        """Estimated tokens in flight allowed (headroom included); None: no token limit."""
        return self._with_headroom("maxTokenConcurrency") if self.counts_tokens else None

    def band(self, priority: int) -> ResolvedBand:
        """The band for a priority: its own entry if listed, else its template."""
        return self.bands.get(priority) or self.template_band(priority)

    def template_band(self, priority: int) -> ResolvedBand:
        """The template an unlisted priority gets: defaultNegativePriorityBand below zero (when
        configured), else defaultPriorityBand."""
        fc = self.flow_control
        negative = fc.default_negative_priority_band
        template = negative if priority < 0 and negative is not None else fc.default_priority_band
        return _resolve(template, priority, fc)

    @property
    def bands(self) -> dict[int, ResolvedBand]:
        fc = self.flow_control
        return {
            b.priority: _resolve(b, b.priority, fc)
            for b in fc.priority_bands
            if b.priority is not None
        }


_DEFAULT_FAIRNESS = PluginSpec(type="global-strict-fairness-policy")
_DEFAULT_ORDERING = PluginSpec(type="workload-aware-ordering-policy")


def _resolve(band: BandConfig, priority: int, fc: FlowControlConfig) -> ResolvedBand:
    template = fc.default_priority_band
    fairness = band.fairness_policy or template.fairness_policy or _DEFAULT_FAIRNESS
    ordering = band.ordering_policy or template.ordering_policy or _DEFAULT_ORDERING
    return ResolvedBand(
        priority=priority,
        max_requests=_first(band.max_requests, template.max_requests, 0),
        max_bytes=_first(band.max_bytes, template.max_bytes, 0),
        fairness=build_fairness(fairness.type, fairness.parameters),
        ordering=build_ordering(ordering.type, ordering.parameters),
    )


def _first(*values: int | None) -> int:
    return next(int(v) for v in values if v is not None)


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is Duration:
        return Duration(parse_duration(obj))
    if type_ is ByteSize:
        return ByteSize(parse_size(obj))
    raise NotImplementedError(type_)


def _validate(cfg: Config) -> None:
    fc = cfg.flow_control
    if VALID_POOL.fullmatch(cfg.pool) is None:
        raise ConfigError(f"pool: {cfg.pool!r} must match {VALID_POOL.pattern}")
    if fc.max_requests < 0:
        raise ConfigError("flowControl.maxRequests: must be >= 0")
    if fc.default_request_ttl <= 0 or fc.max_request_ttl <= 0:
        raise ConfigError("flowControl.defaultRequestTTL/maxRequestTTL: must be > 0")
    if fc.default_request_ttl > fc.max_request_ttl:
        raise ConfigError("flowControl.defaultRequestTTL: must not exceed maxRequestTTL")
    seen: set[int] = set()
    for i, band in enumerate(fc.priority_bands):
        where = f"flowControl.priorityBands[{i}]"
        if band.priority is None:
            raise ConfigError(f"{where}.priority: required")
        if band.priority in seen:
            raise ConfigError(f"{where}.priority: {band.priority} is listed twice")
        seen.add(band.priority)
        _validate_band(band, fc, where)
    _validate_templates(fc)
    _validate_detector(cfg.saturation_detector)
    _validate_registry(cfg.workload_registry)
    for key in ("timeout", "heartbeat_interval", "maintenance_interval", "ticket_lease"):
        if getattr(cfg.redis, key) <= 0:
            raise ConfigError(f"redis.{_camel(key)}: must be > 0")
    if cfg.redis.lease_timeout <= cfg.redis.heartbeat_interval:
        raise ConfigError("redis.leaseTimeout: must exceed redis.heartbeatInterval")
    if cfg.redis.recovery_hold is not None and cfg.redis.recovery_hold < 0:
        raise ConfigError("redis.recoveryHold: must be >= 0")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _validate_registry(reg: RegistryConfig) -> None:
    if not 0 < reg.ema_alpha <= 1:
        raise ConfigError("workloadRegistry.emaAlpha: must be in (0, 1]")
    if reg.request_rate_window <= 0 or reg.idle_timeout <= 0:
        raise ConfigError("workloadRegistry.requestRateWindow/idleTimeout: must be > 0")
    if reg.max_tracked < 0:
        raise ConfigError("workloadRegistry.maxTracked: must be >= 0")


def _validate_templates(fc: FlowControlConfig) -> None:
    _validate_band(fc.default_priority_band, fc, "flowControl.defaultPriorityBand")
    if fc.default_negative_priority_band is not None:
        _validate_band(
            fc.default_negative_priority_band, fc, "flowControl.defaultNegativePriorityBand"
        )


def _validate_band(band: BandConfig, fc: FlowControlConfig, where: str) -> None:
    if (band.max_requests or 0) < 0:
        raise ConfigError(f"{where}.maxRequests: must be >= 0")
    try:
        _resolve(band, band.priority or 0, fc)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


CONCURRENCY_DETECTOR = "concurrency-detector"
# llm-d's concurrencyMode values: a limit on requests in flight, on estimated tokens in flight
# (sidecar/tokens.py), or both.
CONCURRENCY_MODES = ("requests", "tokens", "hybrid")
UTILIZATION_DETECTOR = "utilization-detector"


def _validate_detector(det: SaturationDetectorConfig) -> None:
    if det.type == UTILIZATION_DETECTOR:
        # Imported here: the telemetry package pulls in aiohttp's client, which config does not
        # otherwise need.
        from sidecar.telemetry import DetectorSettings

        try:
            DetectorSettings.from_parameters(det.parameters)
        except ValueError as exc:
            raise ConfigError(f"saturationDetector.parameters.{exc}") from exc
        return
    if det.type != CONCURRENCY_DETECTOR:
        raise ConfigError(
            f"saturationDetector.type: unknown {det.type!r}; known: {CONCURRENCY_DETECTOR}, "
            f"{UTILIZATION_DETECTOR}"
        )
    p = det.parameters
    unknown = set(p) - {"maxConcurrency", "concurrencyMode", "maxTokenConcurrency", "headroom"}
    if unknown:
        raise ConfigError(f"saturationDetector.parameters: unknown key {sorted(unknown)[0]!r}")
    mode = p.get("concurrencyMode", "requests")
    if mode not in CONCURRENCY_MODES:
        raise ConfigError(
            f"saturationDetector.parameters.concurrencyMode: {mode!r} is not one of "
            + ", ".join(CONCURRENCY_MODES)
        )
    # As llm-d's concurrency detector: each limit is required only by the modes that use it.
    for key, used in (("maxConcurrency", "requests"), ("maxTokenConcurrency", "tokens")):
        value = p.get(key)
        if value is None and mode in (used, "hybrid"):
            raise ConfigError(f"saturationDetector.parameters.{key}: required in {mode} mode")
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ConfigError(f"saturationDetector.parameters.{key}: must be an integer >= 1")
    headroom = p.get("headroom", 0.0)
    if isinstance(headroom, bool) or not isinstance(headroom, int | float) or not headroom >= 0:
        raise ConfigError("saturationDetector.parameters.headroom: must be a number >= 0")


def load_config(data: str | bytes | dict[str, Any] | None) -> Config:
    """Decode and validate a YAML document (or an already-parsed mapping)."""
    if data is None:
        raw: Any = {}
    elif isinstance(data, dict):
        raw = data
    else:
        try:
            raw = yaml.safe_load(data) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"not valid YAML: {exc}") from exc
    try:
        cfg = msgspec.convert(raw, Config, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc).replace("$.", "")) from exc
    _validate(cfg)
    return cfg


def load_config_file(path: str | Path) -> Config:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    return load_config(text)
