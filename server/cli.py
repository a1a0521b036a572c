"""``jaxllm serve [MODEL]``: start the engine, serve the OpenAI-compatible API, stop on SIGTERM.

Shutdown: stop accepting connections, give in-flight requests ``--shutdown-timeout`` seconds to
finish (aiohttp then cancels their handlers, which aborts their engine requests), stop the
engine's loop, exit 0.

``jaxllm serve --ray --num-replicas N``: the same API from N engine replicas under Ray Serve
(server/ray_serve.py), on the Ray cluster this machine is part of (``ray start``), else on a
local one started here; SIGTERM deletes the Serve app.
"""

from __future__ import annotations

import argparse
import json
import ssl
import asyncio
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

from server.app import DEFAULT_MAX_CONCURRENT_REQUESTS, DEFAULT_MAX_REQUEST_BYTES
from server.lora import lora_modules_of
from server.reasoning import REASONING_PARSERS
from server.tools import TOOL_CALL_PARSERS

logger = logging.getLogger("jaxllm.server")


def add_serve_parser(subparsers, add_engine_args: Callable[[argparse.ArgumentParser], None]
                     ) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve the OpenAI-compatible API")
    p.add_argument("model", nargs="?", default=None,
                   help="HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    env_key = os.environ.get("JAXLLM_API_KEY") or os.environ.get("VLLM_API_KEY")
    p.add_argument("--api-key", nargs="+", default=[env_key] if env_key else None,
                   metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1 routes, one "
                   "of these keys (env JAXLLM_API_KEY, or vLLM's VLLM_API_KEY)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use (default: the model's name)")
    p.add_argument("--lora-modules", nargs="+", action=_LoraModules, default=None,
                   metavar="MODULE",
                   help="LoRA adapters served as models of their own (needs --enable-lora): "
                        "name=path, or JSON '{\"name\": ..., \"path\": ..., "
                        "\"base_model_name\": ...}' (vLLM's formats); "
                        "/v1/load_lora_adapter adds more with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
    p.add_argument("--max-concurrent-requests", type=int, default=DEFAULT_MAX_CONCURRENT_REQUESTS,
                   help="requests in flight before answering 429")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM")
    p.add_argument("--log-stats-interval", type=float, default=10.0,
                   help="seconds between throughput log lines (0: off)")
    p.add_argument("--disable-log-stats", action="store_true",
                   help="no throughput log lines (vLLM's; --log-stats-interval 0)")
    p.add_argument("--disable-log-requests", action="store_true",
                   help="accepted for vLLM's older command lines: requests are not logged "
                        "unless --enable-log-requests")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='tool_choice "auto": the model decides to call tools, in the format '
                        "--tool-call-parser reads (server/tools.py)")
    p.add_argument("--tool-call-parser", default=None, choices=TOOL_CALL_PARSERS,
                   help="how tool calls are read out of a reply under tool_choice auto")
    p.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSERS,
                   help="return a reasoning model's <think> part as the message's reasoning "
                        "(server/reasoning.py)")
    c = p.add_argument_group("CORS (vLLM's options; JSON lists, default [\"*\"])")
    c.add_argument("--allowed-origins", type=_json_list, default=None)
    c.add_argument("--allowed-methods", type=_json_list, default=None)
    c.add_argument("--allowed-headers", type=_json_list, default=None)
    c.add_argument("--allow-credentials", action="store_true")
    t = p.add_argument_group("TLS (vLLM's flags)")
    t.add_argument("--ssl-keyfile", default=None, help="the server's private key (PEM)")
    t.add_argument("--ssl-certfile", default=None, help="the server's certificate (PEM)")
    t.add_argument("--ssl-ca-certs", default=None, help="CA certificates for client certificates")
    t.add_argument("--ssl-cert-reqs", type=int, default=0, choices=[0, 1, 2],
                   help="client certificates: 0 none, 1 optional, 2 required (Python's ssl)")
    p.add_argument("--enable-request-id-headers", action="store_true",
                   help="every reply carries X-Request-Id: the request's own header, or a new "
                        "id (a request's X-Request-Id always names it, as vLLM's)")
    p.add_argument("--enable-log-requests", action="store_true",
                   help="log each request's prompt and sampling params (INFO)")
    p.add_argument("--max-log-len", type=int, default=None,
                   help="characters / token ids of a prompt --enable-log-requests logs")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="let a chat request bring its own chat_template (Jinja runs on the "
                        "server: trust the clients)")
    p.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="usage.prompt_tokens_details.cached_tokens: the prefix-cache hits")
    p.add_argument("--enable-force-include-usage", action="store_true",
                   help="every stream ends with a usage chunk, asked for or not")
    p.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help='log-prob tokens as "token_id:{id}" (a request\'s '
                        "return_tokens_as_token_ids overrides), as vLLM's")
    d = p.add_argument_group("Multi-host (jax.distributed; sharding/distributed.py)")
    d.add_argument("--distributed", action="store_true",
                   help="join a jax.distributed job: process 0 serves, the others follow its steps")
    d.add_argument("--coordinator-address", default=None,
                   help="host:port of process 0 (env JAXLLM_COORDINATOR_ADDRESS)")
    d.add_argument("--num-processes", type=int, default=None,
                   help="processes (hosts) in the job (env JAXLLM_NUM_PROCESSES)")
    d.add_argument("--process-id", type=int, default=None,
                   help="this process's rank, 0 = leader (env JAXLLM_PROCESS_ID)")
    r = p.add_argument_group("Ray Serve (pip install 'jaxllm[ray]')")
    r.add_argument("--ray", action="store_true",
                   help="serve engine replicas under Ray Serve instead of one in-process engine")
    r.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, a cluster started here with "
                   "`ray start`, else a new local one)")
    r.add_argument("--num-replicas", type=int, default=1,
                   help="engine replicas (the minimum when --max-replicas autoscales)")
    r.add_argument("--max-replicas", type=int, default=None,
                   help="autoscale between --num-replicas and this on ongoing requests")
    r.add_argument("--target-ongoing-requests", type=float, default=32.0,
                   help="autoscaling target: ongoing requests per replica")
    r.add_argument("--max-ongoing-requests", type=int, default=256,
                   help="requests one replica holds before the router looks elsewhere")
    r.add_argument("--num-gpus-per-replica", type=float, default=None,
                   help="default: 1 when the cluster has GPUs, else 0")
    r.add_argument("--num-hosts-per-replica", type=int, default=1,
                   help="nodes each replica spans (one jax.distributed process per node; size "
                   "-tp to all their devices)")
    r.add_argument("--prefix-routing-pages", type=int, default=4,
                   help="leading prompt pages hashed for replica affinity (0: load only)")
    add_engine_args(p)
    return p


