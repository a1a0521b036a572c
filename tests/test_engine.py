"""Engine behaviour: continuous batching, chunked prefill, preemption, pages, compiles, API.

Most tests use a small random Llama (fast on 2 CPU cores) with the default model's tokenizer;
the default model itself is exercised at the end.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import os

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.sampling_params import RequestOutputKind

from .helpers import full_forward_logprobs as _full_forward_logprobs
from .helpers import cli_engine_kwargs, fused_kv_write_on, small_llama_folder  # noqa: F401


@pytest.fixture(scope="module")
def small_llm(small_llama_folder):
    # A tiny pool (24 usable pages of 8 tokens = 192 tokens) and a 32-token budget force both
    # chunked prefill and preemption with the 24-prompt batch below.
    return LLM(str(small_llama_folder), dtype="float32", max_model_len=160, page_size=8,
               num_pages=24, max_num_batched_tokens=32, max_num_seqs=8, seed=0)


def _random_prompts(n: int, vocab: int, seed: int, lo: int = 1, hi: int = 120):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi, size=n)
    lengths[0], lengths[1] = 1, hi  # the extremes always appear
    return [{"prompt_token_ids": rng.integers(0, vocab, size=int(L)).tolist()} for L in lengths]


def _pool_is_full(llm: LLM) -> bool:
    pool = llm.llm_engine.page_pool
    return pool.num_free_pages == pool.num_usable_pages


def test_greedy_batch_with_chunked_prefill_and_preemption_equals_each_prompt_alone(small_llm):
    engine = small_llm.llm_engine
    vocab = engine.model_config.vocab_size
    prompts = _random_prompts(24, vocab, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    preempt_before = engine.stats["num_preemptions"]
    batched = small_llm.generate(prompts, params, use_tqdm=False)
    assert engine.stats["num_preemptions"] > preempt_before, "the pool should force preemption"
    assert _pool_is_full(small_llm)
    for prompt, out in zip(prompts, batched):
        alone = small_llm.generate([prompt], params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert len(out.outputs[0].token_ids) == 12
        assert out.outputs[0].finish_reason == "length"
        assert out.prompt_token_ids == prompt["prompt_token_ids"]


def test_async_scheduling_gives_the_same_outputs_as_synchronous_steps(small_llm):
    # Async scheduling runs step k+1's schedule with placeholders for step k's tokens; every
    # user-visible result must equal the synchronous engine's: seeded sampling, penalties and
    # grammars (step k read back between step k+1's forward and its sampler, or, without late
    # sampling, before the next schedule), min_tokens bans, stop tokens, log-probs, prompt
    # log-probs, n > 1, prefix-cache hits, under preemption (24 prompts over a 24-page pool).
    from jaxllm.sampling_params import StructuredOutputsParams

    engine = small_llm.llm_engine
    vocab = engine.model_config.vocab_size
    prompts = _random_prompts(24, vocab, seed=11)
    prompts[5] = {"prompt_token_ids": prompts[4]["prompt_token_ids"][:40] + [1, 2, 3]}  # shared
    kinds = [
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.9, top_k=20, max_tokens=7, seed=5, ignore_eos=True),
        SamplingParams(temperature=0.8, max_tokens=8, seed=6, presence_penalty=0.7,
                       repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=10, seed=7, min_tokens=4,
                       stop_token_ids=list(range(0, vocab, 3))),
        SamplingParams(temperature=0.7, max_tokens=6, seed=8, logprobs=2, ignore_eos=True),
        SamplingParams(n=2, temperature=1.0, max_tokens=5, seed=9, ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=12, seed=10, prompt_logprobs=1,
                       structured_outputs=StructuredOutputsParams(regex="[a-z]{2,9}")),
    ]
    params = [kinds[i % len(kinds)] for i in range(len(prompts))]
    late_forwards = []
    runner = engine.runner
    real_forward = runner.dispatch_forward
    runner.dispatch_forward = lambda *a: late_forwards.append(1) or real_forward(*a)

    def run(async_scheduling, late=True):
        engine.async_scheduling = async_scheduling
        runner.late_sampling = late
        small_llm.reset_prefix_cache()
        try:
            outs = small_llm.generate(prompts, params, use_tqdm=False)
        finally:
            engine.async_scheduling = True
            del runner.late_sampling  # the class's again
        assert _pool_is_full(small_llm)
        return [[(c.token_ids, c.finish_reason, c.text,
                  None if c.logprobs is None else [sorted(d) for d in c.logprobs],
                  None if o.prompt_logprobs is None else [
                      d and sorted(d) for d in o.prompt_logprobs])
                 for c in o.outputs] for o in outs]

    preempt_before = engine.stats["num_preemptions"]
    try:
        sync = run(False)
        assert not late_forwards
        assert run(True) == sync
        assert late_forwards  # the late path ran
        n_late = len(late_forwards)
        assert run(True, late=False) == sync
        assert len(late_forwards) == n_late
    finally:
        del runner.dispatch_forward
    assert engine.stats["num_preemptions"] > preempt_before
    stopped = [o for o, p in zip(sync, params) if p.stop_token_ids]
    assert any(c[1] == "stop" and len(c[0]) >= 4 for o in stopped for c in o)


def test_seeded_sampling_is_reproducible_across_batch_mixes(small_llm):
    vocab = small_llm.llm_engine.model_config.vocab_size
    prompts = _random_prompts(6, vocab, seed=2, hi=40)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=1234, ignore_eos=True)
    other = SamplingParams(temperature=0.7, max_tokens=5, ignore_eos=True)
    alone = small_llm.generate([prompts[0]], seeded, use_tqdm=False)[0].outputs[0].token_ids
    mixed = small_llm.generate(prompts[1:4] + [prompts[0]] + prompts[4:],
                               [other] * 3 + [seeded] + [other] * 2, use_tqdm=False)
    assert mixed[3].outputs[0].token_ids == alone
    # Unseeded requests draw from the engine's generator: two runs differ (with high probability).
    a = small_llm.generate([prompts[0]] * 2, SamplingParams(temperature=1.0, max_tokens=8,
                                                            ignore_eos=True), use_tqdm=False)
    assert a[0].outputs[0].token_ids != a[1].outputs[0].token_ids


def test_n_returns_distinct_seeded_completions_in_index_order(small_llm):
    out = small_llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                             SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=7,
                                            ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    again = small_llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                               SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=7,
                                              ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_requests_that_can_never_fit_are_rejected_at_submission(small_llm):
    engine = small_llm.llm_engine
    with pytest.raises(ValueError, match="maximum context length is 160"):
        small_llm.generate([{"prompt_token_ids": [1] * 150}], SamplingParams(max_tokens=20),
                           use_tqdm=False)
    with pytest.raises(ValueError, match="prompt cannot be empty"):
        small_llm.generate([{"prompt_token_ids": []}], use_tqdm=False)
    with pytest.raises(ValueError, match="out of vocabulary"):
        small_llm.generate([{"prompt_token_ids": [engine.model_config.vocab_size]}], use_tqdm=False)
    with pytest.raises(ValueError, match="per prompt"):
        small_llm.generate(["a", "b"], [SamplingParams()] * 3, use_tqdm=False)
    assert not engine.has_unfinished_requests()
    assert _pool_is_full(small_llm)


def test_prompts_take_every_form_vllm_takes(small_llm):
    # A str, a flat list of token ids (one prompt), a list of such lists, dicts, or a mix.
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    tok = small_llm.get_tokenizer()
    ids = tok("The sea").input_ids
    [flat] = small_llm.generate(ids, params, use_tqdm=False)
    assert flat.prompt_token_ids == ids
    outs = small_llm.generate(["The sea", ids, {"prompt_token_ids": ids}], params,
                              use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [ids] * 3
    assert len({tuple(o.outputs[0].token_ids) for o in outs + [flat]}) == 1


def test_priority_scheduling_serves_lower_priority_values_first(small_llama_folder, small_llm):
    llm = LLM(str(small_llama_folder), dtype="float32", max_model_len=64, page_size=8,
              num_pages=16, max_num_batched_tokens=32, max_num_seqs=1, seed=0,
              scheduling_policy="priority", skip_compile_at_start=True)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    for rid, prio in (("late", 2), ("first", -1), ("mid", 0), ("mid2", 0)):
        engine.add_request(rid, {"prompt_token_ids": [5, 6, 7]}, params, priority=prio)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["first", "mid", "mid2", "late"]
    outs = llm.generate([[5, 6, 7], [8, 9]], params, use_tqdm=False, priority=[1, 0])
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 3]
    with pytest.raises(ValueError, match="priorities for 2 prompts"):
        llm.generate([[5, 6, 7], [8, 9]], params, use_tqdm=False, priority=[1])
    # the default policy refuses a priority rather than ignoring it, as vLLM
    with pytest.raises(ValueError, match="priority scheduling is not enabled"):
        small_llm.generate([[5, 6, 7]], params, use_tqdm=False, priority=[1])
    assert not small_llm.llm_engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="scheduling_policy"):
        LLM(str(small_llama_folder), scheduling_policy="lifo")
    assert cli_engine_kwargs()["scheduling_policy"] == "fcfs"
    assert cli_engine_kwargs("--scheduling-policy", "priority")["scheduling_policy"] == "priority"


def test_request_outputs_carry_their_timings(small_llm):
    """``RequestOutput.metrics`` is vLLM's RequestStateStats: arrival (wall clock), queued,
    first scheduled, first and last token (monotonic, in that order) and the tokens
    generated over all samples. With 8 sequence slots, the 9th and 10th requests are
    scheduled only after one of the first 8 has its last token."""
    import time

    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    t0 = time.time()
    outs = small_llm.generate([[5 + i, 6, 7] for i in range(10)], params, use_tqdm=False)
    for o in outs:
        m = o.metrics
        assert m.num_generation_tokens == 4
        assert t0 <= m.arrival_time <= time.time()
        assert 0 < m.queued_ts <= m.scheduled_ts <= m.first_token_ts <= m.last_token_ts
        assert 0 <= m.first_token_latency <= time.time() - t0
    first_done = min(o.metrics.last_token_ts for o in outs[:8])
    assert all(o.metrics.scheduled_ts >= first_done for o in outs[8:])
    (o,) = small_llm.generate([[5, 6, 7]], SamplingParams(n=2, max_tokens=3, ignore_eos=True,
                                                          seed=1), use_tqdm=False)
    assert o.metrics.num_generation_tokens == 6 and o.metrics.first_token_ts > 0


def test_iteration_tokens_histogram_counts_each_steps_tokens(small_llm):
    """vLLM's iteration_tokens_total (LLM.get_metrics' Histogram, cumulative buckets): one
    5-token prompt and 3 tokens out are three steps, of 5, 1 and 1 tokens."""
    from jaxllm.metrics import Histogram

    def hist():
        (h,) = [m for m in small_llm.get_metrics() if m.name == "jaxllm:iteration_tokens_total"]
        assert isinstance(h, Histogram) and h.buckets["+Inf"] == h.count
        return h

    before = hist()
    small_llm.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=3, ignore_eos=True),
                       use_tqdm=False)
    after = hist()
    assert (after.count - before.count, after.sum - before.sum) == (3, 7)
    assert after.buckets["1"] - before.buckets["1"] == 2
    assert after.buckets["8"] - before.buckets["8"] == 3


def test_request_params_max_tokens_histogram_counts_each_finished_request(small_llm):
    """vLLM's request_params_max_tokens (LLM.get_metrics' Histogram): one count per finished
    request at its max_tokens, an unset max_tokens counted as the room the context leaves
    (max_model_len minus the prompt), as the engine resolves it; n samples are one request."""
    from jaxllm.metrics import Histogram

    def hist():
        (h,) = [m for m in small_llm.get_metrics()
                if m.name == "jaxllm:request_params_max_tokens"]
        assert isinstance(h, Histogram) and h.buckets["+Inf"] == h.count
        return h

    before = hist()
    room = small_llm.llm_engine.max_model_len - 4
    small_llm.generate([[5, 6, 7, 8], [9, 10, 11, 12]],
                       [SamplingParams(max_tokens=3, n=2, ignore_eos=True, seed=0),
                        SamplingParams(max_tokens=None, temperature=0.0)], use_tqdm=False)
    after = hist()
    assert (after.count - before.count, after.sum - before.sum) == (2, 3 + room)
    assert after.buckets["5"] - before.buckets["5"] == 1  # 3 <= 5; room > 5
    assert after.buckets["+Inf"] - before.buckets["+Inf"] == 2


def test_logprobs_mode_processed_gives_the_sampled_distributions_logprobs(small_llm,
                                                                         small_llama_folder):
    """vLLM's logprobs_mode: "processed_logprobs" are of the distribution each token was drawn
    from (tempered, top-k cut: the 3 kept tokens' probabilities sum to 1, the rest -inf),
    "raw_logprobs" (the default) of the model's own; the same seed samples the same tokens in
    both. A mode vLLM does not have is refused."""
    import math

    params = SamplingParams(temperature=0.7, top_k=3, logprobs=5, max_tokens=4, seed=11,
                            ignore_eos=True)
    processed = LLM(str(small_llama_folder), dtype="float32", max_model_len=160, page_size=8,
                    num_pages=24, max_num_seqs=8, seed=0, skip_compile_at_start=True,
                    logprobs_mode="processed_logprobs")
    (p,) = processed.generate([[5, 6, 7]], params, use_tqdm=False)
    (r,) = small_llm.generate([[5, 6, 7]], params, use_tqdm=False)
    assert p.outputs[0].token_ids == r.outputs[0].token_ids
    for tok, plp, rlp in zip(p.outputs[0].token_ids, p.outputs[0].logprobs, r.outputs[0].logprobs):
        finite = [v.logprob for v in plp.values() if math.isfinite(v.logprob)]
        assert len(finite) == 3 and abs(sum(math.exp(x) for x in finite) - 1) < 1e-4
        assert math.isfinite(plp[tok].logprob) and plp[tok].rank <= 3
        assert sum(math.exp(v.logprob) for v in rlp.values()) < 1 - 1e-4
    with pytest.raises(ValueError, match="logprobs_mode must be one of"):
        LLM(str(small_llama_folder), logprobs_mode="logits")
    assert cli_engine_kwargs()["logprobs_mode"] == "raw_logprobs"
    assert cli_engine_kwargs("--logprobs-mode", "processed_logits")["logprobs_mode"] == (
        "processed_logits")
    with pytest.raises(SystemExit):  # argparse's choices
        cli_engine_kwargs("--logprobs-mode", "logits")


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(small_llm):
    # vLLM's left truncation: the same tokens as the prompt's last k given alone; a prompt
    # longer than the context runs cut; -1 (the context) leaves a shorter prompt as it is.
    params = dict(temperature=0.0, max_tokens=4, ignore_eos=True)
    ids = list(range(100, 140))
    cut, alone, whole = small_llm.generate(
        [{"prompt_token_ids": ids}, {"prompt_token_ids": ids[-7:]}, {"prompt_token_ids": ids}],
        [SamplingParams(truncate_prompt_tokens=7, **params), SamplingParams(**params),
         SamplingParams(truncate_prompt_tokens=-1, **params)], use_tqdm=False)
    assert cut.prompt_token_ids == ids[-7:] and whole.prompt_token_ids == ids
    assert cut.outputs[0].token_ids == alone.outputs[0].token_ids
    long = list(range(100, 300))  # 200 tokens, over the 160-token context
    out = small_llm.generate([{"prompt_token_ids": long}], SamplingParams(
        truncate_prompt_tokens=150, **params), use_tqdm=False)[0]
    assert out.prompt_token_ids == long[-150:] and len(out.outputs[0].token_ids) == 4
    assert _pool_is_full(small_llm)


def test_request_larger_than_the_whole_pool_is_rejected(small_llama_folder):
    llm = LLM(str(small_llama_folder), dtype="float32", max_model_len=160, page_size=8,
              num_pages=4, max_num_batched_tokens=32, max_num_seqs=4,
              skip_compile_at_start=True)
    with pytest.raises(ValueError, match="more than the whole pool"):
        llm.generate([{"prompt_token_ids": [1] * 30}], SamplingParams(max_tokens=10),
                     use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_checkpoint_dir_round_trip_serves_the_same_tokens(small_llama_folder, tmp_path):
    kwargs = dict(dtype="float32", max_model_len=64, page_size=8, num_pages=16,
                  max_num_batched_tokens=16, max_num_seqs=2, skip_compile_at_start=True,
                  checkpoint_dir=str(tmp_path / "ckpt"))
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    prompt = [{"prompt_token_ids": [11, 12, 13, 14]}]
    first = LLM(str(small_llama_folder), **kwargs)  # converts, then writes the checkpoint
    assert (tmp_path / "ckpt").is_dir()
    a = first.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    del first
    second = LLM(str(small_llama_folder), **kwargs)  # restores it
    assert second.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == a


def test_no_page_leaks_after_finished_stopped_aborted_and_preempted_requests(small_llm):
    engine = small_llm.llm_engine
    vocab = engine.model_config.vocab_size
    prompts = _random_prompts(10, vocab, seed=3, hi=90)
    for i, p in enumerate(prompts):
        params = SamplingParams(temperature=1.0, max_tokens=4 + i, seed=i, ignore_eos=True,
                                stop_token_ids=[int(p["prompt_token_ids"][0])])
        engine.add_request(f"leak-{i}", p, params)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        if steps == 3:
            engine.abort_request("leak-0")
            engine.abort_request("leak-5")
            engine.abort_request("does-not-exist")
    assert _pool_is_full(small_llm)
    assert engine.scheduler.num_running == 0 and engine.scheduler.num_waiting == 0


def test_no_compilation_after_startup(small_llm):
    # One forward per token bucket (and a decode-only one per bucket a pure decode step can use),
    # and every start-up sampler variant (log-probs or not, sort or not) per sequence bucket, are
    # compiled at start; serving any mix of them compiles nothing.
    runner = small_llm.llm_engine.runner
    seq_buckets = {runner.seq_bucket(T) for T in runner.token_buckets}
    assert runner._forward._cache_size() == len(runner.step_variants())
    assert len(runner.step_variants()) > len(runner.token_buckets)
    assert runner._sample._cache_size() >= len(seq_buckets) * len(runner.sampler_variants())
    before = runner.num_compiles
    vocab = small_llm.llm_engine.model_config.vocab_size
    small_llm.generate(_random_prompts(9, vocab, seed=4, hi=70),
                       SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05,
                                      max_tokens=5, logprobs=3, seed=3), use_tqdm=False)
    small_llm.generate(_random_prompts(3, vocab, seed=6, hi=30),
                       SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    assert runner.num_compiles == before


@pytest.mark.usefixtures("no_xla_persistent_cache")  # XLA compiles counted, none read
def test_startup_compiles_each_program_once(small_llama_folder, monkeypatch, caplog):
    # Start-up compiles every bucket's forward and sampler variants on a thread pool (of
    # JAXLLM_COMPILE_WORKERS threads when set); the sequential warm-up calls that follow must
    # reuse those executables, not compile again.
    import logging

    from jax import monitoring

    from jaxllm.engine.model_runner import ModelRunner

    compiles, marks = [], {}
    monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(name)
        if name == "/jax/core/compile/backend_compile_duration" else None)
    parallel = ModelRunner._compile_in_parallel

    def spy(self):
        marks["before"] = len(compiles)
        parallel(self)
        marks["after"] = len(compiles)
    ModelRunner._compile_in_parallel = spy
    # One thread: differs from the default (one per CPU) on any machine of 2+ cores, CI's too.
    monkeypatch.setenv("JAXLLM_COMPILE_WORKERS", "1")
    caplog.set_level(logging.INFO, logger="jaxllm")
    try:
        llm = LLM(str(small_llama_folder), dtype="float32", max_model_len=64, page_size=8,
                  num_pages=16, max_num_batched_tokens=32, max_num_seqs=4, seed=0)
    finally:
        ModelRunner._compile_in_parallel = parallel
    runner = llm.llm_engine.runner
    seq_buckets = {runner.seq_bucket(T) for T in runner.token_buckets}
    programs = len(runner.step_variants()) + len(seq_buckets) * len(runner.sampler_variants())
    assert marks["after"] - marks["before"] >= programs
    # compile_all's loop ran after the parallel phase: only tiny helper jits (zeros, copies) may
    # compile there, never a forward or sampler again.
    assert len(compiles) - marks["after"] < len(runner.token_buckets)
    assert runner._forward._cache_size() == len(runner.step_variants())
    # each program's compile time is kept (and the slowest logged): where a cold start goes
    assert len(runner.compile_seconds) == programs
    assert sum(n.startswith("forward") for n in runner.compile_seconds) == len(
        runner.step_variants())
    assert all(s > 0 for s in runner.compile_seconds.values())
    assert "compiled on 1 threads" in caplog.text


def test_compile_workers_env_is_checked(monkeypatch):
    from jaxllm.engine.model_runner import compile_workers

    monkeypatch.delenv("JAXLLM_COMPILE_WORKERS", raising=False)
    assert compile_workers() == (os.cpu_count() or 1)
    monkeypatch.setenv("JAXLLM_COMPILE_WORKERS", "3")
    assert compile_workers() == 3
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv("JAXLLM_COMPILE_WORKERS", bad)
        with pytest.raises(ValueError, match="JAXLLM_COMPILE_WORKERS"):
            compile_workers()


def _spy_launches(runner, record):
    """Wraps runner.launch to record, per step, (decode_only flag, one new token per sequence)."""
    launch = runner.launch

    def spy(inputs, *args, **kw):
        md = inputs.md
        n = int(md.num_seqs[0])
        q_lens = np.diff(np.asarray(md.query_start_loc)[:n + 1])
        record.append((md.decode_only, bool(n) and bool(np.all(q_lens == 1))))
        return launch(inputs, *args, **kw)
    runner.launch = spy
    return launch


def test_pure_decode_steps_run_the_decode_only_program_with_identical_outputs(small_llm):
    # Every step whose sequences all have one new token runs the decode-only forward (a static
    # flag: its own executable, compiled at start-up, so the cache does not grow), every other
    # step the general one; and the outputs of a mixed workload (chunked prefill, preemption,
    # sampling, log-probs) equal those of forcing the general forward on every step.
    engine = small_llm.llm_engine
    runner = engine.runner
    vocab = engine.model_config.vocab_size
    prompts = _random_prompts(12, vocab, seed=21, hi=90)
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.9, top_p=0.9, max_tokens=6, seed=4, ignore_eos=True)]
    params = [params[i % 2] for i in range(len(prompts))]
    compiled = runner.num_compiles

    def run(decode_only_steps):
        record = []
        runner.decode_only_steps = decode_only_steps
        launch = _spy_launches(runner, record)
        try:
            small_llm.reset_prefix_cache()
            outs = small_llm.generate(prompts, params, use_tqdm=False)
        finally:
            runner.launch = launch
            runner.decode_only_steps = True
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs], record

    fast, fast_steps = run(True)
    general, general_steps = run(False)
    assert fast == general
    assert all(flag == pure for flag, pure in fast_steps)
    assert sum(flag for flag, _ in fast_steps) >= 5, "the workload must have pure decode steps"
    assert any(not pure for _, pure in fast_steps), "and mixed / prefill steps"
    assert not any(flag for flag, _ in general_steps)
    assert runner.num_compiles == compiled


def test_small_decode_buckets_run_one_row_programs_with_the_same_outputs(small_llama_folder,
                                                                        small_llm):
    # EngineConfig.small_decode_buckets=(1, 2, 4) (default none): a pure decode step of n <= 4
    # sequences runs the decode-only program of the smallest of those buckets >= n, compiled at
    # start-up, and serves the same tokens as the engine without them (its decode steps padded
    # to the smallest token bucket, 8).
    assert small_llm.llm_engine.runner.small_decode_buckets == ()
    llm = LLM(str(small_llama_folder), dtype="float32", max_model_len=160, page_size=8,
              num_pages=24, max_num_batched_tokens=32, max_num_seqs=8, seed=0,
              small_decode_buckets=(4, 1, 2))
    runner = llm.llm_engine.runner
    assert [T for T, d in runner.step_variants() if d][:3] == [1, 2, 4]
    assert [runner.decode_bucket(n) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    vocab = llm.llm_engine.model_config.vocab_size
    # Staggered lengths: the batch drains from 6 sequences to 1, a decode step at every size.
    prompts = _random_prompts(6, vocab, seed=33, hi=40)
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=2 + 3 * i,
                             ignore_eos=True, logprobs=1) for i in range(len(prompts))]
    compiled = runner.num_compiles
    shapes = []
    launch = runner.launch

    def spy(inputs, *args, **kw):
        n = int(inputs.md.num_seqs[0])
        shapes.append((inputs.md.decode_only, n, inputs.token_ids.shape[0]))
        return launch(inputs, *args, **kw)
    runner.launch = spy
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        runner.launch = launch
    small_llm.reset_prefix_cache()
    ref = small_llm.generate(prompts, params, use_tqdm=False)
    # Same tokens; log-probs equal up to float32 rounding (a GEMM of 1 row sums in another order
    # than one of 8 rows).
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    for a, b in zip(outs, ref):
        for da, db in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert da.keys() == db.keys()
            np.testing.assert_allclose([v.logprob for v in da.values()],
                                       [v.logprob for v in db.values()], atol=1e-4)
    decode = {(n, T) for d, n, T in shapes if d}
    assert {(1, 1), (2, 2), (3, 4), (4, 4)} <= decode, decode
    assert all(T == runner.decode_bucket(n) for n, T in decode)
    assert runner.num_compiles == compiled
    assert _pool_is_full(llm)


def test_penalty_and_grammar_rows_run_programs_compiled_at_start_up(small_llama_folder):
    # On accelerators start-up also compiles the samplers of batches with penalty rows (one flat
    # list of max_model_len's bucket) and with constrained rows (the token bitmask), so serving
    # them compiles nothing: before, each power of two a penalty row's prompt + output passed,
    # and each batch size a grammar batch drained through, compiled a sampler mid-run. On a CPU
    # they are off by default (start-up stays short); the test turns them on.
    pytest.importorskip("llguidance")
    from jaxllm.sampling_params import StructuredOutputsParams

    llm = LLM(str(small_llama_folder), dtype="float32", max_model_len=160, page_size=8,
              num_pages=96, max_num_batched_tokens=32, max_num_seqs=4, seed=0,
              skip_compile_at_start=True)
    runner = llm.llm_engine.runner
    assert runner.sampler_extras() == []  # a CPU's default
    runner.compile_sampler_extras = True
    runner.compile_all(show_progress=False)
    compiled = runner.num_compiles
    vocab = llm.llm_engine.model_config.vocab_size
    prompts = _random_prompts(4, vocab, seed=5, hi=70)
    # prompt + output pass 64 and 128 tokens (the old per-row buckets), top_p on and off
    pen = [SamplingParams(temperature=0.8, seed=i, max_tokens=60 + 10 * i, ignore_eos=True,
                          presence_penalty=0.5 * (i % 2), repetition_penalty=1.2,
                          top_p=0.9 if i < 2 else 1.0) for i in range(4)]
    outs = llm.generate(prompts, pen, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [60, 70, 80, 90]
    so = StructuredOutputsParams(regex="[a-z]{2,40}")
    grammar = [SamplingParams(temperature=0.8, seed=i, max_tokens=40,
                              structured_outputs=so if i % 2 else None,
                              allowed_token_ids=None if i % 2 else list(range(100, 200)))
               for i in range(4)]
    outs = llm.generate(prompts, grammar, use_tqdm=False)
    assert all(set(o.outputs[0].token_ids) <= set(range(100, 200)) for o in outs[::2])
    assert runner.num_compiles == compiled
    assert _pool_is_full(llm)


def test_small_decode_buckets_are_checked():
    from jaxllm.config import EngineConfig

    for bad in ((0,), (2, -1), ("1",), 4, (True,)):
        with pytest.raises(ValueError, match="small_decode_buckets"):
            EngineConfig(model=None, small_decode_buckets=bad)


def test_quantization_takes_vllms_names_and_refuses_others():
    from jaxllm.config import EngineConfig

    kw = cli_engine_kwargs("-q", "modelopt", "--kv-cache-dtype", "fp8_e5m2",
                           "--calculate-kv-scales")
    assert (kw["quantization"], kw["kv_cache_dtype"], kw["calculate_kv_scales"]) == (
        "modelopt", "fp8_e5m2", True)
    assert cli_engine_kwargs()["calculate_kv_scales"] is False
    with pytest.raises(SystemExit):  # argparse's choices
        cli_engine_kwargs("-q", "awq")

    for ok in (None, "fp8", "compressed-tensors", "modelopt"):
        assert EngineConfig(model=None, quantization=ok).quantization == ok
    with pytest.raises(ValueError, match="quantization='awq' is not supported; choose None, "
                                         "'fp8', 'compressed-tensors', 'modelopt'"):
        EngineConfig(model=None, quantization="awq")


def test_forcing_decode_only_on_a_prefill_batch_is_refused(small_llm):
    from types import SimpleNamespace

    from jaxllm.engine.scheduler import ScheduledSeq

    runner = small_llm.llm_engine.runner
    seq = SimpleNamespace(all_token_ids=[1, 2, 3], num_pending=0, num_tokens=3, page_ids=[1],
                          pending_row=-1)
    prefill = [ScheduledSeq(seq, 3, 0, True)]
    assert not runner.prepare(prefill, []).md.decode_only
    with pytest.raises(ValueError, match="3 tokens over 1 sequences"):
        runner.prepare(prefill, [], decode_only=True)
    decode = [ScheduledSeq(seq, 1, 2, True)]
    assert runner.prepare(decode, []).md.decode_only


def test_decode_only_attention_is_one_kernel_launch_with_the_same_output():
    # The Pallas kernel (interpreted here) on a pure decode batch with padding tokens: the
    # decode-only metadata drops the prefill launch and gives bit-identical outputs, also per
    # head shard under tensor parallelism (shard_map over 2 devices).
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jaxllm.models.attention import AttentionMetadata, heads_sharded, paged_attention

    from .test_pallas_kernels import _random_batch

    rng = np.random.default_rng(3)
    (q, kp, vp, sl, pt, qsl, ns), n_real = _random_batch(
        rng, kinds=("decode",) * 5, T=8, S=6, M=4, B=8, P=30, H=4, K=2, D=16, dtype=jnp.float32)
    md = AttentionMetadata(slot_mapping=jnp.zeros(8, jnp.int32), query_start_loc=qsl,
                           seq_lens=sl, page_table=pt, num_seqs=ns)
    md_dec = dataclasses.replace(md, decode_only=True)

    def attend(md):
        return paged_attention(q, kp, vp, md, sm_scale=0.25, backend="pallas")

    def launches(md):
        return str(jax.make_jaxpr(attend)(md)).count("pallas_call")

    assert (launches(md), launches(md_dec)) == (2, 1)
    general, decode = np.asarray(jax.jit(attend)(md)), np.asarray(jax.jit(attend)(md_dec))
    assert n_real == 5 and np.all(decode[n_real:] == 0.0)
    np.testing.assert_array_equal(decode, general)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tp",))  # as sharding/mesh.py
    with heads_sharded(mesh):
        sharded = np.asarray(jax.jit(attend)(md_dec))
    np.testing.assert_array_equal(sharded, general)


def test_packed_step_inputs_round_trip_bit_exactly():
    # Every dtype a step carries (int32, float32 with -inf, uint32 seeds, bool, empty widths)
    # comes out of the one int32 buffer with its bits, shape and dtype unchanged.
    import jax

    from jaxllm.engine import sampler as sampler_lib
    from jaxllm.engine.model_runner import Packed, pack

    rows = [sampler_lib.SamplingRow(SamplingParams(temperature=0.7, logit_bias={5: -1.5},
                                                   presence_penalty=0.3),
                                    2**64 - 3, 4, [1, 2], [3], banned_token_ids=[7]),
            sampler_lib.SamplingRow(SamplingParams(temperature=0.0), 11, 0, [4], [])]
    sampling = sampler_lib.build_sampling_tensors(rows, pad_to=4)
    ints = {"a": np.arange(-3, 9, dtype=np.int32).reshape(3, 4), "b": np.zeros((2, 0), np.int32)}
    buf, (l_ints, l_samp) = pack(ints, sampling)
    assert buf.dtype == np.int32 and buf.ndim == 1
    for tree, layout in ((ints, l_ints), (sampling, l_samp)):
        out = jax.jit(lambda b, layout=layout: Packed(b, layout).unpack())(buf)
        want, got = jax.tree.leaves(tree), jax.tree.leaves(out)
        assert len(want) == len(got)
        for w, g in zip(want, got):
            g = np.asarray(g)
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(g.view(np.uint8) if g.size else g,
                                          w.view(np.uint8) if w.size else w)
    with pytest.raises(TypeError, match="int64"):
        pack({"x": np.zeros(3, np.int64)})


def test_a_step_is_one_host_to_device_copy_with_the_outputs_of_unpacked_inputs(small_llm,
                                                                            monkeypatch):
    # The forward and the sampler each take one Packed buffer (its input is one array); a
    # whole dispatch makes one explicit device_put call (both buffers) and no implicit
    # transfer (numpy arguments of a jit would be implicit ones, refused by the transfer
    # guard); sampling widths (penalties) do not change the forward's program; and a mixed
    # workload gives the same outputs as passing numpy StepInputs (the path before packing).
    import jax

    from jaxllm.engine.model_runner import Packed

    engine = small_llm.llm_engine
    runner = engine.runner
    vocab = engine.model_config.vocab_size
    fwd_in, samp_in = runner._device_inputs(runner.prepare([], [], T=runner.token_buckets[0]))
    assert isinstance(fwd_in, Packed) and isinstance(samp_in, Packed)
    assert jax.tree.leaves(fwd_in) == [fwd_in.buf] and jax.tree.leaves(samp_in) == [samp_in.buf]
    lowered = runner._forward.lower(runner._leaves, runner.kv_caches, fwd_in, runner._prev_tokens)
    assert len(jax.tree.leaves(lowered.args_info[0][2])) == 1  # (args, kwargs)

    puts = []
    device_put = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda *a, **k: puts.append(1) or device_put(*a, **k))
    engine.add_request("one-copy", {"prompt_token_ids": [5, 6, 7, 8, 9]},
                       SamplingParams(temperature=0.8, top_k=4, max_tokens=3, seed=1, logprobs=2,
                                      ignore_eos=True))
    with jax.transfer_guard_host_to_device("disallow"):
        steps = 0
        while engine.has_unfinished_requests():
            before = len(puts)
            engine.step()
            steps += 1
            assert len(puts) - before <= 1
    monkeypatch.undo()
    assert steps >= 3 and 1 <= len(puts) <= steps

    prompts = _random_prompts(6, vocab, seed=31, hi=50)
    params = SamplingParams(temperature=0.9, top_p=0.8, max_tokens=5, seed=2, logprobs=1,
                            presence_penalty=0.2, ignore_eos=True)

    def run(pack_inputs):
        runner.pack_inputs = pack_inputs
        try:
            small_llm.reset_prefix_cache()
            outs = small_llm.generate(prompts, params, use_tqdm=False)
        finally:
            runner.pack_inputs = True
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]

    forward_programs = runner._forward._cache_size()
    packed = run(True)
    assert runner._forward._cache_size() == forward_programs
    assert packed == run(False)


def test_penalty_and_bias_variants_compile_once_and_are_reused(small_llm):
    # Penalties / logit_bias widen the sampling inputs: their variant compiles on first use per
    # bucket (documented in docs/DESIGN_NOTES.md), then never again.
    engine = small_llm.llm_engine
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.8, max_tokens=4, presence_penalty=0.5,
                            logit_bias={3: 2.0}, ignore_eos=True)
    prompts = _random_prompts(5, vocab, seed=5, hi=60)
    small_llm.generate(prompts, params, use_tqdm=False)
    after_first = engine.runner.num_compiles
    small_llm.generate(prompts, params, use_tqdm=False)
    assert engine.runner.num_compiles == after_first


def test_kv_cache_is_donated_and_updated_in_place(small_llm):
    engine = small_llm.llm_engine
    k0, v0 = engine.runner.kv_caches[0]
    ptr = k0.unsafe_buffer_pointer()
    small_llm.generate([{"prompt_token_ids": [3, 4, 5]}], SamplingParams(max_tokens=2),
                       use_tqdm=False)
    k1, _ = engine.runner.kv_caches[0]
    assert k0.is_deleted() and v0.is_deleted(), "the old cache buffers must be donated"
    assert k1.unsafe_buffer_pointer() == ptr, "the new cache must reuse the donated buffer"


def test_logprobs_and_prompt_logprobs_agree_with_a_full_forward(small_llm):
    engine = small_llm.llm_engine
    prompt = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28,
              29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41]  # longer than the 32-token budget
    out = small_llm.generate([{"prompt_token_ids": prompt}],
                             SamplingParams(temperature=0.0, max_tokens=3, logprobs=2,
                                            prompt_logprobs=2, ignore_eos=True),
                             use_tqdm=False)[0]
    ref = _full_forward_logprobs(engine, prompt + out.outputs[0].token_ids)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for p in range(1, len(prompt)):
        d = out.prompt_logprobs[p]
        assert d[prompt[p]].logprob == pytest.approx(ref[p - 1, prompt[p]], abs=1e-4)
        assert len(d) in (2, 3)
    full = prompt + out.outputs[0].token_ids
    for j, d in enumerate(out.outputs[0].logprobs):
        pos = len(prompt) - 1 + j
        tok = full[pos + 1]
        assert d[tok].logprob == pytest.approx(ref[pos, tok], abs=1e-4)
        assert d[tok].rank == 1  # greedy picks the most likely token


def _step_outputs(engine, prompts, params, kind: RequestOutputKind, tag: str):
    """Runs the requests to the end through LLMEngine.step; per step, (output, a deep copy taken
    when step() returned it)."""
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"{tag}-{kind.name}-{i}", prompt,
                           dataclasses.replace(p, output_kind=kind))
    steps = []
    while engine.has_unfinished_requests():
        steps.append([(o, copy.deepcopy(o)) for o in engine.step()])
    return steps


def _kinds_workload(engine):
    vocab = engine.model_config.vocab_size
    prompts = _random_prompts(10, vocab, seed=21, hi=60)
    kinds = [
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True, logprobs=2),
        SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=3, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=1.0, max_tokens=9, seed=4, min_tokens=2,
                       stop_token_ids=list(range(0, vocab, 4))),
        SamplingParams(temperature=0.8, max_tokens=5, seed=5, ignore_eos=True),
    ]
    return prompts, [kinds[i % len(kinds)] for i in range(len(prompts))]


def _by_request(steps):
    per: dict[str, list] = {}
    for outs in steps:
        for o, _ in outs:
            per.setdefault(o.request_id.split("-")[-1], []).append(o)
    return per


def _final(o):
    return [(c.index, c.token_ids, c.text, c.logprobs, c.cumulative_logprob, c.finish_reason,
             c.stop_reason) for c in o.outputs]


def test_output_kinds_agree_and_outputs_held_by_the_user_never_change(small_llm):
    # n = 1 requests get their output in the row loop of LLMEngine._read_inflight, n > 1 ones
    # after it; both must hand out lists that later steps leave alone (vLLM's own CUMULATIVE
    # hands out its live lists), DELTA pieces must add up to the CUMULATIVE end, and FINAL_ONLY
    # gives exactly one output per request, the whole of it.
    engine = small_llm.llm_engine
    prompts, params = _kinds_workload(engine)
    cum = _step_outputs(engine, prompts, params, RequestOutputKind.CUMULATIVE, "kinds")
    delta = _step_outputs(engine, prompts, params, RequestOutputKind.DELTA, "kinds")
    final = _step_outputs(engine, prompts, params, RequestOutputKind.FINAL_ONLY, "kinds")
    assert _pool_is_full(small_llm)
    for steps in (cum, delta, final):
        for outs in steps:
            for o, snapshot in outs:
                assert o == snapshot  # nothing the user holds changed after step() returned it
            ids = [o.request_id for o, _ in outs]
            assert len(ids) == len(set(ids))  # one output per request per step
    cum_by, delta_by, final_by = _by_request(cum), _by_request(delta), _by_request(final)
    assert sorted(cum_by) == sorted(delta_by) == sorted(final_by) == [str(i) for i in range(10)]
    for rid, outs in cum_by.items():
        p = params[int(rid)]
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        last = outs[-1]
        assert len(last.outputs) == p.n
        for prev, cur in zip(outs, outs[1:]):  # each output extends the one before
            for a, b in zip(prev.outputs, cur.outputs):
                assert b.token_ids[:len(a.token_ids)] == a.token_ids
                assert b.text.startswith(a.text)
                if a.logprobs is not None:
                    assert b.logprobs[:len(a.logprobs)] == a.logprobs
        for c in last.outputs:
            assert c.finish_reason in ("stop", "length")
            assert c.logprobs is None or len(c.logprobs) == len(c.token_ids)
        # FINAL_ONLY: one output, equal to CUMULATIVE's last.
        assert len(final_by[rid]) == 1 and final_by[rid][0].finished
        assert _final(final_by[rid][0]) == _final(last)
        # DELTA: the pieces concatenate to CUMULATIVE's last.
        douts = delta_by[rid]
        assert [o.finished for o in douts] == [False] * (len(douts) - 1) + [True]
        for j, c in enumerate(last.outputs):
            pieces = [o.outputs[j] for o in douts]
            assert [t for d in pieces for t in d.token_ids] == c.token_ids
            assert "".join(d.text for d in pieces) == c.text
            if c.logprobs is not None:
                assert [x for d in pieces for x in d.logprobs] == c.logprobs
            assert pieces[-1].finish_reason == c.finish_reason
    # The stop-token requests ended in different steps (the workload covers early finishes).
    stops = [cum_by[str(i)][-1].outputs[0].finish_reason for i in range(2, 10, 4)]
    assert "stop" in stops or len({len(cum_by[str(i)]) for i in range(10)}) > 1


def test_async_engine_streams_deltas_and_aborts(small_llama_folder):
    from jaxllm import AsyncEngine

    engine = AsyncEngine(model=str(small_llama_folder), dtype="float32", max_model_len=160,
                         page_size=8, num_pages=24, max_num_batched_tokens=32, max_num_seqs=8)
    try:
        async def run():
            params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                    output_kind=RequestOutputKind.DELTA)
            deltas = [o async for o in engine.generate({"prompt_token_ids": [4, 5, 6]}, params, "a")]
            final = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
            cumulative = [o async for o in engine.generate({"prompt_token_ids": [4, 5, 6]}, final, "b")]
            assert sum(len(d.outputs[0].token_ids) for d in deltas) == 6
            joined = [t for d in deltas for t in d.outputs[0].token_ids]
            assert joined == cumulative[-1].outputs[0].token_ids
            assert "".join(d.outputs[0].text for d in deltas) == cumulative[-1].outputs[0].text
            assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == "length"

            # Abort mid-stream: the stream ends with finish_reason "abort" and pages come back.
            long = SamplingParams(max_tokens=100, ignore_eos=True)
            outs = []
            async for o in engine.generate({"prompt_token_ids": [4, 5, 6]}, long, "c"):
                outs.append(o)
                if len(outs) == 2:
                    await engine.abort("c")
            assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"

            with pytest.raises(ValueError, match="maximum context length"):
                async for _ in engine.generate({"prompt_token_ids": [1] * 159},
                                               SamplingParams(max_tokens=5), "d"):
                    pass

        asyncio.run(run())
        pool = engine.engine.page_pool
        assert pool.num_free_pages == pool.num_usable_pages
    finally:
        engine.shutdown()


def test_batch_limits_default_to_vllms_for_the_device_and_usage(small_llama_folder, monkeypatch):
    from jaxllm.engine import llm_engine
    from jaxllm.engine.llm_engine import default_batch_limits

    GiB = 2**30
    # vLLM's get_batch_defaults: >= 70 GiB and not an A100 -> 16384 (LLM) / 8192 (server)
    # tokens and 1024 sequences; other GPUs 8192 / 2048 and 256.
    assert default_batch_limits("gpu", "NVIDIA H100 80GB HBM3", 80 * GiB, "llm") == (16384, 1024)
    assert default_batch_limits("gpu", "NVIDIA H200", 141 * GiB, "server") == (8192, 1024)
    assert default_batch_limits("gpu", "NVIDIA A100-SXM4-80GB", 80 * GiB, "llm") == (8192, 256)
    assert default_batch_limits("gpu", "NVIDIA L4", 24 * GiB, "server") == (2048, 256)
    assert default_batch_limits("gpu", "NVIDIA H100", None, "llm") == (8192, 256)  # unknown size
    assert default_batch_limits("cpu", "cpu", None, "server") == (1024, 256)

    class Device:  # JAX's allocator limit is 75% of the memory unless told otherwise
        def memory_stats(self):
            return {"bytes_limit": 60 * GiB}
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert llm_engine._device_memory_bytes(Device()) == 80 * GiB
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    assert llm_engine._device_memory_bytes(Device()) == 120 * GiB

    # The engine takes them when the config leaves them None, and an explicit value wins.
    kw = dict(dtype="float32", max_model_len=64, num_pages=8, skip_compile_at_start=True)
    eng = LLM(str(small_llama_folder), **kw).llm_engine
    assert (eng.max_num_batched_tokens, eng.max_num_seqs) == (1024, 256)  # the CPU's
    monkeypatch.setattr(llm_engine, "_CPU_BATCH_LIMITS", ({"llm": 512, "server": 128}, 16))
    eng = LLM(str(small_llama_folder), usage_context="server", **kw).llm_engine
    assert (eng.max_num_batched_tokens, eng.max_num_seqs) == (128, 16)
    eng = LLM(str(small_llama_folder), max_num_seqs=3, max_num_batched_tokens=96, **kw).llm_engine
    assert (eng.max_num_batched_tokens, eng.max_num_seqs) == (96, 3)
    with pytest.raises(ValueError, match="usage_context must be one of"):
        LLM(str(small_llama_folder), usage_context="batch", **kw)


def test_enforce_eager_compiles_the_step_programs_without_command_buffers(small_llama_folder,
                                                                          monkeypatch):
    # vLLM's enforce_eager: the forward and the sampler are compiled with XLA's command buffers
    # (its CUDA graphs) off. Same tokens; the option reaches the compile (a misspelt option name
    # fails it); `jaxllm serve/generate --enforce-eager` sets it; off by default.
    from jaxllm.engine import model_runner

    kw = dict(dtype="float32", max_model_len=64, page_size=8, num_pages=16,
              max_num_batched_tokens=16, max_num_seqs=2, skip_compile_at_start=True)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    prompt = [{"prompt_token_ids": [11, 12, 13, 14, 15, 16]}]
    default = LLM(str(small_llama_folder), **kw)
    eager = LLM(str(small_llama_folder), enforce_eager=True, **kw)
    assert default.llm_engine.runner._jit_options == {}
    assert eager.llm_engine.runner._jit_options == {
        "compiler_options": {"xla_gpu_enable_command_buffer": ""}}
    want = default.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert eager.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == want

    monkeypatch.setattr(model_runner, "EAGER_COMPILER_OPTIONS", {"xla_gpu_no_such_option": ""})
    broken = LLM(str(small_llama_folder), enforce_eager=True, **kw)
    with pytest.raises(Exception, match="xla_gpu_no_such_option"):
        broken.generate(prompt, params, use_tqdm=False)

    assert cli_engine_kwargs("--enforce-eager")["enforce_eager"] is True
    assert cli_engine_kwargs()["enforce_eager"] is False


def test_kv_pool_is_sized_from_device_memory_after_the_largest_steps_temp(small_llama_folder,
                                                                           monkeypatch, caplog):
    # The GPU path of num_pages=None (a CPU has no memory_stats): the pool gets what is left of
    # gpu_memory_utilization x the device's limit after the live arrays (the weights) and the
    # largest step's temp memory (XLA's figure for the forward and sampler at the largest
    # token bucket, compiled abstractly with a one-page cache), plus the scratch page. The
    # arrays' bytes, not the allocator's bytes_in_use (which moves with its rounding, so the
    # page count and with it every step program's shape would change between starts), unless
    # the allocator holds more than a slack beyond them.
    import dataclasses

    from jaxllm.engine import llm_engine
    from jaxllm.engine.model_runner import kv_page_bytes

    eng = LLM(str(small_llama_folder), dtype="float32", max_model_len=64, page_size=8,
              num_pages=8, max_num_batched_tokens=32, max_num_seqs=4,
              skip_compile_at_start=True).llm_engine
    temp = eng._largest_step_temp_bytes()
    assert temp > 0
    mc = eng.model_config
    page = kv_page_bytes(mc.num_hidden_layers, 8, mc.num_key_value_heads, mc.head_dim,
                         eng.cache_dtype)
    limit, arrays = 64 * 2**20, 3 * 2**20
    stats = {"bytes_limit": limit}

    class Device:
        def memory_stats(self):
            return dict(stats)
    monkeypatch.setattr(llm_engine.jax, "local_devices", lambda: [Device()])
    monkeypatch.setattr(llm_engine, "device_array_bytes", lambda d: arrays)
    monkeypatch.setattr(llm_engine, "_ALLOCATOR_SLACK_BYTES", 4 * 2**20)
    monkeypatch.setattr(eng, "config", dataclasses.replace(eng.config, num_pages=None))

    def pages(used):
        return int((limit * eng.config.gpu_memory_utilization - used - int(temp * 1.05))
                   // page) + 1
    for in_use in (arrays, arrays + 1, arrays + 4 * 2**20):  # rounding: the arrays' figure
        stats["bytes_in_use"] = in_use
        assert eng._local_num_pages() == pages(arrays) > pages(arrays + 2**20) > 1
    stats["bytes_in_use"] = arrays + 6 * 2**20  # far beyond the arrays: the allocator's, less
    assert eng._local_num_pages() == pages(arrays + 2 * 2**20)  # the slack
    monkeypatch.setattr(eng, "config", dataclasses.replace(eng.config,
                                                           gpu_memory_utilization=0.01))
    with pytest.raises(ValueError, match="Not enough device memory for the KV cache"):
        eng._local_num_pages()

    # An accelerator whose allocator keeps no statistics (XLA's VMM allocator) gets the CPU's
    # pool, and a warning that says so and how to size it.
    class Blind:
        platform = "gpu"

        def memory_stats(self):
            return None
    monkeypatch.setattr(llm_engine.jax, "local_devices", lambda: [Blind()])
    cpu_pages = max(min(8 * eng.max_num_seqs, llm_engine._CPU_KV_BUDGET_BYTES // page), 8)
    with caplog.at_level("WARNING", logger="jaxllm"):
        assert eng._local_num_pages() == cpu_pages + 1
    assert "no memory statistics" in caplog.text and "--num-pages" in caplog.text


def test_device_array_bytes_counts_each_live_arrays_shard_on_the_device():
    import gc

    import jax
    import jax.numpy as jnp

    from jaxllm.engine.llm_engine import device_array_bytes

    gc.collect()  # no other test's garbage freed in between
    devices = jax.devices()
    before = device_array_bytes(devices[0])
    a = jnp.ones((1000, 3), jnp.bfloat16)  # 6,000 bytes
    b = jax.device_put(jnp.zeros((8, 250), jnp.float32),  # 4,000 bytes on each of two
                       jax.sharding.NamedSharding(jax.make_mesh((2,), ("x",), devices=devices[:2]),
                                                  jax.sharding.PartitionSpec("x")))
    assert device_array_bytes(devices[0]) - before == 6000 + 4000
    assert device_array_bytes(devices[1]) >= 4000
    del a, b
    assert device_array_bytes(devices[0]) == before


@pytest.mark.parametrize("backend", ["reference", "pallas"])
def test_attention_is_traced_once_per_step_program_and_compiles_to_the_same_ops(
        small_llama_folder, monkeypatch, backend):
    # Start-up: the attention of every layer is one nested jit (same shapes, same static
    # arguments), so a step program traces and lowers it once, not once per layer (the 8B cold
    # start spent most of its time lowering). XLA inlines it: the optimized program has the same
    # ops as with the attention traced inline in each layer.
    import collections
    import re

    import jax

    from jaxllm.models import attention

    # The Pallas backend (interpreted here) with a pure decode step: its static decode_only
    # flag must stay static through the nested jit. The layers traced one by one (the
    # layers' own nested jit, JAXLLM_LAYER_JIT, would trace the attention once either way; the
    # pipeline runner calls its layers one by one, so it relies on this one).
    monkeypatch.setenv("JAXLLM_LAYER_JIT", "0")
    traced = []
    name = {"reference": "ragged_paged_attention_reference",
            "pallas": "ragged_paged_attention"}[backend]
    real = getattr(attention, name)
    monkeypatch.setattr(attention, name, lambda *a, **k: (traced.append(1), real(*a, **k))[1])
    eng = LLM(str(small_llama_folder), dtype="float32", max_model_len=64, page_size=8,
              num_pages=16, max_num_batched_tokens=16, max_num_seqs=2, attention_backend=backend,
              skip_compile_at_start=True).llm_engine
    runner, layers = eng.runner, eng.model_config.num_hidden_layers
    assert layers >= 2
    fwd_in, _ = runner._device_inputs(runner.prepare([], [], T=8 if backend == "pallas" else 16,
                                                     decode_only=backend == "pallas"))

    def lowered_ops():
        jax.clear_caches()
        traced.clear()
        lowered = runner._forward.lower(runner._leaves, runner.kv_caches, fwd_in,
                                        runner._prev_tokens)
        hlo = lowered.compile().as_text()
        return collections.Counter(re.findall(r"= \S+ ([a-z\-]+)\(", hlo)), len(traced)

    nested, nested_traces = lowered_ops()
    assert nested_traces == 1
    # The Pallas decode step of 8 tokens takes the rope path by default (fused_qkv_rope), whose
    # nested jit is _paged_attention_rope.
    nested_jit = "_paged_attention_rope" if backend == "pallas" else "_paged_attention"
    monkeypatch.setattr(attention, nested_jit, getattr(attention, nested_jit).__wrapped__)
    inline, inline_traces = lowered_ops()
    assert inline_traces == layers
    assert nested == inline


def _pallas_greedy_tokens(folder) -> list:
    """Greedy tokens of two prompts (10 each) from a float32 Pallas-backend LLM over the small
    Llama in ``folder``, small enough that decode steps take the decode kernel's paths; every
    page comes back."""
    llm = LLM(str(folder), dtype="float32", max_model_len=64, page_size=8, num_pages=16,
              max_num_batched_tokens=16, max_num_seqs=2, attention_backend="pallas",
              skip_compile_at_start=True)
    prompts = [{"prompt_token_ids": [11, 12, 13, 14, 15]}, {"prompt_token_ids": [7, 8, 9]}]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
                        use_tqdm=False)
    assert llm.llm_engine.scheduler.page_pool.num_free_pages == 16  # all pages back
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("rope,split_k", [(False, 1), (True, 1), (True, 4)])
def test_fused_kv_write_knob_serves_the_same_greedy_tokens_and_keeps_the_cache_right(
        small_llama_folder, monkeypatch, rope, split_k):
    # JAXLLM_ATTENTION_KNOBS={"fused_kv_write": true}: the decode-only steps of the Pallas
    # backend (interpreted here) write the new K/V inside the decode kernel instead of two
    # scatters a layer. Same tokens as the default path, over enough decode steps that every
    # step reads K/V the fused path wrote; prefill and mixed steps keep the scatter.
    # {"fused_qkv_rope": true} (rope): the decode kernel also applies rope to q and k, reading
    # the fused q/k/v projection's output as is; with "qkv_split_k": 4 (split_k) the q/k/v
    # GEMM's four split-K partial products, which the kernel sums.
    from jaxllm.models import attention

    # The baseline: both off (small decode steps take fused_qkv_rope unless told not to).
    monkeypatch.setenv(attention.ATTENTION_KNOBS_ENV, '{"fused_qkv_rope": false}')
    want = _pallas_greedy_tokens(small_llama_folder)
    fused_traces = fused_kv_write_on(monkeypatch, rope=rope, split_k=split_k)
    got = _pallas_greedy_tokens(small_llama_folder)
    assert fused_traces, "the decode-only steps did not take the fused path"
    assert set(fused_traces) == {split_k}
    assert got == want


def test_input_norm_folds_by_default_in_small_decode_steps_with_the_same_greedy_tokens(
        small_llama_folder, monkeypatch):
    # On the decode kernel's rope path, steps of <= FOLD_INPUT_NORM_MAX_TOKENS tokens fold the
    # layer's input RMSNorm by default (the q/k/v GEMM takes x * g, the kernel applies each
    # token's rsqrt(mean(x^2) + eps)): the same greedy tokens, in float32, as the norm kernel's
    # path ({"fold_input_norm": false}), and every decode-only step's kernel took x (this
    # engine's decode-only steps, of 2 sequences, run in 8-token buckets).
    import jax

    from jaxllm.models import attention

    assert attention.FOLD_INPUT_NORM_MAX_TOKENS >= 8
    base = '{"fused_qkv_rope": true, "qkv_split_k": 4'
    monkeypatch.setenv(attention.ATTENTION_KNOBS_ENV, base + ', "fold_input_norm": false}')
    want = _pallas_greedy_tokens(small_llama_folder)
    seen = []
    real = attention._paged_attention_rope
    monkeypatch.setattr(attention, "_paged_attention_rope", lambda *a, **k: (seen.append(
        (a[5].shape if len(a) > 5 and a[5] is not None else None, k.get("norm_eps"))),
        real(*a, **k))[1])
    monkeypatch.setenv(attention.ATTENTION_KNOBS_ENV, base + "}")
    jax.clear_caches()
    got = _pallas_greedy_tokens(small_llama_folder)
    assert seen and {(shape[1], eps) for shape, eps in seen} == {(64, 1e-5)}  # x [T, E], eps
    assert got == want
    assert not attention.qkv_norm_folds(attention.FOLD_INPUT_NORM_MAX_TOKENS + 1)


def test_mlp_kernel_knob_serves_the_same_greedy_tokens(small_llama_folder, monkeypatch):
    # JAXLLM_ATTENTION_KNOBS={"mlp_kernel": true}: every layer of the small steps runs its MLP's
    # RMSNorm, fused gate/up GEMM and SwiGLU as one Pallas kernel (interpreted here), then the
    # down GEMM. In float32 the greedy tokens equal the default path's, and every step of the
    # run (prompt chunks of <= 16 tokens, decode steps) took the kernel once a layer.
    import types

    import jax
    import jax.numpy as jnp

    from jaxllm.models import attention
    from pallas_kernels import fused_mlp

    assert attention.MLP_KERNEL_MAX_TOKENS >= 8
    monkeypatch.setenv(attention.ATTENTION_KNOBS_ENV, '{"mlp_kernel": false}')
    want = _pallas_greedy_tokens(small_llama_folder)
    seen = []
    real = fused_mlp.gate_up_swiglu
    monkeypatch.setattr(fused_mlp, "gate_up_swiglu",
                        lambda x, *a, **k: (seen.append((x.shape, k["eps"])), real(x, *a, **k))[1])
    monkeypatch.setenv(attention.ATTENTION_KNOBS_ENV, '{"mlp_kernel": true}')
    jax.clear_caches()
    got = _pallas_greedy_tokens(small_llama_folder)
    assert seen and {(shape[1], eps) for shape, eps in seen} == {(64, 1e-5)}  # x [T, E], eps
    assert got == want
    assert not attention.mlp_kernel_applies("xla", 8, fp8=False)  # the Pallas backend only
    assert not attention.mlp_kernel_applies("pallas", fused_mlp.MAX_ROWS + 1, fp8=False)
    # Unset, only dense weights on a GPU take it (the CPU here: none).
    monkeypatch.setenv(attention.ATTENTION_KNOBS_ENV, "")
    assert not attention.mlp_kernel_applies("pallas", 8, fp8=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention.mlp_kernel_applies("pallas", 8, fp8=False)
    assert not attention.mlp_kernel_applies("pallas", 8, fp8=True)
    assert not attention.mlp_kernel_applies("pallas", attention.MLP_KERNEL_MAX_TOKENS + 1,
                                            fp8=False)
    # A hidden size the kernel's blocks cannot tile keeps XLA's kernels (no error).
    from jaxllm.models.fused import FusedLinear
    from jaxllm.models.llama import LlamaMLP

    def ok(E):
        proj = FusedLinear(E, (64, 2), use_bias=False, dtype=jnp.float32)
        return LlamaMLP.kernel_ok(types.SimpleNamespace(gate_up_proj=proj, swiglu=True,
                                                        lora=None))

    assert not ok(40) and ok(48)
    # GeGLU (Gemma) keeps XLA's kernels: the kernel's epilogue is SiLU's
    proj = FusedLinear(48, (64, 2), use_bias=False, dtype=jnp.float32)
    assert not LlamaMLP.kernel_ok(types.SimpleNamespace(gate_up_proj=proj, swiglu=False,
                                                        lora=None))


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_throughput_benchmark_splits_the_run_by_step_kind(small_llm, async_scheduling):
    """benchmarks/offline_throughput.engine_generate(phases=...) counts every dispatched step
    once, as "mixed" (a prompt chunk) or "decode", its seconds adding up to the run's, with
    async and synchronous steps, and leaves the engine's dispatch as it was."""
    import importlib.util
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench_dir))
    try:
        spec = importlib.util.spec_from_file_location("offline_throughput",
                                                      bench_dir / "offline_throughput.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(bench_dir))
    engine = small_llm.llm_engine
    saved = engine.async_scheduling
    engine.async_scheduling = async_scheduling
    dispatched = []
    real_dispatch = engine._dispatch
    try:
        engine._dispatch = lambda sched, *a: dispatched.append(sched) or real_dispatch(sched, *a)
        rng = np.random.default_rng(5 + async_scheduling)  # fresh prompts: no prefix hits
        prompts = [rng.integers(0, 1000, size=30).tolist() for _ in range(4)]
        phases: dict = {}
        secs, n_out = mod.engine_generate(engine, prompts, 5, phases=phases)
        assert engine._dispatch.__name__ == "<lambda>"  # restored to what it was
    finally:
        del engine._dispatch
        engine.async_scheduling = saved
    assert n_out == 20
    kinds = ["mixed" if any(s.num_new_tokens > 1 for s in d.scheduled) else "decode"
             for d in dispatched]
    assert phases["mixed_steps"] == kinds.count("mixed") >= 4  # 120 prompt tokens, 32 a step
    assert phases["decode_steps"] == kinds.count("decode") >= 4
    assert 0 < phases["mixed_s"] + phases["decode_s"] <= secs + 1e-6


def _multi_step_llm(folder, on_launch, **kw) -> LLM:
    """LLM(folder) with num_scheduler_steps=4 and small_llm's shapes (``kw`` overrides), whose
    runner calls ``on_launch(inputs, num_steps)`` at every multi-step launch."""
    llm = LLM(str(folder), **{**dict(dtype="float32", max_model_len=160, page_size=8,
                                     num_pages=24, max_num_batched_tokens=32, max_num_seqs=8,
                                     seed=0, num_scheduler_steps=4), **kw})
    runner = llm.llm_engine.runner
    run_multi = runner.run_multi

    def spy(inputs, sort, num_steps):
        on_launch(inputs, num_steps)
        return run_multi(inputs, sort, num_steps)

    runner.run_multi = spy
    return llm


def test_multi_step_decode_serves_the_single_step_tokens_and_frees_every_page(
        small_llama_folder, small_llm):
    # num_scheduler_steps=4 (vLLM's multi-step scheduling): a batch of pure decodes runs 4
    # forward + sample steps in one program. Every user-visible result must equal one step per
    # launch: greedy and seeded sampling (the row's key follows its step), stops and max_tokens
    # inside a 4-step chunk (tokens past them dropped), rows that cannot run multi-step (min_tokens
    # still to reach, log-probs, penalties) mixed in, n > 1, DELTA streaming; no page leaks.
    launches = []
    llm = _multi_step_llm(small_llama_folder,
                          lambda inputs, k: launches.append((int(inputs.md.num_seqs[0]), k)))
    engine = llm.llm_engine
    runner = engine.runner
    assert runner.num_scheduler_steps == 4
    assert runner._multi._cache_size() == len(runner.multi_step_variants()) > 0
    vocab = engine.model_config.vocab_size
    compiled = runner._multi._cache_size()
    prompts = _random_prompts(6, vocab, seed=41, hi=30)
    stop_ids = list(range(0, vocab, 40))  # ~2.5% of the vocabulary: stops fall mid-chunk
    kinds = [
        SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True),
        SamplingParams(temperature=0.9, top_k=20, top_p=0.9, max_tokens=11, seed=5,
                       ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=30, seed=7, stop_token_ids=stop_ids),
        SamplingParams(n=2, temperature=1.0, max_tokens=9, seed=9, ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=10, seed=3, min_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0.5, max_tokens=7, seed=4, stop=["e"], ignore_eos=True),
    ]
    # Rows that need the host between tokens, or another sampler width (logit_bias): single
    # steps while they are in the batch.
    mixed_params = [kinds[0],
                    SamplingParams(temperature=0.7, max_tokens=9, seed=2, logprobs=2,
                                   ignore_eos=True),
                    SamplingParams(temperature=0.8, max_tokens=9, seed=1, presence_penalty=0.5,
                                   ignore_eos=True),
                    SamplingParams(temperature=0.9, max_tokens=16, seed=6, logit_bias={5: 4.0},
                                   ignore_eos=True)]
    outs = llm.generate(prompts, kinds, use_tqdm=False)
    mixed = llm.generate(prompts[:4], mixed_params, use_tqdm=False)
    small_llm.reset_prefix_cache()
    ref = small_llm.generate(prompts, kinds, use_tqdm=False)
    ref_mixed = small_llm.generate(prompts[:4], mixed_params, use_tqdm=False)

    def view(outputs):
        return [[(c.token_ids, c.finish_reason, c.text) for c in o.outputs] for o in outputs]

    assert view(outs) == view(ref)
    assert view(mixed) == view(ref_mixed)
    assert any(c[1] == "stop" for o in view(outs) for c in o)  # a stop fell inside the run
    assert launches and all(k == 4 for _, k in launches)
    assert max(n for n, _ in launches) >= 5  # most of the batch in one launch
    assert runner._multi._cache_size() == compiled  # compiled at start-up (penalty, bias and
    # ban widths compile sampler variants on first use, as with one step per launch)
    assert _pool_is_full(llm)

    # Streaming: DELTA outputs carry the chunk's tokens and add up to the final completion.
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    engine.add_request("delta", prompts[0], params)
    got = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            got += o.outputs[0].token_ids
    assert got == ref[0].outputs[0].token_ids[:10]
    assert _pool_is_full(llm)

    # Aborts while a multi-step launch is in flight give every page back.
    launches.clear()
    for i in range(3):
        engine.add_request(f"abort-{i}", prompts[i], SamplingParams(
            temperature=1.0, seed=i, max_tokens=25, ignore_eos=True))
    for step in range(6):
        engine.step()
        if step == 3:
            assert engine._inflight is not None and engine._inflight.num_steps == 4
            engine.abort_request("abort-1")
    while engine.has_unfinished_requests():
        engine.step()
    assert launches and _pool_is_full(llm)
    assert engine.scheduler.num_running == engine.scheduler.num_waiting == 0


