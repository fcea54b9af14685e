"""Settings of ``serve``: flags win over environment variables, which win over the config file."""

from __future__ import annotations

import argparse
import os
import secrets
import socket
from collections.abc import Mapping

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
}


class ServeOptions(msgspec.Struct, frozen=True):
    config: Config
    listen: tuple[str, int]
    admin_listen: tuple[str, int]
    redis_url: str | None
    upstream: str | None
    replica_id: str


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


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what}: expected host:port, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


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
    )