class _LoraModules(argparse.Action):
    """``--lora-modules`` (vLLM's formats, server/lora.py): the entries as LoRAModulePaths,
    those of a repeated flag added to the earlier ones; an argparse error names a bad one."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            modules = lora_modules_of([*(getattr(namespace, self.dest) or ()), *values])
        except ValueError as e:
            parser.error(f"{option_string}: {e}")
        setattr(namespace, self.dest, list(modules))


def check_serve_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks across ``jaxllm serve`` flags that argparse cannot make, before anything loads
    (vLLM's: --lora-modules needs --enable-lora)."""
    if getattr(args, "lora_modules", None) and not getattr(args, "enable_lora", False):
        parser.error("--lora-modules needs --enable-lora (the engine's LoRA slots).")


def ray_app_kwargs(args: argparse.Namespace, engine_kwargs: dict, num_gpus: float
                   ) -> dict[str, Any]:
    """build_app's keyword arguments from ``jaxllm serve --ray`` flags."""
    if args.num_replicas < 1:
        raise ValueError(f"--num-replicas must be >= 1, got {args.num_replicas}.")
    kw: dict[str, Any] = dict(
        engine_args={"model": args.model, **engine_kwargs},
        ray_actor_options={"num_cpus": 1, "num_gpus": num_gpus},
        max_ongoing_requests=args.max_ongoing_requests, api_key=args.api_key,
        served_model_name=args.served_model_name, max_request_bytes=args.max_request_bytes,
        max_concurrent_requests=args.max_concurrent_requests,
        prefix_routing_pages=args.prefix_routing_pages,
        num_hosts_per_replica=args.num_hosts_per_replica,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
        options=server_options(args))
    if args.max_replicas is not None:
        if args.max_replicas < args.num_replicas:
            raise ValueError(f"--max-replicas ({args.max_replicas}) must be >= --num-replicas "
                             f"({args.num_replicas}).")
        kw["autoscaling_config"] = {"min_replicas": args.num_replicas,
                                    "initial_replicas": args.num_replicas,
                                    "max_replicas": args.max_replicas,
                                    "target_ongoing_requests": args.target_ongoing_requests}
    else:
        kw["num_replicas"] = args.num_replicas
    return kw


