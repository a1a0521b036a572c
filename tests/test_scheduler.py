"""Scheduler: token budget, chunked prefill, FCFS admission, preemption by recompute, no leaks."""

import random
import zlib
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.engine.scheduler import Scheduler, SchedulerOutput, priority_key
from jaxllm.engine.sequence import Sequence, SequenceStatus
from jaxllm.kv_cache import PagePool

S = SequenceStatus


@dataclass
class FakeParams:
    max_tokens: int | None = 16


def make_seq(seq_id, prompt_len, max_tokens=16, request_id=None, index=0, priority=0):
    prompt = [(seq_id * 31 + i) % 997 + 1 for i in range(prompt_len)]
    return Sequence(seq_id=seq_id, request_id=request_id or f"req-{seq_id}", index=index,
                    prompt_token_ids=prompt, output_token_ids=[],
                    sampling_params=FakeParams(max_tokens), arrival_time=float(seq_id),
                    priority=priority)


def make_scheduler(num_pages=64, page_size=4, max_num_seqs=8, max_num_batched_tokens=32,
                   max_model_len=256, chunked=True, policy="fcfs"):
    return Scheduler(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                     max_model_len=max_model_len, page_size=page_size,
                     page_pool=PagePool(num_pages), enable_chunked_prefill=chunked,
                     policy=policy)


def check_step(sched: Scheduler, out: SchedulerOutput) -> None:
    """Invariants every step must keep (called right after schedule())."""
    pool, ps = sched.page_pool, sched.page_size
    seqs = [s.seq for s in out.scheduled]
    assert len(set(map(id, seqs))) == len(seqs), "a sequence scheduled twice in one step"
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    assert len(out.scheduled) <= sched.max_num_seqs and sched.num_running <= sched.max_num_seqs
    for s in out.scheduled:
        assert s.num_new_tokens > 0
        assert s.seq.status is S.RUNNING
        assert s.start_pos == s.seq.num_computed_tokens
        assert s.start_pos + s.num_new_tokens <= min(s.seq.num_tokens, sched.max_model_len)
        assert s.needs_sample == (s.start_pos + s.num_new_tokens == s.seq.num_tokens)
        assert len(s.seq.page_ids) >= -(-(s.start_pos + s.num_new_tokens) // ps)
        assert not s.needs_sample or s.seq.num_tokens < sched.max_model_len
    for p in out.preempted:
        assert p.status is S.WAITING and not p.page_ids and p.num_computed_tokens == 0
        assert all(p is not q for q in seqs), "a sequence scheduled in the step that preempted it"
    owned = [page for seq in sched.running for page in seq.page_ids]
    assert len(owned) == len(set(owned)), "two running sequences share a page"
    assert all(not seq.page_ids for seq in sched.waiting)
    assert pool.num_free_pages == pool.num_usable_pages - len(owned)
    assert all(pool.ref_count(page) == 1 for page in owned)
    pool.check_invariants()


def step(sched, token=7):
    """schedule + update with a constant sampled token; returns the SchedulerOutput."""
    out = sched.schedule()
    check_step(sched, out)
    sched.update(out, [token if s.needs_sample else None for s in out.scheduled])
    return out


def new_tokens(out):
    return {s.seq.seq_id: s.num_new_tokens for s in out.scheduled}


# ---------------------------------------------------------------------------- basic flow
def test_a_short_prompt_is_prefilled_in_one_step_then_decodes_one_token_per_step():
    sched = make_scheduler()
    seq = make_seq(0, prompt_len=10)
    sched.add(seq)
    out = step(sched, token=5)
    assert new_tokens(out) == {0: 10} and out.scheduled[0].needs_sample
    assert seq.output_token_ids == [5] and seq.num_computed_tokens == 10
    assert len(seq.page_ids) == 3
    for i in range(3):
        out = step(sched, token=i)
        assert new_tokens(out) == {0: 1} and out.scheduled[0].start_pos == 10 + i
    assert seq.output_token_ids == [5, 0, 1, 2] and seq.all_token_ids[-4:] == [5, 0, 1, 2]
    assert seq.num_tokens == 14 and seq.num_output_tokens == 4 and seq.num_prompt_tokens == 10


def test_waiting_sequences_are_admitted_first_come_first_served():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(i, prompt_len=3) for i in range(5)]
    for seq in seqs:
        sched.add(seq)
    assert list(new_tokens(step(sched))) == [0, 1]
    sched.finish(seqs[1], S.FINISHED_STOPPED)
    assert list(new_tokens(step(sched))) == [0, 2]
    sched.finish(seqs[0], S.FINISHED_STOPPED)
    sched.finish(seqs[2], S.FINISHED_STOPPED)
    assert list(new_tokens(step(sched))) == [3, 4]


