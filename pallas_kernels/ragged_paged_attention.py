"""Ragged paged attention: one call for a ragged batch of prefill chunks and decode tokens.

Dimension keys: T tokens (padded), S sequences (padded), H query heads, K kv heads, D head dim,
P pages, B page size (tokens per page), M max pages per sequence, L = M * B context slots.

Inputs (shared by the reference and the Pallas kernels):
  q:               [T, H, D]  queries of the new tokens, sequence after sequence
  k_pages/v_pages: [P, B, K, D] the KV cache of one layer (the new tokens' K/V already written)
  seq_lens:        [S] int32  context length of each sequence *including* its new tokens
  page_table:      [S, M] int32 page ids of each sequence, in order (unused entries: any page)
  query_start_loc: [S+1] int32 token offsets; sequence s owns q[query_start_loc[s]:query_start_loc[s+1]]
                   (padded sequences have zero tokens: equal consecutive offsets)
  num_seqs:        [] or [1] int32 number of real sequences (tokens past query_start_loc[num_seqs]
                   are padding and produce zeros)

The new tokens of a sequence are its last q_len positions: token i of sequence s sits at
position seq_lens[s] - q_len + i and attends causally to positions <= its own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.l2_prefetch import as_chunks, l2_prefetch, prefetch_layout, program_chunks


def ragged_paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    seq_lens: jax.Array,
    page_table: jax.Array,
    query_start_loc: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    token_block: int = 128,
) -> jax.Array:
    """Plain-jnp ragged paged attention, float32 math; returns [T, H, D] in q's dtype.

    Gathers each token's whole context ([T_blk, L, K, D]), a block of ``token_block`` tokens at a
    time so memory stays bounded at long context: short enough to trust by reading; it is the
    correctness reference, not the fast path.
    """
    q, k_pages, v_pages, seq_lens, page_table, query_start_loc, num_seqs = map(
        jnp.asarray, (q, k_pages, v_pages, seq_lens, page_table, query_start_loc, num_seqs))
    T = q.shape[0]
    blk = min(T, token_block)
    n_blk = -(-T // blk)
    q_pad = jnp.pad(q, ((0, n_blk * blk - T), (0, 0), (0, 0)))
    t_idx = jnp.arange(n_blk * blk, dtype=jnp.int32)

    n_real = query_start_loc[jnp.reshape(num_seqs, ())]

    def one(args):
        qb, tb = args
        # Blocks made only of padding tokens skip the gather (start-up compiles run such batches).
        return jax.lax.cond(
            tb[0] < n_real,
            lambda: _attend_tokens(qb, tb, k_pages, v_pages, seq_lens, page_table,
                                   query_start_loc, num_seqs, sm_scale, sliding_window, soft_cap),
            lambda: jnp.zeros_like(qb))

    out = jax.lax.map(one, (q_pad.reshape(n_blk, blk, *q.shape[1:]), t_idx.reshape(n_blk, blk)))
    return out.reshape(n_blk * blk, *q.shape[1:])[:T]


def _attend_tokens(q, t, k_pages, v_pages, seq_lens, page_table, query_start_loc, num_seqs,
                   sm_scale, sliding_window, soft_cap):
    """Attention of the tokens with batch indices t [n] (queries q [n, H, D])."""
    T, H, D = q.shape  # here T is the block's token count
    _, B, K, _ = k_pages.shape
    S, M = page_table.shape
    G = H // K
    L = M * B
    num_seqs = jnp.reshape(num_seqs, ())

    # Sequence of token t: the number of sequence ends at or before t.
    # compare_all, not the default binary search: that is a while loop, which on the GPU runs
    # iteration by iteration from the host (a sync each), as the step profile showed.
    seq_id = jnp.searchsorted(query_start_loc[1:], t, side="right",
                              method="compare_all").astype(jnp.int32)
    valid = t < query_start_loc[num_seqs]
    seq_id = jnp.minimum(seq_id, S - 1)
    q_end = query_start_loc[seq_id + 1]
    q_pos = seq_lens[seq_id] - (q_end - t)  # absolute position of each query token

    pages = page_table[seq_id]  # [T, M]
    k_ctx = k_pages[pages].reshape(T, L, K, D)
    v_ctx = v_pages[pages].reshape(T, L, K, D)
    if is_fp8_pages(k_ctx.dtype):  # an fp8 cache is read upcast to q's dtype
        k_ctx, v_ctx = k_ctx.astype(q.dtype), v_ctx.astype(q.dtype)
    qg = q.reshape(T, K, G, D).astype(k_ctx.dtype)
    # Inputs stay in the cache dtype with float32 accumulation: upcasting the gathered [T, L, K, D]
    # context would double the largest buffer of the step.
    scores = jnp.einsum("tkgd,tlkd->tkgl", qg, k_ctx,
                        preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    k_pos = jnp.arange(L, dtype=jnp.int32)
    mask = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
    mask &= valid[:, None]
    scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(scores - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("tkgl,tlkd->tkgd", p.astype(v_ctx.dtype), v_ctx,
                     preferred_element_type=jnp.float32)
    return out.reshape(T, H, D).astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Pallas GPU kernel (Triton lowering).
#
# Design. One kernel body serves two launches of the same ragged batch:
#   * decode launch: one program per (sequence with q_len == 1, kv head, split). The context is
#     split into `num_splits` contiguous ranges (flash-decoding), each program writes its partial
#     (acc, m, l) and a small jnp step combines them: long contexts fill the GPU at small batch.
#   * prefill launch: one program per (query block, kv head); a query block is up to `block_q`
#     consecutive new tokens of one sequence (chunked prefill or full prompt), mapped to its
#     sequence on the device with searchsorted over the per-sequence block counts, so the grid has
#     a static size (a bound on the blocks, see below); blocks past the real ones exit at once.
# The decode launch writes compact rows per (sequence slot, head) and one fused select places
# them, so its partials, their combine and the select scale with S x H, not T x H: in a mixed
# batch (a 2k chunk + 64 decodes) token-sized partials were 2 splits x 2112 x 32 x 128 floats.
# Rows of a program are (token, query head of the group) pairs: all G = H // K query heads of one
# KV head share a program, so each K/V page is read once per KV head (GQA), and a decode program
# has G rows padded to 16 for the tensor-core dot (hp * G rows for hp adjacent KV heads with
# decode_heads_per_program = hp: q block-diagonal against K/V tiles hp heads wide). K/V are
# read a block of `pages_per_block` pages at a time through the page table (a gather of whole
# page rows), with online softmax in float32.
# Views: q as [T*H, D] and out as [T*H + 1, D] (row t*H + head; the extra last row absorbs the
# stores of masked rows), pages as [P*B, K*D] (row page*B + slot, columns of kv head h at h*D).
# ----------------------------------------------------------------------------------------------

_NEG = -1e30  # finite "minus infinity": keeps exp(m_prev - m_new) free of inf - inf


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# How the kernel's dots read an fp8 cache's e4m3 pages (``fp8_kv_dot``):
#   "query"    upcast to q's dtype (bf16: no one-instruction conversion on Hopper);
#   "float16"  upcast to float16 (one cvt per two values), q clipped to float16's range.
# H200, 2026-12-01 (RESULTS, "Rerun of 2026-12-01 (afternoon)"): float16 took the decode kernel
# over e4m3 pages from 1091 to 801 us at 256 x 4k and 151 to 115 us at 256 x 512, 272 -> 311 us
# at 64 x 4k; in the engine fp8 + fp8 KV throughput went 9,583 / 9,603 -> 10,034 / 9,890 tok/s
# (1,000 x 512/128; RESULTS, "Rerun of 2026-12-01 (evening)"): the default since, for a 16-bit
# q; a float32 q (float32 models, the CPU tests) keeps float32 dots ("query"): the default
# "auto" picks between the two. Measured and dropped the same evening (RESULTS): float16 built
# with integer ops instead of the cvt (12-70% slower than the cvt), and fp8 dots with q and the
# probabilities rounded to e4m3 as FlashAttention-3 does (3-6% faster than float16, 10x the
# error, engine throughput no higher).
FP8_KV_DOT_CHOICES = ("query", "float16")
FP8_KV_DOT_DEFAULT = "auto"

# The decode launch's split combine (``decode_combine``): "reduce" (jnp.max / jnp.sum over the
# split axis) or "unrolled" (the same sums as a chain of elementwise ops, split by split). Both
# are exact up to float32 summation order. H200, night of 2026-12-02 (benchmarks/gpu/
# decode_b1.py, RESULTS.md): the same at the table's 5 splits (one kernel, ~1.5 us); at 10
# splits XLA cuts the reduce form in two kernels and keeps the unrolled one in one (2.3-2.6
# us); with ``decode_single``'s 16 partials unrolled is 2 kernels against 4. So "reduce" stays
# the default, and the knob picks the other.
DECODE_COMBINE_CHOICES = ("reduce", "unrolled")
DECODE_COMBINE_DEFAULT = "reduce"


def _fp8_kv_dot_for(choice: str, q_dtype) -> str:
    """``fp8_kv_dot`` with "auto" resolved: float16 for a bf16 / float16 q, else query."""
    if choice != "auto":
        return choice
    return "float16" if jnp.dtype(q_dtype).itemsize == 2 else "query"


def _load_qkv(ref, row, col, kw, parts, num_tokens, dtype, scale=None):
    """``ref[row, col]`` of the q/k/v projection's output, in ``dtype``. ``parts`` > 1: ref holds
    the projection's split-K partial products (rows p * num_tokens + token), summed here in
    float32 and rounded to ``dtype``, as the projection's own sum would be. ``scale`` (float32,
    broadcasting): multiplies the float32 value before that rounding (the folded RMSNorm's
    per-token factor, see ``qkv_norm``)."""
    if parts == 1 and scale is None:
        return plgpu.load(ref.at[row, col], **kw).astype(dtype)
    x = plgpu.load(ref.at[row, col], **kw).astype(jnp.float32)
    for p in range(1, parts):
        x += plgpu.load(ref.at[row + p * num_tokens, col], **kw).astype(jnp.float32)
    if scale is not None:
        x = x * scale
    return x.astype(dtype)


def _rms_factor(x_ref, t, dim, eps):
    """rsqrt(mean(x[t]^2) + eps) in float32 for token row t of x_ref [T, dim] (RMSNorm's
    per-token factor, as ``jaxllm.models.llama.RMSNorm`` computes it)."""
    n = _next_pow2(dim)
    e = jnp.arange(n, dtype=jnp.int32)
    x = plgpu.load(x_ref.at[jnp.full((n,), t, jnp.int32), e], mask=e < dim,
                   other=0).astype(jnp.float32)
    return jax.lax.rsqrt(jnp.sum(x * x) / dim + eps)


def _rope(ref, row, base, dd, cos_ref, sin_ref, D, mask, parts, num_tokens, dtype, scale=None):
    """Rope (HF's half split) of ``ref[row, base + dd]`` (dd the columns' offsets in a head of
    D; ``_load_qkv`` reads it), float32 as ``jaxllm.models.llama.apply_rope``, in ``dtype``:
    x * cos + rotate_half(x) * sin, rotate_half(x)[d] = -x[d + D/2] (d < D/2) or x[d - D/2].
    cos_ref / sin_ref [T, D]: each token's cos and sin, each half-split angle twice, the sign
    of rotate_half folded into sin. Broadcasts like its index arrays; masked lanes read zeros."""
    half = D // 2
    kw = {} if mask is None else dict(mask=mask, other=0)
    x = _load_qkv(ref, row, base + dd, kw, parts, num_tokens, dtype, scale).astype(jnp.float32)
    xr = _load_qkv(ref, row, base + (dd + half) % D, kw, parts, num_tokens,
                   dtype, scale).astype(jnp.float32)
    c = plgpu.load(cos_ref.at[row, dd], **kw)
    s = plgpu.load(sin_ref.at[row, dd], **kw)
    return (x * c + xr * s).astype(dtype)


def rope_tables(angles: jax.Array) -> tuple[jax.Array, jax.Array]:
    """angles [T, D/2] -> the qkv_rope kernel's (cos, sin) [T, D] float32: each half-split
    angle twice, rotate_half's sign folded into sin (-sin for the first half)."""
    c, s = jnp.cos(angles), jnp.sin(angles)
    return jnp.concatenate([c, c], axis=-1), jnp.concatenate([-s, s], axis=-1)


