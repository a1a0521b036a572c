"""vLLM's ``calculate_kv_scales``: per-layer K/V scales of an fp8 cache computed, not read.

Without scales in the checkpoint an fp8 cache stores K and V as they are (scale 1.0): a model
whose keys pass e4m3's 448 (large k biases, as in Qwen2) has them clipped. vLLM's
``calculate_kv_scales=True`` instead takes each layer's scales from the first forward it runs:
``k_scale = max|k| / K_SCALE_CONSTANT`` and ``v_scale = max|v| / V_SCALE_CONSTANT`` (200 and
100 by default, its env vars of those names), the headroom above the seen maximum.

jaxllm computes them the same way from one forward at start-up over ``CALIBRATION_TEXT``, before
anything is compiled: the scales are static per layer (folded into the attention, see
jaxllm/models/attention.py), so taking them from the first request would mean compiling every
program twice. The difference from vLLM: the maximum is over a fixed text, not the first batch
served (deterministic across restarts; a first request of unusual text does not set the scales).
The keys are read after the rotary embedding (and q/k norms), as the cache holds them.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.models.attention import AttentionMetadata

logger = logging.getLogger("jaxllm")

# Mixed prose, code, numbers and markup: a spread of token kinds for the maxima.
CALIBRATION_TEXT = (
    "The history of the printing press begins in 1440, when Johannes Gutenberg combined a "
    "screw press with movable metal type. Within fifty years, presses in over 250 European "
    "cities had printed some 20 million volumes.\n\n"
    "def binary_search(items, target):\n"
    "    lo, hi = 0, len(items) - 1\n"
    "    while lo <= hi:\n"
    "        mid = (lo + hi) // 2\n"
    "        if items[mid] == target:\n"
    "            return mid\n"
    "        lo, hi = (mid + 1, hi) if items[mid] < target else (lo, mid - 1)\n"
    "    return -1\n\n"
    "| city | population | area (km2) |\n|---|---|---|\n| Tokyo | 37,400,068 | 2,194 |\n"
    "| Delhi | 28,514,000 | 1,484 |\n\n"
    "Q: If a train leaves at 3:45 pm and travels 210 km at 84 km/h, when does it arrive?\n"
    "A: 210 / 84 = 2.5 hours, so it arrives at 6:15 pm. Bonjour, ¿qué tal? 你好，世界！")


def scale_constants() -> tuple[float, float]:
    """(K_SCALE_CONSTANT, V_SCALE_CONSTANT): vLLM's env vars, 200 and 100 unless set."""
    out = []
    for name, default in (("K_SCALE_CONSTANT", 200.0), ("V_SCALE_CONSTANT", 100.0)):
        raw = os.environ.get(name)
        try:
            value = default if raw is None else float(raw)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {raw!r}.") from None
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {raw!r}.")
        out.append(value)
    return out[0], out[1]


def calibration_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """CALIBRATION_TEXT's token ids (with the tokenizer's BOS when it adds one); without a
    tokenizer (skip_tokenizer_init) a fixed spread of 256 ids over the vocabulary."""
    if tokenizer is not None:
        return list(tokenizer(CALIBRATION_TEXT).input_ids)
    return [int(i) for i in np.linspace(1, vocab_size - 1, 256)]


def _amax_forward(model, ids, pos, kv, md):
    _, kv = model(ids, pos, kv, md)
    return [(jnp.max(jnp.abs(k.astype(jnp.float32))), jnp.max(jnp.abs(v.astype(jnp.float32))))
            for k, v in kv]


def one_sequence_inputs(config, n: int, page_size: int, dtype, place=None, kv_place=None):
    """(kv caches, positions, AttentionMetadata) for one sequence of ``n`` tokens prefilled at
    once into a page cache of its own (page 0 the scratch page, the sequence on pages 1..).
    ``place`` / ``kv_place``: a device or sharding for the inputs / the caches (default: the
    default device; the caches where the inputs go)."""
    pages = -(-n // page_size)
    shape = (pages + 1, page_size, config.num_key_value_heads, config.head_dim)
    kv_place = place if kv_place is None else kv_place
    kv = [(jax.device_put(jnp.zeros(shape, dtype), kv_place),
           jax.device_put(jnp.zeros(shape, dtype), kv_place))
          for _ in range(config.num_hidden_layers)]
    pos = np.arange(n, dtype=np.int32)
    md = AttentionMetadata(slot_mapping=(page_size + pos).astype(np.int32),
                           query_start_loc=np.array([0, n], np.int32),
                           seq_lens=np.array([n], np.int32),
                           page_table=np.arange(1, pages + 1, dtype=np.int32)[None, :],
                           num_seqs=np.array([1], np.int32))
    return kv, jax.device_put(pos, place), jax.device_put(md, place)


def kv_amax(model: nnx.Module, token_ids: list[int], page_size: int = 16, parallel=None
            ) -> list[tuple[float, float]]:
    """Per layer (max |k|, max |v|) over the K/V the model writes for ``token_ids`` (one
    sequence, one prefill, a page cache of its own in the model's dtype). ``parallel``: the
    model's ``sharding.rules.ModelSharding`` under tensor parallelism (one stage): the cache
    split on KV heads as the engine's, the attention run per head shard."""
    from jaxllm.models.attention import heads_sharded

    if parallel is None:  # where the params are (a data-parallel replica's own device)
        place = kv_place = next(iter(jax.tree.leaves(nnx.state(model))[0].devices()))
        mesh = None
    else:
        stage = parallel.stages[0]
        mesh, kv_place = stage.mesh, stage.kv_sharding
        place = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    kv, pos, md = one_sequence_inputs(model.config, len(token_ids), page_size, model.dtype,
                                      place, kv_place)
    ids = jax.device_put(np.asarray(token_ids, np.int32), place)
    # A jit of its own each call: a traced shard_map holds the mesh it was traced under.
    forward = nnx.jit(_amax_forward)
    if mesh is None:
        out = forward(model, ids, pos, kv, md)
    else:
        with heads_sharded(mesh):
            out = forward(model, ids, pos, kv, md)
    return [(float(k), float(v)) for k, v in jax.device_get(out)]


def calculate_kv_scales(model: nnx.Module, token_ids: list[int], parallel=None
                        ) -> tuple[tuple[float, float], ...]:
    """Per layer (k_scale, v_scale) = (max|k| / K_SCALE_CONSTANT, max|v| / V_SCALE_CONSTANT)
    over ``token_ids`` (1.0 where a maximum is 0); ``parallel`` as ``kv_amax``'s."""
    kc, vc = scale_constants()
    scales = tuple((k / kc if k > 0 else 1.0, v / vc if v > 0 else 1.0)
                   for k, v in kv_amax(model, token_ids, parallel=parallel))
    ks, vs = [s[0] for s in scales], [s[1] for s in scales]
    logger.info("calculate_kv_scales over %d calibration tokens: k_scale %.3g-%.3g, v_scale "
                "%.3g-%.3g", len(token_ids), min(ks), max(ks), min(vs), max(vs))
    return scales


def set_kv_scales(model: nnx.Module, scales: tuple[tuple[float, float], ...]) -> None:
    """Sets each layer's static (k_scale, v_scale) (``LlamaAttention``) and the model config's
    ``kv_cache_scales``, in place, before the engine compiles anything."""
    import dataclasses

    for layer, (k, v) in zip(model.model.layers, scales):
        layer.self_attn.k_scale, layer.self_attn.v_scale = float(k), float(v)
    model.config = dataclasses.replace(model.config, kv_cache_scales=tuple(scales))
