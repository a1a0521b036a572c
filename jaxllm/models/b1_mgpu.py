"""Batch-1 fp8 decode through two Mosaic GPU kernels a layer (issue 6's per-layer route).

A pure decode step of one sequence (the runner's 1-row decode bucket) of a fp8 Llama of the
Llama-3-8B attention shape (32 q heads over 8 KV heads of 128) runs each layer as two
launches of ``pallas_kernels.fp8_decode_mgpu``'s kernels instead of XLA's ~10 kernels:

- ``attn_chain`` (L = 1): the input RMSNorm folded into the W8A8 q/k/v GEMM, rope, the paged
  attention of the live token over its pages plus its own new k/v, the o GEMM and the
  residual: x + o(attn(...)); it also writes the new token's normed, roped k and v into the
  layer's pages at the token's slot, in place (``write_pages``: the pages are aliased);
- ``mlp_chain`` (L = 1): the post-attention RMSNorm folded into the W8A8 gate/up GEMM, the
  SwiGLU and its quantization folded into the down GEMM's activation load, the residual.

Both read the engine's weights as they are: q/k/v in the fused [K, (G + 2) D, E] layout (the
kernel maps each 128-row tile, a head, to its q / k / v slot), gate/up in [F, 2, E] (the
kernel's two weight views, gate rows and up rows). The one layout they do not share is gate/
up's per-row scales, [F, 2]: the kernel reads them as [2, F] rows, which TMA cannot gather
from the pairs, so the step transposes every layer's scales in one XLA fusion and each launch
reads its layer's rows by index.

Off by default: ``JAXLLM_FP8_B1_MGPU`` = "1" turns it on (read at trace time). With it on the
engine adds the 1-row decode bucket (``ModelRunner.small_decode_buckets``), so a decode step of
one sequence runs this path. On a GPU the kernels' grid forms run (Hopper only: wgmma, TMA
and a grid barrier over 128 resident CTAs); elsewhere their one-CTA forms, interpreted (the
CPU tests). Not for use yet: on its first H100 run (2026-12-07) the attention kernel's grid
form gave wrong attention partials, and the step took 3.95 against XLA's 3.48 ms a token
(benchmarks/RESULTS.md; DESIGN_NOTES says what to look at first)."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

B1_MGPU_ENV = "JAXLLM_FP8_B1_MGPU"
ROWS = 8  # the kernels' token rows (wgmma's N); the live token is row 0
HEAD_DIM, KV_HEADS, Q_HEADS = 128, 8, 32  # the kernels' attention shape
# The kernels' forms: (CTAs, tile_k, stages, K splits of q/k/v) of the attention half,
# (CTAs, tile_k, stages, down chunk, K splits of gate/up) of the MLP pair. On a GPU the grid
# forms the benchmarks lead with (benchmarks/gpu/mosaic_attn_fp8.py, mosaic_mlp_fp8.py), the
# one-CTA forms elsewhere (interpreted).
GPU_ATTN, GPU_MLP = (128, 256, 2, 8), (128, 256, 2, 512, 4)
CPU_ATTN, CPU_MLP = (1, 128, 1, 1), (1, 128, 1, 128, 1)


def b1_mgpu_enabled() -> bool:
    """``JAXLLM_FP8_B1_MGPU``: "0" (the default) or "1"."""
    raw = os.environ.get(B1_MGPU_ENV, "0")
    if raw not in ("0", "1"):
        raise ValueError(f"{B1_MGPU_ENV} must be 0 or 1, got {raw!r}")
    return raw == "1"


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


@functools.lru_cache(maxsize=None)
def _kernels(gpu: bool, eps: float):
    """(attention half, MLP pair) for one launch a layer: the grid forms on a GPU, the one-CTA
    interpreted forms elsewhere."""
    from pallas_kernels.fp8_decode_mgpu import attn_chain, mlp_chain

    G, tk, steps, splits = GPU_ATTN if gpu else CPU_ATTN
    attn = attn_chain(G, tk, steps, splits_q=splits, sync=gpu, qkv_order="kv_groups", eps=eps,
                      write_pages=True, interpret=not gpu)
    G, tk, steps, chunk, splits = GPU_MLP if gpu else CPU_MLP
    mlp = mlp_chain(G, tk, steps, chunk, splits_a=splits, sync=gpu, gu_layout="pairs", eps=eps,
                    interpret=not gpu)
    return attn, mlp


def _layer_fits(layer) -> bool:
    """Whether a decoder layer is what the kernels compute: fp8 fused q/k/v and gate/up and
    fp8 o / down, per-channel weight scales, dynamic activations, no biases, the attention
    shape above with the default softmax scale, plain RMSNorms (no offset), no q/k norm, soft
    cap, sliding window, residual multiplier, sandwich norms, LoRA, fp8 KV scales."""
    from jaxllm.models.fp8 import Fp8Linear
    from jaxllm.models.fused import FusedLinear

    attn, mlp = layer.self_attn, layer.mlp
    qkv, gu = attn.qkv_proj, mlp.gate_up_proj
    fused_ok = all(isinstance(p, FusedLinear) and p.kernel is None and p.block_k is None
                   and p.input_scale is None and p.bias is None for p in (qkv, gu))
    lin_ok = all(isinstance(p, Fp8Linear) and p.block_k is None and p.input_scale is None
                 and p.bias is None for p in (attn.o_proj, mlp.down_proj))
    if not (fused_ok and lin_ok):
        return False
    return (attn.num_heads == Q_HEADS and attn.num_kv_heads == KV_HEADS
            and attn.head_dim == HEAD_DIM and attn.sm_scale == HEAD_DIM ** -0.5
            and attn.q_norm is None and attn.soft_cap is None and attn.sliding_window is None
            and (attn.k_scale, attn.v_scale) == (1.0, 1.0) and attn.lora is None
            and mlp.lora is None and mlp.swiglu and gu.groups[1] == 2
            and layer.residual_multiplier is None and layer.pre_feedforward_layernorm is None
            and not layer.input_layernorm.offset and not layer.post_attention_layernorm.offset
            and layer.input_layernorm.eps == layer.post_attention_layernorm.eps)


def b1_mgpu_applies(model, x: jax.Array, kv_caches, md) -> bool:
    """Whether ``model``'s step (x [T, E], static shapes) runs ``b1_forward``: the knob on, a
    decode-only step of one sequence slot (the page table's [1, M], M at most the kernel's
    ``MAX_PAGE_TABLE``) of at most ``ROWS`` rows, a bf16 model and bf16 KV pages, every layer
    ``_layer_fits`` with one rope, one device (no tensor parallelism), a Hopper GPU with an SM
    for each of the grid's CTAs or the interpreter, and shapes the kernels split."""
    from jaxllm.models.attention import heads_mesh
    from jaxllm.models.fp8 import mosaic_kernel_runs_on
    from pallas_kernels.fp8_decode_mgpu import MAX_PAGE_TABLE, PAGE

    if not b1_mgpu_enabled() or not md.decode_only or md.page_table.shape[0] != 1:
        return False
    if x.shape[0] > ROWS or x.dtype != jnp.bfloat16 or heads_mesh() is not None:
        return False
    if md.page_table.shape[1] > MAX_PAGE_TABLE:
        return False
    if any(k.dtype != jnp.bfloat16 or v.dtype != jnp.bfloat16 or k.shape[1] != PAGE
           for k, v in kv_caches):
        return False
    dev = jax.devices()[0]
    if not mosaic_kernel_runs_on(dev.platform, getattr(dev, "compute_capability", None)):
        return False
    if _on_gpu() and getattr(dev, "core_count", 0) < max(GPU_ATTN[0], GPU_MLP[0]):
        return False  # a grid barrier needs every CTA resident: one an SM
    layers = model.model.layers
    if len(set(model.layer_inv_freq)) != 1 or not all(_layer_fits(layer) for layer in layers):
        return False
    return _splits(layers[0], x.shape[1])


