"""LoRA in the model: each layer's adapter slots, and the delta every projection adds.

``attach_lora(model, max_loras, max_rank)`` gives each attention and MLP block a
``lora`` module holding, per projection of ``peft.TARGETS``, ``a [in, L, R]`` and
``b [L, R, out]`` (L = max_loras slots, R = max_lora_rank; an adapter of rank r < R fills
the first r columns, zeros the rest; the scaling is folded into b). They are params of the
model like any other (``ModelRunner`` passes them to every program), so loading an adapter
into a slot replaces two arrays per projection and compiles nothing. Both are laid out so
that ``A_all = a.reshape(in, L * R)`` and ``B_all = b.reshape(L * R, out)`` are plain
row-major matrices: the GEMMs take them as stored, no transpose or cast a step.

A step gives each token its sequence's slot (``StepInputs.lora_slots``, -1: none) and a
projection adds, for every token at once,

    delta = mask(x @ A_all) @ B_all       (x @ A_all: [T, L * R]; mask keeps the token's slot)

two small dense GEMMs in the model's dtype (float32 accumulation) instead of a gather of
per-token weights (vLLM's punica shrink / expand kernels): the work grows with L * R, a few
dozen columns at vLLM's defaults (max_loras 1, rank 16), and a batch of mixed adapters is
one program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.lora.peft import TARGETS, target_dims


# The axis of each side's slots (a [in, L, R], b [L, R, out]): where a slot is written.
SLOT_AXIS = {"a": 1, "b": 0}


class LoraPair(nnx.Module):
    """One projection's slots: ``a [in, L, R]``, ``b [L, R, out]`` (scaling in b)."""

    def __init__(self, in_features: int, out_features: int, max_loras: int, max_rank: int,
                 dtype, sharding=None):
        def zeros(shape):
            x = jnp.zeros(shape, dtype)
            return x if sharding is None else jax.device_put(x, sharding)

        self.a = nnx.Param(zeros((in_features, max_loras, max_rank)))
        self.b = nnx.Param(zeros((max_loras, max_rank, out_features)))

    def __call__(self, x: jax.Array, slots: jax.Array) -> jax.Array:
        """x [T, in], slots [T] int32 (-1: no adapter) -> delta [T, out] in x's dtype: two
        GEMMs in x's dtype accumulating in float32, the shrink's output masked to each token's
        slot and rounded to x's dtype between them."""
        a, b = self.a[...], self.b[...]
        I, L, R = a.shape
        xa = jnp.dot(x, a.reshape(I, L * R).astype(x.dtype), preferred_element_type=jnp.float32)
        mine = slots[:, None] == jnp.arange(L * R, dtype=slots.dtype) // R  # [T, L * R]
        xa = jnp.where(mine, xa, 0.0).astype(x.dtype)
        return jnp.dot(xa, b.reshape(L * R, -1).astype(x.dtype),
                       preferred_element_type=jnp.float32).astype(x.dtype)


class LoraModules(nnx.Module):
    """A block's projections' slots, one ``LoraPair`` attribute per projection name."""

    def __init__(self, dims: dict[str, tuple[int, int]], max_loras: int, max_rank: int, dtype,
                 sharding=None):
        self.names = tuple(dims)
        for name, (i, o) in dims.items():
            setattr(self, name, LoraPair(i, o, max_loras, max_rank, dtype, sharding))

    def delta(self, name: str, x: jax.Array, slots: jax.Array) -> jax.Array:
        return getattr(self, name)(x, slots)


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def attach_lora(model: nnx.Module, config: ModelConfig, max_loras: int, max_rank: int,
                dtype, sharding=None) -> None:
    """Gives every layer of ``model`` (a ``LlamaForCausalLM``) zeroed LoRA slots for all of
    ``peft.TARGETS``, in place. ``config``: the built model's (its KV heads); ``sharding``:
    where the slots live (tensor parallelism: replicated over the mesh; None: the default
    device)."""
    dims = target_dims(config)
    assert set(ATTENTION + MLP) == set(TARGETS)
    for layer in model.model.layers:
        # nnx.data: the attribute was None (static) in the model as built.
        layer.self_attn.lora = nnx.data(LoraModules({n: dims[n] for n in ATTENTION}, max_loras,
                                                    max_rank, dtype, sharding))
        layer.mlp.lora = nnx.data(LoraModules({n: dims[n] for n in MLP}, max_loras, max_rank,
                                              dtype, sharding))


def lora_param_path(layer: int, module: str, side: str) -> tuple:
    """The nnx state path of layer ``layer``'s ``module`` slots (side "a" or "b")."""
    block = "self_attn" if module in ATTENTION else "mlp"
    return ("model", "layers", layer, block, "lora", module, side)
