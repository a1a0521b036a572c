"""The skinny matmul kernel (pallas_kernels/skinny_matmul.py) against XLA, GPU time per call.

For the Llama-3-8B projections (fused q/k/v 4096 x 6144, o 4096 x 4096, fused gate/up
4096 x 28672, down 14336 x 4096) at M = 1, 8, 16, 64 rows:
  xla_bf16      jnp.dot over the [K, N] bf16 weight (the engine's bf16 projection)
  xla_w8a16     the e4m3 [N, K] weight upcast inside the dot, scale after (the engine's fp8
                projection at <= 16 rows)
  xla_w8a16_f16 the same in float16, x clipped to its range (the engine tried it as
                JAXLLM_FP8_WEIGHT_ONLY_DOT=float16 in bcdde9a: no faster, removed)
  xla_fp8       fp8 x fp8 dot over the [N, K] weight, x pre-quantized (cuBLASLt; issue 5's peer)
  pallas_*      the kernel: bf16 [K, N], W8A16 [N, K], W8A8 [N, K]
  mgpu_w8a8     pallas_kernels/fp8_skinny_mgpu.py (Mosaic GPU: TMA, fp8 wgmma, no split-K),
                every (tile_k, steps) of its TILES at every M, and with ``oob_rows`` (rows
                read and written past M by TMA instead of padded) where M is not a multiple of 8
  mgpu_w8a16    the same kernel weight-only (x_scale None: bf16 rows, the e4m3 weight upcast
                in registers), M <= 16, at 1, 2 and 4 compute warpgroups
  mgpu_w8a16_f16  the same with float16 rows (cast before the call)
Each Pallas variant is swept over blocks and K splits at M = 16 (block of 16 rows: M = 1..16
time the same) and, for W8A8 and bf16, M = 64; the best config is then timed at the other M.
GPU time from the profiler (``benchmarks/gpu_trace.device_time``: the union of the call's
kernels, the split-K sum included); weights rotated over copies that overflow the L2.

    python3 benchmarks/gpu/skinny_gemm.py [--out FILE] [--budget S] [--shapes qkv,o,gate_up,down]
"""
import argparse
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import gpu_trace  # noqa: E402
from pallas_kernels.fp8_matmul import (FP8, fp8_matmul_xla,  # noqa: E402
                                       quantize_activation_per_token,
                                       quantize_weight_per_channel)
from pallas_kernels.skinny_matmul import (skinny_fits, skinny_matmul,  # noqa: E402
                                          skinny_matmul_reference)
from pallas_kernels import fp8_skinny_mgpu  # noqa: E402

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
          "down": (14336, 4096)}
L2 = 50e6
SMOKE = False
PEAK_BW = 4.3e12


def _skinny(*a, **k):
    return skinny_matmul(*a, interpret=SMOKE, **k)


def configs(K, N, w_itemsize):
    bks = (128, 256) if w_itemsize == 2 else (256, 512)
    out = []
    for bn in (16, 32, 64, 128):
        for bk in bks:
            for split in (1, 2, 4, 8):
                progs = N // bn * split
                # One wave of whole-K programs (split 1) is also tried: no partial sums.
                lo = 128 if split == 1 else 256
                if K % (bk * split) or not (SMOKE or lo <= progs <= 1600):
                    continue
                out.append(dict(block_n=bn, block_k=bk, split_k=split, num_warps=4,
                                num_stages=4))
    return out


def refine(cfg):
    return [dict(cfg, num_stages=3), dict(cfg, num_stages=6), dict(cfg, num_warps=8),
            dict(cfg, num_warps=2)]


