"""W8A8 FP8 (e4m3) matmul: quantizers, a Pallas (Triton) kernel, the XLA path and the reference.

Dimension keys: M rows (tokens), K contraction (input features), N output features.

  x: [M, K] activations, quantized per token (dynamic, one scale per row) or per tensor
  w: [K, N] weights, quantized per output channel (one scale per column) or per tensor (the
     format of pre-quantized checkpoints)
  out[M, N] = (x_fp8 @ w_fp8) * x_scale[:, None] * w_scale[None, :], fp32 accumulation.

Three implementations of one contract: ``fp8_matmul_reference`` (dequantize, fp32 matmul: the
trusted one), ``fp8_matmul_xla`` (``dot_general`` on fp8 operands with an fp32 result, which XLA
hands to cuBLASLt's fp8 GEMM on Hopper, then the scales) and ``fp8_matmul`` (Pallas kernel: tiles
over M and N, a loop over K, the dot on the fp8 tensor cores, scales applied once on the fp32
accumulator; optional split-K so decode shapes (small M) still spread over every SM).
benchmarks/kernels.py decides which one the engine uses per shape. The block-scaled variant
(``fp8_block_matmul``, scales per K block on both operands) is at the end of the file.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

FP8 = jnp.float8_e4m3fn
E4M3_MAX = float(jnp.finfo(FP8).max)  # 448


def _quantize(x: jax.Array, amax: jax.Array) -> tuple[jax.Array, jax.Array]:
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0).astype(jnp.float32)
    q = jnp.clip(x.astype(jnp.float32) / scale, -E4M3_MAX, E4M3_MAX).astype(FP8)
    return q, scale


def quantize_weight_per_channel(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w [K, N] -> (w_fp8 [K, N], scale [N] fp32): each output column's absmax maps to 448."""
    amax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=0)
    q, scale = _quantize(w, amax[None, :])
    return q, scale[0]


