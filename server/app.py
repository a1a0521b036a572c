"""The OpenAI-compatible routes, auth, limits, errors and SSE streaming, and the aiohttp app.

One ``OpenAIServer`` wraps an ``AsyncEngine`` (which steps the model in its own thread, so
the event loop never waits on the device). Its routes are free of any web framework: they take a
``Call`` (method, path, headers, body) and return a ``Reply`` (a JSON body, or an async iterator of
SSE chunks), so two front ends serve the same code: ``build_app`` (aiohttp, below) and the Ray
Serve deployment (``server/ray_serve.py``), which calls ``OpenAIServer.handle``.

Every generation request asks the engine for DELTA outputs, one per step, even when the client
wants a single JSON answer: the server then sees each step, so it can time the first token, notice
a client that went away within a step, and abort.

Errors are ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape; the Anthropic
routes' in Anthropic's, ``AnthropicAPIError``); bad input is a 4xx, never a 500, and no traceback
ever reaches a client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
import re
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from aiohttp import web
from pydantic import BaseModel, ValidationError

from jaxllm import RequestOutput, SamplingParams
from jaxllm.errors import EngineSleepingError
from jaxllm.pooling_params import PoolingParams
from jaxllm.profiler import profiler_dir
from jaxllm.sampling_params import BeamSearchParams, RequestOutputKind
from server import protocol as P
from server import reasoning as reasoning_lib
from server import anthropic as A
from server import responses as R
from server import tools as tool_lib
from server.lora import (LoraError, LoraModels, LoRAModulePath, lora_modules_of,
                         runtime_lora_updating_allowed)
from server.tools import template_message_tool_calls
from server.metrics import CONTENT_TYPE, ServerMetrics

logger = logging.getLogger("jaxllm.server")

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_CONCURRENT_REQUESTS = 1024
# Clients cannot encode -inf in JSON; OpenAI and vLLM clamp log-probs to this.
MIN_LOGPROB = -9999.0
# chat_template_kwargs must not override how the server itself calls the template.
_RESERVED_TEMPLATE_KWARGS = {"conversation", "chat_template", "tokenize", "return_dict",
                             "return_tensors", "padding", "truncation", "max_length",
                             "add_generation_prompt", "continue_final_message", "tools",
                             "documents", "tokenizer_kwargs", "return_assistant_tokens_mask"}


# -- errors ---------------------------------------------------------------------------------------
class APIError(Exception):
    """An error the client caused or must handle; rendered in OpenAI's shape."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def reply(self) -> "Reply":
        return Reply.json(self.body(), status=self.status, headers=self.headers)

    def response(self) -> web.Response:
        return self.reply().to_aiohttp()


class AnthropicAPIError(APIError):
    """An APIError of the Anthropic routes, in Anthropic's error shape."""

    @classmethod
    def of(cls, e: APIError) -> "AnthropicAPIError":
        return cls(e.status, e.message, param=e.param, code=e.code, headers=e.headers)

    def body(self) -> dict[str, Any]:
        return A.error_body(self.status, self.message)


def internal_error() -> APIError:
    return APIError(500, "Internal server error (details are in the server log).")


