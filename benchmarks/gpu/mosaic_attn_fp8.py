"""The batch-1 fp8 attention half as a persistent Mosaic GPU kernel: step 3a of the whole-layer
kernel's plan for issue 6 (DESIGN_NOTES, "Next GPU session"), after the fp8 o chain (step 1)
and the MLP pair (step 2, ``mosaic_mlp_fp8.py``).

The kernel, ``attn_chain`` (pallas_kernels/fp8_decode_mgpu.py, whose docstring says what it
computes), runs a chain of L attention halves of Llama-3-8B layers, ``x_{l+1} = x_l +
o_l(attn(rope(qkv_l(RMSNorm(x_l) g_l))))``, in one launch of G CTAs: q/k/v with the norm
folded in | the paged attention's partials and the new token's | o with the partials' combine
and the residual, a grid barrier after each phase. This script times it, holds its float32
references and checks it.

Variants: ``sync`` (correct), ``nosync`` (no barrier: wrong, the body), ``sync_noattn`` (no
attention work, the barrier kept: what the attention phase costs), ``sync_perlayer`` (the
sync form launched once a layer: the engine-integration route, DESIGN_NOTES); the engine's
own attention half is ``attn_half_engine.py`` (``issues.sh attnchain`` runs both).
Checks (``layer_errs``): each phase against the float32 reference of the kernel's own input to
it (teacher-forced: q/k/v from x_l, the attention from the kernel's q/k/v, x_{l+1} from the
kernel's partials). ``--smoke`` (CPU): the one-CTA form interpreted at a small shape, the grid
forms lowered for an abstract H100.

    python3 benchmarks/gpu/mosaic_attn_fp8.py [--layers 32] [--ctx 1024] [--cands 128x256x2]
    python3 benchmarks/gpu/mosaic_attn_fp8.py --stress 5
    python3 benchmarks/gpu/mosaic_attn_fp8.py --smoke
"""
from __future__ import annotations

import functools
import math
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
from mosaic_mlp_fp8 import _rounded  # noqa: E402  (its rounding, step 2's)
from pallas_kernels.fp8_decode_mgpu import (  # noqa: E402, F401  (plan: the tests' name)
    D, E4M3_MAX, EPS, PAGE, SPLITS_Q, T, attn_chain, attn_plan as plan, rope_tables)

H, NH, KVH = 4096, 32, 8  # Llama-3-8B
# (CTAs, tile_k, stages): q/k/v's K slice (512) and o's (1024) split into whole rounds
CANDS = ((128, 256, 2), (128, 128, 4))
VARIANTS = ("sync", "nosync", "sync_noattn", "sync_perlayer")
LAYERED = 7  # the inputs a layer of its own: g, w_qkv, s_qkv, w_o, s_o, k_pages, v_pages


