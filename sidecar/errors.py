"""Errors raised at the boundaries of the engine."""

from __future__ import annotations


class SidecarError(Exception):
    """Base class of the sidecar's own errors."""


class StoreError(SidecarError):
    """Redis (or the embedded store) could not be reached or answered with an error."""


class ConfigConflictError(SidecarError):
    """The pool's stored configuration cannot be replaced while a band holds queued items."""


class LayoutMismatchError(StoreError):
    """The pool in Redis was written by a sidecar with another Redis layout
    (contract.LAYOUT_VERSION); this one neither reads nor changes it (docs/upgrading.md)."""
