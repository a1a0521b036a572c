"""Does the Llama-3-8B logits GEMM run slower inside the decode step than alone? The GEMM
alone, and behind the step's final RMSNorm and row gather (what XLA may fuse into the GEMM),
with and without an optimization barrier in front of the dot. (H200, 2026-12-01: 231.2 / 234.7 /
234.8 us, the same Triton tile config as in the step's HLO; the step profile's 0.47 ms op group
that raised the question was a deduplicated kernel name covering many calls, RESULTS.md.) Prints each variant's GPU time per
call and the backend config XLA chose for each GEMM fusion (Triton tile sizes / split-k, or
cuBLAS), so a step's HLO dump can be compared with it.

    python3 benchmarks/gpu/lm_head_step.py [--out FILE]
"""
import argparse
import json
import re
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from gpu_trace import device_time  # noqa: E402

E, V, T, S = 4096, 128256, 8, 8  # hidden, vocab, token rows (bucket), sampled rows


def rmsnorm(x, w):  # as jaxllm.models.llama.RMSNorm
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-5)
    return w * xf.astype(x.dtype)


def logits(h, w):
    return jnp.einsum("ne,ev->nv", h, w, preferred_element_type=jnp.float32)


VARIANTS = {
    "alone": lambda x, nw, idx, w: logits(x[:S], w),
    "norm_gather": lambda x, nw, idx, w: logits(rmsnorm(x, nw)[idx], w),
    "norm_gather_barrier": lambda x, nw, idx, w: logits(
        jax.lax.optimization_barrier(rmsnorm(x, nw)[idx]), w),
}


def gemm_configs(hlo: str) -> list[str]:
    """One line per GEMM in the optimized HLO: the instruction and its backend config."""
    out = []
    for line in hlo.splitlines():
        if ("custom-call" in line and "gemm" in line.lower()) or re.search(r"= .*fusion\(.*kind=kCustom", line):
            name = line.strip().removeprefix("ROOT ").split(" ")[0]
            cfg = re.search(r'backend_config=(\{.*\})', line)
            out.append(f"{name} {cfg.group(1)[:400] if cfg else ''}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (T, E), jnp.bfloat16)
    nw = 1 + 0.1 * jax.random.normal(k[1], (E,), jnp.bfloat16)
    idx = jnp.arange(S, dtype=jnp.int32)
    ws = [jax.random.normal(jax.random.fold_in(k[2], i), (E, V), jnp.bfloat16) * 0.02
          for i in range(2)]
    for name, fn in VARIANTS.items():
        f = jax.jit(fn)
        hlo = f.lower(x, nw, idx, ws[0]).compile().as_text()
        r = device_time(f, [(x, nw, idx, w) for w in ws], calls=20) or {}
        row = dict(bench="lm_head_step", variant=name, device=jax.devices()[0].device_kind,
                   **{k_: v for k_, v in r.items() if not isinstance(v, (list, dict))})
        print(json.dumps(row), flush=True)
        for line in gemm_configs(hlo):
            print("   ", line, flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
