"""LLMEngine: requests in, RequestOutputs out, one scheduler step at a time.

    add_request() -> Scheduler.waiting
    step():  Scheduler.schedule() -> ModelRunner.execute() (jitted: forward, KV write, sample)
             -> Scheduler.update() -> detokenize + stop checks -> Scheduler.finish() -> outputs

The LLM (batch) and AsyncEngine (server) front-ends both drive this class.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import itertools
import logging
import math
import os
import time
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import EngineConfig, ModelConfig, resolve_dtype
from jaxllm.engine import sampler as sampler_lib
from jaxllm.engine.detokenizer import OutputProcessor
from jaxllm.engine.model_runner import ModelRunner, default_token_buckets, kv_page_bytes
from jaxllm.engine.scheduler import Scheduler, SchedulerOutput
from jaxllm.engine.sequence import Sequence, SequenceStatus
from jaxllm.errors import EngineSleepingError
from jaxllm.kv_cache.page_pool import PagePool
from jaxllm.kv_cache.prefix_cache import PrefixCache
from jaxllm.metrics import ITERATION_TOKEN_BUCKETS, MAX_TOKENS_BUCKETS
from jaxllm.models.b1_mgpu import b1_mgpu_enabled
from jaxllm.outputs import Logprob, RequestOutput, RequestStateStats
from jaxllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("jaxllm")

# Without an explicit num_pages on a host without memory stats (CPU), the pool gets this much.
_CPU_KV_BUDGET_BYTES = 1 << 30
# Batch limits when the config leaves them None: vLLM's EngineArgs.get_batch_defaults (vllm/engine/arg_utils.py): a GPU of >= 70 GiB that is
# not an A100 gets the large budget (vLLM measured large token budgets to cost an A100
# throughput, PR #17885). Values: (max_num_batched_tokens per usage context, max_num_seqs).
_LARGE_GPU_BATCH_LIMITS = ({"llm": 16384, "server": 8192}, 1024)
_GPU_BATCH_LIMITS = ({"llm": 8192, "server": 2048}, 256)
# The CPU is for development and tests: a small budget (and buckets growing 4x) keeps start-up
# compiles to a handful of seconds each.
_CPU_BATCH_LIMITS = ({"llm": 1024, "server": 1024}, 256)
_LARGE_GPU_BYTES = 70 * 2**30
# The CPU is for development and tests: the reference attention reads max_model_len slots per
# token, so the CPU default context is capped (an explicit max_model_len is honoured).
_CPU_DEFAULT_MAX_MODEL_LEN = 2048
_FINAL_ONLY, _DELTA = RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA


@dataclasses.dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seqs: list[Sequence]
    processors: list[OutputProcessor]
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # Tokens the last DELTA output already reported, per sibling.
    sent: list[int] = dataclasses.field(default_factory=list)
    num_cached_tokens: int = 0
    lora_request: Any = None
    stats: RequestStateStats = dataclasses.field(default_factory=RequestStateStats)

    @property
    def finished(self) -> bool:
        for s in self.seqs:  # a loop, not all(genexpr): per request per step
            if not s.status.is_finished:
                return False
        return True


@dataclasses.dataclass
class _InFlight:
    """A dispatched step whose results are still on the device."""

    sched: SchedulerOutput
    output_indices: list[int | None]  # per scheduled entry: its placeholder's output index
    out: Any  # sampler output (device arrays)
    prompt_lp: Any  # prompt log-probs (device arrays) or None
    needs_tokens_on_host: bool  # the next sampler inputs need its tokens (late sampling)
    with_logprobs: bool = True  # False: only out.token_ids is read back (no row wants log-probs)
    num_steps: int = 1  # > 1: a multi-step launch; out's arrays have a leading [num_steps] axis
    # Speculative steps: per scheduled entry, its first row of out (entries with a draft have
    # 1 + num_spec rows); None: row i is entry i.
    sample_rows: list[int] | None = None


def default_batch_limits(platform: str, device_kind: str, device_bytes: int | None,
                         usage_context: str) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) for a config that leaves them None: vLLM's
    defaults for the device (``_LARGE_GPU_BATCH_LIMITS`` and below). ``device_bytes``: the
    accelerator's memory (None: unknown, the smaller GPU defaults)."""
    if platform == "cpu":
        tokens, seqs = _CPU_BATCH_LIMITS
    elif (device_bytes or 0) >= _LARGE_GPU_BYTES and "a100" not in device_kind.lower():
        tokens, seqs = _LARGE_GPU_BATCH_LIMITS
    else:
        tokens, seqs = _GPU_BATCH_LIMITS
    return tokens[usage_context], seqs


def _device_memory_bytes(device: Any) -> int | None:
    """The accelerator's memory as vLLM compares it with 70 GiB: JAX's allocator limit, scaled
    back by XLA_PYTHON_CLIENT_MEM_FRACTION (JAX preallocates 75% by default) when that is how
    the limit was set."""
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:
        return None
    if os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "") == "platform":
        return int(limit)
    try:
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
    except ValueError:
        fraction = 0.75
    return int(limit / min(max(fraction, 0.05), 1.0))


# How far the allocator's bytes in use may exceed the live arrays' before the pool is sized from
# the allocator's figure (less this slack) instead: see device_array_bytes.
_ALLOCATOR_SLACK_BYTES = 2 << 30


def device_array_bytes(device: Any) -> int:
    """Bytes of every live jax array's shard on ``device`` (the weights, and whatever arrays the
    process holds besides). The KV pool is sized from this, not from the allocator's
    ``bytes_in_use``: that figure also counts what the allocator rounds each block up to, which
    depends on the order of past allocations and frees, and the page count, a shape of every
    step program, must come out the same at every start for a restart to find its programs in
    XLA's persistent compilation cache (benchmarks/RESULTS.md, rerun of 2026-12-04 (13:50): with
    four copy threads the count differed by up to ~440 pages between starts)."""
    total = 0
    for a in jax.live_arrays():
        if device in a.sharding.device_set:
            total += math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
    return total


def _place_loaded(loaded: Any, replica: Any) -> Any:
    """A model already in memory (one device), re-placed on ``replica`` by the sharding rules,
    through the loaders' own path (KV heads replicated where tp exceeds them)."""
    from jaxllm.loading.weights import abstract_for, load_params_from_tensors, model_to_hf_tensors

    if getattr(loaded, "placed_on", None) is replica:  # built in its shards already
        return loaded
    model, mc = loaded.model, loaded.model_config
    placed = load_params_from_tensors(
        abstract_for(mc, model.dtype, model.attention_backend, replica), mc,
        model_to_hf_tensors(model), model.dtype, parallel=replica)
    return _with_model(loaded, placed)


def _with_model(loaded: Any, model: Any) -> Any:
    """A copy of ``loaded`` (a LoadedModel, or a benchmark's namespace) holding ``model``."""
    if dataclasses.is_dataclass(loaded):
        return dataclasses.replace(loaded, model=model)
    return types.SimpleNamespace(**{**vars(loaded), "model": model})


SLEEP_TAGS = ("weights", "kv_cache")


def _declares_matryoshka(source: Any) -> bool:
    """Whether a model folder's config.json declares Matryoshka embeddings (vLLM's
    is_matryoshka / matryoshka_dimensions): what lets a request ask for fewer dimensions."""
    import json

    path = Path(source) / "config.json" if source is not None else None
    if path is None or not path.is_file():
        return False
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return bool(cfg.get("is_matryoshka") or cfg.get("matryoshka_dimensions"))


