"""A kernel a layer, its boundary hidden by the hardware: programmatic dependent launch (PDL) on
Mosaic GPU, the batch-1 lever the persistent chain left (DESIGN_NOTES "Where the route
stands").

The persistent chain (``mosaic_chain.py``) showed what the batch-1 gap is made of: a 33.5 MB GEMM
pays ~2.4 µs of ramp and tail as a kernel of its own, and a grid barrier in software costs as
much (0.9-1.4 µs a round alone, ~2 µs inside the chain: ``grid_barrier.py``). Hopper has the
barrier in hardware: a kernel launched with programmatic stream serialization may start while
the kernel before it still runs, once every CTA of that one has executed
``griddepcontrol.launch_dependents`` (or exited); ``griddepcontrol.wait`` then holds a thread
until the previous grid has completed and its writes are visible. Nothing a weight read needs
depends on the previous layer, so here:

- one ``pallas_call`` a layer (``x_{l+1} = x_l W_l^T``, W_l [N, K] bf16 as the engine holds it,
  T = 8 token rows), each CTA one (128-column tile, K split) unit, the body of
  ``mosaic_chain``: the product transposed (the weight's rows are wgmma's M, the tokens its N),
  a producer warpgroup streaming weight tiles ahead of two compute warpgroups;
- the producer starts streaming at once; only the compute warpgroup that loads the activations
  runs ``griddepcontrol.wait`` first (``plgpu.griddepcontrol_wait``: Mosaic then launches the
  kernel with PDL), so a CTA that lands while the previous layer drains has its weight ring
  full by the time the activations can be read;
- the K splits' partials are stored (no atomics, no zeroing: ``mosaic_gather``'s layout
  ``[splits, T, N]``) and summed in float32 by the next layer's reader; the last layer's by XLA;
- ``trigger``: where a CTA executes ``launch_dependents``: ``early`` (at its start: the next
  kernel is launched as soon as every CTA of this one runs, and its CTAs take SMs as this one's
  leave), ``late`` (after its epilogue's store is issued), or ``none`` (the implicit trigger
  at the CTA's exit).

Variants: ``pdl_early``, ``pdl_late``, ``pdl_none``; ``plain`` (the same kernels without the
wait, so launched without PDL: stream order, what PDL buys); ``pdl_early_xla`` (an XLA
elementwise kernel between the layers, as the engine's norms and residual adds sit between its
GEMMs: does PDL still overlap across XLA's own kernels?); ``_narrow`` (one compute warpgroup
a CTA, < 113 KB of SMEM: two CTAs fit an SM's SMEM, registers unchecked); against XLA's
chain of dots and the persistent ``mosaic_chain`` ``sync`` form in the same run. Figures as
``mosaic_chain.py``: µs a layer by wall time of back-to-back calls (GPU-bound), the float32
reference's relative error. ``--stress N``: every output against the reference N times (a
missing wait shows as an outlier).

Measured on the H200 (2026-12-04, RESULTS "Rerun of 2026-12-04 (02:58)"): correct in every
PDL form (20 stressed calls each, no outliers), and **no form faster than the same kernels without
PDL** (11.9-12.3 µs a layer wide, 13.2-13.9 narrow; XLA's chain 11.75-12.58; the persistent
``sync`` chain 10.52), with or without XLA's command buffers: PDL does not hide the launch's
ramp and tail here.

    python3 benchmarks/gpu/mosaic_pdl.py [--layers 32] [--cands 4x128x4,4x64x4] [--out F]
    python3 benchmarks/gpu/mosaic_pdl.py --stress 30 --variants pdl_early,pdl_late
    python3 benchmarks/gpu/mosaic_pdl.py --smoke   # CPU: interpret + lowering checks

On the CPU the interpreter runs the ``plain`` form (it has no ``griddepcontrol``), wide and
narrow, with one K split and with two, against the reference, and every form lowers for an
abstract H100.
"""
from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # imported by the tests too
import gpu_trace  # noqa: E402
from mosaic_chain import (T, WG_N, chain_checker, launch, print_chain_table,  # noqa: E402
                          reference, rel_err, stress_row, weight_pipeline, xla_chain)
