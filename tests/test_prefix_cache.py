"""Automatic prefix caching: chained page hashes, hits on admission, LRU eviction, engine results.

The first part needs no model (hashes, the index on a PagePool, the scheduler with a fake model
that reads its context back from the pages); the second runs the small random Llama with caching
on and off on the same requests.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.engine.scheduler import Scheduler
from jaxllm.engine.sequence import Sequence, SequenceStatus
from jaxllm.kv_cache import PagePool
from jaxllm.kv_cache.prefix_cache import PrefixCache, encode_key, hash_page_tokens, root_hash

from .helpers import cli_engine_kwargs, small_llama_folder  # noqa: F401
from .test_scheduler import STOP_TOKEN_MOD, FakeModel, FakeParams, run_alone

S = SequenceStatus
B = 4  # page size of the model-free tests


def _seq(seq_id, prompt, request_id=None, index=0, max_tokens=8, params=None):
    return Sequence(seq_id=seq_id, request_id=request_id or f"r{seq_id}", index=index,
                    prompt_token_ids=list(prompt), output_token_ids=[],
                    sampling_params=params or FakeParams(max_tokens), arrival_time=0.0)


def _sched(num_pages=32, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=128, model=False):
    pool = PagePool(num_pages)
    fake = FakeModel(pool, B) if model else None  # set its evict hook before the cache chains it
    cache = PrefixCache(pool, B)
    sched = Scheduler(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                      max_model_len=max_model_len, page_size=B, page_pool=pool,
                      prefix_cache=cache)
    return sched, cache, fake


def _run_to_completion(sched, token=1):
    """Steps until nothing is unfinished; every sampled token is `token`; finish at max_tokens."""
    for _ in range(1000):
        if not sched.has_unfinished():
            return
        out = sched.schedule()
        check_step_shared(sched, out)
        sched.update(out, [token if s.needs_sample else None for s in out.scheduled])
        for s in out.scheduled:
            if s.needs_sample and s.seq.status is S.RUNNING and (
                    s.seq.num_output_tokens >= s.seq.sampling_params.max_tokens):
                sched.finish(s.seq, S.FINISHED_LENGTH)
    raise AssertionError("did not finish")


def check_step_shared(sched, out):
    """check_step's invariants, allowing pages shared through the cache."""
    pool = sched.page_pool
    refs: dict[int, int] = {}
    for seq in sched.running:
        assert len(set(seq.page_ids)) == len(seq.page_ids)
        for p in seq.page_ids:
            refs[p] = refs.get(p, 0) + 1
    assert all(pool.ref_count(p) == n for p, n in refs.items())
    assert pool.num_free_pages == pool.num_usable_pages - len(refs)
    assert all(not seq.page_ids for seq in sched.waiting)
    for s in out.scheduled:
        assert s.num_new_tokens > 0 and s.start_pos == s.seq.num_computed_tokens
        # New K/V is only ever written into pages nobody else holds.
        for p in s.seq.page_ids[s.start_pos // B:]:
            assert pool.ref_count(p) == 1 and sched.prefix_cache.page_hash(p) is None


def _assert_all_free(pool, cache):
    assert pool.num_free_pages == pool.num_usable_pages
    assert all(pool.ref_count(p) == 0 for p in range(1, pool.num_pages))
    pool.check_invariants()
    cache.check_invariants()


# ---------------------------------------------------------------------------- hashes
def test_page_hash_is_a_full_sha256_chained_over_parent_tokens_and_extra_keys():
    root = root_hash()
    h = hash_page_tokens(root, [1, 2, 3, 4])
    assert len(h) == 32 and h == hash_page_tokens(root, [1, 2, 3, 4])
    assert h != hash_page_tokens(root, [1, 2, 3, 5])
    assert h != hash_page_tokens(hash_page_tokens(root, [9, 9, 9, 9]), [1, 2, 3, 4])
    assert h != hash_page_tokens(root, [1, 2, 3, 4], ("lora-a",))
    assert root != root_hash(("model", "bfloat16"))
    # The encoding is unambiguous: no two different keys share bytes.
    assert encode_key(("ab",)) != encode_key(("a", "b"))
    assert encode_key((1,)) != encode_key(("1",)) != encode_key((b"1",))
    with pytest.raises(TypeError):
        encode_key((1.5,))


@settings(max_examples=200, deadline=None)
@given(a=st.lists(st.integers(0, 3), max_size=24), b=st.lists(st.integers(0, 3), max_size=24))
def test_page_hashes_are_equal_exactly_when_the_whole_prefix_up_to_that_page_is_equal(a, b):
    sa, sb = _seq(0, a or [0]), _seq(1, b or [0])
    cache = PrefixCache(PagePool(2), B)
    for i in range(min(sa.num_tokens, sb.num_tokens) // B):
        same_prefix = sa.all_token_ids[:(i + 1) * B] == sb.all_token_ids[:(i + 1) * B]
        assert (cache.seq_page_hash(sa, i) == cache.seq_page_hash(sb, i)) == same_prefix


# ---------------------------------------------------------------------------- index + pool
def _computed_seq(pool, cache, seq_id, prompt):
    """A sequence whose whole prompt is computed in freshly allocated pages, registered."""
    seq = _seq(seq_id, prompt)
    seq.page_ids = pool.allocate(-(-len(prompt) // B))
    seq.num_computed_tokens = len(prompt)
    cache.register(seq)
    return seq


def test_freed_cached_pages_are_evicted_lru_after_empty_pages_tail_page_first():
    pool = PagePool(9)  # 8 usable pages
    cache = PrefixCache(pool, B)
    a = _computed_seq(pool, cache, 0, list(range(10, 22)))  # 3 full pages
    b = _computed_seq(pool, cache, 1, list(range(30, 38)) + [1])  # 2 full + 1 partial page
    assert cache.num_cached_pages == 5
    pool.free(reversed(a.page_ids))  # a is least recently used; its tail goes first
    pool.free(reversed(b.page_ids))
    assert pool.num_cached_free_pages == 5 and pool.num_free_pages == 8
    # Empty pages first: the 2 never used and b's partial page evict nothing.
    got = pool.allocate(3)
    assert b.page_ids[2] in got and cache.num_cached_pages == 5
    # Then LRU: a's pages, last page first.
    assert pool.allocate(2) == [a.page_ids[2], a.page_ids[1]]
    assert cache.num_cached_pages == 3 and cache.lookup(a, 12) == [a.page_ids[0]]
    # A hit moves a page to the back of the LRU order once it is freed again.
    pool.acquire([a.page_ids[0]])
    pool.free([a.page_ids[0]])
    assert pool.allocate(2) == [b.page_ids[1], b.page_ids[0]]
    assert cache.lookup(a, 12) == [a.page_ids[0]] and cache.lookup(b, 8) == []
    pool.check_invariants()
    cache.check_invariants()


def test_duplicate_content_keeps_the_first_cached_copy_and_frees_the_second_as_empty():
    pool = PagePool(9)
    cache = PrefixCache(pool, B)
    a = _computed_seq(pool, cache, 0, [5] * 8)
    b = _computed_seq(pool, cache, 1, [5] * 8)  # computed twice (e.g. admitted in one step)
    assert cache.lookup(_seq(2, [5] * 9), 8) == a.page_ids
    assert not any(pool.is_cached(p) for p in b.page_ids)
    pool.free(b.page_ids + a.page_ids)
    assert pool.num_cached_free_pages == 2
    cache.check_invariants()


def test_reset_is_refused_while_a_page_is_in_use_and_empties_the_cache_otherwise():
    pool = PagePool(9)
    cache = PrefixCache(pool, B)
    a = _computed_seq(pool, cache, 0, list(range(8)))
    assert not cache.reset() and cache.num_cached_pages == 2
    pool.free(a.page_ids)
    assert cache.reset()
    assert cache.num_cached_pages == 0 and pool.num_cached_free_pages == 0
    assert cache.lookup(_seq(1, list(range(9))), 8) == []
    _assert_all_free(pool, cache)


# ---------------------------------------------------------------------------- scheduler
def test_a_one_token_difference_in_page_k_reuses_only_the_pages_before_k():
    sched, cache, _ = _sched()
    base = list(range(100, 120))  # 5 full pages
    sched.add(_seq(0, base, max_tokens=1))
    _run_to_completion(sched)
    for k in range(5):
        prompt = list(base)
        prompt[k * B + 1] += 1000
        seq = _seq(10 + k, prompt, max_tokens=1)
        sched.add(seq)
        sched.schedule()
        assert seq.num_cached_tokens == k * B and seq.num_computed_tokens == k * B
        sched.abort(seq.request_id)
    _assert_all_free(sched.page_pool, cache)


def test_identical_prompts_share_every_full_page_and_always_compute_the_last_token():
    sched, cache, _ = _sched()
    first = _seq(0, list(range(16)), max_tokens=1)  # page aligned: 4 full pages
    sched.add(first)
    _run_to_completion(sched)
    a, b = _seq(1, list(range(16)), max_tokens=3), _seq(2, list(range(16)), max_tokens=3)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    # The whole prompt is cached, but the last page is recomputed to have logits to sample.
    assert [s.start_pos for s in out.scheduled] == [12, 12]
    assert a.page_ids[:3] == b.page_ids[:3] and a.page_ids[3] != b.page_ids[3]
    assert all(sched.page_pool.ref_count(p) == 2 for p in a.page_ids[:3])
    assert cache.queries == 48 and cache.hits == 24
    sched.update(out, [1, 1])
    _run_to_completion(sched)
    _assert_all_free(sched.page_pool, cache)


def test_n_siblings_wait_for_the_first_to_compute_the_prompt_then_share_its_pages():
    sched, cache, _ = _sched(max_num_batched_tokens=12)
    prompt = list(range(50, 70))  # 20 tokens: chunks of 12 and 8
    sibs = [_seq(i, prompt, request_id="req", index=i) for i in range(3)]
    other = _seq(9, [7] * 5)
    for s in sibs + [other]:
        sched.add(s)
    out = sched.schedule()
    assert [s.seq for s in out.scheduled] == [sibs[0]]
    sched.update(out, [None])
    out = sched.schedule()  # the siblings wait for pages 0..3; a later request goes first
    assert [s.seq for s in out.scheduled] == [sibs[0], other]
    sched.update(out, [1, None])
    out = sched.schedule()
    assert [(s.seq, s.start_pos) for s in out.scheduled] == [
        (sibs[0], 20), (other, 4), (sibs[1], 16), (sibs[2], 16)]
    for sib in sibs[1:]:
        assert sib.page_ids[:4] == sibs[0].page_ids[:4] and sib.num_cached_tokens == 16
    assert all(sched.page_pool.ref_count(p) == 3 for p in sibs[0].page_ids[:4])
    sched.update(out, [1] * 4)
    _run_to_completion(sched)
    _assert_all_free(sched.page_pool, cache)


def test_a_preempted_sequence_readmitted_hits_its_own_pages_including_decoded_ones():
    sched, cache, _ = _sched(num_pages=9, max_num_batched_tokens=16)
    a = _seq(0, list(range(12)), max_tokens=10)
    sched.add(a)
    for _ in range(6):  # 12 prompt tokens + 5 computed decode tokens
        out = sched.schedule()
        sched.update(out, [1] * len(out.scheduled))
    assert a.num_computed_tokens == 17 and cache.num_cached_pages == 4
    sched._preempt(a)
    out = sched.schedule()
    assert out.scheduled[0].start_pos == 16 and a.num_cached_tokens == 0  # first admission's
    _run_to_completion(sched)
    _assert_all_free(sched.page_pool, cache)


def test_prompt_logprobs_requests_do_not_look_up_the_cache():
    class P:
        max_tokens = 1
        prompt_logprobs = 1

    sched, cache, _ = _sched()
    sched.add(_seq(0, list(range(9)), max_tokens=1))
    _run_to_completion(sched)
    seq = _seq(1, list(range(9)), params=P())
    sched.add(seq)
    assert sched.schedule().scheduled[0].start_pos == 0


@pytest.mark.parametrize("seed", range(4))
def test_simulated_serving_with_shared_prefixes_matches_each_sequence_alone(seed):
    """Pool smaller than the working set: hits, evictions, preemptions and aborts interleave;
    the fake model reads its context back from the pages, so any wrong hit changes tokens."""
    rng = random.Random(seed)
    max_model_len = 64
    sched, cache, model = _sched(num_pages=20, max_num_batched_tokens=rng.choice([8, 16]),
                                 max_num_seqs=6, max_model_len=max_model_len, model=True)
    systems = [[rng.randint(1, 999) for _ in range(rng.randint(3, 20))] for _ in range(3)]
    arrivals: dict[int, list[Sequence]] = {}
    all_seqs, next_id = [], 0
    for r in range(24):
        prompt = rng.choice(systems) + [rng.randint(1, 999) for _ in range(rng.randint(1, 12))]
        max_tokens = rng.randint(1, max_model_len - len(prompt))
        for index in range(rng.choice([1, 1, 2])):
            seq = _seq(next_id, prompt, request_id=f"req-{r}", index=index, max_tokens=max_tokens)
            next_id += 1
            arrivals.setdefault(rng.randint(0, 80), []).append(seq)
            all_seqs.append(seq)
    aborted = {f"req-{r}" for r in rng.sample(range(24), 2)}
    abort_at = {rng.randint(0, 120): req for req in aborted}
    for t in range(5000):
        for seq in arrivals.get(t, []):
            sched.add(seq)
        if t in abort_at:
            sched.abort(abort_at[t])
        out = sched.schedule()
        check_step_shared(sched, out)
        sched.update(out, model.step(out))
        for s in out.scheduled:
            seq = s.seq
            if not s.needs_sample or seq.status is not S.RUNNING:
                continue
            if seq.output_token_ids[-1] % STOP_TOKEN_MOD == 0:
                sched.finish(seq, S.FINISHED_STOPPED)
            elif (seq.num_output_tokens == seq.sampling_params.max_tokens
                  or seq.num_tokens >= max_model_len):
                sched.finish(seq, S.FINISHED_LENGTH)
        if t > 80 and not sched.has_unfinished():
            break
    assert not sched.has_unfinished()
    assert cache.hits > 0 and sched.num_preemptions > 0
    for seq in all_seqs:
        expected = run_alone(seq.prompt_token_ids, seq.index, seq.sampling_params.max_tokens,
                             max_model_len)
        if seq.request_id in aborted and seq.status is S.FINISHED_ABORTED:
            assert seq.output_token_ids == expected[:seq.num_output_tokens]
        else:
            assert seq.output_token_ids == expected, f"seq {seq.seq_id} diverged"
    _assert_all_free(sched.page_pool, cache)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_admissions_and_releases_keep_index_pool_and_contents_consistent(data):
    """Property test of the cache index: every hit page holds exactly the tokens it is hit for."""
    pool = PagePool(data.draw(st.integers(4, 12)))
    contents: dict[int, tuple] = {}  # page -> the tokens written into it (wiped on eviction)
    pool.on_evict = lambda p: contents.pop(p, None)
    cache = PrefixCache(pool, B)
    live: list[Sequence] = []
    for step in range(data.draw(st.integers(1, 40))):
        if live and data.draw(st.booleans()):
            seq = live.pop(data.draw(st.integers(0, len(live) - 1)))
            pool.free(reversed(seq.page_ids))
            seq.page_ids = []
            seq.num_registered_pages = 0
        else:
            prompt = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=14))
            seq = _seq(step, prompt)
            hit = cache.lookup(seq, len(prompt) - 1)
            for i, page in enumerate(hit):
                assert contents[page] == tuple(prompt[i * B:(i + 1) * B])
            need = -(-len(prompt) // B) - len(hit)
            if need + sum(pool.is_free(p) for p in hit) > pool.num_free_pages:
                continue
            pool.acquire(hit)
            seq.page_ids = hit + pool.allocate(need)
            for i in range(len(hit), len(seq.page_ids)):
                contents[seq.page_ids[i]] = tuple(prompt[i * B:(i + 1) * B])
            seq.num_registered_pages = len(hit)
            seq.num_computed_tokens = len(prompt)
            cache.register(seq)
            live.append(seq)
        pool.check_invariants()
        cache.check_invariants()
    for seq in live:
        pool.free(seq.page_ids)
    _assert_all_free(pool, cache)


def test_cli_flag_reaches_the_engine_config():
    from jaxllm.config import EngineConfig

    assert EngineConfig(**cli_engine_kwargs()).enable_prefix_caching
    off = cli_engine_kwargs("--no-enable-prefix-caching")
    assert not EngineConfig(**off).enable_prefix_caching


# ---------------------------------------------------------------------------- engine
PAGE = 8


@pytest.fixture(scope="module")
def llms(small_llama_folder):
    """The same small Llama with caching on and off; a pool of 24 pages x 8 tokens and a
    32-token budget force chunked prefill, preemption and eviction."""
    from jaxllm import LLM

    kw = dict(dtype="float32", max_model_len=160, page_size=PAGE, num_pages=24,
              max_num_batched_tokens=32, max_num_seqs=8, seed=0)
    on = LLM(str(small_llama_folder), **kw)
    off = LLM(str(small_llama_folder), enable_prefix_caching=False, **kw)
    return on, off


def _ids(out):
    return [c.token_ids for c in out.outputs]


def _engine_all_free(llm):
    engine = llm.llm_engine
    _assert_all_free(engine.page_pool, engine.prefix_cache)
    assert not engine.has_unfinished_requests()


def test_outputs_with_caching_equal_outputs_without_under_preemption_and_eviction(llms):
    from jaxllm import SamplingParams

    on, off = llms
    rng = np.random.default_rng(0)
    systems = [rng.integers(0, 49152, size=n).tolist() for n in (40, 21, 64)]
    prompts = [{"prompt_token_ids": systems[i % 3] + rng.integers(0, 49152, size=int(k)).tolist()}
               for i, k in enumerate(rng.integers(1, 30, size=14))]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    stats = on.llm_engine.stats
    preempt, hits = stats["num_preemptions"], stats["prefix_cache_hits"]
    got = on.generate(prompts + prompts[:4], params, use_tqdm=False)
    want = off.generate(prompts + prompts[:4], params, use_tqdm=False)
    assert [_ids(o) for o in got] == [_ids(o) for o in want]
    assert stats["num_preemptions"] > preempt, "the pool should force preemption"
    assert stats["prefix_cache_hits"] > hits
    assert any(o.num_cached_tokens for o in got)
    assert all(o.num_cached_tokens == 0 for o in want)
    assert off.llm_engine.stats["prefix_cache_queries"] == 0
    assert off.llm_engine.prefix_cache is None
    _engine_all_free(on)


def test_num_cached_tokens_and_counters_are_exact(llms):
    from jaxllm import SamplingParams

    on, _ = llms
    assert on.reset_prefix_cache()
    stats = on.llm_engine.stats
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    p37 = list(range(1000, 1037))
    p32 = list(range(2000, 2032))

    def run(prompt):
        q, h = stats["prefix_cache_queries"], stats["prefix_cache_hits"]
        out = on.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        assert stats["prefix_cache_queries"] - q == len(prompt)
        assert stats["prefix_cache_hits"] - h == out.num_cached_tokens
        return out.num_cached_tokens

    assert run(p37) == 0
    assert run(p37) == 32  # 4 full pages; the partial fifth is computed
    assert run(p32) == 0
    assert run(p32) == 24  # fully cached and page aligned: the last page is recomputed
    changed = list(p37)
    changed[2 * PAGE + 3] += 1  # a difference in page 2 reuses pages 0 and 1 only
    assert run(changed) == 16
    _engine_all_free(on)


def test_cache_salt_shares_pages_only_between_requests_with_the_same_salt(llms):
    """vLLM's cache_salt (a prompt dict key): a salted prompt hits nothing an unsalted or
    other-salted one cached, hits its own salt's pages, and gives the same tokens."""
    from jaxllm import SamplingParams

    on, _ = llms
    assert on.reset_prefix_cache()
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    ids = list(range(3000, 3037))

    def run(**salt):
        return on.generate([{"prompt_token_ids": ids, **salt}], params, use_tqdm=False)[0]

    plain = run()
    a = run(cache_salt="tenant-a")
    assert a.num_cached_tokens == 0 and _ids(a) == _ids(plain)
    assert run(cache_salt="tenant-b").num_cached_tokens == 0
    assert run(cache_salt="tenant-a").num_cached_tokens == 32
    assert run().num_cached_tokens == 32
    for bad in ("", 7):
        with pytest.raises(ValueError, match="cache_salt"):
            run(cache_salt=bad)
    _engine_all_free(on)


def test_second_chat_turn_hits_the_first_turns_pages_including_decoded_ones(llms):
    from jaxllm import SamplingParams

    on, off = llms
    turn1 = list(range(3000, 3020))  # 20 prompt tokens
    params = SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True)
    out1 = on.generate([{"prompt_token_ids": turn1}], params, use_tqdm=False)[0]
    # 33 tokens, 32 computed (the last sampled one is not): pages 0..3, 2 and 3 filled in decode.
    turn2 = turn1 + list(out1.outputs[0].token_ids) + [4000, 4001, 4002]
    out2 = on.generate([{"prompt_token_ids": turn2}], params, use_tqdm=False)[0]
    assert out2.num_cached_tokens == 32
    ref = off.generate([{"prompt_token_ids": turn2}], params, use_tqdm=False)[0]
    assert _ids(out2) == _ids(ref)
    _engine_all_free(on)


def test_n_siblings_share_the_prompt_pages_and_sample_as_without_caching(llms):
    from jaxllm import SamplingParams

    on, off = llms
    stats = on.llm_engine.stats
    prompt = {"prompt_token_ids": list(range(5000, 5030))}  # 3 full pages
    params = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=11, ignore_eos=True)
    h = stats["prefix_cache_hits"]
    got = on.generate([prompt], params, use_tqdm=False)[0]
    assert stats["prefix_cache_hits"] - h == 2 * 24  # siblings 1 and 2 hit sibling 0's pages
    assert got.num_cached_tokens == 0  # the first sibling computed them
    assert _ids(got) == _ids(off.generate([prompt], params, use_tqdm=False)[0])
    _engine_all_free(on)


def test_reset_prefix_cache_is_refused_while_running_and_empties_the_cache_after(llms):
    from jaxllm import SamplingParams

    on, off = llms
    engine = on.llm_engine
    prompt = {"prompt_token_ids": list(range(6000, 6020))}
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    on.generate([prompt], params, use_tqdm=False)
    assert engine.prefix_cache.num_cached_pages > 0
    engine.add_request("running", prompt, params)
    engine.step()
    assert not on.reset_prefix_cache()
    engine.abort_request("running")
    assert on.reset_prefix_cache()
    assert engine.prefix_cache.num_cached_pages == 0
    assert engine.page_pool.num_cached_free_pages == 0
    assert on.generate([prompt], params, use_tqdm=False)[0].num_cached_tokens == 0
    assert off.reset_prefix_cache()  # nothing to do with caching off
    _engine_all_free(on)
