"""A persistent chain of batch-1 GEMMs on Mosaic GPU: does a grid barrier hide under the weight
stream? The first experiment DESIGN_NOTES names for the batch-1 gap ("Next GPU session").

The gap between batch-1 decode (4.11 ms/token bf16) and its roofline (3.46) is the ramp and tail
each kernel pays (~2.4 µs a GEMM: XLA's o GEMM takes 9.8 µs as a kernel of its own, 7.35 µs
a layer inside a 1 GiB stream). A persistent kernel runs the layers in one launch; the Triton
form (``persistent_chain.py``) was refuted because its barrier costs what a launch costs: every
program waits at the barrier with nothing in flight. Here the weight loads do not wait:

- the chain ``x_{l+1} = x_l W_l^T`` over L layers, W_l [N, K] bf16 as the engine holds it (the
  o projection's 4096 x 4096 by default), T = 8 token rows (the batch-1 decode bucket);
- one CTA per (128-column tile, K split): 32 x 4 = 128 CTAs for the o shape, all resident;
- the product transposed (y^T = W x^T: the weight's 64-row slices are wgmma's A, the token-major
  activations x [T, K] read transposed its B, both K-major as they lie, one 128 B swizzle), so
  the tokens are wgmma's N and nothing is padded to 64; the y^T tile goes back token-major
  through a transposed view of its SMEM tile;
- a warp-specialized pipeline per layer (``emit_pipeline_warp_specialized``): a producer
  warpgroup streams only weight tiles; the pipelines of successive layers are chained
  (``pipeline_state`` START / STEADY / STOP), so the producer issues layer l+1's first tiles as
  soon as layer l's last slots are consumed, without waiting for anyone;
- the two compute warpgroups (64 columns each) wait at the grid barrier (a GMEM semaphore,
  ``plgpu.semaphore_wait(decrement=False)`` on a monotone count, GPU-scope atomics) only for the
  activations: they load x_l's K slice (TMA) after it, while the weight tiles are already
  landing;
- the K splits' partials meet in GMEM by TMA reduce-add (bf16) into a zeroed x_{l+1}; each
  compute warpgroup signals the semaphore once its add is complete.

Measured on the H200 (2026-12-03, RESULTS "Rerun of 2026-12-03 (13:09)" and "(15:37)"): correct,
and 10.2-10.4 µs a layer against XLA's chain of kernels at 11.7-12.2 (-12 to -15%); the barrier
costs ~2.0 µs a layer over the body (8.1-8.4). Under the profiler (``--profile``) the signal's
release fence takes 2.2 µs of each epilogue (~0.6 µs of the critical path); a relaxed signal
is faster and wrong in 12-17% of calls (``--stress``); the rest is the poll's propagation and
the slowest CTA of each layer. A deeper run-ahead (``_flat``, up to 11 x 16 KB) changes nothing:
the weight stream itself slows while the fence runs.

Variants: ``sync`` (correct; the semaphore's atomics at GPU scope), ``sync_sys`` (system scope,
Pallas' default), ``sync_slice`` (a semaphore per K slice: a CTA waits only for the CTAs that
write its slice of the next activations), ``nosync`` (no barrier: wrong results, what the
barrier costs), against XLA's chain of dots in the same run and the float32 reference (bf16
between layers). Timing only, wrong results: ``_noadd`` / ``_nox`` (ablations), ``_relaxed``
and ``_proxy`` (the signal without its release fence: stale reads in some calls); correct
forms of the signal's fence: ``_acqrel``, ``_relfence``; ``_postfence`` (the fence after a
relaxed add: its stall without its ordering, timing only); ``_zerowait`` (the zeroing polled every
layer, the form before 15:37 on 2026-12-03); ``gather`` / ``gather_nopoll``: no signal between
layers, the K splits' partials polled by their readers (``mosaic_gather.py``: correct and slower,
11.4-11.6 against 10.2-10.5 µs a layer on 2026-12-03, RESULTS "(19:20)"); ``dyn*``: a
layer's units claimed from a counter (``mosaic_dynamic.py``: correct and no faster, RESULTS
"(23:30)"); ``sync_pfN``: the release form with 4 more CTAs that prefetch the first N steps of
every CTA's share of the next layer into the L2 as the grid enters a layer (the DRAM reads on
through the barrier; the L2 holds 50 MB, a layer 33.5), ``sync_selfpfN`` the same prefetch by
the compute warpgroups, tile by tile: both slower (RESULTS "(23:59)": 4 SMs prefetch ~0.8 TB/s,
so they set the kernel's length; prefetches from the streaming SMs cost 0.9-2 µs a layer).
Figures as ``persistent_chain.py``: µs a layer by wall time of back-to-back calls, GPU time.

    python3 benchmarks/gpu/mosaic_chain.py [--layers 32] [--cands 4x128x4,4x64x8] [--out F]
    python3 benchmarks/gpu/mosaic_chain.py --smoke   # CPU: interpret + lowering checks
    python3 benchmarks/gpu/mosaic_chain.py --profile DIR --variants sync --cands 4x128x4
    python3 benchmarks/gpu/mosaic_chain.py --stress 60 --variants sync,sync_relaxed

On the CPU, Mosaic GPU's interpreter runs neither semaphores nor TMA reductions, so ``--smoke``
runs the chain interpreted in the form that needs neither (one CTA, no K split: its own stores
feed its next layer) against the reference, and lowers the GPU forms for an abstract H100.
"""
from __future__ import annotations

