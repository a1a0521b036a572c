"""HF ``architectures`` name -> jaxllm model class."""

from __future__ import annotations

from flax import nnx

from jaxllm.models.llama import LlamaForCausalLM

# All of these are the same decoder with different switches in ModelConfig (see models/llama.py).
MODEL_REGISTRY: dict[str, type[nnx.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def get_model_class(architecture: str) -> type[nnx.Module]:
    """The model class for an HF ``architectures`` entry; ValueError naming the supported ones."""
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"Model architecture {architecture!r} is not supported; supported architectures: "
            f"{', '.join(supported_architectures())}.") from None