def test_multi_step_decode_is_checked_and_keeps_to_max_model_len(small_llama_folder, small_llm):
    from jaxllm.config import EngineConfig

    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="num_scheduler_steps"):
            EngineConfig(num_scheduler_steps=bad)
    # A sequence that ends at max_model_len: the last steps cannot all fit a 4-step launch, so
    # they run one by one, and no K/V is written past max_model_len (no page beyond it).
    steps = []
    llm = _multi_step_llm(small_llama_folder, lambda inputs, k: steps.append(k),
                          max_model_len=40, num_pages=12, max_num_seqs=4)
    engine = llm.llm_engine
    out = llm.generate([{"prompt_token_ids": list(range(3, 33))}],
                       SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=None),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 10 and out.outputs[0].finish_reason == "length"
    assert steps == [4, 4]  # tokens 2-5 and 6-9; the 10th alone (4 would pass max_model_len)
    small_llm.reset_prefix_cache()
    assert out.outputs[0].token_ids == small_llm.generate(
        [{"prompt_token_ids": list(range(3, 33))}],
        SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=10),
        use_tqdm=False)[0].outputs[0].token_ids
    engine.add_request("long", {"prompt_token_ids": list(range(3, 33))},
                       SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=None))
    most_pages = 0
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:
            most_pages = max(most_pages, len(seq.page_ids))
    assert most_pages <= 40 // 8
    assert _pool_is_full(llm)
    # The runner refuses a multi-step launch of anything but a pure decode batch.
    runner = engine.runner
    with pytest.raises(ValueError, match="pure decode"):
        runner.run_multi(runner.prepare([], [], T=8, decode_only=False), False, 4)


