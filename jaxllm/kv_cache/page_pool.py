"""Host-side allocator for KV-cache pages: free list + per-page reference counts.

The device KV cache is `[P, B, K, D]` per layer (P pages of B tokens); this module owns which of
the P pages belong to whom. It is the single source of truth for page ownership; the device only
ever sees page ids inside page tables.

Page 0 is the scratch page: it is never handed out, padding tokens write their K/V there and
padding page-table entries point at it. Pages 1..P-1 are allocatable.

Prefix caching (`jaxllm/kv_cache/prefix_cache.py`) builds on these properties:

* Free pages sit in two *ordered* free lists (insertion-ordered dicts): `_empty` holds pages whose
  contents nobody will ask for again, `_cached` holds ref-0 pages marked with `mark_cached` (the
  prefix cache indexes their contents). `allocate` takes empty pages first and evicts a cached
  page only when no empty one is left. Within each list pages freed last are handed out last, so
  `_cached` is the LRU eviction order. Callers free a sequence's pages tail-first (see
  `Scheduler.finish`): the tail is the least likely to be shared, so among pages released
  together it is evicted first.
* A freed page's contents stay valid until `allocate` hands it out again. `allocate` calls
  `on_evict(page)` at that moment for every page it hands out (the hook where the prefix cache
  drops the page's hash), and `acquire` takes a reference on a page that may be free *without*
  invalidating it (a prefix-cache hit on a cached ref-0 page), removing it from its free list.
* Without `mark_cached` calls (prefix caching off) every freed page goes to `_empty` and the
  pool behaves as one free list in least-recently-freed order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

SCRATCH_PAGE = 0


class NoFreePagesError(RuntimeError):
    """Raised by `PagePool.allocate` when fewer pages are free than requested."""


class PagePool:
    """Free list and reference counts for pages 1..num_pages-1 (page 0 is the scratch page).

    All operations are O(number of pages touched); none scans the pool.
    """

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(
                f"num_pages must be at least 2 (page 0 is the scratch page), got {num_pages}. "
                "Raise num_pages or gpu_memory_utilization.")
        self.num_pages = num_pages
        # Python list, not numpy: scalar reads/writes on a list are several times faster.
        self._ref_counts = [0] * num_pages
        # Insertion-ordered: the front is the least recently freed page (handed out first).
        # `_empty`: free pages nobody will look up again; `_cached`: free pages whose contents
        # the prefix cache still indexes (evicted only once `_empty` is exhausted: LRU order).
        self._empty: dict[int, None] = dict.fromkeys(range(1, num_pages))
        self._cached: dict[int, None] = {}
        self._is_cached = [False] * num_pages
        # Called with a page id when `allocate` hands out a free page, i.e. when the contents it
        # kept while free become invalid. The prefix cache sets this to drop the page's hash.
        self.on_evict: Callable[[int], None] | None = None

    # ------------------------------------------------------------------ queries
    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages `allocate` can hand out: empty ones plus cached ref-0 ones (evictable)."""
        return len(self._empty) + len(self._cached)

    @property
    def num_cached_free_pages(self) -> int:
        """Free pages that still hold prefix-cached contents (evicted LRU when needed)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of usable pages currently referenced (0.0 empty .. 1.0 full)."""
        return 1.0 - self.num_free_pages / self.num_usable_pages

    def is_cached(self, page: int) -> bool:
        return self._is_cached[page]

    def ref_count(self, page: int) -> int:
        self._check_page(page)
        return self._ref_counts[page]

    def is_free(self, page: int) -> bool:
        return self.ref_count(page) == 0

    # ------------------------------------------------------------------ mutations
    def allocate(self, n: int) -> list[int]:
        """Hand out `n` free pages, each with ref count 1: empty pages first (least recently
        freed first), then cached ones in LRU order (evicting them).

        Raises NoFreePagesError (and changes nothing) if fewer than `n` are free; check
        `num_free_pages` first when running out is expected.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        empty, cached = self._empty, self._cached
        if n > len(empty) + len(cached):
            raise NoFreePagesError(
                f"requested {n} KV-cache pages but only {self.num_free_pages} of "
                f"{self.num_usable_pages} are free")
        refs, on_evict = self._ref_counts, self.on_evict
        pages = []
        for _ in range(n):
            if empty:
                page = next(iter(empty))
                del empty[page]
            else:
                page = next(iter(cached))
                del cached[page]
                self._is_cached[page] = False
            refs[page] = 1
            if on_evict is not None:
                on_evict(page)
            pages.append(page)
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Drop one reference from each page; a page reaching 0 goes to the back of its free list
        (the cached one if `mark_cached`, else the empty one).

        Its contents stay valid until `allocate` hands it out again. Freeing a page that has no
        reference is a bookkeeping bug: ValueError, and nothing is changed.
        """
        pages = list(pages)
        self._check_refs(pages, "free")
        refs, empty, cached, is_cached = self._ref_counts, self._empty, self._cached, self._is_cached
        for page in pages:
            refs[page] -= 1
            if refs[page] == 0:
                if is_cached[page]:
                    cached[page] = None
                else:
                    empty[page] = None

    def incref(self, pages: Iterable[int]) -> None:
        """Add a reference to pages that are already referenced (sharing, e.g. n > 1 siblings).

        A page with ref count 0 is free: taking it back goes through `acquire` (prefix-cache hit)
        or `allocate`, so incref on it is a bug: ValueError, and nothing is changed.
        """
        pages = list(pages)
        self._check_refs(pages, "incref", per_use=False)
        for page in pages:
            self._ref_counts[page] += 1

    def acquire(self, pages: Iterable[int]) -> None:
        """Add a reference to each page, taking free pages off the free list *without* evicting.

        This is the prefix-cache hit path: a ref-0 page whose contents are still valid is reused
        as is, and `on_evict` is not called.
        """
        pages = list(pages)
        for page in pages:
            self._check_page(page)
        refs = self._ref_counts
        for page in pages:
            if refs[page] == 0:
                if self._is_cached[page]:
                    del self._cached[page]
                else:
                    del self._empty[page]
            refs[page] += 1

    def mark_cached(self, page: int) -> None:
        """Mark a referenced page as holding prefix-cached contents: once free it waits in the
        cached (LRU) list and is evicted only when no empty page is left. Cleared on eviction."""
        if self.ref_count(page) == 0:
            raise ValueError(f"mark_cached of page {page} with ref count 0: only a page in use "
                             "(whose K/V was just computed) can become cached")
        self._is_cached[page] = True

    def uncache_all(self) -> None:
        """Forget every cached mark: cached free pages become empty ones (prefix-cache reset).

        They go after the current empty pages, in their LRU order; `on_evict` is not called.
        """
        for page in self._cached:
            self._empty[page] = None
        self._cached.clear()
        self._is_cached = [False] * self.num_pages

    # ------------------------------------------------------------------ checks
    def _check_page(self, page: int) -> None:
        if not 1 <= page < self.num_pages:
            raise ValueError(
                f"page id {page} is not an allocatable page (1..{self.num_pages - 1}; "
                "0 is the scratch page)")

    def _check_refs(self, pages: list[int], op: str, per_use: bool = True) -> None:
        """Every page must be referenced; with per_use, as many times as it appears in `pages`."""
        counts = Counter(pages) if per_use else dict.fromkeys(pages, 1)
        for page, times in counts.items():
            self._check_page(page)
            if self._ref_counts[page] < times:
                raise ValueError(
                    f"{op} of page {page} {times} time(s) but its ref count is "
                    f"{self._ref_counts[page]}: a page is being released or shared after it was "
                    "freed (bookkeeping bug)")

    def check_invariants(self) -> None:
        """Slow consistency check for tests: free lists == pages with ref count 0, split by mark."""
        refs = self._ref_counts
        free = set(self._empty) | set(self._cached)
        assert len(free) == len(self._empty) + len(self._cached)
        assert refs[SCRATCH_PAGE] == 0 and SCRATCH_PAGE not in free
        assert not self._is_cached[SCRATCH_PAGE]
        assert all(r >= 0 for r in refs)
        assert free == {p for p in range(1, self.num_pages) if refs[p] == 0}
        assert all(self._is_cached[p] for p in self._cached)
        assert not any(self._is_cached[p] for p in self._empty)

    def __repr__(self) -> str:
        return (f"PagePool(num_pages={self.num_pages}, free={self.num_free_pages}, "
                f"usage={self.usage:.1%})")
