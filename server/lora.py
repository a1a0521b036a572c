"""LoRA adapters as served models: vLLM's ``--lora-modules`` and its runtime loading routes.

Each adapter is a model name of its own: a request whose ``model`` names it runs with that
adapter (a ``LoRARequest``), a base model name runs without. Ids are handed out 1, 2, ... in the
order adapters are registered and never reused (vLLM's counter), so an id always means one
adapter's weights: the engine keys the adapter's device slot and prefix-cache pages by it. The
counter is the engine's, not the server's: apps that share an engine share its ids.

Adapters change only on the engine's loop thread, between steps (AsyncEngine's call queue),
and the table of names only on the event loop, under one lock. A request added before an
unload reaches the engine first (the queue is FIFO), so the engine sees it running and
refuses the unload rather than pulling the weights from under it.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import itertools
import os
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from jaxllm.lora.request import LoRARequest

logger = logging.getLogger("jaxllm.server")

# vLLM's switch for /v1/load_lora_adapter and /v1/unload_lora_adapter (off: they are 404s).
RUNTIME_LORA_ENVS = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "JAXLLM_ALLOW_RUNTIME_LORA_UPDATING")


def runtime_lora_updating_allowed() -> bool:
    """vLLM's reading of the variable: "1" or "true" (any case) turns the routes on."""
    return any(os.environ.get(name, "0").strip().lower() in ("1", "true")
               for name in RUNTIME_LORA_ENVS)


@dataclass(frozen=True)
class LoRAModulePath:
    """One ``--lora-modules`` entry (vLLM's class): the served ``name``, the PEFT adapter
    folder ``path``, and the base model it adapts (``parent`` on /v1/models; the first served
    name when None or not a served name)."""

    name: str
    path: str
    base_model_name: str | None = None


_FIELDS = ("name", "path", "base_model_name")


def _from_dict(d: dict, text: str) -> LoRAModulePath:
    unknown = sorted(set(d) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in {text}; the fields are {list(_FIELDS)}")
    for key in ("name", "path"):
        if not isinstance(d.get(key), str) or not d[key].strip():
            raise ValueError(f"{text} needs a non-empty string {key!r}")
    base = d.get("base_model_name")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"base_model_name must be a string in {text}")
    return LoRAModulePath(d["name"].strip(), d["path"].strip(), base)


def lora_modules_of(values: Iterable[Any] | None) -> tuple[LoRAModulePath, ...]:
    """``ServerOptions.lora_modules`` from LoRAModulePaths, dicts of their fields (a Serve
    config file) or flag texts; ValueError for a bad entry or a name given twice."""
    out: list[LoRAModulePath] = []
    for v in values or ():
        if isinstance(v, LoRAModulePath):
            out.append(v)
        elif isinstance(v, dict):
            out.append(_from_dict(v, repr(v)))
        elif isinstance(v, str):
            out.extend(parse_lora_modules([v]))
        else:
            raise ValueError(f"a LoRA module must be name=path or {{\"name\": ..., \"path\": "
                             f"...}}, got {v!r}")
    names = [m.name for m in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"LoRA module name(s) {twice} given more than once")
    return tuple(out)


def parse_lora_modules(values: Iterable[str]) -> list[LoRAModulePath]:
    """``--lora-modules`` entries in vLLM's formats: ``name=path``, a JSON object ``{"name",
    "path", "base_model_name"}`` or a JSON list of such objects; empty entries are skipped.
    ValueError, naming the entry, for anything else. (vLLM reads an entry with a comma as
    JSON; here JSON is what starts with ``{`` or ``[``, so a path may hold commas and ``=``.)"""
    out: list[LoRAModulePath] = []
    for item in values:
        text = (item or "").strip()
        if not text:
            continue
        if text[0] in "{[":
            try:
                value = json.loads(text)
            except ValueError as e:
                raise ValueError(f"invalid JSON {item!r}: {e}") from None
            for d in value if isinstance(value, list) else [value]:
                if not isinstance(d, dict):
                    raise ValueError(f"expected a JSON object (or a list of them), got {item!r}")
                out.append(_from_dict(d, repr(item)))
            continue
        name, eq, path = text.partition("=")
        if not eq or not name.strip() or not path.strip():
            raise ValueError(f"expected name=path or a JSON object {{\"name\": ..., \"path\": "
                             f"...}}, got {item!r}")
        out.append(LoRAModulePath(name.strip(), path.strip()))
    return out


# engine -> its next LoRA ids (see the module docstring)
_ENGINE_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _next_id(engine: Any) -> int:
    return next(_ENGINE_IDS.setdefault(engine, itertools.count(1)))


