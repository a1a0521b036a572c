"""Does a decode GEMM read faster when its weight is already in the L2? (issues 9 and 6)

At batch 1 the GPU reads DRAM only in the GEMMs: the ~10 small kernels and the attention of a
layer leave it idle. If a kernel that runs anyway (the decode attention, 40 busy programs of
132 SMs) could pull the next GEMM's weight into the L2 on its idle SMs, the GEMM would read
from the L2. This measures the premise, GPU time per kernel from the profiler, weights rotated
over copies that overflow the L2:
  cold      the GEMM alone (the engine's case today)
  hot       the same GEMM run twice on one weight (meant as an L2-warm second call; XLA merges
            the two dots into one GEMM of 16 rows, so it measures that instead)
  prefetch  a Pallas kernel of P programs reading the weight's bytes, then the GEMM: the GEMM's
            time after it, and the prefetch kernel's own time (what it would add if it did not
            overlap)
For the o projection (4096 x 4096; bf16 33.5 MB, e4m3 16.8 MB) and the fp8 q/k/v (4096 x 6144,
25.2 MB) at 8 rows, as the engine's batch-1 step runs them (bf16: x @ W[K, N]; fp8 weight-only:
x @ upcast(W[N, K])^T * scale).

    python3 benchmarks/gpu/l2_prefetch.py [--out FILE] [--smoke]
"""
import argparse
import functools
import json
import statistics
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import gpu_trace  # noqa: E402

COLS = 256  # int32 words a row of the flat view: 1 KiB
L2 = 50e6


def as_words(w: jax.Array) -> jax.Array:
    """The weight's bytes as int32 [rows, COLS] (a bitcast view; the caller checks no copy)."""
    per = 4 // w.dtype.itemsize
    flat = w.reshape(-1, per) if per > 1 else w.reshape(-1)
    return jax.lax.bitcast_convert_type(flat, jnp.int32).reshape(-1, COLS)


