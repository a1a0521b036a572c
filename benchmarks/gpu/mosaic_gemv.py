"""Does a Mosaic GPU GEMM (TMA loads, warp-specialized pipeline) read batch-1 weights faster
than XLA? The question before any Mosaic GPU persistent layer kernel (DESIGN_NOTES, "Where
batch 1 stands": the Triton persistent chain was refuted on 2026-12-03, its GEMV body reading
3.4 TB/s where a long GEMV streams 4.64).

JAX ships a Hopper matmul on Mosaic GPU (``jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu``:
one CTA per SM looping over output tiles, two compute warpgroups on wgmma, a producer issuing TMA
copies ``max_concurrent_steps`` ahead). wgmma takes 64 rows, so the batch-1 bucket's 8 rows are
padded to 64 (the extra FLOPs are free: these GEMMs are bandwidth-bound). For each Llama-3-8B
projection shape, GPU time (profiler) of XLA's dot at 8 rows against the Mosaic kernel at a few
tiles, the read bandwidth of each, and the Mosaic output's rel. error against XLA's.

    python3 benchmarks/gpu/mosaic_gemv.py [--shapes o,gate_up] [--out FILE]
    python3 benchmarks/gpu/mosaic_gemv.py --smoke   # any platform: lowering only

The split-K forms (``splitk_matmul``: K splits as more work units; ``swap``: the tokens as
wgmma's N, no padding) are ours, after the shipped kernel.

Timing needs a Hopper GPU (Mosaic GPU has no CPU path). ``--smoke`` lowers every (shape, tile)
for an abstract H100 (``jax.sharding.AbstractDevice``) instead, which catches the tiles Mosaic
refuses at lowering (not those refused at compile, e.g. for shared memory).
"""
from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import gpu_trace  # noqa: E402

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
          "down": (14336, 4096)}
# Not in the default set: 32 o weights side by side (1 GiB), so one kernel streams as long as
# a 32-layer persistent chain would; its rate is a GEMM body's steady state, ramp and tail
# amortized (the Triton chain's body without barriers: 3.44 TB/s, RESULTS 2026-12-03 09:00).
EXTRA_SHAPES = {"o_x32": (4096, 32 * 4096)}
ROWS, PAD = 8, 64
COPIES = 4
FP8 = jnp.float8_e4m3fn
# tile_n, tile_k, max_concurrent_steps, the dimension the two compute warpgroups split ("N": a
# CTA covers 64 rows x 2 * tile_n columns; "M": 128 rows x tile_n, the rows padded to 128).
# A B tile's column slice must be a multiple of the swizzle (tile_k * 2 bytes, at most 128 B:
# 64 columns at tile_k >= 64, 32 at tile_k 32), checked by lowering on the CPU (abstract H100):
# tile_n 32 with tile_k 64 does not lower. The o / q/k/v shapes have few output tiles (N 4096:
# 32 CTAs at 2 x 64 columns), so the small tiles are the ones that spread over the SMs.
# Bytes in flight per SM bound a stream (Little's law: ~4.6 TB/s x ~0.8 us over 132 SMs is
# ~28 KB an SM), so the deeper pipelines (16 steps of 2 KB B tiles, 8 of 8 KB) are in the table.
TILES = ((32, 32, 16, "M"), (64, 64, 8, "M"), (64, 128, 4, "N"), (128, 64, 4, "N"))


# Split-K form (ours, ``splitk_matmul``): tile_n (each of the two compute warpgroups; a CTA covers
# 2 * tile_n columns), tile_k, pipeline steps, K splits. Work units are (column tile, K split),
# looped over one CTA per SM, so the o / q/k/v shapes (32-48 column tiles) fill the GPU too.
# Each as (tile_n, tile_k, steps, splits, swap); swap (the tokens as wgmma's N, no padding to
# 64 rows) needs tile_n 64 (wgmma's M). Every K here (4096, 14336) divides by 8 x 128.
SPLITK_TILES = tuple([(64, 64, 4, 4, False), (64, 64, 8, 2, False), (64, 64, 4, 8, False)]
                     + [(64, 64, 8, sp, True) for sp in (1, 2, 4, 8)]
                     + [(64, 128, 4, sp, True) for sp in (1, 2, 4, 8)])
