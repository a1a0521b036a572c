"""HF-named tensors -> a Llama-family NNX model. Shared by the safetensors and GGUF loaders.

A loader produces ``(hf_name, tensor)`` pairs in HF's naming and layout
(``model.layers.3.self_attn.q_proj.weight`` as ``[out, in]``) and calls
``load_params_from_tensors``; this module owns the one mapping from those names to the NNX
params, the transposes, the dtype conversion and the error messages.

Memory: tensors are consumed one at a time; each is placed on the device(s) as read (HF layout,
its file's dtype; a sharded param's blocks each read by their device alone) and transposed and
cast there, so at most one tensor's host copy exists beside the model's device arrays (and, on
the devices, one tensor's transient second copy). A tensor may also arrive already placed (a
``jax.Array`` in the file's layout: the safetensors loader copies a plain checkpoint's tensors
ahead, beside the config's read) and is then only transposed and cast. The devices do
the transposes because numpy's strided transpose of a bf16 array ran at ~170 MB/s: 94 s of a
16 GB checkpoint's load (Llama-3-8B shape, H200 host, 2026-12-04; benchmarks/RESULTS.md). Only a
caller's ``place`` gets the tensor in the model's layout and dtype from the host.

The copies run on one thread, one after the other. Four copy threads placed the 8B
checkpoint in 2.3-2.7 s against 3.9 s (H200), but the device memory in use after such a load
varied run to run by up to ~1 GB, and the KV page count was then sized from the allocator's
figure, so it changed between restarts and the restarts missed XLA's persistent compilation
cache (compiles of 30-33 s against 18-23 s; benchmarks/RESULTS.md, rerun of 2026-12-04
(13:50)). The engine now sizes the pool from its live arrays' bytes (``device_array_bytes``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.config import ModelConfig

# A tensor, or a zero-argument callable returning it (so unexpected tensors are never read).
TensorLike = Union[np.ndarray, Callable[[], np.ndarray]]
PathParts = tuple[Union[str, int], ...]

# Buffers HF checkpoints sometimes carry that are recomputed here from the config.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")

# HF Linear weights are [out, in]; nnx.Linear kernels are [in, out].
_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 "lm_head", "score")  # score: a sequence classifier's head
# The projections of an fp8 model (jaxllm/models/fp8.py: weight [out, in] e4m3, weight_scale,
# input_scale): mapped by their own names, with quantized=True.
_FP8_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LazyTensor:
    """A tensor read on demand, one block at a time (a memory-mapped safetensors entry).

    ``reader[idx]`` reads only that block of the file (a slice of the file's memory-mapped view,
    ``safetensors_loader.mapped_tensors``), so a sharded placement reads each device's block
    straight from the file, in the file's layout and dtype: no host copy of the whole tensor
    exists (``load_params_from_tensors``).
    """

    def __init__(self, reader: Any, shape: tuple[int, ...]):
        self._reader, self.shape = reader, tuple(shape)

    def __getitem__(self, idx: Any) -> np.ndarray:
        idx = idx if isinstance(idx, tuple) else (idx,)
        idx = tuple(idx) + (slice(None),) * (len(self.shape) - len(idx))
        return np.ascontiguousarray(self._reader[idx])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[()]
        return out if dtype is None else out.astype(dtype)


# Checkpoints that store projections packed (Phi-3: ``self_attn.qkv_proj``, ``mlp.gate_up_proj``)
# are split into HF's separate names as they stream in: rows [q; k; v] and [gate; up].
_PACKED = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
           "mlp.gate_up_proj": ("gate_proj", "up_proj")}


class _Rows:
    """A reader of rows [start, start + n) of a tensor (a LazyTensor's reader): a packed
    projection's part, read one block at a time as the whole one would be."""

    def __init__(self, base: Any, start: int, n: int):
        self.base, self.start, self.n = base, start, n

    def __getitem__(self, idx: tuple) -> np.ndarray:
        first = idx[0]
        if isinstance(first, slice):
            a, b, step = first.indices(self.n)
            first = slice(self.start + a, self.start + b, step)
        else:
            first = self.start + (first % self.n)
        return np.asarray(self.base[(first, *idx[1:])])


def split_packed(named_tensors: Iterable[tuple[str, TensorLike]], config: ModelConfig
                 ) -> Iterable[tuple[str, TensorLike]]:
    """The stream with packed projections split into their parts (``_PACKED``); other tensors
    pass through untouched. A part of a placed ``jax.Array`` is sliced on its device."""
    H, K, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    widths = {"self_attn.qkv_proj": (H * D, K * D, K * D),
              "mlp.gate_up_proj": (config.intermediate_size,) * 2}
    for name, tensor in named_tensors:
        head, _, leaf = name.rpartition(".")
        packed = next((k for k in _PACKED if head.endswith("." + k)), None)
        if packed is None or leaf not in ("weight", "bias"):
            yield name, tensor
            continue
        arr = tensor() if callable(tensor) else tensor
        if arr.shape[0] != sum(widths[packed]):
            raise ValueError(f"Shape mismatch for tensor {name!r}: {sum(widths[packed])} rows "
                             f"expected ({' + '.join(map(str, widths[packed]))}), got "
                             f"{arr.shape[0]} (does config.json match the weights?).")
        prefix = head[: -len(packed)]
        start = 0
        for part, n in zip(_PACKED[packed], widths[packed]):
            part_name = f"{prefix}{packed.split('.')[0]}.{part}.{leaf}"
            if isinstance(arr, jax.Array):
                yield part_name, arr[start:start + n]
            else:
                yield part_name, LazyTensor(_Rows(arr, start, n), (n, *arr.shape[1:]))
            start += n


def hf_name_to_path(name: str, quantized: bool = False) -> tuple[PathParts, bool] | None:
    """HF tensor name -> (NNX state path, needs transpose); None for names that map nowhere.

    model.embed_tokens.weight                  -> (model, embed_tokens, embedding)
    model.layers.N.self_attn.q_proj.weight     -> (model, layers, N, self_attn, q_proj, kernel), transposed
    model.layers.N.self_attn.q_proj.bias       -> (..., q_proj, bias)
    model.layers.N.input_layernorm.weight      -> (..., input_layernorm, weight)
    lm_head.weight                             -> (lm_head, kernel), transposed
    """
    parts: list[Any] = [int(p) if p.isdigit() else p for p in name.split(".")]
    if len(parts) < 2:
        return None
    owner = parts[-2]
    if quantized and owner in _FP8_LINEAR_NAMES and parts[-1] in (
            "weight", "weight_scale", "input_scale"):
        return tuple(parts), False  # Fp8Linear keeps HF's names and [out, in] layout
    if parts[-1] not in ("weight", "bias"):
        return None
    if parts[-1] == "bias":
        return (tuple(parts), False) if owner in _LINEAR_NAMES else None
    if owner == "embed_tokens":
        return tuple(parts[:-1]) + ("embedding",), False
    if owner in _LINEAR_NAMES:
        return tuple(parts[:-1]) + ("kernel",), True
    if isinstance(owner, str) and owner.endswith("norm"):
        return tuple(parts), False
    return None


def path_to_hf_name(path: PathParts) -> str:
    """Inverse of ``hf_name_to_path`` (for error messages)."""
    *head, leaf = path
    leaf = {"kernel": "weight", "embedding": "weight"}.get(leaf, leaf)
    return ".".join(str(p) for p in (*head, leaf))


def _abstract_model(config: ModelConfig, dtype) -> nnx.Module:
    from jaxllm.models.registry import get_model_class

    cls = get_model_class(config.architecture)
    return nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0)))


