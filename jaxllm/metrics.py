"""Engine metrics: one table of names for ``LLM.get_metrics()``, the server's /metrics and the Ray
replicas' metrics, read from the engine's counters when asked (the engine keeps no metric
objects).

Names are vLLM's under the ``jaxllm:`` prefix (vLLM's ``vllm:num_requests_running`` is
``jaxllm:num_requests_running``); ``get_metrics`` returns vLLM's reader types (``Counter``,
``Gauge``, ``Vector``: vllm/v1/metrics/reader.py), so vLLM's speculative-decoding example reads
its acceptance figures the same way, under our prefix.
"""

from __future__ import annotations

import dataclasses
from typing import Any

PREFIX = "jaxllm:"

# (exported name, engine_stats key, description)
GAUGES = (
    ("num_requests_running", "num_running", "Sequences in the running batch."),
    ("num_requests_waiting", "num_waiting", "Sequences waiting to be scheduled."),
    ("kv_cache_usage_perc", "kv_cache_usage", "Fraction of KV cache pages in use (1 = full)."),
)
COUNTERS = (
    ("prompt_tokens", "prompt_tokens", "Prompt tokens processed."),
    ("generation_tokens", "generation_tokens", "Tokens generated."),
    ("prefix_cache_queries", "prefix_cache_queries", "Tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "prefix_cache_hits", "Tokens found in the prefix cache."),
    ("num_preemptions", "num_preemptions", "Sequences preempted."),
)
# Only with a speculative config (as vLLM registers them).
SPEC_COUNTERS = (
    ("spec_decode_num_drafts", "spec_decode_num_drafts",
     "Speculative steps of a sequence with a draft."),
    ("spec_decode_num_draft_tokens", "spec_decode_num_draft_tokens", "Draft tokens proposed."),
    ("spec_decode_num_accepted_tokens", "spec_decode_num_accepted_tokens",
     "Draft tokens accepted."),
)


def buckets_1_2_5(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit`` (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


# Histograms the engine counts (exported name, key, description, bucket upper bounds):
# ``stats[key + "_buckets"]`` the count of each bucket and one over the last (not cumulative),
# ``stats[key + "_sum"]`` the sum of the values.
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# vLLM's max_tokens buckets are 1-2-5 up to max_model_len; one fixed table here (to 10^6, past
# any context this engine serves), so that data-parallel replicas' counts add bucket by bucket.
MAX_TOKENS_BUCKETS = buckets_1_2_5(10 ** 6)
HISTOGRAMS = (
    ("iteration_tokens_total", "iteration_tokens", "Tokens per engine step (prompt and "
     "generation, before padding).", ITERATION_TOKEN_BUCKETS),
    ("request_params_max_tokens", "request_params_max_tokens", "The max_tokens of each finished "
     "request (the engine's, where the request left it to the context).", MAX_TOKENS_BUCKETS),
)
# (exported name, key, description, label): one counter per position of the list.
VECTORS = (
    ("spec_decode_num_accepted_tokens_per_pos", "spec_decode_num_accepted_tokens_per_pos",
     "Draft tokens accepted, by their position in the draft.", "position"),
)


@dataclasses.dataclass
class Metric:
    name: str
    labels: dict[str, str]


@dataclasses.dataclass
class Counter(Metric):
    value: int


@dataclasses.dataclass
class Gauge(Metric):
    value: float


@dataclasses.dataclass
class Vector(Metric):
    values: list[int]


@dataclasses.dataclass
class Histogram(Metric):
    """vLLM's reader Histogram: ``buckets`` upper bound (as a string, "+Inf" last) ->
    cumulative count."""

    count: int
    sum: float
    buckets: dict[str, int]


def histogram_buckets(counts: list[int], bounds: tuple) -> dict[str, int]:
    """Per-bucket counts (``HISTOGRAMS``' layout) as cumulative counts by upper bound."""
    out, total = {}, 0
    for bound, c in zip([*map(str, bounds), "+Inf"], counts):
        total += c
        out[bound] = total
    return out


def engine_stats(engine: Any) -> dict[str, Any]:
    """The engine's gauges and counters as one dict (an LLMEngine, or a DataParallelEngine,
    whose scheduler and pool views sum its replicas); with LoRA also ``lora_info``:
    (max_loras, (time, running adapters, waiting adapters))."""
    sched = engine.scheduler
    out = {"num_running": sched.num_running, "num_waiting": sched.num_waiting,
           "kv_cache_usage": engine.page_pool.usage, **engine.stats}
    if engine.config.enable_lora:
        out["lora_info"] = (engine.config.max_loras,
                            engine.lora_requests_info or (0.0, "", ""))
    return out


def lora_info_labels(info: tuple) -> tuple[float, dict[str, str]]:
    """vLLM's ``lora_requests_info`` gauge from ``engine_stats``' ``lora_info``: its value
    (the time of the last schedule) and labels (max_lora, the waiting and the running
    adapters' names, comma-joined)."""
    max_loras, (when, running, waiting) = info
    return when, {"max_lora": str(max_loras), "waiting_lora_adapters": waiting,
                  "running_lora_adapters": running}


def read_metrics(stats: dict[str, Any], labels: dict[str, str] | None = None) -> list[Metric]:
    """``stats`` (``engine_stats``) as vLLM's reader metrics, in the tables' order."""
    labels = dict(labels or {})
    out: list[Metric] = [Gauge(PREFIX + name, labels, float(stats.get(key, 0)))
                         for name, key, _ in GAUGES]
    out += [Counter(PREFIX + name, labels, int(stats.get(key, 0))) for name, key, _ in COUNTERS]
    out += [Counter(PREFIX + name, labels, int(stats[key])) for name, key, _ in SPEC_COUNTERS
            if key in stats]
    out += [Vector(PREFIX + name, labels, [int(v) for v in stats[key]])
            for name, key, _, _ in VECTORS if key in stats]
    for name, key, _, bounds in HISTOGRAMS:
        if key + "_buckets" in stats:
            counts = stats[key + "_buckets"]
            out.append(Histogram(PREFIX + name, labels, int(sum(counts)),
                                 float(stats[key + "_sum"]), histogram_buckets(counts, bounds)))
    if "lora_info" in stats:  # only with LoRA, as vLLM registers it
        when, lab = lora_info_labels(stats["lora_info"])
        out.append(Gauge(PREFIX + "lora_requests_info", {**labels, **lab}, when))
    return out