# The fp8 swapped form (W8A8 on the fp8 tensor cores, the weight [N, K] as the engine holds it):
# (tile_n, tile_k, steps, splits); a 128-wide K tile is 128 bytes of e4m3, one swizzle row.
FP8_TILES = tuple([(64, 128, 8, sp) for sp in (1, 2, 4, 8)]
                  + [(64, 256, 4, sp) for sp in (1, 2, 4, 8)])


def splitk_matmul(tile_n: int, tile_k: int, steps: int, splits: int, *, swap: bool = False,
                  nk: bool = False, num_sms=None, interpret=False):
    """A Mosaic GPU GEMM with its K split: ``fn(a [M, K], b [K, N])`` gives the float32
    partials [splits, M, N] (summed by the caller); M = 64, wgmma's smallest row count. The
    shipped Hopper matmul's pipeline (TMA producer warpgroup, two wgmma warpgroups splitting the
    CTA's columns) with K splits as more work units: the shipped kernel's units are output tiles
    only, 32 for the o shape at 2 x 64 columns, a quarter of the SMs.

    ``swap``: the product transposed, y^T = b^T a^T, so the weight's columns are wgmma's 64
    rows and the tokens its N (any multiple of 8): ``a`` [M, K] with M the real token count
    (8 at batch 1; no padding to 64), and the partials come back as [splits, N, M] (the caller
    transposes them in the sum). The operands are read transposed from shared memory (wgmma
    takes MN-major 16-bit operands).

    ``nk`` (with ``swap``): ``b`` is given as [N, K] (HF's [out, in], K contiguous: the engine's
    fp8 weights), so both operands are K-major as they lie, as fp8 wgmma needs: ``fn(a [M, K]
    e4m3, b [N, K] e4m3)`` runs W8A8 on the fp8 tensor cores (scales are the caller's).

    ``interpret``: Mosaic GPU's interpreter (any platform; the CPU test checks the sums), over
    ``num_sms`` CTAs (default: the GPU's)."""
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if nk and not swap:
        raise ValueError("nk needs swap")

    def kernel(a_gmem, b_gmem, out_gmem):
        m, k = a_gmem.shape
        n = b_gmem.shape[0] if nk else b_gmem.shape[1]
        isz = jnp.dtype(a_gmem.dtype).itemsize
        cta_n = 2 * tile_n
        n_iters, k_per = n // cta_n, k // splits
        if n % cta_n or k % (splits * tile_k) or (m % 8 if swap else m != PAD):
            raise ValueError(f"shape {m} x {k} x {n} does not tile by {tile_n} / {tile_k} / "
                             f"{splits}")
        swizzle = plgpu.find_swizzle(tile_k * isz * 8)
        transforms = (plgpu.TilingTransform((8, swizzle // isz)),
                      plgpu.SwizzleTransform(swizzle))
        acc_shape = (tile_n, m) if swap else (m, tile_n)
        out_swizzle = plgpu.find_swizzle(acc_shape[1] * 4 * 8)
        out_transforms = (plgpu.TilingTransform((8, out_swizzle // 4)),
                          plgpu.SwizzleTransform(out_swizzle))
        w_swizzle = plgpu.find_swizzle(tile_n * 2 * 8) if swap and not nk else swizzle
        w_transforms = (plgpu.TilingTransform((8, w_swizzle // isz)),
                        plgpu.SwizzleTransform(w_swizzle))
        w_block = ((cta_n, tile_k), lambda kk: (0, kk)) if nk else ((tile_k, cta_n),
                                                                   lambda kk: (kk, 0))

        def pipeline(body, ctx):
            return plgpu.emit_pipeline_warp_specialized(
                body, grid=(k_per // tile_k,), memory_registers=40,
                in_specs=[plgpu.BlockSpec((m, tile_k), lambda kk: (0, kk), transforms=transforms,
                                          memory_space=plgpu.SMEM),
                          plgpu.BlockSpec(*w_block, transforms=w_transforms,
                                          memory_space=plgpu.SMEM)],
                wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=steps,
                compute_context=ctx)

        ignore = lambda *_, **__: None  # noqa: E731

        @functools.partial(pl.run_scoped,
                           allocs=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem),
                           out_smem=plgpu.SMEM((2, *acc_shape), jnp.float32,
                                               transforms=out_transforms),
                           collective_axes="wg")
        def _scope(allocs, out_smem):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((n_iters * splits,), collective_axes="cluster_grid")
            def _units(info):
                (u,) = info.index
                n_idx, s = u % n_iters, u // n_iters
                n_slice, k_slice = pl.ds(n_idx * cta_n, cta_n), pl.ds(s * k_per, k_per)
                wg_n = pl.ds(wg * tile_n, tile_n)
                dst = (out_gmem.at[s].at[n_slice].at[wg_n] if swap else
                       out_gmem.at[s].at[:, n_slice].at[:, wg_n])

                def ctx(eval_pipeline):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(acc_shape, jnp.float32))
                    def _acc(acc_ref):
                        eval_pipeline(acc_ref)
                        acc = acc_ref[...]
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        out_smem[wg] = acc
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(out_smem.at[wg], dst)

                def mma(idxs, a_smem, b_smem, acc_ref):
                    if nk:
                        plgpu.wgmma(acc_ref, b_smem.at[wg_n], a_smem.transpose((1, 0)))
                    elif swap:
                        plgpu.wgmma(acc_ref, b_smem.at[:, wg_n].transpose((1, 0)),
                                    a_smem.transpose((1, 0)))
                    else:
                        plgpu.wgmma(acc_ref, a_smem, b_smem.at[:, wg_n])
                    plgpu.wgmma_wait(0)
                    return acc_ref

                w_tile = b_gmem.at[n_slice, k_slice] if nk else b_gmem.at[k_slice, n_slice]
                pipeline(mma, ctx)(a_gmem.at[:, k_slice], w_tile, allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def fn(a, b):
        from jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu import get_num_sms
        m, n = a.shape[0], b.shape[0] if nk else b.shape[1]
        f = plgpu.kernel(
            kernel, out_type=jax.ShapeDtypeStruct((splits, *((n, m) if swap else (m, n))),
                                                  jnp.float32),
            grid=(num_sms or get_num_sms(),), interpret=plgpu.InterpretGPUParams() if interpret
            else None, grid_names=("cluster_grid",), cluster=(1,),
            cluster_names=("cluster",), num_threads=3, thread_name="wg",
            compiler_params=plgpu.CompilerParams(
                lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
        return f(a, b)

    return jax.jit(fn)


def mosaic_matmul(hm, tile_n: int, tile_k: int, steps: int, wg: str):
    """(jitted hopper_matmul_mgpu.matmul at this tile, the rows its input is padded to)."""
    dim = hm.MatmulDimension[wg]
    cfg = hm.TuningConfig(tile_m=PAD, tile_n=tile_n, tile_k=tile_k, max_concurrent_steps=steps,
                          epi_tile_n=min(64, tile_n), epi_tile_m=PAD, wg_dimension=dim)
    rows = PAD * (2 if wg == "M" else 1)
    return jax.jit(functools.partial(hm.matmul, c=None, config=cfg)), rows


def lower_all(hm, shapes: list[str], emit) -> int:
    """``--smoke``: lowers each (shape, tile) for an abstract H100; 1 if any fails."""
    bf16, sds = jnp.bfloat16, jax.ShapeDtypeStruct
    ok = []

    def lower(row, fn, a, b):
        ok.append(gpu_trace.lower_for_h100(row, fn, a, b, error_chars=300))
        emit(row)

    for name in shapes:
        K, N = SHAPES[name]
        base = dict(shape=name, K=K, N=N)
        for tn, tk, steps, wg in TILES:
            fn, rows_in = mosaic_matmul(hm, tn, tk, steps, wg)
            lower(dict(base, tile_n=tn, tile_k=tk, steps=steps, wg=wg), fn,
                  sds((rows_in, K), bf16), sds((K, N), bf16))
        for tn, tk, steps, splits, swap in SPLITK_TILES:
            lower(dict(base, variant="swapk" if swap else "splitk", tile_n=tn, tile_k=tk,
                       steps=steps, splits=splits),
                  splitk_matmul(tn, tk, steps, splits, swap=swap, num_sms=132),
                  sds((ROWS if swap else PAD, K), bf16), sds((K, N), bf16))
        for tn, tk, steps, splits in FP8_TILES:
            lower(dict(base, variant="swapk_fp8", tile_n=tn, tile_k=tk, steps=steps,
                       splits=splits),
                  splitk_matmul(tn, tk, steps, splits, swap=True, nk=True, num_sms=132),
                  sds((ROWS, K), FP8), sds((N, K), FP8))
    return int(not all(ok))


def main(argv=None):
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="o,gate_up,down,qkv")
    ap.add_argument("--calls", type=int, default=12)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-fp8", action="store_true", help="bf16 weights only")
    ap.add_argument("--variants", default="",
                    help="comma-separated variants to time (default all): xla, mosaic, splitk, "
                         "swapk, xla_fp8_weight_only, xla_fp8_w8a8, swapk_fp8")
    ap.add_argument("--smoke", action="store_true",
                    help="lower every (shape, tile) for an abstract H100; no timing")
    a = ap.parse_args(argv)
    rows = []
    emit = gpu_trace.jsonl_emitter(rows, a.out)
    if a.smoke:
        return lower_all(hm, a.shapes.split(","), emit)
    for name in a.shapes.split(","):
        K, N = {**SHAPES, **EXTRA_SHAPES}[name]
        wbytes = K * N * 2
        x = jax.random.normal(jax.random.PRNGKey(0), (ROWS, K)).astype(jnp.bfloat16)
        # COPIES distinct weights, cycled call by call: each call reads its weight from DRAM
        # (the o weight, 33.5 MB, would otherwise sit in the 50 MB L2 between calls).
        ws = [(jax.random.normal(jax.random.PRNGKey(1 + i), (K, N)) / K ** 0.5
               ).astype(jnp.bfloat16) for i in range(COPIES)]
        w = ws[0]
        xla = jax.jit(jnp.dot)
        ref = xla(x, w).astype(jnp.float32)

        def record(variant, fn, args, ws=ws, ref=ref, wbytes=wbytes, **cfg):
            if a.variants and variant not in a.variants.split(","):
                return
            row = dict(shape=name, K=K, N=N, variant=variant, **cfg)
            try:
                out = fn(*args)[:ROWS].astype(jnp.float32)
                row["rel"] = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
                arg_sets = [(args[0], wi) for wi in ws]
                dev = gpu_trace.device_time(fn, arg_sets, calls=a.calls)
                if dev is not None:
                    # top_op: the call's longest op (the GEMM / Mosaic kernel alone, without the
                    # partials' sum or the activations' quantization around it)
                    row.update(us=round(dev["device_us"], 2), ops=dev["ops_per_call"],
                               tb_s=round(wbytes / (dev["device_us"] * 1e-6) / 1e12, 2),
                               top_op=dev["top_op"], top_op_us=round(dev["top_op_us"], 2),
                               top_tb_s=round(wbytes / (dev["top_op_us"] * 1e-6) / 1e12, 2))
            except Exception as e:  # a tile the kernel or Mosaic refuses: say so, go on
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            emit(row)

        record("xla", xla, (x, w))
        for tn, tk, steps, wg in TILES:
            fn, rows_in = mosaic_matmul(hm, tn, tk, steps, wg)
            xp = jnp.pad(x, ((0, rows_in - ROWS), (0, 0)))
            record("mosaic", fn, (xp, w), tile_n=tn, tile_k=tk, steps=steps, wg=wg)
        xp = jnp.pad(x, ((0, PAD - ROWS), (0, 0)))
        for tn, tk, steps, splits, swap in SPLITK_TILES:
            if N % (2 * tn) or K % (splits * tk):
                continue
            sk = splitk_matmul(tn, tk, steps, splits, swap=swap)
            # the partials' sum in the same jit (what an engine would pay for this form)
            if swap:
                fn = jax.jit(lambda a, b, sk=sk: sk(a, b).sum(0).T.astype(jnp.bfloat16))
            else:
                fn = jax.jit(lambda a, b, sk=sk: sk(a, b).sum(0).astype(jnp.bfloat16))
            record("swapk" if swap else "splitk", fn, (x if swap else xp, w), tile_n=tn,
                   tile_k=tk, steps=steps, splits=splits)
        del ws, w
        if a.no_fp8:
            continue
        # fp8 weights as the engine holds them ([N, K] e4m3, a scale per output channel): XLA's
        # weight-only GEMM (the engine's path at <= 16 rows), XLA's W8A8 dot (cuBLASLt), and the
        # swapped Mosaic form on the fp8 tensor cores (the activations quantized per token in
        # the same jit). Bytes: the e4m3 weight.
        wqs = [jax.random.normal(jax.random.PRNGKey(100 + i), (N, K)).astype(FP8)
               for i in range(COPIES)]
        sw = jnp.full((N,), 1.0 / K ** 0.5, jnp.float32)
        ref8 = (x.astype(jnp.float32) @ wqs[0].astype(jnp.float32).T) * sw
        rec8 = functools.partial(record, ws=wqs, ref=ref8, wbytes=K * N)
        dn = (((1,), (1,)), ((), ()))

        def quant(x):
            s = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1, keepdims=True) / 448.0
            s = jnp.maximum(s, 1e-12)
            return (x.astype(jnp.float32) / s).astype(FP8), s

        def wo(x, w):
            y = jax.lax.dot_general(x, w.astype(x.dtype), dn, preferred_element_type=jnp.float32)
            return (y * sw).astype(jnp.bfloat16)

        def w8a8(x, w):
            xq, xs = quant(x)
            y = jax.lax.dot_general(xq, w, dn, preferred_element_type=jnp.float32)
            return (y * xs * sw).astype(jnp.bfloat16)

        rec8("xla_fp8_weight_only", jax.jit(wo), (x, wqs[0]))
        rec8("xla_fp8_w8a8", jax.jit(w8a8), (x, wqs[0]))
        for tn, tk, steps, splits in FP8_TILES:
            if N % (2 * tn) or K % (splits * tk):
                continue
            sk = splitk_matmul(tn, tk, steps, splits, swap=True, nk=True)

            def mos(x, w, sk=sk):
                xq, xs = quant(x)
                return (sk(xq, w).sum(0).T * xs * sw).astype(jnp.bfloat16)

            rec8("swapk_fp8", jax.jit(mos), (x, wqs[0]), tile_n=tn, tile_k=tk, steps=steps,
                 splits=splits)
    print("\n| shape | variant | tile_n x tile_k, steps, warpgroups split / K splits | µs (ops) "
          "| TB/s | longest op µs | its TB/s | rel |\n|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        tile = (f"{r['tile_n']} x {r['tile_k']}, {r['steps']}, " if "tile_n" in r else "")
        if "wg" in r:
            tile += f"wg {r['wg']}"
        elif "splits" in r:
            tile += f"{r['splits']} K splits"
        us = f"{r['us']} ({r['ops']:g})" if "us" in r else r.get("error", "")
        rel = f"{r['rel']:.1e}" if "rel" in r else ""
        print(f"| {r['shape']} | {r['variant']} | {tile} | {us} | {r.get('tb_s', '')} | "
              f"{r.get('top_op_us', '')} | {r.get('top_tb_s', '')} | {rel} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