class LLMEngine:
    """The synchronous engine. Not thread-safe: one driver (LLM or AsyncEngine's loop) at a time."""

    def __init__(self, config: EngineConfig, loaded: Any | None = None, replica: Any = None):
        """replica: the ``sharding.mesh.ReplicaMesh`` ([pp, tp] devices) this engine runs on;
        None: built from the config's tensor/pipeline_parallel_size over the first devices (one
        device when both are 1, without any sharding)."""
        from jaxllm.loading import load_model

        self.config = config
        tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
        if replica is None and tp * pp > 1:
            from sharding.mesh import make_mesh, replica_meshes

            replica = replica_meshes(make_mesh(1, pp, tp))[0]
        self.replica = replica
        if jax.process_count() > 1 and pp > 1:
            raise ValueError(
                f"pipeline_parallel_size ({pp}) > 1 is not supported across {jax.process_count()} "
                "processes (jax.distributed); use tensor parallelism over the hosts' devices.")
        given = loaded
        if loaded is not None and replica is not None:
            loaded = _place_loaded(loaded, replica)
        if loaded is None:
            backend = config.attention_backend
            if backend == "auto":  # the Pallas kernel on GPUs (benchmarks/RESULTS.md), jnp on CPU
                backend = "reference" if jax.default_backend() == "cpu" else "pallas"
            t0 = time.perf_counter()
            loaded = load_model(config.model, dtype=config.dtype, tokenizer=config.tokenizer,
                                checkpoint_dir=config.checkpoint_dir, attention_backend=backend,
                                parallel=replica, quantization=config.quantization)
            jax.block_until_ready(nnx.state(loaded.model))  # the load's time, transfers included
            logger.info("loaded %s in %.1f s", loaded.name, time.perf_counter() - t0)
        self.loaded = loaded
        self.model_config: ModelConfig = loaded.model_config
        self.tokenizer = loaded.tokenizer
        if config.chat_template is not None and self.tokenizer is not None:
            from jaxllm.loading import read_chat_template

            self.tokenizer.chat_template = read_chat_template(config.chat_template)
        self.model_name: str = loaded.name
        mc = self.model_config
        # vLLM's --runner: pooling (embeddings only) when asked, or by default for a headless
        # checkpoint, which has no lm_head to generate with.
        if mc.embedding_only and config.runner == "generate":
            raise ValueError(f"{loaded.name} is an embedding model ({mc.architecture} without "
                             "its lm_head): it cannot generate; use runner='pooling'.")
        self.runner_kind = ("pooling" if config.runner == "pooling" or mc.embedding_only
                            else "generate")
        if self.runner_kind == "pooling" and (pp > 1 or jax.process_count() > 1):
            raise ValueError("runner='pooling' runs on one process without pipeline "
                             "parallelism (tensor parallelism is fine).")
        # The placement of params and KV cache (sharding/rules.py); None: one default device.
        self.parallel = replica.for_config(mc) if replica is not None else None
        self.num_kv_heads = (self.parallel.num_kv_heads if self.parallel is not None
                             else mc.num_key_value_heads)
        if config.fuse_projections and not loaded.model.config.fused_projections:
            from jaxllm.models.fused import fuse_projections

            # A model this engine loaded or placed is its own: its separate projections are
            # freed as each fused one is made. A caller's model is left intact.
            t0 = time.perf_counter()
            loaded = _with_model(loaded, fuse_projections(loaded.model, self.parallel,
                                                          consume=loaded is not given))
            self.loaded = loaded
            logger.info("fused q/k/v and gate/up projections in %.1f s",
                        time.perf_counter() - t0)
        if config.enable_lora:
            loaded = self._with_lora_slots(loaded)
            self.loaded = loaded

        on_cpu = jax.default_backend() == "cpu"
        self.max_model_len = config.max_model_len or (
            min(mc.max_position_embeddings, _CPU_DEFAULT_MAX_MODEL_LEN) if on_cpu
            else mc.max_position_embeddings)
        if on_cpu and not config.max_model_len and self.max_model_len < mc.max_position_embeddings:
            logger.info("CPU: max_model_len defaults to %d (the model allows %d; pass "
                        "max_model_len to raise it)", self.max_model_len,
                        mc.max_position_embeddings)
        if config.max_model_len and config.max_model_len > mc.max_position_embeddings:
            logger.warning("max_model_len=%d exceeds the model's max_position_embeddings=%d",
                           config.max_model_len, mc.max_position_embeddings)
        device = jax.local_devices()[0]
        default_tokens, default_seqs = default_batch_limits(
            jax.default_backend(), device.device_kind,
            None if on_cpu else _device_memory_bytes(device), config.usage_context)
        mnbt = config.max_num_batched_tokens or default_tokens
        if not config.enable_chunked_prefill:
            mnbt = max(mnbt, self.max_model_len)
        self.max_num_batched_tokens = mnbt
        self.max_num_seqs = min(config.max_num_seqs or default_seqs, mnbt)
        token_buckets = config.token_buckets or default_token_buckets(
            mnbt, growth=4 if on_cpu else 2)
        if max(token_buckets) < mnbt:
            token_buckets = tuple(token_buckets) + (mnbt,)

        self.cache_dtype = resolve_dtype(config.dtype)
        if config.kv_cache_dtype != "auto":
            # fp8 pages, per-layer scales (jaxllm/models/attention.py): half the bytes of a
            # bf16 page, so about twice the pages in the same memory.
            from jaxllm.models.attention import FP8_KV_CACHE_DTYPES
            from jaxllm.models.fp8 import check_fp8_supported

            check_fp8_supported(f"kv_cache_dtype={config.kv_cache_dtype!r}")
            self.cache_dtype = jnp.dtype(FP8_KV_CACHE_DTYPES[config.kv_cache_dtype])
        if config.calculate_kv_scales:
            if config.kv_cache_dtype == "auto":
                logger.warning("calculate_kv_scales is for an fp8 KV cache; kv_cache_dtype="
                               "'auto' keeps the model dtype, so it does nothing")
            else:
                self._calculate_kv_scales()
                loaded, mc = self.loaded, self.model_config
        num_pages = self._determine_num_pages()
        runner_cls = ModelRunner
        if self.parallel is not None and self.parallel.pp > 1:
            from jaxllm.engine.pipeline_runner import PipelineRunner as runner_cls
        self.runner = runner_cls(
            loaded.model, num_layers=mc.num_hidden_layers, num_kv_heads=self.num_kv_heads,
            head_dim=mc.head_dim, num_pages=num_pages, page_size=config.page_size,
            max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs,
            token_buckets=token_buckets, cache_dtype=self.cache_dtype, vocab_size=mc.vocab_size,
            max_logprobs=config.max_logprobs, parallel=self.parallel,
            enforce_eager=config.enforce_eager, cublas_min_tokens=self._cublas_min_tokens(),
            logprobs_mode=config.logprobs_mode)
        self.runner.small_decode_buckets = tuple(config.small_decode_buckets)
        if b1_mgpu_enabled() and mc.quantization == "fp8":
            # a decode step of one sequence gets a 1-row program, the one the batch-1 Mosaic
            # kernels run (jaxllm/models/b1_mgpu.py; their slot count is static)
            self.runner.small_decode_buckets += (1,)
        steps = config.num_scheduler_steps
        if steps > 1 and (runner_cls is not ModelRunner or jax.process_count() > 1):
            logger.warning("num_scheduler_steps=%d is not supported with pipeline parallelism "
                           "or several processes; running one step per launch", steps)
            steps = 1
        self.runner.num_scheduler_steps = steps
        self.page_pool = PagePool(num_pages)
        # Engine-wide extra keys of the page hashes: what else determines the K/V of a page.
        self.prefix_cache = PrefixCache(
            self.page_pool, config.page_size, extra_keys=(self.model_name, str(self.cache_dtype))
        ) if config.enable_prefix_caching else None
        self.scheduler = Scheduler(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=mnbt,
            max_model_len=self.max_model_len, page_size=config.page_size,
            page_pool=self.page_pool, enable_chunked_prefill=config.enable_chunked_prefill,
            prefix_cache=self.prefix_cache, policy=config.scheduling_policy,
            max_loras=config.max_loras if config.enable_lora else None)
        self.lora = None  # jaxllm.lora.manager.LoraManager with enable_lora
        # (time, running adapters, waiting adapters) as of the last step, with enable_lora
        self.lora_requests_info: tuple[float, str, str] | None = None
        if config.enable_lora:
            from jaxllm.lora.manager import LoraManager

            self.lora = LoraManager(self.runner, mc, max_loras=config.max_loras,
                                    max_lora_rank=config.max_lora_rank,
                                    max_cpu_loras=config.max_cpu_loras or config.max_loras)
            self.runner.lora_enabled = True
            self.runner.specialize_lora = config.specialize_lora
        pages_per_seq = math.ceil(self.max_model_len / config.page_size)
        logger.info("KV cache: %d pages of %d tokens (%s); max concurrency at max_model_len=%d: "
                    "%.2fx", num_pages - 1, config.page_size, self.cache_dtype, self.max_model_len,
                    (num_pages - 1) / pages_per_seq)
        self.eos_token_ids = set(mc.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self._read_generation_config()
        from jaxllm.engine.structured_output import StructuredOutputs

        # A finished grammar allows the end-of-sequence tokens and the generation config's
        # end-of-turn tokens (a chat model ends its reply with the latter).
        self.structured_outputs = StructuredOutputs(
            self.tokenizer, mc.vocab_size, self.eos_token_ids | self.generation_stop_token_ids,
            config.structured_outputs_config)
        self._requests: dict[str, _Request] = {}
        self._sleeping: set[str] = set()  # what sleep() freed and wake_up() has not put back
        self._inflight: _InFlight | None = None  # the dispatched step not read back yet
        self.async_scheduling = config.async_scheduling  # may be switched between steps
        from jaxllm.engine.spec_decode import SpeculativeConfig

        self.speculative = SpeculativeConfig.from_dict(config.speculative_config)
        if self.speculative is not None:
            if self.runner_kind == "pooling":  # (pp > 1 and runner="pooling": EngineConfig)
                raise ValueError(f"speculative_config needs a generating model; {loaded.name} "
                                 "is an embedding model.")
        # Speculation with async scheduling: read the step in flight before the next schedule,
        # so drafts can be proposed (some running sequence's known tokens have a match).
        self._spec_sync = False
        self._seq_counter = itertools.count()
        self._seed_rng = np.random.default_rng(config.seed)
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "num_preemptions": 0,
                      "prefix_cache_hits": 0, "prefix_cache_queries": 0,
                      # vLLM's iteration_tokens_total histogram (jaxllm/metrics.py HISTOGRAMS)
                      "iteration_tokens_buckets": [0] * (len(ITERATION_TOKEN_BUCKETS) + 1),
                      "iteration_tokens_sum": 0,
                      # and request_params_max_tokens (each finished request's, _count_finished)
                      "request_params_max_tokens_buckets": [0] * (len(MAX_TOKENS_BUCKETS) + 1),
                      "request_params_max_tokens_sum": 0}
        if self.speculative is not None:  # vLLM's vllm:spec_decode_* counters
            self.stats.update(
                spec_decode_num_drafts=0, spec_decode_num_draft_tokens=0,
                spec_decode_num_accepted_tokens=0,
                spec_decode_num_accepted_tokens_per_pos=[0] * (
                    self.speculative.num_speculative_tokens))
        from jaxllm.engine.pooling import check_pooler_config

        self.pooler = check_pooler_config(config.pooler_config)
        self.is_matryoshka = _declares_matryoshka(getattr(loaded, "source", None))
        if not config.skip_compile_at_start and self.runner_kind != "pooling":
            secs = self.runner.compile_all()
            logger.info("compiled %d step programs (%d token buckets) in %.1f s",
                        len(self.runner.step_programs()), len(token_buckets), secs)
        if jax.process_count() > 1 and jax.process_index() == 0:
            from sharding.distributed import attach_leader

            attach_leader(self.runner)  # followers launch every step this engine launches

    # -- LoRA adapters (jaxllm/lora) -----------------------------------------------------------
    def _with_lora_slots(self, loaded: Any) -> Any:
        """``loaded`` with a copy of its model (sharing the weights; a caller's model is left
        as it was) that has zeroed LoRA slots (jaxllm/lora/layers.py)."""
        from jaxllm.lora.layers import attach_lora

        if jax.process_count() > 1:  # slots are written by the leader's host only
            raise ValueError("enable_lora is not supported across several processes "
                             "(jax.distributed); serve LoRA from one host.")
        if self.parallel is not None and self.parallel.kv_replication > 1:
            raise ValueError(
                f"enable_lora is not supported when tensor_parallel_size "
                f"({self.config.tensor_parallel_size}) exceeds the model's KV heads "
                f"({self.model_config.num_key_value_heads}): the KV heads are replicated.")
        model = nnx.merge(*nnx.split(loaded.model))
        attach_lora(model, model.config, self.config.max_loras, self.config.max_lora_rank,
                    model.dtype, self.parallel.stages[0].replicated
                    if self.parallel is not None else None)
        return _with_model(loaded, model)

    def _check_lora(self, lora_request: Any) -> None:
        if self.lora is None:
            raise ValueError(f"Got lora_request {lora_request} but LoRA is not enabled! Start "
                             "the engine with enable_lora=True (--enable-lora).")

    def add_lora(self, lora_request: Any) -> bool:
        """Reads the adapter now (vLLM's): later requests naming it start without the read.
        ValueError / FileNotFoundError for an adapter that cannot be served."""
        self._check_lora(lora_request)
        self.lora.add(lora_request)
        return True

    def remove_lora(self, lora_id: int) -> bool:
        """Forgets adapter ``lora_id``; False if it is not loaded. ValueError while a request
        uses it."""
        if self.lora is None:
            return False
        if any(s.lora_int_id == lora_id for r in self._requests.values() for s in r.seqs):
            raise ValueError(f"LoRA adapter {lora_id} is used by running requests; abort them "
                             "or let them finish first.")
        return self.lora.remove(lora_id)

    def list_loras(self) -> set[int]:
        """The ids of the adapters loaded (added and not removed)."""
        return set() if self.lora is None else self.lora.list()

    def pin_lora(self, lora_id: int) -> bool:
        """Keeps adapter ``lora_id`` in host memory past max_cpu_loras."""
        self._check_lora(lora_id)
        return self.lora.pin(lora_id)

    # -- the model's generation config ---------------------------------------------------------
    def _read_generation_config(self) -> None:
        """Its sampling defaults and its stop tokens beyond the EOS ones
        (jaxllm/loading/generation_config.py); a default that SamplingParams refuses is a
        ValueError now, not one per request."""
        from jaxllm.loading import generation_config as gc

        cfg = self.config
        source = getattr(self.loaded, "source", None)
        folder = (cfg.generation_config if cfg.generation_config not in gc.MODES
                  else source if source is not None and Path(source).is_dir() else None)
        fields = gc.read_generation_config(folder)
        self._diff_sampling_param = gc.sampling_defaults(fields, cfg.generation_config,
                                                         cfg.override_generation_config)
        try:
            SamplingParams(**self._diff_sampling_param)
        except (ValueError, TypeError) as e:
            raise ValueError(f"the generation config's sampling defaults "
                             f"{self._diff_sampling_param} are not valid: {e}") from None
        if self._diff_sampling_param:
            logger.warning(
                "Default sampling parameters have been overridden by the model's generation "
                "config: %s. Pass generation_config='vllm' (--generation-config vllm) to use "
                "the neutral defaults.", self._diff_sampling_param)
        vocab = self.model_config.vocab_size
        self.generation_stop_token_ids = frozenset(
            i for i in gc.eos_token_ids(fields) - self.eos_token_ids if 0 <= i < vocab)

    def get_diff_sampling_param(self) -> dict[str, Any]:
        """The SamplingParams defaults from the model's generation config (vLLM's name): what
        ``LLM.generate`` uses without SamplingParams and the server for fields not sent."""
        return dict(self._diff_sampling_param)

    def _calculate_kv_scales(self) -> None:
        """vLLM's calculate_kv_scales (jaxllm/engine/kv_scales.py): the fp8 cache's per-layer
        scales from one calibration forward, set on the model before anything compiles."""
        from jaxllm.engine import kv_scales

        ids = kv_scales.calibration_token_ids(self.tokenizer, self.model_config.vocab_size)
        scales = kv_scales.calculate_kv_scales(self.loaded.model, ids[:self.max_model_len],
                                               self.parallel)
        # A new module tree over the same arrays: a caller's model keeps its own scales.
        model = nnx.merge(*nnx.split(self.loaded.model))
        kv_scales.set_kv_scales(model, scales)
        self.model_config = dataclasses.replace(self.model_config, kv_cache_scales=scales)
        self.loaded = dataclasses.replace(self.loaded, model=model,
                                          model_config=self.model_config)

    # -- sizing -------------------------------------------------------------------------------
    def _determine_num_pages(self) -> int:
        """Usable pages + 1 scratch page: explicit, or from free device memory after weights.
        Several processes (multi-host) all take the leader's figure."""
        from sharding.distributed import agree

        return agree("num_pages", self._local_num_pages())

    def _local_num_pages(self) -> int:
        cfg, mc = self.config, self.model_config
        if cfg.num_pages is not None:
            return cfg.num_pages + 1
        # Per device: a device holds its stage's layers and its 1/tp of the KV heads.
        par = self.parallel
        layers = max(len(st.layers) for st in par.stages) if par else mc.num_hidden_layers
        heads = self.num_kv_heads // par.tp if par else mc.num_key_value_heads
        page_bytes = kv_page_bytes(layers, cfg.page_size, heads, mc.head_dim, self.cache_dtype)
        pages_per_seq = math.ceil(self.max_model_len / cfg.page_size)
        local = [d for d in (par.stages[0].mesh.devices.flat if par else ())
                 if d.process_index == jax.process_index()]
        device = local[0] if local else jax.local_devices()[0]
        stats = device.memory_stats()
        if not stats or "bytes_limit" not in stats:
            budget = _CPU_KV_BUDGET_BYTES
            want = pages_per_seq * self.max_num_seqs
            n = max(min(want, budget // page_bytes), pages_per_seq)
            if getattr(device, "platform", "cpu") != "cpu":
                # An accelerator whose allocator keeps no statistics (XLA's VMM allocator, which
                # --xla_gpu_command_buffer_update_mode=SKIP_TEMP selects, is one): the pool would
                # otherwise be a fraction of the memory with no word said.
                logger.warning(
                    "%s reports no memory statistics, so the KV pool cannot be sized from "
                    "gpu_memory_utilization: it gets the CPU default of %d pages (%d MiB). Pass "
                    "num_pages (--num-pages) to size it.", device, n,
                    n * page_bytes >> 20)
            return int(n) + 1
        # Peak activation memory: XLA's own figure for the largest step (reference attention
        # gathers each token's context, so it is not small), plus 5% headroom.
        t0 = time.perf_counter()
        activation = int(self._largest_step_temp_bytes() * 1.05)
        logger.info("sized the KV pool in %.1f s (largest step's temp memory %.2f GiB)",
                    time.perf_counter() - t0, activation / 2**30)
        arrays = device_array_bytes(device)
        # The allocator's figure only when something beyond the arrays holds a lot of memory.
        used = max(arrays, stats["bytes_in_use"] - _ALLOCATOR_SLACK_BYTES)
        logger.info("device memory before the KV pool: arrays %.2f GiB, allocator in use %.2f "
                    "GiB, limit %.2f GiB", arrays / 2**30, stats["bytes_in_use"] / 2**30,
                    stats["bytes_limit"] / 2**30)
        free = stats["bytes_limit"] * cfg.gpu_memory_utilization - used - activation
        n = int(free // page_bytes)
        if n < pages_per_seq:
            raise ValueError(
                f"Not enough device memory for the KV cache: {max(n, 0)} pages of {cfg.page_size} "
                f"tokens fit, but one sequence of max_model_len={self.max_model_len} needs "
                f"{pages_per_seq}. Raise gpu_memory_utilization (now "
                f"{cfg.gpu_memory_utilization}), lower max_model_len or max_num_batched_tokens.")
        return n + 1

    def _cublas_min_tokens(self) -> int | None:
        """Token buckets from which the step programs put their GEMMs on cuBLAS(Lt) (fp8
        weights on a GPU: model_runner.CUBLAS_COMPILER_OPTIONS says why; others only with
        JAXLLM_CUBLAS_MIN_TOKENS, model_runner.cublas_min_tokens)."""
        from jaxllm.engine import model_runner as mr

        return mr.cublas_min_tokens(jax.default_backend(),
                                    getattr(self.loaded.model.config, "quantization", None))

    def _largest_step_temp_bytes(self) -> int:
        # Lowers the forward and the sampler abstractly for the largest bucket with a one-page
        # cache; allocates nothing. The sampler runs after the forward, but its [S, V] logits
        # input lives across both, so the two figures are added (a safe over-estimate).
        from jaxllm.engine import model_runner as mr

        mc, cfg = self.model_config, self.config
        T = self.max_num_batched_tokens
        probe = ModelRunner.__new__(ModelRunner)
        probe.page_size, probe.max_pages_per_seq = cfg.page_size, math.ceil(
            self.max_model_len / cfg.page_size)
        probe.max_num_seqs, probe.token_buckets = self.max_num_seqs, (T,)
        probe._knob_cache = None  # prepare() reads it; the probe has no rows to cache
        probe.penalty_min = 64  # (no rows: no penalty list)
        probe.vocab_size = mc.vocab_size
        probe.lora_enabled = cfg.enable_lora  # (the model has its LoRA slots by now)
        inputs = probe.prepare([], [], T=T, lora=True)  # (with LoRA: its larger program)
        shape = (2, cfg.page_size, self.num_kv_heads, mc.head_dim)
        kv = [(jax.ShapeDtypeStruct(shape, self.cache_dtype),) * 2
              for _ in range(mc.num_hidden_layers)]
        graphdef, state = nnx.split(self.loaded.model)
        leaves, treedef = jax.tree.flatten(state)
        # Unplaced: with tp / pp this lowers the whole model for one device, an over-estimate
        # of one shard's activations (safe).
        leaves = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
        prev_tokens = jax.ShapeDtypeStruct((self.max_num_seqs,), jnp.int32)
        # The options the runner compiles this bucket with (its GEMM backend changes its temps).
        cublas_min = self._cublas_min_tokens()
        opts = mr.step_jit_options(cfg.enforce_eager,
                                   cublas_gemms=cublas_min is not None and T >= cublas_min)
        fwd_in = dataclasses.replace(inputs, sampling=None)
        logits = jax.ShapeDtypeStruct((probe.seq_bucket(T), mc.vocab_size), jnp.float32)
        # A restart with the executable cache on takes the figure it stored (the two compiles
        # cost 1-2 s from XLA's cache, 7-10 s cold, for the 8B shape on the H200).
        from jaxllm.engine import executable_cache as ec

        root, cache, key = ec.cache_dir(), None, None
        if root is not None:
            cache = ec.ExecutableCache(root, ec.static_description(graphdef) + "\n"
                                       + ec.static_description(treedef))
            key = cache.key("largest step's temp bytes", (
                leaves, kv, fwd_in, prev_tokens, logits, inputs.sampling, self.max_num_seqs,
                cfg.max_logprobs, opts))
            stored = cache.load_value(key)
            if isinstance(stored, int):
                return stored
        fwd = jax.jit(mr._forward, static_argnums=(0, 1), **opts).lower(
            graphdef, treedef, leaves, kv, fwd_in, prev_tokens).compile()
        samp = jax.jit(mr._sample_padded, static_argnums=(0, 3, 4), **opts).lower(
            self.max_num_seqs, logits, inputs.sampling, cfg.max_logprobs, True).compile()
        temp = sum(int(getattr(c.memory_analysis(), "temp_size_in_bytes", 0) or 0)
                   for c in (fwd, samp))
        if cache is not None:
            cache.store_value(key, temp)
        return temp

    # -- requests -----------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt).input_ids)

    def prompt_inputs(self, prompt: str | dict | list[int]) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt: a str, a list of ids, or a dict with
        "prompt_token_ids" (and an optional "prompt") or "prompt" (and an optional
        "cache_salt", which add_request reads)."""
        if isinstance(prompt, str):
            return prompt, self.tokenize(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenize(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise TypeError(f"prompt must be a str, a list of token ids or a dict, got "
                        f"{type(prompt).__name__}")

    def add_request(self, request_id: str, prompt: str | dict | list[int],
                    params: SamplingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0,
                    lora_request: Any = None) -> None:
        """Validates and queues a request. Raises ValueError for anything that can never run,
        EngineSleepingError while asleep. ``priority``: with scheduling_policy="priority",
        lower is served first (vLLM's). ``lora_request``: a ``LoRARequest`` (with
        enable_lora): the adapter the request runs with, read now if it is new."""
        if self.runner_kind == "pooling":
            raise ValueError("This engine is a pooling model (runner='pooling'): it embeds "
                             "(embed, /v1/embeddings) and generates nothing.")
        if self._sleeping:
            raise EngineSleepingError(f"The engine is asleep ({', '.join(sorted(self._sleeping))}"
                                      " freed): call wake_up() first.")
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}.")
        if priority != 0 and self.config.scheduling_policy != "priority":
            raise ValueError(f"Got priority {priority} but priority scheduling is not enabled; "
                             "start the engine with scheduling_policy='priority' "
                             "(--scheduling-policy priority).")
        params = params or SamplingParams(**self._diff_sampling_param)
        text, ids = self.prompt_inputs(prompt)
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise ValueError("cache_salt must be a non-empty string if provided.")
        k = params.truncate_prompt_tokens
        if k is not None:  # the last k tokens (vLLM's left truncation; -1: max_model_len)
            ids = ids[-(self.max_model_len if k == -1 else k):]
        self._validate(ids, params)
        lora_id = 0
        if lora_request is not None:
            self._check_lora(lora_request)
            self.lora.add(lora_request)
            lora_id = lora_request.lora_int_id
        # Compiled and checked now: a bad schema / regex / grammar fails the request here.
        token_mask = self.structured_outputs.token_mask(params, ids)
        extra = self.generation_stop_token_ids
        if extra and not params.ignore_eos and not extra <= set(params.stop_token_ids or ()):
            # The generation config's end-of-turn tokens, as vLLM adds them.
            params = dataclasses.replace(params, stop_token_ids=sorted(
                extra | set(params.stop_token_ids or ())))
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=self.max_model_len - len(ids))
        else:
            # The engine's own object, as vLLM's (it serializes them to its engine core): a
            # caller's later change of its SamplingParams does not reach a running request, and
            # the runner may reuse sampling knobs read from an unchanged object
            # (sampler.KnobCache).
            params = copy.copy(params)
        if params.seed is None:
            seed = int(self._seed_rng.integers(0, 2**31 - 1))
        else:
            seed = int(params.seed)
        now = time.time() if arrival_time is None else arrival_time
        seqs, procs = [], []
        for i in range(params.n):
            seq = Sequence(seq_id=next(self._seq_counter), request_id=request_id, index=i,
                           prompt_token_ids=list(ids), output_token_ids=[], sampling_params=params,
                           arrival_time=now)
            seq.sample_seed = (seed * 1_000_003 + i) & 0x7FFFFFFF
            seq.priority = priority
            if salt is not None:  # vLLM's cache_salt: only requests with this salt share pages
                seq.cache_extra_keys = ("cache_salt", salt)
            if lora_id:  # an adapter's K/V is its own: pages are shared by its requests only
                seq.lora_int_id = lora_id
                seq.cache_extra_keys += ("lora", lora_id)
            if token_mask is not None:
                seq.token_mask = token_mask if i == 0 else token_mask.fork()
            seqs.append(seq)
            procs.append(OutputProcessor(self.tokenizer, ids, params, self.eos_token_ids, index=i))
        req = _Request(request_id, text, list(ids), params, now, seqs, procs, sent=[0] * params.n,
                       lora_request=lora_request, stats=RequestStateStats(
                           arrival_time=now, queued_ts=time.monotonic()))
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        self._requests[request_id] = req
        for seq in seqs:
            self.scheduler.add(seq)
        self.stats["prompt_tokens"] += len(ids)

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("The prompt cannot be empty.")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not (0 <= int(t) < vocab)]
        if bad:
            raise ValueError(f"Token id {bad[0]} is out of vocabulary (vocab size {vocab}).")
        params.verify_for_model(vocab)  # logit_bias / stop / allowed token ids in the vocabulary
        n_prompt = len(ids)
        if n_prompt >= self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"your prompt has {n_prompt} tokens (no room for a generated token). Please "
                "reduce the length of the prompt.")
        max_tokens = params.max_tokens if params.max_tokens is not None else (
            self.max_model_len - n_prompt)
        if n_prompt + max_tokens > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} "
                "for the completion). Please reduce the length of the prompt or max_tokens.")
        if not self.scheduler.can_ever_fit(n_prompt + max_tokens):
            raise ValueError(
                f"The request needs {n_prompt + max_tokens} tokens of KV cache, more than the whole "
                f"pool holds ({self.page_pool.num_usable_pages} pages of {self.config.page_size}). "
                "Lower max_tokens or raise num_pages / gpu_memory_utilization.")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.config.max_logprobs:
                raise ValueError(f"{name}={k} exceeds max_logprobs={self.config.max_logprobs}; "
                                 "ask for fewer or start the engine with a larger max_logprobs.")

    def _count_finished(self, req: _Request) -> None:
        """vLLM's request_params_max_tokens: a request that finished or was aborted, by its
        max_tokens (as add_request resolved it: the room left in the context when unset)."""
        m = req.params.max_tokens or 0
        self.stats["request_params_max_tokens_buckets"][
            bisect.bisect_left(MAX_TOKENS_BUCKETS, m)] += 1
        self.stats["request_params_max_tokens_sum"] += m

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Aborts a request; its pages go back to the pool. Unknown ids are ignored."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        self._count_finished(req)
        self.scheduler.abort(request_id)
        for seq, proc in zip(req.seqs, req.processors):
            if not seq.status.is_finished:
                seq.status = SequenceStatus.FINISHED_ABORTED
            if proc.status is None:
                proc.status = SequenceStatus.FINISHED_ABORTED
        return self._make_output(req, final=True)

    def embed(self, prompts: list[Any], params: Any = None, lora_request: Any = None
              ) -> list[Any]:
        """Embeddings of ``prompts`` (what add_request takes) with ``params`` (PoolingParams,
        one or one per prompt) and ``lora_request`` (a LoRARequest, or one or None per prompt;
        with enable_lora): the pooling runner's work (engine/pooling.py). ValueError unless
        the engine was built with runner="pooling", for a prompt that can never fit, for
        dimensions on a model that is not Matryoshka, and for an adapter add_lora refuses."""
        from jaxllm.engine.pooling import embed

        if self.runner_kind != "pooling":
            raise ValueError("embed() is only supported for pooling models: start the engine "
                             "with runner='pooling' (--runner pooling).")
        if self._sleeping:
            raise EngineSleepingError("The engine is asleep: call wake_up() first.")
        return embed(self, list(prompts), params, self.pooler, lora_request)

    def encode(self, prompts: list[Any], params: Any = None, lora_request: Any = None,
               pooling_task: str | None = None) -> list[Any]:
        """vLLM's ``LLM.encode`` (engine/pooling.py, ``encode``): PoolingRequestOutputs of
        ``pooling_task`` ("embed" / "token_embed", or "classify" / "token_classify" on a
        sequence classifier); ``params`` and ``lora_request`` as ``embed``'s. ValueError for
        another task, and as ``embed``."""
        from jaxllm.engine.pooling import encode

        if self.runner_kind != "pooling":
            raise ValueError("encode() is only supported for pooling models: start the engine "
                             "with runner='pooling' (--runner pooling).")
        if self._sleeping:
            raise EngineSleepingError("The engine is asleep: call wake_up() first.")
        return encode(self, list(prompts), params, self.pooler, pooling_task, lora_request)

    def classify(self, prompts: list[Any], params: Any = None, lora_request: Any = None
                 ) -> list[Any]:
        """Class probabilities of ``prompts`` on a sequence classifier (vLLM's
        ``LLM.classify``; engine/pooling.py, ``classify``); ``params`` and ``lora_request`` as
        ``embed``'s. ValueError for a model that is not a classifier, and as ``embed``."""
        from jaxllm.engine.pooling import classify

        if not self.model_config.num_labels:
            raise ValueError(f"classify() needs a sequence classification model (e.g. "
                             f"LlamaForSequenceClassification); {self.model_name} is "
                             f"{self.model_config.architecture}.")
        if self._sleeping:
            raise EngineSleepingError("The engine is asleep: call wake_up() first.")
        return classify(self, list(prompts), params, lora_request)

    def score(self, texts_1: list[Any], texts_2: list[Any], params: Any = None,
              lora_request: Any = None) -> list[Any]:
        """Scores of text pairs on a pooling engine (vLLM's ``LLM.score``): for an embedding
        model the cosine similarity of the two embeddings, for a one-label sequence classifier
        (a cross-encoder) the sigmoid of its logit over the pair as one prompt; pairs 1:1, 1:N
        or N:N; each list holds what add_request takes (engine/pooling.py, ``score``).
        ValueError as ``embed``, for other lengths, and for a classifier of several labels."""
        from jaxllm.engine.pooling import score

        if self.runner_kind != "pooling":
            raise ValueError("score() is only supported for pooling models (embedding models "
                             "score pairs by cosine similarity): start the engine with "
                             "runner='pooling' (--runner pooling).")
        return score(self, texts_1, texts_2, params, lora_request)

    # -- sleep mode and weight updates (vLLM's, for RL loops) ---------------------------------
    def _check_idle(self, what: str) -> None:
        if self._requests:
            raise RuntimeError(f"{what}: {len(self._requests)} requests are still running; "
                               "finish or abort them first.")
        if jax.process_count() > 1:
            raise ValueError(f"{what} is not supported across several processes.")

    def sleep(self, level: int = 1) -> None:
        """vLLM's sleep mode (``enable_sleep_mode=True``): frees the device memory of the KV
        cache and of the weights, for a training step that shares the accelerators. Level 1
        keeps the weights in host memory (``wake_up`` puts them back); level 2 drops them
        (``update_weights`` brings new ones; ``wake_up`` alone gives zeros). The prefix cache
        is emptied. Refused while requests run; requests are refused while asleep."""
        if not self.config.enable_sleep_mode:
            raise ValueError("Sleep mode is not enabled: start the engine with "
                             "enable_sleep_mode=True (--enable-sleep-mode).")
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level!r}.")
        self._check_idle("sleep")
        self.reset_prefix_cache()  # the cached pages' K/V is about to go
        if "kv_cache" not in self._sleeping:  # (a half-woken engine frees what is back)
            self.runner.free_kv_cache()
        if "weights" not in self._sleeping:
            self.runner.free_weights(keep_on_host=level == 1)
        self._sleeping = set(SLEEP_TAGS)
        logger.info("asleep (level %d): KV cache and weights freed from the device%s", level,
                    ", weights kept in host memory" if level == 1 else "")
        if (jax.default_backend() != "cpu"
                and os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "") != "platform"):
            logger.info("the freed memory stays in this process's JAX memory pool (for its own "
                        "arrays); to give it back to the driver, for another process, start "
                        "with XLA_PYTHON_CLIENT_ALLOCATOR=platform")

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Puts back what ``sleep`` freed: ``tags`` "weights" and / or "kv_cache" (default
        both; the weights first lets an RL loop load new ones before the cache takes its
        memory). A zeroed KV cache, and the weights from host memory (zeros after level 2)."""
        tags = list(SLEEP_TAGS) if tags is None else list(tags)
        bad = sorted(set(tags) - set(SLEEP_TAGS))
        if bad:
            raise ValueError(f"wake_up tags must be among {list(SLEEP_TAGS)}, got {bad}.")
        if "weights" in tags and "weights" in self._sleeping:
            self.runner.restore_weights()
            self._sleeping.discard("weights")
            if self.lora is not None:  # (zeros after level 2) adapters are written again
                self.lora.invalidate_slots()
        if "kv_cache" in tags and "kv_cache" in self._sleeping:
            self.runner.restore_kv_cache()
            self._sleeping.discard("kv_cache")

    def is_sleeping(self) -> bool:
        """Whether anything ``sleep`` freed is still away."""
        return bool(self._sleeping)

    def update_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Runs new weights from now on, without a recompile: RL's weight sync. ``weights``:
        every tensor of the model as its HF checkpoint names and lays them out
        (``model.layers.0.self_attn.q_proj.weight`` [out, in], ...; numpy or JAX arrays, any
        float dtype, cast to the model's), as the loaders read a checkpoint. They are placed
        on the engine's devices by its sharding rules and fused as the engine runs them; the
        old weights are freed after (briefly both are on the device, unless the engine sleeps
        at level 2). The prefix cache is emptied (its K/V came from the old weights).
        ValueError for a missing, unknown or misshaped tensor, and for fp8 models."""
        from jaxllm.loading.weights import abstract_for, load_params_from_tensors

        self._check_idle("update_weights")
        mc = self.model_config
        current = self.loaded.model
        if mc.quantization is not None or current.config.quantization is not None:
            raise ValueError("update_weights is not supported for fp8 models (it would have "
                             "to quantize the new weights); run the bf16 model.")
        model = load_params_from_tensors(
            abstract_for(mc, current.dtype, current.attention_backend, self.replica), mc,
            weights, current.dtype, parallel=self.replica)
        if current.config.fused_projections:
            from jaxllm.models.fused import fuse_projections

            model = fuse_projections(model, self.parallel, consume=True)
        if self.lora is not None:  # the new model gets slots too; adapters are written again
            model = self._with_lora_slots(_with_model(self.loaded, model)).model
        self.runner.replace_weights(model)
        if self.lora is not None:
            self.lora.invalidate_slots()
        self.loaded = _with_model(self.loaded, model)
        self._sleeping.discard("weights")
        self.reset_prefix_cache()

    def reset_prefix_cache(self) -> bool:
        """Empties the prefix cache. As vLLM: refused (False, with a warning) while requests hold
        pages; True when emptied (or when prefix caching is off)."""
        if self.prefix_cache is None:
            return True
        if not self.prefix_cache.reset():
            logger.warning("reset_prefix_cache: refused, %d requests still hold KV pages",
                           self.scheduler.num_running)
            return False
        return True

    # vLLM's profiler API (jaxllm/profiler.py: a jax.profiler trace of the whole process).
    def start_profile(self) -> None:
        """Starts a trace into $JAXLLM_PROFILER_DIR (or VLLM_TORCH_PROFILER_DIR); RuntimeError
        when neither is set or a profile already runs."""
        from jaxllm.profiler import start_profile

        start_profile()

    def stop_profile(self) -> None:
        """Stops the trace and writes it; RuntimeError when none runs."""
        from jaxllm.profiler import stop_profile

        stop_profile()

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    # -- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one scheduler step; returns outputs of requests that changed (per output_kind).

        With ``async_scheduling`` (default) the step dispatched here runs on the device while the
        host reads the previous step's results and turns them into outputs, so the outputs
        returned are one step behind the dispatch: scheduling and input preparation of step k+1
        overlap step k. Placeholders stand for the tokens still on the device (see
        engine/scheduler.py). A step whose rows' next sampler inputs need their tokens on the
        host (penalty token lists, a grammar's mask) is read back between the next step's
        forward and its sampler (``_dispatch``, late sampling): the device runs the forward
        while the host reads. Where the runner cannot split a step (pipeline stages, a
        multi-host leader) it is read back before the next schedule instead.

        Speculative decoding (engine/spec_decode.py) needs the tokens on the host: a step with
        drafts is read back before the next schedule, and so is a step in flight when some
        running sequence's known tokens have an n-gram match (``_spec_sync``), so that the next
        step can take its draft; otherwise steps stay asynchronous.
        """
        outputs: list[RequestOutput] = []
        late = False
        inflight = self._inflight
        if inflight is not None and (inflight.sample_rows is not None or self._spec_sync):
            outputs = self._read_inflight()  # (a speculative step's rejected drafts go first)
        elif inflight is not None and inflight.needs_tokens_on_host:
            late = self.runner.late_sampling and self.runner.publisher is None
            if not late:
                outputs = self._read_inflight()
        if self.speculative is not None:
            if self._inflight is None:
                self._propose_drafts()
            else:  # a step in flight: its tokens are not known, so no draft (none left over
                for seq in self.scheduler.running:  # from a step that did not schedule it)
                    if seq.spec_token_ids:
                        seq.spec_token_ids = []
        sched: SchedulerOutput = self.scheduler.schedule()
        self.stats["num_preemptions"] += len(sched.preempted)
        if self.prefix_cache is not None:
            self.stats["prefix_cache_queries"] = self.prefix_cache.queries
            self.stats["prefix_cache_hits"] = self.prefix_cache.hits
        dispatched = None
        if sched.scheduled:
            dispatched, read = self._dispatch(sched, late)
            if read is not None:
                outputs = read
        if self._inflight is not None:
            outputs = self._read_inflight()
        self._inflight = dispatched
        if dispatched is not None and not self.async_scheduling:
            outputs = self._read_inflight()
        if self.speculative is not None:
            self._spec_sync = (self._inflight is not None and self._inflight.sample_rows is None
                               and self._propose_drafts(dry=True))
        if self.lora is not None:  # vLLM's lora_requests_info, read by /metrics's thread
            self.lora_requests_info = (time.time(), self.lora.names_in(self.scheduler.running),
                                       self.lora.names_in(self.scheduler.waiting))
        return outputs

    def _propose_drafts(self, dry: bool = False) -> bool:
        """Sets every running sequence's n-gram draft for the next step (engine/spec_decode.py):
        a decode whose tokens are all known gets up to num_speculative_tokens, cut to
        max_model_len, max_tokens and the sequence slots left (each draft position is a sampled
        row: at most max_num_seqs rows a step). A constrained row's draft is cut where its
        constraint (grammar, allowed ids, bad words) stops allowing it. A penalty row's
        positions each carry its token list (+ the draft before them): its draft is cut so the
        step's penalty list stays within the width compiled at start-up
        (``ModelRunner.penalty_min``), or, past it already, is not drafted.

        Returns whether some sequence got a draft. ``dry``: whether some sequence would get
        one from its known tokens, with a step in flight (none is set); the engine then reads
        that step before the next schedule."""
        from jaxllm.engine.spec_decode import propose_ngram

        spec = self.speculative
        scheduler = self.scheduler
        running = scheduler.running
        slots = self.max_num_seqs - len(running)
        if (spec.disable_by_batch_size is not None
                and len(running) + scheduler.num_waiting >= spec.disable_by_batch_size):
            slots = 0  # a large batch: no drafts
        if dry and slots <= 0:
            return False
        found = False
        room = self.max_model_len - 1
        penalty_room = self.runner.penalty_min - sum(
            s.num_tokens for s in running if s.sampling_params.uses_penalties)
        for seq in running:
            draft: list[int] = []
            n = seq.num_tokens
            params = seq.sampling_params
            if slots > 0 and (dry or not seq.num_pending) and seq.num_computed_tokens == n - 1:
                k = min(spec.num_speculative_tokens, room - n, slots)
                if params.max_tokens is not None:
                    k = min(k, params.max_tokens - seq.num_output_tokens - 1)
                if params.uses_penalties:  # position i adds n + i entries
                    while k > 0 and k * n + k * (k + 1) // 2 > penalty_room:
                        k -= 1
                if k > 0:
                    output = seq.output_token_ids
                    known = self._token_array(seq).ids(output, len(output) - seq.num_pending)
                    draft = propose_ngram(known, k, spec.prompt_lookup_min,
                                          spec.prompt_lookup_max)
                    if draft and seq.token_mask is not None:
                        del draft[seq.token_mask.draft_prefix(draft):]
                    if draft and dry:
                        return True
                    found = found or bool(draft)
                    slots -= len(draft)
                    if params.uses_penalties:
                        penalty_room -= len(draft) * n + len(draft) * (len(draft) + 1) // 2
            if not dry:
                seq.spec_token_ids = draft
        return found

    def _dispatch(self, sched: SchedulerOutput, late: bool = False
                  ) -> tuple[_InFlight, list[RequestOutput] | None]:
        """Launches ``sched``'s step; returns it in flight, and (``late``) the outputs of the
        step before, which it reads back between this step's forward and its sampler."""
        sampling_row = self._sampling_row
        next_ids = self._prompt_next_ids(sched)
        if self.lora is not None:  # the step's adapters into device slots, before prepare
            self.lora.activate(s.seq for s in sched.scheduled)
        outputs = None
        sample_rows = None  # a speculative step: entry -> its first sampled row
        if late:
            logits, prompt_lp, host = self.runner.dispatch_forward(sched.scheduled, next_ids)
            indices = self.scheduler.commit(sched)
            outputs = self._read_inflight()
            # Committed: a sampled row's own placeholder is now its last output token, so its
            # step is the placeholder's index.
            rows = [sampling_row(s.seq, i) for s, i in zip(sched.scheduled, indices)]
            out = self.runner.dispatch_sampler(logits, rows, host)
            steps = 1
        else:
            rows = [sampling_row(s.seq) for s in sched.scheduled]
            if any(s.num_spec for s in sched.scheduled):
                steps = 1
                sample_rows, sampled = [], []
                for s, r in zip(sched.scheduled, rows):
                    sample_rows.append(len(sampled))
                    sampled.append(r)
                    if s.num_spec:
                        sampled += self._draft_rows(s.seq, r, s.num_spec)
            else:
                sampled = rows
                steps = self._lookahead_steps(sched, rows) if next_ids is None else 1
            # (num_steps only when > 1: the pipeline runner's dispatch has no multi-step.)
            out, prompt_lp = self.runner.dispatch(
                sched.scheduled, sampled, prompt_next_ids=next_ids,
                **({"num_steps": steps} if steps > 1 else {}))
            indices = self.scheduler.commit(sched, num_steps=steps)
        # Rows whose next inputs need this step's tokens on the host: penalties (token lists)
        # and grammars (the next mask).
        read_first = any(r.params.uses_penalties or (r.token_mask is not None
                                                     and r.token_mask.changes_per_token)
                         for r, i in zip(rows, indices) if i is not None)
        with_logprobs = any(r.params.logprobs is not None for r in rows)
        n = sched.num_batched_tokens  # each of the launch's steps, for iteration_tokens_total
        self.stats["iteration_tokens_buckets"][
            bisect.bisect_left(ITERATION_TOKEN_BUCKETS, n)] += steps
        self.stats["iteration_tokens_sum"] += n * steps
        return _InFlight(sched, indices, out, prompt_lp, read_first, with_logprobs,
                         steps, sample_rows), outputs

    def _lookahead_steps(self, sched: SchedulerOutput, rows: list) -> int:
        """How many decode steps this batch runs in one launch (multi-step scheduling): the
        runner's ``num_scheduler_steps`` when the batch can, else 1. It can when every row is a
        decode (one new token, sampled) with room for all the steps within max_model_len, no
        waiting request could be admitted now (nothing waits, or every sequence slot is taken:
        a multi-step launch must not delay an admission that could happen), no row wants
        penalties or log-probs or is still below min_tokens (their inputs change from one token
        to the next on the host) or has a logit_bias or a token mask (its sampler width would
        compile another multi-step program while serving; a grammar's mask changes with each
        token too), and the pool has the pages of every step's K/V
        without preempting anything (``Scheduler.reserve_lookahead`` allocates them)."""
        k = self.runner.num_scheduler_steps
        scheduler = self.scheduler
        if k <= 1 or (scheduler.num_waiting and scheduler.num_running < self.max_num_seqs):
            return 1
        room = self.max_model_len - k
        for s, r in zip(sched.scheduled, rows):
            params = r.params
            if (s.num_new_tokens != 1 or not s.needs_sample or s.seq.num_tokens > room
                    or params.uses_penalties or params.logprobs is not None
                    or r.step < params.min_tokens or params.logit_bias
                    or r.token_mask is not None):
                return 1
        return k if self.scheduler.reserve_lookahead(sched, k) else 1

    def _read_inflight(self) -> list[RequestOutput]:
        """Waits for the in-flight step, resolves its placeholders, runs the stop checks."""
        inflight, self._inflight = self._inflight, None
        # Without log-probs only the token ids cross back: one device->host copy, not five.
        out, prompt_lp = self.runner.fetch((inflight.out if inflight.with_logprobs else
                                            inflight.out.token_ids, inflight.prompt_lp))
        tokens = (out.token_ids if inflight.with_logprobs else out).tolist()
        steps = inflight.num_steps  # > 1: tokens is [steps][rows]
        sched = inflight.sched
        sample_rows = inflight.sample_rows  # a speculative step: entry -> its first row
        if prompt_lp is not None:
            self._collect_prompt_logprobs(sched, prompt_lp)
        # Per-row host work of every step (benchmarks/host_overhead.py): one tolist() instead of
        # a numpy scalar per row, the lookups hoisted out of the loop. A request of one sequence
        # (n == 1) gets its output in the row's iteration; one of n > 1 siblings after the loop,
        # in the slot of its first row, so the order is the rows' either way.
        requests, scheduler = self._requests, self.scheduler
        resolve, finish, make_output = scheduler.resolve, scheduler.finish, self._make_output
        outputs: list = []
        grouped: dict[str, int] | None = None  # n > 1: request id -> its slot in outputs
        num_generated = 0
        now = time.monotonic()  # the tokens' time (RequestStateStats)
        for i, (s, index) in enumerate(zip(sched.scheduled, inflight.output_indices)):
            if index is None:
                continue  # no sample
            seq = s.seq
            req = requests.get(seq.request_id)
            if req is None or seq.status.is_finished:
                continue  # aborted / finished while the step ran
            params = req.params
            if sample_rows is not None and s.num_spec:
                finished, status, n = self._accept_draft(req, s, index, tokens, out,
                                                         sample_rows[i])
                num_generated += n
            elif steps == 1:
                r = i if sample_rows is None else sample_rows[i]
                token = tokens[r]
                resolve(seq, index, token)
                if seq.token_mask is not None:
                    seq.token_mask.accept(token)
                lp = None
                if params.logprobs is not None:
                    lp = self._sample_logprobs(out, r, params.logprobs)
                finished, status = req.processors[seq.index].process(token, lp, index + 1)
                num_generated += 1
            else:  # the row's tokens in order; those past a stop are dropped
                process = req.processors[seq.index].process
                for j in range(steps):
                    token = tokens[j][i]
                    resolve(seq, index + j, token)
                    finished, status = process(token, None, index + j + 1)
                    num_generated += 1
                    if finished:
                        break
            if finished:
                finish(seq, status)
            if index == 0 and not req.stats.first_token_ts:  # a request's first token
                req.stats.first_token_ts = now
                req.stats.first_token_latency = time.time() - req.arrival_time
            req.stats.last_token_ts = now
            if len(req.seqs) == 1:
                # FINAL_ONLY before the end: no output, so none is built.
                if finished or params.output_kind != _FINAL_ONLY:
                    outputs.append(make_output(req, finished))
                    if finished:
                        del requests[req.request_id]
                        self._count_finished(req)
            else:
                if grouped is None:
                    grouped = {}
                if req.request_id not in grouped:
                    grouped[req.request_id] = len(outputs)
                    outputs.append(req)
        self.stats["generation_tokens"] += num_generated
        if grouped:
            for request_id, slot in grouped.items():
                req = outputs[slot]
                done = req.finished
                outputs[slot] = make_output(req, final=done)
                if done:
                    del requests[request_id]
                    self._count_finished(req)
            outputs = [o for o in outputs if o is not None]
        return outputs

    def _accept_draft(self, req: _Request, s: Any, index: int, tokens: list[int], out: Any,
                      row: int) -> tuple[bool, Any, int]:
        """A speculative entry's tokens (engine/spec_decode.py): the samples of its positions
        in rows row .. row + num_spec; the drafts up to the first mismatch are accepted and
        the sample there (or after the last draft) follows them. The rejected drafts'
        placeholders and computed tokens go first. Returns (finished, status, tokens
        emitted)."""
        seq, k = s.seq, s.num_spec
        draft = seq.spec_token_ids[:k]
        sampled = tokens[row:row + k + 1]
        accepted = 0
        while accepted < k and sampled[accepted] == draft[accepted]:
            accepted += 1
        self.scheduler.reject_drafts(seq, k - accepted)
        stats = self.stats
        stats["spec_decode_num_drafts"] += 1
        stats["spec_decode_num_draft_tokens"] += k
        stats["spec_decode_num_accepted_tokens"] += accepted
        per_pos = stats["spec_decode_num_accepted_tokens_per_pos"]
        for j in range(accepted):
            per_pos[j] += 1
        num_logprobs = req.params.logprobs
        process = req.processors[seq.index].process
        finished, status, emitted = False, None, 0
        for j in range(accepted + 1):
            token = sampled[j]
            self.scheduler.resolve(seq, index + j, token)
            lp = None if num_logprobs is None else self._sample_logprobs(out, row + j,
                                                                         num_logprobs)
            if seq.token_mask is not None:
                seq.token_mask.accept(token)
            finished, status = process(token, lp, index + j + 1)
            emitted += 1
            if finished:
                break
        return finished, status, emitted

    def _sampling_row(self, seq: Sequence, committed_index: int | None = None
                      ) -> sampler_lib.SamplingRow:
        """The row's sampling inputs. ``committed_index``: the step was committed already and
        the row's placeholder is output token ``committed_index`` (late sampling): the tokens
        before it are the row's so far."""
        params = seq.sampling_params  # the request's params (add_request)
        output = seq.output_token_ids
        step = len(output)
        if committed_index is not None:
            step = committed_index
            if params.uses_penalties:
                output = output[:step]
        banned = ()
        if step < params.min_tokens:
            req = self._requests.get(seq.request_id)  # None: it finished in the late read
            banned = req.processors[seq.index].banned_token_ids(step) if req else ()
        penalty_ids = None
        if params.uses_penalties:  # the row's ids as an array kept with the sequence
            penalty_ids = self._token_array(seq).ids(output, len(output))
        return sampler_lib.SamplingRow(params, seq.sample_seed, step, seq.prompt_token_ids,
                                       output, banned, seq.token_mask, penalty_ids)

    def _draft_rows(self, seq: Sequence, row: sampler_lib.SamplingRow, k: int
                    ) -> list[sampler_lib.SamplingRow]:
        """The sampling rows of a draft's positions 1..k: each samples as the token it would be
        (step + i; min_tokens' bans while step + i is below it; penalties over the output and
        the draft before it; a constraint advanced over the draft before it, on a copy).
        ``row``: the sequence's row, position 0."""
        params = row.params
        draft = seq.spec_token_ids[:k]
        proc = None
        mask = row.token_mask
        rows = []
        for i in range(1, k + 1):
            step = row.step + i
            banned = ()
            if step < params.min_tokens:
                if proc is None:
                    proc = self._requests[seq.request_id].processors[seq.index]
                banned = proc.banned_token_ids(step)
            r = row._replace(step=step, banned_token_ids=banned)
            if mask is not None:
                mask = mask.fork()
                mask.accept(draft[i - 1])
                r = r._replace(token_mask=mask)
            if params.uses_penalties:
                ids = np.concatenate([row.penalty_ids, np.asarray(draft[:i], np.int32)])
                r = r._replace(output_token_ids=list(row.output_token_ids) + draft[:i],
                               penalty_ids=ids)
            rows.append(r)
        return rows

    @staticmethod
    def _token_array(seq: Sequence) -> sampler_lib.TokenArray:
        """The sequence's prompt + output ids as the growing array kept with it."""
        cache = seq.token_array
        if cache is None or cache.seq_id != seq.seq_id:
            cache = seq.token_array = sampler_lib.TokenArray(seq.seq_id, seq.prompt_token_ids)
        return cache

    def _prompt_next_ids(self, sched: SchedulerOutput) -> np.ndarray | None:
        if not any(s.start_pos < s.seq.num_prompt_tokens
                   and s.seq.sampling_params.prompt_logprobs is not None for s in sched.scheduled):
            return None  # no prompt rows that want log-probs (every decode step)
        want = False
        parts = []
        for s in sched.scheduled:
            seq, n, start = s.seq, s.num_new_tokens, s.start_pos
            req = self._requests[seq.request_id]
            ids = np.full(n, -1, np.int32)
            if (req.params.prompt_logprobs is not None and seq.index == 0
                    and start < seq.num_prompt_tokens):
                want = True
                # Row for position p predicts the prompt token at p + 1.
                hi = min(start + n, seq.num_prompt_tokens - 1)
                if hi > start:
                    ids[:hi - start] = seq.prompt_token_ids[start + 1:hi + 1]
            parts.append(ids)
        return np.concatenate(parts) if want else None

    def _collect_prompt_logprobs(self, sched: SchedulerOutput, prompt_lp) -> None:
        next_lp, rank, top_ids, top_lp = prompt_lp
        off = 0
        for s in sched.scheduled:
            seq, n, start = s.seq, s.num_new_tokens, s.start_pos
            req = self._requests.get(seq.request_id)  # None: aborted while the step ran
            if (req is not None and req.params.prompt_logprobs is not None and seq.index == 0
                    and start < seq.num_prompt_tokens and req.prompt_logprobs is not None):
                k = req.params.prompt_logprobs
                hi = min(start + n, seq.num_prompt_tokens - 1)
                for p in range(start, hi):
                    r = off + p - start
                    tok = seq.prompt_token_ids[p + 1]
                    d = {tok: Logprob(float(next_lp[r]), int(rank[r]), self._decode_one(tok))}
                    for j in range(k):
                        t = int(top_ids[r, j])
                        if t not in d:
                            d[t] = Logprob(float(top_lp[r, j]), j + 1, self._decode_one(t))
                    if len(req.prompt_logprobs) == p + 1:
                        req.prompt_logprobs.append(d)
            off += n

    def _sample_logprobs(self, out, i: int, k: int) -> dict[int, Logprob]:
        tok = int(out.token_ids[i])
        d = {tok: Logprob(float(out.logprobs[i]), int(out.ranks[i]), self._decode_one(tok))}
        for j in range(k):
            t = int(out.topk_ids[i, j])
            if t not in d:
                d[t] = Logprob(float(out.topk_logprobs[i, j]), j + 1, self._decode_one(t))
        return d

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # -- outputs ------------------------------------------------------------------------------
    def _make_output(self, req: _Request, final: bool) -> RequestOutput | None:
        kind = req.params.output_kind
        if kind == _FINAL_ONLY and not final:
            return None
        req.num_cached_tokens = req.seqs[0].num_cached_tokens  # the prompt's hit (first sibling)
        stats, procs = req.stats, req.processors  # (per request per step: kept cheap)
        if not stats.scheduled_ts:
            stats.scheduled_ts = min((s.scheduled_ts for s in req.seqs if s.scheduled_ts),
                                     default=0.0)
        # The output's own copy (what a caller holds never changes), built positionally.
        metrics = RequestStateStats(
            len(procs[0].output_token_ids) if len(procs) == 1 else
            sum(len(p.output_token_ids) for p in procs), stats.arrival_time, stats.queued_ts,
            stats.scheduled_ts, stats.first_token_ts, stats.last_token_ts,
            stats.first_token_latency)
        if kind == _DELTA:
            completions = []
            sent = req.sent
            for i, proc in enumerate(req.processors):
                completions.append(proc.completion_output(True, sent[i]))
                sent[i] = len(proc.output_token_ids)
        else:
            completions = [proc.completion_output() for proc in req.processors]
        # Positional, in the fields' order (per request per step; see completion_output).
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids,
                             req.prompt_logprobs, completions, final, req.num_cached_tokens,
                             metrics, None, req.lora_request)
