"""FP8 (e4m3) W8A8 linear layers, and the load-time conversion of a dense model to them.

Dimension keys: T tokens, I input features, O output features.

``Fp8Linear`` holds, under HF's own names so pre-quantized checkpoints map one to one:
  weight        [O, I] float8_e4m3fn  (HF's Linear layout, I contiguous: the "TN" operand layout
                                       cuBLASLt's fp8 GEMM takes without a transpose)
  weight_scale  [O]    float32         per output channel (a per-tensor checkpoint scale is
                                       broadcast to every channel at load)
                [O, KB] float32        block-wise checkpoints (``block_k`` set): per output
                                       channel and block of ``block_k`` input features, KB =
                                       ceil(I / block_k) (each [bn, bk] tile's scale repeated
                                       over its bn channels at load)
  input_scale   []     float32         only with static activation scales; None when dynamic
  bias          [O]    model dtype     when the layer has one
Activations are quantized per token at run time (dynamic), or with the static ``input_scale``;
``pallas_kernels.fp8_matmul.fp8_matmul_xla`` runs the fp8 x fp8 -> fp32 dot and applies the
scales once to the fp32 accumulator. Block-wise weights run W8A16 (``block_fp8_linear``).

Which layers: the attention projections and the MLP (``quantize_model``; fused ones too,
``jaxllm.models.fused``); embeddings, norms and the lm_head stay in the model dtype, as vLLM does.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import gemm_out_dtype_from_env
from jaxllm.models.attention import heads_mesh
from jaxllm.models.fused import FUSED_LINEARS
from pallas_kernels.fp8_block_mgpu import check_shapes as check_mgpu_shapes
from pallas_kernels.fp8_block_mgpu import fp8_block_matmul_mgpu
from pallas_kernels import fp8_skinny_mgpu
from pallas_kernels.fp8_matmul import (E4M3_MAX, FP8, fp8_block_matmul, fp8_matmul_xla,
                                       quantize_activation_per_token,
                                       quantize_activation_per_token_group)
from pallas_kernels.silu_mul_quant import fits as silu_mul_quant_fits
from pallas_kernels.silu_mul_quant import silu_mul_quant
from pallas_kernels.skinny_matmul import MAX_ROWS as SKINNY_MAX_ROWS
from pallas_kernels.skinny_matmul import skinny_fits, skinny_matmul

logger = logging.getLogger("jaxllm")

# The projections quantized by quantization="fp8".
QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Ada (8.9) and Hopper (9.0) and later have fp8 tensor cores.
_MIN_FP8_COMPUTE_CAPABILITY = (8, 9)


class Fp8Linear(nnx.Module):
    """y[T, O] = dequant(quant(x[T, I]) @ weight.T) + bias, fp32 accumulation, y in x's dtype."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype,
                 static_input_scale: bool = False, block_k: int | None = None):
        self.in_features, self.out_features, self.block_k = in_features, out_features, block_k
        self.weight = nnx.Param(jnp.zeros((out_features, in_features), FP8))
        self.weight_scale = nnx.Param(jnp.ones(scale_shape(out_features, in_features, block_k),
                                               jnp.float32))
        self.input_scale = nnx.Param(jnp.ones((), jnp.float32)) if static_input_scale else None
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

    def __call__(self, x: jax.Array, residual: jax.Array | None = None) -> jax.Array:
        """``residual`` (x's leading shape, out_features, x's dtype): returns residual + the
        layer's output, as the model adds it (the skinny Mosaic kernel adds it in its epilogue
        where it runs the GEMM: no add kernel of its own)."""
        lead = x.shape[:-1]
        scale = None if self.input_scale is None else self.input_scale.get_value()
        res = None if residual is None or self.bias is not None else \
            residual.reshape(-1, self.out_features)
        y = fp8_linear(x.reshape(-1, self.in_features), self.weight[...], self.weight_scale[...],
                       scale, block_k=self.block_k, residual=res)
        if self.bias is not None:
            y = y + self.bias[...]
        y = y.reshape(*lead, self.out_features)
        return residual + y if residual is not None and res is None else y


# Token rows up to which fp8 projections run weight-only on a GPU, unless
# JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS says otherwise. H200, 2026-11-30 (benchmarks/RESULTS.md,
# "FP8 at batch 1"): batch-1 decode (8B shape, 1k context) 5.62 ms/token weight-only against
# 6.92 W8A8, GPU time per step 3.13 ms against 3.76; larger steps were not measured weight-only,
# so they keep W8A8 and its fp8 tensor cores.
GPU_WEIGHT_ONLY_MAX_TOKENS = 16


def weight_only_max_tokens() -> int:
    """Steps of at most this many token rows run fp8 projections weight-only (W8A16: the e4m3
    weight upcast inside the dot, activations unquantized; no activation-quantization kernel,
    one scale multiply). ``JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS`` when set (0: always W8A8), else
    ``GPU_WEIGHT_ONLY_MAX_TOKENS`` on a GPU and 0 elsewhere (on a CPU there is no speed to win,
    and the tests compare against W8A8). Read at trace time: set it before the engine compiles;
    compiled programs keep the path they were traced with."""
    import os

    raw = os.environ.get("JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS")
    if raw is None:
        return GPU_WEIGHT_ONLY_MAX_TOKENS if jax.default_backend() == "gpu" else 0
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(
            f"JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS must be an integer, got {raw!r}.") from None
    if value < 0:
        raise ValueError(f"JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS must be >= 0, got {value}.")
    return value


FP8_GEMM_OUT_ENV = "JAXLLM_FP8_GEMM_OUT"


def fp8_gemm_out_dtype(model_dtype) -> jnp.dtype:
    """The W8A8 GEMM's output type, before the two scales: ``JAXLLM_FP8_GEMM_OUT`` = "model"
    (the default: the model dtype, half the bytes the GEMM writes and the fusions after it read
    back) or "float32". Read at trace time. H200, 2026-12-01 late: fp8 + fp8 KV throughput
    10,612 -> 10,906 tok/s, mostly in the prompt-chunk steps (benchmarks/RESULTS.md); it was
    within noise in fp8 alone that afternoon (10,078 / 9,986 against 9,794 / 10,131)."""
    return gemm_out_dtype_from_env(FP8_GEMM_OUT_ENV, model_dtype, default="model")


