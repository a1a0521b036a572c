"""Does XLA fuse a per-channel scale of the GEMM's input into the GEMM? (issue 9)

The batch-1 step runs an RMSNorm kernel before the q/k/v GEMM. RMSNorm(x) @ W =
r * ((x * g) @ W) with r = rsqrt(mean(x^2) + eps) per token: if XLA fuses ``x * g`` into the
GEMM as a prologue, the norm kernel can go, with r applied by the decode kernel that already
sums the GEMM's split-K partials (it would read x's row for its sum of squares). This compiles
both at 8 rows and prints every kernel of a call, GPU time from the profiler (weights rotated
over copies that overflow the L2):
  norm_gemm     RMSNorm (HF's, as the model) then the split-K einsum (the engine today)
  scaled_gemm   the split-K einsum of x * g
  scaled_dot    jnp.dot(x * g, W), no split
for the bf16 q/k/v projection (4096 x 6144) and its fp8 weight-only form.

    python3 benchmarks/gpu/norm_prologue.py [--out FILE]
"""
import argparse
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks/gpu")
sys.path.insert(0, "benchmarks")
from l2_prefetch import emit, positions  # noqa: E402

M, K, N, PARTS = 8, 4096, 6144, 4


def rms_norm(x, g, eps=1e-5):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return g * xf.astype(x.dtype)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    key = jax.random.key(0)
    x = jax.random.normal(key, (M, K), jnp.bfloat16)
    g = (1 + 0.1 * jax.random.normal(jax.random.key(1), (K,), jnp.float32)).astype(jnp.bfloat16)
    for kind in ("bf16", "fp8"):
        if kind == "bf16":
            ws = [(jax.random.normal(jax.random.fold_in(key, i), (K, N), jnp.float32) * 0.02
                   ).astype(jnp.bfloat16) for i in range(4)]

            def split(h, w):
                return jnp.einsum("tpk,pkn->ptn", h.reshape(M, PARTS, K // PARTS),
                                  w.reshape(PARTS, K // PARTS, N),
                                  preferred_element_type=jnp.float32)

            def dot(h, w):
                return jnp.dot(h, w)
        else:
            ws = [jax.random.normal(jax.random.fold_in(key, i), (N, K), jnp.float32
                                    ).astype(jnp.float8_e4m3fn) for i in range(8)]

            def split(h, w):
                return jnp.einsum("tpk,npk->ptn", h.reshape(M, PARTS, K // PARTS),
                                  w.reshape(N, PARTS, K // PARTS).astype(h.dtype),
                                  preferred_element_type=jnp.float32)

            def dot(h, w):
                return jax.lax.dot_general(h, w.astype(h.dtype), (((1,), (1,)), ((), ())),
                                           preferred_element_type=jnp.float32)
        variants = {
            "norm_gemm": jax.jit(lambda x, g, w: split(rms_norm(x, g), w)),
            "scaled_gemm": jax.jit(lambda x, g, w: split(x * g, w)),
            "scaled_dot": jax.jit(lambda x, g, w: dot(x * g, w)),
        }
        sets = [(x, g, w) for w in ws]
        for name, fn in variants.items():
            rec = dict(kind=kind, variant=name, M=M, K=K, N=N)
            try:
                hlo = fn.lower(*sets[0]).compile().as_text()
                entry = hlo[hlo.rfind("ENTRY"):]
                rec["entry_fusions"] = entry.count(" fusion(") + entry.count("custom-call(")
                pos, n = positions(fn, sets)
                rec["ops"] = n
                rec["positions"] = [(k, round(v, 2)) for k, v in pos] if pos else None
                rec["total_us"] = round(sum(v for _, v in pos), 2) if pos else None
            except Exception as e:  # noqa: BLE001 - report and go on
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            emit(rec, args.out)


if __name__ == "__main__":
    main()
