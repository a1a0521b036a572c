"""SwiGLU + per-token fp8 quantization in one pass over the gate/up GEMM's raw output.

The fp8 MLP's middle, between its two W8A8 GEMMs (Llama's ``down(silu(gate(x)) * up(x))``):

  acc      [T, 2F] the fused gate/up GEMM's output before its scales (float32 or bf16), gate and
           up of channel f side by side (acc[t, 2f], acc[t, 2f + 1]: ``gate_up_proj``'s
           [T, F, 2] viewed 2-D)
  x_scale  [T] the GEMM input's per-token scales; w_scale [2F] its weight's per-channel scales
  ->  h_fp8 [T, F] e4m3 and h_scale [T]: h = silu(g) * u with g, u the scaled acc, quantized per
      token (each row's absmax maps to 448), the down GEMM's input.

Without this kernel XLA runs it as two passes over the GEMM output (the scales, SiLU, the
product and the row max in one reduce fusion; the product again and the e4m3 cast in a second),
and the float32 [T, 2F] output is the largest tensor of an fp8 prefill step: 1.9 GB at 16384
tokens of the Llama-3-8B shape, 0.94 ms a layer (H200 profile, benchmarks/RESULTS.md). The
kernel reads it once from memory: one program per token row walks the row twice, in chunks
(the max, then the cast), and the second walk reads the row back from L2.

Measured slower than XLA (H200, 2026-12-01; ``benchmarks/gpu/swiglu_quant.py``): at 16384 x
14336, float32, 1.27-1.28 ms at 256-512 channels a step against XLA's 0.97 (12.0 ms at 2048
channels and 4 warps, likely register spills); the gate and up columns are interleaved, so each
step reads them as two stride-2 gathers. So the engine runs it only when asked for
(``JAXLLM_FP8_FUSED_SWIGLU=1``, ``jaxllm.models.fp8.fp8_swiglu_mlp``). Loading contiguous
[rows, 2 x chunk] tiles and splitting them in registers is the next thing to try.

``silu_mul_quant_reference`` is the plain-jnp contract (float32 math, elementwise but for the
row max); the kernel computes the same values (on the H200: no e4m3 value differed at 16384 and
1024 rows), and the tests allow a value in a hundred one e4m3 step apart, for a compiler's
different fusing of the float32 multiplies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.fp8_matmul import E4M3_MAX, FP8


def _swiglu(acc_g, acc_u, xs, ws_g, ws_u):
    g = acc_g.astype(jnp.float32) * xs * ws_g
    u = acc_u.astype(jnp.float32) * xs * ws_u
    return g * jax.nn.sigmoid(g) * u


def silu_mul_quant_reference(acc: jax.Array, x_scale: jax.Array, w_scale: jax.Array
                             ) -> tuple[jax.Array, jax.Array]:
    """acc [T, 2F], x_scale [T], w_scale [2F] -> (h_fp8 [T, F], h_scale [T] float32)."""
    T, F2 = acc.shape
    a = acc.reshape(T, F2 // 2, 2)
    ws = w_scale.astype(jnp.float32).reshape(F2 // 2, 2)
    xs = x_scale.astype(jnp.float32)[:, None]
    h = _swiglu(a[..., 0], a[..., 1], xs, ws[:, 0], ws[:, 1])
    amax = jnp.max(jnp.abs(h), axis=1)
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    q = jnp.clip(h / scale[:, None], -E4M3_MAX, E4M3_MAX).astype(FP8)
    return q, scale


def chunk_for(F: int, max_chunk: int = 256) -> int:
    """The kernel's chunk of channels: the largest power of two <= max_chunk that divides F."""
    return min(F & -F, max_chunk)


