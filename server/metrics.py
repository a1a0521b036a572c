"""Prometheus metrics with vLLM's names under the ``jaxllm:`` prefix, one registry per app.

Engine-side figures (queue sizes, KV use, token and prefix-cache counters) are read from
``engine.get_stats()`` at scrape time by a custom collector, so the engine keeps no Prometheus
objects and the numbers are never stale. Latencies are measured by the server per request.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

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
            g = GaugeMetricFamily(f"jaxllm:{name}", doc, labels=["model_name"])
            g.add_metric(lab, float(value))
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"jaxllm:{name}", doc, labels=["model_name"])
            c.add_metric(lab, float(value))
            return c

        yield gauge("num_requests_running", "Sequences in the running batch.", s["num_running"])
        yield gauge("num_requests_waiting", "Sequences waiting to be scheduled.", s["num_waiting"])
        yield gauge("kv_cache_usage_perc", "Fraction of KV cache pages in use (1 = full).",
                    s["kv_cache_usage"])
        yield counter("prefix_cache_queries", "Tokens looked up in the prefix cache.",
                      s.get("prefix_cache_queries", 0))
        yield counter("prefix_cache_hits", "Tokens found in the prefix cache.",
                      s.get("prefix_cache_hits", 0))
        yield counter("prompt_tokens", "Prompt tokens processed.", s.get("prompt_tokens", 0))
        yield counter("generation_tokens", "Tokens generated.", s.get("generation_tokens", 0))
        yield counter("num_preemptions", "Sequences preempted.", s.get("num_preemptions", 0))
        if "spec_decode_num_drafts" in s:  # only with a speculative config, as vLLM
            yield counter("spec_decode_num_drafts", "Speculative steps of a sequence with a "
                          "draft.", s["spec_decode_num_drafts"])
            yield counter("spec_decode_num_draft_tokens", "Draft tokens proposed.",
                          s["spec_decode_num_draft_tokens"])
            yield counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                          s["spec_decode_num_accepted_tokens"])


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