def test_multi_step_decode_runs_while_every_slot_is_taken_and_admits_after(small_llama_folder,
                                                                          small_llm):
    # Requests waiting for a sequence slot (max_num_seqs reached) cannot be admitted before a
    # running one finishes, so a full batch still runs multi-step launches; a free slot with a
    # request waiting for it runs single steps (no admission is delayed). Same tokens as one step
    # a launch, no page leaks.
    seen = []
    llm = _multi_step_llm(small_llama_folder, lambda inputs, k: seen.append(
        (llm.llm_engine.scheduler.num_running, llm.llm_engine.scheduler.num_waiting)),
        max_num_seqs=2)
    prompts = _random_prompts(4, llm.llm_engine.model_config.vocab_size, seed=52, hi=20)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, max_tokens=6 + 3 * i,
                             ignore_eos=True) for i in range(4)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    small_llm.reset_prefix_cache()
    ref = small_llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    assert any(waiting for _, waiting in seen)  # launches with requests waiting for a slot
    assert all(running == 2 for running, waiting in seen if waiting)
    assert _pool_is_full(llm)


def test_a_chat_template_given_to_the_engine_replaces_the_tokenizers(small_llama_folder,
                                                                     tmp_path):
    # vLLM's --chat-template: a file's path or the template itself; a path that does not exist
    # is refused at construction; the flags reach the engine's config.
    kw = dict(dtype="float32", max_model_len=64, page_size=8, num_pages=16,
              max_num_batched_tokens=16, max_num_seqs=2, skip_compile_at_start=True)
    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    (tmp_path / "t.jinja").write_text(template.replace("<<", "[["))
    params = SamplingParams(max_tokens=1)
    msgs = [{"role": "user", "content": "hi"}]
    llm = LLM(str(small_llama_folder), chat_template=template, **kw)
    assert llm.chat(msgs, params, use_tqdm=False)[0].prompt == "<<hi>>"
    # vLLM's LLM.chat(tools=): the template sees them
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {}}}]
    llm.llm_engine.tokenizer.chat_template = (
        template + "{% for t in tools or [] %}(tool {{ t['function']['name'] }}){% endfor %}")
    assert llm.chat(msgs, params, use_tqdm=False, tools=tools)[0].prompt == (
        "<<hi>>(tool get_time)")
    llm = LLM(str(small_llama_folder), chat_template=str(tmp_path / "t.jinja"), **kw)
    assert llm.chat(msgs, params, use_tqdm=False)[0].prompt == "[[hi>>"
    with pytest.raises(ValueError, match="looks like a path"):
        LLM(str(small_llama_folder), chat_template=str(tmp_path / "missing.jinja"), **kw)
    got = cli_engine_kwargs("--chat-template", "t.jinja", "--tokenizer", "tok",
                            "--max-logprobs", "5")
    assert (got["chat_template"], got["tokenizer"], got["max_logprobs"]) == ("t.jinja", "tok", 5)
    got = cli_engine_kwargs()
    assert (got["chat_template"], got["tokenizer"], got["max_logprobs"]) == (None, None, 20)


