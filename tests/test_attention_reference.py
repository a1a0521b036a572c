"""The jnp ragged paged attention reference against a per-sequence numpy loop over contiguous K/V."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models.attention import AttentionMetadata, paged_attention, write_kv
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference


def _naive(q, k, v, ctx_len, q_len, sm_scale, window, soft_cap):
    """One sequence: q [q_len, H, D], k/v [ctx_len, K, D] contiguous; causal over positions."""
    H, K = q.shape[1], k.shape[1]
    G = H // K
    out = np.zeros_like(q, dtype=np.float64)
    for i in range(q_len):
        pos = ctx_len - q_len + i
        for h in range(H):
            s = (k[: pos + 1, h // G] @ q[i, h]) * sm_scale
            if soft_cap is not None:
                s = soft_cap * np.tanh(s / soft_cap)
            if window is not None:
                s[: max(0, pos + 1 - window)] = -np.inf
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[: pos + 1, h // G]
    return out


@pytest.mark.parametrize("window,soft_cap", [(None, None), (5, None), (None, 30.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_matches_naive_attention_on_ragged_batches_with_shuffled_pages(seed, window,
                                                                                  soft_cap):
    rng = np.random.default_rng(seed)
    H, K, D, B = 4, 2, 16, 4
    q_lens = [1, 7, 3, 1, 12]
    ctx_lens = [9, 7, 20, 1, 30]  # decode, full prefill, chunk after context, ...
    S_pad, M = 8, 10
    P = 1 + sum(-(-c // B) for c in ctx_lens) + 3
    pages = rng.permutation(np.arange(1, P))  # page 0 is scratch; the rest in random order
    k_pages = np.zeros((P, B, K, D), np.float32)
    v_pages = np.zeros((P, B, K, D), np.float32)
    page_table = np.zeros((S_pad, M), np.int32)
    ks, vs, used = [], [], 0
    for s, c in enumerate(ctx_lens):
        n = -(-c // B)
        page_table[s, :n] = pages[used:used + n]
        used += n
        k = rng.standard_normal((c, K, D)).astype(np.float32)
        v = rng.standard_normal((c, K, D)).astype(np.float32)
        ks.append(k)
        vs.append(v)
    T_pad = sum(q_lens) + 5
    q = rng.standard_normal((T_pad, H, D)).astype(np.float32)
    # Write every sequence's context through write_kv, as the model does.
    slots, kk, vv = [], [], []
    for s, c in enumerate(ctx_lens):
        pos = np.arange(c)
        slots.append(page_table[s, pos // B] * B + pos % B)
        kk.append(ks[s])
        vv.append(vs[s])
    kp, vp = write_kv(jnp.asarray(k_pages), jnp.asarray(v_pages), np.concatenate(kk), np.concatenate(vv),
                      np.concatenate(slots).astype(np.int32))
    qsl = np.zeros(S_pad + 1, np.int32)
    qsl[1:len(q_lens) + 1] = np.cumsum(q_lens)
    qsl[len(q_lens) + 1:] = qsl[len(q_lens)]
    seq_lens = np.zeros(S_pad, np.int32)
    seq_lens[:len(ctx_lens)] = ctx_lens
    md = AttentionMetadata(slot_mapping=np.zeros(T_pad, np.int32), query_start_loc=qsl,
                           seq_lens=seq_lens, page_table=page_table,
                           num_seqs=np.array([len(q_lens)], np.int32))
    out = np.asarray(paged_attention(q, kp, vp, md, sm_scale=D ** -0.5, sliding_window=window,
                                     soft_cap=soft_cap))
    for s, (ql, c) in enumerate(zip(q_lens, ctx_lens)):
        ref = _naive(q[qsl[s]:qsl[s + 1]].astype(np.float64), ks[s], vs[s], c, ql, D ** -0.5,
                     window, soft_cap)
        got = out[qsl[s]:qsl[s + 1]]
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert err < 1e-5, (s, err)
    assert np.all(out[qsl[len(q_lens)]:] == 0), "padding tokens produce zeros"
    # The blocked path (token blocks through lax.map, T not a multiple of the block) agrees.
    blocked = ragged_paged_attention_reference(
        q, kp, vp, md.seq_lens, md.page_table, md.query_start_loc, md.num_seqs,
        sm_scale=D ** -0.5, sliding_window=window, soft_cap=soft_cap, token_block=8)
    np.testing.assert_allclose(np.asarray(blocked), out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn])
def test_kv_write_with_the_real_token_count_promises_unique_slots_and_drops_padding(
        cache_dtype, monkeypatch):
    """write_kv(num_tokens=n): the real tokens land in their slots exactly as without it,
    padding tokens (all aimed at the scratch page's slot 0 by the runner) write nothing, and
    the scatter promises unique indices (XLA then stores instead of atomic read-modify-writes);
    JAXLLM_KV_WRITE_UNIQUE=0 keeps the plain scatter, and a bad value is refused."""
    import jax

    from jaxllm.models.attention import KV_WRITE_UNIQUE_ENV

    P, B, K, D, T, n = 6, 4, 2, 8, 10, 5
    rng = np.random.default_rng(1)
    pages = jnp.asarray(rng.normal(size=(P, B, K, D)), cache_dtype)  # old contents everywhere
    k = jnp.asarray(rng.normal(size=(T, K, D)), jnp.float32)
    v = -k
    slots = jnp.asarray([13, 5, 22, 6, 12] + [0] * (T - n), jnp.int32)  # shuffled; padding -> 0

    def write(**kw):
        kp, vp = write_kv(pages, pages, k, v, slots, **kw)
        return np.asarray(kp, np.float32).reshape(P * B, K, D), \
            np.asarray(vp, np.float32).reshape(P * B, K, D)

    plain_k, plain_v = write()
    kp, vp = write(num_tokens=jnp.array([n], jnp.int32))
    old = np.asarray(pages, np.float32).reshape(P * B, K, D)
    real = np.asarray(slots[:n])
    np.testing.assert_array_equal(kp[real], plain_k[real])
    np.testing.assert_array_equal(vp[real], plain_v[real])
    np.testing.assert_array_equal(kp[real], np.asarray(k[:n].astype(cache_dtype), np.float32))
    untouched = np.setdiff1d(np.arange(P * B), real)
    np.testing.assert_array_equal(kp[untouched], old[untouched])  # slot 0 too: padding dropped
    assert not np.array_equal(plain_k[0], old[0])  # the plain scatter did write padding there

    def jaxpr():
        return str(jax.make_jaxpr(lambda s, n: write_kv(pages, pages, k, v, s, num_tokens=n))(
            slots, jnp.array([n], jnp.int32)))

    assert jaxpr().count("unique_indices=True") == 2
    monkeypatch.setenv(KV_WRITE_UNIQUE_ENV, "0")
    assert "unique_indices=True" not in jaxpr()
    monkeypatch.setenv(KV_WRITE_UNIQUE_ENV, "yes")
    with pytest.raises(ValueError, match=KV_WRITE_UNIQUE_ENV):
        jaxpr()
