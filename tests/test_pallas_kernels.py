"""Pallas kernels against their jnp references, on CPU through the Pallas interpreter.

Metric: ‖out − ref‖ / ‖ref‖ over the real tokens; padding tokens must be exactly zero.
Tolerances: float32 inputs 1e-5 (both accumulate in float32; only the summation order differs);
bf16 inputs 1e-2 (both round the softmax probabilities to bf16 for the P·V dot, but at different
points of the online softmax, rescaled by different running maxima: ~2^-9 per term).
Each configuration compiles once (interpretation compiles the whole grid loop: ~5-10 s here) and
is then checked on several fresh random batches of the same static shapes.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8_matmul import (
    E4M3_MAX,
    fp8_block_matmul_reference,
    fp8_matmul,
    fp8_matmul_reference,
    fp8_matmul_xla,
    quantize_activation_per_tensor,
    quantize_activation_per_token,
    quantize_weight_per_channel,
    quantize_weight_per_tensor,
)
from pallas_kernels.ragged_paged_attention import (
    DECODE_TABLE,
    DECODE_TABLE_FP8,
    KERNEL_TABLE_FP8_SOURCE,
    KERNEL_TABLE_SOURCE,
    PREFILL_TABLE,
    decode_block_config,
    prefill_block_config,
    ragged_paged_attention,
    ragged_paged_attention_reference,
)

REPO = Path(__file__).resolve().parents[1]


def _rel_err(out, ref):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    assert np.all(np.isfinite(out))
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def _random_batch(rng, *, kinds, T, S, M, B, P, H, K, D, dtype):
    """A ragged batch of the given sequence kinds in fixed static shapes, pages in random order.

    kinds: "decode" (q_len 1 after context), "prefill" (whole prompt), "chunk" (prefill chunk after
    context). Unused page-table entries and unused pages hold random ids / random data, so any
    read the masks fail to exclude shows up in the error.
    """
    L = M * B
    q_lens, ctx_lens = [], []
    budget = T
    for i, kind in enumerate(kinds):
        avail = budget - (len(kinds) - i - 1)  # leave a token for every later sequence
        if kind == "decode":
            ql, c = 1, int(rng.integers(1, L + 1))
        elif kind == "prefill":
            ql = int(rng.integers(min(2, avail), min(avail, L) + 1))
            c = ql
        else:
            ql = int(rng.integers(min(2, avail), min(avail, L - 1) + 1))
            c = int(rng.integers(ql + 1, L + 1))
        budget -= ql
        q_lens.append(ql)
        ctx_lens.append(max(c, ql))
    n = len(kinds)
    need = sum(-(-c // B) for c in ctx_lens)
    assert need <= P - 1, "grow P"
    pages = rng.permutation(np.arange(1, P))
    page_table = rng.integers(0, P, (S, M)).astype(np.int32)
    page_table[n:] = 0
    used = 0
    for s, c in enumerate(ctx_lens):
        k = -(-c // B)
        page_table[s, :k] = pages[used:used + k]
        used += k
    qsl = np.zeros(S + 1, np.int32)
    qsl[1:n + 1] = np.cumsum(q_lens)
    qsl[n + 1:] = qsl[n]
    seq_lens = np.zeros(S, np.int32)
    seq_lens[:n] = ctx_lens
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    k_pages = rng.standard_normal((P, B, K, D)).astype(np.float32)
    v_pages = rng.standard_normal((P, B, K, D)).astype(np.float32)
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return (cast(q), cast(k_pages), cast(v_pages), jnp.asarray(seq_lens), jnp.asarray(page_table),
            jnp.asarray(qsl), jnp.asarray([n], np.int32)), int(qsl[n])


def _check_attention(seed, kinds_list, *, H, K, dtype, tol, T=24, S=6, M=6, B=8, D=32,
                     sliding_window=None, soft_cap=None, **knobs):
    P = S * M + 2
    sm_scale = D ** -0.5
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    kernel = jax.jit(functools.partial(ragged_paged_attention, interpret=True, **kw, **knobs))
    ref_fn = jax.jit(functools.partial(ragged_paged_attention_reference, **kw))
    rng = np.random.default_rng(seed)
    for kinds in kinds_list:
        args, n_real = _random_batch(rng, kinds=kinds, T=T, S=S, M=M, B=B, P=P, H=H, K=K, D=D,
                                     dtype=dtype)
        out = np.asarray(kernel(*args).astype(jnp.float32))
        ref = np.asarray(ref_fn(*args).astype(jnp.float32))
        err = _rel_err(out[:n_real], ref[:n_real])
        assert err < tol, (kinds, err)
        assert np.all(out[n_real:] == 0.0), "padding tokens must produce zeros"


MIXED = [("decode", "chunk", "decode", "prefill"), ("prefill", "decode"),
         ("chunk", "chunk", "decode", "decode", "decode")]


def test_mixed_ragged_batches_match_reference_f32_mha():
    _check_attention(0, MIXED, H=4, K=4, dtype=jnp.float32, tol=1e-5, block_q=4,
                     pages_per_block=2, decode_pages_per_block=2, decode_splits=3)


def test_mixed_ragged_batches_match_reference_f32_gqa4_sliding_window():
    _check_attention(1, MIXED, H=8, K=2, dtype=jnp.float32, tol=1e-5, sliding_window=11,
                     block_q=4, pages_per_block=2, decode_pages_per_block=2, decode_splits=2)


def test_soft_cap_and_bf16_inputs_match_reference_gqa4():
    _check_attention(2, MIXED, H=8, K=2, dtype=jnp.bfloat16, tol=1e-2, soft_cap=5.0,
                     block_q=8, pages_per_block=1, decode_pages_per_block=1, decode_splits=4)


def test_decode_only_batches_with_split_context_match_reference():
    decode = [("decode",) * 6, ("decode",) * 3]
    _check_attention(3, decode, H=8, K=2, dtype=jnp.float32, tol=1e-5, prefill=False,
                     decode_pages_per_block=1, decode_splits=4)


def test_decode_only_fast_path_matches_reference_with_fewer_slots_than_tokens():
    # decode_only: rows of the decode launch are the output as they are (token t = slot t),
    # including buckets with more token rows than sequence slots (T > S) and partly full ones.
    decode = [("decode",) * 6, ("decode",) * 2, ("decode",)]
    _check_attention(5, decode, H=8, K=2, dtype=jnp.float32, tol=1e-5, T=10, S=6,
                     decode_only=True, decode_pages_per_block=2, decode_splits=3)
    _check_attention(6, decode[1:], H=4, K=4, dtype=jnp.bfloat16, tol=1e-2, T=6, S=6,
                     decode_only=True, sliding_window=9, soft_cap=4.0)


def test_decode_spread_gives_the_padding_slots_programs_to_the_live_sequences(monkeypatch):
    # decode_spread (decode_only): slot b's programs work on live sequence b mod n (n live of
    # S = 6 slots: 6, 4 (slots 4, 5 help sequences 0, 1 only), 2 and 1), each taking its own
    # share of the context's splits; the combine merges every slot's partials into its
    # sequence's row. A split counted twice or left out moves the softmax off the reference.
    decode = [("decode",) * 6, ("decode",) * 4, ("decode",) * 2, ("decode",)]
    _check_attention(7, decode, H=8, K=2, dtype=jnp.float32, tol=1e-5, T=10, S=6,
                     decode_only=True, decode_pages_per_block=1, decode_splits=3,
                     decode_spread=True)
    _check_attention(8, decode[1:], H=8, K=2, dtype=jnp.bfloat16, tol=1e-2, T=6, S=6,
                     decode_only=True, sliding_window=9, soft_cap=4.0, decode_splits=2,
                     decode_pages_per_block=1, decode_split_pages=True,
                     decode_heads_per_program=2, decode_spread=True)
    # It is the spread launch that ran (its combine), and only with decode_only.
    import pallas_kernels.ragged_paged_attention as rpa

    rng = np.random.default_rng(9)
    args, _ = _random_batch(rng, kinds=("decode",), T=6, S=6, M=6, B=8, P=38, H=8, K=2, D=32,
                            dtype=jnp.float32)
    calls, real = [], rpa._spread_combine
    monkeypatch.setattr(rpa, "_spread_combine",
                        lambda *a, **k: calls.append(k["nb"]) or real(*a, **k))
    for decode_only in (True, False):
        ragged_paged_attention(*args, sm_scale=1.0, interpret=True, decode_splits=2,
                               decode_spread=True, decode_only=decode_only)
    assert calls == [6]


def test_decode_single_spreads_one_live_sequence_over_every_slots_programs(monkeypatch):
    # decode_single (decode_only, one live sequence in slot 0): every slot's programs take
    # splits of that sequence, statically, and one combine merges all of them; the padding
    # slots' rows are zeros. Against the reference, plain and with split pages / two heads a
    # program; a split counted twice or left out moves the softmax off it.
    one = [("decode",)]
    _check_attention(10, one, H=8, K=2, dtype=jnp.float32, tol=1e-5, T=10, S=6,
                     decode_only=True, decode_pages_per_block=1, decode_splits=3,
                     decode_single=True)
    _check_attention(11, one, H=8, K=2, dtype=jnp.bfloat16, tol=1e-2, T=6, S=6,
                     decode_only=True, sliding_window=9, soft_cap=4.0, decode_splits=2,
                     decode_pages_per_block=1, decode_split_pages=True,
                     decode_heads_per_program=2, decode_single=True)
    import pallas_kernels.ragged_paged_attention as rpa

    args, _ = _random_batch(np.random.default_rng(12), kinds=("decode",), T=6, S=6, M=6, B=8,
                            P=38, H=8, K=2, D=32, dtype=jnp.float32)
    calls, real = [], rpa._single_combine
    monkeypatch.setattr(rpa, "_single_combine",
                        lambda *a, **k: calls.append(k["nb"]) or real(*a, **k))
    out = ragged_paged_attention(*args, sm_scale=1.0, interpret=True, decode_splits=2,
                                 decode_single=True, decode_only=True)
    assert calls == [6]
    assert np.all(np.asarray(out[1:]) == 0.0)


@pytest.mark.parametrize("seed,cache,tol,knobs", [
    (0, jnp.float32, 1e-5, dict(decode_pages_per_block=2, decode_splits=3)),
    (1, jnp.bfloat16, 1e-2, dict(sliding_window=9, soft_cap=4.0)),
    (2, jnp.float32, 1e-5, dict(decode_pages_per_block=1, decode_splits=4,
                                decode_split_pages=True, masked_tail_only=True)),
    (3, jnp.float8_e4m3fn, 2e-2, dict(decode_pages_per_block=2, decode_splits=2)),
])
def test_fused_kv_write_decode_equals_write_then_attend(seed, cache, tol, knobs):
    # new_kv: the decode kernel attends to the new tokens' K/V from registers and writes them
    # into their slots. Their slots hold stale random data until then, so a kernel that read
    # them from the pages instead would be far off; the pages must come back exactly as the
    # scatter leaves them (padding tokens write nothing).
    T, S, M, B, H, K, D = 10, 6, 6, 8, 8, 2, 32
    P = S * M + 2
    rng = np.random.default_rng(40 + seed)
    kw = {k: knobs.pop(k) for k in ("sliding_window", "soft_cap") if k in knobs}
    for n in (6, 3, 1):
        args, _ = _random_batch(rng, kinds=("decode",) * n, T=T, S=S, M=M, B=B, P=P, H=H, K=K,
                                D=D, dtype=jnp.float32)
        q, kp, vp, sl, pt, qsl, ns = args
        q = q.astype(jnp.bfloat16 if cache == jnp.float8_e4m3fn else cache)
        kp, vp = kp.astype(cache), vp.astype(cache)
        k_new = jnp.asarray(rng.standard_normal((T, K, D)), jnp.float32).astype(cache)
        v_new = jnp.asarray(rng.standard_normal((T, K, D)), jnp.float32).astype(cache)
        sl_np, pt_np = np.asarray(sl), np.asarray(pt)
        slots = np.zeros(T, np.int32)  # padding tokens: the scratch slot (never written here)
        pos = sl_np[:n] - 1
        slots[:n] = pt_np[np.arange(n), pos // B] * B + pos % B
        want_k = kp.reshape(P * B, K, D).at[slots[:n]].set(k_new[:n]).reshape(P, B, K, D)
        want_v = vp.reshape(P * B, K, D).at[slots[:n]].set(v_new[:n]).reshape(P, B, K, D)
        want = ragged_paged_attention_reference(q, want_k, want_v, sl, pt, qsl, ns,
                                                sm_scale=D ** -0.5, **kw)
        got, got_k, got_v = jax.jit(functools.partial(
            ragged_paged_attention, sm_scale=D ** -0.5, decode_only=True, interpret=True,
            **kw, **knobs))(q, kp, vp, sl, pt, qsl, ns, new_kv=(k_new, v_new, jnp.asarray(slots)))
        assert _rel_err(got[:n], want[:n]) < tol, n
        assert np.all(np.asarray(got[n:].astype(jnp.float32)) == 0.0)
        np.testing.assert_array_equal(np.asarray(got_k.astype(jnp.float32)),
                                      np.asarray(want_k.astype(jnp.float32)))
        np.testing.assert_array_equal(np.asarray(got_v.astype(jnp.float32)),
                                      np.asarray(want_v.astype(jnp.float32)))


@pytest.mark.parametrize("hp,H,K,dtype,tol,window,cap,knobs", [
    (2, 8, 2, jnp.float32, 1e-5, None, None, dict(decode_pages_per_block=2, decode_splits=3)),
    (4, 16, 4, jnp.float32, 1e-5, 13, None, dict(decode_pages_per_block=1, decode_splits=1)),
    (2, 8, 4, jnp.bfloat16, 1e-2, None, 5.0, dict(decode_pages_per_block=2, decode_splits=2,
                                                    masked_tail_only=True)),
    (2, 4, 4, jnp.float32, 1e-5, None, None, dict(decode_pages_per_block=4, decode_splits=7,
                                                    decode_split_pages=True)),
])
def test_decode_heads_per_program_match_reference(hp, H, K, dtype, tol, window, cap, knobs):
    # hp KV heads a decode program: block-diagonal q rows over the hp heads' adjacent K/V
    # columns. Every row must get its own head's scores and values (a mix-up between heads is
    # far off on random data), in mixed batches (the prefill launch keeps one head a program),
    # over splits, windows, soft caps, and with G = 1 (H == K: 2 rows of 16 real).
    kinds = MIXED + [("decode",) * 6, ("decode",) * 2]
    _check_attention(30 + hp, kinds, H=H, K=K, dtype=dtype, tol=tol, T=32, S=6, M=8, B=8,
                     sliding_window=window, soft_cap=cap, decode_heads_per_program=hp, **knobs)


def test_decode_heads_per_program_over_fp8_pages_and_with_the_fused_kv_write():
    # fp8 pages (float16 dots) and the K/V write fused into the decode kernel, two heads a
    # program: the same result as one head a program, and the same pages written.
    T, S, M, B, H, K, D = 8, 6, 6, 8, 8, 4, 32
    P = S * M + 2
    rng = np.random.default_rng(44)
    args, _ = _random_batch(rng, kinds=("decode",) * 5, T=T, S=S, M=M, B=B, P=P, H=H, K=K, D=D,
                            dtype=jnp.float32)
    q, kp, vp, sl, pt, qsl, ns = args
    q = q.astype(jnp.bfloat16)
    kp, vp = kp.astype(jnp.float8_e4m3fn), vp.astype(jnp.float8_e4m3fn)
    k_new = jnp.asarray(rng.standard_normal((T, K, D)), jnp.float8_e4m3fn)
    v_new = jnp.asarray(rng.standard_normal((T, K, D)), jnp.float8_e4m3fn)
    pos = np.asarray(sl)[:5] - 1
    slots = np.zeros(T, np.int32)
    slots[:5] = np.asarray(pt)[np.arange(5), pos // B] * B + pos % B
    run = lambda **kw: jax.jit(functools.partial(  # noqa: E731
        ragged_paged_attention, sm_scale=D ** -0.5, decode_only=True, interpret=True,
        decode_pages_per_block=2, decode_splits=2, **kw))(
            q, kp, vp, sl, pt, qsl, ns, new_kv=(k_new, v_new, jnp.asarray(slots)))
    one, one_k, one_v = run()
    two, two_k, two_v = run(decode_heads_per_program=2)
    assert _rel_err(two[:5].astype(jnp.float32), one[:5].astype(jnp.float32)) < 1e-2
    assert np.all(np.asarray(two[5:].astype(jnp.float32)) == 0.0)
    for got, want in ((two_k, one_k), (two_v, one_v)):
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)),
                                      np.asarray(want.astype(jnp.float32)))
    plain = ragged_paged_attention(q, kp, vp, sl, pt, qsl, ns, sm_scale=D ** -0.5,
                                   decode_heads_per_program=2, interpret=True)
    assert _rel_err(plain[:5].astype(jnp.float32), ragged_paged_attention_reference(
        q, kp, vp, sl, pt, qsl, ns, sm_scale=D ** -0.5)[:5].astype(jnp.float32)) < 2e-2
    with pytest.raises(ValueError, match="decode_heads_per_program 3 must divide the 4 KV"):
        ragged_paged_attention(q, kp, vp, sl, pt, qsl, ns, sm_scale=D ** -0.5,
                               decode_heads_per_program=3, interpret=True)


@pytest.mark.parametrize("seed,cache,tol,scales,knobs,parts,norm", [
    (0, jnp.float32, 1e-5, (1.0, 1.0), dict(decode_pages_per_block=2, decode_splits=3,
                                            sliding_window=9), 1, False),
    (1, jnp.bfloat16, 1e-2, (1.0, 1.0), dict(decode_pages_per_block=1, decode_splits=2,
                                             decode_heads_per_program=2), 1, False),
    (2, jnp.float8_e4m3fn, 2e-2, (0.5, 2.0), dict(decode_pages_per_block=2, decode_splits=2), 1,
     False),
    (3, jnp.bfloat16, 1e-2, (1.0, 1.0), dict(decode_pages_per_block=1, decode_splits=2,
                                             decode_heads_per_program=2), 4, False),
    (4, jnp.float8_e4m3fn, 2e-2, (0.5, 2.0), dict(decode_pages_per_block=2, decode_splits=2), 2,
     False),
    (5, jnp.float32, 1e-5, (1.0, 1.0), dict(decode_pages_per_block=2, decode_splits=2), 1, True),
    (6, jnp.bfloat16, 1e-2, (1.0, 1.0), dict(decode_pages_per_block=1, decode_splits=2,
                                             decode_heads_per_program=2), 4, True),
    (7, jnp.float8_e4m3fn, 2e-2, (0.5, 2.0), dict(decode_pages_per_block=2, decode_splits=2), 2,
     True),
    (8, jnp.bfloat16, 1e-2, (1.0, 1.0), dict(decode_pages_per_block=1, decode_splits=2,
                                             decode_heads_per_program=2, decode_spread=True), 4,
     True),
    (9, jnp.float8_e4m3fn, 2e-2, (0.5, 2.0), dict(decode_pages_per_block=2, decode_splits=2,
                                                  decode_spread=True), 1, False),
    (10, jnp.float32, 1e-5, (1.0, 1.0), dict(decode_pages_per_block=1, decode_splits=3,
                                             decode_combine="unrolled"), 4, True),
    (13, jnp.bfloat16, 1e-2, (1.0, 1.0), dict(decode_pages_per_block=1, decode_splits=2,
                                              decode_single=True), 4, True),
    (15, jnp.float32, 1e-5, (1.0, 1.0), dict(decode_pages_per_block=1, decode_splits=3,
                                             decode_single=True, decode_combine="unrolled"), 4,
     True),
    (14, jnp.float8_e4m3fn, 2e-2, (0.5, 2.0), dict(decode_pages_per_block=2, decode_splits=2,
                                                   decode_single=True), 1, False),
])
def test_decode_with_rope_from_the_qkv_output_equals_rope_write_then_attend(seed, cache, tol,
                                                                           scales, knobs, parts,
                                                                           norm):
    # qkv_rope: the decode kernel takes the fused q/k/v projection's output before rope
    # ([T, K, (G + 2) * D]), rotates the query heads and the new key itself, converts the new
    # K/V to the cache (scaled for fp8) and writes them, from each token's rope angles. Against
    # the model's own apply_rope, the cache conversion and the reference attention over the
    # written pages; positions up to ~60 and random inverse frequencies, so a wrong half, sign,
    # angle or token is far off. parts > 1: the kernel gets the projection's split-K partial
    # products (float32) instead, sums them and rounds the sum to the model dtype itself.
    # norm: the layer's RMSNorm folded in (qkv_norm): the given q/k/v are those of x * g, and
    # the kernel scales each token's by rsqrt(mean(x^2) + eps) from x's row (E = 40: a masked
    # load), so the reference takes the scaled projection.
    from jaxllm.models.attention import _to_cache
    from jaxllm.models.llama import apply_rope

    T, S, M, B, H, K, D = 10, 6, 6, 8, 8, 2, 32
    G, P = H // K, S * M + 2
    rng = np.random.default_rng(50 + seed)
    model_dtype = jnp.bfloat16 if cache == jnp.float8_e4m3fn else cache
    inv_freq = jnp.asarray(rng.uniform(0.01, 1.0, D // 2), jnp.float32)
    window = {k: knobs.pop(k) for k in ("sliding_window",) if k in knobs}
    # decode_spread: the padding slots' programs work for the live sequences; the new K/V is
    # still written once (by split 0), so the pages must come out the same.
    lives = (1,) if knobs.get("decode_single") else (
        (6, 2) + ((1,) if knobs.get("decode_spread") else ()))
    for n in lives:
        args, _ = _random_batch(rng, kinds=("decode",) * n, T=T, S=S, M=M, B=B, P=P, H=H, K=K,
                                D=D, dtype=jnp.float32)
        _, kp, vp, sl, pt, qsl, ns = args
        kp, vp = kp.astype(cache), vp.astype(cache)
        partials = jnp.asarray(rng.standard_normal((parts, T, K, (G + 2) * D)) / parts ** 0.5,
                               jnp.float32)
        qkv = jnp.sum(partials, axis=0).astype(model_dtype)
        given = qkv if parts == 1 else partials.reshape(parts * T, K, (G + 2) * D)
        statics = {} if parts == 1 else dict(qkv_parts=parts, qkv_dtype=model_dtype)
        if norm:
            x = jnp.asarray(rng.standard_normal((T, 40)) * rng.uniform(0.2, 5, (T, 1)),
                            model_dtype)
            xf = x.astype(jnp.float32)
            r = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1) + 1e-5)
            statics["qkv_norm"] = (x, 1e-5)
            qkv = ((qkv.astype(jnp.float32) if parts == 1 else jnp.sum(partials, axis=0))
                   * r[:, None, None]).astype(model_dtype)
        sl_np, pt_np = np.asarray(sl), np.asarray(pt)
        pos = np.zeros(T, np.int32)
        pos[:n] = sl_np[:n] - 1
        slots = np.zeros(T, np.int32)
        slots[:n] = pt_np[np.arange(n), pos[:n] // B] * B + pos[:n] % B
        angles = jnp.asarray(pos, jnp.float32)[:, None] * inv_freq[None, :]
        q = apply_rope(qkv[:, :, :G * D].reshape(T, H, D), jnp.asarray(pos), inv_freq)
        k = apply_rope(qkv[:, :, G * D:(G + 1) * D], jnp.asarray(pos), inv_freq)
        v = qkv[:, :, (G + 1) * D:]
        want_k = kp.reshape(P * B, K, D).at[slots[:n]].set(
            _to_cache(k[:n], cache, scales[0])).reshape(P, B, K, D)
        want_v = vp.reshape(P * B, K, D).at[slots[:n]].set(
            _to_cache(v[:n], cache, scales[1])).reshape(P, B, K, D)
        # The caller folds an fp8 cache's scales out (write_kv_and_attend): k_scale into
        # sm_scale, v_scale onto the output.
        sm = D ** -0.5 * (scales[0] if cache == jnp.float8_e4m3fn else 1.0)
        got, got_k, got_v = jax.jit(functools.partial(
            ragged_paged_attention, sm_scale=sm, decode_only=True, interpret=True,
            qkv_rope=(angles, *scales), **knobs, **window, **statics))(
                given, kp, vp, sl, pt, qsl, ns, new_kv=(None, None, jnp.asarray(slots)))
        assert got.shape == (T, H, D) and got.dtype == model_dtype
        # The pages as the rope-then-scatter path leaves them (float32: exactly; bf16 / fp8:
        # a value or two one rounding apart, cos / sin being another implementation's).
        for g_, w_ in ((got_k, want_k), (got_v, want_v)):
            g_, w_ = np.asarray(g_.astype(jnp.float32)), np.asarray(w_.astype(jnp.float32))
            if cache == jnp.float32:
                np.testing.assert_allclose(g_, w_, rtol=1e-6, atol=1e-6)
            else:
                assert (g_ != w_).mean() < 1e-3
                np.testing.assert_allclose(g_, w_, rtol=0.13, atol=1e-2)
        if cache == jnp.float8_e4m3fn:  # the scales fold out as in paged_attention
            want = ragged_paged_attention_reference(
                q, want_k, want_v, sl, pt, qsl, ns, sm_scale=D ** -0.5 * scales[0], **window
            ).astype(jnp.float32) * scales[1]
            got = got.astype(jnp.float32) * scales[1]
        else:
            want = ragged_paged_attention_reference(q, want_k, want_v, sl, pt, qsl, ns,
                                                    sm_scale=D ** -0.5, **window)
        assert _rel_err(got[:n], want[:n]) < tol, n
        assert np.all(np.asarray(got[n:].astype(jnp.float32)) == 0.0)
    if norm:  # the folded norm needs the rope path, and one row of x per token
        with pytest.raises(ValueError, match="qkv_norm needs qkv_rope"):
            ragged_paged_attention(qkv[:, :, :D].reshape(T, K, D), kp, vp, sl, pt, qsl, ns,
                                   sm_scale=1.0, interpret=True, qkv_norm=(x, 1e-5))
        with pytest.raises(ValueError, match="qkv_norm's x must be"):
            ragged_paged_attention(given, kp, vp, sl, pt, qsl, ns, sm_scale=1.0,
                                   decode_only=True, interpret=True,
                                   new_kv=(None, None, jnp.asarray(slots)),
                                   qkv_rope=(angles, *scales), qkv_norm=(x[:3], 1e-5),
                                   **{k: v for k, v in statics.items() if k != "qkv_norm"})
    with pytest.raises(ValueError, match="qkv_rope needs new_kv"):
        ragged_paged_attention(qkv, kp, vp, sl, pt, qsl, ns, sm_scale=1.0, decode_only=True,
                               interpret=True, qkv_rope=(angles, 1.0, 1.0))
    with pytest.raises(ValueError, match="with qkv_rope, q must be"):
        ragged_paged_attention(qkv[:, :, :2 * D], kp, vp, sl, pt, qsl, ns, sm_scale=1.0,
                               decode_only=True, interpret=True,
                               new_kv=(None, None, jnp.asarray(slots)),
                               qkv_rope=(angles, 1.0, 1.0))
    if parts > 1:
        for bad, match in ((dict(qkv_parts=parts), "qkv_parts > 1 needs qkv_dtype"),
                           (dict(qkv_parts=3, qkv_dtype=model_dtype), "qkv_parts must be")):
            with pytest.raises(ValueError, match=match):
                ragged_paged_attention(given, kp, vp, sl, pt, qsl, ns, sm_scale=1.0,
                                       decode_only=True, interpret=True,
                                       new_kv=(None, None, jnp.asarray(slots)),
                                       qkv_rope=(angles, 1.0, 1.0), **bad)
        with pytest.raises(ValueError, match="qkv_parts needs qkv_rope"):
            ragged_paged_attention(qkv[:, :, :G * D].reshape(T, H, D), kp, vp, sl, pt, qsl, ns,
                                   sm_scale=1.0, interpret=True, qkv_parts=parts)


def test_fused_kv_write_needs_decode_only_and_cache_dtype_inputs():
    args, _ = _random_batch(np.random.default_rng(0), kinds=("decode",), T=4, S=2, M=2, B=8,
                            P=6, H=4, K=2, D=32, dtype=jnp.float32)
    kv = jnp.zeros((4, 2, 32), jnp.float32)
    new_kv = (kv, kv, jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="needs decode_only"):
        ragged_paged_attention(*args, sm_scale=1.0, new_kv=new_kv, interpret=True)
    with pytest.raises(ValueError, match="cache dtype"):
        ragged_paged_attention(*args, sm_scale=1.0, decode_only=True, interpret=True,
                               new_kv=(kv.astype(jnp.bfloat16), kv, new_kv[2]))
    with pytest.raises(ValueError, match=r"\[T, K, D\]"):
        ragged_paged_attention(*args, sm_scale=1.0, decode_only=True, interpret=True,
                               new_kv=(kv[:3], kv, new_kv[2]))


def test_decode_only_needs_the_decode_launch():
    args, _ = _random_batch(np.random.default_rng(0), kinds=("decode",), T=4, S=2, M=2, B=8,
                            P=6, H=4, K=2, D=32, dtype=jnp.float32)
    with pytest.raises(ValueError, match="decode_only"):
        ragged_paged_attention(*args, sm_scale=1.0, decode=False, decode_only=True,
                               interpret=True)


def test_prefill_and_chunked_prefill_only_batches_match_reference():
    # decode=False: the prefill launch alone serves every sequence, q_len 1 included.
    kinds = [("prefill", "prefill"), ("chunk", "chunk", "chunk"), ("chunk", "decode")]
    _check_attention(4, kinds, H=8, K=2, dtype=jnp.float32, tol=1e-5, decode=False, block_q=2,
                     pages_per_block=2)


def _mixed_batch_with_metadata(seed):
    """q, k_pages, v_pages and the AttentionMetadata of a random chunk + decode + prefill batch."""
    from jaxllm.models.attention import AttentionMetadata

    (q, kp, vp, sl, pt, qsl, ns), _ = _random_batch(
        np.random.default_rng(seed), kinds=("chunk", "decode", "prefill"), T=24, S=6, M=6, B=8,
        P=40, H=8, K=2, D=32, dtype=jnp.float32)
    md = AttentionMetadata(slot_mapping=jnp.zeros(24, jnp.int32), query_start_loc=qsl,
                           seq_lens=sl, page_table=pt, num_seqs=ns)
    return q, kp, vp, md


def test_decode_single_and_decode_combine_knobs_reach_the_decode_only_kernel(monkeypatch):
    # JAXLLM_ATTENTION_KNOBS='{"decode_single": true, "decode_combine": "unrolled", ...}' in a
    # decode-only step of one live sequence: the static spread launch runs (its name ends in
    # _sp1), with the same result as the reference; without the knobs it does not.
    from jaxllm.models.attention import (ATTENTION_KNOBS_ENV, AttentionMetadata,
                                         paged_attention)

    (q, kp, vp, sl, pt, qsl, ns), _ = _random_batch(
        np.random.default_rng(21), kinds=("decode",), T=6, S=6, M=6, B=8, P=40, H=8, K=2,
        D=32, dtype=jnp.float32)
    md = AttentionMetadata(slot_mapping=jnp.zeros(6, jnp.int32), query_start_loc=qsl,
                           seq_lens=sl, page_table=pt, num_seqs=ns, decode_only=True)

    def attend():  # a new function each time: a traced one is cached with the old knobs
        return functools.partial(paged_attention, sm_scale=0.2, backend="pallas")

    def names():
        return set(re.findall(r"ragged_paged_attention_bq\d+_ppb\d+_ns\d+\w*",
                              str(jax.make_jaxpr(attend())(q, kp, vp, md))))

    monkeypatch.delenv(ATTENTION_KNOBS_ENV, raising=False)
    assert not any(n.endswith("_sp1") for n in names())
    monkeypatch.setenv(ATTENTION_KNOBS_ENV, '{"decode_single": true, "decode_splits": 2, '
                                            '"decode_pages_per_block": 1, '
                                            '"decode_combine": "unrolled"}')
    assert any(n.endswith("_sp1") for n in names())
    want = paged_attention(q, kp, vp, md, sm_scale=0.2, backend="reference")
    assert _rel_err(jax.jit(attend())(q, kp, vp, md)[:1], want[:1]) < 1e-5


def test_paged_attention_pallas_backend_matches_reference_backend():
    from jaxllm.models.attention import paged_attention

    q, kp, vp, md = _mixed_batch_with_metadata(5)
    attend = jax.jit(paged_attention, static_argnames=("sm_scale", "backend"))
    got = attend(q, kp, vp, md, sm_scale=0.2, backend="pallas")
    want = attend(q, kp, vp, md, sm_scale=0.2, backend="reference")
    assert _rel_err(got, want) < 1e-5


def test_attention_knobs_from_the_environment_reach_the_kernel_and_bad_ones_are_refused(
        monkeypatch):
    from jaxllm.models.attention import ATTENTION_KNOBS_ENV, paged_attention

    q, kp, vp, md = _mixed_batch_with_metadata(6)

    def traced(backend="pallas"):
        f = functools.partial(paged_attention, sm_scale=0.2, backend=backend)
        jaxpr = str(jax.make_jaxpr(f)(q, kp, vp, md))
        return set(re.findall(r"ragged_paged_attention_bq\d+_ppb\d+_ns\d+\w*", jaxpr))

    monkeypatch.delenv(ATTENTION_KNOBS_ENV, raising=False)
    table = traced()
    monkeypatch.setenv(ATTENTION_KNOBS_ENV, '{"decode_splits": 3, "block_q": 2, '
                                            '"masked_tail_only": true, '
                                            '"decode_heads_per_program": 2}')
    knobbed = traced()
    assert knobbed != table  # a new trace, not the cached one of the table's knobs
    assert "ragged_paged_attention_bq1_ppb8_ns3_mt_hp2" in knobbed
    assert any(n.startswith("ragged_paged_attention_bq2_") for n in knobbed)
    # Same result as the reference with the knobs on.
    got = jax.jit(paged_attention, static_argnames=("sm_scale", "backend"))(
        q, kp, vp, md, sm_scale=0.2, backend="pallas")
    want = paged_attention(q, kp, vp, md, sm_scale=0.2, backend="reference")
    assert _rel_err(got, want) < 1e-5
    for bad, match in [('{"decode_splitz": 2}', "unknown kernel knobs.*decode_splitz"),
                       ("[2]", "must be a JSON object"), ("{nope", "must be a JSON object"),
                       ('{"decode_splits": 0}', "decode_splits must be a positive integer"),
                       ('{"decode_splits": 2.5}', "decode_splits must be a positive integer"),
                       ('{"masked_tail_only": "yes"}', "masked_tail_only must be true or false"),
                       ('{"fp8_kv_dot": "bf8"}', "fp8_kv_dot must be one of"),
                       ('{"decode_combine": "tree"}', "decode_combine must be one of")]:
        monkeypatch.setenv(ATTENTION_KNOBS_ENV, bad)
        with pytest.raises(ValueError, match=match):
            traced()
    assert traced("reference") == set()  # the reference backend has no knobs to take



def test_fused_qkv_rope_and_qkv_split_k_defaults_for_small_decode_steps_and_their_knobs(
        monkeypatch):
    # Small decode-only steps of the Pallas backend take rope + the K/V write inside the
    # decode kernel unless the knob says false; larger steps only when it says true; prefill,
    # mixed steps and the reference backend never.
    import dataclasses

    from jaxllm.models.attention import (ATTENTION_KNOBS_ENV, QKV_ROPE_MAX_TOKENS,
                                         QKV_SPLIT_K_DEFAULT, QKV_SPLIT_K_MAX_TOKENS,
                                         qkv_rope_applies, qkv_split_k_parts)

    md = _mixed_batch_with_metadata(1)[3]
    decode = dataclasses.replace(md, decode_only=True)
    small, large = QKV_ROPE_MAX_TOKENS, QKV_ROPE_MAX_TOKENS + 1
    for knobs, want_small, want_large in (("", True, False), ('{"fused_qkv_rope": false}',
                                          False, False), ('{"fused_qkv_rope": true}', True, True)):
        monkeypatch.setenv(ATTENTION_KNOBS_ENV, knobs)
        assert qkv_rope_applies("pallas", decode, small) is want_small, knobs
        assert qkv_rope_applies("pallas", decode, large) is want_large, knobs
        assert not qkv_rope_applies("pallas", md, 1)  # not decode-only
        assert not qkv_rope_applies("reference", decode, 1)
    # Those steps' q/k/v GEMM hands the kernel its split-K partials: by default at <= 16
    # tokens, as many as the qkv_split_k knob says (1: its output as is).
    for knobs, want in (("", QKV_SPLIT_K_DEFAULT), ('{"qkv_split_k": 1}', 1),
                        ('{"qkv_split_k": 2}', 2)):
        monkeypatch.setenv(ATTENTION_KNOBS_ENV, knobs)
        assert qkv_split_k_parts(QKV_SPLIT_K_MAX_TOKENS) == want
        assert qkv_split_k_parts(QKV_SPLIT_K_MAX_TOKENS + 1) == 1

@pytest.mark.slow
@pytest.mark.parametrize("H,K", [(4, 4), (8, 2), (12, 4)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("window,cap", [(None, None), (13, None), (None, 8.0), (7, 3.0)])
def test_attention_sweep_matches_reference(H, K, dtype, tol, window, cap):
    kinds = MIXED + [("decode",) * 5, ("prefill",), ("chunk",) * 4]
    _check_attention(6, kinds, H=H, K=K, dtype=dtype, tol=tol, sliding_window=window,
                     soft_cap=cap, T=40, S=8, M=8, B=8, block_q=4, pages_per_block=2,
                     decode_pages_per_block=2, decode_splits=3)


# ---------------------------------------------------------------------------------------------
# Block-size table: lookups, overrides, and the kernel at the configurations the table picks.
# ---------------------------------------------------------------------------------------------

def test_block_table_lookup_returns_the_measured_entries_by_shape_class():
    def dec(S, M, B):
        c = decode_block_config(S, M, B)
        return c["decode_pages_per_block"], c["decode_splits"]

    # The sweep's own shapes (page size 16: M = context / 16).
    assert dec(8, 4096 // 16, 16) == (8, 5)
    assert dec(1, 32768 // 16, 16) == (8, 33)
    assert dec(64, 4096 // 16, 16) == (4, 1)
    assert dec(256, 512 // 16, 16) == (8, 1)
    assert dec(8, 32768 // 16, 16) == (4, 8)
    # Other shapes take the smallest class at or above them: 5 slots -> batch 8, 1,000 context
    # tokens (125 pages of 8) -> 4k.
    assert dec(5, 125, 8) == (8, 5)
    assert dec(9, 2048 // 16, 16) == (4, 1)  # batch 64, context 4k
    # Past the largest class: the largest; batch 256 has no 32k row: its nearest context (4k).
    assert dec(1024, 65536 // 16, 16) == (8, 2)
    # Splits never exceed the key blocks of the class: 40 pages in blocks of 8 -> 5 (of 32).
    assert dec(1, 40, 16) == (8, 5)
    assert dec(2, 4, 16) == (8, 1)  # batch 8 x 512 class (8, 4): one block of 8 pages
    # Prefill: the measured G=4 entry; other group sizes keep its rows per program (16 x 4).
    assert prefill_block_config(4096, 32, 8) == dict(block_q=16, pages_per_block=4)
    assert prefill_block_config(24, 8, 8) == dict(block_q=64, pages_per_block=4)
    assert prefill_block_config(24, 16, 2) == dict(block_q=8, pages_per_block=4)
    assert prefill_block_config(24, 128, 1) == dict(block_q=1, pages_per_block=4)


def _load_benchmark(relpath: str = "kernels.py"):
    """A script under benchmarks/ as a module (they are scripts, not a package)."""
    path = REPO / "benchmarks" / relpath
    spec = importlib.util.spec_from_file_location(path.stem + "_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_block_table_is_the_one_its_sweep_file_derives():
    bench = _load_benchmark()
    decode, prefill = bench.table_from_results(*(REPO / f for f in KERNEL_TABLE_SOURCE))
    assert decode == DECODE_TABLE
    assert prefill == PREFILL_TABLE
    # The fp8 pages' table: their sweep's rows read the default way (float16), and only those.
    decode, prefill = bench.table_from_results(*(REPO / f for f in KERNEL_TABLE_FP8_SOURCE),
                                               kv_dtype="fp8")
    assert decode == DECODE_TABLE_FP8 and prefill == {}


def test_fp8_pages_take_their_own_decode_entries_over_the_bf16_table():
    def dec(S, M, fp8):
        c = decode_block_config(S, M, 16, fp8_pages=fp8)
        return c["decode_pages_per_block"], c["decode_splits"], c["decode_heads_per_program"]

    assert dec(64, 4096 // 16, True) == (8, 1, 1) and dec(64, 4096 // 16, False) == (4, 1, 1)
    assert dec(256, 4096 // 16, True) == (4, 1, 2) and dec(256, 4096 // 16, False) == (8, 2, 1)
    # The offline workload's decode steps: 1024 slots, 41 pages (max_model_len 648).
    assert dec(1024, 41, True) == (4, 1, 2) and dec(1024, 41, False) == (8, 2, 1)
    # Shapes the fp8 sweep did not measure keep the bf16 entries.
    assert dec(8, 4096 // 16, True) == dec(8, 4096 // 16, False) == (8, 5, 1)
    assert dec(1, 32768 // 16, True) == (8, 33, 1)
    # The kernel over e4m3 pages traces with the fp8 entry, two KV heads a program where it says
    # so, and one where the KV heads do not divide by it (an entry measured on 8 KV heads).
    assert _launch_names(12, 256, T=16, prefill=False) == {"ragged_paged_attention_bq1_ppb4_ns1"}
    assert _launch_names(12, 256, T=16, prefill=False, dtype=jnp.float8_e4m3fn) == {
        "ragged_paged_attention_bq1_ppb8_ns1"}
    assert _launch_names(200, 32, T=16, prefill=False, suffixes=True,
                         dtype=jnp.float8_e4m3fn) == {"ragged_paged_attention_bq1_ppb4_ns1_hp2"}
    assert _launch_names(200, 32, T=16, prefill=False, suffixes=True, H=3, K=3,
                         dtype=jnp.float8_e4m3fn) == {"ragged_paged_attention_bq1_ppb4_ns1"}
    assert _launch_names(200, 32, T=16, prefill=False, suffixes=True, decode_heads_per_program=1,
                         dtype=jnp.float8_e4m3fn) == {"ragged_paged_attention_bq1_ppb4_ns1"}


def _launch_names(S, M, B=16, T=8, H=8, K=2, D=32, suffixes=False, dtype=jnp.float32, **knobs):
    """The pallas_call names (block_q, pages per block, splits; with ``suffixes`` also the
    variant flags such as ``_mt``) a call traces to (``dtype``: the pages')."""
    P = 4
    args = (jnp.zeros((T, H, D)), jnp.zeros((P, B, K, D), dtype), jnp.zeros((P, B, K, D), dtype),
            jnp.zeros(S, jnp.int32), jnp.zeros((S, M), jnp.int32), jnp.zeros(S + 1, jnp.int32),
            jnp.zeros(1, jnp.int32))
    f = functools.partial(ragged_paged_attention, sm_scale=1.0, interpret=True, **knobs)
    pattern = r"ragged_paged_attention_bq\d+_ppb\d+_ns\d+" + (r"\w*" if suffixes else "")
    return set(re.findall(pattern, str(jax.make_jaxpr(f)(*args))))


def test_kernel_uses_the_table_unless_a_knob_is_passed_and_each_knob_overrides_alone():
    # S=4 slots, 640-token context: decode class (8, 4k) = (8, 5); prefill G=4: (16, 4).
    assert _launch_names(4, 40) == {"ragged_paged_attention_bq1_ppb8_ns5",
                                    "ragged_paged_attention_bq16_ppb4_ns1"}
    assert _launch_names(4, 40, decode_splits=2) == {"ragged_paged_attention_bq1_ppb8_ns2",
                                                     "ragged_paged_attention_bq16_ppb4_ns1"}
    assert _launch_names(4, 40, decode_pages_per_block=2) == {
        "ragged_paged_attention_bq1_ppb2_ns5", "ragged_paged_attention_bq16_ppb4_ns1"}
    assert _launch_names(4, 40, block_q=4, pages_per_block=2) == {
        "ragged_paged_attention_bq1_ppb8_ns5", "ragged_paged_attention_bq4_ppb2_ns1"}
    assert _launch_names(4, 40, prefill=False) == {"ragged_paged_attention_bq1_ppb8_ns5"}
    # A larger batch bucket at the same context: class (64, 4k) = (4, 1).
    assert _launch_names(12, 40, T=16) == {"ragged_paged_attention_bq1_ppb4_ns1",
                                           "ragged_paged_attention_bq16_ppb4_ns1"}


def test_masked_tail_only_defaults_on_in_the_prefill_launch_alone():
    # None (the default): the prefill launch masks only its tail key blocks (measured faster on
    # the H200), the decode launch masks all; True / False set both launches.
    def names(**knobs):
        return _launch_names(4, 40, suffixes=True, **knobs)

    assert names() == {"ragged_paged_attention_bq16_ppb4_ns1_mt",
                       "ragged_paged_attention_bq1_ppb8_ns5"}
    assert names(masked_tail_only=True) == {"ragged_paged_attention_bq16_ppb4_ns1_mt",
                                            "ragged_paged_attention_bq1_ppb8_ns5_mt"}
    assert names(masked_tail_only=False) == {"ragged_paged_attention_bq16_ppb4_ns1",
                                             "ragged_paged_attention_bq1_ppb8_ns5"}


@pytest.mark.parametrize("knob", ["block_q", "pages_per_block", "decode_pages_per_block",
                                  "decode_splits", "decode_heads_per_program"])
def test_non_positive_knob_is_a_value_error_naming_it(knob):
    with pytest.raises(ValueError, match=f"{knob} must be a positive int.*got 0"):
        _launch_names(4, 40, **{knob: 0})


def test_decode_combine_forms_agree_and_a_bad_one_is_refused():
    # decode_combine: "reduce" and "unrolled" are the same flash-decoding sums (float32, up to
    # summation order), against the reference, over splits some of which get no key block.
    rng = np.random.default_rng(61)
    args, _ = _random_batch(rng, kinds=("decode", "chunk", "decode", "decode"), T=12, S=5, M=6,
                            B=8, P=32, H=8, K=2, D=32, dtype=jnp.float32)
    want = ragged_paged_attention_reference(*args, sm_scale=0.3)
    got = {c: ragged_paged_attention(*args, sm_scale=0.3, decode_pages_per_block=1,
                                     decode_splits=4, decode_combine=c, interpret=True)
           for c in ("reduce", "unrolled")}
    for c, out in got.items():
        assert _rel_err(out, want) < 1e-5, c
    assert _rel_err(got["unrolled"], got["reduce"]) < 1e-6
    with pytest.raises(ValueError, match="decode_combine must be None or one of"):
        ragged_paged_attention(*args, sm_scale=0.3, decode_combine="tree", interpret=True)


# Each case: static shapes in a different (batch, context) class, no knobs passed.
#   S=1, 640-token context -> decode (1, 4k) = 16 pages x 3 splits (16 capped at 40/16 blocks)
#   S=6, same context      -> (8, 4k) = 8 pages x 5 splits, mixed batch, bf16 + soft cap
#   S=12, same context     -> (64, 4k) = 4 pages x 1 split, MHA (prefill block_q 64)
#   S=80 > T=24, 48 tokens -> (256, 512) = 4 pages x 1 split; slots past T never launch
@pytest.mark.parametrize("S,M,B,H,K,T,dtype,tol,window,cap,kinds", [
    (1, 40, 16, 8, 2, 4, jnp.float32, 1e-5, 100, None, [("decode",), ("decode",)]),
    (6, 40, 16, 8, 2, 32, jnp.bfloat16, 1e-2, None, 5.0,
     [("decode", "chunk", "decode", "prefill"), ("decode",) * 6]),
    (12, 40, 16, 4, 4, 32, jnp.float32, 1e-5, 300, None,
     [("chunk", "decode", "decode", "decode", "prefill"), ("decode",) * 12]),
    (80, 6, 8, 8, 2, 24, jnp.float32, 1e-5, None, None,
     [("decode",) * 20 + ("chunk",), ("prefill", "decode")]),
])
def test_table_chosen_configs_match_reference_across_shape_classes(S, M, B, H, K, T, dtype, tol,
                                                                     window, cap, kinds):
    _check_attention(10 + S, kinds, H=H, K=K, dtype=dtype, tol=tol, T=T, S=S, M=M, B=B,
                     sliding_window=window, soft_cap=cap)


@pytest.mark.parametrize("dtype,tol,window,cap", [(jnp.float32, 1e-5, 50, None),
                                                  (jnp.bfloat16, 1e-2, None, 5.0)])
def test_decode_splits_by_pages_match_reference(dtype, tol, window, cap):
    # 40 pages of 8 in key blocks of 16 pages: 7 splits take 6 pages each, less than one block,
    # so every split ends inside a block (masked K/V rows) and some start mid-table.
    kinds = [("decode",) * 6, ("decode", "chunk", "decode", "prefill"), ("decode",) * 2]
    _check_attention(20, kinds, H=8, K=2, dtype=dtype, tol=tol, T=32, S=6, M=40, B=8,
                     sliding_window=window, soft_cap=cap, decode_pages_per_block=16,
                     decode_splits=7, decode_split_pages=True)


@pytest.mark.parametrize("dtype,tol,window,cap", [(jnp.float32, 1e-5, None, None),
                                                  (jnp.bfloat16, 1e-2, None, 5.0),
                                                  (jnp.float32, 1e-5, 9, None)])
def test_masked_tail_only_matches_reference_in_every_launch(dtype, tol, window, cap):
    # Unmasked key blocks before each program's first query position, the causal mask on the
    # rest: prefill blocks whose first row sits exactly on a block edge and mid-block (block_q 3
    # against key blocks of 16), chunked prefills over a context, decodes split by key blocks
    # and by pages (a split's end inside a block), and the sliding window, which keeps the
    # mask on every block.
    kinds = MIXED + [("decode",) * 6, ("prefill", "chunk"), ("chunk",) * 3]
    _check_attention(21, kinds, H=8, K=2, dtype=dtype, tol=tol, T=40, S=6, M=12, B=8,
                     sliding_window=window, soft_cap=cap, block_q=3, pages_per_block=2,
                     decode_pages_per_block=2, decode_splits=3, masked_tail_only=True)
    _check_attention(22, [("decode",) * 6, ("decode", "chunk", "decode")], H=8, K=2,
                     dtype=dtype, tol=tol, T=32, S=6, M=40, B=8, sliding_window=window,
                     soft_cap=cap, decode_pages_per_block=4, decode_splits=7,
                     decode_split_pages=True, masked_tail_only=True)


# ---------------------------------------------------------------------------------------------
# FP8 (e4m3) W8A8 matmul.
# e4m3 keeps 3 mantissa bits: round-to-nearest leaves a relative error of at most 2^-4 per
# element, uniformly spread, so a quantized tensor's ‖x_q − x‖/‖x‖ is ~2^-4/√3 ≈ 0.036 (< 0.05
# checked). The product of two such tensors carries two independent errors: ≈ 0.05 relative on
# random data; we bound it by 0.08 against the unquantized fp32 product. Against the reference
# (same quantized inputs, dequantize-then-matmul in fp32) only summation order and the bf16
# output rounding differ: < 1e-2 (bf16 output: 2^-9 relative per element).
# ---------------------------------------------------------------------------------------------

def test_quantize_round_trips_within_e4m3_precision():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((33, 64)) * rng.uniform(0.1, 10, (33, 1)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 48)) * rng.uniform(0.1, 10, (1, 48)), jnp.float32)
    xq, xs = quantize_activation_per_token(x)
    wq, ws = quantize_weight_per_channel(w)
    assert xq.dtype == jnp.float8_e4m3fn and xs.shape == (33,)
    assert wq.dtype == jnp.float8_e4m3fn and ws.shape == (48,)
    # Every row / column uses the full e4m3 range: its absmax maps to 448.
    np.testing.assert_allclose(np.abs(np.asarray(xq, np.float32)).max(1), E4M3_MAX)
    np.testing.assert_allclose(np.abs(np.asarray(wq, np.float32)).max(0), E4M3_MAX)
    assert _rel_err(xq.astype(jnp.float32) * xs[:, None], x) < 0.05
    assert _rel_err(wq.astype(jnp.float32) * ws[None, :], w) < 0.05
    xq_t, xs_t = quantize_activation_per_tensor(x)
    wq_t, ws_t = quantize_weight_per_tensor(w)
    assert xs_t.shape == () and ws_t.shape == ()
    # Per-tensor scaling wastes range on rows with small values: looser, still bounded.
    assert _rel_err(wq_t.astype(jnp.float32) * ws_t, w) < 0.1
    assert _rel_err(xq_t.astype(jnp.float32) * xs_t, x) < 0.1
    # Zero rows do not divide by zero.
    zq, zs = quantize_activation_per_token(jnp.zeros((2, 8)))
    assert np.all(np.asarray(zq, np.float32) == 0) and np.all(np.isfinite(np.asarray(zs)))


