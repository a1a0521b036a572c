"""The compiled step programs with the layers called through a nested jit (``JAXLLM_LAYER_JIT``,
jaxllm/models/llama.py) against the plain loop: run once with each setting, the lines printed
must match. Each line: a program, then the ops of its optimized HLO's entry computation by kind
(fusions by their kind, custom calls by target) and their total: what the GPU launches.

    JAXLLM_LAYER_JIT=0 python3 benchmarks/gpu/layer_jit_hlo.py [--layers 4] > a
    JAXLLM_LAYER_JIT=1 python3 benchmarks/gpu/layer_jit_hlo.py [--layers 4] > b; diff a b

``--tp N`` compiles the tensor-parallel programs (the partitioner's output: collectives included).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAXLLM_EXECUTABLE_CACHE_DIR", "")


def entry_ops(hlo: str) -> collections.Counter:
    """The entry computation's ops: fusions by kind, custom calls by target, others by opcode."""
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    ops = collections.Counter()
    for line in entry.splitlines()[1:]:
        m = re.search(r"= \S+ ([a-z-]+)\(", line)
        if m is None:
            continue
        op = m.group(1)
        if op == "fusion":
            kind = re.search(r"kind=(\w+)", line)
            op += ":" + (kind.group(1) if kind else "?")
        elif op == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', line)
            op += ":" + (target.group(1) if target else "?")
        ops[op] += 1
    return ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--attention", default="pallas")
    p.add_argument("--tokens", type=int, nargs="+", default=[8, 512])
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (on the CPU: set "
                   "XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    args = p.parse_args()

    import offline_throughput as ot

    from jaxllm.config import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine

    ot.SHAPES[args.shape] = {**ot.SHAPES[args.shape], "num_hidden_layers": args.layers}
    loaded = ot.random_model(args.shape, args.attention)
    cfg = EngineConfig(model=None, dtype="bfloat16", max_model_len=2048, max_num_seqs=8,
                       max_num_batched_tokens=max(args.tokens), num_pages=512,
                       token_buckets=tuple(sorted(set(args.tokens))),
                       tensor_parallel_size=args.tp)
    r = LLMEngine(cfg, loaded=loaded).runner
    for T in args.tokens:
        for decode_only in ([True, False] if T <= 8 else [False]):
            fwd_in, _ = r._device_inputs(r.prepare([], [], T=T, decode_only=decode_only))
            hlo = r.forward_for(T).lower(r._leaves, r.kv_caches, fwd_in,
                                         r._prev_tokens).compile().as_text()
            ops = entry_ops(hlo)
            print(f"forward T={T}{' decode-only' if decode_only else ''}: total "
                  f"{sum(ops.values())}; " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))


if __name__ == "__main__":
    main()