def test_async_engine_answers_vllms_coroutines(small_llama_folder):
    import asyncio

    from jaxllm import AsyncEngine
    from jaxllm.engine.async_engine import EngineDeadError

    engine = AsyncEngine(model=str(small_llama_folder), dtype="float32", max_model_len=64,
                         page_size=8, num_pages=16, max_num_batched_tokens=16, max_num_seqs=2,
                         skip_compile_at_start=True)
    try:
        assert asyncio.run(engine.get_tokenizer()) is engine.tokenizer
        assert asyncio.run(engine.get_model_config()) is engine.model_config
        asyncio.run(engine.check_health())
    finally:
        engine.shutdown()
    with pytest.raises(EngineDeadError, match="not running"):
        asyncio.run(engine.check_health())


def test_vllms_names_for_the_page_size_and_count_are_taken(small_llama_folder):
    """vLLM's block_size / num_gpu_blocks_override (and their flags --block-size /
    --num-gpu-blocks-override) set page_size / num_pages, so its keyword arguments and command
    lines work as they are; set both ways differently, a ValueError names the clash. The
    engine built with them has those pages."""
    from jaxllm import LLM
    from jaxllm.config import EngineConfig

    c = EngineConfig(block_size=32, num_gpu_blocks_override=40)
    assert (c.page_size, c.num_pages, c.block_size, c.num_gpu_blocks_override) == (
        32, 40, None, None)
    assert EngineConfig(page_size=8, block_size=8).page_size == 8
    with pytest.raises(ValueError, match="block_size=32 and page_size=8 disagree"):
        EngineConfig(page_size=8, block_size=32)
    with pytest.raises(ValueError, match="num_gpu_blocks_override=4 and num_pages=8 disagree"):
        EngineConfig(num_pages=8, num_gpu_blocks_override=4)
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        EngineConfig(block_size=24)
    kw = cli_engine_kwargs("--block-size", "8", "--num-gpu-blocks-override", "24",
                           "--trust-remote-code")
    assert (kw["page_size"], kw["num_pages"]) == (8, 24)
    llm = LLM(str(small_llama_folder), dtype="float32", max_model_len=64, block_size=8,
              num_gpu_blocks_override=24, max_num_batched_tokens=64, max_num_seqs=4,
              skip_compile_at_start=True)
    pool = llm.llm_engine.page_pool
    assert llm.llm_engine.config.page_size == 8 and pool.num_usable_pages == 24