@pytest.mark.parametrize("M,K,N,bm,bn,bk", [
    (1, 64, 32, 16, 32, 32), (40, 96, 80, 32, 32, 32),
    pytest.param(128, 128, 64, 64, 64, 64, marks=pytest.mark.slow)])
def test_fp8_matmul_kernel_and_xla_path_match_reference(M, K, N, bm, bn, bk):
    rng = np.random.default_rng(M)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((K, N)) * 0.05, jnp.bfloat16)
    xq, xs = quantize_activation_per_token(x)
    wq, ws = quantize_weight_per_channel(w)
    ref = fp8_matmul_reference(xq, xs, wq, ws)
    got = fp8_matmul(xq, xs, wq, ws, block_m=bm, block_n=bn, block_k=bk, interpret=True)
    xla = fp8_matmul_xla(xq, xs, wq, ws)
    assert got.shape == (M, N) and got.dtype == jnp.bfloat16
    assert _rel_err(got, ref) < 1e-2
    assert _rel_err(xla, ref) < 1e-2
    exact = np.asarray(x, np.float32) @ np.asarray(w, np.float32)
    assert _rel_err(ref, exact) < 0.08


def test_fp8_matmul_accepts_per_tensor_scales():
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((20, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)
    xq, xs = quantize_activation_per_tensor(x)
    wq, ws = quantize_weight_per_tensor(w)
    ref = fp8_matmul_reference(xq, xs, wq, ws, out_dtype=jnp.float32)
    got = fp8_matmul(xq, xs, wq, ws, out_dtype=jnp.float32, block_m=16, block_n=16, block_k=32,
                     interpret=True)
    assert _rel_err(got, ref) < 1e-5
    assert _rel_err(fp8_matmul_xla(xq, xs, wq, ws, out_dtype=jnp.float32), ref) < 1e-5


@pytest.mark.parametrize("M,split_k", [(1, 1), (5, 2), (16, 1), (40, 4)])
def test_skinny_matmul_matches_reference_for_bf16_w8a16_and_w8a8(M, split_k):
    """pallas_kernels.skinny_matmul (interpret mode), fresh random operands: bf16 weights in
    both layouts, e4m3 weights under bf16 rows (W8A16) and under e4m3 rows (W8A8); rows beyond
    M masked (M = 5, 40: not a multiple of the 16 / 64-row block), K split over programs."""
    from pallas_kernels.skinny_matmul import skinny_matmul, skinny_matmul_reference

    rng = np.random.default_rng(100 + M)
    K, N = 256, 96
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((K, N)) * 0.05, jnp.bfloat16)
    kw = dict(block_n=32, block_k=64, split_k=split_k, interpret=True)
    exact = np.asarray(x, np.float32) @ np.asarray(w, np.float32)
    for layout, wl in (("kn", w), ("nk", jnp.asarray(w.T))):
        got = skinny_matmul(x, wl, w_layout=layout, **kw)
        assert got.shape == (M, N) and got.dtype == jnp.bfloat16
        assert _rel_err(got, skinny_matmul_reference(x, wl, w_layout=layout)) < 1e-2
        assert _rel_err(got, exact) < 1e-2
    wq, ws = quantize_weight_per_channel(w)
    wq_nk = jnp.asarray(wq.T)
    got = skinny_matmul(x, wq_nk, ws, **kw)  # W8A16
    assert _rel_err(got, skinny_matmul_reference(x, wq_nk, ws)) < 1e-2
    assert _rel_err(got, exact) < 0.05  # e4m3 weights: 3 mantissa bits
    xq, xs = quantize_activation_per_token(x)
    got = skinny_matmul(xq, wq_nk, ws, xs, out_dtype=jnp.float32, **kw)  # W8A8
    assert got.dtype == jnp.float32
    assert _rel_err(got, fp8_matmul_reference(xq, xs, wq, ws, jnp.float32)) < 1e-5
    assert _rel_err(got, exact) < 0.08


