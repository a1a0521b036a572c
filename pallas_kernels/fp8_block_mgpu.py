"""Block-scaled W8A8 fp8 GEMM on Hopper's fp8 tensor cores, in Mosaic GPU (TMA, wgmma).

The contract of ``fp8_matmul.fp8_block_matmul`` (vLLM's W8A8 block linear, the format of
Qwen3-FP8 / DeepSeek-V3 checkpoints):

  x: [M, K] e4m3, one scale per row and group of ``block_k`` (= 128) input features: x_scale [M, KB]
  w: [N, K] e4m3 (HF's [out, in], K contiguous), one scale per output channel and K block:
     w_scale [N, KB] (the checkpoint's [ceil(N/128), KB] tile scales repeated over their rows)
  out[m, n] = sum_kb x_scale[m, kb] w_scale[n, kb] (x_fp8[m, kb-th block] . w_fp8[n, same])

Why a Mosaic GPU kernel: the Triton-lowered ``fp8_block_matmul`` ran at 0.2-0.5x of XLA's bf16
dot at M >= 256 on the H100 (its per-K-block rescale between fp8 dots keeps Triton's pipeline
from overlapping them), and XLA's own form (its dot over the dequantized weight) writes the
weight in bf16 before its GEMM below ~4096 rows (0.7x bf16 at M = 1024): block-wise checkpoints
decoded their large batches slower than bf16 (benchmarks/RESULTS.md, 2026-12-06).

The kernel (DeepGEMM's scheme, on JAX's shipped warp-specialized pipeline): one CTA per SM loops
over output tiles of 128 weight rows x ``tile_m`` tokens; a producer warpgroup streams the e4m3
tiles of both operands and the two K-block scale rows by TMA, ``steps`` K blocks ahead; each of
two compute warpgroups owns 64 weight rows and, per K block, runs one fp8 wgmma into a fresh
float32 accumulator (the product transposed, y^T = W x^T: the weight's rows are wgmma's M, the
tokens its N, both operands K-major as they lie, as fp8 wgmma requires), then adds it into its
running sum scaled by the outer product of the block's weight and token scales (the
"promotion" to float32 that keeps the block scales exact). The tile is stored token-major
through a transposed view of its shared-memory buffer. From 1,024 rows, where 128-token
tiles fill the GPU (``pick_tile``), a step holds two K blocks, the first promoted while the second's wgmma runs;
the CTAs take the tiles in groups of 8 token tiles (L2 reuse), and two CTAs of a cluster
share each weight tile by TMA multicast: 0.70-0.75x of the first version's time at 16,384
rows (H100, 2026-12-06 08:40).

Limits (checked, ValueError): ``block_k`` 128 (one 128-byte swizzle row of e4m3 is one scale
block), K a multiple of 128, N a multiple of 128, ``tile_m`` a multiple of 32 in [32, 256]
(wgmma's N; a 72-token tile, whose 288-byte scale rows misalign the scale buffers, faulted
on the H100 with a misaligned address), a 16-bit output (a float32 tile's transposed store
found no register layout: the engine's models are bf16 on a GPU). M is padded to whole token
tiles (of a cluster) here (zero rows, sliced off).

Tested on the CPU by Mosaic GPU's interpreter against ``fp8_block_matmul_reference``
(tests/test_pallas_kernels.py), lowered for an abstract H100 (tests/test_gpu_lowering.py), and
compiled and timed on the GPU (tests/test_gpu.py, ``benchmarks/kernels.py --sections
block_gemm``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

WG_ROWS = 64  # weight rows a compute warpgroup owns: wgmma's M
CTA_ROWS = 2 * WG_ROWS  # two compute warpgroups a CTA
BLOCK_K = 128  # the K step: one scale block, 128 bytes of e4m3 (one swizzle row)
# A tile is (tile_m, steps, k_blocks, group_m, cluster_m): tokens a tile, pipeline steps the
# producer runs ahead, 128-wide K blocks a step, token tiles a group of the tile order, CTAs a
# cluster (the arguments of ``fp8_block_matmul_mgpu``).
# The tile order (``group_m``): groups of that many token tiles, each group's weight tiles walked
# in a snake (``plgpu.planar_snake``), so one wave of 132 CTAs reads ~group_m token tiles and
# ~132 / group_m weight tiles and the next wave finds most of them in the L2. 0: every token
# tile of a weight tile before the next weight tile (the first version's order: at 16,384 rows
# a wave read 132 different 512 KB token tiles, 66 MB, more than the L2 holds).
# The default where 128-token tiles fill the GPU, from the H100 sweep of 2026-12-06 08:40
# (benchmarks/RESULTS.md): at 16,384 rows (128, 4, 1, 0, 1) took 1168 / 795 / 5568 / 2656 µs
# (q/k/v, o, gate/up, down), grouping by 8 -> 881 / 588 / 4319 / 2048, with 2-CTA clusters 855
# / 573 / 4258 / 1986, and two K blocks a step on top 831 / 555 / 3935 / 2002 (the fastest or
# within 1% in every shape); at 1,024 and 4,096 rows 4-6% under (128, 4, 1, 0, 1). Offline
# throughput of a block-wise checkpoint 5,947 -> 6,811 / 6,827 tok/s.
DEFAULT_TILE = (128, 2, 2, 8, 2)
ODD_K_TILE = (128, 4, 1, 8, 2)  # K in an odd number of 128-blocks: one K block a step
# Below this many rows (none of them swept with the new arguments; a cluster pads M to 256
# rows, which at 65-1023 rows can be a third of the work) the first version's tile holds.
DEFAULT_TILE_MIN_ROWS = 1024
# The tiles ``pick_tile`` chooses among below DEFAULT_TILE_MIN_ROWS (H100 sweep of 2026-12-06
# 05:45: at M = 128 the o shape ran 14.7 µs with (32, 8) against 22.9 with (128, 4), q/k/v
# 18.3 with (64, 4) against 23.5, gate/up 56.1 with (128, 4), the fastest). Neither grouping
# (one group at these sizes), nor clusters nor two K blocks a step were timed there.
TILE_CHOICES = ((128, 4, 1, 0, 1), (64, 4, 1, 0, 1), (32, 8, 1, 0, 1))


def pick_tile(M: int, N: int, KB: int, num_sms: int) -> tuple[int, int, int, int, int]:
    """The tile (module comment) for an [M, K] x [N, K] GEMM of KB 128-wide K blocks:
    ``DEFAULT_TILE`` (``ODD_K_TILE`` for an odd KB) from ``DEFAULT_TILE_MIN_ROWS`` rows where
    128-token tiles fill the SMs; below, the choice of ``TILE_CHOICES`` with the most tiles
    that still fit one wave, or its 128-token tile where even that one fills them (a narrow N
    at a small M leaves most SMs idle with 128-token tiles: the o projection at 128 rows has
    32 tiles of 128 x 128 for 132 SMs)."""
    def tiles(tm):
        return (N // CTA_ROWS) * -(-M // tm)

    if tiles(DEFAULT_TILE[0]) >= num_sms:
        if M < DEFAULT_TILE_MIN_ROWS:
            return TILE_CHOICES[0]
        return DEFAULT_TILE if KB % 2 == 0 else ODD_K_TILE
    fits = [t for t in TILE_CHOICES if tiles(t[0]) <= num_sms]
    return max(fits, key=lambda t: tiles(t[0]))


def check_shapes(M: int, K: int, N: int, block_k: int, tile_m: int,
                 out_dtype=jnp.bfloat16) -> None:
    """Raises ValueError unless the kernel takes this GEMM (module docstring, Limits)."""
    if block_k != BLOCK_K:
        raise ValueError(f"block_k={block_k}: the Mosaic GPU block kernel takes {BLOCK_K} only.")
    if K % BLOCK_K or N % CTA_ROWS:
        raise ValueError(f"K={K} must be a multiple of {BLOCK_K} and N={N} of {CTA_ROWS} for the "
                         "Mosaic GPU block kernel.")
    if tile_m % 32 or not 32 <= tile_m <= 256:
        raise ValueError(f"tile_m={tile_m}: a multiple of 32 in [32, 256] (wgmma's N; a token "
                         "scale row of 128-byte multiples).")
    if M < 1:
        raise ValueError(f"M={M}: at least one row.")
    if jnp.dtype(out_dtype).itemsize != 2:
        raise ValueError(f"out_dtype={jnp.dtype(out_dtype).name}: the Mosaic GPU block kernel "
                         "writes bfloat16 or float16 (its transposed store of a float32 tile "
                         "has no layout).")


def fp8_block_matmul_mgpu(x_fp8: jax.Array, x_scale: jax.Array, w_fp8: jax.Array,
                          w_scale: jax.Array, block_k: int = BLOCK_K, out_dtype=jnp.bfloat16, *,
                          tile_m: int | None = None, steps: int | None = None,
                          k_blocks: int | None = None, group_m: int | None = None,
                          cluster_m: int | None = None, num_sms: int | None = None,
                          interpret: bool = False) -> jax.Array:
    """x_fp8 [M, K], x_scale [M, KB], w_fp8 [N, K], w_scale [N, KB] -> [M, N] ``out_dtype``
    (the module's contract). ``tile_m``: tokens a tile (clipped to M rounded up to 32);
    ``steps``: pipeline steps in flight (both None: ``pick_tile``'s tile for the shape);
    ``k_blocks``: 128-wide K blocks a pipeline step (1, or 2: both blocks' wgmmas issued, then
    the first promoted while the second runs, the overlap DeepGEMM gets; K a multiple of 256);
    ``group_m``: token tiles a group of the tile order (0: all of them, weight tile by weight
    tile); ``cluster_m``: CTAs of a cluster (1 or 2) taking adjacent token tiles of one weight
    tile, whose e4m3 tile each loads half of and TMA multicasts to both (half the weight's L2
    reads; M padded to whole cluster tiles). Each of the last three left None takes
    ``pick_tile``'s value when tile_m is None too, else 1 / 0 / 1 (the plain kernel);
    ``num_sms``: CTAs (default: the GPU's SMs; 4 when interpreted); ``interpret``: Mosaic
    GPU's interpreter (any platform, slow)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    M, K = x_fp8.shape
    N, KB = w_scale.shape
    if (tile_m is None) != (steps is None):
        raise ValueError("tile_m and steps are given together (or neither: pick_tile).")
    check_shapes(M, K, N, block_k, DEFAULT_TILE[0] if tile_m is None else tile_m, out_dtype)
    if w_fp8.shape != (N, K) or KB != K // BLOCK_K or x_scale.shape != (M, KB):
        raise ValueError(f"shapes x {x_fp8.shape}, x_scale {x_scale.shape}, w {w_fp8.shape}, "
                         f"w_scale {w_scale.shape} do not fit K={K} in blocks of {BLOCK_K}.")
    if num_sms is None:
        # The GPU's SMs; an H100's 132 where the default device has no count (lowering for an
        # abstract GPU on a CPU host): only the tile choice depends on it.
        num_sms = 4 if interpret else getattr(jax.devices()[0], "core_count", None) or 132
    picked = pick_tile(M, N, KB, num_sms) if tile_m is None else (tile_m, steps, 1, 0, 1)
    tile_m, steps = picked[:2]
    k_blocks = picked[2] if k_blocks is None else k_blocks
    group_m = picked[3] if group_m is None else group_m
    cluster_m = picked[4] if cluster_m is None else cluster_m
    if k_blocks not in (1, 2) or KB % k_blocks:
        raise ValueError(f"k_blocks={k_blocks}: 1, or 2 with K a multiple of {2 * BLOCK_K} "
                         f"(K={K}).")
    if group_m < 0:
        raise ValueError(f"group_m={group_m}: 0 (no grouping) or a number of token tiles.")
    if cluster_m not in (1, 2):
        raise ValueError(f"cluster_m={cluster_m}: 1 or 2 CTAs a cluster.")
    tk = k_blocks * BLOCK_K
    tm = min(tile_m, -(-M // 32) * 32)
    M_pad = -(-M // (tm * cluster_m)) * tm * cluster_m
    if M_pad != M:
        x_fp8 = jnp.pad(x_fp8, ((0, M_pad - M), (0, 0)))
        x_scale = jnp.pad(x_scale, ((0, M_pad - M), (0, 0)))
    # Scales K-block-major, so a K step's scales are one TMA row each; the weight's as
    # [KB, N / 64, 64]: a compute warpgroup reads its 64 rows as a leading index.
    xs_t = x_scale.astype(jnp.float32).T
    ws_t = w_scale.astype(jnp.float32).T.reshape(KB, N // WG_ROWS, WG_ROWS)
    m_iters, n_iters = M_pad // (tm * cluster_m), N // CTA_ROWS  # cluster tiles
    group = m_iters if group_m == 0 else min(group_m, m_iters)
    out_isz = jnp.dtype(out_dtype).itemsize
    fp8_tf = (plgpu.TilingTransform((8, BLOCK_K)), plgpu.SwizzleTransform(128))
    out_swizzle = plgpu.find_swizzle(WG_ROWS * out_isz * 8)
    out_tf = (plgpu.TilingTransform((8, out_swizzle // out_isz)),
              plgpu.SwizzleTransform(out_swizzle))

    def kernel(x_gmem, w_gmem, xs_gmem, ws_gmem, out_gmem):
        def pipeline(body, ctx):
            return plgpu.emit_pipeline_warp_specialized(
                body, grid=(KB // k_blocks,), memory_registers=40,
                in_specs=[
                    plgpu.BlockSpec((tm, tk), lambda k: (0, k), transforms=fp8_tf,
                                    memory_space=plgpu.SMEM),
                    plgpu.BlockSpec((CTA_ROWS, tk), lambda k: (0, k), transforms=fp8_tf,
                                    memory_space=plgpu.SMEM,
                                    collective_axes=("cluster",) if cluster_m > 1 else ()),
                    plgpu.BlockSpec((k_blocks, tm), lambda k: (k, 0), memory_space=plgpu.SMEM),
                    plgpu.BlockSpec((k_blocks, 2, WG_ROWS), lambda k: (k, 0, 0),
                                    memory_space=plgpu.SMEM),
                ],
                wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=steps,
                compute_context=ctx)

        ignore = lambda *_, **__: None  # noqa: E731

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem, xs_gmem, ws_gmem),
            out_smem=plgpu.SMEM((2, tm, WG_ROWS), out_dtype, transforms=out_tf),
            collective_axes="wg")
        def _scope(allocs, out_smem):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((n_iters * m_iters,), collective_axes="cluster_grid")
            def _units(info):
                (u,) = info.index
                if group >= m_iters:
                    n_idx, m_idx = u // m_iters, u % m_iters
                else:
                    m_idx, n_idx = plgpu.planar_snake(u, (m_iters, n_iters), 0, group)
                if cluster_m > 1:
                    m_idx = m_idx * cluster_m + lax.axis_index("cluster")
                m_slice = pl.ds(m_idx * tm, tm)
                n_slice = pl.ds(n_idx * CTA_ROWS, CTA_ROWS)
                wg_rows = pl.ds(wg * WG_ROWS, WG_ROWS)

                def ctx(eval_pipeline):
                    acc = eval_pipeline(plgpu.layout_cast(
                        jnp.full((WG_ROWS, tm), 0, jnp.float32), plgpu.Layout.WGMMA))
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    out_smem.at[wg].transpose((1, 0))[...] = acc.astype(out_dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(
                        out_smem.at[wg],
                        out_gmem.at[m_slice, pl.ds(n_idx * CTA_ROWS + wg * WG_ROWS, WG_ROWS)])

                def body(_, x_smem, w_smem, xs_smem, ws_smem, acc):
                    def mma(*parts):
                        # Every block's wgmma in flight, then each promoted as it completes
                        # (wait_n: how many may still run), the next one running meanwhile.
                        for j, part in enumerate(parts):
                            ks = pl.ds(j * BLOCK_K, BLOCK_K)
                            plgpu.wgmma(part, w_smem.at[wg_rows, ks],
                                        x_smem.at[:, ks].transpose((1, 0)))
                        out = acc
                        for j, part in enumerate(parts):
                            val = plgpu.wgmma_accumulator_load(part, wait_n=k_blocks - 1 - j)
                            ws = plgpu.load(ws_smem.at[j, wg], (),
                                            layout=plgpu.Layout.WGMMA.reduce(1))
                            xs = plgpu.load(xs_smem.at[j], (),
                                            layout=plgpu.Layout.WGMMA.reduce(0))
                            out = out + val * (lax.broadcast_in_dim(ws, (WG_ROWS, tm), [0])
                                               * lax.broadcast_in_dim(xs, (WG_ROWS, tm), [1]))
                        return out

                    return pl.run_scoped(
                        mma, *[plgpu.ACC((WG_ROWS, tm), jnp.float32)] * k_blocks)

                pipeline(body, ctx)(x_gmem.at[m_slice, :], w_gmem.at[n_slice, :],
                                    xs_gmem.at[:, m_slice],
                                    ws_gmem.at[:, pl.ds(n_idx * 2, 2), :], allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    f = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((M_pad, N), out_dtype),
        grid=(num_sms // cluster_m,), grid_names=("cluster_grid",), cluster=(cluster_m,),
        cluster_names=("cluster",), num_threads=3,
        thread_name="wg",
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    out = f(x_fp8, w_fp8, xs_t, ws_t)
    return out[:M] if M_pad != M else out
