"""Tensor vs pipeline parallelism on one host: batch-1 decode ms/token and offline throughput.

Random bf16 weights in a real shape (default Llama-3-8B), created directly in their shards (no
device ever holds a whole model), for each parallel layout in its own process (JAX preallocates
the GPU memory):

    export PYTHONPATH=$PWD
    python benchmarks/parallel.py                       # tp1, tp2, pp2 on the first GPUs
    python benchmarks/parallel.py --configs tp2 --out benchmarks/results/sharding.jsonl

Per layout: batch-1 decode ms/token = (time for 1+N tokens - time for 1 token) / N on a
--decode-context prompt; offline throughput on --num-prompts prompts of --input-len random tokens,
--output-len generated each (greedy, ignore_eos). For tp > 1 also the all-reduce share: the
time of one step's all-reduces alone (2 per layer + the embedding's, [1, E] bf16, a dependent
chain of shard_map psums, as the decode step runs them) over the measured ms/token.
Prints one JSON line per layout and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "tp4": (4, 1), "tp2pp2": (2, 2),
           "tp8": (8, 1)}


def sharded_random_model(shape: str, attention: str, replica):
    """A LoadedModel-like namespace with random bf16 weights in SHAPES[shape], each param
    created on its own devices in its own sharding (sharding/rules.py)."""
    import dataclasses
    import types

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.offline_throughput import SHAPES
    from jaxllm.config import ModelConfig
    from jaxllm.models.registry import get_model_class

    mc = ModelConfig(**SHAPES[shape])
    parallel = replica.for_config(mc)
    # Fused projections, built so (the engine would keep this caller's separate ones alive).
    built = dataclasses.replace(parallel.adapt_config(mc), fused_projections=True)
    cls = get_model_class(mc.architecture)
    abstract = parallel.annotate(nnx.eval_shape(
        lambda: cls(built, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), attention_backend=attention)))
    graphdef, state = nnx.split(abstract)
    makers: dict = {}
    flat = []
    key = jax.random.key(0)
    for i, (path, v) in enumerate(nnx.to_flat_state(state)):
        x = v.get_value()
        ones = str(path[-2]).endswith("norm")
        sig = (x.shape, x.sharding, ones)
        if sig not in makers:
            def make(k, shape=x.shape, ones=ones):
                if ones:
                    return jnp.ones(shape, jnp.bfloat16)
                return (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(jnp.bfloat16)
            makers[sig] = jax.jit(make, out_shardings=x.sharding)
        flat.append((path, v.replace(makers[sig](jax.random.fold_in(key, i)))))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    return types.SimpleNamespace(model_config=mc, model=model, tokenizer=None,
                                 name=f"random-{shape}", placed_on=replica)


def allreduce_ms_per_step(mesh, num_layers: int, hidden: int, batch: int = 1,
                          iters: int = 50) -> float:
    """One decode step's all-reduces alone: 2 * layers + 1 dependent psums of [batch, E] bf16."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    n = 2 * num_layers + 1

    def chain(x):
        # Unrolled: a GPU while loop reads its predicate on the host every iteration, which
        # would time the loop, not the all-reduces.
        for _ in range(n):
            x = jax.lax.psum(x, "tp") * (1.0 / mesh.devices.size)
        return x

    f = jax.jit(jax.shard_map(chain, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False))
    x = jnp.ones((batch, hidden), jnp.bfloat16)
    jax.block_until_ready(f(x))
    t = time.perf_counter()
    for _ in range(iters):
        x = f(x)
    jax.block_until_ready(x)
    return (time.perf_counter() - t) / iters * 1e3