@pytest.mark.parametrize("M,split_k,tile_k", [(1, 2, 64), (7, 1, 32), (16, 4, 32), (33, 2, 64)])
def test_skinny_matmul_block_scales_match_the_block_reference(M, split_k, tile_k):
    """skinny_matmul(..., scale_block_k=32) (interpret mode), fresh random operands: e4m3
    weights with one scale per (channel, 32-wide K block) under bf16 rows (W8A16: the published
    block-fp8 checkpoints at decode) and under e4m3 rows with per-(row, group) scales (W8A8);
    tiles of one or two scale blocks, K split over programs, rows beyond M masked."""
    from pallas_kernels.fp8_matmul import quantize_activation_per_token_group
    from pallas_kernels.skinny_matmul import skinny_matmul, skinny_matmul_reference

    rng = np.random.default_rng(500 + M)
    K, N, sb = 256, 96, 32
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    w = jnp.asarray(np.clip(rng.standard_normal((N, K)) * 100, -448, 448),
                    jnp.float32).astype(jnp.float8_e4m3fn)
    ws = jnp.asarray(rng.uniform(1e-4, 1e-2, size=(N, K // sb)), jnp.float32)
    kw = dict(block_n=32, block_k=tile_k, split_k=split_k, scale_block_k=sb, interpret=True)
    exact = fp8_block_matmul_reference(x.astype(jnp.float32), jnp.ones((M, K // sb)), w, ws,
                                       sb, jnp.float32)
    got = skinny_matmul(x, w, ws, **kw)  # W8A16
    assert got.shape == (M, N) and got.dtype == jnp.bfloat16
    assert _rel_err(got, exact) < 1e-2
    assert _rel_err(skinny_matmul_reference(x, w, ws, scale_block_k=sb), exact) < 1e-2
    # A per-channel scale in place of the blocks' is wrong by far: the K blocks are scaled.
    assert _rel_err(skinny_matmul(x, w, ws[:, 0], **{**kw, "scale_block_k": None}), exact) > 0.3
    xq, xs = quantize_activation_per_token_group(x, sb)
    got = skinny_matmul(xq, w, ws, xs, out_dtype=jnp.float32, **kw)  # W8A8
    ref = fp8_block_matmul_reference(xq, xs, w, ws, sb, jnp.float32)
    assert _rel_err(got, ref) < 1e-5
    assert _rel_err(skinny_matmul_reference(xq, w, ws, xs, out_dtype=jnp.float32,
                                            scale_block_k=sb), ref) < 1e-6
    assert _rel_err(got, exact) < 0.08


@pytest.mark.parametrize("M,K,N,tile_m,steps,k_blocks,group_m,cluster_m", [
    (5, 256, 128, 128, 2, 1, 0, 1),  # one ragged token tile (5 rows padded to 32), one weight tile
    (40, 384, 256, 32, 2, 1, 0, 1),  # 2 x 2 tiles (40 rows padded to 64), three K blocks
    (72, 256, 640, 32, 3, 1, 0, 1),  # 3 x 5 = 15 tiles over 4 CTAs: the tile loop wraps
    (40, 256, 256, None, None, None, None, None),  # pick_tile: (32, 8), most tiles in 4 CTAs
    (300, 512, 256, 128, 2, 2, 8, 2),  # DEFAULT_TILE's arguments (300 rows padded to 512)
    (40, 768, 256, 32, 2, 2, 0, 1),  # two K blocks a step (their wgmmas in flight together)
    (72, 256, 640, 32, 3, 1, 2, 1),  # snake order in groups of 2 token tiles, the last of 1
    (72, 256, 384, 32, 2, 1, 0, 2),  # clusters of 2 CTAs (72 rows padded to 2 x 64), multicast
    (100, 512, 384, 32, 2, 2, 1, 2),  # both, with two K blocks a step
])
def test_fp8_block_mgpu_kernel_matches_the_block_reference(M, K, N, tile_m, steps, k_blocks,
                                                           group_m, cluster_m):
    """fp8_block_matmul_mgpu (Mosaic GPU's interpreter: TMA pipeline, fp8 wgmma, the per-K-
    block promotion) on fresh random operands equals both operands dequantized with their
    block scales and multiplied in fp32; scales that vary per row / channel and K block, so a
    scale applied to the wrong block, row or channel shows."""
    from pallas_kernels.fp8_block_mgpu import fp8_block_matmul_mgpu
    from pallas_kernels.fp8_matmul import quantize_activation_per_token_group

    rng = np.random.default_rng(M * 7 + N)
    x = jnp.asarray(rng.standard_normal((M, K)) * rng.uniform(0.1, 10, size=(M, 1)),
                    jnp.float32)
    w = jnp.asarray(np.clip(rng.standard_normal((N, K)) * 100, -448, 448),
                    jnp.float32).astype(jnp.float8_e4m3fn)
    ws = jnp.asarray(rng.uniform(1e-4, 1e-2, size=(N, K // 128)), jnp.float32)
    xq, xs = quantize_activation_per_token_group(x, 128)
    ref = fp8_block_matmul_reference(xq, xs, w, ws, 128, jnp.float32)
    kw = dict(tile_m=tile_m, steps=steps, k_blocks=k_blocks, group_m=group_m,
              cluster_m=cluster_m, interpret=True)
    got = fp8_block_matmul_mgpu(xq, xs, w, ws, **kw)
    assert got.shape == (M, N) and got.dtype == jnp.bfloat16
    # The float32 reference rounded to bf16, but for a few values one ulp apart (the sums'
    # order differs at rounding boundaries).
    assert _rel_err(got, ref.astype(jnp.bfloat16)) < 1e-4
    assert _rel_err(got, ref) < 3e-3
    assert fp8_block_matmul_mgpu(xq, xs, w, ws, out_dtype=jnp.float16, **kw).dtype \
        == jnp.float16
    # One K block's weight scales rolled to the next channel: the output must move.
    ws_wrong = ws.at[:, 1].set(jnp.roll(ws[:, 1], 1))
    assert _rel_err(fp8_block_matmul_mgpu(xq, xs, w, ws_wrong, **kw), ref) > 1e-2


def _fp8_skinny_operands(rng, M: int, K: int, N: int, x_dtype, w_scale_max: float = 1e-2):
    """Random operands of the skinny fp8 kernel: x [M, K] with rows of very different
    magnitudes (so a per-token scale matters), an e4m3 weight [N, K] over its range, and
    per-channel scales [N]."""
    x = jnp.asarray(rng.standard_normal((M, K)) * rng.uniform(0.1, 10, size=(M, 1)), x_dtype)
    w = jnp.asarray(np.clip(rng.standard_normal((N, K)) * 100, -448, 448),
                    jnp.float32).astype(jnp.float8_e4m3fn)
    ws = jnp.asarray(rng.uniform(w_scale_max / 100, w_scale_max, size=(N,)), jnp.float32)
    return x, w, ws


@pytest.mark.parametrize("M,K,N,tile_k,steps,oob_rows", [
    (8, 256, 128, 128, 2, False),  # two weight tiles, two K steps
    (5, 512, 192, 256, 4, False),  # 5 rows padded to 8; steps clipped to the two K steps
    (5, 512, 192, 256, 2, True),  # the same rows read and written past M (no pad)
    (16, 384, 64, 128, 8, False),  # one weight tile, three K steps, 8 steps asked
    (64, 512, 128, 512, 3, False),  # 64 tokens (wgmma's N), one K step
])
def test_fp8_skinny_mgpu_kernel_matches_the_reference(M, K, N, tile_k, steps, oob_rows):
    """fp8_skinny_matmul_mgpu (Mosaic GPU's interpreter: the TMA pipeline, the transposed fp8
    wgmma, the scales and the token-major store) on fresh random operands equals both operands
    dequantized and multiplied in fp32; scales that vary per token and channel, so a scale
    applied to the wrong row or column shows."""
    from pallas_kernels.fp8_matmul import quantize_activation_per_token
    from pallas_kernels.fp8_skinny_mgpu import fp8_skinny_matmul_mgpu

    x, w, ws = _fp8_skinny_operands(np.random.default_rng(M * 11 + N), M, K, N, jnp.float32)
    xq, xs = quantize_activation_per_token(x)
    ref = fp8_matmul_reference(xq, xs, w, ws, jnp.float32, w_transposed=True)
    kw = dict(tile_k=tile_k, steps=steps, oob_rows=oob_rows, interpret=True)
    got = fp8_skinny_matmul_mgpu(xq, xs, w, ws, **kw)
    assert got.shape == (M, N) and got.dtype == jnp.bfloat16
    assert _rel_err(got, ref.astype(jnp.bfloat16)) < 1e-4
    assert _rel_err(got, ref) < 3e-3
    assert fp8_skinny_matmul_mgpu(xq, xs.reshape(M, 1), w, ws, out_dtype=jnp.float16,
                                  **kw).dtype == jnp.float16
    # Scales moved by one channel / one token: the output must move.
    assert _rel_err(fp8_skinny_matmul_mgpu(xq, xs, w, jnp.roll(ws, 1), **kw), ref) > 1e-2
    if M > 1:
        assert _rel_err(fp8_skinny_matmul_mgpu(xq, jnp.roll(xs, 1), w, ws, **kw), ref) > 1e-2


@pytest.mark.parametrize("M,H,F,cfg,dtype,init", [
    (1, 512, 384, dict(dn_rows=128), jnp.bfloat16, True),  # 3 CTAs, 4 steps a ring
    (5, 512, 256, dict(tile_k=256, gu_steps=1, dn_steps=3), jnp.bfloat16, False),
    (16, 256, 128, dict(dn_rows=64, dn_steps=1), jnp.float16, True),
    (1, 512, 384, dict(down_t=True), jnp.bfloat16, True),  # the down GEMM transposed
    (5, 256, 256, dict(down_t=True, dn_rows=64, dn_steps=3), jnp.bfloat16, False),
])
def test_fp8_mlp_mgpu_kernel_matches_the_reference(M, H, F, cfg, dtype, init):
    """fp8_mlp_mgpu (Mosaic GPU's interpreter: both TMA rings, the in-kernel quantization of x
    and of the SwiGLU's output, the per-CTA partial sums) on fresh random operands equals
    fp8_mlp_reference; the reference is the MLP itself up to the activations' e4m3 rounding;
    swapped gate / up scales move the output."""
    from pallas_kernels.fp8_mlp_mgpu import fp8_mlp_mgpu, fp8_mlp_reference

    rng = np.random.default_rng(M * 13 + H + F)
    e4m3 = lambda a: jnp.asarray(np.clip(a * 64, -448, 448), jnp.float32).astype(  # noqa: E731
        jnp.float8_e4m3fn)
    x = jnp.asarray(rng.standard_normal((M, H)) * rng.uniform(0.2, 5, size=(M, 1)), dtype)
    wgu, wd = e4m3(rng.standard_normal((F, 2, H))), e4m3(rng.standard_normal((H, F)))
    gs, us = (jnp.asarray(rng.uniform(0.5, 1.5, F) / 64 / np.sqrt(H), jnp.float32)
              for _ in range(2))
    ds = jnp.asarray(rng.uniform(0.5, 1.5, H) / 64 / np.sqrt(F), jnp.float32)
    res = jnp.asarray(rng.standard_normal((M, H)), jnp.float32) if init else None
    tile_k = cfg.get("tile_k", 128)
    ref = fp8_mlp_reference(x, wgu, gs, us, wd, ds, res, tile_k=tile_k)
    got = fp8_mlp_mgpu(x, wgu, gs, us, wd, ds, res, interpret=True, **cfg)
    assert got.shape == (M, H) and got.dtype == jnp.float32
    assert _rel_err(got, ref) < 1e-5
    # The reference is the MLP: dequantized weights, float32 activations (no e4m3 rounding).
    xf = x.astype(jnp.float32)
    g = xf @ (wgu[:, 0].astype(jnp.float32) * gs[:, None]).T
    u = xf @ (wgu[:, 1].astype(jnp.float32) * us[:, None]).T
    exact = (jax.nn.silu(g) * u) @ (wd.astype(jnp.float32) * ds[:, None]).T
    mlp = ref if res is None else ref - res
    assert 1e-3 < _rel_err(mlp, exact) < 0.1
    assert _rel_err(fp8_mlp_mgpu(x, wgu, us, gs, wd, ds, res, interpret=True, **cfg), ref) > 1e-2


def test_fp8_mlp_mgpu_config_fit_counts_shared_memory_as_mosaic_lays_it_out():
    """At the Llama-3-8B MLP the default forms fit a CTA's 227 KB for 1-16 rows, and four
    gate/up steps in flight do not: on the H100 (2026-12-07) that config passed the old
    estimate and failed to compile, 1128 bytes over (Mosaic starts each buffer at 1 KB)."""
    from pallas_kernels.fp8_mlp_mgpu import CTA_SMEM_BYTES, fit_config, smem_bytes

    for M in (1, 8, 16):
        for down_t in (False, True):
            cfg = fit_config(M, 4096, 14336, down_t=down_t)
            assert smem_bytes(M, x_itemsize=2, **cfg) <= CTA_SMEM_BYTES
    assert smem_bytes(1, 128, 128, 4, 256, 2) > CTA_SMEM_BYTES
    with pytest.raises(ValueError, match="fewer steps in flight"):
        fit_config(1, 4096, 14336, gu_steps=4)


@pytest.mark.parametrize("M,K,N,tile_k,steps,dtype,wgs", [
    (8, 256, 128, 128, 2, jnp.float16, 1),  # two weight tiles, two K steps
    (5, 512, 192, 256, 4, jnp.bfloat16, 1),  # rows past M read as zeros; two 128 chunks a step
    (16, 384, 64, 128, 3, jnp.bfloat16, 1),
    (5, 512, 128, 256, 2, jnp.bfloat16, 2),  # two compute warpgroups, a chunk each a step
    (3, 1024, 64, 512, 2, jnp.float16, 2),  # two chunks each of a 512-wide step
])
def test_fp8_skinny_mgpu_weight_only_matches_the_reference(M, K, N, tile_k, steps, dtype, wgs):
    """fp8_skinny_matmul_mgpu weight-only (x_scale None: the e4m3 weight upcast to x's 16-bit
    dtype chunk by chunk, a 16-bit wgmma; interpreted, the chunk goes through shared memory),
    with its chunks shared by ``wgs`` compute warpgroups (their partial sums added at the end),
    equals x times the dequantized weight in fp32, exactly but for the output's rounding."""
    from pallas_kernels.fp8_skinny_mgpu import fp8_skinny_matmul_mgpu

    x, w, ws = _fp8_skinny_operands(np.random.default_rng(M * 13 + N), M, K, N, dtype)
    ref = (x.astype(jnp.float32) @ w.astype(jnp.float32).T) * ws[None, :]
    kw = dict(tile_k=tile_k, steps=steps, compute_wgs=wgs, interpret=True)
    got = fp8_skinny_matmul_mgpu(x, None, w, ws, **kw)
    assert got.shape == (M, N) and got.dtype == jnp.bfloat16
    assert _rel_err(got, ref.astype(jnp.bfloat16)) < 1e-4
    assert _rel_err(fp8_skinny_matmul_mgpu(x, None, w, jnp.roll(ws, 1), **kw), ref) > 1e-2


@pytest.mark.parametrize("M,weight_only,oob_rows,wgs", [
    (5, True, True, 2), (5, False, False, 1), (8, False, True, 1)])
def test_fp8_skinny_mgpu_residual_epilogue_adds_the_rounded_product(M, weight_only, oob_rows,
                                                                    wgs):
    """``residual``: the kernel returns residual + the product rounded to the output dtype, bit
    for bit the model's ``x + proj(h)`` (W8A8 and weight-only; rows past M read as zeros and
    dropped, or padded); a residual of another shape or dtype is refused."""
    from pallas_kernels.fp8_matmul import quantize_activation_per_token
    from pallas_kernels.fp8_skinny_mgpu import fp8_skinny_matmul_mgpu

    rng = np.random.default_rng(M * 17 + wgs)
    x, w, ws = _fp8_skinny_operands(rng, M, 512, 128, jnp.bfloat16)
    xs = None
    if not weight_only:
        x, xs = quantize_activation_per_token(x)
    res = jnp.asarray(rng.standard_normal((M, 128)) * 10, jnp.bfloat16)
    kw = dict(tile_k=256, steps=2, oob_rows=oob_rows, compute_wgs=wgs, interpret=True)
    y = fp8_skinny_matmul_mgpu(x, xs, w, ws, **kw)
    got = fp8_skinny_matmul_mgpu(x, xs, w, ws, residual=res, **kw)
    assert got.shape == (M, 128) and jnp.array_equal(got, res + y)
    assert not jnp.array_equal(got, y)
    with pytest.raises(ValueError, match="residual"):
        fp8_skinny_matmul_mgpu(x, xs, w, ws, residual=res.astype(jnp.float32), **kw)
    with pytest.raises(ValueError, match="residual"):
        fp8_skinny_matmul_mgpu(x, xs, w, ws, residual=res[:, :64], **kw)


@pytest.mark.parametrize("M,K,N,tile_k,steps,oob_rows,with_res", [
    (1, 512, 128, 128, 2, True, True),  # batch 1: seven zero rows past M, four K steps
    (5, 512, 192, 256, 4, False, False),  # rows padded to 8; steps clipped to the two
    (16, 384, 64, 128, 3, True, True),
])
def test_fp8_skinny_mgpu_quantizes_its_rows_per_token_and_k_step(M, K, N, tile_k, steps,
                                                                  oob_rows, with_res):
    """``quantize_x``: 16-bit rows quantized to e4m3 inside the kernel, per token and K block
    (a step's: the block's absmax maps to 448), the fp8 product scaled back block by block:
    equals ``quantize_x_reference``
    (the same quantization outside, both dequantized and multiplied in fp32) up to the
    output's rounding, with the residual added as the other forms add it and the RMSNorm
    folded in as the model's norm before the GEMM."""
    from pallas_kernels.fp8_skinny_mgpu import fp8_skinny_matmul_mgpu, quantize_x_reference

    rng = np.random.default_rng(M * 19 + K)
    x, w, ws = _fp8_skinny_operands(rng, M, K, N, jnp.bfloat16)
    # Blocks of very different magnitude: one scale per row over all of K would lose the small.
    x = x * jnp.asarray(np.repeat(rng.uniform(1e-3, 10, (M, K // tile_k)), tile_k, axis=1),
                        jnp.bfloat16)
    kw = dict(tile_k=tile_k, steps=steps, oob_rows=oob_rows, quantize_x=True, interpret=True)
    block = tile_k
    ref = quantize_x_reference(x, w, ws, block, jnp.float32)
    got = fp8_skinny_matmul_mgpu(x, None, w, ws, **kw)
    assert got.shape == (M, N) and got.dtype == jnp.bfloat16
    assert _rel_err(got, ref.astype(jnp.bfloat16)) < 1e-4
    exact = (x.astype(jnp.float32) @ w.astype(jnp.float32).T) * ws[None, :]
    assert _rel_err(got, exact) < 5e-2  # e4m3 rows: ~2^-4 relative a value
    if with_res:
        res = jnp.asarray(rng.standard_normal((M, N)) * 10, jnp.bfloat16)
        assert jnp.array_equal(fp8_skinny_matmul_mgpu(x, None, w, ws, residual=res, **kw),
                               res + got)
    assert _rel_err(fp8_skinny_matmul_mgpu(x, None, w, jnp.roll(ws, 1), **kw), ref) > 1e-2
    # The layer's RMSNorm folded in (norm=(g, eps)): x * g quantized, 1 / rms(x) applied to
    # the product; near the product of the normed rows rounded to bf16 as the model has them.
    g = jnp.asarray(1 + 0.5 * rng.standard_normal(K), jnp.bfloat16)
    normed = fp8_skinny_matmul_mgpu(x, None, w, ws, norm=(g, 1e-5), **kw)
    ref_n = quantize_x_reference(x, w, ws, block, jnp.float32, norm=(g, 1e-5))
    assert _rel_err(normed, ref_n.astype(jnp.bfloat16)) < 1e-4
    xf = x.astype(jnp.float32)
    rms = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=1, keepdims=True) + 1e-5))
    model = g * rms.astype(jnp.bfloat16)
    assert _rel_err(normed, quantize_x_reference(model, w, ws, block, jnp.float32)) < 3e-2
    with pytest.raises(ValueError, match="norm"):
        fp8_skinny_matmul_mgpu(x, None, w, ws, norm=(g[:128], 1e-5), **kw)
    with pytest.raises(ValueError, match="quantize_x: the kernel computes"):
        fp8_skinny_matmul_mgpu(x.astype(jnp.float8_e4m3fn), jnp.ones((M,)), w, ws, **kw)
    with pytest.raises(ValueError, match="compute_wgs=2"):  # one compute warpgroup only
        fp8_skinny_matmul_mgpu(x, None, w, ws, **dict(kw, compute_wgs=2))


def test_fp8_skinny_mgpu_kernel_refuses_what_it_does_not_take():
    from pallas_kernels.fp8_skinny_mgpu import fp8_skinny_matmul_mgpu

    e4m3, f32 = jnp.float8_e4m3fn, jnp.float32
    x, w = jnp.ones((8, 256), e4m3), jnp.ones((128, 256), e4m3)
    xs, ws = jnp.ones((8,), f32), jnp.ones((128,), f32)
    with pytest.raises(ValueError, match="tile_k=96"):
        fp8_skinny_matmul_mgpu(x, xs, w, ws, tile_k=96)
    with pytest.raises(ValueError, match="N=96"):
        fp8_skinny_matmul_mgpu(x, xs, w[:96], ws[:96])
    with pytest.raises(ValueError, match="K=256 must be a multiple of tile_k=512"):
        fp8_skinny_matmul_mgpu(x, xs, w, ws, tile_k=512)
    with pytest.raises(ValueError, match="M=300"):
        fp8_skinny_matmul_mgpu(jnp.ones((300, 256), e4m3), jnp.ones((300,), f32), w, ws,
                               tile_k=256)
    with pytest.raises(ValueError, match="do not fit"):
        fp8_skinny_matmul_mgpu(x, xs[:4], w, ws, tile_k=256)
    with pytest.raises(ValueError, match="compute_wgs=3"):  # 2 chunks a step, not 3
        fp8_skinny_matmul_mgpu(x.astype(jnp.bfloat16), None, w, ws, tile_k=256, compute_wgs=3)
    with pytest.raises(ValueError, match="compute_wgs=4"):  # 4 chunks a step, yet refused:
        # that form never finished on the H100
        fp8_skinny_matmul_mgpu(jnp.ones((8, 512), jnp.bfloat16), None,
                               jnp.ones((128, 512), e4m3), ws, tile_k=512, compute_wgs=4)
    with pytest.raises(ValueError, match="compute_wgs=2"):  # the W8A8 form takes one
        fp8_skinny_matmul_mgpu(x, xs, w, ws, tile_k=256, compute_wgs=2)
    # 200 KB of pipeline at 256 rows fits alone, not with the output and residual tiles.
    x256, xs256 = jnp.ones((256, 1024), e4m3), jnp.ones((256,), f32)
    w1k = jnp.ones((128, 1024), e4m3)
    with pytest.raises(ValueError, match="and a residual: .* more than a CTA's 232448"):
        fp8_skinny_matmul_mgpu(x256, xs256, w1k, ws, tile_k=128, steps=5,
                               residual=jnp.ones((256, 128), jnp.bfloat16))
    with pytest.raises(ValueError, match="steps=0"):
        fp8_skinny_matmul_mgpu(x, xs, w, ws, tile_k=256, steps=0)
    with pytest.raises(ValueError, match="out_dtype=float32"):
        fp8_skinny_matmul_mgpu(x, xs, w, ws, out_dtype=f32, tile_k=256)
    with pytest.raises(ValueError, match="x_scale None, .* do not fit"):  # weight-only
        fp8_skinny_matmul_mgpu(jnp.ones((8, 256), jnp.bfloat16), None, w, ws[:64], tile_k=256)
    with pytest.raises(ValueError, match="weight-only .* takes a 16-bit x"):
        fp8_skinny_matmul_mgpu(x, None, w, ws, tile_k=256)
    with pytest.raises(ValueError, match="W8A8 takes an e4m3 x"):
        fp8_skinny_matmul_mgpu(jnp.ones((8, 256), jnp.bfloat16), xs, w, ws, tile_k=256)
    with pytest.raises(ValueError, match="bytes of pipeline buffers"):  # 64 bf16 rows
        fp8_skinny_matmul_mgpu(jnp.ones((64, 2048), jnp.bfloat16), None,
                               jnp.ones((128, 2048), e4m3), ws, tile_k=512, steps=3)


def test_fp8_block_mgpu_tile_pick_follows_the_h100_sweep():
    """pick_tile at the Llama-3-8B projections on 132 SMs gives each shape's fastest tile of the
    H100 sweeps (benchmarks/RESULTS.md, 2026-12-06): narrow N at 128 rows takes smaller token
    tiles (more CTAs busy), wide N and >= 1024 rows the 128-token tile with two K blocks a
    step, grouped tile order and 2-CTA clusters (one K block a step where K blocks are odd)."""
    from pallas_kernels.fp8_block_mgpu import DEFAULT_TILE, ODD_K_TILE, pick_tile

    assert DEFAULT_TILE == (128, 2, 2, 8, 2) and ODD_K_TILE == (128, 4, 1, 8, 2)
    assert pick_tile(128, 4096, 32, 132) == (32, 8, 1, 0, 1)  # o: 14.7 µs against 22.9
    assert pick_tile(128, 6144, 32, 132) == (64, 4, 1, 0, 1)  # q/k/v: 18.3 against 23.5
    # gate/up at 128 / 512 rows: 128-token tiles fill the SMs; below 1,024 rows (not swept
    # with the new arguments) the first version's tile (56.1 µs at 128 rows, the fastest).
    assert pick_tile(128, 28672, 32, 132) == pick_tile(512, 28672, 32, 132) == (128, 4, 1, 0, 1)
    for M in (1024, 4096, 16384):
        for N, KB in ((4096, 32), (6144, 32), (28672, 32), (4096, 112)):
            assert pick_tile(M, N, KB, 132) == DEFAULT_TILE
    assert pick_tile(1024, 4096, 35, 132) == ODD_K_TILE
    assert pick_tile(40, 256, 2, 4) == (32, 8, 1, 0, 1)
    assert pick_tile(300, 256, 4, 4) == (128, 4, 1, 0, 1)


def test_fp8_block_mgpu_kernel_refuses_what_it_does_not_take():
    from pallas_kernels.fp8_block_mgpu import fp8_block_matmul_mgpu

    e4m3, f32 = jnp.float8_e4m3fn, jnp.float32
    x, w = jnp.ones((8, 256), e4m3), jnp.ones((128, 256), e4m3)
    xs, ws = jnp.ones((8, 2), f32), jnp.ones((128, 2), f32)
    with pytest.raises(ValueError, match="takes 128 only"):
        fp8_block_matmul_mgpu(x, jnp.ones((8, 4), f32), w, jnp.ones((128, 4), f32), 64)
    with pytest.raises(ValueError, match="N=96"):
        fp8_block_matmul_mgpu(x, xs, w[:96], ws[:96])
    with pytest.raises(ValueError, match="K=200"):
        fp8_block_matmul_mgpu(x[:, :200], xs, w[:, :200], ws)
    with pytest.raises(ValueError, match="tile_m=48"):
        fp8_block_matmul_mgpu(x, xs, w, ws, tile_m=48, steps=4)
    with pytest.raises(ValueError, match="do not fit"):
        fp8_block_matmul_mgpu(x, xs[:, :1], w, ws)
    with pytest.raises(ValueError, match="together"):
        fp8_block_matmul_mgpu(x, xs, w, ws, tile_m=32)
    with pytest.raises(ValueError, match="k_blocks=2"):  # K = 384: three blocks
        fp8_block_matmul_mgpu(jnp.ones((8, 384), e4m3), jnp.ones((8, 3), f32),
                              jnp.ones((128, 384), e4m3), jnp.ones((128, 3), f32), k_blocks=2)
    with pytest.raises(ValueError, match="group_m=-1"):
        fp8_block_matmul_mgpu(x, xs, w, ws, group_m=-1)
    with pytest.raises(ValueError, match="cluster_m=4"):
        fp8_block_matmul_mgpu(x, xs, w, ws, cluster_m=4)
    with pytest.raises(ValueError, match="out_dtype=float32"):
        fp8_block_matmul_mgpu(x, xs, w, ws, out_dtype=f32)


def test_skinny_matmul_block_scales_refuse_what_they_do_not_fit():
    from pallas_kernels.skinny_matmul import skinny_matmul

    x = jnp.ones((4, 128), jnp.bfloat16)
    w = jnp.ones((64, 128), jnp.float8_e4m3fn)
    kw = dict(block_n=32, block_k=64, interpret=True)
    with pytest.raises(ValueError, match="multiples of scale_block_k"):  # 64-wide tile, 128 blocks
        skinny_matmul(x, w, jnp.ones((64, 1)), scale_block_k=128, **kw)
    with pytest.raises(ValueError, match="needs w_scale"):
        skinny_matmul(x, w, scale_block_k=32, **kw)
    with pytest.raises(ValueError, match="power of two"):
        skinny_matmul(x, w, jnp.ones((64, 5)), scale_block_k=24, **kw)
    with pytest.raises(ValueError, match="w_scale must be \\[64, 4\\]"):
        skinny_matmul(x, w, jnp.ones((64,)), scale_block_k=32, **kw)
    with pytest.raises(ValueError, match="x_scale must be \\[4, 4\\]"):
        skinny_matmul(x.astype(jnp.float8_e4m3fn), w, jnp.ones((64, 4)), jnp.ones((4,)),
                      scale_block_k=32, **kw)


@pytest.mark.parametrize("M,dtype", [(1, jnp.bfloat16), (7, jnp.bfloat16), (16, jnp.float32)])
def test_skinny_matmul_residual_epilogue_matches_the_models_add(M, dtype):
    """skinny_matmul(..., residual=r) (interpret mode; the o / down projections' residual GEMM,
    not called by the engine) equals the model's spelling r + (x @ w) with the product rounded
    to the output dtype first: bit for bit against the reference, close to float64. Rows beyond
    M (M = 1, 7) are masked: no residual row is read or written outside [M, N]."""
    from pallas_kernels.skinny_matmul import skinny_matmul, skinny_matmul_reference

    rng = np.random.default_rng(300 + M)
    K, N = 512, 128
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    w = jnp.asarray(rng.standard_normal((K, N)) * 0.05, dtype)
    r = jnp.asarray(rng.standard_normal((M, N)) * 4, dtype)
    got = skinny_matmul(x, w, residual=r, w_layout="kn", block_n=32, block_k=128, split_k=1,
                        interpret=True)
    assert got.shape == (M, N) and got.dtype == dtype
    ref = skinny_matmul_reference(x, w, w_layout="kn", residual=r)
    model = r + jnp.dot(x, w, preferred_element_type=jnp.float32).astype(dtype)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5  # one bf16 rounding of the product apart
    assert _rel_err(got, ref) < tol and _rel_err(ref, model) < tol
    exact = (np.asarray(x, np.float64) @ np.asarray(w, np.float64)
             + np.asarray(r, np.float64))
    assert _rel_err(got, exact) < tol
    assert _rel_err(got, r) > 0.05  # the product is there, not only the residual


def test_skinny_matmul_residual_needs_whole_k_programs_and_its_shape():
    from pallas_kernels.skinny_matmul import skinny_matmul

    x, w = jnp.ones((4, 128), jnp.bfloat16), jnp.ones((128, 64), jnp.bfloat16)
    kw = dict(w_layout="kn", block_n=32, block_k=64, interpret=True)
    with pytest.raises(ValueError, match="split_k == 1"):
        skinny_matmul(x, w, residual=jnp.ones((4, 64), jnp.bfloat16), split_k=2, **kw)
    with pytest.raises(ValueError, match="residual must be \\[4, 64\\] bfloat16"):
        skinny_matmul(x, w, residual=jnp.ones((4, 64), jnp.float32), **kw)
    with pytest.raises(ValueError, match="residual must be"):
        skinny_matmul(x, w, residual=jnp.ones((1, 64), jnp.bfloat16), **kw)


def test_skinny_matmul_rejects_what_it_does_not_take():
    from pallas_kernels.skinny_matmul import skinny_fits, skinny_matmul

    x = jnp.ones((4, 128), jnp.bfloat16)
    w = jnp.ones((64, 128), jnp.bfloat16)
    kw = dict(block_n=32, block_k=64, interpret=True)
    assert skinny_fits(4, 128, 64, block_n=32, block_k=64, split_k=2)
    with pytest.raises(ValueError, match="M <= 64"):  # not skinny
        skinny_matmul(jnp.ones((65, 128), jnp.bfloat16), w, **kw)
    with pytest.raises(ValueError, match="block_k \\* split_k"):  # 128 is not 3 x 64 blocks
        skinny_matmul(x, w, split_k=3, **kw)
    with pytest.raises(ValueError, match="w \\(nk\\)"):  # contraction sizes differ
        skinny_matmul(x, jnp.ones((64, 96), jnp.bfloat16), **kw)
    with pytest.raises(ValueError, match="power of two"):
        skinny_matmul(x, w, block_n=24, block_k=64, interpret=True)
    xq = x.astype(jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="W8A8"):  # e4m3 rows need e4m3 weights and scales
        skinny_matmul(xq, w, **kw)
    with pytest.raises(ValueError, match="x_scale is for"):
        skinny_matmul(x, w, x_scale=jnp.ones((4,)), **kw)
    # Compiled (not interpreted), 4 stages of bf16 64 x 256 tiles at 64 rows need 256 KiB of
    # shared memory: a clear error before Triton's RESOURCE_EXHAUSTED.
    x64, w64 = jnp.ones((64, 1024), jnp.bfloat16), jnp.ones((1024, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="262144 bytes of shared memory"):
        skinny_matmul(x64, w64, w_layout="kn", block_n=64, block_k=256, num_stages=4)


def test_skinny_gemm_sweep_runs_and_picks_a_correct_config(tmp_path):
    # benchmarks/gpu/skinny_gemm.py --smoke (tiny shapes, interpret mode, host wall time): the
    # baselines and the swept W8A8 configs run, match the reference and repeat their bits, and
    # the sweep's best config at M = 16 is one of the correct ones, reused at M = 1.
    out = tmp_path / "s.jsonl"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu" / "skinny_gemm.py"), "--smoke",
         "--impls", "pallas_w8a8", "--ms", "16,1", "--out", str(out)], capture_output=True,
        text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                     "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "== summary" in run.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cases = [r for r in rows if "best" not in r]
    assert cases and all(r.get("ok") for r in cases), [r for r in cases if not r.get("ok")]
    assert {r["impl"] for r in cases} == {"xla_bf16", "xla_w8a16", "xla_w8a16_f16", "xla_fp8",
                                          "pallas_w8a8"}
    assert all(r["repeat_equal"] for r in cases)
    for shape in ("qkv", "o"):
        (best16,) = [r for r in rows if "best" in r and r["shape"] == shape and r["M"] == 16]
        assert best16["best"] in [r["config"] for r in cases
                                  if r["shape"] == shape and r["impl"] == "pallas_w8a8"]
        assert any("best" in r and r["shape"] == shape and r["M"] == 1 for r in rows)


def test_residual_gemm_benchmark_checks_each_config_and_times_both_variants(tmp_path):
    # benchmarks/gpu/residual_gemm.py --smoke (tiny shapes, interpret mode, host wall time):
    # every swept config matches the reference and XLA's chain, and both shapes are timed at 1
    # and 8 rows for XLA and the best config.
    out = tmp_path / "r.jsonl"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu" / "residual_gemm.py"), "--smoke",
         "--cands", "[[32, 128, 4, 4], [16, 64, 4, 3]]", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    sweep = [r for r in rows if "sweep" in r]
    assert len(sweep) == 4 and all(r["ok"] for r in sweep), sweep
    timed = {(r["shape"], r["M"], r["variant"]) for r in rows if "variant" in r}
    assert timed == {(s, m, v) for s in ("o", "down") for m in (1, 8) for v in ("xla", "pallas")}


def test_l2_prefetch_benchmark_kernel_reads_every_block(tmp_path):
    # benchmarks/gpu/l2_prefetch.py --smoke (interpret mode): its prefetch kernel's digests
    # equal numpy's over each program's blocks, and every variant (cold / hot GEMM, XLA's
    # read, the prefetch configs) runs on tiny shapes.
    out = tmp_path / "l2.jsonl"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu" / "l2_prefetch.py"), "--smoke",
         "--out", str(out)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "prefetch kernel check: ok" in run.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) >= 10 and not [r for r in rows if "error" in r]
    assert {"cold", "hot", "xla_read"} <= {r["variant"] for r in rows}


def test_decode_sweep_of_several_heads_a_program_runs_and_feeds_the_fp8_table(tmp_path):
    # kernels.py --decode-variants hp (tiny shapes, interpret mode): the table's config and the
    # two-heads config run correct, and a row of the sweep with hp > 1 reaches the derived
    # table as its third value.
    out = tmp_path / "k.jsonl"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--smoke", "--sections",
         "decode", "--decode-variants", "hp", "--kv-dtype", "fp8", "--fp8-kv-dot", "float16",
         "--out", str(out)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    hps = {r["config"].get("decode_heads_per_program", 1) for r in rows
           if r["impl"] == "pallas" and r["ok"]}
    assert hps == {1, 2}
    for r in rows:  # the two-heads row the fastest: the table takes it with its third value
        if r["impl"] == "pallas":
            r["time_us"] = 1.0 if r["config"].get("decode_heads_per_program") == 2 else 9.0
            r.pop("time_us_loop", None)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    decode, _ = _load_benchmark().table_from_results(out, kv_dtype="fp8")
    (entry,) = decode.values()
    assert len(entry) == 3 and entry[2] == 2


def test_block_gemm_section_runs_every_form_of_a_block_fp8_projection_correct(tmp_path):
    # kernels.py --sections block_gemm (tiny shapes, interpret mode): the bf16 peer, the
    # dequantized weight under XLA's dot (and batched over the K blocks at M <= 16), the
    # engine's w8a16 and w8a8 forms, the skinny kernel's tiles (M <= 64) and the block kernel
    # alone (M > 64) all run, each within its tolerance of the reference, for the GPU session
    # to time; --gemm-ms / --gemm-kn pick the shapes.
    out = tmp_path / "k.jsonl"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--smoke", "--sections",
         "block_gemm", "--loop-reps", "0", "--gemm-ms", "1,80", "--gemm-kn", "256x128", "--out",
         str(out)],
        capture_output=True, text=True,
        timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["impl"] for r in rows} == {"xla_bf16", "xla_block_w8a16", "xla_block_batched",
                                         "block_w8a16", "block_w8a8", "skinny_block_w8a16",
                                         "skinny_block_w8a8", "pallas_fp8_block"}
    assert {r["M"] for r in rows if r["impl"].startswith("skinny")} == {1}  # M <= 64 only
    assert {r["M"] for r in rows if r["impl"] == "xla_block_batched"} == {1}  # M <= 16 only
    assert {(r["K"], r["N"]) for r in rows} == {(256, 128)}
    assert not [r for r in rows if "error" in r or r.get("ok") is False]
    assert all("rel_err" in r for r in rows if r["impl"] != "xla_bf16")


@pytest.mark.parametrize("flag, value", [("--gemm-kn", "4096"), ("--gemm-kn", "4096xN"),
                                         ("--gemm-ms", "1,x"),
                                         ("--block-impls", "mgpu_block_w8a8,mosaic"),
                                         ("--mgpu-configs", "128,4,1;64,4,1,0,1"),
                                         ("--mgpu-configs", "128,4,1,8,x")])
def test_kernels_script_refuses_malformed_gemm_shapes(flag, value):
    # --gemm-kn takes KxN pairs, --gemm-ms integers, --block-impls the section's row names,
    # --mgpu-configs five integers a config: anything else is a usage error (exit 2) naming
    # the flag, before any kernel runs.
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--smoke", "--sections",
         "gemm", flag, value], capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
    assert run.returncode == 2 and flag in run.stderr, run.stderr[-1000:]


def test_table_from_a_sweep_ranks_by_device_time_where_every_row_has_it(tmp_path):
    bench = _load_benchmark()
    # Two decode configs of one shape: A is faster by host wall time (loop), B by GPU time.
    base = dict(section="decode", impl="pallas", ok=True, batch=8, ctx=4096, heads=32, kv_heads=8)
    a = dict(base, config=dict(decode_pages_per_block=8, decode_splits=5), time_us=80.0,
             time_us_loop=60.0, device_us=45.0)
    b = dict(base, config=dict(decode_pages_per_block=4, decode_splits=16), time_us=90.0,
             time_us_loop=70.0, device_us=38.0)
    path = tmp_path / "sweep.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (a, b)))
    assert bench.table_from_results(path)[0] == {(8, 4096): (4, 16)}
    # A row without device_us (an older sweep's) makes the group fall back to the loop time.
    del b["device_us"]
    path.write_text("\n".join(json.dumps(r) for r in (a, b)))
    assert bench.table_from_results(path)[0] == {(8, 4096): (8, 5)}


def test_table_from_several_sweeps_takes_each_shape_from_the_newest_file(tmp_path):
    # An older (H100, wall time) sweep of two shapes and a newer (H200, GPU time) sweep of one
    # of them: that shape takes the newer file's rows alone, the other keeps the older entry.
    bench = _load_benchmark()
    base = dict(section="decode", impl="pallas", ok=True, heads=32, kv_heads=8)
    old = [dict(base, batch=8, ctx=4096, config=dict(decode_pages_per_block=8, decode_splits=5),
                time_us=40.0),
           dict(base, batch=1, ctx=512, config=dict(decode_pages_per_block=8, decode_splits=2),
                time_us=30.0)]
    # Slower in absolute terms than the old file's winner: mixing the two would keep (8, 5).
    new = [dict(base, batch=8, ctx=4096, config=dict(decode_pages_per_block=4, decode_splits=16),
                time_us=90.0, device_us=50.0),
           dict(base, batch=8, ctx=4096, config=dict(decode_pages_per_block=8, decode_splits=5),
                time_us=95.0, device_us=55.0)]
    p_old, p_new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    p_old.write_text("\n".join(json.dumps(r) for r in old))
    p_new.write_text("\n".join(json.dumps(r) for r in new))
    assert bench.table_from_results(p_old, p_new)[0] == {(1, 512): (8, 2), (8, 4096): (4, 16)}
    assert bench.table_from_results(p_new, p_old)[0] == {(1, 512): (8, 2), (8, 4096): (8, 5)}


def _smoke_rows(script: str, tmp_path) -> list[dict]:
    """The JSON rows of ``benchmarks/gpu/<script> --smoke`` run on the CPU."""
    out = tmp_path / "rows.jsonl"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu" / script), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-2000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_qkv_gemm_benchmark_forms_agree(tmp_path):
    # benchmarks/gpu/qkv_gemm.py --smoke (the 8B q/k/v shape, 2 layers, host wall time): every
    # form of the q/k/v GEMM it times (split-K parts 1/2/4/8, with and without the folded
    # norm's prologue, [K, N] and [N, K] weights) computes the same chain as XLA's plain dot.
    rows = _smoke_rows("qkv_gemm.py", tmp_path)
    assert {(r["parts"], r["prologue"], r["layout"]) for r in rows} == {
        (p, g, lay) for p in (1, 2, 4, 8) for g in (True, False) for lay in ("kn", "nk")}
    assert all(r["rel"] < 1e-3 for r in rows), [(r["variant"], r["rel"]) for r in rows]


def test_persistent_chain_benchmark_forms_agree(tmp_path):
    # benchmarks/gpu/persistent_chain.py --smoke (interpret mode, one program, 3 layers): the
    # GEMV chain as XLA's dots, as a Pallas launch a layer and as one persistent launch with
    # its grid barrier (the counter bumped, the wait skipped: one program) all compute the
    # float32 reference's chain.
    rows = _smoke_rows("persistent_chain.py", tmp_path)
    assert [r["variant"] for r in rows] == ["xla", "pallas_layers", "persistent_grid"], rows
    assert all(r["rel"] < 1e-2 for r in rows), [(r["variant"], r["rel"]) for r in rows]


def test_mosaic_gemv_benchmark_tiles_lower_for_hopper(tmp_path):
    # benchmarks/gpu/mosaic_gemv.py times JAX's Mosaic GPU matmul and our split-K form of it at
    # batch-1 rows on the GPU; its --smoke lowers every (shape, tile) it will time for an
    # abstract H100, so a tile Mosaic refuses (e.g. a B slice narrower than the swizzle:
    # tile_n 32 at tile_k 64) fails here, not in a device call.
    rows = _smoke_rows("mosaic_gemv.py", tmp_path)
    mosaic_gemv = _load_benchmark("gpu/mosaic_gemv.py")
    assert len(rows) == len(mosaic_gemv.SHAPES) * (len(mosaic_gemv.TILES)
                                                   + len(mosaic_gemv.SPLITK_TILES)
                                                   + len(mosaic_gemv.FP8_TILES))
    assert sum(r.get("variant") in ("splitk", "swapk") for r in rows) == (
        len(mosaic_gemv.SHAPES) * len(mosaic_gemv.SPLITK_TILES))
    assert all(r["lowered"] for r in rows), [r for r in rows if not r["lowered"]]


def test_mosaic_splitk_gemv_sums_match_reference():
    # The split-K Mosaic GPU GEMM of mosaic_gemv.py, run by Mosaic GPU's interpreter on the CPU
    # over 3 CTAs (so a CTA takes several (column tile, K split) units): its partials sum to
    # the float32 product, the padding rows included; and so do the swapped form's, bf16 and fp8.
    mosaic_gemv = _load_benchmark("gpu/mosaic_gemv.py")
    K, N = 384, 256
    kx, kw = jax.random.split(jax.random.PRNGKey(7))
    x = jax.random.normal(kx, (mosaic_gemv.PAD, K)).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (K, N)).astype(jnp.bfloat16)
    parts = mosaic_gemv.splitk_matmul(64, 64, 2, 3, num_sms=3, interpret=True)(x, w)
    assert parts.shape == (3, mosaic_gemv.PAD, N)
    ref = x.astype(jnp.float32) @ w.astype(jnp.float32)
    # each split's partial on its own, not only the sum
    for s in range(3):
        ks = slice(s * K // 3, (s + 1) * K // 3)
        want = x[:, ks].astype(jnp.float32) @ w[ks].astype(jnp.float32)
        assert float(jnp.linalg.norm(parts[s] - want) / jnp.linalg.norm(want)) < 1e-5, s
    assert float(jnp.linalg.norm(parts.sum(0) - ref) / jnp.linalg.norm(ref)) < 1e-5
    # the swapped form (tokens as wgmma's N): 8 rows, no padding, partials [splits, N, rows]
    parts = mosaic_gemv.splitk_matmul(64, 64, 2, 3, swap=True, num_sms=3, interpret=True)(
        x[:8], w)
    assert parts.shape == (3, N, 8)
    assert float(jnp.linalg.norm(parts.sum(0).T - ref[:8]) / jnp.linalg.norm(ref[:8])) < 1e-5
    # fp8 (W8A8 on the fp8 tensor cores): e4m3 operands, the weight as the engine holds it
    # ([N, K]); e4m3 products are exact in float32, so the sum matches to float32 rounding
    xq, wq = x[:8].astype(mosaic_gemv.FP8), w.T.astype(mosaic_gemv.FP8)
    parts = mosaic_gemv.splitk_matmul(64, 128, 2, 3, swap=True, nk=True, num_sms=3,
                                      interpret=True)(xq, wq)
    ref8 = xq.astype(jnp.float32) @ wq.astype(jnp.float32).T
    assert parts.shape == (3, N, 8)
    assert float(jnp.linalg.norm(parts.sum(0).T - ref8) / jnp.linalg.norm(ref8)) < 1e-5


def test_mosaic_chain_benchmark_interprets_and_lowers(tmp_path):
    # benchmarks/gpu/mosaic_chain.py (the persistent Mosaic GPU chain: 32 o-shaped layers in one
    # launch, a GMEM-semaphore barrier between layers, the K splits' partials TMA-added): its
    # --smoke runs the chain in Mosaic GPU's interpreter in the form the interpreter supports
    # (one CTA, no split, no semaphore: its own token-major stores feed its next layer through
    # the transposed SMEM view) against the float32 reference, and lowers its barrier forms
    # (every variant at one tile, the correct form at every tile) for an abstract H100 (the
    # interpreter runs neither semaphores nor TMA reductions; the semaphore forms were checked
    # on the H200, RESULTS "Rerun of 2026-12-03 (13:09)").
    rows = _smoke_rows("mosaic_chain.py", tmp_path)
    chain = _load_benchmark("gpu/mosaic_chain.py")
    # The flat pipeline (one pipeline over every layer's steps, the accumulator running on
    # and each layer's product taken as a difference) is interpreted too, at 3 stages of 4
    # steps a layer (a stage count the chained form refuses).
    # The gather form (mosaic_gather.py: partials stored into a NaN-filled buffer and polled
    # back by their readers, no signal between layers) is interpreted in its one-CTA form
    # (its own partials polled back), at two tiles; so is the dynamic form (mosaic_dynamic.py:
    # a layer's units claimed from a counter, here one CTA counting in registers), at two
    # tiles.
    interp = [r for r in rows if r["variant"].startswith("interpret")]
    assert {r["variant"] for r in interp} == {
        "interpret", "interpret_flat", "interpret_gather", "interpret_dyn"}
    assert len(interp) == 7 and all(r["rel"] < 1e-2 for r in interp), interp
    lowered = [r for r in rows if "lowered" in r]
    assert {r["variant"] for r in lowered} == set(chain.VARIANTS)
    assert ({(r["splits"], r["tile_k"], r["steps"]) for r in lowered}
            == set(chain.CANDS + chain.FLAT_CANDS))
    assert all(r["lowered"] for r in lowered), [r for r in lowered if not r["lowered"]]


def test_mosaic_chain_fp8_benchmark_interprets_and_lowers(tmp_path):
    # benchmarks/gpu/mosaic_chain_fp8.py (the persistent o chain over e4m3 weights, W8A8 with
    # the activations quantized per token inside the kernel after each barrier; step 1 of the
    # whole-layer kernel's plan for issue 6): --smoke interprets the one-CTA form over 3 layers
    # against its float32 reference (the same quantization of each K slice, the same rounding
    # of each partial to bf16), and lowers every variant at every tile for an abstract H100.
    rows = _smoke_rows("mosaic_chain_fp8.py", tmp_path)
    fp8c = _load_benchmark("gpu/mosaic_chain_fp8.py")
    (interp,) = [r for r in rows if r["variant"] == "interpret"]
    assert interp["layers"] == 3 and interp["rel"] < 1e-2, interp
    lowered = [r for r in rows if "lowered" in r]
    assert ({(r["variant"], r["splits"], r["tile_k"], r["steps"]) for r in lowered}
            == {(v, *c) for v in fp8c.VARIANTS for c in fp8c.CANDS})
    assert all(r["lowered"] for r in lowered), [r for r in lowered if not r["lowered"]]
    # the reference's quantization is what the kernel is checked against: it is not the
    # unquantized product (a chain that skipped the activations' quantization would differ)
    x, w, ws = fp8c.make_inputs(128, 2)
    exact = x.astype(jnp.float32)
    for layer in range(2):
        exact = (exact @ (w[layer].astype(jnp.float32) * ws[layer][:, None]).T).astype(
            jnp.bfloat16).astype(jnp.float32)
    rel = float(jnp.linalg.norm(fp8c.reference(x, w, ws, 1) - exact) / jnp.linalg.norm(exact))
    assert 1e-3 < rel < 0.1, rel


def test_mosaic_mlp_fp8_benchmark_interprets_and_lowers(tmp_path):
    # benchmarks/gpu/mosaic_mlp_fp8.py (the persistent fp8 MLP pair, gate/up | down with a
    # grid barrier after each, the RMSNorm, the SwiGLU and the activations' quantization
    # inside; step 2 of the whole-layer kernel's plan for issue 6): --smoke interprets the
    # one-CTA form over 2 layers (gate/up's K slice in a buffer of its own, with the norm and
    # without; staged as two pieces; in the staging itself), each layer's output, gate/up and
    # sums of squares against the float32 reference of its own input, and lowers every variant
    # at every candidate for an abstract H100.
    rows = _smoke_rows("mosaic_mlp_fp8.py", tmp_path)
    mlp = _load_benchmark("gpu/mosaic_mlp_fp8.py")
    interp = {(r["norm"], r["chunk"], r["a_pieces"]): r for r in rows
              if r["variant"] == "interpret"}
    assert set(interp) == {(True, 128, False), (False, 128, False), (True, 128, True),
                           (True, 256, False)}
    for r in interp.values():  # exact up to float32 reassociation: it rounds where they do
        assert r["layers"] == 2 and r["layer_rel"] < 1e-3 and r["gu_rel"] < 1e-3, r
        assert not r["norm"] or r["ssq_rel"] < 1e-5, r
    lowered = [r for r in rows if "lowered" in r]
    assert ({(r["variant"], r["G"], r["tile_k"], r["steps"], r["chunk"]) for r in lowered}
            == {(v, *c) for v in mlp.VARIANTS for c in mlp.CANDS})
    assert all(r["lowered"] for r in lowered), [r for r in lowered if not r["lowered"]]
    # the reference is the layer's MLP up to the quantizations (not something else the kernel
    # could match by accident), and its runs' split does not change the sum
    x, g, w_gu, s_gu, w_dn, s_dn = mlp.make_inputs(256, 512, 1)
    f32 = jnp.float32
    hn = x.astype(f32) * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(f32)), -1, keepdims=True)
                                       + mlp.EPS) * g[0].astype(f32)
    gu = (hn @ (w_gu[0].astype(f32) * s_gu[0][:, None]).T).reshape(mlp.T, 512 // 64, 2, 64)
    gate, up = gu[:, :, 0].reshape(mlp.T, 512), gu[:, :, 1].reshape(mlp.T, 512)
    exact = x.astype(f32) + (jax.nn.silu(gate) * up) @ (
        w_dn[0].astype(f32) * s_dn[0][:, None]).T
    layer = (x, g[0], w_gu[0], s_gu[0], w_dn[0], s_dn[0])
    one = mlp.reference_layer(*layer, G=1, splits_a=1, chunk=128)[0].astype(f32)
    runs = mlp.reference_layer(*layer, G=4, splits_a=1, chunk=128)[0].astype(f32)
    nonorm = mlp.reference_layer(*layer, G=1, splits_a=1, chunk=128, norm=False)[0]
    dist = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))  # noqa: E731
    assert 1e-3 < dist(one, exact) < 0.05 and 1e-3 < dist(runs, exact) < 0.05
    assert 0 < dist(runs, one) < 5e-3  # 2 runs a tile: bf16 partials
    assert dist(nonorm.astype(f32), exact) > 0.1  # the norm is in the reference