def _rope(x, rope):
    """x [..., D] float32 rotate-half roped by rope [2, D / 2] (cos, sin)."""
    lo, hi = x[..., :D // 2], x[..., D // 2:]
    c, s = rope
    return jnp.concatenate([lo * c - hi * s, hi * c + lo * s], axis=-1)


def reference_qkv(x, g, w_qkv, s_qkv, *, splits_q: int):
    """q/k/v as the kernel computes them: x * g quantized per (token, K split), each split's
    partial rounded to bf16, summed -> ([T, R / D, D] bf16, ssq [T] f32 of x)."""
    f32 = jnp.float32
    xf = x.astype(f32)
    t, h = xf.shape
    parts = (xf * g.astype(f32)).reshape(t, splits_q, h // splits_q)
    amax = jnp.max(jnp.abs(parts), axis=2, keepdims=True)
    q8 = _rounded(parts * jnp.where(amax > 0, E4M3_MAX / amax, 1.0), jnp.float8_e4m3fn)
    sc = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    y = jnp.einsum("tsk,nsk->tsn", q8 * sc, w_qkv.astype(f32).reshape(-1, splits_q, h // splits_q),
                   precision="highest") * s_qkv.astype(f32)
    qkv = jnp.sum(_rounded(y, jnp.bfloat16), axis=1).astype(jnp.bfloat16)
    return qkv.reshape(t, -1, D), jnp.sum(xf * xf, axis=1)


def reference_attention(qkv, ssq, k_pages, v_pages, page_table, pos: int, rope, *, nh: int,
                        h: int):
    """Token 0's attention from the kernel's own q/k/v and sums of squares: ([NH, D] float32,
    the new k and v [2, KVH, D] bf16). q scaled by the RMS factor and log2(e) / sqrt(D) then
    roped and rounded to bf16 as the kernel does; the softmax base 2, exact."""
    f32 = jnp.float32
    kvh = k_pages.shape[2]
    inv = jax.lax.rsqrt(ssq[0] / h + EPS)
    row = qkv[0].astype(f32)
    q = _rounded(_rope(row[:nh] * inv * (math.log2(math.e) / math.sqrt(D)), rope), jnp.bfloat16)
    k_new = _rounded(_rope(row[nh:nh + kvh] * inv, rope), jnp.bfloat16)
    v_new = _rounded(row[nh + kvh:nh + 2 * kvh] * inv, jnp.bfloat16)
    idx = jnp.arange(pos)
    pages = page_table[idx // PAGE]
    k = jnp.concatenate([k_pages[pages, idx % PAGE].astype(f32), k_new[None]])  # [pos+1, KVH, D]
    v = jnp.concatenate([v_pages[pages, idx % PAGE].astype(f32), v_new[None]])
    kq = jnp.repeat(k, nh // kvh, axis=1)  # [pos+1, NH, D]
    vq = jnp.repeat(v, nh // kvh, axis=1)
    s2 = jnp.einsum("hd,phd->hp", q, kq, precision="highest")
    p = jnp.exp2(s2 - jnp.max(s2, axis=1, keepdims=True))
    out = jnp.einsum("hp,phd->hd", p, vq, precision="highest") / jnp.sum(p, axis=1)[:, None]
    return out, jnp.stack([k_new, v_new]).astype(jnp.bfloat16)


def combined(po, lse):
    """The kernel's partials [pairs, S + 1, 8, D] / [pairs, S + 1, 8] -> the attention [NH, D]
    float32 (pair p's row r is head 8 p + r), combined in float32."""
    f32 = jnp.float32
    w = jnp.exp2(lse - jnp.max(lse, axis=1, keepdims=True))  # [pairs, S + 1, 8]
    o = jnp.sum(po.astype(f32) * w[..., None], axis=1) / jnp.sum(w, axis=1)[..., None]
    return o.reshape(-1, D)


def reference_o(x, attn, w_o, s_o):
    """x_{l+1} from x_l and token 0's attention [NH, D] float32 as the kernel computes it: each
    head quantized by its own absmax, a pair's 8 heads a K slice whose product is rounded to
    bf16 (pair 0's with the residual added first), the slices summed; rows 1.. keep x."""
    f32 = jnp.float32
    amax = jnp.max(jnp.abs(attn), axis=1, keepdims=True)
    a8 = _rounded(attn * jnp.where(amax > 0, E4M3_MAX / amax, 1.0), jnp.float8_e4m3fn)
    a = (a8 * jnp.where(amax > 0, amax / E4M3_MAX, 1.0)).reshape(-1, 8 * D)  # [pairs, 1024]
    pairs = a.shape[0]
    y = jnp.einsum("pk,npk->pn", a, w_o.astype(f32).reshape(-1, pairs, 8 * D),
                   precision="highest") * s_o.astype(f32)  # [pairs, H]
    xf = x.astype(f32)
    y = y.at[0].add(xf[0])
    row0 = jnp.sum(_rounded(y, jnp.bfloat16), axis=0)
    return xf.at[0].set(row0).astype(jnp.bfloat16)


def layer_errs(outs, x0, g, w_qkv, s_qkv, w_o, s_o, k_pages, v_pages, page_table, pos, rope,
               *, splits_q: int) -> list[dict]:
    """Each layer's errors, every phase against the reference of the kernel's own input to it
    (teacher-forced): q/k/v and the sums of squares from x_l, the attention (the kernel's
    partials combined) and the new k / v from the kernel's q/k/v, x_{l+1} from its partials."""
    xs, qkv, ssq, po, lse, kv_new = outs
    nh = qkv.shape[2] - 2 * k_pages.shape[3]
    h = x0.shape[1]
    p = int(pos[0])
    rq = jax.jit(functools.partial(reference_qkv, splits_q=splits_q))
    ra = jax.jit(functools.partial(reference_attention, pos=p, nh=nh, h=h))
    ro = jax.jit(reference_o)
    ins = [x0] + [xs[l] for l in range(xs.shape[0] - 1)]
    errs = []
    for l in range(xs.shape[0]):
        q_ref, ssq_ref = rq(ins[l], g[l], w_qkv[l], s_qkv[l])
        a_ref, kv_ref = ra(qkv[l], ssq[l], k_pages[l], v_pages[l], page_table, rope=rope)
        kvh = kv_ref.shape[1]
        attn = combined(po[l], lse[l])
        errs.append(dict(
            qkv=rel_err(qkv[l], q_ref.astype(jnp.float32)), ssq=rel_err(ssq[l], ssq_ref),
            attn=rel_err(attn, a_ref), kv=rel_err(kv_new[l, :, :kvh], kv_ref.astype(jnp.float32)),
            out=rel_err(xs[l], ro(ins[l], attn, w_o[l], s_o[l]).astype(jnp.float32))))
    return errs


def layer_rel(outs, *args, **cfg) -> dict:
    """The largest of each of ``layer_errs``'s errors over the layers."""
    errs = layer_errs(outs, *args, **cfg)
    return {k: max(e[k] for e in errs) for k in errs[0]}


def make_inputs(L: int, ctx: int, *, h: int = H, nh: int = NH, kvh: int = KVH,
                n_pt: int = 256, seed: int = 0):
    """The chain's inputs (``attn_chain``'s fn): x0 ~N(0, 1); the norm's weights ~U(0.5, 1.5);
    e4m3 weights (|w| up to ~256) with row scales that keep q/k/v ~N(0, 1) and each layer's
    attention half adding ~1/2 its input's scale; K/V pages ~N(0, 1) bf16 in a pool of
    ctx / 16 + 8 pages a layer behind a shuffled page table of ``n_pt`` entries; the new
    token at position ``ctx``."""
    k = jax.random.split(jax.random.PRNGKey(seed), 9)
    R = (nh + 2 * kvh) * D
    n_pages = ctx // PAGE + 8
    if ctx // PAGE + 1 > n_pt:
        raise ValueError(f"ctx {ctx} needs more than {n_pt} page-table entries")

    def w(key, shape):
        return jnp.clip(jax.random.normal(key, shape) * 64, -448, 448).astype(jnp.float8_e4m3fn)

    x = jax.random.normal(k[0], (T, h)).astype(jnp.bfloat16)
    g = jax.random.uniform(k[1], (L, h), minval=0.5, maxval=1.5).astype(jnp.bfloat16)
    s_qkv = jax.random.uniform(k[3], (L, R), minval=0.5, maxval=1.5) / (64 * h ** 0.5)
    s_o = jax.random.uniform(k[5], (L, h), minval=0.25, maxval=0.75) / (64 * (nh * D) ** 0.5)
    pages = jax.random.normal(k[6], (2, L, n_pages, PAGE, kvh, D)).astype(jnp.bfloat16)
    pt = jax.random.permutation(k[7], n_pages)
    pt = jnp.concatenate([pt, jnp.zeros((n_pt - n_pages,), pt.dtype)]) if n_pages < n_pt \
        else pt[:n_pt]
    return (x, g, w(k[2], (L, R, h)), s_qkv, w(k[4], (L, h, nh * D)), s_o, pages[0], pages[1],
            pt.astype(jnp.int32), jnp.array([ctx], jnp.int32), rope_tables(ctx))


def layered(variant: str, args):
    """The chain's arguments for ``variant``: sync_perlayer's per-layer lists
    (arrays or ShapeDtypeStructs), the stacked ones as they are for the others."""
    if variant != "sync_perlayer":
        return list(args)
    split = lambda v: ([jax.ShapeDtypeStruct(v.shape[1:], v.dtype)] * v.shape[0]  # noqa: E731
                       if isinstance(v, jax.ShapeDtypeStruct) else list(v))
    return [args[0], *[split(v) for v in args[1:1 + LAYERED]], *args[1 + LAYERED:]]


def chain_for(variant: str, G: int, tile_k: int, steps: int):
    """The kernel of a variant's name; ``sync_perlayer``: the sync form launched once a layer
    (``persistent_chain.per_layer_launches``: its inputs x0, per-layer lists, the rest)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: one of {VARIANTS}")
    if variant == "sync_perlayer":
        from persistent_chain import per_layer_launches  # noqa: PLC0415
        return per_layer_launches(chain_for("sync", G, tile_k, steps), LAYERED)
    return attn_chain(G, tile_k, steps, sync=variant.startswith("sync"),
                      attend=not variant.endswith("_noattn"))


def main(argv=None):
    from persistent_chain import mosaic_parser, wall_us  # noqa: PLC0415

    ap = mosaic_parser(__doc__, CANDS, VARIANTS, "CTAs x tile_k x stages")
    ap.add_argument("--ctx", type=int, default=1024, help="old positions (the new token's)")
    a = ap.parse_args(argv)
    rows = []
    emit = gpu_trace.jsonl_emitter(rows, a.out)
    if a.smoke:
        # H 512 (o's K stays NH D = 4096: a Llama-3-8B attention over a narrow residual), 7
        # pages: a split's blocks of 4 pages, the second short and masked
        L, ctx = 2, 100
        args = make_inputs(L, ctx, h=512, n_pt=16)
        outs = attn_chain(1, 128, 1, splits_q=1, sync=False, interpret=True)(*args)
        errs = layer_rel(outs, *args, splits_q=1)
        emit(dict(variant="interpret", G=1, layers=L, ctx=ctx, **errs))
        sds = jax.ShapeDtypeStruct
        ok = []
        shapes = [sds(v.shape, v.dtype) for v in make_inputs(2, 1024)]
        for G, tk, steps in CANDS:
            for v in VARIANTS:
                row = dict(variant=v, G=G, tile_k=tk, steps=steps, layers=2)
                ok.append(gpu_trace.lower_for_h100(row, chain_for(v, G, tk, steps),
                                                   *layered(v, shapes)))
                emit(row)
        # out: the one-CTA form sums a tile's pairs in float32, the reference (the grid's
        # TMA adds) rounds each to bf16 first: ~1e-3 apart
        bounds = dict(qkv=1e-3, ssq=1e-5, attn=1e-2, kv=1e-3, out=5e-3)
        return int(not all(ok) or any(errs[k] > b for k, b in bounds.items()))

    L, ctx = a.layers, a.ctx
    args = make_inputs(L, ctx)
    cands = [tuple(int(v) for v in c.split("x")) for c in a.cands.split(",")]
    nbytes = H * (NH + 2 * KVH) * D + H * NH * D + 2 * ctx * KVH * D * 2  # weights + K/V

    def timed(name, fn, call_args, cfg, check=True):
        row = dict(variant=name, L=L, ctx=ctx, **cfg)
        try:
            outs = fn(*call_args)
            if check:
                row.update(layer_rel(outs, *args, splits_q=SPLITS_Q))
            us = wall_us(fn, call_args, a.calls, a.repeats) / L
            row.update(us_per_layer=round(us, 2), tb_s=round(nbytes / (us * 1e-6) / 1e12, 2))
            dev = gpu_trace.device_time(fn, [call_args], calls=3)
            if dev is not None:
                row.update(gpu_us_per_layer=round(dev["device_us"] / L, 2),
                           ops_per_layer=round(dev["ops_per_call"] / L, 2))
        except Exception as e:  # a candidate Mosaic refuses: say so, go on
            row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        emit(row)

    if a.stress:
        for G, tk, steps in cands:
            fn = chain_for("sync", G, tk, steps)
            rels = [layer_rel(fn(*args), *args, splits_q=SPLITS_Q) for _ in range(a.stress)]
            emit(dict(variant="sync", G=G, tile_k=tk, steps=steps, calls=a.stress,
                      **{f"{k}_max": max(r[k] for r in rels) for k in rels[0]}))
        return 0

    # the engine's attention half: ``attn_half_engine.py`` in a process of its own (its
    # chain donates the K/V cache it threads through the calls)
    for G, tk, steps in cands:
        for v in a.variants.split(","):
            if v != "xla":
                timed(v, chain_for(v, G, tk, steps), layered(v, args),
                      dict(G=G, tile_k=tk, steps=steps), check=v in ("sync", "sync_perlayer"))
    print("\n| variant | CTAs x tile_k x stages | µs / layer | TB/s | GPU µs / layer | errors |"
          "\n|---|---|---:|---:|---:|---|")
    for r in rows:
        cfg = f"{r['G']} x {r['tile_k']} x {r['steps']}" if "G" in r else ""
        errs = " ".join(f"{k} {r[k]:.1e}" for k in ("qkv", "attn", "kv", "out") if k in r)
        print(f"| {r['variant']} | {cfg} | {r.get('us_per_layer', r.get('error', '')[:300])} | "
              f"{r.get('tb_s', '')} | {r.get('gpu_us_per_layer', '')} | {errs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