def test_the_priority_policy_admits_by_priority_then_arrival():
    sched = make_scheduler(max_num_seqs=2, policy="priority")
    seqs = [make_seq(i, prompt_len=3, priority=p) for i, p in enumerate([5, 0, 5, -1, 0])]
    for seq in seqs:
        sched.add(seq)
    assert [s.seq_id for s in sched.waiting] == [3, 1, 4, 0, 2]
    assert sorted(new_tokens(step(sched))) == [1, 3]
    sched.finish(seqs[3], S.FINISHED_STOPPED)
    sched.add(make_seq(5, prompt_len=3, priority=-2))  # arrives last, goes first
    assert sorted(new_tokens(step(sched))) == [1, 5]
    with pytest.raises(ValueError, match="scheduling_policy"):
        make_scheduler(policy="lifo")


def test_the_priority_policy_preempts_the_lowest_priority_and_requeues_it_in_order():
    """FCFS preempts the newest sequence; "priority" the one with the largest (priority,
    arrival), which here is the older one, and puts it back behind a waiting sequence of
    higher priority."""
    def run(policy):
        sched = make_scheduler(num_pages=7, page_size=4, policy=policy)  # 6 usable pages
        a, b, c = make_seq(0, 8, priority=1), make_seq(1, 8), make_seq(2, 8)
        sched.add(a)
        sched.add(b)
        step(sched)
        sched.add(c)
        for _ in range(5):  # the 5th: a or b needs a 4th page for position 12
            out = step(sched)
        return out, (a, b, c), sched

    out, (a, b, c), sched = run("fcfs")
    assert out.preempted == [b] and list(sched.waiting) == [b, c]
    out, (a, b, c), sched = run("priority")
    assert out.preempted == [a] and new_tokens(out) == {1: 1}
    assert list(sched.waiting) == [c, a] and a.num_preemptions == 1


def test_the_token_budget_and_the_sequence_limit_are_respected_every_step():
    rng = random.Random(0)
    sched = make_scheduler(num_pages=400, max_num_seqs=5, max_num_batched_tokens=24)
    seqs = [make_seq(i, prompt_len=rng.randint(1, 60)) for i in range(30)]
    for seq in seqs:
        sched.add(seq)
    for _ in range(200):
        out = step(sched)  # check_step asserts both limits
        assert out.num_batched_tokens <= 24 and len(out.scheduled) <= 5
        for seq in list(sched.running):
            if seq.num_output_tokens >= 3:
                sched.finish(seq, S.FINISHED_LENGTH)
        if not sched.has_unfinished():
            break
    assert not sched.has_unfinished()
    assert all(seq.num_output_tokens == 3 for seq in seqs)


def test_a_long_prompt_is_chunked_while_running_decodes_continue_every_step():
    sched = make_scheduler(max_num_batched_tokens=16, max_num_seqs=4)
    decoders = [make_seq(i, prompt_len=4, max_tokens=100) for i in range(3)]
    for seq in decoders:
        sched.add(seq)
    step(sched)
    long = make_seq(9, prompt_len=100)
    sched.add(long)
    chunks = []
    while long.num_output_tokens == 0:
        out = step(sched)
        got = new_tokens(out)
        assert all(got[d.seq_id] == 1 for d in decoders), "a decode was starved"
        chunks.append(got.get(9, 0))
    assert chunks[:-1] == [13] * 7 and chunks[-1] == 100 - 13 * 7
    assert all(d.num_output_tokens == 1 + len(chunks) for d in decoders)