# The page dtypes of an fp8 cache: e4m3 (kv_cache_dtype "fp8" / "fp8_e4m3") and e5m2
# ("fp8_e5m2": two mantissa bits, five exponent bits, the range of float16).
FP8_PAGE_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


def is_fp8_pages(dtype) -> bool:
    return jnp.dtype(dtype) in FP8_PAGE_DTYPES


def to_cache_dtype(x, dtype, scale: float):
    """x (the model's dtype) as a cache of ``dtype`` stores it: an fp8 cache divides by its
    per-tensor ``scale`` and clips to its range first (e4m3fn has no infinity: an out-of-range
    value would become NaN; e5m2's would become infinite). The engine's scatter
    (``jaxllm.models.attention``) and this kernel's fused K/V write both use it."""
    if is_fp8_pages(dtype):
        top = float(jnp.finfo(dtype).max)
        return jnp.clip(x.astype(jnp.float32) / scale, -top, top).astype(dtype)
    return x.astype(dtype)


def _attn_kernel(*refs, block_q, rows, group, num_heads, head_dim,
                 page_size, pages_per_block, num_splits, sm_scale, sliding_window, soft_cap,
                 dummy_row, out_by_block, split_pages, masked_tail_only=False, kv_write=False,
                 num_tokens=0, exact_rows=False, seq_is_block=False, fp8_kv_dot=None,
                 heads_per_program=1, qkv_rope=False, k_scale=1.0, v_scale=1.0, qkv_parts=1,
                 qkv_dtype=None, norm_eps=None, norm_dim=0, spread_blocks=0, spread_single=False,
                 prefetch=None):
    # Inputs: blk_seq [nb] (left out with seq_is_block: block b is sequence slot b, as in the
    # decode launch), blk_tok0 / blk_ntok / blk_pos0 [nb], the page table, q, k and v pages.
    if seq_is_block:
        blk_seq_ref = None
        blk_tok0_ref, blk_ntok_ref, blk_pos0_ref, page_table_ref, q_ref, k_ref, v_ref, *refs = refs
    else:
        (blk_seq_ref, blk_tok0_ref, blk_ntok_ref, blk_pos0_ref, page_table_ref, q_ref, k_ref,
         v_ref, *refs) = refs
    # prefetch (static: chunk bytes, chunks, chunks a program, lanes, "start" / "end"): the
    # next ref is an array viewed as [chunks, chunk] whose bytes the
    # programs stream into the L2 (see l2_prefetch in ragged_paged_attention).
    pf_ref = None
    if prefetch is not None:
        pf_ref, *refs = refs
    # kv_write (decode launch only): refs start with slot [T], k_new / v_new [T, K*D] (cache
    # dtype) and end with the page outputs (aliased to k_ref / v_ref). The new token's K/V is
    # not in the pages yet: page reads stop before its position, split 0 adds it to its softmax
    # from registers and stores it into its slot (one program per (sequence, KV head) writes, and
    # no program reads that row, so the write races nothing).
    # qkv_rope (with kv_write): q_ref is the q/k/v projection's output [T, K * (G + 2) * D] (per
    # KV head its G query heads, its key, its value) before rope, and cos_ref / sin_ref [T, D]
    # the tokens' rope tables (see _rope). The kernel rotates the query rows and the new key
    # itself (float32, as apply_rope), rounds them to the projection's dtype, and converts the
    # new K/V to the cache dtype (an fp8 cache: divided by k_scale / v_scale, clipped). With
    # qkv_parts > 1, q_ref holds the projection's split-K partials [qkv_parts * T, ...] (float32),
    # summed here and rounded to qkv_dtype (see _load_qkv).
    # norm_eps (with qkv_rope): the layer's input RMSNorm is folded into the q/k/v GEMM (its
    # input is x * g, see ``qkv_norm``); norm_x_ref [T, norm_dim] is x, and each token's
    # q/k/v is scaled by its rsqrt(mean(x^2) + norm_eps) (below).
    if kv_write and qkv_rope and norm_eps is not None:
        slot_ref, cos_ref, sin_ref, norm_x_ref, *out_refs, k_out_ref, v_out_ref = refs
    elif kv_write and qkv_rope:
        slot_ref, cos_ref, sin_ref, *out_refs, k_out_ref, v_out_ref = refs
    elif kv_write:
        slot_ref, knew_ref, vnew_ref, *out_refs, k_out_ref, v_out_ref = refs
    else:
        out_refs = refs
    b = pl.program_id(0)
    h = pl.program_id(1)  # KV heads h * hp .. h * hp + hp - 1
    sp = pl.program_id(2)

    def issue_prefetch():
        # Program p takes chunks [p * per, (p + 1) * per), lanes at a time; fire and forget.
        chunk, n_chunks, per, lanes, _ = prefetch
        p = (b * (num_heads // group // heads_per_program) + h) * num_splits + sp
        for c, live in program_chunks(p, per, lanes, n_chunks):
            l2_prefetch(pf_ref.at[c, jnp.zeros_like(c)], live, chunk)

    if prefetch is not None and prefetch[4] == "start":
        issue_prefetch()
    G, H, D, B = group, num_heads, head_dim, page_size
    bk = pages_per_block * B
    # heads_per_program hp > 1 (decode launch): the program's rows are the hp * G query heads of
    # hp consecutive KV heads, and its K/V tiles the hp heads' adjacent columns, W = hp * D
    # wide. q is loaded block-diagonally ([rows, W], row r's head's D columns, zeros elsewhere),
    # so q @ K^T gives each row its own head's scores, and each row keeps its own head's D
    # columns of p @ V: one dot, one softmax over [rows, bk] for hp heads.
    hp = heads_per_program
    Gp, W = G * hp, hp * D

    # spread_blocks = nb (decode launch of a decode-only step, whose live sequences are the
    # first n slots, n = the number of slots with a token): the programs of every slot share
    # the live sequences' work. Slot b works on sequence b mod n as split (b div n) * S + sp
    # of ceil((nb - seq) / n) * S (S = num_splits); its partial still goes to slot b's rows,
    # and the caller's combine merges slot j's with those of slots j + n, j + 2n, ... (see
    # _spread_combine). At batch 1 of an 8-slot step, 8x the programs read the one context.
    blk, split, n_split = b, sp, num_splits  # the block worked on; b keeps the output rows
    if spread_blocks and spread_single:  # one live sequence (the caller's promise): slot 0
        blk, split, n_split = 0, b * num_splits + sp, spread_blocks * num_splits
    elif spread_blocks:
        e = jnp.arange(_next_pow2(spread_blocks), dtype=jnp.int32)
        n_live = jnp.maximum(jnp.sum(plgpu.load(blk_ntok_ref.at[e], mask=e < spread_blocks,
                                                other=0)), 1)
        blk = b % n_live
        split = (b // n_live) * num_splits + sp
        n_split = ((spread_blocks - 1 - blk) // n_live + 1) * num_splits
    seq = blk if seq_is_block else blk_seq_ref[blk]
    tok0 = blk_tok0_ref[blk]
    ntok = blk_ntok_ref[blk]
    pos0 = blk_pos0_ref[blk]

    r = jnp.arange(rows, dtype=jnp.int32)
    r_tok = r // Gp
    row_ok = (r < block_q * Gp) & (r_tok < ntok)
    q_row = (tok0 + r_tok) * H + h * Gp + r % Gp
    q_pos = pos0 + r_tok

    d = jnp.arange(D, dtype=jnp.int32)
    dw = jnp.arange(W, dtype=jnp.int32)  # the program's K/V columns (d when hp == 1)
    # Interpret mode discharges a gather only when every index is an array (no pl.ds mixed in),
    # and Triton lowers the same [rows, D] index arrays to one pointer tensor: so arrays throughout.
    if hp > 1:
        own = (dw[None, :] // D) == ((r % Gp) // G)[:, None]  # [rows, W]: row r's head's columns
    # The folded RMSNorm's factor of the program's token (decode: one token a program), applied
    # to the new K/V before their rounding, and to q: over pages read in their own dtype it goes
    # into the scores' scale instead (rope is linear, rope(r q) . k = r (rope(q) . k)), so q and
    # the first K/V loads need not wait for x's row; over fp8 pages read as float16 q takes it
    # (q / r could leave float16's range).
    r_norm = (None if norm_eps is None else
              _rms_factor(norm_x_ref, jnp.minimum(tok0, num_tokens - 1), norm_dim, norm_eps))
    r_in_scale = r_norm is not None and fp8_kv_dot is None
    s_scale = sm_scale * r_norm if r_in_scale else sm_scale
    if qkv_rope:
        C = (G + 2) * D  # one KV head's q/k/v columns
        dq = d if hp == 1 else dw % D
        base = (h * hp + (r % Gp) // G) * C + (r % G) * D  # [rows]: the row's head's first column
        q_mask = row_ok[:, None] if hp == 1 else row_ok[:, None] & own
        t_row = jnp.where(row_ok, tok0 + r_tok, 0)[:, None]
        q = _rope(q_ref, t_row, base[:, None], dq[None, :], cos_ref, sin_ref, D, q_mask,
                  qkv_parts, num_tokens, qkv_dtype, None if r_in_scale else r_norm)
    elif hp == 1:
        q = plgpu.load(q_ref.at[jnp.where(row_ok, q_row, 0)[:, None], d[None, :]],
                       mask=row_ok[:, None], other=0)
    else:
        q = plgpu.load(q_ref.at[jnp.where(row_ok, q_row, 0)[:, None], (dw % D)[None, :]],
                       mask=row_ok[:, None] & own, other=0)
    # The dots run in the cache dtype, except over an fp8 cache, whose pages are upcast as they
    # are loaded (an fp8 q would lose precision the cache never had to give up), to q's dtype or
    # to float16 as fp8_kv_dot says (see FP8_KV_DOT_CHOICES).
    kv_dtype = k_ref.dtype
    if fp8_kv_dot == "query":
        kv_dtype = q.dtype
    elif fp8_kv_dot == "float16":
        kv_dtype = jnp.dtype(jnp.float16)
        if q.dtype != jnp.float16:
            f16_max = float(jnp.finfo(jnp.float16).max)
            q = jnp.clip(q.astype(jnp.float32), -f16_max, f16_max)
    q = q.astype(kv_dtype)

    # Context range [lo, hi) this block needs, in units of bk-sized key blocks, and this split's part.
    hi = pos0 + ntok
    if kv_write:  # the new token (position hi - 1) comes from registers, not the pages
        hi = jnp.where(ntok > 0, hi - 1, hi)
    lo = 0 if sliding_window is None else jnp.maximum(pos0 - sliding_window + 1, 0)
    if split_pages:
        # Splits take whole pages, not whole key blocks: a context shorter than the table's
        # class (a 1k context in blocks of 16 pages is 4 blocks) still spreads over every split.
        # Each split walks its pages a block at a time from its first page; K/V rows past its
        # last page are masked loads (no memory traffic) and masked scores.
        pg_lo = lo // B
        pg_hi = jnp.where(ntok > 0, (hi + B - 1) // B, pg_lo)
        per_split = (pg_hi - pg_lo + n_split - 1) // n_split
        pg_start = pg_lo + split * per_split
        pg_end = jnp.minimum(pg_start + per_split, pg_hi)
        tok_base, tok_end = pg_start * B, pg_end * B
        it_lo = 0
        it_hi = (jnp.maximum(pg_end - pg_start, 0) + pages_per_block - 1) // pages_per_block
    else:
        kb_lo = lo // bk
        kb_hi = jnp.where(ntok > 0, (hi + bk - 1) // bk, kb_lo)
        per_split = (kb_hi - kb_lo + n_split - 1) // n_split
        it_lo = kb_lo + split * per_split
        it_hi = jnp.minimum(it_lo + per_split, kb_hi)
        tok_base, tok_end = 0, None

    k_off = jnp.arange(bk, dtype=jnp.int32)

    def body(kb, carry, masked=True):
        acc, m, l = carry
        k_pos = tok_base + kb * bk + k_off
        pids = page_table_ref[jnp.full((bk,), seq, jnp.int32), k_pos // B]
        kv_row = (pids * B + k_pos % B)[:, None]
        cols = h * W + dw[None, :]
        if split_pages and masked:
            k_ok = (k_pos < tok_end)[:, None]
            k = plgpu.load(k_ref.at[kv_row, cols], mask=k_ok, other=0).astype(kv_dtype)
            v = plgpu.load(v_ref.at[kv_row, cols], mask=k_ok, other=0).astype(kv_dtype)
        else:
            k = k_ref[kv_row, cols].astype(kv_dtype)
            v = v_ref[kv_row, cols].astype(kv_dtype)
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * s_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        if masked:
            mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < hi)
            if split_pages:
                mask &= k_pos[None, :] < tok_end
            if sliding_window is not None:
                mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
            s = jnp.where(mask, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        if masked:
            p = jnp.where(mask, p, 0.0)
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v,
                                             preferred_element_type=jnp.float32)
        return acc, m_new, l

    def new_token():
        # The new token: one more key for split 0's rows (decode: q_pos == its position, inside
        # any window), and its K/V row stored into its slot. Padding slots (ntok == 0) do
        # neither. (No program reads that row, so the store races nothing.)
        new = (split == 0) & (ntok > 0)
        t = jnp.minimum(tok0, num_tokens - 1)  # a padding slot's tok0 may be T
        cols1 = h * W + dw
        if qkv_rope:
            C = (G + 2) * D
            kv_base = (h * hp + dw // D) * C + G * D  # [W]: each head's key columns
            t_w = jnp.full((W,), t, jnp.int32)
            k_new = _rope(q_ref, t_w, kv_base, dw % D, cos_ref, sin_ref, D, None, qkv_parts,
                          num_tokens, qkv_dtype, r_norm)
            v_new = _load_qkv(q_ref, t_w, kv_base + D + dw % D, {}, qkv_parts, num_tokens,
                              qkv_dtype, r_norm)
            k_new = to_cache_dtype(k_new, k_out_ref.dtype, k_scale)
            v_new = to_cache_dtype(v_new, v_out_ref.dtype, v_scale)
        else:
            k_new = plgpu.load(knew_ref.at[jnp.full((W,), t, jnp.int32), cols1])
            v_new = plgpu.load(vnew_ref.at[jnp.full((W,), t, jnp.int32), cols1])
        s_new = jnp.sum(q.astype(jnp.float32) * k_new.astype(kv_dtype).astype(jnp.float32)[None, :],
                        axis=1) * s_scale
        if soft_cap is not None:
            s_new = soft_cap * jnp.tanh(s_new / soft_cap)
        s_new = jnp.where(new & row_ok, s_new, _NEG)
        slot = plgpu.load(slot_ref.at[jnp.full((W,), t, jnp.int32)])
        plgpu.store(k_out_ref.at[slot, cols1], k_new, mask=jnp.full((W,), new))
        plgpu.store(v_out_ref.at[slot, cols1], v_new, mask=jnp.full((W,), new))
        return new, s_new, v_new

    carry = (jnp.zeros((rows, W), jnp.float32), jnp.full((rows,), _NEG, jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    if masked_tail_only and sliding_window is None:
        # Key blocks that end at or before this block's first query position (and, with page
        # splits, before the split's end) are visible to every row: they skip the mask and its
        # selects, as flash attention's kernels do; only the blocks after them are masked.
        limit = pos0 + 1 if not split_pages else jnp.minimum(pos0 + 1, tok_end)
        if kv_write:
            limit = jnp.minimum(limit, hi)
        mid = jnp.clip((limit - tok_base) // bk, it_lo, jnp.maximum(it_lo, it_hi))
        carry = jax.lax.fori_loop(it_lo, mid, functools.partial(body, masked=False), carry)
        it_lo = mid
    acc, m, l = jax.lax.fori_loop(it_lo, it_hi, body, carry)
    if prefetch is not None and prefetch[4] == "end":
        issue_prefetch()

    if kv_write:
        new, s_new, v_new = new_token()
        m_new = jnp.maximum(m, s_new)
        alpha = jnp.exp(m - m_new)
        p_new = jnp.where(new & row_ok, jnp.exp(s_new - m_new), 0.0)
        l = alpha * l + p_new
        acc = alpha[:, None] * acc + p_new[:, None] * v_new.astype(kv_dtype).astype(
            jnp.float32)[None, :]
        m = m_new

    # Output rows: the token's own row, or (decode launch) a compact row per (block, head), so
    # the decode partials and their combine scale with the sequence slots S, not the tokens T.
    o_row = (b * block_q + r_tok) * H + h * Gp + r % Gp if out_by_block else q_row
    # Masked lanes still get distinct, in-range addresses (the dummy row): the interpreter
    # emulates a masked store by writing the old value back, which must not land on a row
    # another lane of the same store writes.
    if exact_rows:
        # Every row of the program is stored, those of tokens past ntok too (zeros: no key
        # reached them, acc = l = 0), so the caller needs no select for padding. Only the rows
        # that pad G up to the tensor-core minimum are left out.
        store = r < block_q * Gp
    else:
        store = row_ok
    n_rows = dummy_row + 1
    # Where the [rows, W] values go: row r's own head's D columns to its output row, the other
    # heads' columns (hp > 1: block-diagonal junk) to the dummy row, masked.
    store2 = store[:, None] if hp == 1 else store[:, None] & own
    o_row2 = jnp.where(store2, o_row[:, None], dummy_row)
    o_col = d[None, :] if hp == 1 else (dw % D)[None, :]
    o_row = jnp.where(store, o_row, dummy_row)
    if num_splits == 1:
        (o_ref,) = out_refs
        out = acc / jnp.where(l == 0.0, 1.0, l)[:, None]
        plgpu.store(o_ref.at[o_row2, o_col], out.astype(o_ref.dtype), mask=store2)
    else:
        acc_ref, m_ref, l_ref = out_refs
        o_row = o_row + sp * n_rows
        o_row2 = o_row2 + sp * n_rows
        plgpu.store(acc_ref.at[o_row2, o_col], acc, mask=store2)
        plgpu.store(m_ref.at[o_row], m, mask=store)
        plgpu.store(l_ref.at[o_row], l, mask=store)


def _launch(q2, k2, v2, page_table, blk_seq, blk_tok0, blk_ntok, blk_pos0, *, T, H, K, D, B,
            block_q, pages_per_block, num_splits, sm_scale, sliding_window, soft_cap, num_warps,
            num_stages, interpret, out_dtype, out_by_block=False, split_pages=False,
            masked_tail_only=False, kv_write=None, exact_rows=False, fp8_kv_dot="query",
            heads_per_program=1, qkv_rope=None, qkv_parts=1, qkv_norm=None, spread=False,
            combine="reduce", single=False, l2_prefetch=None, l2_prefetch_at="start"):
    """One pallas_call over len(blk_tok0) query blocks.

    ``blk_seq`` None: block b is sequence slot b (the decode launch), and the kernel takes its
    sequence from the grid instead of an operand (an iota operand was a kernel of its own in
    every layer: XLA rebuilds a cheap iota per consumer it cannot fuse into).

    Returns [T*H + 1, D] rows (token rows), or with ``out_by_block`` [nb*block_q*H + 1, D] rows
    (row (b*block_q + i)*H + head for token i of block b); rows no program wrote are junk.
    ``exact_rows`` (with ``out_by_block``): every row but the last written, zeros for tokens a
    block does not have.
    ``split_pages``: splits take page ranges (the page table needs pages_per_block - 1 columns
    past the last block's end). ``kv_write`` (slot [T], k_new, v_new [T, K*D]; decode launch):
    the new tokens' K/V are attended from registers and stored into k2 / v2, which then come
    back as two more outputs (aliased: written in place). ``heads_per_program`` (block_q 1):
    KV heads a program reads together (see _attn_kernel). ``qkv_rope`` ((k_scale, v_scale),
    with kv_write = (slot [T], cos [T, D], sin [T, D])): q2 is the q/k/v projection's output
    before rope, and the kernel builds q and the new K/V from it (see _attn_kernel); with
    ``qkv_parts`` > 1, its split-K partials [qkv_parts * T, ...], rounded to ``out_dtype``.
    ``qkv_norm`` ((x [T, E], eps), with ``qkv_rope``): the folded input RMSNorm (see
    ragged_paged_attention). ``spread`` (the decode launch of a decode-only step, more than one
    split): every slot's programs share the live sequences' splits (see _attn_kernel), and
    ``_spread_combine`` merges them; the rows of the padding slots are zeros. ``combine``
    (several splits, not spread): the split combine's form, one of ``DECODE_COMBINE_CHOICES``.
    ``single`` (with ``spread``): the caller promises one live sequence, in slot 0 (static: no
    count of the live slots in the kernel, and ``_single_combine`` merges every program's
    partial into slot 0's rows). ``l2_prefetch`` (an array; not with ``interpret``): the
    programs stream its bytes into the L2 at their start or after their K/V loop
    (``l2_prefetch_at``), see ragged_paged_attention."""
    G = H // K
    hp = heads_per_program
    if K % hp or (hp > 1 and block_q != 1):
        raise ValueError(f"heads_per_program {hp} must divide the {K} KV heads and needs "
                         f"block_q 1 (the decode launch), got block_q {block_q}")
    split_pages = split_pages and num_splits > 1
    fp8_pages = is_fp8_pages(k2.dtype)
    rows = max(16, _next_pow2(block_q * G * hp))
    nb = blk_tok0.shape[0]
    seq_is_block = blk_seq is None
    exact_rows = exact_rows and out_by_block
    spread = spread and num_splits > 1 and seq_is_block and out_by_block and block_q == 1
    n_rows = (nb * block_q if out_by_block else T) * H + 1
    pf_args, prefetch = (), None
    if l2_prefetch is not None and not interpret:
        programs, lanes = nb * (K // hp) * num_splits, 32 * num_warps
        chunk, n_chunks, per = prefetch_layout(l2_prefetch.size * l2_prefetch.dtype.itemsize,
                                               l2_prefetch.dtype.itemsize, programs, lanes)
        pf_args = (as_chunks(l2_prefetch, chunk),)
        prefetch = (chunk, n_chunks, per, lanes, l2_prefetch_at)
    kernel = functools.partial(
        _attn_kernel, block_q=block_q, rows=rows, group=G, num_heads=H, head_dim=D, page_size=B,
        pages_per_block=pages_per_block, num_splits=num_splits, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap, dummy_row=n_rows - 1,
        out_by_block=out_by_block, split_pages=split_pages, masked_tail_only=masked_tail_only,
        kv_write=kv_write is not None, num_tokens=T, exact_rows=exact_rows,
        seq_is_block=seq_is_block, fp8_kv_dot=fp8_kv_dot if fp8_pages else None,
        heads_per_program=hp, qkv_rope=qkv_rope is not None,
        k_scale=1.0 if qkv_rope is None else float(qkv_rope[0]),
        v_scale=1.0 if qkv_rope is None else float(qkv_rope[1]), qkv_parts=qkv_parts,
        qkv_dtype=out_dtype, norm_eps=None if qkv_norm is None else float(qkv_norm[1]),
        norm_dim=0 if qkv_norm is None else qkv_norm[0].shape[1],
        spread_blocks=nb if spread else 0, spread_single=spread and single, prefetch=prefetch)
    if num_splits == 1:
        out_shape = (jax.ShapeDtypeStruct((n_rows, D), out_dtype),)
    else:
        n = num_splits * n_rows
        out_shape = (jax.ShapeDtypeStruct((n, D), jnp.float32),
                     jax.ShapeDtypeStruct((n,), jnp.float32),
                     jax.ShapeDtypeStruct((n,), jnp.float32))
    extra, aliases = (), {}
    if kv_write is not None:
        extra = tuple(kv_write) + (() if qkv_norm is None else (qkv_norm[0],))
        k_in = 5 if seq_is_block else 6  # k2's operand index (v2's is the next)
        aliases = {k_in: len(out_shape), k_in + 1: len(out_shape) + 1}  # -> the page outputs
        out_shape = out_shape + (jax.ShapeDtypeStruct(k2.shape, k2.dtype),
                                 jax.ShapeDtypeStruct(v2.shape, v2.dtype))
    res = pl.pallas_call(
        kernel,
        grid=(nb, K // hp, num_splits),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        input_output_aliases=aliases,
        interpret=interpret,
        name=(f"ragged_paged_attention_bq{block_q}_ppb{pages_per_block}_ns{num_splits}"
              + ("_pg" if split_pages else "") + ("_mt" if masked_tail_only else "")
              + ("_kvw" if kv_write is not None else "") + ("_rope" if qkv_rope else "")
              + (f"_sk{qkv_parts}" if qkv_parts > 1 else "") + ("_nf" if qkv_norm else "")
              + (f"_hp{hp}" if hp > 1 else "") + ("_sp" if spread else "")
              + ("1" if spread and single else "")
              + (f"_pf{l2_prefetch_at[0]}" if prefetch is not None else "")),
    )(*(() if seq_is_block else (blk_seq,)), blk_tok0, blk_ntok, blk_pos0, page_table, q2, k2,
      v2, *pf_args, *extra)
    pages = ()
    if kv_write is not None:
        *res, k_new_pages, v_new_pages = res
        pages = (k_new_pages, v_new_pages)
    if num_splits == 1:
        return (res[0], *pages) if pages else res[0]
    acc, m, l = res
    if spread and single:
        out = _single_combine(acc, m, l, nb=nb, H=H, D=D, num_splits=num_splits,
                              out_dtype=out_dtype, combine=combine)
        return (out, *pages) if pages else out
    if spread:
        out = _spread_combine(acc, m, l, blk_ntok, nb=nb, H=H, D=D, num_splits=num_splits,
                              out_dtype=out_dtype)
        return (out, *pages) if pages else out
    acc = acc.reshape(num_splits, n_rows, D)
    m = m.reshape(num_splits, n_rows)
    l = l.reshape(num_splits, n_rows)
    out = _merge_partials(acc, m, l, combine).astype(out_dtype)
    return (out, *pages) if pages else out


def _merge_partials(acc, m, l, combine="reduce"):
    """The flash-decoding combine over the leading axis of the partials (acc [n, ..., D], m and
    l [n, ...]): each rescaled to the global max, summed, normalized (rows no key reached: 0).
    ``combine`` "unrolled": the same sums as a chain of elementwise ops over the n partials
    (one loop fusion whatever n; XLA may cut the reduce form into several kernels)."""
    if combine == "unrolled":
        n = m.shape[0]
        m_max = functools.reduce(jnp.maximum, [m[i] for i in range(n)])
        w = [jnp.exp(m[i] - m_max) for i in range(n)]
        l_tot = functools.reduce(jnp.add, [w[i] * l[i] for i in range(n)])
        acc_tot = functools.reduce(jnp.add, [w[i][..., None] * acc[i] for i in range(n)])
    else:
        m_max = jnp.max(m, axis=0)
        w = jnp.exp(m - m_max[None])
        l_tot = jnp.sum(w * l, axis=0)
        acc_tot = jnp.sum(w[..., None] * acc, axis=0)
    return acc_tot / jnp.where(l_tot == 0.0, 1.0, l_tot)[..., None]


def _single_combine(acc, m, l, *, nb, H, D, num_splits, out_dtype, combine="reduce"):
    """The combine of a spread decode launch over one live sequence (``_launch``'s ``single``):
    slot 0's output merges the partials of every slot and split; the other slots' rows are
    zeros. ``combine`` "reduce": one reduce over both axes; "unrolled": a chain of elementwise
    merges over the nb * num_splits partials, written for every slot and selected (one loop
    fusion for XLA, output included). Returns [nb * H, D] rows (no dummy row)."""
    n_rows = nb * H + 1
    acc = acc.reshape(num_splits, n_rows, D)[:, :nb * H].reshape(num_splits * nb, H, D)
    m = m.reshape(num_splits, n_rows)[:, :nb * H].reshape(num_splits * nb, H)
    l = l.reshape(num_splits, n_rows)[:, :nb * H].reshape(num_splits * nb, H)
    first = (jnp.arange(nb) == 0)[:, None, None]
    out0 = _merge_partials(acc, m, l, combine)
    return jnp.where(first, out0[None], 0.0).astype(out_dtype).reshape(nb * H, D)


def _spread_combine(acc, m, l, blk_ntok, *, nb, H, D, num_splits, out_dtype):
    """The flash-decoding combine of a spread decode launch (``_launch``'s ``spread``): the
    output of live slot j (j < n, n = the slots with a token) merges the num_splits partials
    of slots j, j + n, j + 2n, ... < nb; padding slots get zeros. One elementwise merge over
    the nb * num_splits candidate partials (unrolled; those of other sequences masked), so XLA
    can keep it one kernel. Returns [nb * H + 1, D] rows like the unspread launch."""
    n_rows = nb * H + 1
    acc = acc.reshape(num_splits, n_rows, D)[:, :nb * H].reshape(num_splits, nb, H, D)
    m = m.reshape(num_splits, n_rows)[:, :nb * H].reshape(num_splits, nb, H)
    l = l.reshape(num_splits, n_rows)[:, :nb * H].reshape(num_splits, nb, H)
    n = jnp.clip(jnp.sum(blk_ntok), 1, nb)
    j = jnp.arange(nb, dtype=jnp.int32)
    parts = []
    for k in range(nb):
        src = j + k * n
        ok = (src < nb)[:, None]
        src = jnp.minimum(src, nb - 1)
        for s in range(num_splits):
            parts.append((jnp.where(ok, m[s][src], _NEG), l[s][src], acc[s][src]))
    m_max = functools.reduce(jnp.maximum, [p[0] for p in parts])
    w = [jnp.exp(p[0] - m_max) for p in parts]
    l_tot = functools.reduce(jnp.add, [wi * p[1] for wi, p in zip(w, parts)])
    acc_tot = functools.reduce(jnp.add, [wi[..., None] * p[2] for wi, p in zip(w, parts)])
    out = acc_tot / jnp.where(l_tot == 0.0, 1.0, l_tot)[..., None]
    out = jnp.where((j < n)[:, None, None], out, 0.0).astype(out_dtype)
    return jnp.pad(out.reshape(nb * H, D), ((0, 1), (0, 0)))


# ----------------------------------------------------------------------------------------------
# Block sizes per shape class (issue 5: measured, not guessed).
#
# Sources (KERNEL_TABLE_SOURCE, oldest first; a shape a later file measured takes that file's
# rows alone): benchmarks/results/kernels-h100-2026-11-23.jsonl (H100 SXM, host wall times),
# then benchmarks/results/kernels-decode-h200-2026-12-01.jsonl (H200, GPU time per call from
# profiler traces: batch 8 / 64 / 256 x 4k and 1 x 32k), then
# benchmarks/results/kernels-decode-h200-2026-12-01-noon.jsonl (H200, GPU time: batch 8 / 64 /
# 256 x 512, 1 x 4k, 8 x 32k), then benchmarks/results/kernels-decode-h200-2026-12-01-afternoon.jsonl
# (H200, GPU time: 1 x 512, 64 x 32k). Llama-3-8B attention: H=32, K=8,
# D=128, page size B=16, bf16; the fastest correct `pallas` row of each shape. Regenerate with
#     python3 benchmarks/kernels.py --print-table <the files, oldest first>
# and paste its output here (tests/test_pallas_kernels.py checks this copy against the files
# named in KERNEL_TABLE_SOURCE).
#
# Decode is keyed by the static shapes of the call, not by the batch's real lengths: S, the
# sequence slots (page_table.shape[0], the engine's batch bucket), and the context class
# L = M * B tokens (M = page_table.shape[1], max pages per sequence). A shape takes the
# smallest measured class >= its own (the largest past the end). The real context is dynamic
# and often shorter than the class: that is why the table may carry many splits. Each split
# takes ceil(blocks / splits) of the *real* context's key blocks, so a shorter context spreads
# over fewer, still busy splits, and the splits left without blocks are programs that exit
# before their first load; the extra cost is those empty programs plus a combine over
# splits x S x H x D floats, both small next to reading the context. Splits are also capped at
# the key blocks of the class (cdiv(M, pages_per_block)), past which they can only be empty.
# Caveat: the H100 sweep timed single calls from the host, whose dispatch floor is ~50-70 us
# (every implementation, cuDNN included, sits there at batch 1-8 x 512); entries whose time is
# near that floor (batch <= 8 at 512, batch 1 at 4k) are ordered by noise, not by the kernel.
# ----------------------------------------------------------------------------------------------

KERNEL_TABLE_SOURCE = ("benchmarks/results/kernels-h100-2026-11-23.jsonl",
                       "benchmarks/results/kernels-decode-h200-2026-12-01.jsonl",
                       "benchmarks/results/kernels-decode-h200-2026-12-01-noon.jsonl",
                       "benchmarks/results/kernels-decode-h200-2026-12-01-afternoon.jsonl")

# Over an fp8 cache (e4m3 pages read as float16, the default ``fp8_kv_dot``) the shapes its
# sweep measured take their own entries, the rest DECODE_TABLE's. Source, derived the same way
# (``kernels.py --print-table --kv-dtype fp8 <files>``): H200, 2026-12-01 evening, GPU time,
# rows of kv_dtype fp8 and fp8_kv_dot float16. Half the bytes a page: one split beats the bf16
# table's two at 1024 x 640 (600 -> 528 us) and 256 x 4k (800 -> 777), and 8 pages a block
# beat 4 at 64 x 4k (310 -> 198). Then (H200, 2026-12-01 late, `kernels.py --decode-variants
# hp`): two KV heads a program in blocks of 4 pages (a third value: decode_heads_per_program)
# at 1024 x 640 (528 -> 509 us), 256 x 512 (115 -> 112) and 256 x 4k (779 -> 771); four heads
# a program, 8 warps, or 8 pages with two heads were slower at every shape.
KERNEL_TABLE_FP8_SOURCE = ("benchmarks/results/kernels-decode-fp8-h200-2026-12-01-evening.jsonl",
                           "benchmarks/results/kernels-decode-hp-h200-2026-12-01-late.jsonl")

DECODE_TABLE_FP8: dict[tuple[int, int], tuple[int, ...]] = {
    (64, 4096): (8, 1),
    (256, 512): (4, 1, 2),
    (256, 4096): (4, 1, 2),
    (1024, 640): (4, 1, 2),
}

# (batch class, context class in tokens) -> (decode_pages_per_block, decode_splits), and
# decode_heads_per_program third where it is not 1. Over bf16 pages several heads a program
# measured within 1% of one (H200, 2026-12-01 late: 1024 x 640 666 -> 662 us, 256 x 4k 1000
# -> 987; the same file as the fp8 table's): noise, so this table keeps one head a program.
DECODE_TABLE: dict[tuple[int, int], tuple[int, ...]] = {
    (1, 512): (8, 4),
    (1, 4096): (8, 32),
    (1, 32768): (8, 33),
    (8, 512): (8, 4),
    (8, 4096): (8, 5),
    (8, 32768): (4, 8),
    (64, 512): (4, 1),
    (64, 4096): (4, 1),
    (64, 32768): (4, 1),
    (256, 512): (8, 1),
    (256, 4096): (8, 2),
}

# (query heads per KV head G, tokens class T) -> (block_q, pages_per_block)
# Only G=4 was measured (and the sweep kept one config, its first, past its budget): other
# group sizes keep the measured rows per program, block_q * G.
PREFILL_TABLE: dict[tuple[int, int], tuple[int, int]] = {
    (4, 4096): (16, 4),
}

# The causal mask only on the key blocks past a program's first query position, per launch
# (``masked_tail_only=None``). H200, 2026-12-01, `kernels.py --sections prefill` (17 configs x
# 2 shapes, benchmarks/results/kernels-prefill-h200-2026-12-01.jsonl): on the table's prefill
# config it took 1 x 4k from 792 to 580 us and 4 x 1k from 259 to 201 us, the best row at
# both shapes but for one config 2% faster at 4k alone; no other tile beat the table's with
# it on. The decode launch (one query row a program) gains nothing: 12.96 -> 12.8, 25.5 ->
# 27.3, 72.7 -> 73.5 us at batch 1 / 8 / 64 x 1k in an 8k page table (device time).
PREFILL_MASKED_TAIL_ONLY = True
DECODE_MASKED_TAIL_ONLY = False


def _class_of(value: int, classes) -> int:
    """The smallest class >= value, else the largest class."""
    classes = sorted(set(classes))
    return next((c for c in classes if c >= value), classes[-1])


def decode_block_config(num_seq_slots: int, max_pages: int, page_size: int,
                        fp8_pages: bool = False) -> dict:
    """Table entry of a decode launch: {'decode_pages_per_block', 'decode_splits',
    'decode_heads_per_program'} (an entry of two values reads one KV head a program).

    num_seq_slots: S (page_table.shape[0]); max_pages: M (page_table.shape[1]); fp8_pages: an
    fp8 cache (DECODE_TABLE_FP8's entries over DECODE_TABLE's)."""
    S, M, B = num_seq_slots, max_pages, page_size
    table = {**DECODE_TABLE, **DECODE_TABLE_FP8} if fp8_pages else DECODE_TABLE
    s_cls = _class_of(S, [s for s, _ in table])
    # A batch class the sweep did not measure at every context: its nearest measured context.
    ctxs = [c for s, c in table if s == s_cls]
    ctx_cls = _class_of(M * B, ctxs)
    ppb, splits, *hp = table[(s_cls, ctx_cls)]
    splits = max(1, min(splits, -(-M // ppb)))
    return dict(decode_pages_per_block=ppb, decode_splits=splits,
                decode_heads_per_program=hp[0] if hp else 1)


def prefill_block_config(num_tokens: int, num_heads: int, num_kv_heads: int) -> dict:
    """Table entry of a prefill launch: {'block_q', 'pages_per_block'}."""
    G = num_heads // num_kv_heads
    g_cls = min({g for g, _ in PREFILL_TABLE}, key=lambda g: (abs(g - G), g))
    t_cls = _class_of(num_tokens, [t for g, t in PREFILL_TABLE if g == g_cls])
    bq, ppb = PREFILL_TABLE[(g_cls, t_cls)]
    return dict(block_q=max(1, bq * g_cls // G), pages_per_block=ppb)


# Where the decode programs issue ``l2_prefetch``: before anything else, or after their K/V
# loop (the prefetch's DRAM traffic then does not queue ahead of the K/V reads).
L2_PREFETCH_AT = ("start", "end")


def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    seq_lens: jax.Array,
    page_table: jax.Array,
    query_start_loc: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    block_q: int | None = None,
    pages_per_block: int | None = None,
    decode_pages_per_block: int | None = None,
    decode_splits: int | None = None,
    decode_split_pages: bool = False,
    decode_heads_per_program: int | None = None,
    decode_spread: bool = False,
    decode_combine: str | None = None,
    decode_single: bool = False,
    masked_tail_only: bool | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    decode: bool = True,
    prefill: bool = True,
    decode_only: bool = False,
    new_kv: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    qkv_rope: tuple[jax.Array, float, float] | None = None,
    qkv_parts: int = 1,
    qkv_dtype=None,
    qkv_norm: tuple[jax.Array, float] | None = None,
    fp8_kv_dot: str = FP8_KV_DOT_DEFAULT,
    l2_prefetch: jax.Array | None = None,
    l2_prefetch_at: str = "start",
    interpret: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """Pallas (Triton) ragged paged attention; same contract and result as the reference.

    Kernel knobs (all static): ``block_q`` new tokens per prefill program, ``pages_per_block``
    pages per K/V step of the prefill launch, ``decode_pages_per_block`` / ``decode_splits`` the
    same and the flash-decoding split count of the decode launch, ``decode_heads_per_program``
    the KV heads a decode program reads together (it must divide them). Each one left None comes
    from the measured tables above (``decode_block_config`` by S, M and the page dtype,
    ``prefill_block_config`` by T and G); a value passed overrides its table entry alone.
    ``decode_spread`` (with ``decode_only``): the programs of the padding sequence slots take
    splits of the live sequences (at batch 1 in an 8-slot step, 8x the programs read the one
    context; see _attn_kernel), merged by one combine (_spread_combine); ignored without
    ``decode_only`` or with one decode split. Off by default: slower at batch 1 on the H200
    (benchmarks/RESULTS.md, evening of 2026-12-02).
    ``decode_combine``: the form of the decode launch's split combine, one of
    ``DECODE_COMBINE_CHOICES`` (None: ``DECODE_COMBINE_DEFAULT``).
    ``decode_single`` (with ``decode_only`` and more than one decode split): the caller
    promises that exactly one sequence is live, in slot 0 (a batch of one in a step built for
    more slots). Then ``decode_spread``'s sharing is static: every slot's programs take splits
    of that sequence, and one combine merges them into slot 0's rows. The output is
    unspecified for a batch that breaks the promise. Off by default (H200, night of
    2026-12-02: fp8 batch 1 -1.2%, bf16 within noise; the engine has no static one-sequence
    flag to set it from): ``JAXLLM_ATTENTION_KNOBS`` can force it for batch-1 benchmarks.
    ``decode_split_pages`` splits the decode context by pages instead of by key blocks of
    ``decode_pages_per_block`` pages (for short contexts under a long context class, see
    DESIGN_NOTES; no faster in the H200 sweeps of 2026-12-01, kernel or engine).
    ``masked_tail_only`` runs the key blocks every query row of a program sees (those before
    its first query position) without the causal mask, and masks only the rest, as flash
    attention kernels do (without a sliding window). None (the default) turns it on in the
    prefill launch and off in the decode launch, by measurement (H200, 2026-12-01, table config:
    prefill 1 x 4k 792 -> 580 us, 4 x 1k 259 -> 201 us; decode neutral to 7% slower); True or
    False sets both launches.
    ``fp8_kv_dot`` (an fp8 cache): how the dots read its e4m3 pages, one of
    ``FP8_KV_DOT_CHOICES`` (described and measured beside it), or "auto" (the default):
    float16 for a bf16 / float16 q, float32 dots for a float32 q.
    ``decode=False`` / ``prefill=False`` skip a launch when the caller knows the batch has no
    decode (q_len == 1) or no longer sequences (e.g. a pure decode step); by default both run
    and each skips the other's sequences. With ``prefill=False`` sequences of q_len > 1 are not
    computed (their rows are zeros), so pass it only for batches of decodes.
    ``decode_only=True`` promises more: every real sequence has exactly one new token, so
    token t belongs to sequence slot t. The decode launch alone then runs and its rows are the
    output as they are, without the token->sequence search, gather and select of the general
    path (the engine's pure decode steps, ``AttentionMetadata.decode_only``). The output is
    unspecified for a batch that breaks the promise.

    ``new_kv=(k_new, v_new, slot_mapping)`` (with ``decode_only``; k_new / v_new [T, K, D] in the
    cache's dtype, already scaled for an fp8 cache; slot_mapping [T]): the new tokens' K/V are
    not in the pages yet. The kernel attends to them from registers and writes them into their
    slots, and the call returns ``(out, k_pages, v_pages)``: the pages with the new K/V written,
    as ``write`` would leave them (in place when the pages are donated). This saves the step's
    two scatter kernels per layer. Padding tokens write nothing. Off by default: on the H200
    (2026-12-01) the batch-1 step was no faster with it (median 4.46 vs 4.42 ms), and in the
    GPU-bound multi-step loop (2026-12-02) -0.7 to -2%, within the spread between calls;
    ``JAXLLM_ATTENTION_KNOBS='{"fused_kv_write": true}'`` turns it on in the engine.

    ``qkv_rope=(angles [T, D/2] float32, k_scale, v_scale)`` with ``new_kv=(None, None,
    slot_mapping)``: ``angles`` are each token's rope angles (position x inverse frequency, as
    ``apply_rope`` builds them); ``q`` is the q/k/v projection's output before rope,
    [T, K, (G + 2) * D] (per KV head its G query heads, its key, its value:
    ``jaxllm.models.fused``'s layout). The kernel applies rope (HF's half split, float32,
    rounded to q's dtype as ``jaxllm.models.llama.apply_rope``) to the query heads and the new
    key, converts the new K/V to the cache dtype (an fp8 cache: divided by k_scale / v_scale,
    clipped), and goes on as with ``new_kv``: the step's rope and K/V kernels are gone (three a
    layer).
    ``qkv_parts`` > 1 (with ``qkv_rope``): ``q`` holds the projection's split-K partial
    products instead, [qkv_parts * T, K, (G + 2) * D] (rows p * T + t; float32), which the
    kernel sums and rounds to ``qkv_dtype`` (required; the model's dtype, the output's): the
    projection's own split-K sum kernel is gone too.
    ``qkv_norm=(x [T, E], eps)`` (with ``qkv_rope``): the layer's input RMSNorm folded into the
    q/k/v GEMM. RMSNorm(x) @ W = r * ((x * g) @ W) with r = rsqrt(mean(x^2) + eps) per token,
    so the caller's GEMM takes x * g (XLA fuses the scale into the GEMM as its prologue) and
    the kernel multiplies each token's q/k/v (the partials' float32 sum) by r, computed from
    x's row, before rounding and rope: the norm's own kernel is gone. Needs a projection
    without bias (a bias would be scaled by r too).

    ``l2_prefetch`` (any array whose byte size is a multiple of 16; the GPU only: ignored with
    ``interpret``): the decode launch's programs stream its bytes into the L2 (Hopper's bulk
    prefetch, ``pallas_kernels.l2_prefetch``), each its share, issued at the program's start
    or after its K/V loop (``l2_prefetch_at``: one of ``L2_PREFETCH_AT``); nothing waits for
    it and the result does not change. For the weight of the GEMM that reads this call's
    output (the o projection): at small batches the kernel is bound by latency, not by the
    DRAM, which idles under it; the GEMM then finds its weight in the L2.
    """
    if l2_prefetch_at not in L2_PREFETCH_AT:
        raise ValueError(f"l2_prefetch_at must be one of {L2_PREFETCH_AT}, got "
                         f"{l2_prefetch_at!r}")
    if qkv_rope is not None:
        if new_kv is None or new_kv[0] is not None or new_kv[1] is not None:
            raise ValueError("qkv_rope needs new_kv=(None, None, slot_mapping): the kernel "
                             "takes the new K/V from the q/k/v output")
        Dp = k_pages.shape[-1]
        if q.ndim != 3 or q.shape[1] != k_pages.shape[2] or q.shape[2] % Dp \
                or q.shape[2] // Dp < 3:
            raise ValueError(f"with qkv_rope, q must be [T, K, (G + 2) * D] = [T, "
                             f"{k_pages.shape[2]}, (G + 2) * {Dp}], got {q.shape}")
        if not isinstance(qkv_parts, int) or qkv_parts < 1 or q.shape[0] % qkv_parts:
            raise ValueError(f"qkv_parts must be a positive int dividing q's {q.shape[0]} rows, "
                             f"got {qkv_parts!r}")
        if qkv_parts > 1 and qkv_dtype is None:
            raise ValueError("qkv_parts > 1 needs qkv_dtype (the dtype the partials' sum is "
                             "rounded to)")
        qkv = q
        # The shape and dtype the query heads would have.
        q = jax.ShapeDtypeStruct((qkv.shape[0] // qkv_parts,
                                  qkv.shape[1] * (qkv.shape[2] // Dp - 2), Dp),
                                 qkv.dtype if qkv_parts == 1 else jnp.dtype(qkv_dtype))
    elif qkv_parts != 1:
        raise ValueError("qkv_parts needs qkv_rope")
    if qkv_norm is not None:
        if qkv_rope is None:
            raise ValueError("qkv_norm needs qkv_rope (the decode kernel building q/k/v)")
        if qkv_norm[0].ndim != 2 or qkv_norm[0].shape[0] != q.shape[0]:
            raise ValueError(f"qkv_norm's x must be [T, E] with T = {q.shape[0]}, got "
                             f"{qkv_norm[0].shape}")
    T, H, D = q.shape
    P, B, K, _ = k_pages.shape
    S, M = page_table.shape
    if H % K:
        raise ValueError(f"num query heads {H} must be a multiple of num kv heads {K}")
    if B & (B - 1) or D & (D - 1):
        raise ValueError(f"page size {B} and head dim {D} must be powers of two (Triton blocks)")
    for name, v in (("block_q", block_q), ("pages_per_block", pages_per_block),
                    ("decode_pages_per_block", decode_pages_per_block),
                    ("decode_splits", decode_splits),
                    ("decode_heads_per_program", decode_heads_per_program)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int or None (table), got {v!r}")
    if fp8_kv_dot not in FP8_KV_DOT_CHOICES + ("auto",):
        raise ValueError(f"fp8_kv_dot must be 'auto' or one of {FP8_KV_DOT_CHOICES}, got "
                         f"{fp8_kv_dot!r}")
    fp8_kv_dot = _fp8_kv_dot_for(fp8_kv_dot, q.dtype)
    decode_combine = DECODE_COMBINE_DEFAULT if decode_combine is None else decode_combine
    if decode_combine not in DECODE_COMBINE_CHOICES:
        raise ValueError(f"decode_combine must be None or one of {DECODE_COMBINE_CHOICES}, got "
                         f"{decode_combine!r}")
    if decode_split_pages and is_fp8_pages(k_pages.dtype):
        # Its masked page loads need a fill value of the pages' dtype, which Triton cannot
        # build for e4m3 (H200, 2026-12-01: a lowering error, not a result; e5m2 untried).
        raise ValueError("decode_split_pages needs bf16 / float32 pages; the fp8 cache splits "
                         "by key blocks (decode_split_pages=False)")
    if decode_only:
        if not decode:
            raise ValueError("decode_only=True needs the decode launch (decode=True)")
        prefill = False
    if new_kv is not None:
        if not decode_only:
            raise ValueError("new_kv (the K/V write fused into the kernel) needs decode_only=True")
        k_new, v_new, new_slots = new_kv
    if new_kv is not None and qkv_rope is None:
        if k_new.shape != (T, K, D) or v_new.shape != (T, K, D):
            raise ValueError(f"new_kv k/v must be [T, K, D] = {(T, K, D)}, got "
                             f"{k_new.shape} and {v_new.shape}")
        if k_new.dtype != k_pages.dtype or v_new.dtype != v_pages.dtype:
            raise ValueError(f"new_kv k/v must be in the cache dtype {k_pages.dtype}, got "
                             f"{k_new.dtype} and {v_new.dtype}")
    dcfg = decode_block_config(S, M, B, fp8_pages=is_fp8_pages(k_pages.dtype))
    pcfg = prefill_block_config(T, H, K)
    block_q = pcfg["block_q"] if block_q is None else block_q
    pages_per_block = pcfg["pages_per_block"] if pages_per_block is None else pages_per_block
    dppb = dcfg["decode_pages_per_block"] if decode_pages_per_block is None \
        else decode_pages_per_block
    decode_splits = dcfg["decode_splits"] if decode_splits is None else decode_splits
    dhp = dcfg["decode_heads_per_program"] if decode_heads_per_program is None \
        else decode_heads_per_program
    if K % dhp:
        if decode_heads_per_program is not None:
            raise ValueError(f"decode_heads_per_program {dhp} must divide the {K} KV heads")
        dhp = 1  # a table entry measured on another head count

    ns = jnp.reshape(num_seqs, ()).astype(jnp.int32)
    seq_ids = jnp.arange(S, dtype=jnp.int32)
    q_len = jnp.where(seq_ids < ns, query_start_loc[1:] - query_start_loc[:-1], 0)
    is_decode = q_len == 1 if decode else jnp.zeros_like(q_len, bool)

    # Pad the page table's columns so every K/V step reads inside it (the extra columns are
    # masked by position anyway); any valid page id will do.
    ppb_max = max(pages_per_block if prefill else 1, dppb if decode else 1)
    M_pad = -(-M // ppb_max) * ppb_max
    if decode and decode_split_pages:  # a split's last block may start at its last page
        M_pad = max(M_pad, M + dppb - 1)
    pt = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, M_pad - M)))
    q2 = qkv.reshape(qkv.shape[0], -1) if qkv_rope is not None else q.reshape(T * H, D)
    k2 = k_pages.reshape(P * B, K * D)
    v2 = v_pages.reshape(P * B, K * D)
    common = dict(T=T, H=H, K=K, D=D, B=B, sm_scale=sm_scale, sliding_window=sliding_window,
                  soft_cap=soft_cap, num_warps=num_warps, num_stages=num_stages,
                  interpret=interpret, out_dtype=q.dtype, fp8_kv_dot=fp8_kv_dot)
    prefill_mto = PREFILL_MASKED_TAIL_ONLY if masked_tail_only is None else masked_tail_only
    decode_mto = DECODE_MASKED_TAIL_ONLY if masked_tail_only is None else masked_tail_only

    t = jnp.arange(T, dtype=jnp.int32)
    t_valid = t < query_start_loc[ns]
    zeros = jnp.zeros((), q.dtype)
    if not decode_only:
        # Token -> its sequence (compare_all: the default binary search is a while loop, run
        # from the host on the GPU).
        t_seq = jnp.minimum(jnp.searchsorted(query_start_loc[1:], t, side="right",
                                              method="compare_all"), S - 1).astype(jnp.int32)

    out = None
    if prefill:
        p_len = jnp.where(is_decode, 0, q_len)
        n_blk = (p_len + block_q - 1) // block_q
        cum = jnp.cumsum(n_blk)
        # Static bound on the query blocks: sum_s cdiv(p_s, bq) <= (T + n_p * (bq - 1)) // bq
        # for n_p sequences in this launch, n_p <= S, and with a decode launch n_p <= T // 2
        # (its sequences have q_len >= 2). Blocks past cum[-1] exit at once.
        n_p = min(S, T // 2 if decode else T)
        nb = max(1, min(T, -(-T // block_q) + S, (T + n_p * (block_q - 1)) // block_q))
        b = jnp.arange(nb, dtype=jnp.int32)
        bseq = jnp.minimum(jnp.searchsorted(cum, b, side="right", method="compare_all"),
                           S - 1).astype(jnp.int32)
        j = b - (cum[bseq] - n_blk[bseq])
        b_ntok = jnp.where(b < cum[-1], jnp.minimum(block_q, p_len[bseq] - j * block_q), 0)
        b_tok0 = query_start_loc[bseq] + j * block_q
        b_pos0 = seq_lens[bseq] - p_len[bseq] + j * block_q
        rows = _launch(q2, k2, v2, pt, bseq, b_tok0.astype(jnp.int32),
                       b_ntok.astype(jnp.int32), b_pos0.astype(jnp.int32),
                       block_q=block_q, pages_per_block=pages_per_block, num_splits=1,
                       masked_tail_only=prefill_mto, **common)
        out = jnp.where(t_valid[:, None, None], rows[: T * H].reshape(T, H, D), zeros)
    if decode:
        nd = min(S, T)  # a real sequence owns >= 1 token: slots past T are padding
        d_ntok = jnp.where(is_decode[:nd], 1, 0).astype(jnp.int32)
        d_tok0 = query_start_loc[:nd].astype(jnp.int32)
        d_pos0 = (seq_lens[:nd] - 1).astype(jnp.int32)
        kv_write = None
        if qkv_rope is not None:
            kv_write = (new_slots.astype(jnp.int32), *rope_tables(qkv_rope[0]))
        elif new_kv is not None:
            kv_write = (new_slots.astype(jnp.int32), k_new.reshape(T, K * D),
                        v_new.reshape(T, K * D))
        rows = _launch(q2, k2, v2, pt, None, d_tok0, d_ntok, d_pos0, block_q=1,
                       pages_per_block=dppb, num_splits=decode_splits, out_by_block=True,
                       heads_per_program=dhp,
                       split_pages=decode_split_pages, kv_write=kv_write,
                       exact_rows=decode_only, masked_tail_only=decode_mto,
                       qkv_rope=None if qkv_rope is None else qkv_rope[1:],
                       qkv_parts=qkv_parts, qkv_norm=qkv_norm,
                       spread=(decode_spread or decode_single) and decode_only,
                       single=decode_single, combine=decode_combine, l2_prefetch=l2_prefetch,
                       l2_prefetch_at=l2_prefetch_at, **common)
        if kv_write is not None:
            rows, k2_new, v2_new = rows
            new_pages = (k2_new.reshape(P, B, K, D), v2_new.reshape(P, B, K, D))
        if decode_only:
            # Token t is slot t, and the launch wrote every slot's rows, zeros for the padding
            # slots (exact_rows): the rows are the output, with no select; tokens past the last
            # slot are padding.
            out = rows[: nd * H].reshape(nd, H, D)
            if nd < T:
                out = jnp.pad(out, ((0, T - nd), (0, 0), (0, 0)))
        else:
            dec = rows[: nd * H].reshape(nd, H, D)[jnp.minimum(t_seq, nd - 1)]  # [T, H, D]
            t_dec = (is_decode[t_seq] & t_valid)[:, None, None]
            out = jnp.where(t_dec, dec, zeros if out is None else out)
    if new_kv is not None:
        return (out.astype(q.dtype), *new_pages)
    return out.astype(q.dtype)