def quantize_activation_per_token(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [M, K] -> (x_fp8 [M, K], scale [M] fp32): dynamic, one scale per token row."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1)
    q, scale = _quantize(x, amax[:, None])
    return q, scale[:, 0]


def quantize_weight_per_tensor(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w [K, N] -> (w_fp8 [K, N], scale [] fp32)."""
    return _quantize(w, jnp.max(jnp.abs(w.astype(jnp.float32))))


def quantize_activation_per_tensor(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [M, K] -> (x_fp8 [M, K], scale [] fp32) (dynamic per-tensor)."""
    return _quantize(x, jnp.max(jnp.abs(x.astype(jnp.float32))))


def _scales(x_scale, w_scale, M, N):
    xs = jnp.broadcast_to(jnp.asarray(x_scale, jnp.float32).reshape(-1), (M,)) \
        if jnp.ndim(x_scale) == 0 else jnp.asarray(x_scale, jnp.float32)
    ws = jnp.broadcast_to(jnp.asarray(w_scale, jnp.float32).reshape(-1), (N,)) \
        if jnp.ndim(w_scale) == 0 else jnp.asarray(w_scale, jnp.float32)
    return xs, ws


def fp8_matmul_reference(x_fp8, x_scale, w_fp8, w_scale, out_dtype=jnp.bfloat16, *,
                         w_transposed: bool = False) -> jax.Array:
    """Dequantize both operands to fp32, fp32 matmul (HIGHEST precision), cast: [M, N].

    ``w_transposed``: w_fp8 is [N, K] (HF's Linear layout, K contiguous)."""
    if w_transposed:
        w_fp8 = w_fp8.T
    M, N = x_fp8.shape[0], w_fp8.shape[1]
    xs, ws = _scales(x_scale, w_scale, M, N)
    x = x_fp8.astype(jnp.float32) * xs[:, None]
    w = w_fp8.astype(jnp.float32) * ws[None, :]
    return jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST).astype(out_dtype)


def fp8_matmul_xla(x_fp8, x_scale, w_fp8, w_scale, out_dtype=jnp.bfloat16, *,
                   w_transposed: bool = False, acc_dtype=jnp.float32) -> jax.Array:
    """fp8 x fp8 -> fp32 ``dot_general`` (cuBLASLt fp8 GEMM on Hopper), then the two scales.

    ``w_transposed``: w_fp8 is [N, K]. cuBLASLt's fp8 GEMM takes only the "TN" layout (both
    operands K-contiguous), so a [K, N] weight costs XLA a transpose of the whole weight per
    call; the engine stores its fp8 weights [N, K] for that reason. On the CPU, XLA upcasts the
    fp8 operands to fp32 first: the products of two e4m3 values are exact in fp32, so this path
    equals the reference up to fp32 summation order. ``acc_dtype``: the dot's output type
    (bf16 halves the bytes the GEMM writes and its scale epilogue reads, at one more bf16
    rounding before the scales; the GEMM still accumulates in fp32).
    """
    M = x_fp8.shape[0]
    N = w_fp8.shape[0] if w_transposed else w_fp8.shape[1]
    xs, ws = _scales(x_scale, w_scale, M, N)
    acc = jax.lax.dot_general(x_fp8, w_fp8, (((1,), (1 if w_transposed else 0,)), ((), ())),
                              preferred_element_type=acc_dtype)
    return (acc.astype(jnp.float32) * xs[:, None] * ws[None, :]).astype(out_dtype)


def _fp8_matmul_kernel(x_ref, w_ref, xs_ref, ws_ref, o_ref, *, block_m, block_n, block_k,
                       k_per_split, w_transposed, M_pad):
    # Every operand is padded to whole blocks outside the kernel, so no load is masked: a masked
    # fp8 load needs an fp8 `other` fill, which Triton fails to build (`cannot cast tt.splat i32
    # -> f8E4M3FN`, every config on the H100).
    i = pl.program_id(0)
    j = pl.program_id(1)
    sp = pl.program_id(2)
    rm = i * block_m + jnp.arange(block_m, dtype=jnp.int32)
    rn = j * block_n + jnp.arange(block_n, dtype=jnp.int32)
    k_off = jnp.arange(block_k, dtype=jnp.int32)
    n_kb = k_per_split // block_k

    def body(kb, acc):
        rk = sp * k_per_split + kb * block_k + k_off
        x = plgpu.load(x_ref.at[rm[:, None], rk[None, :]])
        if w_transposed:  # w stored [N, K]: K contiguous, the operand layout fp8 wgmma wants
            w = plgpu.load(w_ref.at[rn[:, None], rk[None, :]]).T
        else:
            w = plgpu.load(w_ref.at[rk[:, None], rn[None, :]])
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, n_kb, body, jnp.zeros((block_m, block_n), jnp.float32))
    xs = plgpu.load(xs_ref.at[rm])
    ws = plgpu.load(ws_ref.at[rn])
    out = acc * xs[:, None] * ws[None, :]
    rows = rm + sp * M_pad
    plgpu.store(o_ref.at[rows[:, None], rn[None, :]], out.astype(o_ref.dtype))


def _pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    if tuple(x.shape) == tuple(shape):
        return x  # aligned shapes (every Llama projection at 128 blocks) copy nothing
    return jnp.pad(x, [(0, n - d) for d, n in zip(x.shape, shape)])


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m", "block_n", "block_k",
                                             "split_k", "num_warps", "num_stages",
                                             "w_transposed", "interpret"))