def test_decodes_are_scheduled_before_continuing_prefill_chunks_of_older_sequences():
    # Admission order alone rarely puts an older prefill ahead of a younger decode, so build
    # that state directly: `long` (admitted first) is mid-prefill, `short` is decoding.
    sched = make_scheduler(max_num_batched_tokens=8, max_num_seqs=4)
    long, short = make_seq(0, prompt_len=50), make_seq(1, prompt_len=3)
    short.append_token(7)
    for seq, computed in ((long, 8), (short, 3)):
        seq.status, seq.num_computed_tokens = S.RUNNING, computed
        seq.page_ids = sched.page_pool.allocate(-(-computed // sched.page_size))
        sched.running.append(seq)
    for _ in range(3):
        out = step(sched)
        assert out.scheduled[0].seq is short and out.scheduled[0].num_new_tokens == 1
        assert out.scheduled[1].seq is long and out.scheduled[1].num_new_tokens == 7


def test_with_chunking_disabled_a_prompt_larger_than_the_remaining_budget_waits():
    sched = make_scheduler(max_num_batched_tokens=20, chunked=False)
    first, big = make_seq(0, prompt_len=10), make_seq(1, prompt_len=15)
    sched.add(first)
    sched.add(big)
    assert new_tokens(step(sched)) == {0: 10}
    assert new_tokens(step(sched)) == {0: 1, 1: 15}


def test_admission_stops_when_the_pool_cannot_hold_the_first_chunk():
    sched = make_scheduler(num_pages=6, page_size=4, max_num_batched_tokens=64)  # 5 pages
    a, b = make_seq(0, prompt_len=12), make_seq(1, prompt_len=12)
    sched.add(a)
    sched.add(b)
    out = step(sched)
    assert new_tokens(out) == {0: 12} and out.preempted == []
    assert b.status is S.WAITING and sched.page_pool.num_free_pages == 2


# ---------------------------------------------------------------------------- preemption
def test_preemption_frees_the_newest_sequences_pages_and_requeues_it_at_the_front():
    sched = make_scheduler(num_pages=7, page_size=4)  # 6 usable pages
    a, b, c = make_seq(0, 8), make_seq(1, 8), make_seq(2, 8)
    sched.add(a)
    sched.add(b)
    step(sched)  # a, b: 2 pages each after prefill; their 9th token needs a third page
    sched.add(c)
    out = step(sched)  # decodes take pages 5, 6; c cannot be admitted (no page left)
    assert new_tokens(out) == {0: 1, 1: 1} and c.status is S.WAITING
    for _ in range(3):  # positions 9..11 still fit the third pages
        assert step(sched).preempted == []
    out = step(sched)  # position 12: a needs a 4th page, so b (the newest) is preempted
    assert out.preempted == [b]
    assert new_tokens(out) == {0: 1}
    assert b.status is S.WAITING and b.page_ids == [] and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b, c]
    assert b.num_output_tokens == 5 and b.num_preemptions == 1


def test_a_running_sequence_that_is_the_newest_preempts_itself_and_is_not_scheduled():
    sched = make_scheduler(num_pages=5, page_size=4)  # 4 usable pages
    a, b = make_seq(0, 4), make_seq(1, 8)
    sched.add(a)
    sched.add(b)
    step(sched)  # a: 1 page, b: 2 pages, 1 free
    out = step(sched)  # a takes the last page for its 5th token; b needs one too: preempts itself
    assert out.preempted == [b] and new_tokens(out) == {0: 1}
    assert b.status is S.WAITING and sched.waiting[0] is b


def test_a_preempted_sequence_later_completes_with_its_output_tokens_kept():
    sched = make_scheduler(num_pages=7, page_size=4)
    a, b = make_seq(0, 8), make_seq(1, 8)
    sched.add(a)
    sched.add(b)
    counter = iter(range(1000, 2000))
    preempted_outputs = None
    while sched.has_unfinished():
        out = sched.schedule()
        check_step(sched, out)
        if out.preempted:
            preempted_outputs = list(out.preempted[0].output_token_ids)
        sched.update(out, [next(counter) if s.needs_sample else None for s in out.scheduled])
        for seq in list(sched.running):
            if seq.num_output_tokens == 10:
                sched.finish(seq, S.FINISHED_LENGTH)
    assert preempted_outputs and b.num_preemptions >= 1
    assert b.output_token_ids[:len(preempted_outputs)] == preempted_outputs
    assert a.num_output_tokens == b.num_output_tokens == 10
    assert sched.page_pool.num_free_pages == sched.page_pool.num_usable_pages


def test_a_prefill_chunk_is_shortened_to_the_free_pages_before_anyone_is_preempted():
    sched = make_scheduler(num_pages=12, page_size=4, max_num_batched_tokens=32)  # 11 pages
    b, a = make_seq(0, 8), make_seq(1, 36)
    sched.add(b)
    sched.add(a)
    assert new_tokens(step(sched)) == {0: 8, 1: 24}  # 2 + 6 pages, 3 free
    out = step(sched)  # b's decode takes a page; a's 12 remaining tokens get the 2 pages left
    assert new_tokens(out) == {0: 1, 1: 8} and out.preempted == []
    out = step(sched)  # no page left at all: a (the newest) preempts itself, b goes on
    assert out.preempted == [a] and new_tokens(out) == {0: 1}
    assert sched.page_pool.num_free_pages == 8


def test_admission_never_preempts_a_running_sequence():
    sched = make_scheduler(num_pages=4, page_size=4)  # 3 usable pages
    a = make_seq(0, 8)
    sched.add(a)
    step(sched)
    sched.add(make_seq(1, 8))
    for _ in range(4):
        out = step(sched)
        assert out.preempted == [] and list(new_tokens(out)) == [0]


def test_a_recomputed_sequence_reprefills_its_prompt_and_outputs_and_samples_the_next_token():
    sched = make_scheduler(num_pages=64, page_size=4)
    seq = make_seq(0, 6)
    sched.add(seq)
    step(sched, token=1)
    step(sched, token=2)
    sched._preempt(seq)
    out = step(sched, token=3)
    assert out.scheduled[0].start_pos == 0 and out.scheduled[0].num_new_tokens == 8
    assert out.scheduled[0].needs_sample and seq.output_token_ids == [1, 2, 3]


# ---------------------------------------------------------------------------- finish/abort/limits
def test_abort_finishes_every_sequence_of_the_request_and_frees_its_pages():
    sched = make_scheduler(max_num_seqs=2)
    siblings = [make_seq(i, 5, request_id="req-x", index=i) for i in range(3)]
    other = make_seq(7, 5)
    for seq in siblings + [other]:
        sched.add(seq)
    step(sched)  # two siblings running, one sibling and `other` waiting
    aborted = sched.abort("req-x")
    assert aborted == siblings
    assert all(seq.status is S.FINISHED_ABORTED and not seq.page_ids for seq in siblings)
    assert sched.abort("req-x") == [] and sched.abort("unknown") == []
    assert list(new_tokens(step(sched))) == [7]
    sched.finish(other, S.FINISHED_STOPPED)
    sched.finish(other, S.FINISHED_LENGTH)  # a second finish is a no-op
    assert other.status is S.FINISHED_STOPPED
    assert not sched.has_unfinished()
    assert sched.page_pool.num_free_pages == sched.page_pool.num_usable_pages


def test_update_skips_a_sequence_aborted_while_its_step_ran():
    sched = make_scheduler()
    seq = make_seq(0, 5)
    sched.add(seq)
    out = sched.schedule()
    sched.abort("req-0")
    sched.update(out, [42])
    assert seq.output_token_ids == [] and seq.status is S.FINISHED_ABORTED


def test_no_token_is_computed_or_sampled_beyond_max_model_len():
    sched = make_scheduler(max_model_len=12, page_size=4)
    seq = make_seq(0, 10, max_tokens=None)
    sched.add(seq)
    step(sched)
    step(sched)
    assert seq.num_tokens == 12  # the engine should now finish it (FINISHED_LENGTH); if it does not:
    for _ in range(3):
        out = step(sched)
        assert out.scheduled == []
    assert seq.num_tokens == 12 and seq.num_computed_tokens == 11 and len(seq.page_ids) == 3
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add(make_seq(1, 13))


def test_a_request_is_rejected_up_front_when_it_can_never_fit():
    sched = make_scheduler(num_pages=5, page_size=4, max_model_len=64,
                           max_num_batched_tokens=8, chunked=False)  # 4 pages = 16 tokens
    assert sched.can_ever_fit(16) and not sched.can_ever_fit(17)
    assert not sched.can_ever_fit(65)
    assert sched.fit_error(4, 4) is None
    assert "maximum context length is 64" in sched.fit_error(60, 10)
    assert "KV-cache pages" in sched.fit_error(8, 10)
    assert "chunked prefill" in sched.fit_error(9, 1)


def test_scheduler_output_is_frozen():
    sched = make_scheduler()
    sched.add(make_seq(0, 3))
    out = sched.schedule()
    with pytest.raises(AttributeError):
        out.scheduled[0].num_new_tokens = 2
    with pytest.raises(AttributeError):
        out.num_batched_tokens = 0


# ---------------------------------------------------------------------------- random mixes
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_pages=st.integers(4, 24),
       chunked=st.booleans(), page_size=st.sampled_from([1, 2, 4, 8]),
       policy=st.sampled_from(["fcfs", "priority"]))
