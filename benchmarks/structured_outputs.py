"""What structured outputs cost per step (engine/structured_output.py).

1. Host: the grammar masks of B constrained rows. B sequences of one JSON schema are walked
   ``--prefix`` tokens into a reply (each matcher consumes a valid reply's first tokens), then
   ``build_sampling_tensors`` is timed with their masks (llguidance computes them on its
   threads) against the same rows without, median of ``--repeats``.
2. ``--engine``: an engine run of ``--batch`` prompts generating ``--max-tokens`` tokens,
   output tokens/s, median of ``--engine-repeats``, in five modes: all free; one row with a
   presence penalty; all constrained to the schema; and the last two with late sampling off.
   Each mode runs once untimed first: a mode's first run compiles its sampler variants (the
   penalty list's width buckets, the token bitmask), and with two timed runs the median would
   be their mean, compiles included. ``warmup_compiles`` counts the programs a mode's first run
   compiled (what a server compiles while serving), ``compiles`` those of the timed runs.
   A penalty or grammar row needs each step's tokens on the host before its next sampler
   inputs: with late sampling (the default) the engine launches step k+1's forward, reads step
   k back while it runs, then launches k+1's sampler; off, it reads step k back before the next
   schedule, so the host's whole step is exposed (engine/llm_engine.py, ``step``). On a GPU
   the difference shows here; on a CPU the "device" is the host's own cores.

    python3 benchmarks/structured_outputs.py                       # CPU: the default model
    python3 benchmarks/structured_outputs.py --engine --model /path/to/model --batch 64   # GPU

Prints a table; ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

# Bounded (lengths, item counts, the integer's range, no extra keys), so a reply ends within
# max_tokens, also from random weights (the engine run also disables free whitespace), and the
# engine run times whole replies.
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                 "zip": {"type": "string", "maxLength": 8}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "tags", "address"], "additionalProperties": False}
REPLY = ('{"name": "Ada Lovelace", "age": 36, "tags": ["math", "engines", "poetry"], '
         '"address": {"city": "London", "zip": "W1"}}')


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_masks(tokenizer, vocab_size: int, batches, prefix: int, repeats: int) -> list[dict]:
    from jaxllm import SamplingParams
    from jaxllm.engine import sampler as S
    from jaxllm.engine.structured_output import StructuredOutputs
    from jaxllm.sampling_params import StructuredOutputsParams

    so = StructuredOutputs(tokenizer, vocab_size, [tokenizer.eos_token_id])
    params = SamplingParams(structured_outputs=StructuredOutputsParams(json=SCHEMA))
    reply = tokenizer(REPLY, add_special_tokens=False).input_ids[:prefix]
    rows = []
    for B in batches:
        masks = [so.token_mask(params) for _ in range(B)]
        for m in masks:
            for t in reply:
                m.accept(t)
        assert not any(m.matcher.is_error() for m in masks), "the reply does not fit the schema"
        free = [S.SamplingRow(params, i, len(reply), [1], reply) for i in range(B)]
        constrained = [r._replace(token_mask=m) for r, m in zip(free, masks)]
        pad = max(8, 1 << (B - 1).bit_length())
        t_free = _median_ms(lambda: S.build_sampling_tensors(free, pad, vocab_size=vocab_size),
                            repeats)
        t_mask = _median_ms(lambda: S.build_sampling_tensors(constrained, pad,
                                                             vocab_size=vocab_size), repeats)
        rows.append({"batch": B, "free_ms": t_free, "constrained_ms": t_mask,
                     "per_row_us": (t_mask - t_free) * 1e3 / B})
    return rows


def engine_run(args) -> list[dict]:
    from jaxllm import LLM, SamplingParams
    from jaxllm.sampling_params import StructuredOutputsParams

    llm = LLM(args.model) if args.model else LLM()
    runner = llm.llm_engine.runner
    prompts = [[{"role": "user", "content": f"Describe person number {i} as JSON."}]
               for i in range(args.batch)]
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)

    def params(mode: str) -> list:
        return [SamplingParams(
            temperature=0.8, seed=i, max_tokens=args.max_tokens, ignore_eos="json" not in mode,
            structured_outputs=so if "json" in mode else None,
            presence_penalty=0.5 if "penalty" in mode and i == 0 else 0.0)
            for i in range(args.batch)]

    out = []
    for mode in ("free", "one_penalty", "one_penalty_read_first", "json_schema",
                 "json_schema_read_first"):
        runner.late_sampling = not mode.endswith("read_first")
        compiles = runner.num_compiles
        llm.chat(prompts, params(mode), use_tqdm=False)  # warm-up: compiles the mode's variants
        warm_compiles, compiles = runner.num_compiles - compiles, runner.num_compiles
        rates = []
        for _ in range(args.engine_repeats):
            t0 = time.perf_counter()
            res = llm.chat(prompts, params(mode), use_tqdm=False)
            dt = time.perf_counter() - t0
            rates.append(sum(len(o.outputs[0].token_ids) for o in res) / dt)
        out.append({"mode": mode, "batch": args.batch, "output_tok_s": statistics.median(rates),
                    "valid_json": sum(_is_json(o.outputs[0].text) for o in res),
                    "warmup_compiles": warm_compiles, "compiles": runner.num_compiles - compiles})
    del runner.late_sampling
    return out


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder / GGUF (default: SmolLM2)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for the host part "
                    "(default: the model's, or the default model's)")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--prefix", type=int, default=12, help="reply tokens consumed first")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--engine", action="store_true", help="also time the engine")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--engine-repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    if args.tokenizer or args.model:
        tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    else:
        from jaxllm.loading.default_model import default_gguf_path
        from jaxllm.loading.gguf_loader import load_gguf_tokenizer

        tok = load_gguf_tokenizer(default_gguf_path())
    vocab = max(len(tok), tok.vocab_size)
    host = host_masks(tok, vocab, [int(b) for b in args.batches.split(",")], args.prefix,
                      args.repeats)
    print(f"host: build_sampling_tensors, vocab {vocab}, median of {args.repeats} (ms)")
    print(f"{'batch':>6} {'free':>8} {'masks':>8} {'us/row':>8}")
    for r in host:
        print(f"{r['batch']:>6} {r['free_ms']:>8.3f} {r['constrained_ms']:>8.3f} "
              f"{r['per_row_us']:>8.1f}")
    result = {"host": host}
    if args.engine:
        result["engine"] = engine_run(args)
        print(f"engine: batch {args.batch}, {args.max_tokens} tokens, "
              f"median of {args.engine_repeats}")
        for r in result["engine"]:
            print(f"{r['mode']:>24} {r['output_tok_s']:>10.1f} tok/s  "
                  f"valid JSON {r['valid_json']}/{r['batch']}  compiles: "
                  f"{r['warmup_compiles']} warm-up, {r['compiles']} timed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
