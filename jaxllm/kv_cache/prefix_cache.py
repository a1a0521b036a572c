"""Automatic prefix caching: full KV pages found by a hash of everything that determines them.

vLLM V1's scheme (kv_cache_utils.hash_block_tokens, block_pool, kv_cache_manager): page i of a
sequence (tokens [i*B, (i+1)*B), B = page size) is identified once it is *full* by

    hash_i = sha256(hash_{i-1} || canonical(tokens of page i) || canonical(extra keys))
    hash_{-1} = root = sha256(tag || canonical(engine extra keys))

so equal prefixes map to equal hashes and one differing token changes the hash of its page and of
every page after it (pages before it still hit). The K/V of a token depends only on the tokens at
and before it, so a page's hash names its K/V exactly; prompt and generated tokens are alike (a
multi-turn chat whose next turn repeats the history hits the pages filled during decode).

Collision resistance: the full 32-byte SHA-256 digest is the key (not Python's `hash`, not a
truncation), over a length-prefixed, type-tagged byte encoding, so two different (parent, tokens,
extra keys) never encode to the same bytes. A wrong hit needs a SHA-256 collision: for N cached
pages the chance is about N^2 / 2^257, i.e. nil for any pool that fits in memory.

Extra keys (the hook for anything else that changes the K/V): engine-wide ones (model name,
cache dtype; a model revision) are folded into the root; per-sequence ones
(`Sequence.cache_extra_keys`, e.g. a LoRA id or a cache salt) into every page's hash.

Ownership: the `PagePool` holds ref counts and the free lists; this module holds the index
hash -> page and page -> hash. A page enters the index when it is full of *computed* tokens
(`register`, called by the scheduler after each step), is marked in the pool (`mark_cached`) so
that at ref count 0 it waits in the pool's cached LRU list, and leaves the index when the pool
hands it out again (`on_evict`). A hit (`lookup` then `PagePool.acquire`) takes a reference
without recomputing or rewriting the page.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from typing import Any

from jaxllm.kv_cache.page_pool import PagePool

PageHash = bytes  # a 32-byte SHA-256 digest

_ROOT_TAG = b"jaxllm-prefix-cache-v1\0"


def encode_key(obj: Any) -> bytes:
    """Canonical, unambiguous bytes of an extra key: None, bool, int, str, bytes, tuples/lists.

    Type-tagged and length-prefixed, so no two different keys encode alike (("ab",) vs ("a","b")).
    """
    if obj is None:
        return b"N"
    if isinstance(obj, bool):
        return b"T" if obj else b"F"
    if isinstance(obj, int):
        s = str(obj).encode()
        return b"i" + struct.pack("<I", len(s)) + s
    if isinstance(obj, str):
        s = obj.encode("utf-8")
        return b"s" + struct.pack("<I", len(s)) + s
    if isinstance(obj, (bytes, bytearray)):
        return b"b" + struct.pack("<I", len(obj)) + bytes(obj)
    if isinstance(obj, (tuple, list)):
        return b"t" + struct.pack("<I", len(obj)) + b"".join(encode_key(x) for x in obj)
    raise TypeError(f"prefix-cache extra keys must be None/bool/int/str/bytes or tuples of them, "
                    f"got {type(obj).__name__}")


def root_hash(extra_keys: tuple = ()) -> PageHash:
    """The parent hash of a sequence's first page; engine-wide extra keys are folded in here."""
    return hashlib.sha256(_ROOT_TAG + encode_key(tuple(extra_keys))).digest()


def hash_page_tokens(parent: PageHash, token_ids, extra_keys: tuple = ()) -> PageHash:
    """SHA-256 of (parent hash, the page's token ids, per-sequence extra keys).

    Token ids are packed as little-endian int64 after their count; the parent is a fixed 32 bytes.
    """
    n = len(token_ids)
    h = hashlib.sha256(parent)
    h.update(struct.pack(f"<I{n}q", n, *token_ids))
    h.update(encode_key(tuple(extra_keys)))
    return h.digest()


