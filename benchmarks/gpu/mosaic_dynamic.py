"""The persistent batch-1 chain with dynamic work distribution inside each layer: units of work
taken from a per-layer counter, so no layer waits for a slow CTA's fixed share (DESIGN_NOTES
"Next GPU session", lever (2), after ``mosaic_gather.py`` put the skew at the boundary's core).

The chain as ``mosaic_chain.py``'s (``x_{l+1} = x_l W_l^T``, T = 8 token rows, the product
swapped so the tokens are wgmma's N, a GMEM-semaphore grid barrier with a release signal
between layers, K partials TMA-added into a zeroed x_{l+1}), with the static (column tile,
K split) a CTA owns replaced by a work queue:

- a layer's work is U = (N / 128) x (K / unit_k) units, each a 128-column tile over one
  ``unit_k`` chunk of K (``unit_k / tile_k`` weight tiles);
- each CTA's producer warpgroup claims units with a relaxed fetch-add on the layer's counter
  (one thread, through ``inline_mgpu``; the claimed index goes into an SMEM slot of its own,
  fill i's at i % (2 x steps): a slot is rewritten only after the producer has seen a later
  fill consumed, so even a store the compiler moved above its own iteration's wait cannot
  clobber an index a compute warpgroup has yet to read), streams their tiles into a ring of
  ``steps`` slots (a hand-written pipeline: full barriers completed by the TMA, consumed
  barriers by both compute warpgroups), and when a claim comes back past U it hands that
  claim on as the layer's end mark (the slot's full barrier arrived on, no tiles) and moves
  on to the next layer's counter, without waiting for anyone;
- the two compute warpgroups (64 columns each) wait at the grid barrier for x_l, load all of
  it (8 x K: a unit may need any chunk), and take slots in order: a unit's tiles into a fresh
  accumulator, then its partial TMA-added into x_{l+1}; at the end mark (an index >= U) each
  waits for its adds to land and signals the barrier (a release) once a layer;
- the grid can take every SM (``grid``), since no CTA owns a share.

Measured against ``sync`` (the static form) and XLA's chain in the same process:
``mosaic_chain.py --variants xla,sync,dyn`` (variants ``dyn``, ``dyn_g132``, ``dyn_u512``,
``dyn_static``: the same ring with each CTA's claims counted in registers, no atomic). State on
2026-12-03 (RESULTS "Rerun of 2026-12-03 (20:10)" and "(23:30)"): ``dyn_static`` is correct
and timed; the atomic forms hung on the H200, with the claim's asm marked as having side
effects too. The cause found at 23:30: in warpgroup semantics a scalar SMEM store is done by
every thread with no barrier, and the producer wrote its end mark (-1) into the slot its
threads had just read the claim from, so a warp that read late saw -1, took it for a unit and
left the others (``dyn_static`` counted its claims in SMEM with the same read-then-write
race). Now the end mark is the claim past U itself, and static claims count in registers.
On the CPU, the interpreter runs neither atomics, semaphores nor TMA reductions: ``--smoke``
interprets one CTA whose claims count in registers and whose units span all of K (so each stores
its tile), against the reference; the GPU form lowers for an abstract H100.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mosaic_chain import T, WG_N, launch  # benchmarks/gpu on the path


def claim(ctr_ref, ids_ref):
    """One thread of the calling warpgroup adds 1 to the GMEM counter ``ctr_ref`` (relaxed,
    GPU scope) and writes the old value into the SMEM scalar ``ids_ref``; the warpgroup then
    meets at its barrier, so every thread can read it. The asm is marked as having side
    effects: without that LLVM takes it for a pure function of the pointer, free to hoist out
    of the claim loop or out of the one-thread branch (the first form did so and hung on the
    H200, RESULTS "Rerun of 2026-12-03 (20:10)")."""
    import jax.experimental.mosaic.gpu as mgpu
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import memref
    from jax.experimental.pallas import mosaic_gpu as plgpu

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))
    def _claim(ctx, ctr, ids):
        del ctx
        i32 = ir.IntegerType.get_signless(32)
        with mgpu.utils.single_thread(mgpu.utils.ThreadSubset.WARPGROUP):
            old = mgpu.utils.inline_ptx(
                "atom.relaxed.gpu.global.add.u32 $0, [$1], 1;",
                mgpu.utils.memref_ptr(ctr), result_types=i32, has_side_effects=True)
            memref.store(old, ids, [mgpu.utils.c(0, ir.IndexType.get())])
        mgpu.utils.warpgroup_barrier()

    _claim(ctr_ref, ids_ref)


def dynamic_chain(tile_k: int, steps: int, *, unit_k: int = 1024, grid: int = 128,
                  interpret: bool = False, static_claims: bool = False,
                  num_sms: int | None = None):
    """``fn(x0 [T, K] bf16, w [L, N, K] bf16) -> xs [L, T, N]`` as ``mosaic_chain``'s, the
    layers' units handed out by a counter (module docstring). ``interpret``: one CTA, claims
    counted in registers, units over all of K stored (not added), no semaphore. ``static_claims``
    (a debugging form): the k-th claim of CTA g in a layer is unit k * grid + g, counted in
    registers with no atomic, through the same ring, end marks and barrier. Refuses a grid larger
    than ``num_sms`` (its barrier needs every CTA resident)."""
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    bf16, f32, i32 = jnp.bfloat16, jnp.float32, jnp.int32
    if interpret:
        grid = 1

    def kernel(x0_gmem, w_gmem, xs_gmem, *, dims):
        L, N, K = dims
        cta_n = 2 * WG_N
        n_tiles, chunks = N // cta_n, K // unit_k
        U, tpu = n_tiles * chunks, unit_k // tile_k  # units a layer, tiles a unit
        if N % cta_n or K % unit_k or unit_k % tile_k or K != N or (interpret and chunks != 1):
            raise ValueError(f"{L} x {N} x {K} does not tile by {cta_n} / {unit_k} / {tile_k}")
        sms = num_sms or (None if interpret else getattr(jax.devices()[0], "core_count", None))
        if sms is not None and grid > sms:
            raise ValueError(f"a grid barrier over {grid} CTAs needs them all resident, and "
                             f"the GPU has {sms} SMs")
        sw = plgpu.find_swizzle(tile_k * 2 * 8)
        tf = (plgpu.TilingTransform((8, sw // 2)), plgpu.SwizzleTransform(sw))
        xsw = plgpu.find_swizzle(K * 2 * 8)
        xtf = (plgpu.TilingTransform((8, xsw // 2)), plgpu.SwizzleTransform(xsw))
        g = lax.axis_index("cluster_grid")

        @functools.partial(
            pl.run_scoped,
            ring=plgpu.SMEM((steps, cta_n, tile_k), bf16, transforms=tf),
            ids=plgpu.SMEM((2 * steps, 1), i32),  # fill i's unit at i % (2 * steps)
            x_smem=plgpu.SMEM((T, K), bf16, transforms=xtf),
            out_smem=plgpu.SMEM((2, T, WG_N), bf16, transforms=tf),
            full=plgpu.Barrier(num_barriers=steps),
            consumed=plgpu.Barrier(num_arrivals=2, num_barriers=steps),
            x_bar=plgpu.Barrier(),
            wg_bar=plgpu.Barrier(num_arrivals=2),
            collective_axes="wg")
        def _scope(ring, ids, x_smem, out_smem, full, consumed, x_bar, wg_bar):
            wg = lax.axis_index("wg")
            sem = None if interpret else pl.get_global(plgpu.SemaphoreType.REGULAR)
            ctrs = None if interpret else pl.get_global(plgpu.SemaphoreType.REGULAR((L,)))

            def both_wgs():
                plgpu.barrier_arrive(wg_bar)
                plgpu.barrier_wait(wg_bar)

            # -- the producer: claims units, streams their weight tiles into the ring
            @pl.when(wg == 2)
            def _producer():
                def take(l, k, n_claimed):
                    """The unit of this claim, its index stored in ``ids[k]`` for the compute
                    warpgroups. No thread of the producer reads ``ids`` after another may have
                    written it: every thread stores, and (warpgroup semantics) no barrier
                    orders one warp's load before another warp's store."""
                    if interpret or static_claims:
                        u = n_claimed * grid + g
                        ids[k, 0] = u
                        return u
                    claim(ctrs.at[l], ids.at[k])  # one thread stores; a barrier; all read
                    return ids[k, 0]

                def layer(l, i):
                    def unit(carry):
                        i, n_claimed, _ = carry
                        slot = i % steps

                        @pl.when(i >= steps)
                        def _():
                            plgpu.barrier_wait(consumed.at[slot])
                        u = take(l, i % (2 * steps), n_claimed)
                        going = u < U  # a claim past U is the layer's end mark

                        @pl.when(going)
                        def _():
                            n, c = u % n_tiles, u // n_tiles
                            for t in range(tpu):
                                s_t = (i + t) % steps
                                if t:
                                    pl.when(i + t >= steps)(
                                        lambda: plgpu.barrier_wait(consumed.at[s_t]))
                                plgpu.copy_gmem_to_smem(
                                    w_gmem.at[l].at[pl.ds(n * cta_n, cta_n),
                                                    pl.ds(c * unit_k + t * tile_k, tile_k)],
                                    ring.at[s_t], full.at[s_t])

                        pl.when(~going)(lambda: plgpu.barrier_arrive(full.at[slot]))
                        return jnp.where(going, i + tpu, i + 1), n_claimed + 1, going

                    i, _, _ = lax.while_loop(lambda c: c[2], unit,
                                             (i, jnp.int32(0), jnp.bool_(True)))
                    return i

                i_end = lax.fori_loop(0, L, layer, jnp.int32(0))

                @pl.loop(0, steps)  # the last slots' consumption (every phase is observed)
                def _(k):
                    j = i_end - steps + k
                    pl.when(j >= 0)(lambda: plgpu.barrier_wait(consumed.at[j % steps]))

            # -- the compute warpgroups
            @pl.when(wg < 2)
            def _compute():
                my = pl.ds(wg * WG_N, WG_N)
                if not interpret:  # zero every layer's output, 64 columns at a time
                    @jax.named_scope("zero")
                    def _zero():
                        @functools.partial(pl.run_scoped,
                                           zero_ref=plgpu.ACC((WG_N, T), jnp.float32))
                        def _(zero_ref):
                            out_smem.at[wg].transpose((1, 0))[...] = zero_ref[...].astype(bf16)
                        plgpu.commit_smem()
                        per_layer = N // WG_N

                        @pl.loop(2 * g + wg, L * per_layer, step=2 * grid)
                        def _(j):
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[wg], xs_gmem.at[j // per_layer].at[
                                    :, pl.ds((j % per_layer) * WG_N, WG_N)])
                        plgpu.wait_smem_to_gmem(0)
                        plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
                    _zero()

                def layer(l, i):
                    with jax.named_scope("wait"):
                        if not interpret:
                            pl.when(l > 0)(lambda: plgpu.semaphore_wait(
                                sem, 2 * grid * (l + 1), decrement=False, memory_scope="gpu"))
                        both_wgs()  # the other warpgroup is done with x_{l-1}

                    with jax.named_scope("xload"):
                        @pl.when(wg == 0)
                        def _():
                            pl.when(l == 0)(lambda: plgpu.copy_gmem_to_smem(
                                x0_gmem, x_smem, x_bar))
                            pl.when(l > 0)(lambda: plgpu.copy_gmem_to_smem(
                                xs_gmem.at[l - 1], x_smem, x_bar))
                        plgpu.barrier_wait(x_bar)
                        if not interpret:  # the zeroing is done everywhere before any add
                            pl.when(l == 0)(lambda: plgpu.semaphore_wait(
                                sem, 2 * grid, decrement=False, memory_scope="gpu"))

                    def unit(carry):
                        i, _ = carry
                        slot = i % steps
                        plgpu.barrier_wait(full.at[slot])
                        u = ids[i % (2 * steps), 0]
                        going = u < U

                        @pl.when(going)
                        def _():
                            n, c = u % n_tiles, u // n_tiles

                            @functools.partial(pl.run_scoped,
                                               acc_ref=plgpu.ACC((WG_N, T), f32))
                            def _(acc_ref):
                                for t in range(tpu):
                                    s_t = (i + t) % steps
                                    if t:
                                        plgpu.barrier_wait(full.at[s_t])
                                    with jax.named_scope("mma"):
                                        plgpu.wgmma(acc_ref, ring.at[s_t].at[my],
                                                    x_smem.at[:, pl.ds(c * unit_k + t * tile_k,
                                                                       tile_k)]
                                                    .transpose((1, 0)))
                                        plgpu.wgmma_wait(0)
                                    plgpu.barrier_arrive(consumed.at[s_t])
                                with jax.named_scope("epi"):
                                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                                    out_smem.at[wg].transpose((1, 0))[...] = (
                                        acc_ref[...].astype(bf16))
                                    plgpu.commit_smem()
                                    plgpu.copy_smem_to_gmem(
                                        out_smem.at[wg],
                                        xs_gmem.at[l].at[:, pl.ds(n * cta_n + wg * WG_N, WG_N)],
                                        reduction_op=None if interpret else "add")

                        @pl.when(~going)
                        def _():
                            plgpu.barrier_arrive(consumed.at[slot])
                        return jnp.where(going, i + tpu, i + 1), going

                    i, _ = lax.while_loop(lambda c: c[1], unit, (i, jnp.bool_(True)))
                    with jax.named_scope("signal"):
                        plgpu.wait_smem_to_gmem(0)  # this warpgroup's adds have landed
                        if not interpret:
                            plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
                    return i

                lax.fori_loop(0, L, layer, jnp.int32(0))

        plgpu.wait_smem_to_gmem(0)

    def fn(x0, w):
        L, N, K = w.shape
        return launch(functools.partial(kernel, dims=(L, N, K)),
                      jax.ShapeDtypeStruct((L, T, N), bf16), grid, interpret=interpret)(x0, w)

    return jax.jit(fn)


def _one(dim: int, layers: int, tile_k: int, steps: int, unit_k: int, grid: int,
         static_claims: int = 0, reps: int = 1) -> None:
    """One configuration on the GPU: compile time, then ``reps`` calls against the
    reference."""
    import time

    from mosaic_chain import reference

    x = jax.random.normal(jax.random.PRNGKey(0), (T, dim)).astype(jnp.bfloat16)
    w = (jax.random.normal(jax.random.PRNGKey(1), (layers, dim, dim)) / dim ** 0.5).astype(
        jnp.bfloat16)
    t = time.time()
    fn = dynamic_chain(tile_k, steps, unit_k=unit_k, grid=grid,
                       static_claims=bool(static_claims)).lower(x, w).compile()
    print(f"compiled in {time.time() - t:.1f} s", flush=True)
    ref = reference(x, w)
    for r in range(reps):
        out = jax.block_until_ready(fn(x, w))[-1].astype(jnp.float32)
        rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        print(f"call {r}: rel {rel:.3e}", flush=True)


def main(argv=None):
    """``--debug``: configurations from one CTA up to the o shape, each in a process of its own
    under a timeout (a hung kernel costs its timeout, not the rest)."""
    import argparse
    import subprocess
    import sys

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", default=None,
                    help="dim,layers,tile_k,steps,unit_k,grid[,static_claims[,reps]]")
    ap.add_argument("--configs", default=None,
                    help="';'-separated --one configurations for --debug (default: from one "
                         "CTA up to the o shape)")
    ap.add_argument("--debug", action="store_true")
    ap.add_argument("--timeout", type=int, default=45)
    a = ap.parse_args(argv)
    if a.one:
        _one(*map(int, a.one.split(",")))
        return 0
    configs = (a.configs.split(";") if a.configs else (
        "256,2,64,2,256,1", "256,2,64,2,128,1", "1024,2,64,4,256,4", "1024,4,64,4,256,16",
        "4096,4,128,4,1024,128", "4096,32,128,4,1024,128"))
    for cfg in configs:
        try:
            r = subprocess.run([sys.executable, __file__, "--one", cfg], capture_output=True,
                               text=True, timeout=a.timeout)
            lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
            print(cfg, "rc", r.returncode, " | ".join(lines[-3:])[-400:], flush=True)
        except subprocess.TimeoutExpired as e:
            print(cfg, "TIMEOUT", (e.stdout or b"").decode()[-200:], flush=True)
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
