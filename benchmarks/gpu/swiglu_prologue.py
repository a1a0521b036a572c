"""Does XLA fold the MLP's SwiGLU into the down GEMM at decode shapes? (issue 9, batch 1)

The batch-1 step runs the SwiGLU (silu(gate) * up, on the fused gate/up GEMM's [T, F, 2]
output) as a kernel of its own before the down GEMM (~1.6 us a layer on the H200). XLA's
Triton GEMM fusion can take elementwise producers into a dot's operand; this script compiles
the SwiGLU + down GEMM at T rows in several spellings and prints, for each, the kernels of the
optimized HLO (fusions and custom calls) and the mean time of a call over many calls (async
dispatch: GPU-bound at these sizes). Spellings: jax.nn.silu (logistic) or x / (1 + exp(-x)),
over the interleaved [T, F, 2] layout (the engine's) or a concatenated [T, 2, F] one.

    python3 benchmarks/gpu/swiglu_prologue.py [--rows 8] [--calls 400]
"""

from __future__ import annotations

import argparse
import re
import time

import jax
import jax.numpy as jnp


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
    a = p.parse_args()
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


if __name__ == "__main__":
    main()
