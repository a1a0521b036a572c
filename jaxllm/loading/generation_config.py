"""The model's ``generation_config.json``: its sampling defaults and end-of-turn tokens, as vLLM
reads them (vLLM's ``--generation-config`` / ``--override-generation-config``).

What a model's authors recommend is there: Llama-3-Instruct's says temperature 0.6, top_p 0.9,
and lists ``<|eot_id|>`` beside ``<|end_of_text|>`` in ``eos_token_id`` (the first releases'
config.json and tokenizer named only the second, so an engine that skips this file runs every
chat reply past its end of turn). As vLLM does:

- ``generation_config="auto"`` (default): the model folder's file gives the defaults of
  ``repetition_penalty``, ``temperature``, ``top_k``, ``top_p``, ``min_p`` and
  ``max_new_tokens`` (as ``max_tokens``) where a request leaves them out: ``LLM.generate``
  without SamplingParams, and the server's request fields not sent (its ``max_tokens`` is
  capped by the default). ``"vllm"``: none of those (the neutral defaults). A folder path: that
  folder's file instead of the model's.
- ``override_generation_config``: a dict of fields that win over the file's.
- Its ``eos_token_id`` entries other than the engine's EOS tokens stop generation like
  ``stop_token_ids`` (unless ``ignore_eos``; ``finish_reason`` "stop", ``stop_reason`` the id),
  whichever ``generation_config`` says.

The file is read with transformers' ``GenerationConfig`` (only its non-default fields count,
``to_diff_dict``); a GGUF file has none.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("jaxllm")

FILE = "generation_config.json"
# The fields vLLM takes as sampling defaults (max_new_tokens becomes max_tokens).
SAMPLING_FIELDS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p",
                   "max_new_tokens")
MODES = ("auto", "vllm")


def check_generation_config(value: Any) -> None:
    """ValueError unless ``value`` is "auto", "vllm" or a folder holding the file."""
    if value in MODES:
        return
    if not isinstance(value, str) or not (Path(value).expanduser() / FILE).is_file():
        raise ValueError(
            f"generation_config must be 'auto' (the model's {FILE}), 'vllm' (no sampling "
            f"defaults from it) or a folder holding a {FILE}; got {value!r}.")


def read_generation_config(folder: str | Path | None) -> dict[str, Any]:
    """The fields ``folder``'s generation config sets ({} when it has none: a GGUF, or no
    file). A file that cannot be read is a ValueError naming it."""
    if folder is None or not (Path(folder).expanduser() / FILE).is_file():
        return {}
    from transformers import GenerationConfig

    path = Path(folder).expanduser()
    try:
        fields = GenerationConfig.from_pretrained(str(path), local_files_only=True).to_diff_dict()
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{path / FILE} cannot be read: {e}") from None
    fields.pop("transformers_version", None)
    return fields


def sampling_defaults(fields: dict[str, Any], mode: str,
                      override: dict[str, Any] | None) -> dict[str, Any]:
    """The SamplingParams defaults (vLLM's ``get_diff_sampling_param``): the sampling fields
    of ``fields`` (none in mode "vllm"), with ``override`` applied."""
    config = {} if mode == "vllm" else dict(fields)
    config.update(override or {})
    out = {k: config[k] for k in SAMPLING_FIELDS if config.get(k) is not None}
    if "max_new_tokens" in out:
        out["max_tokens"] = out.pop("max_new_tokens")
    return out


def eos_token_ids(fields: dict[str, Any]) -> set[int]:
    """The ids of the file's ``eos_token_id`` (an int or a list)."""
    ids = fields.get("eos_token_id")
    if ids is None:
        return set()
    return {int(i) for i in ([ids] if isinstance(ids, int) else ids)}
