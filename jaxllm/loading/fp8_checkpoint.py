"""Pre-quantized FP8 checkpoints as published on the HF hub: detection, reading, and a writer.

Two config.json formats are read (checked against vLLM's loaders; docs/DESIGN_NOTES.md "FP8"):

  compressed-tensors (llm-compressor, e.g. RedHatAI/*-FP8-dynamic):
    "quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized",
      "config_groups": {"group_0": {"targets": ["Linear"],
        "weights": {"type": "float", "num_bits": 8, "strategy": "channel" | "tensor", ...},
        "input_activations": {"type": "float", "num_bits": 8, "strategy": "token" | "tensor",
                              "dynamic": true | false} | null}},
      "ignore": ["lm_head"]}
    block-wise (the FP8_BLOCK scheme): "weights": {..., "strategy": "block",
      "block_structure": [128, 128]}, "input_activations": {..., "strategy": "group",
      "group_size": 128, "dynamic": true}
  fp8 (vLLM / transformers FineGrainedFP8, e.g. AutoFP8 output, Qwen/Qwen3-*-FP8):
    "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic" | "static",
                            "weight_block_size": [128, 128]?}

  modelopt (NVIDIA TensorRT Model Optimizer, e.g. nvidia/Llama-3.1-8B-Instruct-FP8):
    hf_quant_config.json {"producer": {...}, "quantization": {"quant_algo": "FP8",
      "kv_cache_quant_algo": "FP8" | null, "exclude_modules": ["lm_head"]}}, or config.json
    "quantization_config": {"quant_method": "modelopt", "quant_algo": ..., "ignore": [...]}
    quant_algo FP8: per-tensor weight and static input scales; FP8_PER_CHANNEL_PER_TOKEN:
    weight_scale [N], dynamic per-token activations; FP8_PB_WO: 128 x 128 block scales
    [N/128, 1, K/128, 1], dynamic activations. KV scales: self_attn.{k,v}_proj.{k,v}_scale.

Tensors per quantized projection (HF names, HF [out, in] layout):
  <proj>.weight        float8_e4m3fn [N, K]
  <proj>.weight_scale  float32 (or bf16) [N, 1] per channel, [] / [1] per tensor
  <proj>.input_scale   float32 [] / [1], static activations only
  block-wise: <proj>.weight_scale_inv (fp8) / <proj>.weight_scale (compressed-tensors)
               float32 [ceil(N/bn), ceil(K/bk)], w = e4m3 * the scale of its [bn, bk] tile
               (a multiplier despite the "_inv", as DeepSeek-V3 named it)

They load without dequantizing: the e4m3 weight goes into ``Fp8Linear.weight`` as is, a
per-tensor scale is broadcast to the [N] per-channel vector (exact), a block scale's rows
repeated bn times to [N, ceil(K/bk)] (exact: one scale per channel and K block), an input
scale becomes the layer's static activation scale. ``safetensors_loader`` reads every tensor,
F8_E4M3 ones included, as a view of the memory-mapped file (ml_dtypes.float8_e4m3fn for the
weights).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("jaxllm")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KV_SCALE_SUFFIXES = ("self_attn.k_scale", "self_attn.v_scale", "k_proj.output_scale",
                      "v_proj.output_scale", "k_proj.k_scale", "v_proj.v_scale")
# ModelOpt's quant_algo -> (activation scheme, weight block); FP8_PB_WO's block is fixed.
_MODELOPT_ALGOS = {"FP8": ("static", None), "FP8_PER_CHANNEL_PER_TOKEN": ("dynamic", None),
                   "FP8_PB_WO": ("dynamic", (128, 128))}


def _ignored_ok(ignore: Iterable[str]) -> None:
    bad = [x for x in ignore or () if "lm_head" not in x]
    if bad:
        raise ValueError(
            f"this fp8 checkpoint leaves {bad[:3]} unquantized; jaxllm loads fp8 checkpoints "
            "whose attention and MLP projections are all quantized (only lm_head ignored).")


def fp8_scheme_from_hf(quantization_config: dict | None) -> str | None:
    """config.json's quantization_config -> "dynamic" / "static" (the activation scheme), None
    when the checkpoint is not quantized; ValueError naming what is unsupported."""
    return fp8_format_from_hf(quantization_config)[0]


def _block_size(value: Any, what: str) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and v > 0 for v in value)):
        raise ValueError(f"{what}={value!r}: expected two positive integers [block_n, block_k].")
    return int(value[0]), int(value[1])


def fp8_format_from_hf(quantization_config: dict | None
                       ) -> tuple[str | None, tuple[int, int] | None]:
    """config.json's quantization_config -> (activation scheme "dynamic" / "static", the weight
    scales' [block_n, block_k] of a block-wise checkpoint or None); (None, None) when the
    checkpoint is not quantized; ValueError naming what is unsupported."""
    qc = quantization_config
    if not qc:
        return None, None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
    method = qc.get("quant_method")
    if method == "fp8":
        block = qc.get("weight_block_size")
        block = _block_size(block, "weight_block_size") if block is not None else None
        if qc.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"fp8 checkpoints in fmt={qc['fmt']!r}: only e4m3 is supported.")
        _ignored_ok(qc.get("ignored_layers") or qc.get("modules_to_not_convert") or ())
        scheme = qc.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):
            raise ValueError(f"fp8 activation_scheme={scheme!r}: expected 'dynamic' or 'static'.")
        if block is not None and scheme != "dynamic":
            raise ValueError("block-wise fp8 (weight_block_size) with static activation scales "
                             "is not a published format; expected activation_scheme 'dynamic'.")
        return scheme, block
    if method == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        if not groups:
            raise ValueError("compressed-tensors quantization_config has no config_groups.")
        schemes, blocks = set(), set()
        for g in groups:
            w = g.get("weights") or {}
            if w.get("type") != "float" or w.get("num_bits") != 8:
                raise ValueError(
                    f"compressed-tensors weights {w.get('type')}/{w.get('num_bits')} bits: only "
                    "float 8-bit (fp8 e4m3) is supported.")
            if w.get("strategy") not in ("channel", "tensor", "block"):
                raise ValueError(
                    f"compressed-tensors weight strategy {w.get('strategy')!r} is not supported; "
                    "'channel', 'tensor' and 'block' are.")
            blocks.add(_block_size(w.get("block_structure"), "block_structure")
                       if w.get("strategy") == "block" else None)
            a = g.get("input_activations")
            if a is None:  # weight-only (W8A16): run it W8A8 with dynamic per-token scales
                schemes.add("dynamic")
            elif a.get("type") != "float" or a.get("num_bits") != 8:
                raise ValueError("compressed-tensors input_activations must be float 8-bit.")
            else:
                schemes.add("dynamic" if a.get("dynamic") else "static")
        if len(schemes) != 1:
            raise ValueError("compressed-tensors groups mix static and dynamic activations.")
        if len(blocks) != 1:
            raise ValueError("compressed-tensors groups mix block-wise and other weight scales.")
        _ignored_ok(qc.get("ignore") or ())
        scheme, block = schemes.pop(), blocks.pop()
        if block is not None and scheme != "dynamic":
            raise ValueError("compressed-tensors block weights with static activation scales are "
                             "not supported; expected dynamic group activations (FP8_BLOCK).")
        return scheme, block
    if method == "modelopt":
        q = qc.get("quantization") if isinstance(qc.get("quantization"), dict) else qc
        algo = str(q.get("quant_algo") or "").upper()
        if algo not in _MODELOPT_ALGOS:
            raise ValueError(
                f"ModelOpt quant_algo={q.get('quant_algo')!r} is not supported; jaxllm reads "
                f"{', '.join(_MODELOPT_ALGOS)}.")
        kv = q.get("kv_cache_quant_algo")
        if kv is not None and str(kv).upper() != "FP8":
            raise ValueError(f"ModelOpt kv_cache_quant_algo={kv!r}: only FP8 (or none) is "
                             "supported.")
        _ignored_ok(q.get("exclude_modules") or q.get("ignore") or ())
        return _MODELOPT_ALGOS[algo]
    raise ValueError(
        f"quantization_config quant_method={method!r} is not supported; jaxllm reads "
        "'compressed-tensors' (float8), 'fp8' and 'modelopt' (FP8) checkpoints.")


def modelopt_quantization_config(folder: str | os.PathLike) -> dict | None:
    """A ModelOpt export's hf_quant_config.json as a quantization_config ({"quant_method":
    "modelopt", **its "quantization"}); None without one. Read when config.json has no
    quantization_config (the classic export keeps it only there, as vLLM reads it)."""
    path = Path(folder) / "hf_quant_config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    q = data.get("quantization")
    if not isinstance(q, dict):
        raise ValueError(f"{path}: expected a 'quantization' object (a ModelOpt export).")
    return {"quant_method": "modelopt", **q}


# ---- reading ---------------------------------------------------------------------------------

def read_kv_cache_scales(files: list[Path], num_layers: int
                         ) -> tuple[tuple[float, float], ...] | None:
    """Per layer (k_scale, v_scale) from ``model.layers.N.self_attn.{k,v}_scale`` (or the older
    ``{k,v}_proj.output_scale``); None when the checkpoint has none. Read before the model is
    built: the scales are static attention settings, not params."""
    from jaxllm.loading.safetensors_loader import mapped_tensors

    found: dict[tuple[int, str], float] = {}
    for path in files:
        for name, view in mapped_tensors(path):
            if not name.endswith(_KV_SCALE_SUFFIXES):
                continue
            parts = name.split(".")
            layer = int(parts[2])
            kind = "k" if parts[-1] == "k_scale" or parts[-2] == "k_proj" else "v"
            found[(layer, kind)] = float(np.asarray(view, np.float32).max())
    if not found:
        return None
    return tuple((found.get((i, "k"), 1.0), found.get((i, "v"), 1.0)) for i in range(num_layers))


def _features(config: Any, proj: str) -> tuple[int, int]:
    """(out, in) features of a projection."""
    H, K, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    E, F = config.hidden_size, config.intermediate_size
    return {"q_proj": (H * D, E), "k_proj": (K * D, E), "v_proj": (K * D, E),
            "o_proj": (E, H * D), "gate_proj": (F, E), "up_proj": (F, E),
            "down_proj": (E, F)}[proj]


def block_scales_per_channel(arr: np.ndarray, out_features: int, in_features: int,
                             block: tuple[int, int], name: str = "weight_scale") -> np.ndarray:
    """A block-wise checkpoint's scales [ceil(N/bn), ceil(K/bk)] -> Fp8Linear's [N, ceil(K/bk)]:
    each tile's scale repeated over its bn output channels (no value changes)."""
    bn, bk = block
    want = (-(-out_features // bn), -(-in_features // bk))
    if arr.ndim == 4 and arr.shape[1] == arr.shape[3] == 1:  # ModelOpt's [NB, 1, KB, 1]
        arr = arr.reshape(arr.shape[0], arr.shape[2])
    if tuple(arr.shape) != want:
        raise ValueError(f"{name}: expected block scales of shape {want} (a [{out_features}, "
                         f"{in_features}] weight in [{bn}, {bk}] blocks), got {arr.shape}.")
    return np.repeat(arr, bn, axis=0)[:out_features]


def adapt_fp8_tensors(named_tensors: Iterable[tuple[str, Any]], config: Any
                      ) -> Iterator[tuple[str, Any]]:
    """Puts a pre-quantized checkpoint's scales in Fp8Linear's shapes: weight_scale -> [N]
    float32 (a per-tensor scale broadcast), a block-wise checkpoint's weight_scale_inv /
    weight_scale -> weight_scale [N, ceil(K/bk)], input_scale -> [] (dropped when dynamic); KV
    cache scales are skipped (``read_kv_cache_scales`` put them in the config)."""
    block = config.weight_block_size
    for name, tensor in named_tensors:
        parts = name.split(".")
        if name.endswith(_KV_SCALE_SUFFIXES):
            continue
        if len(parts) >= 2 and parts[-2] in PROJECTIONS and parts[-1] in (
                "weight_scale", "weight_scale_inv", "input_scale"):
            if parts[-1] == "input_scale" and config.activation_scheme != "static":
                continue
            if parts[-1] == "weight_scale_inv" and block is None:
                raise ValueError(f"{name}: a block-wise scale in a checkpoint whose "
                                 "quantization_config has no weight_block_size.")
            n, k = _features(config, parts[-2])
            out_name = name[:-len("_inv")] if parts[-1] == "weight_scale_inv" else name

            def get(tensor=tensor, leaf=parts[-1], n=n, k=k, name=name):
                arr = np.asarray(tensor() if callable(tensor) else tensor, np.float32)
                if leaf == "input_scale":
                    if arr.size != 1:
                        raise ValueError(f"{name}: expected one static input scale, got shape "
                                         f"{arr.shape}.")
                    return arr.reshape(())
                if block is not None:
                    return block_scales_per_channel(arr, n, k, block, name)
                if arr.size == 1:
                    return np.full((n,), arr.reshape(()), np.float32)
                if arr.size != n:
                    raise ValueError(f"{name}: expected {n} per-channel scales or one per-tensor "
                                     f"scale, got shape {arr.shape}.")
                return arr.reshape(n)
            yield out_name, get
            continue
        yield name, tensor


# ---- writing (tests, and converting a local bf16 folder once) ---------------------------------

def write_fp8_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *,
                         fmt: str = "compressed-tensors", strategy: str = "channel",
                         activation_scheme: str = "dynamic",
                         input_scales: dict[str, float] | None = None,
                         kv_cache_scales: tuple[float, float] | None = None,
                         block_size: tuple[int, int] = (128, 128)) -> Path:
    """Quantizes the projections of the HF folder ``src`` into a pre-quantized fp8 folder ``dst``
    in ``fmt`` ("compressed-tensors" or "fp8", as llm-compressor / AutoFP8 publish them, or
    "modelopt", as NVIDIA's Model Optimizer exports them: hf_quant_config.json, config.json
    untouched; "tensor" needs static activations, "channel" dynamic ones, "block" 128 x 128).

    strategy: "channel" (weight_scale [N, 1]; compressed-tensors only), "tensor" (scalar) or
    "block" (one scale per ``block_size`` = [bn, bk] tile, [ceil(N/bn), ceil(K/bk)]: fp8's
    weight_scale_inv with weight_block_size, compressed-tensors' FP8_BLOCK weight_scale; a
    tile's absmax maps to 448, as DeepSeek-V3's and llm-compressor's quantizers do).
    activation_scheme: "dynamic", or "static" with ``input_scales`` {projection HF prefix ->
    scale}: a calibrated per-tensor input scale (absmax / 448) per projection; missing: 1.0.
    kv_cache_scales: (k_scale, v_scale) written for every layer as ``self_attn.k_scale`` /
    ``self_attn.v_scale`` (compressed-tensors' kv_cache_scheme tensors).
    Every other file (tokenizer, generation config) is copied. Uses torch (safetensors' float8
    writer).
    """
    import shutil

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from jaxllm.loading.safetensors_loader import safetensors_files

    if fmt not in ("compressed-tensors", "fp8", "modelopt"):
        raise ValueError(f"fmt={fmt!r}: choose 'compressed-tensors', 'fp8' or 'modelopt'.")
    if fmt == "modelopt":
        algo = {v: k for k, v in _MODELOPT_ALGOS.items()}.get(
            ({"tensor": "static"}.get(strategy, "dynamic"),
             tuple(block_size) if strategy == "block" else None))
        if algo is None or activation_scheme != _MODELOPT_ALGOS[algo][0]:
            raise ValueError(f"modelopt writes strategy 'tensor' with static activations "
                             f"(FP8), 'channel' dynamic (FP8_PER_CHANNEL_PER_TOKEN) or 'block' "
                             f"128 x 128 (FP8_PB_WO); not {strategy!r} / {activation_scheme!r}.")
    if strategy not in ("channel", "tensor", "block") or (fmt == "fp8" and strategy == "channel"):
        raise ValueError(f"strategy={strategy!r} is not written in the {fmt} format "
                         "(fp8: 'tensor' or 'block'; compressed-tensors: 'channel', 'tensor' or "
                         "'block').")
    if strategy == "block" and activation_scheme != "dynamic":
        raise ValueError("block-wise checkpoints have dynamic activations.")
    bn, bk = block_size
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != "config.json" \
                and not p.name.endswith(".index.json"):
            shutil.copy(p, dst / p.name)
    out: dict[str, torch.Tensor] = {}
    fmax = torch.finfo(torch.float8_e4m3fn).max
    for path in safetensors_files(src):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                parts = name.split(".")
                if len(parts) >= 2 and parts[-2] in PROJECTIONS and parts[-1] == "weight":
                    w = t.float()
                    if strategy == "block":
                        N, K = w.shape
                        nb, kb = -(-N // bn), -(-K // bk)
                        tiles = torch.nn.functional.pad(w, (0, kb * bk - K, 0, nb * bn - N))
                        amax = tiles.reshape(nb, bn, kb, bk).abs().amax(dim=(1, 3))
                        scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
                        full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:N, :K]
                        q = (w / full).clamp(-fmax, fmax).to(torch.float8_e4m3fn)
                    else:
                        amax = w.abs().amax(dim=1, keepdim=True) if strategy == "channel" \
                            else w.abs().amax()
                        scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
                        q = (w / scale).clamp(-fmax, fmax).to(torch.float8_e4m3fn)
                    out[name] = q
                    leaf = "weight_scale_inv" if strategy == "block" and fmt == "fp8" \
                        else "weight_scale"
                    scale = scale.float()
                    if fmt == "modelopt":  # [N] per channel, [NB, 1, KB, 1] per block
                        scale = scale.reshape(-1) if strategy == "channel" else \
                            scale[:, None, :, None] if strategy == "block" else scale
                    out[name[:-len("weight")] + leaf] = scale.contiguous()
                    if activation_scheme == "static":
                        prefix = name[:-len(".weight")]
                        s = (input_scales or {}).get(prefix, 1.0)
                        out[prefix + ".input_scale"] = torch.tensor(s, dtype=torch.float32)
                else:
                    out[name] = t.contiguous()
                if kv_cache_scales is not None and name.endswith("self_attn.q_proj.weight"):
                    prefix = name[:-len("q_proj.weight")]
                    k, v = ("k_proj.k_scale", "v_proj.v_scale") if fmt == "modelopt" \
                        else ("k_scale", "v_scale")
                    out[prefix + k] = torch.tensor(kv_cache_scales[0], dtype=torch.float32)
                    out[prefix + v] = torch.tensor(kv_cache_scales[1], dtype=torch.float32)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    if fmt == "modelopt":
        shutil.copy(src / "config.json", dst / "config.json")
        (dst / "hf_quant_config.json").write_text(json.dumps({
            "producer": {"name": "modelopt", "version": "0.37.0"},
            "quantization": {"quant_algo": algo,
                             "kv_cache_quant_algo": "FP8" if kv_cache_scales else None,
                             "exclude_modules": ["lm_head"]}}, indent=2))
        return dst
    if fmt == "fp8":
        qc = {"quant_method": "fp8", "activation_scheme": activation_scheme}
        if strategy == "block":
            qc.update(fmt="e4m3", weight_block_size=[bn, bk])
    else:
        acts = {"type": "float", "num_bits": 8, "symmetric": True,
                "strategy": "token" if activation_scheme == "dynamic" else "tensor",
                "dynamic": activation_scheme == "dynamic"}
        weights = {"type": "float", "num_bits": 8, "symmetric": True, "strategy": strategy,
                   "dynamic": False}
        if strategy == "block":
            weights["block_structure"] = [bn, bk]
            acts.update(strategy="group", group_size=bk)
        qc = {"quant_method": "compressed-tensors", "format": "float-quantized",
              "quantization_status": "compressed",
              "config_groups": {"group_0": {
                  "targets": ["Linear"],
                  "weights": weights,
                  "input_activations": acts}},
              "ignore": ["lm_head"]}
    config["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
