"""Speculative decoding with n-gram drafts (engine/spec_decode.py): vLLM's config rules, the
proposer, and an engine that speculates serving exactly the tokens of one that does not."""

from __future__ import annotations

import re

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.engine.spec_decode import SpeculativeConfig, propose_ngram
from jaxllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from .helpers import cli_engine_kwargs, small_llama_folder  # noqa: F401

# A small pool and budget (as tests/test_engine.py's small_llm): chunked prefill and preemption
# happen in the batches below.
_KW = dict(dtype="float32", max_model_len=160, page_size=8, num_pages=24,
           max_num_batched_tokens=32, max_num_seqs=16, seed=0)
_SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def plain(small_llama_folder):
    return LLM(str(small_llama_folder), **_KW)


@pytest.fixture(scope="module")
def spec(small_llama_folder):
    return LLM(str(small_llama_folder), speculative_config=_SPEC, **_KW)


def _pool_is_full(llm: LLM) -> bool:
    pool = llm.llm_engine.page_pool
    return pool.num_free_pages == pool.num_usable_pages


def _view(outputs):
    return [([(c.token_ids, c.finish_reason, c.text,
               None if c.logprobs is None else [sorted(d.items()) for d in c.logprobs])
              for c in o.outputs],
             None if o.prompt_logprobs is None else [d and sorted(d.items())
                                                     for d in o.prompt_logprobs])
            for o in outputs]


def _repetitive_prompts(n: int, vocab: int, seed: int) -> list[dict]:
    """Prompts made of a short pattern repeated (n-gram lookup finds drafts in them), of
    varied lengths, with one long enough to be chunked."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        pattern = rng.integers(0, vocab, size=int(rng.integers(2, 7))).tolist()
        length = 90 if i == 0 else int(rng.integers(3, 50))
        prompts.append({"prompt_token_ids": (pattern * 40)[:length]})
    return prompts


def test_speculative_config_follows_vllms_rules():
    from jaxllm.config import EngineConfig

    cfg = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3})
    assert (cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (5, 5)  # vLLM's defaults
    cfg = SpeculativeConfig.from_dict({"model": "[ngram]", "num_speculative_tokens": 2,
                                       "prompt_lookup_max": 4})
    assert (cfg.method, cfg.prompt_lookup_min, cfg.prompt_lookup_max) == ("ngram", 4, 4)
    cfg = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2,
                                       "prompt_lookup_min": 2})
    assert (cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (2, 2)
    assert SpeculativeConfig.from_dict(None) is None
    assert SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2,
                                        "disable_by_batch_size": 8}).disable_by_batch_size == 8
    bad = [
        ({"method": "eagle", "num_speculative_tokens": 2}, "not supported"),
        ({"model": "some/draft-model", "num_speculative_tokens": 2}, "not supported"),
        ({"method": "ngram", "model": "some/draft", "num_speculative_tokens": 2}, "no model"),
        ({"method": "ngram"}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
          "prompt_lookup_max": 2}, "prompt_lookup_min=4 must be <="),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 0},
         "must be an integer > 0"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1,
          "prompt_lookup_max": 2.5}, "prompt_lookup_max=2.5"),
        ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1},
         "unsupported keys"),
        ("ngram", "must be a dict"),
        ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 1},
         "disable_by_batch_size must be an integer > 1"),
        ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 4.0},
         "disable_by_batch_size"),
    ]
    for config, match in bad:
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig.from_dict(config)
        with pytest.raises(ValueError, match=match):  # LLM(...) fails before loading anything
            EngineConfig(speculative_config=config)
    ngram = {"method": "ngram", "num_speculative_tokens": 2}
    with pytest.raises(ValueError, match="pipeline parallelism"):
        EngineConfig(speculative_config=ngram, pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="generating model"):
        EngineConfig(speculative_config=ngram, runner="pooling")
    kwargs = cli_engine_kwargs("--speculative-config",
                               '{"method": "ngram", "num_speculative_tokens": 3}')
    assert kwargs["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 3}
    assert cli_engine_kwargs()["speculative_config"] is None


def _reference_ngram(tokens, k, min_n, max_n):
    """propose_ngram's plain version: every window compared for each n, longest first."""
    L = len(tokens)
    if k <= 0 or L < min_n + 1:
        return []
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        hits = [h for h in range(L - n) if list(tokens[h:h + n]) == list(tokens[L - n:])]
        if hits:
            ext = list(tokens)
            start = hits[-1] + n
            for j in range(k):
                ext.append(ext[start + j])
            return ext[L:]
    return []


