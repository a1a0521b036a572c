"""Prefix caching on vs off: TTFT and throughput with a shared system prompt, random weights.

The prefix-cache issue's workload: 64 requests sharing a 2,000-token system prompt, each with a
distinct 100-token question, plus a control workload with no shared prefix (caching must not
slow it down). Both settings run in one process, as two engines over the same loaded weights
(each sized to about half of the device's KV budget), and every measurement alternates between
them, so drift of the machine over the run hits both alike:

    python benchmarks/prefix_cache.py --attention pallas --out results.jsonl

Figures per setting (one JSON line each):
- ttft_single_ms: one request alone (after one earlier request warmed the shared prefix), the
  time from submission to its first token; median over --repeats questions.
- ttft_batch_ms: mean TTFT of the 64 requests submitted together; batch_s: time until all
  finish (median over --batch-repeats, each with fresh questions).
- control_s: 64 requests of 2,100 distinct random tokens (no shared prefix); median over
  --control-repeats, interleaved between the settings. control_runs_s lists every run.
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
    p.add_argument("--caching", default="on,off",
                   help="settings to compare, in one process: on, off or on,off")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--system-len", type=int, default=2000)
    p.add_argument("--question-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--attention", default="reference", choices=["reference", "pallas"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-repeats", type=int, default=2)
    p.add_argument("--control-repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from jaxllm.config import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine
    from jaxllm.sampling_params import RequestOutputKind, SamplingParams

    settings = [c.strip() for c in args.caching.split(",") if c.strip()]
    if not settings or any(c not in ("on", "off") for c in settings):
        p.error(f"--caching takes on, off or on,off; got {args.caching!r}")
    loaded = random_model(args.shape, args.attention)
    mc = loaded.model_config
    max_len = args.system_len + args.question_len + args.output_len + 16
    engines = {}
    for i, c in enumerate(settings):
        # The second engine sizes its pool after the first one's is allocated: 0.45 then 0.9
        # of the device gives both about the same number of pages.
        util = 0.9 * (i + 1) / len(settings)
        cfg = EngineConfig(dtype="bfloat16", max_model_len=max_len, max_num_seqs=args.num_requests,
                           max_num_batched_tokens=args.max_num_batched_tokens,
                           gpu_memory_utilization=util,
                           # The default powers-of-two buckets: a 100-token prefill after a hit
                           # must not run in a 2048-token bucket.
                           enable_prefix_caching=c == "on")
        t0 = time.perf_counter()
        engines[c] = LLMEngine(cfg, loaded=loaded)
        print(f"engine caching={c}: {engines[c].page_pool.num_usable_pages} pages, "
              f"start-up {time.perf_counter() - t0:.1f} s", flush=True)
    rng = np.random.default_rng(0)
    system = rng.integers(0, mc.vocab_size, args.system_len).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True,
                            detokenize=False, output_kind=RequestOutputKind.CUMULATIVE)
    counter = iter(range(10**9))

    def run(engine, prompts):
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

    def distinct():
        return [rng.integers(0, mc.vocab_size, args.system_len + args.question_len).tolist()
                for _ in range(args.num_requests)]

    single = {c: [] for c in settings}
    batch = {c: [] for c in settings}
    control = {c: [] for c in settings}
    for c in settings:  # warm-up; with caching on, this also caches the system prompt
        run(engines[c], [system + question()])
        run(engines[c], distinct()[:8])
    for _ in range(args.repeats):
        q = question()
        for c in settings:
            single[c].append(run(engines[c], [system + q])[0][0])
    for r in range(args.batch_repeats):
        prompts = [system + question() for _ in range(args.num_requests)]
        for c in settings[::1 if r % 2 == 0 else -1]:
            batch[c].append(run(engines[c], prompts))
    for r in range(args.control_repeats):
        prompts = distinct()
        for c in settings[::1 if r % 2 == 0 else -1]:
            control[c].append(run(engines[c], prompts)[1])
    for c in settings:
        engine = engines[c]
        batch_s = statistics.median(b[1] for b in batch[c])
        res = dict(caching=c, shape=args.shape, device=jax.devices()[0].device_kind,
                   attention=args.attention, num_pages=engine.page_pool.num_usable_pages,
                   ttft_single_ms=statistics.median(single[c]) * 1e3,
                   ttft_batch_ms=statistics.median(statistics.mean(b[0]) for b in batch[c]) * 1e3,
                   batch_s=batch_s,
                   batch_tok_s=args.num_requests * (args.system_len + args.question_len
                                                    + args.output_len) / batch_s,
                   control_s=statistics.median(control[c]), control_runs_s=control[c],
                   hits=engine.stats["prefix_cache_hits"],
                   queries=engine.stats["prefix_cache_queries"])
        line = json.dumps(res)
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(line + "\n")
    if len(settings) == 2:
        on, off = (statistics.median(control[c]) for c in ("on", "off"))
        print(f"TTFT alone on/off: {statistics.median(single['on']) / statistics.median(single['off']):.3f}x; "
              f"control (no shared prefix) on/off: {on / off:.3f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
