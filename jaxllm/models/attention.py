"""The one attention interface the models call: write new K/V into pages, attend over pages.

KV cache layout (fixed here; the kernels read it): a list with one ``(k_pages, v_pages)`` pair per
layer, each ``[P, B, K, D]`` (pages, page size, kv heads, head dim) in the cache dtype. Page 0 is
a scratch page that is never handed to a sequence: padding tokens write there and padding
page-table entries point there. ``slot = page * B + offset``.

FP8 cache (``kv_cache_dtype="fp8"``): pages are float8_e4m3fn (``"fp8_e5m2"``: float8_e5m2)
holding ``k / k_scale`` and ``v / v_scale``, with one static float scale per layer for K and one
for V (vLLM's scheme; 1.0 unless a checkpoint gives them). A per-tensor scale folds out of the
attention exactly: q.(k_scale k8) = k_scale (q.k8) goes into sm_scale, and sum p (v_scale v8) =
v_scale (sum p v8) multiplies the output, so the kernels only upcast the pages they read; no
scale arrays travel.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import os

import jax
import jax.experimental.pallas.fuser  # noqa: F401  (see below)
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.ragged_paged_attention import (
    DECODE_COMBINE_CHOICES,
    FP8_KV_DOT_CHOICES,
    L2_PREFETCH_AT,
    is_fp8_pages,
    ragged_paged_attention,
    ragged_paged_attention_reference,
)
from pallas_kernels.ragged_paged_attention import to_cache_dtype as _to_cache

# Importing the Pallas fuser defines a config value that is part of every jit cache key
# ("pallas_fuser_disable_nested_fuse"); jax imports it lazily at the first Pallas lowering, so
# every program compiled before that (the first start-up bucket, a server's warm-up) missed the
# cache afterwards and compiled again. Imported here, it exists before anything compiles.
SCRATCH_PAGE = 0

KVCache = list[tuple[jax.Array, jax.Array]]

FP8_KV_DTYPE = jnp.float8_e4m3fn
# EngineConfig.kv_cache_dtype (vLLM's names) -> the pages' dtype; "auto": the model dtype.
FP8_KV_CACHE_DTYPES = {"fp8": FP8_KV_DTYPE, "fp8_e4m3": FP8_KV_DTYPE,
                       "fp8_e5m2": jnp.float8_e5m2}


# Knobs of the Pallas kernel (block sizes, variants), overriding its defaults in every attention call
# of programs traced afterwards: an A/B hook for benchmarks (the table is what the engine runs),
# e.g. JAXLLM_ATTENTION_KNOBS='{"decode_split_pages": true}' python3 benchmarks/latency.py ...
ATTENTION_KNOBS_ENV = "JAXLLM_ATTENTION_KNOBS"
_INT_KNOBS = ("block_q", "pages_per_block", "decode_pages_per_block", "decode_splits",
              "decode_heads_per_program", "num_warps", "num_stages", "qkv_split_k")
_BOOL_KNOBS = ("decode_split_pages", "decode_spread", "masked_tail_only", "fused_kv_write",
               "fused_qkv_rope", "fold_input_norm", "decode_single", "mlp_kernel")
# decode_single is a promise, not a tuning: every decode-only step must have exactly one live
# sequence (benchmarks/latency.py's batch 1); a step with more gets wrong attention. Only for
# batch-1 A/B runs.
# Knobs with a fixed set of string values.
_CHOICE_KNOBS = {"fp8_kv_dot": ("auto",) + FP8_KV_DOT_CHOICES,
                 "decode_combine": DECODE_COMBINE_CHOICES,
                 "l2_prefetch_o": ("off",) + L2_PREFETCH_AT}
_KNOB_NAMES = _INT_KNOBS + _BOOL_KNOBS + tuple(_CHOICE_KNOBS)
# Not arguments of the kernel: write_kv_and_attend's choice (decode-only steps write the new
# K/V inside the decode kernel instead of two scatters a layer), and the model's (the decode
# kernel also applies rope to q and k, from the fused q/k/v projection's output:
# rope_write_kv_and_attend).
_FUSED_KV_WRITE = "fused_kv_write"
_FUSED_QKV_ROPE = "fused_qkv_rope"
# With fused_qkv_rope: the q/k/v GEMM hands the decode kernel this many split-K partial
# products (FusedLinear.split_k), in steps of at most QKV_SPLIT_K_MAX_TOKENS tokens; 1: its
# output as is.
_QKV_SPLIT_K = "qkv_split_k"
# With fused_qkv_rope: the layer's input RMSNorm folded into the q/k/v GEMM and the decode
# kernel (``qkv_norm_folds``).
_FOLD_INPUT_NORM = "fold_input_norm"
# The model's MLP in small steps: its RMSNorm, gate/up GEMM and SwiGLU in one Pallas kernel
# (``mlp_kernel_applies``).
_MLP_KERNEL = "mlp_kernel"
# On the rope path: the decode kernel streams the o projection's weight into the L2 under its
# own latency-bound work ("start" / "end": where its programs issue the prefetch; "off", the
# default: not at all). See ``rope_write_kv_and_attend``'s ``prefetch``. Off by measurement
# (H100, 2026-12-06, batch 1; benchmarks/RESULTS.md): the o GEMM gains ~1.7 µs a layer from
# the L2 and the decode kernel loses 2.1-2.7: fp8 3.50 / 3.53 against 3.50 ms/token, bf16 5.57
# against 5.57.
_L2_PREFETCH_O = "l2_prefetch_o"
_NOT_KERNEL_ARGS = (_FUSED_KV_WRITE, _FUSED_QKV_ROPE, _QKV_SPLIT_K, _FOLD_INPUT_NORM,
                    _MLP_KERNEL, _L2_PREFETCH_O)


def attention_kernel_knobs() -> tuple[tuple[str, object], ...]:
    """The knobs ``JAXLLM_ATTENTION_KNOBS`` sets (a JSON object), as sorted (name, value) pairs
    (hashable: they are static arguments of the attention's jit); () when unset."""
    raw = os.environ.get(ATTENTION_KNOBS_ENV, "").strip()
    if not raw:
        return ()
    try:
        knobs = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ATTENTION_KNOBS_ENV} must be a JSON object, got {raw!r}: {e}") from None
    if not isinstance(knobs, dict):
        raise ValueError(f"{ATTENTION_KNOBS_ENV} must be a JSON object, got {raw!r}")
    unknown = sorted(set(knobs) - set(_KNOB_NAMES))
    if unknown:
        raise ValueError(f"{ATTENTION_KNOBS_ENV} has unknown kernel knobs {unknown}; "
                         f"known: {', '.join(_KNOB_NAMES)}")
    for name, value in knobs.items():
        if name in _CHOICE_KNOBS:
            ok, want = value in _CHOICE_KNOBS[name], f"one of {_CHOICE_KNOBS[name]}"
        elif name in _BOOL_KNOBS:
            ok, want = isinstance(value, bool), "true or false"
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            want = "a positive integer"
        if not ok:
            raise ValueError(f"{ATTENTION_KNOBS_ENV}: {name} must be {want}, got {value!r}")
    return tuple(sorted(knobs.items()))


