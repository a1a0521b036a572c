"""PagePool: free list + ref counts; page 0 is never handed out; every page comes back."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.kv_cache import SCRATCH_PAGE, NoFreePagesError, PagePool


def test_a_new_pool_has_every_page_but_the_scratch_page_free():
    pool = PagePool(8)
    assert pool.num_usable_pages == 7
    assert pool.num_free_pages == 7
    assert pool.usage == 0.0
    assert sorted(pool.allocate(7)) == list(range(1, 8))
    assert pool.usage == 1.0


def test_allocating_more_pages_than_are_free_raises_and_changes_nothing():
    pool = PagePool(4)
    pool.allocate(2)
    with pytest.raises(NoFreePagesError, match="requested 2 .* only 1 of 3"):
        pool.allocate(2)
    assert pool.num_free_pages == 1
    pool.check_invariants()


def test_a_shared_page_is_free_only_after_its_last_reference_is_dropped():
    pool = PagePool(4)
    [page] = pool.allocate(1)
    pool.incref([page])
    assert pool.ref_count(page) == 2
    pool.free([page])
    assert pool.ref_count(page) == 1 and pool.num_free_pages == 2
    pool.free([page])
    assert pool.is_free(page) and pool.num_free_pages == 3


def test_freeing_or_increfing_a_free_page_is_a_value_error():
    pool = PagePool(4)
    [page] = pool.allocate(1)
    pool.free([page])
    with pytest.raises(ValueError, match="ref count is 0"):
        pool.free([page])
    with pytest.raises(ValueError, match="ref count is 0"):
        pool.incref([page])
    with pytest.raises(ValueError, match="scratch page"):
        pool.free([SCRATCH_PAGE])
    pool.check_invariants()


def test_freeing_the_same_page_twice_in_one_call_is_rejected_atomically():
    pool = PagePool(4)
    a, b = pool.allocate(2)
    with pytest.raises(ValueError):
        pool.free([b, a, a])
    assert pool.ref_count(a) == 1 and pool.ref_count(b) == 1


def test_pages_are_handed_out_least_recently_freed_first():
    pool = PagePool(6)
    pages = pool.allocate(5)
    pool.free([pages[3]])
    pool.free([pages[0], pages[4]])
    assert pool.allocate(3) == [pages[3], pages[0], pages[4]]


def test_allocate_calls_the_evict_hook_but_acquire_keeps_a_free_page_valid():
    pool = PagePool(4)
    evicted = []
    pool.on_evict = evicted.append
    a, b = pool.allocate(2)
    assert evicted == [a, b]
    pool.free([a, b])
    pool.acquire([b])  # prefix-cache hit on a cached, free page
    assert pool.ref_count(b) == 1 and evicted == [a, b]
    assert pool.allocate(2) == [3, a]  # b is no longer free
    assert evicted == [a, b, 3, a]
    pool.check_invariants()


@settings(max_examples=100, deadline=None)
@given(num_pages=st.integers(2, 12), data=st.data())
def test_random_allocate_incref_acquire_free_never_double_hands_out_a_page(num_pages, data):
    pool = PagePool(num_pages)
    owned: list[int] = []  # one entry per reference we hold
    for _ in range(data.draw(st.integers(0, 60))):
        op = data.draw(st.sampled_from(["allocate", "incref", "acquire", "free"]))
        if op == "allocate":
            n = data.draw(st.integers(0, num_pages))
            if n > pool.num_free_pages:
                with pytest.raises(NoFreePagesError):
                    pool.allocate(n)
                continue
            pages = pool.allocate(n)
            assert SCRATCH_PAGE not in pages
            assert len(set(pages)) == n
            assert not set(pages) & set(owned), "a referenced page was handed out again"
            owned += pages
        elif op == "incref" and owned:
            pages = data.draw(st.lists(st.sampled_from(owned), max_size=3))
            pool.incref(pages)
            owned += pages
        elif op == "acquire":
            pages = data.draw(st.lists(st.integers(1, num_pages - 1), max_size=3, unique=True))
            pool.acquire(pages)
            owned += pages
        elif op == "free" and owned:
            k = data.draw(st.integers(0, len(owned)))
            idx = data.draw(st.permutations(range(len(owned))))[:k]
            pages = [owned[i] for i in idx]
            for i in sorted(idx, reverse=True):
                owned.pop(i)
            pool.free(pages)
        for page in set(owned):
            assert pool.ref_count(page) == owned.count(page)
        assert pool.num_free_pages == pool.num_usable_pages - len(set(owned))
        pool.check_invariants()
    pool.free(owned)
    assert pool.num_free_pages == pool.num_usable_pages
    assert sorted(pool.allocate(pool.num_usable_pages)) == list(range(1, num_pages))
