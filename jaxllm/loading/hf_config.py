"""HF ``PretrainedConfig`` -> ``jaxllm.config.ModelConfig``.

Handles both rope layouts: transformers 5 keeps ``rope_theta`` and the scaling dict together in
``config.rope_parameters``; older configs (and objects built without standardisation) carry
``rope_theta`` and ``rope_scaling`` as separate attributes.
"""

from __future__ import annotations

from typing import Any

from jaxllm.config import ModelConfig
from jaxllm.models.registry import get_model_class

# rope keys that carry no scaling information; everything else stays in ModelConfig.rope_scaling.
_ROPE_BASE_KEYS = ("rope_theta",)


def _rope_settings(hf_config: Any, params: dict[str, Any] | None = None
                   ) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict with "rope_type" or None for plain rope). ``params``: one
    layer type's rope parameters (Gemma 3's); default the config's own."""
    if params is None:
        params = getattr(hf_config, "rope_parameters", None)
        if params and any(isinstance(v, dict) for v in params.values()):
            raise ValueError("per-layer-type rope parameters are read by model_config_from_hf.")
    params = dict(params or {})
    legacy = getattr(hf_config, "rope_scaling", None)
    if legacy and not params.get("rope_type") and not params.get("type"):
        params.update(legacy)
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    theta = 10000.0 if theta is None else float(theta)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={partial} is not supported (rope on the whole head only).")
    if rope_type == "default":
        return theta, None
    scaling = {k: v for k, v in params.items() if k not in _ROPE_BASE_KEYS and k != "type"}
    scaling["rope_type"] = rope_type
    if rope_type == "llama3":
        scaling.setdefault("original_max_position_embeddings", hf_config.max_position_embeddings)
    return theta, scaling


# Headless checkpoints (embedding models such as e5-mistral, gte-Qwen2): the decoder of
# the causal LM beside each, without its lm_head.
HEADLESS_ARCHITECTURES = {"LlamaModel": "LlamaForCausalLM", "MistralModel": "MistralForCausalLM",
                          "Qwen2Model": "Qwen2ForCausalLM", "Qwen3Model": "Qwen3ForCausalLM"}
