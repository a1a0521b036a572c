"""Llama-family decoder in Flax NNX: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, SmolLM2,
Phi-3/4, Gemma, Gemma 2.

One class covers the family; the differences are switches on ``ModelConfig``:
  - GQA (``num_key_value_heads < num_attention_heads``)
  - rope scaling "default" / "linear" / "llama3" (others raise)
  - q/k/v projection bias (Qwen2), o_proj and MLP bias (Llama configs that ask for them)
  - per-head q/k RMSNorm before rope (Qwen3; head_dim may differ from E / H)
  - sliding window attention (Mistral; Qwen2/3 on the layers their config selects)
  - tied input/output embeddings (SmolLM2, Llama 3.2 1B/3B, small Qwens, Gemma)
  - Granite 3: multipliers on the embeddings, the attention scores (its scale), each residual
    branch, and a divisor on the logits
  - Gemma: GeGLU (tanh-approximated or exact GELU), norms scaling by (1 + w) in float32,
    embeddings multiplied by sqrt(E); Gemma 2 also: four norms a layer (the attention's and the
    MLP's outputs normed before the residual add), its own attention scale, tanh soft-caps on
    the attention scores and the final logits, sliding windows on alternate layers. The fused
    fast paths that assume Llama's norm and SiLU (the norm folded into the q/k/v GEMM, the
    normed SwiGLU kernel, fp8's SwiGLU kernel) step aside for these models.

Dimension keys: T tokens (ragged batch, padded), E hidden size, H query heads, K kv heads,
D head dim, F intermediate size, V vocab, P pages, B page size, N rows to compute logits for.

Parameter names mirror the HF checkpoint names (``model.layers[i].self_attn.q_proj.kernel`` for
``model.layers.i.self_attn.q_proj.weight``) so the loaders map one to the other by rule;
linear kernels are stored ``[in, out]`` (HF's transpose). With ``config.fused_projections``
(what the engine serves: ``jaxllm.models.fused``) q/k/v are one ``qkv_proj`` and gate/up one
``gate_up_proj``; the loaders build the separate layout and the engine fuses it. Creating the
model under ``nnx.eval_shape`` allocates nothing, which is how the loaders build the structure.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import ModelConfig, gemm_out_dtype_from_env
from jaxllm.models.attention import (AttentionMetadata, KVCache, mlp_kernel_applies,
                                     qkv_norm_folds, qkv_rope_applies, qkv_split_k_parts,
                                     rope_write_kv_and_attend, write_kv_and_attend)
from jaxllm.models.b1_mgpu import b1_forward, b1_mgpu_applies
from jaxllm.models.fp8 import fp8_mlp, fp8_swiglu_mlp, qx_norm_folds

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


# ----------------------------------------------------------------------------------------------
# Rotary position embedding


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [D/2] float32, with the config's rope scaling applied (as HF does).

    Computed in float32 numpy exactly like transformers' ``_compute_*_parameters`` so the angles
    agree with the HF reference to the last bit or two.
    """
    D = config.head_dim
    exponents = np.arange(0, D, 2, dtype=np.int64).astype(np.float32) / np.float32(D)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    scaling = config.rope_scaling_dict or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if rope_type == "llama3":
        factor = np.float32(scaling["factor"])
        low_freq_factor = np.float32(scaling["low_freq_factor"])
        high_freq_factor = np.float32(scaling["high_freq_factor"])
        old_context_len = np.float32(scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = np.float32(2 * math.pi) / inv_freq
        # Long wavelengths are interpolated by `factor`, short ones kept, the middle band blended.
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    raise ValueError(
        f"rope_type={rope_type!r} is not supported; supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}.")


def layer_inv_freqs(config: ModelConfig) -> tuple[tuple[float, ...], ...]:
    """Each layer's rope inverse frequencies: the config's rope, or, for Gemma 3's sliding
    layers, plain rope at ``rope_local_theta``. Tuples of floats (static module data)."""
    glob = tuple(float(f) for f in rope_inv_freq(config))
    if config.rope_local_theta is None:
        return (glob,) * config.num_hidden_layers
    local = tuple(float(f) for f in rope_inv_freq(dataclasses.replace(
        config, rope_theta=config.rope_local_theta, rope_scaling=None)))
    return tuple(local if config.layer_sliding_window(i) is not None else glob
                 for i in range(config.num_hidden_layers))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x: [T, N, D] (N heads), positions: [T] -> [T, N, D] in x's dtype.

    HF's half-split (rotate_half) convention, not interleaved pairs. Angles and the rotation are
    float32: cos/sin of large positions lose too much in bf16. Only [T, D/2] angles are built,
    from the step's positions, so there is no [max_len, D] table to hold.
    """
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos = jnp.cos(freqs)[:, None, :]
    sin = jnp.sin(freqs)[:, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    # [x1, x2] * [cos, cos] + [-x2, x1] * [sin, sin]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, HF style: normalise in float32, cast back, then scale.
    ``offset`` 1 is Gemma's: scale by (1 + weight), in float32, before the cast."""

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype, offset: float = 0.0):
        self.eps, self.offset = eps, float(offset)
        self.weight = nnx.Param(jnp.ones((dim,), dtype=dtype) if not offset
                                else jnp.zeros((dim,), dtype=dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.offset:
            xf = _rms_normalized(x, self.eps)
            return (xf * (self.offset + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return rms_norm(x, self.weight[...], self.eps)


def _rms_normalized(x: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``RMSNorm`` without offset as a function: normalise in float32, cast back, scale."""
    return weight * _rms_normalized(x, eps).astype(x.dtype)


def _norm(config: ModelConfig, dim: int, dtype) -> RMSNorm:
    return RMSNorm(dim, config.rms_norm_eps, dtype, config.norm_weight_offset)


# HF activation names -> the MLP's gate activation.
ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu,
               "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
               "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
               "gelu": functools.partial(jax.nn.gelu, approximate=False)}


def _linear(in_features: int, out_features: int, bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=dtype,
                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


def _block_k(config: ModelConfig) -> int | None:
    """The K block of a block-wise fp8 checkpoint's weight scales (jaxllm/models/fp8.py)."""
    return config.weight_block_size[1] if config.weight_block_size else None


def _proj(config: ModelConfig, in_features: int, out_features: int, bias: bool, dtype,
          rngs: nnx.Rngs) -> nnx.Module:
    """An attention or MLP projection: dense, or fp8 when the config is quantized."""
    if config.quantization == "fp8":
        from jaxllm.models.fp8 import Fp8Linear

        return Fp8Linear(in_features, out_features, use_bias=bias, dtype=dtype,
                         static_input_scale=config.activation_scheme == "static",
                         block_k=_block_k(config))
    return _linear(in_features, out_features, bias, dtype, rngs)


def _fused(config: ModelConfig, name: str, bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Module:
    """qkv_proj / gate_up_proj (jaxllm/models/fused.py): dense, or fp8 when quantized."""
    from jaxllm.models.fused import FusedLinear, fused_shape

    return FusedLinear(config.hidden_size, fused_shape(name, config), use_bias=bias, dtype=dtype,
                       fp8=config.quantization == "fp8",
                       static_input_scale=config.activation_scheme == "static",
                       block_k=_block_k(config), rngs=rngs)


def proj_add(proj: nnx.Module, h: jax.Array, residual: jax.Array) -> jax.Array:
    """residual + proj(h), the projection's output rounded to the model dtype first: an fp8
    projection adds it in the skinny Mosaic kernel's epilogue where that kernel runs its GEMM
    (``Fp8Linear``'s ``residual``: no add kernel of its own), others after the GEMM."""
    from jaxllm.models.fp8 import Fp8Linear

    if isinstance(proj, Fp8Linear):
        return proj(h, residual=residual)
    return residual + proj(h)


class LlamaAttention(nnx.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, dtype, rngs: nnx.Rngs,
                 attention_backend: str):
        E, H, K, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        if H % K:
            raise ValueError(f"num_attention_heads ({H}) must be a multiple of num_key_value_heads ({K}).")
        self.num_heads, self.num_kv_heads, self.head_dim = H, K, D
        if config.fused_projections:  # one GEMM: [T, K, (G + 2) * D]
            self.qkv_proj = _fused(config, "qkv_proj", config.attention_bias, dtype, rngs)
            self.q_proj = self.k_proj = self.v_proj = None
        else:
            self.qkv_proj = None
            self.q_proj = _proj(config, E, H * D, config.attention_bias, dtype, rngs)
            self.k_proj = _proj(config, E, K * D, config.attention_bias, dtype, rngs)
            self.v_proj = _proj(config, E, K * D, config.attention_bias, dtype, rngs)
        self.o_proj = _proj(config, H * D, E, config.o_proj_bias, dtype, rngs)
        if config.qk_norm:
            self.q_norm = _norm(config, D, dtype)
            self.k_norm = _norm(config, D, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.sm_scale = config.attn_scale if config.attn_scale is not None else D ** -0.5
        self.soft_cap = config.attn_logit_softcap
        self.sliding_window = config.layer_sliding_window(layer_idx)
        self.attention_backend = attention_backend
        # Per-tensor scales of an fp8 KV cache (jaxllm/models/attention.py); unused otherwise.
        self.k_scale, self.v_scale = (config.kv_cache_scales[layer_idx]
                                      if config.kv_cache_scales else (1.0, 1.0))
        self.lora = None  # jaxllm.lora.layers.LoraModules once the engine enables LoRA

    def _lora_qkv(self, x: jax.Array, slots: jax.Array) -> jax.Array:
        """The LoRA deltas of q, k and v in the fused layout [T, K, (G + 2) * D]."""
        T, K, D = x.shape[0], self.num_kv_heads, self.head_dim
        return jnp.concatenate([self.lora.delta("q_proj", x, slots).reshape(T, K, -1),
                                self.lora.delta("k_proj", x, slots).reshape(T, K, D),
                                self.lora.delta("v_proj", x, slots).reshape(T, K, D)], axis=-1)

    def _o_weight(self) -> jax.Array | None:
        """The o projection's weight (fp8 ``weight`` or dense ``kernel``): what the decode
        kernel may stream into the L2 ahead of the o GEMM (the ``l2_prefetch_o`` knob)."""
        for name in ("weight", "kernel"):
            w = getattr(self.o_proj, name, None)
            if isinstance(w, nnx.Param):
                return w[...]
        return None

    def _o_proj(self, out: jax.Array, lora_slots: jax.Array | None,
                residual: jax.Array | None = None) -> jax.Array:
        """o_proj(out) (+ its LoRA delta); ``residual`` + that where given."""
        lora = lora_slots is not None and self.lora is not None
        if residual is not None and not lora:
            return proj_add(self.o_proj, out, residual)
        y = self.o_proj(out)
        if lora:
            y = y + self.lora.delta("o_proj", out, lora_slots)
        return y if residual is None else residual + y

    def __call__(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                 kv_cache: tuple[jax.Array, jax.Array], md: AttentionMetadata,
                 norm: "RMSNorm | None" = None, lora_slots: jax.Array | None = None,
                 residual: jax.Array | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x: [T, E] -> [T, E]; kv_cache: (k_pages, v_pages) each [P, B, K, D], returned updated.
        ``norm``: the layer's input RMSNorm, applied to x here first (or, in small decode steps
        on the decode kernel's rope path, folded into the q/k/v GEMM and the decode kernel:
        ``qkv_norm_folds``). ``lora_slots`` [T]: each token's LoRA slot (-1: none), with
        ``self.lora`` set; the projections add their adapters' deltas (jaxllm/lora).
        ``residual`` [T, E]: returned is residual + the attention's output (``proj_add``)."""
        T, D = x.shape[0], self.head_dim
        if self.lora is None:
            lora_slots = None
        lora = lora_slots is not None
        if self.qkv_proj is not None:
            if self.q_norm is None and qkv_rope_applies(self.attention_backend, md, T):
                # The decode kernel applies rope and writes the new K/V itself (and, with the
                # qkv_split_k knob, sums the GEMM's split-K partials). With LoRA the normed
                # input is needed (the adapters read it) and the GEMM runs whole.
                fold = (norm is not None and qkv_norm_folds(T) and self.qkv_proj.bias is None
                        and self.qkv_proj.input_scale is None and not norm.offset
                        and not lora)
                # Folded: RMSNorm(x) @ W = r * ((x * g) @ W); XLA takes x * g as the GEMM's
                # prologue and the kernel applies r (no norm kernel). A bias or a static fp8
                # activation scale would not commute with r, so those keep the norm. An fp8
                # q/k/v in the skinny kernel's quantize_x form takes the whole norm in.
                if not lora and qx_norm_folds(self.qkv_proj, norm, T):
                    qkv, parts, fold = self.qkv_proj(x, norm=(norm.weight[...], norm.eps)), 1, False
                else:
                    h = x * norm.weight[...] if fold else (x if norm is None else norm(x))
                    parts = qkv_split_k_parts(T) if not lora else 1
                    qkv = self.qkv_proj.split_k(h, parts) if parts > 1 else None
                if qkv is None:
                    qkv, parts = self.qkv_proj(h), 1
                    if lora:
                        qkv = qkv + self._lora_qkv(h, lora_slots)
                out, k_pages, v_pages = rope_write_kv_and_attend(
                    qkv, positions, inv_freq, kv_cache[0], kv_cache[1], md,
                    sm_scale=self.sm_scale, soft_cap=self.soft_cap,
                    sliding_window=self.sliding_window, k_scale=self.k_scale,
                    v_scale=self.v_scale, qkv_parts=parts, dtype=x.dtype,
                    norm=(x, norm.eps) if fold else None, prefetch=self._o_weight())
                return (self._o_proj(out.reshape(T, self.num_heads * self.head_dim),
                                     lora_slots, residual), (k_pages, v_pages))
        qx = self.qkv_proj is not None and not lora and qx_norm_folds(self.qkv_proj, norm, T)
        if norm is not None and not qx:
            x = norm(x)
        if self.qkv_proj is not None:
            # [T, K, (G + 2) * D]: per KV head its G q heads, k, v
            qkv = self.qkv_proj(x, norm=(norm.weight[...], norm.eps) if qx else None)
            if lora:
                qkv = qkv + self._lora_qkv(x, lora_slots)
            GD = qkv.shape[-1] - 2 * D
            q = qkv[:, :, :GD].reshape(T, self.num_heads, D)
            k, v = qkv[:, :, GD:GD + D], qkv[:, :, GD + D:]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            if lora:
                q = q + self.lora.delta("q_proj", x, lora_slots)
                k = k + self.lora.delta("k_proj", x, lora_slots)
                v = v + self.lora.delta("v_proj", x, lora_slots)
            q = q.reshape(T, self.num_heads, D)
            k = k.reshape(T, self.num_kv_heads, D)
            v = v.reshape(T, self.num_kv_heads, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        out, k_pages, v_pages = write_kv_and_attend(
            q, k, v, kv_cache[0], kv_cache[1], md, sm_scale=self.sm_scale,
            soft_cap=self.soft_cap,
            sliding_window=self.sliding_window, backend=self.attention_backend,
            k_scale=self.k_scale, v_scale=self.v_scale)
        return (self._o_proj(out.reshape(T, self.num_heads * self.head_dim), lora_slots,
                             residual), (k_pages, v_pages))


class LlamaMLP(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={config.hidden_act!r} is not supported; supported: "
                             f"{', '.join(ACTIVATIONS)}.")
        self.swiglu = ACTIVATIONS[config.hidden_act] is jax.nn.silu
        self.act = ACTIVATIONS[config.hidden_act]
        E, F = config.hidden_size, config.intermediate_size
        if config.fused_projections:  # one GEMM: [T, F, 2] (gate, up)
            self.gate_up_proj = _fused(config, "gate_up_proj", config.mlp_bias, dtype, rngs)
            self.gate_proj = self.up_proj = None
        else:
            self.gate_up_proj = None
            self.gate_proj = _proj(config, E, F, config.mlp_bias, dtype, rngs)
            self.up_proj = _proj(config, E, F, config.mlp_bias, dtype, rngs)
        self.down_proj = _proj(config, F, E, config.mlp_bias, dtype, rngs)
        self.lora = None  # jaxllm.lora.layers.LoraModules once the engine enables LoRA

    def __call__(self, x: jax.Array, lora_slots: jax.Array | None = None,
                 residual: jax.Array | None = None, norm: "RMSNorm | None" = None
                 ) -> jax.Array:
        """x: [T, E] -> [T, E]. ``lora_slots`` [T]: as ``LlamaAttention``'s. ``residual``
        [T, E]: returned is residual + the MLP's output (``proj_add``). ``norm``: the MLP's
        input RMSNorm, applied to x here first (folded into an fp8 gate/up GEMM where the
        skinny kernel's quantize_x form takes the step: ``qx_norm_folds``)."""
        add = (lambda y: y) if residual is None else (lambda y: residual + y)  # noqa: E731
        lora = lora_slots is not None and self.lora is not None
        fold = norm is not None and not lora and qx_norm_folds(self.gate_up_proj, norm,
                                                               x.shape[0])
        if norm is not None and not fold:
            x = norm(x)
        if lora:
            return add(self._lora_call(x, lora_slots))
        if self.gate_up_proj is not None:
            if self.gate_up_proj.kernel is None and self.swiglu and not fold:
                # fp8, few rows: the whole MLP in one Mosaic GPU kernel (JAXLLM_FP8_MLP_MGPU)
                y = fp8_mlp(x, self.gate_up_proj, self.down_proj, residual)
                if y is not None:
                    return y
                # fp8: SwiGLU + quant, one kernel
                y = fp8_swiglu_mlp(x, self.gate_up_proj, self.down_proj)
                if y is not None:
                    return add(y)
            gu = self.gate_up_proj(  # [T, F, 2]
                x, norm=(norm.weight[...], norm.eps) if fold else None)
            h = self.act(gu[..., 0]) * gu[..., 1]
        else:
            h = self.act(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h) if residual is None else proj_add(self.down_proj, h, residual)

    def _lora_call(self, x: jax.Array, slots: jax.Array) -> jax.Array:
        """The MLP with each projection's LoRA delta added (XLA's GEMMs, no fused kernel)."""
        dg, du = self.lora.delta("gate_proj", x, slots), self.lora.delta("up_proj", x, slots)
        if self.gate_up_proj is not None:
            gu = self.gate_up_proj(x) + jnp.stack([dg, du], axis=-1)  # [T, F, 2]
            g, u = gu[..., 0], gu[..., 1]
        else:
            g, u = self.gate_proj(x) + dg, self.up_proj(x) + du
        h = self.act(g) * u
        return self.down_proj(h) + self.lora.delta("down_proj", h, slots)

    def kernel_ok(self, lora_slots: jax.Array | None = None) -> bool:
        """Whether ``normed_swiglu_kernel`` takes this MLP: a fused gate/up without bias (nor
        block-wise fp8 scales), E and
        F multiples of 16 (the kernel's smallest blocks; other shapes keep XLA's kernels), and
        no LoRA delta to add (``lora_slots`` None: a step where no sequence has an adapter
        runs the kernel in a LoRA engine too)."""
        p = self.gate_up_proj
        return (self.swiglu and p is not None and p.bias is None and p.block_k is None
                and p.in_features % 16 == 0
                and p.groups[0] % 16 == 0 and (self.lora is None or lora_slots is None))

    def normed_swiglu_kernel(self, x: jax.Array, norm: "RMSNorm") -> jax.Array:
        """silu(gate(n)) * up(n) with n = norm(x), in one Pallas kernel
        (``pallas_kernels.fused_mlp.gate_up_swiglu``: the norm folded into the fused gate/up
        GEMM, the SwiGLU in its epilogue): x [T, E] -> [T, F] in x's dtype. fp8 weights run
        W8A8 with activation scales per (row, block of E), computed in the kernel."""
        from pallas_kernels.fused_mlp import gate_up_swiglu, gate_up_swiglu_blocks

        p = self.gate_up_proj
        (F, _), E = p.groups, p.in_features
        if p.kernel is None:  # fp8: [F, 2, E] e4m3 -> [2F, E], scales [F, 2] -> [2F]
            w, ws = p.weight[...].reshape(2 * F, E), p.weight_scale[...].reshape(2 * F)
        else:
            w, ws = p.kernel[...].astype(x.dtype).reshape(E, 2 * F), None
        blocks = gate_up_swiglu_blocks(E, F, fp8=p.kernel is None)
        return gate_up_swiglu(x, norm.weight[...], w, ws, eps=norm.eps,
                              interpret=jax.default_backend() != "gpu", **blocks)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, dtype, rngs: nnx.Rngs, attention_backend: str):
        E = config.hidden_size
        self.input_layernorm = _norm(config, E, dtype)
        self.self_attn = LlamaAttention(config, layer_idx, dtype, rngs, attention_backend)
        # Llama: the MLP's input norm; Gemma 2: the attention output's (sandwich_norms).
        self.post_attention_layernorm = _norm(config, E, dtype)
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = _norm(config, E, dtype)
            self.post_feedforward_layernorm = _norm(config, E, dtype)
        else:
            self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None
        self.residual_multiplier = config.residual_multiplier
        self.mlp = LlamaMLP(config, dtype, rngs)

    def _branch(self, h: jax.Array) -> jax.Array:
        """A residual branch's output as it is added: Granite scales it."""
        return h if self.residual_multiplier is None else h * self.residual_multiplier

    def __call__(self, x, positions, inv_freq, kv_cache, md, lora_slots=None):
        """x: [T, E] (the residual stream) -> [T, E]. ``lora_slots``: see LlamaAttention."""
        # The residual adds go into the o / down projections (``proj_add``: the skinny
        # Mosaic kernel's epilogue for fp8) unless a multiplier or a norm stands between.
        plain = self.pre_feedforward_layernorm is None and self.residual_multiplier is None
        # plain: the attention returns x + its output (the new residual stream), else its output.
        attn, kv_cache = self.self_attn(x, positions, inv_freq, kv_cache, md,
                                        norm=self.input_layernorm, lora_slots=lora_slots,
                                        residual=x if plain else None)
        if self.pre_feedforward_layernorm is not None:  # Gemma 2
            x = x + self.post_attention_layernorm(attn)
            h = self.mlp(self.pre_feedforward_layernorm(x), lora_slots)
            return x + self.post_feedforward_layernorm(h), kv_cache
        x = attn if plain else x + self._branch(attn)
        if (self.mlp.kernel_ok(lora_slots) and not self.post_attention_layernorm.offset
                and mlp_kernel_applies(self.self_attn.attention_backend, x.shape[0],
                                       fp8=self.mlp.gate_up_proj.kernel is None)):
            h = self.mlp.normed_swiglu_kernel(x, self.post_attention_layernorm)
            if plain:
                return proj_add(self.mlp.down_proj, h, x), kv_cache
            return x + self._branch(self.mlp.down_proj(h)), kv_cache
        if plain:
            return self.mlp(x, lora_slots, residual=x,
                            norm=self.post_attention_layernorm), kv_cache
        x = x + self._branch(self.mlp(x, lora_slots, norm=self.post_attention_layernorm))
        return x, kv_cache


class LlamaModel(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs, attention_backend: str):
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype,
                                      embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = nnx.List([LlamaDecoderLayer(config, i, dtype, rngs, attention_backend)
                                for i in range(config.num_hidden_layers)])
        self.norm = _norm(config, config.hidden_size, dtype)


class LlamaForCausalLM(nnx.Module):
    """The Llama family as one NNX module; see the module docstring for what it covers.

    ``model(token_ids[T], positions[T], kv_caches, md) -> (hidden[T, E], kv_caches)``: one ragged
    batch (prefill chunks and decode tokens together); each layer writes its new K/V into the
    paged cache, then attends over the pages. ``compute_logits(hidden[N, E]) -> [N, V]`` float32,
    called only on the rows that are sampled.
    """

    def __init__(self, config: ModelConfig, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None,
                 attention_backend: str = "reference"):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.attention_backend = attention_backend
        # Validated here so an unsupported rope type fails at construction, not at first trace.
        # A tuple of floats, not an array: static module data must be hashable and array-free.
        self.inv_freq = tuple(float(f) for f in rope_inv_freq(config))
        self.layer_inv_freq = layer_inv_freqs(config)
        self.model = LlamaModel(config, self.dtype, rngs, attention_backend)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _linear(config.hidden_size, config.vocab_size, False, self.dtype, rngs)
        # A sequence classifier's head (config.num_labels): read by engine/pooling.classify.
        self.score = (_linear(config.hidden_size, config.num_labels, False, self.dtype, rngs)
                      if config.num_labels else None)

    def __call__(self, token_ids: jax.Array, positions: jax.Array, kv_caches: KVCache,
                 md: AttentionMetadata, lora_slots: jax.Array | None = None
                 ) -> tuple[jax.Array, KVCache]:
        """token_ids, positions: [T] int32; kv_caches: per layer (k, v) [P, B, K, D];
        lora_slots: [T] int32 each token's LoRA slot (-1: none), or None (no LoRA in the model).

        Returns hidden [T, E] after the final norm, and the caches with this step's K/V written.
        """
        if len(kv_caches) != len(self.model.layers):
            raise ValueError(f"kv_caches has {len(kv_caches)} layers, the model {len(self.model.layers)}.")
        freqs = {f: jnp.asarray(f, dtype=jnp.float32) for f in set(self.layer_inv_freq)}  # [D/2]
        x = embed(self.model.embed_tokens, token_ids, self.config)
        if lora_slots is None and b1_mgpu_applies(self, x, kv_caches, md):
            x, new_caches = b1_forward(self, x, positions, kv_caches, md)  # JAXLLM_FP8_B1_MGPU
            return self.model.norm(x), new_caches
        new_caches = []
        call = _layer_caller() if isinstance(x, jax.core.Tracer) and layer_jit() else None
        for layer, kv, f in zip(self.model.layers, kv_caches, self.layer_inv_freq):
            inv_freq = freqs[f]
            if call is None:
                x, kv = layer(x, positions, inv_freq, kv, md, lora_slots)
            else:
                x, kv = call(layer, x, positions, inv_freq, kv, md, lora_slots)
            new_caches.append(kv)
        return self.model.norm(x), new_caches

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: [N, E] -> logits [N, V] float32 (lm_head, or the tied embedding).

        The GEMM's output type is ``logits_gemm_dtype()``: float32 from the float32 accumulator,
        or the model dtype cast to float32 after the GEMM (what vLLM and HF transformers do).
        """
        out = logits_gemm_dtype(self.dtype)
        if self.lm_head is None:
            w = self.model.embed_tokens.embedding[...]  # [V, E]
            logits = jnp.einsum("ne,ve->nv", hidden, w, preferred_element_type=out)
        else:
            w = self.lm_head.kernel[...]  # [E, V]
            logits = jnp.einsum("ne,ev->nv", hidden, w, preferred_element_type=out)
        return final_logits(logits.astype(jnp.float32), self.config)


def embed(embed_tokens: nnx.Embed, token_ids: jax.Array, config: ModelConfig) -> jax.Array:
    """The token embeddings, times Gemma's sqrt(E) (in the model dtype, as HF)."""
    x = embed_tokens(token_ids)
    if config.embed_multiplier is not None:
        x = x * jnp.asarray(config.embed_multiplier, x.dtype)
    return x


def final_logits(logits: jax.Array, config: ModelConfig) -> jax.Array:
    """The float32 logits as the model ends them: Granite divides them by its logits_scaling,
    Gemma 2 caps them (cap * tanh(logits / cap)); others as they are."""
    if config.logits_scaling is not None:
        logits = logits / config.logits_scaling
    cap = config.final_logit_softcap
    return logits if cap is None else cap * jnp.tanh(logits / cap)


LAYER_JIT_ENV = "JAXLLM_LAYER_JIT"


def layer_jit() -> bool:
    """Whether a traced forward calls its layers through one nested ``jax.jit`` (``_layer_caller``;
    ``JAXLLM_LAYER_JIT`` = "1", the default, or "0"; read at trace time)."""
    raw = os.environ.get(LAYER_JIT_ENV, "1")
    if raw not in ("0", "1"):
        raise ValueError(f"{LAYER_JIT_ENV} must be 0 or 1, got {raw!r}")
    return raw == "1"


def _layer_caller():
    """``call(layer, *args)``: the layer run as a nested ``jax.jit`` of (GraphDef, State, args).
    Layers alike (one GraphDef: the same structure and static values, which holds for every
    layer of a model without per-layer sliding windows or KV scales) with arguments alike hit
    its trace cache, and JAX lowers the one jaxpr once into the module and calls it from each
    layer: a program traces and lowers one layer instead of 32. XLA inlines the calls before it
    fuses: the compiled programs have the plain loop's ops and its latency (the 8B's lowering at
    a cold start 18.7 s against 25-32: benchmarks/RESULTS.md, "Rerun of 2026-12-04 (18:19)").
    A new jit per forward trace: a trace reads the environment's knobs and the tensor-parallel
    mesh of its context, and jit's trace cache, keyed on the function and the shapes, would
    carry them over to other programs."""

    @functools.partial(jax.jit, static_argnums=0)
    def run(graphdef, state, *args):
        return nnx.merge(graphdef, state)(*args)

    def call(layer, *args):
        graphdef, state = nnx.split(layer)
        return run(graphdef, state, *args)

    return call


LOGITS_GEMM_ENV = "JAXLLM_LOGITS_GEMM_OUT"


def logits_gemm_dtype(model_dtype) -> jnp.dtype:
    """The lm_head GEMM's output type: ``JAXLLM_LOGITS_GEMM_OUT`` = "float32" (the default) or
    "model" (the model dtype, cast to float32 after the GEMM, as vLLM and HF do; for an
    in-engine A/B of the two cuBLAS paths). Read at trace time, like the other knobs."""
    return gemm_out_dtype_from_env(LOGITS_GEMM_ENV, model_dtype)


def init_kv_cache(config: ModelConfig, num_pages: int, page_size: int, dtype=jnp.bfloat16) -> KVCache:
    """Zeroed paged KV cache: one (k_pages, v_pages) pair per layer, each [P, B, K, D]."""
    shape = (num_pages, page_size, config.num_key_value_heads, config.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_hidden_layers)]
