"""Host-side step inputs: the fast paths of ModelRunner.prepare and build_sampling_tensors give
exactly what the plain row-by-row construction gives (no model, no device)."""

import numpy as np
import pytest

from jaxllm.engine import sampler as S
from jaxllm.engine.model_runner import ModelRunner
from jaxllm.engine.scheduler import ScheduledSeq
from jaxllm.engine.sequence import PLACEHOLDER_TOKEN, Sequence
from jaxllm.models.attention import SCRATCH_PAGE
from jaxllm.sampling_params import SamplingParams

B, MAX_LEN, MAX_SEQS = 4, 64, 8


def _runner() -> ModelRunner:
    r = ModelRunner.__new__(ModelRunner)
    r._set_step_shape(None, None, num_pages=128, page_size=B, max_model_len=MAX_LEN,
                      max_num_seqs=MAX_SEQS, token_buckets=(8, 32), vocab_size=100,
                      max_logprobs=2)
    return r


def _seq(i, prompt_len, pages, pending=False):
    seq = Sequence(seq_id=i, request_id=str(i), index=0,
                   prompt_token_ids=[(7 * i + j) % 100 for j in range(prompt_len)],
                   output_token_ids=[], sampling_params=SamplingParams(), arrival_time=0.0)
    seq.page_ids = pages
    if pending:
        seq.append_placeholder(row=i)
    return seq


def _plain_page_table(seqs, S_, M):
    pt = np.full((S_, M), SCRATCH_PAGE, np.int32)
    for i, seq in enumerate(seqs):
        pt[i, :len(seq.page_ids)] = seq.page_ids
    return pt


def _decode(seqs):
    return [ScheduledSeq(s, 1, s.num_tokens - 1, True) for s in seqs]