def test_token_counts_on_the_command_line_take_vllms_suffixes():
    """--max-model-len / --max-num-batched-tokens as vLLM reads them: k / m / g decimal, K / M /
    G binary; anything else is argparse's usage error, naming the value."""
    for text, want in (("8192", 8192), ("32k", 32000), ("32K", 32768), ("25.6k", 25600),
                       ("1m", 10 ** 6), ("1M", 2 ** 20), ("2G", 2 ** 31)):
        kw = cli_engine_kwargs("--max-model-len", text, "--max-num-batched-tokens", text)
        assert kw["max_model_len"] == kw["max_num_batched_tokens"] == want, text
    for bad in ("1.5K", "25.6505k", "lots", "8kk", "nank", ""):
        with pytest.raises(SystemExit):
            cli_engine_kwargs("--max-model-len", bad)


def test_sampling_params_come_one_for_all_or_one_per_prompt_in_any_iterable(small_llm):
    """generate's sampling_params: one for all, or one per prompt as a list, a tuple or any
    iterable (a generator too, as before the per-prompt helper); another count is a
    ValueError naming both counts, and nothing is left in the engine."""
    from jaxllm import SamplingParams

    prompts = [[5, 6, 7], [8, 9]]
    lens = (2, 3)
    per = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lens]
    for form in (per, tuple(per), (p for p in per)):
        outs = small_llm.generate(prompts, form, use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == list(lens)
    outs = small_llm.generate(prompts, per[0], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 2]
    with pytest.raises(ValueError, match="got 3 SamplingParams for 2 prompts"):
        small_llm.generate(prompts, per + per[:1], use_tqdm=False)
    assert not small_llm.llm_engine.has_unfinished_requests()