def run_ray_serve(args: argparse.Namespace, engine_kwargs: dict) -> int:
    """``jaxllm serve --ray``: deploys the Serve app and waits for SIGTERM/SIGINT."""
    if getattr(args, "ssl_certfile", None) is not None:
        raise ValueError("--ssl-* are the aiohttp server's; with --ray, set TLS in Ray Serve's "
                         "HTTP options (its proxy terminates the connections).")
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ValueError("--ray needs Ray Serve: pip install 'jaxllm[ray]'") from None
    from server.ray_serve import build_app

    ray.init(address=args.ray_address)
    gpus = args.num_gpus_per_replica
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU") else 0.0
    app = build_app(**ray_app_kwargs(args, engine_kwargs, gpus))
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="jaxllm", route_prefix="/")
    logger.info("Ray Serve: %d replica(s) serving on http://%s:%d (OpenAI API under /v1)",
                args.num_replicas, args.host, args.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    logger.info("shutting down the Serve app")
    serve.delete("jaxllm")
    ray.shutdown()
    return 0


def _json_list(text: str) -> list[str]:
    """A CORS flag's value: a JSON list of strings, as vLLM takes it."""
    try:
        v = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a JSON list, got {text!r}") from None
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
    return v


def server_options(args: argparse.Namespace) -> Any:
    """The ``ServerOptions`` (server/app.py) the flags give, for both front ends' build_app."""
    import dataclasses

    from server.app import ServerOptions

    return ServerOptions(**{f.name: getattr(args, f.name)
                            for f in dataclasses.fields(ServerOptions)})


def ssl_context(certfile: str | None, keyfile: str | None = None, ca_certs: str | None = None,
                cert_reqs: int = 0) -> ssl.SSLContext | None:
    """vLLM's --ssl-* flags as a server context (None: plain HTTP). ``cert_reqs``: Python's
    ssl.CERT_NONE (0), CERT_OPTIONAL (1) or CERT_REQUIRED (2) for client certificates, checked
    against ``ca_certs``."""
    if certfile is None:
        if keyfile is not None or ca_certs is not None:
            raise ValueError("--ssl-keyfile / --ssl-ca-certs need --ssl-certfile "
                             "(ssl_certfile).")
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certfile, keyfile)
    if ca_certs is not None:
        ctx.load_verify_locations(ca_certs)
    ctx.verify_mode = ssl.VerifyMode(cert_reqs)
    return ctx


async def serve(engine: Any, *, host: str, port: int, shutdown_timeout: float = 30.0,
                stop: asyncio.Event | None = None, started_at: float | None = None,
                ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
                ssl_ca_certs: str | None = None, ssl_cert_reqs: int = 0,
                **app_kwargs: Any) -> None:
    """Serves until ``stop`` is set (or SIGTERM/SIGINT), then shuts down gracefully.
    ``started_at`` (a ``time.perf_counter()`` value from before the engine was built): the
    start-up time (load + compile of every bucket) is logged when the server accepts requests.
    ``ssl_*``: HTTPS (``ssl_context``)."""
    from aiohttp import web

    from server.app import SERVER_KEY, build_app

    tls = ssl_context(ssl_certfile, ssl_keyfile, ssl_ca_certs, ssl_cert_reqs)
    app = build_app(engine, **app_kwargs)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout,
                           access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls)
    await site.start()
    logger.info("serving %s on %s://%s:%d (OpenAI API under /v1)",
                ", ".join(app[SERVER_KEY].names), "https" if tls else "http", host, port)
    if started_at is not None:
        logger.info("ready %.1f s after start (model load + compile of every step bucket)",
                    time.perf_counter() - started_at)
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


def serve_engine_kwargs(args: argparse.Namespace, engine_kwargs: dict) -> dict:
    """The engine's settings for ``jaxllm serve``: vLLM's server batch defaults, and the
    reasoning parser handed to structured outputs too (a grammar then starts after the
    thinking, as in vLLM)."""
    kw = {**engine_kwargs, "usage_context": "server"}
    if getattr(args, "reasoning_parser", None) is not None:
        so = dict(kw.get("structured_outputs_config") or {})
        so.setdefault("reasoning_parser", args.reasoning_parser)
        kw["structured_outputs_config"] = so
    return kw


def run_serve(args: argparse.Namespace, engine_kwargs: dict) -> int:
    started_at = time.perf_counter()
    engine_kwargs = serve_engine_kwargs(args, engine_kwargs)
    if args.ray:
        return run_ray_serve(args, engine_kwargs)
    if getattr(args, "distributed", False):
        from sharding import distributed

        addr, n, pid = distributed.resolve_args(args.coordinator_address, args.num_processes,
                                                args.process_id)
        if pid != 0:  # a follower: no server, the leader's steps until it exits
            distributed.run_follower(addr, n, pid, dict(model=args.model, **engine_kwargs))
            return 0
        distributed.initialize(addr, n, pid)
    from jaxllm import AsyncEngine

    engine = AsyncEngine(model=args.model, **engine_kwargs)
    try:
        asyncio.run(serve(engine, host=args.host, port=args.port,
                          shutdown_timeout=args.shutdown_timeout, started_at=started_at,
                          api_key=args.api_key,
                          served_model_name=args.served_model_name,
                          max_request_bytes=args.max_request_bytes,
                          max_concurrent_requests=args.max_concurrent_requests,
                          log_stats_interval=None if args.disable_log_stats else
                          (args.log_stats_interval or None),
                          enable_auto_tool_choice=args.enable_auto_tool_choice,
                          tool_call_parser=args.tool_call_parser,
                          reasoning_parser=args.reasoning_parser,
                          ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                          ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs,
                          options=server_options(args)))
    finally:
        engine.shutdown()
    return 0