def _kernel(acc_ref, xs_ref, ws_ref, q_ref, s_ref, *, F, chunk):
    t = pl.program_id(0)
    f0 = jnp.arange(chunk, dtype=jnp.int32)
    rows = jnp.full((chunk,), t, jnp.int32)
    xs = plgpu.load(xs_ref.at[jnp.full((1,), t, jnp.int32)])  # [1]

    def h_of(c):
        f = c * chunk + f0
        g = plgpu.load(acc_ref.at[rows, 2 * f])
        u = plgpu.load(acc_ref.at[rows, 2 * f + 1])
        return _swiglu(g, u, xs, plgpu.load(ws_ref.at[2 * f]), plgpu.load(ws_ref.at[2 * f + 1])), f

    def amax_body(c, m):
        h, _ = h_of(c)
        return jnp.maximum(m, jnp.max(jnp.abs(h)))

    amax = jax.lax.fori_loop(0, F // chunk, amax_body, jnp.zeros((), jnp.float32))
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)

    def cast_body(c, carry):
        h, f = h_of(c)
        q = jnp.clip(h / scale, -E4M3_MAX, E4M3_MAX).astype(FP8)
        plgpu.store(q_ref.at[rows, f], q)
        return carry

    jax.lax.fori_loop(0, F // chunk, cast_body, 0)
    plgpu.store(s_ref.at[jnp.full((1,), t, jnp.int32)], jnp.full((1,), scale, jnp.float32))


def _row_kernel(acc_ref, xs_ref, ws_ref, q_ref, s_ref, *, F, F_pad):
    # acc, q flat ([T * 2F], [T * F]): one program holds its whole row in registers (F_pad
    # lanes, the tail masked), so the GEMM output is read once and nothing is re-read.
    t = pl.program_id(0)
    f = jnp.arange(F_pad, dtype=jnp.int32)
    ok = f < F
    base = t * (2 * F)
    g = plgpu.load(acc_ref.at[base + 2 * f], mask=ok, other=0.0)
    u = plgpu.load(acc_ref.at[base + 2 * f + 1], mask=ok, other=0.0)
    ws_g = plgpu.load(ws_ref.at[2 * f], mask=ok, other=0.0)
    ws_u = plgpu.load(ws_ref.at[2 * f + 1], mask=ok, other=0.0)
    xs = plgpu.load(xs_ref.at[jnp.full((1,), t, jnp.int32)])  # [1]
    h = _swiglu(g, u, xs, ws_g, ws_u)  # the masked tail: silu(0) * 0 = 0, no effect on the max
    amax = jnp.max(jnp.abs(h))
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    q = jnp.clip(h / scale, -E4M3_MAX, E4M3_MAX).astype(FP8)
    plgpu.store(q_ref.at[t * F + f], q, mask=ok)
    plgpu.store(s_ref.at[jnp.full((1,), t, jnp.int32)], jnp.full((1,), scale, jnp.float32))


# The row mode's widest row: lanes a program holds (g and u in float32: 2 x 32768 x 4 B over
# 32 warps is 64 registers a thread).
MAX_ROW_LANES = 32768


def row_mode_fits(T: int, F: int) -> bool:
    """Whether the row mode takes [T, 2F]: the row fits the program and flat offsets int32."""
    return (1 << (F - 1).bit_length()) <= MAX_ROW_LANES and T * 2 * F < 2**31


@functools.partial(jax.jit, static_argnames=("mode", "chunk", "num_warps", "interpret"))
def silu_mul_quant(acc: jax.Array, x_scale: jax.Array, w_scale: jax.Array, *,
                   mode: str = "row", chunk: int | None = None, num_warps: int | None = None,
                   interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Pallas (Triton) ``silu_mul_quant_reference``: acc [T, 2F] (float32 or bf16), x_scale [T],
    w_scale [2F] -> (h_fp8 [T, F] e4m3, h_scale [T] float32).

    ``mode``: "row" (one program a row, the whole row in registers: one read of acc; needs
    ``row_mode_fits``) or "chunked" (one program a row walking it twice in ``chunk`` channels,
    a power of two dividing F, default ``chunk_for(F)``; the first version, measured slower
    than XLA). ``num_warps``: default 16 for "row", 4 for "chunked"."""
    T, F2 = acc.shape
    if F2 % 2:
        raise ValueError(f"acc must be [T, 2F] (gate and up side by side), got {acc.shape}")
    F = F2 // 2
    if x_scale.shape != (T,) or w_scale.shape != (F2,):
        raise ValueError(f"x_scale must be [{T}] and w_scale [{F2}], got {x_scale.shape} and "
                         f"{w_scale.shape}")
    out_shape = (jax.ShapeDtypeStruct((T, F), FP8), jax.ShapeDtypeStruct((T,), jnp.float32))
    xs, ws = x_scale.astype(jnp.float32), w_scale.astype(jnp.float32)
    if mode == "row":
        if not row_mode_fits(T, F):
            raise ValueError(f"the row mode takes F <= {MAX_ROW_LANES} and T * 2F < 2**31; got "
                             f"T={T}, F={F}: use mode='chunked'")
        F_pad = 1 << (F - 1).bit_length()
        q, s = pl.pallas_call(
            functools.partial(_row_kernel, F=F, F_pad=F_pad),
            grid=(T,),
            out_shape=(jax.ShapeDtypeStruct((T * F,), FP8), out_shape[1]),
            compiler_params=plgpu.CompilerParams(num_warps=num_warps or 16, num_stages=1),
            interpret=interpret,
            name="silu_mul_quant_row",
        )(acc.reshape(T * F2), xs, ws)
        return q.reshape(T, F), s
    if mode != "chunked":
        raise ValueError(f"mode must be 'row' or 'chunked', got {mode!r}")
    chunk = chunk_for(F) if chunk is None else chunk
    if chunk < 1 or chunk & (chunk - 1) or F % chunk:
        raise ValueError(f"chunk must be a power of two dividing F={F}, got {chunk}")
    return pl.pallas_call(
        functools.partial(_kernel, F=F, chunk=chunk),
        grid=(T,),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or 4, num_stages=1),
        interpret=interpret,
        name=f"silu_mul_quant_c{chunk}",
    )(acc, xs, ws)
