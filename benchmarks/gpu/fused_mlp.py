"""The one-kernel decode MLP (pallas_kernels/fused_mlp.py) against XLA's five kernels.

Llama-3-8B MLP (H 4096, F 14336) at a decode step's 8-row bucket, bf16 and fp8. Each variant
runs as a chain of L layers in one jitted program (x = x + MLP_l(x), a distinct weight copy per
layer, so every layer reads its weights from memory, not the L2), as the engine's step does
under command buffers. Per-layer time: GPU time from the profiler (``benchmarks/gpu_trace.py``: the union of
the chain's GPU ops over ``--repeats`` calls, no host gaps) divided by the layers (``--hi``).

  xla        the engine's MLP at <= 16 rows: RMSNorm, the fused gate/up GEMM (bf16, or fp8
             weight-only: the e4m3 weight upcast inside the dot, per-channel scale after),
             SwiGLU, down, residual add
  gate_up_swiglu+xla_down  the engine's ``mlp_kernel``: norm, gate/up and SwiGLU in one kernel,
             then XLA's down GEMM and add; ``_wo_<dtype>`` (fp8, ``--weight-only``): its
             weight-only mode (the e4m3 tile upcast to bf16 / float16; slower than W8A8 on
             H200, RESULTS.md 2026-12-03 06:30 rerun: not called by the engine)
  fused_*    the kernel (norm, gate/up, SwiGLU, down in one), then the residual add;
             ``atomic`` with n_valid = 1 (batch 1 in the 8-row bucket) and 8, and ``partials``

First a correctness check on the GPU (each variant against ``fused_mlp_reference``), then a
block sweep of the atomic kernel at n_valid = 1, then the table. Rows to ``--out`` (JSON lines).

    python3 benchmarks/gpu/fused_mlp.py [--out FILE] [--dtypes bf16,fp8] [--budget S]
        [--cands '[{"block_f": 128, "block_k": 64, "num_warps": 4, "num_stages": 5}]']
"""
import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import gpu_trace  # noqa: E402
from pallas_kernels.fp8_matmul import quantize_weight_per_channel  # noqa: E402
from pallas_kernels.fused_mlp import (fused_mlp, fused_mlp_reference,  # noqa: E402
                                      gate_up_swiglu, gate_up_swiglu_reference)

H, F, M, EPS = 4096, 14336, 8, 1e-5
PEAK_BW = 4.3e12
INTERPRET = False  # --smoke: tiny shapes in interpret mode (a CPU check of the script)


def make_layer(key, fp8):
    k = jax.random.split(key, 3)
    g = (1 + 0.1 * jax.random.normal(k[0], (H,))).astype(jnp.bfloat16)
    wgu = (0.02 * jax.random.normal(k[1], (H, 2 * F))).astype(jnp.bfloat16)
    wd = (0.02 * jax.random.normal(k[2], (F, H))).astype(jnp.bfloat16)
    if not fp8:
        return dict(g=g, wgu=wgu, wd=wd)
    q, s = quantize_weight_per_channel(wgu)
    qd, sd = quantize_weight_per_channel(wd)
    return dict(g=g, wgu=q.T.copy(), wd=qd.T.copy(), gus=s, ds=sd)


def xla_mlp(x, p):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + EPS)
    n = p["g"] * xf.astype(x.dtype)
    if "gus" in p:
        def lin(a, w, s):
            acc = jax.lax.dot_general(a, w.astype(a.dtype), (((1,), (1,)), ((), ())),
                                      preferred_element_type=jnp.float32)
            return (acc * s[None, :]).astype(a.dtype)
        gu = lin(n, p["wgu"], p["gus"]).reshape(M, F, 2)
        return lin(jax.nn.silu(gu[..., 0]) * gu[..., 1], p["wd"], p["ds"])
    gu = jnp.dot(n, p["wgu"]).reshape(M, F, 2)
    return jnp.dot(jax.nn.silu(gu[..., 0]) * gu[..., 1], p["wd"])


def xla_down(h, p):
    if "gus" in p:
        acc = jax.lax.dot_general(h, p["wd"].astype(h.dtype), (((1,), (1,)), ((), ())),
                                  preferred_element_type=jnp.float32)
        return (acc * p["ds"][None, :]).astype(h.dtype)
    return jnp.dot(h, p["wd"])


def half(x, p, **kw):
    """Our gate/up + SwiGLU kernel (the norm folded in), then XLA's down GEMM."""
    h = gate_up_swiglu(x, p["g"], p["wgu"], p.get("gus"), eps=EPS, interpret=INTERPRET, **kw)
    return xla_down(h, p)


