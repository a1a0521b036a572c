"""SamplingParams: vLLM's defaults, normalization and one clear error per invalid field."""

import dataclasses

import pytest

from jaxllm.sampling_params import RequestOutputKind, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.seed, p.logprobs, p.prompt_logprobs) == (16, 0, None, None, None)
    assert p.stop == [] and p.stop_token_ids == [] and p.logit_bias is None
    assert p.detokenize and p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert p.output_kind == RequestOutputKind.CUMULATIVE


@pytest.mark.parametrize("kwargs, field", [
    (dict(n=0), "n"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.1), "min_p"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(presence_penalty=-2.5), "presence_penalty"),
    (dict(frequency_penalty=2.1), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(logprobs=-2), "logprobs"),
    (dict(prompt_logprobs=-3), "prompt_logprobs"),
    (dict(stop=["ok", ""]), "stop"),
    (dict(stop="x", detokenize=False), "stop"),
    (dict(stop_token_ids=[1, "2"]), "stop_token_ids"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    (dict(truncate_prompt_tokens=-2), "truncate_prompt_tokens"),
    (dict(logit_bias={"a": 1.0}), "logit_bias"),
])
def test_invalid_value_raises_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_edges_of_the_allowed_ranges_are_accepted():
    SamplingParams(top_p=1.0, top_k=-1, min_p=1.0, presence_penalty=-2, frequency_penalty=2,
                   min_tokens=4, max_tokens=4, logprobs=0, temperature=0.0)
    SamplingParams(max_tokens=None, min_tokens=100)
    SamplingParams(truncate_prompt_tokens=-1)  # vLLM's "the model's max_model_len"


def test_normalization_of_stop_seed_logprobs_and_logit_bias():
    p = SamplingParams(stop="END", seed=-1, logprobs=True, logit_bias={"5": 1})
    assert p.stop == ["END"] and p.seed is None and p.logprobs == 1
    assert p.logit_bias == {5: 1.0}


def test_greedy_below_eps_neutralizes_truncation_and_tiny_temperatures_are_raised():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert p.is_greedy and (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)
    assert SamplingParams(temperature=1e-3).temperature == pytest.approx(1e-2)


def test_replace_revalidates():
    p = SamplingParams()
    assert dataclasses.replace(p, max_tokens=None).max_tokens is None
    with pytest.raises(ValueError, match="top_p"):
        dataclasses.replace(p, top_p=2.0)


def test_verify_for_model_checks_vocab_and_max_logprobs():
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={100: 1.0}).verify_for_model(vocab_size=100)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=30).verify_for_model(vocab_size=100, max_logprobs=20)
    SamplingParams(logit_bias={99: 1.0}, logprobs=20).verify_for_model(100, 20)