import functools
import re
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import gpu_trace  # noqa: E402
from pallas_kernels.fp8_decode_mgpu import T, WG_N, launch, weight_pipeline  # noqa: E402

PROFILE_SPACE = 640  # ranges a warpgroup may record: 12 a layer, 32 layers, and slack


def mosaic_chain(splits: int, tile_k: int, steps: int, *, sync: bool = True,
                 reduce: bool = True, scope: str = "gpu", per_slice: bool = False,
                 ablate: frozenset = frozenset(), num_sms: int | None = None,
                 interpret: bool = False, profile_dir: str | None = None,
                 relaxed: bool | str = False, flat: bool = False, prefetch: int = 0,
                 prefetch_ctas: int = 4, self_prefetch: int = 0):
    """``fn(x0 [T, K] bf16, w [L, N, K] bf16) -> xs [L, T, N]``: xs[l] = x_l W_l^T, x_0 = x0,
    x_{l+1} = xs[l]. N == K (a chain).
    Each warpgroup's product is y^T = W x^T (the weight's 64-row slice as wgmma's A, x's K slice
    read transposed as its B: both K-major as they lie, one 128 B swizzle), stored back
    transposed through a transposed view of its SMEM tile (token-major, as the next layer reads
    it). ``reduce``: the K splits' partials are TMA-added into xs (zeroed
    first by the split-0 CTAs); without it (``splits`` must be 1) each tile is stored.
    ``sync``: a grid barrier (GMEM semaphore) before each layer's activations and before the
    first add; without it the layers race (timing only, unless one CTA runs alone). ``scope``:
    the semaphore's atomics' memory scope ("gpu": one GPU's CTAs; "sys", Pallas' default).
    ``per_slice``: instead of the whole grid, a CTA waits only for the CTAs that write its K
    slice of the next activations (a semaphore per slice: 2 x 32 of the 256 warpgroups' adds
    for the o shape at 4 splits), so it does not wait for the slowest CTA of all.
    ``ablate`` (timing only: the results are wrong) takes a link out of the chain of latencies
    between a layer's last wgmma and the next one's first, to read what each costs: "noadd"
    stores the split partials instead of TMA-adding them; "nox" loads the activations once, at
    layer 0, and never again after the barrier; "zerowait" (correct, the form measured before
    15:37 on 2026-12-03) polls the zeroing's count before every layer's add, not only layer 0's.
    A grid barrier needs every CTA resident at once (one a SM: the SMEM each takes), so
    ``sync`` refuses a grid larger than ``num_sms`` (default: the GPU's; unchecked where the
    device does not say, e.g. lowering on the CPU) instead of hanging the GPU.
    ``relaxed``: the signal is a relaxed atomic add, not a release one (Pallas' only form):
    the TMA add it publishes has completed already (``wait_smem_to_gmem(0)``), and the release
    cost ~2.2 µs a layer here (profile of 2026-12-03 15:44). ``"proxy"`` / ``"acq_rel"``: the
    relaxed add after ``fence.proxy.async.global`` / ``fence.acq_rel.gpu``; ``"release"``:
    after ``fence.release.gpu`` (PTX's lighter release-only fence); ``"post_acq_rel"``: the
    relaxed add, then ``fence.acq_rel.gpu`` (the fence's stall without its ordering) (which of
    the release's parts costs; whether the add without it ever reads stale data: ``--stress``).
    ``flat``: one warp-specialized pipeline over all L x K/tile_k steps of a CTA (the layer's
    barrier, activations and epilogue at its first and last steps) instead of a chained
    pipeline a layer, so ``steps`` (the stages of run-ahead) need not divide a layer's steps
    and can fill the SMEM (the chained form stops at 4 x 32 KB at the o shape).
    ``prefetch``: ``prefetch_ctas`` more CTAs (the SMs the grid leaves idle: 4 of 132 at the
    o shape) stream nothing; as the grid enters layer m (its barrier's count) they issue TMA
    prefetches into the L2 of the first ``prefetch`` steps of every CTA's share of layer m+1
    (all of it at ``k_per // tile_k``), so the DRAM keeps reading through the barrier and the
    streaming SMs' TMA loads find their tiles in the L2. They signal nothing, so no release
    fence of theirs holds their requests. ``self_prefetch``: instead, each compute warpgroup
    prefetches its half of tile (l+1, kk) as it consumes tile (l, kk), for kk below it.
    ``profile_dir``: Mosaic GPU's on-device profiler records each warpgroup's named regions
    (``zero``, then a layer's ``wait`` (the barrier), ``xload``, ``pipe`` with its steps'
    ``mma``, ``epi``) and writes a trace a call there (``profile_summary`` reads it)."""
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if not reduce and splits != 1:
        raise ValueError("K splits need the reduce-add")
    bf16 = jnp.bfloat16

    def kernel(x0_gmem, w_gmem, xs_gmem, *, dims):
        L, N, K = dims  # w_gmem is [L, N, K], or [L * N, K] for the flat pipeline
        cta_n, k_per = 2 * WG_N, K // splits
        n_tiles = N // cta_n
        if (N % cta_n or K % (splits * tile_k) or (not flat and (k_per // tile_k) % steps)
                or K != N or (N // cta_n) % splits):
            raise ValueError(f"{L} x {N} x {K} does not tile by {cta_n} / {splits} x {tile_k} "
                             f"/ {steps} steps")
        G = n_tiles * splits  # CTAs: one unit each, every layer
        pf_ctas = prefetch_ctas if prefetch else 0
        if prefetch and (not sync or flat or N % (pf_ctas * 256)):
            raise ValueError("the L2 prefetchers pace themselves by the grid barrier of the "
                             f"chained form, and take N / {pf_ctas} rows each in 256s")
        if self_prefetch and flat:
            raise ValueError("self_prefetch is a form of the chained pipeline, not the flat one")
        sms = num_sms or (None if interpret else getattr(jax.devices()[0], "core_count", None))
        if sync and sms is not None and G + pf_ctas > sms:
            raise ValueError(f"a grid barrier over {G + pf_ctas} CTAs ({n_tiles} column tiles x "
                             f"{splits} K splits, {pf_ctas} prefetchers) needs them all "
                             f"resident, and the GPU has {sms} SMs: use fewer K splits")
        wg_sw = plgpu.find_swizzle(tile_k * 2 * 8)
        w_tf = (plgpu.TilingTransform((8, wg_sw // 2)), plgpu.SwizzleTransform(wg_sw))
        cta = lax.axis_index("cluster_grid")
        n_idx, s = cta % n_tiles, cta // n_tiles
        k_slice = pl.ds(s * k_per, k_per)

        pipeline = functools.partial(weight_pipeline, k_per=k_per, tile_k=tile_k,
                                     cta_n=cta_n, steps=steps, transforms=w_tf)
        ignore = lambda *_, **__: None  # noqa: E731

        @functools.partial(
            pl.run_scoped,
            **({} if flat else dict(allocs=pipeline(ignore, ignore, 0 if L > 1 else None)
                                    .get_allocations(w_gmem.at[0]))),
            x_smem=plgpu.SMEM((2, T, k_per), bf16, transforms=w_tf),
            out_smem=plgpu.SMEM((2, T, WG_N), bf16, transforms=w_tf),
            x_bar=plgpu.Barrier(num_barriers=2),
            wg_bar=plgpu.Barrier(num_arrivals=2),
            prev_smem=plgpu.SMEM((2, WG_N, T) if flat else (1,), jnp.float32),
            collective_axes="wg")
        def _scope(x_smem, out_smem, x_bar, wg_bar, prev_smem, allocs=None):
            wg = lax.axis_index("wg")
            sem = pl.get_global(plgpu.SemaphoreType.REGULAR) if sync else None
            slice_sems = (pl.get_global(plgpu.SemaphoreType.REGULAR((splits,)))
                          if sync and per_slice else None)
            is_compute = wg < 2
            # the grid's barrier count once every warpgroup has added layer l - 1 (phase 0 the
            # zeroing): what layer l's activations wait for
            entered = lambda l: 2 * G * (l + 1 if reduce else l)  # noqa: E731

            if pf_ctas:
                @pl.when((cta >= G) & (wg == 0))
                def _prefetcher():
                    rows = N // pf_ctas

                    @pl.loop(0, L - 1)
                    def _(m):  # the grid enters layer m: layer m + 1's first steps to the L2
                        pl.when(m > 0)(lambda: plgpu.semaphore_wait(
                            sem, entered(m), decrement=False, memory_scope=scope))
                        for kk in range(min(prefetch, k_per // tile_k)):  # in reading order
                            for sp in range(splits):
                                @pl.loop(0, rows // 256)
                                def _(r):
                                    plgpu.async_prefetch(w_gmem.at[m + 1].at[
                                        pl.ds((cta - G) * rows + r * 256, 256),
                                        pl.ds(sp * k_per + kk * tile_k, tile_k)])

            # Phase 0: the split-0 CTAs zero their columns of every layer's output (the other
            # splits add into them); every compute warpgroup signals once.
            if reduce:
                @pl.when((is_compute & (cta < G)) if pf_ctas else is_compute)
                @jax.named_scope("zero")
                def _zero():
                    @pl.when(s == 0)
                    def _():
                        # an accumulator starts at zero (a splat stored here will not lower)
                        @functools.partial(pl.run_scoped,
                                           zero_ref=plgpu.ACC((WG_N, T), jnp.float32))
                        def _(zero_ref):
                            out_smem.at[wg].transpose((1, 0))[...] = zero_ref[...].astype(bf16)
                        plgpu.commit_smem()

                        @pl.loop(0, L)
                        def _(l):
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[wg],
                                xs_gmem.at[l].at[:, pl.ds(n_idx * cta_n + wg * WG_N, WG_N)])
                        plgpu.wait_smem_to_gmem(0)
                    if sync:
                        plgpu.semaphore_signal(sem, 1, memory_scope=scope)

            def layer_start(l):
                # The activations of layer l: every compute warpgroup of the previous layer has
                # added its tile (count 2G per phase, phase 0 the zeroing).
                if sync:
                    @pl.when(l > 0)
                    @jax.named_scope("wait")
                    def _():
                        if per_slice:  # 2 n_tiles adds a layer land in each K slice
                            plgpu.semaphore_wait(slice_sems.at[s], 2 * n_tiles * l,
                                                 decrement=False, memory_scope=scope)
                        else:
                            plgpu.semaphore_wait(sem, entered(l), decrement=False,
                                                 memory_scope=scope)

                @jax.named_scope("xload")
                def xload():
                    @pl.when(l == 0)
                    def _():
                        plgpu.copy_gmem_to_smem(x0_gmem.at[:, k_slice], x_smem.at[wg],
                                                x_bar.at[wg])

                    if "nox" in ablate:  # the layer-0 activations stay
                        pl.when(l == 0)(lambda: plgpu.barrier_wait(x_bar.at[wg]))
                    else:
                        @pl.when(l > 0)
                        def _():
                            plgpu.copy_gmem_to_smem(xs_gmem.at[l - 1].at[:, k_slice],
                                                    x_smem.at[wg], x_bar.at[wg])

                        plgpu.barrier_wait(x_bar.at[wg])
                xload()

            @jax.named_scope("epi")
            def epilogue(acc_ref, l):
                dst = xs_gmem.at[l].at[:, pl.ds(n_idx * cta_n + wg * WG_N, WG_N)]
                with jax.named_scope("store"):
                    acc = acc_ref[...]
                    if flat:
                        acc, prev_smem.at[wg][...] = acc - prev_smem.at[wg][...], acc
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    out_smem.at[wg].transpose((1, 0))[...] = acc.astype(bf16)
                    plgpu.commit_smem()
                if reduce and sync:
                    # The zeroing is done everywhere. Only layer 0 asks: a later layer's
                    # barrier already waited for it (the count includes phase 0). Polling it
                    # every layer (the profile of 2026-12-03 15:37 suspected it) cost 0.1 µs.
                    zero_wait = lambda: plgpu.semaphore_wait(  # noqa: E731
                        sem, 2 * G, decrement=False, memory_scope=scope)
                    if "zerowait" in ablate:  # the old form, every layer
                        zero_wait()
                    else:
                        pl.when(l == 0)(zero_wait)
                with jax.named_scope("add"):
                    plgpu.copy_smem_to_gmem(out_smem.at[wg], dst,
                                            reduction_op="add" if reduce and "noadd"
                                            not in ablate else None)
                    plgpu.wait_smem_to_gmem(0)  # written, not only read
                if sync:
                    # the next layer's K slice these columns fall in
                    target = (slice_sems.at[n_idx // (n_tiles // splits)] if per_slice
                              else sem)
                    with jax.named_scope("signal"):
                        if relaxed:
                            relaxed_signal(target, scope, None if relaxed is True else relaxed)
                        else:
                            plgpu.semaphore_signal(target, 1, memory_scope=scope)
                else:  # one CTA: its two compute warpgroups meet (each reads both)
                    plgpu.barrier_arrive(wg_bar)
                    plgpu.barrier_wait(wg_bar)

            @jax.named_scope("mma")
            def mma_step(kk, w_smem, acc_ref):
                plgpu.wgmma(acc_ref, w_smem.at[pl.ds(wg * WG_N, WG_N)],
                            x_smem.at[wg].at[:, pl.ds(kk * tile_k, tile_k)].transpose((1, 0)))
                plgpu.wgmma_wait(0)

            if flat:
                # One pipeline over every layer's steps: the stage count need not divide a
                # layer's steps, so more of the SMEM can hold run-ahead.
                S = k_per // tile_k

                def ctx(eval_pipeline):
                    layer_start(0)

                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((WG_N, T), jnp.float32))
                    def _acc(acc_ref):
                        prev_smem.at[wg][...] = acc_ref[...]  # zeros
                        eval_pipeline(acc_ref)

                def body(idxs, w_smem, consumed, acc_ref):
                    (step,) = idxs
                    l, kk = step // S, step % S
                    mma_step(kk, w_smem, acc_ref)
                    # The slot goes back to the producer before the layer's end and the next
                    # layer's barrier, so every stage can run ahead while this side waits.
                    plgpu.barrier_arrive(consumed)

                    # The accumulator runs on over every layer (the interpreter cannot store
                    # into one); a layer's product is its value less the one it had before.
                    @pl.when(kk == S - 1)
                    def _():
                        epilogue(acc_ref, l)
                        pl.when(l < L - 1)(lambda: layer_start(l + 1))
                    return acc_ref

                plgpu.emit_pipeline_warp_specialized(
                    body, grid=(L * S,), memory_registers=40,
                    in_specs=[plgpu.BlockSpec(
                        (cta_n, tile_k), lambda step: ((step // S) * n_tiles + n_idx,
                                                       s * S + step % S),
                        transforms=w_tf, memory_space=plgpu.SMEM)],
                    wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=steps,
                    compute_context=ctx, manual_consumed_barriers=True)(w_gmem)
                return

            def streaming():  # every CTA but the prefetchers
                @pl.loop(0, L)
                def _layer(l):
                    def ctx(eval_pipeline):
                        layer_start(l)

                        @functools.partial(pl.run_scoped,
                                           acc_ref=plgpu.ACC((WG_N, T), jnp.float32))
                        def _acc(acc_ref):
                            with jax.named_scope("pipe"):
                                eval_pipeline(acc_ref)
                            epilogue(acc_ref, l)

                    def mma(idxs, w_smem, acc_ref):
                        mma_step(idxs[0], w_smem, acc_ref)
                        if self_prefetch:  # this warpgroup's half of tile (l + 1, kk)
                            @pl.when((l < L - 1) & (idxs[0] < self_prefetch))
                            def _():
                                plgpu.async_prefetch(w_gmem.at[l + 1].at[
                                    pl.ds(n_idx * cta_n + wg * WG_N, WG_N),
                                    pl.ds(s * k_per + idxs[0] * tile_k, tile_k)])
                        return acc_ref

                    state = None
                    if L > 1:
                        state = jnp.where(l == 0, 0, jnp.where(l == L - 1, 2, 1))
                    pipeline(mma, ctx, state)(
                        w_gmem.at[l].at[pl.ds(n_idx * cta_n, cta_n), k_slice],
                        allocations=allocs)

            if pf_ctas:
                pl.when(cta < G)(streaming)
            else:
                streaming()

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def fn(x0, w):
        L, N, K = w.shape
        f = launch(functools.partial(kernel, dims=(L, N, K)),
                   jax.ShapeDtypeStruct((L, T, N), bf16),
                   N // (2 * WG_N) * splits + (prefetch_ctas if prefetch else 0),
                   interpret=interpret, profile_dir=profile_dir, profile_space=PROFILE_SPACE)
        return f(x0, w.reshape(L * N, K) if flat else w)

    return jax.jit(fn)


def relaxed_signal(sem, scope: str, fence: str | None = None):
    """``semaphore_signal(sem, 1)`` as a relaxed atomic add (``red.relaxed``): no release
    fence. Pallas emits ``red.release``; this is the same add through ``inline_mgpu``, after
    ``fence`` ("proxy": ``fence.proxy.async.global``, the TMA writes ordered before the
    thread's generic operations; "acq_rel": ``fence.acq_rel.gpu``, what a release implies;
    "release": ``fence.release.gpu``), or with "post_acq_rel" followed by
    ``fence.acq_rel.gpu`` (the fence's cost without its ordering). Only the two release
    fences make the add correct (``--stress`` on the H200, 2026-12-03)."""
    import jax.experimental.mosaic.gpu as mgpu
    from jax.experimental.pallas import mosaic_gpu as plgpu

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
    def signal(ctx, sem_ref):
        del ctx
        mgpu.utils.warpgroup_barrier()
        ptx = {None: None, "post_acq_rel": None, "proxy": "fence.proxy.async.global;",
               "acq_rel": "fence.acq_rel.gpu;", "release": "fence.release.gpu;"}[fence]
        if ptx:
            mgpu.utils.inline_ptx(ptx, has_side_effects=True)
        mgpu.utils.SemaphoreRef(mgpu.utils.memref_ptr(sem_ref)).signal(
            1, relaxed=True, memory_scope=scope)
        if fence == "post_acq_rel":  # the fence's cost without its ordering (timing only)
            mgpu.utils.inline_ptx("fence.acq_rel.gpu;", has_side_effects=True)

    signal(sem)


def xla_chain(x, ws):
    """XLA's dots over a list of weights [N, K] (separate arrays: a slice of the stacked one
    could cost XLA a copy)."""
    h = x
    for w in ws:
        h = jax.lax.dot_general(h, w, (((1,), (1,)), ((), ())))
    return h


def reference(x, w):
    """float32 math, bf16 between layers."""
    for l in range(w.shape[0]):
        x = (x.astype(jnp.float32) @ w[l].astype(jnp.float32).T).astype(jnp.bfloat16)
    return x.astype(jnp.float32)


def profile_summary(path: str, clock_ghz: float = 1.98) -> dict:
    """Reads a trace ``mosaic_chain(profile_dir=...)`` wrote: per compute warpgroup and layer,
    the µs of its regions, and across the grid each layer's barrier latency (the last
    warpgroup's signal to the first and the median release). The profiler stamps ``%clock``
    cycles on each CTA's ``globaltimer`` start; times are converted at ``clock_ghz``.
    Medians over layers 1.. (layer 0 has no barrier) and warpgroups. The figures within a
    warpgroup are exact; those across CTAs (``barrier_*``, ``last_signal_after_median``) rest
    on each CTA's start stamp, whose offsets came out as negative latencies on the H200: read
    them as rough, and the per-warpgroup ``wait`` as the barrier's cost. ``by_warpgroup``:
    the same medians per warpgroup of a CTA (trace ids run CTA-major, warpgroup-minor from 1:
    the gather form's first compute warpgroup, the one that polls, is id 1, 4, 7, ...).
    A layer needs ``pipe``, ``epi`` and its steps; ``xload`` only where the form has one. The
    gather form's ``polls`` (loads of the partials a layer) and ``poll`` (the last one's µs)."""
    import collections
    import json
    import statistics

    with open(path) as f:
        events = json.load(f)["traceEvents"]
    by_tid = collections.defaultdict(list)
    for e in events:
        by_tid[e["tid"]].append(e)
    per = collections.defaultdict(list)  # metric -> values over (warpgroup, layer >= 1)
    per_wg = collections.defaultdict(lambda: collections.defaultdict(list))
    ends = collections.defaultdict(list)  # layer -> its warpgroups' epilogue ends
    releases = collections.defaultdict(list)  # layer -> its warpgroups' barrier exits
    for tid, es in by_tid.items():
        wg_per = per_wg[(int(tid) - 1) % 3]
        t0 = es[0]["ts"]
        stack, ranges = [], []
        for e in es:
            t = t0 + (e["ts"] - t0) / clock_ghz
            if e["ph"] == "B":
                stack.append((e["name"], t))
            else:
                name, tb = stack.pop()
                ranges.append((name, tb, t))
        ranges.sort(key=lambda r: (r[1], -r[2]))  # an enclosing region first
        layers, cur = [], None
        for name, tb, te in ranges:
            if (name == "wait" or (name == "xload" and (cur is None or "xload" in cur))
                    or (name == "pipe" and (cur is None or "pipe" in cur))):
                cur = {}
                layers.append(cur)
            if cur is None:
                continue
            if name in ("mma", "poll"):
                cur.setdefault(name, []).append((tb, te))
            else:
                cur[name] = (tb, te)
        if not any("mma" in lay for lay in layers):
            continue  # the producer warpgroup records nothing
        for lay in layers:  # the flat pipeline has no region around a layer's steps
            if "pipe" not in lay and {"mma", "xload"} <= lay.keys():
                lay["pipe"] = (lay["xload"][1], lay["mma"][-1][1])
        record = lambda k, v: (per[k].append(v), wg_per[k].append(v))  # noqa: E731
        for l, lay in enumerate(layers):
            if "epi" in lay:
                ends[l].append(lay["epi"][1])
            if "wait" in lay:
                releases[l].append(lay["wait"][1])
            if l == 0 or not {"pipe", "epi", "mma"} <= lay.keys():
                continue
            for name, v in lay.items():  # the regions, and those inside the epilogue
                if name not in ("mma", "poll"):
                    record(name, v[1] - v[0])
            if "poll" in lay:  # the gather form's loads of the partials, and how many
                record("polls", len(lay["poll"]))
                record("poll", lay["poll"][-1][1] - lay["poll"][-1][0])
            mmas, prev = lay["mma"], lay["pipe"][0]
            gaps = []
            for tb, te in mmas:
                gaps.append(tb - prev)
                prev = te
            half = len(gaps) // 2
            record("tile_wait_first_half", sum(gaps[:half]))
            record("tile_wait_second_half", sum(gaps[half:]))
            record("mma_busy", sum(te - tb for tb, te in mmas))
            if "epi" in layers[l - 1]:
                record("period", lay["epi"][1] - layers[l - 1]["epi"][1])
    med = lambda d: {k: round(statistics.median(v), 3) for k, v in sorted(d.items())}  # noqa
    out = med(per)
    out["by_warpgroup"] = {wg: med(d) for wg, d in sorted(per_wg.items()) if d}
    lat_first, lat_med, spread = [], [], []
    for l in sorted(ends):
        if ends[l]:
            spread.append(max(ends[l]) - statistics.median(ends[l]))
        if releases.get(l + 1) and ends[l]:
            lat_first.append(min(releases[l + 1]) - max(ends[l]))
            lat_med.append(statistics.median(releases[l + 1]) - max(ends[l]))
    if lat_first:
        out.update(barrier_first=round(statistics.median(lat_first), 3),
                   barrier_median=round(statistics.median(lat_med), 3),
                   last_signal_after_median=round(statistics.median(spread), 3))
    out["warpgroups"] = len(ends.get(0, []))
    return out


# The barrier forms (see mosaic_chain): a name's parts are its options.
VARIANTS = ("sync", "sync_sys", "sync_slice", "sync_noadd", "sync_nox", "sync_noadd_nox",
            "sync_zerowait", "sync_relaxed", "sync_slice_relaxed", "sync_proxy", "sync_acqrel",
            "sync_relfence", "sync_postfence", "sync_flat", "nosync", "gather",
            "gather_nopoll", "dyn", "dyn_g132", "dyn_u512", "dyn_u512_g132", "dyn_static",
            "sync_pf4", "sync_pf8", "sync_selfpf8")


def chain_for(variant: str, splits: int, tile_k: int, steps: int, profile_dir=None):
    """The chain of a variant's name: sync / nosync, then any of sys (system-scope atomics),
    slice (a semaphore per K slice), flat (one pipeline over all layers), the signal's form
    (relaxed, proxy, acqrel, relfence, postfence: ``relaxed`` of ``mosaic_chain``) and the
    ablations noadd, nox, zerowait, and pfN / selfpfN (the first N steps of each CTA's share
    of the next layer prefetched into the L2 by 4 more CTAs / by the compute warpgroups
    themselves); or gather (``mosaic_gather.gather_chain``: no signal
    between layers, partials polled by their readers), gather_nopoll (one load: wrong, timing
    only); or dyn (``mosaic_dynamic.dynamic_chain``: a layer's units taken from a counter),
    with _uN (the unit's K chunk, default 1024), _gN (the grid, default 128) and _static
    (claims counted in registers, no atomic: a debugging form). A name outside these is a
    ValueError."""
    parts = variant.split("_")
    if parts[0] == "dyn":  # mosaic_dynamic: units from a counter; _uN unit_k, _gN the grid
        from mosaic_dynamic import dynamic_chain  # noqa: PLC0415
        static = "static" in parts
        opts = {p[0]: int(p[1:]) for p in parts[1:] if p[:1] in ("u", "g") and p[1:].isdigit()}
        if len(opts) + static != len(parts) - 1:
            raise ValueError(f"unknown variant {variant!r}")
        return dynamic_chain(tile_k, steps, unit_k=opts.get("u", 1024), grid=opts.get("g", 128),
                             static_claims=static)
    if variant in ("gather", "gather_nopoll"):
        from mosaic_gather import gather_chain  # noqa: PLC0415 (benchmarks/gpu on the path)
        return gather_chain(splits, tile_k, steps, poll=variant == "gather",
                            profile_dir=profile_dir)
    # _pfN / _selfpfN: the first N steps of each CTA's next layer prefetched into the L2
    pf_form = re.compile(r"(self|)pf(\d+)")
    pf = {m[1] + "pf": int(m[2]) for m in map(pf_form.fullmatch, parts) if m}
    if parts[0] not in ("sync", "nosync") or not {
            p for p in parts[1:] if not pf_form.fullmatch(p)} <= {
            "sys", "slice", "noadd", "nox", "zerowait", "relaxed", "proxy", "acqrel", "relfence",
            "postfence", "flat"}:
        raise ValueError(f"unknown variant {variant!r}")
    return mosaic_chain(splits, tile_k, steps, sync=parts[0] == "sync",
                        scope="sys" if "sys" in parts else "gpu", per_slice="slice" in parts,
                        ablate=frozenset(parts) & {"noadd", "nox", "zerowait"},
                        relaxed=next((f for p, f in (("proxy", "proxy"), ("acqrel", "acq_rel"),
                                                     ("relfence", "release"),
                                                     ("postfence", "post_acq_rel"))
                                      if p in parts),
                                     "relaxed" in parts), flat="flat" in parts,
                        prefetch=pf.get("pf", 0), self_prefetch=pf.get("selfpf", 0),
                        profile_dir=profile_dir)


CANDS = ((4, 128, 4), (4, 64, 8), (4, 128, 2), (4, 256, 2))  # (K splits, tile_k, stages)
# the flat pipeline's deeper run-ahead (stages that do not divide a layer's steps)
FLAT_CANDS = ((4, 128, 5), (4, 64, 11))


def lower_all(emit, dim: int, layers: int) -> int:
    """Lowers the candidates for an abstract H100; 1 if any fails."""
    sds = jax.ShapeDtypeStruct
    ok = []
    for i, (splits, tk, steps) in enumerate(CANDS + FLAT_CANDS):
        # every variant at the first tile, the correct form at the others (CI time)
        for variant in (VARIANTS if i == 0 else ("sync", "gather", "dyn_u512") if i < len(CANDS)
                        else ("sync_flat",)):
            row = dict(variant=variant, splits=splits, tile_k=tk, steps=steps, dim=dim,
                       layers=layers)
            ok.append(gpu_trace.lower_for_h100(
                row, chain_for(variant, splits, tk, steps), sds((T, dim), jnp.bfloat16),
                sds((layers, dim, dim), jnp.bfloat16)))
            emit(row)
    return int(not all(ok))


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float32."""
    return float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))


def chain_checker(emit, ref, dim: int, layers: int, calls: int, repeats: int):
    """``check(name, fn, args, final=identity, **cfg)`` for the chain benchmarks: one row of
    ``fn(*args)`` (``final`` takes its output to the last layer's activations): the error
    against ``ref``, µs a layer by wall time of back-to-back calls, the weight's TB/s and the
    GPU time a layer (profiler); a form Mosaic refuses gives a row with its error."""
    from persistent_chain import wall_us  # noqa: PLC0415 (benchmarks/gpu on the path)

    wbytes = dim * dim * 2

    def check(name, fn, args, final=lambda h: h, **cfg):
        row = dict(variant=name, D=dim, L=layers, **cfg)
        try:
            row["rel"] = rel_err(final(fn(*args)), ref)
            us = wall_us(fn, args, calls, repeats) / layers
            row.update(us_per_layer=round(us, 2), tb_s=round(wbytes / (us * 1e-6) / 1e12, 2))
            dev = gpu_trace.device_time(fn, [args], calls=3)
            if dev is not None:
                row.update(gpu_us_per_layer=round(dev["device_us"] / layers, 2),
                           ops_per_layer=round(dev["ops_per_call"] / layers, 2))
        except Exception as e:  # a candidate Mosaic refuses: say so, go on
            row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        emit(row)
    return check


def stress_row(fn, args, final, ref, n: int, **cfg) -> dict:
    """``fn(*args)`` called ``n`` times, each output (``final`` of it) against ``ref``: the
    errors' spread and how many exceed 1.5x their median (a stale read shows there)."""
    rels = sorted(rel_err(final(fn(*args)), ref) for _ in range(n))
    med = rels[len(rels) // 2]
    return dict(**cfg, calls=n, rel_min=rels[0], rel_median=med, rel_max=rels[-1],
                over_1_5x_median=sum(r > 1.5 * med for r in rels))


def print_chain_table(rows: list[dict], dim: int) -> None:
    """The chain benchmarks' summary: a row a timed (or refused) variant and tile."""
    print("\n| variant | K splits x tile_k x steps | µs / layer | TB/s | GPU-time µs / layer | "
          "rel |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        cfg = f"{r['splits']} x {r['tile_k']} x {r['steps']}" if "splits" in r else ""
        if "us_per_layer" in r:
            print(f"| {r['variant']} | {cfg} | {r['us_per_layer']} | {r['tb_s']} | "
                  f"{r.get('gpu_us_per_layer')} | {r['rel']:.1e} |")
        else:
            print(f"| {r['variant']} | {cfg} | {r.get('error', '')[:200]} | | | |")
    print(f"(floor at 4.64 TB/s: {dim * dim * 2 / 4.64e12 * 1e6:.2f} µs a layer)")


def main(argv=None):
    # benchmarks/gpu is on the path (this script's folder)
    from persistent_chain import chain_parser  # noqa: PLC0415

    ap = chain_parser(__doc__)
    ap.add_argument("--cands", default=",".join("x".join(map(str, c)) for c in CANDS),
                    help="splits x tile_k x steps, comma-separated")
    ap.add_argument("--variants", default="xla,nosync,sync,sync_sys",
                    help="xla, nosync (no barrier: wrong), sync, sync_sys (sys-scope atomics), "
                         "sync_slice (a semaphore per K slice), _flat (one pipeline over all "
                         "layers); the signal forms _relaxed / _proxy (wrong), _acqrel, "
                         "_relfence, _postfence (timing only) and the ablations _noadd, _nox, "
                         "_zerowait (see chain_for and mosaic_chain)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="instead of timing: each variant at the first candidate under Mosaic "
                         "GPU's on-device profiler (traces in DIR), the regions' µs printed")
    ap.add_argument("--stress", type=int, default=0, metavar="N",
                    help="instead of timing: each variant x candidate called N times, every "
                         "output against the reference (a barrier that lets a stale read "
                         "through shows as an outlier)")
    ap.add_argument("--clock-ghz", type=float, default=1.98,
                    help="the SM clock the profile's cycles are read at")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU: the interpreted chain (1 CTA) against the reference, and every "
                         "candidate lowered for an abstract H100")
    a = ap.parse_args(argv)
    rows = []
    emit = gpu_trace.jsonl_emitter(rows, a.out)
    key = jax.random.PRNGKey(0)
    if a.smoke:
        # One CTA (128 columns), no split: its own stores are its next layer's input.
        D, L = 128, 3
        x = jax.random.normal(key, (T, D)).astype(jnp.bfloat16)
        w = (jax.random.normal(jax.random.PRNGKey(1), (L, D, D)) / D ** 0.5).astype(jnp.bfloat16)
        ref = reference(x, w)
        for flat, tk, steps in ((False, 64, 2), (False, 32, 4), (True, 32, 3)):
            xs = mosaic_chain(1, tk, steps, sync=False, reduce=False, interpret=True,
                              flat=flat)(x, w)
            out = xs[-1].astype(jnp.float32)
            emit(dict(variant="interpret_flat" if flat else "interpret", splits=1, tile_k=tk,
                      steps=steps, dim=D, layers=L,
                      rel=float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))))
        from mosaic_gather import gather_chain  # noqa: PLC0415
        for tk, steps in ((64, 1), (32, 2)):  # the gather form: its own partials polled back
            out = gather_chain(1, tk, steps, sync=False, interpret=True)(x, w)[-1]
            emit(dict(variant="interpret_gather", splits=1, tile_k=tk, steps=steps, dim=D,
                      layers=L, rel=float(jnp.linalg.norm(out.astype(jnp.float32) - ref)
                                          / jnp.linalg.norm(ref))))
        from mosaic_dynamic import dynamic_chain  # noqa: PLC0415
        D2 = 2 * D  # two units a layer: the ring wraps, the claims go on past the end mark
        x2 = jax.random.normal(key, (T, D2)).astype(jnp.bfloat16)
        w2 = (jax.random.normal(jax.random.PRNGKey(2), (L, D2, D2)) / D2 ** 0.5).astype(
            jnp.bfloat16)
        ref2 = reference(x2, w2)
        for tk, steps in ((64, 3), (32, 2)):
            out = dynamic_chain(tk, steps, unit_k=D2, interpret=True)(x2, w2)[-1]
            emit(dict(variant="interpret_dyn", tile_k=tk, steps=steps, dim=D2, layers=L,
                      rel=float(jnp.linalg.norm(out.astype(jnp.float32) - ref2)
                                / jnp.linalg.norm(ref2))))
        return lower_all(emit, 4096, 4)
    D, L = a.dim, a.layers
    x = jax.random.normal(key, (T, D)).astype(jnp.bfloat16)
    w = (jax.random.normal(jax.random.PRNGKey(1), (L, D, D)) / D ** 0.5).astype(jnp.bfloat16)
    ref = reference(x, w)
    check = chain_checker(emit, ref, D, L, a.calls, a.repeats)

    if a.profile:
        import glob
        import os
        splits, tk, steps = (int(v) for v in a.cands.split(",")[0].split("x"))
        for v in a.variants.split(","):
            if v == "xla":
                continue
            d = os.path.join(a.profile, f"{v}-{splits}x{tk}x{steps}")
            os.makedirs(d, exist_ok=True)
            fn = chain_for(v, splits, tk, steps, profile_dir=d)
            for _ in range(3):
                jax.block_until_ready(fn(x, w))
            jax.effects_barrier()
            last = max(glob.glob(os.path.join(d, "*.json")), key=os.path.getmtime)
            emit(dict(variant=v, splits=splits, tile_k=tk, steps=steps, D=D, L=L,
                      profile=profile_summary(last, a.clock_ghz)))
        return 0
    if a.stress:
        for c in a.cands.split(","):
            splits, tk, steps = (int(v) for v in c.split("x"))
            for v in a.variants.split(","):
                if v == "xla":
                    continue
                emit(stress_row(chain_for(v, splits, tk, steps), (x, w), lambda xs: xs[-1],
                                ref, a.stress, variant=v, splits=splits, tile_k=tk,
                                steps=steps, D=D, L=L))
        return 0
    if "xla" in a.variants.split(","):
        check("xla", jax.jit(xla_chain), (x, list(w)), lambda h: h)
    for c in a.cands.split(","):
        splits, tk, steps = (int(v) for v in c.split("x"))
        for v in a.variants.split(","):
            if v == "xla":
                continue
            check(v, chain_for(v, splits, tk, steps), (x, w), lambda xs: xs[-1],
                  splits=splits, tile_k=tk, steps=steps)
    print_chain_table(rows, D)
    return 0


if __name__ == "__main__":
    sys.exit(main())