# Sequence classifiers (vLLM's classify task): the decoder of the causal LM and a linear head
# ``score`` on the last token's final hidden state, no lm_head.
CLASSIFIER_ARCHITECTURES = {
    "LlamaForSequenceClassification": "LlamaForCausalLM",
    "MistralForSequenceClassification": "MistralForCausalLM",
    "Qwen2ForSequenceClassification": "Qwen2ForCausalLM",
    "Qwen3ForSequenceClassification": "Qwen3ForCausalLM",
}


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def model_config_from_hf(hf_config: Any) -> ModelConfig:
    """Reads what the Llama-family model needs from an HF config (``transformers.PretrainedConfig``).

    Raises ValueError for architectures or rope types the model does not implement.
    """
    archs = getattr(hf_config, "architectures", None) or []
    if not archs:
        raise ValueError("config.json has no 'architectures' entry; cannot tell which model to build.")
    arch = archs[0]
    headless = arch in HEADLESS_ARCHITECTURES  # an embedding checkpoint (no lm_head)
    classifier = arch in CLASSIFIER_ARCHITECTURES
    arch = HEADLESS_ARCHITECTURES.get(arch, CLASSIFIER_ARCHITECTURES.get(arch, arch))
    num_labels, id2label = 0, ()
    if classifier:
        num_labels = int(getattr(hf_config, "num_labels", 0) or 0)
        if num_labels < 1:
            raise ValueError(f"{archs[0]} needs num_labels >= 1 in config.json.")
        names = getattr(hf_config, "id2label", None) or {}
        id2label = tuple(str(names.get(i, names.get(str(i), f"LABEL_{i}")))
                         for i in range(num_labels))
    get_model_class(arch)  # fails early, naming the supported architectures

    from jaxllm.models.llama import SUPPORTED_ROPE_TYPES

    # Gemma 3: rope parameters per layer type; the sliding layers' must be plain rope.
    per_type = getattr(hf_config, "rope_parameters", None)
    local_theta = None
    if per_type and any(isinstance(v, dict) for v in per_type.values()):
        if set(per_type) - {"full_attention", "sliding_attention"}:
            raise ValueError(f"rope parameters for layer types {sorted(per_type)} are not "
                             "supported (full_attention and sliding_attention are).")
        if "sliding_attention" in per_type:
            local_theta, local_scaling = _rope_settings(hf_config, per_type["sliding_attention"])
            if local_scaling is not None:
                raise ValueError("scaled rope on the sliding layers is not supported.")
        theta, scaling = _rope_settings(hf_config, per_type.get("full_attention", {}))
    else:
        theta, scaling = _rope_settings(hf_config)
    if scaling is not None and scaling["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_type={scaling['rope_type']!r} is not supported; supported rope types: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}.")

    H = hf_config.num_attention_heads
    K = getattr(hf_config, "num_key_value_heads", None) or H
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // H
    L = hf_config.num_hidden_layers

    # Qwen2/3 set sliding_window to None unless use_sliding_window; their layer_types then say
    # which layers slide. Mistral: every layer slides when sliding_window is set.
    sliding_window = getattr(hf_config, "sliding_window", None)
    if getattr(hf_config, "use_sliding_window", True) is False:
        sliding_window = None
    layer_types = getattr(hf_config, "layer_types", None)
    sliding_layers = None
    if sliding_window is not None and layer_types is not None:
        sliding_layers = tuple(t == "sliding_attention" for t in layer_types)
        if not any(sliding_layers):
            sliding_window, sliding_layers = None, None
        elif all(sliding_layers):
            sliding_layers = None

    is_qwen2 = arch == "Qwen2ForCausalLM"
    gemma = arch in ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
    gemma2 = arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM")  # and Gemma 3 after it
    # Gemma 2 names its activation hidden_activation (Gemma's config.json may carry both).
    act = (getattr(hf_config, "hidden_activation", None) if gemma2 else None) or getattr(
        hf_config, "hidden_act", "silu")
    scalar = getattr(hf_config, "query_pre_attn_scalar", None) if gemma2 else None

    granite = arch == "GraniteForCausalLM"

    def granite_float(name: str) -> float | None:
        return float(getattr(hf_config, name)) if granite else None

    def cap(name: str) -> float | None:
        v = getattr(hf_config, name, None) if gemma2 else None
        return float(v) if v else None

    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    eos = getattr(hf_config, "eos_token_id", None)
    eos_ids = () if eos is None else (tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),))

    from jaxllm.loading.fp8_checkpoint import fp8_format_from_hf

    # A pre-quantized fp8 checkpoint (compressed-tensors / fp8 quantization_config).
    qc = getattr(hf_config, "quantization_config", None)
    fp8_scheme, fp8_block = fp8_format_from_hf(qc)
    if fp8_scheme and not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)

    return ModelConfig(
        architecture=arch,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=K,
        head_dim=head_dim,
        rms_norm_eps=float(getattr(hf_config, "rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=_hashable(scaling) if scaling else None,
        max_position_embeddings=int(getattr(hf_config, "max_position_embeddings", 4096)),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        # Qwen2 hard-codes q/k/v bias and no o_proj bias; Llama/Mistral/Qwen3 use attention_bias for all four.
        attention_bias=True if is_qwen2 else attention_bias,
        o_proj_bias=False if is_qwen2 else attention_bias,
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        qk_norm=arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"),
        rope_local_theta=local_theta,
        sliding_window=int(sliding_window) if sliding_window is not None else None,
        sliding_window_layers=sliding_layers,
        hidden_act=act,
        norm_weight_offset=1.0 if gemma else 0.0,
        embed_multiplier=(float(hf_config.hidden_size) ** 0.5 if gemma
                          else granite_float("embedding_multiplier")),
        sandwich_norms=gemma2,
        attn_scale=(float(scalar) ** -0.5 if scalar
                    else granite_float("attention_multiplier")),
        residual_multiplier=granite_float("residual_multiplier"),
        logits_scaling=granite_float("logits_scaling"),
        attn_logit_softcap=cap("attn_logit_softcapping"),
        final_logit_softcap=cap("final_logit_softcapping"),
        bos_token_id=getattr(hf_config, "bos_token_id", None),
        eos_token_ids=eos_ids,
        quantization="fp8" if fp8_scheme else None,
        embedding_only=headless or classifier,
        num_labels=num_labels,
        id2label=id2label,
        activation_scheme=fp8_scheme or "dynamic",
        weight_block_size=fp8_block,
        quant_method=str(qc["quant_method"]) if fp8_scheme else None,
    )