class LoraError(Exception):
    """A load/unload answer that is not a success, with vLLM's status (400 or 404)."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class LoraModels:
    """The adapters the server serves, by name (vLLM's ``OpenAIServingModels``, its LoRA part).

    ``engine``: an AsyncEngine (its ``add_lora`` / ``remove_lora`` coroutines if it has them,
    else LLMEngine's run through its call queue); ``base_names``: the served base model names,
    which an adapter may not take; ``modules``: the --lora-modules, served from the start (the
    engine reads an adapter when a request first names it; ``preload`` reads them all now)."""

    def __init__(self, engine: Any, base_names: list[str],
                 modules: Iterable[LoRAModulePath] = ()):
        self.engine = engine
        self.base_names = list(base_names)
        self.requests: dict[str, LoRARequest] = {}  # in the order they were loaded
        self._lock = asyncio.Lock()
        for m in modules:
            if m.name in self.base_names:
                raise ValueError(f"--lora-modules {m.name}={m.path}: '{m.name}' is the name of "
                                 "a base model this server serves; give the adapter another "
                                 "name.")
            self.requests[m.name] = self._request(m.name, m.path, m.base_model_name)

    def _request(self, name: str, path: str, base_model_name: str | None) -> LoRARequest:
        # vLLM's rule: base_model_name counts only when it is a served base name
        return LoRARequest(name, _next_id(self.engine), path,
                           base_model_name if base_model_name in self.base_names else None)

    def get(self, name: str | None) -> LoRARequest | None:
        return self.requests.get(name) if name is not None else None

    def parent(self, request: LoRARequest) -> str:
        return request.base_model_name or self.base_names[0]

    async def preload(self) -> None:
        """Reads every adapter served now into the engine (the --lora-modules, at start-up):
        ValueError naming the module that fails, so that a bad path stops the server before
        it accepts requests, as vLLM's."""
        async with self._lock:
            for r in list(self.requests.values()):
                try:
                    await self._engine("add_lora", r)
                except Exception as e:
                    err = self._refused(e, "lora_path")
                    raise ValueError(f"--lora-modules {r.lora_name}={r.lora_path}: "
                                     f"{err.message}") from None

    async def load(self, name: str | None, path: str | None, base_model_name: str | None = None,
                   *, replace: bool = False) -> LoRARequest:
        """vLLM's load_lora_adapter: checks the request, reads the adapter into the engine (so
        a bad folder fails here, not on a later request) and serves it by ``name``.
        ``replace`` (vLLM's load_inplace): a loaded name gets the new weights, under a new id.
        LoraError: 400 (missing fields, name taken, adapter the engine refuses), 404 (no
        adapter at ``path``), 503 (engine down)."""
        async with self._lock:
            if not name or not path:
                raise LoraError(400, "Both 'lora_name' and 'lora_path' must be provided.",
                                param="lora_name" if not name else "lora_path")
            if name in self.base_names:
                raise LoraError(400, f"'{name}' is the name of a base model this server "
                                "serves; give the adapter another lora_name.", param="lora_name")
            old = self.requests.get(name)
            if old is not None and not replace:
                raise LoraError(400, f"The lora adapter '{name}' has already been loaded.",
                                param="lora_name")
            # The id is taken even when the load fails (as vLLM's): a replica that read the
            # adapter before another refused it keeps that id, which must name nothing else.
            request = self._request(name, path, base_model_name)
            try:
                await self._engine("add_lora", request)
            except Exception as e:
                await self._forget(request)  # data parallel: replicas that read it before
                if isinstance(e, FileNotFoundError):
                    raise LoraError(404, str(e), param="lora_path",
                                    code="lora_adapter_not_found") from None
                raise self._refused(e, "lora_path") from None
            if old is not None:  # the old weights go only once the new ones are in
                try:
                    await self._engine("remove_lora", old.lora_int_id)
                except Exception as e:
                    await self._forget(request)
                    raise self._refused(e, "lora_name") from None
            self.requests[name] = request
            logger.info("Loaded new LoRA adapter: name '%s', path '%s' (id %d)", name, path,
                        request.lora_int_id)
            return request

    async def unload(self, name: str | None, lora_int_id: int | None = None) -> LoRARequest:
        """vLLM's unload_lora_adapter, by name or id. The engine refuses while a request uses
        the adapter (LoraError 400, and the adapter stays served); 404 for one not loaded."""
        async with self._lock:
            if not name and lora_int_id is None:
                raise LoraError(400, "Either 'lora_name' or 'lora_int_id' needs to be "
                                "provided.", param="lora_name")
            found = [r for r in self.requests.values()
                     if (not name or r.lora_name == name)
                     and (lora_int_id is None or r.lora_int_id == lora_int_id)]
            if not found:
                what = f"'{name}'" if name else f"with lora_int_id {lora_int_id}"
                raise LoraError(404, f"The lora adapter {what} cannot be found.",
                                param="lora_name" if name else "lora_int_id",
                                code="lora_adapter_not_found")
            request = found[0]
            try:
                await self._engine("remove_lora", request.lora_int_id)
            except Exception as e:
                raise self._refused(e, "lora_name") from None
            del self.requests[request.lora_name]
            logger.info("Removed LoRA adapter: name '%s'", request.lora_name)
            return request

    def _refused(self, e: Exception, param: str) -> LoraError:
        """The engine's refusal as an answer: 503 once the engine is down, else a 400 with
        its message (the adapter's problem, or a request still using it)."""
        if getattr(self.engine, "errored", False) or not getattr(self.engine, "is_running",
                                                                 True):
            return LoraError(503, f"The engine is not available: {e}",
                             code="engine_unavailable")
        if not isinstance(e, (ValueError, OSError)):
            logger.warning("LoRA adapter refused: %r", e)
        return LoraError(400, str(e), param=param)

    async def _forget(self, request: LoRARequest) -> None:
        """Drops an adapter no name serves from the engine (nothing when it does not have it)."""
        try:
            await self._engine("remove_lora", request.lora_int_id)
        except Exception:  # left under an id no name reaches: only its host memory is lost
            logger.warning("could not remove LoRA adapter id %d", request.lora_int_id)

    async def _engine(self, method: str, arg: Any) -> Any:
        """LLMEngine's ``add_lora`` / ``remove_lora`` on the engine's loop thread, between
        steps: AsyncEngine's coroutine of that name if it has one (vLLM's AsyncLLM does), else
        through its call queue."""
        fn = getattr(self.engine, method, None)
        if fn is not None and inspect.iscoroutinefunction(fn):
            return await fn(arg)
        inner = self.engine.engine
        return await self.engine._call(lambda: getattr(inner, method)(arg))
