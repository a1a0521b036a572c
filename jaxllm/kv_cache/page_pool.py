"""Host-side allocator for KV-cache pages: free list + per-page reference counts.

The device KV cache is `[P, B, K, D]` per layer (P pages of B tokens); this module owns which of
the P pages belong to whom. It is the single source of truth for page ownership; the device only
ever sees page ids inside page tables.

Page 0 is the scratch page: it is never handed out, padding tokens write their K/V there and
padding page-table entries point at it. Pages 1..P-1 are allocatable.

Prefix caching (a later issue) builds on two properties kept here on purpose:

* Free pages sit in an *ordered* free list (an insertion-ordered dict): pages freed last are
  handed out last, so the free list doubles as the LRU eviction order of cached pages. Callers
  should free a sequence's pages tail-first (see `Scheduler.finish`): the tail of a sequence is
  the least likely to be shared, so it is evicted first.
* A freed page's contents stay valid until `allocate` hands it out again. `allocate` calls
  `on_evict(page)` at that moment (the hook where the prefix cache drops the page's block hash),
  and `acquire` takes a reference on a page that may be free *without* invalidating it (a
  prefix-cache hit on a cached ref-0 page), removing it from the free list.
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
        self._free: dict[int, None] = dict.fromkeys(range(1, num_pages))
        # Called with a page id when `allocate` hands out a free page, i.e. when the contents it
        # kept while free become invalid. The prefix cache sets this to drop the page's hash.
        self.on_evict: Callable[[int], None] | None = None

    # ------------------------------------------------------------------ queries
    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable pages currently referenced (0.0 empty .. 1.0 full)."""
        return 1.0 - len(self._free) / self.num_usable_pages

    def ref_count(self, page: int) -> int:
        self._check_page(page)
        return self._ref_counts[page]

    def is_free(self, page: int) -> bool:
        return self.ref_count(page) == 0

    # ------------------------------------------------------------------ mutations
    def allocate(self, n: int) -> list[int]:
        """Hand out `n` free pages (least recently freed first), each with ref count 1.

        Raises NoFreePagesError (and changes nothing) if fewer than `n` are free; check
        `num_free_pages` first when running out is expected.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if n > len(self._free):
            raise NoFreePagesError(
                f"requested {n} KV-cache pages but only {len(self._free)} of "
                f"{self.num_usable_pages} are free")
        free, refs, on_evict = self._free, self._ref_counts, self.on_evict
        pages = []
        for _ in range(n):
            page = next(iter(free))
            del free[page]
            refs[page] = 1
            if on_evict is not None:
                on_evict(page)
            pages.append(page)
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Drop one reference from each page; a page reaching 0 goes to the back of the free list.

        Its contents stay valid until `allocate` hands it out again. Freeing a page that has no
        reference is a bookkeeping bug: ValueError, and nothing is changed.
        """
        pages = list(pages)
        self._check_refs(pages, "free")
        refs, free = self._ref_counts, self._free
        for page in pages:
            refs[page] -= 1
            if refs[page] == 0:
                free[page] = None

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
        refs, free = self._ref_counts, self._free
        for page in pages:
            if refs[page] == 0:
                del free[page]
            refs[page] += 1

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
        """Slow consistency check for tests: free list == pages with ref count 0."""
        refs = self._ref_counts
        assert refs[SCRATCH_PAGE] == 0 and SCRATCH_PAGE not in self._free
        assert all(r >= 0 for r in refs)
        assert set(self._free) == {p for p in range(1, self.num_pages) if refs[p] == 0}

    def __repr__(self) -> str:
        return (f"PagePool(num_pages={self.num_pages}, free={self.num_free_pages}, "
                f"usage={self.usage:.1%})")
