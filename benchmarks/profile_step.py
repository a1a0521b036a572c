"""Profile decode steps: where the GPU time of one jitted step goes, and how idle the GPU is.

Builds the engine on random weights (default Llama-3-8B shape), puts `--batch` sequences into
decode at `--context` tokens, times `--steps` engine steps, then records `--steps` more under
``jax.profiler`` (a Perfetto trace, no TensorBoard needed) and reads the trace back:
  wall_ms        median wall time of an engine step (host included), without the profiler
                 (wall_profiled_ms: under it, slower by its per-launch host callbacks)
  gpu_busy_ms    union of GPU kernel/memcpy intervals per step
  idle_pct       1 - busy / wall (the profiler runs XLA op by op: a bound, not a measurement,
                 of the time the GPU waits for the host)
  host_wait_ms   median time a step's fetch blocked for the GPU: > 0 means the GPU had the
                 next step queued all along (GPU-bound); host_work_ms = wall - wait;
                 host_bound_steps: steps whose fetch found its results ready
  replay_ms      the GPU-bound time of the same step: its last inputs launched --steps times
                 back to back, no host work between (command buffers on, no profiler);
                 replay_idle_pct = 1 - replay / wall, the share of the engine's step the GPU
                 spent waiting for the host (the direct measure; idle_pct is the bound)
  kernels        GPU ops per step
and the top GPU ops by time (grouped by name with digits stripped).

    python3 benchmarks/profile_step.py --batch 1 64 256 --context 1024 --out-dir /tmp/prof

``--prefill-tokens N`` profiles prefill steps instead: each step prefills N / ``--context``
fresh prompts of ``--context`` tokens (N tokens a step, the engine's token budget; one output
token each), e.g. the offline-throughput workload's 16384-token steps of 512-token prompts:

    python3 benchmarks/profile_step.py --prefill-tokens 16384 --context 512 --quantization fp8 \
        --out-dir /tmp/prof

A/B of two step-level choices (docs/DESIGN_NOTES.md, "Decode-only steps, packed step inputs"):
``--no-decode-only`` runs pure decode steps on the general forward (both attention launches),
``--no-pack`` passes the step inputs as numpy arrays (one host->device copy each).

``--num-scheduler-steps K`` profiles multi-step decode (EngineConfig.num_scheduler_steps): each
engine step is one launch of K forward + sample steps, and every figure is divided by K, so the
table reads per token (per forward) as with K = 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_trace import gpu_events, host_top, layer_sites, summarize  # noqa: E402
from offline_throughput import (SHAPES, append_jsonl, fp8_weight_block_arg,  # noqa: E402
                                log_engine_startup, parse_buckets, random_model)


# A fetch that returns within this found its step already done: the GPU may have waited for the
# host in that step (see timed_steps).
HOST_BOUND_WAIT_S = 50e-6


def _newest_trace(log_dir: Path) -> Path:
    """This run's trace: the newest under ``log_dir`` (an --out-dir reused by an earlier run
    keeps that run's traces beside it)."""
    return max(log_dir.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)


def timed_steps(engine, steps: int) -> tuple[list[float], list[float]]:
    """(wall, wait) seconds of ``steps`` engine steps, without the profiler. ``wait``: how long
    the step's fetch of the previous step's results blocked for the GPU.

    With async scheduling the host dispatches step N+1 before it blocks on step N's results, so
    while it waits the GPU has N+1 queued: a step whose fetch waited cannot have left the GPU
    idle for the host. Only steps whose fetch found the results ready (host-bound steps) can.
    This tells host-bound from GPU-bound without the profiler, which runs XLA op by op (it turns
    command buffers off), so its GPU busy time is not the command-buffer step's (idle_pct
    compares the two)."""
    import jax

    runner = engine.runner
    fetch = runner.fetch
    own = "fetch" in vars(runner)  # an instance attribute already (else the class's method)
    waits: list[float] = []

    def timed_fetch(tree):
        t = time.perf_counter()
        jax.block_until_ready(tree)
        waits.append(time.perf_counter() - t)
        return fetch(tree)

    walls = []
    runner.fetch = timed_fetch
    try:
        for _ in range(steps):
            n = len(waits)
            t = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - t)
            del waits[n + 1:]  # one fetch per decode step; keep the first if there were more
            if len(waits) == n:
                waits.append(0.0)
    finally:
        if own:
            runner.fetch = fetch
        else:
            del runner.fetch
    return walls, waits