class PrefixCache:
    """Index of full, computed KV pages by chained content hash, on top of a PagePool.

    Works on `Sequence`-like objects with: all_token_ids, page_ids, num_computed_tokens,
    num_known_tokens, page_hashes (list, filled lazily here), num_registered_pages, cache_extra_keys.
    """

    def __init__(self, pool: PagePool, page_size: int, extra_keys: tuple = ()):
        self.pool = pool
        self.page_size = page_size
        self.root = root_hash(extra_keys)
        self._index: dict[PageHash, int] = {}
        self._page_hash: list[PageHash | None] = [None] * pool.num_pages
        # Chain any hook set before us (tests' fake models wipe evicted pages).
        self._next_on_evict: Callable[[int], None] | None = pool.on_evict
        pool.on_evict = self._on_evict
        # Token counters, as vLLM's prefix_cache_queries / prefix_cache_hits.
        self.queries = 0
        self.hits = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_cached_pages(self) -> int:
        """Pages whose contents are indexed (in use or free)."""
        return len(self._index)

    def cached_page(self, page_hash: PageHash) -> int | None:
        return self._index.get(page_hash)

    def page_hash(self, page: int) -> PageHash | None:
        return self._page_hash[page]

    def seq_page_hash(self, seq, i: int) -> PageHash:
        """Hash of seq's page i (all its tokens must be known); hashes are memoized on the seq.

        A sequence's tokens only grow, so a memoized hash never goes stale.
        """
        hashes = seq.page_hashes
        B = self.page_size
        tokens = seq.all_token_ids
        while len(hashes) <= i:
            k = len(hashes)
            if (k + 1) * B > len(tokens):
                raise ValueError(f"page {k} of sequence {seq.seq_id} is not full yet")
            parent = hashes[k - 1] if k else self.root
            hashes.append(hash_page_tokens(parent, tokens[k * B:(k + 1) * B],
                                           seq.cache_extra_keys))
        return hashes[i]

    def lookup(self, seq, max_tokens: int) -> list[int]:
        """Pages holding the longest cached prefix of seq's tokens, at most max_tokens // B pages.

        Changes nothing: the caller takes the references (`PagePool.acquire`) when it admits seq.
        """
        index = self._index
        pages: list[int] = []
        for i in range(max(max_tokens, 0) // self.page_size):
            page = index.get(self.seq_page_hash(seq, i))
            if page is None:
                break
            pages.append(page)
        return pages

    # ------------------------------------------------------------------ mutations
    def register(self, seq) -> None:
        """Index seq's pages that are full of computed tokens and not indexed yet.

        A page whose hash already names another page (the same content computed twice, e.g. two
        equal prompts admitted in one step) is not indexed: the first stays the cached copy and
        this one is freed as an ordinary page, as in vLLM.
        """
        # Only tokens whose ids are known: with async scheduling the last token may still be a
        # placeholder for a token the device has sampled but the host not yet read.
        full = min(seq.num_computed_tokens, seq.num_known_tokens) // self.page_size
        start = seq.num_registered_pages
        if full <= start:
            return
        index, page_hash, pool = self._index, self._page_hash, self.pool
        page_ids = seq.page_ids
        for i in range(start, full):
            page = page_ids[i]
            if page_hash[page] is not None:  # a hit page: already indexed
                continue
            h = self.seq_page_hash(seq, i)
            if h in index:
                continue
            index[h] = page
            page_hash[page] = h
            pool.mark_cached(page)
        seq.num_registered_pages = full

    def record(self, queried_tokens: int, hit_tokens: int) -> None:
        self.queries += queried_tokens
        self.hits += hit_tokens

    def reset(self) -> bool:
        """Empty the index. Refused (False) while any page is in use, as vLLM: a running
        sequence's registered pages would otherwise be half-forgotten."""
        if self.pool.num_free_pages != self.pool.num_usable_pages:
            return False
        self._index.clear()
        self._page_hash = [None] * self.pool.num_pages
        self.pool.uncache_all()
        return True

    def _on_evict(self, page: int) -> None:
        h = self._page_hash[page]
        if h is not None:
            self._page_hash[page] = None
            del self._index[h]
        if self._next_on_evict is not None:
            self._next_on_evict(page)

    def check_invariants(self) -> None:
        """Slow consistency check for tests: index and page->hash agree, marks match the pool."""
        assert len(self._index) == sum(h is not None for h in self._page_hash)
        for h, page in self._index.items():
            assert self._page_hash[page] == h
            assert self.pool.is_cached(page)
        for page in range(1, self.pool.num_pages):
            assert self.pool.is_cached(page) == (self._page_hash[page] is not None)
