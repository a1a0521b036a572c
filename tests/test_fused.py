"""Fused q/k/v and gate/up projections (jaxllm/models/fused.py) compute what the separate ones do,
dense and fp8, and convert back to the separate HF tensors exactly."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import LLM, SamplingParams
from jaxllm.config import EngineConfig, ModelConfig
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.loading.weights import model_to_hf_tensors
from jaxllm.models.fp8 import quantize_model
from jaxllm.models.fused import fuse_projections
from jaxllm.models.llama import LlamaForCausalLM

from .helpers import small_llama_folder  # noqa: F401  (fixture)

# GQA 8 query / 2 KV heads (4 per group), every bias, q/k norms: each part of the layout counts.
CONFIG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128, hidden_size=64,
                     intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=16, attention_bias=True, mlp_bias=True,
                     qk_norm=True)


def _random_model(seed: int) -> LlamaForCausalLM:
    """CONFIG in float32 with every param random (biases too: they init to zeros)."""
    model = LlamaForCausalLM(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    flat = []
    for i, (path, v) in enumerate(nnx.to_flat_state(state)):
        x = v.get_value()
        flat.append((path, v.replace(x + 0.05 * jax.random.normal(jax.random.key(seed * 1000 + i),
                                                                  x.shape, x.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _projections(model, x):
    """Per layer (q [T, H, D], k [T, K, D], v [T, K, D], mlp(x) [T, E]), fused or not."""
    T, H, K, D = x.shape[0], 8, 2, 16
    out = []
    for layer in model.model.layers:
        a = layer.self_attn
        if a.qkv_proj is not None:
            qkv = a.qkv_proj(x)  # [T, K, (G + 2) D]
            assert qkv.shape == (T, K, (H // K + 2) * D)
            q, k, v = qkv[:, :, :-2 * D].reshape(T, H, D), qkv[:, :, -2 * D:-D], qkv[:, :, -D:]
        else:
            q, k, v = (a.q_proj(x).reshape(T, H, D), a.k_proj(x).reshape(T, K, D),
                       a.v_proj(x).reshape(T, K, D))
        out.append(tuple(np.asarray(t) for t in (q, k, v, layer.mlp(x))))
    return out


def _hf_tensors(model) -> dict[str, np.ndarray]:
    return {n: np.asarray(t() if callable(t) else t).astype(np.float32)
            for n, t in model_to_hf_tensors(model)}


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "fp8"])
def test_fused_projections_compute_what_the_separate_ones_do(quantized):
    separate = _random_model(seed=1)
    if quantized:
        separate = quantize_model(separate)
    fused = fuse_projections(separate)
    assert fused.config.fused_projections and not separate.config.fused_projections
    assert fused.model.layers[0].self_attn.q_proj is None
    assert fused.model.layers[0].mlp.gate_up_proj is not None
    x = jax.random.normal(jax.random.key(2), (5, 64), jnp.float32)
    # Same products, one GEMM instead of three (two): float32 sums in another order at most;
    # fp8 quantizes the shared input once, to the same per-token scales.
    for got, want in zip(_projections(fused, x), _projections(separate, x)):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    # Quantizing a fused model gives the fused quantized model (same per-channel scales).
    if quantized:
        dense_fused = fuse_projections(_random_model(seed=1))
        a, b = _hf_tensors(quantize_model(dense_fused)), _hf_tensors(fused)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_split_k_partials_sum_to_the_projection(monkeypatch):
    # FusedLinear.split_k: the q/k/v GEMM's split-K partial products, which the decode kernel
    # sums (the qkv_split_k knob). Their sum is the projection, dense and fp8 weight-only; the
    # cases it cannot serve (a bias, W8A8 activations, a split not dividing the input) say so.
    import dataclasses

    config = dataclasses.replace(CONFIG, attention_bias=False, mlp_bias=False, qk_norm=False)
    model = fuse_projections(LlamaForCausalLM(config, dtype=jnp.float32, rngs=nnx.Rngs(4)))
    proj = model.model.layers[0].self_attn.qkv_proj
    x = jax.random.normal(jax.random.key(5), (3, 64), jnp.float32)
    for q in (False, True):
        if q:
            monkeypatch.setenv("JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS", "16")  # as on a GPU
            proj = quantize_model(model).model.layers[0].self_attn.qkv_proj
        want = np.asarray(proj(x))
        for parts in (2, 4):
            got = proj.split_k(x, parts)
            assert got.shape == (parts * 3,) + want.shape[1:] and got.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(got.reshape(parts, *want.shape).sum(0)), want,
                                       rtol=1e-5, atol=1e-5)
        assert proj.split_k(x, 3) is None  # 64 input features
    monkeypatch.setenv("JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS", "2")
    assert proj.split_k(x, 2) is None  # 3 tokens: W8A8, activations quantized
    assert fuse_projections(_random_model(seed=1)).model.layers[0].self_attn.qkv_proj.split_k(
        x, 2) is None  # a bias


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "fp8"])
def test_a_fused_model_converts_back_to_the_separate_hf_tensors(quantized):
    separate = _random_model(seed=3)
    if quantized:
        separate = quantize_model(separate)
    want, got = _hf_tensors(separate), _hf_tensors(fuse_projections(separate))
    assert got.keys() == want.keys()
    assert "model.layers.1.self_attn.k_proj.weight" in got
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_static_input_scales_fuse_to_their_max():
    # A pre-quantized checkpoint's q/k/v (gate/up) may carry different static activation scales;
    # the fused GEMM quantizes its one input once, with the largest (no value clips harder).
    import dataclasses

    cfg = dataclasses.replace(CONFIG, quantization="fp8", activation_scheme="static")
    model = LlamaForCausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    for lin, s in ((attn.q_proj, 0.5), (attn.k_proj, 2.0), (attn.v_proj, 1.0),
                   (mlp.gate_proj, 0.25), (mlp.up_proj, 0.125)):
        lin.input_scale.set_value(jnp.float32(s))
    fused = fuse_projections(model).model.layers[0]
    assert float(fused.self_attn.qkv_proj.input_scale.get_value()) == 2.0
    assert float(fused.mlp.gate_up_proj.input_scale.get_value()) == 0.25


def test_consume_frees_each_separate_projection():
    separate = _random_model(seed=4)
    x = jax.random.normal(jax.random.key(5), (3, 64), jnp.float32)
    want = _projections(separate, x)
    q = separate.model.layers[1].self_attn.q_proj.kernel.get_value()
    up = separate.model.layers[1].mlp.up_proj.kernel.get_value()
    norm = separate.model.layers[1].input_layernorm.weight.get_value()
    fused = fuse_projections(separate, consume=True)
    assert q.is_deleted() and up.is_deleted()
    assert not norm.is_deleted()  # moved over as is
    for got, w in zip(_projections(fused, x), want):
        for g, ww in zip(got, w):
            np.testing.assert_allclose(g, ww, rtol=1e-5, atol=1e-5)


def _llm(**kw) -> LLM:
    llm = LLM.__new__(LLM)
    llm.llm_engine = LLMEngine(EngineConfig(**kw))
    llm._counter = itertools.count()
    return llm


def test_the_engine_serves_the_fused_model_with_the_separate_models_outputs(small_llama_folder):
    kw = dict(model=str(small_llama_folder), dtype="float32", max_model_len=96, num_pages=24,
              max_num_seqs=4, token_buckets=(8, 32), skip_compile_at_start=True)
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2)
    prompts = [{"prompt_token_ids": p} for p in ([1, 450, 7483, 310, 3444], [1, 822, 5713])]
    outs = {}
    for fuse in (True, False):
        llm = _llm(fuse_projections=fuse, **kw)
        layer = llm.llm_engine.runner.state["model"]["layers"][0]
        assert ("qkv_proj" in layer["self_attn"]) == fuse
        assert ("gate_up_proj" in layer["mlp"]) == fuse
        assert ("q_proj" in layer["self_attn"]) == (not fuse)
        outs[fuse] = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(outs[True], outs[False]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for tok in la:
                assert la[tok].logprob == pytest.approx(lb[tok].logprob, abs=1e-4)