def replay_step(engine, steps: int) -> float:
    """The GPU-bound step time (seconds): records the inputs of one engine step, then
    launches that step ``steps`` times back to back and blocks once. Each launch is the
    engine's own device work (the packed-input transfer, the forward or multi-step program,
    the sampler) with no scheduling, preparation or fetch between, so the GPU never waits for
    the host. The replays rewrite the last step's KV slots and sampled tokens (the engine's
    state after this is fit only for aborting its requests)."""
    import jax

    runner = engine.runner
    calls = []
    names = ("run", "run_multi")
    originals = {n: getattr(runner, n) for n in names}
    own = {n for n in names if n in vars(runner)}  # instance attributes already: put back

    def recorder(name):
        def call(*a):
            calls.append((name, a))
            return originals[name](*a)
        return call

    for n in names:
        setattr(runner, n, recorder(n))
    try:
        engine.step()
    finally:
        for n in names:
            if n in own:
                setattr(runner, n, originals[n])
            else:
                delattr(runner, n)
    if not calls:
        raise RuntimeError("the step launched nothing to replay")
    name, a = calls[-1]
    launch = getattr(runner, name)
    jax.block_until_ready(launch(*a))  # warm
    t = time.perf_counter()
    for _ in range(steps):
        out = launch(*a)
    jax.block_until_ready((out, runner.kv_caches))
    return (time.perf_counter() - t) / steps


