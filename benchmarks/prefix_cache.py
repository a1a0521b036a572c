"""Prefix caching on vs off: TTFT and throughput with a shared system prompt, random weights.

The prefix-cache issue's workload: 64 requests sharing a 2,000-token system prompt, each with a
distinct 100-token question, plus a control workload with no shared prefix (caching must not
slow it down). One process per setting (each engine takes the GPU):

    python benchmarks/prefix_cache.py --caching on  --out results.jsonl
    python benchmarks/prefix_cache.py --caching off --out results.jsonl

Figures per setting:
- ttft_single_ms: one request alone (after one earlier request warmed the shared prefix), the
  time from submission to its first token; median over --repeats questions.
- ttft_batch_ms: mean TTFT of the 64 requests submitted together; batch_s: time until all finish.
- control_s: 64 requests of 2,100 distinct random tokens (no shared prefix).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import SHAPES, random_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--caching", choices=["on", "off"], required=True)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--system-len", type=int, default=2000)
    p.add_argument("--question-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--attention", default="reference", choices=["reference", "pallas"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from jaxllm.config import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine
    from jaxllm.sampling_params import RequestOutputKind, SamplingParams

    loaded = random_model(args.shape, args.attention)
    mc = loaded.model_config
    max_len = args.system_len + args.question_len + args.output_len + 16
    T = args.max_num_batched_tokens
    cfg = EngineConfig(dtype="bfloat16", max_model_len=max_len, max_num_seqs=args.num_requests,
                       max_num_batched_tokens=T,
                       # The default powers-of-two buckets: a 100-token prefill after a hit
                       # must not run in a 2048-token bucket.
                       enable_prefix_caching=args.caching == "on")
    engine = LLMEngine(cfg, loaded=loaded)
    rng = np.random.default_rng(0)
    system = rng.integers(0, mc.vocab_size, args.system_len).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True,
                            detokenize=False, output_kind=RequestOutputKind.CUMULATIVE)
    counter = iter(range(10**9))

    def run(prompts):
        """Submits all prompts at once; returns (per-request TTFT seconds, total seconds)."""
        t0 = time.perf_counter()
        first: dict[str, float] = {}
        ids = []
        for pr in prompts:
            rid = f"r{next(counter)}"
            engine.add_request(rid, {"prompt_token_ids": pr}, params)
            ids.append(rid)
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.request_id not in first and o.outputs[0].token_ids:
                    first[o.request_id] = time.perf_counter() - t0
        return [first[r] for r in ids], time.perf_counter() - t0

    def question():
        return rng.integers(0, mc.vocab_size, args.question_len).tolist()

    run([system + question()])  # warm-up; with caching on, this also caches the system prompt
    single = [run([system + question()])[0][0] for _ in range(args.repeats)]
    ttfts, batch_s = run([system + question() for _ in range(args.num_requests)])
    control = [rng.integers(0, mc.vocab_size, args.system_len + args.question_len).tolist()
               for _ in range(args.num_requests)]
    _, control_s = run(control)
    res = dict(caching=args.caching, shape=args.shape, device=jax.devices()[0].device_kind,
               attention=args.attention, ttft_single_ms=statistics.median(single) * 1e3,
               ttft_batch_ms=statistics.mean(ttfts) * 1e3, batch_s=batch_s,
               batch_tok_s=args.num_requests * (args.system_len + args.question_len
                                                + args.output_len) / batch_s,
               control_s=control_s, hits=engine.stats["prefix_cache_hits"],
               queries=engine.stats["prefix_cache_queries"])
    line = json.dumps(res)
    print(line, flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