def run_one(args) -> dict:
    import jax

    from benchmarks.offline_throughput import _prompts, engine_generate
    from jaxllm.config import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine
    from sharding.mesh import make_mesh, replica_meshes

    tp, pp = LAYOUTS[args.one]
    replica = replica_meshes(make_mesh(1, pp, tp))[0]
    t0 = time.perf_counter()
    loaded = sharded_random_model(args.shape, args.attention, replica)
    jax.block_until_ready(jax.tree.leaves(loaded.model))
    init_s = time.perf_counter() - t0
    mc = loaded.model_config
    max_len = max(args.input_len + args.output_len, args.decode_context + args.decode_tokens + 1)
    cfg = EngineConfig(model=None, dtype="bfloat16", max_model_len=max_len,
                       max_num_seqs=args.num_prompts,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       token_buckets=tuple(sorted({8, args.num_prompts,
                                                   args.max_num_batched_tokens})),
                       enable_prefix_caching=False, gpu_memory_utilization=0.9,
                       tensor_parallel_size=tp, pipeline_parallel_size=pp)
    t0 = time.perf_counter()
    engine = LLMEngine(cfg, loaded=loaded, replica=replica)
    start_s = time.perf_counter() - t0

    def generate(prompts, max_tokens):
        return engine_generate(engine, prompts, max_tokens)

    prompts = _prompts(args.num_prompts, args.input_len, mc.vocab_size)
    generate(prompts[:8], 4)  # warm-up
    one = _prompts(1, args.decode_context, mc.vocab_size, seed=1)
    lat = []
    for _ in range(args.repeats):
        t1, _ = generate(one, 1)
        tn, _ = generate(one, 1 + args.decode_tokens)
        lat.append((tn - t1) / args.decode_tokens * 1e3)
    runs = [generate(prompts, args.output_len) for _ in range(args.repeats)]
    secs = statistics.median(r[0] for r in runs)
    n_out = runs[0][1]
    ms_tok = statistics.median(lat)
    res = dict(layout=args.one, tp=tp, pp=pp, shape=args.shape,
               device=jax.devices()[0].device_kind, attention=args.attention,
               decode_ms_per_token_b1=ms_tok, num_prompts=args.num_prompts,
               input_len=args.input_len, output_len=args.output_len, seconds=secs,
               output_tok_s=n_out / secs,
               total_tok_s=(n_out + args.num_prompts * args.input_len) / secs,
               init_s=init_s, startup_s=start_s, num_pages=engine.page_pool.num_usable_pages)
    if tp > 1 and jax.default_backend() != "cpu":  # XLA:CPU stalls on the chain (see below)
        ar = allreduce_ms_per_step(replica.stage(0), len(engine.parallel.stages[0].layers),
                                   mc.hidden_size)
        res.update(allreduce_ms_per_step_b1=ar, allreduce_share_b1=ar / ms_tok)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", default="tp1,tp2,pp2",
                   help=f"comma-separated layouts from {sorted(LAYOUTS)}")
    p.add_argument("--one", choices=sorted(LAYOUTS), help=argparse.SUPPRESS)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--attention", default="pallas", choices=["reference", "pallas"])
    p.add_argument("--decode-context", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--allreduce-only", type=int, default=0, metavar="TP",
                   help="only time one decode step's all-reduces over TP devices (batch 1 "
                        "and 256), under the current XLA_FLAGS")
    args = p.parse_args(argv)
    if args.allreduce_only:
        import os

        import jax
        if jax.default_backend() != "gpu":  # XLA:CPU's collectives stall on this chain
            p.error("--allreduce-only times GPU collectives; run it where JAX sees GPUs")

        from benchmarks.offline_throughput import SHAPES
        from sharding.mesh import make_mesh, replica_meshes
        shape = SHAPES[args.shape]
        mesh = replica_meshes(make_mesh(1, 1, args.allreduce_only))[0].stage(0)
        res = {f"allreduce_ms_b{b}": allreduce_ms_per_step(
            mesh, shape["num_hidden_layers"], shape["hidden_size"], batch=b) for b in (1, 256)}
        print(json.dumps(dict(bench="allreduce", tp=args.allreduce_only, shape=args.shape,
                              xla_flags=os.environ.get("XLA_FLAGS", ""), **res)), flush=True)
        return 0
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0
    results = []
    common = ["--shape", args.shape, "--num-prompts", str(args.num_prompts),
              "--input-len", str(args.input_len), "--output-len", str(args.output_len),
              "--max-num-batched-tokens", str(args.max_num_batched_tokens),
              "--attention", args.attention, "--decode-context", str(args.decode_context),
              "--decode-tokens", str(args.decode_tokens), "--repeats", str(args.repeats)]
    for name in args.configs.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", name, *common],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{name}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            continue
        res = json.loads(lines[-1][len("RESULT "):])
        results.append(res)
        line = json.dumps(res)
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(line + "\n")
    print(f"\n{'layout':8} {'ms/token b1':>12} {'out tok/s':>10} {'total tok/s':>12} "
          f"{'all-reduce share':>17}")
    for r in results:
        share = f"{100 * r['allreduce_share_b1']:.1f}%" if "allreduce_share_b1" in r else "-"
        print(f"{r['layout']:8} {r['decode_ms_per_token_b1']:12.2f} {r['output_tok_s']:10.0f} "
              f"{r['total_tok_s']:12.0f} {share:>17}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
