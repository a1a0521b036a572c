"""Small steps' residual add + RMSNorm in one kernel (``pallas_kernels.add_rms_norm``).

In a step of at most ``ADD_NORM_MAX_TOKENS`` token rows (batch-1 / small-batch decode) the o and
down projections return their split-K partial sums ([S, T, E] float32, the GEMM as XLA splits it
there on its own) and the next RMSNorm adds them to the residual stream, in one kernel
instead of XLA's two (the partials' sum with the residual add, then the norm): two kernels a
layer fewer. vLLM's ``fused_add_rms_norm`` is the same idea; here the kernel also takes the
GEMM's partials, since a kernel between the GEMM and the sum would cost a launch of its own.

Where it applies (``add_norm_applies``): the switch is on (``JAXLLM_FUSED_ADD_NORM``, read at
trace time), the step has at most ADD_NORM_MAX_TOKENS rows, no tensor parallelism (a shard's
partials would need their all-reduce first), and the o / down projections are dense or fp8
weight-only (W8A16: a per-channel scale; W8A8's per-token scales are not taken) and carry no
bias. Elsewhere the layers run as before.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.models.attention import heads_mesh

ADD_NORM_ENV = "JAXLLM_FUSED_ADD_NORM"
ADD_NORM_SPLIT_K_ENV = "JAXLLM_FUSED_ADD_NORM_SPLIT_K"
# Token rows up to which a step takes the fused path: the decode steps of up to 16 sequences,
# where XLA splits the o / down GEMMs' K itself (H200: 8 ways at 8 rows, bf16 and fp8).
ADD_NORM_MAX_TOKENS = 16
# The partials' count: XLA's own split of the 8B shape's o (K = 4096) and down (K = 14336) GEMMs
# at 8 rows (H200, 2026-12-02 HLO dump), at least MIN_SPLIT_WIDTH of K a split.
MAX_SPLIT_K = 8
MIN_SPLIT_WIDTH = 256


def add_norm_enabled() -> bool:
    """``JAXLLM_FUSED_ADD_NORM``: "1" on, "0" off; unset: off (an A/B switch until measured)."""
    raw = os.environ.get(ADD_NORM_ENV, "0").strip() or "0"
    if raw not in ("0", "1"):
        raise ValueError(f"{ADD_NORM_ENV} must be 0 or 1, got {raw!r}.")
    return raw == "1"


def split_k_for(in_features: int) -> int:
    """The partials' count for a projection of ``in_features`` inputs: the largest power of two
    <= MAX_SPLIT_K dividing it with at least MIN_SPLIT_WIDTH inputs a split, or
    ``JAXLLM_FUSED_ADD_NORM_SPLIT_K`` (a positive integer dividing in_features) when set."""
    raw = os.environ.get(ADD_NORM_SPLIT_K_ENV, "").strip()
    if raw:
        try:
            s = int(raw)
        except ValueError:
            raise ValueError(f"{ADD_NORM_SPLIT_K_ENV} must be a positive integer, got {raw!r}.") \
                from None
        if s < 1 or in_features % s:
            raise ValueError(f"{ADD_NORM_SPLIT_K_ENV}={s} must be >= 1 and divide the "
                             f"projection's {in_features} inputs.")
        return s
    s = MAX_SPLIT_K
    while s > 1 and (in_features % s or in_features // s < MIN_SPLIT_WIDTH):
        s //= 2
    return s


def _projection_ok(proj, num_tokens: int) -> bool:
    from jaxllm.models.fp8 import Fp8Linear, weight_only_max_tokens

    if isinstance(proj, Fp8Linear):
        return (proj.bias is None and proj.input_scale is None
                and num_tokens <= weight_only_max_tokens())
    return isinstance(proj, nnx.Linear) and proj.bias is None


def add_norm_applies(num_tokens: int, layers) -> bool:
    """Whether a step of ``num_tokens`` rows over ``layers`` (LlamaDecoderLayer) takes the fused
    path (module docstring). Decided at trace time."""
    return (num_tokens <= ADD_NORM_MAX_TOKENS and add_norm_enabled() and heads_mesh() is None
            and all(_projection_ok(layer.self_attn.o_proj, num_tokens)
                    and _projection_ok(layer.mlp.down_proj, num_tokens) for layer in layers))


def projection_partials(proj, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """x [T, I] -> (partials [S, T, O] float32, scale [O] or None): ``proj(x)`` before the sum
    over its S splits of I (``split_k_for``) and, for an fp8 layer, before its weight scale.
    ``proj`` must pass ``_projection_ok``."""
    from jaxllm.models.fp8 import Fp8Linear

    T, I = x.shape
    S = split_k_for(I)
    xs = x.reshape(T, S, I // S)
    if isinstance(proj, Fp8Linear):  # weight [O, I] e4m3, upcast in the dot (W8A16)
        w = proj.weight[...]
        p = jnp.einsum("tsk,osk->sto", xs, w.reshape(w.shape[0], S, I // S).astype(x.dtype),
                       preferred_element_type=jnp.float32)
        return p, proj.weight_scale[...]
    w = proj.kernel[...]  # [I, O]
    p = jnp.einsum("tsk,sko->sto", xs, w.reshape(S, I // S, w.shape[1]).astype(x.dtype),
                   preferred_element_type=jnp.float32)
    return p, None


def add_and_norm(norm, residual: jax.Array, pending) -> tuple[jax.Array, jax.Array]:
    """(residual + pending, norm(residual + pending)) in one kernel; ``pending`` is a
    ``projection_partials`` pair, or None: (residual, norm(residual)). ``norm``: an RMSNorm."""
    if pending is None:
        return residual, norm(residual)
    from pallas_kernels.add_rms_norm import add_rms_norm

    partials, scale = pending
    return add_rms_norm(partials, residual, norm.weight[...], eps=norm.eps, scale=scale,
                        interpret=jax.default_backend() != "gpu")