def test_mosaic_mlp_fp8_benchmark_refuses_what_it_cannot_split():
    # mosaic_mlp_fp8.py's refusals (a clear ValueError, never a wrong split or a hang): shapes
    # its CTAs do not divide, a one-CTA form asked for a K split or a grid barrier, K slices
    # that do not split into whole rounds of the pipeline's stages.
    mlp = _load_benchmark("gpu/mosaic_mlp_fp8.py")
    assert mlp.plan(128, 4096, 14336, 4, 512)["nb"] == 7  # the H100's candidate divides
    for bad in ((128, 4096, 14336, 3, 512), (128, 4096, 14336, 4, 1000),
                (96, 4096, 14336, 4, 512), (128, 4000, 14336, 4, 512)):
        with pytest.raises(ValueError, match="do not split"):
            mlp.plan(*bad)
    for kw in (dict(sync=True), dict(sync=False, splits_a=2)):
        with pytest.raises(ValueError, match="one-CTA form"):
            mlp.mlp_chain(1, 128, 1, 128, **kw)
    sds = jax.ShapeDtypeStruct
    row = {}  # 1024-wide K slices cannot take rounds of 3 steps of 256
    assert not _load_benchmark("gpu_trace.py").lower_for_h100(
        row, mlp.mlp_chain(112, 256, 3, 1024), sds((mlp.T, mlp.H), jnp.bfloat16),
        sds((1, mlp.H), jnp.bfloat16), sds((1, 2 * mlp.F, mlp.H), jnp.float8_e4m3fn),
        sds((1, 2 * mlp.F), jnp.float32), sds((1, mlp.H, mlp.F), jnp.float8_e4m3fn),
        sds((1, mlp.H), jnp.float32))
    assert "whole rounds of 3 steps" in row["error"], row


