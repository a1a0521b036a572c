"""Per-channel W8A8 fp8 GEMM for decode-sized batches (M <= 64 rows) in Mosaic GPU (TMA, wgmma).

The contract of ``fp8_matmul.fp8_matmul_reference`` with the weight as the engine holds it:

  x: [M, K] e4m3 with one scale per row, x_scale [M] (or [M, 1]) float32
  w: [N, K] e4m3 (HF's [out, in], K contiguous) with one scale per output channel, w_scale [N]
  out[m, n] = x_scale[m] w_scale[n] (x_fp8[m] . w_fp8[n]), accumulated in float32

Why: at M <= 64 a GEMM is a read of its weight, and issue 5 asks fp8 to be >= 1.7x XLA's bf16
dot there. The Triton-lowered skinny kernel (``skinny_matmul``) splits K over programs and
leaves the partial sums to a second kernel (~1.3 µs a call), and each of its programs keeps
only as many bytes in flight as its pipelined loads; with 3.15 TB/s to spread over 132 SMs the
o projection's 16.8 MB of e4m3 take 5.3 µs, and its best call took 8.7 (H100, RESULTS
2026-12-05 night). Here each CTA reads 64 whole weight rows, all of K, through a TMA pipeline
``steps`` tiles deep (a producer warpgroup runs ahead of one wgmma warpgroup), so there is no
split-K sum and no second kernel: the output tile is scaled and stored by the CTA that owns it.

The product is transposed, y^T = W x^T: the weight's 64 rows are wgmma's M, the tokens its N
(M rounded up to 8; both operands K-major as they lie, as fp8 wgmma needs), and the [64, tm]
float32 tile is stored token-major through a transposed view of its shared-memory buffer.
A grid of N / 64 CTAs (64 for the o and down projections, 96 for q/k/v, 448 for gate/up).

Limits (ValueError): N a multiple of 64, K a multiple of ``tile_k`` (a multiple of 128: one
128-byte swizzle row of e4m3), 1 <= M <= 256 (wgmma's N), a 16-bit output, the pipeline's
buffers within ``SMEM_BYTES``. Where M is not a multiple of 8 the token tile's extra rows are
read as zeros and not stored (TMA's out-of-bounds handling; ``oob_rows``).

Measured on the H100 (2026-12-06 11:15, benchmarks/RESULTS.md; GPU time a call, activations
quantized beforehand as in the other fp8 rows of that table): 1.76-2.20x XLA's bf16 dot at
M = 1, 8, 16 and 64 for the four Llama-3-8B projections (o at M = 1: 7.4 against 13.8 µs; the
Triton skinny kernel 8.5, cuBLASLt's fp8 GEMM 9.3), 2.0-2.9 TB/s of e4m3 weight.

Weight-only form (``x_scale`` None, W8A16): x in bf16 / float16 and each 128-wide chunk of the
e4m3 tile upcast in registers (through float16: this ptxas converts e4m3 to float16 only) as
the A operand of a 16-bit wgmma, each chunk's wgmma waited for before that warpgroup's next
upcast (a register operand has no fence after the wgmma is issued, so its registers must not
be reused early). ``compute_wgs`` warpgroups share a step's chunks, so one's upcast runs
beside another's wgmma: H100 at M = 1 (2026-12-06 evening), o 10.77 -> 9.65 µs and q/k/v
11.62 -> 11.34 with two, below XLA's W8A16 GEMM (10.87, 13.82). Batch 1 through it was
slower than through XLA's GEMMs all the same (3.81 against 3.47 ms/token), so the engine
keeps XLA's for its weight-only steps unless ``JAXLLM_FP8_SKINNY_MGPU_WO`` asks.

``residual``: the epilogue adds a [M, N] tile (the model's residual stream) to the rounded
product, read by TMA beside the weight stream: the o / down projections' ``x + proj(h)``
without an add kernel after the GEMM (the engine's W8A8 steps of <= 64 rows; batch-32 fp8
decode step 5.41 -> 5.33 ms of GPU time on the H100).

``quantize_x`` (x_scale None, 16-bit x): W8A8 with the rows quantized inside the kernel, so a
batch-1 step needs no quantization kernel before each projection (the ~2 small kernels a
projection that made W8A8 at batch 1 slower than XLA's W8A16 GEMM). Each step quantizes its
block of rows, per token (the block's absmax maps to 448; ``quantize_x_reference``), and
scales its fp8 product back into a float32 running sum (a fresh accumulator a step). The
block is read transposed ([tile_k, tm]) in the WGMMA_TRANSPOSED register layout, the one in
which Mosaic GPU stores 8-bit values through a transposed view (the WGMMA layout's 8-bit
transposed store finds no layout); the scales move to the accumulator's layout through
shared memory. ``norm`` folds the layer's RMSNorm in: x * g is quantized and each token's
1 / rms(x) (its squares summed over K) scales the product in the epilogue. H100 at M = 1
(2026-12-06 night, benchmarks/RESULTS.md): q/k/v 10.6-10.9, o 8.6-8.8, gate/up 41.0-43.0,
down 22.9-23.1 µs (the pre-quantized W8A8 form 10.0 / 7.5 / 39.8-40.3 / 21.3-21.4, XLA's
W8A16 GEMM 13.8 / 10.4 / 45.8-47.0 / 25.5-25.9); batch 1 through it ties XLA's W8A16 GEMMs
in the engine at best, so it is off there (``JAXLLM_FP8_SKINNY_MGPU_QX``). All the rows
quantized once before the steps (a "prologue" form, tried the same night, removed) was
slower at every shape: the producer runs only ``steps`` ahead while the compute warpgroup
quantizes. It runs on one compute warpgroup: a form that split each step's block between two
(each its own scales and accumulator, summed at the end) was slower on the H100 (q/k/v at M =
1 10.96 against 10.74 µs; batch 1 3.63 against 3.59 ms/token) and off by 3% from its
reference in the GPU test (2026-12-06, 20:00 UTC), so it was removed.

Tested on the CPU by Mosaic GPU's interpreter against ``fp8_matmul_reference``
(tests/test_pallas_kernels.py), lowered for an abstract H100 (tests/test_gpu_lowering.py), and
compiled and timed on the GPU (tests/test_gpu.py, ``benchmarks/gpu/skinny_gemm.py --impls
mgpu_w8a8``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

ROWS = 64  # weight rows a CTA owns: wgmma's M
MAX_TOKENS = 256  # wgmma's largest N
# (tile_k, steps): K bytes of each weight row a pipeline step, steps in flight. Each step's
# weight tile is ROWS x tile_k bytes (32 KB at 512), so 3 steps keep 96 KB in flight an SM.
# H100 sweep of 2026-12-06 11:15 (benchmarks/RESULTS.md): the more bytes in flight the faster;
# (512, 3) the fastest or within 0.2 µs of it at every Llama-3-8B projection and M in 1, 8,
# 16, 64 (e.g. o at M = 8: 8.30 / 8.20 / 7.72 / 7.51 µs for the four TILES in order).
DEFAULT_TILE = (512, 3)
TILES = ((128, 8), (256, 4), (256, 6), (512, 3))
SMEM_BYTES = 200 * 1024  # the pipeline buffers' limit (Hopper: 227 KB a CTA, less the rest)
CTA_SMEM_BYTES = 227 * 1024  # Hopper's shared memory a CTA: the pipeline and the epilogue's
E4M3_MAX = 448.0


def check_shapes(M: int, K: int, N: int, tile_k: int, out_dtype=jnp.bfloat16) -> None:
    """Raises ValueError unless the kernel takes this GEMM (module docstring, Limits)."""
    if tile_k % 128 or tile_k <= 0:
        raise ValueError(f"tile_k={tile_k}: a positive multiple of 128 (one swizzle row of "
                         "e4m3).")
    if K % tile_k or N % ROWS:
        raise ValueError(f"K={K} must be a multiple of tile_k={tile_k} and N={N} of {ROWS} for "
                         "the Mosaic GPU skinny fp8 kernel.")
    if not 1 <= M <= MAX_TOKENS:
        raise ValueError(f"M={M}: 1 to {MAX_TOKENS} rows (the tokens are wgmma's N).")
    if jnp.dtype(out_dtype).itemsize != 2:
        raise ValueError(f"out_dtype={jnp.dtype(out_dtype).name}: the Mosaic GPU skinny kernel "
                         "writes bfloat16 or float16 (a float32 tile's transposed store has no "
                         "layout).")


def pipeline_bytes(M: int, tile_k: int, steps: int, x_itemsize: int = 1) -> int:
    """Shared memory of the pipeline's buffers: ``steps`` weight and token tiles."""
    return steps * (ROWS + -(-M // 8) * 8 * x_itemsize) * tile_k


def cta_smem_bytes(M: int, tile_k: int, steps: int, x_itemsize: int = 1, *,
                   compute_wgs: int = 1, out_itemsize: int = 2, residual: bool = False,
                   quantize_x: bool = False) -> int:
    """A CTA's shared memory (at most ``CTA_SMEM_BYTES``): the pipeline's buffers and the
    epilogue's (output and residual tiles, the other warpgroups' sums, scales and barriers:
    1 KB), and with ``quantize_x`` two steps' e4m3 rows and scales."""
    tm = -(-M // 8) * 8
    return (pipeline_bytes(M, tile_k, steps, x_itemsize) + 1024
            + (compute_wgs - 1) * ROWS * tm * 4
            + tm * ROWS * out_itemsize * (2 if residual else 1)
            + (2 * tm * (tile_k + 4) if quantize_x else 0))


def quantize_x_reference(x: jax.Array, w_fp8: jax.Array, w_scale: jax.Array, tile_k: int,
                         out_dtype=jnp.bfloat16, norm: tuple[jax.Array, float] | None = None
                         ) -> jax.Array:
    """The contract of ``quantize_x``: x [M, K] (16-bit) quantized to e4m3 per token and block
    of ``tile_k`` features (each block's absmax maps to 448, as
    ``fp8_matmul.quantize_activation_per_token_group`` but times 448 / absmax instead of
    divided by absmax / 448: one reciprocal a token in the kernel, not a division a value),
    times the per-channel e4m3 weight, in
    float32 (HIGHEST), rounded to ``out_dtype``. ``norm`` = (g, eps): x * g quantized instead
    (float32), the product scaled by each token's 1 / sqrt(mean(x^2) + eps) before the
    rounding (RMSNorm(x) with weight g, folded)."""
    from pallas_kernels.fp8_matmul import fp8_block_matmul_reference

    xf = x.astype(jnp.float32)
    if norm is not None:
        xf = xf * norm[0].astype(jnp.float32)[None, :]
    M, K = xf.shape
    amax = jnp.max(jnp.abs(xf.reshape(M, K // tile_k, tile_k)), axis=2)
    xs = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)  # [M, K // tile_k]
    inv = jnp.repeat(jnp.where(amax > 0, E4M3_MAX / amax, 1.0), tile_k, axis=1)
    xq = jnp.clip(xf * inv, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
    ws = jnp.broadcast_to(w_scale.reshape(-1, 1).astype(jnp.float32), (w_fp8.shape[0],
                                                                         xs.shape[1]))
    y = fp8_block_matmul_reference(xq, xs, w_fp8, ws, tile_k, jnp.float32)
    if norm is not None:
        x32 = x.astype(jnp.float32)
        y = y * lax.rsqrt(jnp.mean(x32 * x32, axis=1, keepdims=True) + norm[1])
    return y.astype(out_dtype)


def fp8_skinny_matmul_mgpu(x_fp8: jax.Array, x_scale: jax.Array | None, w_fp8: jax.Array,
                           w_scale: jax.Array, out_dtype=jnp.bfloat16, *,
                           tile_k: int | None = None, steps: int | None = None,
                           oob_rows: bool = True, compute_wgs: int = 1,
                           residual: jax.Array | None = None, quantize_x: bool = False,
                           norm: tuple[jax.Array, float] | None = None,
                           interpret: bool = False) -> jax.Array:
    """x_fp8 [M, K], x_scale [M] or [M, 1], w_fp8 [N, K], w_scale [N] -> [M, N] ``out_dtype``
    (the module's contract). ``x_scale`` None: weight-only (W8A16), x in bfloat16 or float16,
    each e4m3 weight chunk upcast to x's dtype in registers (the module's docstring).
    ``tile_k`` / ``steps``: K bytes of a pipeline step and steps in
    flight (default ``DEFAULT_TILE``; clipped to the K steps there are; their buffers within
    ``SMEM_BYTES``); ``oob_rows``: where M is not a multiple of 8, TMA reads the token tile's
    rows past M as zeros and drops their stores (the default: no pad and slice around the
    call; H100 at M = 1: o 7.44 µs against 10.76 padded), else the rows are padded;
    ``compute_wgs``: the weight-only form's compute warpgroups (1 or 2 dividing tile_k /
    128): warpgroup g upcasts and multiplies chunks g, g + compute_wgs, ... of each step into
    an accumulator of its own, summed through shared memory at the end, so the upcasts of one
    run beside another's wgmma (the W8A8 and ``quantize_x`` forms take 1). Four passed the
    interpreter and never finished on the H100 (2026-12-07: its GPU test at M = 5, tile
    512 x 3, ran 140 s without a result where the other forms take ~50 s, compile included),
    so it is refused;
    ``residual`` [M, N] in ``out_dtype``: returned is residual +
    the product rounded to ``out_dtype`` (the model's ``x + proj(h)``, its tile read by TMA
    beside the weight stream); ``quantize_x`` (with ``x_scale`` None and a 16-bit x): W8A8
    with the rows quantized here, per token and block of ``tile_k`` features
    (``quantize_x_reference``);
    ``norm`` = (g [K], eps) (with ``quantize_x``): the product of RMSNorm(x) with weight g
    instead of x's, the norm folded in: the rows times g are quantized, and each token's
    1 / rms(x) (its sum of squares gathered step by step) scales the product in the epilogue;
    ``interpret``: Mosaic GPU's interpreter (any platform, slow)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    M, K = x_fp8.shape
    N = w_fp8.shape[0]
    tile_k = DEFAULT_TILE[0] if tile_k is None else tile_k
    steps = DEFAULT_TILE[1] if steps is None else steps
    check_shapes(M, K, N, tile_k, out_dtype)
    weight_only = x_scale is None and not quantize_x
    x_isz = jnp.dtype(x_fp8.dtype).itemsize
    if x_scale is None and x_fp8.dtype not in (jnp.float16, jnp.bfloat16):
        raise ValueError(f"x {x_fp8.dtype}: weight-only (x_scale None) takes a 16-bit x, as "
                         "does quantize_x.")
    if quantize_x and x_scale is not None:
        raise ValueError("quantize_x: the kernel computes the rows' scales (x_scale None).")
    if norm is not None and (not quantize_x or norm[0].shape != (K,)):
        raise ValueError(f"norm: (g [K] = [{K}], eps) with quantize_x, got g "
                         f"{getattr(norm[0], 'shape', None)}, quantize_x={quantize_x}.")
    if x_scale is not None and x_isz != 1:
        raise ValueError(f"x {x_fp8.dtype}: W8A8 takes an e4m3 x with its x_scale.")
    if w_fp8.shape != (N, K) or w_scale.size != N or (x_scale is not None and x_scale.size != M):
        raise ValueError(f"shapes x {x_fp8.shape}, x_scale {getattr(x_scale, 'shape', None)}, "
                         f"w {w_fp8.shape}, "
                         f"w_scale {w_scale.shape} do not fit [M, K] x [N, K].")
    if steps < 1:
        raise ValueError(f"steps={steps}: at least 1.")
    k_steps = K // tile_k
    steps = min(steps, k_steps)
    if pipeline_bytes(M, tile_k, steps, x_isz) > SMEM_BYTES:
        raise ValueError(f"tile_k={tile_k} x steps={steps} at M={M}: "
                         f"{pipeline_bytes(M, tile_k, steps, x_isz)} bytes of pipeline buffers, "
                         f"more than {SMEM_BYTES}.")
    tm = -(-M // 8) * 8
    norm_eps = None if norm is None else float(norm[1])
    # Weight-only: the kernel never reads this operand; w_scale's bytes stand in for it (a
    # constant of ones would be a fill kernel of its own before the call).
    xs = (w_scale.reshape(-1).astype(jnp.float32) if x_scale is None
          else x_scale.reshape(M).astype(jnp.float32))
    if residual is not None and (residual.shape != (M, N) or residual.dtype != out_dtype):
        raise ValueError(f"residual {residual.shape} {residual.dtype}: the output's [M, N] "
                         f"= [{M}, {N}] in {jnp.dtype(out_dtype).name}.")
    if tm != M and not oob_rows:
        xs = xs if x_scale is None else jnp.pad(xs, (0, tm - M))
        x_fp8 = jnp.pad(x_fp8, ((0, tm - M), (0, 0)))
        if residual is not None:
            residual = jnp.pad(residual, ((0, tm - M), (0, 0)))
    ws = w_scale.reshape(N // ROWS, ROWS).astype(jnp.float32)
    out_isz = jnp.dtype(out_dtype).itemsize
    fp8_tf = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))
    x_tf = (plgpu.TilingTransform((8, 128 // x_isz)), plgpu.SwizzleTransform(128))
    out_swizzle = plgpu.find_swizzle(ROWS * out_isz * 8)
    out_tf = (plgpu.TilingTransform((8, out_swizzle // out_isz)),
              plgpu.SwizzleTransform(out_swizzle))
    wgs = compute_wgs
    chunks = tile_k // 128
    if wgs not in (1, 2) or chunks % wgs or (wgs > 1 and not weight_only):
        raise ValueError(f"compute_wgs={wgs}: 1, or 2 in the weight-only form, splitting each "
                         f"step's {chunks} 128-wide chunks evenly (the W8A8 and quantize_x "
                         "forms take 1; 4 did not finish on the H100).")
    # Mosaic GPU's interpreter takes wgmma operands from shared memory only: interpreted, the
    # weight-only form's upcast chunk goes through this scratch buffer, one a warpgroup (the
    # GPU test covers the register form).
    scratch = ({"a_smem": plgpu.SMEM((wgs, ROWS, 128), x_fp8.dtype, transforms=x_tf)}
               if weight_only and interpret else {})
    if quantize_x:  # a step's rows in e4m3, the B operand of its wgmma
        # Two of each (step parity): the warpgroup's threads past one step's barrier may write
        # the next step's while others still read this step's scales (the barrier after the
        # writes orders the step after that).
        scratch.update(xq_smem=plgpu.SMEM((2, tm, tile_k), jnp.float8_e4m3fn,
                                          transforms=fp8_tf),
                       xqs_smem=plgpu.SMEM((2, tm), jnp.float32))
    if norm is not None:  # the rows' sums of squares, to the accumulator's layout
        scratch.update(ss_smem=plgpu.SMEM((tm,), jnp.float32))
    if wgs > 1:  # the other warpgroups' partial sums, added by warpgroup 0
        scratch.update(red_smem=plgpu.SMEM((wgs - 1, ROWS, tm), jnp.float32),
                       red_bar=plgpu.Barrier(num_arrivals=wgs - 1))

    if residual is not None:  # the residual's tile, added to the rounded product
        scratch.update(res_smem=plgpu.SMEM((tm, ROWS), out_dtype, transforms=out_tf))
    total = cta_smem_bytes(M, tile_k, steps, x_isz, compute_wgs=wgs, out_itemsize=out_isz,
                           residual=residual is not None, quantize_x=quantize_x)
    if total > CTA_SMEM_BYTES:
        raise ValueError(f"M={M}, tile_k={tile_k} x steps={steps}"
                         f"{'' if residual is None else ' and a residual'}: {total} bytes of "
                         f"shared memory, more than a CTA's {CTA_SMEM_BYTES}.")

    def kernel(x_gmem, w_gmem, xs_gmem, ws_gmem, *refs):
        refs = list(refs)
        res_gmem = refs.pop(0) if residual is not None else None
        g_gmem = refs.pop(0) if norm is not None else None
        (out_gmem,) = refs
        n_idx = lax.axis_index("n")
        out_block = (pl.ds(0, tm), pl.ds(n_idx * ROWS, ROWS))

        def pipeline(body, ctx):
            return plgpu.emit_pipeline_warp_specialized(
                body, grid=(k_steps,), memory_registers=40,
                in_specs=[
                    plgpu.BlockSpec((tm, tile_k), lambda k: (0, k), transforms=x_tf,
                                    memory_space=plgpu.SMEM),
                    plgpu.BlockSpec((ROWS, tile_k), lambda k: (0, k), transforms=fp8_tf,
                                    memory_space=plgpu.SMEM),
                ] + ([plgpu.BlockSpec((tile_k // 128, 128), lambda k: (k, 0),
                                      memory_space=plgpu.SMEM)]  # TMA: <= 256 a dimension
                     if norm is not None else []),
                wg_axis="wg", num_compute_wgs=wgs, max_concurrent_steps=steps,
                compute_context=ctx)

        ignore = lambda *_, **__: None  # noqa: E731

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(ignore, ignore).get_allocations(
                x_gmem, w_gmem, *(() if g_gmem is None else (g_gmem,))),
            out_smem=plgpu.SMEM((tm, ROWS), out_dtype, transforms=out_tf),
            ws_smem=plgpu.SMEM((ROWS,), jnp.float32),
            xs_smem=plgpu.SMEM((tm,), jnp.float32),
            bars=plgpu.Barrier(num_arrivals=1, num_barriers=3),
            collective_axes="wg", **scratch)
        def _scope(allocs, out_smem, ws_smem, xs_smem, bars, a_smem=None, red_smem=None,
                   red_bar=None, res_smem=None, xq_smem=None, xqs_smem=None, ss_smem=None):
            wg = lax.axis_index("wg") if wgs > 1 else 0

            def epilogue(acc):
                plgpu.barrier_wait(bars.at[0])
                w_s = plgpu.load(ws_smem, (), layout=plgpu.Layout.WGMMA.reduce(1))
                scale = lax.broadcast_in_dim(w_s, (ROWS, tm), [0])
                if x_scale is not None:
                    plgpu.barrier_wait(bars.at[1])
                    x_s = plgpu.load(xs_smem, (), layout=plgpu.Layout.WGMMA.reduce(0))
                    scale = scale * lax.broadcast_in_dim(x_s, (ROWS, tm), [1])
                val = (acc * scale).astype(out_dtype)
                if res_smem is not None:  # the model's x + proj(h), in out_dtype
                    plgpu.barrier_wait(bars.at[2])
                    val = val + res_smem.transpose((1, 0))[...]
                out_smem.transpose((1, 0))[...] = val
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[out_block])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            def ctx(eval_pipeline):
                # The scales' copies run beside the weight stream (issued by warpgroup 0,
                # which alone stores the tile); waited for at the end.
                @pl.when(wg == 0)
                def _():
                    plgpu.copy_gmem_to_smem(ws_gmem.at[n_idx], ws_smem, bars.at[0])
                    if x_scale is not None:
                        plgpu.copy_gmem_to_smem(xs_gmem.at[pl.ds(0, tm)], xs_smem, bars.at[1])
                    if res_smem is not None:
                        plgpu.copy_gmem_to_smem(res_gmem.at[out_block], res_smem, bars.at[2])

                if quantize_x:  # the rows' scales applied step by step: a register sum
                    acc = plgpu.layout_cast(jnp.full((ROWS, tm), 0, jnp.float32),
                                            plgpu.Layout.WGMMA)
                    if norm is None:
                        acc = eval_pipeline(acc)
                    else:
                        acc, ss = eval_pipeline((acc, plgpu.layout_cast(
                            jnp.full((tile_k, tm), 0, jnp.float32),
                            plgpu.Layout.WGMMA_TRANSPOSED)))
                        ss_smem[...] = jnp.sum(ss, axis=0)  # one cross-warp sum
                        plgpu.commit_smem()
                        # 1 / rms(x) scales the product before the epilogue's rounding.
                        ss = plgpu.load(ss_smem, (), layout=plgpu.Layout.WGMMA.reduce(0))
                        r = lax.rsqrt(ss / K + norm_eps)
                        acc = acc * lax.broadcast_in_dim(r, (ROWS, tm), [1])
                    epilogue(acc)
                    return

                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((ROWS, tm), jnp.float32))
                def _acc(acc_ref):
                    eval_pipeline(acc_ref)
                    acc = acc_ref[...]
                    if wgs == 1:
                        epilogue(acc)
                        return

                    # The other warpgroups' sums handed to warpgroup 0 through shared memory.
                    @pl.when(wg != 0)
                    def _():
                        red_smem.at[wg - 1][...] = acc
                        plgpu.commit_smem()
                        plgpu.barrier_arrive(red_bar)

                    @pl.when(wg == 0)
                    def _():
                        plgpu.barrier_wait(red_bar)
                        total = acc
                        for i in range(wgs - 1):
                            total = total + plgpu.load(red_smem.at[i], (),
                                                       layout=plgpu.Layout.WGMMA)
                        epilogue(total)

            def body(idx, x_smem, w_smem, *rest):
                *g_smem, acc_ref = rest
                if norm is not None:
                    acc_ref, ss = acc_ref
                if quantize_x:
                    # The step's [tm, tile_k] rows (16-bit) quantized per token: its absmax
                    # over the step's K block maps to 448 (quantize_x_reference), the e4m3
                    # rows stored for the wgmma, whose product is then scaled back token by
                    # token into the running sum (acc_ref: a register value).
                    xt16 = plgpu.load(x_smem.transpose((1, 0)), (),
                                      layout=plgpu.Layout.WGMMA_TRANSPOSED)
                    xt = xt16.astype(jnp.float32)
                    if norm is None:  # the absmax of 16-bit values: exact in 16 bits (paired)
                        amax = jnp.max(jnp.abs(xt16), axis=0).astype(jnp.float32)
                    else:  # RMSNorm folded: x * g quantized, 1 / rms(x) at the end
                        ss = ss + xt * xt  # summed over K once, after the last step
                        g_layout = plgpu.Layout.WGMMA_TRANSPOSED.reduce(1)
                        if interpret:  # the interpreter takes no reshaped ref
                            g = g_smem[0][...].reshape(tile_k)
                        else:
                            g = plgpu.load(g_smem[0].reshape(tile_k), (), layout=g_layout)
                        xt = xt * lax.broadcast_in_dim(g.astype(jnp.float32), (tile_k, tm),
                                                       [0])
                        amax = jnp.max(jnp.abs(xt), axis=0)
                    # A reciprocal a token, then a multiply a value (no division a value).
                    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
                    q = xt * lax.broadcast_in_dim(jnp.where(amax > 0, E4M3_MAX / amax, 1.0),
                                                  (tile_k, tm), [1])
                    buf = lax.rem(idx[0], 2)
                    xq = xq_smem.at[buf]
                    xq.transpose((1, 0))[...] = q.astype(jnp.float8_e4m3fn)
                    xqs_smem.at[buf][...] = scale  # to the accumulator's layout via SMEM
                    plgpu.commit_smem()

                    def mma(part):
                        plgpu.wgmma(part, w_smem, xq.transpose((1, 0)))
                        x_s = plgpu.load(xqs_smem.at[buf], (),
                                         layout=plgpu.Layout.WGMMA.reduce(0))
                        val = plgpu.wgmma_accumulator_load(part, wait_n=0)
                        return acc_ref + val * lax.broadcast_in_dim(x_s, (ROWS, tm), [1])

                    acc = pl.run_scoped(mma, plgpu.ACC((ROWS, tm), jnp.float32))
                    return acc if norm is None else (acc, ss)
                if not weight_only:
                    plgpu.wgmma(acc_ref, w_smem, x_smem.transpose((1, 0)))
                    plgpu.wgmma_wait(0)
                    return acc_ref
                # W8A16: each 128-wide K chunk of the e4m3 tile upcast in registers (A); with
                # several compute warpgroups, warpgroup g takes chunks g, g + wgs, ...
                for j in range(chunks // wgs):
                    ks = pl.ds((j * wgs + wg) * 128, 128)
                    # e4m3 -> float16 is one instruction a pair; bfloat16 only from float16
                    # (exact: every e4m3 value is a float16 and a bfloat16) with this ptxas.
                    a = w_smem.at[:, ks][...].astype(jnp.float16).astype(x_fp8.dtype)
                    if a_smem is not None:  # interpreted (``scratch``)
                        a_smem.at[wg][...] = a
                        plgpu.commit_smem()
                        a = a_smem.at[wg]
                    plgpu.wgmma(acc_ref, a, x_smem.at[:, ks].transpose((1, 0)))
                    plgpu.wgmma_wait(0)
                return acc_ref

            pipeline(body, ctx)(x_gmem, w_gmem.at[pl.ds(n_idx * ROWS, ROWS), :],
                                *(() if g_gmem is None else (g_gmem,)), allocations=allocs)

    f = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((M if oob_rows else tm, N), out_dtype),
        grid=(N // ROWS,), grid_names=("n",), num_threads=wgs + 1, thread_name="wg",
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    out = f(x_fp8, w_fp8, xs, ws, *(() if residual is None else (residual,)),
            *(() if norm is None else (norm[0].reshape(K // 128, 128),)))
    return out[:M] if out.shape[0] != M else out
