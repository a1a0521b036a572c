"""Is a persistent kernel with a grid barrier the batch-1 lever? A chain of skinny GEMMs three ways.

Batch-1 decode is ~290 kernels a token, and each GEMM among them reads its weight slower than
the GPU streams a long read (the o projection: 33.5 MB in 8.7 µs, 7.2 at 4.64 TB/s; RESULTS,
"Rerun of 2026-12-03"): every kernel has a ramp (launch, the first loads' latency) and a tail (the
last wave draining). A persistent kernel runs many phases in one launch, the programs waiting for
each other at a grid barrier between phases instead of the GPU draining and relaunching. This
script measures that on the simplest chain with a true dependency between phases:
``x_{l+1} = x_l @ W_l`` for L layers (a distinct weight per layer, so each reads from memory),
8 rows (the batch-1 decode bucket), square D x D weights (the o projection's shape by default):

- ``xla``: L ``jnp.dot`` in one jit (XLA's GEMMs; command buffers, programmatic dependent launch);
- ``pallas_layers``: L launches of the Pallas GEMV below in one jit (one phase per launch);
- ``persistent_grid``: ONE launch of the same GEMV body for all L layers, ``programs`` programs
  (at most one per SM, so all are resident at once: a grid barrier needs that) with a grid
  barrier between layers (``_grid_barrier``: a counter bumped with an acq_rel atomic, polled with
  atomics). A layer's activations are written once and first read after its barrier, so no
  SM's L1 holds a stale copy (Pallas 0.11's ``.cg`` load modifier does not lower: its check
  wants ".cg", its table "cg");
- ``persistent_none``: the same launch without the barriers (wrong results: timing only, what
  the barriers cost).

Measured on the H200 (2026-12-03, RESULTS "Rerun of 2026-12-03 (09:00)"): the barrier is
correct over 32 layers and 128-132 programs, and costs ~2.5-3 µs a layer, as much as the kernel
boundary it replaces: the one-launch chain is no faster than a launch a layer, and XLA's chain
is faster than both. Not a lever in this form.

Figures: µs a layer by wall time of back-to-back calls (GPU-bound: a call is L layers, far
longer than its launch; this counts the gaps between kernels, which GPU-time unions do not), the
read bandwidth it implies, the GPU time (profiler; gaps not counted), and the rel. error
against a float32 reference (bf16 between layers, as every variant rounds).

    python3 benchmarks/gpu/persistent_chain.py [--dim 4096] [--layers 32] [--out FILE]
    python3 benchmarks/gpu/persistent_chain.py --smoke   # CPU, interpret mode, 1 program

On the CPU (interpret mode) programs run one after another, so a barrier over several would
spin forever: ``--smoke`` runs one program, whose barrier passes at once.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import gpu_trace  # noqa: E402

BM = 16  # rows of the tensor-core dot
ROWS = 8  # real rows (the batch-1 decode bucket); the dot's other rows are zeros


SYNCS = ("grid", "none")


def _grid_barrier(cnt_ref, target, spin: bool):
    """Adds this program's 1 to counter 0 (an acq_rel atomic at GPU scope, after a CTA barrier so
    every thread's stores precede its release), then polls it with atomics until it reaches
    ``target``. ``spin`` False (interpret mode: programs run one after another, and the
    interpreter has neither a CTA barrier nor an atomic inside a while loop) skips the wait.

    Polling with volatile loads instead (then one atomic for the acquire) gave wrong results on
    the H200 (2026-12-03, RESULTS): the loop left before every program had arrived."""
    zero, one = jnp.int32(0), jnp.int32(1)
    if spin:
        plgpu.debug_barrier()
    plgpu.atomic_add(cnt_ref, zero, one)
    if spin:
        jax.lax.while_loop(lambda v: v < target,
                           lambda _: plgpu.atomic_add(cnt_ref, zero, zero), zero)


def _gemv_block(x_ref, x_row0, w_ref, y_ref, y_row0, j, *, D, block_n, block_k):
    """y[rows, j-th block_n columns] = x[rows] @ w^T, w [D_out, D_in] (K contiguous); only the
    first ROWS rows of x are read (the rest of the dot's 16 are zeros)."""
    rm = jnp.arange(BM, dtype=jnp.int32)
    real = (rm < ROWS)[:, None]
    rn = j * block_n + jnp.arange(block_n, dtype=jnp.int32)
    k_off = jnp.arange(block_k, dtype=jnp.int32)

    def body(kb, acc):
        rk = kb * block_k + k_off
        w = plgpu.load(w_ref.at[rn[:, None], rk[None, :]]).T  # [block_k, block_n]
        x = plgpu.load(x_ref.at[x_row0 + rm[:, None], rk[None, :]], mask=real, other=0)
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, D // block_k, body, jnp.zeros((BM, block_n), jnp.float32))
    plgpu.store(y_ref.at[y_row0 + rm[:, None], rn[None, :]], acc.astype(y_ref.dtype))


def _chain_kernel(x_ref, cnt_in, *rest, L, D, block_n, block_k, programs, sync, spin):
    """The whole chain in one launch; act [L * BM, D] holds each layer's output (rows l * BM...).
    sync "grid": a grid barrier between layers (``_grid_barrier``); "none": no waiting (wrong
    results: what the barrier costs).

    Tried and removed (2026-12-03, RESULTS): per-chunk flags instead of the barrier (a program
    of layer l + 1 waiting, inside its K loop, for the writers of just the chunk of x it reads
    next, polled with volatile loads): 1.6-2.5x slower than the barrier, and wrong (the volatile
    poll, as in the barrier's variant)."""
    del cnt_in  # aliased to cnt_ref
    w_refs, (act_ref, cnt_ref) = rest[:L], rest[L:]
    p = pl.program_id(0)
    blocks = D // block_n
    per_program = -(-blocks // programs)
    for l in range(L):
        src, row0 = (x_ref, 0) if l == 0 else (act_ref, (l - 1) * BM)

        def blk(i, carry, l=l, src=src, row0=row0):
            j = p + i * programs

            @pl.when(j < blocks)
            def _():
                _gemv_block(src, row0, w_refs[l], act_ref, l * BM, j, D=D, block_n=block_n,
                            block_k=block_k)
            return carry

        jax.lax.fori_loop(0, per_program, blk, 0)
        if sync == "grid" and l < L - 1:
            _grid_barrier(cnt_ref, programs * (l + 1), spin)


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "programs", "sync",
                                             "num_warps", "num_stages", "interpret"))
