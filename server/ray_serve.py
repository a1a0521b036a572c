"""Ray Serve front end: engine replicas behind an OpenAI-compatible ingress (``jaxllm[ray]``).

Two deployments in one application:

- ``JaxLLMEngine``: one ``AsyncEngine`` per replica (``ray_actor_options={"num_gpus": ...}``),
  serving the very routes of the aiohttp server (``OpenAIServer.handle`` in server/app.py) and
  streaming back the Reply: a head (status, headers, which replica) then body or SSE chunks.
  Autoscaling follows ongoing requests (``autoscaling_config={"target_ongoing_requests": ...}``),
  ``max_ongoing_requests`` is the per-replica backpressure, and ``check_health`` raises once the
  engine loop is dead, so Ray replaces the replica. Each replica records its engine figures in
  ``ray.util.metrics`` (server/ray_metrics.py) for fleet-wide Prometheus queries. With
  ``num_hosts_per_replica`` > 1 a replica leads a jax.distributed job over that many nodes
  (server/ray_multihost.py).
- ``OpenAIIngress`` (CPU only): takes the HTTP request, hashes the first pages of the tokenized
  prompt (server/prefix_routing.py) and calls the engine deployment, whose ``PrefixAffinityRouter``
  sends equal keys to one replica unless it is overloaded. A request that no client has seen a
  byte of (a whole JSON answer, or a stream before its first event) is retried on another
  replica when its replica dies or answers that its engine is dead.

From Python: ``serve.run(build_app({"max_model_len": 2048}, num_replicas=2))``; from a Serve
config file: ``import_path: server.ray_serve:app_builder`` with ``args`` holding build_app's
keyword arguments (server/ray_serve.example.yaml); from the shell: ``jaxllm serve --ray``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import ray
from multidict import CIMultiDict
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import PendingRequest, RunningReplica
from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server import prefix_routing
from server.reasoning import REASONING_PARSERS
from server.tools import TOOL_CALL_PARSERS
from server.app import (DEFAULT_MAX_CONCURRENT_REQUESTS, DEFAULT_MAX_REQUEST_BYTES, APIError,
                        Call, OpenAIServer, PromptRenderer, ServerOptions)

logger = logging.getLogger("jaxllm.server")

ENGINE_DEPLOYMENT = "JaxLLMEngine"
INGRESS_DEPLOYMENT = "OpenAIIngress"
REPLICA_HEADER = "X-Jaxllm-Replica"
# Replica losses a request survives before the client sees the error.
DEFAULT_MAX_RETRIES = 3
# An LLM replica batches hundreds of sequences; Ray Serve's default of 5 would starve it.
DEFAULT_MAX_ONGOING_REQUESTS = 256
_RETRIABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class PrefixAffinityRouter(PowerOfTwoChoicesRequestRouter):
    """Ray Serve request router for ``JaxLLMEngine``: requests carrying a ``route_key`` keyword
    go to their rendezvous-hash replica unless it is overloaded (server/prefix_routing.py);
    replicas that answered with a dead engine (``avoid``) are tried last; requests without a
    key are routed by Ray's power of two choices."""

    def initialize_state(self, imbalanced_threshold: float =
                         prefix_routing.DEFAULT_IMBALANCED_THRESHOLD) -> None:
        self._imbalanced_threshold = imbalanced_threshold

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        kwargs = pending_request.kwargs if pending_request is not None else {}
        key, avoid = kwargs.get("route_key"), set(kwargs.get("avoid") or ())
        if key is None and not avoid:
            return await super().choose_replicas(candidate_replicas, pending_request)
        by_id = {r.replica_id.to_full_id_str(): r for r in candidate_replicas}
        lens, unknown = {}, []
        for rid, r in by_id.items():
            n = self._replica_queue_len_cache.get(r.replica_id)
            if n is None:
                unknown.append(r)
            else:
                lens[rid] = n
        if unknown:
            for r, n in await self._probe_queue_lens(unknown, 0):
                if n is not None:
                    lens[r.replica_id.to_full_id_str()] = n
        order = prefix_routing.choose_order(key, list(by_id), lens, self._imbalanced_threshold)
        order = [r for r in order if r not in avoid] + [r for r in order if r in avoid]
        if pending_request is not None:  # all replicas ranked: none accepting means back off
            pending_request.routing_context.should_backoff = True
        return [[by_id[rid]] for rid in order]


