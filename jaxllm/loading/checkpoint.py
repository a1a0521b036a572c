"""Orbax save/restore of converted params, so a model's second start skips conversion.

A checkpoint folder holds:
  params/                 the NNX param state (orbax StandardCheckpointer, one array per param,
                          already in the serving dtype and our [in, out] layouts)
  jaxllm_checkpoint.json  what restore needs to rebuild the structure: ModelConfig, dtype, the
                          source it was converted from, the served name
  tokenizer/              the tokenizer (save_pretrained), so a GGUF's vocabulary is not
                          converted again either (written by ``jaxllm.loading.load_model``)

Converting is dequantizing / transposing / casting every tensor on the host; restoring reads the
finished arrays straight into place (``benchmarks/load_time.py`` measures both).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig

METADATA_FILE = "jaxllm_checkpoint.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class CheckpointMetadata:
    """The JSON file beside the params."""

    model_config: ModelConfig
    dtype: str  # e.g. "bfloat16"
    source: str  # the folder / GGUF the params were converted from
    name: str  # served model name
    # the quantization asked for at conversion (None, "fp8"); model_config.quantization says
    # what the params are (a pre-quantized checkpoint is fp8 either way)
    quantization: str | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "CheckpointMetadata":
        d = json.loads(text)
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"checkpoint format version {d.get('format_version')} is not {FORMAT_VERSION}; "
                "delete the checkpoint folder so it is written again.")
        d["model_config"] = _model_config_from_dict(d["model_config"])
        return cls(**d)


def _tuples(value: Any) -> Any:
    """JSON turns tuples into lists; ModelConfig wants them back as (hashable) tuples."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: _tuples(v) for k, v in d.items() if k in known})


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a complete checkpoint (metadata written last, so it marks completion)."""
    path = Path(path)
    return (path / METADATA_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def read_metadata(path: str | os.PathLike) -> CheckpointMetadata:
    return CheckpointMetadata.from_json((Path(path) / METADATA_FILE).read_text())


def save_params(model: nnx.Module, path: str | os.PathLike, *, model_config: ModelConfig,
                source: str = "", name: str = "", quantization: str | None = None) -> None:
    """Writes the model's params and the metadata to ``path``.

    The params share the model's dtype, except in an fp8 model: e4m3 projection weights with
    float32 scales beside the model-dtype embeddings and norms (orbax stores each leaf's dtype).

    ``path`` must not hold a checkpoint already (orbax refuses to overwrite; delete it first).
    The metadata file is written after the params finish, so a crash never leaves a folder that
    ``is_checkpoint`` accepts.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    state = nnx.state(model, nnx.Param)
    dtypes = {str(x.dtype) for x in jax.tree.leaves(state)}
    if model_config.quantization is None and len(dtypes) != 1:
        raise ValueError(f"expected one param dtype, found {sorted(dtypes)}")
    dtype = jnp.dtype(getattr(model, "dtype", None) or dtypes.pop()).name
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / PARAMS_DIR, nnx.to_pure_dict(state))
        ckptr.wait_until_finished()
    meta = CheckpointMetadata(model_config=model_config, dtype=dtype, source=str(source), name=name,
                              quantization=quantization)
    (path / METADATA_FILE).write_text(meta.to_json())


def abstract_model(config: ModelConfig, dtype: Any, attention_backend: str = "reference") -> nnx.Module:
    """The model's structure with ShapeDtypeStruct leaves (allocates nothing)."""
    from jaxllm.models.registry import get_model_class

    cls = get_model_class(config.architecture)
    return nnx.eval_shape(
        lambda: cls(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0), attention_backend=attention_backend))


def restore_params(abstract: nnx.Module, path: str | os.PathLike) -> nnx.Module:
    """Restores the params at ``path`` into the structure of ``abstract`` -> a concrete model.

    ``abstract`` comes from ``nnx.eval_shape`` (see ``abstract_model``); its leaves' shardings, if
    any, say where each param goes (the hook for sharded restore), else the default device.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(x: Any) -> jax.ShapeDtypeStruct:
        sharding = getattr(x, "sharding", None) or default
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    targets = jax.tree.map(target, nnx.to_pure_dict(params))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path / PARAMS_DIR, targets)
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest)


def load_checkpoint(path: str | os.PathLike,
                    attention_backend: str = "reference") -> tuple[CheckpointMetadata, nnx.Module]:
    """(metadata, concrete model) from a checkpoint folder written by ``save_params``."""
    meta = read_metadata(path)
    model = restore_params(abstract_model(meta.model_config, meta.dtype, attention_backend), path)
    return meta, model