from mosaic_gather import layer_units, mma_step, sum_partials  # noqa: E402

TRIGGERS = ("early", "late", "none")
VARIANTS = ("pdl_early", "pdl_late", "pdl_none", "plain", "pdl_early_xla", "plain_xla",
            "pdl_early_narrow", "pdl_late_narrow", "plain_narrow")
CANDS = ((4, 128, 4), (4, 64, 4), (4, 128, 2), (2, 128, 4))  # (K splits, tile_k, stages)
# the narrow CTA's (one compute warpgroup, < 113 KB of SMEM: two fit an SM's SMEM)
NARROW_CANDS = ((2, 128, 2), (2, 64, 4))


def pdl_layer(splits: int, tile_k: int, steps: int, *, pdl: bool = True,
              trigger: str = "early", narrow: bool = False, interpret: bool = False):
    """``fn(parts_in [S_in, T, K] bf16, w [N, K] bf16) -> parts [splits, T, N] bf16``: the
    layer's input is the sum of ``parts_in`` (the previous layer's K splits' partials, or one
    activation array), its output this layer's partials: ``parts.sum(0) = parts_in.sum(0) @ w.T``
    (float32 sums, bf16 between). ``pdl``: the activations' loader waits for the previous grid
    (``griddepcontrol.wait``, and so a PDL launch); ``trigger``: where each CTA lets the next
    kernel launch (module docstring; only with ``pdl``). ``narrow``: a CTA of one compute
    warpgroup (64 columns) and the partials' two halves loaded one after the other into one
    buffer, so that with the candidates' small rings two CTAs fit an SM's SMEM (whether its
    registers take two was not checked): the next layer's CTAs
    can land beside this one's and fill their rings while it runs (with one CTA an SM they
    only take an SM as one of this layer's leaves)."""
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if trigger not in TRIGGERS:
        raise ValueError(f"trigger {trigger!r} is not one of {TRIGGERS}")
    if trigger != "none" and not pdl:
        raise ValueError("a trigger without the wait would let the next layer read early")
    bf16, f32 = jnp.bfloat16, jnp.float32

    def kernel(pin_gmem, w_gmem, part_gmem, *, dims):
        S_in, N, K = dims
        cwgs = 1 if narrow else 2
        cta_n, k_per, half, _, tf, n_idx, s = layer_units(N, K, splits, tile_k, steps, cwgs)
        pipeline = functools.partial(weight_pipeline, k_per=k_per, tile_k=tile_k,
                                     cta_n=cta_n, steps=steps, transforms=tf,
                                     compute_wgs=cwgs)
        ignore = lambda *_, **__: None  # noqa: E731

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(ignore, ignore).get_allocations(w_gmem),
            x_smem=plgpu.SMEM((2, T, half), bf16, transforms=tf),  # the K slice, two halves
            p_smem=plgpu.SMEM((cwgs, S_in, T, half), bf16, transforms=tf),
            out_smem=plgpu.SMEM((cwgs, T, WG_N), bf16, transforms=tf),
            x_bar=plgpu.Barrier(num_barriers=2),
            wg_bar=plgpu.Barrier(num_arrivals=2),
            collective_axes="wg")
        def _scope(allocs, x_smem, p_smem, out_smem, x_bar, wg_bar):
            wg = lax.axis_index("wg")
            if pdl and trigger == "early":
                plgpu.griddepcontrol_launch_dependents()

            def both_wgs():
                if cwgs == 2:
                    plgpu.barrier_arrive(wg_bar)
                    plgpu.barrier_wait(wg_bar)

            def load_partials(h):
                plgpu.copy_gmem_to_smem(pin_gmem.at[:, :, pl.ds(s * k_per + h * half, half)],
                                        p_smem.at[h % cwgs], x_bar.at[h])

            def ctx(eval_pipeline):
                # Compute warpgroup 0 sums the partials of its K slice (after the previous
                # grid is done with them); 1 meets it at the CTA barrier.
                @pl.when(wg == 0)
                @jax.named_scope("xload")
                def _():
                    if pdl:
                        plgpu.griddepcontrol_wait()
                    if cwgs == 2:  # both halves in flight at once
                        load_partials(0)
                        load_partials(1)
                    for h in range(2):
                        if cwgs == 1:  # one buffer: the first half's reads are done
                            if h:
                                plgpu.commit_smem()
                            load_partials(h)
                        plgpu.barrier_wait(x_bar.at[h])
                        sum_partials(p_smem.at[h % cwgs], x_smem.at[h], S_in)
                    plgpu.commit_smem()
                both_wgs()

                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((WG_N, T), f32))
                def _acc(acc_ref):
                    eval_pipeline(acc_ref)
                    out_smem.at[wg].transpose((1, 0))[...] = acc_ref[...].astype(bf16)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(out_smem.at[wg], part_gmem.at[s].at[
                        :, pl.ds(n_idx * cta_n + wg * WG_N, WG_N)])
                    if pdl and trigger == "late":
                        plgpu.griddepcontrol_launch_dependents()

            def mma(idxs, w_smem, acc_ref):
                return mma_step(acc_ref, w_smem, x_smem, wg, idxs[0], tile_k, half)

            pipeline(mma, ctx)(w_gmem.at[pl.ds(n_idx * cta_n, cta_n), pl.ds(s * k_per, k_per)],
                               allocations=allocs)

        plgpu.wait_smem_to_gmem(0)

    def fn(pin, w):
        N, K = w.shape
        cwgs = 1 if narrow else 2
        return launch(functools.partial(kernel, dims=(pin.shape[0], N, K)),
                      jax.ShapeDtypeStruct((splits, T, N), bf16), N // (cwgs * WG_N) * splits,
                      interpret=interpret, compute_wgs=cwgs)(pin, w)

    return fn


