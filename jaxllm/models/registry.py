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
    # Phi-3 / Phi-4: Llama's decoder with packed q/k/v and gate/up weights (split on load,
    # loading/weights.py split_packed); longrope and partial rotary (Phi-3.5 / Phi-4-mini) are
    # refused by loading/hf_config.py's rope checks.
    "Phi3ForCausalLM": LlamaForCausalLM,
    # Gemma / Gemma 2: GeGLU, (1 + w) norms, scaled embeddings; Gemma 2 adds sandwich norms,
    # its attention scale, soft-caps and sliding layers (ModelConfig's Gemma switches).
    "GemmaForCausalLM": LlamaForCausalLM,
    "Gemma2ForCausalLM": LlamaForCausalLM,
    # Gemma 3's text model (the 1B; the larger ones are Gemma3ForConditionalGeneration, with a
    # vision tower, not built): Gemma 2's switches, q/k norms, a rope base per layer type.
    "Gemma3ForCausalLM": LlamaForCausalLM,
    # Granite 3 (dense): Llama with multipliers on the embeddings, the attention scores, each
    # residual branch and the logits.
    "GraniteForCausalLM": LlamaForCausalLM,
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
