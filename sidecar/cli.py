"""``admission-sidecar`` (also ``python -m sidecar``): serve, demo, status, check-config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

import msgspec

from sidecar.config import ConfigError, load_config, load_config_file
from sidecar.errors import SidecarError

log = logging.getLogger("sidecar")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def _run(coro: object) -> None:
    try:
        import uvloop  # optional: a faster event loop where installed

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


def cmd_serve(args: argparse.Namespace) -> int:
    from sidecar.http.app import Server
    from sidecar.options import resolve

    options = resolve(args)
    if not options.redis_url:
        log.warning(
            "no --redis-url: using the embedded in-process store. This replica is the only one; "
            "its queues and limits are not shared and are lost when it exits."
        )
    _run(Server(options).run())
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config_file(args.path)
    sys.stdout.buffer.write(msgspec.yaml.encode(_effective(config)))
    print(f"# {args.path}: valid", file=sys.stderr)
    return 0


def _effective(config: object) -> object:
    from sidecar.config import Config

    assert isinstance(config, Config)
    # Sizes are int subclasses, durations float subclasses: print them as plain numbers.
    out = msgspec.to_builtins(config, enc_hook=lambda v: int(v) if isinstance(v, int) else float(v))
    if out["redis"].get("url"):
        from sidecar.store.connect import mask_url

        # The printed config ends up in terminals and CI logs: never with the Redis password.
        out["redis"]["url"] = mask_url(out["redis"]["url"])
    out["effectiveBands"] = {
        str(p): {
            "maxRequests": b.max_requests,
            "maxBytes": b.max_bytes,
            "fairnessPolicy": b.fairness.type_name,
            "orderingPolicy": {
                "type": b.ordering.type_name,
                "parameters": msgspec.to_builtins(b.ordering),
            },
        }
        for p, b in sorted({**config.bands, 0: config.band(0)}.items())
    }
    return out


def cmd_status(args: argparse.Namespace) -> int:
    from sidecar.status import show_status

    config = load_config_file(args.config) if args.config else load_config(None)
    _run(show_status(args.redis_url, args.pool or config.pool, config, as_json=args.json))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sidecar.demo import run_demo

    _run(run_demo(seconds=args.seconds, utilization=args.detector == "utilization"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sidecar.options import add_serve_flags

    parser = argparse.ArgumentParser(
        prog="admission-sidecar",
        description="Redis-backed admission control for LLM inference gateways.",
    )
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a replica: proxy, admission API, admin port")
    add_serve_flags(serve)
    serve.set_defaults(func=cmd_serve)
    demo = sub.add_parser("demo", help="watch the policy work on simulated traffic (embedded)")
    demo.add_argument("--seconds", type=float, default=20.0, help="length of the traffic run")
    demo.add_argument(
        "--detector",
        choices=("concurrency", "utilization"),
        default="concurrency",
        help="concurrency: a fixed global limit; utilization: the simulated vLLM server's /metrics",
    )
    demo.set_defaults(func=cmd_demo)
    status = sub.add_parser("status", help="print a pool's live state from Redis")
    status.add_argument("--redis-url", required=True)
    status.add_argument("--pool", help="pool name (default: from --config, else 'default')")
    status.add_argument("--config", help="config file, for policy parameters and the pool name")
    status.add_argument("--json", action="store_true", help="the raw JSON snapshot")
    status.set_defaults(func=cmd_status)
    check = sub.add_parser("check-config", help="validate a config and print the effective one")
    check.add_argument("path")
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"admission-sidecar: config error: {exc}", file=sys.stderr)
        return 2
    except SidecarError as exc:
        print(f"admission-sidecar: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
