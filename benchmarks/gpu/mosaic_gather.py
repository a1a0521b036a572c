"""The persistent batch-1 chain with no signal on the streaming SMs: partials gathered by their
readers through a sentinel, not published through a release (``mosaic_chain.py``'s next
experiment, DESIGN_NOTES "Next GPU session").

``mosaic_chain.py`` found the chain's correct boundary at ~2.0 µs a layer over its body, and the
signal's release fence the largest link: it takes 2.2 µs of each epilogue and slows the SM's
weight stream while it runs; a relaxed signal is faster and wrong (the flag can be seen before
the TMA add it publishes). Here no streaming SM ever runs a fence or an atomic between layers:

- each K split's partial product is *stored* (not TMA-added) into its own slot of a partials
  buffer ``[L, splits, T, N]`` that the kernel first fills with NaN (once a call: every compute
  warpgroup fills its own slots, waits for the writes, signals a semaphore once; readers wait
  for that count once, before their first read);
- every element of the buffer is written once after the fill, by one TMA store, so a reader
  that sees no NaN in what it loaded has the data: nothing needs ordering, so there is no flag
  and no fence. The first compute warpgroup of each CTA TMA-loads the 4 partials of its next
  K slice (64 KB), sums them in float32 and loads again while any element is NaN (a finite
  chain cannot make a NaN: an engine form would check an integer payload instead, so a NaN
  in the data could not hang it; the polls are bounded all the same, so a fault shows as NaN
  in the output), rounds the sum to bf16 into the activations' SMEM, and the two compute
  warpgroups meet at a CTA barrier. (Both polling at once hung the H200 on 2026-12-03: the
  reduce's SMEM scratch sits at one offset for both, so they could leave the loop apart.);
- the writer waits only for its store to have read the SMEM (to reuse the tile), never for
  the write: the weight stream never stalls behind the boundary.

The price: every CTA reads 64 KB of partials a layer from the L2 (8 MB a layer over 128 CTAs,
against 4 MB of activations in ``mosaic_chain``), and the last layer's partials are summed by
XLA after the kernel (its time is in the figures).

Variants (``mosaic_chain.py --variants``): ``gather`` (correct), against ``sync`` / ``nosync``
and XLA's chain in the same run; ``gather`` takes ``--stress`` and ``--profile`` as the others.
On the CPU the interpreter runs one CTA with no split (its own stores feed its next layer: the
poll finds them there) against the reference, and the GPU form lowers for an abstract H100.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mosaic_chain import T, WG_N, launch, weight_pipeline  # benchmarks/gpu on the path

# The profiler's buffer comes out of the SMEM (16 B an event a warpgroup): mosaic_chain's 640
# would not fit beside the partials, 256 does (profile <= 20 layers: ~12 events a layer).
GATHER_PROFILE_SPACE = 256
MAX_POLLS = 1 << 20  # loads of a layer's partials before the kernel gives up (~1 s)


class Units(NamedTuple):
    """A CTA's unit of a layer: its (cta_n-column tile, K split) of the weight, the K slice
    ``k_per`` read as two halves of activations, and the weight stream's SMEM transforms."""
    cta_n: int
    k_per: int
    half: int
    n_tiles: int
    transforms: tuple
    n_idx: Any  # this CTA's column tile
    s: Any  # this CTA's K split


