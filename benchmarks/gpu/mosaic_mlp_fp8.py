"""The batch-1 fp8 MLP pair as a persistent Mosaic GPU kernel: step 2 of the whole-layer
kernel's plan for issue 6 (DESIGN_NOTES, "Next GPU session"), after the fp8 o chain
(``mosaic_chain_fp8.py``, step 1).

The kernel, ``mlp_chain`` (pallas_kernels/fp8_decode_mgpu.py, whose docstring says what it
computes), runs a chain of L MLPs of Llama-3-8B layers, ``x_{l+1} = x_l +
down_l(SwiGLU(gate_up_l(RMSNorm(x_l) g_l)))``, in one launch of G CTAs (128 or 112 of the
H100's 132 SMs, all resident): gate/up with the norm folded in | down with the SwiGLU and its
quantization, a grid barrier after each phase. This script times it, holds its float32
reference and checks it.

Variants: ``sync`` (correct), ``sync_nonorm`` (correct: x + MLP(x), no norm), ``nosync`` (no
barrier: wrong, the body's stream), ``nosync_noq`` (also the activations quantized at layer 0
only: what the SwiGLU and the quantization cost), ``sync_pieces`` (gate/up's K slice staged
as two chunk-wide pieces: for ``--diagnose``), ``sync_perlayer`` (the sync form launched once
a layer, ``persistent_chain.per_layer_launches``: the engine-integration route), against
XLA's chain of the engine's batch-1 fp8 MLP on the same weights (``rms_norm``,
``jaxllm.models.fp8.fp8_linear`` weight-only, SwiGLU, residual add; ``xla_nonorm`` without
the norm) and the float32 ``reference_layer``
of this W8A8 (``layer_rel``: each layer's output against the reference of the kernel's own
gate/up, and gate/up against the reference of the layer's input: the checks that decide).

Measured on the H100 (2026-12-07, RESULTS "the persistent fp8 MLP pair"): 66.57 µs a layer
of GPU time at 112 x 256 x 4 x 1024 against XLA's norm + MLP at 72.18 (65.53-65.60 against
67.69 without the norm); the body 2.86-2.96 TB/s, two boundaries 1.5-2.7 µs each; every
layer's output within 3.8e-3 of its reference in 25 stressed calls.

    python3 benchmarks/gpu/mosaic_mlp_fp8.py [--layers 32] [--cands 112x256x4x1024] [--out F]
    python3 benchmarks/gpu/mosaic_mlp_fp8.py --stress 10          # the sync form, N calls
    python3 benchmarks/gpu/mosaic_mlp_fp8.py --diagnose --layers 4  # gate/up against variants
    python3 benchmarks/gpu/mosaic_mlp_fp8.py --smoke   # CPU: interpreted 1-CTA form, lowering
"""
from __future__ import annotations

import functools
import itertools
import os
import sys

if "--smoke" in sys.argv:  # the interpreter's warpgroups need XLA's CPU pool >= 3 (step 1)
    os.environ.setdefault("NPROC", "8")

import jax
import jax.numpy as jnp

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
sys.path.insert(0, "benchmarks/gpu")
import gpu_trace  # noqa: E402
from mosaic_chain import rel_err  # noqa: E402
from pallas_kernels.fp8_decode_mgpu import (  # noqa: E402
    E4M3_MAX, EPS, SPLITS_A, T, WG_N, mlp_chain, mlp_plan as plan)

H, F = 4096, 14336  # Llama-3-8B
# (CTAs, tile_k, stages, B chunk). Every pipeline's steps must divide by the stages (A's
# 1024 and B's chunk): 128 CTAs take 512-wide chunks (896 / 128), so 64 KB of weight in
# flight a CTA; 112 CTAs take 1024-wide chunks (448 / 112), so 128 KB.
CANDS = ((128, 256, 2, 512), (112, 256, 4, 1024), (112, 128, 8, 1024))
VARIANTS = ("sync", "sync_nonorm", "nosync", "nosync_noq", "sync_pieces", "sync_perlayer")


