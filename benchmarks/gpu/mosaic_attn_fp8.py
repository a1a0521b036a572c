"""The batch-1 fp8 attention half as a persistent Mosaic GPU kernel: step 3a of the whole-layer
kernel's plan for issue 6 (DESIGN_NOTES, "Next GPU session"), after the fp8 o chain (step 1)
and the MLP pair (step 2, ``mosaic_mlp_fp8.py``).

A chain of L attention halves of Llama-3-8B layers, ``x_{l+1} = x_l + o_l(attn(rope(qkv_l(
RMSNorm(x_l) g_l))))``, e4m3 weights with one float32 scale a row (W8A8, the activations
quantized inside), T = 8 token rows of which row 0 is the live token (the batch-1 decode
bucket: rows 1..7 are padding, their attention output zero), one sequence whose ``pos`` old
positions sit in bf16 K/V pages ``[pages, 16, 8, 128]`` a layer behind a page table; the new
token at position ``pos``. One launch of G CTAs, a grid barrier (GMEM semaphore) after each of
three phases a layer:

- **Q, q/k/v**: ``w_qkv`` [(NH + 2 KVH) D, H] (q heads, k heads, v heads), 128-row tiles (a
  head each), units of (tile, K split of H / ``splits_q``); CTA c takes split
  ``c // (G / splits_q)`` and every (G / splits_q)-th tile, quantizes its K slice of x * g
  per token once a layer (the RMSNorm's weight; its per-token factor commutes with the GEMM:
  one CTA a K slice TMA-adds the slice's sums of squares, as step 2), and TMA-adds each
  warpgroup's 64 rows into ``qkv`` [T, NH + 2 KVH, D] (zeroed first).
- **A, attention** (inside the first O unit's context, so the weight producer streams O's
  first tiles meanwhile): units of (KV-head pair p, context split s); the first compute
  warpgroup takes KV head 2p, the second 2p + 1, both over split s's pages. A warpgroup loads
  the pair's 8 q heads (a [8, 128] tile: heads as wgmma's N columns, its own KV head's 4 in
  columns 0-3 or 4-7), scales them by the token's RMS factor, applies the rope and the
  softmax scale, and walks its pages in blocks of 64 positions: ``S^T = K_blk q^T`` [64, 8]
  (the K block is wgmma's A, as a weight tile is), an online base-2 softmax down the
  positions, ``O^T += V_blk^T P^T``. The two warpgroups' partials merge by column (each its
  own KV head's columns; the other's lse set to -inf) into one [8, 128] tile and its lse,
  stored to ``po`` / ``lse`` [L, pairs, S + 1, ...]. With 128 CTAs, 64 attend (S = 16
  splits a pair); of the other 64, one a pair makes the pair's partial of the new token
  (slot S): the new k and v of every KV head (normed, k roped) as a block of 8 rows, each q
  column masked to its own KV head's row; pair 0's stores them to ``kv_new`` (the
  benchmark's stand-in for the page write: the same bytes, a [2, 8, 128] store). A split's
  first pages load beside q's and the RMS factor's loads, the next block's after a block.
- **O, o + residual**: units of (128-row tile, K slice = pair p: its 8 heads, 1024 wide). Each
  compute warpgroup loads pair p's S + 1 partial tiles, combines them (weights
  exp2(lse - max)), quantizes each head by its own absmax (per (token, head) scales) into a
  block-diagonal [8, 1024] e4m3 operand (row r holds head r's 128 values in columns
  128 r.., zeros elsewhere), so ``acc[:, r]`` = W[:, head r] . attn_r; the epilogue scales the
  columns, sums them into the token's column 0, adds the residual (pair 0's CTAs), and
  TMA-adds into x_{l+1} (zeroed first).

One warp-specialized weight pipeline a unit, chained over the whole kernel (``pipeline_state``).
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
from mosaic_chain import T, WG_N, launch, rel_err, weight_pipeline  # noqa: E402
from mosaic_mlp_fp8 import E4M3_MAX, EPS, _rounded  # noqa: E402  (its roundings, step 2's)

THETA = 500000.0  # Llama-3's rope theta
H, NH, KVH, D = 4096, 32, 8, 128  # Llama-3-8B
PAGE = 16  # positions a page
BLK = 64  # positions a block (wgmma's M)
SPLITS_Q = 8
# (CTAs, tile_k, stages): q/k/v's K slice (512) and o's (1024) split into whole rounds
CANDS = ((128, 256, 2), (128, 128, 4))
VARIANTS = ("sync", "nosync", "sync_noattn", "sync_perlayer")
LAYERED = 7  # the inputs a layer of its own: g, w_qkv, s_qkv, w_o, s_o, k_pages, v_pages


def plan(G: int, h: int, nh: int, kvh: int, splits_q: int) -> dict:
    """The work split (module docstring); raises where G does not divide it."""
    tiles_q, pairs, tiles_o = (nh + 2 * kvh) * D // 128, kvh // 2, h // 128
    if (kvh != 8 or nh // kvh != 4 or h % (splits_q * 128) or G % splits_q
            or tiles_q % (G // splits_q) or (G > 1 and G % (2 * pairs))
            or (tiles_o * pairs) % G):
        raise ValueError(f"H {h}, {nh} / {kvh} heads do not split over {G} CTAs by "
                         f"{splits_q} K splits (8 KV heads of 4 q heads each: the new k / v "
                         f"and a pair's q heads are [8, {D}] tiles)")
    splits_a = max(1, G // (2 * pairs))  # context splits a pair: half the CTAs attend
    return dict(gq=G // splits_q, nq=tiles_q // (G // splits_q), k_q=h // splits_q,
                pairs=pairs, splits_a=splits_a, na=-(-pairs * splits_a // G),
                tiles_o=tiles_o, no=tiles_o * pairs // G, npart=splits_a + 1)


def rope_tables(pos: int, d: int = D, theta: float = THETA):
    """[2, d / 2] float32: cos and sin of pos * theta^(-2i / d) (HF Llama's rotate_half)."""
    inv = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    ang = pos * inv
    return jnp.stack([jnp.cos(ang), jnp.sin(ang)])


def attn_chain(G: int, tile_k: int, steps: int, *, splits_q: int = SPLITS_Q, sync: bool = True,
               attend: bool = True, interpret: bool = False):
    """``fn(x0 [T, H] bf16, g [L, H] bf16, w_qkv [L, R, H] e4m3, s_qkv [L, R] f32,
    w_o [L, H, NH D] e4m3, s_o [L, H] f32, k_pages / v_pages [L, P, 16, KVH, D] bf16,
    page_table [n] int32, pos [1] int32, rope [2, D / 2] f32) -> (xs [L, T, H] bf16,
    qkv [L, T, NH + 2 KVH, D] bf16, ssq [L, T] f32, po [L, pairs, S + 1, 8, D] bf16,
    lse [L, pairs, S + 1, 8] f32, kv_new [L, 2, KVH, D] bf16)`` (module docstring). ``G`` 1
    (``sync`` False): the one-CTA form the interpreter runs (stores instead of TMA adds, its
    warpgroups meeting at a CTA barrier between phases). ``attend`` False (timing only, wrong
    results): no attention units and no new token's partials, the barrier after them kept (o
    combines whatever partials the buffers hold): what the attention phase's work costs."""
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    bf16, e4m3, f32 = jnp.bfloat16, jnp.float8_e4m3fn, jnp.float32
    reduce = G > 1
    if not reduce and sync:
        raise ValueError("the one-CTA form has no grid barrier")
    fp8_tf = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))
    b16_tf = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    WGT, WGL = plgpu.Layout.WGMMA_TRANSPOSED, plgpu.Layout.WGMMA
    log2e = math.log2(math.e)

    def kernel(x0_gmem, g_gmem, wq_gmem, sq_gmem, wo_gmem, so_gmem, kp_gmem, vp_gmem, pt_gmem,
               pos_gmem, rope_gmem, xs_gmem, qkv_gmem, ssq_gmem, po_gmem, lse_gmem, kvn_gmem,
               *, dims):
        L, h, nh, kvh, n_pt = dims
        p = plan(G, h, nh, kvh, splits_q)
        gq, nq, k_q, pairs, S, na, tiles_o, no, npart = (
            p["gq"], p["nq"], p["k_q"], p["pairs"], p["splits_a"], p["na"], p["tiles_o"],
            p["no"], p["npart"])
        k_o = 8 * D  # o's K slice: a pair's 8 heads
        if k_q % (tile_k * steps) or k_o % (tile_k * steps) or tile_k % 128:
            raise ValueError(f"{k_q} (q/k/v) and {k_o} (o) must split into whole rounds of "
                             f"{steps} steps of {tile_k}")
        if n_pt % 8 or n_pt > 256:
            raise ValueError(f"the page table's {n_pt} entries: a multiple of 8, at most 256")
        sms = None if interpret else getattr(jax.devices()[0], "core_count", None)
        if sync and sms is not None and G > sms:
            raise ValueError(f"a grid barrier over {G} CTAs needs them all resident; the GPU "
                             f"has {sms} SMs")
        cta = lax.axis_index("cluster_grid")
        s_q, r_q = cta // gq, cta % gq
        pipeline = functools.partial(weight_pipeline, tile_k=tile_k, cta_n=2 * WG_N,
                                     steps=steps, transforms=fp8_tf)
        ignore = lambda *_, **__: None  # noqa: E731

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(ignore, ignore, 0, k_per=k_q).get_allocations(wq_gmem.at[0]),
            stage_smem=plgpu.SMEM((T, k_q), bf16, transforms=b16_tf),
            x8_smem=plgpu.SMEM((2, T, max(k_q, k_o)), e4m3, transforms=fp8_tf),
            q_smem=plgpu.SMEM((2, 8, D), bf16, transforms=b16_tf),
            k_smem=plgpu.SMEM((2, BLK, D), bf16, transforms=b16_tf),
            v_smem=plgpu.SMEM((2, BLK, D), bf16, transforms=b16_tf),
            p_smem=plgpu.SMEM((2, 8, BLK), bf16, transforms=b16_tf),
            o_smem=plgpu.SMEM((2, 8, D), bf16, transforms=b16_tf),
            part_smem=plgpu.SMEM((npart, 8, D), bf16, transforms=b16_tf),
            res_smem=plgpu.SMEM((2, T, WG_N), bf16, transforms=b16_tf),
            tot_smem=plgpu.SMEM((2, WG_N, T), f32),
            out_smem=plgpu.SMEM((2, T, WG_N), bf16, transforms=b16_tf),
            # TMA's SMEM ends are 128-byte aligned: the untiled buffers after, barriers last
            plse_smem=plgpu.SMEM((npart, 8), f32),
            lse_smem=plgpu.SMEM((2, 32), f32),  # [wg, :8]
            xsc_smem=plgpu.SMEM((2, 2, 32), f32),  # [Q | O, wg, :8]
            ws_smem=plgpu.SMEM((2, WG_N), f32),
            g_smem=plgpu.SMEM((k_q,), bf16),
            ssq_smem=plgpu.SMEM((2, 32), f32),  # [wg, :T]
            rope_smem=plgpu.SMEM((2, D // 2), f32),
            pt_smem=plgpu.SMEM((n_pt,), jnp.int32),
            pos_smem=plgpu.SMEM((8,), jnp.int32),
            stage_bar=plgpu.Barrier(num_arrivals=1),
            g_bar=plgpu.Barrier(num_arrivals=max(1, k_q // 256)),
            ws_bar=plgpu.Barrier(num_barriers=2),
            res_bar=plgpu.Barrier(num_barriers=2),
            ssq_bar=plgpu.Barrier(num_barriers=2),
            q_bar=plgpu.Barrier(num_barriers=2),
            kv_bar=plgpu.Barrier(num_arrivals=2 * (BLK // PAGE), num_barriers=2),
            new_bar=plgpu.Barrier(num_arrivals=2),
            part_bar=plgpu.Barrier(num_arrivals=2),
            merge_bar=plgpu.Barrier(num_arrivals=1),
            const_bar=plgpu.Barrier(num_arrivals=3),
            wg_bar=plgpu.Barrier(num_arrivals=2),
            collective_axes="wg")
        def _scope(allocs, stage_smem, x8_smem, q_smem, k_smem, v_smem, p_smem, o_smem,
                   part_smem, res_smem, tot_smem, out_smem, plse_smem, lse_smem, xsc_smem,
                   ws_smem, g_smem, ssq_smem, rope_smem, pt_smem, pos_smem, stage_bar, g_bar,
                   ws_bar, res_bar, ssq_bar, q_bar, kv_bar, new_bar, part_bar, merge_bar,
                   const_bar, wg_bar):
            wg = lax.axis_index("wg")
            sem = pl.get_global(plgpu.SemaphoreType.REGULAR) if sync else None
            done = lambda phases: 2 * G * (phases + 1)  # noqa: E731

            def wait_for(phases):
                plgpu.semaphore_wait(sem, done(phases), decrement=False, memory_scope="gpu")

            def both_wgs():
                plgpu.barrier_arrive(wg_bar)
                plgpu.barrier_wait(wg_bar)

            def finish_phase():
                plgpu.wait_smem_to_gmem(0)  # written, not only read
                if sync:
                    plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
                elif not reduce:
                    both_wgs()

            def add_after_zeroing(first):
                """Before a TMA add into a target the zeroing phase clears: layer 0's first
                add waits for that phase everywhere (DESIGN_NOTES step 2, lesson (f))."""
                if sync:
                    pl.when(first)(lambda: wait_for(0))

            @pl.when(wg < 2)
            def _setup():
                @pl.when(wg == 0)  # the step's constants, once
                def _():
                    plgpu.copy_gmem_to_smem(pt_gmem, pt_smem, const_bar)
                    plgpu.copy_gmem_to_smem(pos_gmem, pos_smem, const_bar)
                    plgpu.copy_gmem_to_smem(rope_gmem, rope_smem, const_bar)
                plgpu.barrier_wait(const_bar)

                # K/V blocks' unloaded rows must hold no NaN (P's zeros times them)
                zero = plgpu.layout_cast(jnp.zeros((64, 8), f32), WGL)
                for r in range(BLK // 8):
                    for half in range(2):
                        for buf in (k_smem, v_smem):
                            buf.at[wg].at[pl.ds(r * 8, 8), pl.ds(half * 64, 64)].transpose(
                                (1, 0))[...] = zero.astype(bf16)
                out_smem.at[wg].transpose((1, 0))[...] = zero.astype(bf16)
                ssq_smem.at[wg, :T][...] = jnp.sum(zero, axis=0)
                plgpu.commit_smem()

                if reduce:  # phase 0: every TMA-add target zeroed, once for all layers
                    @pl.loop(0, L)
                    def _(l):
                        @pl.when(s_q == 0)  # q/k/v: split 0's CTAs, their tiles' columns
                        def _():
                            for j in range(nq):
                                plgpu.copy_smem_to_gmem(
                                    out_smem.at[wg],
                                    qkv_gmem.at[l].at[:, r_q + gq * j, pl.ds(wg * WG_N, WG_N)])

                        @pl.when(cta < tiles_o)  # o: CTA t, tile t's columns
                        def _():
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[wg],
                                xs_gmem.at[l].at[:, pl.ds(cta * 2 * WG_N + wg * WG_N, WG_N)])
                        pl.when((cta == 0) & (wg == 0))(lambda: plgpu.copy_smem_to_gmem(
                            ssq_smem.at[0, :T], ssq_gmem.at[l]))
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    plgpu.wait_smem_to_gmem(0)
                    if sync:
                        plgpu.semaphore_signal(sem, 1, memory_scope="gpu")

            def x_src(l, cols, copy):
                pl.when(l == 0)(lambda: copy(x0_gmem.at[:, cols]))
                pl.when(l > 0)(lambda: copy(xs_gmem.at[lax.max(l - 1, 0)].at[:, cols]))

            def scaled(acc_ref, sc_ref):
                x_s = plgpu.load(sc_ref, (), layout=WGL.reduce(0))
                return acc_ref[...] * lax.broadcast_in_dim(x_s, (WG_N, T), [1])

            def row_scaled(val):
                plgpu.barrier_wait(ws_bar.at[wg])
                w_s = plgpu.load(ws_smem.at[wg], (), layout=WGL.reduce(1))
                return val * lax.broadcast_in_dim(w_s, (WG_N, T), [0])

            def put(val, dst, first_add=None):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                out_smem.at[wg].transpose((1, 0))[...] = val.astype(bf16)
                plgpu.commit_smem()
                if first_add is not None:
                    add_after_zeroing(first_add)
                plgpu.copy_smem_to_gmem(out_smem.at[wg], dst,
                                        reduction_op="add" if reduce else None)

            def mma_of(idxs, w_smem, acc_ref):
                plgpu.wgmma(acc_ref, w_smem.at[pl.ds(wg * WG_N, WG_N)],
                            x8_smem.at[wg].at[:, pl.ds(idxs[0] * tile_k, tile_k)]
                            .transpose((1, 0)))
                plgpu.wgmma_wait(0)
                return acc_ref

            def load_token(l, heads):
                """Issues the loads of token 0's ``heads`` of q/k/v ([8, D] rows into this
                warpgroup's q buffer) and the layer's sums of squares (complete after the Q
                barrier); ``token_factor`` waits for them."""
                plgpu.copy_gmem_to_smem(qkv_gmem.at[l, 0, heads], q_smem.at[wg], q_bar.at[wg])
                plgpu.copy_gmem_to_smem(ssq_gmem.at[l], ssq_smem.at[wg, :T], ssq_bar.at[wg])

            def token_factor():
                """Token 0's rsqrt(mean(x_l^2) + eps), once ``load_token``'s loads landed."""
                plgpu.barrier_wait(q_bar.at[wg])
                plgpu.barrier_wait(ssq_bar.at[wg])
                return lax.rsqrt(ssq_smem[wg, 0] * (1.0 / h) + EPS)

            def roped(ref, factor, rope: bool):
                """ref [8, D] bf16 (rows = heads) scaled by ``factor``, rotate-half roped
                (HF Llama) where ``rope``, stored back."""
                lo = plgpu.load(ref.at[:, pl.ds(0, D // 2)].transpose((1, 0)), (),
                                layout=WGT).astype(f32) * factor
                hi = plgpu.load(ref.at[:, pl.ds(D // 2, D // 2)].transpose((1, 0)), (),
                                layout=WGT).astype(f32) * factor
                if rope:
                    c, s = (lax.broadcast_in_dim(plgpu.load(rope_smem.at[i], (),
                                                            layout=WGT.reduce(1)), lo.shape, [0])
                            for i in range(2))
                    lo, hi = lo * c - hi * s, hi * c + lo * s
                ref.at[:, pl.ds(0, D // 2)].transpose((1, 0))[...] = lo.astype(bf16)
                ref.at[:, pl.ds(D // 2, D // 2)].transpose((1, 0))[...] = hi.astype(bf16)
                plgpu.commit_smem()

            def attend(k_ref, v_ref, valid, carry):
                """One block: k_ref / v_ref [64, D] (rows = positions), valid [64, 8] ->
                the online softmax's (m, l, o_lo, o_hi) updated (base 2; q pre-scaled)."""
                m, l_, o_lo, o_hi = carry

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, k_ref, q_smem.at[wg].transpose((1, 0)))
                    plgpu.wgmma_wait(0)
                    return acc_ref[...]
                st = pl.run_scoped(qk, plgpu.ACC((BLK, 8), f32))
                st = jnp.where(valid, st, -1e30)
                m_new = jnp.maximum(m, jnp.max(st, axis=0))
                alpha = jnp.exp2(m - m_new)
                pr = jnp.where(valid, jnp.exp2(st - lax.broadcast_in_dim(m_new, st.shape, [1])),
                               0.0)
                l_ = l_ * alpha + jnp.sum(pr, axis=0)
                p_smem.at[wg].transpose((1, 0))[...] = pr.astype(bf16)
                plgpu.commit_smem()
                outs = []
                for half, o in enumerate((o_lo, o_hi)):
                    o = o * lax.broadcast_in_dim(alpha, o.shape, [1])

                    def pv(acc_ref, half=half):
                        plgpu.wgmma(acc_ref, v_ref.at[:, pl.ds(half * 64, 64)].transpose((1, 0)),
                                    p_smem.at[wg].transpose((1, 0)))
                        plgpu.wgmma_wait(0)
                        return acc_ref[...]
                    outs.append(o + pl.run_scoped(pv, plgpu.ACC((64, 8), f32)))
                return m_new, l_, outs[0], outs[1]

            def softmax_init():
                zero = plgpu.layout_cast(jnp.zeros((64, 8), f32), WGL)
                return (plgpu.layout_cast(jnp.full((8,), -1e30, f32), WGL.reduce(0)),
                        plgpu.layout_cast(jnp.zeros((8,), f32), WGL.reduce(0)), zero, zero)

            def iotas():
                return (plgpu.broadcasted_iota(jnp.int32, (BLK, 8), 0, layout=WGL),
                        plgpu.broadcasted_iota(jnp.int32, (BLK, 8), 1, layout=WGL))

            def finish_partial(carry, mine):
                """(o [8, D] normalized, as two [64, 8] halves; lse [8], -inf outside
                ``mine`` (columns) and where nothing was attended)."""
                m, l_, o_lo, o_hi = carry
                ok = l_ > 0 if mine is None else (l_ > 0) & mine
                inv = jnp.where(ok, 1.0 / jnp.where(l_ > 0, l_, 1.0), 0.0)
                lse = jnp.where(ok, m + jnp.log2(jnp.where(l_ > 0, l_, 1.0)), -jnp.inf)
                return ([o * lax.broadcast_in_dim(inv, o.shape, [1]) for o in (o_lo, o_hi)],
                        lse)

            def store_tile(ref, halves):
                for half, o in enumerate(halves):
                    ref.at[:, pl.ds(half * 64, 64)].transpose((1, 0))[...] = o.astype(bf16)

            def attention(l, ua):
                """Unit ua = (pair, split): partials of this warpgroup's KV head over the
                split's pages, merged with the other warpgroup's by column, stored."""
                pair, s = ua // S, lax.rem(ua, S)
                kh = 2 * pair + wg
                load_token(l, pl.ds(8 * pair, 8))
                pos = pos_smem[0]
                old_pages = (pos + PAGE - 1) // PAGE
                pps = (old_pages + S - 1) // S  # pages a split
                first = s * pps
                end = jnp.minimum(first + pps, old_pages)
                lim = jnp.minimum(end * PAGE, pos)  # positions this split attends: < lim
                nblk = jnp.maximum(end - first + BLK // PAGE - 1, 0) // (BLK // PAGE)
                rows, cols = iotas()

                def load_block(b):  # its pages' K and V; kv_bar counts the skipped ones too
                    for i in range(BLK // PAGE):
                        pg = first + b * (BLK // PAGE) + i

                        @pl.when(pg < end)
                        def _():
                            page = pt_smem[pg]
                            for src, dst in ((kp_gmem, k_smem), (vp_gmem, v_smem)):
                                plgpu.copy_gmem_to_smem(
                                    src.at[l, page, :, kh], dst.at[wg, pl.ds(i * PAGE, PAGE)],
                                    kv_bar.at[wg])

                        @pl.when(pg >= end)
                        def _():
                            plgpu.barrier_arrive(kv_bar.at[wg])
                            plgpu.barrier_arrive(kv_bar.at[wg])

                pl.when(nblk > 0)(lambda: load_block(0))  # beside q's and the factor's loads
                roped(q_smem.at[wg], token_factor() * (log2e / math.sqrt(D)), True)

                def block(b, carry):
                    plgpu.barrier_wait(kv_bar.at[wg])
                    start = (first + b * (BLK // PAGE)) * PAGE
                    carry = attend(k_smem.at[wg], v_smem.at[wg], rows + start < lim, carry)
                    pl.when(b + 1 < nblk)(lambda: load_block(b + 1))  # the buffers are read
                    return carry
                carry = lax.fori_loop(0, nblk, block, softmax_init())
                mine = plgpu.broadcasted_iota(jnp.int32, (8,), 0, layout=WGL.reduce(0)) // 4 == wg
                halves, lse = finish_partial(carry, mine)

                # merge: each warpgroup's columns are its own KV head's
                @pl.when(wg == 1)
                def _():
                    store_tile(o_smem.at[1], halves)
                    lse_smem.at[1, :8][...] = lse
                    plgpu.commit_smem()
                    plgpu.barrier_arrive(merge_bar)

                @pl.when(wg == 0)
                def _():
                    plgpu.barrier_wait(merge_bar)
                    other = [plgpu.load(o_smem.at[1].at[:, pl.ds(hf * 64, 64)].transpose((1, 0)),
                                        (), layout=WGL).astype(f32) for hf in range(2)]
                    lse1 = plgpu.load(lse_smem.at[1, :8], (), layout=WGL.reduce(0))
                    sel = cols < 4
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_smem[0] reusable
                    store_tile(o_smem.at[0], [jnp.where(sel, a, b) for a, b in
                                              zip(halves, other)])
                    lse_smem.at[0, :8][...] = jnp.maximum(lse, lse1)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_smem.at[0], po_gmem.at[l, pair, s])
                    plgpu.copy_smem_to_gmem(lse_smem.at[0, :8], lse_gmem.at[l, pair, s])
                both_wgs()  # o_smem[1] read: the second may go on to its next unit


            def new_token(l, pair):
                """Pair ``pair``'s partial of the new token (slot S; the first compute
                warpgroup): every KV head's new k (roped) and v, normed, as rows 0..7 of a
                block, each q column attending to its own KV head's row only; pair 0's also
                stores them (``kv_new``)."""
                load_token(l, pl.ds(8 * pair, 8))
                for i, buf in enumerate((k_smem, v_smem)):
                    plgpu.copy_gmem_to_smem(qkv_gmem.at[l, 0, pl.ds(nh + i * kvh, kvh)],
                                            buf.at[wg, pl.ds(0, 8)], new_bar)
                factor = token_factor()
                roped(q_smem.at[wg], factor * (log2e / math.sqrt(D)), True)
                plgpu.barrier_wait(new_bar)
                roped(k_smem.at[wg, pl.ds(0, 8)], factor, True)
                roped(v_smem.at[wg, pl.ds(0, 8)], factor, False)

                @pl.when(pair == 0)
                def _():
                    for i, buf in enumerate((k_smem, v_smem)):
                        plgpu.copy_smem_to_gmem(buf.at[wg, pl.ds(0, 8)], kvn_gmem.at[l, i])
                rows, cols = iotas()
                carry = attend(k_smem.at[wg], v_smem.at[wg], rows == 2 * pair + cols // 4,
                               softmax_init())
                halves, lse = finish_partial(carry, None)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                store_tile(o_smem.at[0], halves)
                lse_smem.at[0, :8][...] = lse
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem.at[0], po_gmem.at[l, pair, S])
                plgpu.copy_smem_to_gmem(lse_smem.at[0, :8], lse_gmem.at[l, pair, S])

            def combine(l, pair):
                """Pair ``pair``'s partials -> this warpgroup's block-diagonal e4m3 operand
                (x8_smem[wg], [8, 1024]) and its per-head scales (xsc_smem[1, wg])."""
                @pl.when(wg == 0)
                def _():
                    plgpu.copy_gmem_to_smem(po_gmem.at[l, pair], part_smem, part_bar)
                    plgpu.copy_gmem_to_smem(lse_gmem.at[l, pair], plse_smem, part_bar)
                plgpu.barrier_wait(part_bar)
                lse_of = lambda i: plgpu.load(plse_smem.at[i], (), layout=WGT.reduce(0))  # noqa
                big = functools.reduce(jnp.maximum, [lse_of(i) for i in range(npart)])
                num, den = None, None
                for i in range(npart):
                    w = jnp.exp2(lse_of(i) - big)
                    o = plgpu.load(part_smem.at[i].transpose((1, 0)), (), layout=WGT)
                    o = o.astype(f32) * lax.broadcast_in_dim(w, (D, 8), [1])
                    num = o if num is None else num + o
                    den = w if den is None else den + w
                comb = num * lax.broadcast_in_dim(1.0 / den, num.shape, [1])  # [D, heads]
                amax = jnp.max(jnp.abs(comb), axis=0)
                inv = jnp.where(amax > 0, E4M3_MAX / amax, 1.0)
                col = plgpu.broadcasted_iota(jnp.int32, (D, 8), 1, layout=WGT)
                q8 = comb * lax.broadcast_in_dim(inv, comb.shape, [1])
                for r in range(8):
                    x8_smem.at[wg].at[:, pl.ds(r * D, D)].transpose((1, 0))[...] = jnp.where(
                        col == r, q8, 0.0).astype(e4m3)
                xsc_smem.at[1, wg, :8][...] = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
                plgpu.commit_smem()

            @pl.loop(0, L)
            def _layer(l):
                # ---- phase Q: q/k/v, nq units (tile r_q + gq j, K split s_q) ----
                @pl.loop(0, nq)
                def _q(j):
                    tile = r_q + gq * j

                    def ctx(eval_pipeline):
                        @pl.when(j == 0)
                        def _():  # the CTA's K slice of x_l times g, quantized once a layer
                            if sync:
                                pl.when(l > 0)(lambda: wait_for(3 * l))
                            elif not reduce:
                                both_wgs()  # the other warpgroup is done with the stage

                            @pl.when(wg == 0)
                            def _():
                                x_src(l, pl.ds(s_q * k_q, k_q), lambda src: (
                                    plgpu.copy_gmem_to_smem(src, stage_smem, stage_bar)))
                                for b in range(max(1, k_q // 256)):
                                    w = min(k_q, 256)
                                    plgpu.copy_gmem_to_smem(
                                        g_gmem.at[l, pl.ds(s_q * k_q + b * w, w)],
                                        g_smem.at[pl.ds(b * w, w)], g_bar)
                            plgpu.barrier_wait(stage_bar)
                            plgpu.barrier_wait(g_bar)
                            v = plgpu.load(stage_smem.transpose((1, 0)), (),
                                           layout=WGT).astype(f32)  # [k_q, T]
                            sq = jnp.sum(v * v, axis=0)

                            @pl.when((r_q == 0) & (wg == 0))  # one CTA a K slice adds it
                            def _():
                                ssq_smem.at[0, :T][...] = sq
                                plgpu.commit_smem()
                                add_after_zeroing(l == 0)
                                plgpu.copy_smem_to_gmem(ssq_smem.at[0, :T], ssq_gmem.at[l],
                                                        reduction_op="add" if reduce else None)
                            gv = plgpu.load(g_smem, (), layout=WGT.reduce(1)).astype(f32)
                            v = v * lax.broadcast_in_dim(gv, v.shape, [0])
                            amax = jnp.max(jnp.abs(v), axis=0)
                            inv = jnp.where(amax > 0, E4M3_MAX / amax, 1.0)
                            x8_smem.at[wg].at[:, pl.ds(0, k_q)].transpose((1, 0))[...] = (
                                v * lax.broadcast_in_dim(inv, v.shape, [1])).astype(e4m3)
                            xsc_smem.at[0, wg, :T][...] = jnp.where(amax > 0, amax / E4M3_MAX,
                                                                    1.0)
                            plgpu.commit_smem()
                        plgpu.copy_gmem_to_smem(sq_gmem.at[l, 2 * tile + wg], ws_smem.at[wg],
                                                ws_bar.at[wg])

                        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((WG_N, T), f32))
                        def _acc(acc_ref):
                            eval_pipeline(acc_ref)
                            val = row_scaled(scaled(acc_ref, xsc_smem.at[0, wg, :T]))
                            put(val, qkv_gmem.at[l].at[:, tile, pl.ds(wg * WG_N, WG_N)],
                                first_add=(l == 0) & (j == 0) if reduce else None)
                        pl.when(j == nq - 1)(finish_phase)

                    pipeline(mma_of, ctx, jnp.where((l == 0) & (j == 0), 0, 1),
                             k_per=k_q)(
                        wq_gmem.at[l].at[pl.ds(tile * 2 * WG_N, 2 * WG_N),
                                         pl.ds(s_q * k_q, k_q)],
                        allocations=allocs)

                # ---- phases A and O: attention units, then o units (tile, pair) ----
                @pl.loop(0, no)
                def _o(j):
                    u = cta * no + j  # a CTA's units: runs of one tile's pairs
                    tile, pair = u // pairs, lax.rem(u, pairs)
                    first, last = (j == 0) | (pair == 0), (j == no - 1) | (pair == pairs - 1)
                    cols = pl.ds(tile * 2 * WG_N + wg * WG_N, WG_N)

                    def ctx(eval_pipeline):
                        @pl.when(j == 0)
                        def _():
                            if sync:
                                wait_for(3 * l + 1)
                            for i in range(na if attend else 0):
                                ua = cta + G * i
                                pl.when(ua < pairs * S)(lambda ua=ua: attention(l, ua))
                            # the new token's partials: CTAs with no attention unit (grid),
                            # or the one CTA after its attention units
                            if not attend:
                                pass
                            elif G >= pairs * S + pairs:
                                un = cta - pairs * S
                                pl.when((wg == 0) & (un >= 0) & (un < pairs))(
                                    lambda: new_token(l, un))
                            else:
                                for pr in range(pairs):
                                    pl.when(wg == 0)(lambda pr=pr: new_token(l, pr))
                            finish_phase()
                            if sync:
                                wait_for(3 * l + 2)

                        if not reduce:
                            both_wgs()  # both done with the last pair's partials
                        combine(l, pair)
                        plgpu.copy_gmem_to_smem(so_gmem.at[l, 2 * tile + wg], ws_smem.at[wg],
                                                ws_bar.at[wg])

                        @pl.when(pair == 0)  # the K slice that adds the residual
                        def _():
                            x_src(l, cols, lambda src: plgpu.copy_gmem_to_smem(
                                src, res_smem.at[wg], res_bar.at[wg]))

                        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((WG_N, T), f32))
                        def _acc(acc_ref):
                            eval_pipeline(acc_ref)
                            val = row_scaled(scaled(acc_ref, xsc_smem.at[1, wg, :T]))
                            tok = jnp.sum(val, axis=1)  # [64]: the heads' columns summed
                            c = plgpu.broadcasted_iota(jnp.int32, (WG_N, T), 1, layout=WGL)
                            val = jnp.where(c == 0, lax.broadcast_in_dim(tok, val.shape, [0]),
                                            0.0)
                            total = lambda: plgpu.load(tot_smem.at[wg], (), layout=WGL)  # noqa

                            @pl.when(first)
                            def _():
                                tot_smem.at[wg][...] = val

                            @pl.when(~first)
                            def _():
                                tot_smem.at[wg][...] = total() + val

                            @pl.when(pair == 0)  # this run adds the residual
                            def _():
                                plgpu.barrier_wait(res_bar.at[wg])
                                res = plgpu.load(res_smem.at[wg].transpose((1, 0)), (),
                                                 layout=WGL)
                                tot_smem.at[wg][...] = total() + res.astype(f32)
                            pl.when(last)(lambda: put(total(), xs_gmem.at[l].at[:, cols]))
                        pl.when(j == no - 1)(finish_phase)

                    pipeline(mma_of, ctx, jnp.where((l == L - 1) & (j == no - 1), 2, 1),
                             k_per=k_o)(
                        wo_gmem.at[l].at[pl.ds(tile * 2 * WG_N, 2 * WG_N),
                                         pl.ds(pair * k_o, k_o)],
                        allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def fn(x0, g, w_qkv, s_qkv, w_o, s_o, k_pages, v_pages, page_table, pos, rope):
        L, R, h = w_qkv.shape
        kvh = k_pages.shape[3]
        nh = R // D - 2 * kvh
        p = plan(G, h, nh, kvh, splits_q)
        out = (jax.ShapeDtypeStruct((L, T, h), bf16),
               jax.ShapeDtypeStruct((L, T, nh + 2 * kvh, D), bf16),
               jax.ShapeDtypeStruct((L, T), f32),
               jax.ShapeDtypeStruct((L, p["pairs"], p["npart"], 8, D), bf16),
               jax.ShapeDtypeStruct((L, p["pairs"], p["npart"], 8), f32),
               jax.ShapeDtypeStruct((L, 2, kvh, D), bf16))
        n_pt = page_table.shape[0]
        k = launch(functools.partial(kernel, dims=(L, h, nh, kvh, n_pt)), out, G,
                   interpret=interpret)
        return k(x0, g.astype(bf16), w_qkv, s_qkv.reshape(L, R // WG_N, WG_N).astype(f32), w_o,
                 s_o.reshape(L, h // WG_N, WG_N).astype(f32), k_pages, v_pages,
                 page_table.astype(jnp.int32), jnp.broadcast_to(pos.astype(jnp.int32), (8,)),
                 rope.astype(f32))

    return jax.jit(fn)


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