def scale_shape(out_features: int, in_features: int, block_k: int | None) -> tuple[int, ...]:
    """weight_scale's shape: [O] per channel, [O, ceil(I / block_k)] block-wise."""
    return (out_features,) if block_k is None else (out_features, -(-in_features // block_k))


def fp8_linear(x: jax.Array, weight: jax.Array, weight_scale: jax.Array,
               input_scale: jax.Array | None, *, block_k: int | None = None,
               residual: jax.Array | None = None,
               norm: tuple[jax.Array, float] | None = None) -> jax.Array:
    """x [T, I] (model dtype), weight [O, I] e4m3, weight_scale [O] -> [T, O] in x's dtype;
    ``residual`` [T, O] in x's dtype: residual + that (the product rounded first), added in the
    skinny Mosaic kernel's epilogue where it runs the GEMM, else after it.

    Activations quantized per token (``input_scale`` None) or with the static per-tensor scale
    ``input_scale`` [] (a 0-d value: ``[...]`` of a 0-d Variable is [1]); weight-only (no
    activation quantization) when T <= ``weight_only_max_tokens()``. With ``block_k``,
    weight_scale is [O, ceil(I / block_k)] and the layer runs ``block_fp8_linear``.
    ``norm`` = (g [I], eps): the input is RMSNorm(x) with weight g, folded into the skinny
    kernel's ``quantize_x`` form where it takes the step (``qx_norm_folds``), else applied
    first as the model's ``RMSNorm`` applies it.
    """
    add = (lambda y: y) if residual is None else (lambda y: residual + y)  # noqa: E731
    res = residual if skinny_residual_enabled() else None  # else added after the kernel
    if norm is not None:
        if input_scale is None and block_k is None:
            y = _skinny_mgpu_quantize_x(x, weight, weight_scale, res, norm=norm)
            if y is not None:
                return y if res is not None else add(y)
        from jaxllm.models.llama import rms_norm

        x = rms_norm(x, norm[0], norm[1])
    if block_k is not None:
        return add(block_fp8_linear(x, weight, weight_scale, block_k))
    if input_scale is None:  # rows quantized inside the skinny kernel (JAXLLM_FP8_SKINNY_MGPU_QX)
        y = _skinny_mgpu_quantize_x(x, weight, weight_scale, res)
        if y is not None:
            return y if res is not None else add(y)
    if x.shape[0] <= weight_only_max_tokens():
        y = _skinny_mgpu_weight_only(x, weight, weight_scale, res, residual is not None)
        if y is not None:
            return y if res is not None else add(y)
        acc = jax.lax.dot_general(x, weight.astype(x.dtype), (((1,), (1,)), ((), ())),
                                  preferred_element_type=jnp.float32)
        return add((acc * weight_scale.astype(jnp.float32)[None, :]).astype(x.dtype))
    xq, xs = _quantize_input(x, input_scale)
    y = _skinny_mgpu(xq, xs, weight, weight_scale, x.dtype, res)
    if y is not None:
        return y if res is not None else add(y)
    return add(fp8_matmul_xla(xq, xs, weight, weight_scale, out_dtype=x.dtype,
                              w_transposed=True, acc_dtype=fp8_gemm_out_dtype(x.dtype)))


SKINNY_MGPU_ENV = "JAXLLM_FP8_SKINNY_MGPU"
# Per-channel W8A8 projections of <= 64 token rows on a Hopper GPU run the Mosaic GPU skinny
# kernel (pallas_kernels/fp8_skinny_mgpu.py: each CTA streams 64 whole weight rows through a
# TMA pipeline, no split-K sum). H100, 2026-12-06 11:15 (benchmarks/RESULTS.md): at M = 64,
# where the engine's steps were W8A8 through cuBLASLt, q/k/v / o / gate/up / down took 11.1 /
# 8.4 / 45.1 / 23.2 µs against cuBLASLt's 13.9 / 11.7 / 45.5 / 28.5.
SKINNY_MGPU_TILE = fp8_skinny_mgpu.DEFAULT_TILE
SKINNY_MGPU_MAX_ROWS = 64  # the rows measured; the kernel takes up to 256


def skinny_mgpu_tile() -> tuple[int, int] | None:
    """``JAXLLM_FP8_SKINNY_MGPU``: "0" (off: XLA's fp8 dot), "tile_k,steps" (sweeps and A/B
    runs; on a CPU it runs Mosaic GPU's interpreter), or unset: ``SKINNY_MGPU_TILE`` on a GPU,
    off elsewhere. Read at trace time."""
    return _kernel_tile_env(SKINNY_MGPU_ENV, SKINNY_MGPU_TILE, ("tile_k", "steps"))


SKINNY_RESIDUAL_ENV = "JAXLLM_FP8_SKINNY_RESIDUAL"


def skinny_residual_enabled() -> bool:
    """``JAXLLM_FP8_SKINNY_RESIDUAL`` = "0" adds the o / down projections' residual after the
    skinny Mosaic kernel (an XLA fusion) instead of in its epilogue ("1", the default: H100,
    2026-12-06 evening, the batch-32 fp8 decode step 5.41 -> 5.33 ms of GPU time, 524 -> 508
    ops; benchmarks/RESULTS.md). Read at trace time."""
    import os

    raw = os.environ.get(SKINNY_RESIDUAL_ENV, "1")
    if raw not in ("0", "1"):
        raise ValueError(f"{SKINNY_RESIDUAL_ENV} must be 0 or 1, got {raw!r}.")
    return raw == "1"


SKINNY_MGPU_WO_ENV = "JAXLLM_FP8_SKINNY_MGPU_WO"
# The engine's weight-only fp8 steps (<= weight_only_max_tokens() rows) keep XLA's W8A16 GEMM
# unless this is set. H100 (benchmarks/RESULTS.md), batch 1 at 1k context: the skinny Mosaic
# kernel's weight-only form took 3.98-4.02 ms/token with one compute warpgroup against XLA's
# 3.48-3.49 (2026-12-06 11:45), and 3.81 with two against 3.47 (14:15), though two make its
# o and q/k/v GEMMs faster than XLA's alone (9.65 / 11.34 against 10.87 / 13.82 µs).
SKINNY_MGPU_WO_TILE: tuple[int, int, int, int, int] | None = None


def skinny_mgpu_wo_tile() -> tuple[int, int, int, int, int] | None:
    """``JAXLLM_FP8_SKINNY_MGPU_WO``: "0" (XLA's W8A16 GEMM), "tile_k,steps,compute_wgs[,
    residual_only[,f16]]" (the skinny Mosaic kernel's weight-only form for the engine's
    weight-only steps, at every projection, or with residual_only 1 at the o / down
    projections alone, those that add the residual stream; f16 1: the rows cast to float16
    first, within its range, for the one-instruction e4m3 -> float16 upcast, the cast left to
    XLA to fuse into the rows' producer; on a CPU it runs Mosaic GPU's interpreter), or unset:
    ``SKINNY_MGPU_WO_TILE``. Read at trace time."""
    tile = _kernel_tile_env(SKINNY_MGPU_WO_ENV, SKINNY_MGPU_WO_TILE,
                            ("tile_k", "steps", "compute_wgs", "residual_only", "f16"),
                            optional=(0, 0))
    if tile is not None and tile[2] not in (1, 2):  # 4 never finished on the H100
        raise ValueError(f"{SKINNY_MGPU_WO_ENV}: compute_wgs={tile[2]} must be 1 or 2.")
    return tile


def skinny_mgpu_wo_takes_all() -> bool:
    """Whether ``JAXLLM_FP8_SKINNY_MGPU_WO`` sends every weight-only projection to the skinny
    Mosaic kernel (not only the o / down ones)."""
    tile = skinny_mgpu_wo_tile()
    return tile is not None and not tile[3]


SKINNY_MGPU_QX_ENV = "JAXLLM_FP8_SKINNY_MGPU_QX"
# Off by default until measured in the engine (batch 1 is where it was built for: the
# activations' quantization kernels of W8A8 gone, so the skinny kernel's fp8 wgmma can replace
# XLA's W8A16 GEMM there without the ~2 small kernels a projection that made W8A8 at batch 1
# slower, 3.91 against 3.63 ms/token on the H100, 2026-12-06 11:15).
SKINNY_MGPU_QX_TILE: tuple[int, int, int, int] | None = None


def skinny_mgpu_qx_tile() -> tuple[int, int, int, int] | None:
    """``JAXLLM_FP8_SKINNY_MGPU_QX``: "0" (off), or "tile_k,steps,max_rows[,norm]": fp8
    projections of at most max_rows token rows (<= ``SKINNY_MGPU_MAX_ROWS``) run W8A8 through
    the skinny Mosaic kernel with their 16-bit rows quantized inside it (``quantize_x``: per
    token and tile_k block of features, no quantization kernel before the GEMM), in place of
    the weight-only or the XLA-quantized W8A8 form those rows would take, and (norm 1, the
    default) the q/k/v and gate/up GEMMs take their input RMSNorm in (``qx_norm_folds``);
    unset: ``SKINNY_MGPU_QX_TILE``. Read at trace time; on a CPU it runs Mosaic GPU's
    interpreter."""
    tile = _kernel_tile_env(SKINNY_MGPU_QX_ENV, SKINNY_MGPU_QX_TILE,
                            ("tile_k", "steps", "max_rows", "norm"), optional=(1,))
    if tile is not None and not 1 <= tile[2] <= SKINNY_MGPU_MAX_ROWS:
        raise ValueError(f"{SKINNY_MGPU_QX_ENV}: max_rows={tile[2]} must be 1 to "
                         f"{SKINNY_MGPU_MAX_ROWS}.")
    if tile is not None and tile[3] not in (0, 1):
        raise ValueError(f"{SKINNY_MGPU_QX_ENV}: norm={tile[3]} must be 0 or 1.")
    return tile


def skinny_mgpu_qx_takes(num_tokens: int) -> bool:
    """Whether ``JAXLLM_FP8_SKINNY_MGPU_QX`` sends fp8 projections of ``num_tokens`` rows to the
    skinny Mosaic kernel's ``quantize_x`` form (where its shapes fit)."""
    tile = skinny_mgpu_qx_tile()
    return tile is not None and num_tokens <= tile[2]


def _fit_skinny_tile(T: int, K: int, N: int, tile_k: int, steps: int, out_dtype,
                     x_itemsize: int, *, residual: bool = False, quantize_x: bool = False
                     ) -> tuple[int, int] | None:
    """The skinny Mosaic kernel's (tile_k, steps) for a [T, K] x [N, K] GEMM: tile_k halved
    until it divides K, steps lowered until the pipeline's buffers fit ``SMEM_BYTES`` and the
    CTA's (with the epilogue's, ``residual``, ``quantize_x``) ``CTA_SMEM_BYTES``; None where
    the kernel does not take the shapes (``fp8_skinny_mgpu.check_shapes``)."""
    while tile_k > 128 and K % tile_k:
        tile_k //= 2
    steps = min(steps, max(1, K // tile_k))

    def fits(st: int) -> bool:
        cta = fp8_skinny_mgpu.cta_smem_bytes(
            T, tile_k, st, x_itemsize, out_itemsize=jnp.dtype(out_dtype).itemsize,
            residual=residual, quantize_x=quantize_x)
        return (fp8_skinny_mgpu.pipeline_bytes(T, tile_k, st, x_itemsize)
                <= fp8_skinny_mgpu.SMEM_BYTES and cta <= fp8_skinny_mgpu.CTA_SMEM_BYTES)

    while steps > 1 and not fits(steps):
        steps -= 1
    try:
        fp8_skinny_mgpu.check_shapes(T, K, N, tile_k, out_dtype)
    except ValueError:
        return None
    return (tile_k, steps) if fits(steps) else None


MLP_MGPU_ENV = "JAXLLM_FP8_MLP_MGPU"
# Off by measurement: the batch-1 MLP as one Mosaic GPU kernel (pallas_kernels/fp8_mlp_mgpu.py)
# in place of XLA's weight-only gate/up GEMM, SwiGLU and down GEMM took fp8 batch 1 from 3.51 to
# 3.73 ms/token on the H100 (2026-12-07, benchmarks/RESULTS.md).
MLP_MGPU_MAX_ROWS: int | None = None


def mlp_mgpu_config() -> tuple[int, int] | None:
    """``JAXLLM_FP8_MLP_MGPU``: "0" (off), or "max_rows[,down_t]" (max_rows 1 to
    ``fp8_mlp_mgpu.MAX_TOKENS``; down_t 0 or 1, default 0: the kernel's ``down_t`` form): fp8
    MLPs of at most max_rows token rows run as one Mosaic GPU kernel (``fp8_mlp``); unset:
    ``MLP_MGPU_MAX_ROWS`` on a GPU. Read at trace time; on a CPU it runs Mosaic GPU's
    interpreter."""
    from pallas_kernels.fp8_mlp_mgpu import MAX_TOKENS

    raw = _kernel_tile_env(MLP_MGPU_ENV, None if MLP_MGPU_MAX_ROWS is None
                           else (MLP_MGPU_MAX_ROWS, 0), ("max_rows", "down_t"),
                           optional=(0,))
    if raw is not None and not 1 <= raw[0] <= MAX_TOKENS:
        raise ValueError(f"{MLP_MGPU_ENV}: max_rows={raw[0]} must be 1 to {MAX_TOKENS}.")
    if raw is not None and raw[1] not in (0, 1):
        raise ValueError(f"{MLP_MGPU_ENV}: down_t={raw[1]} must be 0 or 1.")
    return raw


def fp8_mlp(x: jax.Array, gate_up, down, residual: jax.Array | None = None
            ) -> jax.Array | None:
    """Llama's MLP, ``residual + down(silu(gate(x)) * up(x))`` (``residual`` None: no add), as
    one Mosaic GPU kernel (``pallas_kernels.fp8_mlp_mgpu``: W8A8, x quantized inside it; the
    residual is the float32 sum's start), or None where it does not apply: off or more rows
    than ``mlp_mgpu_config``'s max_rows, layers that are not an fp8 ``FusedLinear`` gate/up and an
    ``Fp8Linear`` down without bias, block-wise scales or static input scales, tensor
    parallelism, a GPU other than Hopper, shapes the kernel does not take, a float32 x.
    x [T, E] -> [T, E] in x's dtype."""
    from pallas_kernels import fp8_mlp_mgpu as kern

    cfg = mlp_mgpu_config()
    T = x.shape[0]
    if (cfg is None or T > cfg[0] or getattr(gate_up, "weight", None) is None
            or not isinstance(down, Fp8Linear) or gate_up.groups[1] != 2
            or gate_up.block_k is not None or down.block_k is not None
            or gate_up.bias is not None or down.bias is not None
            or gate_up.input_scale is not None or down.input_scale is not None
            or heads_mesh() is not None or x.dtype not in (jnp.bfloat16, jnp.float16)):
        return None
    dev = jax.devices()[0]
    if not mosaic_kernel_runs_on(dev.platform, getattr(dev, "compute_capability", None)):
        return None
    F, E = gate_up.groups[0], gate_up.in_features
    try:
        kern.fit_config(T, E, F, x.dtype.itemsize, down_t=bool(cfg[1]))
    except ValueError:
        return None
    ws = gate_up.weight_scale[...]
    y = kern.fp8_mlp_mgpu(x, gate_up.weight[...], ws[:, 0], ws[:, 1], down.weight[...],
                          down.weight_scale[...], residual, down_t=bool(cfg[1]),
                          interpret=jax.default_backend() != "gpu")
    return y.astype(x.dtype)


def _skinny_mgpu_weight_only(x: jax.Array, weight: jax.Array, weight_scale: jax.Array,
                             residual: jax.Array | None = None, adds_residual: bool = False
                             ) -> jax.Array | None:
    """A per-channel weight-only projection through ``fp8_skinny_matmul_mgpu`` (x_scale None;
    ``residual`` added in its epilogue), or None where it does not apply: no tile
    (``skinny_mgpu_wo_tile``), a projection that does not add the residual stream
    (``adds_residual`` False) when the tile says residual_only, tensor parallelism, a GPU other
    than Hopper, shapes or a dtype it does not take (float32 rows)."""
    tile = skinny_mgpu_wo_tile()
    (T, K), N = x.shape, weight.shape[0]
    if tile is None or heads_mesh() is not None or x.dtype not in (jnp.bfloat16, jnp.float16):
        return None
    if tile[3] and not adds_residual:
        return None
    dev = jax.devices()[0]
    if not mosaic_kernel_runs_on(dev.platform, getattr(dev, "compute_capability", None)):
        return None
    tile_k, steps, wgs, _, f16 = tile
    out_dtype = x.dtype
    if f16 and x.dtype == jnp.bfloat16:  # 65280: the largest bfloat16 below float16's max
        x = jnp.clip(x, -65280, 65280).astype(jnp.float16)
    fit = _fit_skinny_tile(T, K, N, tile_k, steps, out_dtype, x.dtype.itemsize,
                           residual=residual is not None)
    if fit is None:
        return None
    tile_k, steps = fit
    while wgs > 1 and (tile_k // 128) % wgs:
        wgs //= 2
    return fp8_skinny_mgpu.fp8_skinny_matmul_mgpu(
        x, None, weight, weight_scale, out_dtype, tile_k=tile_k, steps=steps, compute_wgs=wgs,
        residual=residual, interpret=jax.default_backend() != "gpu")


def _skinny_mgpu_quantize_x(x: jax.Array, weight: jax.Array, weight_scale: jax.Array,
                            residual: jax.Array | None = None,
                            norm: tuple[jax.Array, float] | None = None) -> jax.Array | None:
    """A per-channel projection through ``fp8_skinny_matmul_mgpu(..., quantize_x=True)`` (W8A8,
    x's rows quantized in the kernel; ``residual`` added in its epilogue; ``norm`` = (g, eps):
    RMSNorm folded in), or None where it does not apply: ``skinny_mgpu_qx_takes`` says no,
    tensor parallelism, a GPU other than Hopper, shapes or a dtype it does not take (float32
    rows)."""
    (T, K), N = x.shape, weight.shape[0]
    if (not skinny_mgpu_qx_takes(T) or heads_mesh() is not None
            or x.dtype not in (jnp.bfloat16, jnp.float16)):
        return None
    dev = jax.devices()[0]
    if not mosaic_kernel_runs_on(dev.platform, getattr(dev, "compute_capability", None)):
        return None
    tile_k, steps, _, _ = skinny_mgpu_qx_tile()
    fit = _fit_skinny_tile(T, K, N, tile_k, steps, x.dtype, x.dtype.itemsize,
                           residual=residual is not None, quantize_x=True)
    if fit is None:
        return None
    return fp8_skinny_mgpu.fp8_skinny_matmul_mgpu(
        x, None, weight, weight_scale, x.dtype, tile_k=fit[0], steps=fit[1], residual=residual,
        quantize_x=True, norm=norm, interpret=jax.default_backend() != "gpu")


def qx_norm_folds(proj, norm, num_tokens: int) -> bool:
    """Whether a fused fp8 projection (q/k/v, gate/up) of a ``num_tokens``-row step takes its
    input RMSNorm ``norm`` folded in (``FusedLinear(x, norm=(g, eps))``): per-channel e4m3
    weights without bias or static input scale, a plain (offset 0) norm, and
    ``JAXLLM_FP8_SKINNY_MGPU_QX`` sending the step to the skinny kernel's ``quantize_x`` form
    (on a GPU that cannot run it, the projection applies the norm first)."""
    return (norm is not None and not norm.offset and getattr(proj, "kernel", 0) is None
            and proj.bias is None and proj.input_scale is None and proj.block_k is None
            and skinny_mgpu_qx_takes(num_tokens) and bool(skinny_mgpu_qx_tile()[3]))


def _skinny_mgpu(xq: jax.Array, xs: jax.Array, weight: jax.Array, weight_scale: jax.Array,
                 out_dtype, residual: jax.Array | None = None) -> jax.Array | None:
    """A per-channel W8A8 projection of <= ``SKINNY_MGPU_MAX_ROWS`` rows through
    ``fp8_skinny_matmul_mgpu``, or None where it does not apply (no tile, tensor parallelism, a
    GPU other than Hopper, shapes it does not take: N not a multiple of 64, K not a multiple
    of 128, a float32 model). ``xs``: per-token [T] / [T, 1], or a static per-tensor scale
    (broadcast over the rows). tile_k is halved until it divides K, steps lowered until the
    buffers fit."""
    tile = skinny_mgpu_tile()
    (T, K), N = xq.shape, weight.shape[0]
    if tile is None or heads_mesh() is not None or T > SKINNY_MGPU_MAX_ROWS:
        return None
    dev = jax.devices()[0]
    if not mosaic_kernel_runs_on(dev.platform, getattr(dev, "compute_capability", None)):
        return None
    fit = _fit_skinny_tile(T, K, N, *tile, out_dtype, 1, residual=residual is not None)
    if fit is None:
        return None
    tile_k, steps = fit
    xs = xs.astype(jnp.float32).reshape(-1)
    if xs.size != T:
        xs = jnp.broadcast_to(xs[:1], (T,))  # a static per-tensor scale
    return fp8_skinny_mgpu.fp8_skinny_matmul_mgpu(
        xq, xs, weight, weight_scale, out_dtype, tile_k=tile_k, steps=steps, residual=residual,
        interpret=jax.default_backend() != "gpu")


def dequantize_blockwise(weight: jax.Array, weight_scale: jax.Array, block_k: int,
                         dtype=jnp.float32) -> jax.Array:
    """weight [O, I] e4m3, weight_scale [O, ceil(I / block_k)] -> [O, I] in ``dtype``: each
    value times the scale of its channel's block of ``block_k`` input features (in fp32, one
    rounding to ``dtype``). With whole blocks (every published shape) the scale broadcasts over
    a [O, KB, block_k] view: a reshape and a multiply, no gather, for XLA to fuse into the
    GEMM's operand."""
    (O, I), KB = weight.shape, weight_scale.shape[1]
    scale = weight_scale.astype(jnp.float32)
    if I == KB * block_k:
        w = weight.reshape(O, KB, block_k).astype(jnp.float32) * scale[:, :, None]
        return w.reshape(O, I).astype(dtype)
    scale = jnp.repeat(scale, block_k, axis=1, total_repeat_length=KB * block_k)[:, :I]
    return (weight.astype(jnp.float32) * scale).astype(dtype)


BLOCK_GEMM_ENV = "JAXLLM_FP8_BLOCK_GEMM"
BLOCK_GEMM_MODES = ("auto", "w8a16", "w8a8")


def block_gemm_mode() -> str:
    """How block-wise fp8 projections run: ``JAXLLM_FP8_BLOCK_GEMM`` = "auto" (the default),
    "w8a16" or "w8a8" (``block_fp8_linear``). Read at trace time."""
    import os

    raw = os.environ.get(BLOCK_GEMM_ENV, "auto")
    if raw not in BLOCK_GEMM_MODES:
        raise ValueError(f"{BLOCK_GEMM_ENV} must be one of {BLOCK_GEMM_MODES}, got {raw!r}.")
    return raw


def block_fp8_linear(x: jax.Array, weight: jax.Array, weight_scale: jax.Array,
                     block_k: int) -> jax.Array:
    """A block-wise fp8 projection: x [T, I], weight [O, I] e4m3, weight_scale [O, KB] -> [T, O]
    in x's dtype, fp32 accumulation. Two forms (``block_gemm_mode()`` picks):

      w8a16: at <= 64 rows on a GPU the skinny kernel with block scales (the e4m3 weight
        upcast and each K block's product scaled in registers: ``_block_skinny``), else
        x @ dequantize_blockwise(weight).T through XLA (which fuses the dequantization into the
        GEMM only from ~4096 rows; below, it writes the weight once in bf16 first).
      w8a8: vLLM's W8A8 block linear: x quantized per token and group of ``block_k`` features
        (``quantize_activation_per_token_group``), then the skinny kernel at <= 64 rows, the
        Mosaic GPU kernel above (``_block_mgpu``: fp8 wgmma, each K block's product promoted to
        float32 with its scales; 16-bit models, 128-wide K blocks, N a multiple of 128), or
        else ``pallas_kernels.fp8_matmul.fp8_block_matmul`` (Triton).

    "auto" (the default) runs w8a16 at <= ``weight_only_max_tokens()`` rows and w8a8 above
    wherever a kernel of ours takes the step (the skinny one to 64 rows, the Mosaic one above:
    a GPU), else w8a16: what per-channel fp8 does (weight-only at <= 16 rows, W8A8 above).
    Both forms run their Pallas kernels on one device only; under tensor parallelism the layer
    runs XLA's w8a16 (XLA cannot split a custom call).

    Measured on the H100 (benchmarks/RESULTS.md, 2026-12-06 03:30): at 1-16 rows the two skinny
    forms are within 0-9% of each other per GEMM and batch-1 decode takes 4.24 / 4.22 ms/token
    (w8a16 / w8a8); at 64 rows the w8a16 kernel (its e4m3 -> bf16 upcast of a 64-row tile's
    weight) takes 1.2-1.7x the w8a8 one, quantization included (gate/up 172.6 against 102.5
    µs). Above 64 rows (05:45): the Mosaic kernel takes 0.26-0.91x of XLA's w8a16 time per
    GEMM (the Triton ``fp8_block_matmul`` 2-5x), offline throughput 5,273 -> 5,869 tok/s."""
    if heads_mesh() is None:
        mode, T = block_gemm_mode(), x.shape[0]
        if mode == "w8a8" or (mode == "auto" and weight_only_max_tokens() < T <= SKINNY_MAX_ROWS
                              and block_skinny_tile() is not None):
            return block_fp8_linear_w8a8(x, weight, weight_scale, block_k)
        if mode == "auto" and _mgpu_applies(T, x.shape[1], weight, weight_scale, block_k,
                                            x.dtype):
            return block_fp8_linear_w8a8(x, weight, weight_scale, block_k)
    return block_fp8_linear_w8a16(x, weight, weight_scale, block_k)


BLOCK_SKINNY_ENV = "JAXLLM_FP8_BLOCK_SKINNY"
# The skinny kernel's (block_n, tile K, split_k, num_warps, num_stages) for block-wise fp8
# projections of <= 64 token rows on a GPU. Why a kernel at all: XLA does not fuse the block
# dequantization into its GEMM below ~4096 rows, so w8a16 wrote and re-read the whole weight in
# bf16 (H100, 2026-12-06: 53 against bf16's 22 us for the q/k/v shape at M = 1, batch-1 decode
# 14.6 ms/token against per-channel fp8's 3.6; benchmarks/RESULTS.md). The tile: batch-1
# decode on the H100 (2026-12-06 03:30, 4 steps a launch, 1k context) 4.24 ms/token with this
# one against 4.29-6.16 with seven others (64 x 256 x 4 splits, the first guess: 4.63).
BLOCK_SKINNY_TILE = (32, 128, 4, 4, 4)


def _kernel_tile_env(env: str, default, fields: tuple[str, ...], words: tuple[str, ...] = (),
                     optional: tuple[int, ...] = ()):
    """A kernel's tile from the environment variable ``env``, read at trace time: unset ->
    ``default`` on a GPU, None elsewhere; "0" -> None (off); one of ``words`` as it is; else
    ``len(fields)`` comma-separated integers, of which the last ``len(optional)`` may be left
    out (they then take these values); a ValueError that names the expected form."""
    import os

    raw = os.environ.get(env)
    if raw is None:
        return default if jax.default_backend() == "gpu" else None
    if raw == "0":
        return None
    if raw in words:
        return raw
    try:
        tile = tuple(int(v) for v in raw.split(","))
    except ValueError:
        tile = ()
    n_req = len(fields) - len(optional)
    if not n_req <= len(tile) <= len(fields) or not tile:
        choices = ", ".join(("0",) + words)
        form = ",".join(fields[:n_req]) + "".join(f"[,{f}]" for f in fields[n_req:])
        count = f"{len(fields)}" if not optional else f"{n_req} to {len(fields)}"
        raise ValueError(f"{env} must be {choices} or '{form}' ({count} integers), "
                         f"got {raw!r}.")
    return tile + tuple(optional[len(tile) - n_req:])


def block_skinny_tile() -> tuple[int, int, int, int, int] | None:
    """``JAXLLM_FP8_BLOCK_SKINNY``: "0" (XLA's dot at every size), "block_n,block_k,split_k,
    warps,stages" (sweeps; also runs the kernel in interpret mode on a CPU), or unset:
    ``BLOCK_SKINNY_TILE`` on a GPU, off elsewhere. Read at trace time."""
    return _kernel_tile_env(BLOCK_SKINNY_ENV, BLOCK_SKINNY_TILE,
                            ("block_n", "block_k", "split_k", "warps", "stages"))


def _block_skinny(x: jax.Array, weight: jax.Array, weight_scale: jax.Array, block_k: int,
                  x_scale: jax.Array | None = None, out_dtype=None) -> jax.Array | None:
    """A block-wise fp8 projection of <= 64 rows through ``skinny_matmul`` (each K block's
    product scaled in the kernel, the weight read once in e4m3): W8A16 for a bf16 x, W8A8 with
    an e4m3 x and its per-group ``x_scale``; ``out_dtype`` default x's dtype. None where it
    does not apply (no tile, tensor parallelism, a ragged last K block, shapes the tile does
    not divide): the caller's XLA form then. ``split_k`` is halved until the tile divides K."""
    tile = block_skinny_tile()
    if tile is None or heads_mesh() is not None:
        return None
    block_n, tile_k, split_k, num_warps, num_stages = tile
    (T, K), N = x.shape, weight.shape[0]
    if weight_scale.shape[1] * block_k != K or tile_k % block_k:
        return None
    while split_k > 1 and not skinny_fits(T, K, N, block_n=block_n, block_k=tile_k,
                                          split_k=split_k):
        split_k //= 2
    if not skinny_fits(T, K, N, block_n=block_n, block_k=tile_k, split_k=split_k):
        return None
    return skinny_matmul(x, weight, weight_scale, x_scale, out_dtype=out_dtype or x.dtype,
                         block_n=block_n, block_k=tile_k, split_k=split_k,
                         num_warps=num_warps, num_stages=num_stages, scale_block_k=block_k,
                         interpret=jax.default_backend() != "gpu")


BLOCK_MGPU_ENV = "JAXLLM_FP8_BLOCK_MGPU"
# Block-wise fp8 projections of more than 64 token rows on a GPU run the Mosaic GPU block
# kernel (pallas_kernels/fp8_block_mgpu.py) with its tile picked by shape ("auto":
# fp8_block_mgpu.pick_tile). Why: XLA's w8a16 form writes the dequantized weight in bf16 before
# its GEMM below ~4096 rows; H100, 2026-12-06 (benchmarks/RESULTS.md): per GEMM at 128-4096
# rows the kernel (quantization included) took 0.26-0.91x of that form's time, and the offline
# throughput of a block-wise checkpoint rose from 5,273 to 5,869-5,906 output tok/s; with the
# grouped tile order, 2-CTA clusters and two K blocks a step (08:40) to 6,811.
BLOCK_MGPU_TILE: str | tuple[int, int, int, int, int] | None = "auto"


def block_mgpu_tile() -> str | tuple[int, int, int, int, int] | None:
    """``JAXLLM_FP8_BLOCK_MGPU``: "0" (off: XLA's w8a16 form above 64 rows), "auto" (the tile
    by shape: ``fp8_block_mgpu.pick_tile``), "tile_m,steps,k_blocks[,
    group_m,cluster_m]" (sweeps and A/B runs, e.g. 128,2,2 or 128,4,1,8,2; group_m / cluster_m
    default 0 / 1; on a CPU it runs Mosaic GPU's interpreter), or unset: ``BLOCK_MGPU_TILE``
    on a GPU, off elsewhere. Read at trace time."""
    return _kernel_tile_env(BLOCK_MGPU_ENV, BLOCK_MGPU_TILE,
                            ("tile_m", "steps", "k_blocks", "group_m", "cluster_m"), ("auto",),
                            optional=(0, 1))


def mosaic_kernel_runs_on(platform: str, compute_capability) -> bool:
    """Whether the Mosaic GPU block kernel runs on this device: Hopper (compute capability 9.x:
    its wgmma and TMA multicast exist there alone; Ada has fp8 tensor cores but no wgmma,
    Blackwell's tensor cores take other instructions), or any non-GPU platform, where it is
    interpreted."""
    if platform != "gpu":
        return True
    return str(compute_capability).split(".")[0] == "9"


def _mgpu_applies(T: int, K: int, weight: jax.Array, weight_scale: jax.Array,
                  block_k: int, out_dtype) -> bool:
    """Whether ``_block_mgpu`` takes a [T, K] x [N, K] projection (see there)."""
    tile = block_mgpu_tile()
    if tile is None or heads_mesh() is not None or T <= SKINNY_MAX_ROWS:
        return False
    dev = jax.devices()[0]
    if not mosaic_kernel_runs_on(dev.platform, getattr(dev, "compute_capability", None)):
        return False  # the Triton block kernel / XLA's forms instead
    if weight_scale.shape[1] * block_k != K:
        return False
    if tile != "auto" and (tile[2] not in (1, 2) or weight_scale.shape[1] % tile[2]
                           or tile[3] < 0 or tile[4] not in (1, 2)):
        return False  # k_blocks: 1, or 2 over an even number of K blocks
    try:
        check_mgpu_shapes(T, K, weight.shape[0], block_k,
                          32 if tile == "auto" else tile[0], out_dtype)
    except ValueError:
        return False
    return True


def _block_mgpu(xq: jax.Array, xs: jax.Array, weight: jax.Array, weight_scale: jax.Array,
                block_k: int, out_dtype) -> jax.Array | None:
    """A block-wise W8A8 projection of more than 64 rows through the Mosaic GPU kernel
    (``fp8_block_matmul_mgpu``), or None where it does not apply (no tile, tensor parallelism,
    a GPU other than Hopper, what it does not take: K blocks other than 128, N not a multiple
    of 128, a float32 model)."""
    if not _mgpu_applies(*xq.shape, weight, weight_scale, block_k, out_dtype):
        return None
    tile = block_mgpu_tile()
    tile_m, steps, k_blocks, group_m, cluster_m = (None,) * 5 if tile == "auto" else tile
    return fp8_block_matmul_mgpu(xq, xs, weight, weight_scale, block_k, out_dtype,
                                 tile_m=tile_m, steps=steps, k_blocks=k_blocks, group_m=group_m,
                                 cluster_m=cluster_m, interpret=jax.default_backend() != "gpu")


def block_fp8_linear_w8a16(x: jax.Array, weight: jax.Array, weight_scale: jax.Array,
                           block_k: int) -> jax.Array:
    """``block_fp8_linear``'s w8a16 form: the skinny kernel at <= 64 rows where it applies
    (``_block_skinny``), else XLA's dot over ``dequantize_blockwise`` (fused into the GEMM at
    prefill sizes)."""
    y = _block_skinny(x, weight, weight_scale, block_k)
    if y is not None:
        return y
    w = dequantize_blockwise(weight, weight_scale, block_k, x.dtype)
    acc = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return acc.astype(x.dtype)


def block_fp8_linear_w8a8(x: jax.Array, weight: jax.Array, weight_scale: jax.Array,
                          block_k: int, **blocks) -> jax.Array:
    """``block_fp8_linear``'s w8a8 form: per-group activation quantization, then the skinny
    kernel at <= 64 rows or the Mosaic GPU kernel above where they apply (unless ``blocks``
    are given), else ``fp8_block_matmul``; ``blocks``: that kernel's block_m / block_n /
    num_warps / num_stages (default: block_m the power of two >= T in [16, 64], the kernel's
    others)."""
    xq, xs = quantize_activation_per_token_group(x, block_k)
    y = None
    if not blocks:
        y = _block_skinny(xq, weight, weight_scale, block_k, xs, x.dtype)
        if y is None:
            y = _block_mgpu(xq, xs, weight, weight_scale, block_k, x.dtype)
    if y is not None:
        return y
    T = x.shape[0]
    blocks.setdefault("block_m", min(64, max(16, 1 << (T - 1).bit_length())))
    return fp8_block_matmul(xq, xs, weight, weight_scale, block_k, x.dtype,
                            interpret=jax.default_backend() != "gpu", **blocks)


def _quantize_input(x: jax.Array, input_scale: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """x [T, I] -> (e4m3 [T, I], its scale): per token, or the static per-tensor one."""
    if input_scale is None:
        return quantize_activation_per_token(x)
    return jnp.clip(x.astype(jnp.float32) / input_scale, -E4M3_MAX, E4M3_MAX).astype(FP8), \
        input_scale


FUSED_SWIGLU_ENV = "JAXLLM_FP8_FUSED_SWIGLU"


def fused_swiglu_enabled() -> bool:
    """``JAXLLM_FP8_FUSED_SWIGLU`` = "1" turns ``fp8_swiglu_mlp`` on (an A/B switch, off by
    default: on the H200, 16384 tokens, the kernel alone takes 0.67 ms against XLA's two
    fusions' 0.77, but in the engine fp8 + fp8 KV ran 10,870 / 10,513 tok/s with it against
    10,974 / 10,926 without, interleaved in one call; benchmarks/RESULTS.md, "Rerun of
    2026-12-01 (late night, 23:10)"). Read at trace time."""
    import os

    raw = os.environ.get(FUSED_SWIGLU_ENV, "0")
    if raw not in ("0", "1"):
        raise ValueError(f"{FUSED_SWIGLU_ENV} must be 0 or 1, got {raw!r}.")
    return raw == "1"


SWIGLU_TILE_ENV = "JAXLLM_FP8_SWIGLU_TILE"
# silu_mul_quant's (token rows a program, channels a tile, warps, stages) in the engine: the
# best of the H200 sweeps of 2026-12-01, 20:27 rerun (benchmarks/RESULTS.md).
SWIGLU_TILE = (2, 512, 4, 1)


def swiglu_tile() -> tuple[int, int, int, int]:
    """``JAXLLM_FP8_SWIGLU_TILE`` ("rows,chunk,warps,stages", for sweeps) or ``SWIGLU_TILE``.
    Read at trace time."""
    import os

    raw = os.environ.get(SWIGLU_TILE_ENV)
    if raw is None:
        return SWIGLU_TILE
    try:
        rows, chunk, warps, stages = (int(v) for v in raw.split(","))
    except ValueError:
        raise ValueError(f"{SWIGLU_TILE_ENV} must be 'rows,chunk,warps,stages' (four integers), "
                         f"got {raw!r}.") from None
    return rows, chunk, warps, stages


def fp8_swiglu_mlp(x: jax.Array, gate_up, down) -> jax.Array | None:
    """Llama's MLP, ``down(silu(gate(x)) * up(x))``, over fp8 layers with the SwiGLU and the down
    GEMM's input quantization in one kernel (``pallas_kernels.silu_mul_quant``) that reads the
    fused gate/up GEMM's raw output once; None where that path does not apply, and the caller
    runs the layers one by one:
      - the layers are not a ``FusedLinear`` gate/up in fp8 and an ``Fp8Linear`` down, or have
        a bias, or block-wise scales, or the down projection has a static input scale
        (pre-quantized checkpoints);
      - the step runs weight-only (T <= ``weight_only_max_tokens()``: no activation
        quantization to fuse);
      - under tensor parallelism (each shard holds a slice of F, and the per-token max spans F);
      - ``fused_swiglu_enabled()`` says no.
    x [T, E] -> [T, E] in x's dtype."""
    if (getattr(gate_up, "weight", None) is None or not isinstance(down, Fp8Linear)
            or gate_up.block_k is not None or down.block_k is not None
            or gate_up.bias is not None or down.bias is not None
            or down.input_scale is not None or x.shape[0] <= weight_only_max_tokens()
            or heads_mesh() is not None or not fused_swiglu_enabled()
            or not silu_mul_quant_fits(x.shape[0], gate_up.groups[0])):
        return None
    (A, C), I, T = gate_up.groups, gate_up.in_features, x.shape[0]
    scale = None if gate_up.input_scale is None else gate_up.input_scale.get_value()
    xq, xs = _quantize_input(x, scale)
    gemm_out = fp8_gemm_out_dtype(x.dtype)
    acc = jax.lax.dot_general(xq, gate_up.weight[...].reshape(A * C, I),
                              (((1,), (1,)), ((), ())), preferred_element_type=gemm_out)
    xs = jnp.broadcast_to(jnp.asarray(xs, jnp.float32).reshape(-1), (T,))
    rows, chunk, warps, stages = swiglu_tile()
    if A % chunk:
        chunk = None  # the kernel's default: the largest power of two dividing F, up to 512
    hq, hs = silu_mul_quant(acc, xs, gate_up.weight_scale[...].reshape(A * C), rows=rows,
                            chunk=chunk, num_warps=warps, num_stages=stages,
                            interpret=jax.default_backend() != "gpu")
    return fp8_matmul_xla(hq, hs, down.weight[...], down.weight_scale[...], out_dtype=x.dtype,
                          w_transposed=True, acc_dtype=gemm_out)


@functools.partial(jax.jit, static_argnames=("block",))
def _quantize_kernel(kernel: jax.Array, block: tuple[int, int] | None = None
                     ) -> tuple[jax.Array, jax.Array]:
    """A dense kernel [I, *out] (nnx.Linear's [I, O], or a fused [I, A, C]) -> (weight
    [*out, I] e4m3, scale [*out]): each output channel's absmax maps to 448. With ``block`` =
    (bn, bk): each bn x bk tile's absmax (tiles of the [O, I] matrix, out flattened), scale
    [*out, ceil(I / bk)] (the tile's scale on each of its rows), as block-wise checkpoints."""
    w = jnp.moveaxis(kernel.astype(jnp.float32), 0, -1)  # [*out, I]
    if block is None:
        amax = jnp.max(jnp.abs(w), axis=-1)
        scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
        q = jnp.clip(w / scale[..., None], -E4M3_MAX, E4M3_MAX).astype(FP8)
        return q, scale
    out, I = w.shape[:-1], w.shape[-1]
    (bn, bk), O = block, math.prod(out)
    NB, KB = -(-O // bn), -(-I // bk)
    tiles = jnp.pad(jnp.abs(w.reshape(O, I)), ((0, NB * bn - O), (0, KB * bk - I)))
    amax = jnp.max(tiles.reshape(NB, bn, KB, bk), axis=(1, 3))
    scale = jnp.repeat(jnp.where(amax > 0, amax / E4M3_MAX, 1.0), bn, axis=0)[:O]  # [O, KB]
    full = jnp.repeat(scale, bk, axis=1)[:, :I]
    q = jnp.clip(w.reshape(O, I) / full, -E4M3_MAX, E4M3_MAX).astype(FP8)
    return q.reshape(*out, I), scale.reshape(*out, KB)


def check_fp8_supported(what: str = "quantization='fp8'") -> None:
    """Raises ValueError on a GPU without fp8 tensor cores; logs that the CPU emulates fp8."""
    dev = jax.devices()[0]
    if dev.platform == "gpu":
        cc = getattr(dev, "compute_capability", None)
        try:
            major, minor = (int(p) for p in str(cc).split(".")[:2])
        except ValueError:
            return  # not an NVIDIA compute capability (ROCm): let XLA decide
        if (major, minor) < _MIN_FP8_COMPUTE_CAPABILITY:
            raise ValueError(
                f"{what} needs a GPU with fp8 tensor cores (NVIDIA compute capability >= 8.9: "
                f"Ada, Hopper or later); {dev.device_kind} has compute capability {cc}. Run "
                "without it (quantization=None / kv_cache_dtype='auto', bf16 weights), or on an "
                "H100/L40-class GPU.")
    elif dev.platform == "cpu":
        logger.warning("%s on the CPU: XLA emulates fp8 (operands upcast to float32), which is "
                       "slow and meant for tests; the speed-up needs an fp8 GPU.", what)


def quantize_model(model: nnx.Module, weight_block_size: tuple[int, int] | None = None
                   ) -> nnx.Module:
    """A dense Llama-family model -> the same model with fp8 projections (dynamic activations).

    ``weight_block_size`` (bn, bk): scales per bn x bk tile, as a block-wise checkpoint holds
    them (what ``write_fp8_checkpoint(strategy="block")`` would give, without the files); the
    default: per output channel.

    Builds the fp8 structure abstractly (``config.quantization = "fp8"``), quantizes each
    projection's kernel on the device one at a time and moves every other param over as is.
    Peak memory: the dense model plus the fp8 weights (the dense kernels are freed only when the
    caller drops ``model``).
    """
    config = model.config
    if config.quantization is not None:
        raise ValueError(f"the model is already quantized ({config.quantization!r}).")
    block = tuple(weight_block_size) if weight_block_size else None
    if config.fused_projections and block:
        raise ValueError("quantize_model(weight_block_size=...) takes the unfused model "
                         "(tiles are over each projection's own rows).")
    fp8_config = dataclasses.replace(config, quantization="fp8", activation_scheme="dynamic",
                                     weight_block_size=block)
    cls = type(model)
    abstract = nnx.eval_shape(lambda: cls(fp8_config, dtype=model.dtype, rngs=nnx.Rngs(0),
                                          attention_backend=model.attention_backend))
    src = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model))}
    graphdef, state = nnx.split(abstract)
    new, quantized = [], {}
    for path, var in nnx.to_flat_state(state):
        path = tuple(path)
        owner, leaf = path[:-1], path[-1]
        if owner and owner[-1] in QUANTIZED_LINEARS + FUSED_LINEARS and leaf in ("weight",
                                                                               "weight_scale"):
            if owner not in quantized:
                quantized[owner] = _quantize_kernel(src[owner + ("kernel",)].get_value(), block)
            new.append((path, var.replace(quantized[owner][leaf == "weight_scale"])))
        else:
            new.append((path, var.replace(src[path].get_value())))
    return nnx.merge(graphdef, nnx.from_flat_state(new))