def test_ngram_drafts_match_the_plain_search_on_random_sequences():
    rng = np.random.default_rng(0)
    for trial in range(400):
        L = int(rng.integers(1, 60))
        vocab = int(rng.choice([2, 3, 5, 50]))  # small vocabularies: many matches
        toks = rng.integers(0, vocab, size=L).astype(np.int32)
        lo = int(rng.integers(1, 4))
        hi = lo + int(rng.integers(0, 4))
        k = int(rng.integers(0, 6))
        assert propose_ngram(toks, k, lo, hi) == _reference_ngram(toks, k, lo, hi), (
            toks.tolist(), k, lo, hi)


def test_ngram_drafts_continue_the_longest_latest_match():
    a = np.array
    # The longest suffix that occurred before wins: "3 4" (n = 2) over "4" (n = 1).
    toks = a([9, 4, 7, 3, 4, 5, 6, 1, 3, 4])
    assert propose_ngram(toks, 3, 1, 3) == [5, 6, 1]
    # Among occurrences of that suffix, the latest: "1 2" is followed by 8 last time.
    assert propose_ngram(a([1, 2, 7, 7, 1, 2, 8, 9, 1, 2]), 2, 2, 2) == [8, 9]
    # A continuation that reaches the end goes on with the draft itself: a repeating pattern
    # drafts k tokens, not its period.
    assert propose_ngram(a([5, 6, 5, 6, 5, 6]), 5, 2, 2) == [5, 6, 5, 6, 5]
    assert propose_ngram(a([7, 7, 7]), 4, 1, 1) == [7, 7, 7, 7]
    assert propose_ngram(a([1, 2, 3, 9, 1, 2]), 5, 2, 2) == [3, 9, 1, 2, 3]
    # No match of at least prompt_lookup_min tokens: no draft.
    assert propose_ngram(a([1, 2, 3, 4, 2, 9]), 3, 2, 3) == []
    assert propose_ngram(a([1, 2, 3, 1]), 3, 2, 3) == []
    assert propose_ngram(a([1, 2, 3, 1]), 3, 1, 3) == [2, 3, 1]
    # The draft is cut to k; k <= 0 or one token: none.
    assert propose_ngram(a([1, 2, 3, 4, 5, 1]), 2, 1, 1) == [2, 3]
    assert propose_ngram(a([1, 2, 3, 1]), 0, 1, 1) == []
    assert propose_ngram(a([1]), 3, 1, 1) == []


