"""Small-M fp8 projection variants, timed in one jit of R = 16 distinct weights (no L2 reuse, no
per-call dispatch): bf16 dot, the engine's W8A8 path (per-token activation quantization + fp8
dot + scale epilogue), and W8A16 (fp8 weight upcast inside the dot, per-channel scale after).
Prints one row per (M, K, N, variant) as soon as it is timed, and whether XLA fused the weight
upcast into the GEMM (a ``convert`` left outside any fusion means it did not).

    python3 benchmarks/gpu/fp8_small_m.py [--out FILE]
"""
import argparse
import json
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
from pallas_kernels.fp8_matmul import FP8, fp8_matmul_xla, quantize_activation_per_token  # noqa

R = 16  # distinct weights per call: spreads the ~20-30 us dispatch + sync to ~2 us each


def variants():
    def bf16(x, w_kn, w_nk, ws):
        return [jnp.dot(x, w_kn[r]) for r in range(R)]

    def w8a8(x, w_kn, w_nk, ws):
        xq, xs = quantize_activation_per_token(x)
        return [fp8_matmul_xla(xq, xs, w_nk[r], ws[r], jnp.bfloat16, w_transposed=True)
                for r in range(R)]

    def w8a16_nk(x, w_kn, w_nk, ws):
        return [(jax.lax.dot_general(x, w_nk[r].astype(jnp.bfloat16), (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32) * ws[r]
                 ).astype(jnp.bfloat16) for r in range(R)]

    def w8a16_kn(x, w_kn, w_nk, ws):
        return [(jnp.dot(x, w_kn[r].astype(jnp.bfloat16), preferred_element_type=jnp.float32)
                 * ws[r]).astype(jnp.bfloat16) for r in range(R)]

    return {"bf16": bf16, "w8a8": w8a8, "w8a16_nk": w8a16_nk, "w8a16_kn": w8a16_kn}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    key = jax.random.key(0)
    for M, K, N in [(1, 4096, 6144), (1, 14336, 4096), (16, 4096, 6144), (16, 14336, 4096)]:
        kx, kw = jax.random.split(jax.random.fold_in(key, M * K + N))
        x = jax.random.normal(kx, (M, K), jnp.bfloat16)
        wb = jax.random.normal(kw, (R, K, N), jnp.bfloat16) * 0.02
        w8_kn = (wb * 20).astype(FP8)
        w8_nk = jnp.swapaxes(w8_kn, 1, 2)
        ws = jnp.full((R, N), 0.05, jnp.float32)
        for name, fn in variants().items():
            wk = wb if name == "bf16" else w8_kn
            # Every GEMM's whole output is returned. The 2026-11-30 version returned the first 8
            # columns of each, which lets XLA's simplifier push the slice into the dots it owns
            # (bf16, weight-only) but not into cuBLASLt's fp8 custom call: that table compared
            # partial GEMMs with whole ones (bf16 at M=1 came out slower than at M=16).
            f = jax.jit(lambda x, a, b, s, fn=fn: fn(x, a, b, s))
            comp = f.lower(x, wk, w8_nk, ws).compile()
            hlo = comp.as_text()
            entry = hlo[hlo.rfind("ENTRY"):]
            loose_converts = len(re.findall(r"= \S+ convert\(", entry))
            gemm = ("cublas" if "__cublas" in hlo else "") + ("+triton" if "triton" in hlo else "")
            jax.block_until_ready(comp(x, wk, w8_nk, ws))
            ts = []
            for _ in range(7):
                t = time.perf_counter()
                jax.block_until_ready(comp(x, wk, w8_nk, ws))
                ts.append(time.perf_counter() - t)
            us = float(np.median(ts)) / R * 1e6
            wbytes = K * N * (2 if name == "bf16" else 1)
            row = dict(M=M, K=K, N=N, variant=name, us_per_gemm=round(us, 2),
                       weight_GBps=round(wbytes / us / 1e3, 1), loose_converts=loose_converts,
                       gemm=gemm)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
