"""The residual GEMM (skinny_matmul's residual epilogue) against XLA's GEMM + add, in layer chains.

A decoder layer's o and down projections end in ``x = x + h @ W``. At a decode step's 8-row
bucket XLA runs that as a split-K GEMM and a second kernel that sums the partials and adds x;
``pallas_kernels.skinny_matmul(h, W, residual=x)`` does it in one kernel of whole-K programs
(slower than XLA's GEMM + add on H200, RESULTS.md 2026-12-03 06:30 rerun: not called by the
engine). Each variant runs as a chain of L projections in one jitted program
(``x = x + h @ W_l``, a distinct weight per layer, so every layer reads its weight from memory,
not the L2), as the engine's step does under command buffers. Per-layer time: GPU time from the
profiler (``benchmarks/gpu_trace.py``: the union of the chain's GPU ops over ``--repeats``
calls, no host gaps) over L, with the GPU ops per layer.

First a correctness check of every timed Pallas config against ``skinny_matmul_reference``
(relative error of the chain's output against XLA's chain), then a block sweep at 8 rows per
shape (the table's entry first), then both shapes at 1 and 8 rows: XLA and the best config,
two rounds. Rows to ``--out`` (JSON lines).

    python3 benchmarks/gpu/residual_gemm.py [--out FILE] [--shapes o,down] [--budget S]
        [--cands '[[32, 256, 4, 4]]']
"""
import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import gpu_trace  # noqa: E402
from pallas_kernels.skinny_matmul import (RESIDUAL_GEMM_BLOCKS, skinny_matmul,  # noqa: E402
                                          skinny_matmul_reference)

SHAPES = {"o": (4096, 4096), "down": (14336, 4096)}
PEAK_BW = 4.3e12
INTERPRET = False  # --smoke: tiny shapes in interpret mode (a CPU check of the script)


def xla_step(x, h, w):
    return x + jnp.dot(h, w)


def pallas_step(cfg):
    bn, bk, warps, stages = cfg

    def step(x, h, w):
        return skinny_matmul(h, w, residual=x, w_layout="kn", split_k=1, block_n=bn,
                             block_k=bk, num_warps=warps, num_stages=stages,
                             interpret=INTERPRET)
    return step


def per_layer(step, x, h, ws, repeats):
    """(µs a layer, GPU ops a layer): the chain's GPU time over ``repeats`` calls / layers; on a
    platform without GPU ops in its trace, host wall time (no ops count)."""
    fn = gpu_trace.layer_chain(step)
    if not INTERPRET:
        dev = gpu_trace.device_time(fn, [(x, h, ws)], calls=repeats)
        if dev is not None:
            return dev["device_us"] / len(ws), dev["ops_per_call"] / len(ws)
    jax.block_until_ready(fn(x, h, ws))
    t = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(x, h, ws))
    return (time.perf_counter() - t) / repeats / len(ws) * 1e6, None


def candidates(K, N):
    """The table's entry first, then one wave or more of whole-K programs (N / block_n >= 64)."""
    out = [tuple(RESIDUAL_GEMM_BLOCKS)]
    for bn in (32, 16, 64):
        for bk in (256, 512, 128):
            for st in (4, 3, 5):
                for warps in (4, 8):
                    c = (bn, bk, warps, st)
                    if c not in out and N % bn == 0 and K % bk == 0 and N // bn >= 64:
                        out.append(c)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default="o,down")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=360, help="seconds for the sweeps")
    ap.add_argument("--cands", default=None,
                    help="JSON list of [block_n, block_k, num_warps, num_stages]: sweep these")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    global INTERPRET
    if a.smoke:
        INTERPRET = True
        SHAPES.update(o=(256, 128), down=(512, 128))
        a.layers, a.repeats = 2, 1
    t0 = time.time()
    rows = []

    emit = gpu_trace.jsonl_emitter(rows, a.out)

    for name in a.shapes.split(","):
        K, N = SHAPES[name]
        ws = [(0.02 * jax.random.normal(jax.random.PRNGKey(10 + i), (K, N))).astype(jnp.bfloat16)
              for i in range(a.layers)]
        wbytes = K * N * 2

        def inputs(M):
            x = jax.random.normal(jax.random.PRNGKey(M), (M, N)).astype(jnp.bfloat16)
            h = jax.random.normal(jax.random.PRNGKey(M + 1), (M, K)).astype(jnp.bfloat16)
            return x, h

        x8, h8 = inputs(8)
        ref = skinny_matmul_reference(h8, ws[0], w_layout="kn", residual=x8).astype(jnp.float32)
        cx = gpu_trace.layer_chain(xla_step)(x8, h8, ws).astype(jnp.float32)

        def check(cfg):
            """Relative error of one step against the reference, and of the chain against
            XLA's chain (the layers' roundings agree but for ulps)."""
            got = pallas_step(cfg)(x8, h8, ws[0]).astype(jnp.float32)
            rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
            cp = gpu_trace.layer_chain(pallas_step(cfg))(x8, h8, ws).astype(jnp.float32)
            return rel, float(jnp.linalg.norm(cp - cx) / jnp.linalg.norm(cx))

        cands = [tuple(c) for c in json.loads(a.cands)] if a.cands else candidates(K, N)
        scored = []
        for i, cfg in enumerate(cands):
            if i and time.time() - t0 > a.budget * (0.4 if name == "o" else 0.8):
                break
            try:
                rel, chain_rel = check(cfg)
                us, ops = per_layer(pallas_step(cfg), x8, h8, ws, 3)
            except Exception as e:  # noqa: BLE001 (a config Triton cannot build)
                emit(dict(shape=name, sweep=cfg, error=f"{type(e).__name__}: {str(e)[:200]}"))
                continue
            ok = rel < 1e-2 and chain_rel < 2e-2
            emit(dict(shape=name, M=8, sweep=cfg, us=round(us, 2), rel=rel,
                      chain_rel=chain_rel, ok=ok))
            if ok:
                scored.append((us, cfg))
        if not scored:
            continue
        best = min(scored)[1]
        for rnd in range(2):
            for M in (1, 8):
                x, h = inputs(M)
                for variant, step in (("xla", xla_step), ("pallas", pallas_step(best))):
                    us, ops = per_layer(step, x, h, ws, a.repeats)
                    emit(dict(shape=name, K=K, N=N, M=M, variant=variant, round=rnd,
                              config=best if variant == "pallas" else None,
                              us_per_layer=round(us, 2), ops_per_layer=ops,
                              tb_s=round(wbytes / (us * 1e-6) / 1e12, 2),
                              floor_us=round(wbytes / PEAK_BW * 1e6, 2)))
    print("\n| shape | M | variant | config | µs / layer (rounds) | GPU ops / layer | TB/s |")
    print("|---|---:|---|---|---|---:|---:|")
    for (name, M, v), rs in gpu_trace.rounds_by(rows, "shape", "M", "variant").items():
        print(f"| {name} | {M} | {v} | {rs[-1]['config'] or ''} | "
              f"{', '.join(str(r['us_per_layer']) for r in rs)} | {rs[-1]['ops_per_layer']} | "
              f"{rs[-1]['tb_s']} |")


if __name__ == "__main__":
    main()
