"""Fused projections: q/k/v as one GEMM (``qkv_proj``), gate/up as one GEMM (``gate_up_proj``).

vLLM's QKVParallelLinear / MergedColumnParallelLinear, the JAX way. At batch 1 a decode step's
GEMMs are small and each costs a launch and a tail beyond its bytes; fusing the projections
that read the same input makes 7 GEMMs a layer into 4, and with ``quantization="fp8"`` the
shared input is quantized once instead of three times (q/k/v) and twice (gate/up).

Dimension keys: T tokens, I input features, A the axis tensor parallelism splits, C within it.

``FusedLinear`` computes y[T, A, C] = x[T, I] @ W with W laid out so that tp shards split A and
each shard's slice is contiguous (``sharding/rules.py``: one local GEMM per shard, no gather):

  qkv_proj      A = K (KV heads of the built model), C = (G + 2) * D: per KV head, its G query
                heads then its k head then its v head. q head h = k * G + g, the GQA mapping.
  gate_up_proj  A = F (intermediate), C = 2: (gate, up) of each channel side by side.

Params, dense: ``kernel [I, A, C]`` (nnx.Linear's [in, out] with out split in two axes),
``bias [A, C]``. fp8: ``weight [A, C, I]`` e4m3 (HF's [out, in], I contiguous, as
``Fp8Linear``), ``weight_scale [A, C]`` per output channel (``[A, C, KB]`` per channel and K
block in a block-wise checkpoint: laid out as the weight), ``input_scale []`` with static
activation scales (the max of the fused layers' scales, as vLLM does), ``bias [A, C]``.

The loaders and orbax checkpoints keep HF's separate projections; ``fuse_projections`` builds the
fused model from a loaded one on the devices (each shard fuses its own slices), and
``unfuse_tensor`` splits a fused param back for ``model_to_hf_tensors``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FUSED_LINEARS = ("qkv_proj", "gate_up_proj")
# What each fused projection is made of, in order.
PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fused_shape(name: str, config: Any) -> tuple[int, int]:
    """(A, C) of the fused projection ``name`` for a built model's config."""
    if name == "qkv_proj":
        K, D = config.num_key_value_heads, config.head_dim
        return K, (config.num_attention_heads // K + 2) * D
    return config.intermediate_size, 2


def part_widths(name: str, config: Any) -> tuple[int, ...]:
    """Each part's share of C: (G*D, D, D) for qkv, (1, 1) for gate_up."""
    if name == "qkv_proj":
        D = config.head_dim
        return (config.num_attention_heads // config.num_key_value_heads * D, D, D)
    return (1, 1)


class FusedLinear(nnx.Module):
    """y[T, A, C] = x[T, I] @ W (+ bias); fp8 (W8A8, per-token activations) when ``fp8``."""

    def __init__(self, in_features: int, groups: tuple[int, int], *, use_bias: bool, dtype,
                 fp8: bool = False, static_input_scale: bool = False,
                 block_k: int | None = None, rngs: nnx.Rngs | None = None):
        self.in_features, self.groups, self.block_k = in_features, tuple(groups), block_k
        A, C = self.groups
        if fp8:
            from pallas_kernels.fp8_matmul import FP8

            self.kernel = None
            self.weight = nnx.Param(jnp.zeros((A, C, in_features), FP8))
            blocks = () if block_k is None else (-(-in_features // block_k),)
            self.weight_scale = nnx.Param(jnp.ones((A, C, *blocks), jnp.float32))
            self.input_scale = nnx.Param(jnp.ones((), jnp.float32)) if static_input_scale else None
        else:
            rngs = rngs if rngs is not None else nnx.Rngs(0)
            self.kernel = nnx.Param(nnx.initializers.normal(0.02)(
                rngs.params(), (in_features, A, C), dtype))
            self.weight = self.weight_scale = self.input_scale = None
        self.bias = nnx.Param(jnp.zeros((A, C), dtype)) if use_bias else None

    def __call__(self, x: jax.Array, norm: tuple[jax.Array, float] | None = None) -> jax.Array:
        """x [T, I] -> [T, A, C] in x's dtype. The weight is viewed as 2-D ([I, A*C] / [A*C, I]):
        a bitcast, and per tp shard a contiguous block (A is the split axis). ``norm`` = (g,
        eps), fp8 only: the layer's input is RMSNorm(x) with weight g (``fp8_linear``'s
        ``norm``: folded into the skinny kernel where it runs, see ``qx_norm_folds``)."""
        (A, C), I, T = self.groups, self.in_features, x.shape[0]
        if norm is not None and self.kernel is not None:
            raise ValueError("FusedLinear(norm=...) folds the norm into fp8 layers only.")
        if self.kernel is not None:
            y = jnp.dot(x, self.kernel[...].astype(x.dtype).reshape(I, A * C))
        else:
            from jaxllm.models.fp8 import fp8_linear

            scale = None if self.input_scale is None else self.input_scale.get_value()
            ws = self.weight_scale[...]
            y = fp8_linear(x, self.weight[...].reshape(A * C, I),
                           ws.reshape(A * C, *ws.shape[2:]), scale, block_k=self.block_k,
                           norm=norm)
        y = y.reshape(T, A, C)
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    def split_k(self, x: jax.Array, parts: int) -> jax.Array | None:
        """x [T, I] -> [parts * T, A, C] float32: the products of ``parts`` equal slices of the
        input features (rows p * T + t), whose sum is ``__call__(x)`` before its rounding to x's
        dtype; the consumer sums them (the decode kernel's ``qkv_parts``), so the GEMM's own
        split-K sum is no kernel of its own. None where it does not apply: a bias, ``parts``
        not dividing I, block-wise fp8 scales, fp8 activations (W8A8 above
        ``weight_only_max_tokens``), or steps that ``JAXLLM_FP8_SKINNY_MGPU_WO`` / ``_QX``
        send to the skinny Mosaic kernel (the whole GEMM goes there)."""
        (A, C), I, T = self.groups, self.in_features, x.shape[0]
        if self.bias is not None or I % parts or self.block_k is not None:
            return None
        xs = x.reshape(T, parts, I // parts)
        if self.kernel is not None:
            w = self.kernel[...].astype(x.dtype).reshape(parts, I // parts, A * C)
            y = jnp.einsum("tpk,pkn->ptn", xs, w, preferred_element_type=jnp.float32)
        else:
            from jaxllm.models.fp8 import (skinny_mgpu_qx_takes, skinny_mgpu_wo_takes_all,
                                           weight_only_max_tokens)

            if (T > weight_only_max_tokens() or skinny_mgpu_wo_takes_all()
                    or (self.input_scale is None and skinny_mgpu_qx_takes(T))):
                return None  # W8A8, or the whole GEMM in the skinny Mosaic kernel
            w = self.weight[...].reshape(A * C, parts, I // parts).astype(x.dtype)
            y = jnp.einsum("tpk,npk->ptn", xs, w, preferred_element_type=jnp.float32)
            y = y * self.weight_scale[...].reshape(A * C).astype(jnp.float32)
        return y.reshape(parts * T, A, C)


# ----------------------------------------------------------------------------------------------
# Separate projections -> fused, and back


def _fuse_leaf(name: str, leaf: str, parts: list[jax.Array], widths: tuple[int, ...],
               A: int) -> jax.Array:
    """The fused value of one leaf from its parts' values (separate layouts, see the docstring)."""
    if leaf == "weight_scale" and parts[0].ndim == 2:  # block-wise [O, KB]: as the weight
        leaf = "weight"
    if leaf == "input_scale":
        return functools.reduce(jnp.maximum, parts)
    if name == "gate_up_proj":  # parts share every axis: stack a new C axis
        axis = {"kernel": -1, "weight": 1}.get(leaf, -1)  # bias / weight_scale [F] -> [F, 2]
        return jnp.stack(parts, axis=axis)
    if leaf == "kernel":  # [I, w*A] each -> [I, A, sum w]
        return jnp.concatenate([p.reshape(p.shape[0], A, w) for p, w in zip(parts, widths)], 2)
    if leaf == "weight":  # [w*A, I] each -> [A, sum w, I]
        return jnp.concatenate([p.reshape(A, w, p.shape[-1]) for p, w in zip(parts, widths)], 1)
    return jnp.concatenate([p.reshape(A, w) for p, w in zip(parts, widths)], 1)  # bias, scale


def unfuse_tensor(path: tuple, value: np.ndarray, config: Any) -> list[tuple[tuple, np.ndarray]]:
    """A fused param -> its parts' (path, value) in the separate layouts (inverse of fusing)."""
    owner, leaf = path[-2], path[-1]
    widths = part_widths(owner, config)
    kind = "weight" if leaf == "weight_scale" and value.ndim == 3 else leaf  # block-wise
    if leaf == "input_scale":
        return [(path[:-2] + (p, leaf), value) for p in PARTS[owner]]
    if owner == "gate_up_proj":
        axis = {"kernel": -1, "weight": 1}.get(kind, -1)
        pieces = [np.take(value, i, axis=axis) for i in range(2)]
    else:
        bounds = np.cumsum(widths)[:-1]
        axis = {"kernel": 2, "weight": 1}.get(kind, 1)
        pieces = [p.reshape(p.shape[0], -1) if kind == "kernel"
                  else p.reshape(-1, p.shape[-1]) if kind == "weight" else p.reshape(-1)
                  for p in np.split(value, bounds, axis=axis)]
    return [(path[:-2] + (p, leaf), v) for p, v in zip(PARTS[owner], pieces)]


@functools.lru_cache(maxsize=64)
def _fuse_fn(name: str, leaf: str, widths: tuple[int, ...], A: int, out_sharding: Any):
    return jax.jit(lambda *parts: _fuse_leaf(name, leaf, list(parts), widths, A),
                   out_shardings=out_sharding)


def fuse_projections(model: nnx.Module, parallel: Any = None, *, consume: bool = False
                     ) -> nnx.Module:
    """The same model with q/k/v and gate/up fused (``FusedLinear``); a fused model as is.

    Runs on the devices, one param at a time: each fused leaf is one jitted concatenate placed
    by ``parallel`` (a ``sharding.rules.ModelSharding``; None: where its parts are), so each tp
    shard fuses its own slices. ``consume``: delete each part as soon as its fused leaf exists,
    so the peak is the model plus one layer's projections (the caller must own the model: its
    projection arrays are unusable afterwards). Without it, the parts live as long as the
    caller's reference to ``model``.
    """
    config = model.config
    if config.fused_projections:
        return model
    fused_config = dataclasses.replace(config, fused_projections=True)
    cls = type(model)
    abstract = nnx.eval_shape(lambda: cls(fused_config, dtype=model.dtype, rngs=nnx.Rngs(0),
                                          attention_backend=model.attention_backend))
    src = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model))}
    graphdef, state = nnx.split(abstract)
    new = []
    for path, var in nnx.to_flat_state(state):
        path = tuple(path)
        owner, leaf = path[-2] if len(path) > 1 else None, path[-1]
        if owner not in FUSED_LINEARS:
            new.append((path, var.replace(src[path].get_value())))
            continue
        parts = [src[path[:-2] + (p, leaf)].get_value() for p in PARTS[owner]]
        A = fused_shape(owner, config)[0]
        target = var.get_value()
        sharding = parallel.path_sharding(path, target.shape) if parallel is not None else None
        value = _fuse_fn(owner, leaf, part_widths(owner, config), A, sharding)(*parts)
        if consume:
            for p in parts:
                p.delete()
        new.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(new))
