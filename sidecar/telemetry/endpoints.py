"""Which model-server endpoints a pool has, as the URLs of their metrics pages.

Two ways to say it, exactly one of them in ``saturationDetector.parameters``:

- ``endpoints: [http://host:port, ...]``: a fixed list (scheme http or https, no path);
- ``endpointsFromDNS: "name:port"`` (or ``"https://name:port"``): every A and AAAA record of
  ``name``, as a Kubernetes headless Service publishes one per ready pod, resolved with the event
  loop's ``getaddrinfo`` (the system resolver, off the loop's thread) and resolved again every
  ``dnsRefreshInterval`` (default 5 s) in the background, so a slow DNS server never delays a
  scrape. A failed re-resolution keeps the last good list (and logs); until the first one
  succeeds the pool has no endpoints, which the detector reads as saturated.

``metricsPath`` (default ``/metrics``) is appended to each endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from sidecar.units import parse_duration

__all__ = [
    "ENDPOINT_KEYS",
    "DnsEndpoints",
    "EndpointSource",
    "EndpointsConfig",
    "StaticEndpoints",
    "endpoint_source",
]

log = logging.getLogger(__name__)

DEFAULT_METRICS_PATH = "/metrics"
DEFAULT_DNS_REFRESH_S = 5.0
# A resolution that takes longer than this failed; the last good list stays in use.
DNS_TIMEOUT_S = 2.0
# While a name resolves to nothing, it is resolved again this often.
EMPTY_RETRY_S = 1.0
ENDPOINT_KEYS = ("endpoints", "endpointsFromDNS", "dnsRefreshInterval", "metricsPath")


def _base_url(value: object, where: str) -> str:
    """``scheme://host:port`` checked and normalised (no trailing slash, no path)."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: must be a URL string, got {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{where}: must look like http://host:port, got {value!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{where}: no path, query or credentials (see metricsPath): {value!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"{where}: bad port in {value!r}") from None
    return f"{parts.scheme}://{parts.netloc}"


def _dns_target(value: object) -> tuple[str, str, int]:
    """(scheme, name, port) of ``name:port`` or ``scheme://name:port``."""
    if not isinstance(value, str):
        raise ValueError(f"endpointsFromDNS: must be a string 'name:port', got {value!r}")
    text = value if "://" in value else f"http://{value}"
    base = _base_url(text, "endpointsFromDNS")
    parts = urlsplit(base)
    if parts.port is None or parts.hostname is None:
        raise ValueError(f"endpointsFromDNS: needs a port, 'name:port', got {value!r}")
    return parts.scheme, parts.hostname, parts.port