def bind_parallel(parallel: Any, config: ModelConfig) -> Any:
    """A ``sharding.mesh.ReplicaMesh`` (devices only) -> its ``ModelSharding`` for ``config``."""
    return parallel.for_config(config) if parallel is not None else None


def model_to_hf_tensors(model: nnx.Module):
    """Yields an in-memory model's params as (HF name, host array in HF layout): the inverse of
    the loaders' stream, so a model already in memory can be re-placed by ``parallel`` rules."""
    from jaxllm.models.fused import FUSED_LINEARS, unfuse_tensor

    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(path)
        if "lora" in path:  # an engine's LoRA slots (jaxllm/lora): not the checkpoint's
            continue
        if len(path) > 1 and path[-2] in FUSED_LINEARS:  # split back into HF's projections
            host = np.asarray(jax.device_get(v.get_value()))
            for part_path, arr in unfuse_tensor(path, host, model.config):
                yield path_to_hf_name(part_path), (arr.T if path[-1] == "kernel" else arr)
            continue
        def get(v=v, transpose=path[-1] == "kernel"):
            arr = np.asarray(jax.device_get(v.get_value()))
            return arr.T if transpose else arr
        yield path_to_hf_name(path), get


def abstract_for(config: ModelConfig, dtype, attention_backend: str = "reference",
                 parallel: Any = None) -> nnx.Module:
    """The model's structure (eval_shape: allocates nothing), with the KV heads a sharded
    model holds when ``parallel`` replicates them (sharding/rules.py)."""
    from jaxllm.models.registry import get_model_class

    parallel = bind_parallel(parallel, config)
    built = parallel.adapt_config(config) if parallel is not None else config
    cls = get_model_class(config.architecture)
    return nnx.eval_shape(lambda: cls(built, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0),
                                      attention_backend=attention_backend))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _device_layout(x: jax.Array, transpose: bool, dtype: np.dtype,
                   sharding: NamedSharding | None) -> jax.Array:
    """A placed HF tensor in the model's layout and dtype, in ``sharding`` (None: one device).
    A sharded ``x`` is split as the target mirrored, so each device transposes its own block."""
    out = (x.T if transpose else x).astype(dtype)
    return out if sharding is None else jax.lax.with_sharding_constraint(out, sharding)


