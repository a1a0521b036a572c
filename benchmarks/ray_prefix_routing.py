"""Prefix-cache hit rate of prefix-affinity routing vs round-robin over engine replicas.

The workload of the issue: requests made of one of K shared system prompts plus a unique user
part, arriving a few per step. R engine replicas (real LLMEngines sharing one loaded model, each
with its own page pool, small enough that a replica cannot keep every system prompt cached) step
in lockstep; each arrival is routed by the policy under test, with the replicas' unfinished
request counts as the queue lengths. Affinity is server/prefix_routing.choose_order, the code the
Ray Serve router (server/ray_serve.py) runs; round-robin ignores the prompt. Per policy: the
prefix-cache hit rate (hit tokens / prompt tokens, vLLM's counters), prompt tokens computed,
steps to drain, and requests per replica.

No Ray needed (the routing decision is the same function; Ray only carries the request).

    python3 benchmarks/ray_prefix_routing.py --out /tmp/prefix_routing.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server.prefix_routing import RoundRobin, choose_order, prefix_key  # noqa: E402


class Affinity:
    def __init__(self, threshold: float):
        self.threshold = threshold

    def choose_order(self, key, replica_ids, queue_lens):
        return choose_order(key, replica_ids, queue_lens, self.threshold)


def workload(rng: np.random.Generator, vocab: int, num_system: int, system_len: int,
             user_len: int, num_requests: int) -> list[list[int]]:
    systems = [rng.integers(100, vocab, system_len).tolist() for _ in range(num_system)]
    return [systems[rng.integers(num_system)] + rng.integers(100, vocab, user_len).tolist()
            for _ in range(num_requests)]


def run_policy(name: str, policy, engines: list, prompts: list[list[int]], arrivals: int,
               max_tokens: int, page_size: int, routing_pages: int) -> dict:
    from jaxllm import SamplingParams

    ids = [f"replica-{i}" for i in range(len(engines))]
    for eng in engines:
        assert eng.reset_prefix_cache(), "engines must be idle between policies"
    before = [dict(eng.stats) for eng in engines]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    sent = [0] * len(engines)
    pending, steps, t0 = list(enumerate(prompts)), 0, time.perf_counter()
    while pending or any(e.has_unfinished_requests() for e in engines):
        for i, p in pending[:arrivals]:
            lens = {rid: e.num_unfinished_requests for rid, e in zip(ids, engines)}
            r = ids.index(policy.choose_order(prefix_key(p, page_size, routing_pages), ids,
                                              lens)[0])
            engines[r].add_request(f"{name}-{i}", p, params)
            sent[r] += 1
        pending = pending[arrivals:]
        for e in engines:
            if e.has_unfinished_requests():
                e.step()
        steps += 1
    wall = time.perf_counter() - t0
    q = sum(e.stats.get("prefix_cache_queries", 0) - b.get("prefix_cache_queries", 0)
            for e, b in zip(engines, before))
    h = sum(e.stats.get("prefix_cache_hits", 0) - b.get("prefix_cache_hits", 0)
            for e, b in zip(engines, before))
    return {"policy": name, "hit_rate": h / q if q else 0.0, "prompt_tokens": q,
            "computed_prompt_tokens": q - h, "steps": steps, "wall_s": round(wall, 2),
            "requests_per_replica": sent}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--num-system-prompts", type=int, default=6)
    ap.add_argument("--system-len", type=int, default=96, help="tokens per system prompt")
    ap.add_argument("--user-len", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--arrivals-per-step", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--num-pages", type=int, default=48,
                    help="usable KV pages per replica (small: caches must compete)")
    ap.add_argument("--max-num-seqs", type=int, default=4)
    ap.add_argument("--routing-pages", type=int, default=4)
    ap.add_argument("--thresholds", default="2,16,inf",
                    help="affinity imbalance thresholds to run (comma separated)")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON lines file")
    args = ap.parse_args()

    from jaxllm import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine
    from jaxllm.loading import load_model

    loaded = load_model(args.model, dtype="auto")
    cfg = EngineConfig(model=args.model, max_model_len=256, page_size=args.page_size,
                       num_pages=args.num_pages, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=64, token_buckets=(16, 64),
                       skip_compile_at_start=True, seed=args.seed)
    engines = [LLMEngine(cfg, loaded=loaded) for _ in range(args.replicas)]
    prompts = workload(np.random.default_rng(args.seed), loaded.model_config.vocab_size,
                       args.num_system_prompts, args.system_len, args.user_len, args.requests)
    # Warm-up (compiles every bucket on every replica) outside the measured runs.
    run_policy("warmup", RoundRobin(), engines, prompts[:2 * args.replicas], args.replicas,
               args.max_tokens, args.page_size, args.routing_pages)

    policies = [("round_robin", RoundRobin())] + [
        (f"affinity(threshold={t})", Affinity(math.inf if t == "inf" else float(t)))
        for t in args.thresholds.split(",")]
    config = {k: v for k, v in vars(args).items() if k not in ("out",)}
    rows = []
    for name, policy in policies:
        rows.append({**run_policy(name, policy, engines, prompts, args.arrivals_per_step,
                                  args.max_tokens, args.page_size, args.routing_pages),
                     "config": config, "model": loaded.name})
    print(f"{args.replicas} replicas, {args.requests} requests over {args.num_system_prompts} "
          f"system prompts of {args.system_len} tokens (+{args.user_len} unique), "
          f"{args.num_pages} pages x {args.page_size} per replica")
    print(f"{'policy':<28}{'hit rate':>9}{'computed':>10}{'steps':>7}{'wall s':>8}  per replica")
    for r in rows:
        print(f"{r['policy']:<28}{r['hit_rate']:>9.1%}{r['computed_prompt_tokens']:>10}"
              f"{r['steps']:>7}{r['wall_s']:>8}  {r['requests_per_replica']}")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
