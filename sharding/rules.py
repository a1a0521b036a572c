"""Tensor-parallel partition rules for the Llama family's params and the paged KV cache.

Megatron layout over the ``tp`` mesh axis:
  q/k/v, gate/up   column-parallel: kernel [E, out] split on out (each shard owns whole heads)
  qkv, gate_up     fused (jaxllm/models/fused.py): kernel [E, A, C] split on A (KV heads with
                   their query heads; intermediate channels); fp8 weight [A, C, E] and
                   bias / weight_scale [A, C] likewise on A (block-wise fp8: weight_scale
                   [A, C, KB] on A; Fp8Linear's [out, KB] on out, or on KB row-parallel, which
                   must keep whole K blocks a shard)
  o, down          row-parallel:    kernel [in, E] split on in; the partial sums meet in one
                                    all-reduce per block (attention, MLP), inserted by XLA's SPMD
                                    partitioner where the row-parallel matmul's output is needed
  embed_tokens     vocab-parallel [V, E] split on V (masked local lookup + all-reduce)
  lm_head          vocab-parallel [E, V] split on V (logits come out split on V)
  norms            replicated
  KV cache         [P, B, K, D] split on K (each shard holds its own KV heads)

KV heads: with tp <= K the K heads are split (K % tp == 0). With tp > K each KV head is
replicated tp / K times (as vLLM does), so every shard still holds exactly one KV head and its
H / tp query heads attend to it; the model is built with K' = tp KV heads, and k_proj / v_proj
are expanded on the host as they load. q head h uses KV head h // (H / K') = h // (H / K) after
the expansion, so the attention is unchanged.

This is the one table to change: params are matched by their HF path (the names the loaders use).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllm.config import ModelConfig
from jaxllm.models.fused import FUSED_LINEARS

from sharding.mesh import TP

logger = logging.getLogger("jaxllm")

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


def kv_head_layout(num_heads: int, num_kv_heads: int, tp: int) -> tuple[int, int]:
    """(KV heads the sharded model holds, replication factor of each original KV head).

    Raises ValueError naming the numbers when tp does not fit the heads.
    """
    if num_heads % tp:
        raise ValueError(
            f"tensor_parallel_size ({tp}) must divide num_attention_heads ({num_heads}); "
            f"choose a divisor of {num_heads}.")
    if num_kv_heads % tp == 0:
        return num_kv_heads, 1
    if tp % num_kv_heads == 0:
        return tp, tp // num_kv_heads
    raise ValueError(
        f"tensor_parallel_size ({tp}) and num_key_value_heads ({num_kv_heads}) do not fit: tp must "
        f"divide the KV heads, or be a multiple of them (each KV head is then replicated tp / "
        f"{num_kv_heads} times).")


def param_spec(path: tuple, shape: tuple[int, ...], tp: int) -> P:
    """PartitionSpec of the param at ``path`` (NNX state path, e.g. ('model', 'layers', 3,
    'self_attn', 'q_proj', 'kernel')) under tp shards."""
    owner = path[-2]
    if tp == 1:
        return P()
    # By rank, not by leaf name, so extra per-layer leaves (a quantized kernel's per-channel
    # scale [out], a scalar scale) follow their kernel's split or stay replicated.
    if owner in FUSED_LINEARS:  # split on A: kernel [E, A, C], weight [A, C, E], bias / scale [A, C]
        if len(shape) == 3:
            return P(None, TP, None) if path[-1] == "kernel" else P(TP, None, None)
        return P(TP, None) if len(shape) == 2 else P()  # input_scale [] whole
    if path[-1] == "weight" and owner in COLUMN + ROW:  # fp8 weight: [out, in] (HF layout)
        return P(TP, None) if owner in COLUMN else P(None, TP)
    if path[-1] == "weight_scale" and len(shape) == 2:  # block-wise fp8: [out, in blocks]
        return P(TP, None) if owner in COLUMN else P(None, TP)
    if owner in COLUMN:  # kernel [E, out], bias / per-channel scale [out]
        if len(shape) == 2:
            return P(None, TP)
        return P(TP) if len(shape) == 1 and shape[0] % tp == 0 else P()
    if owner in ROW:  # kernel [in, E]; bias [E] replicated (added once, after the all-reduce)
        return P(TP, None) if len(shape) == 2 else P()
    if owner == "embed_tokens":
        return P(TP, None) if len(shape) == 2 and shape[0] % tp == 0 else P()
    if owner == "lm_head":
        return P(None, TP) if len(shape) == 2 and shape[-1] % tp == 0 else P()
    return P()  # norms, q_norm / k_norm


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """Where one program's params and KV cache live: a 1-D ``("tp",)`` mesh and the rules above.

    The loaders take it as ``parallel=``: ``adapt_config`` gives the structure to build (KV heads
    expanded when replicated), ``adapt_tensors`` expands k_proj / v_proj on the host stream, and
    ``state_path_sharding`` says where each param goes: the loader puts each tensor straight
    into its shards (each device reads only its block; nothing whole is put on any one device;
    jaxllm/loading/weights.py).
    """

    mesh: Mesh
    config: ModelConfig  # the checkpoint's config (original KV heads)
    # Restricts the params that are placed (pipeline stages hold only their layers); None: all.
    layers: range | None = None

    @property
    def tp(self) -> int:
        return self.mesh.devices.size

    @property
    def kv_layout(self) -> tuple[int, int]:
        c = self.config
        return kv_head_layout(c.num_attention_heads, c.num_key_value_heads, self.tp)

    @property
    def num_kv_heads(self) -> int:
        """KV heads of the sharded model (and of its cache)."""
        return self.kv_layout[0]

    def validate(self) -> None:
        c, tp = self.config, self.tp
        self.kv_layout  # heads
        if c.intermediate_size % tp:
            raise ValueError(
                f"tensor_parallel_size ({tp}) must divide intermediate_size ({c.intermediate_size}).")
        if c.weight_block_size:  # a row-parallel shard must hold whole K blocks of scales
            bk = c.weight_block_size[1]
            for name, k in (("o_proj", c.num_attention_heads * c.head_dim),
                            ("down_proj", c.intermediate_size)):
                if (k // tp) % bk:
                    raise ValueError(
                        f"tensor_parallel_size ({tp}) splits {name}'s {k} input features into "
                        f"{k // tp} a shard, not a multiple of the checkpoint's weight block "
                        f"({bk}): its block scales cannot be split; use a tensor_parallel_size "
                        f"that keeps whole blocks.")
        if c.vocab_size % tp:
            logger.warning("vocab_size %d is not divisible by tensor_parallel_size %d: the "
                           "embedding and lm_head are replicated, not vocab-parallel.",
                           c.vocab_size, tp)

    def adapt_config(self, config: ModelConfig) -> ModelConfig:
        k, r = self.kv_layout
        return config if r == 1 else dataclasses.replace(config, num_key_value_heads=k)

    def adapt_tensors(self, named: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        """Replicates each KV head's rows of k_proj / v_proj (HF layout [K*D, E], bias and fp8
        weight_scale [K*D]); a per-tensor fp8 input_scale passes as it is."""
        _, r = self.kv_layout
        if r == 1:
            yield from named
            return
        D = self.config.head_dim
        for name, tensor in named:
            if ".k_proj." in name or ".v_proj." in name:
                def expand(tensor=tensor):
                    w = np.asarray(tensor() if callable(tensor) else tensor)
                    if w.ndim == 0 or w.shape[0] % D:  # a per-tensor scale: not per head
                        return w
                    heads = w.reshape(-1, D, *w.shape[1:])  # [K, D, (E)]
                    return np.repeat(heads, r, axis=0).reshape(-1, *w.shape[1:])
                yield name, expand
            else:
                yield name, tensor

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def replicated(self) -> NamedSharding:
        return self.sharding(P())

    @property
    def kv_sharding(self) -> NamedSharding:
        """KV pages [P, B, K, D]: split on the KV heads."""
        return self.sharding(P(None, None, TP))  # as XLA writes it (no trailing None): one cache key

    def state_path_sharding(self, path: tuple, shape: tuple[int, ...]) -> NamedSharding:
        return self.sharding(param_spec(path, shape, self.tp))


@dataclasses.dataclass(frozen=True)
class ModelSharding:
    """A replica's placement: ``stages[s]`` is stage s's TensorParallel (its tp mesh and layers).

    Without pipelining there is one stage holding every layer. With pp stages, layer i's params
    and KV cache live on the stage whose range holds i; the embedding on stage 0; the final norm
    and lm_head on the last stage (a tied embedding is copied there by the pipeline runner).
    """

    stages: tuple[TensorParallel, ...]
    config: ModelConfig

    @classmethod
    def build(cls, replica, config: ModelConfig) -> "ModelSharding":
        """replica: a sharding.mesh.ReplicaMesh ([pp, tp] devices)."""
        from sharding.mesh import stage_layers

        ranges = stage_layers(config.num_hidden_layers, replica.pp)
        stages = tuple(TensorParallel(replica.stage(s), config, ranges[s])
                       for s in range(replica.pp))
        for st in stages:
            st.validate()
        return cls(stages, config)

    @property
    def pp(self) -> int:
        return len(self.stages)

    @property
    def tp(self) -> int:
        return self.stages[0].tp

    @property
    def num_kv_heads(self) -> int:
        return self.stages[0].num_kv_heads

    def adapt_config(self, config: ModelConfig) -> ModelConfig:
        return self.stages[0].adapt_config(config)

    def adapt_tensors(self, named):
        return self.stages[0].adapt_tensors(named)

    def stage_of_path(self, path: tuple) -> int:
        if "layers" in path:
            layer = path[path.index("layers") + 1]
            return next(s for s, st in enumerate(self.stages) if layer in st.layers)
        if "embed_tokens" in path:
            return 0
        return self.pp - 1  # final norm, lm_head

    def path_sharding(self, path: tuple, shape: tuple[int, ...]) -> NamedSharding:
        """Where the param at ``path`` lives: its stage's mesh, split by the rules above."""
        return self.stages[self.stage_of_path(path)].state_path_sharding(path, shape)

    @property
    def kv_replication(self) -> int:
        return self.stages[0].kv_layout[1]

    def annotate(self, abstract: Any) -> Any:
        """An abstract model (ShapeDtypeStruct leaves) with each leaf's target sharding, for
        restoring a checkpoint straight into the shards."""
        from flax import nnx

        graphdef, state = nnx.split(abstract)
        flat = []
        for path, v in nnx.to_flat_state(state):
            path = tuple(path)
            x = v.get_value()
            st = self.stages[self.stage_of_path(path)]
            flat.append((path, v.replace(jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=st.state_path_sharding(path, x.shape)))))
        return nnx.merge(graphdef, nnx.from_flat_state(flat))

    def for_config(self, config: ModelConfig) -> "ModelSharding":
        return self
