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

GPU only (Hopper): Mosaic GPU has no CPU path.
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
ROWS, PAD = 8, 64
# tile_n, tile_k, max_concurrent_steps (tile_m 64; two compute warpgroups split N, so a CTA
# covers 2 * tile_n columns).
TILES = ((32, 64, 4), (32, 64, 8), (64, 64, 6), (32, 128, 4), (128, 64, 4))


def main(argv=None):
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="o,gate_up,down,qkv")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rows = []
    emit = gpu_trace.jsonl_emitter(rows, a.out)
    for name in a.shapes.split(","):
        K, N = SHAPES[name]
        wbytes = K * N * 2
        x = jax.random.normal(jax.random.PRNGKey(0), (ROWS, K)).astype(jnp.bfloat16)
        w = (jax.random.normal(jax.random.PRNGKey(1), (K, N)) / K ** 0.5).astype(jnp.bfloat16)
        xp = jnp.pad(x, ((0, PAD - ROWS), (0, 0)))
        xla = jax.jit(jnp.dot)
        ref = xla(x, w).astype(jnp.float32)

        def record(variant, fn, args, **cfg):
            row = dict(shape=name, K=K, N=N, variant=variant, **cfg)
            try:
                out = fn(*args)[:ROWS].astype(jnp.float32)
                row["rel"] = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
                dev = gpu_trace.device_time(fn, [args], calls=a.calls)
                if dev is not None:
                    row.update(us=round(dev["device_us"], 2), ops=dev["ops_per_call"],
                               tb_s=round(wbytes / (dev["device_us"] * 1e-6) / 1e12, 2))
            except Exception as e:  # a tile the kernel or Mosaic refuses: say so, go on
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            emit(row)

        record("xla", xla, (x, w))
        for tn, tk, steps in TILES:
            cfg = hm.TuningConfig(tile_m=PAD, tile_n=tn, tile_k=tk, max_concurrent_steps=steps,
                                  epi_tile_n=min(64, tn), epi_tile_m=PAD)
            fn = jax.jit(functools.partial(hm.matmul, c=None, config=cfg))
            record("mosaic", fn, (xp, w), tile_n=tn, tile_k=tk, steps=steps)
    print("\n| shape | variant | tile_n x tile_k, steps | µs | TB/s | rel |\n"
          "|---|---|---|---:|---:|---:|")
    for r in rows:
        tile = f"{r['tile_n']} x {r['tile_k']}, {r['steps']}" if "tile_n" in r else ""
        print(f"| {r['shape']} | {r['variant']} | {tile} | {r.get('us', r.get('error', ''))} | "
              f"{r.get('tb_s', '')} | {r.get('rel', '')} |")


if __name__ == "__main__":
    main()