def fused(x, p, nv, **kw):
    return fused_mlp(x, p["g"], p["wgu"], p["wd"], p.get("gus"), p.get("ds"), n_valid=nv,
                     eps=EPS, interpret=INTERPRET, **kw).astype(x.dtype)


def chain(fn, layers):
    def run(x, ps):
        for p in ps:
            x = x + fn(x, p)
        return x
    return jax.jit(run)


def wall(f, *args, repeats):
    out = f(*args)
    out.block_until_ready()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(*args).block_until_ready()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def per_layer_us(fn, layers, x, lo, hi, repeats):
    """GPU time a layer: the profiler's union of the chain's GPU ops (no host gaps) over
    ``repeats`` calls of the ``hi``-layer chain, divided by ``hi``; on a platform without GPU
    ops in its trace, the wall-time difference of the ``hi`` and ``lo`` chains instead."""
    if not INTERPRET:
        dev = gpu_trace.device_time(chain(fn, layers[:hi]), [(x, layers[:hi])],
                                    calls=repeats)
        if dev is not None:
            return dev["device_us"] / hi, dev["ops_per_call"] / hi
    t_lo = wall(chain(fn, layers[:lo]), x, layers[:lo], repeats=repeats)
    t_hi = wall(chain(fn, layers[:hi]), x, layers[:hi], repeats=repeats)
    return (t_hi - t_lo) / (hi - lo) * 1e6, None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--dtypes", default="bf16,fp8")
    ap.add_argument("--lo", type=int, default=4)
    ap.add_argument("--hi", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=400)
    ap.add_argument("--sweep", type=int, default=1)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--weight-only", default="",
                    help="fp8: also sweep and time gate_up_swiglu's weight-only modes, e.g. "
                         "bfloat16,float16")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds of the variants' table (default 2; 0 with --cands)")
    ap.add_argument("--cands", default=None,
                    help="JSON list of gate_up_swiglu block dicts: sweep only these (no table)")
    a = ap.parse_args()
    if a.smoke:
        global H, F, INTERPRET
        H, F, INTERPRET = 256, 512, True
        a.lo, a.hi, a.repeats = 1, 2, 1
    t0 = time.time()
    rows = []

    emit = gpu_trace.jsonl_emitter(rows, a.out)

    x = jax.random.normal(jax.random.PRNGKey(7), (M, H), jnp.float32).astype(jnp.bfloat16)
    for dt in a.dtypes.split(","):
        fp8 = dt == "fp8"
        layers = [make_layer(jax.random.PRNGKey(100 + i), fp8) for i in range(a.hi)]
        wbytes = sum(v.size * v.dtype.itemsize for k, v in layers[0].items()
                     if k in ("wgu", "wd"))
        # Correctness on the GPU, layer 0, both accumulations and n_valid 1 / 8.
        p = layers[0]
        ref = fused_mlp_reference(x, p["g"], p["wgu"], p["wd"], p.get("gus"), p.get("ds"),
                                  eps=EPS)
        xr = xla_mlp(x, p).astype(jnp.float32)
        emit(dict(dtype=dt, check="xla_vs_ref",
                  rel=float(jnp.linalg.norm(xr - ref) / jnp.linalg.norm(ref))))
        for acc, nv in () if a.cands else (("atomic", 1), ("atomic", 8), ("partials", 8)):
            out = fused_mlp(x, p["g"], p["wgu"], p["wd"], p.get("gus"), p.get("ds"),
                            n_valid=nv, eps=EPS, accumulate=acc, interpret=INTERPRET)
            rel = float(jnp.linalg.norm(out[:nv] - ref[:nv]) / jnp.linalg.norm(ref[:nv]))
            zero = float(jnp.abs(out[nv:]).max()) if nv < M else 0.0
            emit(dict(dtype=dt, check=f"{acc}_nv{nv}", rel=rel, rows_past_nv_max=zero))
        hr = gate_up_swiglu_reference(x, p["g"], p["wgu"], p.get("gus"), eps=EPS)
        hk = gate_up_swiglu(x, p["g"], p["wgu"], p.get("gus"), eps=EPS, interpret=INTERPRET)
        emit(dict(dtype=dt, check="gate_up_swiglu",
                  rel=float(jnp.linalg.norm(hk.astype(jnp.float32) - hr) / jnp.linalg.norm(hr))))
        for wo in a.weight_only.split(",") if fp8 and a.weight_only else ():
            hr = gate_up_swiglu_reference(x, p["g"], p["wgu"], p["gus"], eps=EPS, weight_only=wo)
            hk = gate_up_swiglu(x, p["g"], p["wgu"], p["gus"], eps=EPS, interpret=INTERPRET,
                                weight_only=wo).astype(jnp.float32)
            emit(dict(dtype=dt, check=f"gate_up_swiglu_wo_{wo}",
                      rel=float(jnp.linalg.norm(hk - hr) / jnp.linalg.norm(hr))))
        # The fused kernel's best blocks of the 2026-12-03 sweep (atomic, n_valid 1).
        best = (dict(block_f=64, block_k=256, block_n=256, num_warps=4, num_stages=3) if fp8
                else dict(block_f=128, block_k=64, block_n=256, num_warps=4, num_stages=3))
        if a.smoke:
            best = dict(block_f=64, block_k=64, block_n=128, num_warps=4, num_stages=2)
        # Block sweep of the gate/up + SwiGLU kernel.
        hbest = dict(block_f=64, block_k=128 if not a.smoke else 64, num_warps=4, num_stages=3)
        if a.sweep:
            bks = (128, 256, 512) if fp8 else (64, 128, 256)
            cands = [dict(block_f=bf, block_k=bk, num_warps=w, num_stages=st)
                     for bf in (64, 32, 128, 16) for bk in bks for w in (4, 8) for st in (3, 4)]
            if a.smoke:
                cands = [hbest]
            if a.cands:
                cands = json.loads(a.cands)
            if fp8 and a.weight_only:  # the same tiles in each weight-only mode
                cands += [dict(c, weight_only=wo) for wo in a.weight_only.split(",")
                          for c in cands if "weight_only" not in c]
            scored = []
            for c in cands:
                if time.time() - t0 > a.budget * (0.4 if dt == "bf16" else 0.8):
                    break
                try:
                    us, _ = per_layer_us(lambda x, p: half(x, p, **c), layers, x,
                                         a.lo // 2, a.hi // 2, 3)
                except Exception as e:  # noqa: BLE001 (a config Triton cannot build)
                    emit(dict(dtype=dt, sweep=c, error=str(e)[:200]))
                    continue
                scored.append((us, c))
                emit(dict(dtype=dt, sweep=c, us=round(us, 2)))
            by_mode = {}
            for us, c in scored:
                wo = c.get("weight_only")
                if wo not in by_mode or us < by_mode[wo][0]:
                    by_mode[wo] = (us, c)
            if None in by_mode:
                hbest = by_mode.pop(None)[1]
            wbest = {wo: c for wo, (_, c) in by_mode.items()}
        else:
            wbest = {}
        # name -> (one layer's MLP, the blocks it runs with)
        variants = {"xla": (xla_mlp, None),
                    "gate_up_swiglu+xla_down": (lambda x, p: half(x, p, **hbest), hbest),
                    **{f"gate_up_swiglu_wo_{wo}+xla_down":
                       ((lambda c: lambda x, p: half(x, p, **c))(c), c)
                       for wo, c in wbest.items()},
                    "fused_atomic_nv1": (lambda x, p: fused(x, p, 1, **best), best),
                    "fused_atomic_nv8": (lambda x, p: fused(x, p, 8, **best), best),
                    "fused_partials": (lambda x, p: fused(x, p, 8, accumulate="partials",
                                                          **best), best)}
        rounds = a.rounds if a.rounds is not None else (0 if a.cands else 2)
        for rnd in range(rounds):
            for name, (fn, cfg) in variants.items():
                us, ops = per_layer_us(fn, layers, x, a.lo, a.hi, a.repeats)
                emit(dict(dtype=dt, variant=name, round=rnd, config=cfg,
                          us_per_layer=round(us, 2),
                          ops_per_layer=ops,
                          weight_mb=round(wbytes / 1e6, 1),
                          tb_s=round(wbytes / (us * 1e-6) / 1e12, 2),
                          floor_us=round(wbytes / PEAK_BW * 1e6, 2)))
    print("\n| dtype | variant | µs / layer (round 0, 1) | TB/s | floor µs at 4.3 TB/s |")
    print("|---|---|---|---:|---:|")
    for (dt, v), rs in gpu_trace.rounds_by(rows, "dtype", "variant").items():
        print(f"| {dt} | {v} | {', '.join(str(r['us_per_layer']) for r in rs)} | "
              f"{rs[-1]['tb_s']} | {rs[-1]['floor_us']} |")


if __name__ == "__main__":
    main()
