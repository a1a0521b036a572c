"""Host cost of a step's penalty list (engine/sampler.py ``build_sampling_tensors``) when every
row uses a penalty, as a model whose generation_config sets ``repetition_penalty`` (Qwen2.5's
1.05) makes every request do: the rows' ids from their token lists (what a row without a
``TokenArray`` costs) against from the arrays the engine keeps per sequence, with
one new token a row between steps. The main thread's CPU time, median of ``--repeats``.

    python3 benchmarks/penalty_tensors.py --batch 256 --prompt 512 --output 100
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from jaxllm.engine import sampler as S
from jaxllm.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--output", type=int, default=100)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    params = SamplingParams(repetition_penalty=1.05)
    prompts = [rng.integers(0, args.vocab, args.prompt).tolist() for _ in range(args.batch)]
    outs = [rng.integers(0, args.vocab, args.output).tolist() for _ in range(args.batch)]
    kept = [S.TokenArray(i, p) for i, p in enumerate(prompts)]
    width = S.bucket_size(args.batch * (args.prompt + args.output + args.repeats), 64)

    def step(with_arrays: bool) -> float:
        for o in outs:
            o.append(int(rng.integers(0, args.vocab)))
        t = time.thread_time()
        rows = [S.SamplingRow(params, i, len(o), p, o, penalty_ids=(
            kept[i].ids(o, len(o)) if with_arrays else None))
            for i, (p, o) in enumerate(zip(prompts, outs))]
        S.build_sampling_tensors(rows, pad_to=args.batch, penalty_len=width)
        return (time.thread_time() - t) * 1e3

    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for with_arrays in (False, True):
            times[with_arrays].append(step(with_arrays))
    for with_arrays, label in ((False, "from the token lists"), (True, "from TokenArray")):
        print(f"{args.batch} rows x {args.prompt}+{args.output} tokens, {label}: "
              f"{statistics.median(times[with_arrays]):.2f} ms a step")


if __name__ == "__main__":
    main()