def rel_err(out, ref):
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the sweeps")
    ap.add_argument("--shapes", default="qkv,o,gate_up,down")
    ap.add_argument("--impls", default="pallas_bf16,pallas_w8a16,pallas_w8a8",
                    help="the Pallas variants to sweep")
    ap.add_argument("--ms", default="16,64,1,8", help="rows; 16 and 64 are swept, others reuse")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    ap.add_argument("--mgpu-tiles", default=None,
                    help="the Mosaic kernel's (tile_k,steps) to sweep, e.g. '512,3;256,6' "
                         "(default: all of its TILES)")
    args = ap.parse_args()
    global SMOKE
    SMOKE = args.smoke
    if SMOKE:
        SHAPES.update(qkv=(512, 384), o=(512, 256))
        args.shapes = "qkv,o"
    t0 = time.time()
    rows = []

    def emit(rec):
        rows.append(rec)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in rec.items()), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def case(name, M, K, N, impl, cfg, fn, sets, ref, wbytes):
        rec = dict(shape=name, M=M, K=K, N=N, impl=impl, config=cfg)
        try:
            out = jax.block_until_ready(fn(*sets[0]))
            rec["rel_err"] = rel_err(out, ref)
            rec["ok"] = rec["rel_err"] < 2e-2
            dev = gpu_trace.device_time(fn, sets, calls=20) if not SMOKE else None
            # The same inputs after the timed calls give the same bits (a kernel that reads what
            # another program has not yet written would not).
            rec["repeat_equal"] = bool(jnp.array_equal(fn(*sets[0]), out))
            rec["ok"] = rec["ok"] and rec["repeat_equal"]
            if dev is None:  # no GPU in the trace (--smoke on the CPU): host wall time
                t = time.perf_counter()
                jax.block_until_ready([fn(*s) for s in sets])
                dev = dict(device_us=(time.perf_counter() - t) / len(sets) * 1e6)
            rec.update(dev)
            rec["weight_TBps"] = wbytes / (dev["device_us"] * 1e-6) / 1e12
        except Exception as e:  # noqa: BLE001 - a failing config must not stop the sweep
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        emit(rec)
        return rec

    mgpu_tiles = (fp8_skinny_mgpu.TILES if args.mgpu_tiles is None else
                  [tuple(int(v) for v in t.split(",")) for t in args.mgpu_tiles.split(";")])
    for name in args.shapes.split(","):
        K, N = SHAPES[name]
        key = jax.random.key(K * 7 + N)
        w = jax.random.normal(key, (K, N), jnp.float32) * 0.02
        n16 = max(1, min(8, math.ceil(3 * L2 / (K * N * 2))))
        n8 = max(1, min(8, math.ceil(3 * L2 / (K * N))))
        wb = [(w * (1 + 0.01 * i)).astype(jnp.bfloat16) for i in range(n16)]
        wq = []
        for i in range(n8):
            q, s = quantize_weight_per_channel(w * (1 + 0.01 * i))
            wq.append((jnp.asarray(q.T), s))  # [N, K]
        del w
        xla_bf16 = jax.jit(lambda x, w: jnp.dot(x, w))
        xla_w8a16 = jax.jit(lambda x, w, s: (jax.lax.dot_general(
            x, w.astype(x.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            * s[None, :]).astype(x.dtype))
        # The same with float16 operands: e4m3 -> float16 is one instruction a pair on Hopper,
        # e4m3 -> bf16 takes more (measured no faster, RESULTS "Rerun of 2026-12-02 (12:20)").
        xla_w8a16_f16 = jax.jit(lambda x, w, s: (jax.lax.dot_general(
            jnp.clip(x.astype(jnp.float32), -65504, 65504).astype(jnp.float16),
            w.astype(jnp.float16), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            * s[None, :]).astype(x.dtype))
        xla_fp8 = jax.jit(lambda xq, xs, w, s: fp8_matmul_xla(xq, xs, w, s, w_transposed=True,
                                                              acc_dtype=jnp.bfloat16))
        best = {}
        for M in [int(m) for m in args.ms.split(",")]:
            x = jax.random.normal(jax.random.key(M), (M, K), jnp.bfloat16)
            xq, xs = quantize_activation_per_token(x)
            ref_b = skinny_matmul_reference(x, wb[0], w_layout="kn")
            ref_w = skinny_matmul_reference(x, wq[0][0], wq[0][1])
            ref_8 = skinny_matmul_reference(xq, wq[0][0], wq[0][1], xs)
            sets_b = [(x, wi) for wi in wb]
            sets_w = [(x, q, s) for q, s in wq]
            sets_8 = [(xq, xs, q, s) for q, s in wq]
            base = {}
            base["xla_bf16"] = case(name, M, K, N, "xla_bf16", "", xla_bf16, sets_b, ref_b,
                                    K * N * 2)
            base["xla_w8a16"] = case(name, M, K, N, "xla_w8a16", "", xla_w8a16, sets_w, ref_w,
                                     K * N)
            base["xla_w8a16_f16"] = case(name, M, K, N, "xla_w8a16_f16", "", xla_w8a16_f16,
                                         sets_w, ref_w, K * N)
            base["xla_fp8"] = case(name, M, K, N, "xla_fp8", "", xla_fp8, sets_8, ref_8, K * N)
            variants = {
                "pallas_bf16": (lambda cfg: (lambda x, w: _skinny(x, w, w_layout="kn",
                                                                         **cfg)),
                                sets_b, ref_b, 2),
                "pallas_w8a16": (lambda cfg: (lambda x, q, s: _skinny(x, q, s, **cfg)),
                                 sets_w, ref_w, 1),
                "pallas_w8a8": (lambda cfg: (lambda xq, xs, q, s: _skinny(xq, q, s, xs,
                                                                                 **cfg)),
                                sets_8, ref_8, 1),
            }

            def mgpu_sweep(impl, cands, weight_only, sets, ref):
                """The Mosaic kernel at every tile in ``cands``; its best row emitted."""
                recs = [case(name, M, K, N, impl, c, jax.jit(
                    lambda x, *a, c=c: fp8_skinny_mgpu.fp8_skinny_matmul_mgpu(
                        x, *((None,) + a if weight_only else a), interpret=SMOKE, **c)),
                    sets, ref, K * N) for c in cands]
                good = [r for r in recs if r.get("ok")]
                if good:
                    top = min(good, key=lambda r: r["device_us"])
                    emit(dict(shape=name, M=M, impl=impl, best=top["config"],
                              device_us=top["device_us"],
                              vs_xla_bf16=base["xla_bf16"].get("device_us", float("nan"))
                              / top["device_us"]))

            tiles = [dict(tile_k=tk, steps=st) for tk, st in mgpu_tiles if K % tk == 0]
            if "mgpu_w8a8" in args.impls.split(","):
                oob = [dict(c, oob_rows=True) for c in tiles] if M % 8 else []
                mgpu_sweep("mgpu_w8a8", tiles + oob, False, sets_8, ref_8)
            # The weight-only form at 1 and 2 compute warpgroups (each takes its share of a
            # step's 128-wide chunks), with bf16 rows and with float16 rows (one e4m3 ->
            # float16 instruction a pair; the rows cast before the timed call).
            wo = [dict(c, compute_wgs=g) for c in tiles for g in (1, 2)
                  if (c["tile_k"] // 128) % g == 0]
            if "mgpu_w8a16" in args.impls.split(",") and M <= 16:
                mgpu_sweep("mgpu_w8a16", wo, True, sets_w, ref_w)
            # W8A8 with the bf16 rows quantized inside the kernel (quantize_x: per token and
            # tile_k block), against its own reference (that quantization outside, fp32).
            if "mgpu_w8a8_qx" in args.impls.split(","):
                for c in tiles:
                    ref_q = fp8_skinny_mgpu.quantize_x_reference(
                        x, wq[0][0], wq[0][1], c["tile_k"], jnp.float32)
                    mgpu_sweep("mgpu_w8a8_qx", [dict(c, quantize_x=True)], True, sets_w,
                               ref_q)
            if "mgpu_w8a16_f16" in args.impls.split(",") and M <= 16:
                sets_h = [(x.astype(jnp.float16), q, s) for q, s in wq]
                mgpu_sweep("mgpu_w8a16_f16", wo, True, sets_h, ref_w)
            for impl, (mk, sets, ref, itemsize) in variants.items():
                if impl not in args.impls.split(","):
                    continue
                cls = 16 if M <= 16 else 64
                if M in (16, 64):
                    if M == 64 and impl == "pallas_w8a16":
                        continue
                    if time.time() - t0 > args.budget:
                        cands = configs(K, N, itemsize)[:2]
                    else:
                        cands = configs(K, N, itemsize)
                    recs = [case(name, M, K, N, impl, c, mk(c), sets, ref, K * N * itemsize)
                            for c in cands if skinny_fits(M, K, N, **{k: c[k] for k in (
                                "block_n", "block_k", "split_k")})]
                    good = [r for r in recs if r.get("ok")]
                    if not good:
                        continue
                    top = min(good, key=lambda r: r["device_us"])
                    if time.time() - t0 < args.budget:
                        recs = [case(name, M, K, N, impl, c, mk(c), sets, ref, K * N * itemsize)
                                for c in refine(top["config"])]
                        good += [r for r in recs if r.get("ok")]
                        top = min(good, key=lambda r: r["device_us"])
                    best[(impl, cls)] = top["config"]
                    emit(dict(shape=name, M=M, impl=impl, best=top["config"],
                              device_us=top["device_us"],
                              vs_xla_bf16=base["xla_bf16"].get("device_us", float("nan"))
                              / top["device_us"]))
                elif (impl, cls) in best:
                    c = best[(impl, cls)]
                    r = case(name, M, K, N, impl, c, mk(c), sets, ref, K * N * itemsize)
                    if "device_us" in r:
                        emit(dict(shape=name, M=M, impl=impl, best=c, device_us=r["device_us"],
                                  vs_xla_bf16=base["xla_bf16"].get("device_us", float("nan"))
                                  / r["device_us"]))
        del wb, wq
    # Summary: best device time per (shape, M, impl); speed-up over XLA bf16.
    print("\n== summary: device us (weight TB/s), speed-up over xla_bf16 ==")
    impls = ["xla_bf16", "xla_w8a16", "xla_w8a16_f16", "xla_fp8", "pallas_bf16", "pallas_w8a16",
             "pallas_w8a8", "mgpu_w8a8", "mgpu_w8a8_qx", "mgpu_w8a16", "mgpu_w8a16_f16"]
    print("shape M " + " ".join(impls))
    table = {}
    for r in rows:
        if "device_us" in r and r.get("ok") and "impl" in r and "best" not in r:
            k = (r["shape"], r["M"], r["impl"])
            if k not in table or r["device_us"] < table[k]["device_us"]:
                table[k] = r
    for name in args.shapes.split(","):
        for M in (1, 8, 16, 64):
            b = table.get((name, M, "xla_bf16"))
            cells = []
            for impl in impls:
                r = table.get((name, M, impl))
                if r is None:
                    cells.append("-")
                    continue
                sp = b["device_us"] / r["device_us"] if b else float("nan")
                cells.append(f"{r['device_us']:.1f}({r['weight_TBps']:.2f},{sp:.2f}x)")
            print(f"{name} {M} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
