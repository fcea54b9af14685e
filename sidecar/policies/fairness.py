"""Fairness policies: which flow of a band goes next."""

from __future__ import annotations

from typing import ClassVar

import msgspec

from sidecar.policies.base import FairnessPolicy, register_fairness


@register_fairness
class GlobalStrictFairness(FairnessPolicy, msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The best head across all flows of the band, by the band's ordering policy."""

    type_name: ClassVar[str] = "global-strict-fairness-policy"
    lua_code: ClassVar[str] = "gs"


@register_fairness
class RoundRobinFairness(FairnessPolicy, msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Flows of the band take turns, in lexicographic order of their ids."""

    type_name: ClassVar[str] = "round-robin-fairness-policy"
    lua_code: ClassVar[str] = "rr"