def _prefetch_kernel(w_ref, o_ref, *, programs, block_rows, nblocks, unroll, eviction):
    """Program p reads blocks p, p + programs, ... of block_rows words-rows, ``unroll`` blocks
    issued before any is used (loads in flight: what sets the bandwidth of a few programs)."""
    p = pl.program_id(0)
    cols = jnp.arange(COLS, dtype=jnp.int32)
    rows = jnp.arange(block_rows, dtype=jnp.int32)
    per = -(-nblocks // programs)  # blocks a program reads, at most (static)

    def body(i, acc):
        blks = [p + (i * unroll + u) * programs for u in range(unroll)]
        vals = [plgpu.load(w_ref.at[(blk * block_rows + rows)[:, None], cols[None, :]],
                           mask=jnp.full((block_rows, COLS), blk < nblocks), other=0,
                           eviction_policy=eviction) for blk in blks]
        for v in vals:
            acc = acc ^ v
        return acc

    acc = jax.lax.fori_loop(0, -(-per // unroll), body,
                            jnp.zeros((block_rows, COLS), jnp.int32))
    plgpu.store(o_ref.at[jnp.full((COLS,), p, jnp.int32), cols], jnp.sum(acc, 0))


def prefetch(words: jax.Array, programs: int, block_rows: int = 16, unroll: int = 1,
             eviction=None, interpret=False, num_warps=4):
    """Reads every byte of ``words`` [rows, COLS] once over ``programs`` programs; returns a
    [programs, COLS] int32 digest (so the loads are not dead code)."""
    rows = words.shape[0]
    assert rows % block_rows == 0, rows
    kernel = functools.partial(_prefetch_kernel, programs=programs, block_rows=block_rows,
                               nblocks=rows // block_rows, unroll=unroll, eviction=eviction)
    return pl.pallas_call(
        kernel, grid=(programs,),
        out_shape=jax.ShapeDtypeStruct((programs, COLS), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name=f"l2_prefetch_p{programs}")(words)


def check_prefetch():
    """The prefetch kernel (interpreted) reads every block once: each program's digest equals
    numpy's XOR of its blocks, summed over rows, for several program / unroll counts."""
    import numpy as np

    w = jax.random.normal(jax.random.key(1), (96, 256), jnp.float32)  # 96 rows of words
    words = as_words(w)
    blocks = np.asarray(words).reshape(-1, 8, COLS)
    for P, un in ((1, 1), (5, 2), (12, 1), (16, 4)):
        got = np.asarray(prefetch(words, P, block_rows=8, unroll=un, interpret=True))
        for p in range(P):
            mine = blocks[p::P]
            want = (np.bitwise_xor.reduce(mine, axis=0) if len(mine)
                    else np.zeros((8, COLS), np.int32)).sum(0, dtype=np.int32)
            if not np.array_equal(got[p], want):
                raise SystemExit(f"prefetch digest wrong: programs {P}, unroll {un}, p {p}")
    print("prefetch kernel check: ok", flush=True)


def emit(rec: dict, path: str | None) -> None:
    """Prints a result row as JSON and appends it to ``path`` when given."""
    print(json.dumps(rec), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def positions(fn, arg_sets, calls=24):
    """Median GPU time of each op position of one call: [(op group, us)], and ops a call;
    (None, 0) without GPU ops."""
    events = gpu_trace.trace_events(fn, arg_sets, calls)
    if not events:
        return None, 0
    events.sort(key=lambda e: e[1])
    n = len(events) // calls
    if n * calls != len(events):
        return [("uneven", float(len(events)) / calls)], n
    cols = [[events[c * n + j] for c in range(calls)] for j in range(n)]
    return [(gpu_trace.op_group(col[0][0])[:60], statistics.median(e[2] for e in col))
            for col in cols], n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    ap.add_argument("--sweep", action="store_true",
                    help="the bf16 o projection only, prefetch programs / rows / warps swept")
    args = ap.parse_args()
    if args.smoke:
        check_prefetch()
    M = 8
    shapes = [("o", 4096, 4096, "bf16"), ("o", 4096, 4096, "fp8"), ("qkv", 4096, 6144, "fp8")]
    if args.smoke:
        shapes = [("o", 256, 256, "bf16"), ("o", 256, 256, "fp8")]
    elif args.sweep:
        shapes = shapes[:1]
    for name, K, N, kind in shapes:
        key = jax.random.key(K + N)
        x = jax.random.normal(key, (M, K), jnp.bfloat16)
        nbytes = K * N * (2 if kind == "bf16" else 1)
        copies = max(2, min(8, int(3 * L2 // nbytes) + 1))
        if kind == "bf16":
            ws = [(jax.random.normal(jax.random.fold_in(key, i), (K, N), jnp.float32) * 0.02
                   ).astype(jnp.bfloat16) for i in range(copies)]
            scale = jnp.ones((N,), jnp.float32)

            def gemm(x, w, s):
                return jnp.dot(x, w)
        else:
            ws = [(jax.random.normal(jax.random.fold_in(key, i), (N, K), jnp.float32)
                   ).astype(jnp.float8_e4m3fn) for i in range(copies)]
            scale = jnp.full((N,), 0.02, jnp.float32)

            def gemm(x, w, s):
                acc = jax.lax.dot_general(x, w.astype(x.dtype), (((1,), (1,)), ((), ())),
                                          preferred_element_type=jnp.float32)
                return (acc * s[None, :]).astype(x.dtype)

        sets = [(x, w, scale) for w in ws]
        variants = {
            "cold": jax.jit(lambda x, w, s: gemm(x, w, s)),
            "hot": jax.jit(lambda x, w, s: (gemm(x, w, s), gemm(x * 2, w, s))),
        }

        def xla_read(x, w, s):  # XLA's own read of the weight's words (its bandwidth), then
            d = jnp.bitwise_xor.reduce(as_words(w), axis=0)  # the GEMM
            x = x + (d[0] == 123456789).astype(x.dtype)
            return gemm(x, w, s), d
        variants["xla_read"] = jax.jit(xla_read)
        cfgs = [(92, 16, 1, None), (92, 16, 4, None), (92, 16, 8, None), (132, 16, 4, None),
                (92, 8, 8, None), (92, 16, 4, "evict_last")]
        cfgs = [c + (4,) for c in cfgs]
        if kind != "bf16" or args.smoke:
            cfgs = cfgs[1:3] + cfgs[-1:]
        if args.sweep:
            cfgs = [(P, br, un, None, nw) for P in (132, 264, 528, 1056) for br in (16, 32)
                    for un in (1, 2) for nw in (4, 8)]
        for P, br, un, ev, nw in cfgs:
            def pf(x, w, s, P=P, br=br, un=un, ev=ev, nw=nw):
                d = prefetch(as_words(w), P, br, un, ev, interpret=args.smoke, num_warps=nw)
                # x depends on the digest, so the GEMM runs after the prefetch kernel
                x = x + (d[0, 0] == 123456789).astype(x.dtype)
                return gemm(x, w, s), d
            variants[f"prefetch_p{P}_r{br}_u{un}_w{nw}" + (f"_{ev}" if ev else "")] = jax.jit(pf)
        for vname, fn in variants.items():
            rec = dict(shape=name, kind=kind, M=M, K=K, N=N, weight_MB=nbytes / 1e6,
                       variant=vname)
            try:
                hlo = fn.lower(*sets[0]).compile().as_text()
                rec["copies_in_hlo"] = hlo.count(" copy(") + hlo.count("copy-start")
                if args.smoke:
                    jax.block_until_ready(fn(*sets[0]))
                    pos, n = None, 0
                else:
                    pos, n = positions(fn, sets)
                rec["ops"] = n
                rec["positions"] = [(k, round(v, 2)) for k, v in pos] if pos else None
            except Exception as e:  # noqa: BLE001 - report and go on
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            emit(rec, args.out)


if __name__ == "__main__":
    main()
