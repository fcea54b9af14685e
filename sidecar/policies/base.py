"""The plugin registry: type name -> policy class, parameters decoded with msgspec."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import msgspec


class PolicyError(ValueError):
    """A policy type or parameter that the configuration names but that cannot be built."""


class QueuedItem(msgspec.Struct, frozen=True):
    """What an ordering policy may look at: enough to order, nothing Redis-specific."""

    seq: int
    enqueued_ms: int
    deadline_ms: int
    workload_id: str
    criticality: int
    flow: str = "default-flow"
    # The request's time-to-first-token objective, ms (0 = none): slo-deadline ordering.
    slo_ms: int = 0


class WorkloadView(msgspec.Struct, frozen=True):
    """Metrics of one workload as of an instant (zero for anonymous or unseen workloads)."""

    avg_wait_s: float = 0.0
    request_rate: float = 0.0


class OrderingPolicy:
    """Orders items inside a flow. Lower ``sort_key`` dispatches first; ties go to lower seq."""

    type_name: ClassVar[str]
    # Code sent to Lua for this policy (lua/includes/ordering.lua dispatches on it).
    lua_code: ClassVar[str]

    def sort_key(self, item: QueuedItem, metrics: WorkloadView) -> float:
        raise NotImplementedError

    def lua_parameters(self) -> list[float]:
        """Numeric parameters in the order of the band record (sidecar/contract.py BAND_CONFIG)."""
        return []


class FairnessPolicy:
    """Picks which flow of a band goes next."""

    type_name: ClassVar[str]
    lua_code: ClassVar[str]


_O = TypeVar("_O", bound=OrderingPolicy)
_F = TypeVar("_F", bound=FairnessPolicy)
_ORDERING: dict[str, Callable[[Mapping[str, Any]], OrderingPolicy]] = {}
_FAIRNESS: dict[str, Callable[[Mapping[str, Any]], FairnessPolicy]] = {}


def _decode_params(cls: type[Any], params: Mapping[str, Any], type_name: str) -> Any:
    try:
        return msgspec.convert(dict(params), cls, strict=False)
    except msgspec.ValidationError as exc:
        raise PolicyError(f"{type_name} parameters: {exc}") from exc


def register_ordering(cls: type[_O]) -> type[_O]:
    _ORDERING[cls.type_name] = lambda params: _decode_params(cls, params, cls.type_name)
    return cls


def register_fairness(cls: type[_F]) -> type[_F]:
    _FAIRNESS[cls.type_name] = lambda params: _decode_params(cls, params, cls.type_name)
    return cls


def build_ordering(type_name: str, parameters: Mapping[str, Any] | None = None) -> OrderingPolicy:
    factory = _ORDERING.get(type_name)
    if factory is None:
        raise PolicyError(f"unknown ordering policy {type_name!r}; known: {sorted(_ORDERING)}")
    return factory(parameters or {})


def build_fairness(type_name: str, parameters: Mapping[str, Any] | None = None) -> FairnessPolicy:
    factory = _FAIRNESS.get(type_name)
    if factory is None:
        raise PolicyError(f"unknown fairness policy {type_name!r}; known: {sorted(_FAIRNESS)}")
    return factory(parameters or {})


def ordering_types() -> list[str]:
    return sorted(_ORDERING)


def fairness_types() -> list[str]:
    return sorted(_FAIRNESS)
