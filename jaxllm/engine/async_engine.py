"""AsyncEngine: the LLMEngine driven by a background step loop, for the server.

The loop runs in its own thread, so a step (which blocks on the device) never blocks the asyncio
event loop that serves HTTP. Requests and aborts are handed to the thread through a queue and
applied between steps; each request's outputs come back through an ``asyncio.Queue`` owned by
the caller's event loop (``call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from jaxllm.config import EngineConfig
from jaxllm.engine.data_parallel import create_engine
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger("jaxllm")


class EngineDeadError(RuntimeError):
    """The step loop failed; the engine accepts no more requests."""


def _settle(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, result: Any,
            err: BaseException | None) -> None:
    """Completes ``fut`` (on its loop's thread) with ``result`` or ``err``."""
    def done():
        if not fut.done():
            fut.set_exception(err) if err is not None else fut.set_result(result)
    try:
        loop.call_soon_threadsafe(done)
    except RuntimeError:  # the caller's loop is closed
        pass


class AsyncEngine:
    """``async for out in engine.generate(prompt, params, request_id)``; ``await engine.abort(id)``.

    Outputs follow ``params.output_kind`` (CUMULATIVE by default, DELTA for streaming deltas,
    FINAL_ONLY for one output at the end).
    """

    def __init__(self, config: EngineConfig | None = None, *, engine: LLMEngine | None = None,
                 **kwargs: Any):
        self.engine = engine or create_engine(config or EngineConfig(**kwargs))
        self._cv = threading.Condition()
        self._pending: list[tuple[str, Any, Any]] = []  # ("add", ...) / ("abort", rid)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._error: BaseException | None = None
        self.last_step_time = 0.0
        self._thread = threading.Thread(target=self._loop, name="jaxllm-step-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncEngine":
        return cls(config)

    # -- what the server reads ----------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def runner_kind(self) -> str:
        """"generate" or "pooling" (the engine's)."""
        return self.engine.runner_kind

    @property
    def engine_config(self) -> EngineConfig:
        return self.engine.config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def get_diff_sampling_param(self) -> dict[str, Any]:
        """The model's generation config sampling defaults (LLMEngine.get_diff_sampling_param)."""
        return self.engine.get_diff_sampling_param()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._error is None and not self._stopped

    @property
    def errored(self) -> bool:
        return self._error is not None

    # vLLM's AsyncLLM coroutines, for code written against it.
    async def get_tokenizer(self):
        return self.engine.tokenizer

    async def get_model_config(self):
        return self.engine.model_config

    async def check_health(self) -> None:
        """Raises EngineDeadError when the step loop has failed or was shut down."""
        if self._error is not None:
            raise EngineDeadError(f"the engine loop has failed: {self._error!r}")
        if not self.is_running:
            raise EngineDeadError("the engine is not running")

    def get_stats(self) -> dict[str, Any]:
        """Snapshot for /metrics: queue sizes, KV usage, token, prefix-cache and speculative
        counters (jaxllm/metrics.py)."""
        from jaxllm.metrics import engine_stats

        return engine_stats(self.engine)

    # -- requests -----------------------------------------------------------------------------
    async def generate(self, prompt: Any, sampling_params: SamplingParams | None,
                       request_id: str, *, priority: int = 0,
                       lora_request: Any = None) -> AsyncIterator[RequestOutput]:
        """Streams RequestOutputs for one request. Raises ValueError for a request that can never
        run (before any output); a cancelled consumer aborts the request. ``priority``: with
        scheduling_policy="priority", lower is served first."""
        if self._error is not None:
            raise EngineDeadError(f"the engine loop has failed: {self._error!r}")
        if self._stopped:
            raise EngineDeadError("the engine has been shut down")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._cv:
            if request_id in self._queues:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._queues[request_id] = (loop, queue)
            self._pending.append(("add", request_id, (prompt, sampling_params, priority,
                                                       lora_request)))
            self._cv.notify()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._cv:
                self._queues.pop(request_id, None)
                if not finished:
                    self._pending.append(("abort", request_id, None))
                    self._cv.notify()

    async def beam_search(self, prompt: Any, request_id: str, params: BeamSearchParams,
                          lora_request: Any = None) -> AsyncIterator[RequestOutput]:
        """Beam search (vLLM's ``EngineClient.beam_search``): one finished RequestOutput with a
        CompletionOutput per beam, best first, holding the generated tokens only. Each step's
        beams run as requests ``{request_id}-{step}-{beam}`` (under ``lora_request``'s adapter,
        when given); a cancelled consumer aborts them. Raises ValueError for a request that
        can never run."""
        from jaxllm.engine.beam_search import (BeamSearchInstance, cache_salt, engine_stop_ids,
                                               step_params)

        eng = self.engine
        sp = step_params(params, eng.config.max_logprobs)
        text, ids = eng.prompt_inputs(prompt)
        tok = eng.tokenizer
        inst = BeamSearchInstance(ids, text, params, eos_ids=engine_stop_ids(eng),
                                  eos_token_id=tok.eos_token_id if tok is not None else None,
                                  max_model_len=eng.max_model_len, cache_salt=cache_salt(prompt))

        async def final(p: dict, rid: str) -> RequestOutput:
            last = None
            async for out in self.generate(p, sp, rid, lora_request=lora_request):
                last = out
            return last

        step = 0
        while not inst.done:
            tasks = [asyncio.ensure_future(final(p, f"{request_id}-{step}-{i}"))
                     for i, p in enumerate(inst.prompts())]
            try:
                outs = await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:  # a failed or cancelled step aborts its other beams
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            inst.advance(outs)
            step += 1
        out = inst.request_output(request_id, tok)
        out.lora_request = lora_request
        yield out

    async def _call(self, fn: Any) -> Any:
        """Runs ``fn()`` on the step loop's thread between steps; its result or exception."""
        if self._error is not None or self._stopped:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cv:
            self._pending.append(("call", None, (fn, (loop, fut))))
            self._cv.notify()
        return await fut

    # vLLM's sleep mode and an RL loop's weight sync (LLMEngine's), run between steps.
    async def sleep(self, level: int = 1) -> None:
        await self._call(lambda: self.engine.sleep(level))

    async def wake_up(self, tags: list[str] | None = None) -> None:
        await self._call(lambda: self.engine.wake_up(tags))

    async def start_profile(self) -> None:
        """LLMEngine.start_profile, between steps (the trace starts at a step boundary)."""
        await self._call(self.engine.start_profile)

    async def stop_profile(self) -> None:
        """LLMEngine.stop_profile, between steps."""
        await self._call(self.engine.stop_profile)

    async def is_sleeping(self) -> bool:
        return self.engine.is_sleeping()

    async def update_weights(self, weights) -> None:
        await self._call(lambda: self.engine.update_weights(weights))

    async def embed(self, prompts: list[Any], params: Any = None, lora_request: Any = None
                    ) -> list[Any]:
        """A pooling engine's embeddings (LLMEngine.embed), computed between steps."""
        return await self._call(lambda: self.engine.embed(prompts, params,
                                                          lora_request=lora_request))

    async def encode(self, prompts: list[Any], params: Any = None, lora_request: Any = None,
                     pooling_task: str | None = None) -> list[Any]:
        """A pooling engine's LLMEngine.encode (vLLM's pooling tasks), between steps."""
        return await self._call(lambda: self.engine.encode(
            prompts, params, lora_request=lora_request, pooling_task=pooling_task))

    async def classify(self, prompts: list[Any], params: Any = None, lora_request: Any = None
                       ) -> list[Any]:
        """A sequence classifier's class probabilities (LLMEngine.classify), between steps."""
        return await self._call(lambda: self.engine.classify(prompts, params,
                                                             lora_request=lora_request))

    async def score(self, texts_1: list[Any], texts_2: list[Any],
                    params: Any = None, lora_request: Any = None) -> list[Any]:
        """A pooling engine's pair scores (LLMEngine.score), computed between steps."""
        return await self._call(lambda: self.engine.score(texts_1, texts_2, params,
                                                          lora_request=lora_request))

    async def abort(self, request_id: str) -> None:
        with self._cv:
            self._pending.append(("abort", request_id, None))
            self._cv.notify()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout)

    # -- the loop -----------------------------------------------------------------------------
    def _deliver(self, request_id: str, item: Any) -> None:
        entry = self._queues.get(request_id)
        if entry is not None:
            loop, queue = entry
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass

    def _loop(self) -> None:
        eng = self.engine
        try:
            while True:
                with self._cv:
                    while not self._stopped and not self._pending and not eng.has_unfinished_requests():
                        self._cv.wait()
                    if self._stopped:
                        break
                    pending, self._pending = self._pending, []
                for kind, rid, payload in pending:
                    if kind == "add":
                        prompt, params, priority, lora = payload
                        try:
                            eng.add_request(rid, prompt, params, priority=priority,
                                            lora_request=lora)
                        except Exception as e:  # a bad request: its caller gets the error
                            with self._cv:
                                self._deliver(rid, e)
                    elif kind == "call":  # sleep / wake_up / update_weights, between steps
                        fn, (loop, fut) = payload
                        try:
                            result, err = fn(), None
                        except Exception as e:
                            result, err = None, e
                        _settle(loop, fut, result, err)
                    else:
                        out = eng.abort_request(rid)
                        if out is not None:
                            with self._cv:
                                self._deliver(rid, out)
                if not eng.has_unfinished_requests():
                    continue
                t0 = time.perf_counter()
                outputs = eng.step()
                self.last_step_time = time.perf_counter() - t0
                with self._cv:
                    for out in outputs:
                        self._deliver(out.request_id, out)
        except BaseException as e:  # the engine is broken: fail every waiter, accept nothing more
            logger.exception("engine step loop failed")
            self._error = e
            with self._cv:
                for rid in list(self._queues):
                    self._deliver(rid, EngineDeadError(f"the engine loop has failed: {e!r}"))
        finally:  # calls still queued (a shutdown, a failure) get an answer, not a hang
            with self._cv:
                pending, self._pending = self._pending, []
            for kind, _, payload in pending:
                if kind == "call":
                    _settle(*payload[1], None, EngineDeadError("the engine is not running"))
