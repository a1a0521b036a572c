"""The grid barrier on Mosaic GPU alone: what one layer boundary of the persistent chain costs
with no GEMM around it, with no weights streaming or beside an independent stream
(DESIGN_NOTES "Next GPU session": the whole-layer kernel needs a boundary of ~1.3 µs, and
every form of ``mosaic_chain.py`` pays ~2 µs).

``rounds`` rounds of ``mosaic_chain``'s barrier over ``grid`` CTAs of three warpgroups (one of
which works): each round the CTA signals a GMEM semaphore (GPU scope; Pallas'
``semaphore_signal``, a release) and waits for the monotone count of the round. Before its
signal a CTA does, by ``form``:

- ``signal``: nothing (the barrier's own latency: release, propagation, poll);
- ``relaxed``: nothing, and the signal a relaxed add with no fence (``mosaic_chain``'s
  ``relaxed_signal``: it orders nothing, so it would be wrong around writes; timing only,
  what the release's fence costs);
- ``store``: TMA-stores its [8, 64] bf16 tile into the output and waits for it to land;
- ``add``: TMA-adds it instead (the chain's epilogue, whose writes the release publishes);
- ``add_load``: the add, then after the barrier a TMA load of a [8, 1024] slice of the
  round's output (the chain's activations' reload), so a round is the chain's whole
  boundary less the weights;
- ``none``: no barrier (with ``--streams``: the weight stream's own time).

``--streams N``: meanwhile each CTA's producer warpgroup streams N weight tiles (128 x 128
bf16, 4 in flight) a round from a 1 GiB buffer, depending on nothing: does a stream in flight
slow the barrier (the chain's release fence took 2.2 µs under the profiler), and does the
barrier hide under an independent stream? (8 tiles a round is the chain's o layer.)

Timing only: the output is not initialised, so its values mean nothing. µs a round by wall time
of back-to-back calls (a call is ``rounds`` rounds, far longer than its launch) and by GPU time.

    python3 benchmarks/gpu/grid_barrier.py [--rounds 256] [--grids 128,132,64,32]
    python3 benchmarks/gpu/grid_barrier.py --grids 128 --streams 0,1,2,8 \
        --forms none,signal,add_load
    python3 benchmarks/gpu/grid_barrier.py --smoke   # CPU: every form lowered for an H100
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # imported by the tests too
import gpu_trace  # noqa: E402
from mosaic_chain import T, WG_N, launch, relaxed_signal  # noqa: E402

FORMS = ("none", "signal", "relaxed", "store", "add", "add_load")
LOAD_K = 1024  # the chain's K slice of activations a CTA reloads after the barrier
TILE = 128  # a streamed weight tile: TILE x TILE bf16, 32 KB (the chain's o-shape tile)
STAGES = 4  # weight tiles in flight a CTA (the chain's ring)


def barrier_rounds(rounds: int, grid: int, form: str = "signal", *, stream: int = 0,
                   scope: str = "gpu", num_sms: int | None = None):
    """``fn(x [T, LOAD_K] bf16, w [R, TILE] bf16) -> out [rounds, T, grid * WG_N] bf16``
    (module docstring). ``stream``: meanwhile the CTA's producer warpgroup streams ``stream``
    weight tiles a round from ``w`` (R a multiple of TILE; CTA g's i-th load is tile
    (i x grid + g) mod R / TILE, ``STAGES`` in flight), independent of the barrier: does a
    stream in flight slow the barrier, and does the barrier hide under it? Refuses a grid
    larger than ``num_sms`` (default: the GPU's), which would hang."""
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}: one of {FORMS}")
    sms = num_sms or getattr(jax.devices()[0], "core_count", None)
    if sms is not None and grid > sms:
        raise ValueError(f"a grid barrier over {grid} CTAs needs them all resident, and the "
                         f"GPU has {sms} SMs")
    if form == "add_load" and grid * WG_N < LOAD_K:
        raise ValueError(f"add_load reads {LOAD_K} columns of a round: a grid of at least "
                         f"{LOAD_K // WG_N}")
    bf16 = jnp.bfloat16

    def kernel(x_gmem, w_gmem, out_gmem):
        g = lax.axis_index("cluster_grid")
        n_w = w_gmem.shape[0] // TILE
        sw = plgpu.find_swizzle(WG_N * 2 * 8)  # the chain's SMEM layout: 8-row tiles, swizzled
        tf = (plgpu.TilingTransform((8, sw // 2)), plgpu.SwizzleTransform(sw))

        @functools.partial(pl.run_scoped, x_smem=plgpu.SMEM((T, LOAD_K), bf16, transforms=tf),
                           tile_smem=plgpu.SMEM((T, WG_N), bf16, transforms=tf),
                           ring=plgpu.SMEM((STAGES, TILE, TILE), bf16, transforms=tf),
                           bar=plgpu.Barrier(), full=plgpu.Barrier(num_barriers=STAGES),
                           collective_axes="wg")
        def _(x_smem, tile_smem, ring, bar, full):
            sem = pl.get_global(plgpu.SemaphoreType.REGULAR)

            @pl.when(lax.axis_index("wg") == 2)
            def _():  # the weight stream: nothing waits for it but itself
                if not stream:
                    return
                n = rounds * stream

                @pl.loop(0, n)
                def _(i):
                    slot = i % STAGES
                    pl.when(i >= STAGES)(lambda: plgpu.barrier_wait(full.at[slot]))
                    plgpu.copy_gmem_to_smem(
                        w_gmem.at[pl.ds(((i * grid + g) % n_w) * TILE, TILE)], ring.at[slot],
                        full.at[slot])

                @pl.loop(0, STAGES)  # the last loads land
                def _(k):
                    j = n - STAGES + k
                    pl.when(j >= 0)(lambda: plgpu.barrier_wait(full.at[j % STAGES]))

            @pl.when(lax.axis_index("wg") == 0)
            def _():
                plgpu.copy_gmem_to_smem(x_gmem.at[:, pl.ds(0, WG_N)], tile_smem, bar)
                plgpu.barrier_wait(bar)

                @pl.loop(0, rounds)
                def _(r):
                    if form == "none":
                        return
                    if form not in ("signal", "relaxed"):
                        plgpu.copy_smem_to_gmem(
                            tile_smem,
                            out_gmem.at[r].at[:, pl.ds(g * WG_N, WG_N)],
                            reduction_op=None if form == "store" else "add")
                        plgpu.wait_smem_to_gmem(0)
                    if form == "relaxed":
                        relaxed_signal(sem, scope)
                    else:
                        plgpu.semaphore_signal(sem, 1, memory_scope=scope)
                    plgpu.semaphore_wait(sem, grid * (r + 1), decrement=False,
                                         memory_scope=scope)
                    if form == "add_load":
                        plgpu.copy_gmem_to_smem(
                            out_gmem.at[r].at[:, pl.ds((g % (grid * WG_N // LOAD_K)) * LOAD_K,
                                                      LOAD_K)], x_smem, bar)
                        plgpu.barrier_wait(bar)

        plgpu.wait_smem_to_gmem(0)

    def fn(x, w):
        return launch(kernel, jax.ShapeDtypeStruct((rounds, T, grid * WG_N), bf16), grid)(x, w)

    return jax.jit(fn)


def main(argv=None):
    from persistent_chain import wall_us  # noqa: PLC0415

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=256)
    ap.add_argument("--grids", default="128,132,64,32")
    ap.add_argument("--streams", default="0",
                    help="weight tiles a round streamed beside the barrier (comma-separated)")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true",
                    help="CPU: every form lowered for an abstract H100 (the interpreter runs "
                         "no semaphores)")
    a = ap.parse_args(argv)
    rows = []
    emit = gpu_trace.jsonl_emitter(rows, a.out)
    forms = a.forms.split(",")
    x = jnp.ones((T, LOAD_K), jnp.bfloat16)
    w_shape = (8192 * TILE * 4, TILE)  # 1 GiB: every round's tiles from the DRAM, not the L2
    if a.smoke:
        ok = True
        sds = jax.ShapeDtypeStruct
        for form, stream in [(f, int(f == "none")) for f in forms] + [("add_load", 2)]:
            row = dict(form=form, grid=128, rounds=4, stream=stream)
            ok &= gpu_trace.lower_for_h100(
                row, barrier_rounds(4, 128, form, stream=stream, num_sms=132),
                sds(x.shape, x.dtype), sds(w_shape, jnp.bfloat16))
            emit(row)
        return int(not ok)
    w = jnp.ones(w_shape, jnp.bfloat16) if a.streams != "0" else jnp.ones((TILE, TILE),
                                                                            jnp.bfloat16)
    for grid, stream, form in itertools.product(map(int, a.grids.split(",")),
                                                map(int, a.streams.split(",")), forms):
        if form == "none" and not stream:
            continue
        row = dict(form=form, grid=grid, rounds=a.rounds, stream=stream)
        try:
            fn = barrier_rounds(a.rounds, grid, form, stream=stream)
            us = wall_us(fn, (x, w), a.calls, a.repeats)
            row["us_per_round"] = round(us / a.rounds, 3)
            dev_t = gpu_trace.device_time(fn, [(x, w)], calls=3)
            if dev_t is not None:
                row["gpu_us_per_round"] = round(dev_t["device_us"] / a.rounds, 3)
        except Exception as e:  # a form Mosaic refuses: say so, go on
            row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        emit(row)
    print("\n| grid | tiles a round | form | µs a round (wall) | GPU µs a round |\n"
          "|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['grid']} | {r['stream']} | {r['form']} | "
              f"{r.get('us_per_round', r.get('error', '')[:120])} | "
              f"{r.get('gpu_us_per_round', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