class EngineServer:
    """One engine replica: an AsyncEngine and the OpenAI routes over it."""

    def __init__(self, engine_args: dict[str, Any], served_model_name: str | list[str] | None,
                 api_key: str | list[str] | None, max_request_bytes: int,
                 max_concurrent_requests: int,
                 num_hosts: int = 1, actor_options: dict[str, Any] | None = None,
                 metrics_interval_s: float = 5.0, server_options: dict[str, Any] | None = None):
        self.followers: list[Any] = []
        # vLLM's server batch defaults, on the leader and its followers alike.
        engine_args = {"usage_context": "server", **engine_args}
        if num_hosts > 1:  # process 0 of a jax.distributed job: before anything touches JAX
            from server.ray_multihost import start_followers
            from sharding import distributed

            leader, self.followers = start_followers(num_hosts, actor_options or {}, engine_args)
            distributed.initialize(**leader)
        from jaxllm import AsyncEngine

        self.engine = AsyncEngine(**engine_args)
        names = ([served_model_name] if isinstance(served_model_name, str)
                 else list(served_model_name or []) or [self.engine.model_name])
        self.server = OpenAIServer(self.engine, api_key=api_key, served_model_names=names,
                                   max_request_bytes=max_request_bytes,
                                   max_concurrent_requests=max_concurrent_requests,
                                   log_stats_interval=None, **(server_options or {}))
        self.replica_id = serve.get_replica_context().replica_id.to_full_id_str()
        from server.ray_metrics import RayEngineMetrics

        self.metrics = RayEngineMetrics(self.engine, names[0], self.replica_id)
        self.metrics.start(metrics_interval_s)

    async def handle(self, method: str, path: str, headers: dict[str, str], body: bytes, *,
                     route_key: bytes | None = None, avoid: tuple[str, ...] = (),
                     query: str = "") -> AsyncIterator[dict | bytes]:
        """Yields the head ``{"status", "headers", "stream", "replica"}``, then the body (one
        bytes item) or the SSE chunks. ``route_key``/``avoid`` are read by the router only."""
        reply = await self.server.handle(Call(method, path, CIMultiDict(headers), body,
                                              query=query))
        try:
            yield {"status": reply.status, "headers": reply.all_headers(),
                   "stream": reply.stream is not None, "replica": self.replica_id}
            if reply.stream is None:
                yield reply.body.encode() if isinstance(reply.body, str) else reply.body
            else:
                async for chunk in reply.stream:
                    yield chunk
        finally:
            await reply.aclose()

    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def page_size(self) -> int:
        return self.engine.engine_config.page_size

    def stats(self) -> dict[str, Any]:
        """This replica's id and engine counters (prefix-cache hits included)."""
        import jax

        return {"replica": self.replica_id, "num_processes": jax.process_count(),
                "num_devices": jax.device_count(), **self.engine.get_stats()}

    def export_metrics(self) -> dict[str, float]:
        """Records the engine figures in ``ray.util.metrics`` now (the thread does it every
        ``metrics_interval_s``) and returns the values exported."""
        return self.metrics.update()

    def check_health(self) -> None:
        if not self.engine.is_running:
            raise RuntimeError(f"replica {self.replica_id}: the engine loop is not running")
        if self.followers:
            from server.ray_multihost import followers_alive

            if not followers_alive(self.followers):
                raise RuntimeError(f"replica {self.replica_id}: a follower host's process ended; "
                                   "the replica's collectives cannot complete")

    def __del__(self):
        if getattr(self, "metrics", None) is not None:
            self.metrics.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        for ref in getattr(self, "followers", ()):
            ray.cancel(ref, force=True)