def _kernel_args(knobs) -> tuple[tuple[str, object], ...]:
    """The knobs that are arguments of the kernel (all but ``_NOT_KERNEL_ARGS``: the model's
    and write_kv_and_attend's choices)."""
    return tuple((n, x) for n, x in knobs if n not in _NOT_KERNEL_ARGS)


def is_fp8(dtype) -> bool:
    """Whether a cache of ``dtype`` is an fp8 one (e4m3 or e5m2 pages)."""
    return is_fp8_pages(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where the ragged batch's tokens sit. All int32.

    slot_mapping:    [T]    cache slot each new token's K/V is written to (padding -> scratch slot)
    query_start_loc: [S+1]  token offsets of the sequences (padded sequences: zero tokens)
    seq_lens:        [S]    context length incl. the new tokens (padded sequences: 0)
    page_table:      [S, M] page ids per sequence (padding: SCRATCH_PAGE)
    num_seqs:        [1]    number of real sequences
    decode_only:     static bool: every real sequence has exactly one new token (a pure decode
                     step), so the Pallas kernel runs its decode launch only (``decode_only``:
                     no prefill grid, no token->sequence search or select). Static, hence part
                     of the jit cache key: a step with it is a separate compiled program, chosen
                     on the host (ModelRunner.prepare). The reference attention ignores it.
    """

    slot_mapping: jax.Array
    query_start_loc: jax.Array
    seq_lens: jax.Array
    page_table: jax.Array
    num_seqs: jax.Array
    decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))


# Tensor parallelism (sharding/rules.py): while a step is traced under ``heads_sharded(mesh)``,
# the K/V write and the attention kernel run once per shard of the mesh's one axis on that shard's
# heads (shard_map), so a kernel (Pallas included) never sees more than its own heads and no
# collective is needed: each query head's KV head lives on the same shard.
_HEAD_MESH: contextvars.ContextVar = contextvars.ContextVar("jaxllm_head_mesh", default=None)


@contextlib.contextmanager
def heads_sharded(mesh):
    """Trace write_kv / paged_attention per head shard of ``mesh`` (a 1-D mesh; None: off)."""
    token = _HEAD_MESH.set(mesh if mesh is not None and mesh.devices.size > 1 else None)
    try:
        yield
    finally:
        _HEAD_MESH.reset(token)


def heads_mesh():
    """The mesh ``heads_sharded`` traces under (tensor parallelism), or None."""
    return _HEAD_MESH.get()


def _per_head_shard(fn, num_page_args: int, num_token_args: int, returns_tokens: bool | None):
    """shard_map ``fn(*pages, *tokens, *replicated)`` over heads, or ``fn`` itself when off.

    pages [P, B, K, D] split on K, tokens [T, H, D] split on H, the rest replicated. ``fn``
    returns tokens (``returns_tokens``), a (k, v) pair of pages (False), or both (None)."""
    mesh = _HEAD_MESH.get()
    if mesh is None:
        return fn
    axis = mesh.axis_names[0]
    pages, toks = P(None, None, axis, None), P(None, axis, None)

    def wrapped(*args):
        n_rep = len(args) - num_page_args - num_token_args
        in_specs = (pages,) * num_page_args + (toks,) * num_token_args + (P(),) * n_rep
        out_specs = (toks if returns_tokens else (pages, pages) if returns_tokens is False
                     else (toks, pages, pages))
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)(*args)
    return wrapped


# XLA's GPU scatter writes each element of an overwrite scatter with an atomic read-modify-
# write unless its indices are promised unique (then a plain store; XLA's emitter tests
# scatter/overwrite.hlo and scatter/unique_indices.hlo). On 16- and 8-bit K/V that is a
# compare-and-swap loop per value: the H200 profile of a 16384-token fp8 prefill step shows the
# K/V writes at ~230 GB/s, 9 ms of 237 (benchmarks/RESULTS.md, "Rerun of 2026-12-01 (evening)").
# With the step's real token count, write_kv moves the padding tokens' slots (all the scratch
# page's one slot) out of range, distinct, so the scatter drops them and can promise unique
# indices. JAXLLM_KV_WRITE_UNIQUE=0 turns that off (an A/B switch; read at trace time).
KV_WRITE_UNIQUE_ENV = "JAXLLM_KV_WRITE_UNIQUE"


def _kv_write_unique() -> bool:
    raw = os.environ.get(KV_WRITE_UNIQUE_ENV, "1")
    if raw not in ("0", "1"):
        raise ValueError(f"{KV_WRITE_UNIQUE_ENV} must be 0 or 1, got {raw!r}")
    return raw == "1"


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
             slot_mapping: jax.Array, k_scale: float = 1.0, v_scale: float = 1.0,
             num_tokens: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Scatters new k/v [T, K, D] into the pages at ``slot_mapping`` (in place when donated).
    An fp8 cache stores k / k_scale and v / v_scale, clipped to the e4m3 range.

    ``num_tokens`` ([] or [1] int32): the real tokens, the first ones; tokens past them are
    padding and write nothing. Given, the scatter promises unique indices, which XLA writes with
    plain stores instead of atomics: the real tokens' slots are distinct (every computed token
    gets its own slot; a cached prefix page is never recomputed, a fully cached prompt
    recomputes its last page into a fresh one)."""
    if num_tokens is None or not _kv_write_unique():
        def write(k_pages, v_pages, k, v, slot_mapping):
            return _write_kv(k_pages, v_pages, k, v, slot_mapping, k_scale, v_scale)
        return _per_head_shard(write, 2, 2, False)(k_pages, v_pages, k, v, slot_mapping)

    def write_unique(k_pages, v_pages, k, v, slot_mapping, num_tokens):
        P, B = k_pages.shape[:2]
        t = jnp.arange(slot_mapping.shape[0], dtype=jnp.int32)
        slots = jnp.where(t < jnp.reshape(num_tokens, ()), slot_mapping, P * B + t)
        return _write_kv(k_pages, v_pages, k, v, slots, k_scale, v_scale, unique=True)
    return _per_head_shard(write_unique, 2, 2, False)(k_pages, v_pages, k, v, slot_mapping,
                                                      num_tokens)


def _write_kv(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
              slot_mapping: jax.Array, k_scale: float, v_scale: float, unique: bool = False
              ) -> tuple[jax.Array, jax.Array]:
    P, B, K, D = k_pages.shape
    kw = dict(unique_indices=True, mode="drop") if unique else {}
    k_flat = k_pages.reshape(P * B, K, D).at[slot_mapping].set(
        _to_cache(k, k_pages.dtype, k_scale), **kw)
    v_flat = v_pages.reshape(P * B, K, D).at[slot_mapping].set(
        _to_cache(v, v_pages.dtype, v_scale), **kw)
    return k_flat.reshape(P, B, K, D), v_flat.reshape(P, B, K, D)


def write_kv_and_attend(q: jax.Array, k: jax.Array, v: jax.Array, k_pages: jax.Array,
                        v_pages: jax.Array, md: AttentionMetadata, *, sm_scale: float,
                        sliding_window: int | None = None, soft_cap: float | None = None,
                        backend: str = "reference", k_scale: float = 1.0, v_scale: float = 1.0
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``write_kv`` then ``paged_attention``: (out [T, H, D], k_pages, v_pages).

    With the Pallas backend, a decode-only step and the ``fused_kv_write`` knob on
    (``JAXLLM_ATTENTION_KNOBS``; off by default: measured no faster on the H200), the decode kernel writes the
    new K/V itself (``new_kv``): no scatter kernels. The result is the same either way."""
    knobs = dict(attention_kernel_knobs()) if backend == "pallas" else {}
    if not (knobs.get(_FUSED_KV_WRITE) and md.decode_only):
        k_pages, v_pages = write_kv(k_pages, v_pages, k, v, md.slot_mapping, k_scale, v_scale,
                                    num_tokens=md.query_start_loc[jnp.reshape(md.num_seqs, ())])
        out = paged_attention(q, k_pages, v_pages, md, sm_scale=sm_scale,
                              sliding_window=sliding_window, soft_cap=soft_cap, backend=backend,
                              k_scale=k_scale, v_scale=v_scale)
        return out, k_pages, v_pages
    k_new = _to_cache(k, k_pages.dtype, k_scale)
    v_new = _to_cache(v, v_pages.dtype, v_scale)
    scaled = is_fp8(k_pages.dtype) and (k_scale != 1.0 or v_scale != 1.0)
    kernel_knobs = _kernel_args(sorted(knobs.items()))

    def attend(k_pages, v_pages, q, k_new, v_new, md):
        return _paged_attention_writing(
            q, k_pages, v_pages, k_new, v_new, md,
            sm_scale=sm_scale * (k_scale if scaled else 1.0), sliding_window=sliding_window,
            soft_cap=soft_cap, knobs=kernel_knobs)
    out, k_pages, v_pages = _per_head_shard(attend, 2, 3, None)(k_pages, v_pages, q, k_new,
                                                                 v_new, md)
    if scaled:  # the per-tensor scales fold out as in paged_attention
        out = (out.astype(jnp.float32) * v_scale).astype(q.dtype)
    return out, k_pages, v_pages


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "knobs"))
def _paged_attention_writing(q, k_pages, v_pages, k_new, v_new, md, *, sm_scale,
                             sliding_window, soft_cap, knobs):
    # Nested jit for the same reason as _paged_attention (one trace per step program).
    return ragged_paged_attention(
        q, k_pages, v_pages, md.seq_lens, md.page_table, md.query_start_loc, md.num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, decode_only=True,
        new_kv=(k_new, v_new, md.slot_mapping), interpret=jax.default_backend() != "gpu",
        **dict(knobs))


# Decode-only steps of at most this many tokens (the step's token bucket) run rope and the K/V
# write inside the decode kernel by default (``fused_qkv_rope`` unset). Measured on the H200
# (benchmarks/RESULTS.md, 2026-12-02): -2% a token at batch 1 (bf16 and fp8, the multi-step
# loop), -1% GPU time at batch 64 (bf16), -1.4 to -2% at batch 32 / 64 in fp8 and -2.7% in fp8
# with fp8 KV (08:25 rerun); at batch 256 within the noise; the offline throughput's
# decode steps (~1,000 sequences) took 1.5-2.5% longer with it, so large steps keep the
# separate rope and scatter kernels.
QKV_ROPE_MAX_TOKENS = 64


def qkv_rope_applies(backend: str, md: AttentionMetadata, num_tokens: int) -> bool:
    """Whether a layer hands its fused q/k/v output to ``rope_write_kv_and_attend``: the Pallas
    backend and a decode-only step of at most ``QKV_ROPE_MAX_TOKENS`` tokens (``num_tokens``,
    static: the step's bucket). The ``fused_qkv_rope`` knob (``JAXLLM_ATTENTION_KNOBS``)
    overrides the size rule: true for every decode-only step, false for none. Read at trace
    time."""
    knob = dict(attention_kernel_knobs()).get(_FUSED_QKV_ROPE)
    wanted = num_tokens <= QKV_ROPE_MAX_TOKENS if knob is None else knob
    return backend == "pallas" and md.decode_only and wanted


# The default split: XLA's own for the Llama-3-8B q/k/v GEMM (4096 x 6144) at 8 rows on the
# H200. With it the decode kernel sums the partials and XLA's split-K sum kernel is gone (one
# kernel a layer): H200, 2026-12-02, batch 1 with 4 steps a launch, bf16 4.27 / 4.29 against
# 4.34 ms/token and 4.31 against 4.35 in two calls, fp8 2.84 against 2.86
# (benchmarks/RESULTS.md). Steps of <= 16 tokens: the weight-only fp8 range, where XLA splits.
QKV_SPLIT_K_DEFAULT = 4
QKV_SPLIT_K_MAX_TOKENS = 16


def qkv_split_k_parts(num_tokens: int) -> int:
    """How many split-K partials of the q/k/v GEMM a ``rope_write_kv_and_attend`` step of
    ``num_tokens`` (static) takes: the ``qkv_split_k`` knob (``JAXLLM_ATTENTION_KNOBS``; unset:
    ``QKV_SPLIT_K_DEFAULT``; 1: the GEMM's output as is) up to ``QKV_SPLIT_K_MAX_TOKENS``
    tokens, 1 above. ``FusedLinear.split_k`` falls back to 1 where the split does not apply."""
    parts = dict(attention_kernel_knobs()).get(_QKV_SPLIT_K, QKV_SPLIT_K_DEFAULT)
    return parts if num_tokens <= QKV_SPLIT_K_MAX_TOKENS else 1


# Steps of at most this many tokens (the step's bucket) on the decode kernel's rope path fold the
# layer's input RMSNorm in by default (``fold_input_norm`` unset). Measured on the H200
# (benchmarks/RESULTS.md, 2026-12-02 evening, 4 steps a launch, alternating pairs): batch 1
# (the 8-token bucket) fp8 2.78-2.79 against 2.81-2.84 ms/token in five pairs, bf16 4.21-4.25
# against 4.22-4.26; but batch 16 (the 16-token bucket) slower with it, bf16 5.27 against 5.14
# ms a step, fp8 4.10 against 3.94 (its decode kernel grew 6 µs a layer, more than the norm
# kernel it saves), so 16-token steps keep the norm kernel.
FOLD_INPUT_NORM_MAX_TOKENS = 8


def qkv_norm_folds(num_tokens: int) -> bool:
    """Whether a ``rope_write_kv_and_attend`` step of ``num_tokens`` (static: the bucket) folds
    the layer's input RMSNorm into the q/k/v GEMM's prologue (x * g) and the decode kernel (the
    per-token rsqrt factor): the ``fold_input_norm`` knob (``JAXLLM_ATTENTION_KNOBS``: true for
    every such step, false for none); unset, steps of at most ``FOLD_INPUT_NORM_MAX_TOKENS``.
    Read at trace time."""
    knob = dict(attention_kernel_knobs()).get(_FOLD_INPUT_NORM)
    return num_tokens <= FOLD_INPUT_NORM_MAX_TOKENS if knob is None else bool(knob)


# On a GPU, steps of at most this many token rows (the bucket) of a model with dense (bf16 /
# float32) weights run the MLP's RMSNorm, fused gate/up GEMM and SwiGLU as one Pallas kernel
# (``pallas_kernels.fused_mlp.gate_up_swiglu``); fp8 weights keep XLA's kernels. The
# ``mlp_kernel`` knob overrides it (true: every step of at most fused_mlp.MAX_ROWS rows, fp8
# too, any platform (interpreted without a GPU); false: none). H200, 2026-12-03
# (benchmarks/RESULTS.md): layer chains (benchmarks/gpu/fused_mlp.py, GPU time a layer at 8
# rows) bf16 84.3 against XLA's 86.9 µs, fp8 53.0 against 54.9; batch-1 decode in the engine
# (4 steps a launch, alternating rounds) bf16 4.18 / 4.19 against 4.27 / 4.26 ms/token, fp8
# 2.82 / 2.81 against 2.79 / 2.78 (slower: the W8A8 kernel reads the e4m3 weights at ~3.4 TB/s
# where XLA's weight-only GEMM reaches 3.7).
MLP_KERNEL_MAX_TOKENS = 8


def mlp_kernel_applies(backend: str, num_tokens: int, fp8: bool) -> bool:
    """Whether a layer of a step of ``num_tokens`` (static: the bucket) runs its MLP's first
    half as one kernel (``LlamaDecoderLayer``): the Pallas backend, one device (not under
    tensor parallelism's head mesh), and the ``mlp_kernel`` knob (``JAXLLM_ATTENTION_KNOBS``)
    or, unset, dense weights (not ``fp8``) on a GPU in steps of at most
    ``MLP_KERNEL_MAX_TOKENS`` rows. Read at trace time."""
    from pallas_kernels.fused_mlp import MAX_ROWS

    knob = dict(attention_kernel_knobs()).get(_MLP_KERNEL)
    if knob is None:
        wanted = (not fp8 and num_tokens <= MLP_KERNEL_MAX_TOKENS
                  and jax.default_backend() == "gpu")
    else:
        wanted = knob
    return (backend == "pallas" and bool(wanted) and num_tokens <= MAX_ROWS
            and heads_mesh() is None)


def rope_write_kv_and_attend(qkv: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                             k_pages: jax.Array, v_pages: jax.Array, md: AttentionMetadata, *,
                             sm_scale: float,
                             sliding_window: int | None = None, soft_cap: float | None = None,
                             k_scale: float = 1.0, v_scale: float = 1.0, qkv_parts: int = 1,
                             dtype=None, norm: tuple[jax.Array, float] | None = None,
                             prefetch: jax.Array | None = None
                             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``apply_rope`` on the query heads and the keys of ``qkv`` ([T, K, (G + 2) * D], the fused
    projection's output: per KV head its G query heads, its key, its value), then
    ``write_kv_and_attend``, in the decode kernel alone (``ragged_paged_attention``'s
    ``qkv_rope``): no rope, slice or scatter kernels. Decode-only steps with the Pallas backend
    (``qkv_rope_applies``). Returns (out [T, H, D], k_pages, v_pages), the same values.
    positions [T], inv_freq [D/2]: as ``apply_rope`` takes them (the angles are built the
    same way, so XLA shares them, and their cos / sin, across the layers). ``qkv_parts`` > 1:
    ``qkv`` is ``FusedLinear.split_k``'s [qkv_parts * T, K, (G + 2) * D] float32 partials,
    summed in the kernel and rounded to ``dtype`` (the model's; the output's). ``norm=(x,
    eps)``: ``qkv`` is the projection of x * g (the layer's input RMSNorm folded into the
    GEMM), and the kernel scales each token's q/k/v by rsqrt(mean(x^2) + eps) (the kernel's
    ``qkv_norm``). ``prefetch``: the o projection's weight, which the kernel streams into the L2
    (its ``l2_prefetch``) when the ``l2_prefetch_o`` knob says where (``JAXLLM_ATTENTION_KNOBS``;
    off by default), on one device (a head-sharded call would need the weight replicated)."""
    dtype = qkv.dtype if dtype is None else jnp.dtype(dtype)
    knobs = attention_kernel_knobs()
    kernel_knobs = _kernel_args(knobs)
    pf_at = dict(knobs).get(_L2_PREFETCH_O, "off")
    if pf_at == "off" or _HEAD_MESH.get() is not None:
        prefetch = None
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    scaled = is_fp8(k_pages.dtype) and (k_scale != 1.0 or v_scale != 1.0)

    norm_x, norm_eps = (None, None) if norm is None else (norm[0], float(norm[1]))

    def attend(k_pages, v_pages, qkv, angles, md, norm_x=None):
        return _paged_attention_rope(
            qkv, angles, k_pages, v_pages, md, norm_x, prefetch,
            sm_scale=sm_scale * (k_scale if scaled else 1.0), sliding_window=sliding_window,
            soft_cap=soft_cap, knobs=kernel_knobs, scales=(float(k_scale), float(v_scale)),
            parts=qkv_parts, dtype=dtype, norm_eps=norm_eps, prefetch_at=pf_at)
    out, k_pages, v_pages = _per_head_shard(attend, 2, 1, None)(
        k_pages, v_pages, qkv, angles, md, *(() if norm_x is None else (norm_x,)))
    if scaled:  # the per-tensor scales fold out as in paged_attention
        out = (out.astype(jnp.float32) * v_scale).astype(dtype)
    return out, k_pages, v_pages


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "knobs",
                                             "scales", "parts", "dtype", "norm_eps",
                                             "prefetch_at"))
def _paged_attention_rope(qkv, angles, k_pages, v_pages, md, norm_x=None, prefetch=None, *,
                          sm_scale, sliding_window, soft_cap, knobs, scales, parts=1,
                          dtype=None, norm_eps=None, prefetch_at="start"):
    # Nested jit for the same reason as _paged_attention (one trace per step program).
    return ragged_paged_attention(
        qkv, k_pages, v_pages, md.seq_lens, md.page_table, md.query_start_loc, md.num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, decode_only=True,
        new_kv=(None, None, md.slot_mapping), qkv_rope=(angles, *scales), qkv_parts=parts,
        qkv_dtype=dtype if parts > 1 else None, interpret=jax.default_backend() != "gpu",
        qkv_norm=None if norm_x is None else (norm_x, norm_eps), l2_prefetch=prefetch,
        l2_prefetch_at="start" if prefetch_at == "off" else prefetch_at, **dict(knobs))


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, md: AttentionMetadata,
                    *, sm_scale: float, sliding_window: int | None = None,
                    soft_cap: float | None = None, backend: str = "reference",
                    k_scale: float = 1.0, v_scale: float = 1.0) -> jax.Array:
    """q: [T, H, D] -> [T, H, D]. ``backend`` picks the implementation; all share one contract.
    ``k_scale`` / ``v_scale``: the fp8 cache's per-tensor scales (see the module docstring)."""
    if is_fp8(k_pages.dtype) and (k_scale != 1.0 or v_scale != 1.0):
        out = paged_attention(q, k_pages, v_pages, md, sm_scale=sm_scale * k_scale,
                              sliding_window=sliding_window, soft_cap=soft_cap, backend=backend)
        return (out.astype(jnp.float32) * v_scale).astype(q.dtype)

    knobs = _kernel_args(attention_kernel_knobs()) if backend == "pallas" else ()

    def attend(k_pages, v_pages, q, md):
        return _paged_attention(q, k_pages, v_pages, md, sm_scale=sm_scale,
                                sliding_window=sliding_window, soft_cap=soft_cap, backend=backend,
                                knobs=knobs)
    return _per_head_shard(attend, 2, 1, True)(k_pages, v_pages, q, md)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "backend",
                                             "knobs"))
def _paged_attention(q, k_pages, v_pages, md, *, sm_scale, sliding_window, soft_cap, backend,
                     knobs=()):
    # A nested jit for start-up time, not run time: every layer calls it with the same shapes
    # and static arguments, so it is traced and lowered once per step program instead of once
    # per layer (each lowering of the Pallas kernel is slow Python; the 8B cold start spent
    # 67.5 s lowering 52 programs on the H200 host). XLA inlines the call; tests/test_engine.py
    # checks that the optimized program keeps the same ops.
    if backend == "reference":
        return ragged_paged_attention_reference(
            q, k_pages, v_pages, md.seq_lens, md.page_table, md.query_start_loc, md.num_seqs,
            sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if backend == "pallas":
        # No GPU (CI, this CPU box): the same kernel runs through the Pallas interpreter.
        return ragged_paged_attention(
            q, k_pages, v_pages, md.seq_lens, md.page_table, md.query_start_loc, md.num_seqs,
            sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
            decode_only=md.decode_only, interpret=jax.default_backend() != "gpu", **dict(knobs))
    raise ValueError(f"unknown attention backend {backend!r}; available: 'reference', 'pallas'")