def test_random_mixes_of_finish_abort_and_preemption_leak_no_page(seed, num_pages, chunked,
                                                                   page_size, policy):
    rng = random.Random(seed)
    max_model_len = (num_pages - 1) * page_size
    sched = make_scheduler(num_pages=num_pages, page_size=page_size,
                           max_num_seqs=rng.randint(1, 6),
                           max_num_batched_tokens=max(rng.randint(1, 40), max_model_len
                                                      if not chunked else 1),
                           max_model_len=max_model_len, chunked=chunked, policy=policy)
    next_id = 0
    for _ in range(150):
        if rng.random() < 0.3:
            prompt_len = rng.randint(1, max(1, max_model_len // 2))
            sched.add(make_seq(next_id, prompt_len, request_id=f"req-{next_id % 7}",
                               priority=rng.randint(-2, 2)))
            next_id += 1
        out = step(sched, token=rng.randint(0, 99))
        for seq in list(sched.running) + list(sched.waiting):
            r = rng.random()
            if r < 0.03:
                sched.abort(seq.request_id)
            elif r < 0.08 or seq.num_tokens >= max_model_len or seq.num_output_tokens >= 12:
                sched.finish(seq, rng.choice([S.FINISHED_STOPPED, S.FINISHED_LENGTH]))
        assert sched.page_pool.num_free_pages + sum(
            len(seq.page_ids) for seq in sched.running) == sched.page_pool.num_usable_pages
        if policy == "priority":
            keys = [priority_key(s) for s in sched.waiting]
            assert keys == sorted(keys)
        del out
    for seq in list(sched.running) + list(sched.waiting):
        sched.abort(seq.request_id)
    assert not sched.has_unfinished()
    assert sched.page_pool.num_free_pages == sched.page_pool.num_usable_pages
    sched.page_pool.check_invariants()


# ---------------------------------------------------------------------------- simulation
def fake_next_token(context: list[int], index: int) -> int:
    """Deterministic 'model': the next token is a hash of the whole context (and the sibling)."""
    return zlib.crc32(bytes(str((index, context)), "ascii")) % 1000


STOP_TOKEN_MOD = 97  # a token divisible by 97 stops the sequence (roughly 1% per step)


def run_alone(prompt, index, max_tokens, max_model_len):
    tokens, out = list(prompt), []
    while True:
        tok = fake_next_token(tokens, index)
        tokens.append(tok)
        out.append(tok)
        if tok % STOP_TOKEN_MOD == 0 or len(out) == max_tokens or len(tokens) >= max_model_len:
            return out


class FakeModel:
    """Keeps a 'KV cache' of token ids per slot; samples only from what the pages hold.

    A page handed out by the pool is wiped (via the evict hook), so any bookkeeping bug (a
    wrong page table, a stale num_computed_tokens, a page shared by two sequences) changes the
    context the model reads and therefore the tokens it samples.
    """

    def __init__(self, pool: PagePool, page_size: int):
        self.page_size = page_size
        self.slots: list[int | None] = [None] * (pool.num_pages * page_size)
        pool.on_evict = self._wipe

    def _wipe(self, page):
        self.slots[page * self.page_size:(page + 1) * self.page_size] = [None] * self.page_size

    def step(self, out: SchedulerOutput) -> list[int | None]:
        ps, sampled = self.page_size, []
        for s in out.scheduled:
            seq, end = s.seq, s.start_pos + s.num_new_tokens
            for pos in range(s.start_pos, end):
                self.slots[seq.page_ids[pos // ps] * ps + pos % ps] = seq.all_token_ids[pos]
            if s.needs_sample:
                context = [self.slots[seq.page_ids[p // ps] * ps + p % ps] for p in range(end)]
                sampled.append(fake_next_token(context, seq.index))
            else:
                sampled.append(None)
        return sampled


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunked,policy", [(True, "fcfs"), (False, "fcfs"),
                                            (True, "priority")])
def test_simulated_serving_with_preemption_and_aborts_matches_running_each_sequence_alone(
        seed, chunked, policy):
    rng = random.Random(seed)
    page_size, num_pages, max_model_len = 4, 24, 64  # 23 pages: a handful of sequences at once
    sched = make_scheduler(num_pages=num_pages, page_size=page_size, max_num_seqs=6,
                           max_num_batched_tokens=64 if not chunked else rng.choice([8, 16, 32]),
                           max_model_len=max_model_len, chunked=chunked, policy=policy)
    model = FakeModel(sched.page_pool, page_size)
    arrivals: dict[int, list[Sequence]] = {}
    all_seqs, next_id = [], 0
    for r in range(24):
        prompt = [rng.randint(1, 999) for _ in range(rng.randint(1, 40))]
        max_tokens = rng.randint(1, max_model_len - len(prompt))
        n = rng.choice([1, 1, 2])
        for index in range(n):
            seq = Sequence(next_id, f"req-{r}", index, prompt, [], FakeParams(max_tokens),
                           arrival_time=float(r), priority=r % 3)
            next_id += 1
            assert sched.can_ever_fit(seq.num_tokens + max_tokens)
            arrivals.setdefault(rng.randint(0, 60), []).append(seq)
            all_seqs.append(seq)
    aborted_requests = {f"req-{r}" for r in rng.sample(range(24), 3)}
    abort_at = {rng.randint(0, 120): req for req in aborted_requests}

    for t in range(5000):
        for seq in arrivals.get(t, []):
            sched.add(seq)
        if t in abort_at:
            sched.abort(abort_at[t])
        out = sched.schedule()
        check_step(sched, out)
        sched.update(out, model.step(out))
        for s in out.scheduled:  # the engine's stop checks
            seq = s.seq
            if not s.needs_sample or seq.status is not S.RUNNING:
                continue
            if seq.output_token_ids[-1] % STOP_TOKEN_MOD == 0:
                sched.finish(seq, S.FINISHED_STOPPED)
            elif (seq.num_output_tokens == seq.sampling_params.max_tokens
                  or seq.num_tokens >= max_model_len):
                sched.finish(seq, S.FINISHED_LENGTH)
        if t > 60 and not sched.has_unfinished():
            break
    assert not sched.has_unfinished()
    assert sched.num_preemptions > 0, "the pool was meant to be small enough to preempt"
    for seq in all_seqs:
        expected = run_alone(seq.prompt_token_ids, seq.index, seq.sampling_params.max_tokens,
                             max_model_len)
        if seq.request_id in aborted_requests and seq.status is S.FINISHED_ABORTED:
            assert seq.output_token_ids == expected[:seq.num_output_tokens]
        else:
            assert seq.output_token_ids == expected, f"seq {seq.seq_id} diverged"
            assert seq.status in (S.FINISHED_STOPPED, S.FINISHED_LENGTH)
    assert sched.page_pool.num_free_pages == sched.page_pool.num_usable_pages


def test_lookahead_pages_are_all_or_nothing_and_commit_places_one_placeholder_per_step():
    # Multi-step scheduling: reserve_lookahead gives each decode the pages of num_steps K/V
    # positions or, when the pool lacks them, allocates nothing (it never preempts); commit of a
    # num_steps launch appends that many placeholders and advances computed tokens to match.
    sched = make_scheduler(num_pages=9, page_size=4)  # 8 usable pages
    a, b = make_seq(0, 3), make_seq(1, 7)
    sched.add(a), sched.add(b)
    out = sched.schedule()
    sched.update(out, [11, 12])  # prefilled; a has 4 tokens (1 page), b 8 (2 pages)
    out = sched.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [1, 1]
    assert [len(a.page_ids), len(b.page_ids)] == [1, 2]
    free = sched.page_pool.num_free_pages
    assert sched.reserve_lookahead(out, 4)  # positions 3..6 and 7..10
    assert [len(a.page_ids), len(b.page_ids)] == [2, 3]
    assert sched.page_pool.num_free_pages == free - 2
    indices = sched.commit(out, num_steps=4)
    assert indices == [1, 1]
    assert a.num_pending == b.num_pending == 4 and a.num_tokens == 8 and b.num_tokens == 12
    assert a.num_computed_tokens == 7 and b.num_computed_tokens == 11  # one decode left each
    for j in range(4):
        sched.resolve(a, 1 + j, 20 + j)
        sched.resolve(b, 1 + j, 30 + j)
    assert a.output_token_ids == [11, 20, 21, 22, 23] and a.num_pending == 0
    out = sched.schedule()
    assert [(s.seq, s.start_pos, s.num_new_tokens) for s in out.scheduled] == [(a, 7, 1),
                                                                               (b, 11, 1)]
    free = sched.page_pool.num_free_pages
    owned = [list(a.page_ids), list(b.page_ids)]
    assert not sched.reserve_lookahead(out, 4 * (free + 1) + 4)  # more than the pool has
    assert [a.page_ids, b.page_ids] == owned and sched.page_pool.num_free_pages == free
