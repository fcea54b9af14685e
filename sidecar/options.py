"""Settings of ``serve``: flags win over environment variables, which win over the config file."""

from __future__ import annotations

import argparse
import os
import secrets
import socket
from collections.abc import Mapping
from pathlib import Path

import msgspec

from sidecar.config import Config, ConfigError, load_config, load_config_file
from sidecar.keys import VALID_ID, VALID_POOL

# flag dest -> environment variable
ENV = {
    "config": "SIDECAR_CONFIG",
    "listen": "SIDECAR_LISTEN",
    "admin_listen": "SIDECAR_ADMIN_LISTEN",
    "redis_url": "REDIS_URL",
    "upstream": "SIDECAR_UPSTREAM",
    "pool": "SIDECAR_POOL",
    "replica_id": "SIDECAR_REPLICA_ID",
    "ticket_secret_file": "SIDECAR_TICKET_SECRET_FILE",
    "admin_token_file": "SIDECAR_ADMIN_TOKEN_FILE",
}
# Secrets may also come inline from the environment (never as a flag: argv is visible to all).
INLINE_ENV = {
    "ticket_secret_file": "SIDECAR_TICKET_SECRET",
    "admin_token_file": "SIDECAR_ADMIN_TOKEN",
}


class Secret:
    """A credential. Its repr and str are masked, so no log line or error message can carry it."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


class ServeOptions(msgspec.Struct, frozen=True):
    config: Config
    listen: tuple[str, int]
    admin_listen: tuple[str, int]
    redis_url: str | None
    upstream: str | None
    replica_id: str
    # None: tickets are signed with a per-process secret (sidecar/tickets.py warns).
    ticket_secret: Secret | None = None
    # None: the admin port's /state is open.
    admin_token: Secret | None = None


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file [SIDECAR_CONFIG]")
    parser.add_argument(
        "--listen", help="data port host:port (default 127.0.0.1:8080) [SIDECAR_LISTEN]"
    )
    parser.add_argument(
        "--admin-listen",
        help="admin port host:port (default 127.0.0.1:9090) [SIDECAR_ADMIN_LISTEN]",
    )
    parser.add_argument(
        "--redis-url", help="Redis URL; absent: embedded in-process store, one replica [REDIS_URL]"
    )
    parser.add_argument("--upstream", help="base URL requests are forwarded to [SIDECAR_UPSTREAM]")
    parser.add_argument(
        "--pool", help="pool name, the Redis hash tag (default 'default') [SIDECAR_POOL]"
    )
    parser.add_argument(
        "--replica-id", help="replica id prefix; a random suffix is added [SIDECAR_REPLICA_ID]"
    )
    parser.add_argument(
        "--ticket-secret-file",
        help="file holding the HMAC secret that signs tickets; the same for all replicas of a "
        "pool [SIDECAR_TICKET_SECRET_FILE, or the secret itself in SIDECAR_TICKET_SECRET]",
    )
    parser.add_argument(
        "--admin-token-file",
        help="file holding the bearer token /state requires on the admin port "
        "[SIDECAR_ADMIN_TOKEN_FILE, or the token itself in SIDECAR_ADMIN_TOKEN]",
    )


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what}: expected host:port, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def read_secret(args: argparse.Namespace, env: Mapping[str, str], name: str) -> Secret | None:
    """A secret from its file flag, else its file env var, else its inline env var; the file's
    content is stripped. Errors name the setting, never the content."""
    path = getattr(args, name, None) or env.get(ENV[name]) or None
    inline = env.get(INLINE_ENV[name]) or None
    what = name.removesuffix("_file").replace("_", " ")
    if path is None:
        return None if inline is None else _nonempty(inline.strip().encode(), what)
    if getattr(args, name, None) is None and inline is not None:
        raise ConfigError(f"{what}: set {INLINE_ENV[name]} or {ENV[name]}, not both")
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    return _nonempty(content.strip(), what)


def _nonempty(value: bytes, what: str) -> Secret:
    if not value:
        raise ConfigError(f"{what}: is empty")
    return Secret(value)


def resolve(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServeOptions:
    env = os.environ if env is None else env

    def pick(name: str) -> str | None:
        flag = getattr(args, name, None)
        return flag if flag is not None else env.get(ENV[name]) or None

    path = pick("config")
    config = load_config_file(path) if path else load_config(None)
    pool = pick("pool")
    if pool is not None:
        if VALID_POOL.fullmatch(pool) is None:
            raise ConfigError(f"pool: {pool!r} must match {VALID_POOL.pattern}")
        config = msgspec.structs.replace(config, pool=pool)
    server = config.server
    prefix = pick("replica_id") or server.replica_id or socket.gethostname()
    if VALID_ID.fullmatch(prefix) is None or len(prefix) > 100:
        raise ConfigError(f"replica id: {prefix!r} must match {VALID_ID.pattern} (at most 100)")
    return ServeOptions(
        config=config,
        listen=parse_hostport(pick("listen") or server.listen, "listen"),
        admin_listen=parse_hostport(pick("admin_listen") or server.admin_listen, "admin listen"),
        redis_url=pick("redis_url") or config.redis.url,
        upstream=(pick("upstream") or server.upstream or "").rstrip("/") or None,
        replica_id=f"{prefix}-{secrets.token_hex(3)}",
        ticket_secret=read_secret(args, env, "ticket_secret_file"),
        admin_token=read_secret(args, env, "admin_token_file"),
    )
