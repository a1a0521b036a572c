"""Data parallelism: independent engine replicas on disjoint sub-meshes behind one front end.

``data_parallel_size`` replicas, each an ``LLMEngine`` with its own scheduler, page pool,
prefix cache and jitted steps on its own ``[pp, tp]`` devices of the ``(dp, pp, tp)`` mesh
(sharding/mesh.py). A new request goes to the replica with the least outstanding work (the prompt
tokens plus max_tokens of its unfinished requests, counted when each is added and released when
it finishes: vLLM's DP balancer likewise counts queued and running requests); ``step`` steps every replica that has work. Each replica's step is
dispatched asynchronously, so while the host reads one replica's results the others compute.

``create_engine(config)`` is what ``LLM`` and ``AsyncEngine`` call: a plain ``LLMEngine`` when
``data_parallel_size == 1``.
"""

from __future__ import annotations

import logging
from typing import Any

from jaxllm.config import EngineConfig
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import SamplingParams

logger = logging.getLogger("jaxllm")


def create_engine(config: EngineConfig, loaded: Any | None = None):
    """An LLMEngine, or a DataParallelEngine of ``data_parallel_size`` replicas."""
    if config.data_parallel_size == 1:
        return LLMEngine(config, loaded=loaded)
    return DataParallelEngine(config, loaded=loaded)


class _SchedulerView:
    """The counters the server reads from ``engine.scheduler``, summed over replicas."""

    def __init__(self, engines):
        self._engines = engines

    @property
    def num_running(self) -> int:
        return sum(e.scheduler.num_running for e in self._engines)

    @property
    def num_waiting(self) -> int:
        return sum(e.scheduler.num_waiting for e in self._engines)


class _PoolView:
    def __init__(self, engines):
        self._engines = engines

    @property
    def usage(self) -> float:
        return sum(e.page_pool.usage for e in self._engines) / len(self._engines)


class DataParallelEngine:
    """``data_parallel_size`` LLMEngine replicas with LLMEngine's driving interface."""

    def __init__(self, config: EngineConfig, loaded: Any | None = None):
        from sharding.mesh import make_mesh, replica_meshes

        self.config = config
        mesh = make_mesh(config.data_parallel_size, config.pipeline_parallel_size,
                         config.tensor_parallel_size)
        replicas = replica_meshes(mesh)
        first = LLMEngine(config, loaded=loaded, replica=replicas[0])
        # The other replicas copy the first one's weights (no second read of the checkpoint),
        # unless its KV heads were replicated for tp (then its structure differs from the
        # checkpoint's and each replica loads from the source).
        source = loaded if loaded is not None else (
            first.loaded if first.parallel.kv_replication == 1 else None)
        self.engines: list[LLMEngine] = [first] + [
            LLMEngine(config, loaded=source, replica=r) for r in replicas[1:]]
        logger.info("data parallel: %d replicas of %d device(s) each", len(self.engines),
                    len(replicas[0].all_devices))
        self._owner: dict[str, int] = {}  # request id -> replica
        self._work: dict[str, int] = {}  # request id -> estimated tokens still to process
        self._load = [0] * len(self.engines)  # per replica: sum of its requests' _work
        self.scheduler = _SchedulerView(self.engines)
        self.page_pool = _PoolView(self.engines)

    # -- what the front ends read ---------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # tokenizer, model_name, model_config, max_model_len, eos_token_ids, ...: the replicas
        # are identical, so the first one answers.
        if name == "engines":
            raise AttributeError(name)
        return getattr(self.engines[0], name)

    @property
    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for e in self.engines:
            for k, v in e.stats.items():
                if isinstance(v, list):  # per position: summed position by position
                    out[k] = [a + b for a, b in zip(out.get(k, [0] * len(v)), v)]
                else:
                    out[k] = out.get(k, 0) + v
        return out

    @property
    def lora_requests_info(self) -> tuple[float, str, str] | None:
        """The replicas' adapters together (their latest time, the union of the names)."""
        infos = [e.lora_requests_info for e in self.engines if e.lora_requests_info is not None]
        if not infos:
            return None
        def union(i):
            return ",".join(sorted({n for info in infos for n in info[i].split(",") if n}))
        return max(i[0] for i in infos), union(1), union(2)

    @property
    def outstanding_work(self) -> list[int]:
        """Per replica: estimated tokens still to process for its unfinished requests."""
        return list(self._load)

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Any, params: SamplingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0,
                    lora_request: Any = None) -> None:
        if request_id in self._owner:
            raise ValueError(f"request_id {request_id!r} is already in use")
        i = min(range(len(self.engines)), key=lambda j: (self._load[j], j))
        eng = self.engines[i]
        eng.add_request(request_id, prompt, params, arrival_time, priority, lora_request)
        req = eng._requests[request_id]
        work = len(req.prompt_token_ids) + req.params.n * (req.params.max_tokens or 0)
        self._owner[request_id] = i
        self._work[request_id] = work
        self._load[i] += work

    def _done(self, request_id: str) -> None:
        i = self._owner.pop(request_id, None)
        if i is not None:
            self._load[i] -= self._work.pop(request_id)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        i = self._owner.get(request_id)
        if i is None:
            return None
        out = self.engines[i].abort_request(request_id)
        self._done(request_id)
        return out

    def reset_prefix_cache(self) -> bool:
        return all([e.reset_prefix_cache() for e in self.engines])

    # LoRA adapters are known to every replica (a request may go to any).
    def add_lora(self, lora_request: Any) -> bool:
        return all([e.add_lora(lora_request) for e in self.engines])

    def remove_lora(self, lora_id: int) -> bool:
        return any([e.remove_lora(lora_id) for e in self.engines])

    def pin_lora(self, lora_id: int) -> bool:
        return all([e.pin_lora(lora_id) for e in self.engines])

    # Sleep mode and weight updates act on every replica (not just the first, as __getattr__
    # would have it).
    def sleep(self, level: int = 1) -> None:
        for e in self.engines:
            e.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        for e in self.engines:
            e.wake_up(tags)

    def is_sleeping(self) -> bool:
        return any(e.is_sleeping() for e in self.engines)

    def update_weights(self, weights) -> None:
        weights = list(weights)  # each replica reads them all
        for e in self.engines:
            e.update_weights(weights)

    def has_unfinished_requests(self) -> bool:
        return bool(self._owner)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._owner)

    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for eng in self.engines:
            if eng.has_unfinished_requests():
                outputs.extend(eng.step())
        for out in outputs:
            if out.finished:
                self._done(out.request_id)
        return outputs
