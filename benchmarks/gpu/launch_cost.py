"""Host cost per GPU kernel of one jitted call, under the current XLA_FLAGS (issue 9: the
batch-1 fp8 step is ~2.5 ms slower than its GPU time, the bf16 one is not).

A jitted chain of N small matmuls (64x64, each its own kernel: dots do not fuse with each other)
is timed per call for N = 64 and N = 512; (t512 - t64) / 448 is the host+GPU cost per kernel,
which for kernels this small is the launch cost. Two ways of calling: the same input array every
call, and a fresh input array every call (as the engine's step does: new input buffers can make
XLA re-record its command buffers). Also says whether the compiled program holds command buffers.

    python3 benchmarks/gpu/launch_cost.py
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 benchmarks/gpu/launch_cost.py
"""

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp


def chain(n):
    def f(x, ws):
        for i in range(n):
            x = jnp.dot(x, ws[i % len(ws)]) * 0.5
        return x
    return jax.jit(f)


def main():
    ws = [jax.random.normal(jax.random.PRNGKey(i), (64, 64), jnp.bfloat16) for i in range(8)]
    xs = [jax.random.normal(jax.random.PRNGKey(100 + i), (8, 64), jnp.bfloat16) for i in range(64)]
    row = dict(xla_flags=os.environ.get("XLA_FLAGS", ""), device=jax.devices()[0].device_kind)
    times = {}
    for n in (64, 512):
        fn = chain(n)
        text = fn.lower(xs[0], ws).compile().as_text()
        row[f"command_buffers_{n}"] = text.count("command_buffer")
        for mode in ("same", "fresh"):
            jax.block_until_ready(fn(xs[0], ws))
            ts = []
            for r in range(30):
                x = xs[0] if mode == "same" else xs[r % len(xs)] + 0  # a new buffer each call
                jax.block_until_ready(x)
                t = time.perf_counter()
                jax.block_until_ready(fn(x, ws))
                ts.append(time.perf_counter() - t)
            times[(n, mode)] = statistics.median(ts)
    for mode in ("same", "fresh"):
        row[f"us_per_kernel_{mode}"] = (times[(512, mode)] - times[(64, mode)]) / 448 * 1e6
        row[f"call_ms_512_{mode}"] = times[(512, mode)] * 1e3
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