class OpenAIIngress:
    """HTTP entry: routes by prompt prefix, retries requests no client has seen a byte of."""

    def __init__(self, engine: DeploymentHandle, prefix_routing_pages: int, max_retries: int):
        self.engine = engine
        self.routing_pages = prefix_routing_pages
        self.max_retries = max_retries
        self._renderer: PromptRenderer | None = None
        self._page_size = 0
        self._lock = asyncio.Lock()

    async def _route_key(self, path: str, body: bytes) -> bytes | None:
        if path not in ("/v1/completions", "/v1/chat/completions") or self.routing_pages == 0:
            return None
        async with self._lock:  # the engine's own tokenizer, fetched once
            if self._renderer is None:
                tok = await self.engine.tokenizer.remote()
                self._page_size = await self.engine.page_size.remote()
                self._renderer = PromptRenderer(tok)
        ids = self._renderer.first_prompt_ids(path, body)
        return None if ids is None else prefix_routing.prefix_key(ids, self._page_size,
                                                                  self.routing_pages)

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        path, method = request.url.path, request.method
        headers = dict(request.headers)
        key = await self._route_key(path, body)
        avoid: list[str] = []
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            gen = self.engine.options(stream=True).handle.remote(
                method, path, headers, body, route_key=key, avoid=tuple(avoid),
                query=request.url.query)
            try:
                head = await anext(gen)
                if not head["stream"]:
                    content = b"".join([c async for c in gen])
                    if head["status"] == 503 and not last:  # that replica's engine is dead
                        avoid.append(head["replica"])
                        continue
                    return Response(content, status_code=head["status"],
                                    headers=_headers(head))
                first = await anext(gen, b"")
            except _RETRIABLE as e:
                gen.cancel()
                if last:
                    return _error(503, f"The engine replica failed: {e}", "engine_unavailable")
                logger.warning("replica lost before the answer started (%s); retrying", e)
                await asyncio.sleep(min(0.1 * 2 ** attempt, 2.0))
                continue
            except BackPressureError as e:
                return _error(429, f"Every replica is at capacity: {e}", "too_many_requests",
                              {"Retry-After": "1"})
            return StreamingResponse(_relay(first, gen), status_code=head["status"],
                                     headers=_headers(head))
        raise AssertionError("unreachable")


def _headers(head: dict) -> dict[str, str]:
    return {**head["headers"], REPLICA_HEADER: head["replica"]}


def _error(status: int, message: str, code: str, headers: dict | None = None) -> Response:
    body = APIError(status, message, code=code).reply().body
    return Response(body, status_code=status, media_type="application/json", headers=headers)


async def _relay(first: bytes, gen) -> AsyncIterator[bytes]:
    """The SSE stream after its first event; a replica lost now ends it with an error event
    (the client has seen tokens, so it cannot be retried)."""
    try:
        if first:
            yield first
        async for chunk in gen:
            yield chunk
    except _RETRIABLE as e:
        err = APIError(503, f"The engine replica failed mid-stream: {e}",
                       code="engine_unavailable")
        yield OpenAIServer._event(err.reply().body)
        yield OpenAIServer._event("[DONE]")
    finally:
        gen.cancel()


