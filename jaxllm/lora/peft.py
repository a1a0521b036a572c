"""Reading a PEFT LoRA adapter folder (what ``peft``'s ``save_pretrained`` writes).

The format (peft ``LoraConfig`` / ``get_peft_model_state_dict``): ``adapter_config.json``
with ``peft_type`` "LORA", rank ``r``, ``lora_alpha``, ``use_rslora``, ``target_modules``,
``bias``, ``modules_to_save``, ``use_dora``, ``alpha_pattern`` / ``rank_pattern`` (per-module
overrides); and ``adapter_model.safetensors`` (or the older ``adapter_model.bin``) with, per
adapted linear, ``base_model.model.<module path>.lora_A.weight`` [r, in] and ``.lora_B.weight``
[out, r] (the adapter's name, "default", dropped when saved; some writers keep it). The
adapted layer computes ``W x + scaling * B (A x)`` with ``scaling = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``), alpha and r of the module's pattern if one
matches it.

What is served: the attention and MLP projections of the Llama family (``TARGETS``; Phi-3's
packed ``qkv_proj`` / ``gate_up_proj`` are split as its weights are). Refused with a
ValueError naming the reason, as vLLM refuses them: DoRA, adapter biases, ``modules_to_save``,
LoRA on the embeddings or the lm_head, ranks above ``max_lora_rank``, shapes that do not fit
the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

from jaxllm.config import ModelConfig

# The projections an adapter may adapt, in the order of their layer.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# HF's packed projections (Phi-3) and what they hold, in order.
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?"
                  r"\.weight$")


def target_dims(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each adaptable projection of ``config``'s model."""
    E, F = config.hidden_size, config.intermediate_size
    HD = config.num_attention_heads * config.head_dim
    KD = config.num_key_value_heads * config.head_dim
    return {"q_proj": (E, HD), "k_proj": (E, KD), "v_proj": (E, KD), "o_proj": (HD, E),
            "gate_proj": (E, F), "up_proj": (E, F), "down_proj": (F, E)}


