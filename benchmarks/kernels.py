"""Kernel benchmark (issue 5): check each Pallas kernel against its reference on the GPU, then time
it against its peers at Llama-3-8B shapes (32 q heads, 8 KV heads, head dim 128, page size 16).

  python3 benchmarks/kernels.py --out $OUT/kernels.jsonl [--sections decode,prefill,mixed,gemm]
  python3 benchmarks/kernels.py --print-table RESULTS.jsonl   # the block-size table, from a sweep

Sections (each row: median of 5 rounds of back-to-back calls after warm-up; inputs rotated among
copies when one copy would sit in the 50 MB L2):
  decode   batch {1,8,64,256} x context {512,4k,32k}: ours (block sweep) vs the jnp reference under
           jit, JAX's shipped pallas.ops.gpu.paged_attention, cuDNN on pre-gathered contiguous KV.
           GB/s = K/V bytes read / time, vs the measured 3.1 TB/s. --kv-dtype fp8: e4m3
           pages (the fp8 KV cache), ours only, the table's entry and twice its pages a block.
  prefill  causal prompts (1x4096, 4x1024): ours (block sweep) vs reference and cuDNN; TFLOP/s.
  mixed    one 2k prefill chunk after 2k context + 64 decodes at 4k: one call vs the sum of the
           prefill-only and decode-only calls, each launch alone on the mixed batch, and the
           one call at the engine's padded shapes (256 slots, 8k-token page table).
  gemm     M {1,16,64,256,1024,4096} x (K,N) {(4096,6144),(4096,4096),(4096,28672),(14336,4096)}:
           bf16 XLA dot, XLA fp8 dot (cuBLASLt; weight [K, N] and, as the engine stores it,
           [N, K]), the engine's fp8 projection on bf16 activations (engine_fp8_linear:
           quantization included, weight-only at <= 16 rows on a GPU), Pallas fp8 (block
           sweep); TFLOP/s and GB/s.
  block_gemm (not in the default set) block-wise fp8 weights (128 x 128 tile scales, Qwen3-FP8
           / DeepSeek-V3 checkpoints) at the gemm section's M x (K, N): the bf16 XLA dot, the
           engine's two forms (block_w8a16: e4m3 dequantized in the dot's operand; block_w8a8:
           per-token-group activation quantization + the Pallas block kernel, a small block
           sweep) and the kernel alone on quantized inputs; TFLOP/s and GB/s.
  gemm_options (not in the default set) the bf16 projections of one layer and the logits GEMM
           (M {1,8,64,256}), and the engine's fp8 projection (M {8,64,4096}), compiled under
           per-program XLA options (GEMM_OPTIONS: cuBLAS instead of Triton, the exhaustive
           tiling search, Triton warp specialization) beside XLA's defaults, in one process.
  backends (not in the default set) the Pallas lowerings side by side (issue 5): causal
           prefill 1x4096 / 1x8192 with ours (Triton, paged), JAX's Triton flash attention, JAX's
           Mosaic GPU attention (wgmma/TMA) and cuDNN; bf16 GEMMs M {256,1024,4096} with XLA's
           dot against JAX's Mosaic GPU Hopper matmul.
A kernel that fails to compile or run prints its error and the script goes on. Every result is
one JSON line in --out; the best config per shape is printed last. The first Pallas config of
each decode / prefill shape is the kernel's own table entry (config has "table": true).
Calls under 1 ms are also timed --loop-reps at a time inside one jitted program
(time_us_loop, pct_bw_loop): single calls from the host carry a dispatch floor of ~50-70 us
that hid the kernels at small shapes in the 2026-11-23 sweep. Even then the loop carries one
dispatch per 8 calls and XLA's per-op launches: at 1 x 512 every implementation, cuDNN included,
read ~30-37 us a call on the H200 for 1 MB of K/V. ``--device-time`` also reads each such call's
GPU time back from a profiler trace (benchmarks/gpu_trace.py): device_us (GPU busy per call),
pct_bw_device, ops_per_call and the longest op group (top_op, top_op_us: the Pallas kernel
without its jnp glue). table_from_results prefers device_us, then time_us_loop, then time_us.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_trace, also when loaded by a test

import jax  # noqa: E402
import gpu_trace  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.fp8_matmul import (  # noqa: E402
    E4M3_MAX,
    fp8_block_matmul,
    fp8_block_matmul_reference,
    fp8_matmul,
    fp8_matmul_reference,
    fp8_matmul_xla,
    quantize_activation_per_token,
    quantize_activation_per_token_group,
    quantize_weight_per_channel,
)
from pallas_kernels.ragged_paged_attention import (  # noqa: E402
    decode_block_config,
    prefill_block_config,
    ragged_paged_attention,
    ragged_paged_attention_reference,
)

H, KH, D, B = 32, 8, 128, 16
SM = D ** -0.5
PEAK_BW = 3.1e12  # measured read bandwidth of the H100 (DESIGN.md); --peak-bw / H200: 4.3e12
PEAK_BF16 = 810e12  # measured bf16 GEMM
PEAK_FP8 = 1600e12  # dense fp8 datasheet-ish; XLA/cuBLASLt measured 922
L2_BYTES = 50 * 2**20

# Shape lists; --smoke swaps in tiny ones and runs the kernels in interpret mode (a CPU check of
# this script itself, not a measurement).
# Target shapes first: sweeps past the time budget keep only their first config.
DECODE_SHAPES = [(8, 4096), (64, 4096), (1, 32768), (256, 4096), (1, 4096), (8, 32768),
                 (64, 32768), (1, 512), (8, 512), (64, 512), (256, 512)]
PREFILL_SHAPES = [(1, 4096), (4, 1024)]
MIXED = (2048, 64, 4096)  # prefill chunk, decodes, context
# (batch, real context, page-table context): short contexts in the engine's long page table
DECODE_SHORT_IN_LONG = [(1, 1024, 8192), (8, 1024, 8192), (64, 1024, 8192)]
GEMM_KN = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
GEMM_M = [1, 16, 64, 256, 1024, 4096]
SMOKE = False


def _smoke():
    global H, KH, D, SM, DECODE_SHAPES, PREFILL_SHAPES, MIXED, GEMM_KN, GEMM_M, SMOKE, LOOP_REPS
    global DECODE_SHORT_IN_LONG
    H, KH, D = 8, 2, 32
    SM = D ** -0.5
    DECODE_SHAPES = [(2, 512)]
    PREFILL_SHAPES = [(1, 64)]
    MIXED = (32, 4, 64)
    DECODE_SHORT_IN_LONG = [(2, 48, 128)]
    GEMM_KN = [(256, 64)]
    GEMM_M = [1, 64]
    SMOKE = True
    LOOP_REPS = min(LOOP_REPS, 2)


def few(configs):
    return configs[:2] if SMOKE else configs


T0 = time.time()
RESULTS: list[dict] = []
OUT = None
LOOP_REPS = 8
DEVICE_TIME = False  # --device-time: GPU time per call from a profiler trace
KV_DTYPE = "bf16"  # --kv-dtype: the decode section's page dtype
FP8_KV_DOT = ("auto",)  # --fp8-kv-dot: the kernel's fp8_kv_dot choices over fp8 pages
DECODE_VARIANTS = "all"  # --decode-variants: "hp" keeps the table entry and the hp configs


def emit(rec: dict) -> None:
    if rec["section"] in ("decode", "prefill", "mixed"):
        rec.update(heads=H, kv_heads=KH, head_dim=D, page_size=B)
    if "pct_bw" in rec:
        rec["peak_bw"] = PEAK_BW
    RESULTS.append(rec)
    if OUT is not None:
        with open(OUT, "a") as f:
            f.write(json.dumps(rec) + "\n")


def bench(fn, arg_sets, rounds=5, min_round_s=3e-3):
    """Median seconds per call. arg_sets: list of argument tuples cycled through (L2 rotation)."""
    jax.block_until_ready(fn(*arg_sets[0]))  # compile + warm-up
    for a in arg_sets:
        jax.block_until_ready(fn(*a))
    t = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))
    one = time.perf_counter() - t
    n = int(min(200, max(1, math.ceil(min_round_s / max(one, 1e-6)))))
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        out = None
        for i in range(n):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def bench_loop(fn, arg_sets, reps, rounds=5):
    """Median seconds per call of `reps` calls issued by one jitted program (one host dispatch).

    The calls get distinct first arguments (q scaled by 1 + i/1024, made before timing) so XLA
    cannot merge them; each keeps one output row, so no call is dead code."""
    sets = []
    for i in range(reps):
        a = arg_sets[i % len(arg_sets)]
        sets.append((a[0] * (1 + i / 1024) if i else a[0], *a[1:]))

    def first_rows(out):
        return jax.tree.map(lambda x: x[:1], out)

    many = jax.jit(lambda sets: [first_rows(fn(*a)) for a in sets])
    jax.block_until_ready(many(sets))
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        jax.block_until_ready(many(sets))
        times.append((time.perf_counter() - t) / reps)
    return statistics.median(times)


def rel_err(out, ref):
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    if not np.all(np.isfinite(out)):
        return float("nan")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def short(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) < 400 else s[:400] + " ..."


def run_case(section, shape, impl, config, fn, arg_sets, *, ref=None, bytes_=None, flops=None,
             peak_flops=None, tol=None):
    rec = dict(section=section, **shape, impl=impl, config=config)
    try:
        out = jax.block_until_ready(fn(*arg_sets[0]))
        if ref is not None:
            rec["rel_err"] = rel_err(out, ref)
            rec["ok"] = bool(rec["rel_err"] < tol)
        del out
        t = bench(fn, arg_sets)
        rec["time_us"] = t * 1e6
        if bytes_:
            rec["gbps"] = bytes_ / t / 1e9
            rec["pct_bw"] = 100 * bytes_ / t / PEAK_BW
        # Not the jnp reference: never a contender, and 8 unrolled copies compile slowly.
        # Not GEMMs either: first_rows' slice of an XLA dot's output is pushed into the dot.
        if (LOOP_REPS > 1 and (SMOKE or t < 1e-3) and section not in ("gemm", "backends")
                and impl != "reference_xla"):
            try:
                tl = bench_loop(fn, arg_sets, LOOP_REPS)
                rec["time_us_loop"] = tl * 1e6
                if bytes_:
                    rec["pct_bw_loop"] = 100 * bytes_ / tl / PEAK_BW
            except Exception as e:  # noqa: BLE001
                rec["loop_error"] = short(e)
        if DEVICE_TIME and t < 5e-3 and impl != "reference_xla":
            try:
                dev = gpu_trace.device_time(fn, arg_sets)
                if dev is not None:  # None: no GPU ops in the trace (CPU)
                    rec.update(dev)
                    if bytes_:
                        rec["pct_bw_device"] = 100 * bytes_ / (dev["device_us"] * 1e-6) / PEAK_BW
            except Exception as e:  # noqa: BLE001
                rec["device_time_error"] = short(e)
        if flops:
            rec["tflops"] = flops / t / 1e12
            if peak_flops:
                rec["pct_peak"] = 100 * flops / t / peak_flops
    except Exception as e:  # noqa: BLE001 - a failing variant must not stop the sweep
        rec["error"] = short(e)
        print(f"  [{section} {shape} {impl} {config}] FAILED: {rec['error']}", flush=True)
        if "--verbose" in sys.argv:
            traceback.print_exc()
    emit(rec)
    line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in rec.items() if k not in ("section",))
    print(f"  {section}: {line}", flush=True)
    return rec


# ---------------------------------------------------------------------------------------------
# Attention inputs
# ---------------------------------------------------------------------------------------------

def make_batch(rng, q_lens, ctx_lens, dtype=jnp.bfloat16, n_copies=1):
    """Ragged batch with pages scattered at random over a pool of n_copies disjoint page sets.

    Returns (q, k_pages, v_pages, list of (seq_lens, page_table, qsl, num_seqs) per copy)."""
    S = len(q_lens)
    M = max(-(-c // B) for c in ctx_lens)
    need = sum(-(-c // B) for c in ctx_lens)
    P = 1 + need * n_copies
    perm = rng.permutation(np.arange(1, P))
    metas = []
    for c in range(n_copies):
        pt = np.zeros((S, M), np.int32)
        used = c * need
        for s, cl in enumerate(ctx_lens):
            n = -(-cl // B)
            pt[s, :n] = perm[used:used + n]
            used += n
        qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        metas.append((jnp.asarray(np.asarray(ctx_lens, np.int32)), jnp.asarray(pt),
                      jnp.asarray(qsl), jnp.asarray([S], np.int32)))
    T = int(sum(q_lens))
    k1, k2, k3 = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 3)
    q = jax.random.normal(k1, (T, H, D), dtype)
    kp = jax.random.normal(k2, (P, B, KH, D), dtype)
    vp = jax.random.normal(k3, (P, B, KH, D), dtype)
    return q, kp, vp, metas


def kv_bytes(ctx_lens, itemsize=2):
    return sum(ctx_lens) * KH * D * itemsize * 2


def causal_flops(q_lens, ctx_lens):
    """4 * H * D per (query, attended key) pair (QK^T and PV)."""
    pairs = sum(ql * (c - ql) + ql * (ql + 1) // 2 for ql, c in zip(q_lens, ctx_lens))
    return 4 * H * D * pairs


def ours_fn(**knobs):
    f = functools.partial(ragged_paged_attention, sm_scale=SM, interpret=SMOKE, **knobs)
    return jax.jit(lambda q, kp, vp, m: f(q, kp, vp, *m))


def REF(q, kp, vp, m):
    return _ref(q, kp, vp, m, SM)


_ref = jax.jit(lambda q, kp, vp, m, sm: ragged_paged_attention_reference(q, kp, vp, *m,
                                                                          sm_scale=sm),
               static_argnums=4)


def bench_decode(rng, budget_s):
    fp8 = KV_DTYPE == "fp8"
    print(f"== decode (q_len 1 per sequence){', fp8 K/V pages' if fp8 else ''} ==", flush=True)
    for batch, ctx in DECODE_SHAPES:
        # fp8 rows name their page dtype, so the bf16 block-size table never takes them.
        shape = dict(batch=batch, ctx=ctx, **({"kv_dtype": "fp8"} if fp8 else {}))
        nbytes = kv_bytes([ctx] * batch, itemsize=1 if fp8 else 2)
        n_copies = max(1, min(4, math.ceil(3 * L2_BYTES / nbytes)))
        try:
            q, kp, vp, metas = make_batch(rng, [1] * batch, [ctx] * batch, n_copies=n_copies)
            if fp8:  # N(0, 1) values, well inside e4m3's +-448
                kp, vp = kp.astype(jnp.float8_e4m3fn), vp.astype(jnp.float8_e4m3fn)
        except Exception as e:  # noqa: BLE001
            print(f"  decode {shape}: cannot build inputs: {short(e)}")
            continue
        arg_sets = [(q, kp, vp, m) for m in metas]
        ref = None
        if nbytes <= 4 * 2**30:
            ref = run_case("decode", shape, "reference_xla", "", REF, arg_sets, bytes_=nbytes)
            ref = REF(*arg_sets[0]) if "error" not in ref else None
        if ref is None:  # at huge contexts: check against the kernel without splits instead
            ref = jax.block_until_ready(
                ours_fn(prefill=False, decode_splits=1, decode_pages_per_block=8)(*arg_sets[0]))
        # First the kernel's own table entry (what the engine runs at this shape).
        table = dict(decode_block_config(batch, -(-ctx // B), B, fp8_pages=fp8), num_warps=4,
                     num_stages=2)
        configs = [table]
        # Splits so that batch * KV heads * splits covers the 132 SMs about twice.
        auto = max(1, min(ctx // 256, math.ceil(264 / (batch * KH))))
        for ppb in (8, 16):
            for ns in sorted({auto, max(1, min(ctx // (ppb * B), auto * 2))}):
                configs.append(dict(decode_pages_per_block=ppb, decode_splits=ns, num_warps=4))
        configs.append(dict(decode_pages_per_block=4, decode_splits=auto, num_warps=4))
        if fp8:  # half the bytes a page: twice the pages a block reads as many bytes as bf16's
            t = configs[0]
            configs.append(dict(decode_pages_per_block=2 * t["decode_pages_per_block"],
                                decode_splits=t["decode_splits"], num_warps=4))
            configs.append(dict(decode_pages_per_block=2 * t["decode_pages_per_block"],
                                decode_splits=max(1, t["decode_splits"] // 2), num_warps=4))
            # The pipeline: no software pipelining (the conversion may then happen before the
            # tile reaches shared memory), a deeper one, and twice the warps for the conversion.
            configs += [dict(t, num_stages=1), dict(t, num_stages=3), dict(t, num_warps=8)]
        # Several KV heads a program (the kernel's decode_heads_per_program): rows of hp * G
        # query heads (G = 4 pads to the tensor-core minimum of 16 rows alone), one softmax
        # over them, K/V tiles hp heads wide; fewer pages a block keep the tile's bytes.
        t = configs[0]
        for hp in (2, 4):
            if KH % hp:
                continue
            tp = t["decode_pages_per_block"]
            for ppb in sorted({tp, max(1, tp // 2), max(1, tp // hp)}, reverse=True):
                configs.append(dict(decode_pages_per_block=ppb, decode_splits=t["decode_splits"],
                                    num_warps=4, decode_heads_per_program=hp))
            configs.append(dict(decode_pages_per_block=max(1, t["decode_pages_per_block"] // hp),
                                decode_splits=t["decode_splits"], num_warps=8,
                                decode_heads_per_program=hp))
        if batch == 8 and ctx >= 4096:
            # The batch-8 weak spot (54% of bandwidth at 4k): 64 (sequence, KV head) pairs
            # leave 132 SMs to the split count alone. Finer key blocks with more splits (more,
            # shorter programs: less wave tail), and deeper / wider software pipelines for the
            # gathered page rows.
            for ppb, ns in [(4, 8), (4, 16), (8, 8), (8, 16), (16, 8), (16, 16), (4, 32)]:
                configs.append(dict(decode_pages_per_block=ppb, decode_splits=ns, num_warps=4))
            for ppb, ns, w, st in [(8, 5, 4, 3), (8, 8, 4, 3), (8, 16, 4, 3), (8, 8, 8, 2),
                                   (16, 16, 8, 3)]:
                configs.append(dict(decode_pages_per_block=ppb, decode_splits=ns, num_warps=w,
                                    num_stages=st))
            # Splits by pages (the kernel's decode_split_pages): balanced splits (52/52/52/
            # 52/48 pages instead of 7/7/7/7/4 blocks of 8) at split counts that fill the SMs.
            for ppb, ns in [(8, 5), (8, 8), (16, 8), (16, 16)]:
                configs.append(dict(decode_pages_per_block=ppb, decode_splits=ns, num_warps=4,
                                    decode_split_pages=True))
        if DECODE_VARIANTS == "hp":
            configs = configs[:1] + [c for c in configs
                                     if c.get("decode_heads_per_program", 1) > 1]
        configs = [dict(c, num_stages=c.get("num_stages", 2)) for c in configs]
        if fp8:  # how the kernel's dots read the pages (fp8_kv_dot): every config x choice
            configs = [dict(c, fp8_kv_dot=dot) for c in configs for dot in FP8_KV_DOT]
        seen = set()
        configs = [c for c in configs if not (repr(c) in seen or seen.add(repr(c)))]
        for i, cfg in enumerate(few(configs)):
            if i > 0 and time.time() - T0 > budget_s:
                break
            label = dict(cfg, table=True) if i == 0 else cfg
            run_case("decode", shape, "pallas", label, ours_fn(decode_only=True, **cfg),
                     arg_sets, ref=ref, bytes_=nbytes, tol=2e-2)
        if (batch, ctx) in ((64, 4096), (8, 4096)) or SMOKE:
            # Both launches on a pure decode batch (the engine's call before decode_only):
            # the 2026-11-23 sweep saw 605 us against 418 us for the decode launch alone.
            run_case("decode", shape, "pallas_both_launches", dict(configs[0], table=True),
                     ours_fn(**configs[0]), arg_sets, ref=ref, bytes_=nbytes, tol=2e-2)
        if not fp8:  # the peers take pages in q's dtype
            bench_jax_paged(shape, q, kp, vp, metas, ref, nbytes)
            bench_cudnn_decode(shape, q, kp, vp, metas, ref, nbytes)
        del q, kp, vp, metas, arg_sets, ref
    if not fp8:
        bench_decode_short_in_long_class(rng, budget_s)


def bench_decode_short_in_long_class(rng, budget_s):
    """The engine's page table is sized for max_model_len: the table picks the long context
    class while the real context may be short. Then pages_per_block, not the split count,
    limits the parallelism (a 1k context in blocks of 16 pages is 4 busy splits per head).
    Rows carry table_ctx and never enter the table (table_from_results skips them)."""
    for batch, ctx, table_ctx in DECODE_SHORT_IN_LONG:
        shape = dict(batch=batch, ctx=ctx, table_ctx=table_ctx)
        nbytes = kv_bytes([ctx] * batch)
        q, kp, vp, metas = make_batch(rng, [1] * batch, [ctx] * batch, n_copies=4)
        M_pad = table_ctx // B
        arg_sets = [(q, kp, vp, pad_meta(m, batch, M_pad)) for m in metas]
        ref = REF(*arg_sets[0])
        table = dict(decode_block_config(batch, M_pad, B), num_warps=4, num_stages=2)
        configs = [table, dict(table, masked_tail_only=True),
                   dict(table, decode_split_pages=True)] + [
            dict(decode_pages_per_block=ppb, decode_splits=ns, num_warps=4, num_stages=2)
            for ppb, ns in [(4, 16), (8, 8), (8, 16), (4, 32), (16, 4)]]
        seen = set()
        configs = [c for c in configs if not (repr(c) in seen or seen.add(repr(c)))]
        for i, cfg in enumerate(few(configs)):
            if i > 2 and time.time() - T0 > budget_s:  # past the budget: the table's variants
                break
            label = dict(cfg, table=True) if i == 0 else cfg
            run_case("decode", shape, "pallas", label, ours_fn(decode_only=True, **cfg), arg_sets,
                     ref=ref, bytes_=nbytes, tol=2e-2)
        del q, kp, vp, metas, arg_sets, ref


def bench_jax_paged(shape, q, kp, vp, metas, ref, nbytes):
    """JAX's shipped Pallas paged attention: pages [K, P, B, D] (transposed once, not timed)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jax.experimental.pallas.ops.gpu import paged_attention as jpa
    except Exception as e:  # noqa: BLE001
        print(f"  jax paged_attention unavailable: {short(e)}")
        return
    kt = jnp.transpose(kp, (2, 0, 1, 3))
    vt = jnp.transpose(vp, (2, 0, 1, 3))
    batch, ctx = shape["batch"], shape["ctx"]
    for ppcb, ks in [(8, 16), (16, 8)]:
        M = metas[0][1].shape[1]
        if M % ks or (M // ks) % min(ppcb, M // ks):
            continue
        f = jax.jit(functools.partial(jpa.paged_attention, pages_per_compute_block=ppcb,
                                      k_splits=ks, interpret=SMOKE))
        sets = [(q * SM, kt, vt, m[1], m[0]) for m in metas]  # it has no sm_scale argument
        run_case("decode", shape, "jax_pallas_paged_attention",
                 dict(pages_per_compute_block=ppcb, k_splits=ks), f, sets, ref=ref,
                 bytes_=nbytes, tol=2e-2)
    del kt, vt


def bench_cudnn_decode(shape, q, kp, vp, metas, ref, nbytes):
    """cuDNN attention on KV gathered to contiguous [batch, L, K, D] beforehand (not timed)."""
    batch, ctx = shape["batch"], shape["ctx"]
    if nbytes > 8 * 2**30:
        return
    try:
        sl, pt, _, _ = metas[0]
        kc = kp[pt].reshape(batch, -1, KH, D)[:, :ctx]
        vc = vp[pt].reshape(batch, -1, KH, D)[:, :ctx]
        f = jax.jit(lambda q_, k_, v_: jax.nn.dot_product_attention(
            q_[:, None], k_, v_, scale=SM, implementation="cudnn")[:, 0])
        run_case("decode", shape, "cudnn_contiguous_kv", "", f, [(q, kc, vc)], ref=ref,
                 bytes_=nbytes, tol=2e-2)
    except Exception as e:  # noqa: BLE001
        print(f"  cudnn decode {shape}: {short(e)}")


def bench_prefill(rng, budget_s):
    print("== prefill (causal prompts) ==", flush=True)
    for n, L in PREFILL_SHAPES:
        shape = dict(batch=n, q_len=L)
        q, kp, vp, metas = make_batch(rng, [L] * n, [L] * n)
        arg_sets = [(q, kp, vp, m) for m in metas]
        flops = causal_flops([L] * n, [L] * n)
        run_case("prefill", shape, "reference_xla", "", REF, arg_sets, flops=flops,
                 peak_flops=PEAK_BF16)
        ref = REF(*arg_sets[0])
        # The table's config as the engine runs it (masked_tail_only left to the kernel's
        # per-launch default), then with the mask on every key block; every other row names
        # masked_tail_only (the causal mask on the diagonal key blocks alone, flash
        # attention's split of the loop) so its meaning does not move with the default.
        table = dict(prefill_block_config(n * L, H, KH), num_warps=4, num_stages=2)
        configs = [table, dict(table, masked_tail_only=False)] + [
            dict(block_q=bq, pages_per_block=ppb, num_warps=w, num_stages=st,
                 masked_tail_only=True)
            for bq, ppb, w, st in [(32, 4, 8, 2), (32, 8, 8, 3), (64, 8, 8, 2)]] + [
            dict(block_q=bq, pages_per_block=ppb, num_warps=w, num_stages=st,
                 masked_tail_only=False)
            for bq, ppb, w, st in [(16, 4, 4, 2), (16, 8, 4, 2), (32, 4, 4, 2), (32, 8, 4, 2),
                                   (8, 8, 4, 2), (16, 8, 4, 3), (32, 8, 8, 2), (32, 4, 8, 3),
                                   (16, 16, 8, 2), (64, 4, 8, 2),
                                   # 128-256 query rows x 64-128 keys, the tiles of JAX's
                                   # Triton flash attention (1.7x ours at 4k on the H200)
                                   (32, 8, 8, 3), (64, 8, 8, 2), (64, 8, 8, 3), (32, 4, 4, 3)]]
        seen = set()
        configs = [c for c in configs if not (repr(c) in seen or seen.add(repr(c)))]
        for i, cfg in enumerate(few(configs)):
            if i > 0 and time.time() - T0 > budget_s:
                break
            label = dict(cfg, table=True) if i == 0 else cfg
            run_case("prefill", shape, "pallas", label, ours_fn(decode=False, **cfg), arg_sets,
                     ref=ref, flops=flops, peak_flops=PEAK_BF16, tol=2e-2)
        try:
            qc = q.reshape(n, L, H, D)
            kc = kp[metas[0][1]].reshape(n, -1, KH, D)[:, :L]
            vc = vp[metas[0][1]].reshape(n, -1, KH, D)[:, :L]
            f = jax.jit(lambda q_, k_, v_: jax.nn.dot_product_attention(
                q_, k_, v_, scale=SM, is_causal=True, implementation="cudnn").reshape(n * L, H, D))
            run_case("prefill", shape, "cudnn_contiguous_kv", "", f, [(qc, kc, vc)], ref=ref,
                     flops=flops, peak_flops=PEAK_BF16, tol=2e-2)
        except Exception as e:  # noqa: BLE001
            print(f"  cudnn prefill {shape}: {short(e)}")
        del q, kp, vp, metas, arg_sets, ref


def pad_meta(meta, S_pad, M_pad):
    """The engine's view of a batch: S_pad sequence slots (batch bucket) and an M_pad-page table
    (max_model_len / B); padding slots own no tokens and point at page 0."""
    sl, pt, qsl, ns = meta
    S, M = pt.shape
    return (jnp.pad(sl, (0, S_pad - S)), jnp.pad(pt, ((0, S_pad - S), (0, M_pad - M))),
            jnp.pad(qsl, (0, S_pad - S), mode="edge"), ns)


def bench_mixed(rng):
    """One prefill chunk + decodes: why one call is slower than its two parts. Knobs: the table."""
    chunk, nd, c = MIXED
    print(f"== mixed: one {chunk} prefill chunk + {nd} decodes, context {c} ==", flush=True)
    q_lens = [chunk] + [1] * nd
    ctx = [c] * (nd + 1)
    q, kp, vp, metas = make_batch(rng, q_lens, ctx)
    m = metas[0]
    shape = dict(prefill_chunk=chunk, decodes=nd, ctx=c)
    ref = REF(q, kp, vp, m)
    nbytes, flops = kv_bytes(ctx), causal_flops(q_lens, ctx)
    S, M = m[1].shape
    knobs = {**prefill_block_config(sum(q_lens), H, KH),
             **decode_block_config(S, M, B)}
    args = [(q, kp, vp, m)]
    run_case("mixed", shape, "pallas_one_call", dict(knobs, table=True), ours_fn(), args,
             ref=ref, bytes_=nbytes, flops=flops, tol=2e-2)
    # Each launch alone on the same batch. prefill=False leaves the chunk's rows zero (timing
    # only); decode=False serves the 64 decodes from the prefill launch (one block each).
    run_case("mixed", shape, "pallas_one_call_decode_launch_only", dict(knobs, table=True),
             ours_fn(prefill=False), args)
    run_case("mixed", shape, "pallas_one_call_prefill_launch_only", dict(knobs, table=True),
             ours_fn(decode=False), args, ref=ref, tol=2e-2)
    # The engine pads the batch to its buckets: 256 slots and an 8k-token page table.
    S_e, M_e = (max(S, 256), max(M, 8192 // B)) if not SMOKE else (S + 3, M + 2)
    me = pad_meta(m, S_e, M_e)
    run_case("mixed", shape, "pallas_one_call_engine_shapes",
             dict(decode_block_config(S_e, M_e, B), slots=S_e, max_pages=M_e, table=True),
             ours_fn(), [(q, kp, vp, me)], ref=ref, bytes_=nbytes, flops=flops, tol=2e-2)
    # The two parts alone: the prefill sequence, then the decodes, as separate batches.
    qp, kpp, vpp, mp = make_batch(rng, [chunk], [c])
    qd, kpd, vpd, md = make_batch(rng, [1] * nd, [c] * nd)
    run_case("mixed", shape, "pallas_prefill_part", dict(prefill_block_config(chunk, H, KH)),
             ours_fn(decode=False), [(qp, kpp, vpp, mp[0])])
    run_case("mixed", shape, "pallas_decode_part", dict(decode_block_config(nd, M, B)),
             ours_fn(prefill=False), [(qd, kpd, vpd, md[0])])
    run_case("mixed", shape, "reference_xla", "", REF, args)


# ---------------------------------------------------------------------------------------------
# GEMM
# ---------------------------------------------------------------------------------------------

def gemm_configs(M):
    if M <= 16:
        return [dict(block_m=16, block_n=64, block_k=256, split_k=1),
                dict(block_m=16, block_n=64, block_k=256, split_k=4),
                dict(block_m=16, block_n=32, block_k=256, split_k=2),
                dict(block_m=16, block_n=128, block_k=128, split_k=4),
                dict(block_m=16, block_n=64, block_k=256, split_k=4, w_transposed=True)]
    if M <= 64:
        return [dict(block_m=64, block_n=64, block_k=256, split_k=1),
                dict(block_m=64, block_n=64, block_k=256, split_k=4),
                dict(block_m=64, block_n=128, block_k=128, split_k=2),
                dict(block_m=64, block_n=64, block_k=256, split_k=4, w_transposed=True)]
    if M <= 256:
        return [dict(block_m=64, block_n=128, block_k=128, split_k=1),
                dict(block_m=128, block_n=128, block_k=128, split_k=1, num_warps=8),
                dict(block_m=64, block_n=128, block_k=128, split_k=2),
                dict(block_m=128, block_n=128, block_k=128, split_k=1, num_warps=8,
                     w_transposed=True)]
    return [dict(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3),
            dict(block_m=128, block_n=256, block_k=128, num_warps=8, num_stages=3),
            dict(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=4,
                 w_transposed=True),
            dict(block_m=128, block_n=256, block_k=128, num_warps=8, num_stages=3,
                 w_transposed=True),
            dict(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=4)]


LM_HEAD = (4096, 128256)  # Llama-3-8B's untied lm_head: hidden x vocab
LM_HEAD_M = [1, 8, 64, 256]


def bench_lm_head():
    """The logits GEMM (bf16 in; float32 out as ``compute_logits``, or bf16 out cast after, as
    vLLM / HF) in both weight layouts: [E, V] is the engine's lm_head, [V, E] (K contiguous) the
    tied-embedding layout. H200, 2026-12-01: 231-245 us at M = 1 for 1.05 GB in all four (the
    layout and output type do not matter; RESULTS.md)."""
    print("== lm_head: [M, E] x [E, V] vs [V, E], float32 logits ==", flush=True)
    E, V = (256, 1024) if SMOKE else LM_HEAD
    w = jax.random.normal(jax.random.key(1), (E, V), jnp.bfloat16) * 0.02
    w_t = jnp.asarray(w.T)
    ev = jax.jit(lambda h, w: jnp.einsum("ne,ev->nv", h, w, preferred_element_type=jnp.float32))
    ve = jax.jit(lambda h, w: jnp.einsum("ne,ve->nv", h, w, preferred_element_type=jnp.float32))
    # bf16 logits cast to float32 after the GEMM: what vLLM and HF do for a bf16 model.
    ev16 = jax.jit(lambda h, w: jnp.einsum("ne,ev->nv", h, w).astype(jnp.float32))
    ve16 = jax.jit(lambda h, w: jnp.einsum("ne,ve->nv", h, w).astype(jnp.float32))
    for M in LM_HEAD_M[:2] if SMOKE else LM_HEAD_M:
        h = jax.random.normal(jax.random.key(M), (M, E), jnp.bfloat16)
        shape = dict(M=M, K=E, N=V, lm_head=True)
        nbytes = E * V * 2 + M * E * 2 + M * V * 4
        ref = ev(h, w)
        run_case("gemm", shape, "xla_bf16_ev", "", ev, [(h, w)], ref=ref, bytes_=nbytes,
                 flops=2 * M * E * V, peak_flops=PEAK_BF16, tol=1e-2)
        run_case("gemm", shape, "xla_bf16_ve", "", ve, [(h, w_t)], ref=ref, bytes_=nbytes,
                 flops=2 * M * E * V, peak_flops=PEAK_BF16, tol=1e-2)
        run_case("gemm", shape, "xla_bf16_ev_bf16out", "", ev16, [(h, w)], ref=ref,
                 bytes_=nbytes, flops=2 * M * E * V, peak_flops=PEAK_BF16, tol=1e-2)
        run_case("gemm", shape, "xla_bf16_ve_bf16out", "", ve16, [(h, w_t)], ref=ref,
                 bytes_=nbytes, flops=2 * M * E * V, peak_flops=PEAK_BF16, tol=1e-2)
    del w, w_t


def bench_gemm(budget_s):
    print("== gemm: W8A8 e4m3 vs bf16 ==", flush=True)
    bf16 = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
                   .astype(jnp.bfloat16))
    xla8 = jax.jit(fp8_matmul_xla)
    xla8_nk = jax.jit(functools.partial(fp8_matmul_xla, w_transposed=True))
    from jaxllm.models import fp8 as fp8_mod  # the engine's projection (imports flax)

    engine8 = jax.jit(lambda x, w, s: fp8_mod.fp8_linear(x, w, s, None))
    for K, N in GEMM_KN:
        key = jax.random.key(K * 7 + N)
        w = jax.random.normal(key, (K, N), jnp.bfloat16) * 0.02
        n_rot = max(1, min(4, math.ceil(3 * L2_BYTES / (K * N))))  # fp8 weight copies
        ws = [w * (1 + 0.01 * i) for i in range(n_rot)]
        wq = [quantize_weight_per_channel(wi) for wi in ws]
        wq_t = [(jnp.asarray(q.T), s) for q, s in wq]  # [N, K] layout, prepared once
        for M in GEMM_M:
            shape = dict(M=M, K=K, N=N)
            x = jax.random.normal(jax.random.key(M), (M, K), jnp.bfloat16)
            xq, xs = quantize_activation_per_token(x)
            flops = 2 * M * K * N
            b16 = M * K * 2 + K * N * 2 + M * N * 2
            b8 = M * K + K * N + M * N * 2
            ref = fp8_matmul_reference(xq, xs, wq[0][0], wq[0][1])
            run_case("gemm", shape, "xla_bf16", "", bf16, [(x, wi) for wi in ws], bytes_=b16,
                     flops=flops, peak_flops=PEAK_BF16)
            run_case("gemm", shape, "xla_fp8", "", xla8, [(xq, xs, q, s) for q, s in wq],
                     ref=ref, bytes_=b8, flops=flops, peak_flops=PEAK_FP8, tol=1e-2)
            # The weight as the engine stores it ([N, K]: cuBLASLt's fp8 GEMM is "TN" only).
            run_case("gemm", shape, "xla_fp8_nk", "", xla8_nk, [(xq, xs, q, s) for q, s in wq_t],
                     ref=ref, bytes_=b8, flops=flops, peak_flops=PEAK_FP8, tol=1e-2)
            # What an fp8 projection of the engine runs on bf16 activations, quantization
            # included: W8A8, or weight-only (e4m3 upcast in the dot) at <= 16 rows on a GPU.
            wo = M <= fp8_mod.weight_only_max_tokens()
            ref_wo = fp8_matmul_reference(x.astype(jnp.float32), 1.0, wq[0][0], wq[0][1]) \
                if wo else ref  # weight-only: x is not quantized
            run_case("gemm", shape, "engine_fp8_linear", dict(weight_only=wo), engine8,
                     [(x, q, s) for q, s in wq_t], ref=ref_wo, bytes_=b8, flops=flops,
                     peak_flops=PEAK_FP8, tol=1e-2)
            for i, cfg in enumerate(few(gemm_configs(M))):
                if i > 0 and time.time() - T0 > budget_s:
                    break
                cfg = dict(cfg)
                wt = cfg.get("w_transposed", False)
                f = functools.partial(fp8_matmul, interpret=SMOKE, **cfg)
                sets = [(xq, xs, q, s) for q, s in (wq_t if wt else wq)]
                run_case("gemm", shape, "pallas_fp8", cfg, f, sets, ref=ref, bytes_=b8,
                         flops=flops, peak_flops=PEAK_FP8, tol=1e-2)
            del x, xq, xs, ref
        del w, ws, wq, wq_t


BLOCK_GEMM_CONFIGS = [dict(block_m=16, block_n=64), dict(block_m=16, block_n=128),
                      dict(block_m=64, block_n=128), dict(block_m=128, block_n=128, num_warps=8),
                      dict(block_m=64, block_n=128, num_stages=4)]
# The skinny kernel's tiles for block scales at M <= 64 (block_n, block_k, split_k, num_warps,
# num_stages; the engine's JAXLLM_FP8_BLOCK_SKINNY), its default (BLOCK_SKINNY_TILE) first.
BLOCK_SKINNY_CONFIGS = [(32, 128, 4, 4, 4), (64, 128, 4, 4, 4), (64, 256, 4, 4, 4),
                        (32, 256, 4, 4, 4), (64, 256, 8, 4, 4), (128, 256, 2, 4, 3),
                        (64, 512, 2, 4, 3), (32, 128, 8, 4, 4), (64, 256, 2, 4, 4)]
# The Mosaic GPU block kernel's (tile_m, steps, k_blocks, group_m, cluster_m)
# (pallas_kernels/fp8_block_mgpu.py; the engine's JAXLLM_FP8_BLOCK_MGPU), its default
# (fp8_block_mgpu.DEFAULT_TILE) first; k_blocks 2: two K blocks a step, the first promoted
# while the second's wgmma runs; group_m: token tiles a group of the tile order; cluster_m 2:
# two CTAs share the weight tile by TMA multicast. --mgpu-configs replaces the list.
BLOCK_MGPU_CONFIGS = [(128, 2, 2, 8, 2), (128, 4, 1, 0, 1), (128, 4, 1, 8, 2),
                      (128, 2, 2, 8, 1), (64, 4, 1, 0, 1), (32, 8, 1, 0, 1), (64, 4, 2, 0, 1),
                      (32, 8, 1, 0, 2), (128, 6, 1, 0, 1), (256, 3, 1, 0, 1)]
# XLA's compile options the block W8A16 form is also timed under at M > 64: the engine compiles
# its fp8 steps of >= 32 tokens with cuBLAS GEMMs (model_runner.CUBLAS_COMPILER_OPTIONS), under
# which the dequantized weight is always written first; without a cuBLAS fallback XLA must keep
# the dequantization inside its Triton GEMM fusion.
BLOCK_XLA_OPTIONS = {"cublas": {"xla_gpu_enable_triton_gemm": False},
                     "triton": {"xla_gpu_cublas_fallback": False}}
BLOCK_TRITON = True  # --block-skip-triton: fp8_block_matmul's sweep at M > 64 left out
BLOCK_IMPLS: set[str] | None = None  # --block-impls: the block_gemm rows to run (None: all)
BLOCK_IMPL_NAMES = ("xla_bf16", "xla_block_w8a16", "xla_block_batched", "block_w8a16",
                    "block_w8a8", "mgpu_block_w8a8", "skinny_block_w8a16", "skinny_block_w8a8",
                    "pallas_fp8_block")
# xla_block_batched runs where its [KB, M, N] float32 partials stay small next to the weight.
BATCHED_MAX_M = 16


def _block_case(shape, impl, *args, **kw):
    """run_case for the block_gemm section, unless --block-impls leaves ``impl`` out (the
    bf16 baseline always runs: every row is read against it)."""
    if BLOCK_IMPLS is None or impl in BLOCK_IMPLS or impl == "xla_bf16":
        run_case("block_gemm", shape, impl, *args, **kw)


def _block_quantize(w, bk):
    """w [N, K] -> (e4m3 [N, K], scales [N, KB]) in bk x bk tiles, as a block-wise checkpoint
    holds them once loaded (each tile's absmax -> 448; its scale repeated over its rows)."""
    N, K = w.shape
    NB, KB = -(-N // bk), -(-K // bk)
    tiles = jnp.pad(w.astype(jnp.float32), ((0, NB * bk - N), (0, KB * bk - K)))
    amax = jnp.max(jnp.abs(tiles.reshape(NB, bk, KB, bk)), axis=(1, 3))
    rows = jnp.repeat(jnp.where(amax > 0, amax / E4M3_MAX, 1.0), bk, axis=0)[:N]
    q = w.astype(jnp.float32) / jnp.repeat(rows, bk, axis=1)[:, :K]
    return q.astype(jnp.float8_e4m3fn), rows


def bench_block_gemm(budget_s):
    """block_gemm: which form the engine should run block-wise fp8 checkpoints in
    (jaxllm.models.fp8.block_fp8_linear): XLA's dot over the dequantized weight
    (``xla_block_w8a16``), XLA's dot batched over the K blocks with the scales applied to each
    block's product (``xla_block_batched``, M <= ``BATCHED_MAX_M``), the engine's forms (``block_w8a16`` / ``block_w8a8``: the skinny
    kernel at M <= 64 on a GPU, ``BLOCK_SKINNY_TILE``), the skinny kernel's tiles alone
    (``skinny_block_w8a16`` / ``skinny_block_w8a8``, M <= 64), ``fp8_block_matmul``'s (M > 64)
    and the Mosaic GPU kernel's (``mgpu_block_w8a8``, ``BLOCK_MGPU_CONFIGS``, M >= 64), against
    XLA's bf16 dot; at M > 64 XLA's w8a16 form under ``BLOCK_XLA_OPTIONS`` too."""
    print("== block_gemm: block-wise fp8 (tile scales) vs bf16 ==", flush=True)
    from jaxllm.models import fp8 as fp8_mod
    from pallas_kernels.fp8_block_mgpu import fp8_block_matmul_mgpu
    from pallas_kernels.skinny_matmul import skinny_fits, skinny_matmul

    bk = 128 if not SMOKE else 32
    skinny_cfgs = BLOCK_SKINNY_CONFIGS if not SMOKE else [(32, 64, 2, 4, 2), (64, 32, 4, 4, 2)]
    bf16 = jax.jit(lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32)
                   .astype(jnp.bfloat16))

    def xla_w8a16_fn(x, q, s):
        w = fp8_mod.dequantize_blockwise(q, s, bk, x.dtype)
        return jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(x.dtype)

    xla_w8a16 = jax.jit(xla_w8a16_fn)

    def xla_batched_fn(x, q, s):
        # The block scales out of the weight: one dot a K block (a dot_general batched over
        # the KB blocks, the e4m3 weight upcast in it as in per-channel fp8's weight-only
        # GEMM), each block's [M, N] product scaled by its weight scales, summed. No
        # dequantized weight is written (XLA's w8a16 form writes it in bf16 below ~4096
        # rows); the cost is KB x M x N float32 partials.
        (M, K), N, KB = x.shape, q.shape[0], s.shape[1]
        parts = jax.lax.dot_general(
            x.reshape(M, KB, K // KB), q.reshape(N, KB, K // KB).astype(x.dtype),
            (((2,), (2,)), ((1,), (1,))), preferred_element_type=jnp.float32)  # [KB, M, N]
        return jnp.einsum("bmn,nb->mn", parts, s.astype(jnp.float32)).astype(x.dtype)

    xla_batched = jax.jit(xla_batched_fn)

    engine = {}
    if not SMOKE:  # the engine's own tile; on a CPU the smoke run keeps XLA's forms
        os.environ[fp8_mod.BLOCK_SKINNY_ENV] = ",".join(map(str, fp8_mod.BLOCK_SKINNY_TILE))
    for name, f in (("block_w8a16", fp8_mod.block_fp8_linear_w8a16),
                    ("block_w8a8", fp8_mod.block_fp8_linear_w8a8)):
        engine[name] = jax.jit(functools.partial(f, block_k=bk))
    for K, N in GEMM_KN:
        KB = -(-K // bk)
        n_rot = max(1, min(4, math.ceil(3 * L2_BYTES / (K * N))))
        ws = [jax.random.normal(jax.random.key(K + N + i), (N, K), jnp.bfloat16) * 0.02
              for i in range(n_rot)]
        wq, wsc = zip(*(_block_quantize(w, bk) for w in ws))
        for M in GEMM_M:
            shape = dict(M=M, K=K, N=N, block_k=bk)
            x = jax.random.normal(jax.random.key(M), (M, K), jnp.bfloat16)
            xq, xs = quantize_activation_per_token_group(x, bk)
            flops = 2 * M * K * N
            b16 = M * K * 2 + K * N * 2 + M * N * 2
            b8 = M * K + K * N + N * KB * 4 + M * N * 2
            ref = fp8_block_matmul_reference(xq, xs, wq[0], wsc[0], bk)
            ref16 = fp8_block_matmul_reference(x, jnp.ones((M, KB)), wq[0], wsc[0], bk)
            sets16 = [(x, q, s) for q, s in zip(wq, wsc)]
            sets8 = [(xq, q, s, xs) for q, s in zip(wq, wsc)]
            _block_case(shape, "xla_bf16", "", bf16, [(x, w) for w in ws],
                        bytes_=b16, flops=flops, peak_flops=PEAK_BF16)
            _block_case(shape, "xla_block_w8a16", "", xla_w8a16, sets16, ref=ref16,
                        bytes_=b8, flops=flops, peak_flops=PEAK_BF16, tol=1e-2)
            if M <= BATCHED_MAX_M and K % bk == 0:
                _block_case(shape, "xla_block_batched", "", xla_batched, sets16, ref=ref16,
                            bytes_=b8, flops=flops, peak_flops=PEAK_BF16, tol=1e-2)
            for name, r in (("block_w8a16", ref16), ("block_w8a8", ref)):
                _block_case(shape, name, "", engine[name], sets16, ref=r,
                            bytes_=b8, flops=flops, peak_flops=PEAK_FP8, tol=1e-2)
            if M >= 64 and not SMOKE:  # the Mosaic kernel's K step is 128 (bk of the smoke: 32)
                for i, (tm, steps, kb2, gm, cm) in enumerate(BLOCK_MGPU_CONFIGS):
                    if i > 0 and time.time() - T0 > budget_s:
                        break
                    cfg = dict(tile_m=tm, steps=steps, k_blocks=kb2, group_m=gm, cluster_m=cm)
                    f = jax.jit(lambda xq, q, s, xs, cfg=cfg:
                                fp8_block_matmul_mgpu(xq, xs, q, s, bk, jnp.bfloat16, **cfg))
                    _block_case(shape, "mgpu_block_w8a8", cfg, f, sets8, ref=ref,
                                bytes_=b8, flops=flops, peak_flops=PEAK_FP8, tol=1e-2)
            if M > 64:
                for name, opts in BLOCK_XLA_OPTIONS.items():
                    f = jax.jit(xla_w8a16_fn, compiler_options=opts)
                    _block_case(shape, "xla_block_w8a16", dict(options=name), f,
                                sets16, ref=ref16, bytes_=b8, flops=flops, peak_flops=PEAK_BF16,
                                tol=1e-2)
            if M <= 64:
                for i, (bn, tk, sk, nw, ns) in enumerate(skinny_cfgs):
                    if i > 0 and time.time() - T0 > budget_s:
                        break
                    if not skinny_fits(M, K, N, block_n=bn, block_k=tk, split_k=sk):
                        continue
                    cfg = dict(block_n=bn, block_k=tk, split_k=sk, num_warps=nw,
                               num_stages=ns)
                    f = functools.partial(skinny_matmul, scale_block_k=bk, interpret=SMOKE,
                                          **cfg)
                    _block_case(shape, "skinny_block_w8a16", cfg, f, sets16,
                                ref=ref16, bytes_=b8, flops=flops, peak_flops=PEAK_BF16, tol=1e-2)
                    _block_case(shape, "skinny_block_w8a8", cfg, f, sets8, ref=ref,
                                bytes_=b8, flops=flops, peak_flops=PEAK_FP8, tol=1e-2)
                continue
            for i, cfg in enumerate(BLOCK_GEMM_CONFIGS if BLOCK_TRITON else []):
                if i > 0 and time.time() - T0 > budget_s:
                    break
                k = functools.partial(fp8_block_matmul, block_k=bk, interpret=SMOKE, **cfg)
                _block_case(shape, "pallas_fp8_block", cfg, k,
                            [(xq, xs, q, s) for q, s in zip(wq, wsc)], ref=ref, bytes_=b8,
                            flops=flops, peak_flops=PEAK_FP8, tol=1e-2)
            del x, xq, xs, ref, ref16
        del ws, wq, wsc


# Per-program XLA options the step's GEMMs could be compiled with (issue 9: at batch 1 the q/k/v
# and o GEMMs read at 3.2 TB/s under XLA's Triton split-K configs; issue 6: the fp8 GEMM
# fusions' autotuning at 16384 tokens took 306 s). Compared in one process, since the H200's read
# bandwidth differed by up to 20% between processes of one call (RESULTS, 2026-12-01 noon).
GEMM_OPTIONS = {
    "default": {},
    "cublas": {"xla_gpu_enable_triton_gemm": False},
    "exhaustive": {"xla_gpu_exhaustive_tiling_search": True},
    "warp_spec": {"xla_gpu_experimental_enable_triton_warp_specialization": True},
}
GEMM_OPTIONS_M = [1, 8, 64, 256]
GEMM_OPTIONS_FP8_M = [8, 64, 4096]


def bench_gemm_options(budget_s):
    print("== gemm_options: the step's GEMMs under per-program XLA options ==", flush=True)
    from jaxllm.models import fp8 as fp8_mod

    def bf16_dot(x, w):
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)

    def logits_dot(x, w):
        return jnp.dot(x, w, preferred_element_type=jnp.float32)

    shapes = [(K, N, bf16_dot) for K, N in GEMM_KN] + [(*LM_HEAD, logits_dot)]
    if SMOKE:
        shapes = [(256, 64, bf16_dot), (256, 1024, logits_dot)]
    for K, N, dot in shapes:
        w = jax.random.normal(jax.random.key(K + N), (K, N), jnp.bfloat16) * 0.02
        n_rot = max(1, min(4, math.ceil(3 * L2_BYTES / (2 * K * N))))  # copies rotated past L2
        ws = [w * (1 + 0.01 * i) for i in range(n_rot)]
        out_size = 4 if dot is logits_dot else 2
        for M in GEMM_OPTIONS_M[:2] if SMOKE else GEMM_OPTIONS_M:
            x = jax.random.normal(jax.random.key(M), (M, K), jnp.bfloat16)
            ref = logits_dot(x, w)
            for name, opts in GEMM_OPTIONS.items():
                if name != "default" and time.time() - T0 > budget_s:
                    break
                fn = jax.jit(dot, compiler_options=opts or None)
                run_case("gemm", dict(M=M, K=K, N=N, lm_head=dot is logits_dot), "xla_bf16",
                         dict(options=name), fn, [(x, wi) for wi in ws], ref=ref,
                         bytes_=M * K * 2 + K * N * 2 + M * N * out_size,
                         flops=2 * M * K * N, peak_flops=PEAK_BF16, tol=1e-2)
        del w, ws
    engine8 = lambda x, w, s: fp8_mod.fp8_linear(x, w, s, None)  # noqa: E731
    for K, N in [(256, 64)] if SMOKE else GEMM_KN:
        w = jax.random.normal(jax.random.key(K * 7 + N), (K, N), jnp.bfloat16) * 0.02
        n_rot = max(1, min(4, math.ceil(3 * L2_BYTES / (K * N))))
        wq_t = []
        for i in range(n_rot):
            q, s = quantize_weight_per_channel(w * (1 + 0.01 * i))
            wq_t.append((jnp.asarray(q.T), s))
        for M in GEMM_OPTIONS_FP8_M[:1] if SMOKE else GEMM_OPTIONS_FP8_M:
            x = jax.random.normal(jax.random.key(M), (M, K), jnp.bfloat16)
            ref = logits_dot(x, w)
            for name in ("default", "cublas"):
                if name != "default" and time.time() - T0 > budget_s:
                    break
                opts = GEMM_OPTIONS[name]
                fn = jax.jit(engine8, compiler_options=opts or None)
                run_case("gemm", dict(M=M, K=K, N=N), "engine_fp8_linear", dict(options=name), fn,
                         [(x, q, s) for q, s in wq_t], ref=ref,
                         bytes_=M * K * 2 + K * N + M * N * 2, flops=2 * M * K * N,
                         peak_flops=PEAK_FP8, tol=5e-2)
        del w, wq_t


def summarize():
    print("\n== best per shape (time_us; GB/s or TFLOP/s) ==")
    groups: dict[tuple, list[dict]] = {}
    for r in RESULTS:
        if "time_us" not in r:
            continue
        shape = tuple((k, r[k]) for k in ("batch", "ctx", "table_ctx", "q_len", "prefill_chunk",
                                           "decodes", "M", "K", "N", "lm_head") if k in r)
        groups.setdefault((r["section"], shape), []).append(r)
    for (section, shape), rs in groups.items():
        by_impl: dict[str, dict] = {}
        def key(r):  # dispatch-free time where measured
            return r.get("device_us", r.get("time_us_loop", r["time_us"]))

        for r in rs:
            if r.get("ok") is False:
                continue
            if r["impl"] not in by_impl or key(r) < key(by_impl[r["impl"]]):
                by_impl[r["impl"]] = r
        cells = []
        for impl, r in sorted(by_impl.items(), key=lambda kv: key(kv[1])):
            perf = (f"{r['gbps']:.0f}GB/s({r['pct_bw']:.0f}%)" if section == "decode" or (
                section == "gemm" and r.get("M", 9999) <= 64) else
                f"{r.get('tflops', 0):.0f}TF/s")
            loop = (f" loop={r['time_us_loop']:.1f}us({r.get('pct_bw_loop', 0):.0f}%)"
                    if "time_us_loop" in r else "")
            dev = (f" device={r['device_us']:.1f}us({r.get('pct_bw_device', 0):.0f}%)"
                   if "device_us" in r else "")
            cells.append(f"{impl}={r['time_us']:.1f}us {perf}{loop}{dev}")
        print(f"{section:8s} {dict(shape)}: " + " | ".join(cells))
        if "pallas" in by_impl or "pallas_fp8" in by_impl:
            best = by_impl.get("pallas") or by_impl.get("pallas_fp8")
            print(f"{'':8s}   best pallas config: {best['config']}")
    bad = [r for r in RESULTS if r.get("ok") is False]
    errs = [r for r in RESULTS if "error" in r]
    print(f"\n{len(RESULTS)} cases, {len(bad)} over tolerance, {len(errs)} errors, "
          f"{time.time() - T0:.0f}s")
    for r in bad:
        print(f"  OVER TOLERANCE: {r['section']} {r['impl']} {r['config']} rel_err={r['rel_err']}")


# ---------------------------------------------------------------------------------------------
# The kernel's block-size table from a sweep's results
# ---------------------------------------------------------------------------------------------

def _usable(r, section, kv_dtype=None):
    """A correct `pallas` row at the kernel's own num_warps / num_stages (4, 2): the table holds
    block sizes only, so rows that needed other warps / stages or decode_split_pages are
    reported, not tabled; so are the short-context-in-a-long-table rows (table_ctx), which are
    not a shape class. ``kv_dtype`` "fp8": rows over e4m3 pages read the default way (float16;
    the fp8 table), else rows over bf16 pages."""
    c = r.get("config") or {}
    if kv_dtype == "fp8":
        page_ok = (r.get("kv_dtype") == "fp8" and isinstance(c, dict)
                   and c.get("fp8_kv_dot", "auto") in ("auto", "float16"))
    else:
        page_ok = "kv_dtype" not in r
    return (r.get("section") == section and r.get("impl") == "pallas" and r.get("ok") is True
            and "time_us" in r and "table_ctx" not in r and page_ok
            and isinstance(c, dict)
            and c.get("num_warps", 4) == 4 and c.get("num_stages", 2) == 2
            and not c.get("decode_split_pages"))


def _time(r, group):
    """The most dispatch-free time every row of the group has: device_us (GPU time, from a
    profiler trace), else time_us_loop (one dispatch per --loop-reps calls), else time_us."""
    for key in ("device_us", "time_us_loop"):
        if all(key in g for g in group):
            return r[key]
    return r["time_us"]


def _shape_key(r: dict) -> tuple:
    """A result row's section and shape (what a newer sweep of the same shape replaces)."""
    return (r.get("section"), r.get("batch"), r.get("ctx"), r.get("table_ctx"), r.get("q_len"),
            r.get("M"), r.get("K"), r.get("N"))


def table_from_results(*paths, kv_dtype=None):
    """(DECODE_TABLE, PREFILL_TABLE) of pallas_kernels/ragged_paged_attention.py from a sweep
    (``kv_dtype="fp8"``: DECODE_TABLE_FP8 from the rows over e4m3 pages, and no prefill table).

    decode: (batch, ctx) -> (decode_pages_per_block, decode_splits) of the fastest row, and its
    decode_heads_per_program third where that is not 1.
    prefill: (G, batch * q_len) -> (block_q, pages_per_block): the config fastest over all the
    shapes of that key (sum of times relative to each shape's best, among the configs measured
    on the most shapes). Several files, oldest first: a shape a later file measured takes that
    file's rows alone (a newer sweep, on another GPU or in GPU time, replaces the older one's
    rows of that shape; rows of two runs are not comparable)."""
    rows = []
    for path in paths:
        file_rows = [json.loads(line) for line in Path(path).read_text().splitlines()
                     if line.strip()]
        newer = {_shape_key(r) for r in file_rows}
        rows = [r for r in rows if _shape_key(r) not in newer] + file_rows
    decode: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        if _usable(r, "decode", kv_dtype):
            decode.setdefault((r["batch"], r["ctx"]), []).append(r)
    dtable = {}
    for key, group in sorted(decode.items()):
        best = min(group, key=lambda r: _time(r, group))["config"]
        dtable[key] = (best["decode_pages_per_block"], best["decode_splits"])
        if best.get("decode_heads_per_program", 1) != 1:
            dtable[key] += (best["decode_heads_per_program"],)
    prefill: dict[tuple[int, int], dict[tuple[int, int], list[dict]]] = {}
    for r in rows:
        if kv_dtype is None and _usable(r, "prefill"):
            G = r.get("heads", 32) // r.get("kv_heads", 8)
            shape_rows = prefill.setdefault((G, r["batch"] * r["q_len"]), {})
            shape_rows.setdefault((r["batch"], r["q_len"]), []).append(r)
    ptable = {}
    for key, shapes in sorted(prefill.items()):
        score: dict[tuple[int, int], list[float]] = {}
        for group in shapes.values():
            best_t = min(_time(r, group) for r in group)
            for r in group:
                c = (r["config"]["block_q"], r["config"]["pages_per_block"])
                score.setdefault(c, []).append(_time(r, group) / best_t)
        ptable[key] = min(score, key=lambda c: (-len(score[c]), sum(score[c])))
    return dtable, ptable


def print_table(paths, kv_dtype=None):
    dtable, ptable = table_from_results(*paths, kv_dtype=kv_dtype)
    print(f"# from {', '.join(map(str, paths))}")
    name = "DECODE_TABLE_FP8" if kv_dtype == "fp8" else "DECODE_TABLE"
    print(f"{name}: dict[tuple[int, int], tuple[int, ...]] = {{")
    for k, v in dtable.items():
        print(f"    {k}: {v},")
    print("}")
    if kv_dtype != "fp8":
        print("PREFILL_TABLE: dict[tuple[int, int], tuple[int, int]] = {")
        for k, v in ptable.items():
            print(f"    {k}: {v},")
        print("}")
    rows = [json.loads(line) for path in paths
            for line in Path(path).read_text().splitlines() if line.strip()]
    for sec in ("decode", "prefill"):
        for r in rows:
            c = r.get("config")
            if (r.get("section") == sec and r.get("impl") == "pallas" and r.get("ok")
                    and isinstance(c, dict) and (r.get("kv_dtype") == "fp8") == (kv_dtype == "fp8")
                    and not _usable(r, sec, kv_dtype)):
                shape = {k: r[k] for k in ("batch", "ctx", "table_ctx", "q_len") if k in r}
                why = ("short context, long table" if "table_ctx" in r else
                       "split by pages" if c.get("decode_split_pages") else
                       "pages not read as float16" if c.get("fp8_kv_dot", "auto") not in (
                           "auto", "float16") else "warps/stages")
                t = r.get("device_us", r.get("time_us_loop", r["time_us"]))
                print(f"# not tabled ({why}): {sec} {shape} {c} {t:.1f} us")


BACKEND_PREFILL = [4096, 8192]  # one causal prompt of this length
BACKEND_GEMM = [(M, K, N) for M in (256, 1024, 4096) for K, N in ((4096, 14336), (14336, 4096))]
MGPU_GEMM_CONFIGS = [dict(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=4),
                     dict(tile_m=128, tile_n=256, tile_k=64, max_concurrent_steps=3),
                     dict(tile_m=64, tile_n=128, tile_k=64, max_concurrent_steps=4)]


def bench_backends(rng):
    """Issue 5: the Pallas GPU backends side by side on the same shapes. Our kernels use the
    Triton lowering; JAX ships Hopper kernels written for Mosaic GPU (wgmma, TMA, warp
    specialization): a dense causal attention (`ops.gpu.attention_mgpu`) and a bf16 GEMM
    (`ops.gpu.hopper_matmul_mgpu`). No Mosaic GPU paged/ragged attention exists to compare with
    our decode path, so the prefill shape (compute-bound) is where the lowering can show: ours
    (paged, Triton), JAX's Triton flash attention (`ops.gpu.attention.mha`, contiguous K/V with
    the KV heads repeated: it has no GQA), the Mosaic GPU one (contiguous, GQA) and cuDNN. The
    GEMMs: XLA's bf16 dot (cuBLAS / its own Triton) against the Mosaic GPU kernel."""
    print("== backends: Triton lowering vs Mosaic GPU ==", flush=True)
    for L in ([64] if SMOKE else BACKEND_PREFILL):
        shape = dict(batch=1, q_len=L)
        q, kp, vp, metas = make_batch(rng, [L], [L])
        flops = causal_flops([L], [L])
        ref = REF(q, kp, vp, metas[0])
        table = dict(prefill_block_config(L, H, KH), num_warps=4, num_stages=2)
        run_case("backends", shape, "ours_triton_paged", table, ours_fn(decode=False, **table),
                 [(q, kp, vp, metas[0])], ref=ref, flops=flops, peak_flops=PEAK_BF16, tol=2e-2)
        qc = q.reshape(1, L, H, D)
        kc = kp[metas[0][1]].reshape(1, -1, KH, D)[:, :L]
        vc = vp[metas[0][1]].reshape(1, -1, KH, D)[:, :L]
        try:
            from jax.experimental.pallas.ops.gpu import attention as triton_attention

            rep = H // KH
            f = jax.jit(lambda q_, k_, v_: triton_attention.mha(
                q_, jnp.repeat(k_, rep, axis=2), jnp.repeat(v_, rep, axis=2), None, sm_scale=SM,
                causal=True, interpret=SMOKE).reshape(L, H, D))
            run_case("backends", shape, "jax_triton_mha_contiguous", "", f, [(qc, kc, vc)],
                     ref=ref, flops=flops, peak_flops=PEAK_BF16, tol=2e-2)
        except Exception as e:  # noqa: BLE001
            print(f"  triton mha {shape}: {short(e)}")
        if not SMOKE:
            try:
                from jax.experimental.pallas.ops.gpu import attention_mgpu

                # Its kernel stages tiles in fp16 whatever the input dtype (jax 0.11.2: bf16
                # inputs fail "src had type bfloat16 and dst had type float16"), so it gets fp16
                # inputs, q pre-scaled, made outside the timed call (same tensor-core rate).
                f16 = [(x * s).astype(jnp.float16) for x, s in ((qc, SM), (kc, 1), (vc, 1))]
                for bkv in (128, 64):
                    cfg = attention_mgpu.TuningConfig(block_q=64, block_kv=bkv,
                                                      max_concurrent_steps=2, causal=True)
                    f = jax.jit(lambda q_, k_, v_, cfg=cfg: attention_mgpu.attention(
                        q_, k_, v_, cfg).reshape(L, H, D))
                    run_case("backends", shape, "jax_mosaic_gpu_attention_contiguous_fp16",
                             dict(block_q=64, block_kv=bkv), f, [tuple(f16)], ref=ref,
                             flops=flops, peak_flops=PEAK_BF16, tol=2e-2)
            except Exception as e:  # noqa: BLE001
                print(f"  mosaic gpu attention {shape}: {short(e)}")
        try:
            f = jax.jit(lambda q_, k_, v_: jax.nn.dot_product_attention(
                q_, k_, v_, scale=SM, is_causal=True, implementation="cudnn").reshape(L, H, D))
            run_case("backends", shape, "cudnn_contiguous", "", f, [(qc, kc, vc)], ref=ref,
                     flops=flops, peak_flops=PEAK_BF16, tol=2e-2)
        except Exception as e:  # noqa: BLE001
            print(f"  cudnn {shape}: {short(e)}")
        del q, kp, vp, metas, ref, qc, kc, vc
    if SMOKE:
        return
    bf16 = jax.jit(lambda x, w: jnp.dot(x, w))
    for M, K, N in BACKEND_GEMM:
        shape = dict(M=M, K=K, N=N)
        x = jax.random.normal(jax.random.key(M), (M, K), jnp.bfloat16)
        w = jax.random.normal(jax.random.key(K + N), (K, N), jnp.bfloat16) * 0.02
        ref = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
        flops = 2 * M * K * N
        run_case("backends", shape, "xla_bf16", "", bf16, [(x, w)], ref=ref, flops=flops,
                 peak_flops=PEAK_BF16, tol=1e-2)
        try:
            from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as mm

            for cfg in MGPU_GEMM_CONFIGS:
                if cfg["tile_m"] > M:
                    continue
                tc = mm.TuningConfig(**cfg)
                f = jax.jit(lambda x_, w_, tc=tc: mm.matmul(x_, w_, None, tc))
                run_case("backends", shape, "jax_mosaic_gpu_matmul", cfg, f, [(x, w)], ref=ref,
                         flops=flops, peak_flops=PEAK_BF16, tol=1e-2)
        except Exception as e:  # noqa: BLE001
            print(f"  mosaic gpu matmul {shape}: {short(e)}")
        del x, w, ref


def main():
    global OUT, LOOP_REPS, PEAK_BW, DEVICE_TIME, DECODE_SHAPES, KV_DTYPE, FP8_KV_DOT
    global DECODE_VARIANTS, GEMM_M, GEMM_KN, BLOCK_TRITON, BLOCK_IMPLS, BLOCK_MGPU_CONFIGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON lines output path (appended)")
    ap.add_argument("--sections", "--only", dest="sections", default="decode,lm_head,gemm,prefill,mixed",
                    help="comma-separated: decode,lm_head,gemm,prefill,mixed,backends,"
                         "gemm_options,block_gemm (backends: the Triton vs Mosaic GPU "
                         "comparison; gemm_options: XLA options for the step's GEMMs; "
                         "block_gemm: block-wise fp8 weights; none is in the default set)")
    ap.add_argument("--decode-shapes", default=None,
                    help="decode shapes to run instead of the full list, e.g. 8x4096,64x4096")
    ap.add_argument("--gemm-ms", default=None,
                    help="comma-separated M values for the gemm / block_gemm sections "
                         "(default: %s)" % ",".join(map(str, GEMM_M)))
    ap.add_argument("--gemm-kn", default=None,
                    help="comma-separated KxN weight shapes for the gemm / block_gemm sections "
                         "(default: %s)" % ",".join(f"{k}x{n}" for k, n in GEMM_KN))
    ap.add_argument("--budget", type=float, default=300.0,
                    help="seconds after which sweeps keep only their first config")
    ap.add_argument("--loop-reps", type=int, default=8,
                    help="calls per jitted program for time_us_loop (0: skip)")
    ap.add_argument("--print-table", metavar="RESULTS_JSONL", nargs="+",
                    help="print the kernel's block-size table derived from sweep results, exit "
                         "(with --kv-dtype fp8: the table over fp8 pages)")
    ap.add_argument("--peak-bw", type=float, default=None,
                    help="bytes/s for pct_bw (default: 4.3e12 on an H200, else 3.1e12)")
    ap.add_argument("--device-time", action="store_true",
                    help="also read each call's GPU time from a profiler trace (device_us; "
                         "calls under 5 ms; ~1 s more per case)")
    ap.add_argument("--kv-dtype", default="bf16", choices=["bf16", "fp8"],
                    help="the decode section's K/V page dtype (fp8: e4m3 pages, as "
                         "kv_cache_dtype='fp8'; bytes counted at 1 a value; no peers)")
    ap.add_argument("--fp8-kv-dot", default="auto",
                    help="with --kv-dtype fp8: the kernel's fp8_kv_dot, or several "
                         "comma-separated (each config runs with each); 'all': every choice")
    ap.add_argument("--decode-variants", default="all", choices=["all", "hp"],
                    help="decode configs: all, or hp (the table entry and the several-KV-heads-"
                         "a-program configs alone)")
    ap.add_argument("--block-skip-triton", action="store_true",
                    help="block_gemm: leave out fp8_block_matmul's (Triton) sweep at M > 64")
    ap.add_argument("--block-impls", default=None,
                    help="block_gemm: comma-separated impls to run (e.g. mgpu_block_w8a8, "
                         "xla_block_w8a16); xla_bf16 always runs")
    ap.add_argument("--mgpu-configs", default=None,
                    help="block_gemm: the Mosaic kernel's configs instead of BLOCK_MGPU_CONFIGS, "
                         "'tile_m,steps,k_blocks,group_m,cluster_m' separated by ';'")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    args = ap.parse_args()
    if args.print_table:
        print_table(args.print_table, "fp8" if args.kv_dtype == "fp8" else None)
        return
    LOOP_REPS = args.loop_reps
    BLOCK_TRITON = not args.block_skip_triton
    BLOCK_IMPLS = set(args.block_impls.split(",")) if args.block_impls else None
    if BLOCK_IMPLS is not None and BLOCK_IMPLS - set(BLOCK_IMPL_NAMES):
        ap.error(f"--block-impls: unknown {sorted(BLOCK_IMPLS - set(BLOCK_IMPL_NAMES))}; "
                 f"choose from {','.join(BLOCK_IMPL_NAMES)}")
    if args.mgpu_configs:
        try:
            BLOCK_MGPU_CONFIGS = [tuple(int(v) for v in c.split(","))
                                  for c in args.mgpu_configs.split(";")]
        except ValueError:
            BLOCK_MGPU_CONFIGS = []
        if not BLOCK_MGPU_CONFIGS or any(len(c) != 5 for c in BLOCK_MGPU_CONFIGS):
            ap.error("--mgpu-configs: 'tile_m,steps,k_blocks,group_m,cluster_m' separated by "
                     f"';', got {args.mgpu_configs!r}")
    DEVICE_TIME = args.device_time
    KV_DTYPE = args.kv_dtype
    DECODE_VARIANTS = args.decode_variants
    from pallas_kernels.ragged_paged_attention import FP8_KV_DOT_CHOICES
    FP8_KV_DOT = (FP8_KV_DOT_CHOICES if args.fp8_kv_dot == "all"
                  else tuple(args.fp8_kv_dot.split(",")))
    bad = sorted(set(FP8_KV_DOT) - set(FP8_KV_DOT_CHOICES + ("auto",)))
    if bad:
        ap.error(f"--fp8-kv-dot: unknown {bad}; choices: auto, {', '.join(FP8_KV_DOT_CHOICES)}")
    if args.smoke:
        _smoke()
    if args.gemm_ms:
        try:
            GEMM_M = [int(m) for m in args.gemm_ms.split(",")]
        except ValueError:
            ap.error(f"--gemm-ms: comma-separated integers, got {args.gemm_ms!r}")
    if args.gemm_kn:
        try:
            GEMM_KN = [tuple(int(d) for d in kn.split("x")) for kn in args.gemm_kn.split(",")]
            if any(len(kn) != 2 for kn in GEMM_KN):
                raise ValueError
        except ValueError:
            ap.error(f"--gemm-kn: comma-separated KxN pairs, got {args.gemm_kn!r}")
    OUT = args.out
    if OUT:
        Path(OUT).parent.mkdir(parents=True, exist_ok=True)
    kind = jax.devices()[0].device_kind
    PEAK_BW = args.peak_bw or (4.3e12 if "H200" in kind else PEAK_BW)
    print(f"jax {jax.__version__} on {kind}; pct_bw of {PEAK_BW / 1e12:.1f} TB/s", flush=True)
    only = args.sections.split(",")
    known = {"decode", "lm_head", "gemm", "prefill", "mixed", "backends", "gemm_options",
             "block_gemm"}
    unknown = set(only) - known
    if unknown:
        ap.error(f"unknown --sections {sorted(unknown)}; choose from {','.join(sorted(known))}")
    if args.decode_shapes:
        try:
            DECODE_SHAPES = [tuple(int(n) for n in s.split("x")) for s in
                             args.decode_shapes.split(",")]
        except ValueError:
            ap.error(f"--decode-shapes {args.decode_shapes!r}: write BATCHxCONTEXT,...")
        if any(len(s) != 2 for s in DECODE_SHAPES):
            ap.error(f"--decode-shapes {args.decode_shapes!r}: write BATCHxCONTEXT,...")
    rng = np.random.default_rng(0)
    # Decode and GEMM first: they carry the targets. Each chosen section gets its share of the
    # budget (decode 35, gemm 35, prefill 20, mixed 10: no budget, a fixed set of cases), as a
    # deadline since the start.
    share = {"decode": 35, "gemm": 35, "prefill": 20, "mixed": 10}
    chosen = [sec for sec in share if sec in only]
    total = sum(share[sec] for sec in chosen)
    deadline, cum = {}, 0
    for sec in chosen:
        cum += share[sec]
        deadline[sec] = args.budget * cum / total
    if "decode" in only:
        bench_decode(rng, deadline["decode"])
    if "lm_head" in only:
        bench_lm_head()
    if "gemm" in only:
        bench_gemm(deadline["gemm"])
    if "prefill" in only:
        bench_prefill(rng, deadline["prefill"])
    if "mixed" in only:
        try:
            bench_mixed(rng)
        except Exception as e:  # noqa: BLE001
            print(f"  mixed: {short(e)}")
    if "backends" in only:
        bench_backends(rng)
    if "gemm_options" in only:
        bench_gemm_options(args.budget)
    if "block_gemm" in only:
        bench_block_gemm(args.budget)
    summarize()


if __name__ == "__main__":
    main()
