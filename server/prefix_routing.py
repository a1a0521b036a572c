"""Prefix-cache-aware replica choice, free of Ray: the policy the Ray Serve router runs and the
CPU benchmark (benchmarks/ray_prefix_routing.py) measures.

A request's key is a hash of its first ``num_pages`` full pages of prompt tokens (the pages the
engine's prefix cache would share). Replicas are ranked for a key by rendezvous hashing
(highest random weight): every router ranks the same way with no shared state, and when a
replica joins or leaves only the keys it owned move. The top replica gets the request unless it
is overloaded: its queue is longer than the shortest one by more than ``imbalanced_threshold``
requests, and then the least loaded replica gets it (what Ray's PrefixCacheAffinityRouter does
too). A prompt shorter than one page has no key: nothing of it can be shared, so it is routed by
load alone.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_ROUTING_PAGES = 4
DEFAULT_IMBALANCED_THRESHOLD = 16


def prefix_key(token_ids: Sequence[int], page_size: int,
               num_pages: int = DEFAULT_ROUTING_PAGES) -> bytes | None:
    """Hash of the first ``min(num_pages, full pages)`` pages of ``token_ids``; None when the
    prompt has no full page."""
    if page_size < 1 or num_pages < 1:
        raise ValueError(f"page_size ({page_size}) and num_pages ({num_pages}) must be >= 1.")
    n = min(len(token_ids) // page_size, num_pages) * page_size
    if n == 0:
        return None
    return hashlib.sha256(np.asarray(token_ids[:n], dtype="<i8").tobytes()).digest()


def rank_replicas(key: bytes, replica_ids: Sequence[str]) -> list[str]:
    """``replica_ids`` in rendezvous-hash order for ``key`` (best first)."""
    def weight(rid: str) -> bytes:
        return hashlib.sha256(key + rid.encode()).digest()

    return sorted(replica_ids, key=weight, reverse=True)


def choose_order(key: bytes | None, replica_ids: Sequence[str],
                 queue_lens: Mapping[str, int],
                 imbalanced_threshold: float = DEFAULT_IMBALANCED_THRESHOLD) -> list[str]:
    """The replicas to try, in order. ``queue_lens`` holds the ongoing requests of the replicas
    whose load is known (a missing one counts as idle)."""
    if not replica_ids:
        return []
    load = {r: queue_lens.get(r, 0) for r in replica_ids}
    by_load = sorted(replica_ids, key=lambda r: load[r])  # stable: ties keep the given order
    if key is None:
        return by_load
    ranked = rank_replicas(key, replica_ids)
    if load[ranked[0]] - load[by_load[0]] > imbalanced_threshold:
        return sorted(ranked, key=lambda r: load[r])
    return ranked


class RoundRobin:
    """The baseline the benchmark compares with: replicas in turn, whatever the prompt."""

    def __init__(self):
        self._count = itertools.count()

    def choose_order(self, key: bytes | None, replica_ids: Sequence[str],
                     queue_lens: Mapping[str, int]) -> list[str]:
        i = next(self._count) % len(replica_ids)
        return list(replica_ids[i:]) + list(replica_ids[:i])
