"""Load a local HF model folder: config.json + ``*.safetensors`` (single file or sharded).

Each file is memory-mapped and every tensor is a numpy view of its bytes (the format: an 8-byte
little-endian header length, a JSON header of ``{name: {dtype, shape, data_offsets}}``, then the
data): nothing is read until a consumer touches the view, a block of it reads only that block's
pages, and any thread can read it. safetensors' own numpy reader copies each tensor into a new
array first (one more pass over the checkpoint on the loading thread) and has no float8 dtype;
the views cost neither.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxllm.config import ModelConfig, resolve_dtype
from jaxllm.loading.hf_config import model_config_from_hf
from jaxllm.loading.weights import (IGNORED_SUFFIXES, LazyTensor, TensorLike, abstract_for,
                                    load_params_from_tensors)

logger = logging.getLogger("jaxllm")

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


# safetensors dtype names -> numpy (ml_dtypes for bfloat16 and the float8 formats).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
           "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}


def read_header(path: Path) -> tuple[dict, int]:
    """(the file's JSON header, the offset its data starts at); ValueError for a file too short,
    a header length past the file's end or a header that is not a JSON object."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its header length).")
        (n,) = struct.unpack("<Q", raw)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise ValueError(f"{path} is not a safetensors file (its header length {n} runs past "
                             f"the file's {size} bytes).")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file (its header is not JSON: "
                             f"{e}).") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is not a JSON object).")
    return header, 8 + n


def _tensor_entries(path: Path, header: dict, start: int, size: int
                    ) -> list[tuple[str, Any, tuple[int, ...], int, int]]:
    """(name, numpy dtype, shape, first byte, end byte) of every tensor, checked against the
    file, in the order of their bytes."""
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES.get(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            a, b = (start + int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry "
                             f"{info!r}.") from None
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']!r}, which "
                             "jaxllm does not read.")
        if (min(shape, default=0) < 0 or not start <= a <= b <= size
                or b - a != math.prod(shape) * np.dtype(dtype).itemsize):
            raise ValueError(f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) has "
                             f"bytes [{a}, {b}) of a {size}-byte file: the file is truncated "
                             "or corrupt.")
        entries.append((name, dtype, shape, a, b))
    return sorted(entries, key=lambda e: e[3])


def mapped_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(name, view)`` for each tensor of one file in the order of its bytes (a cold
    load reads the file front to back): a read-only numpy view of the memory-mapped file.
    ValueError naming the tensor, before any is yielded, for a malformed entry, a dtype this
    reader does not know or bytes that do not match its shape or lie outside the file."""
    header, start = read_header(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    data = np.frombuffer(mm, dtype=np.uint8)  # read-only; keeps the map alive
    for name, dtype, shape, a, b in _tensor_entries(path, header, start, data.size):
        yield name, data[a:b].view(dtype).reshape(shape)


def iter_safetensors(files: list[Path], lazy: bool = False) -> Iterator[tuple[str, TensorLike]]:
    """Yields ``(name, tensor)`` per tensor of the files, in order: a view of the memory-mapped
    file (``mapped_tensors``), which stays valid after the iterator moves on.

    lazy: the tensor comes as a ``LazyTensor`` (sharded loading: each device reads its block
    straight from the file)."""
    for path in files:
        for name, view in mapped_tensors(path):
            yield name, (LazyTensor(view, view.shape) if lazy else view)


def _plain_checkpoint(folder: Path) -> tuple[list[Path], dict] | None:
    """(the checkpoint's files, config.json read as plain JSON) when the config announces no
    quantization (nor does a ModelOpt hf_quant_config.json): then the tensors load as they are
    and can be copied ahead (``_DevicePrefetch``). None for anything else, a config.json that
    does not parse or absent files included: those take the loader's plain path and its
    errors."""
    try:
        raw = json.loads((folder / "config.json").read_text())
        files = safetensors_files(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (not isinstance(raw, dict) or raw.get("quantization_config")
            or (folder / "hf_quant_config.json").exists()):  # a ModelOpt export
        return None
    return files, raw


def resident_fraction(files: list[Path]) -> float:
    """The share of the files' pages in the OS page cache (``mincore``); 0.0 where it cannot be
    asked (no libc ``mincore``)."""
    import ctypes
    import ctypes.util

    try:
        mincore = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).mincore
    except (OSError, AttributeError, TypeError):
        return 0.0
    resident = total = 0
    for path in files:
        size = path.stat().st_size
        if size == 0:
            continue
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            view = np.frombuffer(mm, np.uint8)
            pages = -(-size // mmap.PAGESIZE)
            vec = np.zeros(pages, np.uint8)
            if mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size),
                       ctypes.c_void_p(vec.ctypes.data)) != 0:
                return 0.0
            resident += int(np.count_nonzero(vec & 1))
            total += pages
            del view
        finally:
            mm.close()
    return resident / total if total else 0.0


# Copy a plain checkpoint's tensors ahead only when this share of its pages is in the page cache
# (JAXLLM_LOAD_PREFETCH: "auto", the default; "1" always; "0" never). From a cold disk the copies
# and transformers' import read the same disk at once, and the import waited: 29.1 s against
# 11.9 (H200, 2026-12-04; benchmarks/RESULTS.md).
PREFETCH_RESIDENT_FRACTION = 0.9


def _prefetch_wanted(files: list[Path]) -> bool:
    mode = os.environ.get("JAXLLM_LOAD_PREFETCH", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"JAXLLM_LOAD_PREFETCH={mode!r}: expected auto, 0 or 1.")
    if mode != "auto":
        return mode == "1"
    return resident_fraction(files) >= PREFETCH_RESIDENT_FRACTION


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
    if getattr(hf_config, "quantization_config", None) is None:
        from jaxllm.loading.fp8_checkpoint import modelopt_quantization_config

        qc = modelopt_quantization_config(folder)  # a ModelOpt export's hf_quant_config.json
        if qc is not None:
            hf_config.quantization_config = qc
    return hf_config, model_config_from_hf(hf_config)


class _DevicePrefetch:
    """Copies a checkpoint's tensors to the default device, as the files lay them out, on a
    thread of its own, while the caller reads config.json.

    Why: reading the config imports transformers, which imports torch whenever it is installed
    (9-17 s on the GPU machine, 2026-12-04), and the weights' copies (~4 s for the 8B shape from
    the page cache) and the backend's start need nothing from it. The copies run one after the
    other in file order and the caller takes them after the thread is done, so the sequence of
    device allocations does not depend on timing.

    Memory: only floating tensors whose itemsize is at most the model dtype's are copied ahead
    (a tensor's copy is then no larger than the param made from it, and each is freed as its
    param is made), so the device never holds more than the loader without it would; wider
    tensors (a float32 checkpoint loaded as bf16) are placed by the loader one at a time as
    before."""

    def __init__(self, files: list[Path], dtype: Any, skip: tuple[str, ...] = ()):
        self._files, self._itemsize, self._skip = files, np.dtype(dtype).itemsize, skip
        self._items: deque[tuple[str, Any]] = deque()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self.copied_bytes = 0
        self._thread = threading.Thread(target=self._run, name="jaxllm-weights-prefetch",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for name, view in iter_safetensors(self._files):
                if self._stop.is_set():
                    return
                if (jnp.issubdtype(view.dtype, jnp.floating)  # bfloat16 and float8 too
                        and view.dtype.itemsize <= self._itemsize
                        and not name.endswith(self._skip)):
                    self._items.append((name, jax.device_put(view)))
                    self.copied_bytes += view.nbytes
                else:
                    self._items.append((name, view))
        except BaseException as e:  # re-raised on the caller's thread by tensors()
            self._error = e

    def cancel(self) -> None:
        """Stops the copies (the caller failed) and drops what was copied."""
        self._stop.set()
        self._thread.join()
        self._items.clear()

    def tensors(self) -> Iterator[tuple[str, Any]]:
        """Waits for the thread, then yields ``(name, device array or file view)`` in file
        order, each dropped from here as it is taken (so its param can replace it)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        while self._items:
            yield self._items.popleft()