def persistent_chain(x, ws, *, block_n=32, block_k=256, programs=None, sync="grid",
                     num_warps=4, num_stages=4, interpret=False):
    """x [BM, D] bf16, ws: L weights [D, D] ([out, in]) -> [BM, D], one launch."""
    L, D = len(ws), x.shape[1]
    if sync not in SYNCS:
        raise ValueError(f"sync must be one of {SYNCS}, got {sync!r}")
    programs = programs or D // block_n
    kernel = functools.partial(_chain_kernel, L=L, D=D, block_n=block_n, block_k=block_k,
                               programs=programs, sync=sync, spin=not interpret)
    n_cnt = 1
    act, _ = pl.pallas_call(
        kernel, grid=(programs,),
        out_shape=(jax.ShapeDtypeStruct((L * BM, D), x.dtype),
                   jax.ShapeDtypeStruct((n_cnt,), jnp.int32)),
        input_output_aliases={1: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name=f"persistent_chain_{sync}_{block_n}x{block_k}_p{programs}",
    )(x, jnp.zeros((n_cnt,), jnp.int32), *ws)
    return act[(L - 1) * BM:]


def pallas_layers(x, ws, **kw):
    """The same GEMV body, one launch a layer (no barrier needed: the launches order them)."""
    for w in ws:
        x = persistent_chain(x, [w], sync="none", **kw)
    return x


def xla_chain(x, ws):
    """XLA's GEMMs on the ROWS real rows (padded back to BM at the end, as the others return)."""
    h = x[:ROWS]
    for w in ws:
        h = jnp.dot(h, w.T)
    return jnp.pad(h, ((0, BM - ROWS), (0, 0)))


def reference(x, ws):
    """float32 math, bf16 between layers (as every variant rounds its layer outputs)."""
    for w in ws:
        x = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32).T).astype(jnp.bfloat16)
    return x.astype(jnp.float32)


