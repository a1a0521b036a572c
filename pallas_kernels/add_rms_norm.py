"""Residual add + RMSNorm in one kernel, over a projection's split-K partial sums (vLLM's
``fused_add_rms_norm``, taking the GEMM's partials as they are).

A small decode step (batch 1: 8 token rows) runs ~15 kernels a layer besides its GEMMs and
attention, each ~1.5 us on an H200 whatever its size (benchmarks/RESULTS.md, "Rerun of
2026-12-02"). Two of them sit after each of the o and down projections: XLA's split-K GEMM leaves
float32 partials [S, T, E]; one fusion sums them, applies the fp8 weight scale and adds the
residual; a second (a Triton normalization fusion) runs the next RMSNorm. This kernel does both:

  partials [S, T, E]  the projection's output as S partial sums over K (float32 or the model
                      dtype; S = 1: a finished GEMM output)
  residual [T, E]     the residual stream (model dtype)
  weight   [E]        the RMSNorm weight; scale [E] optional: an fp8 projection's per-channel
                      weight scale, applied to the summed partials
  ->  h      [T, E] = residual + (sum_s partials[s] * scale) in the model dtype: the new residual
      normed [T, E] = weight * (h * rsqrt(mean(h^2) + eps)), HF's RMSNorm of h

rounded where the unfused code rounds (the projection's output to the model dtype, the sum, the
normalized row before the weight), so the two agree to the float32 summation order.

One program a token row holds the row (E padded to a power of two) in registers: E = 4096 is 32
float32 values a thread at 4 warps. ``add_rms_norm_reference`` is the plain-jnp contract.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Rows up to this width fit a program's registers (32 float32 a thread at 4 warps for 4096;
# wider rows take more warps, see _warps_for).
MAX_WIDTH = 16384


def add_rms_norm_reference(partials: jax.Array, residual: jax.Array, weight: jax.Array, *,
                           eps: float, scale: jax.Array | None = None
                           ) -> tuple[jax.Array, jax.Array]:
    """partials [S, T, E], residual [T, E], weight [E], scale [E] or None -> (h, normed), each
    [T, E] in residual's dtype (module docstring)."""
    dtype = residual.dtype
    delta = jnp.sum(partials.astype(jnp.float32), axis=0)
    if scale is not None:
        delta = delta * scale.astype(jnp.float32)[None, :]
    h = residual + delta.astype(dtype)
    hf = h.astype(jnp.float32)
    normed = (hf * jax.lax.rsqrt(jnp.mean(hf * hf, axis=-1, keepdims=True) + eps)).astype(dtype)
    return h, weight.astype(dtype) * normed


def _kernel(*refs, S, T, E, E_pad, eps, has_scale):
    if has_scale:
        p_ref, r_ref, w_ref, s_ref, h_ref, n_ref = refs
    else:
        p_ref, r_ref, w_ref, h_ref, n_ref = refs
    t = pl.program_id(0)
    col = jnp.arange(E_pad, dtype=jnp.int32)
    ok = col < E
    row = t * E + col
    acc = plgpu.load(p_ref.at[row], mask=ok, other=0.0).astype(jnp.float32)
    for s in range(1, S):  # S is small and static: every load is issued up front
        acc += plgpu.load(p_ref.at[s * T * E + row], mask=ok, other=0.0).astype(jnp.float32)
    if has_scale:
        acc = acc * plgpu.load(s_ref.at[col], mask=ok, other=0.0)
    dtype = h_ref.dtype
    res = plgpu.load(r_ref.at[row], mask=ok, other=0.0)
    h = (res.astype(jnp.float32) + acc.astype(dtype).astype(jnp.float32)).astype(dtype)
    plgpu.store(h_ref.at[row], h, mask=ok)
    hf = h.astype(jnp.float32)  # 0 in the padding columns
    r = jax.lax.rsqrt(jnp.sum(hf * hf) / E + eps)
    normed = (hf * r).astype(dtype)
    w = plgpu.load(w_ref.at[col], mask=ok, other=0.0).astype(dtype)
    out = (w.astype(jnp.float32) * normed.astype(jnp.float32)).astype(dtype)
    plgpu.store(n_ref.at[row], out, mask=ok)


def _warps_for(E_pad: int) -> int:
    """4 warps up to 4096 columns (32 values a thread), more for wider rows."""
    return max(4, min(16, E_pad // 1024))


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def add_rms_norm(partials: jax.Array, residual: jax.Array, weight: jax.Array, *, eps: float,
                 scale: jax.Array | None = None, num_warps: int | None = None,
                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Pallas (Triton) ``add_rms_norm_reference``: partials [S, T, E] (float32 or the model
    dtype), residual [T, E], weight [E], scale [E] or None -> (h, normed) [T, E] in residual's
    dtype. ``num_warps`` None: 4 up to 4096 columns, more for wider rows."""
    if partials.ndim != 3 or residual.ndim != 2 or partials.shape[1:] != residual.shape:
        raise ValueError(f"partials must be [S, T, E] and residual [T, E] with the same T, E; "
                         f"got {partials.shape} and {residual.shape}")
    S, T, E = partials.shape
    if S < 1 or T < 1:
        raise ValueError(f"partials must have S >= 1 and T >= 1, got {partials.shape}")
    if weight.shape != (E,) or (scale is not None and scale.shape != (E,)):
        raise ValueError(f"weight and scale must be [{E}], got {weight.shape} and "
                         f"{None if scale is None else scale.shape}")
    if E > MAX_WIDTH:
        raise ValueError(f"rows wider than {MAX_WIDTH} do not fit a program, got E={E}")
    if S * T * E >= 2**31:
        raise ValueError(f"S * T * E must be < 2**31 (int32 offsets), got {partials.shape}")
    E_pad = 1 << (E - 1).bit_length()
    warps = _warps_for(E_pad) if num_warps is None else num_warps
    args = [partials.reshape(S * T * E), residual.reshape(T * E), weight]
    if scale is not None:
        args.append(scale.astype(jnp.float32))
    h, n = pl.pallas_call(
        functools.partial(_kernel, S=S, T=T, E=E, E_pad=E_pad, eps=float(eps),
                          has_scale=scale is not None),
        grid=(T,),
        out_shape=(jax.ShapeDtypeStruct((T * E,), residual.dtype),) * 2,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name=f"add_rms_norm_s{S}",
    )(*args)
    return h.reshape(T, E), n.reshape(T, E)