def build_app(engine_args: dict[str, Any] | None = None, *, num_replicas: int | str | None = None,
              autoscaling_config: dict[str, Any] | None = None,
              ray_actor_options: dict[str, Any] | None = None,
              max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS,
              max_queued_requests: int = -1,
              served_model_name: str | list[str] | None = None,
              api_key: str | list[str] | None = None,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
              prefix_routing_pages: int = prefix_routing.DEFAULT_ROUTING_PAGES,
              imbalanced_threshold: float = prefix_routing.DEFAULT_IMBALANCED_THRESHOLD,
              num_ingress_replicas: int = 1, max_retries: int = DEFAULT_MAX_RETRIES,
              health_check_period_s: float = 10.0, num_hosts_per_replica: int = 1,
              metrics_interval_s: float = 5.0, enable_auto_tool_choice: bool = False,
              tool_call_parser: str | None = None, reasoning_parser: str | None = None,
              options: ServerOptions | dict[str, Any] | None = None) -> serve.Application:
    """The Serve application: ``serve.run(build_app(...))``.

    ``engine_args``: EngineConfig keywords (``{"model": "/path", "max_model_len": 4096}``).
    ``num_replicas`` or ``autoscaling_config`` (Ray's keys: ``min_replicas``, ``max_replicas``,
    ``target_ongoing_requests``, ...), not both. ``ray_actor_options`` per engine replica
    (default ``{"num_cpus": 1}``; ``{"num_gpus": 1}`` for one GPU each).
    ``max_ongoing_requests``: requests a replica holds before the router looks elsewhere;
    ``max_queued_requests`` (-1: unbounded) beyond which callers get 429.
    ``prefix_routing_pages``: leading pages hashed for affinity (0: load-only routing).
    ``metrics_interval_s``: how often each replica records its engine figures in
    ``ray.util.metrics`` (server/ray_metrics.py), which Ray's metrics agents export fleet-wide.
    ``num_hosts_per_replica`` > 1: each replica is a jax.distributed job over that many nodes
    (one placement-group bundle of ``ray_actor_options``' resources per node, STRICT_SPREAD;
    server/ray_multihost.py); size ``tensor_parallel_size`` to all its hosts' devices.
    ``enable_auto_tool_choice`` / ``tool_call_parser`` / ``reasoning_parser`` / ``options``
    (``ServerOptions``, or a dict of its fields): as the aiohttp server's (server/tools.py,
    server/reasoning.py, server/app.py).
    """
    engine_args = dict(engine_args or {})
    from jaxllm import EngineConfig

    EngineConfig(**engine_args)  # bad engine arguments fail here, not in every replica
    if num_replicas is not None and autoscaling_config is not None:
        raise ValueError("Give num_replicas or autoscaling_config, not both "
                         f"(num_replicas={num_replicas}, autoscaling_config={autoscaling_config}).")
    for name, v, lo in (("max_ongoing_requests", max_ongoing_requests, 1),
                        ("prefix_routing_pages", prefix_routing_pages, 0),
                        ("num_ingress_replicas", num_ingress_replicas, 1),
                        ("max_retries", max_retries, 0),
                        ("num_hosts_per_replica", num_hosts_per_replica, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}.")
    if tool_call_parser not in (None, *TOOL_CALL_PARSERS):
        raise ValueError(f"tool_call_parser must be one of {TOOL_CALL_PARSERS}, got "
                         f"{tool_call_parser!r}.")
    if enable_auto_tool_choice and tool_call_parser is None:
        raise ValueError("enable_auto_tool_choice needs a tool_call_parser.")
    if reasoning_parser not in (None, *REASONING_PARSERS):
        raise ValueError(f"reasoning_parser must be one of {REASONING_PARSERS}, got "
                         f"{reasoning_parser!r}.")
    server_options = {"enable_auto_tool_choice": enable_auto_tool_choice,
                    "tool_call_parser": tool_call_parser, "reasoning_parser": reasoning_parser,
                    "options": ServerOptions.of(options)}
    if not metrics_interval_s > 0:
        raise ValueError(f"metrics_interval_s must be > 0, got {metrics_interval_s!r}.")
    actor_options = dict(ray_actor_options or {"num_cpus": 1})
    if num_hosts_per_replica > 1 and engine_args.get("pipeline_parallel_size", 1) > 1:
        raise ValueError(f"num_hosts_per_replica={num_hosts_per_replica} needs "
                         "pipeline_parallel_size=1 (got "
                         f"{engine_args['pipeline_parallel_size']}): pipeline stages do not span "
                         "hosts; use tensor_parallel_size over all hosts' devices.")
    options: dict[str, Any] = dict(
        name=ENGINE_DEPLOYMENT, max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests,
        ray_actor_options=actor_options, health_check_period_s=health_check_period_s,
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={"imbalanced_threshold": imbalanced_threshold}))
    if num_hosts_per_replica > 1:
        from server.ray_multihost import placement_options

        options.update(placement_options(num_hosts_per_replica, actor_options))
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = 1 if num_replicas is None else num_replicas
    engine = serve.deployment(EngineServer).options(**options).bind(
        engine_args, served_model_name, api_key, max_request_bytes, max_concurrent_requests,
        num_hosts_per_replica, actor_options, metrics_interval_s, server_options)
    ingress = serve.deployment(OpenAIIngress).options(
        name=INGRESS_DEPLOYMENT, num_replicas=num_ingress_replicas,
        max_ongoing_requests=max(max_ongoing_requests * 4, 1024),
        ray_actor_options={"num_cpus": 0})
    return ingress.bind(engine, prefix_routing_pages, max_retries)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For Serve config files: ``import_path: server.ray_serve:app_builder``, ``args`` =
    build_app's keyword arguments (``engine_args``, ``num_replicas``, ...)."""
    return build_app(**args)