def _rounded(v, dtype):
    """v rounded to ``dtype`` and back to float32, a rounding XLA keeps: on the GPU its
    default ``xla_allow_excess_precision`` drops a float32 -> narrow -> float32 round trip
    (the H100 at 16:00: this reference's gate/up came out unquantized, 2.6e-2 from every
    kernel form, its alternatives equal to it), so the narrow value passes a barrier."""
    return jax.lax.optimization_barrier(v.astype(dtype)).astype(jnp.float32)


def _quantized(v, width: int):
    """v [T, K] float32 quantized per (token, ``width`` columns) as the kernel does:
    (e4m3 values as float32 [T, K / width, width], scales [T, K / width, 1])."""
    parts = v.reshape(T, -1, width)
    amax = jnp.max(jnp.abs(parts), axis=2, keepdims=True)
    inv = jnp.where(amax > 0, E4M3_MAX / amax, 1.0)
    q = _rounded(parts * inv, jnp.float8_e4m3fn)
    return q, jnp.where(amax > 0, amax / E4M3_MAX, 1.0)


def reference_layer(x, g, w_gu, s_gu, w_dn, s_dn, gu=None, *, G: int, splits_a: int,
                    chunk: int, norm: bool = True, qa_width: int | None = None):
    """One layer as the kernel computes it, in float32: x [T, H] bf16 -> (x + MLP(RMSNorm(x)
    g) [T, H] bf16, gu [2, T, F] bf16, ssq [T]). Gate/up: x * g, each K split's slice
    quantized per token (``qa_width`` another width, 0 none, -1 each chunk by its own absmax
    but scaled back by the slice's, -2 the slice's scale from its first chunk, the rest
    clipped: the diagnosis' alternatives),
    each split's partial rounded to bf16, summed; down: gate and up times the tokens'
    rsqrt(ssq / H + eps), the SwiGLU quantized per (token, chunk), each CTA's run of chunks
    of a tile summed in float32, times the rows' scales, the residual added to the run of
    chunk 0, each run rounded to bf16, the runs summed. ``gu`` given: down takes it instead
    of its own gate/up (the kernel's, teacher-forced). ``norm`` False: MLP(x)."""
    import numpy as np  # noqa: PLC0415

    h, f = x.shape[1], w_dn.shape[1]
    p = plan(G, h, f, splits_a, chunk)
    f32 = jnp.float32
    xf = x.astype(f32)
    ssq = jnp.sum(xf * xf, axis=1)
    xa = xf * g.astype(f32) if norm else xf
    qa = p["k_a"] if qa_width is None else qa_width
    if qa == -1:  # diagnosis: each chunk quantized by its own absmax, scaled by the slice's
        q, _ = _quantized(xa, chunk)
        _, sc = _quantized(xa, p["k_a"])
        xa = (q.reshape(T, -1, p["k_a"]) * sc).reshape(T, h)
    elif qa == -2:  # diagnosis: the slice's scale from its first chunk only, clipped
        parts = xa.reshape(T, -1, p["k_a"])
        amax = jnp.max(jnp.abs(parts[:, :, :chunk]), axis=2, keepdims=True)
        q = jnp.clip(parts * (E4M3_MAX / amax), -E4M3_MAX, E4M3_MAX)
        xa = (_rounded(q, jnp.float8_e4m3fn) * (amax / E4M3_MAX)).reshape(T, h)
    elif qa:
        q, sc = _quantized(xa, qa)
        xa = (q * sc).reshape(T, h)
    y = jnp.einsum("tsk,nsk->tsn", xa.reshape(T, splits_a, p["k_a"]),
                   w_gu.astype(f32).reshape(2 * f, splits_a, p["k_a"]),
                   precision="highest") * s_gu.astype(f32)
    gu_ref = jnp.sum(_rounded(y, jnp.bfloat16), axis=1).astype(jnp.bfloat16)
    gu_ref = gu_ref.reshape(T, f // WG_N, 2, WG_N).transpose(2, 0, 1, 3).reshape(2, T, f)
    gate, up = (gu_ref if gu is None else gu).astype(f32)
    if norm:
        inv_rms = jax.lax.rsqrt(ssq / h + EPS)[:, None]
        gate, up = gate * inv_rms, up * inv_rms
    q, sc = _quantized(gate / (1.0 + jnp.exp(-gate)) * up, chunk)
    yb = jnp.einsum("tck,nck->tcn", q, w_dn.astype(f32).reshape(h, p["cpt"], chunk),
                    precision="highest") * sc  # [T, chunk index, H]
    # run of (chunk kc, column n): the CTA that takes it, counted from the tile's first
    seg = (np.arange(h)[None, :] // (2 * WG_N) * p["cpt"] + np.arange(p["cpt"])[:, None])
    seg = seg // p["nb"]
    seg = seg - seg[:1]
    onehot = jnp.asarray(seg[:, None, :] == np.arange(seg.max() + 1)[None, :, None], f32)
    runs = jnp.einsum("tch,crh->trh", yb, onehot, precision="highest") * s_dn.astype(f32)
    runs = runs.at[:, 0].add(xf)  # run 0 of a tile holds its chunk 0
    out = jnp.sum(_rounded(runs, jnp.bfloat16), axis=1)
    return out.astype(jnp.bfloat16), gu_ref, ssq


def layer_errs(outs, x0, g, w_gu, s_gu, w_dn, s_dn, **cfg) -> list[tuple[float, float, float]]:
    """Each layer's (output, gate/up, sums of squares) errors against ``reference_layer`` of
    the kernel's own input to the layer and to its down phase (teacher-forced: a bf16 ulp of
    gate/up, from the order of the TMA adds, moves e4m3 roundings of the SwiGLU's
    quantization; over many layers the chain drifts from any reference however right each
    layer is; a stale read, a barrier that let one through, shows as O(1))."""
    xs, gu, ssq = outs
    ref = jax.jit(functools.partial(reference_layer, **cfg))
    ins = [x0] + [xs[l] for l in range(xs.shape[0] - 1)]
    return [(rel_err(xs[l], r[0].astype(jnp.float32)), rel_err(gu[l], r[1].astype(jnp.float32)),
             rel_err(ssq[l], r[2]))
            for l in range(xs.shape[0])
            for r in [ref(ins[l], g[l], w_gu[l], s_gu[l], w_dn[l], s_dn[l], gu[l])]]


def layer_rel(outs, *args, **cfg) -> tuple[float, float, float]:
    """The largest of ``layer_errs``: (output, gate/up, sums of squares)."""
    errs = layer_errs(outs, *args, **cfg)
    return tuple(max(e[i] for e in errs) for i in range(3))


def xla_chain(x, g, w_gu, s_gu, w_dn, s_dn, norm: bool = True):
    """The engine's batch-1 fp8 MLP (its RMSNorm, then weight-only fp8 GEMMs: XLA's dot of
    the upcast e4m3 weight), layer after layer, on this kernel's tile-interleaved rows."""
    from jaxllm.models.fp8 import fp8_linear  # noqa: PLC0415
    from jaxllm.models.llama import rms_norm  # noqa: PLC0415

    f = w_dn[0].shape[1]
    for gl, wg, sg, wd, sd in zip(g, w_gu, s_gu, w_dn, s_dn):
        hn = rms_norm(x, gl, EPS) if norm else x
        gu = fp8_linear(hn, wg, sg, None).reshape(T, f // WG_N, 2, WG_N)
        gate, up = gu[:, :, 0].reshape(T, f), gu[:, :, 1].reshape(T, f)
        x = x + fp8_linear(jax.nn.silu(gate) * up, wd, sd, None)
    return x


def make_inputs(h: int, f: int, L: int, seed: int = 0):
    """x0 [T, H] bf16; the norm's weights [L, H] ~U(0.5, 1.5); e4m3 weights (|w| up to ~256)
    with row scales that keep gate/up ~N(0, 1) and each layer's MLP output ~1/2 the scale of
    its input."""
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    x = jax.random.normal(k[0], (T, h)).astype(jnp.bfloat16)

    def w(key, shape):
        return jnp.clip(jax.random.normal(key, shape) * 64, -448, 448).astype(jnp.float8_e4m3fn)

    g = jax.random.uniform(k[5], (L, h), minval=0.5, maxval=1.5).astype(jnp.bfloat16)
    s_gu = jax.random.uniform(k[2], (L, 2 * f), minval=0.5, maxval=1.5) / (64 * h ** 0.5)
    s_dn = jax.random.uniform(k[4], (L, h), minval=0.5, maxval=1.5) / (64 * f ** 0.5)
    return x, g, w(k[1], (L, 2 * f, h)), s_gu, w(k[3], (L, h, f)), s_dn


def chain_for(variant: str, G: int, tile_k: int, steps: int, chunk: int):
    """The kernel of a variant's name; ``sync_perlayer``: the sync form launched once a layer
    (``persistent_chain.per_layer_launches``: its inputs x0 and per-layer lists)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: one of {VARIANTS}")
    if variant == "sync_perlayer":
        from persistent_chain import per_layer_launches  # noqa: PLC0415
        return per_layer_launches(chain_for("sync", G, tile_k, steps, chunk), 5)
    return mlp_chain(G, tile_k, steps, chunk, sync=variant.startswith("sync"),
                     quantize_every_layer=not variant.endswith("_noq"),
                     norm=not variant.endswith("_nonorm"), a_pieces=variant == "sync_pieces")


def main(argv=None):
    from persistent_chain import mosaic_parser, wall_us  # noqa: PLC0415

    ap = mosaic_parser(__doc__, CANDS, VARIANTS, "CTAs x tile_k x stages x down chunk")
    ap.add_argument("--ffn", type=int, default=F)
    ap.add_argument("--diagnose", action="store_true",
                    help="instead of timing: each candidate's gate/up a layer against the "
                         "reference and its alternatives (x quantized per chunk, or not)")
    a = ap.parse_args(argv)
    rows = []
    emit = gpu_trace.jsonl_emitter(rows, a.out)
    if a.smoke:
        h, f, L = 256, 256, 2
        args = make_inputs(h, f, L)
        # gate/up's K slice (256) in a buffer of its own, with and without the norm; as two
        # staged pieces; in the staging itself (one 256-wide chunk)
        for norm, chunk, pieces in ((True, 128, False), (False, 128, False), (True, 128, True),
                                    (True, 256, False)):
            outs = mlp_chain(1, 128, 1, chunk, splits_a=1, sync=False, norm=norm,
                             a_pieces=pieces, interpret=True)(*args)
            out_rel, gu_rel, ssq_rel = layer_rel(outs, *args, G=1, splits_a=1, chunk=chunk,
                                                 norm=norm)
            emit(dict(variant="interpret", norm=norm, chunk=chunk, a_pieces=pieces, G=1,
                      dim=h, ffn=f, layers=L, layer_rel=out_rel, gu_rel=gu_rel,
                      ssq_rel=ssq_rel if norm else None))
        sds = jax.ShapeDtypeStruct
        ok = []
        for G, tk, steps, chunk in CANDS:
            for v in VARIANTS:
                row = dict(variant=v, G=G, tile_k=tk, steps=steps, chunk=chunk, layers=2)
                shapes = [sds((2, H), jnp.bfloat16), sds((2, 2 * F, H), jnp.float8_e4m3fn),
                          sds((2, 2 * F), jnp.float32), sds((2, H, F), jnp.float8_e4m3fn),
                          sds((2, H), jnp.float32)]
                if v == "sync_perlayer":  # per-layer lists
                    shapes = [[sds(s.shape[1:], s.dtype)] * 2 for s in shapes]
                ok.append(gpu_trace.lower_for_h100(
                    row, chain_for(v, G, tk, steps, chunk), sds((T, H), jnp.bfloat16), *shapes))
                emit(row)
        worst = max(max(r["layer_rel"], r["gu_rel"], r["ssq_rel"] or 0) for r in rows
                    if r["variant"] == "interpret")
        return int(not all(ok) or worst > 1e-3)

    h, f, L = a.dim, a.ffn, a.layers
    args = make_inputs(h, f, L)
    cands = [tuple(int(v) for v in c.split("x")) for c in a.cands.split(",")]
    wbytes = 3 * h * f  # e4m3 bytes a layer

    def cfg_of(variant, G, chunk):
        return dict(G=G, splits_a=SPLITS_A, chunk=chunk, norm=not variant.endswith("_nonorm"))

    if a.diagnose:
        for (G, tk, steps, chunk), v in itertools.product(cands, ("sync", "sync_pieces")):
            if v == "sync_pieces" and H // SPLITS_A == chunk:
                continue  # one piece: the same kernel as sync
            outs = chain_for(v, G, tk, steps, chunk)(*args)
            cfg = cfg_of("sync", G, chunk)
            alts = {"k_slice": None, "per_chunk": chunk, "unquantized": 0,
                    "chunk_amax_slice_scale": -1, "first_chunk_amax_clipped": -2}
            errs = {n: [e[1] for e in layer_errs(outs, *args, **cfg, qa_width=q)]
                    for n, q in alts.items()}
            emit(dict(kind="diagnose", variant=v, G=G, tile_k=tk, steps=steps, chunk=chunk,
                      **{f"gu_rel_{n}": [round(e, 5) for e in v] for n, v in errs.items()},
                      out_rel=[round(e[0], 5) for e in layer_errs(outs, *args, **cfg)]))
        return 0

    def check(name, fn, call_args, cfg):
        row = dict(variant=name, H=h, F=f, L=L, **cfg)
        try:
            outs = fn(*call_args)
            if not name.startswith("xla"):
                row["layer_rel"], row["gu_rel"], row["ssq_rel"] = layer_rel(
                    outs, *args, **cfg_of(name, cfg["G"], cfg["chunk"]))
            us = wall_us(fn, call_args, a.calls, a.repeats) / L
            row.update(us_per_layer=round(us, 2), tb_s=round(wbytes / (us * 1e-6) / 1e12, 2))
            dev = gpu_trace.device_time(fn, [call_args], calls=3)
            if dev is not None:
                row.update(gpu_us_per_layer=round(dev["device_us"] / L, 2),
                           ops_per_layer=round(dev["ops_per_call"] / L, 2))
        except Exception as e:  # a candidate Mosaic refuses: say so, go on
            row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        emit(row)

    if a.stress:
        for G, tk, steps, chunk in cands:
            fn = chain_for("sync", G, tk, steps, chunk)
            rels = [layer_rel(fn(*args), *args, **cfg_of("sync", G, chunk))
                    for _ in range(a.stress)]
            emit(dict(variant="sync", G=G, tile_k=tk, steps=steps, chunk=chunk, calls=a.stress,
                      layer_rel_median=sorted(r[0] for r in rels)[len(rels) // 2],
                      layer_rel_max=max(r[0] for r in rels), gu_rel_max=max(r[1] for r in rels),
                      ssq_rel_max=max(r[2] for r in rels)))
        return 0

    per_layer = [list(v) for v in args[1:]]
    for v in a.variants.split(","):
        if v.startswith("xla"):
            check(v, jax.jit(functools.partial(xla_chain, norm=not v.endswith("_nonorm"))),
                  (args[0], *per_layer), {})
    for G, tk, steps, chunk in cands:
        for v in a.variants.split(","):
            if not v.startswith("xla"):
                check(v, chain_for(v, G, tk, steps, chunk),
                      (args[0], *per_layer) if v == "sync_perlayer" else args,
                      dict(G=G, tile_k=tk, steps=steps, chunk=chunk))
    print("\n| variant | CTAs x tile_k x stages x chunk | µs / layer | TB/s | GPU-time µs / layer "
          "| layer rel | gate/up rel |\n|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        cfg = f"{r['G']} x {r['tile_k']} x {r['steps']} x {r['chunk']}" if "G" in r else ""
        if "us_per_layer" in r:
            print(f"| {r['variant']} | {cfg} | {r['us_per_layer']} | {r['tb_s']} | "
                  f"{r.get('gpu_us_per_layer')} | {r.get('layer_rel', float('nan')):.1e} | "
                  f"{r.get('gu_rel', float('nan')):.1e} |")
        else:
            print(f"| {r['variant']} | {cfg} | {r.get('error', '')[:300]} | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
