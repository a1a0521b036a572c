"""The model's generation_config.json, read as vLLM reads it (jaxllm/loading/generation_config.py):
its sampling defaults for LLM.generate and for the server's fields not sent, the server's
max_tokens cap, its extra EOS ids as stop tokens, and the "vllm" / path / override settings."""

from __future__ import annotations

import json
import shutil

import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.loading import generation_config as gc

from .helpers import cli_engine_kwargs, small_llama_folder  # noqa: F401

KW = dict(dtype="float32", max_model_len=64, page_size=8, num_pages=16,
          max_num_batched_tokens=16, max_num_seqs=2, skip_compile_at_start=True)
PROMPT = {"prompt_token_ids": [11, 12, 13, 14, 15, 16]}


def _folder_with(src, dst, fields):
    """A copy of the model folder ``src`` with ``fields`` as its generation_config.json."""
    shutil.copytree(src, dst)
    (dst / gc.FILE).unlink(missing_ok=True)
    if fields is not None:
        (dst / gc.FILE).write_text(json.dumps(fields))
    return dst


def _greedy(llm, params=None):
    return llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]


def test_reading_the_file_keeps_the_sampling_fields_and_eos_ids(tmp_path):
    (tmp_path / gc.FILE).write_text(json.dumps({
        "bos_token_id": 1, "eos_token_id": [2, 7], "do_sample": True, "temperature": 0.6,
        "top_p": 0.9, "max_new_tokens": 5, "transformers_version": "4.40.0"}))
    fields = gc.read_generation_config(tmp_path)
    assert gc.sampling_defaults(fields, "auto", None) == {
        "temperature": 0.6, "top_p": 0.9, "max_tokens": 5}
    assert gc.sampling_defaults(fields, "vllm", None) == {}
    assert gc.sampling_defaults(fields, "vllm", {"top_k": 3}) == {"top_k": 3}
    assert gc.sampling_defaults(fields, "auto", {"temperature": 0.2, "top_p": None}) == {
        "temperature": 0.2, "max_tokens": 5}
    assert gc.eos_token_ids(fields) == {2, 7}
    assert gc.eos_token_ids({"eos_token_id": 9}) == {9}
    assert gc.read_generation_config(tmp_path / "nothing-here") == {}
    (tmp_path / gc.FILE).write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        gc.read_generation_config(tmp_path)


def test_bad_settings_are_refused_at_construction(small_llama_folder, tmp_path):
    with pytest.raises(ValueError, match="generation_config must be 'auto'"):
        LLM(str(small_llama_folder), generation_config=str(tmp_path), **KW)
    with pytest.raises(ValueError, match="override_generation_config must be a dict"):
        LLM(str(small_llama_folder), override_generation_config="temperature=0", **KW)
    bad = _folder_with(small_llama_folder, tmp_path / "bad", {"temperature": -1.0})
    with pytest.raises(ValueError, match="sampling defaults .* are not valid"):
        LLM(str(bad), **KW)


def test_the_models_generation_config_sets_defaults_and_stops_at_its_eos(small_llama_folder,
                                                                         tmp_path):
    plain = LLM(str(small_llama_folder), **KW)
    assert plain.get_default_sampling_params() == SamplingParams()
    free = _greedy(plain, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    # An end-of-turn id the file adds: a token the greedy run makes, not its first.
    i = next(j for j in range(1, 4) if free.token_ids[j] not in free.token_ids[:j])
    eot = free.token_ids[i]
    folder = _folder_with(small_llama_folder, tmp_path / "m", {
        "eos_token_id": [2, eot], "temperature": 0.0, "max_new_tokens": 5})

    llm = LLM(str(folder), **KW)
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, max_tokens=5)
    out = _greedy(llm)  # no SamplingParams: the file's greedy decoding, ending at its EOS id
    assert out.token_ids == free.token_ids[:i + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", eot)
    # ignore_eos turns the file's EOS ids off as it does the model's.
    out = _greedy(llm, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert out.token_ids == free.token_ids
    # A caller's own stop tokens stay beside the file's.
    out = _greedy(llm, SamplingParams(temperature=0.0, max_tokens=8,
                                      stop_token_ids=[free.token_ids[0]]))
    assert out.token_ids == free.token_ids[:1] and out.stop_reason == free.token_ids[0]
    assert llm.llm_engine.page_pool.num_free_pages == llm.llm_engine.page_pool.num_usable_pages

    # "vllm": the neutral sampling defaults, the file's EOS ids still stop.
    neutral = LLM(str(folder), generation_config="vllm", **KW)
    assert neutral.get_default_sampling_params() == SamplingParams()
    out = _greedy(neutral, SamplingParams(temperature=0.0, max_tokens=8))
    assert out.token_ids == free.token_ids[:i + 1] and out.stop_reason == eot
    # An override wins over the file; a folder path reads that folder's file instead.
    assert LLM(str(folder), override_generation_config={"temperature": 0.7}, **KW
               ).get_default_sampling_params() == SamplingParams(temperature=0.7, max_tokens=5)
    other = _folder_with(small_llama_folder, tmp_path / "other", {"top_k": 4})
    assert LLM(str(folder), generation_config=str(other), **KW
               ).get_default_sampling_params() == SamplingParams(top_k=4)


def test_the_server_fills_fields_not_sent_and_caps_max_tokens(small_llama_folder, tmp_path):
    import asyncio

    from jaxllm import AsyncEngine
    from server import protocol as P
    from server.app import Call, OpenAIServer

    folder = _folder_with(small_llama_folder, tmp_path / "m", {
        "temperature": 0.8, "top_p": 0.5, "max_new_tokens": 3})
    engine = AsyncEngine(model=str(folder), **KW)
    try:
        srv = OpenAIServer(engine, api_key=None, served_model_names=["m"],
                           max_request_bytes=1 << 20, max_concurrent_requests=8,
                           log_stats_interval=None)
        params = srv._sampling_params(P.CompletionRequest(prompt="hi"), max_tokens=100,
                                      logprobs=None)
        assert (params.temperature, params.top_p, params.max_tokens) == (0.8, 0.5, 3)
        sent = P.CompletionRequest(prompt="hi", temperature=0.9, top_p=1.0)
        params = srv._sampling_params(sent, max_tokens=2, logprobs=None)
        assert (params.temperature, params.top_p, params.max_tokens) == (0.9, 1.0, 2)
        params = srv._sampling_params(P.CompletionRequest(prompt="hi"), max_tokens=None,
                                      logprobs=None)
        assert params.max_tokens == 3  # a chat request without max_tokens: the cap

        async def complete(body):
            reply = await srv.handle(Call("POST", "/v1/completions", {}, json.dumps(body)))
            await reply.aclose()
            return reply.status, json.loads(reply.body)

        status, body = asyncio.run(complete({"prompt": [11, 12, 13], "max_tokens": 50,
                                             "ignore_eos": True}))
        assert status == 200 and body["usage"]["completion_tokens"] == 3
        assert body["choices"][0]["finish_reason"] == "length"
    finally:
        engine.shutdown()


def test_serve_flags_reach_the_engine_config():
    kw = cli_engine_kwargs()
    assert (kw["generation_config"], kw["override_generation_config"]) == ("auto", None)
    kw = cli_engine_kwargs("--generation-config", "vllm", "--override-generation-config",
                           '{"temperature": 0.5}')
    assert (kw["generation_config"], kw["override_generation_config"]) == (
        "vllm", {"temperature": 0.5})
    for bad in ("{temperature: 0.5}", "[1]"):
        with pytest.raises(SystemExit):
            cli_engine_kwargs("--override-generation-config", bad)