def test_speculative_decoding_serves_the_tokens_of_plain_decoding(plain, spec):
    # Each draft position is sampled with the key of the token it would be, so greedy and
    # seeded outputs equal plain decoding's token for token, whatever was accepted: greedy,
    # top-k/top-p, stops and max_tokens falling inside an accepted draft, stop strings, n > 1,
    # log-probs of every emitted token; drafted rows with penalties (each position's list has
    # the draft before it) and with min_tokens reached inside a draft (the bans stop there);
    # constrained rows (a grammar, allowed_token_ids) drafted within what the constraint
    # allows; chunked prefill and preemption (24 pages); prefix-cache hits on pages written
    # by speculative steps; every page back at the end.
    engine = spec.llm_engine
    assert engine.speculative.num_speculative_tokens == 4
    assert engine.async_scheduling  # steps without a draft in sight still overlap
    vocab = engine.model_config.vocab_size
    prompts = _repetitive_prompts(16, vocab, seed=3)
    stop_ids = list(range(0, vocab, 50))
    favourite = int(prompts[2]["prompt_token_ids"][0])
    (letter,) = spec.get_tokenizer().encode("a", add_special_tokens=False)
    kinds = [
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, prompt_logprobs=1),
        SamplingParams(temperature=0.9, top_k=20, top_p=0.9, max_tokens=17, seed=5,
                       ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=30, seed=7, stop_token_ids=stop_ids),
        SamplingParams(n=2, temperature=1.0, max_tokens=9, seed=9, ignore_eos=True),
        SamplingParams(temperature=0.7, max_tokens=11, seed=2, logprobs=2, ignore_eos=True),
        # A strong bias: the row repeats one token, every draft is accepted, and max_tokens
        # ends inside a 5-token step.
        SamplingParams(temperature=0.0, max_tokens=23, logit_bias={favourite: 100.0},
                       ignore_eos=True),
        SamplingParams(temperature=0.5, max_tokens=12, seed=4, stop=["e"], ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=10, seed=3, min_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0.8, max_tokens=9, seed=1, presence_penalty=0.5,
                       repetition_penalty=1.2, ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=12, seed=10,
                       structured_outputs=StructuredOutputsParams(regex="[a-z]{2,9}")),
        # A coin between two tokens: drafts from its own history, some accepted, some not.
        SamplingParams(temperature=1.0, max_tokens=40, seed=11, ignore_eos=True,
                       logit_bias={favourite: 100.0, favourite + 1: 100.0}),
        # The coin with penalties: a presence penalty of 0.3 still leaves the coin a coin.
        SamplingParams(temperature=1.0, max_tokens=30, seed=12, ignore_eos=True,
                       logit_bias={favourite: 100.0, favourite + 1: 100.0},
                       presence_penalty=0.3, frequency_penalty=0.1, repetition_penalty=1.1),
        # The coin with a stop token banned for 15 tokens: drafts cross min_tokens, and the
        # first coin flip to the stop token after it ends the row.
        SamplingParams(temperature=1.0, max_tokens=40, seed=13, min_tokens=15,
                       stop_token_ids=[favourite + 1],
                       logit_bias={favourite: 100.0, favourite + 1: 100.0}),
        # A grammar of 2-9 letters and a bias to "a": drafts of "a" are cut where the grammar
        # ends (9 letters), then only EOS is allowed.
        SamplingParams(temperature=0.0, max_tokens=20, logit_bias={letter: 100.0},
                       structured_outputs=StructuredOutputsParams(regex="[a-z]{2,9}")),
        # The coin as a constraint: allowed_token_ids.
        SamplingParams(temperature=1.0, max_tokens=25, seed=14, ignore_eos=True,
                       allowed_token_ids=[favourite, favourite + 1]),
    ]
    params = [kinds[i % len(kinds)] for i in range(len(prompts))]
    before = dict(engine.stats)
    preempted = engine.stats["num_preemptions"]
    drafted_rows = []  # (uses penalties, below min_tokens, constrained) of each drafted row
    overlapped = []  # per dispatch: whether a step was in flight (async scheduling)
    real_dispatch = engine.runner.dispatch

    def dispatch(scheduled, rows, **kw):
        drafted_rows.extend((s.seq.sampling_params.uses_penalties,
                             s.seq.num_output_tokens < s.seq.sampling_params.min_tokens,
                             s.seq.token_mask is not None)
                            for s in scheduled if s.num_spec)
        overlapped.append(engine._inflight is not None)
        return real_dispatch(scheduled, rows, **kw)

    engine.runner.dispatch = dispatch
    try:
        got = spec.generate(prompts, params, use_tqdm=False)
        engine.async_scheduling = False  # every step read back before the next schedule
        spec.reset_prefix_cache()
        synchronous = spec.generate(prompts, params, use_tqdm=False)
    finally:
        engine.async_scheduling = True
        del engine.runner.dispatch
    assert _pool_is_full(spec)
    assert all(any(row[j] for row in drafted_rows) for j in range(3))
    assert any(overlapped) and not all(overlapped)  # async steps and read-first ones both
    assert _view(synchronous) == _view(got)
    want = plain.generate(prompts, params, use_tqdm=False)
    assert _view(got) == _view(want)
    stats = engine.stats
    drafts = stats["spec_decode_num_drafts"] - before["spec_decode_num_drafts"]
    drafted = stats["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
    accepted = (stats["spec_decode_num_accepted_tokens"]
                - before["spec_decode_num_accepted_tokens"])
    assert drafts > 0 and 0 < accepted < drafted  # drafts accepted and rejected both
    # LLM.get_metrics(), as vLLM's speculative-decoding example reads it: the counters, and
    # accepted tokens by draft position (position j accepted only after j - 1: non-increasing).
    from jaxllm.metrics import Counter, Vector

    metrics = {m.name: m for m in spec.get_metrics()}
    assert isinstance(metrics["jaxllm:spec_decode_num_drafts"], Counter)
    assert metrics["jaxllm:spec_decode_num_accepted_tokens"].value == stats[
        "spec_decode_num_accepted_tokens"]
    per_pos = metrics["jaxllm:spec_decode_num_accepted_tokens_per_pos"]
    assert isinstance(per_pos, Vector) and len(per_pos.values) == 4
    assert sum(per_pos.values) == stats["spec_decode_num_accepted_tokens"]
    assert all(a >= b for a, b in zip(per_pos.values, per_pos.values[1:]))
    assert per_pos.values[0] <= stats["spec_decode_num_drafts"]
    assert metrics["jaxllm:generation_tokens"].value == stats["generation_tokens"]
    assert "jaxllm:spec_decode_num_drafts" not in {m.name for m in plain.get_metrics()}
    assert stats["num_preemptions"] > preempted
    biased = got[5].outputs[0]
    assert biased.token_ids == [favourite] * 23 and biased.finish_reason == "length"
    assert any(c[1] == "stop" for o, _ in _view(got) for c in o)
    assert got[0].prompt_logprobs is not None
    assert got[13].outputs[0].text == "a" * 9 and got[13].outputs[0].finish_reason == "stop"
    banned = got[12].outputs[0]  # the coin with min_tokens: stopped by the coin, not before 15
    assert banned.finish_reason == "stop" and 15 <= len(banned.token_ids) < 40
    assert banned.token_ids[:15] == [favourite] * 15

    # Again: the prompts' pages (and the generated ones, registered as they filled during
    # speculative steps) are hit in the prefix cache, and must hold the right K/V.
    hits = stats["prefix_cache_hits"]
    again = spec.generate(prompts, params, use_tqdm=False)
    assert engine.stats["prefix_cache_hits"] > hits
    assert _view(again) == _view(want)
    assert _pool_is_full(spec)


def test_speculative_steps_stream_abort_and_keep_to_the_limits(small_llama_folder, spec):
    engine = spec.llm_engine
    vocab = engine.model_config.vocab_size
    prompts = _repetitive_prompts(4, vocab, seed=8)
    tok = int(prompts[1]["prompt_token_ids"][0])
    repeat = dict(temperature=0.0, logit_bias={tok: 100.0}, ignore_eos=True)

    # What each step computes: no K/V at or past max_model_len, at most max_num_seqs sampled
    # rows (each draft position is one), drafts only on decodes.
    steps = []
    real_dispatch = engine.runner.dispatch

    def dispatch(scheduled, rows, **kw):
        steps.append([(s.start_pos, s.num_new_tokens, s.num_spec) for s in scheduled])
        assert len(rows) == sum(1 + s.num_spec for s in scheduled)
        return real_dispatch(scheduled, rows, **kw)

    engine.runner.dispatch = dispatch
    try:
        # A prompt ending 7 tokens before max_model_len: the last steps' drafts are cut so the
        # sequence stops at max_model_len exactly.
        near = {"prompt_token_ids": (prompts[1]["prompt_token_ids"] * 40)[:153]}
        out = spec.generate([near], SamplingParams(max_tokens=None, **repeat),
                            use_tqdm=False)[0].outputs[0]
        assert out.token_ids == [tok] * 7 and out.finish_reason == "length"
        assert all(start + n <= 159 for step in steps for start, n, _ in step)
        assert any(k for step in steps for _, _, k in step)

        # Streaming: DELTA outputs carry each step's accepted tokens in order.
        params = SamplingParams(max_tokens=19, output_kind=RequestOutputKind.DELTA, **repeat)
        engine.add_request("delta", prompts[0], params)
        got, sizes = [], []
        while engine.has_unfinished_requests():
            for o in engine.step():
                got += o.outputs[0].token_ids
                sizes.append(len(o.outputs[0].token_ids))
        assert got == [tok] * 19 and max(sizes) == 5  # the token and 4 accepted drafts

        # Slots: 16 running sequences leave no slot for a draft.
        steps.clear()
        many = [SamplingParams(max_tokens=12, **repeat)] * 16
        outs = spec.generate([prompts[i % 4] for i in range(16)], many, use_tqdm=False)
        assert all(o.outputs[0].token_ids == [tok] * 12 for o in outs)
        assert all(len(step) + sum(k for _, _, k in step) <= 16 for step in steps)

        # A draft left on a sequence is never scheduled behind a step in flight (its tokens
        # are not known; a late-sampled step could not expand its rows).
        engine.add_request("stale", prompts[2], SamplingParams(temperature=1.0, seed=1,
                                                               max_tokens=12, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
            if engine._inflight is not None:
                for seq in engine.scheduler.running:
                    seq.spec_token_ids = [tok, tok]
                steps.clear()
                engine.step()
                assert steps and not any(k for step in steps for _, _, k in step)

        # Aborts between speculative steps give every page back.
        for i in range(3):
            engine.add_request(f"abort-{i}", prompts[i], SamplingParams(max_tokens=40, **repeat))
        for step in range(4):
            engine.step()
            if step == 2:
                engine.abort_request("abort-1")
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        del engine.runner.dispatch
    assert _pool_is_full(spec)
    assert engine.scheduler.num_running == engine.scheduler.num_waiting == 0


def test_server_metrics_export_the_speculative_counters():
    from prometheus_client import generate_latest

    from server.metrics import ServerMetrics

    class _Engine:
        stats = {"num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0}

        def get_stats(self):
            return dict(self.stats)

    engine = _Engine()
    text = generate_latest(ServerMetrics(engine, "m").registry).decode()
    assert "spec_decode" not in text  # only with a speculative config, as vLLM
    engine.stats.update(spec_decode_num_drafts=3, spec_decode_num_draft_tokens=12,
                        spec_decode_num_accepted_tokens=7,
                        spec_decode_num_accepted_tokens_per_pos=[3, 3, 1, 0])
    text = generate_latest(ServerMetrics(engine, "m").registry).decode()
    assert ('jaxllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="2"}'
            ' 1.0') in text
    assert 'jaxllm:spec_decode_num_draft_tokens_total{model_name="m"} 12.0' in text
    assert 'jaxllm:spec_decode_num_accepted_tokens_total{model_name="m"} 7.0' in text
    assert 'jaxllm:spec_decode_num_drafts_total{model_name="m"} 3.0' in text


def test_a_constraint_cuts_a_draft_where_it_stops_allowing_it():
    from jaxllm.engine.structured_output import TokenMask, ids_to_bitmask

    allowed = TokenMask(None, None, ids_to_bitmask([3, 4, 40], 64))
    assert allowed.draft_prefix([3, 40, 4, 5, 3]) == 3
    assert allowed.draft_prefix([7]) == 0
    # Bad word "1 2 9": 9 is banned right after 1 2, in the draft too; the state is unchanged.
    bad = TokenMask(None, None, None, bad_words=(((1, 2), 9),), recent=[5, 1])
    assert bad.draft_prefix([2, 9, 1]) == 1
    assert bad.draft_prefix([3, 9, 1, 2, 9]) == 4
    assert bad.recent == [5, 1]
    thinking = TokenMask(None, None, None, start_after=77)
    assert thinking.draft_prefix([1, 2]) == 0


def test_the_server_streams_speculative_steps_and_counts_them(small_llama_folder):
    # `jaxllm serve --speculative-config ...` end to end: the OpenAI SDK streams a completion
    # whose steps emit several tokens at once; the text and usage match the unstreamed
    # request's, and /metrics counts the drafts.
    import openai

    from jaxllm import AsyncEngine
    from server.app import build_app

    from .test_server import _Servers

    engine = AsyncEngine(model=str(small_llama_folder), speculative_config=_SPEC, **_KW)
    servers = _Servers()
    try:
        base = servers.start(build_app(engine, served_model_name="spec"))
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        prompt = [5, 6, 7, 5, 6, 7, 5, 6]
        kw = dict(model="spec", prompt=prompt, max_tokens=21, temperature=0.0,
                  logit_bias={"7": 100})
        whole = client.completions.create(**kw)
        chunks = list(client.completions.create(**kw, stream=True,
                                                stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == whole.choices[0].text
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 21
        assert len([c for c in chunks if c.choices and c.choices[0].text]) < 21  # batched
        metrics = openai.OpenAI(base_url=base, api_key="unused").get(
            "/metrics", cast_to=str)
        drafted = re.search(r'spec_decode_num_accepted_tokens_total\{[^}]*\} (\S+)', metrics)
        assert drafted and float(drafted.group(1)) >= 16
    finally:
        servers.close()
        engine.shutdown()


def test_speculation_mixes_with_multi_step_launches(small_llama_folder, plain):
    # num_scheduler_steps=4 with a speculative config: batches without a draft in sight run
    # 4-step launches (left in flight, async), the others speculative steps; the tokens are
    # still plain decoding's.
    llm = LLM(str(small_llama_folder), speculative_config=_SPEC, num_scheduler_steps=4, **_KW)
    vocab = llm.llm_engine.model_config.vocab_size
    prompts = _repetitive_prompts(6, vocab, seed=5)
    fav = int(prompts[2]["prompt_token_ids"][0])
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=30, ignore_eos=True,
                             logit_bias={fav: 100.0, fav + 1: 100.0} if i % 2 else None)
              for i in range(6)]
    launches = []
    runner = llm.llm_engine.runner
    real = runner.run_multi
    runner.run_multi = lambda *a, **k: launches.append(1) or real(*a, **k)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert _view(got) == _view(plain.generate(prompts, params, use_tqdm=False))
    assert launches and llm.llm_engine.stats["spec_decode_num_accepted_tokens"] > 0
    assert _pool_is_full(llm)


def test_disable_by_batch_size_drafts_only_below_it(spec):
    # vLLM's disable_by_batch_size: no drafts while running + waiting sequences reach it.
    import dataclasses

    engine = spec.llm_engine
    vocab = engine.model_config.vocab_size
    prompts = _repetitive_prompts(4, vocab, seed=9)
    tok = int(prompts[0]["prompt_token_ids"][0])
    params = [SamplingParams(temperature=0.0, max_tokens=n, logit_bias={tok: 100.0},
                             ignore_eos=True) for n in (6, 12, 30, 40)]
    calls = []  # (running + waiting, whether a draft was set) of each proposal
    real = engine._propose_drafts

    def propose(dry=False):
        found = real(dry)
        if not dry:
            calls.append((engine.scheduler.num_running + engine.scheduler.num_waiting, found))
        return found

    engine._propose_drafts = propose
    original = engine.speculative
    engine.speculative = dataclasses.replace(original, disable_by_batch_size=3)
    try:
        outs = spec.generate(prompts, params, use_tqdm=False)
    finally:
        engine.speculative = original
        del engine._propose_drafts
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, 12, 30, 40]
    assert not any(found for n, found in calls if n >= 3)
    assert any(found for n, found in calls if n < 3)
    assert _pool_is_full(spec)


def test_data_parallel_replicas_sum_the_counters_position_by_position():
    from types import SimpleNamespace

    from jaxllm.engine.data_parallel import DataParallelEngine

    dp = DataParallelEngine.__new__(DataParallelEngine)
    dp.engines = [SimpleNamespace(stats={"generation_tokens": 5, "spec_decode_num_drafts": 2,
                                         "spec_decode_num_accepted_tokens_per_pos": [2, 1, 0]}),
                  SimpleNamespace(stats={"generation_tokens": 7, "spec_decode_num_drafts": 1,
                                         "spec_decode_num_accepted_tokens_per_pos": [1, 1, 1]})]
    assert dp.stats == {"generation_tokens": 12, "spec_decode_num_drafts": 3,
                        "spec_decode_num_accepted_tokens_per_pos": [3, 2, 1]}