def _metrics_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "?" in value or "#" in value:
        raise ValueError(f"metricsPath: must be a path starting with '/', got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class EndpointsConfig:
    """Where the endpoints come from; exactly one of ``endpoints`` and ``from_dns``."""

    endpoints: tuple[str, ...] = ()
    # (scheme, name, port) from endpointsFromDNS.
    from_dns: tuple[str, str, int] | None = None
    dns_refresh_interval: float = DEFAULT_DNS_REFRESH_S
    metrics_path: str = DEFAULT_METRICS_PATH

    @classmethod
    def from_parameters(cls, params: Mapping[str, Any]) -> EndpointsConfig:
        """From ``saturationDetector.parameters``; ValueError names the offending key."""
        has_list, has_dns = "endpoints" in params, "endpointsFromDNS" in params
        if has_list == has_dns:
            raise ValueError("utilization-detector: set exactly one of endpoints, endpointsFromDNS")
        path = _metrics_path(params.get("metricsPath", DEFAULT_METRICS_PATH))
        if has_dns:
            try:
                refresh = parse_duration(params.get("dnsRefreshInterval", DEFAULT_DNS_REFRESH_S))
            except ValueError as exc:
                raise ValueError(f"dnsRefreshInterval: {exc}") from None
            if refresh <= 0:
                raise ValueError("dnsRefreshInterval: must be > 0")
            target = _dns_target(params["endpointsFromDNS"])
            return cls(from_dns=target, dns_refresh_interval=refresh, metrics_path=path)
        if "dnsRefreshInterval" in params:
            raise ValueError("dnsRefreshInterval: only with endpointsFromDNS")
        raw = params["endpoints"]
        if not isinstance(raw, list) or not raw:
            raise ValueError("endpoints: must be a non-empty list of URLs")
        bases = [_base_url(v, f"endpoints[{i}]") for i, v in enumerate(raw)]
        if len(set(bases)) != len(bases):
            raise ValueError("endpoints: lists an endpoint twice")
        return cls(endpoints=tuple(bases), metrics_path=path)


class EndpointSource(Protocol):
    """The pool's metrics URLs now."""

    async def urls(self) -> tuple[str, ...]: ...

    async def aclose(self) -> None: ...


class StaticEndpoints:
    def __init__(self, bases: tuple[str, ...], metrics_path: str = DEFAULT_METRICS_PATH) -> None:
        self._urls = tuple(base + metrics_path for base in bases)

    async def urls(self) -> tuple[str, ...]:
        return self._urls

    async def aclose(self) -> None:
        return None


def _url(scheme: str, address: str, port: int, path: str) -> str:
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    return f"{scheme}://{host}:{port}{path}"


class DnsEndpoints:
    """The addresses of ``name`` (A and AAAA), re-resolved every ``refresh_interval`` seconds."""

    def __init__(
        self,
        target: tuple[str, str, int],
        metrics_path: str = DEFAULT_METRICS_PATH,
        refresh_interval: float = DEFAULT_DNS_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._scheme, self._name, self._port = target
        self._path = metrics_path
        self._refresh_interval = refresh_interval
        self._clock = clock
        self._urls: tuple[str, ...] | None = None
        self._resolved_at = 0.0
        self._refresh: asyncio.Task[None] | None = None
        # Resolutions that succeeded, for tests and logs.
        self.resolutions = 0

    async def resolve(self) -> tuple[str, ...]:
        """Every address of the name now, as metrics URLs, sorted and without duplicates."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(DNS_TIMEOUT_S):
            infos = await loop.getaddrinfo(
                self._name, self._port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        addresses = sorted({str(info[4][0]) for info in infos})
        return tuple(_url(self._scheme, a, self._port, self._path) for a in addresses)

    async def _update(self) -> None:
        try:
            urls = await self.resolve()
        except (OSError, TimeoutError) as exc:
            kept = len(self._urls or ())
            log.warning("resolving %s failed, keeping %d endpoints: %r", self._name, kept, exc)
            urls = self._urls or ()
        except Exception:
            # Runs as a background task: nothing may escape it unlogged.
            log.exception("resolving %s failed unexpectedly", self._name)
            urls = self._urls or ()
        else:
            self.resolutions += 1
            if urls != self._urls:
                log.info("%s resolves to %d endpoints", self._name, len(urls))
        self._urls = urls
        self._resolved_at = self._clock()

    def _next_interval(self) -> float:
        # With no endpoints the pool is saturated: look again soon rather than a full interval on.
        if self._urls:
            return self._refresh_interval
        return min(self._refresh_interval, EMPTY_RETRY_S)

    async def urls(self) -> tuple[str, ...]:
        if self._urls is None:
            await self._update()
        elif self._clock() - self._resolved_at >= self._next_interval() and (
            self._refresh is None or self._refresh.done()
        ):
            self._refresh = asyncio.create_task(self._update())
        return self._urls or ()

    async def wait_refreshed(self) -> None:
        """Returns when the background re-resolution in progress (if any) has finished."""
        if self._refresh is not None:
            await asyncio.shield(self._refresh)

    async def aclose(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh


def endpoint_source(config: EndpointsConfig) -> EndpointSource:
    if config.from_dns is not None:
        return DnsEndpoints(config.from_dns, config.metrics_path, config.dns_refresh_interval)
    return StaticEndpoints(config.endpoints, config.metrics_path)
