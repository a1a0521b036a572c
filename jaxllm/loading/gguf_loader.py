"""Load a GGUF file (llama.cpp's format): metadata -> HF config -> ModelConfig, tensors -> NNX model.

Every tensor is dequantized to float32 on the host (Q4_1, Q8_0, Q4_K, F16, ... whatever the file
holds; ``gguf.quants.dequantize`` knows them all) and handed to the shared weight mapper under
its HF name and in HF's torch layout, so a GGUF loads into exactly the model a safetensors folder
does. The engine runs dense weights: the quantization is only the file's storage format.

What llama.cpp's converter (``convert_hf_to_gguf.py``) changed and this module undoes, matching
transformers' own GGUF loader (``transformers/modeling_gguf_pytorch_utils.py``) exactly:
  - names: ``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight`` etc.
  - for ``general.architecture == "llama"`` files only, the rows of ``attn_q``/``attn_k`` are
    permuted per head from HF's rotate-half rope layout (first half / second half of each head)
    into interleaved pairs (ggml's rope rotates adjacent elements); we permute them back.
  - the config: llama.cpp metadata keys (``llama.embedding_length``, ...) -> HF config fields,
    through transformers' own mapping table.
  - tied embeddings: the file has no ``output.weight`` when the model ties lm_head to the
    embedding.

Memory: the file is memory-mapped; tensors are dequantized one at a time, when the weight mapper
asks, so the host holds at most one float32 tensor beside the (quantized, mapped) file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.config import ModelConfig, resolve_dtype

# GGUF general.architecture values the Llama-family model covers. Mistral files say "llama".
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")

# Global tensors: GGUF base name -> HF module name.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# Per-layer tensors (``blk.N.<key>``): GGUF key -> HF module name under model.layers.N.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3
    "attn_k_norm": "self_attn.k_norm",  # Qwen3
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Tensors some files carry that the model recomputes from the config (llama 3's rope frequencies).
_SKIPPED = ("rope_freqs.weight",)

_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")

# HF model class per model_type (GGUF metadata has no "architectures" entry; the registry needs one).
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def gguf_to_hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None for skipped tensors.

    Raises ValueError for a name outside the Llama family's tensors.
    """
    if gguf_name in _SKIPPED:
        return None
    if m := _LAYER_RE.match(gguf_name):
        layer, key, kind = m.groups()
        if key in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[key]}.{kind}"
    elif m := _GLOBAL_RE.match(gguf_name):
        key, kind = m.groups()
        if key in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[key]}.{kind}"
    raise ValueError(
        f"GGUF tensor {gguf_name!r} has no counterpart in the Llama-family model "
        f"(supported GGUF architectures: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}).")


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation: w [n_head * D, ...] -> same shape, HF row order.

    llama.cpp stores each head's rows as interleaved pairs (row 2i, 2i+1 = HF rows i, i + D/2);
    HF keeps the two halves apart (rotate-half rope). View the rows as [n_head, 2, D/2] in HF
    order: llama.cpp wrote them as [n_head, D/2, 2]; swapping the two axes back restores HF's.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class GGUFCheckpoint:
    """An opened GGUF file: the memory-mapped reader and the HF config its metadata describes."""

    path: Path
    reader: Any  # gguf.GGUFReader
    architecture: str  # general.architecture, e.g. "llama"
    hf_config: Any  # transformers.PretrainedConfig


def _field_value(field: Any) -> Any:
    """A metadata field's value (scalars unwrapped, strings decoded) via transformers' parser."""
    from transformers.integrations.ggml import _gguf_parse_value

    value = [_gguf_parse_value(field.parts[i], field.types) for i in field.data]
    return value[0] if len(value) == 1 else value


def hf_config_dict_from_gguf(reader: Any) -> dict[str, Any]:
    """The HF config dict for a GGUF file, as ``transformers.load_gguf_checkpoint`` builds it.

    Same mapping table (transformers' ``GGUF_CONFIG_MAPPING``) and the same special cases for the
    Llama family, but only the model's own keys are parsed: the tokenizer's vocabulary and merge
    arrays (~100k strings) are what makes transformers' version take ~9 s on a 135M model.
    """
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    fields = reader.fields
    architecture = _field_value(fields["general.architecture"])
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {architecture!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}.")
    names = _field_value(fields["general.name"]) if "general.name" in fields else ""
    # llama.cpp files Mistral models under "llama"; transformers tells them apart by the name.
    model_type = "mistral" if architecture == "llama" and "mistral" in str(names) else architecture

    config: dict[str, Any] = {}
    tensor_names = {t.name for t in reader.tensors}
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    config.update(GGUF_CONFIG_DEFAULTS_MAPPING.get(model_type, {}))
    for key, field in fields.items():
        # The vocabulary and merge arrays are the tokenizer's business (and the slow part).
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "scores", "token_type")):
            continue
        key = key.replace(architecture, model_type)
        prefix, _, config_key = key.partition(".")
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(config_key)
        if renamed is None or renamed == -1:
            continue
        value = _field_value(field)
        if isinstance(value, str) and architecture in value:
            value = value.replace(architecture, model_type)
        config[renamed] = value
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in fields:
        # As transformers does: the vocabulary's length (counted, not parsed).
        config["vocab_size"] = len(fields["tokenizer.ggml.tokens"].data)
    return config


