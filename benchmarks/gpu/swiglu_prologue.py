"""Does XLA fold the MLP's SwiGLU into the down GEMM at decode shapes? (issue 9, batch 1)

The batch-1 step runs the SwiGLU (silu(gate) * up, on the fused gate/up GEMM's [T, F, 2]
output) as a kernel of its own before the down GEMM (~1.6 us a layer on the H200). XLA's
Triton GEMM fusion can take elementwise producers into a dot's operand; this script compiles
the SwiGLU + down GEMM at T rows in several spellings and prints, for each, the kernels of the
optimized HLO (fusions and custom calls) and the mean time of a call over many calls (async
dispatch: GPU-bound at these sizes). Spellings: jax.nn.silu (logistic) or x / (1 + exp(-x)),
over the interleaved [T, F, 2] layout (the engine's) or a concatenated [T, 2, F] one.

``--pallas``: instead, GPU time (profiler; weights rotated over copies that overflow the L2) of
the engine's chain (XLA: SwiGLU kernel, down GEMM with its split-K, residual add) against
``skinny_matmul(..., prologue="swiglu")`` (the SwiGLU built inside the GEMM's tiles, its split-K
partials summed into the residual add by XLA) over a sweep of its blocks and splits.

    python3 benchmarks/gpu/swiglu_prologue.py [--rows 8] [--calls 400] [--pallas] [--out F]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")


def swiglu(gu, *, layout, act):
    g, u = (gu[..., 0], gu[..., 1]) if layout == "interleaved" else (gu[:, 0], gu[:, 1])
    if act == "logistic":
        return jax.nn.silu(g) * u
    gf = g.astype(jnp.float32)
    return (gf / (1.0 + jnp.exp(-gf)) * u.astype(jnp.float32)).astype(g.dtype)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--pallas", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--interpret", action="store_true", help="CPU smoke run (host wall time)")
    a = p.parse_args()
    if a.pallas:
        return pallas_sweep(a)
    T, E, F = a.rows, a.hidden, a.inter
    key = jax.random.PRNGKey(0)
    w = jax.random.normal(key, (F, E), jnp.bfloat16) * 0.02
    res = jax.random.normal(key, (T, E), jnp.bfloat16)
    ref = None
    print(f"rows {T}, down {F} x {E} bf16, {a.calls} calls")
    for layout in ("interleaved", "concat"):
        shape = (T, F, 2) if layout == "interleaved" else (T, 2, F)
        gu = jax.random.normal(jax.random.PRNGKey(1), shape, jnp.bfloat16)
        for act in ("logistic", "exp"):
            def f(gu, w, res, layout=layout, act=act):
                return res + jnp.dot(swiglu(gu, layout=layout, act=act), w,
                                     preferred_element_type=jnp.float32).astype(jnp.bfloat16)
            fj = jax.jit(f)
            hlo = fj.lower(gu, w, res).compile().as_text()
            entry = hlo[hlo.index("ENTRY"):]
            kernels = re.findall(r"= \S+ (fusion|custom-call)\(.*?calls=(%?[\w.-]+)", entry)
            names = [c for _, c in kernels]
            out = fj(gu, w, res).block_until_ready()
            if layout == "interleaved" and act == "logistic":
                ref = out
            gu_ref = gu if layout == "interleaved" else jnp.moveaxis(gu, 1, 2)
            want = res + jnp.dot(jax.nn.silu(gu_ref[..., 0]) * gu_ref[..., 1], w,
                                 preferred_element_type=jnp.float32).astype(jnp.bfloat16)
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - want.astype(jnp.float32))))
            for _ in range(20):
                fj(gu, w, res)
            jax.block_until_ready(fj(gu, w, res))
            t0 = time.perf_counter()
            for _ in range(a.calls):
                o = fj(gu, w, res)
            o.block_until_ready()
            us = (time.perf_counter() - t0) / a.calls * 1e6
            dot_fusions = [n for n in names if "gemm" in n or "dot" in n or "triton" in n]
            print(f"{layout:12s} {act:9s} {us:7.2f} us/call  {len(names)} kernels {names}  "
                  f"max|err| {err:.3g}")
            fused = re.search(r"%" + re.escape(dot_fusions[0].lstrip("%")) + r".*?\n}\n",
                              hlo[:hlo.index("ENTRY")], re.S) if dot_fusions else None
            if fused:
                ops = re.findall(r"= \S+ (\w+)\(", fused.group(0))
                print("   dot fusion ops:", sorted(set(ops)))


def pallas_sweep(a):
    import gpu_trace
    from pallas_kernels.skinny_matmul import skinny_matmul

    T, E, F = a.rows, a.hidden, a.inter
    copies = 1 if a.interpret else 3  # 3 x 117 MB: past the L2
    ws = [jax.random.normal(jax.random.PRNGKey(i), (F, E), jnp.bfloat16) * 0.02
          for i in range(copies)]
    gu = jax.random.normal(jax.random.PRNGKey(9), (T, F, 2), jnp.bfloat16)
    res = jax.random.normal(jax.random.PRNGKey(8), (T, E), jnp.bfloat16)
    sets = [(gu, w, res) for w in ws]

    def xla(gu, w, res):  # the engine's LlamaMLP tail and the residual add
        return res + jnp.dot(jax.nn.silu(gu[..., 0]) * gu[..., 1], w).astype(jnp.bfloat16)

    def timed(name, fn, cfg=None):
        fn = jax.jit(fn)
        rec = dict(rows=T, K=F, N=E, impl=name, config=cfg or "")
        try:
            out = jax.block_until_ready(fn(*sets[0]))
            ref = jax.jit(xla)(*sets[0])
            o, r = np.asarray(out, np.float64), np.asarray(ref, np.float64)
            rec["rel_err_vs_xla"] = float(np.linalg.norm(o - r) / np.linalg.norm(r))
            dev = None if a.interpret else gpu_trace.device_time(fn, sets, calls=30)
            if dev is None:
                t0 = time.perf_counter()
                jax.block_until_ready([fn(*s_) for s_ in sets])
                dev = dict(device_us=(time.perf_counter() - t0) / len(sets) * 1e6)
            rec.update(dev)
        except Exception as e:  # noqa: BLE001 - a failing config must not stop the sweep
            rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(rec), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return rec

    recs = [timed("xla", xla)]
    grid = ([dict(block_n=32, block_k=64, split_k=2, num_warps=4, num_stages=2)]
            if a.interpret else
            [dict(block_n=bn, block_k=bk, split_k=sk, num_warps=nw, num_stages=st)
             for bn in (32, 64) for bk in (128, 256) for sk in (2, 4, 8) for nw in (4,)
             for st in (3, 4)])
    for cfg in grid:
        def pallas(gu, w, res, cfg=cfg):
            y = skinny_matmul(gu.reshape(T, 2 * F), w, w_layout="kn", prologue="swiglu",
                              interpret=a.interpret, **cfg)
            return res + y
        recs.append(timed("pallas_swiglu", pallas, cfg))
    good = [r for r in recs if "device_us" in r and r.get("rel_err_vs_xla", 1) < 2e-2]
    base = recs[0].get("device_us")
    for r in sorted(good, key=lambda r: r["device_us"])[:6]:
        print(f"{r['impl']:14s} {r['device_us']:8.2f} us  ops {r.get('ops_per_call', '-')}  "
              f"vs xla {base / r['device_us']:.3f}x  {r['config']}")


if __name__ == "__main__":
    main()
