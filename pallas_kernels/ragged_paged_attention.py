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

import jax
import jax.numpy as jnp


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
    if T == blk:
        return _attend_tokens(q, jnp.arange(T, dtype=jnp.int32), k_pages, v_pages, seq_lens,
                              page_table, query_start_loc, num_seqs, sm_scale, sliding_window,
                              soft_cap)
    n_blk = -(-T // blk)
    q_pad = jnp.pad(q, ((0, n_blk * blk - T), (0, 0), (0, 0)))
    t_idx = jnp.arange(n_blk * blk, dtype=jnp.int32)

    def one(args):
        qb, tb = args
        return _attend_tokens(qb, tb, k_pages, v_pages, seq_lens, page_table, query_start_loc,
                              num_seqs, sm_scale, sliding_window, soft_cap)

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
    seq_id = jnp.searchsorted(query_start_loc[1:], t, side="right").astype(jnp.int32)
    valid = t < query_start_loc[num_seqs]
    seq_id = jnp.minimum(seq_id, S - 1)
    q_end = query_start_loc[seq_id + 1]
    q_pos = seq_lens[seq_id] - (q_end - t)  # absolute position of each query token

    pages = page_table[seq_id]  # [T, M]
    k_ctx = k_pages[pages].reshape(T, L, K, D)
    v_ctx = v_pages[pages].reshape(T, L, K, D)
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
