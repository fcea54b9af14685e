"""The baselines of the HTTP benchmark, each served from a process of its own.

    python -m bench.bare_proxy --listen HOST:PORT --upstream URL     a reverse proxy, no admission
    python -m bench.bare_proxy --listen HOST:PORT --serve-upstream   the fast upstream
    python -m bench.bare_proxy --listen HOST:PORT --serve-evalsha REDIS_URL
                                                   one EVALSHA of ``return 1`` per request

The bare proxy forwards exactly as the sidecar's proxy mode does (same client session settings,
same header filtering, request and response streamed in the same chunks, the same server options),
so the sidecar's figures against it show what admission adds and nothing else. The EVALSHA handler
uses the sidecar's own Redis client settings (``sidecar.store.connect``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from bench.loadgen import run_loop
from sidecar.classify import CONTROL_HEADERS
from sidecar.http.app import upstream_session
from sidecar.http.keys import SESSION, UPSTREAM
from sidecar.http.proxy import forwardable, relay
from sidecar.options import parse_hostport
from sidecar.store.connect import connect

UPSTREAM_BODY = b'{"id":"cmpl-bench","object":"chat.completion","choices":[{"index":0}]}'
SCRIPT = web.AppKey("script", object)
# The sidecar's own per-call Redis timeout default: the baseline's client is set up the same way.
REDIS_TIMEOUT_S = 0.25
REDIS_MAX_CONNECTIONS = 64


async def forward(request: web.Request) -> web.StreamResponse:
    """The sidecar's own forwarding (sidecar.http.proxy.relay) without the admission around it."""
    headers = forwardable(request.headers, CONTROL_HEADERS)
    try:
        return await relay(request, request.app[SESSION], request.app[UPSTREAM], headers, {})
    except (aiohttp.ClientError, TimeoutError) as exc:
        return web.Response(status=502, text=f"upstream failed: {exc}")


def proxy_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=1024**3)
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(upstream_session)  # the very session the sidecar uses
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def answer(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=UPSTREAM_BODY, content_type="application/json")


def upstream_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def evalsha(request: web.Request) -> web.Response:
    await request.read()
    script: Any = request.app[SCRIPT]
    result = await script(keys=["bench:{evalsha}"], args=[])
    return web.Response(body=b'{"result":%d}' % int(result), content_type="application/json")


def evalsha_app(redis_url: str) -> web.Application:
    app = web.Application()

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        client, inbox = connect(redis_url, REDIS_TIMEOUT_S, REDIS_MAX_CONNECTIONS)
        await inbox.aclose()
        app[SCRIPT] = client.register_script("return 1")
        yield
        await client.aclose()

    app.cleanup_ctx.append(redis_ctx)
    app.router.add_route("*", "/{tail:.*}", evalsha)
    return app


async def serve(app: web.Application, host: str, port: int) -> None:
    """Serves until SIGTERM/SIGINT, with the server options the sidecar's data port uses."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bare_proxy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--listen", required=True, help="host:port")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--upstream", help="proxy to this base URL")
    mode.add_argument("--serve-upstream", action="store_true", help="be the fast upstream")
    mode.add_argument("--serve-evalsha", metavar="REDIS_URL", help="one EVALSHA per request")
    args = parser.parse_args(argv)
    host, port = parse_hostport(args.listen, "listen")
    if args.upstream:
        app = proxy_app(args.upstream)
    elif args.serve_upstream:
        app = upstream_app()
    else:
        app = evalsha_app(args.serve_evalsha)
    run_loop(serve(app, host, port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
