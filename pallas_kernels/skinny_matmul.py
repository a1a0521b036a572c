"""Skinny matmul: a few token rows (M <= 64) against a whole weight, at the weight's read speed.

Dimension keys: M rows (tokens), K contraction (input features), N output features.

A decode step's projections are skinny GEMMs: M is the step's token rows (1-64), the weight is
[K, N] with K, N in the thousands, so the time is the weight's bytes over the read bandwidth plus
the kernel's start and tail. XLA's GEMMs read the q/k/v and o weights of the Llama-3-8B shape at
only 3.2 TB/s at batch 1 (of 4.3 on the H200), and its fp8 weight-only GEMMs (the e4m3 upcast
fused into the dot) at ~2.8 TB/s (benchmarks/RESULTS.md). This kernel is built for that shape
class: one block of rows holds every row, the grid runs over N blocks and K splits, and each
program streams its [block_n, block_k] weight tiles through the software pipeline
(``num_stages``) while the rows stay in registers.

Operands and what runs on the tensor cores:
  x        [M, K] bf16/float32 (or e4m3 with ``x_scale``: W8A8)
  w        [N, K] ("nk", K contiguous: HF's Linear layout, the fp8 weights of the engine) or
           [K, N] ("kn": nnx.Linear's kernel, the bf16 weights of the engine); bf16, float32 or
           e4m3
  w_scale  [N] or None (per output channel; fp8 weights)
  x_scale  [M] or None (per token; only with an e4m3 x)
  residual [M, N] ``out_dtype`` or None (only with ``split_k`` = 1)
  ->       [M, N] ``out_dtype``: x @ w (w^T for "nk"), scaled by x_scale[m] * w_scale[n], fp32
           accumulation; with a residual, that product rounded to ``out_dtype`` plus the
           residual (the model's ``residual + proj(h)``, rounded as XLA rounds it).

  - e4m3 x with e4m3 w: the fp8 x fp8 dot (W8A8).
  - any other mix: both sides upcast to x's dtype in registers (e4m3 w with bf16 x is W8A16,
    the weight-only path of the engine's fp8 decode steps).

``split_k`` > 1 splits K over programs. Each writes its scaled fp32 partial ([split_k, M, N]);
their sum (``skinny_matmul`` returns it) is a reduce XLA can fuse into the consumer of the
output, as it does with its own split-K GEMMs. Rows beyond M are masked (never padded outside: a pad
would be one more kernel a projection). K must be a multiple of ``block_k * split_k`` and N of
``block_n`` (``skinny_fits``); a caller keeps XLA's GEMM otherwise.

``skinny_matmul_reference`` is the contract, in float32 at HIGHEST precision.

The residual epilogue (``residual=``) was built for a decoder layer's o and down projections
in small bf16 steps: XLA runs each as a split-K GEMM and a second kernel that sums the partials
and adds the residual; here one wave of whole-K programs (``RESIDUAL_GEMM_BLOCKS``: 4096 / 32 =
128 programs for the Llama-3-8B shape) writes ``residual + x @ w`` itself, one kernel instead of
two. Measured slower than XLA's GEMM + add on H200 (benchmarks/RESULTS.md, 2026-12-03 06:30
rerun: 11.4 against 8.7 µs for the o projection at M = 1, 33.5 against 28.4 for the down; the
kernel reads its weight at 2.9-3.6 TB/s, XLA at 3.8-4.1); not called by the engine. It stays,
tested, with ``benchmarks/gpu/residual_gemm.py``.

Measured (H200, 2026-12-01 20:27 rerun, ``benchmarks/gpu/skinny_gemm.py``, GPU time; RESULTS.md):
W8A8 is the fastest fp8 GEMM at M = 1 and 16 in 7 of 8 cases, 1.22-1.81x XLA's bf16 GEMM (the
4096 x 28672 gate/up shape 1.67-1.81x), but its bf16 and W8A16 modes are no faster than XLA's
own GEMMs. The engine's fp8 steps of <= 16 rows run W8A16 through XLA (no activation
quantization kernels), so the engine does not call this kernel for per-channel weights. It does
for block-wise fp8 checkpoints (``scale_block_k``: one scale per channel and K block) at <= 64
rows, where XLA's alternative writes the dequantized weight in bf16 before its GEMM: on the
H100 (2026-12-06 03:25, RESULTS.md) 1.1-1.5x the bf16 GEMM at 1-16 rows against XLA's
0.35-0.49x, batch-1 decode of a block-wise model 4.24 ms/token against 14.63.
H100 (2026-12-05 night, RESULTS.md): with e4m3 rows loaded masked (as int8 bits, no pad kernel)
W8A8 is the fastest fp8 GEMM at M = 1 in every shape, 1.58-1.80x XLA's bf16 GEMM (>= 1.7x for
gate/up at M = 1-16, q/k/v and down at 16). Summing the split-K partials inside the kernel (the
last program of a column block, by an atomic ticket) was correct and 0.3-0.9 µs slower than
XLA's separate sum: not kept.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.fp8_matmul import expand_k_blocks

FP8 = jnp.float8_e4m3fn
MAX_ROWS = 64  # one block of rows: beyond this the GEMM is no longer skinny
# Shared memory a Hopper (H100 / H200) block may take; the pipeline holds num_stages x and w
# tiles in it (the H200 rejected 4 stages of bf16 64 x 256 tiles at M = 64: 262144 bytes).
SMEM_BYTES = 232448


def smem_bytes(M: int, x_dtype, w_dtype, *, block_n: int, block_k: int,
               num_stages: int) -> int:
    """The shared memory of the pipeline's tiles: num_stages x (x tile + w tile)."""
    return num_stages * block_k * (_block_m(M) * jnp.dtype(x_dtype).itemsize
                                   + block_n * jnp.dtype(w_dtype).itemsize)


