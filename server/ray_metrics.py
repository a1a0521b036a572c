"""The engine's figures exported through ``ray.util.metrics`` from every Serve replica.

Each replica records the gauges and counters of its ``/metrics`` (server/metrics.py: queue
sizes, KV use, prefix-cache and token counters) under the same names with ``jaxllm_`` in front
(Ray exports them as ``ray_jaxllm_...``), tagged ``model_name`` and ``replica``. Ray's
per-node metrics agents serve them to Prometheus, so one query covers the fleet
(``sum(ray_jaxllm_num_requests_running)``, ``sum(rate(ray_jaxllm_generation_tokens[1m]))``)
instead of scraping each replica's /metrics through the ingress, which answers from whichever
replica it routed to.

The engine keeps no metric objects: a daemon thread reads ``engine.get_stats()`` every
``interval_s`` and records it; Ray counters only go up, so each counter is incremented by the
difference since the last reading.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from jaxllm.metrics import COUNTERS, GAUGES  # (name, get_stats key, description), as /metrics

logger = logging.getLogger("jaxllm.server")

HIT_RATE = ("prefix_cache_hit_rate",
            "Prefix-cache hits / queries (tokens) since the replica started.")
TAG_KEYS = ("model_name", "replica")
DEFAULT_INTERVAL_S = 5.0


class RayEngineMetrics:
    """``ray.util.metrics`` objects for one replica's engine. ``metrics`` is the module making
    them (``ray.util.metrics``; tests pass a recorder)."""

    def __init__(self, engine: Any, model_name: str, replica_id: str, metrics: Any = None):
        if metrics is None:
            from ray.util import metrics
        self.engine = engine
        tags = {"model_name": model_name, "replica": replica_id}
        gauges = [(name, doc) for name, _, doc in GAUGES] + [HIT_RATE]
        self.gauges = {name: metrics.Gauge(f"jaxllm_{name}", description=doc, tag_keys=TAG_KEYS)
                       for name, doc in gauges}
        self.counters = {name: metrics.Counter(f"jaxllm_{name}", description=doc,
                                               tag_keys=TAG_KEYS)
                         for name, _, doc in COUNTERS}
        for m in (*self.gauges.values(), *self.counters.values()):
            m.set_default_tags(tags)
        self._totals = {name: 0.0 for name, _, _ in COUNTERS}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self) -> dict[str, float]:
        """Reads the engine's stats once and records them; returns the exported values."""
        s = self.engine.get_stats()
        out: dict[str, float] = {}
        with self._lock:
            for name, key, _ in GAUGES:
                out[name] = float(s.get(key, 0))
                self.gauges[name].set(out[name])
            queries = float(s.get("prefix_cache_queries", 0))
            out[HIT_RATE[0]] = float(s.get("prefix_cache_hits", 0)) / queries if queries else 0.0
            self.gauges[HIT_RATE[0]].set(out[HIT_RATE[0]])
            for name, key, _ in COUNTERS:
                total = float(s.get(key, 0))
                if total > self._totals[name]:
                    self.counters[name].inc(total - self._totals[name])
                    self._totals[name] = total
                out[name] = self._totals[name]
        return out

    def start(self, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        """Records every ``interval_s`` seconds on a daemon thread until ``stop()``."""
        if interval_s <= 0:
            raise ValueError(f"metrics interval_s must be > 0, got {interval_s}.")

        def loop():
            while not self._stop.wait(interval_s):
                try:
                    self.update()
                except Exception:  # a failing read must not kill the replica; the next may work
                    logger.exception("recording the engine metrics failed")

        self._thread = threading.Thread(target=loop, name="jaxllm-ray-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