def _splits(layer, hidden: int) -> bool:
    """Whether the kernels' work plans divide this model's shapes (their ``plan`` raises)."""
    from pallas_kernels.fp8_decode_mgpu import attn_plan, mlp_plan

    F = layer.mlp.gate_up_proj.groups[0]
    (ga, _, _, splits_q), (gm, _, _, chunk, splits_a) = ((GPU_ATTN, GPU_MLP) if _on_gpu()
                                                         else (CPU_ATTN, CPU_MLP))
    try:
        attn_plan(ga, hidden, Q_HEADS, KV_HEADS, splits_q)
        mlp_plan(gm, hidden, F, splits_a, chunk)
    except ValueError:
        return False
    return True


def b1_forward(model, x: jax.Array, positions: jax.Array, kv_caches, md):
    """The layers of a step ``b1_mgpu_applies`` admits: x [T, E] (the embeddings; row 0 the
    live token, the others padding) -> (x after the last layer [T, E], the caches with the
    token's K/V written in its slot, ``md.slot_mapping[0]``: the page-table entry of its
    position, where the attention kernel writes them in place)."""
    layers = model.model.layers
    T, E = x.shape
    eps = float(layers[0].input_layernorm.eps)
    attn_fn, mlp_fn = _kernels(_on_gpu(), eps)
    f32 = jnp.float32
    pos = positions[:1].astype(jnp.int32)  # the live token's position: its old positions
    # the rope's angles at pos (every layer the same inv_freq: b1_mgpu_applies)
    inv_freq = jnp.asarray(model.layer_inv_freq[0], f32)
    ang = pos[0].astype(f32) * inv_freq
    rope = jnp.stack([jnp.cos(ang), jnp.sin(ang)])
    pt = md.page_table[0]
    pad = -pt.shape[0] % 8  # the kernel stages the table in rows of 8 entries
    pt = jnp.pad(pt, (0, pad)) if pad else pt
    # gate/up's row scales as [L, 2, F] (module docstring): one fusion for every layer
    gu_scales = jnp.stack([layer.mlp.gate_up_proj.weight_scale[...] for layer in layers])
    gu_scales = jnp.swapaxes(gu_scales, 1, 2)
    h = jnp.pad(x, ((0, ROWS - T), (0, 0))) if T < ROWS else x
    new_caches = []
    for i, (layer, (k_pages, v_pages)) in enumerate(zip(layers, kv_caches)):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = attn.qkv_proj
        (A, C) = qkv.groups
        outs = attn_fn(h, layer.input_layernorm.weight[...][None],
                       qkv.weight[...].reshape(1, A * C, E), qkv.weight_scale[...].reshape(1, -1),
                       attn.o_proj.weight[...][None], attn.o_proj.weight_scale[...][None],
                       k_pages[None], v_pages[None], pt, pos, rope)
        h = outs[0][0]  # [ROWS, E]
        new_caches.append((outs[-2][0], outs[-1][0]))  # the token's K/V written in place
        gu = mlp.gate_up_proj
        h = mlp_fn(h, layer.post_attention_layernorm.weight[...][None], gu.weight[...][None],
                   gu_scales, mlp.down_proj.weight[...][None],
                   mlp.down_proj.weight_scale[...][None], jnp.full((8,), i, jnp.int32))[0][0]
    return h[:T], new_caches