def wall_us(fn, args, calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean wall time of ``calls`` back-to-back calls."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(ts)


def per_layer_launches(chain, n_layered: int):
    """A persistent chain kernel (``chain(x0, *stacked, *shared)``, every stacked input's
    leading dim the layers, the first output x after each layer) as one launch a layer
    (L = 1) inside one jit: ``fn(x0, *layered, *shared)``, ``layered`` the ``n_layered``
    stacked inputs as lists of per-layer arrays (a layer's [1, ...] view of its own array is
    a bitcast, where a slice of a stacked one would be a copy), each launch's x feeding the
    next; the outputs stacked over the layers. What the engine's batch-1 forward would run
    calling the kernel a layer, its weights a layer's arrays."""
    def fn(x0, *args):
        layered, shared = args[:n_layered], args[n_layered:]
        x, outs = x0, []
        for l in range(len(layered[0])):
            outs.append(chain(x, *[a[l][None] for a in layered], *shared))
            x = outs[-1][0][0]
        return tuple(jnp.concatenate(parts) for parts in zip(*outs))
    return jax.jit(fn)


def chain_parser(doc: str) -> argparse.ArgumentParser:
    """The options every chain benchmark takes (this one and ``mosaic_chain.py``)."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    return ap


def mosaic_parser(doc: str, cands, variants, cands_help: str) -> argparse.ArgumentParser:
    """``chain_parser`` and the options of the Mosaic GPU chain benchmarks with a CPU smoke
    and a stress mode (``mosaic_chain_fp8.py``, ``mosaic_mlp_fp8.py``)."""
    ap = chain_parser(doc)
    ap.add_argument("--cands", default=",".join("x".join(map(str, c)) for c in cands),
                    help=f"{cands_help}, comma-separated")
    ap.add_argument("--variants", default="xla," + ",".join(variants))
    ap.add_argument("--out", default=None)
    ap.add_argument("--stress", type=int, default=0, metavar="N",
                    help="instead of timing: each candidate called N times (the variants "
                         "given, or the correct form), every output against its reference")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU: the interpreted one-CTA form against its reference, and every "
                         "variant lowered for an abstract H100")
    return ap


def main(argv=None):
    ap = chain_parser(__doc__)
    ap.add_argument("--cands", default="32x256x4x4,32x256x4x6,32x128x4x6,16x256x4x4",
                    help="block_n x block_k x warps x stages, comma-separated")
    ap.add_argument("--syncs", default="grid,none",
                    help="the persistent kernel's ways of waiting (see _chain_kernel)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check: interpret mode, 3 layers of 256, one program")
    a = ap.parse_args(argv)
    interpret = a.smoke
    if a.smoke:
        a.dim, a.layers, a.calls, a.repeats, a.cands = 256, 3, 1, 1, "32x64x4x1"
    rows = []
    emit = gpu_trace.jsonl_emitter(rows, a.out)
    D, L = a.dim, a.layers
    x = jax.random.normal(jax.random.PRNGKey(0), (BM, D)).astype(jnp.bfloat16)
    x = x.at[ROWS:].set(0)  # the padding rows, as the kernel reads them
    ws = [(jax.random.normal(jax.random.PRNGKey(10 + i), (D, D)) / D ** 0.5).astype(jnp.bfloat16)
          for i in range(L)]
    ref = reference(x, ws)
    wbytes = D * D * 2
    sms = getattr(jax.devices()[0], "core_count", None)

    def check(name, fn, **extra):
        out = fn(x, ws).astype(jnp.float32)
        rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        us = wall_us(fn, (x, ws), a.calls, a.repeats) / L
        dev = gpu_trace.device_time(fn, [(x, ws)], calls=3)
        row = dict(variant=name, D=D, L=L, rel=rel, us_per_layer=round(us, 2),
                   tb_s=round(wbytes / (us * 1e-6) / 1e12, 2), sms=sms, **extra)
        if dev is not None:  # GPU time (op by op under the profiler; gaps not counted)
            row.update(gpu_us_per_layer=round(dev["device_us"] / L, 2),
                       ops_per_layer=round(dev["ops_per_call"] / L, 2))
        emit(row)
        return row

    check("xla", jax.jit(xla_chain))
    for c in a.cands.split(","):
        bn, bk, nw, ns = (int(v) for v in c.split("x"))
        if D % bn or D % bk:
            continue
        kw = dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, interpret=interpret)
        blocks = D // bn
        programs = 1 if a.smoke else min(blocks, sms or blocks)
        cfg = dict(block_n=bn, block_k=bk, warps=nw, stages=ns, programs=programs)
        try:
            check("pallas_layers", jax.jit(functools.partial(pallas_layers, **kw)), **cfg)
            for sync in a.syncs.split(","):
                if sync == "none" and a.smoke:
                    continue
                check(f"persistent_{sync}", functools.partial(
                    persistent_chain, programs=programs, sync=sync, **kw), **cfg)
        except Exception as e:  # a config Triton cannot build: say so, go on
            emit(dict(variant="error", error=f"{type(e).__name__}: {str(e)[:300]}", **cfg))
    floor = wbytes / 4.64e12 * 1e6
    print(f"\n| variant | block_n x block_k x warps x stages (programs) | µs / layer | TB/s | "
          f"GPU-time µs / layer | ops / layer | rel |\n|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "us_per_layer" in r:
            cfg = (f"{r['block_n']} x {r['block_k']} x {r['warps']} x {r['stages']} "
                   f"({r['programs']})" if "block_n" in r else "")
            print(f"| {r['variant']} | {cfg} | {r['us_per_layer']} | {r['tb_s']} | "
                  f"{r.get('gpu_us_per_layer')} | {r.get('ops_per_layer')} | {r['rel']:.1e} |")
    print(f"(floor at 4.64 TB/s: {floor:.2f} µs a layer)")


if __name__ == "__main__":
    main()