def skinny_matmul_reference(x, w, w_scale=None, x_scale=None, *, w_layout: str = "nk",
                            out_dtype=None, residual=None, scale_block_k=None) -> jax.Array:
    """Dequantize to float32, float32 matmul at HIGHEST precision, cast (then + residual, in
    float32, cast again): [M, N]. With ``scale_block_k`` the scales are per K block (w_scale
    [N, KB], x_scale [M, KB]) and multiply the operands before the dot."""
    out_dtype = out_dtype or (jnp.bfloat16 if x.dtype == FP8 else x.dtype)
    wf = w.astype(jnp.float32)
    wf = wf.T if w_layout == "nk" else wf  # [K, N]
    xf = x.astype(jnp.float32)
    if scale_block_k:
        K = xf.shape[1]
        wf = wf * expand_k_blocks(w_scale, scale_block_k, K).T
        if x_scale is not None:
            xf = xf * expand_k_blocks(x_scale, scale_block_k, K)
        w_scale = x_scale = None
    if x_scale is not None:
        xf = xf * x_scale.astype(jnp.float32)[:, None]
    y = jnp.dot(xf, wf, precision=jax.lax.Precision.HIGHEST)
    if w_scale is not None:
        y = y * w_scale.astype(jnp.float32)[None, :]
    y = y.astype(out_dtype)
    if residual is not None:
        y = (y.astype(jnp.float32) + residual.astype(jnp.float32)).astype(out_dtype)
    return y


# The residual epilogue's best blocks (block_n, block_k, num_warps, num_stages) at the Llama-3-8B
# o and down projections, 8 rows (benchmarks/gpu/residual_gemm.py's sweep of 46 configs, H200,
# 2026-12-03 06:30 rerun): one wave of 128 whole-K programs over N = 4096. Still slower than
# XLA's GEMM + add there; not called by the engine. The sweep starts from it.
RESIDUAL_GEMM_BLOCKS = (32, 256, 4, 5)


def skinny_fits(M: int, K: int, N: int, *, block_n: int, block_k: int, split_k: int) -> bool:
    """Whether ``skinny_matmul`` takes this shape with these blocks (no padding: whole blocks)."""
    return 1 <= M <= MAX_ROWS and N % block_n == 0 and K % (block_k * split_k) == 0