def fp8_matmul(x_fp8, x_scale, w_fp8, w_scale, out_dtype=jnp.bfloat16, *, block_m: int = 64,
               block_n: int = 128, block_k: int = 128, split_k: int = 1, num_warps: int = 4,
               num_stages: int = 3, w_transposed: bool = False,
               interpret: bool = False) -> jax.Array:
    """Pallas W8A8 matmul: x_fp8 [M, K] e4m3, x_scale [M] or [], w_fp8 [K, N] (or [N, K] with
    ``w_transposed``) e4m3, w_scale [N] or [] -> [M, N] ``out_dtype``; fp32 accumulation.

    Blocks must be powers of two with block_m, block_n, block_k >= 16 (tensor-core dot). M, N, K
    need not be multiples of the blocks: operands are zero-padded to whole blocks (zeros add
    nothing to the dot) and the output sliced. ``split_k`` > 1 splits K across programs (fp32
    partials summed by XLA): for small M, where M x N tiles alone cannot fill the GPU.
    """
    M, K = x_fp8.shape
    N = w_fp8.shape[0] if w_transposed else w_fp8.shape[1]
    xs, ws = _scales(x_scale, w_scale, M, N)
    M_pad = pl.cdiv(M, block_m) * block_m
    N_pad = pl.cdiv(N, block_n) * block_n
    k_per_split = pl.cdiv(pl.cdiv(K, split_k), block_k) * block_k
    K_pad = k_per_split * split_k
    x_p = _pad_to(x_fp8, (M_pad, K_pad))
    w_p = _pad_to(w_fp8, (N_pad, K_pad) if w_transposed else (K_pad, N_pad))
    xs_p = _pad_to(xs, (M_pad,))
    ws_p = _pad_to(ws, (N_pad,))
    kernel = functools.partial(
        _fp8_matmul_kernel, block_m=block_m, block_n=block_n, block_k=block_k,
        k_per_split=k_per_split, w_transposed=w_transposed, M_pad=M_pad)
    part_dtype = out_dtype if split_k == 1 else jnp.float32
    out = pl.pallas_call(
        kernel,
        grid=(M_pad // block_m, N_pad // block_n, split_k),
        out_shape=jax.ShapeDtypeStruct((split_k * M_pad, N_pad), part_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"fp8_matmul_{block_m}x{block_n}x{block_k}_s{split_k}",
    )(x_p, w_p, xs_p, ws_p)
    if split_k == 1:
        return out[:M, :N]
    return out.reshape(split_k, M_pad, N_pad)[:, :M, :N].sum(axis=0).astype(out_dtype)


# ---- block-wise scales (DeepSeek-V3 / Qwen3-FP8 checkpoints) -----------------------------------
#
#   x: [M, K] e4m3, one scale per row and group of ``block_k`` input features: x_scale [M, KB]
#   w: [N, K] e4m3 (HF layout), one scale per output channel and K block: w_scale [N, KB]
#      (a checkpoint's [ceil(N/bn), KB] tile scales with each row repeated over its bn channels)
#   out[m, n] = sum_kb x_scale[m, kb] w_scale[n, kb] (x_fp8[m, kb-th block] . w_fp8[n, same]),
#   KB = ceil(K / block_k): vLLM's W8A8 block fp8 linear (activations per token group).

def quantize_activation_per_token_group(x: jax.Array, group: int) -> tuple[jax.Array, jax.Array]:
    """x [M, K] -> (x_fp8 [M, K], scale [M, ceil(K / group)] fp32): dynamic, each row's groups
    of ``group`` features scaled on their own absmax (the last group may be short)."""
    M, K = x.shape
    KB = -(-K // group)
    xf = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, KB * group - K))).reshape(M, KB, group)
    amax = jnp.max(jnp.abs(xf), axis=2)
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    q = jnp.clip(xf / scale[:, :, None], -E4M3_MAX, E4M3_MAX).astype(FP8)
    return q.reshape(M, KB * group)[:, :K], scale


def expand_k_blocks(scale: jax.Array, block_k: int, K: int) -> jax.Array:
    """Per-K-block scales [R, KB] -> per-feature [R, K] (float32), each repeated block_k times."""
    return jnp.repeat(scale.astype(jnp.float32), block_k, axis=1,
                      total_repeat_length=scale.shape[1] * block_k)[:, :K]


