"""FP8 benchmarks: the matmul paths at Llama-3-8B shapes, and the engine bf16 vs fp8 vs fp8+fp8-KV.

    python benchmarks/fp8.py matmul --out fp8.jsonl     # kernels: ~2 min on an H100/H200
    python benchmarks/fp8.py engine --out fp8.jsonl     # one process per mode: ~3 x 2-3 min

matmul: out[M, N] = x[M, K] @ w at the 8B projections (K x N = 4096x4096 (q, o), 4096x1024
  (k, v), 4096x14336 (gate, up), 14336x4096 (down)), for M in 1..4096. Paths:
    bf16            x bf16 @ w bf16 [K, N] (the dense engine)
    xla_fp8_kn      per-token quantize x, fp8 dot_general with w e4m3 [K, N]
    xla_fp8_nk      the same with w e4m3 [N, K] (what the engine stores: cuBLASLt's fp8 GEMM is
                    "TN" only, so [K, N] costs a transpose per call)
    w8a16           x bf16 @ upcast(w e4m3 [N, K]) * scale (weight-only; XLA may fuse the convert)
    pallas          pallas_kernels.fp8_matmul (w [N, K]), a few block configs, checked first
  Each timed call applies x to 4 weight copies in turn (past the L2), median of 20 calls.
engine: random Llama-3-8B weights (benchmarks/offline_throughput.random_model), per mode:
  weight bytes on the device, KV pages at gpu_memory_utilization 0.9, batch-1 decode ms/token at
  512 context (and its roofline: bytes read per step / measured read bandwidth), offline
  throughput (256 prompts x 512 tokens, 128 out, greedy, ignore_eos).
Prints a table and writes JSON lines (--out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES_KN = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
MS = [1, 16, 64, 256, 1024, 4096]
PALLAS_CONFIGS = [  # (block_m, block_n, block_k, split_k, num_warps)
    (16, 64, 128, 1, 4), (16, 128, 128, 4, 4), (64, 128, 128, 1, 4), (128, 128, 128, 1, 8)]
# Distinct weights per timed call (one jit): the call's dispatch and sync (~20-30 us) are
# spread over them. 4 (the 2026-11-30 H200 table) left M <= 16 rows dominated by that overhead
# (bf16 4096x1024 at M=1 "slower" than 4096x4096); 16 puts it near 2 us per GEMM.
COPIES = 16


def _time(fn, *args, repeats: int = 20) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def run_matmul(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.fp8_matmul import (fp8_matmul, fp8_matmul_reference, fp8_matmul_xla,
                                           quantize_activation_per_token,
                                           quantize_weight_per_channel)

    dev = jax.devices()[0].device_kind
    rows = []
    shapes = [tuple(int(v) for v in kn.split("x")) for kn in args.shapes.split(",")] \
        if args.shapes else SHAPES_KN
    for K, N in shapes:
        key = jax.random.PRNGKey(K + N)
        w16 = [jax.random.normal(jax.random.fold_in(key, i), (K, N), jnp.bfloat16) * 0.02
               for i in range(COPIES)]
        q = [quantize_weight_per_channel(w) for w in w16]
        w_kn = [a for a, _ in q]
        w_nk = [jnp.asarray(a.T) for a, _ in q]
        ws = [s for _, s in q]
        for M in MS:
            if M > args.max_m:
                continue
            x = jax.random.normal(jax.random.PRNGKey(M), (M, K), jnp.bfloat16)

            def many(one):
                return jax.jit(lambda x, ws_, ss: [one(x, w, s) for w, s in zip(ws_, ss)])

            def fp8(w_transposed):
                def one(x, w, s):
                    xq, xs = quantize_activation_per_token(x)
                    return fp8_matmul_xla(xq, xs, w, s, jnp.bfloat16, w_transposed=w_transposed)
                return one

            def w8a16(x, w, s):
                return (jnp.dot(x, w.astype(jnp.bfloat16).T, preferred_element_type=jnp.float32)
                        * s[None, :]).astype(jnp.bfloat16)

            paths = {
                "bf16": (many(lambda x, w, s: jnp.dot(x, w)), w16),
                "xla_fp8_kn": (many(fp8(False)), w_kn),
                "xla_fp8_nk": (many(fp8(True)), w_nk),
                "w8a16": (many(w8a16), w_nk),
            }
            xq, xs = quantize_activation_per_token(x)
            ref = np.asarray(fp8_matmul_reference(xq, xs, w_kn[0], ws[0], jnp.float32))
            for bm, bn, bk, sk, nw in PALLAS_CONFIGS:
                if bm > max(16, 2 * M) and bm != 16:
                    continue
                name = f"pallas_{bm}x{bn}x{bk}_s{sk}_w{nw}"

                def pallas(x, w, s, bm=bm, bn=bn, bk=bk, sk=sk, nw=nw):
                    xq, xs = quantize_activation_per_token(x)
                    return fp8_matmul(xq, xs, w, s, jnp.bfloat16, block_m=bm, block_n=bn,
                                      block_k=bk, split_k=sk, num_warps=nw, w_transposed=True)
                try:
                    got = np.asarray(jax.jit(pallas)(x, w_nk[0], ws[0]), np.float32)
                    err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                except Exception as e:  # noqa: BLE001  (report the compile error, go on)
                    rows.append(dict(bench="fp8_matmul", path=name, M=M, K=K, N=N, device=dev,
                                     error=str(e).splitlines()[0][:300]))
                    print(f"{name} M={M} K={K} N={N}: FAILED {rows[-1]['error']}", flush=True)
                    continue
                paths[name] = (many(pallas), w_nk)
                if err > 2e-2:
                    print(f"{name} M={M} K={K} N={N}: rel err {err:.3g} vs reference", flush=True)
            for name, (fn, wl) in paths.items():
                s = _time(fn, x, wl, ws) / COPIES
                w_bytes = wl[0].size * wl[0].dtype.itemsize
                rows.append(dict(bench="fp8_matmul", path=name, M=M, K=K, N=N, device=dev,
                                 us=s * 1e6, tflops=2 * M * K * N / s / 1e12,
                                 weight_gbs=w_bytes / s / 1e9))
                print(json.dumps(rows[-1]), flush=True)  # as it goes: a killed run keeps them
    _table(rows, ["K", "N", "M"], "path", "us")
    return rows


def _table(rows, keys, col, val):
    cols = sorted({r[col] for r in rows if val in r}, key=lambda c: (not c.startswith("bf16"), c))
    groups: dict = {}
    for r in rows:
        if val in r:
            groups.setdefault(tuple(r[k] for k in keys), {})[r[col]] = r[val]
    print("| " + " | ".join(keys + cols) + " |")
    print("|" + "---:|" * (len(keys) + len(cols)))
    for g, vals in groups.items():
        print("| " + " | ".join([str(x) for x in g] + [
            f"{vals[c]:.1f}" if c in vals else "-" for c in cols]) + " |")


MODES = {"bf16": (None, "auto"), "fp8": ("fp8", "auto"), "fp8+fp8kv": ("fp8", "fp8")}


def run_engine_mode(args) -> dict:
    import jax
    from flax import nnx

    from jaxllm.config import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine
    from latency import measure_bandwidth_gbs
    from offline_throughput import _prompts, engine_generate, random_model

    quant, kv = MODES[args.mode]
    t0 = time.perf_counter()
    loaded = random_model(args.shape, "pallas")
    if quant == "fp8":
        from jaxllm.models.fp8 import quantize_model

        model = quantize_model(loaded.model)
        loaded.model = model  # the bf16 weights are freed before the KV pool is sized
        loaded.model_config = model.config
        del model
    state = nnx.state(loaded.model)
    jax.block_until_ready(state)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    embed_bytes = loaded.model.model.embed_tokens.embedding.nbytes
    init_s = time.perf_counter() - t0
    bw = measure_bandwidth_gbs(**({} if jax.default_backend() == "gpu" else {"nbytes": 1 << 24}))
    max_len = max(args.input_len + args.output_len, args.decode_context + args.decode_tokens + 1)
    cfg = EngineConfig(model=None, dtype="bfloat16", max_model_len=max_len,
                       max_num_seqs=args.num_prompts, max_num_batched_tokens=2048,
                       token_buckets=tuple(sorted({8, args.num_prompts, 2048})),
                       enable_prefix_caching=False, gpu_memory_utilization=0.9,
                       quantization=quant, kv_cache_dtype=kv)
    t0 = time.perf_counter()
    engine = LLMEngine(cfg, loaded=loaded)
    start_s = time.perf_counter() - t0

    def generate(prompts, max_tokens):
        return engine_generate(engine, prompts, max_tokens)

    vocab = loaded.model_config.vocab_size
    one = _prompts(1, args.decode_context, vocab, seed=1)
    generate(one, 4)
    lat = []
    for _ in range(args.repeats):
        t1, _ = generate(one, 1)
        tn, _ = generate(one, 1 + args.decode_tokens)
        lat.append((tn - t1) / args.decode_tokens * 1e3)
    prompts = _prompts(args.num_prompts, args.input_len, vocab)
    generate(prompts[:8], 4)
    secs, n_out = generate(prompts, args.output_len)
    # A decode step reads every weight but the embedding table (one row per token).
    step_bytes = weight_bytes - embed_bytes
    return dict(bench="fp8_engine", mode=args.mode, shape=args.shape,
                device=jax.devices()[0].device_kind, weight_gib=weight_bytes / 2**30,
                num_pages=engine.page_pool.num_usable_pages, page_size=cfg.page_size,
                decode_ms_per_token_b1=statistics.median(lat),
                roofline_ms=step_bytes / (bw * 1e9) * 1e3, read_bandwidth_gbs=bw,
                output_tok_s=n_out / secs,
                total_tok_s=(n_out + args.num_prompts * args.input_len) / secs,
                num_prompts=args.num_prompts, input_len=args.input_len,
                output_len=args.output_len, init_s=init_s, startup_s=start_s)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("matmul")
    m.add_argument("--max-m", type=int, default=4096)
    m.add_argument("--shapes", default=None, help="KxN,KxN,... (default: the 8B projections)")
    e = sub.add_parser("engine")
    e.add_argument("--modes", default="bf16,fp8,fp8+fp8kv")
    e.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # one mode, in this process
    e.add_argument("--shape", default="llama3-8b")
    e.add_argument("--num-prompts", type=int, default=256)
    e.add_argument("--input-len", type=int, default=512)
    e.add_argument("--output-len", type=int, default=128)
    e.add_argument("--decode-context", type=int, default=512)
    e.add_argument("--decode-tokens", type=int, default=64)
    e.add_argument("--repeats", type=int, default=3)
    for q in (m, e):
        q.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)

    if args.cmd == "matmul":
        rows = run_matmul(args)
    elif args.mode is not None:  # worker: print one JSON line
        print("JSON " + json.dumps(run_engine_mode(args)), flush=True)
        return 0
    else:
        rows = []
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "engine", "--mode", mode] + [
                a for a in (argv if argv is not None else sys.argv[1:])
                if a not in ("engine",)]
            cmd = _drop_opt(cmd, "--modes")
            cmd = _drop_opt(cmd, "--out")
            print(f"== {mode}", flush=True)
            res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            lines = [ln[5:] for ln in res.stdout.splitlines() if ln.startswith("JSON ")]
            if res.returncode or not lines:
                print(res.stdout[-3000:])
                rows.append(dict(bench="fp8_engine", mode=mode, error=f"rc {res.returncode}"))
                continue
            rows.append(json.loads(lines[-1]))
            print(json.dumps(rows[-1]), flush=True)
        print("| mode | weights GiB | KV pages | b1 ms/token | roofline ms | out tok/s |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            if "error" not in r:
                print(f"| {r['mode']} | {r['weight_gib']:.2f} | {r['num_pages']} | "
                      f"{r['decode_ms_per_token_b1']:.2f} | {r['roofline_ms']:.2f} | "
                      f"{r['output_tok_s']:.0f} |")
    for r in rows:
        print(json.dumps(r))
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


def _drop_opt(cmd: list[str], name: str) -> list[str]:
    out, skip = [], False
    for a in cmd:
        if skip:
            skip = False
            continue
        if a == name:
            skip = True
            continue
        if a.startswith(name + "="):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