def open_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Opens (memory-maps) a GGUF file and builds its HF config. Reads no tensor data."""
    import gguf
    from transformers import CONFIG_MAPPING

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist.")
    reader = gguf.GGUFReader(str(path))
    config = hf_config_dict_from_gguf(reader)
    model_type = config["model_type"]
    hf_config = CONFIG_MAPPING[model_type].from_dict(config)
    # The registry picks the model class from `architectures`, which GGUF metadata does not hold.
    hf_config.architectures = [_ARCHITECTURES[model_type]]
    return GGUFCheckpoint(path, reader, _field_value(reader.fields["general.architecture"]), hf_config)


def iter_hf_tensors(ckpt: GGUFCheckpoint) -> Iterator[tuple[str, Any]]:
    """Yields ``(hf_name, getter)`` per tensor; the getter returns float32 numpy in HF layout.

    Linear weights come out ``[out, in]`` (the dequantizer's row-major shape is HF's), norms
    ``[E]``, the embedding ``[V, E]``. Nothing is dequantized until the getter is called, so
    the weight mapper holds one dequantized tensor at a time.
    """
    from gguf.quants import dequantize

    cfg = ckpt.hf_config
    # transformers applies the un-permutation by the file's architecture (its LlamaTensorProcessor),
    # which is what llama.cpp's converter permuted: "llama" files, Mistral included.
    unpermute = ckpt.architecture == "llama"

    for tensor in ckpt.reader.tensors:
        hf_name = gguf_to_hf_name(tensor.name)
        if hf_name is None:
            continue

        def get(tensor=tensor) -> np.ndarray:
            w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            if unpermute and ".attn_q." in tensor.name:
                w = unpermute_rope_rows(w, cfg.num_attention_heads)
            elif unpermute and ".attn_k." in tensor.name:
                w = unpermute_rope_rows(w, cfg.num_key_value_heads)
            return w

        yield hf_name, get


def load_gguf(path: str | os.PathLike, dtype: Any = "auto",
              attention_backend: str = "reference", parallel: Any = None
              ) -> tuple[ModelConfig, Any, Any]:
    """Loads a GGUF file -> (ModelConfig, concrete NNX model with weights in ``dtype``, HF config)."""
    from jaxllm.loading.hf_config import model_config_from_hf
    from jaxllm.loading.weights import abstract_for, load_params_from_tensors

    dtype = resolve_dtype(dtype)
    ckpt = open_gguf(path)
    config = model_config_from_hf(ckpt.hf_config)
    model = load_params_from_tensors(abstract_for(config, dtype, attention_backend, parallel),
                                     config, iter_hf_tensors(ckpt), dtype, parallel=parallel)
    return config, model, ckpt.hf_config


def tokenizer_cache_dir() -> Path:
    """Where converted GGUF tokenizers are kept: $JAXLLM_CACHE_DIR, else ~/.cache/jaxllm."""
    root = os.environ.get("JAXLLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxllm")
    return Path(root) / "gguf_tokenizers"


def load_gguf_tokenizer(path: str | os.PathLike, cache: bool = True) -> Any:
    """The HF tokenizer (with chat template) transformers builds from the GGUF's vocabulary.

    transformers rebuilds it from the file's token and merge arrays on every call (~17 s for
    SmolLM2's 49k tokens here, more under load); with ``cache`` the result is saved once
    (``save_pretrained``) under ``tokenizer_cache_dir()``, keyed by the file's name, size and
    mtime, and later calls read that tokenizer.json instead (well under a second).
    """
    from transformers import AutoTokenizer

    path = Path(path).resolve()
    if not cache:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    st = path.stat()
    key = f"{path.stem}-{st.st_size}-{st.st_mtime_ns}"
    cached = tokenizer_cache_dir() / key
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    try:
        # Written beside, then renamed: a concurrent reader never sees a half-written folder.
        tmp = cached.with_name(f"{key}.tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        tmp.rename(cached)
    except OSError:
        pass  # read-only or raced by another process: the cache is an optimisation only
    return tok