def layer_units(N: int, K: int, splits: int, tile_k: int, steps: int,
                compute_wgs: int = 2) -> Units:
    """The units of an [N, K] layer over the grid (inside a kernel: reads the CTA's index):
    one CTA a (64 x ``compute_wgs``-column tile, K split); a layout that does not tile (the
    steps of a K slice by ``steps`` stages, each half by ``tile_k`` and 64) is a ValueError."""
    from jax import lax
    from jax.experimental.pallas import mosaic_gpu as plgpu

    cta_n, k_per = compute_wgs * WG_N, K // splits
    half = k_per // 2
    if (N % cta_n or K % (splits * tile_k) or (k_per // tile_k) % steps or half % tile_k
            or half % 64):
        raise ValueError(f"{N} x {K} does not tile by {cta_n} / {splits} x {tile_k} / "
                         f"{steps} steps")
    sw = plgpu.find_swizzle(tile_k * 2 * 8)
    cta = lax.axis_index("cluster_grid")
    n_tiles = N // cta_n
    return Units(cta_n, k_per, half, n_tiles,
                 (plgpu.TilingTransform((8, sw // 2)), plgpu.SwizzleTransform(sw)),
                 cta % n_tiles, cta // n_tiles)


def sum_partials(p_smem, x_smem, count: int):
    """``x_smem [T, half] = sum_i p_smem[i]`` (``count`` bf16 partials [T, half]) in float32,
    rounded to bf16, through the transposed views (8-row tiles have no register layout);
    returns the float32 sum."""
    acc = p_smem.at[0].transpose((1, 0))[...].astype(jnp.float32)
    for i in range(1, count):
        acc = acc + p_smem.at[i].transpose((1, 0))[...].astype(jnp.float32)
    x_smem.transpose((1, 0))[...] = acc.astype(jnp.bfloat16)
    return acc


def mma_step(acc_ref, w_smem, x_smem, wg, step, tile_k: int, half: int):
    """A pipeline step's product: the warpgroup's 64 rows of the step's weight tile against the
    activations' K tile, read transposed from whichever half of ``x_smem`` holds it; waits for
    the wgmma (the tile's slot is then free)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    kk = step * tile_k
    plgpu.wgmma(acc_ref, w_smem.at[pl.ds(wg * WG_N, WG_N)],
                x_smem.at[kk // half].at[:, pl.ds(kk % half, tile_k)].transpose((1, 0)))
    plgpu.wgmma_wait(0)
    return acc_ref


def gather_chain(splits: int, tile_k: int, steps: int, *, sync: bool = True,
                 poll: bool = True, num_sms: int | None = None, interpret: bool = False,
                 profile_dir: str | None = None):
    """``fn(x0 [T, K] bf16, w [L, N, K] bf16) -> xs [L, T, N]`` as ``mosaic_chain``'s, with the
    K splits' partials met by their readers (module docstring). ``sync``: the semaphore that
    orders the NaN fill before every read (a grid of one CTA needs none: its own fill precedes
    its stores). ``poll=False`` loads the partials once, whatever it finds (wrong results:
    what the poll costs, timing only). Refuses a grid larger than ``num_sms`` (the fill's
    barrier needs every CTA resident), as ``mosaic_chain``."""
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    bf16, f32 = jnp.bfloat16, jnp.float32

    def kernel(x0_gmem, nan_gmem, w_gmem, part_gmem, *, dims):
        L, N, K = dims
        if K != N:
            raise ValueError(f"a chain's layers are square, not {N} x {K}")
        cta_n, k_per, half, n_tiles, tf, n_idx, s = layer_units(N, K, splits, tile_k, steps)
        G = n_tiles * splits
        sms = num_sms or (None if interpret else getattr(jax.devices()[0], "core_count", None))
        if sync and sms is not None and G > sms:
            raise ValueError(f"the fill's barrier over {G} CTAs needs them all resident, and "
                             f"the GPU has {sms} SMs: use fewer K splits")
        pipeline = functools.partial(weight_pipeline, k_per=k_per, tile_k=tile_k,
                                     cta_n=cta_n, steps=steps, transforms=tf)
        ignore = lambda *_, **__: None  # noqa: E731

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(ignore, ignore, 0 if L > 1 else None).get_allocations(w_gmem.at[0]),
            # the layer's activations, the K slice in two halves (two loads in flight)
            x_smem=plgpu.SMEM((2, T, half), bf16, transforms=tf),
            p_smem=plgpu.SMEM((2, splits, T, half), bf16, transforms=tf),
            out_smem=plgpu.SMEM((2, T, WG_N), bf16, transforms=tf),
            x_bar=plgpu.Barrier(num_barriers=2),
            fill_bar=plgpu.Barrier(num_barriers=2),
            wg_bar=plgpu.Barrier(num_arrivals=2),
            collective_axes="wg")
        def _scope(allocs, x_smem, p_smem, out_smem, x_bar, fill_bar, wg_bar):
            wg = lax.axis_index("wg")
            sem = pl.get_global(plgpu.SemaphoreType.REGULAR) if sync else None
            my_cols = pl.ds(n_idx * cta_n + wg * WG_N, WG_N)

            @pl.when(wg < 2)
            @jax.named_scope("zero")
            def _fill():
                plgpu.copy_gmem_to_smem(nan_gmem, out_smem.at[wg], fill_bar.at[wg])
                plgpu.barrier_wait(fill_bar.at[wg])

                @pl.loop(0, L)
                def _(l):
                    plgpu.copy_smem_to_gmem(out_smem.at[wg], part_gmem.at[l].at[s].at[:, my_cols])
                plgpu.wait_smem_to_gmem(0)  # written: this warpgroup's own stores follow
                if sync:
                    plgpu.semaphore_signal(sem, 1, memory_scope="gpu")

            def both_wgs():
                plgpu.barrier_arrive(wg_bar)
                plgpu.barrier_wait(wg_bar)

            def halves(h):  # the activations' columns of x_smem[h]
                return pl.ds(s * k_per + h * half, half)

            # Compute warpgroup 0 gathers the whole K slice; 1 waits for it at the CTA barrier.
            # Two warpgroups polling at once would share the reduce's SMEM scratch (Mosaic
            # places it at the same offset for both) and could leave the loop apart.
            def layer_start(l):
                @pl.when(l == 0)
                @jax.named_scope("xload")
                def _():
                    @pl.when(wg == 0)
                    def _():
                        for h in range(2):
                            plgpu.copy_gmem_to_smem(x0_gmem.at[:, halves(h)], x_smem.at[h],
                                                    x_bar.at[h])
                        for h in range(2):
                            plgpu.barrier_wait(x_bar.at[h])

                @pl.when(l > 0)
                @jax.named_scope("wait")
                def _():
                    both_wgs()  # the other warpgroup is done reading layer l - 1's x

                    @pl.when(wg == 0)
                    def _():
                        if sync:
                            pl.when(l == 1)(lambda: plgpu.semaphore_wait(
                                sem, 2 * G, decrement=False, memory_scope="gpu"))

                        @jax.named_scope("poll")
                        def attempt(carry):
                            for h in range(2):
                                plgpu.copy_gmem_to_smem(part_gmem.at[l - 1].at[:, :, halves(h)],
                                                        p_smem.at[h], x_bar.at[h])
                            bad = jnp.float32(0)
                            for h in range(2):
                                plgpu.barrier_wait(x_bar.at[h])
                                acc = sum_partials(p_smem.at[h], x_smem.at[h], splits)
                                # any NaN makes the sum NaN (a reduce an axis: Mosaic's
                                # layouts take no reduce of a 2-D array to a scalar)
                                bad = bad + jnp.sum(jnp.sum(acc, axis=1), axis=0)
                            if not poll:  # one load, whatever it found (timing only)
                                return jnp.int32(0), carry[1] + 1
                            return jnp.isnan(bad).astype(jnp.int32), carry[1] + 1

                        # bounded, so a fault shows as NaN in the output, not a hung GPU
                        lax.while_loop(lambda c: (c[0] > 0) & (c[1] < MAX_POLLS), attempt,
                                       (jnp.int32(1), jnp.int32(0)))
                        plgpu.commit_smem()

                both_wgs()  # the activations are in

            @jax.named_scope("epi")
            def epilogue(acc_ref, l):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                out_smem.at[wg].transpose((1, 0))[...] = acc_ref[...].astype(bf16)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem.at[wg], part_gmem.at[l].at[s].at[:, my_cols])

            @pl.loop(0, L)
            def _layer(l):
                def ctx(eval_pipeline):
                    layer_start(l)

                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((WG_N, T), f32))
                    def _acc(acc_ref):
                        with jax.named_scope("pipe"):
                            eval_pipeline(acc_ref)
                        epilogue(acc_ref, l)

                @jax.named_scope("mma")
                def mma(idxs, w_smem, acc_ref):
                    return mma_step(acc_ref, w_smem, x_smem, wg, idxs[0], tile_k, half)

                state = None
                if L > 1:
                    state = jnp.where(l == 0, 0, jnp.where(l == L - 1, 2, 1))
                pipeline(mma, ctx, state)(
                    w_gmem.at[l].at[pl.ds(n_idx * cta_n, cta_n), pl.ds(s * k_per, k_per)],
                    allocations=allocs)

        plgpu.wait_smem_to_gmem(0)

    def fn(x0, w):
        L, N, K = w.shape
        nan = jnp.full((T, WG_N), jnp.nan, bf16)
        part = launch(functools.partial(kernel, dims=(L, N, K)),
                      jax.ShapeDtypeStruct((L, splits, T, N), bf16), N // (2 * WG_N) * splits,
                      interpret=interpret, profile_dir=profile_dir,
                      profile_space=GATHER_PROFILE_SPACE)(x0, nan, w)
        # the layers' activations (the kernel summed them in float32 as it went; the last one
        # only here)
        return part.astype(f32).sum(1).astype(bf16)

    return jax.jit(fn)
