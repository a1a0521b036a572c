"""The persistent o chain of ``mosaic_chain.py`` over fp8 weights, W8A8 with the activations
quantized inside: step 1 of the whole-layer kernel's plan for issue 6 (DESIGN_NOTES, "Next
GPU session": the bar redone for fp8 on the H100).

``mosaic_chain.py`` measured on the H100 (2026-12-07, RESULTS) a boundary of 2.0 µs a layer
and a body at 91-95% of TMA's bare stream, over bf16 weights. A fp8 layer kernel differs in
what this measures:

- the weights are e4m3 [L, N, K] with one float32 scale a row (``ws`` [L, N]), half the bytes
  a layer (16.8 MB at the o shape), so the same boundary is a larger share of a layer;
- fp8 wgmma takes both operands in e4m3: after the barrier each compute warpgroup reloads its
  K slice of the bf16 activations (as the bf16 chain does), quantizes it per token (the slice's
  absmax maps to 448: ``reference``) into an e4m3 copy in shared memory, and keeps the tokens'
  scales; that work sits on the boundary's path;
- the epilogue scales the [64, 8] float32 tile by its rows' weight scales and its tokens'
  scales before the bf16 TMA reduce-add of the K splits' partials.

Everything else is ``mosaic_chain``'s release form: one CTA per (128-column tile, K split),
128 CTAs at the o shape with 4 splits, a chained warp-specialized weight pipeline a layer, a
GMEM semaphore (GPU scope) as the grid barrier, split 0's CTAs zeroing every layer's output
first.

Variants: ``sync`` (correct), ``nosync`` (no barrier: wrong, the body), ``sync_noq`` (timing
only: the activations quantized at layer 0 only, later layers reuse that e4m3 copy: what the
quantization costs the boundary), against XLA's chain of the engine's batch-1 fp8 projection
(``jaxllm.models.fp8.fp8_linear``: weight-only, the e4m3 weight upcast inside XLA's dot) and
the W8A8 float32 ``reference`` (bf16 between layers; the kernel also rounds each K split's
partial to bf16 before the add). The check that matters is ``layer_rel`` (each layer against
the reference of its own input): over 32 layers the last output drifts ~0.2 from any
reference, the chain's own drift.

Measured on the H100 (2026-12-07 13:22 and 13:36, RESULTS "the persistent o chain over fp8
weights (W8A8 inside)"): ``sync`` 8.13-8.17 µs a layer of GPU time at 4 x 256 x 4 against
XLA's chain at 8.76-8.79, ``nosync`` 5.64-5.65 (2.97 TB/s: 92% of TMA's bare stream), so a
boundary is 2.5 µs, 0.5 of it the quantization (``sync_noq`` 7.62-7.65); every layer within
3.7e-3 of its reference in 60 stressed calls over three tiles.

    python3 benchmarks/gpu/mosaic_chain_fp8.py [--layers 32] [--cands 4x256x4] [--out F]
    python3 benchmarks/gpu/mosaic_chain_fp8.py --stress 20 --variants sync
    python3 benchmarks/gpu/mosaic_chain_fp8.py --smoke   # CPU: interpreted 1-CTA chain, lowering
"""
from __future__ import annotations

import functools
import os
import sys

if "--smoke" in sys.argv:
    # The interpreter runs each warpgroup as a compiled call on a thread of its own, and their
    # barrier callbacks can land on XLA's CPU worker pool, sized by the cores: on a 2-core
    # machine two warpgroups waiting at a barrier held both workers and the third never ran
    # (a hang, 2026-12-07). NPROC sizes that pool; it must be >= the kernel's 3 threads.
    os.environ.setdefault("NPROC", "8")

import jax
import jax.numpy as jnp

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
sys.path.insert(0, "benchmarks/gpu")
import gpu_trace  # noqa: E402
from mosaic_chain import T, WG_N, launch, rel_err, stress_row, weight_pipeline  # noqa: E402

E4M3_MAX = 448.0
CANDS = ((4, 256, 4), (4, 128, 8), (4, 512, 2))  # (K splits, tile_k, stages): 128 KB in flight
VARIANTS = ("sync", "nosync", "sync_noq")


