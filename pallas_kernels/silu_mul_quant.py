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
kernel reads it once from memory: a program walks its token rows twice, in chunks (the max,
then the cast), and the second walk reads the rows back from L2.

History, H200, 16384 x 14336 (``benchmarks/gpu/swiglu_quant.py``; benchmarks/RESULTS.md):
  - two stride-2 gathers a chunk (the gate and up columns are interleaved), 2026-12-01
    evening: 1.27 ms at float32 against XLA's 0.97, 0.95 at bf16 against 0.77;
  - the whole row in registers (one read, no walk), 20:27 rerun: 3.3-6.0 ms at bf16, 4-32 warps;
  - contiguous [rows, chunk, 2] tiles (gate and up side by side, as in memory) split in
    registers (``lax.unstack``: Triton's ``tt.split``), addressed [rows, chunk, 2]
    (``flat=False``): 0.73 ms at 2 rows x 1024 channels x 8 warps against XLA's 0.76-0.77.
    Not faster in the engine (fp8 + fp8 KV throughput 10,930 / 10,467 against 11,103 tok/s
    unfused). Pipelining (stages 2-3) changed nothing and 16-32 warps were slower;
  - now: the same tiles loaded flat, [rows, 2 x chunk] (offsets Triton can prove contiguous,
    so it loads vectors), and reshaped in registers: 0.67 ms at 2 rows x 512 x 4 warps (the
    [rows, chunk, 2] addressing 0.73 in the same call), 13% under XLA; ~1.8 TB/s for 1.2 GB
    whose bytes need 0.27 ms. Not faster in the engine either (fp8 + fp8 KV 10,870 / 10,513
    against 10,974 / 10,926 tok/s unfused, interleaved; 2026-12-01 late night), so the engine
    runs it only when asked for (``JAXLLM_FP8_FUSED_SWIGLU=1``,
    ``jaxllm.models.fp8.fp8_swiglu_mlp``).

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


def chunk_for(F: int, max_chunk: int = 512) -> int:
    """The kernel's chunk of channels: the largest power of two <= max_chunk that divides F."""
    return min(F & -F, max_chunk)


def fits(T: int, F: int) -> bool:
    """Whether the kernel takes [T, 2F]: its flat offsets are int32."""
    return T * 2 * F < 2**31


def _kernel(acc_ref, xs_ref, ws_ref, q_ref, s_ref, *, T, F, chunk, rows, flat):
    # acc and q are flat ([T * 2F], [T * F]; XLA's reshape is a bitcast). A program takes
    # ``rows`` token rows and walks them twice in [rows, chunk, 2] tiles: contiguous in memory
    # (each row's 2 x chunk values side by side), split into gate and up in registers.
    # ``flat``: the tile is loaded as [rows, 2 x chunk] (offsets an arange along the last axis,
    # which Triton can prove contiguous and load in vectors) and reshaped to [rows, chunk, 2];
    # else it is addressed [rows, chunk, 2] directly (contiguity 2 along the last axis).
    i = pl.program_id(0)
    r = i * rows + jnp.arange(rows, dtype=jnp.int32)  # [R]
    r_ok = r < T
    f0 = jnp.arange(chunk, dtype=jnp.int32)
    pair = jnp.arange(2, dtype=jnp.int32)
    xs = plgpu.load(xs_ref.at[r], mask=r_ok, other=0.0)[:, None]  # [R, 1]; 0: h = 0
    tile_ok = jnp.broadcast_to(r_ok[:, None, None], (rows, chunk, 2))

    flat_ok = jnp.broadcast_to(r_ok[:, None], (rows, 2 * chunk))
    f2 = jnp.arange(2 * chunk, dtype=jnp.int32)

    def h_of(c):
        f = c * chunk + f0  # [C]
        if flat:
            col2 = 2 * c * chunk + f2  # [2C]
            a = plgpu.load(acc_ref.at[r[:, None] * (2 * F) + col2[None, :]], mask=flat_ok,
                           other=0.0).reshape(rows, chunk, 2)
            ws = plgpu.load(ws_ref.at[col2]).reshape(chunk, 2)
        else:
            col = 2 * f[:, None] + pair[None, :]  # [C, 2]
            a = plgpu.load(acc_ref.at[r[:, None, None] * (2 * F) + col[None]], mask=tile_ok,
                           other=0.0)  # [R, C, 2]
            ws = plgpu.load(ws_ref.at[col])
        g, u = jax.lax.unstack(a, axis=2)
        ws_g, ws_u = jax.lax.unstack(ws, axis=1)  # [C] each
        return _swiglu(g, u, xs, ws_g[None, :], ws_u[None, :]), f

    def amax_body(c, m):
        h, _ = h_of(c)
        return jnp.maximum(m, jnp.max(jnp.abs(h), axis=1))

    amax = jax.lax.fori_loop(0, F // chunk, amax_body, jnp.zeros((rows,), jnp.float32))
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)  # [R]
    out_ok = jnp.broadcast_to(r_ok[:, None], (rows, chunk))

    def cast_body(c, carry):
        h, f = h_of(c)
        q = jnp.clip(h / scale[:, None], -E4M3_MAX, E4M3_MAX).astype(FP8)
        plgpu.store(q_ref.at[r[:, None] * F + f[None, :]], q, mask=out_ok)
        return carry

    jax.lax.fori_loop(0, F // chunk, cast_body, 0)
    plgpu.store(s_ref.at[r], scale, mask=r_ok)


@functools.partial(jax.jit, static_argnames=("chunk", "rows", "num_warps", "num_stages",
                                             "flat", "interpret"))
def silu_mul_quant(acc: jax.Array, x_scale: jax.Array, w_scale: jax.Array, *,
                   chunk: int | None = None, rows: int = 1, num_warps: int = 4,
                   num_stages: int = 1, flat: bool = True,
                   interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Pallas (Triton) ``silu_mul_quant_reference``: acc [T, 2F] (float32 or bf16), x_scale [T],
    w_scale [2F] -> (h_fp8 [T, F] e4m3, h_scale [T] float32).

    ``chunk``: channels a tile, a power of two dividing F (default ``chunk_for(F)``); ``rows``:
    token rows a program, a power of two (T need not be a multiple: the tail is masked);
    ``num_stages`` > 1 lets Triton's pipeliner prefetch the walks' next tiles; ``flat`` loads
    each tile as [rows, 2 x chunk] and reshapes it (vector loads), else as [rows, chunk, 2]."""
    T, F2 = acc.shape
    if F2 % 2:
        raise ValueError(f"acc must be [T, 2F] (gate and up side by side), got {acc.shape}")
    F = F2 // 2
    chunk = chunk_for(F) if chunk is None else chunk
    if chunk < 1 or chunk & (chunk - 1) or F % chunk:
        raise ValueError(f"chunk must be a power of two dividing F={F}, got {chunk}")
    if rows < 1 or rows & (rows - 1):
        raise ValueError(f"rows must be a power of two, got {rows}")
    if x_scale.shape != (T,) or w_scale.shape != (F2,):
        raise ValueError(f"x_scale must be [{T}] and w_scale [{F2}], got {x_scale.shape} and "
                         f"{w_scale.shape}")
    if not fits(T, F):
        raise ValueError(f"T * 2F must be < 2**31 (int32 offsets), got T={T}, F={F}")
    q, s = pl.pallas_call(
        functools.partial(_kernel, T=T, F=F, chunk=chunk, rows=rows, flat=flat),
        grid=(pl.cdiv(T, rows),),
        out_shape=(jax.ShapeDtypeStruct((T * F,), FP8), jax.ShapeDtypeStruct((T,), jnp.float32)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"silu_mul_quant_r{rows}_c{chunk}{'_flat' if flat else ''}",
    )(acc.reshape(T * F2), x_scale.astype(jnp.float32), w_scale.astype(jnp.float32))
    return q.reshape(T, F), s