def test_mosaic_attn_fp8_benchmark_interprets_and_lowers(tmp_path):
    # benchmarks/gpu/mosaic_attn_fp8.py (the persistent fp8 attention half: q/k/v with the
    # RMSNorm folded in | rope, paged attention partials and the new token's K/V | o with the
    # partials' combine and the residual, a grid barrier after each; step 3a of the whole-layer
    # kernel's plan for issue 6): --smoke interprets the one-CTA form over 2 layers at a
    # 100-position context (two blocks of pages, the second short and masked), every phase
    # against the float32 reference of the kernel's own input to it, and lowers the grid forms
    # for an abstract H100.
    rows = _smoke_rows("mosaic_attn_fp8.py", tmp_path)
    attn = _load_benchmark("gpu/mosaic_attn_fp8.py")
    (r,) = [r for r in rows if r["variant"] == "interpret"]
    # rounds where the reference does; the attention's P and partials are bf16 (2e-3); x_{l+1}
    # sums a tile's pairs in float32 here, the reference rounds each (the grid's TMA adds)
    assert r["qkv"] < 1e-3 and r["ssq"] < 1e-5 and r["kv"] < 1e-3, r
    assert r["attn"] < 1e-2 and r["out"] < 5e-3, r
    lowered = [r for r in rows if "lowered" in r]
    assert ({(r["variant"], r["G"], r["tile_k"], r["steps"]) for r in lowered}
            == {(v, *c) for v in attn.VARIANTS for c in attn.CANDS})
    assert all(r["lowered"] for r in lowered), [r for r in lowered if not r["lowered"]]
    # the references are attention and o (not something the kernel could match by accident):
    # natural-base softmax attention of roped, RMS-normed q over the pages and the new k / v
    args = attn.make_inputs(1, 40, h=512, n_pt=16)
    x, g, w_qkv, s_qkv, w_o, s_o, kp, vp, pt, pos, rope = args
    f32 = jnp.float32
    qkv, ssq = attn.reference_qkv(x, g[0], w_qkv[0], s_qkv[0], splits_q=1)
    hn = x.astype(f32) * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(f32)), -1, keepdims=True)
                                       + attn.EPS) * g[0].astype(f32)
    exact_qkv = (hn @ (w_qkv[0].astype(f32) * s_qkv[0][:, None]).T).reshape(attn.T, -1, 128)
    inv = jax.lax.rsqrt(ssq[0] / 512 + attn.EPS)
    dist = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))  # noqa: E731
    assert 1e-3 < dist(qkv.astype(f32) * inv, exact_qkv) < 5e-2  # e4m3's error, no more

    def rot(v):  # HF's rotate_half rope at position 40
        ang = 40 * 500000.0 ** (-jnp.arange(0, 128, 2) / 128)
        c, s_ = jnp.concatenate([jnp.cos(ang)] * 2), jnp.concatenate([jnp.sin(ang)] * 2)
        return v * c + jnp.concatenate([-v[..., 64:], v[..., :64]], -1) * s_

    row = qkv[0].astype(f32) * inv
    q, k_new, v_new = rot(row[:32]), rot(row[32:40]), row[40:48]
    idx = jnp.arange(40)
    k = jnp.concatenate([kp[0][pt[idx // 16], idx % 16].astype(f32), k_new[None]])
    v = jnp.concatenate([vp[0][pt[idx // 16], idx % 16].astype(f32), v_new[None]])
    p = jax.nn.softmax(jnp.einsum("hd,phd->hp", q, jnp.repeat(k, 4, 1)) / jnp.sqrt(128.0), -1)
    exact = jnp.einsum("hp,phd->hd", p, jnp.repeat(v, 4, 1))
    out, kv = attn.reference_attention(qkv, ssq, kp[0], vp[0], pt, 40, rope, nh=32, h=512)
    assert dist(out, exact) < 1e-2 and dist(kv[0].astype(f32), k_new) < 1e-2
    o_exact = x.astype(f32).at[0].add((w_o[0].astype(f32) * s_o[0][:, None]) @ exact.reshape(-1))
    assert 1e-4 < dist(attn.reference_o(x, out, w_o[0], s_o[0]).astype(f32), o_exact) < 2e-2
    # and its refusals: a KV-head count its [8, 128] tiles do not take, a grid that does not
    # divide the work, a one-CTA form with a grid barrier
    with pytest.raises(ValueError, match="do not split"):
        attn.plan(128, 4096, 64, 16, 8)
    with pytest.raises(ValueError, match="do not split"):
        attn.plan(96, 4096, 32, 8, 8)
    with pytest.raises(ValueError, match="one-CTA form"):
        attn.attn_chain(1, 128, 1, splits_q=1, sync=True)


def test_grid_barrier_benchmark_lowers_and_refuses_what_would_hang(tmp_path):
    # benchmarks/gpu/grid_barrier.py (the chain's barrier alone: its latency a round, with the
    # epilogue's store / add and the activations' reload, beside a weight stream or not;
    # RESULTS "Rerun of 2026-12-04 (00:28)"): the interpreter runs
    # no semaphores, so --smoke lowers every form for an abstract H100; a grid over more CTAs
    # than SMs (it would spin forever) and an unknown form are refused at trace time.
    rows = _smoke_rows("grid_barrier.py", tmp_path)
    gb = _load_benchmark("gpu/grid_barrier.py")
    assert {r["form"] for r in rows} == set(gb.FORMS)
    assert ("add_load", 2) in {(r["form"], r["stream"]) for r in rows}  # beside a stream
    assert all(r["lowered"] for r in rows), rows
    with pytest.raises(ValueError, match="needs them all resident"):
        gb.barrier_rounds(4, 133, num_sms=132)
    with pytest.raises(ValueError, match="unknown form"):
        gb.barrier_rounds(4, 128, "fence", num_sms=132)
    with pytest.raises(ValueError, match="a grid of at least 16"):
        gb.barrier_rounds(4, 8, "add_load", num_sms=132)


def test_mosaic_pdl_benchmark_interprets_lowers_and_asks_for_pdl(tmp_path):
    # benchmarks/gpu/mosaic_pdl.py (a Mosaic GPU kernel a layer, launched with programmatic
    # dependent launch: the weight stream starts before griddepcontrol.wait; RESULTS "Rerun of
    # 2026-12-04 (02:58)"): the interpreter has no griddepcontrol, so --smoke interprets the
    # plain form (wide and narrow CTAs; at D = 256 two K splits, so every later layer sums two
    # partials) against the float32 reference, and lowers every variant for an abstract H100.
    rows = _smoke_rows("mosaic_pdl.py", tmp_path)
    pdl = _load_benchmark("gpu/mosaic_pdl.py")
    interp = [r for r in rows if r["variant"].startswith("interpret")]
    assert len(interp) == 5 and all(r["rel"] < 1e-2 for r in interp), interp
    assert {(r["splits"], r["variant"]) for r in interp} >= {(2, "interpret"),
                                                             (2, "interpret_narrow")}
    lowered = [r for r in rows if "lowered" in r]
    assert {r["variant"] for r in lowered} == set(pdl.VARIANTS)
    assert ({(r["splits"], r["tile_k"], r["steps"]) for r in lowered}
            == set(pdl.CANDS + pdl.NARROW_CANDS))
    assert all(r["lowered"] for r in lowered), [r for r in lowered if not r["lowered"]]
    # The wait is what makes Mosaic launch the kernel with PDL (the module's uses_pdl
    # attribute): the pdl forms carry it, the plain form does not.
    from jax.sharding import AbstractDevice, AbstractMesh
    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    sds = jax.ShapeDtypeStruct
    args = (sds((pdl.T, 4096), jnp.bfloat16), [sds((4096, 4096), jnp.bfloat16)] * 2,
            sds((), jnp.bfloat16))
    for variant, uses in (("pdl_late_narrow", True), ("plain", False)):
        with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=dev)):
            text = pdl.chain_of(variant, 4, 128, 4).trace(*args).lower(
                lowering_platforms=("cuda",)).as_text()
        assert ("mosaic_gpu.uses_pdl" in text) == uses, variant
    with pytest.raises(ValueError, match="unknown variant"):
        pdl.chain_of("pdl_soon", 4, 128, 4)
    with pytest.raises(ValueError, match="without the wait"):
        pdl.pdl_layer(4, 128, 4, pdl=False, trigger="early")


def test_mosaic_chain_refuses_a_grid_barrier_over_more_ctas_than_sms():
    # A grid barrier over CTAs that cannot all be resident would spin forever on the GPU: the
    # chain refuses it at trace time (8 K splits of the o shape: 256 CTAs on 132 SMs), and
    # takes the same grid without a barrier.
    chain = _load_benchmark("gpu/mosaic_chain.py")
    x = jax.ShapeDtypeStruct((chain.T, 4096), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((2, 4096, 4096), jnp.bfloat16)
    with pytest.raises(ValueError, match="needs them all resident"):
        chain.mosaic_chain(8, 128, 4, num_sms=132).trace(x, w)
    chain.mosaic_chain(8, 128, 4, sync=False, num_sms=132).trace(x, w)
    chain.mosaic_chain(4, 128, 4, num_sms=132).trace(x, w)
    # the L2 prefetchers are 4 CTAs more (132 of 132), and pace themselves by the barrier
    chain.mosaic_chain(4, 128, 4, prefetch=4, num_sms=132).trace(x, w)
    with pytest.raises(ValueError, match="needs them all resident"):
        chain.mosaic_chain(4, 128, 4, prefetch=4, num_sms=130).trace(x, w)
    with pytest.raises(ValueError, match="pace themselves by the grid barrier"):
        chain.mosaic_chain(4, 128, 4, prefetch=4, sync=False, num_sms=132).trace(x, w)
    with pytest.raises(ValueError, match="not the flat one"):
        chain.mosaic_chain(4, 128, 4, self_prefetch=4, flat=True, num_sms=132).trace(x, w)


def test_mosaic_chain_profile_summary_reads_a_trace(tmp_path):
    # mosaic_chain.py --profile reads Mosaic GPU's on-device profiler traces (B / E events a
    # warpgroup, times stamped in SM cycles): a hand-made trace of two compute warpgroups over
    # three layers, whose regions, tile waits and barrier latency are known, read back.
    chain = _load_benchmark("gpu/mosaic_chain.py")

    def events(tid, layers):
        spans = [(name, span) for lay in layers for name, v in lay.items()
                 for span in (v if name in ("mma", "poll") else [v])]
        ev = [dict(name=n, ph=ph, ts=t, tid=tid, pid=1)
              for n, (b, e) in spans for ph, t in (("B", b), ("E", e))]
        return sorted(ev, key=lambda x: (x["ts"], x["ph"] == "B"))

    a = [dict(xload=(0, 1), pipe=(1, 5), mma=[(1.5, 2), (3, 3.5)], epi=(5, 6)),
         dict(wait=(6, 7.5), xload=(7.5, 8), pipe=(8, 12), mma=[(8, 8.5), (11, 11.5)],
              epi=(12, 13)),
         dict(wait=(13, 14), xload=(14, 14.5), pipe=(14.5, 18), mma=[(14.5, 15), (17, 17.5)],
              epi=(18, 19))]
    b = [dict(a[0], epi=(5, 7)), dict(a[1], wait=(7, 7.5), epi=(12, 13.5)),
         dict(a[2], wait=(13.5, 14))]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"displayTimeUnit": "ns",
                                "traceEvents": events(1, a) + events(2, b)}))
    s = chain.profile_summary(str(path), clock_ghz=1.0)
    assert s["warpgroups"] == 2
    assert s["barrier_first"] == pytest.approx(0.5)  # the last signal (7, 13.5) to the release
    assert s["tile_wait_first_half"] == pytest.approx(0.0)
    assert s["tile_wait_second_half"] == pytest.approx(2.25)  # 2.5 and 2.0
    assert s["period"] == pytest.approx(6.25)  # 7, 6, 6.5, 5.5
    assert s["wait"] == pytest.approx(0.75)  # 1.5, 1.0, 0.5, 0.5
    assert s["pipe"] == pytest.approx(3.75)
    # per warpgroup of a CTA (trace ids CTA-major from 1: ids 1 and 2 are warpgroups 0 and 1)
    assert s["by_warpgroup"][0]["wait"] == pytest.approx(1.25)
    assert s["by_warpgroup"][1]["wait"] == pytest.approx(0.5)
    # cycles at 2 GHz take half the time
    assert chain.profile_summary(str(path), clock_ghz=2.0)["pipe"] == pytest.approx(1.875)
    # the gather form has no activations' load after layer 0: its layers still count
    g = [a[0]] + [{k: v for k, v in lay.items() if k != "xload"} for lay in a[1:]]
    g[1]["poll"] = [(6.2, 6.5), (6.5, 7.5)]  # two loads of the partials inside the wait
    g[2]["poll"] = [(13.5, 14)]
    path.write_text(json.dumps({"traceEvents": events(1, g)}))
    s = chain.profile_summary(str(path), clock_ghz=1.0)
    assert s["wait"] == pytest.approx(1.25) and s["period"] == pytest.approx(6.5)
    assert s["polls"] == pytest.approx(1.5) and s["poll"] == pytest.approx(0.75)  # 1.0, 0.5


def test_mosaic_chain_signal_forms_lower_to_the_atomics_they_name():
    # The chain's signal forms (benchmarks/gpu/mosaic_chain.py): Pallas' semaphore_signal is a
    # release add (the correct form); `_relaxed` a relaxed add (measured wrong in 12-17% of
    # calls on the H200: timing only); `_relfence` a relaxed add after a release fence;
    # `_postfence` the acq_rel fence after the relaxed add (its stall, not its order). The
    # lowered kernels carry exactly those atomics per layer (the zeroing phase's signal is
    # Pallas' release add in every form).
    import re

    from jax.sharding import AbstractDevice, AbstractMesh

    chain = _load_benchmark("gpu/mosaic_chain.py")
    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = AbstractMesh((1,), ("x",), abstract_device=dev)
    x = jax.ShapeDtypeStruct((chain.T, 4096), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((2, 4096, 4096), jnp.bfloat16)

    def ptx(variant):
        with jax.sharding.use_abstract_mesh(mesh):
            text = chain.chain_for(variant, 4, 128, 4).trace(x, w).lower(
                lowering_platforms=("cuda",)).as_text()
        return (set(re.findall(r"red\.\w+\.gpu", text)),
                set(re.findall(r"fence\.(?:release|acq_rel)\.gpu", text)))

    assert ptx("sync") == ({"red.release.gpu"}, set())
    assert ptx("sync_relaxed") == ({"red.release.gpu", "red.relaxed.gpu"}, set())
    assert ptx("sync_relfence") == ({"red.release.gpu", "red.relaxed.gpu"},
                                    {"fence.release.gpu"})
    assert ptx("sync_postfence") == ({"red.release.gpu", "red.relaxed.gpu"},
                                     {"fence.acq_rel.gpu"})
    with pytest.raises(ValueError, match="unknown variant"):
        chain.chain_for("sync_fast", 4, 128, 4)
