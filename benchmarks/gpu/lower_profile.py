"""Where a cold start's lowering goes: the engine built on a random model (offline_throughput's
SHAPES, the server's defaults otherwise) under cProfile, the main thread's time (tracing and
lowering run there; XLA compiles on threads) by function, cumulative and own.

    python3 benchmarks/gpu/lower_profile.py [--shape llama3-8b] [--layers N] [--top 30]
        [--out prof.txt]

The compilation cache is off (JAX_COMPILATION_CACHE_DIR unset, no executable cache), so each
program is lowered and compiled as at a first start.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAXLLM_EXECUTABLE_CACHE_DIR", "")


PHASES = ("_compile_in_parallel|submit|jit_lower|_infer_params|trace_to_jaxpr_nocache|"
          "lower_jaxpr_to_module|_resolve_and_lower|pallas_call_lowering|_pallas_call|"
          "lower_jaxpr_to_triton|triton|mosaic|lower_pipelined|_device_inputs|prepare|"
          "compile_all|_size_kv|merge|split")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's")
    p.add_argument("--attention", default="pallas")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", type=Path, default=None, help="the full table, sorted both ways")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    args = p.parse_args()

    import offline_throughput as ot

    from jaxllm.config import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine

    if args.layers is not None:
        ot.SHAPES[args.shape] = {**ot.SHAPES[args.shape], "num_hidden_layers": args.layers}
    ot.log_engine_startup()
    loaded = ot.random_model(args.shape, args.attention)
    cfg = EngineConfig(model=None, dtype="bfloat16",
                       max_num_batched_tokens=args.max_num_batched_tokens)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    engine = LLMEngine(cfg, loaded=loaded)
    prof.disable()
    print(f"engine built in {time.perf_counter() - t:.1f} s", flush=True)
    del engine
    # The phases of a program's lowering (tracing, MLIR, the Pallas kernels' own lowering),
    # then the functions with the most own time.
    for key, restrict in (("cumulative", PHASES), ("tottime", "")):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).strip_dirs().sort_stats(key).print_stats(restrict, args.top)
        text = s.getvalue()
        print(text[text.index("   ncalls"):] if "   ncalls" in text else text)
        if args.out is not None:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats(key).print_stats(400)
            with open(args.out, "a") as f:
                f.write(s.getvalue())


if __name__ == "__main__":
    main()
