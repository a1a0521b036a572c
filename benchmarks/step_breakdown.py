"""Where a decode step's time goes: engine step vs jitted step vs forward vs sampler.

Builds the engine on random weights (default Llama-3-8B shape), puts `--batch` sequences into
decode at `--context` tokens, then times (median of --repeats, after warm-up):
  engine_step    LLMEngine.step(): schedule + prepare + jitted step + device_get + outputs
  jitted_step    the jitted step alone on fixed inputs, blocked on its result
  forward        the model forward + logits at the sampled rows (no sampler)
  sampler        the sampler alone on [S, V] logits
  weights_floor  parameter bytes / 3.1 TB/s (the measured H100 read bandwidth)

    python3 benchmarks/step_breakdown.py --batch 1 --context 128
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import SHAPES, append_jsonl, random_model  # noqa: E402


def _median_ms(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--attention", default="pallas", choices=["reference", "pallas"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import jax
    import numpy as np
    from flax import nnx

    from jaxllm.config import EngineConfig
    from jaxllm.engine import sampler as sampler_lib
    from jaxllm.engine.llm_engine import LLMEngine
    from jaxllm.sampling_params import SamplingParams

    loaded = random_model(args.shape, args.attention)
    mc = loaded.model_config
    n_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(loaded.model)))
    max_b = max(args.batch)
    cfg = EngineConfig(dtype="bfloat16", max_model_len=args.context + 4 * args.repeats + 64,
                       max_num_seqs=max_b, max_num_batched_tokens=max(2048, max_b),
                       token_buckets=tuple(sorted({8, *args.batch, max(2048, max_b)})),
                       enable_prefix_caching=False)
    engine = LLMEngine(cfg, loaded=loaded)
    runner = engine.runner
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batch:
        params = SamplingParams(temperature=0.0, max_tokens=4 * args.repeats + 16, ignore_eos=True,
                                detokenize=False)
        for i in range(batch):
            engine.add_request(f"b{batch}-{i}", {"prompt_token_ids": rng.integers(
                0, mc.vocab_size, args.context).tolist()}, params)
        while any(s.num_computed_tokens < s.num_prompt_tokens
                  for s in engine.scheduler.running) or engine.scheduler.num_waiting:
            engine.step()
        engine_ms = _median_ms(lambda: engine.step(), args.repeats)
        sched = engine.scheduler.schedule()
        srows = [engine._sampling_row(s.seq) for s in sched.scheduled]
        inputs = runner.prepare(sched.scheduled, srows)
        inputs = jax.device_put(inputs)

        nl = sampler_lib.logprobs_width(srows, runner.num_logprobs)
        sort = sampler_lib.needs_sort(srows, mc.vocab_size)

        def jitted():
            return runner.run(inputs, nl, sort)

        step_ms = _median_ms(jitted, args.repeats)
        fwd_inputs = dataclasses.replace(inputs, sampling=None)

        def forward():
            runner.kv_caches, logits = runner._forward(runner._leaves, runner.kv_caches, fwd_inputs,
                                                       runner._prev_tokens)
            return logits

        fwd_ms = _median_ms(forward, args.repeats)
        logits = forward()
        samp_ms = _median_ms(lambda: runner._sample(logits, inputs.sampling, nl, sort),
                             args.repeats)
        host_ms = _median_ms(lambda: runner.prepare(sched.scheduled, srows), args.repeats)
        for rid in [f"b{batch}-{i}" for i in range(batch)]:
            engine.abort_request(rid)
        row = dict(shape=args.shape, device=jax.devices()[0].device_kind, batch=batch,
                   context=args.context, attention=args.attention, engine_step_ms=engine_ms,
                   jitted_step_ms=step_ms, forward_ms=fwd_ms, sampler_ms=samp_ms,
                   prepare_ms=host_ms, weights_floor_ms=n_bytes / 3.1e12 * 1e3,
                   T=int(inputs.token_ids.shape[0]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"{'batch':>5} {'T':>5} {'engine':>8} {'jitted':>8} {'forward':>8} {'sampler':>8} "
          f"{'prepare':>8} {'floor':>8}  (ms)")
    for r in rows:
        print(f"{r['batch']:>5} {r['T']:>5} {r['engine_step_ms']:>8.2f} {r['jitted_step_ms']:>8.2f} "
              f"{r['forward_ms']:>8.2f} {r['sampler_ms']:>8.2f} {r['prepare_ms']:>8.2f} "
              f"{r['weights_floor_ms']:>8.2f}")
    append_jsonl(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
