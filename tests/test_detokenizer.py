"""Incremental detokenization and stop handling with the default model's real tokenizer."""

from pathlib import Path

import pytest

from jaxllm.engine.detokenizer import IncrementalDetokenizer, OutputProcessor
from jaxllm.engine.sequence import SequenceStatus
from jaxllm.outputs import Logprob
from jaxllm.sampling_params import SamplingParams

from .helpers import DEFAULT_GGUF, default_gguf_dir

EOS = 2  # <|im_end|>: SmolLM2-Instruct's end of turn


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer, through the loader's own cache of the converted tokenizer (parsing it
    out of the GGUF takes ~25 s; the cache is written atomically, so pytest-xdist workers that
    build it at once do not read each other's half-written files)."""
    from jaxllm.loading.gguf_loader import load_gguf_tokenizer

    tok = load_gguf_tokenizer(Path(default_gguf_dir()) / DEFAULT_GGUF)
    tok.clean_up_tokenization_spaces = False  # a no-op for BPE; silences transformers' warning
    return tok


TEXTS = [
    "héllo 😀 世界 ok",
    "Ünïcödé ✓ — naïve café, 日本語のテキスト 🇯🇵👩‍👩‍👧 end",
    "  leading spaces\n\nnew lines\ttabs  ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_decode_of_all_tokens_and_never_splits_a_character(tokenizer, text):
    ids = tokenizer.encode(text)
    det = IncrementalDetokenizer(tokenizer, tokenizer.encode("Say:"), SamplingParams())
    deltas = [det.append(t) for t in ids] + [det.flush()]
    assert "".join(deltas) == det.output_text == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_special_tokens_are_skipped_or_kept_like_decode(tokenizer):
    ids = tokenizer.encode("hi") + [EOS, 1] + tokenizer.encode(" there")
    for skip in (True, False):
        det = IncrementalDetokenizer(tokenizer, [1], SamplingParams(skip_special_tokens=skip))
        text = "".join(det.append(t) for t in ids) + det.flush()
        assert text == tokenizer.decode(ids, skip_special_tokens=skip)


def test_incomplete_character_at_the_end_is_flushed_as_decode_shows_it(tokenizer):
    ids = tokenizer.encode("a 😀")[:-1]  # cut inside the emoji's bytes
    det = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    text = "".join(det.append(t) for t in ids)
    assert "\ufffd" not in text
    assert text + det.flush() == tokenizer.decode(ids)


def run(tokenizer, text, params, eos=(EOS,), extra=()):
    """Feeds the tokens of text (+ extra ids) until finished; returns processor and deltas."""
    proc = OutputProcessor(tokenizer, tokenizer.encode("Q:"), params, eos)
    deltas = []
    for t in tokenizer.encode(text) + list(extra):
        res = proc.process(t)
        deltas.append(proc.get_output_text(delta=True))
        if res.finished:
            break
    return proc, deltas


def test_stop_string_across_token_boundaries_truncates_before_it(tokenizer):
    params = SamplingParams(stop=["STOP here"], max_tokens=100)
    proc, deltas = run(tokenizer, "one two STOP here three", params)
    assert proc.finished and proc.status is SequenceStatus.FINISHED_STOPPED
    assert proc.finish_reason == "stop" and proc.stop_reason == "STOP here"
    assert proc.output_text == "one two "
    assert "".join(deltas) == "one two "
    assert all("S" not in d for d in deltas)  # the partial stop string was never streamed


def test_include_stop_str_in_output_keeps_the_stop_string(tokenizer):
    params = SamplingParams(stop=["two"], include_stop_str_in_output=True, max_tokens=100)
    proc, deltas = run(tokenizer, "one twothree four", params)
    assert proc.output_text == "one two" and "".join(deltas) == "one two"
    assert proc.stop_reason == "two"


def test_earliest_of_several_stop_strings_wins(tokenizer):
    proc, _ = run(tokenizer, "alpha beta gamma", SamplingParams(stop=["gamma", "beta"]))
    assert proc.output_text == "alpha " and proc.stop_reason == "beta"


def test_held_back_text_is_released_when_the_stop_string_does_not_complete(tokenizer):
    params = SamplingParams(stop=["END!"], max_tokens=100)
    text = "the END is near, END not"
    proc, deltas = run(tokenizer, text, params)
    assert proc.finish_reason == "length" or not proc.finished
    proc2 = OutputProcessor(tokenizer, [], params, (EOS,))
    out = []
    for t in tokenizer.encode(text):
        proc2.process(t)
        if proc2.output_text.endswith(" END"):
            assert proc2.held_back_text_len == 3  # "END" could start "END!"
        out.append(proc2.get_output_text(delta=True))
    proc2.process(EOS)
    out.append(proc2.get_output_text(delta=True))
    assert "".join(out) == text and proc2.finish_reason == "stop" and proc2.stop_reason is None


def test_stop_token_id_sets_stop_reason_and_its_text_is_left_out(tokenizer):
    comma = tokenizer.encode(",")[0]
    proc, _ = run(tokenizer, "a, b", SamplingParams(stop_token_ids=[comma]))
    assert proc.stop_reason == comma and proc.finish_reason == "stop"
    assert proc.output_text == "a" and proc.output_token_ids[-1] == comma
    proc, _ = run(tokenizer, "a, b", SamplingParams(stop_token_ids=[comma],
                                                    include_stop_str_in_output=True))
    assert proc.output_text == "a,"


def test_eos_stops_with_no_stop_reason_unless_ignored(tokenizer):
    proc, _ = run(tokenizer, "hi", SamplingParams(), extra=[EOS, 100, 200])
    assert proc.finish_reason == "stop" and proc.stop_reason is None
    assert proc.output_token_ids[-1] == EOS and proc.output_text == "hi"
    proc, _ = run(tokenizer, "hi", SamplingParams(ignore_eos=True, max_tokens=4),
                  extra=[EOS, 100, 200])
    assert proc.finish_reason == "length" and len(proc.output_token_ids) == 4


def test_max_tokens_finishes_with_length(tokenizer):
    proc, deltas = run(tokenizer, "one two three four five six", SamplingParams(max_tokens=3))
    assert proc.finish_reason == "length" and proc.stop_reason is None
    assert proc.output_text == tokenizer.decode(proc.output_token_ids) == "".join(deltas)


def test_min_tokens_defers_eos_stop_ids_and_stop_strings(tokenizer):
    ids = tokenizer.encode("x")
    params = SamplingParams(min_tokens=3, stop=["x"], stop_token_ids=[5], max_tokens=10)
    proc = OutputProcessor(tokenizer, [], params, (EOS,))
    assert proc.banned_token_ids() == [EOS, 5]
    for t in (EOS, 5, ids[0]):  # tokens 1..3: nothing may stop the sequence yet
        assert not proc.process(t).finished
    assert proc.banned_token_ids() == []
    assert proc.process(ids[0]).finished and proc.stop_reason == "x"
    assert proc.output_text == "x"  # the first x was produced inside min_tokens
    assert OutputProcessor(tokenizer, [], SamplingParams(min_tokens=2, ignore_eos=True),
                           (EOS,)).banned_token_ids() == []


def test_logprobs_accumulate(tokenizer):
    proc = OutputProcessor(tokenizer, [], SamplingParams(logprobs=1), (EOS,))
    proc.process(10, {10: Logprob(-0.5, 1, "a"), 11: Logprob(-1.0, 2, "b")})
    proc.process(12, {12: Logprob(-0.25, 1, "c")})
    out = proc.completion_output()
    assert out.cumulative_logprob == pytest.approx(-0.75) and len(out.logprobs) == 2
    assert out.token_ids == [10, 12] and out.finish_reason is None and not out.finished()


def test_detokenize_false_produces_tokens_only(tokenizer):
    proc, _ = run(tokenizer, "hello world", SamplingParams(detokenize=False, max_tokens=2))
    assert proc.output_text == "" and len(proc.output_token_ids) == 2
