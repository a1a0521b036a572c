"""Prometheus metrics with vLLM's names under the ``jaxllm:`` prefix, one registry per app.

Engine-side figures (queue sizes, KV use, token, prefix-cache and speculative-decoding counters;
names and descriptions from jaxllm/metrics.py's tables) are read from ``engine.get_stats()`` at
scrape time by a custom collector, so the engine keeps no Prometheus
objects and the numbers are never stale. Latencies are measured by the server per request.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jaxllm.metrics import COUNTERS, GAUGES, PREFIX, SPEC_COUNTERS, VECTORS, lora_info_labels

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


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
        lab = dict(labelnames=["model_name"], registry=self.registry)
        self.ttft = Histogram("jaxllm:time_to_first_token_seconds",
                              "Time to first token (request arrival to first token out).",
                              buckets=TTFT_BUCKETS, **lab).labels(model_name)
        self.tpot = Histogram("jaxllm:time_per_output_token_seconds",
                              "Mean time per output token after the first, per sequence.",
                              buckets=TPOT_BUCKETS, **lab).labels(model_name)
        self.e2e = Histogram("jaxllm:e2e_request_latency_seconds",
                             "End-to-end request latency (arrival to last token).",
                             buckets=E2E_BUCKETS, **lab).labels(model_name)
        self._success = Counter("jaxllm:request_success", "Requests finished, by finish reason.",
                                labelnames=["model_name", "finished_reason"],
                                registry=self.registry)
        self.model_name = model_name

    def request_finished(self, finish_reason: str | None) -> None:
        self._success.labels(self.model_name, finish_reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
