"""Beam search (engine/beam_search.py, LLM.beam_search, AsyncEngine.beam_search) against a plain
reference search over full forwards of the model, and the ranking and stopping rules on
hand-made log-probs."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from jaxllm import LLM, BeamSearchParams, SamplingParams
from jaxllm.engine.beam_search import BeamSearchInstance
from jaxllm.outputs import CompletionOutput, Logprob, RequestOutput

from .helpers import full_forward_logprobs, small_llama_folder  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def llm(small_llama_folder):
    return LLM(str(small_llama_folder), dtype="float32", max_model_len=64, page_size=8,
               num_pages=48, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
               skip_compile_at_start=True)


def _pool_is_full(llm) -> bool:
    pool = llm.llm_engine.page_pool
    return pool.num_free_pages == pool.num_usable_pages


def _reference(engine, prompt, width, steps, length_penalty):
    """Beam search written out plainly: every beam's next-token log-probs from one full forward
    of the model, 2 * width candidates per beam, vLLM's ranking (cum log-prob over the whole
    length ** length_penalty), no end-of-sequence (ignore_eos)."""
    beams = [(list(prompt), 0.0)]
    score = lambda b: b[1] / len(b[0]) ** length_penalty  # noqa: E731
    for _ in range(steps):
        cands = []
        for toks, cum in beams:
            lp = full_forward_logprobs(engine, toks)[-1]
            for t in np.argsort(-lp)[:2 * width]:
                cands.append((toks + [int(t)], cum + float(lp[t])))
        beams = sorted(cands, key=score, reverse=True)[:width]
    return beams


@pytest.mark.parametrize("width,length_penalty", [(3, 1.0), (2, 0.5)])
def test_beam_search_matches_a_plain_search_over_full_forwards(llm, width, length_penalty):
    engine = llm.llm_engine
    rng = np.random.default_rng(width)
    prompts = [rng.integers(3, 40000, size=n).tolist() for n in (5, 11)]
    params = BeamSearchParams(beam_width=width, max_tokens=4, ignore_eos=True,
                              length_penalty=length_penalty)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, out in zip(prompts, outs):
        ref = _reference(engine, prompt, width, 4, length_penalty)
        assert [s.tokens for s in out.sequences] == [r[0] for r in ref]
        np.testing.assert_allclose([s.cum_logprob for s in out.sequences],
                                   [r[1] for r in ref], rtol=1e-4)
        for s in out.sequences:
            assert s.finish_reason == "length" and len(s.logprobs) == 4
            assert s.text == llm.get_tokenizer().decode(s.tokens, skip_special_tokens=True)
    assert _pool_is_full(llm)


def test_width_one_is_greedy_and_limits_are_checked(llm):
    prompt = {"prompt_token_ids": [7, 8, 9, 10]}
    greedy = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    [out] = llm.beam_search(prompt, BeamSearchParams(beam_width=1, max_tokens=6,
                                                     ignore_eos=True))
    assert out.sequences[0].tokens == [7, 8, 9, 10] + greedy
    # a text prompt is tokenized as generate does; concurrency_limit gives the same beams
    p = BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True)
    both = llm.beam_search(["Hello there", "Paris is"], p)
    one_at_a_time = llm.beam_search(["Hello there", "Paris is"], p, concurrency_limit=1)
    for a, b in zip(both, one_at_a_time, strict=True):  # (batch mixes move the last bits)
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
        assert [s.cum_logprob for s in a.sequences] == pytest.approx(
            [s.cum_logprob for s in b.sequences], rel=1e-5)
    # the beams stop at the context length
    [long] = llm.beam_search({"prompt_token_ids": [5] * 60}, BeamSearchParams(
        beam_width=2, max_tokens=50, ignore_eos=True))
    assert all(len(s.tokens) == 64 for s in long.sequences)
    with pytest.raises(ValueError, match="max_logprobs"):
        llm.beam_search(prompt, BeamSearchParams(beam_width=11, max_tokens=2))
    with pytest.raises(ValueError, match="maximum context length"):
        llm.beam_search({"prompt_token_ids": [5] * 64}, BeamSearchParams(beam_width=2,
                                                                          max_tokens=2))
    for bad in (dict(beam_width=0, max_tokens=2), dict(beam_width=2, max_tokens=0),
                dict(beam_width=2, max_tokens=2, temperature=-1.0)):
        with pytest.raises(ValueError):
            BeamSearchParams(**bad)
    with pytest.raises(TypeError, match="BeamSearchParams"):
        llm.beam_search(prompt, SamplingParams())
    assert not llm.llm_engine.has_unfinished_requests() and _pool_is_full(llm)


def _step(cands: dict[int, float]) -> RequestOutput:
    lps = {t: Logprob(v, rank=i + 1) for i, (t, v) in
           enumerate(sorted(cands.items(), key=lambda kv: -kv[1]))}
    tid = next(iter(lps))
    return RequestOutput("x", None, [1], None, [CompletionOutput(0, "", [tid], logprobs=[lps])],
                         True)


def test_end_of_sequence_beams_finish_and_rank_by_length_normalized_score():
    """Token 2 is the tokenizer's EOS and 9 an end-of-turn token: a candidate ending in either
    is finished (stop_reason None for EOS, the id otherwise), is not extended, and competes at
    the end with the live beams by cum log-prob / length ** length_penalty, the final EOS not
    counted."""
    def search(**kw):
        inst = BeamSearchInstance([1, 1], None, BeamSearchParams(beam_width=2, max_tokens=2, **kw),
                                  eos_ids={2, 9}, eos_token_id=2, max_model_len=100)
        inst.advance([_step({2: -0.1, 9: -0.2, 5: -1.0, 6: -2.0})])
        assert [b.tokens for b in inst.beams] == [[1, 1, 5], [1, 1, 6]]
        inst.advance([_step({7: -0.5, 8: -3.0}), _step({7: -0.1})])
        assert inst.done
        return inst

    inst = search()
    best = inst.best()
    # scores: EOS beam -0.1/2, end-of-turn -0.2/3 (its token counts), [5,7] -1.5/4, [6,7] -2.1/4
    assert [b.tokens for b in best] == [[1, 1, 2], [1, 1, 9]]
    assert [(b.finish_reason, b.stop_reason) for b in best] == [("stop", None), ("stop", 9)]
    out = inst.request_output("r", None)
    assert [c.token_ids for c in out.outputs] == [[], []] and out.finished
    out = search(include_stop_str_in_output=True).request_output("r", None)
    assert [c.token_ids for c in out.outputs] == [[2], [9]]
    # ignore_eos: the end tokens are ordinary candidates and the beams go on
    inst = BeamSearchInstance([1], None, BeamSearchParams(beam_width=2, max_tokens=1,
                                                          ignore_eos=True),
                              eos_ids={2}, eos_token_id=2, max_model_len=100)
    inst.advance([_step({2: -0.1, 5: -1.0, 6: -2.0})])
    assert [b.tokens for b in inst.best()] == [[1, 2], [1, 5]]
    assert [b.finish_reason for b in inst.best()] == ["length", "length"]


def test_async_engine_beam_search_gives_the_offline_beams_and_aborts_when_cancelled(
        small_llama_folder, llm):
    from jaxllm import AsyncEngine

    engine = AsyncEngine(model=str(small_llama_folder), dtype="float32", max_model_len=64,
                         page_size=8, num_pages=48, max_num_batched_tokens=64, max_num_seqs=8,
                         skip_compile_at_start=True)
    prompt = {"prompt_token_ids": [11, 12, 13, 14, 15]}
    params = BeamSearchParams(beam_width=3, max_tokens=4, ignore_eos=True)
    try:
        async def run():
            outs = [o async for o in engine.beam_search(prompt, "b", params)]
            assert len(outs) == 1 and outs[0].finished
            # cancelled mid-search: every beam's request is aborted
            task = asyncio.ensure_future(engine.beam_search(
                prompt, "c", BeamSearchParams(beam_width=4, max_tokens=40,
                                              ignore_eos=True)).__anext__())
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return outs[0]

        out = asyncio.run(run())
        [ref] = llm.beam_search(prompt, params)
        assert [c.token_ids for c in out.outputs] == [s.tokens[5:] for s in ref.sequences]
        assert [c.cumulative_logprob for c in out.outputs] == pytest.approx(
            [s.cum_logprob for s in ref.sequences], rel=1e-5)
        assert [c.finish_reason for c in out.outputs] == ["length"] * 3
        tok = engine.tokenizer
        assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids,
                                                 skip_special_tokens=True)
        eng = engine.engine
        for _ in range(100):  # the aborts reach the step loop
            if not eng.has_unfinished_requests():
                break
            asyncio.run(asyncio.sleep(0.05))
        assert not eng.has_unfinished_requests()
        assert eng.page_pool.num_free_pages == eng.page_pool.num_usable_pages
    finally:
        engine.shutdown()
