"""Load a local HF model folder: config.json + ``*.safetensors`` (single file or sharded).

Files are opened with ``safe_open`` (memory-mapped); tensors are read one at a time, when the
weight mapper asks for them, so peak host memory is about one tensor, not the checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flax import nnx
from safetensors import safe_open

from jaxllm.config import ModelConfig, resolve_dtype
from jaxllm.loading.hf_config import model_config_from_hf
from jaxllm.loading.weights import LazyTensor, TensorLike, abstract_for, load_params_from_tensors

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's files: those the shard index names, else model.safetensors, else any *.safetensors."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / f for f in dict.fromkeys(weight_map.values())]  # unique, in index order
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shards that are not in the folder: {', '.join(absent)}")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors weights in {folder} (GGUF files go through the GGUF loader).")
    return files


def iter_safetensors(files: list[Path], lazy: bool = False) -> Iterator[tuple[str, TensorLike]]:
    """Yields ``(name, getter)`` per tensor; call the getter before advancing (the file closes after).

    lazy: the getter returns a ``LazyTensor`` that reads only the slices asked for (sharded
    loading: each device's slice comes straight from the memory-mapped file)."""
    for path in files:
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                if lazy:
                    def get(f=f, name=name):
                        sl = f.get_slice(name)
                        return LazyTensor(sl, tuple(sl.get_shape()))
                    yield name, get
                else:
                    yield name, (lambda f=f, name=name: f.get_tensor(name))


def load_hf_config(path: str | os.PathLike) -> tuple[Any, ModelConfig]:
    """(transformers config, ModelConfig) of a local HF folder; FileNotFoundError naming what is absent."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"Model path {str(folder)!r} does not exist.")
    if not folder.is_dir():
        raise FileNotFoundError(f"Model path {str(folder)!r} is not a folder (expected an HF model folder).")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"Model folder {str(folder)!r} has no config.json; expected an HF model folder "
            "(config.json + *.safetensors).")
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    return hf_config, model_config_from_hf(hf_config)


def load_hf_folder(path: str | os.PathLike, dtype: Any = "auto",
                   attention_backend: str = "reference",
                   parallel: Any = None) -> tuple[ModelConfig, nnx.Module]:
    """Loads a local HF folder -> (ModelConfig, concrete model with its weights in ``dtype``).

    parallel: a ``sharding.rules.ModelSharding``; each tensor goes straight into its shards.
    """
    dtype = resolve_dtype(dtype)
    _, config = load_hf_config(path)
    files = safetensors_files(Path(path))
    if config.quantization == "fp8":  # pre-quantized: e4m3 weights and their scales as they are
        import dataclasses

        from jaxllm.loading.fp8_checkpoint import (adapt_fp8_tensors, iter_safetensors_fp8,
                                                   read_kv_cache_scales)

        kv_scales = read_kv_cache_scales(files, config.num_hidden_layers)
        if kv_scales is not None:
            config = dataclasses.replace(config, kv_cache_scales=kv_scales)

        tensors = adapt_fp8_tensors(iter_safetensors_fp8(files), config)
    else:
        tensors = iter_safetensors(files, lazy=parallel is not None)
    model = load_params_from_tensors(
        abstract_for(config, dtype, attention_backend, parallel), config, tensors, dtype,
        parallel=parallel)
    return config, model
