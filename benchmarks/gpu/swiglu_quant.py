"""The fp8 MLP's fused SwiGLU + quantization kernel on the GPU: correct against its reference,
and its GPU time against XLA's fusions of the same jnp code, at the offline workload's prefill
step (16384 tokens) and a decode batch (1024), Llama-3-8B's F = 14336.

    python3 benchmarks/gpu/swiglu_quant.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from gpu_trace import device_time  # noqa: E402

from pallas_kernels.silu_mul_quant import silu_mul_quant, silu_mul_quant_reference  # noqa: E402


def main() -> int:
    rng = np.random.default_rng(0)
    F = 14336
    print("T     acc   tile  kernel_us  xla_us  mismatch  scale_rel")
    for T in (16384, 1024):
        for acc_dtype in (jnp.float32, jnp.bfloat16):
            acc = jnp.asarray(rng.normal(size=(T, 2 * F)).astype(np.float32) * 30, acc_dtype)
            xs = jnp.asarray(rng.uniform(0.01, 0.1, T), jnp.float32)
            ws = jnp.asarray(rng.uniform(1e-3, 1e-2, 2 * F), jnp.float32)
            ref = jax.jit(silu_mul_quant_reference)
            q, s = silu_mul_quant(acc, xs, ws)
            qr, sr = ref(acc, xs, ws)
            mism = float(jnp.mean((q.astype(jnp.float32) != qr.astype(jnp.float32))))
            srel = float(jnp.max(jnp.abs(s - sr) / sr))
            tx = device_time(ref, [(acc, xs, ws)])
            assert mism < 0.01 and srel < 1e-5, (mism, srel)
            # The kernel's tile: channels per step x warps (the 2026-12-01 default, 2048 x 4,
            # took 12.0 ms at 16384 x float32 against XLA's 0.97: register spills?).
            for chunk, warps in [(None, 4), (256, 4), (512, 8), (1024, 8), (128, 4)]:
                fn = jax.jit(lambda a, x, w, c=chunk, nw=warps: silu_mul_quant(
                    a, x, w, chunk=c, num_warps=nw))
                tk = device_time(fn, [(acc, xs, ws)])
                print(f"{T:<5} {jnp.dtype(acc_dtype).name:8} c={chunk} w={warps} "
                      f"{tk['device_us'] if tk else -1:9.1f} {tx['device_us'] if tx else -1:7.1f}"
                      f"  {mism:.2e}  {srel:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