# -- the framework-free request and answer --------------------------------------------------------
@dataclass
class Call:
    """One HTTP request as the routes see it. ``gone`` says the client went away (aiohttp); a
    front end that cancels the handler instead (Ray Serve) leaves it False."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes = b""
    gone: Callable[[], bool] = lambda: False
    query: str = ""  # the URL's query string (the dev routes' parameters)


@dataclass
class Reply:
    """A route's answer: ``body`` (str: JSON text), or ``stream``, the SSE chunks (bytes).

    The front end must ``await reply.aclose()`` when done, sent or not: that closes the stream,
    aborts its engine requests and releases its admission slot."""

    status: int = 200
    body: str | bytes = b""
    content_type: str | None = None
    headers: dict[str, str] | None = None
    stream: AsyncIterator[bytes] | None = None
    cleanup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @classmethod
    def json(cls, obj: Any, *, status: int = 200, headers: dict[str, str] | None = None
             ) -> "Reply":
        return cls(status=status, body=json.dumps(obj), content_type="application/json",
                   headers=headers)

    @classmethod
    def sse(cls, stream: AsyncIterator[bytes]) -> "Reply":
        return cls(stream=stream, content_type="text/event-stream",
                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def all_headers(self) -> dict[str, str]:
        h = dict(self.headers or {})
        if self.content_type is not None:
            h["Content-Type"] = (f"{self.content_type}; charset=utf-8" if isinstance(self.body, str)
                                 and self.stream is None else self.content_type)
        return h

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
        while self.cleanup:
            await self.cleanup.pop()()

    def to_aiohttp(self) -> web.Response:
        body = self.body.encode() if isinstance(self.body, str) else self.body
        return web.Response(status=self.status, body=body, headers=self.all_headers())


@dataclass(frozen=True)
class CORS:
    """vLLM's CORS options (--allowed-origins / --allowed-methods / --allowed-headers /
    --allow-credentials; "*" allows all, vLLM's defaults) with the rules of Starlette's
    CORSMiddleware, which vLLM serves behind: a preflight (OPTIONS with Origin and
    Access-Control-Request-Method) is answered here, before the API key is checked, and every
    other reply to a request with an allowed Origin names it. Transport-free, so the aiohttp
    and the Ray Serve front ends share it."""

    origins: tuple[str, ...] = ("*",)
    methods: tuple[str, ...] = ("*",)
    headers: tuple[str, ...] = ("*",)
    credentials: bool = False

    ALL_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
    SAFE_HEADERS = {"accept", "accept-language", "content-language", "content-type"}

    def _origin(self, origin: str) -> str | None:
        """The Access-Control-Allow-Origin value for ``origin``; None: not allowed."""
        if "*" in self.origins:
            return origin if self.credentials else "*"
        return origin if origin in self.origins else None

    def preflight(self, req_headers: Mapping[str, str]) -> Reply | None:
        """The answer to a preflight request, or None when it is not one."""
        origin = req_headers.get("Origin")
        method = req_headers.get("Access-Control-Request-Method")
        if origin is None or method is None:
            return None
        methods = self.ALL_METHODS if "*" in self.methods else self.methods
        h = {"Vary": "Origin", "Access-Control-Max-Age": "600",
             "Access-Control-Allow-Methods": ", ".join(methods)}
        if self.credentials:
            h["Access-Control-Allow-Credentials"] = "true"
        asked = req_headers.get("Access-Control-Request-Headers", "")
        allowed = {x.lower() for x in self.headers} | self.SAFE_HEADERS
        bad = []
        if self._origin(origin) is None:
            bad.append("origin")
        if method not in methods:
            bad.append("method")
        if "*" not in self.headers and any(
                x.strip().lower() not in allowed for x in asked.split(",") if x.strip()):
            bad.append("headers")
        if bad:
            return Reply(status=400, body=f"Disallowed CORS {', '.join(bad)}",
                         content_type="text/plain", headers=h)
        h["Access-Control-Allow-Origin"] = self._origin(origin)
        if asked:
            h["Access-Control-Allow-Headers"] = asked if "*" in self.headers else ", ".join(
                sorted(allowed))
        return Reply(status=200, body="OK", content_type="text/plain", headers=h)

    def reply_headers(self, req_headers: Mapping[str, str]) -> dict[str, str]:
        """The headers a reply to a (non-preflight) request carries."""
        origin = req_headers.get("Origin")
        allow = self._origin(origin) if origin is not None else None
        if allow is None:
            return {}
        h = {"Access-Control-Allow-Origin": allow}
        if allow != "*":
            h["Vary"] = "Origin"
        if self.credentials:
            h["Access-Control-Allow-Credentials"] = "true"
        return h


@dataclass(frozen=True)
class ServerOptions:
    """vLLM's OpenAI-server flags added on top of the routes (``jaxllm serve --help``; both
    front ends' ``build_app`` take one):

    - return_tokens_as_token_ids: log-prob tokens as "token_id:{id}" (a request's field wins);
    - allowed_origins / allowed_methods / allowed_headers / allow_credentials: CORS (None:
      ["*"], vLLM's defaults; ``CORS``);
    - enable_prompt_tokens_details: usage.prompt_tokens_details.cached_tokens;
    - enable_force_include_usage: every stream ends with a usage chunk;
    - trust_request_chat_template: a chat request may bring its own chat_template;
    - enable_log_requests / max_log_len: each request's prompt and params logged, cut to that
      many characters and ids;
    - lora_modules: LoRA adapters served by name (``--lora-modules``; server/lora.py), each
      a LoRAModulePath, a dict of its fields or vLLM's flag text; the engine needs
      enable_lora;
    - enable_request_id_headers: every reply carries ``X-Request-Id``, the request's own
      header or a new id (vLLM's ``--enable-request-id-headers``).
    """

    return_tokens_as_token_ids: bool = False
    allowed_origins: tuple[str, ...] | None = None
    allowed_methods: tuple[str, ...] | None = None
    allowed_headers: tuple[str, ...] | None = None
    allow_credentials: bool = False
    enable_prompt_tokens_details: bool = False
    enable_force_include_usage: bool = False
    trust_request_chat_template: bool = False
    enable_log_requests: bool = False
    max_log_len: int | None = None
    lora_modules: tuple[LoRAModulePath, ...] = ()
    enable_request_id_headers: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_modules", lora_modules_of(self.lora_modules))
        for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
                raise ValueError(f"{name} must be a list of strings, got {v!r}.")
            object.__setattr__(self, name, tuple(v))
        if self.max_log_len is not None and self.max_log_len < 0:
            raise ValueError(f"max_log_len must be >= 0, got {self.max_log_len}.")

    @classmethod
    def of(cls, options: "ServerOptions | dict[str, Any] | None") -> "ServerOptions":
        """A ServerOptions from one, a dict of its fields (Serve config files), or None."""
        if options is None:
            return cls()
        return options if isinstance(options, cls) else cls(**options)

    @property
    def cors(self) -> CORS:
        return CORS(self.allowed_origins or ("*",), self.allowed_methods or ("*",),
                    self.allowed_headers or ("*",), self.allow_credentials)


class _Lease:
    """An admitted request's resources: its engine streams and admission slot. Released when the
    route returns, unless handed to a streaming Reply, which releases them in ``aclose``."""

    def __init__(self, release: Callable[[], None]):
        self._release, self._streams, self.handed_off = release, [], False

    def own(self, stream: AsyncIterator) -> AsyncIterator:
        self._streams.append(stream)
        return stream

    async def close(self) -> None:
        for s in self._streams:
            await s.aclose()
        self._streams = []
        self._release()

    def hand_off(self, reply: Reply) -> Reply:
        self.handed_off = True
        reply.cleanup.append(self.close)
        return reply


# Path -> {method: OpenAIServer route}; both front ends route by this one table (``route_of``).
# A path ending in ``{name}`` takes the rest of the path there, slashes too (model ids have them).
ROUTES: dict[str, dict[str, str]] = {
    "/v1/models": {"GET": "models"},
    "/v1/models/{model}": {"GET": "model"},
    "/v1/completions": {"POST": "completions"},
    "/v1/chat/completions": {"POST": "chat_completions"},
    "/v1/responses": {"POST": "responses"},
    # stored responses (VLLM_ENABLE_RESPONSES_API_STORE=1; server/responses.py)
    "/v1/responses/{response_id}": {"GET": "retrieve_response", "DELETE": "delete_response",
                                     "POST": "cancel_response"},  # POST .../{id}/cancel
    "/v1/embeddings": {"POST": "embeddings"},
    # Anthropic's Messages API (server/anthropic.py), as vLLM serves it
    "/v1/messages": {"POST": "messages"},
    "/v1/messages/count_tokens": {"POST": "count_tokens"},
    "/classify": {"POST": "classify"},
    "/pooling": {"POST": "pooling"},  # vLLM's generic pooling route (LLM.encode's tasks)
    # vLLM's runtime LoRA routes, served only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1
    "/v1/load_lora_adapter": {"POST": "load_lora_adapter"},
    "/v1/unload_lora_adapter": {"POST": "unload_lora_adapter"},
    "/score": {"POST": "score"},
    "/v1/score": {"POST": "score"},
    "/rerank": {"POST": "rerank"},
    "/v1/rerank": {"POST": "rerank"},
    "/v2/rerank": {"POST": "rerank"},
    "/tokenize": {"POST": "tokenize"},
    "/detokenize": {"POST": "detokenize"},
    "/health": {"GET": "health"},
    # vLLM's SageMaker routes: /ping is /health; /invocations picks a route by the body's shape
    "/ping": {"GET": "health", "POST": "health"},
    "/invocations": {"POST": "invocations"},
    "/version": {"GET": "version"},
    "/metrics": {"GET": "metrics_route"},
    "/openapi.json": {"GET": "openapi"},
    # vLLM's profiler routes, served only with JAXLLM_PROFILER_DIR / VLLM_TORCH_PROFILER_DIR
    "/start_profile": {"POST": "start_profile"},
    "/stop_profile": {"POST": "stop_profile"},
    # vLLM's development routes (sleep mode), served only with JAXLLM_SERVER_DEV_MODE=1
    "/sleep": {"POST": "sleep"},
    "/wake_up": {"POST": "wake_up"},
    "/is_sleeping": {"GET": "is_sleeping"},
}
DEV_MODE_ENV = "JAXLLM_SERVER_DEV_MODE"


def route_of(path: str) -> dict[str, str]:
    """{method: route name} for ``path`` (empty: no route), by ``ROUTES``."""
    if path in ROUTES:
        return ROUTES[path]
    for pattern, methods in ROUTES.items():
        head, brace, _ = pattern.partition("{")
        if brace and path.startswith(head) and len(path) > len(head):
            return methods
    return {}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _validation_error(e: ValidationError) -> APIError:
    errs = e.errors(include_url=False)
    parts = []
    for err in errs[:3]:
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field '{loc}' (not supported by this server)")
        elif err["type"] == "missing":
            parts.append(f"missing required field '{loc}'")
        else:
            parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    if len(errs) > 3:
        parts.append(f"(+{len(errs) - 3} more)")
    param = str(errs[0]["loc"][0]) if errs and errs[0]["loc"] else None
    return APIError(400, "Invalid request: " + "; ".join(parts), param=param)


def _param_in(message: str, names) -> str | None:
    """The request field an error message is about (SamplingParams names the field first)."""
    m = re.match(r"\s*(\w+)", message)
    if m and m.group(1) in names:
        return m.group(1)
    for name in names:
        if re.search(rf"\b{name}\b", message):
            return name
    return None


def _gone(request: web.Request) -> bool:
    t = request.transport
    return t is None or t.is_closing()


# -- per-choice accumulation ----------------------------------------------------------------------
@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    finish_sent: bool = False
    started: bool = False  # streaming: the first chunk (role / echo) went out
    prompt_logprobs: Any = None  # the prompt's, when the request asked for them
    cached_tokens: int = 0  # the prompt's prefix-cache hit (RequestOutput.num_cached_tokens)
    t_first: float | None = None
    t_last: float | None = None


@dataclass
class _Prompt:
    ids: list[int]
    text: str | None


# -- the server -----------------------------------------------------------------------------------
class PromptRenderer:
    """Request prompts -> token ids with a tokenizer (the chat template included). The server
    renders with it, and the Ray ingress too, to route a request by its leading pages."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        return self._tokenizer

    @staticmethod
    def _parse(call: Call, model: type[BaseModel]) -> Any:
        obj = OpenAIServer._json_object(call)
        try:
            return model.model_validate(obj)
        except ValidationError as e:
            raise _validation_error(e) from None
        except RecursionError:
            raise APIError(400, "The request body is nested too deeply.") from None

    @staticmethod
    def _json_object(call: Call) -> dict[str, Any]:
        """The request body as a JSON object; a 400 for anything else."""
        try:
            obj = json.loads(call.body, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"The request body is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise APIError(400, "The request body must be a JSON object.")
        return obj

    def first_prompt_ids(self, path: str, body: bytes) -> list[int] | None:
        """The token ids of a completion's (first) or a chat request's prompt; None for other
        routes and for a request the server will refuse (it answers that error itself)."""
        try:
            call = Call("POST", path, {}, body)
            if path == "/v1/completions":
                req = self._parse(call, P.CompletionRequest)
                return self._completion_prompts(req.prompt)[0].ids
            if path == "/v1/chat/completions":
                req = self._parse(call, P.ChatCompletionRequest)
                return self._chat_prompt(req).ids
        except APIError:
            pass
        return None

    def _tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _chat_prompt(self, req: P.ChatCompletionRequest, tools: list[dict] | None = None
                     ) -> _Prompt:
        """A chat request's prompt: its messages through the template with its options."""
        return self._apply_chat_template(
            req.messages, add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            template_kwargs=req.chat_template_kwargs, tools=tools,
            chat_template=req.chat_template, documents=req.documents,
            add_special_tokens=req.add_special_tokens)

    def _apply_chat_template(self, messages: list[P.ChatMessage], *,
                             add_generation_prompt: bool, continue_final_message: bool = False,
                             template_kwargs: dict | None = None,
                             tools: list[dict] | None = None, chat_template: str | None = None,
                             documents: list[dict] | None = None,
                             add_special_tokens: bool = False) -> _Prompt:
        tok = self.tokenizer
        if chat_template is None and not getattr(tok, "chat_template", None):
            raise APIError(400, "This model's tokenizer has no chat template; use "
                           "/v1/completions.", param="messages")
        kwargs = dict(template_kwargs or {})
        bad = sorted(set(kwargs) & _RESERVED_TEMPLATE_KWARGS)
        if bad:
            raise APIError(400, f"chat_template_kwargs may not set {bad}.",
                           param="chat_template_kwargs")
        conv = []
        for m in messages:
            d = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.name:
                d["name"] = m.name
            if m.tool_calls:
                d["tool_calls"] = template_message_tool_calls(m.tool_calls)
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            conv.append(d)
        if tools:
            kwargs["tools"] = tools
        if documents is not None:
            kwargs["documents"] = documents
        if chat_template is not None:
            kwargs["chat_template"] = chat_template
        try:
            text = tok.apply_chat_template(conv, tokenize=False,
                                           add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final_message,
                                           **kwargs)
        except Exception as e:  # jinja's raise_exception, bad roles, bad kwargs: the client's input
            raise APIError(400, f"The chat template could not be applied to these messages: {e}",
                           param="messages") from None
        # The template already holds the special tokens (BOS ...): not added twice, unless the
        # request asks (vLLM's add_special_tokens, default off for chat).
        return _Prompt(self._tokenize(text, add_special_tokens=add_special_tokens), text)

    def _completion_prompts(self, prompt) -> list[_Prompt]:
        if isinstance(prompt, str):
            items: list = [prompt]
        elif prompt and isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise APIError(400, "prompt must not be empty.", param="prompt")
        out = []
        for p in items:
            if isinstance(p, str):
                out.append(_Prompt(self._tokenize(p), p))
            else:
                out.append(_Prompt(list(p), None))
        for p in out:
            if not p.ids:
                raise APIError(400, "The prompt cannot be empty.", param="prompt")
        return out


class OpenAIServer(PromptRenderer):
    def __init__(self, engine: Any, *, api_key: str | Sequence[str] | None,
                 served_model_names: list[str],
                 max_request_bytes: int, max_concurrent_requests: int,
                 log_stats_interval: float | None, enable_auto_tool_choice: bool = False,
                 tool_call_parser: str | None = None, reasoning_parser: str | None = None,
                 options: ServerOptions | dict[str, Any] | None = None):
        self.options = ServerOptions.of(options)
        self.cors: CORS | None = self.options.cors
        self.dev_mode = os.environ.get(DEV_MODE_ENV, "0") == "1"
        self.profiling = profiler_dir() is not None  # vLLM: the routes exist only then
        if reasoning_parser not in (None, *reasoning_lib.REASONING_PARSERS):
            raise ValueError(f"reasoning_parser must be one of "
                             f"{reasoning_lib.REASONING_PARSERS}, got {reasoning_parser!r}.")
        self.reasoning_parser = reasoning_parser
        if tool_call_parser is not None and tool_call_parser not in tool_lib.TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {tool_lib.TOOL_CALL_PARSERS}, "
                             f"got {tool_call_parser!r}.")
        if enable_auto_tool_choice and tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser "
                             f"({' or '.join(tool_lib.TOOL_CALL_PARSERS)}).")
        self.enable_auto_tool_choice = enable_auto_tool_choice
        self.tool_call_parser = tool_call_parser
        self.engine = engine
        # vLLM's --api-key: one key or several, any of which opens the /v1 routes.
        keys = [api_key] if isinstance(api_key, str) else list(api_key or ())
        self.api_keys = tuple(f"Bearer {k}".encode() for k in keys if k)
        self.names = served_model_names
        self.max_request_bytes = max_request_bytes
        self.max_concurrent = max_concurrent_requests
        self.log_stats_interval = log_stats_interval
        self.inflight = 0
        self.metrics = ServerMetrics(engine, served_model_names[0])
        # LoRA adapters, served by their names beside the base names (server/lora.py).
        self.loras = LoraModels(engine, served_model_names, self.options.lora_modules)
        self.runtime_lora_updating = runtime_lora_updating_allowed()
        # vLLM's in-memory Responses store, off unless its variable is set (server/responses.py)
        self.response_store = R.ResponseStore() if R.store_enabled() else None
        self._background: dict[str, asyncio.Task] = {}  # running background responses by id
        if self.runtime_lora_updating:  # vLLM's warning: anyone may swap the weights served
            logger.warning("LoRA dynamic loading & unloading is enabled in the API server "
                           "(/v1/load_lora_adapter, /v1/unload_lora_adapter). This should "
                           "ONLY be used for local development!")
        # The model's generation config defaults (fields a request does not send).
        defaults = getattr(engine, "get_diff_sampling_param", None)
        self.sampling_defaults: dict[str, Any] = defaults() if defaults is not None else {}
        mc = getattr(engine, "model_config", None)
        self.vocab_size = getattr(mc, "vocab_size", None) or len(engine.tokenizer)
        cfg = getattr(engine, "engine_config", None)
        self.max_logprobs = getattr(cfg, "max_logprobs", None)
        from jaxllm import __version__

        self.server_version = __version__
        self._openapi = json.dumps(P.openapi_schema(__version__))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # -- checks before routing (both front ends) ----------------------------------------------
    def check_size(self, content_length: int | None) -> None:
        if (content_length or 0) > self.max_request_bytes:
            raise APIError(413, f"The request body is {content_length} bytes; the "
                           f"limit is {self.max_request_bytes}.", code="request_too_large")

    def check_auth(self, path: str, headers: Mapping[str, str]) -> None:
        if self.api_keys and path.startswith("/v1"):
            got = headers.get("Authorization", "")
            key = headers.get("x-api-key") or headers.get("X-Api-Key")
            if not got and key and path.startswith("/v1/messages"):  # the anthropic SDK's header
                got = f"Bearer {key}"
            got = got.encode()
            ok = False
            for want in self.api_keys:  # every key compared: no early exit to time
                ok |= hmac.compare_digest(got, want)
            if not ok:
                cls = AnthropicAPIError if path.startswith("/v1/messages") else APIError
                raise cls(401, "Invalid or missing API key: send 'Authorization: Bearer "
                          "<key>' (or, on /v1/messages, 'x-api-key: <key>').",
                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @staticmethod
    def no_route(method: str, path: str, allowed: list[str] | None) -> APIError:
        """404 for an unknown path, 405 (with Allow) for a known path and another method."""
        if not allowed:
            return APIError(404, f"No route {method} {path}.", code="not_found")
        return APIError(405, f"Method {method} is not allowed on {path}.",
                        code="method_not_allowed", headers={"Allow": ",".join(allowed)})

    async def handle(self, call: Call) -> Reply:
        """The whole request path (limits, auth, routing, errors) for a front end without its
        own router: Ray Serve. The caller must ``await reply.aclose()``."""
        if self.cors is not None and call.method == "OPTIONS":
            pre = self.cors.preflight(call.headers)
            if pre is not None:
                pre.headers = {**(pre.headers or {}), **self.request_id_header(call.headers)}
                return pre
        try:
            self.check_size(len(call.body))
            self.check_auth(call.path, call.headers)
            methods = route_of(call.path)
            if call.method not in methods:
                raise self.no_route(call.method, call.path, list(methods))
            reply = await getattr(self, methods[call.method])(call)
        except APIError as e:
            reply = e.reply()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("unhandled error on %s %s", call.method, call.path)
            reply = internal_error().reply()
        reply.headers = {**(reply.headers or {}), **self.reply_headers(call.headers)}
        return reply

    def request_id_header(self, req_headers: Mapping[str, str]) -> dict[str, str]:
        """With enable_request_id_headers: ``X-Request-Id``, the request's or a new one."""
        if not self.options.enable_request_id_headers:
            return {}
        return {"X-Request-Id": req_headers.get("X-Request-Id") or uuid.uuid4().hex}

    def reply_headers(self, req_headers: Mapping[str, str]) -> dict[str, str]:
        """The headers the server adds to a (non-preflight) reply: CORS and X-Request-Id."""
        cors = self.cors.reply_headers(req_headers) if self.cors is not None else {}
        return {**cors, **self.request_id_header(req_headers)}

    @staticmethod
    def _base_id(call: Call, body_id: str | None) -> str:
        """A request's id as vLLM forms it: its X-Request-Id header, else the body's
        request_id, else a new one (the reply's id is a prefix and this)."""
        return call.headers.get("X-Request-Id") or body_id or uuid.uuid4().hex

    # -- aiohttp middlewares ------------------------------------------------------------------
    @web.middleware
    async def headers_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        """Outermost: answers CORS preflights (before auth) and adds ``reply_headers`` to
        replies not yet sent (a stream's go out with _aiohttp_route's)."""
        if self.cors is not None and request.method == "OPTIONS":
            pre = self.cors.preflight(request.headers)
            if pre is not None:
                resp = pre.to_aiohttp()
                resp.headers.update(self.request_id_header(request.headers))
                return resp
        resp = await handler(request)
        if not resp.prepared:
            resp.headers.update(self.reply_headers(request.headers))
        return resp

    @web.middleware
    async def error_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            self.check_size(request.content_length)
            return await handler(request)
        except APIError as e:
            return e.response()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
            if e.status in (404, 405):
                allowed = headers["Allow"].split(",") if headers else None
                return self.no_route(request.method, request.path, allowed).response()
            if e.status == 413:
                msg, code = (f"The request body is over the limit of {self.max_request_bytes} "
                             "bytes.", "request_too_large")
            else:
                msg, code = e.reason, None
            return APIError(e.status, msg, code=code, headers=headers).response()
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            logger.exception("unhandled error on %s %s", request.method, request.path)
            return internal_error().response()

    @web.middleware
    async def auth_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        self.check_auth(request.path, request.headers)
        return await handler(request)

    # -- helpers ------------------------------------------------------------------------------
    def _model(self, name: str | None) -> str:
        """The served model a request names: a base name or a LoRA adapter's; 404 else."""
        if name is None:
            return self.names[0]
        if name not in self.names and self.loras.get(name) is None:
            served = self.names + list(self.loras.requests)
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                           f"{', '.join(served)}.", param="model", code="model_not_found")
        return name

    @contextlib.asynccontextmanager
    async def _admit(self) -> AsyncIterator[_Lease]:
        """Counts the request in flight (429 over the limit) until the route returns or, for a
        stream, until its Reply is closed."""
        if self.inflight >= self.max_concurrent:
            raise APIError(429, f"Too many requests in flight ({self.inflight}); retry shortly.",
                           code="too_many_requests", headers={"Retry-After": "1"})
        self.inflight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.inflight -= 1

        lease = _Lease(release)
        try:
            yield lease
        finally:
            if not lease.handed_off:
                await lease.close()

    def _sampling_params(self, req: P._SamplingFields, *, max_tokens: int | None,
                         logprobs: int | None, prompt_logprobs: int | None = None,
                         tools: tool_lib.ToolPlan | None = None) -> SamplingParams:
        # The model's generation config gives what the request leaves out, and caps max_tokens,
        # as in vLLM (jaxllm/loading/generation_config.py).
        defaults = self.sampling_defaults
        if defaults.get("max_tokens") is not None:
            max_tokens = min(x for x in (max_tokens, defaults["max_tokens"]) if x is not None)
        kw: dict[str, Any] = dict(
            n=req.n, max_tokens=max_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos, min_tokens=req.min_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, seed=req.seed, logit_bias=req.logit_bias,
            skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            truncate_prompt_tokens=req.truncate_prompt_tokens, output_kind=RequestOutputKind.DELTA,
            allowed_token_ids=req.allowed_token_ids, bad_words=req.bad_words)
        try:
            so = req.structured_outputs_params()
        except ValueError as e:
            raise APIError(400, str(e), param=_param_in(str(e), [
                "response_format", "structured_outputs", "guided_json", "guided_regex",
                "guided_choice", "guided_grammar", "guided_decoding_backend"])) from None
        forced = tools.structured_outputs() if tools is not None else None
        if forced is not None and req.guided_whitespace_pattern is not None:
            forced.whitespace_pattern = req.guided_whitespace_pattern
        if forced is not None and so is not None:
            raise APIError(400, f"tool_choice {tools.mode!r} cannot be combined with "
                           f"{so[0]}: both constrain the reply.", param="tool_choice")
        if so is not None or forced is not None:
            kw["structured_outputs"] = forced or so[1]
        if tools is not None and tools.keeps_special_tokens:
            kw["skip_special_tokens"] = False  # the parser's marker is a special token
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k",
                     "min_p", "repetition_penalty"):
            v = getattr(req, name)
            if v is None:
                v = defaults.get(name)
            if v is not None:
                kw[name] = v
        try:
            params = SamplingParams(**kw)
            params.verify_for_model(self.vocab_size, self.max_logprobs)
        except (ValueError, TypeError) as e:
            param = _param_in(str(e), list(kw) + ["top_logprobs", "max_completion_tokens"])
            if param == "logprobs" and isinstance(req, P.ChatCompletionRequest):
                param = "top_logprobs"
            raise APIError(400, str(e), param=param) from None
        return params

    @staticmethod
    def _beam_params(req: P._SamplingFields, params: SamplingParams
                     ) -> BeamSearchParams | None:
        """vLLM's use_beam_search: n beams; the other sampling fields are not used (as in
        vLLM), but a constraint on the text is refused rather than dropped."""
        if not req.use_beam_search:
            return None
        if params.structured_outputs is not None:
            raise APIError(400, "use_beam_search cannot be combined with structured outputs or "
                           "a forced tool call.", param="use_beam_search")
        return BeamSearchParams(
            beam_width=params.n, max_tokens=params.max_tokens, ignore_eos=params.ignore_eos,
            temperature=params.temperature, length_penalty=req.length_penalty,
            include_stop_str_in_output=params.include_stop_str_in_output,
            skip_special_tokens=params.skip_special_tokens)

    async def _beam(self, prompt: dict, beam: BeamSearchParams, request_id: str,
                    k: int | None, lora: Any = None) -> AsyncIterator[RequestOutput]:
        """The engine's beam search (under the LoRA adapter ``lora``, when given), its
        log-probs cut to what the request asked: the chosen token and the top ``k`` (None: no
        log-probs)."""
        kw = {} if lora is None else {"lora_request": lora}
        async with contextlib.aclosing(self.engine.beam_search(prompt, request_id, beam,
                                                               **kw)) as g:
            async for out in g:
                for c in out.outputs:
                    c.logprobs = None if k is None else [
                        {t: v for t, v in d.items() if t == tid or (v.rank or k + 1) <= k}
                        for tid, d in zip(c.token_ids, c.logprobs or [])]
                yield out

    async def _merge(self, prompts: list[_Prompt], params: SamplingParams, base_id: str,
                     req: P._SamplingFields | None = None, beam: BeamSearchParams | None = None,
                     lora: Any = None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Runs one engine request per prompt (a beam search with ``beam``), with the request's
        priority and cache_salt, and the LoRA adapter its model names (``lora``, a
        LoRARequest); yields (prompt index, delta output) as they come. Closing this generator
        (client gone, error) cancels and so aborts every request."""
        priority = req.priority if req is not None else 0
        salt = req.cache_salt if req is not None else None

        def run(p: _Prompt, rid: str) -> AsyncIterator[RequestOutput]:
            if self.options.enable_log_requests:  # vLLM's --enable-log-requests line
                m = self.options.max_log_len
                logger.info("Received request %s: prompt: %r, params: %s, prompt_token_ids: %s",
                            rid, p.text if m is None or p.text is None else p.text[:m],
                            beam or params, p.ids if m is None else p.ids[:m])
            prompt = {"prompt_token_ids": p.ids, "prompt": p.text}
            if salt is not None:
                prompt["cache_salt"] = salt
            if beam is not None:
                return self._beam(prompt, beam, rid, params.logprobs, lora)
            kw: dict[str, Any] = {}  # only what is set: engines without LoRA take no such kwarg
            if priority:
                kw["priority"] = priority
            if lora is not None:
                kw["lora_request"] = lora
            return self.engine.generate(prompt, params, rid, **kw)

        gens = [run(p, base_id if len(prompts) == 1 else f"{base_id}-{i}")
                for i, p in enumerate(prompts)]
        if len(gens) == 1:
            async with contextlib.aclosing(gens[0]) as g:
                async for out in g:
                    yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, gen) -> None:
            try:
                async with contextlib.aclosing(gen) as g:
                    async for out in g:
                        queue.put_nowait((i, out, None))
                queue.put_nowait((i, None, None))
            except asyncio.CancelledError:
                raise
            except BaseException as e:
                queue.put_nowait((i, None, e))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
        try:
            remaining = len(tasks)
            while remaining:
                i, out, err = await queue.get()
                if err is not None:
                    raise err
                if out is None:
                    remaining -= 1
                    continue
                yield i, out
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _engine_error(self, e: Exception) -> APIError:
        if isinstance(e, EngineSleepingError):
            return APIError(503, str(e), code="engine_sleeping",
                            headers={"Retry-After": "1"})
        if isinstance(e, ValueError):
            msg = str(e)
            param = "max_tokens" if "context length" in msg else _param_in(
                msg, ["prompt", "logprobs", "priority", "cache_salt"])
            return APIError(400, msg, param=param)
        if isinstance(e, FileNotFoundError):  # a LoRA adapter's folder, read at its first use
            return APIError(400, str(e), param="model")
        if getattr(self.engine, "errored", False) or not getattr(self.engine, "is_running", True):
            return APIError(503, f"The engine is not available: {e}", code="engine_unavailable")
        logger.exception("engine request failed", exc_info=e)
        return internal_error()

    def _record(self, choices: dict[tuple[int, int], _Choice], pi: int, n: int,
                out: RequestOutput, now: float, t0: float) -> list[tuple[int, _Choice, Any]]:
        """Folds one delta output into the per-choice state; returns (index, state, delta) for
        each sample in it. Observes the latency metrics as samples start and finish."""
        res = []
        for c in out.outputs:
            idx = pi * n + c.index
            st = choices.setdefault((pi, c.index), _Choice())
            if out.prompt_logprobs is not None:
                st.prompt_logprobs = out.prompt_logprobs
            st.cached_tokens = max(st.cached_tokens, out.num_cached_tokens or 0)
            if c.token_ids:
                if st.t_first is None:
                    st.t_first = now
                    self.metrics.ttft.observe(now - t0)
                st.t_last = now
            st.text.append(c.text)
            st.token_ids.extend(c.token_ids)
            if c.logprobs:
                st.logprobs.extend(c.logprobs)
            if c.finish_reason is not None and st.finish_reason is None:
                st.finish_reason, st.stop_reason = c.finish_reason, c.stop_reason
                if len(st.token_ids) > 1 and st.t_first is not None:
                    self.metrics.tpot.observe((st.t_last - st.t_first) / (len(st.token_ids) - 1))
            res.append((idx, st, c))
        if out.finished:
            self.metrics.e2e.observe(now - t0)
            self.metrics.request_finished(
                out.outputs[0].finish_reason if out.outputs else None, out.metrics,
                len(out.prompt_token_ids) if out.prompt_token_ids is not None else None, n)
        return res

    def _usage(self, prompt_lens: dict[int, int], choices: dict[tuple[int, int], _Choice]
               ) -> P.UsageInfo:
        pt = sum(prompt_lens.values())
        ct = sum(len(c.token_ids) for c in choices.values())
        details = None
        if self.options.enable_prompt_tokens_details:  # vLLM's flag: the prefix-cache hits
            cached: dict[int, int] = {}
            for (pi, _), c in choices.items():
                cached[pi] = max(cached.get(pi, 0), c.cached_tokens)
            details = P.PromptTokensDetails(cached_tokens=sum(cached.values()))
        return P.UsageInfo(prompt_tokens=pt, completion_tokens=ct, total_tokens=pt + ct,
                           prompt_tokens_details=details)

    # -- logprobs formatting ------------------------------------------------------------------
    def _token_str(self, tid: int, lp: Any, as_ids: bool = False) -> str:
        if as_ids:  # vLLM's return_tokens_as_token_ids: ids survive what text cannot carry
            return f"token_id:{tid}"
        return lp.decoded_token if lp is not None and lp.decoded_token is not None else (
            self._decode_token(tid))

    def _as_ids(self, req: P._SamplingFields) -> bool:
        """The request's return_tokens_as_token_ids, else the server's flag."""
        v = req.return_tokens_as_token_ids
        return self.options.return_tokens_as_token_ids if v is None else v

    def _completion_logprobs(self, token_ids: list[int], logprobs: list[dict | None],
                             offset: int, as_ids: bool = False) -> P.CompletionLogprobs:
        """OpenAI's legacy shape; like vLLM, top_logprobs holds the top k plus the sampled token."""
        out = P.CompletionLogprobs()
        for tid, d in zip(token_ids, logprobs):
            if d is None:  # the first prompt token has no log-prob
                token = self._token_str(tid, None, as_ids)
                out.tokens.append(token)
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
            else:
                lp = d.get(tid)
                token = self._token_str(tid, lp, as_ids)
                out.tokens.append(token)
                out.token_logprobs.append(max(lp.logprob, MIN_LOGPROB) if lp else None)
                out.top_logprobs.append({self._token_str(t, v, as_ids): max(v.logprob,
                                                                            MIN_LOGPROB)
                                         for t, v in d.items()})
            out.text_offset.append(offset)
            offset += len(token)
        return out

    def _chat_logprobs(self, token_ids: list[int], logprobs: list[dict], k: int,
                       as_ids: bool = False) -> P.ChatLogprobs:
        content = []
        for tid, d in zip(token_ids, logprobs):
            lp = d.get(tid)
            token = self._token_str(tid, lp, as_ids)
            top = sorted(((v.rank, t, v) for t, v in d.items()
                          if v.rank is not None and v.rank <= k), key=lambda x: x[0])
            content.append(P.ChatLogprobToken(
                token=token, logprob=max(lp.logprob, MIN_LOGPROB) if lp else MIN_LOGPROB,
                bytes=list(token.encode("utf-8")),
                top_logprobs=[P.TopLogprob(token=(s := self._token_str(t, v, as_ids)),
                                           logprob=max(v.logprob, MIN_LOGPROB),
                                           bytes=list(s.encode("utf-8"))) for _, t, v in top]))
        return P.ChatLogprobs(content=content)

    def _prompt_logprobs(self, plp: Any) -> P.PromptLogprobs | None:
        """vLLM's prompt_logprobs field: per prompt position None (the first) or {token id:
        {logprob, rank, decoded_token}}."""
        if plp is None:
            return None
        return [None if d is None else {
            t: P.PromptLogprob(logprob=max(v.logprob, MIN_LOGPROB), rank=v.rank,
                               decoded_token=self._token_str(t, v)) for t, v in d.items()}
            for d in plp]

    # -- SSE ----------------------------------------------------------------------------------
    @staticmethod
    def _event(payload: BaseModel | str) -> bytes:
        data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=False)
        return f"data: {data}\n\n".encode()

    async def _first(self, stream: AsyncIterator, req: P._SamplingFields
                     ) -> tuple[int, RequestOutput] | None:
        """The first output, so that a request the engine refuses is a plain 4xx response and
        not a stream that starts and then fails."""
        try:
            return await anext(stream)
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            raise
        except Exception as e:
            err = self._engine_error(e)
            if err.param is None and "structured outputs" in err.message:
                # The engine compiles the constraint; the field is the one the request used.
                err.param = req.structured_outputs_field()
            raise err from None

    # -- routes: info -------------------------------------------------------------------------
    async def models(self, call: Call) -> Reply:
        """The base names, then one card per LoRA adapter (as vLLM lists them)."""
        names = self.names + list(self.loras.requests)
        return Reply.json(P.ModelList(data=[self._card(n) for n in names]).model_dump())

    def _card(self, name: str) -> P.ModelCard:
        """A base model's card, or an adapter's: ``root`` its path, ``parent`` its base."""
        lora = self.loras.get(name) if name not in self.names else None
        if lora is not None:
            return P.ModelCard(id=name, root=lora.lora_path, parent=self.loras.parent(lora),
                               max_model_len=self.engine.max_model_len)
        return P.ModelCard(id=name, root=self.engine.model_name,
                           max_model_len=self.engine.max_model_len)

    async def model(self, call: Call) -> Reply:
        """One served model's card (the OpenAI SDK's ``models.retrieve``); 404 for another."""
        return Reply.json(self._card(self._model(call.path[len("/v1/models/"):])).model_dump())

    async def embeddings(self, call: Call) -> Reply:
        """OpenAI's /v1/embeddings, on an engine built with runner="pooling"
        (jaxllm/engine/pooling.py); a 400 from a generating one, as vLLM's."""
        async with self._admit():
            req, model = self._request(call, P.EmbeddingRequest)
            outs = await self._pool("embed", req.input, lambda: PoolingParams(
                dimensions=req.dimensions, normalize=req.normalize,
                truncate_prompt_tokens=req.truncate_prompt_tokens), model,
                ["dimensions", "truncate_prompt_tokens", "input"])
            data = []
            for i, o in enumerate(outs):
                v = o.outputs.embedding
                if req.encoding_format == "base64":
                    v = base64.b64encode(np.asarray(v, "<f4").tobytes()).decode()
                data.append(P.EmbeddingData(embedding=v, index=i))
            n = sum(len(o.prompt_token_ids) for o in outs)
            resp = P.EmbeddingResponse(
                id=f"embd-{self._base_id(call, req.request_id)}", created=int(time.time()),
                model=model, data=data,
                usage=P.UsageInfo(prompt_tokens=n, total_tokens=n))
            return Reply.json(resp.model_dump())

    async def classify(self, call: Call) -> Reply:
        """vLLM's /classify on a sequence classification model (LLMEngine.classify): each
        input's class probabilities and its most likely label; a 400 from other models."""
        async with self._admit():
            req, model = self._request(call, P.ClassificationRequest)
            outs = await self._pool("classify", req.input, lambda: PoolingParams(
                truncate_prompt_tokens=req.truncate_prompt_tokens), model,
                ["truncate_prompt_tokens", "input"])
            labels = getattr(getattr(self.engine, "model_config", None), "id2label", ())
            data = []
            for i, o in enumerate(outs):
                probs = o.outputs.probs
                best = int(np.argmax(probs))
                data.append(P.ClassificationData(
                    index=i, label=labels[best] if best < len(labels) else None, probs=probs,
                    num_classes=len(probs)))
            n = sum(len(o.prompt_token_ids) for o in outs)
            resp = P.ClassificationResponse(
                id=f"classify-{self._base_id(call, req.request_id)}", created=int(time.time()),
                model=model, data=data, usage=P.UsageInfo(prompt_tokens=n, total_tokens=n))
            return Reply.json(resp.model_dump())

    async def pooling(self, call: Call) -> Reply:
        """vLLM's /pooling: LLM.encode's ``task`` (default every token's: token_embed, or
        token_classify on a sequence classifier) over each input; ``data`` nested float lists
        (or base64 of the flattened float32 bytes)."""
        async with self._admit():
            req, model = self._request(call, P.PoolingRequest)
            classifier = getattr(getattr(self.engine, "model_config", None), "num_labels", 0)
            task = req.task or ("token_classify" if classifier else "token_embed")
            outs = await self._pool("encode", req.input, lambda: PoolingParams(
                dimensions=req.dimensions, normalize=req.normalize,
                truncate_prompt_tokens=req.truncate_prompt_tokens), model,
                ["pooling_task", "dimensions", "truncate_prompt_tokens", "input"],
                pooling_task=task)
            data = []
            for i, o in enumerate(outs):
                v = np.asarray(o.outputs.data, "<f4")
                data.append(P.PoolingData(index=i, data=(
                    base64.b64encode(v.tobytes()).decode() if req.encoding_format == "base64"
                    else v.tolist())))
            n = sum(len(o.prompt_token_ids) for o in outs)
            resp = P.PoolingResponse(
                id=f"pool-{self._base_id(call, req.request_id)}", created=int(time.time()),
                model=model, data=data, usage=P.UsageInfo(prompt_tokens=n, total_tokens=n))
            return Reply.json(resp.model_dump())

    async def _pool(self, method: str, inputs: Any, params: Callable[[], PoolingParams],
                    model: str, names: list[str], **kw: Any) -> list:
        """A pooling engine's ``method`` ("embed" / "classify" / "encode", with ``kw``) over a
        request's ``input`` (a 400 when empty) with ``params()``, under the adapter ``model``
        names (if it names one); a ValueError is a 400 naming the first of ``names`` its
        message mentions."""
        try:
            prompts = self._completion_prompts(inputs)
        except APIError:
            raise APIError(400, "input must not be empty (nor hold an empty item).",
                           param="input") from None
        try:
            return await getattr(self.engine, method)(
                [{"prompt_token_ids": p.ids} for p in prompts], params(), **self._lora_kw(model),
                **kw)
        except ValueError as e:
            msg = str(e)
            raise APIError(400, msg, param=_param_in(msg, names)) from None
        except (asyncio.CancelledError, APIError):
            raise
        except Exception as e:
            raise self._engine_error(e) from None

    def _lora_kw(self, model: str) -> dict[str, Any]:
        """``lora_request=`` for the adapter ``model`` names; {} for a base name (engines
        without LoRA take no such keyword)."""
        lora = self.loras.get(model)
        return {} if lora is None else {"lora_request": lora}

    async def _scores(self, texts_1: list[str], texts_2: list[str],
                      truncate_prompt_tokens: int | None, params: tuple[str, str],
                      model: str) -> list:
        """The pair scores of a pooling engine (LLMEngine.score) for /score and /rerank, under
        the adapter ``model`` names (if it names one); ``params``: the request's names of the
        two sides, for the 400s."""
        sides = []
        for texts, name in zip((texts_1, texts_2), params):
            if not texts or not all(texts):
                raise APIError(400, f"{name} must not be empty (nor hold an empty text).",
                               param=name)
            # The texts too: a cross-encoder encodes each pair's texts together.
            sides.append([{"prompt_token_ids": p.ids, "prompt": p.text}
                          for p in self._completion_prompts(list(texts))])
        try:
            return await self.engine.score(
                sides[0], sides[1], PoolingParams(truncate_prompt_tokens=truncate_prompt_tokens),
                **self._lora_kw(model))
        except ValueError as e:
            msg = str(e)
            raise APIError(400, msg, param=_param_in(
                msg, ["truncate_prompt_tokens", *params])) from None
        except (asyncio.CancelledError, APIError):
            raise
        except Exception as e:
            raise self._engine_error(e) from None

    async def score(self, call: Call) -> Reply:
        """vLLM's /score (/v1/score) on an embedding model: the cosine similarity of each
        (text_1, text_2) pair's embeddings, 1:1, 1:N or N:N; a 400 from a generating engine."""
        async with self._admit():
            req, model = self._request(call, P.ScoreRequest)
            one = lambda t: [t] if isinstance(t, str) else list(t)  # noqa: E731
            outs = await self._scores(one(req.text_1), one(req.text_2),
                                      req.truncate_prompt_tokens, ("text_1", "text_2"),
                                      model)
            n = sum(len(o.prompt_token_ids) for o in outs)
            resp = P.ScoreResponse(
                id=f"score-{self._base_id(call, req.request_id)}", created=int(time.time()),
                model=model, usage=P.UsageInfo(prompt_tokens=n, total_tokens=n),
                data=[P.ScoreResponseData(index=i, score=o.outputs.score)
                      for i, o in enumerate(outs)])
            return Reply.json(resp.model_dump())

    async def rerank(self, call: Call) -> Reply:
        """vLLM's /rerank (/v1/rerank, /v2/rerank; Jina's and Cohere's request shape): the
        documents by their score against the query, best first, the first ``top_n`` (0: all)."""
        async with self._admit():
            req, model = self._request(call, P.RerankRequest)
            outs = await self._scores([req.query], req.documents, req.truncate_prompt_tokens,
                                      ("query", "documents"), model)
            results = sorted((P.RerankResult(index=i, relevance_score=o.outputs.score,
                                             document=P.RerankDocument(text=req.documents[i]))
                              for i, o in enumerate(outs)),
                             key=lambda r: -r.relevance_score)
            if req.top_n:
                results = results[:req.top_n]
            n = sum(len(o.prompt_token_ids) for o in outs)
            resp = P.RerankResponse(id=f"rerank-{self._base_id(call, req.request_id)}",
                                    model=model, results=results,
                                    usage=P.RerankUsage(prompt_tokens=n, total_tokens=n))
            return Reply.json(resp.model_dump())

    # -- vLLM's dev routes: sleep mode (LLMEngine.sleep / wake_up) ----------------------------
    def _dev_route(self, call: Call) -> dict[str, list[str]]:
        """The query of a dev route; 404 unless JAXLLM_SERVER_DEV_MODE=1, and the API key
        checked as on /v1."""
        if not self.dev_mode:
            raise self.no_route(call.method, call.path, None)
        self.check_auth("/v1" + call.path, call.headers)
        return urllib.parse.parse_qs(call.query)

    async def _engine_call(self, coro) -> None:
        try:
            await coro
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except RuntimeError as e:  # requests still running
            raise APIError(409, str(e), code="conflict") from None

    async def sleep(self, call: Call) -> Reply:
        q = self._dev_route(call)
        try:
            level = int(q.get("level", ["1"])[-1])
        except ValueError:
            raise APIError(400, "level must be an integer (1 or 2).", param="level") from None
        await self._engine_call(self.engine.sleep(level))
        return Reply(status=200)

    async def wake_up(self, call: Call) -> Reply:
        q = self._dev_route(call)
        await self._engine_call(self.engine.wake_up(q.get("tags")))
        return Reply(status=200)

    async def is_sleeping(self, call: Call) -> Reply:
        self._dev_route(call)
        return Reply.json({"is_sleeping": await self.engine.is_sleeping()})

    # -- vLLM's profiler routes (jaxllm/profiler.py) ------------------------------------------
    def _profile_route(self, call: Call) -> None:
        """404 unless a profiler folder was set when the server started; the API key checked
        as on /v1."""
        if not self.profiling:
            raise self.no_route(call.method, call.path, None)
        self.check_auth("/v1" + call.path, call.headers)

    async def start_profile(self, call: Call) -> Reply:
        self._profile_route(call)
        await self._engine_call(self.engine.start_profile())
        return Reply(status=200)

    async def stop_profile(self, call: Call) -> Reply:
        self._profile_route(call)
        await self._engine_call(self.engine.stop_profile())
        return Reply(status=200)

    # -- vLLM's runtime LoRA routes (server/lora.py) ------------------------------------------
    def _lora_route(self, call: Call) -> None:
        """404, as an unknown route, unless VLLM_ALLOW_RUNTIME_LORA_UPDATING (or
        JAXLLM_ALLOW_RUNTIME_LORA_UPDATING) was "1" / "true" when the server started."""
        if not self.runtime_lora_updating:
            raise self.no_route(call.method, call.path, None)

    @staticmethod
    async def _lora_call(coro) -> Any:
        try:
            return await coro
        except LoraError as e:
            raise APIError(e.status, e.message, param=e.param, code=e.code) from None

    async def load_lora_adapter(self, call: Call) -> Reply:
        """vLLM's: reads the adapter into the engine and serves it by ``lora_name``; 200 with
        vLLM's plain-text message."""
        self._lora_route(call)
        req = self._parse(call, P.LoadLoRAAdapterRequest)
        lora = await self._lora_call(self.loras.load(req.lora_name, req.lora_path,
                                                     replace=req.load_inplace))
        return Reply(body=f"Success: LoRA adapter '{lora.lora_name}' added successfully.",
                     content_type="text/plain")

    async def unload_lora_adapter(self, call: Call) -> Reply:
        """vLLM's: stops serving an adapter (by ``lora_name`` or ``lora_int_id``) and frees it
        in the engine; 200 with vLLM's plain-text message."""
        self._lora_route(call)
        req = self._parse(call, P.UnloadLoRAAdapterRequest)
        lora = await self._lora_call(self.loras.unload(req.lora_name, req.lora_int_id))
        return Reply(body=f"Success: LoRA adapter '{lora.lora_name}' removed successfully.",
                     content_type="text/plain")

    async def health(self, call: Call) -> Reply:
        if getattr(self.engine, "errored", False) or not getattr(self.engine, "is_running", True):
            raise APIError(503, "The engine is not running.", code="engine_unavailable")
        return Reply(status=200)

    def _invocation_routes(self) -> list[tuple[str, type[BaseModel]]]:
        """The routes /invocations may pick for this model, in vLLM's order: chat and
        completions on a generating engine; embeddings (or, on a sequence classifier,
        classify), score, rerank and pooling on a pooling one."""
        if getattr(self.engine, "runner_kind", "generate") != "pooling":
            return [("chat_completions", P.ChatCompletionRequest),
                    ("completions", P.CompletionRequest)]
        if getattr(getattr(self.engine, "model_config", None), "num_labels", 0):
            first = [("classify", P.ClassificationRequest)]
        else:
            first = [("embeddings", P.EmbeddingRequest)]
        return first + [("score", P.ScoreRequest), ("rerank", P.RerankRequest),
                        ("pooling", P.PoolingRequest)]

    async def invocations(self, call: Call) -> Reply:
        """vLLM's /invocations (the SageMaker entry point): the body goes to the first route,
        of those this model serves, whose request model it validates as; failing that, to the
        first whose required fields it has (so that route's 400 names what is wrong: our
        models refuse unknown fields, vLLM's ignore them); a 400 naming the request types
        when neither. Outside /v1, so no API key is asked, as in vLLM."""
        obj = self._json_object(call)
        routes = self._invocation_routes()
        for route, model in routes:
            try:
                model.model_validate(obj)
            except (ValidationError, RecursionError):
                continue
            return await getattr(self, route)(call)
        for route, model in routes:
            if all(k in obj for k, f in model.model_fields.items() if f.is_required()):
                return await getattr(self, route)(call)
        raise APIError(400, "Cannot find suitable handler for request. Expected one of: "
                            f"{[m.__name__ for _, m in routes]}")

    async def version(self, call: Call) -> Reply:
        return Reply.json({"version": self.server_version})

    async def metrics_route(self, call: Call) -> Reply:
        return Reply(body=self.metrics.render(), content_type=CONTENT_TYPE)

    async def openapi(self, call: Call) -> Reply:
        return Reply(body=self._openapi, content_type="application/json")

    async def tokenize(self, call: Call) -> Reply:
        req = self._parse(call, P.TokenizeRequest)
        self._model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "Give exactly one of 'prompt' or 'messages'.", param="prompt")
        if req.messages is not None:
            ids = self._apply_chat_template(req.messages,
                                            add_generation_prompt=req.add_generation_prompt).ids
        else:
            ids = self._tokenize(req.prompt, add_special_tokens=req.add_special_tokens)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return Reply.json(P.TokenizeResponse(
            count=len(ids), max_model_len=self.engine.max_model_len, tokens=ids,
            token_strs=strs).model_dump(exclude_none=True))

    async def detokenize(self, call: Call) -> Reply:
        req = self._parse(call, P.DetokenizeRequest)
        self._model(req.model)
        bad = [t for t in req.tokens if t >= self.vocab_size]
        if bad:
            raise APIError(400, f"Token id {bad[0]} is out of vocabulary (vocab size "
                           f"{self.vocab_size}).", param="tokens")
        try:
            text = self.tokenizer.decode(req.tokens)
        except Exception as e:
            raise APIError(400, f"These tokens cannot be decoded: {e}", param="tokens") from None
        return Reply.json({"prompt": text})

    # -- routes: generation -------------------------------------------------------------------
    def _request(self, call: Call, model_cls: type[BaseModel]) -> tuple[Any, str]:
        """The parsed request and its served model's name (a base name or a LoRA adapter's:
        ``self.loras.get(model)``); a 400 for a field set that this server does not implement
        (the model's ``unsupported()``)."""
        req = self._parse(call, model_cls)
        model = self._model(req.model)
        if (u := req.unsupported()) is not None:
            raise APIError(400, u[1], param=u[0])
        return req, model

    async def completions(self, call: Call) -> Reply:
        async with self._admit() as lease:
            t0 = time.perf_counter()
            req, model = self._request(call, P.CompletionRequest)
            lora = self.loras.get(model)
            prompts = self._completion_prompts(req.prompt)
            echo_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
            self._check_prompt_logprobs(req)
            params = self._sampling_params(
                req, max_tokens=req.max_tokens, logprobs=req.logprobs,
                prompt_logprobs=req.prompt_logprobs if req.prompt_logprobs is not None
                else echo_lp)
            prompts = self._truncated(prompts, params)
            rid = f"cmpl-{self._base_id(call, req.request_id)}"
            beam = self._beam_params(req, params)
            stream = lease.own(self._merge(prompts, params, rid, req, beam, lora))
            first = await self._first(stream, req)
            if req.stream:
                return lease.hand_off(Reply.sse(self._stream_completion(
                    req, model, rid, prompts, stream, first, t0)))
            return await self._full_completion(call, req, model, rid, prompts, stream, first,
                                               t0)

    @staticmethod
    def _check_prompt_logprobs(req: P._SamplingFields) -> None:
        k = req.prompt_logprobs
        if k is not None and req.stream and (k > 0 or k == -1):
            raise APIError(400, "prompt_logprobs are not available when stream=True.",
                           param="prompt_logprobs")

    def _truncated(self, prompts: list[_Prompt], params: SamplingParams) -> list[_Prompt]:
        """The prompts cut to their last ``truncate_prompt_tokens`` tokens (-1: max_model_len),
        here rather than in the engine, so that usage and echo count what ran."""
        k = params.truncate_prompt_tokens
        if k is None:
            return prompts
        k = self.engine.max_model_len if k == -1 else k
        return [p if len(p.ids) <= k else _Prompt(p.ids[-k:], None) for p in prompts]

    def _prompt_text(self, p: _Prompt) -> str:
        return p.text if p.text is not None else self.tokenizer.decode(p.ids)

    async def _full_completion(self, call, req, model, rid, prompts, stream, first, t0):
        n = req.n
        choices: dict[tuple[int, int], _Choice] = {}
        prompt_lens: dict[int, int] = {}
        prompt_lps: dict[int, Any] = {}
        item = first
        try:
            while item is not None:
                pi, out = item
                prompt_lens[pi] = len(out.prompt_token_ids or prompts[pi].ids)
                if out.prompt_logprobs is not None:
                    prompt_lps[pi] = out.prompt_logprobs
                self._record(choices, pi, n, out, time.perf_counter(), t0)
                if call.gone():
                    return Reply(status=499)  # nobody reads it; the requests are aborted
                item = await anext(stream, None)
        except APIError:
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:
            raise self._engine_error(e) from None
        result = []
        for (pi, ci), st in sorted(choices.items()):
            text = "".join(st.text)
            lps = None
            if req.logprobs is not None:
                ids, lp_list, offset = st.token_ids, st.logprobs, 0
                if req.echo:
                    p = prompts[pi]
                    ids = p.ids + ids
                    lp_list = list(prompt_lps.get(pi) or [None] * len(p.ids)) + lp_list
                lps = self._completion_logprobs(ids, lp_list, offset, self._as_ids(req))
            if req.echo:
                text = self._prompt_text(prompts[pi]) + text
            result.append(P.CompletionChoice(
                index=pi * n + ci, text=text, logprobs=lps, finish_reason=st.finish_reason,
                stop_reason=st.stop_reason,
                prompt_logprobs=(self._prompt_logprobs(st.prompt_logprobs)
                                 if req.prompt_logprobs is not None else None),
                prompt_token_ids=prompts[pi].ids if req.return_token_ids else None,
                token_ids=st.token_ids if req.return_token_ids else None))
        resp = P.CompletionResponse(id=rid, created=int(time.time()), model=model, choices=result,
                                    usage=self._usage(prompt_lens, choices))
        return Reply.json(resp.model_dump())

    async def _stream_completion(self, req, model, rid, prompts, stream, first, t0
                                 ) -> AsyncIterator[bytes]:
        """The SSE events of a streamed completion; the front end stops iterating (and closes
        the Reply) when the client goes away."""
        n, created = req.n, int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage
                             or self.options.enable_force_include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        choices: dict[tuple[int, int], _Choice] = {}
        prompt_lens: dict[int, int] = {}
        item = first
        try:
            while item is not None:
                pi, out = item
                prompt_lens[pi] = len(out.prompt_token_ids or prompts[pi].ids)
                chunk_choices = []
                for idx, st, c in self._record(choices, pi, n, out, time.perf_counter(), t0):
                    text, ids, lps = c.text, list(c.token_ids), list(c.logprobs or [])
                    first_chunk = not st.started
                    if req.echo and first_chunk:
                        p = prompts[pi]
                        text = self._prompt_text(p) + text
                        if req.logprobs is not None:
                            plp = out.prompt_logprobs or [None] * len(p.ids)
                            ids, lps = p.ids + ids, list(plp) + lps
                    new_finish = st.finish_reason is not None and not st.finish_sent
                    want_ids = bool(req.return_token_ids)
                    if (not text and not (req.logprobs is not None and ids) and not new_finish
                            and not (want_ids and (first_chunk or c.token_ids))):
                        continue
                    st.started = True
                    st.finish_sent = st.finish_sent or new_finish
                    chunk_choices.append(P.CompletionChoice(
                        index=idx, text=text,
                        logprobs=(self._completion_logprobs(ids, lps, 0, self._as_ids(req))
                                  if req.logprobs is not None else None),
                        finish_reason=st.finish_reason if new_finish else None,
                        stop_reason=st.stop_reason if new_finish else None,
                        prompt_token_ids=prompts[pi].ids if want_ids and first_chunk else None,
                        token_ids=list(c.token_ids) if want_ids else None))
                if chunk_choices:
                    yield self._event(P.CompletionStreamResponse(
                        id=rid, created=created, model=model, choices=chunk_choices,
                        usage=self._usage(prompt_lens, choices) if continuous else None))
                item = await anext(stream, None)
            if include_usage:
                yield self._event(P.CompletionStreamResponse(
                    id=rid, created=created, model=model, choices=[],
                    usage=self._usage(prompt_lens, choices)))
            yield self._event("[DONE]")
        except Exception as e:
            for event in self._stream_error(e):
                yield event

    def _stream_error(self, e: Exception) -> list[bytes]:
        err = e if isinstance(e, APIError) else self._engine_error(e)
        return [self._event(json.dumps(err.body())), self._event("[DONE]")]

    def _chat_setup(self, req: P.ChatCompletionRequest
                    ) -> tuple[_Prompt, SamplingParams, tool_lib.ToolPlan | None, int | None]:
        """A chat request's (prompt, params, tool plan, top-logprobs k or None); shared by
        /v1/chat/completions and /v1/responses (which builds a chat request)."""
        if (u := req.unsupported()) is not None:  # (a response's chat request: its own fields)
            raise APIError(400, u[1], param=u[0])
        try:
            tools = tool_lib.plan(req.tools, req.tool_choice, parallel=req.parallel_tool_calls,
                                  enable_auto=self.enable_auto_tool_choice,
                                  parser=self.tool_call_parser)
        except tool_lib.ToolError as e:
            raise APIError(400, str(e), param=e.param) from None
        if req.chat_template is not None and not self.options.trust_request_chat_template:
            raise APIError(400, "Chat template is passed with request, but "
                           "--trust-request-chat-template is not set. Refused request with "
                           "untrusted chat template.", param="chat_template")
        prompt = self._chat_prompt(req, tools.template_tools if tools is not None else None)
        max_tokens = (req.max_completion_tokens if req.max_completion_tokens is not None
                      else req.max_tokens)
        k = (req.top_logprobs or 0) if req.logprobs else None
        self._check_prompt_logprobs(req)
        params = self._sampling_params(req, max_tokens=max_tokens, logprobs=k,
                                       prompt_logprobs=req.prompt_logprobs, tools=tools)
        [prompt] = self._truncated([prompt], params)
        return prompt, params, tools, k

    async def chat_completions(self, call: Call) -> Reply:
        async with self._admit() as lease:
            t0 = time.perf_counter()
            req, model = self._request(call, P.ChatCompletionRequest)
            lora = self.loras.get(model)
            prompt, params, tools, k = self._chat_setup(req)
            rid = f"chatcmpl-{self._base_id(call, req.request_id)}"
            beam = self._beam_params(req, params)
            stream = lease.own(self._merge([prompt], params, rid, req, beam, lora))
            first = await self._first(stream, req)
            if req.stream:
                return lease.hand_off(Reply.sse(self._stream_chat(req, model, rid, stream, first,
                                                                  t0, k, tools, prompt.ids)))
            return await self._full_chat(call, req, model, rid, prompt, stream, first, t0, k,
                                         tools)

    def _split_reasoning(self, text: str) -> tuple[str | None, str | None]:
        """(the reply's thinking, its answer), each None when absent, under
        --reasoning-parser; without one, (None, the text)."""
        if self.reasoning_parser is None:
            return None, text
        return reasoning_lib.split_reasoning(self.reasoning_parser, text)

    def _reply_message(self, text: str, finish_reason: str | None,
                       tools: tool_lib.ToolPlan | None
                       ) -> tuple[P.ChatResponseMessage, str | None]:
        """The assistant message of a finished reply (its thinking split off, its tool calls
        read out of the answer) and its finish_reason ("tool_calls" when the model chose to
        call: required / auto)."""
        reasoning, answer = self._split_reasoning(text)
        if tools is None or tools.mode == "none":
            return P.ChatResponseMessage(content=answer, reasoning=reasoning), finish_reason
        content, calls = tools.extract(answer or "")
        msg = P.ChatResponseMessage(content=content, reasoning=reasoning, tool_calls=[
            P.ToolCall(id=c.id, function=P.FunctionCall(name=c.name, arguments=c.arguments))
            for c in calls])
        if calls and tools.mode != "named" and finish_reason == "stop":
            finish_reason = "tool_calls"
        return msg, finish_reason

    async def _gather(self, call: Call, stream: AsyncIterator, first, n: int, t0: float
                      ) -> tuple[dict[tuple[int, int], _Choice], RequestOutput | None] | None:
        """A non-streamed chat's (or response's) outputs folded into per-choice states: (the
        states, the last output), or None when the client went away."""
        choices: dict[tuple[int, int], _Choice] = {}
        item, out = first, None
        try:
            while item is not None:
                _, out = item
                self._record(choices, 0, n, out, time.perf_counter(), t0)
                if call.gone():
                    return None
                item = await anext(stream, None)
        except (APIError, asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:
            raise self._engine_error(e) from None
        return choices, out

    @staticmethod
    def _chat_echo(req: P.ChatCompletionRequest) -> str:
        """vLLM's chat echo: the reply starts with the last message when it is the
        assistant's (a continued message); else nothing."""
        last = req.messages[-1]
        return (last.text() or "") if req.echo and last.role == "assistant" else ""

    async def _full_chat(self, call, req, model, rid, prompt, stream, first, t0, k, tools):
        gathered = await self._gather(call, stream, first, req.n, t0)
        if gathered is None:
            return Reply(status=499)
        choices, _ = gathered
        result = []
        echo = self._chat_echo(req)
        for (_, ci), st in sorted(choices.items()):
            message, finish = self._reply_message("".join(st.text), st.finish_reason, tools)
            if echo:
                message.content = echo + (message.content or "")
            result.append(P.ChatChoice(
                index=ci, message=message, finish_reason=finish, stop_reason=st.stop_reason,
                logprobs=(self._chat_logprobs(st.token_ids, st.logprobs, k, self._as_ids(req))
                          if k is not None else None),
                token_ids=st.token_ids if req.return_token_ids else None))
        first = choices.get((0, 0))
        resp = P.ChatCompletionResponse(
            id=rid, created=int(time.time()), model=model, choices=result,
            usage=self._usage({0: len(prompt.ids)}, choices),
            prompt_logprobs=(self._prompt_logprobs(first.prompt_logprobs)
                             if req.prompt_logprobs is not None and first else None),
            prompt_token_ids=prompt.ids if req.return_token_ids else None)
        return Reply.json(resp.model_dump())

    async def _stream_chat(self, req, model, rid, stream, first, t0, k, tools,
                           prompt_ids: list[int] | None = None) -> AsyncIterator[bytes]:
        n, created = req.n, int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage
                             or self.options.enable_force_include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        choices: dict[tuple[int, int], _Choice] = {}
        prompt_lens: dict[int, int] = {}
        # with tools, each choice's text goes through a ToolStream (server/tools.py)
        tool_streams = ({i: tool_lib.ToolStream(tools) for i in range(n)}
                        if tools is not None and tools.mode != "none" else None)
        thinking = ({i: reasoning_lib.ReasoningStream(self.reasoning_parser) for i in range(n)}
                    if self.reasoning_parser is not None else None)

        want_ids = bool(req.return_token_ids)

        def chunk(cs, usage=None, prompt_ids=None):
            return P.ChatCompletionStreamResponse(id=rid, created=created, model=model,
                                                  choices=cs, usage=usage,
                                                  prompt_token_ids=prompt_ids)

        try:
            # OpenAI opens every choice with the role (and vLLM's prompt_token_ids here).
            yield self._event(chunk([P.ChatStreamChoice(
                index=i, delta=P.DeltaMessage(role="assistant", content=""),
                token_ids=[] if want_ids else None)
                for i in range(n)], prompt_ids=prompt_ids if want_ids else None))
            if echo := self._chat_echo(req):
                yield self._event(chunk([P.ChatStreamChoice(
                    index=i, delta=P.DeltaMessage(content=echo)) for i in range(n)]))
            item = first
            while item is not None:
                _, out = item
                prompt_lens[0] = len(out.prompt_token_ids or [])
                cs = []
                for idx, st, c in self._record(choices, 0, n, out, time.perf_counter(), t0):
                    new_finish = st.finish_reason is not None and not st.finish_sent
                    content, calls, finish, reasoning = c.text, None, st.finish_reason, None
                    if thinking is not None:
                        reasoning, content = thinking[idx].feed(c.text, new_finish)
                    if tool_streams is not None:
                        content, calls = tool_streams[idx].feed(content, new_finish)
                        if calls and tools.mode != "named" and finish == "stop":
                            finish = "tool_calls"
                    if (not content and not calls and not reasoning
                            and not ((k is not None or want_ids) and c.token_ids)
                            and not new_finish):
                        continue
                    st.finish_sent = st.finish_sent or new_finish
                    cs.append(P.ChatStreamChoice(
                        index=idx, delta=P.DeltaMessage(content=content, tool_calls=calls or None,
                                                        reasoning=reasoning or None),
                        logprobs=(self._chat_logprobs(list(c.token_ids), list(c.logprobs or []), k,
                                                      self._as_ids(req))
                                  if k is not None else None),
                        finish_reason=finish if new_finish else None,
                        stop_reason=st.stop_reason if new_finish else None,
                        token_ids=list(c.token_ids) if want_ids else None))
                if cs:
                    yield self._event(chunk(cs, self._usage(prompt_lens, choices)
                                            if continuous else None))
                item = await anext(stream, None)
            if include_usage:
                yield self._event(chunk([], self._usage(prompt_lens, choices)))
            yield self._event("[DONE]")
        except Exception as e:
            for event in self._stream_error(e):
                yield event

    # -- /v1/responses (server/responses.py) --------------------------------------------------
    # The chat request's field names in errors, as the Responses API names them.
    _RESPONSES_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens",
                         "response_format": "text", "max_tokens": "max_output_tokens"}

    async def responses(self, call: Call) -> Reply:
        async with self._admit() as lease:
            t0 = time.perf_counter()
            rreq, model = self._request(call, R.ResponsesRequest)
            lora = self.loras.get(model)
            if rreq.background:
                self._check_background(rreq)
            previous = self._previous_messages(rreq.previous_response_id)
            try:
                chat, req = self._as_chat(lambda: rreq.to_chat(previous), "input")
                prompt, params, tools, k = self._chat_setup(req)
                rid = f"resp_{self._base_id(call, rreq.request_id)}"
                stream = lease.own(self._merge([prompt], params, rid, req, lora=lora))
                first = await self._first(stream, req)
            except APIError as e:
                e.param = self._RESPONSES_PARAMS.get(e.param, e.param)
                raise
            keep = self.response_store is not None and rreq.store is not False
            state = R.ResponseState(rreq, model, rid, stored=keep)
            state.messages = chat["messages"] if keep else None
            state.k = k
            if rreq.stream:
                return lease.hand_off(Reply.sse(self._stream_response(
                    state, tools, stream, first, t0, len(prompt.ids))))
            if rreq.background:
                body = state.body("in_progress")
                self.response_store.put(body, [])
                lease.handed_off = True  # the task releases it
                self._background[rid] = asyncio.ensure_future(self._run_in_background(
                    state, tools, stream, first, t0, len(prompt.ids), lease))
                return Reply.json(body)
            gathered = await self._gather(call, stream, first, 1, t0)
            if gathered is None:
                return Reply(status=499)
            self._complete_response(state, tools, *gathered, len(prompt.ids))
            return Reply.json(state.body())

    @staticmethod
    def _as_chat(build: Callable[[], dict[str, Any]], param: str
                 ) -> tuple[dict[str, Any], P.ChatCompletionRequest]:
        """The chat request another API's request translates to (``build()``: its body, as
        /v1/responses and /v1/messages make it) and its body; a 400 for what does not map,
        naming "tools" or ``param``."""
        try:
            chat = build()
            return chat, P.ChatCompletionRequest.model_validate(chat)
        except ValidationError as e:
            raise _validation_error(e) from None
        except (ValueError, KeyError, TypeError) as e:
            msg = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise APIError(400, f"Invalid input: {msg}",
                           param="tools" if "tools" in msg else param) from None

    # -- Anthropic's Messages API (server/anthropic.py) ----------------------------------------

    async def messages(self, call: Call) -> Reply:
        """Anthropic's ``POST /v1/messages`` (the anthropic SDK's ``messages.create``), as a
        chat request; errors in Anthropic's shape."""
        try:
            async with self._admit() as lease:
                t0 = time.perf_counter()
                areq, model = self._request(call, A.MessagesRequest)
                lora = self.loras.get(model)
                _, req = self._as_chat(areq.to_chat, "messages")
                prompt, params, tools, _ = self._chat_setup(req)
                rid = f"msg_{self._base_id(call, areq.request_id)}"
                stream = lease.own(self._merge([prompt], params, rid, req, lora=lora))
                first = await self._first(stream, req)
                if areq.stream:
                    return lease.hand_off(Reply.sse(self._stream_messages(
                        model, rid, tools, stream, first, t0, len(prompt.ids))))
                gathered = await self._gather(call, stream, first, 1, t0)
                if gathered is None:
                    return Reply(status=499)
                choices, out = gathered
                st = choices[(0, 0)]
                reasoning, text, calls = self._reply_parts(st, tools)
                content = ([{"type": "thinking", "thinking": reasoning, "signature": ""}]
                           if reasoning else [])
                if text or not (calls or reasoning):
                    content.append({"type": "text", "text": text})
                content += [A.tool_use_block(c) for c in calls]
                reason, sequence = A.stop_reason(st.finish_reason, st.stop_reason, bool(calls))
                return Reply.json(A.message_body(
                    rid, model, content, reason, sequence, len(prompt.ids), len(st.token_ids),
                    getattr(out, "num_cached_tokens", 0) or 0))
        except APIError as e:
            raise AnthropicAPIError.of(e) from None

    async def count_tokens(self, call: Call) -> Reply:
        """Anthropic's ``POST /v1/messages/count_tokens``: the prompt tokens a Messages
        request would take (its system, messages and tools through the chat template)."""
        try:
            areq, _ = self._request(call, A.CountTokensRequest)
            _, req = self._as_chat(areq.to_chat, "messages")
            if req.tools:  # counted as sent, whatever the choice (no tool-choice checks here)
                req = req.model_copy(update={"tool_choice": "none"})
            prompt, _, _, _ = self._chat_setup(req)
            return Reply.json({"input_tokens": len(prompt.ids)})
        except APIError as e:
            raise AnthropicAPIError.of(e) from None

    def _reply_parts(self, st: _Choice, tools) -> tuple[str | None, str, list]:
        """A finished reply's (thinking, text, tool calls)."""
        reasoning, answer = self._split_reasoning("".join(st.text))
        text, calls = answer or "", []
        if tools is not None and tools.mode != "none":
            content, calls = tools.extract(answer or "")
            text = content or ""
        return reasoning, text, calls

    async def _reply_pieces(self, stream, first, t0, tools, choices: dict, last: list
                            ) -> AsyncIterator[tuple[str, str]]:
        """A one-choice stream's new text, in order, as ("reasoning", piece) (the thinking,
        split off under --reasoning-parser) and ("text", piece): under tools a call's text is
        held back ("auto": until it is known not to be one; a forced call: all of it).
        ``choices`` gets the choice's state (``_record``), ``last`` the last output."""
        thinking = (reasoning_lib.ReasoningStream(self.reasoning_parser)
                    if self.reasoning_parser is not None else None)
        auto = tool_lib.ToolStream(tools) if tools is not None and tools.mode == "auto" else None
        held = tools is not None and tools.mode in ("named", "required")
        item = first
        while item is not None:
            _, out = item
            last[:] = [out]
            for _, st, c in self._record(choices, 0, 1, out, time.perf_counter(), t0):
                new_finish = st.finish_reason is not None and not st.finish_sent
                st.finish_sent = st.finish_sent or new_finish
                text = c.text
                if thinking is not None:
                    reasoning, text = thinking.feed(text, new_finish)
                    if reasoning:
                        yield "reasoning", reasoning
                if held:
                    continue
                if auto is not None:
                    text = auto.feed(text, new_finish)[0] or ""
                if text:
                    yield "text", text
            item = await anext(stream, None)

    async def _stream_messages(self, model: str, rid: str, tools, stream, first, t0,
                               prompt_tokens: int) -> AsyncIterator[bytes]:
        """A Messages stream: a thinking block (--reasoning-parser) as it comes, the text
        block's deltas, then each tool call whole (one input_json_delta), then message_delta
        with the stop reason and message_stop."""
        held = tools is not None and tools.mode in ("named", "required")
        block: list[Any] = [None, 0]  # the open block's kind and index (next index when None)

        def to_block(kind: str, start: dict[str, Any]) -> list[bytes]:
            events = []
            if block[0] == kind:
                return events
            if block[0] is not None:
                events.append(A.event("content_block_stop", index=block[1]))
                block[1] += 1
            block[0] = kind
            events.append(A.event("content_block_start", index=block[1], content_block=start))
            return events

        try:
            yield A.event("message_start", message=A.message_body(
                rid, model, [], None, None, prompt_tokens, 0))
            choices: dict[tuple[int, int], _Choice] = {}
            async for kind, piece in self._reply_pieces(stream, first, t0, tools, choices, []):
                start, delta = ({"type": "thinking", "thinking": "", "signature": ""},
                                {"type": "thinking_delta", "thinking": piece}) \
                    if kind == "reasoning" else ({"type": "text", "text": ""},
                                                 {"type": "text_delta", "text": piece})
                for e in to_block(kind, start):
                    yield e
                yield A.event("content_block_delta", index=block[1], delta=delta)
            st = choices[(0, 0)]
            _, text, calls = self._reply_parts(st, tools)
            if held and not calls and text:  # a forced call cut short: the text after all
                for e in to_block("text", {"type": "text", "text": ""}):
                    yield e
                yield A.event("content_block_delta", index=block[1],
                              delta={"type": "text_delta", "text": text})
            if block[0] is not None:
                yield A.event("content_block_stop", index=block[1])
                block[1] += 1
            for c in calls:
                start = dict(A.tool_use_block(c), input={})
                yield A.event("content_block_start", index=block[1], content_block=start)
                yield A.event("content_block_delta", index=block[1], delta={
                    "type": "input_json_delta", "partial_json": c.arguments})
                yield A.event("content_block_stop", index=block[1])
                block[1] += 1
            reason, sequence = A.stop_reason(st.finish_reason, st.stop_reason, bool(calls))
            yield A.event("message_delta", delta={"stop_reason": reason,
                                                  "stop_sequence": sequence},
                          usage={"output_tokens": len(st.token_ids)})
            yield A.event("message_stop")
        except Exception as e:
            err = e if isinstance(e, APIError) else self._engine_error(e)
            yield A.event("error", error=A.error_body(err.status, err.message)["error"])

    def _complete_response(self, state: R.ResponseState, tools, choices, out,
                           prompt_tokens: int) -> None:
        """A whole (not streamed) reply into the Response: thinking, text, calls, usage."""
        st = choices[(0, 0)]
        state.reasoning, answer = self._split_reasoning("".join(st.text))
        state.text, state.calls = answer or "", []
        if tools is not None and tools.mode != "none":
            content, state.calls = tools.extract(answer or "")
            state.text = content or ""
        self._finish_response(state, st, out, prompt_tokens)

    def _check_background(self, rreq: R.ResponsesRequest) -> None:
        """A 400 for a background request this server cannot keep (as vLLM's)."""
        if self.response_store is None:
            raise APIError(400, "background responses need the response store: start the "
                                "server with VLLM_ENABLE_RESPONSES_API_STORE=1.",
                           param="background")
        if rreq.store is False:
            raise APIError(400, "background responses are stored: store must not be false.",
                           param="store")
        if rreq.stream:
            raise APIError(400, "background responses are not streamed here; poll GET "
                                "/v1/responses/{id} instead.", param="stream")

    async def _run_in_background(self, state: R.ResponseState, tools, stream, first, t0,
                                 prompt_tokens: int, lease: _Lease) -> None:
        """A background response's generation, detached from its connection: stored when it
        ends (done, failed with its error, or cancelled); the admission slot and the engine
        request are released either way."""
        try:
            choices, out = await self._gather(Call("POST", "", {}), stream, first, 1, t0)
            self._complete_response(state, tools, choices, out, prompt_tokens)
        except asyncio.CancelledError:
            self.response_store.put(state.body("cancelled"), [])
        except Exception as e:  # noqa: BLE001 - a failure is the response's status, not a crash
            err = e if isinstance(e, APIError) else self._engine_error(e)
            state.error = {"code": err.code or err.type, "message": err.message}
            self.response_store.put(state.body("failed"), [])
        finally:
            self._background.pop(state.id, None)
            await lease.close()

    def _finish_response(self, state: R.ResponseState, st: _Choice, out: RequestOutput | None,
                         prompt_tokens: int) -> None:
        """The reply's end: its status and usage; the store keeps it (with its conversation)
        when the request asked to."""
        state.finish_reason = st.finish_reason
        state.set_usage(prompt_tokens, len(st.token_ids),
                        getattr(out, "num_cached_tokens", 0) or 0)
        if state.k is not None:  # the chat route's log-probs, as the Responses API words them
            state.logprobs = [e.model_dump() for e in self._chat_logprobs(
                st.token_ids, st.logprobs, state.k).content]
        if state.stored and self.response_store is not None:
            self.response_store.put(state.body(),
                                    [*state.messages, state.assistant_message()])

    def _stored_response(self, rid: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """A stored response (body, conversation); a 404 when there is none by that id."""
        found = self.response_store.get(rid) if self.response_store is not None else None
        if found is None:
            hint = "" if self.response_store is not None else (
                " (this server stores no responses: start it with "
                "VLLM_ENABLE_RESPONSES_API_STORE=1 to keep them)")
            raise APIError(404, f"Response with id '{rid}' not found.{hint}",
                           param="response_id", code="response_not_found")
        return found

    def _previous_messages(self, rid: str | None) -> list[dict[str, Any]]:
        """previous_response_id's conversation as chat messages ([] without one)."""
        if rid is None:
            return []
        try:
            body, messages = self._stored_response(rid)
        except APIError as e:
            e.param = "previous_response_id"
            raise
        if body["status"] == "in_progress":
            raise APIError(400, f"Response '{rid}' is still in progress: continue it once it "
                                "is done.", param="previous_response_id")
        if body["status"] not in ("completed", "incomplete"):  # cancelled / failed: no reply
            raise APIError(400, f"Response '{rid}' is {body['status']}: it has no reply to "
                                "continue from.", param="previous_response_id")
        return messages

    async def retrieve_response(self, call: Call) -> Reply:
        """OpenAI's ``GET /v1/responses/{id}`` (the SDK's ``responses.retrieve``): a stored
        response as it was returned."""
        rid = call.path[len("/v1/responses/"):]
        return Reply.json(self._stored_response(rid)[0])

    async def cancel_response(self, call: Call) -> Reply:
        """OpenAI's ``POST /v1/responses/{id}/cancel``: stops a running background response;
        returns it cancelled. 400 for one that is not running (done, or not background)."""
        rid, slash, action = call.path[len("/v1/responses/"):].rpartition("/")
        if not slash or action != "cancel":
            raise self.no_route(call.method, call.path, None)
        self._stored_response(rid)
        task = self._background.get(rid)
        if task is None:
            raise APIError(400, f"Response '{rid}' is not a running background response: only "
                                "those can be cancelled.", param="response_id")
        task.cancel()
        await asyncio.wait([task])
        return Reply.json(self._stored_response(rid)[0])

    async def delete_response(self, call: Call) -> Reply:
        """OpenAI's ``DELETE /v1/responses/{id}``: forgets a stored response (404: none)."""
        rid = call.path[len("/v1/responses/"):]
        self._stored_response(rid)
        self.response_store.pop(rid)
        return Reply.json({"id": rid, "object": "response.deleted", "deleted": True})

    async def _stream_response(self, state: R.ResponseState, tools, stream, first, t0,
                               prompt_tokens: int) -> AsyncIterator[bytes]:
        """Output items in order: the reasoning (--reasoning-parser; sent whole once the
        thinking ends), the message (its text as deltas), the function calls (whole, at the
        end)."""
        ev = R.EventWriter()
        mid = state.msg_id
        # A forced call's JSON is not text: held back (_reply_pieces), it goes out as the call.
        held = tools is not None and tools.mode in ("named", "required")
        sent = {"reasoning": False, "message": False}
        index = 0  # the next output item's output_index

        def reasoning_events():
            nonlocal index
            if sent["reasoning"] or not state.reasoning:
                return []
            sent["reasoning"] = True
            index += 1
            return [ev("response.output_item.added", output_index=index - 1,
                       item=state.reasoning_item("in_progress")),
                    ev("response.output_item.done", output_index=index - 1,
                       item=state.reasoning_item("completed"))]

        def open_message():
            nonlocal index
            events = reasoning_events()
            sent["message"] = True
            index += 1
            return events + [
                ev("response.output_item.added", output_index=index - 1,
                   item=state.message_item("in_progress", None)),
                ev("response.content_part.added", item_id=mid, output_index=index - 1,
                   content_index=0, part={"type": "output_text", "text": "",
                                          "annotations": [], "logprobs": []})]

        try:
            yield ev("response.created", response=state.body("in_progress"))
            yield ev("response.in_progress", response=state.body("in_progress"))
            choices: dict[tuple[int, int], _Choice] = {}
            last: list = [None]
            async for kind, text in self._reply_pieces(stream, first, t0, tools, choices, last):
                if kind == "reasoning":
                    state.reasoning = (state.reasoning or "") + text
                    continue
                if not sent["message"]:
                    for e in open_message():
                        yield e
                state.text += text
                yield ev("response.output_text.delta", item_id=mid, output_index=index - 1,
                         content_index=0, delta=text, logprobs=[])
            out = last[0]
            st = choices[(0, 0)]
            state.reasoning = state.reasoning or None
            if tools is not None and tools.mode != "none":
                _, answer = self._split_reasoning("".join(st.text))
                content, state.calls = tools.extract(answer or "")
                if held and not state.calls:  # cut short: the text after all
                    state.text = content or ""
            self._finish_response(state, st, out, prompt_tokens)
            for e in reasoning_events():
                yield e
            if sent["message"] or state.text or not (state.calls or state.reasoning):
                if not sent["message"]:
                    for e in open_message():
                        yield e
                    if state.text:
                        yield ev("response.output_text.delta", item_id=mid,
                                 output_index=index - 1, content_index=0, delta=state.text,
                                 logprobs=[])
                mi = index - 1
                part = state.message_item(state.status, state.text)["content"][0]
                yield ev("response.output_text.done", item_id=mid, output_index=mi,
                         content_index=0, text=state.text, logprobs=state.logprobs)
                yield ev("response.content_part.done", item_id=mid, output_index=mi,
                         content_index=0, part=part)
                yield ev("response.output_item.done", output_index=mi,
                         item=state.message_item(state.status, state.text))
            for i, c in enumerate(state.calls, start=index):
                fc = state.call_item(c, "completed")
                yield ev("response.output_item.added", output_index=i,
                         item=state.call_item(c, "in_progress", arguments=""))
                yield ev("response.function_call_arguments.delta", item_id=fc["id"],
                         output_index=i, delta=c.arguments)
                yield ev("response.function_call_arguments.done", item_id=fc["id"],
                         output_index=i, name=c.name, arguments=c.arguments)
                yield ev("response.output_item.done", output_index=i, item=fc)
            kind = "response.completed" if state.status == "completed" else "response.incomplete"
            yield ev(kind, response=state.body())
        except Exception as e:
            err = e if isinstance(e, APIError) else self._engine_error(e)
            yield ev("error", code=err.code, message=err.message, param=err.param)

    # -- periodic log -------------------------------------------------------------------------
    async def _log_stats(self, app: web.Application):
        task = None
        if self.log_stats_interval:
            task = asyncio.create_task(self._log_loop(self.log_stats_interval))
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _log_loop(self, interval: float) -> None:
        last = self.engine.get_stats()
        t_last = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            s, now = self.engine.get_stats(), time.monotonic()
            dt = max(now - t_last, 1e-9)
            prompt_tps = (s.get("prompt_tokens", 0) - last.get("prompt_tokens", 0)) / dt
            gen_tps = (s.get("generation_tokens", 0) - last.get("generation_tokens", 0)) / dt
            if prompt_tps or gen_tps or s["num_running"] or s["num_waiting"]:
                q = s.get("prefix_cache_queries", 0)
                hit = s.get("prefix_cache_hits", 0) / q if q else 0.0
                logger.info("prompt %.1f tok/s, generation %.1f tok/s, running %d, waiting %d, "
                            "KV cache %.1f%%, prefix cache hit rate %.1f%%", prompt_tps, gen_tps,
                            s["num_running"], s["num_waiting"], 100 * s["kv_cache_usage"],
                            100 * hit)
                drafted = (s.get("spec_decode_num_draft_tokens", 0)
                           - last.get("spec_decode_num_draft_tokens", 0))
                if drafted:
                    accepted = (s["spec_decode_num_accepted_tokens"]
                                - last.get("spec_decode_num_accepted_tokens", 0))
                    logger.info("speculative decoding: %d draft tokens, %.1f%% accepted",
                                drafted, 100 * accepted / drafted)
            last, t_last = s, now


def build_app(engine: Any, *, api_key: str | Sequence[str] | None = None,
              served_model_name: str | list[str] | None = None,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
              log_stats_interval: float | None = 10.0, enable_auto_tool_choice: bool = False,
              tool_call_parser: str | None = None, reasoning_parser: str | None = None,
              options: ServerOptions | dict[str, Any] | None = None) -> web.Application:
    """The aiohttp app serving ``engine`` (an AsyncEngine). The engine is the caller's to shut
    down; several apps may share one engine. ``enable_auto_tool_choice`` and
    ``tool_call_parser`` (server/tools.py): vLLM's flags for tool_choice "auto";
    ``reasoning_parser``: vLLM's --reasoning-parser (server/reasoning.py);
    ``options``: vLLM's other server flags (``ServerOptions``)."""
    if served_model_name is None:
        names = [engine.model_name]
    elif isinstance(served_model_name, str):
        names = [served_model_name]
    else:
        names = list(served_model_name) or [engine.model_name]
    srv = OpenAIServer(engine, api_key=api_key, served_model_names=names,
                       max_request_bytes=max_request_bytes,
                       max_concurrent_requests=max_concurrent_requests,
                       log_stats_interval=log_stats_interval,
                       enable_auto_tool_choice=enable_auto_tool_choice,
                       tool_call_parser=tool_call_parser, reasoning_parser=reasoning_parser,
                       options=options)
    app = web.Application(client_max_size=max_request_bytes,
                          middlewares=[srv.headers_middleware, srv.error_middleware,
                                       srv.auth_middleware])
    app[SERVER_KEY] = srv
    app.cleanup_ctx.append(srv._log_stats)
    # The --lora-modules are read before the server accepts requests: a bad one stops it.
    app.on_startup.append(lambda _: srv.loras.preload())
    for path, methods in ROUTES.items():
        for method, name in methods.items():
            add = app.router.add_get if method == "GET" else partial(app.router.add_route, method)
            # "{name}" takes the rest of the path, slashes too (route_of's rule).
            add(re.sub(r"\{(\w+)\}$", r"{\1:.+}", path),
                _aiohttp_route(getattr(srv, name)))  # add_get answers HEAD too
    return app


def _aiohttp_route(route: Callable[[Call], Awaitable[Reply]]):
    """Adapts an OpenAIServer route to aiohttp: reads the body, sends the Reply, streams SSE
    until the client goes away, and always closes the Reply (aborting what is left)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        call = Call(request.method, request.path, request.headers, await request.read(),
                    query=request.query_string,
                    gone=lambda: _gone(request))
        reply = await route(call)
        try:
            if reply.stream is None:
                return reply.to_aiohttp()
            resp = web.StreamResponse(status=reply.status, headers={
                **reply.all_headers(), **route.__self__.reply_headers(request.headers)})
            await resp.prepare(request)
            with contextlib.suppress(ConnectionResetError):  # the client went away
                async for chunk in reply.stream:
                    await resp.write(chunk)
                    if _gone(request):
                        break
            return resp
        finally:
            await reply.aclose()

    return handler


SERVER_KEY = web.AppKey("jaxllm_server", OpenAIServer)