def fp8_block_matmul_reference(x_fp8, x_scale, w_fp8, w_scale, block_k: int,
                               out_dtype=jnp.bfloat16) -> jax.Array:
    """Both operands dequantized with their block scales to fp32, fp32 matmul (HIGHEST), cast:
    x_fp8 [M, K], x_scale [M, KB], w_fp8 [N, K], w_scale [N, KB] -> [M, N]."""
    K = x_fp8.shape[1]
    x = x_fp8.astype(jnp.float32) * expand_k_blocks(x_scale, block_k, K)
    w = w_fp8.astype(jnp.float32) * expand_k_blocks(w_scale, block_k, K)
    return jnp.dot(x, w.T, precision=jax.lax.Precision.HIGHEST).astype(out_dtype)


def _fp8_block_matmul_kernel(x_ref, w_ref, xs_ref, ws_ref, o_ref, *, block_m, block_n, block_k,
                             n_kb):
    # Operands padded to whole blocks outside (as _fp8_matmul_kernel: no masked fp8 load).
    i, j = pl.program_id(0), pl.program_id(1)
    rm = i * block_m + jnp.arange(block_m, dtype=jnp.int32)
    rn = j * block_n + jnp.arange(block_n, dtype=jnp.int32)
    k_off = jnp.arange(block_k, dtype=jnp.int32)

    def body(kb, acc):
        rk = kb * block_k + k_off
        x = plgpu.load(x_ref.at[rm[:, None], rk[None, :]])
        w = plgpu.load(w_ref.at[rn[:, None], rk[None, :]]).T
        part = jnp.dot(x, w, preferred_element_type=jnp.float32)
        xs = plgpu.load(xs_ref.at[rm, kb])
        ws = plgpu.load(ws_ref.at[rn, kb])
        return acc + part * xs[:, None] * ws[None, :]

    acc = jax.lax.fori_loop(0, n_kb, body, jnp.zeros((block_m, block_n), jnp.float32))
    plgpu.store(o_ref.at[rm[:, None], rn[None, :]], acc.astype(o_ref.dtype))


@functools.partial(jax.jit, static_argnames=("block_k", "out_dtype", "block_m", "block_n",
                                             "num_warps", "num_stages", "interpret"))
def fp8_block_matmul(x_fp8, x_scale, w_fp8, w_scale, block_k: int, out_dtype=jnp.bfloat16, *,
                     block_m: int = 64, block_n: int = 128, num_warps: int = 4,
                     num_stages: int = 3, interpret: bool = False) -> jax.Array:
    """Pallas W8A8 matmul with block scales (the contract above): x_fp8 [M, K], x_scale
    [M, KB], w_fp8 [N, K], w_scale [N, KB] -> [M, N] ``out_dtype``; each K block's fp8 dot
    accumulates in fp32 and is scaled by its row's and channel's scales before the sum.

    The kernel's K step is ``block_k`` (a power of two >= 16: 128 in the published
    checkpoints); M, N, K need not be multiples of the blocks (zero-padded, output sliced).
    """
    M, K = x_fp8.shape
    N, KB = w_scale.shape
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k={block_k}: the kernel's K step must be a power of two >= 16.")
    if KB != -(-K // block_k) or x_scale.shape != (M, KB):
        raise ValueError(f"block scales {x_scale.shape} / {w_scale.shape} do not fit K={K} in "
                         f"blocks of {block_k}.")
    M_pad = pl.cdiv(M, block_m) * block_m
    N_pad = pl.cdiv(N, block_n) * block_n
    x_p = _pad_to(x_fp8, (M_pad, KB * block_k))
    w_p = _pad_to(w_fp8, (N_pad, KB * block_k))
    xs_p = _pad_to(x_scale.astype(jnp.float32), (M_pad, KB))
    ws_p = _pad_to(w_scale.astype(jnp.float32), (N_pad, KB))
    kernel = functools.partial(_fp8_block_matmul_kernel, block_m=block_m, block_n=block_n,
                               block_k=block_k, n_kb=KB)
    out = pl.pallas_call(
        kernel,
        grid=(M_pad // block_m, N_pad // block_n),
        out_shape=jax.ShapeDtypeStruct((M_pad, N_pad), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"fp8_block_matmul_{block_m}x{block_n}x{block_k}",
    )(x_p, w_p, xs_p, ws_p)
    return out[:M, :N]
