"""The one-kernel fp8 decode MLP split over F (pallas_kernels/fp8_mlp_mgpu.py) against the
engine's batch-1 MLP (XLA's weight-only gate/up GEMM, SwiGLU, down GEMM).

Llama-3-8B MLP (H 4096, F 14336), e4m3 weights with per-channel scales, M token rows. Each
variant runs as a chain of L layers in one jitted program (x = x + MLP_l(x), a distinct weight
copy per layer: every layer reads its 176 MB from memory, as the engine's step does). Per-layer
time: the profiler's union of the chain's GPU ops over ``--repeats`` calls, divided by L
(``benchmarks/gpu_trace.py``), every kernel of the variant included (the zeros the kernel's
output starts from, the pad of x's rows, the output's transpose).

  xla        the engine's path at <= 16 rows (``jaxllm.models.fp8.fp8_linear`` weight-only:
             the e4m3 weight upcast inside XLA's dot, the scale after), SwiGLU, residual add
  mgpu       the kernel, the residual as its sum's start (as the engine calls it);
             ``mgpu_t``: its transposed down GEMM (``down_t``); ``mgpu{cfg}``: a config of
             the sweep (overrides of ``DEFAULT_CONFIG``)

First a correctness check on the GPU against ``fp8_mlp_reference`` (M = 1, 5 and 8; the
transposed down GEMM, ``down_t``, at 1 and 5), then the table. Rows to ``--out`` (JSON lines).

    python3 benchmarks/gpu/fp8_mlp.py [--out FILE] [--ms 1,8] [--layers 12] [--budget S]
        [--cfgs '[{"gu_steps": 4}]']
"""
import argparse
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import gpu_trace  # noqa: E402
from jaxllm.models.fp8 import fp8_linear  # noqa: E402
from pallas_kernels.fp8_mlp_mgpu import (DEFAULT_CONFIG, fp8_mlp_mgpu,  # noqa: E402
                                         fp8_mlp_reference)

H, F = 4096, 14336
BYTES = 3 * H * F  # e4m3 weight bytes a layer (gate, up, down)


def make_layer(key):
    k = jax.random.split(key, 4)
    wgu = jnp.clip(jax.random.normal(k[0], (F, 2, H)) * 64, -448, 448).astype(jnp.float8_e4m3fn)
    gus = jax.random.uniform(k[1], (F, 2), minval=0.5, maxval=1.5) / 2000
    wd = jnp.clip(jax.random.normal(k[2], (H, F)) * 64, -448, 448).astype(jnp.float8_e4m3fn)
    ds = jax.random.uniform(k[3], (H,), minval=0.5, maxval=1.5) / 2000
    # The kernel takes gate's and up's scales apart ([F] each): kept so beside the layer.
    return dict(wgu=wgu, gus=gus, wd=wd, ds=ds, gs=gus[:, 0].copy(), us=gus[:, 1].copy())


def xla_mlp(x, p):
    gu = fp8_linear(x, p["wgu"].reshape(2 * F, H), p["gus"].reshape(2 * F), None)
    gu = gu.reshape(x.shape[0], F, 2)
    return x + fp8_linear(jax.nn.silu(gu[..., 0]) * gu[..., 1], p["wd"], p["ds"], None)


def f32_mlp(x, p, init):
    """The MLP nothing quantizes but the weights: x and h in float32 (what both the kernel and
    its reference approximate; their distances to it say whether a gap between them is noise)."""
    hi = jax.lax.Precision.HIGHEST
    w = p["wgu"].astype(jnp.float32) * p["gus"][:, :, None]
    gu = jnp.einsum("mh,fch->mfc", x.astype(jnp.float32), w, precision=hi)
    h = jax.nn.silu(gu[..., 0]) * gu[..., 1]
    wd = p["wd"].astype(jnp.float32) * p["ds"][:, None]
    return init + jnp.einsum("mf,hf->mh", h, wd, precision=hi)


def mgpu_mlp(cfg, init):
    def run(x, p):
        y = fp8_mlp_mgpu(x, p["wgu"], p["gs"], p["us"], p["wd"], p["ds"],
                         x.astype(jnp.float32) if init else None, **cfg)
        return y.astype(x.dtype) if init else x + y.astype(x.dtype)
    return run


