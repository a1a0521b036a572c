"""Speculative decoding (n-gram drafts): decode ms/token with and without it, in one process.

Two engines over one loaded model (the same weights, each with its own small KV pool): plain
and ``speculative_config={"method": "ngram", ...}``. Greedy, ``--batch`` prompts at once.
Workloads:
  forced  a logit_bias of +100 on one token: the model repeats it, every draft is accepted
          (the most speculation can gain at this k: k + 1 tokens a step)
  random  random prompt tokens, no bias: with random weights almost nothing is drafted or
          accepted (what speculation costs when it does not help); a real model falls into
          a loop on them (greedy), so it speculates
  sampled the same at temperature 1 (seeded): text that rarely repeats, with a real model too
  copy    (a real model only, ``--model``): a paragraph, then "Repeat it word for word": the
          draft comes from the prompt, as in editing / retrieval workloads

decode ms/token = (time(1 + N tokens) - time(1 token)) / N, median of ``--repeats``, at
prompt length ``--context``. Acceptance = accepted / drafted tokens of the speculative run.

    python benchmarks/spec_decode.py --shape llama3-8b            # GPU, random 8B weights
    python benchmarks/spec_decode.py --model default --context 64 # CPU, SmolLM2-135M
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import append_jsonl, bench_model  # noqa: E402

COPY_TEXT = ("The committee met on Tuesday to review the budget for the coming year. After a "
             "long discussion, the members agreed to raise the library's funding by ten "
             "percent, to repair the roof of the town hall, and to postpone the new bridge "
             "until the engineers finish their survey of the river bank.")


def run_batch(engine, prompts: list[list[int]], n: int, bias: dict | None = None,
              temperature: float = 0.0, loras: list | None = None) -> float:
    """Seconds to generate ``n`` tokens for every prompt at once (``loras``: a LoRARequest
    or None per prompt)."""
    from jaxllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(temperature=temperature, seed=0, max_tokens=n, ignore_eos=True,
                            detokenize=False, logit_bias=bias,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    for i, p in enumerate(prompts):
        kw = {} if loras is None or loras[i] is None else {"lora_request": loras[i]}
        engine.add_request(f"r{time.perf_counter_ns()}-{i}", {"prompt_token_ids": p}, params,
                           **kw)
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - t


def ms_per_token(engine, prompts, n: int, repeats: int, **kw) -> float:
    """Decode ms/token: (time(1 + n tokens) - time(1 token)) / n, median of ``repeats``, after
    a warm-up run (``kw``: run_batch's)."""
    run_batch(engine, prompts, 1 + n, **kw)
    lat = []
    for _ in range(repeats):
        t1 = run_batch(engine, prompts, 1, **kw)
        tn = run_batch(engine, prompts, 1 + n, **kw)
        lat.append((tn - t1) / n * 1e3)
    return statistics.median(lat)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default=None, help="random weights in this shape (e.g. llama3-8b)")
    ap.add_argument("--model", default=None, help="a model to load ('default': SmolLM2-135M)")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--num-speculative-tokens", type=int, nargs="+", default=[4])
    ap.add_argument("--prompt-lookup", type=int, nargs=2, default=[1, 3], metavar=("MIN", "MAX"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens timed (N)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-pages", type=int, default=None)
    ap.add_argument("--out", default=None, help="append JSON rows here")
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    from jaxllm.config import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine

    loaded, name, on_cpu = bench_model(args.shape, args.model, args.attention)
    mc = loaded.model_config
    max_len = args.context + max(len(COPY_TEXT), args.tokens) + 64
    page_size = 16
    pages = args.num_pages or args.batch * (max_len // page_size + 2) + 8
    # Sequence slots for every draft position (each is a sampled row); token buckets fine in
    # the decode range (batch x (k + 1) tokens) and one for the prompt.
    max_k = max(args.num_speculative_tokens)
    decode_buckets = [b for b in (8, 16, 32, 64, 128) if b < args.batch * (max_k + 1) * 2]
    base = dict(model=None, dtype="float32" if on_cpu else "bfloat16", max_model_len=max_len,
                max_num_seqs=max(8, args.batch * (max_k + 1)), num_pages=pages,
                page_size=page_size, enable_prefix_caching=False,
                max_num_batched_tokens=max(256, args.context),
                token_buckets=tuple(decode_buckets) + (max(256, args.context),))

    rng = np.random.default_rng(0)
    random_prompts = rng.integers(0, mc.vocab_size, size=(args.batch, args.context)).tolist()
    workloads = [("forced", random_prompts, {int(random_prompts[0][0]): 100.0}, 0.0),
                 ("random", random_prompts, None, 0.0), ("sampled", random_prompts, None, 1.0)]
    if not args.shape and loaded.tokenizer is not None:
        tok = loaded.tokenizer
        messages = [{"role": "user", "content": f"{COPY_TEXT}\n\nRepeat the text above word "
                                                 "for word."}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        workloads.append(("copy", [ids] * args.batch, None, 0.0))

    rows = []
    plain = LLMEngine(EngineConfig(**base), loaded=loaded)
    for k in args.num_speculative_tokens:
        spec = LLMEngine(EngineConfig(**base, speculative_config={
            "method": "ngram", "num_speculative_tokens": k,
            "prompt_lookup_min": args.prompt_lookup[0],
            "prompt_lookup_max": args.prompt_lookup[1]}), loaded=loaded)
        for label, prompts, bias, temp in workloads:
            kw = dict(bias=bias, temperature=temp)
            ms_plain = ms_per_token(plain, prompts, args.tokens, args.repeats, **kw)
            s0 = dict(spec.stats)
            ms_spec = ms_per_token(spec, prompts, args.tokens, args.repeats, **kw)
            drafted = spec.stats["spec_decode_num_draft_tokens"] - s0[
                "spec_decode_num_draft_tokens"]
            accepted = spec.stats["spec_decode_num_accepted_tokens"] - s0[
                "spec_decode_num_accepted_tokens"]
            rows.append(dict(bench="spec_decode", model=name, workload=label, k=k,
                             batch=args.batch, context=len(prompts[0]), tokens=args.tokens,
                             device=jax.devices()[0].device_kind, ms_plain=ms_plain,
                             ms_spec=ms_spec, speedup=ms_plain / ms_spec,
                             drafted=drafted, accepted=accepted,
                             acceptance=accepted / drafted if drafted else 0.0,
                             date=time.strftime("%Y-%m-%d %H:%M")))
        del spec
    print(f"{'workload':>8} {'k':>2} {'plain ms/tok':>12} {'spec ms/tok':>11} {'speedup':>7} "
          f"{'accepted':>9}")
    for r in rows:
        print(f"{r['workload']:>8} {r['k']:>2} {r['ms_plain']:>12.2f} {r['ms_spec']:>11.2f} "
              f"{r['speedup']:>6.2f}x {r['accepted']:>4}/{r['drafted']:<4}")
    append_jsonl(args.out, rows)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