def load_hf_folder(path: str | os.PathLike, dtype: Any = "auto",
                   attention_backend: str = "reference",
                   parallel: Any = None) -> tuple[ModelConfig, nnx.Module]:
    """Loads a local HF folder -> (ModelConfig, concrete model with its weights in ``dtype``).

    parallel: a ``sharding.rules.ModelSharding``; each tensor goes straight into its shards.
    """
    dtype = resolve_dtype(dtype)
    t0 = time.perf_counter()
    plain = _plain_checkpoint(Path(path)) if parallel is None else None
    prefetch = None
    if plain and _prefetch_wanted(plain[0]):
        # Tensors the loader drops are not copied ahead (an lm_head beside tied embeddings).
        tied = bool(plain[1].get("tie_word_embeddings"))
        prefetch = _DevicePrefetch(plain[0], dtype,
                                   IGNORED_SUFFIXES + (("lm_head.weight",) if tied else ()))
    try:
        _, config = load_hf_config(path)
    except BaseException:
        if prefetch is not None:
            prefetch.cancel()
        raise
    t1 = time.perf_counter()
    files = safetensors_files(Path(path))
    if prefetch is not None and config.quantization is not None:  # (config.json said none)
        prefetch.cancel()
        prefetch = None
    if prefetch is not None:
        tensors = prefetch.tensors()
    elif config.quantization == "fp8":  # pre-quantized: e4m3 weights and their scales as they are
        import dataclasses

        from jaxllm.loading.fp8_checkpoint import adapt_fp8_tensors, read_kv_cache_scales

        kv_scales = read_kv_cache_scales(files, config.num_hidden_layers)
        if kv_scales is not None:
            config = dataclasses.replace(config, kv_cache_scales=kv_scales)

        tensors = adapt_fp8_tensors(iter_safetensors(files), config)
    else:
        tensors = iter_safetensors(files, lazy=parallel is not None)
    try:
        model = load_params_from_tensors(
            abstract_for(config, dtype, attention_backend, parallel), config, tensors, dtype,
            parallel=parallel)
    except BaseException:
        if prefetch is not None:  # a traceback kept (a notebook's) would keep the copies alive
            prefetch.cancel()
        raise
    jax.block_until_ready(nnx.state(model))
    # The config's time is mostly importing transformers (which imports torch when installed);
    # the weights' copies to the device overlap it (_DevicePrefetch).
    logger.info("read config.json in %.1f s; placed %.2f GB of weights from %d files in %.1f s "
                "(%.2f GB of them copied on a thread beside the config's read)",
                t1 - t0, sum(f.stat().st_size for f in files) / 1e9, len(files),
                time.perf_counter() - t1, prefetch.copied_bytes / 1e9 if prefetch else 0.0)
    return config, model