def fp8_chain(splits: int, tile_k: int, steps: int, *, sync: bool = True,
              quantize_every_layer: bool = True, interpret: bool = False):
    """``fn(x0 [T, K] bf16, w [L, N, K] e4m3, ws [L, N] f32) -> xs [L, T, N] bf16`` with
    xs[l] = W8A8(x_l, w[l], ws[l]) (``reference``), x_0 = x0, x_{l+1} = xs[l], N == K.
    ``splits`` > 1: the K splits' partials are TMA-added into xs (bf16), zeroed first;
    ``splits`` == 1 with ``sync`` False is the one-CTA form (N == 128) the interpreter runs:
    its two compute warpgroups meet at a CTA barrier between layers. ``quantize_every_layer``
    False (timing only): the layer-0 quantization is reused by every layer."""
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    bf16, e4m3, f32 = jnp.bfloat16, jnp.float8_e4m3fn, jnp.float32
    reduce = splits > 1
    fp8_tf = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))
    b16_tf = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def kernel(x0_gmem, w_gmem, ws_gmem, xs_gmem, *, dims):
        L, N, K = dims
        cta_n, k_per = 2 * WG_N, K // splits
        n_tiles = N // cta_n
        if (N % cta_n or K % (splits * tile_k) or tile_k % 128
                or (k_per // tile_k) % steps or K != N or (not reduce and sync)
                or (not reduce and n_tiles != 1)):
            raise ValueError(f"{L} x {N} x {K} does not tile by {cta_n} / {splits} x {tile_k} "
                             f"/ {steps} steps (one split: one CTA, no barrier)")
        G = n_tiles * splits
        sms = None if interpret else getattr(jax.devices()[0], "core_count", None)
        if sync and sms is not None and G > sms:
            raise ValueError(f"a grid barrier over {G} CTAs needs them all resident, and the "
                             f"GPU has {sms} SMs: use fewer K splits")
        cta = lax.axis_index("cluster_grid")
        n_idx, s = cta % n_tiles, cta // n_tiles
        k_slice = pl.ds(s * k_per, k_per)
        pipeline = functools.partial(weight_pipeline, k_per=k_per, tile_k=tile_k,
                                     cta_n=cta_n, steps=steps, transforms=fp8_tf)
        ignore = lambda *_, **__: None  # noqa: E731

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(ignore, ignore, 0 if L > 1 else None).get_allocations(w_gmem.at[0]),
            x_smem=plgpu.SMEM((2, T, k_per), bf16, transforms=b16_tf),
            x8_smem=plgpu.SMEM((2, T, k_per), e4m3, transforms=fp8_tf),
            xsc_smem=plgpu.SMEM((2, 2, T), f32),  # [layer parity, warpgroup, token]
            ws_smem=plgpu.SMEM((2, 2, WG_N), f32),  # [layer parity, warpgroup, row]
            out_smem=plgpu.SMEM((2, T, WG_N), bf16, transforms=b16_tf),
            x_bar=plgpu.Barrier(num_barriers=2),
            ws_bar=plgpu.Barrier(num_barriers=4),
            wg_bar=plgpu.Barrier(num_arrivals=2),
            collective_axes="wg")
        def _scope(allocs, x_smem, x8_smem, xsc_smem, ws_smem, out_smem, x_bar, ws_bar,
                   wg_bar):
            wg = lax.axis_index("wg")
            sem = pl.get_global(plgpu.SemaphoreType.REGULAR) if sync else None
            cols = pl.ds(n_idx * cta_n + wg * WG_N, WG_N)
            entered = lambda l: 2 * G * (l + 1 if reduce else l)  # noqa: E731

            if reduce:  # phase 0: split 0's CTAs zero their columns of every layer's output
                @pl.when(wg < 2)
                def _zero():
                    @pl.when(s == 0)
                    def _():
                        @functools.partial(pl.run_scoped, zero_ref=plgpu.ACC((WG_N, T), f32))
                        def _(zero_ref):
                            out_smem.at[wg].transpose((1, 0))[...] = zero_ref[...].astype(bf16)
                        plgpu.commit_smem()

                        @pl.loop(0, L)
                        def _(l):
                            plgpu.copy_smem_to_gmem(out_smem.at[wg], xs_gmem.at[l].at[:, cols])
                        plgpu.wait_smem_to_gmem(0)
                    if sync:
                        plgpu.semaphore_signal(sem, 1, memory_scope="gpu")

            def layer_start(l):
                p = lax.rem(l, 2)
                # the layer's row scales: independent of the barrier, issued before it
                plgpu.copy_gmem_to_smem(ws_gmem.at[l, n_idx * 2 + wg], ws_smem.at[p, wg],
                                        ws_bar.at[p * 2 + wg])
                if sync:
                    pl.when(l > 0)(lambda: plgpu.semaphore_wait(
                        sem, entered(l), decrement=False, memory_scope="gpu"))

                @pl.when(l == 0)
                def _():
                    plgpu.copy_gmem_to_smem(x0_gmem.at[:, k_slice], x_smem.at[wg], x_bar.at[wg])

                @pl.when(l > 0)
                def _():
                    plgpu.copy_gmem_to_smem(xs_gmem.at[l - 1].at[:, k_slice], x_smem.at[wg],
                                            x_bar.at[wg])
                plgpu.barrier_wait(x_bar.at[wg])

                def quantize():
                    # The slice read transposed ([k_per, T], WGMMA_TRANSPOSED: the layout in
                    # which an 8-bit transposed store lowers, as in fp8_skinny_mgpu), each
                    # token's absmax to 448, a reciprocal a token, a multiply a value.
                    xt16 = plgpu.load(x_smem.at[wg].transpose((1, 0)), (),
                                      layout=plgpu.Layout.WGMMA_TRANSPOSED)
                    amax = jnp.max(jnp.abs(xt16), axis=0).astype(f32)
                    inv = jnp.where(amax > 0, E4M3_MAX / amax, 1.0)
                    q = xt16.astype(f32) * lax.broadcast_in_dim(inv, (k_per, T), [1])
                    x8_smem.at[wg].transpose((1, 0))[...] = q.astype(e4m3)
                    xsc_smem.at[p, wg][...] = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
                    plgpu.commit_smem()

                if quantize_every_layer:
                    quantize()
                else:  # timing only: layer 0's e4m3 copy and scales serve every layer
                    pl.when(l == 0)(quantize)

            def epilogue(acc_ref, l):
                p = lax.rem(l, 2) if quantize_every_layer else 0
                acc = acc_ref[...]
                plgpu.barrier_wait(ws_bar.at[lax.rem(l, 2) * 2 + wg])
                w_s = plgpu.load(ws_smem.at[lax.rem(l, 2), wg], (),
                                 layout=plgpu.Layout.WGMMA.reduce(1))
                x_s = plgpu.load(xsc_smem.at[p, wg], (), layout=plgpu.Layout.WGMMA.reduce(0))
                val = (acc * lax.broadcast_in_dim(w_s, (WG_N, T), [0])
                       * lax.broadcast_in_dim(x_s, (WG_N, T), [1]))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                out_smem.at[wg].transpose((1, 0))[...] = val.astype(bf16)
                plgpu.commit_smem()
                if reduce and sync:  # the zeroing is done everywhere (later layers: implied)
                    pl.when(l == 0)(lambda: plgpu.semaphore_wait(
                        sem, 2 * G, decrement=False, memory_scope="gpu"))
                plgpu.copy_smem_to_gmem(out_smem.at[wg], xs_gmem.at[l].at[:, cols],
                                        reduction_op="add" if reduce else None)
                plgpu.wait_smem_to_gmem(0)  # written, not only read
                if sync:
                    plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
                elif not reduce:  # one CTA: its two compute warpgroups meet
                    plgpu.barrier_arrive(wg_bar)
                    plgpu.barrier_wait(wg_bar)

            @pl.loop(0, L)
            def _layer(l):
                def ctx(eval_pipeline):
                    layer_start(l)

                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((WG_N, T), f32))
                    def _acc(acc_ref):
                        eval_pipeline(acc_ref)
                        epilogue(acc_ref, l)

                def mma(idxs, w_smem, acc_ref):
                    plgpu.wgmma(acc_ref, w_smem.at[pl.ds(wg * WG_N, WG_N)],
                                x8_smem.at[wg].at[:, pl.ds(idxs[0] * tile_k, tile_k)]
                                .transpose((1, 0)))
                    plgpu.wgmma_wait(0)
                    return acc_ref

                state = None
                if L > 1:
                    state = jnp.where(l == 0, 0, jnp.where(l == L - 1, 2, 1))
                pipeline(mma, ctx, state)(
                    w_gmem.at[l].at[pl.ds(n_idx * cta_n, cta_n), k_slice], allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def fn(x0, w, ws):
        L, N, K = w.shape
        f = launch(functools.partial(kernel, dims=(L, N, K)),
                   jax.ShapeDtypeStruct((L, T, N), bf16), N // (2 * WG_N) * splits,
                   interpret=interpret)
        return f(x0, w, ws.reshape(L, N // WG_N, WG_N).astype(f32))

    return jax.jit(fn)


def reference(x, w, ws, splits: int):
    """W8A8 as the kernel does it, in float32: each K split's slice of x quantized per token
    (its absmax to 448), times the e4m3 weight, scaled by the token's and the row's scales,
    each split's partial rounded to bf16, summed; bf16 between layers."""
    for l in range(w.shape[0]):
        x = reference_layer(x, w[l], ws[l], splits)
    return x.astype(jnp.float32)


def reference_layer(x, w, ws, splits: int):
    """One layer of ``reference``: x [T, K] bf16, w [N, K] e4m3, ws [N] -> [T, N] bf16."""
    N, K = w.shape
    k_per = K // splits
    parts = x.astype(jnp.float32).reshape(T, splits, k_per)
    amax = jnp.max(jnp.abs(parts), axis=2, keepdims=True)
    inv = jnp.where(amax > 0, E4M3_MAX / amax, 1.0)
    q = (parts * inv).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    wf = w.astype(jnp.float32).reshape(N, splits, k_per)
    y = jnp.einsum("tsk,nsk->tsn", q, wf, precision="highest")
    y = y * jnp.where(amax > 0, amax / E4M3_MAX, 1.0) * ws.astype(jnp.float32)
    return jnp.sum(y.astype(jnp.bfloat16).astype(jnp.float32), axis=1).astype(jnp.bfloat16)


def layer_rel(xs, x0, w, ws, splits: int) -> float:
    """The largest error of one layer of the chain against ``reference_layer`` of the chain's
    own input to it (teacher-forced): over many layers the chain's last output drifts from
    the reference however right each layer is (a bf16 ulp of difference, e.g. from the
    reduce-add's order, moves e4m3 roundings in the next layer's quantization), so this is
    the correctness check; a stale read (a barrier that let one through) shows as O(1)."""
    ins = [x0] + [xs[l] for l in range(xs.shape[0] - 1)]
    ref = jax.jit(functools.partial(reference_layer, splits=splits))
    return max(rel_err(xs[l], ref(ins[l], w[l], ws[l]).astype(jnp.float32))
               for l in range(xs.shape[0]))


def xla_chain(x, ws_list, scales):
    """The engine's batch-1 fp8 projection (weight-only, XLA's dot) layer after layer."""
    from jaxllm.models.fp8 import fp8_linear  # noqa: PLC0415

    h = x
    for w, s in zip(ws_list, scales):
        h = fp8_linear(h, w, s, None)
    return h


def make_inputs(D: int, L: int, seed: int = 0):
    """x0 [T, D] bf16, w [L, D, D] e4m3 (|w| up to ~256), ws [L, D] so that each layer keeps
    the activations' scale (w * ws ~ N(0, 1 / D))."""
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(k[0], (T, D)).astype(jnp.bfloat16)
    w = jnp.clip(jax.random.normal(k[1], (L, D, D)) * 64, -448, 448).astype(jnp.float8_e4m3fn)
    ws = jax.random.uniform(k[2], (L, D), minval=0.5, maxval=1.5) / (64 * D ** 0.5)
    return x, w, ws


def chain_for(variant: str, splits: int, tile_k: int, steps: int):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: one of {VARIANTS}")
    return fp8_chain(splits, tile_k, steps, sync=variant != "nosync",
                     quantize_every_layer=variant != "sync_noq")


def main(argv=None):
    from persistent_chain import mosaic_parser, wall_us  # noqa: PLC0415

    a = mosaic_parser(__doc__, CANDS, VARIANTS, "splits x tile_k x stages").parse_args(argv)
    rows = []
    emit = gpu_trace.jsonl_emitter(rows, a.out)
    if a.smoke:
        D, L = 128, 3  # one CTA of 128 columns, no split: its own stores feed its next layer
        x, w, ws = make_inputs(D, L)
        ref = reference(x, w, ws, 1)
        out = fp8_chain(1, 128, 1, sync=False, interpret=True)(x, w, ws)[-1]
        emit(dict(variant="interpret", splits=1, tile_k=128, steps=1, dim=D, layers=L,
                  rel=rel_err(out, ref)))
        sds = jax.ShapeDtypeStruct
        ok = []
        for splits, tk, steps in CANDS:
            for v in VARIANTS:
                row = dict(variant=v, splits=splits, tile_k=tk, steps=steps, dim=4096, layers=4)
                ok.append(gpu_trace.lower_for_h100(
                    row, chain_for(v, splits, tk, steps), sds((T, 4096), jnp.bfloat16),
                    sds((4, 4096, 4096), jnp.float8_e4m3fn), sds((4, 4096), jnp.float32)))
                emit(row)
        return int(not all(ok) or rows[0]["rel"] > 2e-2)

    D, L = a.dim, a.layers
    x, w, ws = make_inputs(D, L)
    cands = [tuple(int(v) for v in c.split("x")) for c in a.cands.split(",")]
    ref = {sp: reference(x, w, ws, sp) for sp in {c[0] for c in cands}}
    wbytes = D * D  # e4m3 bytes a layer

    if a.stress:
        for splits, tk, steps in cands:
            for v in a.variants.split(","):
                if v != "xla":
                    fn = chain_for(v, splits, tk, steps)
                    row = stress_row(fn, (x, w, ws), lambda xs: xs[-1], ref[splits],
                                     a.stress, variant=v, splits=splits, tile_k=tk,
                                     steps=steps, D=D, L=L)
                    lr = sorted(layer_rel(fn(x, w, ws), x, w, ws, splits)
                                for _ in range(a.stress))
                    emit(dict(row, layer_rel_median=lr[len(lr) // 2], layer_rel_max=lr[-1]))
        return 0

    def check(name, fn, args, final, r, **cfg):
        row = dict(variant=name, D=D, L=L, **cfg)
        try:
            out = fn(*args)
            row["rel"] = rel_err(final(out), r)
            if "splits" in cfg:  # a chain of ours: each layer against its own input
                row["layer_rel"] = layer_rel(out, x, w, ws, cfg["splits"])
            us = wall_us(fn, args, a.calls, a.repeats) / L
            row.update(us_per_layer=round(us, 2), tb_s=round(wbytes / (us * 1e-6) / 1e12, 2))
            dev = gpu_trace.device_time(fn, [args], calls=3)
            if dev is not None:
                row.update(gpu_us_per_layer=round(dev["device_us"] / L, 2),
                           ops_per_layer=round(dev["ops_per_call"] / L, 2))
        except Exception as e:  # a candidate Mosaic refuses: say so, go on
            row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        emit(row)

    if "xla" in a.variants.split(","):
        # against the W8A8 reference of the first candidate's splits (W8A16 differs from it by
        # the activations' quantization: its rel says how far apart the two are)
        check("xla", jax.jit(xla_chain), (x, list(w), list(ws)), lambda h: h,
              ref[cands[0][0]])
    for splits, tk, steps in cands:
        for v in a.variants.split(","):
            if v != "xla":
                check(v, chain_for(v, splits, tk, steps), (x, w, ws), lambda xs: xs[-1],
                      ref[splits], splits=splits, tile_k=tk, steps=steps)
    print("\n| variant | K splits x tile_k x steps | µs / layer | TB/s | GPU-time µs / layer | "
          "rel | layer rel |\n|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        cfg = f"{r['splits']} x {r['tile_k']} x {r['steps']}" if "splits" in r else ""
        if "us_per_layer" in r:
            print(f"| {r['variant']} | {cfg} | {r['us_per_layer']} | {r['tb_s']} | "
                  f"{r.get('gpu_us_per_layer')} | {r['rel']:.1e} | "
                  f"{r.get('layer_rel', float('nan')):.1e} |")
        else:
            print(f"| {r['variant']} | {cfg} | {r.get('error', '')[:300]} | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
