"""Offline throughput: N prompts from a length distribution, jaxllm vs HF transformers.

Random weights in a real shape (default Llama-3-8B), greedy, ``ignore_eos`` (every request
generates exactly its output length), one process per engine:

    python benchmarks/throughput.py --engine jaxllm --workload fixed    --out tp.jsonl
    python benchmarks/throughput.py --engine jaxllm --workload sharegpt --out tp.jsonl
    python benchmarks/throughput.py --engine hf     --workload fixed    --out tp.jsonl
    python benchmarks/throughput.py --plot tp.jsonl --png throughput.png

Workloads (``--num-prompts``, default 1000, all submitted at once as vLLM's
``benchmark_throughput`` does):
  fixed     every prompt 512 random tokens in, 128 out
  sharegpt  a synthetic ShareGPT-like mix (no dataset download): input and output lengths drawn
            from log-normal distributions fitted by eye to the ShareGPT V3 set vLLM's benchmarks
            use after their filter (prompt < 1024, prompt + output < 2048): input median 128,
            sigma 1.1, clipped to [4, 1024] (mean ~200); output median 128, sigma 0.9 (mean
            ~190), clipped to [4, 1024]; seed 0. Long-tailed, so batches mix short and long
            requests, which is what continuous batching is for.
Reported: output tok/s, total (prompt + output) tok/s, requests/s, median of ``--repeats``.

The HF side runs ``generate`` in fixed batches of ``--hf-batch`` (left padded, in submission
order) until every request in the batch has its output length; only the requested tokens count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import (SHAPES, engine_generate, fp8_weight_block_arg,  # noqa: E402
                                hf_random_model, log_engine_startup, random_model)


def workload(name: str, n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if name == "fixed":
        ins = np.full(n, 512)
        outs = np.full(n, 128)
    elif name == "sharegpt":
        ins = np.clip(np.round(rng.lognormal(np.log(128), 1.1, n)), 4, 1024).astype(int)
        outs = np.clip(np.round(rng.lognormal(np.log(128), 0.9, n)), 4, 1024).astype(int)
    else:
        raise ValueError(f"unknown workload {name!r}")
    return [(rng.integers(0, vocab, int(i)).tolist(), int(o)) for i, o in zip(ins, outs)]


def _row(args, engine: str, device: str, reqs, secs: float, **extra) -> dict:
    n_in = sum(len(p) for p, _ in reqs)
    n_out = sum(o for _, o in reqs)
    return dict(engine=engine, shape=args.shape, device=device, workload=args.workload,
                num_prompts=len(reqs), prompt_tokens=n_in, output_tokens=n_out, seconds=secs,
                output_tok_s=n_out / secs, total_tok_s=(n_in + n_out) / secs,
                requests_s=len(reqs) / secs, repeats=args.repeats, **extra)


def run_jaxllm(args) -> dict:
    import jax

    from jaxllm.config import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine

    loaded = random_model(args.shape, args.attention, quantization=args.quantization,
                          fp8_weight_block=args.fp8_weight_block)
    reqs = workload(args.workload, args.num_prompts, loaded.model_config.vocab_size)
    cfg = EngineConfig(model=None, dtype="bfloat16",
                       max_model_len=max(len(p) + o for p, o in reqs) + 8,
                       max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       enable_prefix_caching=False, gpu_memory_utilization=0.9,
                       async_scheduling=not args.sync, quantization=args.quantization,
                       kv_cache_dtype=args.kv_cache_dtype, enforce_eager=args.enforce_eager,
                       num_scheduler_steps=args.num_scheduler_steps)
    t0 = time.perf_counter()
    engine = LLMEngine(cfg, loaded=loaded)
    startup_s = time.perf_counter() - t0
    compiles = engine.runner.num_compiles

    phases: list[dict] = []

    def generate(batch) -> float:
        phases.append({})
        secs, n_out = engine_generate(engine, [p for p, _ in batch], [o for _, o in batch],
                                      phases=phases[-1])
        assert n_out == sum(o for _, o in batch), (n_out, sum(o for _, o in batch))
        return secs

    generate(reqs[:16])  # warm-up
    runs = [generate(reqs) for _ in range(args.repeats)]
    secs = statistics.median_low(runs)
    # The step kinds' split of the median run: where the time goes (prompt chunks or decodes).
    split = {k: round(v, 3) for k, v in phases[1 + runs.index(secs)].items()}
    recompiles = engine.runner.num_compiles - compiles
    return _row(args, "jaxllm" + (" (sync steps)" if args.sync else "")
                + (f" {args.quantization}" if args.quantization else "")
                + (" block %dx%d" % args.fp8_weight_block if args.fp8_weight_block else "")
                + (" fp8-kv" if args.kv_cache_dtype == "fp8" else "")
                + (" (enforce_eager)" if args.enforce_eager else "")
                + (f" ({args.num_scheduler_steps} steps a launch)"
                   if args.num_scheduler_steps > 1 else ""),
                jax.devices()[0].device_kind, reqs, secs, startup_s=startup_s,
                num_pages=engine.page_pool.num_usable_pages, recompiles_while_serving=recompiles,
                max_num_seqs=engine.max_num_seqs,
                max_num_batched_tokens=engine.max_num_batched_tokens, step_split=split)


def run_hf(args) -> dict:
    import torch
    import transformers

    model = hf_random_model(args.shape)
    reqs = workload(args.workload, args.num_prompts, model.config.vocab_size)
    cache = None if args.hf_cache == "dynamic" else args.hf_cache

    def generate(batch_reqs) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(0, len(batch_reqs), args.hf_batch):
            chunk = batch_reqs[i:i + args.hf_batch]
            width = max(len(p) for p, _ in chunk)
            ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in chunk], device="cuda")
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk],
                                device="cuda")
            new = max(o for _, o in chunk)
            with torch.no_grad():
                model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, pad_token_id=0, cache_implementation=cache)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    generate(reqs[:2])
    secs = statistics.median(generate(reqs) for _ in range(args.repeats))
    return _row(args, f"hf-transformers {transformers.__version__} ({args.hf_cache} cache, "
                f"batch {args.hf_batch})", torch.cuda.get_device_name(), reqs, secs,
                hf_batch=args.hf_batch)


def plot(paths: list[Path], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for p in paths for line in p.read_text().splitlines() if line]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(engines)
    for j, eng in enumerate(engines):
        vals = [next((r["output_tok_s"] for r in rows if r["engine"] == eng
                      and r["workload"] == w), 0) for w in workloads]
        ax.bar([i + j * width for i in range(len(workloads))], vals, width, label=eng)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(workloads))], workloads)
    ax.set(ylabel="output tokens / s", title=f"offline throughput, {rows[0]['shape']} on "
           f"{rows[0]['device']}")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--engine", choices=["jaxllm", "hf"])
    p.add_argument("--workload", choices=["fixed", "sharegpt"], default="fixed")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="default: the engine's (vLLM's for the device: 1024 on an H100/H200)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="default: the engine's (vLLM's LLM-class budget: 16384 on an H100/H200)")
    p.add_argument("--attention", default="pallas", choices=["reference", "pallas"])
    p.add_argument("--sync", action="store_true", help="jaxllm without async scheduling")
    p.add_argument("--quantization", default=None, choices=["fp8"],
                   help="jaxllm with fp8 projections, quantized at load")
    p.add_argument("--fp8-weight-block", type=fp8_weight_block_arg, default=None,
                   metavar="BN,BK", help="with --quantization fp8: block-wise weight scales "
                   "(e.g. 128,128: a Qwen3-FP8-style checkpoint) instead of per channel")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--enforce-eager", action="store_true",
                   help="jaxllm without XLA command buffers (EngineConfig.enforce_eager)")
    p.add_argument("--num-scheduler-steps", type=int, default=1,
                   help="EngineConfig.num_scheduler_steps (multi-step decode launches)")
    p.add_argument("--hf-batch", type=int, default=64)
    p.add_argument("--hf-cache", default="dynamic", choices=["static", "dynamic"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot", type=Path, nargs="+", default=None)
    p.add_argument("--png", type=Path, default=Path("throughput.png"))
    args = p.parse_args(argv)
    log_engine_startup()
    if args.plot:
        plot(args.plot, args.png)
        return 0
    if args.engine is None:
        p.error("--engine is required unless --plot is given")
    row = run_jaxllm(args) if args.engine == "jaxllm" else run_hf(args)
    print(json.dumps(row), flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