def pdl_chain(splits: int, tile_k: int, steps: int, *, pdl: bool = True,
              trigger: str = "early", between_xla: bool = False, narrow: bool = False,
              interpret: bool = False):
    """``jit(fn)``, ``fn(x0 [T, K] bf16, ws: list of [N, K] bf16) -> x_L [T, N] bf16``: one
    ``pdl_layer`` launch a layer (separate weight arrays: a slice of a stacked one could cost
    XLA a copy), the last layer's partials summed by XLA. ``between_xla``: the partials go
    through an XLA elementwise kernel between the layers (times a runtime 1.0: kept, not
    folded), as the engine's GEMMs have XLA's kernels between them."""
    layer = pdl_layer(splits, tile_k, steps, pdl=pdl, trigger=trigger, narrow=narrow,
                      interpret=interpret)

    def fn(x0, ws, one=None):
        p = x0[None]
        for w in ws:
            p = layer(p, w)
            if between_xla:
                p = p * one
        return p.astype(jnp.float32).sum(0).astype(jnp.bfloat16)

    return jax.jit(fn)


def chain_of(variant: str, splits: int, tile_k: int, steps: int, interpret: bool = False):
    """The chain of a variant's name: ``pdl_<trigger>`` or ``plain``, then ``_xla`` for an XLA
    kernel between the layers or ``_narrow`` for the narrow CTA. A name outside ``VARIANTS``
    is a ValueError."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: one of {VARIANTS}")
    parts = variant.split("_")
    pdl = parts[0] == "pdl"
    return pdl_chain(splits, tile_k, steps, pdl=pdl, trigger=parts[1] if pdl else "none",
                     between_xla="xla" in parts, narrow="narrow" in parts,
                     interpret=interpret)


def main(argv=None):
    from persistent_chain import chain_parser  # noqa: PLC0415

    ap = chain_parser(__doc__)
    ap.add_argument("--cands", default=",".join("x".join(map(str, c)) for c in CANDS),
                    help="splits x tile_k x steps, comma-separated")
    ap.add_argument("--narrow-cands",
                    default=",".join("x".join(map(str, c)) for c in NARROW_CANDS),
                    help="the same, for the _narrow variants")
    ap.add_argument("--variants", default="xla,persistent," + ",".join(VARIANTS),
                    help="xla (XLA's dots), persistent (mosaic_chain's sync form, at the "
                         "first candidate), and " + ", ".join(VARIANTS))
    ap.add_argument("--stress", type=int, default=0, metavar="N",
                    help="instead of timing: each variant x candidate called N times, every "
                         "output against the reference")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true",
                    help="CPU: the interpreted plain chain (wide and narrow, one and two K "
                         "splits) against the reference, and every variant lowered for an "
                         "abstract H100")
    a = ap.parse_args(argv)
    rows = []
    emit = gpu_trace.jsonl_emitter(rows, a.out)
    key = jax.random.PRNGKey(0)
    one = jnp.ones((), jnp.bfloat16)
    if a.smoke:
        # no griddepcontrol in the interpreter: the plain form, wide and narrow CTAs, one K
        # split (D = 128) and two (D = 256: every layer but the first sums two partials)
        L = 3
        for D, splits, tk, steps, narrow in ((128, 1, 64, 1, False), (128, 1, 32, 2, False),
                                             (256, 2, 64, 1, False), (256, 2, 32, 2, True),
                                             (128, 1, 64, 1, True)):
            x = jax.random.normal(key, (T, D)).astype(jnp.bfloat16)
            w = (jax.random.normal(jax.random.PRNGKey(1), (L, D, D)) / D ** 0.5).astype(
                jnp.bfloat16)
            ref = reference(x, w)
            out = pdl_chain(splits, tk, steps, pdl=False, trigger="none", narrow=narrow,
                            interpret=True)(x, list(w))
            emit(dict(variant="interpret_narrow" if narrow else "interpret", splits=splits,
                      tile_k=tk, steps=steps, dim=D, layers=L,
                      rel=rel_err(out, ref)))
        sds = jax.ShapeDtypeStruct
        ok = []
        D, L = 4096, 2
        for i, (splits, tk, steps) in enumerate(CANDS + NARROW_CANDS):
            for v in (VARIANTS if i == 0 else ("pdl_early",) if i < len(CANDS)
                      else ("pdl_early_narrow",)):
                row = dict(variant=v, splits=splits, tile_k=tk, steps=steps, dim=D, layers=L)
                ok.append(gpu_trace.lower_for_h100(
                    row, chain_of(v, splits, tk, steps), sds((T, D), jnp.bfloat16),
                    [sds((D, D), jnp.bfloat16)] * L, sds((), jnp.bfloat16)))
                emit(row)
        return int(not all(ok))

    D, L = a.dim, a.layers
    x = jax.random.normal(key, (T, D)).astype(jnp.bfloat16)
    w = (jax.random.normal(jax.random.PRNGKey(1), (L, D, D)) / D ** 0.5).astype(jnp.bfloat16)
    ws = list(w)
    ref = reference(x, w)
    parse = lambda cs: [tuple(int(v) for v in c.split("x")) for c in cs.split(",")]  # noqa
    cands, narrow_cands = parse(a.cands), parse(a.narrow_cands)
    variants = a.variants.split(",")
    runs = [(v, c) for v in variants if v not in ("xla", "persistent")
            for c in (narrow_cands if "narrow" in v else cands)]

    if a.stress:
        for v, (splits, tk, steps) in runs:
            emit(stress_row(chain_of(v, splits, tk, steps), (x, ws, one), lambda h: h,
                            ref, a.stress, variant=v, splits=splits, tile_k=tk,
                            steps=steps, D=D, L=L))
        return 0

    check = chain_checker(emit, ref, D, L, a.calls, a.repeats)
    if "xla" in variants:
        check("xla", jax.jit(xla_chain), (x, ws))
    if "persistent" in variants:
        from mosaic_chain import chain_for  # noqa: PLC0415
        splits, tk, steps = cands[0]
        check("persistent", chain_for("sync", splits, tk, steps), (x, w), lambda xs: xs[-1],
              splits=splits, tile_k=tk, steps=steps)
    for v, (splits, tk, steps) in runs:
        check(v, chain_of(v, splits, tk, steps), (x, ws, one), splits=splits, tile_k=tk,
              steps=steps)
    print_chain_table(rows, D)
    return 0


if __name__ == "__main__":
    sys.exit(main())
