"""Prometheus metrics with vLLM's names under the ``jaxllm:`` prefix, one registry per app.

Engine-side figures (queue sizes, KV use, token, prefix-cache and speculative-decoding counters;
names and descriptions from jaxllm/metrics.py's tables) are read from ``engine.get_stats()`` at
scrape time by a custom collector, so the engine keeps no Prometheus
objects and the numbers are never stale. Latencies are measured by the server per request.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from jaxllm.metrics import (COUNTERS, GAUGES, HISTOGRAMS, PREFIX, SPEC_COUNTERS, VECTORS,
                            buckets_1_2_5, histogram_buckets, lora_info_labels)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
N_BUCKETS = (1, 2, 5, 10, 20)
# A finished request's phases (vLLM's names): from its RequestStateStats, seconds between
# (name, start field, end field, description).
PHASES = (
    ("request_queue_time", "queued_ts", "scheduled_ts", "Time in the waiting queue."),
    ("request_prefill_time", "scheduled_ts", "first_token_ts",
     "Time from first scheduled to the first token."),
    ("request_decode_time", "first_token_ts", "last_token_ts",
     "Time from the first token to the last."),
    ("request_inference_time", "scheduled_ts", "last_token_ts",
     "Time from first scheduled to the last token."),
)


class _EngineCollector(Collector):
    def __init__(self, engine: Any, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        s = self.engine.get_stats()
        lab = [self.model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            g.add_metric(lab, float(value))
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            c.add_metric(lab, float(value))
            return c

        for name, key, doc in GAUGES:
            yield gauge(name, doc, s.get(key, 0))
        for name, key, doc, bounds in HISTOGRAMS:
            if key + "_buckets" in s:
                h = HistogramMetricFamily(PREFIX + name, doc, labels=["model_name"])
                h.add_metric(lab, list(histogram_buckets(s[key + "_buckets"], bounds).items()),
                             float(s[key + "_sum"]))
                yield h
        for name, key, doc in COUNTERS:
            yield counter(name, doc, s.get(key, 0))
        for name, key, doc in SPEC_COUNTERS:  # only with a speculative config, as vLLM
            if key in s:
                yield counter(name, doc, s[key])
        for name, key, doc, label in VECTORS:
            if key in s:
                c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name", label])
                for i, v in enumerate(s[key]):
                    c.add_metric([self.model_name, str(i)], float(v))
                yield c
        if "lora_info" in s:  # vLLM's, only with LoRA: the adapters as labels
            when, lab = lora_info_labels(s["lora_info"])
            g = GaugeMetricFamily(PREFIX + "lora_requests_info",
                                  "Running and waiting LoRA adapters (labels); the value is the "
                                  "time they were read.", labels=["model_name", *lab])
            g.add_metric([self.model_name, *lab.values()], when)
            yield g


class ServerMetrics:
    """The registry of one app and the server-side latency histograms."""

    def __init__(self, engine: Any, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(engine, model_name))
        def hist(name: str, doc: str, buckets) -> Any:
            return Histogram(f"jaxllm:{name}", doc, labelnames=["model_name"], buckets=buckets,
                             registry=self.registry).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds",
                         "Time to first token (request arrival to first token out).", TTFT_BUCKETS)
        self.tpot = hist("time_per_output_token_seconds",
                         "Mean time per output token after the first, per sequence.", TPOT_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds",
                        "End-to-end request latency (arrival to last token).", E2E_BUCKETS)
        self._success = Counter("jaxllm:request_success", "Requests finished, by finish reason.",
                                labelnames=["model_name", "finished_reason"],
                                registry=self.registry)
        self.phases = [(hist(f"{name}_seconds", doc, E2E_BUCKETS), start, end)
                       for name, start, end, doc in PHASES]
        tokens = buckets_1_2_5(getattr(engine, "max_model_len", None) or 1 << 20)
        self.prompt_tokens = hist("request_prompt_tokens",
                                  "Prompt tokens of each finished request.", tokens)
        self.generation_tokens = hist("request_generation_tokens",
                                      "Tokens generated for each finished request.", tokens)
        self.params_n = hist("request_params_n", "The n of each finished request.", N_BUCKETS)
        self.model_name = model_name

    def request_finished(self, finish_reason: str | None, stats: Any = None,
                         prompt_tokens: int | None = None, n: int = 1) -> None:
        """Counts a finished request; with its ``RequestStateStats`` (``RequestOutput.metrics``)
        also its phases, token counts and n, as vLLM's histograms."""
        self._success.labels(self.model_name, finish_reason or "unknown").inc()
        if stats is None or not stats.scheduled_ts:
            return
        for hist, start, end in self.phases:
            t0, t1 = getattr(stats, start), getattr(stats, end)
            if t0 and t1:  # (no first token: an abort before it; its phases are not observed)
                hist.observe(max(0.0, t1 - t0))
        if prompt_tokens is not None:
            self.prompt_tokens.observe(prompt_tokens)
        self.generation_tokens.observe(stats.num_generation_tokens)
        self.params_n.observe(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