def chain(fn, n):
    def run(x, ps):
        for p in ps[:n]:
            x = fn(x, p)
        return x
    return jax.jit(run)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--ms", default="1,8")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--budget", type=float, default=400)
    ap.add_argument("--cfgs", default="[]", help="JSON list of config overrides to time too")
    ap.add_argument("--check-only", action="store_true", help="the check rows, no timing")
    args = ap.parse_args()
    t0 = time.time()
    rows = []
    emit = gpu_trace.jsonl_emitter(rows, args.out)
    dev = jax.devices()[0].device_kind
    keys = jax.random.split(jax.random.key(0), args.layers + 1)
    layers = [make_layer(k) for k in keys[:args.layers]]
    jax.block_until_ready(layers)

    # Correctness on the GPU: one layer against the reference (float32, HIGHEST).
    p = layers[0]
    for M, down_t in ((1, False), (5, False), (8, False), (1, True), (5, True)):
        x = jax.random.normal(keys[-1], (M, H), jnp.float32).astype(jnp.bfloat16)
        init = jax.random.normal(keys[-1], (M, H), jnp.float32)
        y = jax.jit(functools.partial(fp8_mlp_mgpu, down_t=down_t))(
            x, p["wgu"], p["gs"], p["us"], p["wd"], p["ds"], init)
        r = jax.jit(fp8_mlp_reference)(x, p["wgu"], p["gs"], p["us"], p["wd"], p["ds"], init)
        t = jax.jit(f32_mlp)(x, p, init)
        err = float(jnp.max(jnp.abs(y - r)))
        scale = float(jnp.max(jnp.abs(r - init)))

        def rms(v):
            return float(jnp.sqrt(jnp.mean(jnp.square(v))))
        out_rms = rms(t - init)
        k_dist, r_dist = rms(y - t) / out_rms, rms(r - t) / out_rms
        # ok: as close to the MLP as the reference, and near it (tests/test_gpu.py's bound;
        # not bit-exact: the fp8 tensor cores' accumulation and the e4m3 requantization)
        emit(dict(kind="check", M=M, down_t=down_t, max_err=err, out_absmax=scale,
                  rel=err / scale, ok=k_dist < 1.05 * r_dist and rms(y - r) / out_rms < 0.03,
                  rms_rel_vs_ref=rms(y - r) / out_rms,
                  kernel_rms_rel_vs_f32=k_dist, ref_rms_rel_vs_f32=r_dist,
                  kernel_max_rel_vs_f32=float(jnp.max(jnp.abs(y - t))) / scale,
                  ref_max_rel_vs_f32=float(jnp.max(jnp.abs(r - t))) / scale, device=dev))
    if args.check_only:
        return

    cfgs = [("mgpu", DEFAULT_CONFIG, True), ("mgpu_t", {**DEFAULT_CONFIG, "down_t": True}, True)]
    cfgs += [(f"mgpu{json.dumps(c, sort_keys=True)}", {**DEFAULT_CONFIG, **c}, True)
             for c in json.loads(args.cfgs)]
    for M in [int(m) for m in args.ms.split(",")]:
        x = jax.random.normal(keys[-1], (M, H), jnp.float32).astype(jnp.bfloat16)
        for name, fn, cfg in [("xla", xla_mlp, None)] + [(n, mgpu_mlp(c, i), c)
                                                         for n, c, i in cfgs]:
            if time.time() - t0 > args.budget:
                print(f"budget: {name} M={M} skipped", flush=True)
                continue
            try:
                d = gpu_trace.device_time(chain(fn, args.layers), [(x, layers)],
                                          calls=args.repeats)
            except Exception as e:  # a config that does not compile: say so, go on
                emit(dict(kind="time", impl=name, M=M, error=f"{type(e).__name__}: "
                          f"{str(e)[:300]}", device=dev))
                continue
            us = d["device_us"] / args.layers
            emit(dict(kind="time", impl=name, M=M, us_per_layer=round(us, 2),
                      ops_per_layer=d["ops_per_call"] / args.layers,
                      tb_per_s=round(BYTES / us / 1e6, 3), config=cfg, device=dev,
                      layers=args.layers, repeats=args.repeats))
    print("| impl | M | µs a layer | TB/s of weight | ops a layer |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["kind"] == "time" and "us_per_layer" in r:
            print(f"| {r['impl']} | {r['M']} | {r['us_per_layer']} | {r['tb_per_s']} | "
                  f"{r['ops_per_layer']:.1f} |")


if __name__ == "__main__":
    main()