@dataclasses.dataclass
class LoraAdapter:
    """A loaded adapter: ``weights[(layer, module)] = (A [in, r], B [r, out])`` float32, the
    scaling folded into B, so the layer adds ``x @ A @ B``. ``rank``: the largest r."""

    name: str
    int_id: int
    path: str
    rank: int
    weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def _read_tensors(folder: Path) -> dict[str, np.ndarray]:
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        from jaxllm.loading.safetensors_loader import mapped_tensors

        return {name: np.asarray(t, np.float32) for name, t in mapped_tensors(st)}
    pt = folder / "adapter_model.bin"
    if pt.is_file():
        try:
            import torch
        except ImportError:
            raise ValueError(f"LoRA adapter {str(folder)!r} is a PyTorch .bin file and torch is "
                             "not installed; save it as adapter_model.safetensors.") from None
        state = torch.load(pt, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise ValueError(f"LoRA adapter {str(folder)!r} has no adapter_model.safetensors (or "
                     "adapter_model.bin).")


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's per-module override: the first key that matches the module's path end."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def load_peft_adapter(path: str, *, name: str, int_id: int, config: ModelConfig,
                      max_lora_rank: int) -> LoraAdapter:
    """Reads and checks the PEFT adapter folder ``path`` against the model ``config``.
    FileNotFoundError for a path that is not a local folder with an adapter_config.json,
    ValueError for an adapter the engine cannot serve (the module docstring's list)."""
    folder = Path(path).expanduser()
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"LoRA adapter {path!r}: no adapter_config.json at {str(folder)!r}. jaxllm loads "
            "adapters from local PEFT folders (adapter_config.json + adapter_model.safetensors) "
            "and does not download from the Hugging Face hub.")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"LoRA adapter {path!r}: adapter_config.json is not valid JSON: "
                         f"{e}") from None
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise ValueError(f"LoRA adapter {path!r} is a {peft_type} adapter; only LORA adapters "
                         "are supported.")
    if cfg.get("use_dora"):
        raise ValueError(f"LoRA adapter {path!r} uses DoRA (use_dora), which is not supported.")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"LoRA adapter {path!r} trains biases (bias={cfg['bias']!r}); "
                         "adapter biases are not supported.")
    if cfg.get("modules_to_save"):
        raise ValueError(f"LoRA adapter {path!r} saves whole modules (modules_to_save="
                         f"{cfg['modules_to_save']!r}), which is not supported.")
    if cfg.get("fan_in_fan_out"):
        raise ValueError(f"LoRA adapter {path!r} has fan_in_fan_out=true (Conv1D layers), "
                         "which the Llama family does not have.")
    r = cfg.get("r", 8)
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA adapter {path!r}: r must be a positive integer, got {r!r}.")
    alpha = cfg.get("lora_alpha", 8)
    rslora = bool(cfg.get("use_rslora", False))

    dims = target_dims(config)
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    blocks: dict[tuple[int, str], str] = {}
    for key, t in _read_tensors(folder).items():
        m = _KEY.search(key)
        if m is None:
            what = ("the embeddings" if "embed" in key else "the lm_head" if "lm_head" in key
                    else "a bias" if key.endswith(".bias") else "an unknown tensor")
            raise ValueError(f"LoRA adapter {path!r}: {key!r} adapts {what}; only the "
                             f"projections {', '.join(TARGETS)} can be adapted.")
        layer, block, module, side = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if module not in dims and module not in PACKED:
            raise ValueError(f"LoRA adapter {path!r}: {key!r} adapts {module!r}; only the "
                             f"projections {', '.join(TARGETS)} can be adapted.")
        if layer >= config.num_hidden_layers:
            raise ValueError(f"LoRA adapter {path!r}: {key!r} is for layer {layer}, the model "
                             f"has {config.num_hidden_layers}.")
        if t.ndim != 2:
            raise ValueError(f"LoRA adapter {path!r}: {key!r} has shape {t.shape}, not 2-D.")
        pairs.setdefault((layer, module), {})[side] = t
        blocks[(layer, module)] = block

    weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
    rank = 0
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {path!r}: layer {layer} {module} has lora_"
                             f"{''.join(ab)} without its pair.")
        a, b = ab["A"], ab["B"]  # [r, in], [out, r]
        rm = a.shape[0]
        if b.shape[1] != rm:
            raise ValueError(f"LoRA adapter {path!r}: layer {layer} {module}: lora_A "
                             f"{a.shape} and lora_B {b.shape} do not chain.")
        if rm > max_lora_rank:
            raise ValueError(f"LoRA rank {rm} is greater than max_lora_rank {max_lora_rank} "
                             f"(adapter {path!r}); raise max_lora_rank (--max-lora-rank).")
        rank = max(rank, rm)
        a_m = _pattern_value(cfg.get("alpha_pattern"),
                             f"model.layers.{layer}.{blocks[(layer, module)]}.{module}", alpha)
        scaling = a_m / (math.sqrt(rm) if rslora else rm)
        parts = PACKED.get(module, (module,))
        outs = [dims[p][1] for p in parts]
        want = (dims[parts[0]][0], sum(outs))
        if (a.shape[1], b.shape[0]) != want:
            raise ValueError(f"LoRA adapter {path!r}: layer {layer} {module} maps "
                             f"{a.shape[1]} -> {b.shape[0]} features, the model's {want[0]} -> "
                             f"{want[1]}: the adapter is for another model.")
        bs = np.split(b.astype(np.float32) * np.float32(scaling), np.cumsum(outs)[:-1], axis=0)
        for p, bp in zip(parts, bs):
            if (layer, p) in weights:
                raise ValueError(f"LoRA adapter {path!r}: layer {layer} {p} is adapted twice "
                                 "(packed and on its own).")
            weights[(layer, p)] = (np.ascontiguousarray(a.T, np.float32),
                                   np.ascontiguousarray(bp.T))
    if not weights:
        raise ValueError(f"LoRA adapter {path!r} holds no LoRA weights.")
    return LoraAdapter(name=name, int_id=int_id, path=str(path), rank=rank, weights=weights)
