"""``jaxllm serve [MODEL]``: start the engine, serve the OpenAI-compatible API, stop on SIGTERM.

Shutdown: stop accepting connections, give in-flight requests ``--shutdown-timeout`` seconds to
finish (aiohttp then cancels their handlers, which aborts their engine requests), stop the
engine's loop, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from typing import Any, Callable

from server.app import DEFAULT_MAX_CONCURRENT_REQUESTS, DEFAULT_MAX_REQUEST_BYTES

logger = logging.getLogger("jaxllm.server")


def add_serve_parser(subparsers, add_engine_args: Callable[[argparse.ArgumentParser], None]
                     ) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve the OpenAI-compatible API")
    p.add_argument("model", nargs="?", default=None,
                   help="HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("JAXLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (env JAXLLM_API_KEY)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use (default: the model's name)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
    p.add_argument("--max-concurrent-requests", type=int, default=DEFAULT_MAX_CONCURRENT_REQUESTS,
                   help="requests in flight before answering 429")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM")
    p.add_argument("--log-stats-interval", type=float, default=10.0,
                   help="seconds between throughput log lines (0: off)")
    add_engine_args(p)
    return p


async def serve(engine: Any, *, host: str, port: int, shutdown_timeout: float = 30.0,
                stop: asyncio.Event | None = None, **app_kwargs: Any) -> None:
    """Serves until ``stop`` is set (or SIGTERM/SIGINT), then shuts down gracefully."""
    from aiohttp import web

    from server.app import SERVER_KEY, build_app

    app = build_app(engine, **app_kwargs)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout,
                           access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    logger.info("serving %s on http://%s:%d (OpenAI API under /v1)",
                ", ".join(app[SERVER_KEY].names), host, port)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread / not POSIX
            pass
    try:
        await stop.wait()
        logger.info("shutting down: waiting up to %.0f s for in-flight requests", shutdown_timeout)
    finally:
        await runner.cleanup()


def run_serve(args: argparse.Namespace, engine_kwargs: dict) -> int:
    from jaxllm import AsyncEngine

    engine = AsyncEngine(model=args.model, **engine_kwargs)
    try:
        asyncio.run(serve(engine, host=args.host, port=args.port,
                          shutdown_timeout=args.shutdown_timeout, api_key=args.api_key,
                          served_model_name=args.served_model_name,
                          max_request_bytes=args.max_request_bytes,
                          max_concurrent_requests=args.max_concurrent_requests,
                          log_stats_interval=args.log_stats_interval or None))
    finally:
        engine.shutdown()
    return 0