def _check_all_decoding(engine, batch: int, when: str) -> None:
    """Raises unless ``batch`` sequences are running, every prompt computed (a profile of fewer
    sequences than its label says would be wrong, not slow)."""
    running = engine.scheduler.running
    decoding = sum(s.num_computed_tokens >= s.num_prompt_tokens for s in running)
    if decoding != batch or engine.scheduler.num_waiting:
        raise RuntimeError(f"batch {batch}: {decoding} sequences decoding, "
                           f"{engine.scheduler.num_waiting} waiting {when}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--attention", default="pallas", choices=["reference", "pallas"])
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-decode-only", action="store_true",
                   help="pure decode steps run the general forward (A/B of the decode-only one)")
    p.add_argument("--no-pack", action="store_true",
                   help="numpy step inputs, one transfer per array (A/B of the packed buffer)")
    p.add_argument("--quantization", default=None, choices=["fp8"],
                   help="fp8: W8A8 projections, quantized at load (where fp8 decode time goes)")
    p.add_argument("--fp8-weight-block", type=fp8_weight_block_arg, default=None,
                   help="with --quantization fp8: block-wise weight scales 'BN,BK' (the "
                        "Qwen3-FP8 / DeepSeek checkpoint format), e.g. 128,128")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--no-fuse", action="store_true",
                   help="separate q/k/v and gate/up GEMMs (the layout before fused projections)")
    p.add_argument("--keep-trace", type=Path, default=None,
                   help="copy each batch's Perfetto trace to KEEP_TRACE_b<batch>.json.gz")
    p.add_argument("--layer-sites", action="store_true",
                   help="also print a decoder layer's ops in order, from its attention call "
                        "(gpu_trace.layer_sites: tells apart GEMMs of one kernel name)")
    p.add_argument("--host-top", type=int, default=0,
                   help="also print the N longest host-side trace events per step")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="the engine's max_num_seqs (default: the largest --batch); latency.py's "
                        "engine has 8, so --batch 1 --max-num-seqs 8 profiles its step")
    p.add_argument("--small-decode-buckets", type=parse_buckets, default=(),
                   help="EngineConfig.small_decode_buckets: comma-separated sequence counts, "
                        "or 'none' (the default)")
    p.add_argument("--prefill-tokens", type=int, default=None,
                   help="profile prefill steps of this many tokens (prompts of --context)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="step programs without XLA command buffers (EngineConfig.enforce_eager)")
    p.add_argument("--num-scheduler-steps", type=int, default=1,
                   help="EngineConfig.num_scheduler_steps (figures are per token: divided by it)")
    args = p.parse_args(argv)
    log_engine_startup()

    import jax
    import numpy as np

    from jaxllm.config import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine
    from jaxllm.models.fp8 import weight_only_max_tokens
    from jaxllm.sampling_params import SamplingParams

    if args.prefill_tokens is not None:
        return profile_prefill(args)
    loaded = random_model(args.shape, args.attention, fused=not args.no_fuse,
                          quantization=args.quantization, fp8_weight_block=args.fp8_weight_block)
    mc = loaded.model_config
    max_b = max(args.batch)
    if args.max_num_seqs is not None and args.max_num_seqs < max_b:
        p.error(f"--max-num-seqs {args.max_num_seqs} < the largest --batch {max_b}")
    max_seqs = args.max_num_seqs or max_b
    k = args.num_scheduler_steps
    budget = max(2048, max_seqs)
    # Every sequence must still be decoding in the last profiled step. The first prompts decode
    # while the rest prefill (the step's token budget, less the decoding rows, over --context
    # tokens each: ~140 steps for 256 x 1k), then the warm-up, timed and profiled steps, each
    # up to k tokens, with room to spare (the lookahead needs k positions left, else the engine
    # falls back to single steps). Before 2026-12-02 max_tokens was 8 * steps + 16, which the
    # prefill phase alone outlasts at 256 x 1k: those batch-256 profiles held fewer sequences.
    prefill_steps = -(-max_b * args.context // max(1, budget - max_b)) + 8
    new_tokens = k * (2 * args.steps + 8) + prefill_steps + 16
    cfg = EngineConfig(dtype="bfloat16", max_model_len=args.context + new_tokens + 64,
                       max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                       enable_prefix_caching=False, quantization=args.quantization,
                       kv_cache_dtype=args.kv_cache_dtype, fuse_projections=not args.no_fuse,
                       enforce_eager=args.enforce_eager,
                       small_decode_buckets=args.small_decode_buckets,
                       num_scheduler_steps=k)
    engine = LLMEngine(cfg, loaded=loaded)
    engine.runner.decode_only_steps = not args.no_decode_only
    engine.runner.pack_inputs = engine.runner.pack_inputs and not args.no_pack
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batch:
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True,
                                detokenize=False)
        ids = [f"b{batch}-{i}" for i in range(batch)]
        for rid in ids:
            engine.add_request(rid, {"prompt_token_ids": rng.integers(
                0, mc.vocab_size, args.context).tolist()}, params)
        while any(s.num_computed_tokens < s.num_prompt_tokens
                  for s in engine.scheduler.running) or engine.scheduler.num_waiting:
            engine.step()
        for _ in range(3):
            engine.step()
        _check_all_decoding(engine, batch, "before the timed steps")
        # The step's wall time is taken without the profiler: its per-launch callbacks slow the
        # host, by more the more kernels a step launches (an fp8 step's ~860 launches at batch
        # 1 read ~2x slower under it). The GPU time is read from the trace of the next steps.
        walls, waits = timed_steps(engine, args.steps)
        wall = statistics.median(walls) * 1e3 / k
        wait = statistics.median(waits) * 1e3 / k
        host_bound = sum(w < HOST_BOUND_WAIT_S for w in waits)
        wall_mean, wall_max = statistics.mean(walls) * 1e3 / k, max(walls) * 1e3 / k
        log_dir = args.out_dir / f"b{batch}"
        log_dir.mkdir(parents=True, exist_ok=True)
        windows = []
        with jax.profiler.trace(str(log_dir), create_perfetto_trace=True):
            for _ in range(args.steps):
                t = time.perf_counter()
                engine.step()
                windows.append((t, time.perf_counter()))
        _check_all_decoding(engine, batch, "after the profiled steps")
        replay = replay_step(engine, args.steps) * 1e3 / k
        wall_profiled = statistics.median(e - s for s, e in windows) * 1e3 / k
        trace = _newest_trace(log_dir)
        summ = summarize(trace, args.steps * k, args.top)
        if args.keep_trace is not None:
            import shutil

            shutil.copy(trace, f"{args.keep_trace}_b{batch}.json.gz")
        if args.host_top:
            summ["host_top"] = host_top(trace, args.steps * k, args.host_top)
        if args.layer_sites:
            summ["layer_sites"] = layer_sites(gpu_events(trace)[0])
        for rid in ids:
            engine.abort_request(rid)
        row = dict(shape=args.shape, device=jax.devices()[0].device_kind, batch=batch,
                   max_num_seqs=max_seqs,
                   small_decode_buckets=list(engine.runner.small_decode_buckets),
                   context=args.context, decode_only=engine.runner.decode_only_steps,
                   enforce_eager=args.enforce_eager,
                   packed_inputs=engine.runner.pack_inputs, fused=not args.no_fuse,
                   fp8_weight_only_max_tokens=weight_only_max_tokens(),
                   quantization=args.quantization, fp8_weight_block=args.fp8_weight_block,
                   kv_cache_dtype=args.kv_cache_dtype, wall_ms=wall, wall_mean_ms=wall_mean,
                   wall_max_ms=wall_max,
                   wall_profiled_ms=wall_profiled, **summ,
                   idle_pct=100 * max(0.0, 1 - summ["gpu_busy_ms"] / wall),
                   host_wait_ms=wait, host_work_ms=wall - wait, host_bound_steps=host_bound,
                   replay_ms=replay, replay_idle_pct=100 * max(0.0, 1 - replay / wall),
                   steps=args.steps, num_scheduler_steps=k,
                   attention_knobs=os.environ.get("JAXLLM_ATTENTION_KNOBS", ""),
                   xla_flags=os.environ.get("XLA_FLAGS", ""))
        rows.append(row)
        print(f"batch {batch}: wall {wall:.2f} ms (mean {wall_mean:.2f}, max {wall_max:.1f}; "
              f"{wall_profiled:.2f} profiled), GPU busy "
              f"{summ['gpu_busy_ms']:.2f} ms (idle {row['idle_pct']:.1f}%), "
              f"{summ['kernels_per_step']:.0f} GPU ops/step; host waits {wait:.2f} ms a step for "
              f"the GPU ({host_bound}/{args.steps} steps host-bound); the step replayed "
              f"back to back {replay:.2f} ms (GPU idle {row['replay_idle_pct']:.1f}% of the "
              f"engine's step)")
        for name, ms in summ["top"]:
            print(f"    {ms:8.3f} ms {summ['top_calls'][name]:6.1f}x  {name[:110]}")
        for name, ms, n in summ.get("host_top", []):
            print(f"    host {ms:8.3f} ms {n:7.1f}x  {name[:100]}")
        for j, name, us, n in summ.get("layer_sites", []):
            print(f"    layer op {j:2d} {us:8.2f} us ({n} layers)  {name[:100]}")
    append_jsonl(args.out, rows)
    return 0


def profile_prefill(args) -> int:
    """--prefill-tokens: GPU time of prefill steps, by op group (see the module docstring)."""
    import jax
    import numpy as np

    from jaxllm.config import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine
    from jaxllm.sampling_params import SamplingParams

    n_tok, ctx = args.prefill_tokens, args.context
    if n_tok % ctx:
        raise SystemExit(f"--prefill-tokens {n_tok} must be a multiple of --context {ctx}")
    per_step = n_tok // ctx
    loaded = random_model(args.shape, args.attention, fused=not args.no_fuse,
                          quantization=args.quantization, fp8_weight_block=args.fp8_weight_block)
    mc = loaded.model_config
    cfg = EngineConfig(dtype="bfloat16", max_model_len=ctx + 8, max_num_seqs=max(per_step, 8),
                       max_num_batched_tokens=n_tok, enable_prefix_caching=False,
                       quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                       fuse_projections=not args.no_fuse, enforce_eager=args.enforce_eager)
    engine = LLMEngine(cfg, loaded=loaded)
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)

    def prefill_step():
        for i in range(per_step):
            engine.add_request(f"p{time.perf_counter_ns()}-{i}", {"prompt_token_ids": rng.integers(
                0, mc.vocab_size, ctx).tolist()}, params)
        engine.step()  # dispatches this step (async scheduling): the host does not wait

    for _ in range(3):
        prefill_step()
    while engine.has_unfinished_requests():  # nothing in flight when the trace starts: the
        engine.step()  # trace then holds exactly --steps forwards (the 2026-12-01 run had 4 in 3)
    log_dir = args.out_dir / f"prefill{n_tok}"
    log_dir.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(log_dir), create_perfetto_trace=True):
        for _ in range(args.steps):
            prefill_step()
        while engine.has_unfinished_requests():
            engine.step()
    trace = _newest_trace(log_dir)
    summ = summarize(trace, args.steps, args.top)
    row = dict(shape=args.shape, device=jax.devices()[0].device_kind, prefill_tokens=n_tok,
               context=ctx, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
               **summ, steps=args.steps)
    print(f"prefill {n_tok} tokens ({per_step} x {ctx}): GPU busy {summ['gpu_busy_ms']:.2f} ms "
          f"a step, {summ['kernels_per_step']:.0f} GPU ops/step")
    for name, ms in summ["top"]:
        print(f"    {ms:8.3f} ms {summ['top_calls'][name]:6.1f}x  {name[:110]}")
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
