"""A decode step's whole MLP in one kernel: RMSNorm, gate/up, SwiGLU, down.

Dimension keys: M token rows (a decode step's, <= 64), H hidden, F intermediate (MLP) channels.

  x          [M, H] the residual stream (bf16 / float32), *before* the post-attention RMSNorm
  norm_w     [H] the RMSNorm's weight
  w_gu       gate and up, their channels interleaved (gate of f at 2f, up at 2f + 1: the fused
             ``gate_up_proj``'s [.., F, 2] layout viewed 2-D):
               dense: [H, 2F] ("kn", the nnx kernel); fp8: [2F, H] e4m3 ("nk") + gu_scale [2F]
  w_down     dense: [F, H] ("kn"); fp8: [H, F] e4m3 ("nk") + down_scale [H]
  ->         [M, H] float32: down(silu(gate(n)) * up(n)) with n = RMSNorm(x) * norm_w.

Why: at batch 1 the Llama-3-8B MLP is five kernels a layer under XLA (the norm, the gate/up
GEMM, the SwiGLU, the down GEMM, the residual add with the down GEMM's split-K sum), three of
them ~1.7 us launches that move a few KB (benchmarks/RESULTS.md, "Rerun of 2026-12-02
(02:15)"). Here a program owns ``block_f`` channels of F: it reads every row of x (a few KB,
from the L2), computes its channels' gate and up over all of H, applies the SwiGLU in
registers, and multiplies its [M, block_f] slice of the activation by the matching block_f
columns of the down weight. That is a partial sum over F of the whole [M, H] output; the
partials of the F / block_f programs meet either

  - ``accumulate="atomic"``: float32 atomic adds into one [M, H] buffer, only for the first
    ``n_valid`` rows (the live tokens; the others are padding of the step's bucket), or
  - ``accumulate="partials"``: each program stores its partial ([P, M, H]) and XLA sums them
    (deterministic; P x M x H x 4 bytes written and read back).

The RMSNorm folds out of the GEMM: RMSNorm(x) @ W = r * ((x * g) @ W) per row with
r = rsqrt(mean(x^2) + eps), and each program accumulates the row's sum of squares from the x
tiles it loads anyway. The fp8 path is W8A8 on the fp8 tensor cores with activation scales
per (row, block_k slice of H) for gate/up and per (row, program) for down, computed in
registers (finer than per-token scales, so no pass over the whole row first). Atomic adds
make the float32 sums' order, and so the last bits, vary from run to run.

Measured on the H200 (2026-12-03, ``benchmarks/gpu/fused_mlp.py``: chains of the Llama-3-8B
MLP at 8 rows, GPU time a layer; benchmarks/RESULTS.md): XLA's five kernels 86.9 µs bf16 /
54.9 fp8 (W8A16); this one kernel 94.2 / 66.3 with atomics at n_valid = 1 (98.9 fp8 at 8:
atomics cost ~4 µs a row), 101.8 / 82.1 with stored partials. Slower: the partial sums over F
cost more than the kernels they save. Its first half alone, ``gate_up_swiglu`` (the norm, the
fused gate/up GEMM and the SwiGLU; XLA runs the down GEMM on its [M, F] output), takes
84.3 / 53.0: that is what the engine runs (``jaxllm.models.attention.mlp_kernel_applies``: by
default for bf16 / float32 weights in steps of <= 8 rows on a GPU, batch-1 decode 4.15 against
4.22-4.23 ms/token; fp8 weights keep XLA's kernels, 2.81-2.82 with it against 2.78-2.79).
``gate_up_swiglu(..., weight_only=)`` is its weight-only fp8 mode (W8A16: the e4m3 tile upcast
to bf16 / float16 in registers, no activation scales), measured slower than W8A8 and XLA's
weight-only MLP on H200: bf16 86 µs, float16 63 µs a layer against W8A8 53.5 and XLA 56.1
(benchmarks/RESULTS.md, 2026-12-03 06:30 rerun); not called by the engine.

``fused_mlp_reference`` is the contract: the same math in float32 at HIGHEST precision, with
the fp8 path's activation quantization emulated block by block (the kernel matches it up to
summation order; the e4m3 rounding of a value on a tie can differ by one step).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

FP8 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
MAX_ROWS = 64
_TINY = 1e-12  # an all-zero block's scale (its values quantize to 0 whatever the scale)


def _block_m(M: int) -> int:
    return max(16, 1 << (M - 1).bit_length())


# The compute dtypes of gate_up_swiglu's weight-only fp8 mode: e4m3 -> float16 is one
# instruction a pair on Hopper, e4m3 -> bf16 takes more (through float32).
WEIGHT_ONLY_DTYPES = ("bfloat16", "float16")
_F16_MAX = 65504.0


def _weight_only_rows(xg, cd):
    """The normed rows x * g (float32) as the weight-only dot's operand: float16 clips to its
    range first (an x * g past 65504 would be inf; the RMSNorm's r is applied after the dot)."""
    if cd == jnp.float16:
        xg = jnp.clip(xg, -_F16_MAX, _F16_MAX)
    return xg.astype(cd)


def _quant(v, axis_len_blocks=None):
    """v [m, n] float32 -> (e4m3 [m, n], scale [m]): each row's absmax maps to 448."""
    s = jnp.maximum(jnp.max(jnp.abs(v), axis=1), _TINY) / E4M3_MAX
    return (v / s[:, None]).astype(FP8), s


def fused_mlp_reference(x, norm_w, w_gu, w_down, gu_scale=None, down_scale=None, *,
                        eps: float, block_k: int = 128, block_f: int = 64) -> jax.Array:
    """The kernel's math in float32 (see the module docstring): [M, H] float32.

    ``block_k`` / ``block_f`` matter only for fp8: the activation-scale blocks."""
    fp8 = w_gu.dtype == FP8
    hi = jax.lax.Precision.HIGHEST
    M, H = x.shape
    h = gate_up_swiglu_reference(x, norm_w, w_gu, gu_scale, eps=eps, block_k=block_k)  # [M, F]
    F = h.shape[1]
    if fp8:
        out = jnp.zeros((M, H), jnp.float32)
        wd = w_down.astype(jnp.float32)
        for f0 in range(0, F, block_f):
            q, s = _quant(h[:, f0:f0 + block_f])
            out = out + jnp.dot(q.astype(jnp.float32), wd[:, f0:f0 + block_f].T,
                                precision=hi) * s[:, None]
        return out * down_scale.astype(jnp.float32)[None, :]
    return jnp.dot(h.astype(w_down.dtype).astype(jnp.float32), w_down.astype(jnp.float32),
                   precision=hi)


def _kernel(x_ref, g_ref, wgu_ref, wd_ref, nv_ref, *rest, M, H, block_m, block_f, block_k,
            block_n, fp8, atomic, interpret, eps, h_only=False, weight_only=None):
    refs = list(rest)
    gus_ref = refs.pop(0) if fp8 else None
    ds_ref = refs.pop(0) if fp8 and not h_only else None
    if h_only:
        (o_ref,) = refs
    elif atomic:
        _acc_in, o_ref = refs  # o_ref aliases _acc_in (zeros)
    else:
        (o_ref,) = refs
    p = pl.program_id(0)
    rm = jnp.arange(block_m, dtype=jnp.int32)
    row_in = rm < M
    kk = jnp.arange(block_k, dtype=jnp.int32)
    c2 = p * (2 * block_f) + jnp.arange(2 * block_f, dtype=jnp.int32)  # gate/up columns

    def gate_up(kb, carry):
        acc, ss = carry
        rk = kb * block_k + kk
        xv = plgpu.load(x_ref.at[rm[:, None], rk[None, :]], mask=row_in[:, None],
                        other=0).astype(jnp.float32)
        g = plgpu.load(g_ref.at[rk]).astype(jnp.float32)
        ss = ss + jnp.sum(xv * xv, axis=1)
        xg = xv * g[None, :]
        if fp8 and weight_only is not None:  # W8A16: the e4m3 tile upcast in registers
            cd = jnp.dtype(weight_only)
            w = plgpu.load(wgu_ref.at[c2[:, None], rk[None, :]])  # [2bf, bk] e4m3
            acc = acc + jnp.dot(_weight_only_rows(xg, cd), w.astype(cd).T,
                                preferred_element_type=jnp.float32)
        elif fp8:
            q, s = _quant(xg)
            w = plgpu.load(wgu_ref.at[c2[:, None], rk[None, :]])  # [2bf, bk] e4m3
            d = jnp.dot(q, w.T, preferred_element_type=jnp.float32)
            acc = acc + d * s[:, None]
        else:
            w = plgpu.load(wgu_ref.at[rk[:, None], c2[None, :]])  # [bk, 2bf]
            acc = acc + jnp.dot(xg.astype(w.dtype), w, preferred_element_type=jnp.float32)
        return acc, ss

    acc, ss = jax.lax.fori_loop(
        0, H // block_k, gate_up,
        (jnp.zeros((block_m, 2 * block_f), jnp.float32), jnp.zeros((block_m,), jnp.float32)))
    r = jax.lax.rsqrt(ss / H + eps)
    acc = acc * r[:, None]
    if fp8:
        acc = acc * plgpu.load(gus_ref.at[c2])[None, :]
    gate, up = jax.lax.unstack(acc.reshape(block_m, block_f, 2), axis=2)
    h = gate * jax.nn.sigmoid(gate) * up  # [bm, bf] float32
    if h_only:  # the SwiGLU's output, for a down GEMM of XLA's
        cols = p * block_f + jnp.arange(block_f, dtype=jnp.int32)
        plgpu.store(o_ref.at[rm[:, None], cols[None, :]], h.astype(o_ref.dtype),
                    mask=row_in[:, None])
        return
    if fp8:
        hq, hs = _quant(h)
    else:
        hq = h.astype(wd_ref.dtype)
    rf = p * block_f + jnp.arange(block_f, dtype=jnp.int32)
    nn = jnp.arange(block_n, dtype=jnp.int32)
    live = row_in & (rm < nv_ref[0])

    def down(nb, carry):
        rn = nb * block_n + nn
        if fp8:
            w = plgpu.load(wd_ref.at[rn[:, None], rf[None, :]])  # [bn, bf] e4m3
            y = jnp.dot(hq, w.T, preferred_element_type=jnp.float32)
            y = y * hs[:, None] * plgpu.load(ds_ref.at[rn])[None, :]
        else:
            w = plgpu.load(wd_ref.at[rf[:, None], rn[None, :]])  # [bf, bn]
            y = jnp.dot(hq, w, preferred_element_type=jnp.float32)
        if atomic:
            # Masked atomics have no interpret-mode rule: there, add zeros for the other rows.
            y = jnp.where(live[:, None], y, 0.0)
            mask = None if interpret else jnp.broadcast_to(live[:, None], y.shape)
            plgpu.atomic_add(o_ref, (rm[:, None], rn[None, :]), y, mask=mask)
        else:
            rows = p * block_m + rm
            plgpu.store(o_ref.at[rows[:, None], rn[None, :]], y)
        return carry

    jax.lax.fori_loop(0, H // block_n, down, 0)


def fused_mlp_fits(M: int, H: int, F: int, *, block_f: int, block_k: int, block_n: int) -> bool:
    return 1 <= M <= MAX_ROWS and H % block_k == 0 and H % block_n == 0 and F % block_f == 0


@functools.partial(jax.jit, static_argnames=(
    "eps", "accumulate", "block_f", "block_k", "block_n", "num_warps", "num_stages",
    "interpret"))
def fused_mlp(x, norm_w, w_gu, w_down, gu_scale=None, down_scale=None, n_valid=None, *,
              eps: float, accumulate: str = "atomic", block_f: int = 64, block_k: int = 128,
              block_n: int = 256, num_warps: int = 4, num_stages: int = 3,
              interpret: bool = False) -> jax.Array:
    """Pallas (Triton) ``fused_mlp_reference`` (see the module docstring): [M, H] float32.

    ``n_valid`` (int32 scalar or [1]): rows at and past it are padding; with
    ``accumulate="atomic"`` their output rows are 0 (never added to), else computed like the
    others. Blocks are powers of two >= 16 dividing H (block_k, block_n) and F (block_f)."""
    if accumulate not in ("atomic", "partials"):
        raise ValueError(f"accumulate must be 'atomic' or 'partials', got {accumulate!r}")
    M, H = x.shape
    fp8 = w_gu.dtype == FP8
    if fp8:
        F = w_gu.shape[0] // 2
        shapes = {"w_gu": (w_gu.shape, (2 * F, H)), "w_down": (w_down.shape, (H, F))}
        if gu_scale is None or down_scale is None:
            raise ValueError("fp8 weights need gu_scale [2F] and down_scale [H]")
        shapes["gu_scale"] = (gu_scale.shape, (2 * F,))
        shapes["down_scale"] = (down_scale.shape, (H,))
        if w_down.dtype != FP8:
            raise ValueError(f"w_gu is e4m3 but w_down is {w_down.dtype}")
    else:
        F = w_gu.shape[1] // 2
        shapes = {"w_gu": (w_gu.shape, (H, 2 * F)), "w_down": (w_down.shape, (F, H))}
    shapes["norm_w"] = (norm_w.shape, (H,))
    for name, (got, want) in shapes.items():
        if tuple(got) != want:
            raise ValueError(f"{name} must be {list(want)} for x {list(x.shape)}, got {list(got)}")
    for name, b in (("block_f", block_f), ("block_k", block_k), ("block_n", block_n)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")
    if not fused_mlp_fits(M, H, F, block_f=block_f, block_k=block_k, block_n=block_n):
        raise ValueError(f"fused_mlp takes 1 <= M <= {MAX_ROWS}, block_k and block_n dividing "
                         f"H and block_f dividing F; got M={M}, H={H}, F={F}, "
                         f"blocks ({block_f}, {block_k}, {block_n})")
    block_m = _block_m(M)
    nv = jnp.full((1,), M, jnp.int32) if n_valid is None else \
        jnp.asarray(n_valid, jnp.int32).reshape(1)
    operands = [x, norm_w, w_gu, w_down, nv]
    if fp8:
        operands += [gu_scale.astype(jnp.float32), down_scale.astype(jnp.float32)]
    P = F // block_f
    atomic = accumulate == "atomic"
    kernel = functools.partial(
        _kernel, M=M, H=H, block_m=block_m, block_f=block_f, block_k=block_k, block_n=block_n,
        fp8=fp8, atomic=atomic, interpret=interpret, eps=float(eps))
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    name = f"fused_mlp_{'fp8' if fp8 else 'dense'}_{accumulate}_{block_f}x{block_k}x{block_n}"
    if atomic:
        operands.append(jnp.zeros((block_m, H), jnp.float32))
        out = pl.pallas_call(
            kernel, grid=(P,), out_shape=jax.ShapeDtypeStruct((block_m, H), jnp.float32),
            input_output_aliases={len(operands) - 1: 0}, compiler_params=params,
            interpret=interpret, name=name)(*operands)
        return out[:M]
    out = pl.pallas_call(
        kernel, grid=(P,), out_shape=jax.ShapeDtypeStruct((P * block_m, H), jnp.float32),
        compiler_params=params, interpret=interpret, name=name)(*operands)
    return out.reshape(P, block_m, H)[:, :M].sum(axis=0)


# gate_up_swiglu's blocks (block_f, block_k, num_warps, num_stages) for the Llama-3-8B MLP
# (E 4096, F 14336) at 8 rows: the fastest of the H200 sweep of 2026-12-03
# (benchmarks/gpu/fused_mlp.py, GPU time a layer with XLA's down GEMM: bf16 84.3 µs, fp8 53.3).
GATE_UP_SWIGLU_BLOCKS = {"dense": (128, 64, 4, 4), "fp8": (128, 128, 8, 4)}


# A benchmark hook (not a setting): "block_f,block_k,num_warps,num_stages" overrides the table's
# entry for both weight kinds in programs traced afterwards.
BLOCKS_ENV = "JAXLLM_GATE_UP_SWIGLU_BLOCKS"


def gate_up_swiglu_blocks(E: int, F: int, *, fp8: bool) -> dict:
    """``GATE_UP_SWIGLU_BLOCKS``' entry (or ``JAXLLM_GATE_UP_SWIGLU_BLOCKS``), its blocks halved
    (down to 16) until they divide E and F (the default model: E 576, F 1536). Raises
    ValueError if none does, or for a malformed override."""
    import os

    raw = os.environ.get(BLOCKS_ENV, "").strip()
    if raw:
        try:
            bf, bk, warps, stages = (int(v) for v in raw.split(","))
        except ValueError:
            raise ValueError(f"{BLOCKS_ENV} must be four integers "
                             f"'block_f,block_k,num_warps,num_stages', got {raw!r}") from None
    else:
        bf, bk, warps, stages = GATE_UP_SWIGLU_BLOCKS["fp8" if fp8 else "dense"]
    while bf > 16 and F % bf:
        bf //= 2
    while bk > 16 and E % bk:
        bk //= 2
    if F % bf or E % bk:
        raise ValueError(f"gate_up_swiglu has no blocks for E={E}, F={F} (multiples of 16 needed)")
    return dict(block_f=bf, block_k=bk, num_warps=warps, num_stages=stages)


def gate_up_swiglu_reference(x, norm_w, w_gu, gu_scale=None, *, eps: float,
                             block_k: int = 128, weight_only: str | None = None) -> jax.Array:
    """silu(gate(n)) * up(n), n = RMSNorm(x) * norm_w, in float32: [M, F] float32 (the first
    half of ``fused_mlp_reference``; fp8 activation blocks of ``block_k``; with
    ``weight_only``, fp8 weights under x * g rounded to that dtype instead)."""
    fp8 = w_gu.dtype == FP8
    hi = jax.lax.Precision.HIGHEST
    M, H = x.shape
    xf = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(xf * xf, axis=1) + eps)
    xg = xf * norm_w.astype(jnp.float32)[None, :]
    if fp8 and weight_only is not None:
        xw = _weight_only_rows(xg, jnp.dtype(weight_only)).astype(jnp.float32)
        acc = jnp.dot(xw, w_gu.astype(jnp.float32).T, precision=hi)
        acc = acc * gu_scale.astype(jnp.float32)[None, :]
    elif fp8:
        acc = jnp.zeros((M, w_gu.shape[0]), jnp.float32)
        wf = w_gu.astype(jnp.float32)
        for k0 in range(0, H, block_k):
            q, s = _quant(xg[:, k0:k0 + block_k])
            acc = acc + jnp.dot(q.astype(jnp.float32), wf[:, k0:k0 + block_k].T,
                                precision=hi) * s[:, None]
        acc = acc * gu_scale.astype(jnp.float32)[None, :]
    else:
        acc = jnp.dot(xg.astype(w_gu.dtype).astype(jnp.float32), w_gu.astype(jnp.float32),
                      precision=hi)
    acc = acc * r[:, None]
    return jax.nn.silu(acc[:, 0::2]) * acc[:, 1::2]


@functools.partial(jax.jit, static_argnames=("eps", "block_f", "block_k", "num_warps",
                                             "num_stages", "interpret", "weight_only"))
def gate_up_swiglu(x, norm_w, w_gu, gu_scale=None, *, eps: float, block_f: int = 64,
                   block_k: int = 128, num_warps: int = 4, num_stages: int = 3,
                   interpret: bool = False, weight_only: str | None = None) -> jax.Array:
    """The MLP's first half in one kernel: RMSNorm folded in, the fused gate/up GEMM, the
    SwiGLU: [M, F] in x's dtype (``gate_up_swiglu_reference``; layouts as ``fused_mlp``'s).

    ``weight_only`` (fp8 weights only; one of ``WEIGHT_ONLY_DTYPES``): W8A16, the e4m3 tile
    upcast to that dtype in registers and x * g rounded to it, instead of W8A8 with activation
    scales per (row, block_k). Slower than W8A8 on H200; not called by the engine (see the
    module docstring)."""
    M, H = x.shape
    fp8 = w_gu.dtype == FP8
    F = (w_gu.shape[0] if fp8 else w_gu.shape[1]) // 2
    want = (2 * F, H) if fp8 else (H, 2 * F)
    if tuple(w_gu.shape) != want or norm_w.shape != (H,):
        raise ValueError(f"w_gu must be {list(want)} and norm_w [{H}] for x {list(x.shape)}, "
                         f"got {list(w_gu.shape)} and {list(norm_w.shape)}")
    if fp8 and (gu_scale is None or gu_scale.shape != (2 * F,)):
        raise ValueError(f"e4m3 w_gu needs gu_scale [{2 * F}]")
    if weight_only is not None and (not fp8 or weight_only not in WEIGHT_ONLY_DTYPES):
        raise ValueError(f"weight_only takes {WEIGHT_ONLY_DTYPES} with e4m3 w_gu; got "
                         f"{weight_only!r} with {w_gu.dtype}")
    for name, b in (("block_f", block_f), ("block_k", block_k)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")
    if not fused_mlp_fits(M, H, F, block_f=block_f, block_k=block_k, block_n=block_k):
        raise ValueError(f"gate_up_swiglu takes 1 <= M <= {MAX_ROWS}, block_k dividing H and "
                         f"block_f dividing F; got M={M}, H={H}, F={F}, ({block_f}, {block_k})")
    operands = [x, norm_w, w_gu, w_gu, jnp.full((1,), M, jnp.int32)]
    if fp8:
        operands.append(gu_scale.astype(jnp.float32))
    kernel = functools.partial(
        _kernel, M=M, H=H, block_m=_block_m(M), block_f=block_f, block_k=block_k,
        block_n=block_k, fp8=fp8, atomic=False, interpret=interpret, eps=float(eps),
        h_only=True, weight_only=weight_only)
    return pl.pallas_call(
        kernel, grid=(F // block_f,), out_shape=jax.ShapeDtypeStruct((M, F), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"gate_up_swiglu_{'fp8' if fp8 else 'dense'}{'_wo' if weight_only else ''}"
             f"_{block_f}x{block_k}")(*operands)
