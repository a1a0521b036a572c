"""The fused residual add + RMSNorm of small steps (pallas_kernels/add_rms_norm.py,
jaxllm/models/add_norm.py): the kernel against its reference (interpret mode), and the model's
fused path against its layer-by-layer path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.models.add_norm import (ADD_NORM_ENV, ADD_NORM_MAX_TOKENS, ADD_NORM_SPLIT_K_ENV,
                                    add_norm_applies, split_k_for)
from pallas_kernels.add_rms_norm import add_rms_norm, add_rms_norm_reference
from tests.helpers import small_llama_folder  # noqa: F401 (fixture)
from tests.test_fp8 import _random_seqs, batch_logprobs


@pytest.mark.parametrize("S,T,E,dtype,with_scale", [
    (8, 8, 256, jnp.bfloat16, False),
    (4, 3, 576, jnp.bfloat16, True),   # E not a power of two: masked columns
    (1, 5, 64, jnp.float32, True),     # one partial: a finished GEMM output
    (2, 1, 4096, jnp.bfloat16, False),
])
def test_add_rms_norm_kernel_matches_the_reference(S, T, E, dtype, with_scale):
    """Fresh random inputs: the new residual h is the reference's exactly, the normed rows
    within one rounding of the model dtype (the float32 sum's order may differ)."""
    k = jax.random.split(jax.random.key(S * 1000 + T * 10 + E), 4)
    partials = jax.random.normal(k[0], (S, T, E), jnp.float32)
    residual = (3.0 * jax.random.normal(k[1], (T, E))).astype(dtype)
    weight = (1.0 + 0.1 * jax.random.normal(k[2], (E,))).astype(dtype)
    scale = jax.random.uniform(k[3], (E,), minval=0.01, maxval=2.0) if with_scale else None
    h, n = add_rms_norm(partials, residual, weight, eps=1e-5, scale=scale, interpret=True)
    h0, n0 = add_rms_norm_reference(partials, residual, weight, eps=1e-5, scale=scale)
    assert h.dtype == n.dtype == dtype and h.shape == n.shape == (T, E)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(h, np.float32), np.asarray(h0, np.float32),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(n, np.float32), np.asarray(n0, np.float32),
                               rtol=tol, atol=tol)
    # The reference is what the unfused layers compute: the GEMM's output rounded to the model
    # dtype, added to the residual, then HF's RMSNorm.
    delta = jnp.sum(partials, axis=0) * (1.0 if scale is None else scale)
    x = residual + delta.astype(dtype)
    xf = x.astype(jnp.float32)
    want = weight * (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-5)).astype(dtype)
    np.testing.assert_array_equal(np.asarray(h0, np.float32), np.asarray(x, np.float32))
    np.testing.assert_allclose(np.asarray(n0, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)


def test_add_rms_norm_rejects_mismatched_shapes():
    p = jnp.zeros((2, 3, 64), jnp.float32)
    r = jnp.zeros((3, 64), jnp.bfloat16)
    w = jnp.ones((64,), jnp.bfloat16)
    with pytest.raises(ValueError, match="partials must be"):
        add_rms_norm(p, r[:2], w, eps=1e-5, interpret=True)
    with pytest.raises(ValueError, match="weight and scale"):
        add_rms_norm(p, r, w[:32], eps=1e-5, interpret=True)
    with pytest.raises(ValueError, match="weight and scale"):
        add_rms_norm(p, r, w, eps=1e-5, scale=jnp.ones((8,)), interpret=True)


def test_split_k_for_follows_xlas_split_and_the_override(monkeypatch):
    # The 8B shape's o (4096) and down (14336) GEMMs: 8 partials, as XLA splits them at 8 rows.
    assert split_k_for(4096) == 8 and split_k_for(14336) == 8
    assert split_k_for(576) == 2 and split_k_for(64) == 1  # >= 256 inputs a split
    monkeypatch.setenv(ADD_NORM_SPLIT_K_ENV, "4")
    assert split_k_for(64) == 4
    for bad in ("3", "0", "x"):
        monkeypatch.setenv(ADD_NORM_SPLIT_K_ENV, bad)
        with pytest.raises(ValueError, match=ADD_NORM_SPLIT_K_ENV):
            split_k_for(64)


@pytest.fixture(scope="module")
def small_fused(small_llama_folder):  # noqa: F811
    from jaxllm.loading import load_model
    from jaxllm.models.fused import fuse_projections

    return fuse_projections(load_model(str(small_llama_folder), dtype="float32").model)


def _jaxpr_has_kernel(model, T: int) -> bool:
    """Whether a forward of one sequence of T new tokens traces the add_rms_norm kernel."""
    from jaxllm.models.attention import AttentionMetadata

    mc = model.config
    kv = [(jnp.zeros((4, 8, mc.num_key_value_heads, mc.head_dim)),) * 2
          for _ in range(mc.num_hidden_layers)]
    md = AttentionMetadata(slot_mapping=jnp.arange(T, dtype=jnp.int32) + 8,
                           query_start_loc=jnp.array([0, T], jnp.int32),
                           seq_lens=jnp.array([T], jnp.int32),
                           page_table=jnp.array([[1, 2, 3]], jnp.int32),
                           num_seqs=jnp.array([1], jnp.int32))
    jaxpr = jax.make_jaxpr(lambda ids: model(ids, jnp.arange(T, dtype=jnp.int32), kv, md)[0])(
        jnp.zeros((T,), jnp.int32))
    return "add_rms_norm" in str(jaxpr)


@pytest.mark.parametrize("split_k", ["", "4"])
def test_small_steps_with_the_fused_add_norm_give_the_layer_by_layer_logprobs(
        small_fused, monkeypatch, split_k):
    """JAXLLM_FUSED_ADD_NORM=1: steps of <= ADD_NORM_MAX_TOKENS rows run the kernel (the o and
    down projections leave split-K partials, default and 4 ways), larger ones and the switch off
    do not, and the log-probs are the unfused model's (float32: summation order only)."""
    monkeypatch.setenv(ADD_NORM_SPLIT_K_ENV, split_k)
    seqs = _random_seqs(n=2, lo=4, hi=8, seed=5)  # 2 sequences, <= 16 tokens in all
    assert sum(map(len, seqs)) <= ADD_NORM_MAX_TOKENS
    monkeypatch.delenv(ADD_NORM_ENV, raising=False)
    assert not _jaxpr_has_kernel(small_fused, 8)  # off unless asked for
    want = batch_logprobs(small_fused, seqs)
    monkeypatch.setenv(ADD_NORM_ENV, "1")
    assert _jaxpr_has_kernel(small_fused, 8)
    assert not _jaxpr_has_kernel(small_fused, ADD_NORM_MAX_TOKENS + 1)
    got = batch_logprobs(small_fused, seqs)
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv(ADD_NORM_ENV, "yes")
    with pytest.raises(ValueError, match=ADD_NORM_ENV):
        _jaxpr_has_kernel(small_fused, 8)


def test_fp8_weight_only_steps_take_the_fused_add_norm_with_the_weight_scale(
        small_fused, monkeypatch):
    """An fp8 model's weight-only (W8A16) steps leave partials before the weight scale, which
    the kernel applies: the log-probs equal the unfused fp8 model's. W8A8 steps (per-token
    activation scales) and layers with a bias keep the unfused path."""
    from jaxllm.models.fp8 import quantize_model

    q = quantize_model(small_fused)
    seqs = _random_seqs(n=2, lo=4, hi=8, seed=6)
    monkeypatch.setenv("JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS", "16")
    monkeypatch.setenv(ADD_NORM_SPLIT_K_ENV, "2")
    monkeypatch.setenv(ADD_NORM_ENV, "0")
    want = batch_logprobs(q, seqs)
    monkeypatch.setenv(ADD_NORM_ENV, "1")
    assert add_norm_applies(8, q.model.layers)
    got = batch_logprobs(q, seqs)
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS", "0")  # W8A8
    assert not add_norm_applies(8, q.model.layers)
    monkeypatch.setenv("JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS", "16")
    with_bias = nnx.clone(small_fused)
    down = with_bias.model.layers[1].mlp.down_proj
    down.bias = nnx.Param(jnp.zeros((down.kernel.shape[1],), jnp.float32))
    assert add_norm_applies(8, small_fused.model.layers)
    assert not add_norm_applies(8, with_bias.model.layers)