def _check_scale_block(scale_block_k, K, block_k, w_scale) -> tuple[int, ...]:
    """The scales' trailing shape: () per channel / token, (K / scale_block_k,) block-wise."""
    if scale_block_k is None:
        return ()
    if scale_block_k < 16 or scale_block_k & (scale_block_k - 1):
        raise ValueError(f"scale_block_k must be a power of two >= 16, got {scale_block_k}")
    if block_k % scale_block_k or K % scale_block_k:
        raise ValueError(f"block_k ({block_k}) and K ({K}) must be multiples of scale_block_k "
                         f"({scale_block_k}): a tile holds whole scale blocks")
    if w_scale is None:
        raise ValueError("scale_block_k needs w_scale [N, K / scale_block_k]")
    return (K // scale_block_k,)


def _block_m(M: int) -> int:
    return max(16, 1 << (M - 1).bit_length())  # tensor-core dots take >= 16 rows


def _kernel(x_ref, w_ref, *rest, M, block_m, block_n, block_k, k_per_split, w_layout, fp8_dot,
            has_ws, has_xs, has_res, scale_block_k=None):
    refs = list(rest)
    ws_ref = refs.pop(0) if has_ws else None
    xs_ref = refs.pop(0) if has_xs else None
    res_ref = refs.pop(0) if has_res else None
    (o_ref,) = refs
    j = pl.program_id(0)
    sp = pl.program_id(1)
    rm = jnp.arange(block_m, dtype=jnp.int32)
    row_ok = rm < M
    rn = j * block_n + jnp.arange(block_n, dtype=jnp.int32)
    # Block scales (scale_block_k): each tile is scale_block_k-wide sub-blocks, each sub-block's
    # product scaled by its K block's scales before the sum; else one dot a tile.
    sub_k = scale_block_k or block_k
    k_off = jnp.arange(sub_k, dtype=jnp.int32)
    k0 = sp * k_per_split

    def body(kb, acc):
        for sub in range(block_k // sub_k):  # static: one dot a sub-block
            start = k0 + kb * block_k + sub * sub_k
            rk = start + k_off
            x = plgpu.load(x_ref.at[rm[:, None], rk[None, :]], mask=row_ok[:, None], other=0)
            if fp8_dot:  # e4m3 passed as int8 bits: a masked load takes an int8 fill
                x = jax.lax.bitcast_convert_type(x, FP8)
            if w_layout == "nk":
                w = plgpu.load(w_ref.at[rn[:, None], rk[None, :]]).T  # [sub_k, block_n]
            else:
                w = plgpu.load(w_ref.at[rk[:, None], rn[None, :]])
            if not fp8_dot:
                w = w.astype(x.dtype)
            part = jnp.dot(x, w, preferred_element_type=jnp.float32)
            if scale_block_k:
                blk = start // sub_k
                part = part * plgpu.load(ws_ref.at[rn, blk])[None, :]
                if has_xs:
                    part = part * plgpu.load(xs_ref.at[rm, blk], mask=row_ok,
                                             other=0.0)[:, None]
            acc = acc + part
        return acc

    acc = jax.lax.fori_loop(0, k_per_split // block_k, body,
                            jnp.zeros((block_m, block_n), jnp.float32))
    if has_ws and not scale_block_k:
        acc = acc * plgpu.load(ws_ref.at[rn])[None, :]
    if has_xs and not scale_block_k:
        acc = acc * plgpu.load(xs_ref.at[rm], mask=row_ok, other=0.0)[:, None]

    y = acc.astype(o_ref.dtype)
    if has_res:  # split_k == 1: the product rounded as the projection's output, then the add
        r = plgpu.load(res_ref.at[rm[:, None], rn[None, :]], mask=row_ok[:, None], other=0)
        y = (y.astype(jnp.float32) + r.astype(jnp.float32)).astype(o_ref.dtype)
    rows = sp * M + rm
    plgpu.store(o_ref.at[rows[:, None], rn[None, :]], y, mask=row_ok[:, None])


@functools.partial(jax.jit, static_argnames=("w_layout", "out_dtype", "block_n", "block_k",
                                             "split_k", "num_warps", "num_stages", "interpret",
                                             "scale_block_k"))
def skinny_matmul(x, w, w_scale=None, x_scale=None, residual=None, *, w_layout: str = "nk",
                  out_dtype=None, block_n: int = 64, block_k: int = 256, split_k: int = 1,
                  num_warps: int = 4, num_stages: int = 4, scale_block_k: int | None = None,
                  interpret: bool = False) -> jax.Array:
    """Pallas (Triton) ``skinny_matmul_reference`` for M <= 64 rows (see the module docstring).

    ``out_dtype``: default x's dtype (bf16 for an e4m3 x). Blocks are powers of two >= 16.
    ``residual`` [M, N] (``out_dtype``; ``split_k`` must be 1): added in the epilogue.
    ``scale_block_k``: block-wise scales (the published block-fp8 checkpoints): w_scale
    [N, K / scale_block_k] and x_scale [M, K / scale_block_k] (or None: a bf16 x, W8A16), each
    K block's product scaled before the sum; ``block_k`` a multiple of it.
    """
    if w_layout not in ("nk", "kn"):
        raise ValueError(f"w_layout must be 'nk' or 'kn', got {w_layout!r}")
    M, K = x.shape
    N, Kw = w.shape if w_layout == "nk" else w.shape[::-1]
    if Kw != K:
        raise ValueError(f"x is [{M}, {K}] but w ({w_layout}) is {tuple(w.shape)}")
    for name, b in (("block_n", block_n), ("block_k", block_k)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")
    if split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    if not skinny_fits(M, K, N, block_n=block_n, block_k=block_k, split_k=split_k):
        raise ValueError(
            f"skinny_matmul takes 1 <= M <= {MAX_ROWS}, N a multiple of block_n and K of "
            f"block_k * split_k; got M={M}, K={K}, N={N}, block_n={block_n}, "
            f"block_k={block_k}, split_k={split_k}")
    need = smem_bytes(M, x.dtype, w.dtype, block_n=block_n, block_k=block_k,
                      num_stages=num_stages)
    if need > SMEM_BYTES and not interpret:
        raise ValueError(
            f"{num_stages} stages of a {_block_m(M)} x {block_k} {x.dtype} tile and a "
            f"{block_n} x {block_k} {w.dtype} tile need {need} bytes of shared memory, over the "
            f"{SMEM_BYTES} a block may take: lower num_stages, block_k or block_n")
    fp8_dot = x.dtype == FP8
    if fp8_dot and (w.dtype != FP8 or x_scale is None):
        raise ValueError("an e4m3 x needs an e4m3 w and x_scale (W8A8)")
    if x_scale is not None and not fp8_dot:
        raise ValueError("x_scale is for an e4m3 x; scale a bf16 x before the call")
    scale_cols = _check_scale_block(scale_block_k, K, block_k, w_scale)
    if w_scale is not None and w_scale.shape != (N, *scale_cols):
        raise ValueError(f"w_scale must be {[N, *scale_cols]}, got {list(w_scale.shape)}")
    if x_scale is not None and x_scale.shape != (M, *scale_cols):
        raise ValueError(f"x_scale must be {[M, *scale_cols]}, got {list(x_scale.shape)}")
    out_dtype = jnp.dtype(out_dtype or (jnp.bfloat16 if fp8_dot else x.dtype))
    if residual is not None:
        if split_k != 1:
            raise ValueError(f"a residual needs split_k == 1 (whole-K programs), got {split_k}")
        if residual.shape != (M, N) or residual.dtype != out_dtype:
            raise ValueError(f"residual must be [{M}, {N}] {out_dtype}, got "
                             f"{residual.shape} {residual.dtype}")
    block_m = _block_m(M)
    if fp8_dot:
        # A masked e4m3 load needs an e4m3 fill, which Triton cannot build (see fp8_matmul):
        # the kernel loads the bits as int8 (fill 0 = +0.0) and casts them back. A bitcast,
        # not a kernel (a pad to whole row blocks was one more kernel a call).
        x = jax.lax.bitcast_convert_type(x, jnp.int8)
    k_per_split = K // split_k
    operands = [x, w]
    if w_scale is not None:
        operands.append(w_scale.astype(jnp.float32))
    if x_scale is not None:
        operands.append(x_scale.astype(jnp.float32))
    if residual is not None:
        operands.append(residual)
    kernel = functools.partial(
        _kernel, M=M, block_m=block_m, block_n=block_n, block_k=block_k,
        k_per_split=k_per_split, w_layout=w_layout, fp8_dot=fp8_dot,
        has_ws=w_scale is not None, has_xs=x_scale is not None, has_res=residual is not None,
        scale_block_k=scale_block_k)
    part_dtype = out_dtype if split_k == 1 else jnp.float32
    out = pl.pallas_call(
        kernel,
        grid=(N // block_n, split_k),
        out_shape=jax.ShapeDtypeStruct((split_k * M, N), part_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"skinny_matmul_{w_layout}_{block_n}x{block_k}_s{split_k}"
             + ("_res" if residual is not None else ""),
    )(*operands)
    if split_k == 1:
        return out
    return out.reshape(split_k, M, N).sum(axis=0).astype(out_dtype)