def test_decode_fast_path_matches_the_row_by_row_path_with_placeholders():
    r = _runner()
    seqs = [_seq(i, 5 + i, list(range(10 * i + 1, 10 * i + 1 + (5 + i + B) // B)),
                 pending=i % 2 == 1) for i in range(5)]
    sched = _decode(seqs)
    fast = r.prepare(sched, [])
    assert fast.md.decode_only
    # Row by row (the general path), the same rows.
    T = fast.token_ids.shape[0]
    tok, pos, prev = (np.zeros(T, np.int32), np.zeros(T, np.int32), np.full(T, -1, np.int32))
    sot, qsl = np.zeros(T, np.int32), np.zeros(fast.md.query_start_loc.shape, np.int32)
    lens, li = np.zeros(fast.md.seq_lens.shape, np.int32), np.zeros(fast.logits_indices.shape,
                                                                  np.int32)
    off = ModelRunner._prepare_ragged(sched, tok, pos, sot, qsl, lens, li, prev)
    assert off == len(seqs)
    np.testing.assert_array_equal(fast.token_ids, tok)
    np.testing.assert_array_equal(fast.positions, pos)
    np.testing.assert_array_equal(fast.prev_rows, prev)
    np.testing.assert_array_equal(fast.md.seq_lens, lens)
    np.testing.assert_array_equal(fast.logits_indices, li)
    np.testing.assert_array_equal(fast.md.query_start_loc[:len(seqs) + 1], qsl[:len(seqs) + 1])
    assert fast.prev_rows[1] == 1 and fast.token_ids[1] == 0  # the pending row's token
    assert seqs[1].all_token_ids[-1] == PLACEHOLDER_TOKEN
    np.testing.assert_array_equal(fast.md.page_table, _plain_page_table(
        seqs, fast.md.page_table.shape[0], r.max_pages_per_seq))


def test_lora_slots_give_each_token_its_sequences_slot():
    """With LoRA, every token row carries its sequence's adapter slot (-1: none, and for the
    padding rows), for prefill chunks and decodes alike; without, the field stays None. A
    step where no sequence has an adapter carries none either (it runs the programs without
    the LoRA path), unless specialize_lora is off; forcing it off under an adapter is refused."""
    r = _runner()
    seqs = [_seq(i, 5 + i, list(range(10 * i + 1, 10 * i + 4))) for i in range(3)]
    for s, slot in zip(seqs, (1, -1, 0)):
        s.lora_slot = slot
    sched = [ScheduledSeq(seqs[0], 3, 0, False), ScheduledSeq(seqs[1], 1, 5, True),
             ScheduledSeq(seqs[2], 7, 0, True)]
    assert r.prepare(sched, []).lora_slots is None
    r.lora_enabled = True
    inputs = r.prepare(sched, [])
    want = [1] * 3 + [-1] + [0] * 7
    np.testing.assert_array_equal(inputs.lora_slots[:11], want)
    assert np.all(inputs.lora_slots[11:] == -1) and len(inputs.lora_slots) == 32
    decode = r.prepare(_decode(seqs), [])
    np.testing.assert_array_equal(decode.lora_slots[:3], [1, -1, 0])
    assert np.all(decode.lora_slots[3:] == -1)
    with pytest.raises(ValueError, match="has a LoRA adapter"):
        r.prepare(sched, [], lora=False)
    for s in seqs:
        s.lora_slot = -1
    assert r.prepare(sched, []).lora_slots is None
    assert r.prepare(_decode(seqs), []).lora_slots is None
    np.testing.assert_array_equal(r.prepare(sched, [], lora=True).lora_slots, [-1] * 32)
    assert r.lora_variants() == (True, False)
    r.specialize_lora = False
    np.testing.assert_array_equal(r.prepare(sched, []).lora_slots, [-1] * 32)
    assert r.lora_variants() == (True,)


def test_page_table_rows_follow_appends_replacements_and_slot_reuse():
    r = _runner()
    rng = np.random.default_rng(0)
    seqs = [_seq(i, 3, [int(p) for p in rng.integers(1, 128, 1)]) for i in range(MAX_SEQS)]
    for step in range(40):
        # Appends in place, replacements (preemption / admission with a hit), batch changes.
        for s in seqs:
            u = rng.random()
            if u < 0.3 and len(s.page_ids) < r.max_pages_per_seq:
                s.page_ids.extend(int(p) for p in rng.integers(1, 128, 1))
            elif u < 0.4:
                s.page_ids = [int(p) for p in rng.integers(1, 128, rng.integers(0, 4))]
        if step % 2 == 1:  # new sequences take the place of old ones (more than the slots)
            seqs[rng.integers(0, MAX_SEQS)] = _seq(100 + step, 3, [int(rng.integers(1, 128))])
        batch = [seqs[i] for i in sorted(rng.choice(MAX_SEQS, rng.integers(1, MAX_SEQS + 1),
                                                    replace=False))]
        got = r._page_rows.gather(batch)
        np.testing.assert_array_equal(got, _plain_page_table(batch, len(batch),
                                                             r.max_pages_per_seq), err_msg=step)
    assert len(r._page_rows._entries) <= 2 * MAX_SEQS


def test_sampling_tensors_keep_seeds_knobs_and_bans_per_row():
    params = [SamplingParams(temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, seed=1),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.3, top_k=-1, repetition_penalty=1.2,
                             presence_penalty=0.5, frequency_penalty=-0.25)]
    seeds = [2**63 + 5, -3, 12345]  # beyond int64, negative, ordinary
    rows = [S.SamplingRow(p, sd, k, [1, 2], [3], banned_token_ids=[7] if k == 0 else ())
            for k, (p, sd) in enumerate(zip(params, seeds))]
    t = S.build_sampling_tensors(rows, pad_to=4)
    for i, (p, sd) in enumerate(zip(params, seeds)):
        assert t.temperature[i] == np.float32(p.temperature)
        assert t.top_p[i] == np.float32(p.top_p) and t.min_p[i] == np.float32(p.min_p)
        assert t.top_k[i] == max(p.top_k, 0)
        assert t.repetition_penalty[i] == np.float32(p.repetition_penalty)
        assert t.presence_penalty[i] == np.float32(p.presence_penalty)
        assert t.frequency_penalty[i] == np.float32(p.frequency_penalty)
        u = sd % (1 << 64)
        assert (int(t.seeds[i, 0]), int(t.seeds[i, 1])) == (u >> 32, u & 0xFFFFFFFF)
        assert t.steps[i] == i
    assert t.temperature[3] == 0 and t.top_p[3] == 1 and t.repetition_penalty[3] == 1
    assert t.bias_ids[0, 0] == 7 and t.bias_values[0, 0] == -np.inf
    mine = t.penalty_rows == 2  # row 2's entries of the batch's flat penalty list
    assert (t.penalty_ids[mine][:3] == [1, 2, 3]).all() and t.penalty_is_output[mine][2]


def test_knob_cache_gives_the_tensors_of_a_fresh_build_as_the_batch_changes():
    # The runner's KnobCache reuses the last step's knobs only when every row has the same params
    # object as then; same-length batches of other objects (equal or not), reorders, a shorter
    # batch and a row swapped for a new object must all read their own knobs.
    rng = np.random.default_rng(0)

    def params(i):
        return SamplingParams(temperature=float(rng.uniform(0.1, 2)), top_p=float(rng.uniform(0.5, 1)),
                              top_k=int(rng.integers(0, 50)), min_p=float(rng.uniform(0, 0.2)),
                              repetition_penalty=float(rng.uniform(1, 1.5)), seed=i)

    pool = [params(i) for i in range(8)]
    twins = [SamplingParams(**{**vars(p)}) for p in pool[:4]]  # equal, other objects
    batches = [pool[:4], pool[:4], pool[4:], pool[4:][::-1], pool[4:7], pool[4:7],
               pool[:4], twins, pool[:3] + [pool[7]], pool[:3] + [pool[7]]]
    cache = S.KnobCache()
    hits = 0
    for step, batch in enumerate(batches):
        rows = [S.SamplingRow(p, 11 * i, step, [1], [2]) for i, p in enumerate(batch)]
        before = cache.knobs
        cached = S.build_sampling_tensors(rows, pad_to=8, knob_cache=cache)
        hits += cache.knobs is before
        fresh = S.build_sampling_tensors(rows, pad_to=8)
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty", "seeds", "steps"):
            np.testing.assert_array_equal(getattr(cached, name), getattr(fresh, name),
                                          err_msg=f"{name} at step {step}")
    assert hits == 3  # the three repeats of the same objects reused the knobs