def _mirrored(sharding: NamedSharding, ndim: int) -> NamedSharding:
    """The sharding of a param's transpose: its PartitionSpec reversed."""
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*spec[::-1]))


def load_params_from_tensors(
    model: nnx.Module | None,
    config: ModelConfig,
    named_tensors: Iterable[tuple[str, TensorLike]],
    dtype: Any,
    *,
    place: Callable[[str, np.ndarray], jax.Array] | None = None,
    parallel: Any = None,
) -> nnx.Module:
    """Builds the model with its params taken from HF-named tensors.

    Args:
      model: the model structure, usually abstract (``nnx.eval_shape(lambda: Cls(config, ...))``,
        which allocates nothing); None builds it from ``config`` via the registry. Its param
        values are replaced; it is not mutated.
      config: the model's ModelConfig (for tied embeddings).
      named_tensors: ``(hf_name, tensor)`` pairs in HF names and layouts (Linear weights
        ``[out, in]``); ``tensor`` is a numpy array (any float dtype, incl. ml_dtypes bfloat16),
        a ``jax.Array`` already on the default device in that layout (default placement only:
        it is transposed and cast there), or a zero-argument callable returning one, called at
        most once, before the iterator advances. Rotary ``inv_freq`` buffers are ignored, as is ``lm_head.weight`` when
        embeddings are tied.
      dtype: the params' dtype (e.g. jnp.bfloat16).
      place: ``(hf_name, host_array) -> jax.Array`` puts one tensor, converted on the host to
        the model's layout and dtype, on the device(s). Default: the tensor goes to the default
        device as read and is transposed and cast there (module docstring).
      parallel: a ``sharding.rules.ModelSharding``: tensors are adapted (KV heads replicated
        when tp > KV heads) and each device reads its block of a tensor in the file's layout,
        transposed and cast on the devices into the param's shards (overrides ``place``).

    Returns the concrete model. Raises ValueError naming the tensor for an unexpected name, a
    shape mismatch (expected vs got, in HF layout) or a duplicate, and listing every missing one.
    """
    dtype = jnp.dtype(dtype)
    if model is None:
        model = _abstract_model(config, dtype)
    parallel = bind_parallel(parallel, config)
    named_tensors = split_packed(named_tensors, config)
    if parallel is not None:
        named_tensors = parallel.adapt_tensors(named_tensors)
    host_layout = place is not None and parallel is None  # a caller's place: the model's layout
    graphdef, state = nnx.split(model)
    targets: dict[PathParts, Any] = {tuple(p): v for p, v in nnx.to_flat_state(state)}
    loaded: dict[PathParts, jax.Array] = {}

    for name, tensor in named_tensors:
        if name.endswith(IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        if (config.embedding_only and not name.startswith("model.")
                and not (config.num_labels and name.startswith("score."))):
            name = "model." + name  # a headless checkpoint names the decoder's tensors bare
        mapped = hf_name_to_path(name, quantized=config.quantization is not None)
        if mapped is None or mapped[0] not in targets:
            raise ValueError(
                f"Unexpected tensor {name!r}: the {config.architecture} model has no such parameter "
                "(wrong architecture in config.json, or a checkpoint of a different model?).")
        path, transpose = mapped
        if path in loaded:
            raise ValueError(f"Tensor {name!r} appears twice in the checkpoint.")
        expected = tuple(targets[path].get_value().shape)
        expected_hf = expected[::-1] if transpose else expected
        arr = tensor() if callable(tensor) else tensor
        if not isinstance(arr, (LazyTensor, jax.Array)):
            arr = np.asarray(arr)
        if tuple(arr.shape) != expected_hf:
            raise ValueError(
                f"Shape mismatch for tensor {name!r}: expected {expected_hf}, got {tuple(arr.shape)} "
                "(does config.json match the weights?).")
        # The target dtype is the model's, except an fp8 model's e4m3 weights and float32
        # scales, which keep their own.
        target = np.dtype(targets[path].get_value().dtype if config.quantization is not None
                          else dtype)
        if host_layout:
            # One host copy in the model's layout and dtype, contiguous, for the caller's place.
            host = np.ascontiguousarray(arr.T if transpose else arr, dtype=target)
            if not host.flags.writeable:
                # Still a view of a memory-mapped file (nothing to transpose or cast): copied,
                # since a CPU device_put would alias the file's pages, which change (or fault)
                # if the file is rewritten.
                host = host.copy()
            del arr
            loaded[path] = place(name, host.reshape(expected))  # 0-d stays 0-d
            del host
            continue
        # Placed as the file lays it out (each device reading only its block of a sharded
        # param, in HF's layout: the target's split mirrored), then transposed and cast there.
        if (transpose and isinstance(arr, np.ndarray) and arr.ndim == 2
                and not arr.flags.c_contiguous and arr.T.flags.c_contiguous):
            # The model's layout already lies in memory (a model's own params handed back as
            # HF-layout views, model_to_hf_tensors): placed as it is, nothing transposed.
            arr, transpose, expected_hf = arr.T, False, expected
        if parallel is None:
            x = arr if isinstance(arr, jax.Array) else jax.device_put(np.asarray(arr))
            sharding = None
        else:
            sharding = parallel.path_sharding(path, expected)
            x = jax.make_array_from_callback(
                expected_hf, _mirrored(sharding, len(expected)) if transpose else sharding,
                lambda idx, a=arr: np.asarray(a[idx]))
        del arr
        loaded[path] = _device_layout(x, transpose, target, sharding)

    if config.embedding_only and ("lm_head", "kernel") in targets:
        # No lm_head in an embedding checkpoint: zeros, never read (a pooling engine takes
        # the hidden states).
        t = targets[("lm_head", "kernel")].get_value()
        sharding = parallel.path_sharding(("lm_head", "kernel"), t.shape) if parallel else None
        loaded[("lm_head", "kernel")] = jax.jit(
            functools.partial(jnp.zeros, t.shape, t.dtype), out_shardings=sharding)()
    missing = [path_to_hf_name(p) for p in targets if p not in loaded]
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise ValueError(f"Missing tensors in the checkpoint: {shown}.")

    new_state = nnx.from_flat_state(
        [(p, v.replace(loaded[p])) for p, v in nnx.to_flat_state(state)])
    return nnx.merge(graphdef, new_state)
