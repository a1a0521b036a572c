"""The model runner: turns a SchedulerOutput into padded StepInputs and runs the jitted step.

Dimension keys: T tokens (padded to a bucket), S sequences (padded), M max pages per sequence,
B page size, V vocab, k logprobs per row.

A step is two jitted calls dispatched back to back (no host sync between them): the forward,
one compile per token bucket T, and the sampler on its [S, V] logits, where the sequence bucket
is S = min(T, max_num_seqs) (a decode batch of n sequences runs at T = S = the bucket of n).
The sampler's static variants (log-probs or not, top-k/top-p sort or not) are cheap to compile;
all forward buckets and the common sampler variants are compiled at start-up, so nothing big
compiles while serving (``num_compiles`` lets tests check that).

Decode-only steps: when every scheduled sequence has exactly one new token (pure decode, the
common step while serving), ``prepare`` sets the static ``AttentionMetadata.decode_only``, so the
forward is a separate compiled program whose Pallas attention runs only its decode launch. Those
programs exist for the token buckets a pure decode step can land in (``step_variants``) and are
compiled at start-up with the rest.

Multi-step decode (``EngineConfig.num_scheduler_steps`` = k > 1, vLLM's multi-step scheduling):
a pure decode batch the engine picks (``LLMEngine._lookahead_steps``) runs as one program of k
forward + sampler steps in a device loop (``_multi_step``), each step's token the next one's
input. One launch, one input copy and one read-back per k tokens: the batch-1 step is bound by
the host's launch work (XLA re-records the command buffers whose buffers moved), and k steps pay
it once. Its programs, one per decode bucket with and without the sort, are compiled at start-up.

Two buffers per step: the host packs the forward's int32 arrays into one int32 buffer and the
sampling tensors (float32 and uint32 bit-cast, bool widened) into another, puts both on the
device in one ``device_put`` call, and the forward and the sampler each slice theirs inside the
jit (``Packed``: static offsets, a function of the bucket shapes only). Passing ~27 numpy arrays
instead cost one host->device copy each per step. Two buffers, not one: the sampling part's
width varies (penalty / logit-bias widths), and a forward reading from a buffer of varying
length would recompile for each. On by default with one process; several processes
(multi-host) pass the numpy StepInputs as before.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
import types
from collections.abc import Mapping
from typing import Any, Sequence as TypingSequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import LOGPROBS_MODES
from jaxllm.engine import sampler as sampler_lib
from jaxllm.engine.scheduler import ScheduledSeq
from jaxllm.models.attention import SCRATCH_PAGE, AttentionMetadata, KVCache, heads_sharded

logger = logging.getLogger(__name__)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    """Everything one step reads besides params and the KV cache. All int32.

    token_ids:      [T]  token of each batch slot (padding: 0)
    positions:      [T]  its position in its sequence (padding: 0)
    md:             attention metadata (slot_mapping [T], query_start_loc [S+1], seq_lens [S],
                    page_table [S, M], num_seqs [1])
    logits_indices: [S]  the token row whose logits are sampled for each sequence (padding: 0);
                         a speculative decode has one per position of its chunk, in order
    prev_rows:      [T]  async scheduling: row of the previous step's sampled tokens that is this
                         slot's token (its id is not on the host yet); -1: use token_ids
    sampling:       per-row sampling parameters ([S]-leading arrays, see engine/sampler.py)
    lora_slots:     [T]  with LoRA enabled: each token's adapter slot (-1: none; padding -1);
                         None without (jaxllm/lora)
    """

    token_ids: jax.Array
    positions: jax.Array
    md: AttentionMetadata
    logits_indices: jax.Array
    prev_rows: jax.Array
    sampling: Any
    lora_slots: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Packed:
    """A pytree of arrays packed into one flat int32 buffer, to cross host->device in one copy.

    buf:    [N] int32; may hold more than this tree (``pack`` can lay several trees end to end)
    layout: static (treedef, ((offset, shape, numpy dtype), ...) per leaf): part of the jit
            cache key; it depends only on the leaves' shapes, so it is fixed per compiled bucket
    """

    buf: jax.Array
    layout: tuple = dataclasses.field(metadata=dict(static=True))

    def unpack(self):
        """Inside a jit: the tree, each leaf a static slice of buf (bit-cast back to its dtype)."""
        treedef, entries = self.layout
        leaves = []
        for off, shape, dtype in entries:
            x = self.buf[off:off + math.prod(shape)].reshape(shape)
            if dtype == np.bool_:
                x = x != 0
            elif dtype != np.int32:
                x = jax.lax.bitcast_convert_type(x, dtype)
            leaves.append(x)
        return jax.tree.unflatten(treedef, leaves)


def _program_key(kind: str, T: int, inputs: Any, *statics: Any) -> tuple:
    """The key a compiled program is kept under in ``ModelRunner._programs``: its kind, token
    (or sequence) bucket, the tree structure of its packed inputs (their layouts: a sampler
    of other penalty widths is another program) and its static arguments."""
    return (kind, T, jax.tree.structure(inputs), *statics)


def pack(*trees) -> tuple[np.ndarray, list[tuple]]:
    """Host side: numpy trees -> (one int32 buffer, a ``Packed`` layout per tree). Leaves must
    be 4-byte (int32 / uint32 / float32: their bits copied as int32) or bool (widened)."""
    layouts, arrays, off = [], [], 0
    for tree in trees:
        leaves, treedef = jax.tree.flatten(tree)
        entries = []
        for x in leaves:
            x = np.asarray(x)
            if x.dtype.itemsize != 4 and x.dtype != np.bool_:
                raise TypeError(f"cannot pack a {x.dtype} leaf of shape {x.shape}: only 4-byte "
                                f"dtypes and bool")
            entries.append((off, x.shape, x.dtype))
            arrays.append((off, x))
            off += x.size
        layouts.append((treedef, tuple(entries)))
    # One preallocated buffer, each leaf copied into its slot (a slice assignment: ~1 us each;
    # np.concatenate of views and dtype.name lookups cost several times more at ~25 leaves).
    buf = np.empty(off, np.int32)
    for o, x in arrays:
        flat = x.reshape(-1)
        buf[o:o + flat.size] = flat if x.dtype == np.bool_ else flat.view(np.int32)
    return buf, layouts


class PageRows:
    """Page-table rows kept between steps, one per sequence, updated with the pages appended
    since the step before: a decode step's page table then costs O(new pages), not a copy of
    every sequence's page list (~1 ms at batch 256 x 64 pages, benchmarks/host_overhead.py).

    Relies on how the scheduler changes ``Sequence.page_ids``: it only grows in place
    (``extend``), and is otherwise replaced by another list object (preemption, finish, a
    prefix-cache hit at admission). A row is reused while its sequence holds the same list
    object; a new list rebuilds it. Rows of sequences not seen for a while are dropped when the
    slots run out (``capacity`` >= 2 x the largest batch leaves room for a whole batch).
    """

    def __init__(self, capacity: int, max_pages: int):
        self.rows = np.full((capacity, max_pages), SCRATCH_PAGE, np.int32)  # [slots, M]
        self._entries: dict[int, list] = {}  # id(seq) -> [seq, page list, slot, pages copied]
        self._free = list(range(capacity - 1, -1, -1))

    def gather(self, seqs: list, out: np.ndarray | None = None) -> np.ndarray:
        """[len(seqs), M] the sequences' page-table rows (padding: SCRATCH_PAGE), written into
        ``out`` when given (one copy: the table is [S, max_model_len / B], 8 MB at S = 256 and
        a 128k context)."""
        entries, rows = self._entries, self.rows
        slots = []
        for seq in seqs:
            pages = seq.page_ids
            e = entries.get(id(seq))
            if e is None or e[0] is not seq or e[1] is not pages or e[3] > len(pages):
                # A known sequence whose list was replaced refills its own slot.
                slot = e[2] if e is not None else self._take_slot(seqs)
                rows[slot] = SCRATCH_PAGE
                rows[slot, :len(pages)] = pages
                entries[id(seq)] = [seq, pages, slot, len(pages)]
            elif e[3] < len(pages):  # pages appended since
                slot = e[2]
                rows[slot, e[3]:len(pages)] = pages[e[3]:]
                e[3] = len(pages)
            else:
                slot = e[2]
            slots.append(slot)
        return np.take(rows, slots, axis=0, out=out)

    def _take_slot(self, batch: list) -> int:
        if not self._free:
            keep = {id(s) for s in batch}
            for key in [k for k in self._entries if k not in keep]:
                self._free.append(self._entries.pop(key)[2])
        return self._free.pop()


COMPILE_WORKERS_ENV = "JAXLLM_COMPILE_WORKERS"


def compile_workers() -> int:
    """Threads that compile the step programs at start-up: ``JAXLLM_COMPILE_WORKERS`` when set,
    else one per CPU. (One thread makes every GEMM autotuning measurement run alone on the GPU:
    the A/B test for whether concurrent compiles pick worse GEMM configs.)"""
    raw = os.environ.get(COMPILE_WORKERS_ENV)
    if raw is None or not raw.strip():
        return os.cpu_count() or 1
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{COMPILE_WORKERS_ENV} must be a positive integer, got {raw!r}.") from None
    if value < 1:
        raise ValueError(f"{COMPILE_WORKERS_ENV} must be a positive integer, got {value}.")
    return value


def _unpacked(x):
    return x.unpack() if isinstance(x, Packed) else x


def _model(graphdef, treedef, leaves) -> nnx.Module:
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _token_ids(inputs: StepInputs, prev_tokens: jax.Array) -> jax.Array:
    """The step's token ids: the host's, or the previous step's sampled token where prev_rows
    says so (prev_tokens: [max_num_seqs] that step's sampled ids, padded)."""
    from_prev = prev_tokens[jnp.maximum(inputs.prev_rows, 0)]
    return jnp.where(inputs.prev_rows >= 0, from_prev, inputs.token_ids)


def _forward(graphdef, treedef, leaves, kv_caches: KVCache, inputs: StepInputs,
             prev_tokens: jax.Array):
    """The model over the ragged batch; logits [S, V] float32 only at the sampled rows.
    ``inputs``: StepInputs, or a Packed of them."""
    inputs = _unpacked(inputs)
    model = _model(graphdef, treedef, leaves)
    hidden, kv_caches = model(_token_ids(inputs, prev_tokens), inputs.positions, kv_caches,
                              inputs.md, inputs.lora_slots)
    return kv_caches, model.compute_logits(hidden[inputs.logits_indices])


def _hidden_forward(graphdef, treedef, leaves, kv_caches: KVCache, inputs: StepInputs,
                    prev_tokens: jax.Array):
    """The model over the ragged batch; its final hidden states [T, E] (after the last norm):
    what a pooling model (engine/pooling.py) reads instead of logits."""
    inputs = _unpacked(inputs)
    model = _model(graphdef, treedef, leaves)
    hidden, kv_caches = model(_token_ids(inputs, prev_tokens), inputs.positions, kv_caches,
                              inputs.md, inputs.lora_slots)
    return kv_caches, hidden


def _sample_padded(max_num_seqs: int, logits: jax.Array, sampling, num_logprobs: int | None,
                   sort: bool, logprobs_mode: str = "raw_logprobs"):
    """The sampler, plus its token ids padded to [max_num_seqs] (a fixed shape: the next step's
    forward reads them, whatever this step's bucket was). ``sampling``: SamplingTensors, or a
    Packed of them."""
    out = sampler_lib.sample(logits, _unpacked(sampling), num_logprobs, sort, logprobs_mode)
    return out, jnp.pad(out.token_ids, (0, max_num_seqs - out.token_ids.shape[0]))


def _multi_step(graphdef, treedef, max_num_seqs: int, page_size: int, num_steps: int, leaves,
                kv_caches: KVCache, inputs: StepInputs, prev_tokens: jax.Array, sampling,
                sort: bool):
    """``num_steps`` decode steps of one pure-decode batch in one program (multi-step
    scheduling): a device loop of forward + sampler in which each step's sampled token is the
    next step's input, at the next position (its K/V slot taken from the page table, which
    already holds the pages of all ``num_steps`` positions) and with the next sampling step (the
    row's key is fold_in(seed, step): the tokens are the ones single steps would sample).

    ``inputs``: a decode-only StepInputs (token row i is sequence i), or a Packed of them;
    ``sampling``: SamplingTensors without log-probs, or a Packed of them. Returns (kv caches,
    SamplerOutput with a leading [num_steps] axis, the last step's ids padded to
    [max_num_seqs] for the next launch's placeholders)."""
    inputs, sampling = _unpacked(inputs), _unpacked(sampling)
    model = _model(graphdef, treedef, leaves)
    md = inputs.md
    T, S = inputs.token_ids.shape[0], inputs.logits_indices.shape[0]
    num_seqs = md.num_seqs[0]
    real_tok = jnp.arange(T) < num_seqs  # token row i is sequence i (padding beyond num_seqs)
    real_seq = (jnp.arange(S) < num_seqs).astype(jnp.int32)
    seq_of_row = jnp.minimum(jnp.arange(T), S - 1)
    max_page = md.page_table.shape[1] - 1

    def one_step(carry, j):
        kv, tokens = carry
        positions = inputs.positions + j * real_tok
        page = md.page_table[seq_of_row, jnp.minimum(positions // page_size, max_page)]
        slots = jnp.where(real_tok, page * page_size + positions % page_size, md.slot_mapping)
        step_md = dataclasses.replace(md, slot_mapping=slots, seq_lens=md.seq_lens + j * real_seq)
        hidden, kv = model(tokens, positions, kv, step_md, inputs.lora_slots)
        logits = model.compute_logits(hidden[inputs.logits_indices])
        out = sampler_lib.sample(logits, dataclasses.replace(sampling, steps=sampling.steps + j),
                                 None, sort)
        next_tokens = jnp.zeros((T,), jnp.int32).at[:S].set(out.token_ids[:T])
        return (kv, next_tokens), out

    (kv_caches, _), outs = jax.lax.scan(one_step, (kv_caches, _token_ids(inputs, prev_tokens)),
                                        jnp.arange(num_steps, dtype=jnp.int32))
    return kv_caches, outs, jnp.pad(outs.token_ids[-1], (0, max_num_seqs - S))


def _prompt_logprobs_forward(graphdef, treedef, leaves, kv_caches: KVCache, inputs: StepInputs,
                             prev_tokens: jax.Array, next_ids: jax.Array, num_logprobs: int):
    """Variant for steps where some request asks for prompt_logprobs: log-probs at every row.

    The one exception to "logits only at sampled positions", so it is compiled on first use only.
    next_ids: [T] the token that follows each row's token in its prompt (-1: none/not needed).
    Returns, per row: logprob of next_ids [T], its rank [T] (1 = most likely), top-k ids/logprobs.
    """
    inputs = _unpacked(inputs)
    model = _model(graphdef, treedef, leaves)
    hidden, kv_caches = model(_token_ids(inputs, prev_tokens), inputs.positions, kv_caches,
                              inputs.md, inputs.lora_slots)
    logits = model.compute_logits(hidden[inputs.logits_indices])
    all_lp = jax.nn.log_softmax(model.compute_logits(hidden), axis=-1)  # [T, V]
    safe_ids = jnp.maximum(next_ids, 0)
    next_lp = jnp.take_along_axis(all_lp, safe_ids[:, None], axis=-1)[:, 0]
    rank = jnp.sum(all_lp > next_lp[:, None], axis=-1).astype(jnp.int32) + 1
    top_lp, top_ids = jax.lax.top_k(all_lp, max(num_logprobs, 1))
    return kv_caches, logits, (next_lp, rank, top_ids, top_lp)


def _traced_over_heads(mesh, fn):
    """fn, traced with attention run per head shard of ``mesh`` (tensor parallelism)."""
    if mesh is None:
        return fn

    def traced(*args):
        with heads_sharded(mesh):
            return fn(*args)
    return traced


def zeros_kv_cache(num_layers: int, shape: tuple[int, ...], dtype: Any,
                   sharding: Any = None) -> KVCache:
    """Zeroed per-layer (k, v) pages; with a sharding, each device allocates only its shard."""
    make = (jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding) if sharding is not None
            else lambda: jnp.zeros(shape, dtype))
    return [(make(), make()) for _ in range(num_layers)]


# enforce_eager (vLLM's name for "no CUDA graphs"): the step programs are compiled without
# XLA's command buffers (its CUDA graphs; XLA's default records fusions, cuBLAS(Lt), custom
# calls and cuDNN into them), so every kernel is launched on its own. Off by default, as in
# vLLM, by measurement (H200, 2026-12-01, benchmarks/RESULTS.md): command buffers make the bf16
# step faster at batch 1/64/256 (4.14/7.33/13.51 against 4.33/7.44/14.02 ms) and fp8's at
# batch 1 (3.68 against 4.56 ms).
EAGER_COMPILER_OPTIONS = {"xla_gpu_enable_command_buffer": ""}
# Tensor-parallel steps: XLA's one-shot all-reduce kernel off. A chain of 65 dependent psums of
# [1, 4096] bf16 (one tp=2 decode step's all-reduces) on 2 x H200 (NVLink; 2026-12-01,
# benchmarks/RESULTS.md "All-reduce"): 10.82 ms with XLA's default, 5.79 with this (batch 256:
# 14.54 -> 5.69 ms). It leaves NCCL's kernels to do the all-reduce.
TP_COMPILER_OPTIONS = {"xla_gpu_unsupported_use_all_reduce_one_shot_kernel": False}


# fp8 step programs of more than a few tokens: every GEMM on cuBLAS(Lt), none as a Triton GEMM
# fusion. XLA autotunes each Triton GEMM fusion by compiling and timing its candidate tiles at
# the program's shapes: the fp8 start-up at the H200's defaults (1024 sequences / 16384 tokens)
# took 139 s with the buckets of 128..1024 tokens on Triton (~100 s each) and 306 s for the KV
# pool's sizing compile of the 16384-token step with all on Triton; with cuBLAS(Lt) from 32
# tokens, 40 s (sizing 2 s), and the offline throughput was no lower (9,844 against 9,759
# tok/s; H200, 2026-12-01, benchmarks/RESULTS.md). The engine's fp8 projection takes the same
# GPU time either way at M = 64 and 4096 (kernels.py --sections gemm_options), while at M = 8
# cuBLAS is up to 7x slower: there the projection runs weight-only (the e4m3 weight upcast
# inside a Triton dot; fp8.GPU_WEIGHT_ONLY_MAX_TOKENS = 16), so buckets of <= 16 tokens keep
# XLA's choice.
CUBLAS_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
FP8_CUBLAS_MIN_TOKENS = 32


def cublas_min_tokens(backend: str, quantization: str | None) -> int | None:
    """Token buckets of at least this many rows compile their GEMMs for cuBLAS(Lt)
    (``CUBLAS_COMPILER_OPTIONS``); None: none do. On a GPU only. fp8 weights:
    ``JAXLLM_FP8_CUBLAS_MIN_TOKENS`` when set (0: never), else ``FP8_CUBLAS_MIN_TOKENS``.
    Other weights keep XLA's choice (cuBLAS is slower at bf16's decode sizes) unless
    ``JAXLLM_CUBLAS_MIN_TOKENS`` says from which bucket (an A/B switch for the cold start's
    compiles, which autotune each Triton GEMM fusion; 0 or unset: never)."""
    import os

    if backend != "gpu":
        return None
    env, default = (("JAXLLM_FP8_CUBLAS_MIN_TOKENS", FP8_CUBLAS_MIN_TOKENS)
                    if quantization == "fp8" else ("JAXLLM_CUBLAS_MIN_TOKENS", None))
    raw = os.environ.get(env)
    if raw is None:
        return default
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{env}={raw!r}: want an integer (0: never)") from None
    return n if n > 0 else None


def step_jit_options(enforce_eager: bool, tensor_parallel: bool = False,
                     cublas_gemms: bool = False) -> dict:
    """Keyword arguments for the ``jax.jit`` of a step program (forward, sampler)."""
    options = {**(EAGER_COMPILER_OPTIONS if enforce_eager else {}),
               **(TP_COMPILER_OPTIONS if tensor_parallel else {}),
               **(CUBLAS_COMPILER_OPTIONS if cublas_gemms else {})}
    return {"compiler_options": options} if options else {}


def default_token_buckets(max_num_batched_tokens: int, smallest: int = 8,
                          growth: int = 2) -> tuple[int, ...]:
    """smallest * growth**i up to (and always including) max_num_batched_tokens."""
    buckets = []
    b = smallest
    while b < max_num_batched_tokens:
        buckets.append(b)
        b *= growth
    buckets.append(max_num_batched_tokens)
    return tuple(buckets)


class ModelRunner:
    """Owns the params, the KV cache and the jitted step; builds StepInputs on the host."""

    # Kept compiled programs (the executable cache); each runner's own dict is set with its
    # params (the ``state`` setter). A runner without one (the pipeline's) runs the jits.
    _programs: Mapping[tuple, Any] = types.MappingProxyType({})

    def __init__(self, model: nnx.Module, *, num_layers: int, num_kv_heads: int, head_dim: int,
                 num_pages: int, page_size: int, max_model_len: int, max_num_seqs: int,
                 token_buckets: TypingSequence[int], cache_dtype: Any, vocab_size: int,
                 max_logprobs: int, parallel: Any = None, enforce_eager: bool = False,
                 cublas_min_tokens: int | None = None, logprobs_mode: str = "raw_logprobs"):
        # parallel: a sharding.rules.ModelSharding with one stage (tensor parallelism): the params
        # are already in their shards; the KV cache is split by KV head, attention per shard.
        # cublas_min_tokens: token buckets of at least this many rows are compiled with
        # CUBLAS_COMPILER_OPTIONS (the engine sets it for fp8 weights); None: none are.
        tp = parallel is not None and parallel.tp > 1
        self._jit_options = step_jit_options(enforce_eager, tp)
        self._cublas_jit_options = step_jit_options(enforce_eager, tp, cublas_gemms=True)
        self.cublas_min_tokens = cublas_min_tokens
        self._set_step_shape(parallel, parallel.stages[0].mesh if parallel is not None else None,
                             num_pages=num_pages, page_size=page_size,
                             max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                             token_buckets=token_buckets, vocab_size=vocab_size,
                             max_logprobs=max_logprobs, logprobs_mode=logprobs_mode)
        self.graphdef, self.state = nnx.split(model)
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.kv_caches: KVCache = zeros_kv_cache(
            num_layers, shape, cache_dtype,
            parallel.stages[0].kv_sharding if parallel is not None else None)
        # The sampler is a jit of its own: its static variants (sort / log-probs / bias and
        # penalty widths) compile in well under a second, the forward's in many seconds.
        # Sharded: the sampler's outputs are replicated (one fixed sharding, so the next step's
        # forward never sees another; under several processes the leader reads them from its
        # own devices, see fetch).
        replicated = (jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
                      if self.mesh is not None else None)
        self._sample = jax.jit(functools.partial(_sample_padded, max_num_seqs,
                                                 logprobs_mode=self.logprobs_mode),
                               static_argnums=(2, 3), out_shardings=replicated,
                               **self._jit_options)
        self._replicate = (jax.jit(lambda x: x, out_shardings=replicated) if replicated is not None
                           else (lambda x: x))
        # Two host->device copies of the step's inputs (module docstring). Several processes:
        # every process would have to place the same buffer on devices it cannot address, so
        # they pass numpy StepInputs as before.
        self.pack_inputs = jax.process_count() == 1
        self._input_sharding = replicated
        # On an accelerator a server must not stop to compile the sampler of the first penalty or
        # grammar row of each batch size (benchmarks/RESULTS.md, 2026-12-05: 4 and 7 programs
        # mid-run at batch 256 on the 8B); on a CPU they compile when first used, and start-up
        # stays short.
        self.compile_sampler_extras = jax.default_backend() != "cpu"
        # The last dispatched step's sampled ids, [max_num_seqs]: where async scheduling's
        # placeholders (StepInputs.prev_rows) take their tokens from; placed as the sampler
        # places them.
        zeros = np.zeros((max_num_seqs,), np.int32)
        self._prev_tokens = (jnp.asarray(zeros) if replicated is None else
                             jax.make_array_from_callback(zeros.shape, replicated,
                                                          lambda idx: zeros[idx]))
        self.publisher = None  # multi-host leader: sharding.distributed publishes each step
        self.last_host_time = 0.0

    def hidden_states(self, inputs: StepInputs) -> np.ndarray:
        """A pooling step: the batch's final hidden states [T, E] as float32 on the host (the
        KV cache written, as a prefill writes it)."""
        self.kv_caches, hidden = self._hidden(self._leaves, self.kv_caches, inputs,
                                              self._prev_tokens)
        return np.asarray(jax.device_get(hidden), np.float32)

    # -- sleep mode and weight updates (LLMEngine.sleep / wake_up / update_weights) -------------
    # The step programs take the parameters and the KV cache as arguments, so both can be freed
    # and put back (the same shapes, dtypes and placements) without a recompile. A pipeline
    # runner keeps them per stage: these four accessors are what it overrides.
    def _param_tree(self):
        return self._leaves

    def _set_param_tree(self, tree) -> None:
        self._leaves = tree

    def _kv_tree(self):
        return self.kv_caches

    def _set_kv_tree(self, tree) -> None:
        self.kv_caches = tree

    def _model_param_tree(self, model: nnx.Module):
        """``model``'s parameters in the layout the step programs take."""
        return jax.tree.leaves(nnx.state(model))

    @staticmethod
    def _free(tree, keep: bool) -> tuple[Any, list, list | None]:
        """Deletes ``tree``'s arrays; returns (treedef, per-leaf (shape, dtype, sharding,
        committed), host copies when ``keep``). An array placed by default (uncommitted) is
        put back the same way: jit keys its programs on that too, and a committed copy would
        compile them again."""
        leaves, treedef = jax.tree.flatten(tree)
        specs = [(x.shape, x.dtype, x.sharding, getattr(x, "_committed", True))
                 for x in leaves]
        host = [np.asarray(jax.device_get(x)) for x in leaves] if keep else None
        seen = set()
        for x in leaves:
            if id(x) not in seen:
                seen.add(id(x))
                x.delete()
        return treedef, specs, host

    @staticmethod
    def _rebuild(saved: tuple[Any, list, list | None]):
        """The tree ``_free`` deleted: its host copies put back, or zeros (none were kept)."""
        treedef, specs, host = saved
        out = []
        for i, (shape, dtype, sharding, committed) in enumerate(specs):
            if not committed:  # where it was: the default device, uncommitted
                out.append(jnp.asarray(host[i]) if host is not None
                           else jnp.zeros(shape, dtype))
            elif host is not None:
                out.append(jax.device_put(host[i], sharding))
            else:
                out.append(jax.jit(functools.partial(jnp.zeros, shape, dtype),
                                   out_shardings=sharding)())
        return jax.tree.unflatten(treedef, out)

    def free_weights(self, keep_on_host: bool) -> None:
        """Frees the parameters' device memory (copied to host memory first when
        ``keep_on_host``); ``restore_weights`` or ``replace_weights`` puts weights back."""
        self._slept_weights = self._free(self._param_tree(), keep_on_host)
        self._set_param_tree(None)

    def restore_weights(self) -> None:
        """The weights ``free_weights`` freed: the host copies, or zeros if none were kept."""
        self._set_param_tree(self._rebuild(self._slept_weights))
        self._slept_weights = None

    def free_kv_cache(self) -> None:
        self._slept_kv = self._free(self._kv_tree(), keep=False)
        self._set_kv_tree(None)

    def restore_kv_cache(self) -> None:
        """A zeroed KV cache in the freed one's shapes and placement."""
        self._set_kv_tree(self._rebuild(self._slept_kv))
        self._slept_kv = None

    def replace_weights(self, model: nnx.Module) -> None:
        """Runs ``model``'s parameters from now on (LLMEngine.update_weights). ValueError unless
        each has the shape, dtype and placement of the one it replaces (the compiled step
        programs are kept)."""
        new = self._model_param_tree(model)
        old = self._param_tree()
        if old is None:  # freed: compare with what was freed
            treedef, specs, _ = self._slept_weights
        else:
            leaves, treedef = jax.tree.flatten(old)
            specs = [(x.shape, x.dtype, x.sharding, None) for x in leaves]
        new_leaves, new_treedef = jax.tree.flatten(new)
        if new_treedef != treedef:
            raise ValueError("the new weights are not the model's parameters (another structure)")
        for x, (shape, dtype, sharding, _) in zip(new_leaves, specs):
            if x.shape != shape or x.dtype != dtype:
                raise ValueError(f"a new weight is {x.dtype}{list(x.shape)}, the model's "
                                 f"{dtype}{list(shape)}")
            if not x.sharding.is_equivalent_to(sharding, len(shape)):
                raise ValueError(f"a new weight is placed as {x.sharding}, the model's as "
                                 f"{sharding}")
        if old is not None:
            self._free(old, keep=False)
        self._set_param_tree(new)
        self._slept_weights = None

    def _set_step_shape(self, parallel, mesh, *, num_pages: int, page_size: int,
                        max_model_len: int, max_num_seqs: int, token_buckets, vocab_size: int,
                        max_logprobs: int, logprobs_mode: str = "raw_logprobs") -> None:
        """The fields every runner (this one and the pipeline's) builds its steps from."""
        self.parallel = parallel
        self.mesh = mesh
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_pages_per_seq = math.ceil(max_model_len / page_size)
        self.token_buckets = tuple(sorted(token_buckets))
        self.vocab_size = vocab_size
        # One fixed k for every step: a different k per step would recompile; top-k of 20 per row
        # is negligible next to the lm_head.
        self.num_logprobs = max_logprobs
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got "
                             f"{logprobs_mode!r}")
        self.logprobs_mode = logprobs_mode  # what the sampler's log-probs are (sampler.py)
        # Pure decode steps run the decode-only forward (module docstring). False: every step
        # runs the general forward (for A/B measurements and tests; switch it before start-up
        # compile to skip compiling the decode-only programs, or at any time to stop using them).
        self.decode_only_steps = True
        # Sequence counts below the smallest token bucket with decode-only programs of their
        # own (EngineConfig.small_decode_buckets; the engine sets them before start-up compile).
        self.small_decode_buckets: tuple[int, ...] = ()
        # EngineConfig.num_scheduler_steps (the engine sets it before start-up compile): with
        # > 1, the multi-step decode programs of ``multi_step_variants`` are compiled too.
        self.num_scheduler_steps = 1
        self.pack_inputs = False  # ModelRunner.__init__ turns it on where it applies
        self._page_rows = PageRows(2 * max_num_seqs, self.max_pages_per_seq)
        self._knob_cache = sampler_lib.KnobCache()  # the sampling knobs of the last step's rows
        # The smallest width of a batch's penalty list (sampler.build_sampling_tensors): one
        # row's prompt + output fits, so a penalty row is one sampler program whatever its
        # length, and so do a few short rows (at least 1024 entries: 4 KiB an array).
        self.penalty_min = sampler_lib.bucket_size(max(max_model_len, 1024), 64)
        # Whether start-up also compiles the samplers of ``sampler_extras`` (ModelRunner sets it).
        self.compile_sampler_extras = False
        # The model has LoRA slots (jaxllm/lora): steps carry StepInputs.lora_slots.
        self.lora_enabled = False
        # With LoRA, a step where no sequence has an adapter runs the programs without the
        # LoRA path (EngineConfig.specialize_lora; the engine sets it before start-up compile).
        self.specialize_lora = True

    @property
    def state(self) -> nnx.State:
        """The model's parameters (nnx.State). Setting it re-flattens and re-jits the forward."""
        return jax.tree.unflatten(self._treedef, self._leaves)

    @state.setter
    def state(self, state: nnx.State) -> None:
        # The jitted forward takes the parameters as a flat list of arrays: flattening an
        # nnx.State calls back into Python for every Variable (~300 for an 8B Llama), which cost
        # ~1 ms of host time per step (benchmarks/profile_step.py); a list of arrays is parsed in
        # C++. The graphdef and treedef are closed over, not static arguments: hashing them on
        # every call cost ~2 ms per step.
        self._leaves, self._treedef = jax.tree.flatten(state)
        forward = _traced_over_heads(
            self.mesh, functools.partial(_forward, self.graphdef, self._treedef))
        prompt_forward = _traced_over_heads(self.mesh, functools.partial(
            _prompt_logprobs_forward, self.graphdef, self._treedef))
        # One jit per set of compiler options (a jit's options hold for all its programs);
        # ``forward_for`` / ``prompt_forward_for`` pick by token bucket.
        self._forward, self._forward_cublas = (
            jax.jit(forward, donate_argnums=(1,), **opts)
            for opts in (self._jit_options, self._cublas_jit_options))
        self._prompt_forward, self._prompt_forward_cublas = (
            jax.jit(prompt_forward, static_argnums=(5,), donate_argnums=(1,), **opts)
            for opts in (self._jit_options, self._cublas_jit_options))
        # Multi-step decode (_multi_step): static num_steps and sort; the KV cache donated.
        multi = _traced_over_heads(self.mesh, functools.partial(
            _multi_step, self.graphdef, self._treedef, self.max_num_seqs, self.page_size))
        self._multi, self._multi_cublas = (
            jax.jit(multi, static_argnums=(0, 6), donate_argnums=(2,), **opts)
            for opts in (self._jit_options, self._cublas_jit_options))
        # Compiled programs the step calls run instead of the jits (filled at start-up when the
        # executable cache is on: ``_compile_in_parallel``), by ``_program_key``.
        self._programs: dict[tuple, Any] = {}
        # A pooling model's forward (engine/pooling.py): compiled per token bucket on first use.
        self._hidden = jax.jit(_traced_over_heads(self.mesh, functools.partial(
            _hidden_forward, self.graphdef, self._treedef)), donate_argnums=(1,),
            **self._jit_options)

    def uses_cublas(self, T: int) -> bool:
        """Whether the programs of token bucket ``T`` compile their GEMMs for cuBLAS."""
        return self.cublas_min_tokens is not None and T >= self.cublas_min_tokens

    def forward_for(self, T: int):
        """The jitted forward that runs token bucket ``T``."""
        return self._forward_cublas if self.uses_cublas(T) else self._forward

    def multi_step_for(self, T: int):
        """The jitted multi-step decode program that runs token bucket ``T``."""
        return self._multi_cublas if self.uses_cublas(T) else self._multi

    def prompt_forward_for(self, T: int):
        """The jitted prompt-log-probs forward that runs token bucket ``T``."""
        return self._prompt_forward_cublas if self.uses_cublas(T) else self._prompt_forward

    # -- buckets ------------------------------------------------------------------------------
    def token_bucket(self, num_tokens: int) -> int:
        for b in self.token_buckets:
            if b >= num_tokens:
                return b
        raise ValueError(f"{num_tokens} tokens exceed the largest bucket {self.token_buckets[-1]}")

    def seq_bucket(self, token_bucket: int) -> int:
        return min(token_bucket, self.max_num_seqs)

    def _small_decode_buckets(self) -> tuple[int, ...]:
        """The small decode buckets that apply: below the smallest token bucket (which has a
        decode-only program anyway), at most max_num_seqs."""
        return tuple(b for b in sorted(set(self.small_decode_buckets))
                     if b < self.token_buckets[0] and b <= self.max_num_seqs)

    def decode_bucket(self, num_seqs: int) -> int:
        """Token bucket of a decode-only step of ``num_seqs`` sequences: the smallest small
        decode bucket that holds them, else their token bucket."""
        for b in self._small_decode_buckets():
            if b >= num_seqs:
                return b
        return self.token_bucket(num_seqs)

    @property
    def num_compiles(self) -> int:
        """Compiled forward and sampler variants so far (tests assert this does not grow while
        serving)."""
        return sum(f._cache_size() for f in (
            self._forward, self._forward_cublas, self._prompt_forward,
            self._prompt_forward_cublas, self._sample, self._multi, self._multi_cublas))

    def step_variants(self) -> list[tuple[int, bool]]:
        """The (token bucket T, decode_only) forward programs compiled at start-up: the general
        forward of every bucket, and the decode-only forward of each bucket a pure decode step
        of 1..max_num_seqs sequences lands in (``decode_bucket``: the small decode buckets too)."""
        variants = [(T, False) for T in self.token_buckets]
        if self.decode_only_steps:
            n = min(self.max_num_seqs, self.token_buckets[-1])
            variants += [(T, True) for T in self._small_decode_buckets()]
            variants += [(T, True) for T in self.token_buckets if T <= self.token_bucket(n)]
        return variants

    def lora_variants(self) -> tuple[bool, ...]:
        """Whether each set of the step programs above has the LoRA path: (False,) without
        LoRA, (True, False) with LoRA and ``specialize_lora`` (adapter-free steps run the
        second set: vLLM's cudagraph_specialize_lora), (True,) otherwise."""
        if not self.lora_enabled:
            return (False,)
        return (True, False) if self.specialize_lora else (True,)

    def step_programs(self) -> list[tuple[int, bool, bool]]:
        """The (token bucket T, decode_only, lora) forward programs compiled at start-up:
        ``step_variants`` for each of ``lora_variants``."""
        return [(T, d, lora) for lora in self.lora_variants() for T, d in self.step_variants()]

    def multi_step_variants(self) -> list[tuple[int, bool]]:
        """The (token bucket T, sort) multi-step decode programs compiled at start-up (with
        ``num_scheduler_steps`` > 1): one per bucket a pure decode step lands in, with and
        without the top-k/top-p sort (multi-step batches ask for no log-probs)."""
        if self.num_scheduler_steps <= 1:
            return []
        return [(T, sort) for T, decode_only in self.step_variants() if decode_only
                for sort in (False, True)]

    def sampler_variants(self) -> list[tuple[int | None, bool]]:
        """The (num_logprobs, sort) variants compiled at start-up for every sequence bucket."""
        return [(nl, sort) for nl in (None, self.num_logprobs) for sort in (False, True)]

    def sampler_extras(self) -> list[tuple[str, bool]]:
        """The (kind, sort) sampler programs compiled at start-up beside ``sampler_variants``'
        for every sequence bucket, with ``compile_sampler_extras``: kind "penalty" (a batch with
        penalty rows whose tokens fit ``penalty_min`` entries) and "mask" (a batch with a
        constrained row: structured outputs, allowed_token_ids), without log-probs. Rarer
        mixes (both, or with log-probs or a logit_bias) compile when first used."""
        if not self.compile_sampler_extras:
            return []
        return [(kind, sort) for kind in ("penalty", "mask") for sort in (False, True)]

    def _extra_sampling(self, S: int, kind: str):
        """Neutral sampler inputs of ``S`` rows in the shapes of ``kind`` (sampler_extras), on
        the device as a step passes them."""
        from jaxllm.engine.structured_output import mask_words

        t = sampler_lib.build_sampling_tensors(
            [], pad_to=S, penalty_len=self.penalty_min if kind == "penalty" else None,
            mask_words=mask_words(self.vocab_size) if kind == "mask" else None)
        if not self.pack_inputs:
            return t
        buf, (layout,) = pack(t)
        return Packed(jax.device_put(buf, self._input_sharding), layout)

    def compile_all(self, show_progress: bool = True) -> float:
        """Compiles the forward for every token bucket (on an all-padding batch) and the sampler
        variants of ``sampler_variants`` for every sequence bucket, then runs each once, so
        that serving finds every program compiled and dispatched: each forward once, and the
        sampler variants of each sequence bucket once, on the logits of its first forward. (Each
        forward ran once per sampler variant before, and the samplers once per forward: on the
        CPU the default model's start-up spent 25 of its 46 s in those runs, mostly sorting.)"""
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        self._compile_in_parallel()
        sampled = set()  # the sampler's programs depend on the sequence bucket alone
        for T, decode_only, lora in tqdm(self.step_programs(), desc="Compiling step buckets",
                                         disable=not show_progress, unit="program"):
            inputs = self.prepare([], [], T=T, decode_only=decode_only, lora=lora)
            jax.block_until_ready(self._warm_up(inputs, self.seq_bucket(T) not in sampled))
            sampled.add(self.seq_bucket(T))
        for lora in self.lora_variants():
            for T, sort in self.multi_step_variants():
                out = self.run_multi(self.prepare([], [], T=T, decode_only=True, lora=lora),
                                     sort, self.num_scheduler_steps)
                jax.block_until_ready(out)
        return time.perf_counter() - t0

    def _compile_in_parallel(self) -> None:
        """Lowers every bucket's forward and sampler variants here and compiles each on a thread
        pool as soon as it is lowered (XLA compiles without the GIL; lowering traces Python and
        holds it, so lowering the next program overlaps the compiles of the previous ones). A
        jitted function keeps the executable of an AOT ``lower(...).compile()`` made from the
        same arguments, so the calls of ``compile_all`` that follow find every program compiled.
        (8B shape on the H200 at 16384 tokens / 1024 sequences: 20 forwards, ~97 s of which the
        slowest compile was 43 s when every lowering came first.)

        With the executable cache on (jaxllm/engine/executable_cache.py: a GPU and a cache
        folder) a program found there is loaded instead of lowered and compiled, each compiled
        one is stored, and all of them are kept in ``_programs``, which the step calls run."""
        import concurrent.futures as cf

        if self.mesh is not None or not hasattr(getattr(self, "_forward", None), "lower"):
            return  # sharded / pipelined runners compile as they go (their programs differ)

        cache = self._executable_cache()
        devices = list(self._prev_tokens.devices())  # the one device every program runs on

        def timed(lo, dkey, ckey):
            t = time.perf_counter()
            compiled = lo.compile()
            secs = time.perf_counter() - t
            if cache is not None:  # the step calls run the program kept here (cold or warm)
                self._programs[dkey] = compiled
                cache.store(ckey, compiled)
            return secs

        variants = self.step_programs()
        multi_variants = [(T, sort, lora) for lora in self.lora_variants()
                          for T, sort in self.multi_step_variants()]
        n_programs = len(variants) + len(self.sampler_variants() + self.sampler_extras()) * len(
            {self.seq_bucket(T) for T, _, _ in variants}) + len(multi_variants)
        workers = max(1, min(n_programs, compile_workers()))
        names, futures, sampled, lowering, loaded = [], [], set(), 0.0, []
        t_load = 0.0
        with cf.ThreadPoolExecutor(max_workers=workers) as pool:
            def load_all(jobs):
                """(key, program or None) for each job (name, dkey, jitted, args): the programs
                the executable cache holds, loaded side by side on a pool of their own (one
                after the other, the 8B's 51 took 9 s: RESULTS "Rerun of 2026-12-04 (18:02)")
                and not behind the compiles queued on ``pool``."""
                nonlocal t_load
                if cache is None:
                    return [(None, None)] * len(jobs)
                t = time.perf_counter()
                keys = [cache.key(name, args) for name, _, _, args in jobs]
                with cf.ThreadPoolExecutor(max_workers=workers) as loader:
                    found = list(loader.map(lambda k: cache.load(k, devices), keys))
                t_load += time.perf_counter() - t
                return list(zip(keys, found))

            def submit(job, ckey, compiled):
                """Keeps the loaded program, or lowers the job's here and compiles it on the
                pool; returns its out_info."""
                nonlocal lowering
                name, dkey, jitted, args = job
                if compiled is not None:
                    self._programs[dkey] = compiled
                    loaded.append(name)
                    return compiled.out_info
                t = time.perf_counter()
                lo = jitted.lower(*args)
                lowering += time.perf_counter() - t
                names.append(name)
                futures.append(pool.submit(timed, lo, dkey, ckey))
                return lo.out_info

            fwd_jobs, samp_inputs, multi_jobs = [], [], []
            for T, decode_only, lora in variants:
                fwd_in, samp_in = self._device_inputs(
                    self.prepare([], [], T=T, decode_only=decode_only, lora=lora))
                fwd_jobs.append((
                    f"forward T={T}" + (" decode-only" if decode_only else "")
                    + (" lora" if lora else "") + (" cublas" if self.uses_cublas(T) else ""),
                    _program_key("forward", T, fwd_in), self.forward_for(T),
                    (self._leaves, self.kv_caches, fwd_in, self._prev_tokens)))
                samp_inputs.append(samp_in)
            for T, sort, lora in multi_variants:
                fwd_in, samp_in = self._device_inputs(
                    self.prepare([], [], T=T, decode_only=True, lora=lora))
                multi_jobs.append((
                    f"multi-step T={T} sort={sort}" + (" lora" if lora else "")
                    + (" cublas" if self.uses_cublas(T) else ""),
                    _program_key("multi", T, (fwd_in, samp_in), self.num_scheduler_steps, sort),
                    self.multi_step_for(T),
                    (self.num_scheduler_steps, self._leaves, self.kv_caches, fwd_in,
                     self._prev_tokens, samp_in, sort)))
            first = load_all(fwd_jobs + multi_jobs)
            samp_jobs = []
            for (T, _, _), job, found, samp_in in zip(variants, fwd_jobs, first, samp_inputs):
                out_info = submit(job, *found)
                # The sampler's programs depend on the sequence bucket alone: the decode-only
                # forward and every token bucket of one sequence bucket share them (compiling
                # them per token bucket compiled the same programs again: 16 of them at the
                # H200's defaults, where the buckets 1024..16384 all have 1024 sequences).
                if self.seq_bucket(T) in sampled:
                    continue
                sampled.add(self.seq_bucket(T))
                logits = jax.ShapeDtypeStruct(*(lambda o: (o.shape, o.dtype))(out_info[1]))
                for nl, sort in self.sampler_variants():
                    samp_jobs.append((f"sampler T={T} logprobs={nl} sort={sort}",
                                      _program_key("sample", logits.shape[0], samp_in, nl, sort),
                                      self._sample, (logits, samp_in, nl, sort)))
                for kind, sort in self.sampler_extras():
                    ex_in = self._extra_sampling(logits.shape[0], kind)
                    samp_jobs.append((f"sampler T={T} {kind} sort={sort}",
                                      _program_key("sample", logits.shape[0], ex_in, None, sort),
                                      self._sample, (logits, ex_in, None, sort)))
            for job, found in zip(samp_jobs, load_all(samp_jobs)):
                submit(job, *found)
            for job, found in zip(multi_jobs, first[len(fwd_jobs):]):
                submit(job, *found)
            secs = [f.result() for f in futures]
        # Where a cold start goes (the compiles overlap: the slowest bounds the wall time).
        self.compile_seconds = dict(zip(names, secs))
        slowest = sorted(self.compile_seconds.items(), key=lambda kv: -kv[1])[:4]
        logger.info("start-up: %d programs lowered in %.1f s (one thread), compiled on %d "
                    "threads (%.1f s of compiles in all); slowest compiles: %s", len(names),
                    lowering, workers, sum(secs), ", ".join(f"{n} {s:.1f} s" for n, s in slowest))
        if cache is not None:
            logger.info("executable cache (%s): %d programs loaded in %.1f s, %d compiled and "
                        "stored", cache.root, len(loaded), t_load, len(names))

    def _executable_cache(self):
        """The executable cache (jaxllm/engine/executable_cache.py) for this runner's programs,
        or None when it is off."""
        from jaxllm.engine import executable_cache as ec

        root = ec.cache_dir()
        if root is None:
            return None
        context = "\n".join([
            ec.static_description(self.graphdef), ec.static_description(self._treedef),
            repr((self.num_pages, self.page_size, self.max_num_seqs, self.max_model_len,
                  self.token_buckets, self.vocab_size, self.num_logprobs, self.logprobs_mode,
                  self.num_scheduler_steps, self.decode_only_steps, self.pack_inputs,
                  self.cublas_min_tokens, self._jit_options, self._cublas_jit_options))])
        return ec.ExecutableCache(root, context)

    def _device_inputs(self, inputs: StepInputs) -> tuple[Any, Any]:
        """(forward inputs, sampler inputs) as the jitted calls take them: with ``pack_inputs``
        and numpy inputs, a Packed buffer each, both put on the device by one ``device_put``;
        else the StepInputs (without sampling) and the SamplingTensors themselves. Separate
        buffers keep the forward's argument shape a function of its bucket alone."""
        fwd = dataclasses.replace(inputs, sampling=None)
        if not self.pack_inputs or not isinstance(inputs.token_ids, np.ndarray):
            return fwd, inputs.sampling
        fwd_buf, (fwd_layout,) = pack(fwd)
        samp_buf, (samp_layout,) = pack(inputs.sampling)
        fwd_buf, samp_buf = jax.device_put((fwd_buf, samp_buf), self._input_sharding)
        return Packed(fwd_buf, fwd_layout), Packed(samp_buf, samp_layout)

    def run(self, inputs: StepInputs, num_logprobs: int | None, sort: bool
            ) -> sampler_lib.SamplerOutput:
        """Dispatches the forward (updating the cache) and the sampler; returns device arrays."""
        fwd_in, samp_in = self._device_inputs(inputs)
        logits = self._run_forward(fwd_in, inputs.token_ids.shape[0])
        out, self._prev_tokens = self._run_sample(logits, samp_in, num_logprobs, sort)
        return out

    def _warm_up(self, inputs: StepInputs, samplers: bool) -> Any:
        """``compile_all``'s run of one bucket: its forward once, then (``samplers``) every
        sampler variant on those logits. Returns what to wait for."""
        fwd_in, samp_in = self._device_inputs(inputs)
        out = logits = self._run_forward(fwd_in, inputs.token_ids.shape[0])
        for nl, sort in self.sampler_variants() if samplers else ():
            out, self._prev_tokens = self._run_sample(logits, samp_in, nl, sort)
        for kind, sort in self.sampler_extras() if samplers else ():
            out, self._prev_tokens = self._run_sample(
                logits, self._extra_sampling(logits.shape[0], kind), None, sort)
        return out

    def _run_forward(self, fwd_in, T: int):
        """Dispatches the forward of token bucket ``T`` (updating the cache); returns logits."""
        forward = self._programs.get(_program_key("forward", T, fwd_in)) if self._programs \
            else None
        if forward is None:
            forward = self.forward_for(T)
        self.kv_caches, logits = forward(self._leaves, self.kv_caches, fwd_in, self._prev_tokens)
        return logits

    def _run_sample(self, logits, samp_in, num_logprobs: int | None, sort: bool):
        sample = self._programs.get(_program_key(
            "sample", logits.shape[0], samp_in, num_logprobs, sort)) if self._programs else None
        if sample is not None:
            return sample(logits, samp_in)
        return self._sample(logits, samp_in, num_logprobs, sort)

    def run_multi(self, inputs: StepInputs, sort: bool, num_steps: int
                  ) -> sampler_lib.SamplerOutput:
        """Dispatches ``num_steps`` decode steps of a decode-only batch as one program
        (``_multi_step``); returns the SamplerOutput, each array with a leading [num_steps]
        axis, as device arrays."""
        if not inputs.md.decode_only:
            raise ValueError("multi-step runs pure decode batches only (decode_only inputs)")
        fwd_in, samp_in = self._device_inputs(inputs)
        T = inputs.token_ids.shape[0]
        multi = self._programs.get(_program_key(
            "multi", T, (fwd_in, samp_in), num_steps, sort)) if self._programs else None
        if multi is not None:
            self.kv_caches, out, self._prev_tokens = multi(
                self._leaves, self.kv_caches, fwd_in, self._prev_tokens, samp_in)
        else:
            self.kv_caches, out, self._prev_tokens = self.multi_step_for(T)(
                num_steps, self._leaves, self.kv_caches, fwd_in, self._prev_tokens, samp_in,
                sort)
        return out

    # -- host side ----------------------------------------------------------------------------
    def prepare(self, scheduled: list[ScheduledSeq],
                sampling_rows: list[sampler_lib.SamplingRow] | None,
                T: int | None = None, decode_only: bool | None = None,
                lora: bool | None = None) -> StepInputs:
        """Builds padded numpy StepInputs for the scheduled sequences, in their order.
        ``sampling_rows`` None: no sampling tensors (``dispatch_forward``: they come later).

        decode_only: None picks it (every sequence has one new token, and ``decode_only_steps``);
        True / False force it (start-up compile, tests). True with a longer sequence is wrong
        results with the Pallas kernel, so it is refused.

        lora (with ``lora_enabled``): whether the step carries ``lora_slots`` and so runs the
        programs with the LoRA path. None picks it: yes when a sequence has an adapter or
        ``specialize_lora`` is off. True / False force it (start-up compile); False with a
        sequence under an adapter is refused. Without ``lora_enabled`` it is ignored."""
        n_tokens = sum(s.num_new_tokens for s in scheduled)
        pure_decode = n_tokens == len(scheduled) and all(s.num_new_tokens == 1 for s in scheduled)
        if decode_only is None:
            decode_only = bool(scheduled) and pure_decode and self.decode_only_steps
        elif decode_only and not pure_decode:
            raise ValueError(f"decode_only=True needs one new token per sequence; the batch has "
                             f"{n_tokens} tokens over {len(scheduled)} sequences")
        if T is None:
            T = self.decode_bucket(n_tokens) if decode_only else self.token_bucket(n_tokens)
        S = self.seq_bucket(T)
        B, M = self.page_size, self.max_pages_per_seq
        num_seqs = len(scheduled)
        assert num_seqs <= S, (num_seqs, S)

        token_ids = np.zeros(T, np.int32)
        positions = np.zeros(T, np.int32)
        seq_of_token = np.zeros(T, np.int32)
        query_start_loc = np.zeros(S + 1, np.int32)
        seq_lens = np.zeros(S, np.int32)
        page_table = np.empty((S, M), np.int32)
        page_table[num_seqs:] = SCRATCH_PAGE
        logits_indices = np.zeros(S, np.int32)
        prev_rows = np.full(T, -1, np.int32)
        if pure_decode and num_seqs:
            self._prepare_decode(scheduled, token_ids, positions, seq_of_token, query_start_loc,
                                 seq_lens, logits_indices, prev_rows)
            off = num_seqs
        else:
            off = self._prepare_ragged(scheduled, token_ids, positions, seq_of_token,
                                       query_start_loc, seq_lens, logits_indices, prev_rows)
        if num_seqs:
            self._page_rows.gather([s.seq for s in scheduled], out=page_table[:num_seqs])
        query_start_loc[num_seqs + 1:] = off
        slot_mapping = (page_table[seq_of_token, positions // B] * B + positions % B).astype(np.int32)
        slot_mapping[off:] = SCRATCH_PAGE * B  # padding tokens write into the scratch page
        md = AttentionMetadata(slot_mapping=slot_mapping, query_start_loc=query_start_loc,
                               seq_lens=seq_lens, page_table=page_table,
                               num_seqs=np.array([num_seqs], np.int32),
                               decode_only=bool(decode_only))
        sampling = None if sampling_rows is None else sampler_lib.build_sampling_tensors(
            sampling_rows, pad_to=S, knob_cache=self._knob_cache, vocab_size=self.vocab_size,
            penalty_min=self.penalty_min)
        lora_slots = None
        adapters = self.lora_enabled and any(s.seq.lora_slot >= 0 for s in scheduled)
        if lora is None:
            lora = adapters or not self.specialize_lora
        elif adapters and not lora:
            raise ValueError("lora=False, but a scheduled sequence has a LoRA adapter")
        if self.lora_enabled and lora:  # each token its sequence's slot (LoraManager.activate)
            lora_slots = np.full(T, -1, np.int32)
            if num_seqs:
                lora_slots[:off] = np.repeat(
                    np.array([s.seq.lora_slot for s in scheduled], np.int32),
                    [s.num_new_tokens for s in scheduled])
        return StepInputs(token_ids=token_ids, positions=positions, md=md,
                          logits_indices=logits_indices, prev_rows=prev_rows, sampling=sampling,
                          lora_slots=lora_slots)

    @staticmethod
    def _prepare_decode(scheduled, token_ids, positions, seq_of_token, query_start_loc, seq_lens,
                        logits_indices, prev_rows) -> None:
        """``prepare``'s per-row arrays (all but the page table) for a batch of one new token
        per sequence, the step that runs while serving: token i is sequence i's, so they are
        filled by a few whole-array numpy operations from one list of per-row tuples (row by
        row, as _prepare_ragged, cost ~1 ms more at batch 256, benchmarks/host_overhead.py)."""
        n = len(scheduled)
        # (token, position, row of the previous step's output holding the token or -1).
        per_row = np.array([
            (s.seq.all_token_ids[s.start_pos], s.start_pos,
             s.seq.pending_row if s.seq.num_pending and s.start_pos == s.seq.num_tokens - 1
             else -1)
            for s in scheduled], np.int64).reshape(n, 3)
        pending = per_row[:, 2]
        # A placeholder's id is not known here: 0 on the host, the device's token via prev_rows.
        token_ids[:n] = np.where(pending >= 0, 0, per_row[:, 0])
        prev_rows[:n] = pending
        positions[:n] = per_row[:, 1]
        seq_lens[:n] = per_row[:, 1] + 1
        rows = np.arange(n, dtype=np.int32)
        seq_of_token[:n] = rows
        query_start_loc[1:n + 1] = rows + 1
        logits_indices[:n] = rows

    @staticmethod
    def _prepare_ragged(scheduled, token_ids, positions, seq_of_token, query_start_loc, seq_lens,
                        logits_indices, prev_rows) -> int:
        """``prepare``'s per-row arrays (all but the page table) for any batch (prefill chunks
        and decodes), row by row; returns the number of real tokens. A speculative decode
        (``num_spec`` > 0) has a logits row for each of its 1 + num_spec positions, in order:
        the sampler's rows are then not one per sequence (``logits_indices`` holds them all)."""
        off = 0
        r = 0  # logits row
        for i, s in enumerate(scheduled):
            n, start = s.num_new_tokens, s.start_pos
            token_ids[off:off + n] = s.token_ids
            if s.seq.num_pending:  # its last token is still on the device (async scheduling)
                last = s.seq.num_tokens - 1
                if start <= last < start + n:
                    token_ids[off + last - start] = 0
                    prev_rows[off + last - start] = s.seq.pending_row
            positions[off:off + n] = np.arange(start, start + n, dtype=np.int32)
            seq_of_token[off:off + n] = i
            seq_lens[i] = start + n
            off += n
            query_start_loc[i + 1] = off
            k = s.num_spec
            if k:
                if r + k >= len(logits_indices):
                    raise ValueError(f"the step's sampled positions exceed its "
                                     f"{len(logits_indices)} sequence slots (drafts are capped "
                                     "by max_num_seqs)")
                logits_indices[r:r + k + 1] = np.arange(off - k - 1, off, dtype=np.int32)
            else:
                logits_indices[r] = off - 1
            r += 1 + k
        return off

    def dispatch(self, scheduled: list[ScheduledSeq], sampling_rows: list[sampler_lib.SamplingRow],
                 prompt_next_ids: np.ndarray | None = None, num_steps: int = 1):
        """Dispatches one step without waiting for it: returns (sampler output, prompt log-probs
        or None) as device arrays. ``prompt_next_ids``: [n_tokens] next prompt token per row
        (-1 where none), when some request wants prompt log-probs. ``num_steps`` > 1: a pure
        decode batch (pages for every step already allocated, no log-probs) run as that many
        steps in one program (``run_multi``); the output's arrays get a leading [num_steps]."""
        t0 = time.perf_counter()
        inputs = self.prepare(scheduled, sampling_rows)
        sort = sampler_lib.needs_sort(sampling_rows, self.vocab_size)
        if num_steps > 1:
            self.last_host_time = time.perf_counter() - t0
            return self.run_multi(inputs, sort, num_steps), None
        nl = sampler_lib.logprobs_width(sampling_rows, self.num_logprobs)
        next_ids = None
        if prompt_next_ids is not None:
            next_ids = np.full(inputs.token_ids.shape, -1, np.int32)
            next_ids[:len(prompt_next_ids)] = prompt_next_ids
        self.last_host_time = time.perf_counter() - t0
        if self.publisher is not None:  # multi-host leader: followers launch the same step
            self.publisher(("step", inputs, nl, sort, next_ids))
        return self.launch(inputs, nl, sort, next_ids)

    # Late sampler inputs: the engine launches a step's forward before it reads the previous
    # step back, and its sampler after (the forward takes the previous tokens on the device; only
    # the sampler's inputs need them on the host: a grammar's mask, penalty token lists). The
    # device runs the forward while the host reads and builds them (engine/llm_engine.py,
    # ``_dispatch``). The pipeline runner and multi-host leaders do not split a step.
    late_sampling = True

    def dispatch_forward(self, scheduled: list[ScheduledSeq],
                         prompt_next_ids: np.ndarray | None = None):
        """Launches the forward of one step (one step per launch) without its sampler;
        returns (its logits [S, V], prompt log-probs or None, both on the device; host seconds
        spent). ``prompt_next_ids``: as ``dispatch``'s."""
        t0 = time.perf_counter()
        inputs = self.prepare(scheduled, None)
        T = inputs.token_ids.shape[0]
        fwd = dataclasses.replace(inputs, sampling=None)
        if self.pack_inputs:
            buf, (layout,) = pack(fwd)
            fwd = Packed(jax.device_put(buf, self._input_sharding), layout)
        host = time.perf_counter() - t0
        if prompt_next_ids is None:
            return self._run_forward(fwd, T), None, host
        next_ids = np.full(T, -1, np.int32)
        next_ids[:len(prompt_next_ids)] = prompt_next_ids
        self.kv_caches, logits, prompt_lp = self.prompt_forward_for(T)(
            self._leaves, self.kv_caches, fwd, self._prev_tokens, next_ids, self.num_logprobs)
        return logits, self._replicate(prompt_lp), host

    def dispatch_sampler(self, logits: jax.Array, sampling_rows: list[sampler_lib.SamplingRow],
                         host_seconds: float = 0.0) -> sampler_lib.SamplerOutput:
        """Launches the sampler of a step whose forward ``dispatch_forward`` launched."""
        t0 = time.perf_counter()
        sampling = sampler_lib.build_sampling_tensors(
            sampling_rows, pad_to=logits.shape[0], knob_cache=self._knob_cache,
            vocab_size=self.vocab_size, penalty_min=self.penalty_min)
        if self.pack_inputs:
            buf, (layout,) = pack(sampling)
            sampling = Packed(jax.device_put(buf, self._input_sharding), layout)
        nl = sampler_lib.logprobs_width(sampling_rows, self.num_logprobs)
        sort = sampler_lib.needs_sort(sampling_rows, self.vocab_size)
        self.last_host_time = host_seconds + time.perf_counter() - t0
        out, self._prev_tokens = self._run_sample(logits, sampling, nl, sort)
        return out

    def launch(self, inputs: StepInputs, nl: int | None, sort: bool,
               next_ids: np.ndarray | None = None):
        """Launches a prepared step (what a multi-host follower runs for each leader step)."""
        if next_ids is None:
            return self.run(inputs, nl, sort), None
        fwd_in, samp_in = self._device_inputs(inputs)
        self.kv_caches, logits, prompt_lp = self.prompt_forward_for(inputs.token_ids.shape[0])(
            self._leaves, self.kv_caches, fwd_in, self._prev_tokens, next_ids, self.num_logprobs)
        out, self._prev_tokens = self._run_sample(logits, samp_in, nl, sort)
        return out, self._replicate(prompt_lp)

    def fetch(self, tree):
        """Device results -> numpy. Under several processes an output spans other hosts'
        devices; it is replicated, so this host's copy is the value."""
        def local(x):
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                return np.asarray(x.addressable_data(0))
            return x
        return jax.device_get(jax.tree.map(local, tree))

    def execute(self, scheduled: list[ScheduledSeq], sampling_rows: list[sampler_lib.SamplingRow],
                prompt_next_ids: np.ndarray | None = None):
        """``dispatch`` and wait: the sampler output and prompt log-probs as numpy."""
        return jax.device_get(self.dispatch(scheduled, sampling_rows, prompt_next_ids))


def kv_page_bytes(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int,
                  dtype: Any) -> int:
    """Bytes of one page across all layers, K and V."""
    return 2 * num_layers * page_size * num_kv_heads * head_dim * jnp.dtype(dtype).itemsize
