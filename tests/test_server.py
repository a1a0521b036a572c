"""The OpenAI-compatible server, driven over real HTTP on 127.0.0.1 by the official openai SDK (sync
and async) and by raw aiohttp for the error cases.

One AsyncEngine on a small random Llama serves every test (one compiled bucket, so start-up is
quick); the apps run on an event loop in a background thread, as a deployed server would.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import aiohttp
import openai
import pytest
from aiohttp import web

from server.app import SERVER_KEY, ServerOptions, build_app

from .helpers import small_llama_folder  # noqa: F401  (fixture)

MODEL = "tiny-llama"
API_KEY = "sk-test-key"


class _Servers:
    """aiohttp apps on free ports, served by an event loop in a background thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners = []

    def run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, app: web.Application) -> str:
        async def go():
            runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self.runners.append(runner)
            return runner.addresses[0][1]

        return f"http://127.0.0.1:{self.run(go())}"

    def close(self):
        for r in self.runners:
            self.run(r.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def engine(small_llama_folder):
    from jaxllm import AsyncEngine

    eng = AsyncEngine(model=str(small_llama_folder), dtype="float32", max_model_len=256,
                      page_size=8, num_pages=128, max_num_batched_tokens=64, max_num_seqs=8,
                      token_buckets=(64,))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def servers(engine):
    s = _Servers()
    s.main = s.start(build_app(engine, served_model_name=MODEL))
    # A second app on the same engine with tight limits and a key, for 401 / 413 / 429.
    s.tight = s.start(build_app(engine, served_model_name=MODEL, api_key=API_KEY,
                                max_request_bytes=4096, max_concurrent_requests=1))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(servers):
    return openai.OpenAI(base_url=servers.main + "/v1", api_key="unused", max_retries=0)


def _pool_full(engine) -> bool:
    pool = engine.engine.page_pool
    return pool.num_free_pages == pool.num_usable_pages


def _wait_idle(engine, timeout=10.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = engine.get_stats()
        if s["num_running"] == 0 and s["num_waiting"] == 0 and _pool_full(engine):
            return
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {engine.get_stats()}")


def _post(servers, path, body=None, *, base=None, data=None, headers=None, method="POST"):
    """Raw HTTP: returns (status, headers, parsed JSON or text)."""
    async def go():
        async with aiohttp.ClientSession() as s:
            kw = {"json": body} if data is None else {"data": data}
            async with s.request(method, (base or servers.main) + path, headers=headers,
                                 **kw) as r:
                text = await r.text()
                try:
                    return r.status, r.headers, json.loads(text)
                except ValueError:
                    return r.status, r.headers, text

    return asyncio.run(go())


# -- models, completions, chat --------------------------------------------------------------------
def test_models_lists_the_served_name_with_its_context_length(client, engine):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["max_model_len"] == engine.max_model_len


def test_models_retrieve_gives_each_served_name_its_card_and_404_for_others(servers, engine):
    from server.app import Call

    # Served names with a slash, as hub ids have: the SDK puts the id in the path as it is.
    base = servers.start(build_app(engine, served_model_name=["org/tiny-llama", MODEL]))
    c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    for name in ("org/tiny-llama", MODEL):
        card = c.models.retrieve(name)
        assert card.id == name and card.model_extra["max_model_len"] == engine.max_model_len
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("other-model")
    assert e.value.body["code"] == "model_not_found" and "org/tiny-llama" in e.value.message
    status, _, body = _post(servers, "/v1/models/", method="GET", base=base)
    assert status == 404 and body["error"]["code"] == "not_found"
    status, headers, _ = _post(servers, "/v1/models/" + MODEL, {}, base=base)
    assert status == 405 and "GET" in headers["Allow"].split(",")
    # The front end without a router of its own (Ray Serve) routes by the same table.
    srv = build_app(engine, served_model_name=["org/tiny-llama"])[SERVER_KEY]
    for path, status, key in (("/v1/models/org/tiny-llama", 200, "id"),
                              ("/v1/models/nope", 404, "error")):
        reply = servers.run(srv.handle(Call("GET", path, {})))
        servers.run(reply.aclose())
        assert reply.status == status and key in json.loads(reply.body)
    assert json.loads(reply.body)["error"]["code"] == "model_not_found"


def test_completion_reports_usage_and_length_finish(client, engine):
    r = client.completions.create(model=MODEL, prompt="Hello, my name is", max_tokens=5,
                                  temperature=0.0, extra_body={"ignore_eos": True})
    n_prompt = len(engine.tokenizer("Hello, my name is").input_ids)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == 5 and r.usage.total_tokens == n_prompt + 5
    assert isinstance(r.choices[0].text, str)


def test_completion_accepts_token_ids_and_lists_of_prompts_with_echo(client):
    r = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=3,
                                  temperature=0.0, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 6
    e = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=3, echo=True,
                                  temperature=0.0, extra_body={"ignore_eos": True})
    assert e.choices[0].text.startswith("The sky is")


def test_truncate_prompt_tokens_runs_and_counts_the_prompts_last_tokens(client):
    kw = dict(model=MODEL, max_tokens=3, temperature=0.0, extra_body={"ignore_eos": True})
    ids = list(range(300, 320))
    cut = client.completions.create(prompt=ids, echo=True, **{
        **kw, "extra_body": {"ignore_eos": True, "truncate_prompt_tokens": 5}})
    alone = client.completions.create(prompt=ids[-5:], echo=True, **kw)
    assert cut.usage.prompt_tokens == 5 and cut.choices[0].text == alone.choices[0].text
    msgs = [{"role": "user", "content": "Tell me about the sea, please."}]
    full = client.chat.completions.create(messages=msgs, **kw)
    chat = client.chat.completions.create(messages=msgs, **{
        **kw, "extra_body": {"ignore_eos": True, "truncate_prompt_tokens": 4}})
    assert full.usage.prompt_tokens > 4 and chat.usage.prompt_tokens == 4


def test_chat_completion_applies_the_template_and_counts_usage(client, engine):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=4,
                                       temperature=0.0, extra_body={"ignore_eos": True})
    expected = engine.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                    add_generation_prompt=True)
    n_prompt = len(engine.tokenizer(expected, add_special_tokens=False).input_ids)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == 4
    # max_tokens (deprecated) works too
    r2 = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2,
                                        temperature=0.0, extra_body={"ignore_eos": True})
    assert r2.usage.completion_tokens == 2
    assert r.choices[0].message.content.startswith(r2.choices[0].message.content)


def test_stop_string_ends_the_completion_with_stop_reason(client):
    base = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12,
                                     temperature=0.0, extra_body={"ignore_eos": True})
    text = base.choices[0].text
    # greedy on the fixed random model: deterministic, and long enough to cut (a check that
    # fails here, rather than a skip, if the fixture ever changes)
    assert len(text.strip()) >= 3, text
    stop = text.strip()[:3]
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12,
                                  temperature=0.0, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop
    assert stop not in r.choices[0].text
    assert r.choices[0].text == text[:text.index(stop)]


def test_n_and_seed_give_distinct_yet_reproducible_samples(client):
    kw = dict(model=MODEL, prompt="Tell me", max_tokens=6, n=2, temperature=1.0, seed=42,
              extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == 12


def test_completion_logprobs_have_one_entry_per_token(client):
    r = client.completions.create(model=MODEL, prompt="Logprobs", max_tokens=4, logprobs=3,
                                  temperature=0.0, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert len(lp.text_offset) == 4 and lp.text_offset[0] == 0
    for tok, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert v <= 0.0 and 3 <= len(top) <= 4 and tok in top
        assert abs(top[tok] - v) < 1e-6 and v >= max(top.values()) - 1e-5  # greedy: the argmax


def test_chat_logprobs_have_top_logprobs_in_rank_order(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=3, logprobs=True, top_logprobs=2,
                                       temperature=0.0, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.bytes == list(entry.token.encode())
        assert entry.token == entry.top_logprobs[0].token  # greedy


# -- streaming ------------------------------------------------------------------------------------
def test_streamed_completion_matches_the_full_one_and_reports_usage(client):
    kw = dict(model=MODEL, prompt="Streaming test", max_tokens=6, temperature=0.0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True,
                                            stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_streamed_chat_with_n_2_tags_chunks_by_index_and_ends_with_done(servers):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "n": 2, "temperature": 1.0, "seed": 3, "ignore_eos": True, "stream": True}

    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.post(servers.main + "/v1/chat/completions", json=body) as r:
                assert r.headers["Content-Type"].startswith("text/event-stream")
                return (await r.text()).split("\n\n")

    events = [e for e in asyncio.run(go()) if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    text = {0: "", 1: ""}
    finishes = {0: [], 1: []}
    deltas = {0: [], 1: []}
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        for ch in c["choices"]:
            deltas[ch["index"]].append(ch["delta"])
            text[ch["index"]] += ch["delta"].get("content") or ""
            if ch["finish_reason"]:
                finishes[ch["index"]].append(ch["finish_reason"])
    # Each choice opens with the role; later deltas leave the key out (OpenAI's, not null).
    for first, *rest in deltas.values():
        assert first["role"] == "assistant" and rest and all("role" not in d for d in rest)
    assert finishes == {0: ["length"], 1: ["length"]}
    assert text[0] and text[1]


def test_async_client_streams_chat_deltas(servers):
    async def go():
        c = openai.AsyncOpenAI(base_url=servers.main + "/v1", api_key="x", max_retries=0)
        parts = []
        stream = await c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=5,
            temperature=0.0, stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        full = await c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=5,
            temperature=0.0, extra_body={"ignore_eos": True})
        await c.close()
        return "".join(parts), full.choices[0].message.content

    streamed, full = asyncio.run(go())
    assert streamed == full


def test_client_disconnect_mid_stream_aborts_and_frees_pages(servers, engine):
    _wait_idle(engine)

    async def go():
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": "a long story", "max_tokens": 200,
                    "ignore_eos": True, "stream": True}
            resps = [await s.post(servers.main + "/v1/completions", json=body) for _ in range(3)]
            for r in resps:  # read one chunk each, so the requests are surely running
                await r.content.readline()
            assert engine.get_stats()["num_running"] + engine.get_stats()["num_waiting"] >= 1
            for r in resps:
                r.close()  # drop the connection mid-stream

    asyncio.run(go())
    _wait_idle(engine, timeout=10)
    assert engine.get_stats()["generation_tokens"] < 10_000  # sanity: it did not run to the end


# -- structured outputs ---------------------------------------------------------------------------
ITEM = {"type": "object", "properties": {"sku": {"type": "string", "maxLength": 6},
                                         "qty": {"type": "integer", "minimum": 1,
                                                 "maximum": 99}},
        "required": ["sku", "qty"], "additionalProperties": False}
# The random model would fill every gap JSON allows with whitespace until max_tokens.
TIGHT = {"guided_whitespace_pattern": " ?"}


def test_response_format_json_schema_and_json_object_hold_through_the_sdk(client):
    jsonschema = pytest.importorskip("jsonschema")
    msgs = [{"role": "user", "content": "An order line, please."}]
    r = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=120, temperature=1.0, seed=5, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "item", "schema": ITEM,
                                                                "strict": True}},
        extra_body=TIGHT)
    for ch in r.choices:
        assert ch.finish_reason == "stop", ch
        jsonschema.validate(json.loads(ch.message.content), ITEM)
    r = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=120, temperature=1.0,
                                  seed=6, extra_body={"response_format": {"type": "json_object"},
                                                      **TIGHT})
    if r.choices[0].finish_reason == "stop":  # an object may nest past max_tokens
        assert isinstance(json.loads(r.choices[0].text), dict)
    assert r.choices[0].text.startswith("{")


def test_vllm_structured_output_extras_and_a_streamed_constrained_chat(client, engine):
    msgs = [{"role": "user", "content": "Pick one."}]
    for extra, check in (
            ({"guided_choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
            ({"guided_regex": "[0-9]{2}:[0-9]{2}"}, lambda t: re.fullmatch("[0-9]{2}:[0-9]{2}", t)),
            ({"structured_outputs": {"grammar": 'root ::= "a" "b"+ "c"'}},
             lambda t: re.fullmatch("ab+c", t)),
            ({"guided_json": ITEM, **TIGHT}, lambda t: set(json.loads(t)) == {"sku", "qty"})):
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=60,
                                           temperature=1.0, seed=1, extra_body=extra)
        assert check(r.choices[0].message.content), (extra, r.choices[0].message.content)
    stream = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=120, temperature=1.0, seed=2, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "i", "schema": ITEM}},
        extra_body=TIGHT)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert set(json.loads(text)) == {"sku", "qty"}
    # allowed_token_ids (vLLM extra): every sampled token is one of them
    tok = engine.engine.tokenizer
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=8, temperature=1.0,
                                  logprobs=0, extra_body={"allowed_token_ids": [100, 200],
                                                          "ignore_eos": True})
    assert len(r.choices[0].logprobs.tokens) == 8
    assert set(r.choices[0].logprobs.tokens) <= {tok.decode([100]), tok.decode([200])}
    # bad_words (vLLM extra): "hello" is one token, so only "Paris" is left
    ids = [tok.encode(w, add_special_tokens=False)[0] for w in ("hello", "Paris")]
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=6, temperature=1.0,
                                  extra_body={"allowed_token_ids": ids, "ignore_eos": True,
                                              "bad_words": ["hello"]})
    assert r.choices[0].text == "Paris" * 6


@pytest.mark.parametrize("extra,param", [
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                 "schema": {"type": "bad"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ({"structured_outputs": {"grammar": "start: nothing_defined"}}, "structured_outputs"),
    ({"structured_outputs": {"json_object": True, "regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"colour": "red"}}, "structured_outputs"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, None),
    ({"guided_choice": ["a"], "guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    ({"allowed_token_ids": [10**6]}, "allowed_token_ids"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"bad_words": ["  "]}, "bad_words"),
    ({"bad_words": "hello"}, "bad_words"),
])
def test_bad_structured_outputs_are_400_and_leave_the_engine_idle(servers, engine, extra, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
            **extra}
    status, _, resp = _post(servers, "/v1/chat/completions", body)
    _assert_error(status, resp, 400, param)
    _wait_idle(engine)


# -- beam search ----------------------------------------------------------------------------------
def test_use_beam_search_returns_the_engines_beams_on_both_routes(client, servers, engine):
    """vLLM's use_beam_search: n beams, best first, as AsyncEngine.beam_search gives them; with
    logprobs, the chosen token and the top k per position (not the search's 2n)."""
    from jaxllm import BeamSearchParams

    async def direct(prompt):
        return [o async for o in engine.beam_search(
            prompt, "direct", BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True,
                                               temperature=1.0))][-1]

    ids = engine.tokenizer("The sky is").input_ids
    ref = servers.run(direct({"prompt_token_ids": ids}))
    r = client.completions.create(model=MODEL, prompt="The sky is", n=3, max_tokens=5,
                                  logprobs=1, extra_body={"use_beam_search": True,
                                                          "ignore_eos": True})
    assert [c.text for c in r.choices] == [c.text for c in ref.outputs]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 15
    for c in r.choices:
        assert len(c.logprobs.tokens) == 5 and all(len(t) <= 2 for t in c.logprobs.top_logprobs)
    # chat: the prompt is the template's; a stream carries the same beams
    msgs = [{"role": "user", "content": "Name a colour."}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, n=2, max_tokens=4,
                                          extra_body={"use_beam_search": True,
                                                      "length_penalty": 0.5})
    assert len(full.choices) == 2 and full.choices[0].message.content
    stream = client.chat.completions.create(model=MODEL, messages=msgs, n=2, max_tokens=4,
                                            stream=True, extra_body={"use_beam_search": True,
                                                                     "length_penalty": 0.5})
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in full.choices]
    # a constraint cannot ride on beam search; too many beams for max_logprobs is a 400
    for extra, param in (({"guided_choice": ["a", "b"]}, "use_beam_search"), ({}, None)):
        status, _, resp = _post(servers, "/v1/chat/completions", {
            "model": MODEL, "messages": msgs, "max_tokens": 4, "use_beam_search": True,
            "n": 2 if extra else 30, **extra})
        _assert_error(status, resp, 400, param)
        assert extra or "max_logprobs" in resp["error"]["message"]
    _wait_idle(engine)


# -- tool calling ---------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"],
        "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def _args_fit(call, tool):
    jsonschema = pytest.importorskip("jsonschema")
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_a_named_tool_choice_returns_one_call_whose_arguments_fit_its_schema(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=80, temperature=1.0,
        seed=3, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        extra_body=TIGHT)
    ch = r.choices[0]
    assert ch.finish_reason == "stop" and not ch.message.content  # OpenAI's, for a forced call
    [call] = ch.message.tool_calls
    _args_fit(call, WEATHER)
    # streamed: the call's id and name first, then its arguments as they come
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=80, temperature=1.0, seed=3,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True,
        extra_body=TIGHT)
    deltas = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and len(deltas) > 2
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    args = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(args) == json.loads(call.function.arguments)  # same seed, same call


def test_required_tool_choice_calls_listed_tools_and_ends_with_tool_calls(client):
    tools = {"get_weather": WEATHER, "get_time": TIME}
    kw = dict(model=MODEL, messages=ASK, tools=list(tools.values()), tool_choice="required",
              temperature=1.0, extra_body=TIGHT)
    # One call each (a random model would otherwise add calls until max_tokens).
    r = client.chat.completions.create(**kw, parallel_tool_calls=False, max_tokens=100, seed=4,
                                       n=3)
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls" and not ch.message.content, ch
        [call] = ch.message.tool_calls
        _args_fit(call, tools[call.function.name])
    # Several calls allowed: each fits its tool; a list cut short by max_tokens is text.
    r = client.chat.completions.create(**kw, max_tokens=200, seed=5, n=4)
    for ch in r.choices:
        if ch.finish_reason == "tool_calls":
            assert ch.message.tool_calls and not ch.message.content
            for call in ch.message.tool_calls:
                _args_fit(call, tools[call.function.name])
        else:
            assert ch.finish_reason == "length" and ch.message.tool_calls == []
            assert ch.message.content.startswith("[")
    stream = client.chat.completions.create(**kw, parallel_tool_calls=False, max_tokens=100,
                                            seed=4, n=3, stream=True)
    choices = [ch for c in stream for ch in c.choices]
    calls = [tc for ch in choices if ch.index == 0 for tc in (ch.delta.tool_calls or [])]
    assert sorted((ch.index, ch.finish_reason) for ch in choices if ch.finish_reason) == [
        (i, "tool_calls") for i in range(3)]
    first = client.chat.completions.create(**kw, parallel_tool_calls=False, max_tokens=100,
                                           seed=4, n=3).choices[0].message.tool_calls[0]
    [call] = calls
    assert (call.index, call.function.name, json.loads(call.function.arguments)) == (
        0, first.function.name, json.loads(first.function.arguments))  # the same seed


def test_a_tool_conversation_round_trips_and_auto_needs_the_parser_flags(client, servers, engine):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER],
                                       tool_choice="none", max_tokens=5)
    assert r.choices[0].message.tool_calls == [] and r.choices[0].message.content is not None
    base = {"model": MODEL, "messages": ASK, "max_tokens": 3}
    for extra, param in (
            ({"tools": [WEATHER]}, "tool_choice"),  # auto by default; this server has no parser
            ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
            ({"tool_choice": "required"}, "tool_choice"),
            ({"tools": [WEATHER], "tool_choice": {"type": "function",
                                                  "function": {"name": "nope"}}}, "tool_choice"),
            ({"tools": [WEATHER], "tool_choice": "required",
              "response_format": {"type": "json_object"}}, "tool_choice"),
            ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
            ({"functions": [{"name": "f"}]}, "functions")):
        status, _, body = _post(servers, "/v1/chat/completions", {**base, **extra})
        _assert_error(status, body, 400, param)
    with pytest.raises(ValueError, match="tool-call-parser"):
        build_app(engine, enable_auto_tool_choice=True)
    # With the flags, "auto" runs; a random model calls nothing, so the reply is text.
    auto = servers.start(build_app(engine, served_model_name=MODEL,
                                   enable_auto_tool_choice=True, tool_call_parser="hermes"))
    c = openai.OpenAI(base_url=auto + "/v1", api_key="unused", max_retries=0)
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=6,
                                  temperature=0.0)
    assert r.choices[0].message.tool_calls == [] and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    _wait_idle(engine)


def test_a_parser_whose_marker_is_a_special_token_keeps_special_tokens(servers, engine,
                                                                       monkeypatch):
    """mistral's [TOOL_CALLS] is a special token: under "auto" the reply keeps special tokens
    (vLLM does the same), or the parser would never see the marker."""
    seen = []
    real = engine.engine.add_request

    def spy(rid, prompt, params=None, arrival_time=None, priority=0, lora_request=None):
        seen.append(params.skip_special_tokens)
        return real(rid, prompt, params, arrival_time, priority, lora_request)

    monkeypatch.setattr(engine.engine, "add_request", spy)
    base = servers.start(build_app(engine, served_model_name=MODEL,
                                   enable_auto_tool_choice=True, tool_call_parser="mistral"))
    c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    for tools in ([WEATHER], None):
        c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, temperature=0.0,
                                  **({"tools": tools} if tools else {}))
    assert seen == [False, True]
    _wait_idle(engine)


# -- /v1/responses --------------------------------------------------------------------------------
def test_responses_api_answers_text_with_usage_and_status(client, engine):
    r = client.responses.create(model=MODEL, input="Say hi.", instructions="Be brief.",
                                max_output_tokens=6, temperature=0.0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    [msg] = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.status == "incomplete"
    assert r.output_text == msg.content[0].text and r.output_text
    assert r.usage.output_tokens == 6 and r.usage.total_tokens == r.usage.input_tokens + 6
    # the same prompt through the chat route gives the same greedy text
    chat = client.chat.completions.create(
        model=MODEL, max_completion_tokens=6, temperature=0.0,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Say hi."}])
    assert chat.choices[0].message.content == r.output_text
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    # text.format constrains it; a stop before max_output_tokens is "completed"
    for seed in range(4):
        r = client.responses.create(model=MODEL, input="x", max_output_tokens=20,
                                    temperature=1.0, extra_body={"seed": seed}, text={"format": {
                                        "type": "json_schema", "name": "answer",
                                        "schema": {"enum": ["yes", "no"]}}})
        assert r.status == "completed" and r.incomplete_details is None
        assert json.loads(r.output_text) in ("yes", "no")
    _wait_idle(engine)


def test_responses_stream_events_in_order_and_join_to_the_text(client):
    kw = dict(model=MODEL, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "Tell me"}, {"type": "input_text", "text": " a story."}]}],
        max_output_tokens=8, temperature=0.0)
    full = client.responses.create(**kw)
    events = list(client.responses.create(**kw, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == full.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == 8


def test_responses_log_probs_are_the_chat_routes(client):
    """top_logprobs / include ["message.output_text.logprobs"]: the output text part's
    logprobs, a token each with its top alternatives, equal the chat route's for the same
    conversation; in a stream, on the text's done event and in the final response."""
    kw = dict(model=MODEL, input="Say hi.", max_output_tokens=4, temperature=0.0)
    r = client.responses.create(**kw, top_logprobs=2,
                                include=["message.output_text.logprobs"])
    chat = client.chat.completions.create(
        model=MODEL, max_completion_tokens=4, temperature=0.0, logprobs=True, top_logprobs=2,
        messages=[{"role": "user", "content": "Say hi."}])
    want = chat.choices[0].logprobs.content
    got = r.output[0].content[0].logprobs
    assert len(got) == 4 and "".join(e.token for e in got) == r.output_text
    for g, w in zip(got, want):
        assert (g.token, g.logprob) == (w.token, w.logprob) and len(g.top_logprobs) == 2
        assert [t.token for t in g.top_logprobs] == [t.token for t in w.top_logprobs]
    only = client.responses.create(**kw, include=["message.output_text.logprobs"])
    assert [e.logprob for e in only.output[0].content[0].logprobs] == [e.logprob for e in got]
    assert only.output[0].content[0].logprobs[0].top_logprobs == []
    assert client.responses.create(**kw).output[0].content[0].logprobs == []
    events = list(client.responses.create(**kw, top_logprobs=2, stream=True))
    [done] = [e for e in events if e.type == "response.output_text.done"]
    assert [e.logprob for e in done.logprobs] == [e.logprob for e in got]
    assert [e.logprob for e in events[-1].response.output[0].content[0].logprobs] == [
        e.logprob for e in got]


def test_responses_function_tools_round_trip(client):
    jsonschema = pytest.importorskip("jsonschema")
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"][
        "parameters"]}
    kw = dict(model=MODEL, input="Weather in Paris?", tools=[tool], max_output_tokens=80,
              tool_choice={"type": "function", "name": "get_weather"}, temperature=1.0,
              extra_body={"seed": 3, **TIGHT})
    r = client.responses.create(**kw)
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("chatcmpl-tool-") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), tool["parameters"])
    events = list(client.responses.create(**kw, stream=True))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == json.loads(call.arguments)
    assert not any(e.type == "response.output_text.delta" for e in events)
    # the call and its output go back as input
    r2 = client.responses.create(model=MODEL, tools=[tool], tool_choice="none",
                                 max_output_tokens=4, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 C, sunny"}])
    assert r2.output[0].type == "message" and r2.output_text


def test_a_reasoning_parser_moves_the_thinking_out_of_the_content(servers, engine):
    """--reasoning-parser deepseek_r1: a reply with no </think> is all thinking (the random
    model writes no tags; server/reasoning.py's own tests split tagged replies)."""
    base = servers.start(build_app(engine, served_model_name=MODEL,
                                   reasoning_parser="deepseek_r1"))
    c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    kw = dict(model=MODEL, messages=ASK, max_tokens=6, temperature=0.0)
    plain = c.chat.completions.create(**kw).choices[0].message
    main = openai.OpenAI(base_url=servers.main + "/v1", api_key="unused", max_retries=0)
    text = main.chat.completions.create(**kw).choices[0].message.content  # no parser
    assert plain.content is None and plain.model_extra["reasoning"] == text
    chunks = [ch.delta for x in c.chat.completions.create(**kw, stream=True) for ch in x.choices]
    assert "".join(d.model_extra.get("reasoning") or "" for d in chunks) == text
    assert not any(d.content for d in chunks)
    r = c.responses.create(model=MODEL, input=ASK[0]["content"], max_output_tokens=6,
                           temperature=0.0)
    assert [o.type for o in r.output] == ["reasoning"]
    assert r.output[0].content[0].text == text
    events = list(c.responses.create(model=MODEL, input=ASK[0]["content"],
                                     max_output_tokens=6, temperature=0.0, stream=True))
    assert [o.type for o in events[-1].response.output] == ["reasoning"]
    anthropic = pytest.importorskip("anthropic")
    ac = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0)
    akw = dict(model=MODEL, messages=ASK, max_tokens=6, extra_body={"temperature": 0.0})
    [think] = ac.messages.create(**akw).content
    assert think.type == "thinking" and think.thinking == text
    aevents = list(ac.messages.create(**akw, stream=True))
    assert aevents[1].content_block.type == "thinking"
    assert "".join(e.delta.thinking for e in aevents
                   if e.type == "content_block_delta") == text
    with pytest.raises(ValueError, match="reasoning_parser"):
        build_app(engine, reasoning_parser="granite")
    _wait_idle(engine)


def test_stored_responses_continue_by_previous_response_id(servers, engine, monkeypatch):
    """vLLM's VLLM_ENABLE_RESPONSES_API_STORE=1: a response (store: OpenAI's default true) is
    kept with its conversation: GET returns it, previous_response_id continues it (the same
    tokens as the chat route over the whole conversation, without the earlier instructions),
    a streamed one is kept too, store=False is not, DELETE forgets. Without the store,
    previous_response_id and GET are 404s that say how to turn it on."""
    status, _, resp = _post(servers, "/v1/responses", {
        "model": MODEL, "input": "x", "max_output_tokens": 4, "previous_response_id": "resp_1"})
    _assert_error(status, resp, 404, "previous_response_id")
    assert "VLLM_ENABLE_RESPONSES_API_STORE=1" in resp["error"]["message"]
    status, _, resp = _post(servers, "/v1/responses/resp_1", method="GET")
    _assert_error(status, resp, 404)
    monkeypatch.setenv("VLLM_ENABLE_RESPONSES_API_STORE", "1")
    base = servers.start(build_app(engine, served_model_name=MODEL))
    c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    kw = dict(model=MODEL, max_output_tokens=4, temperature=0.0)
    r1 = c.responses.create(input="My name is Ada.", instructions="Be brief.", **kw)
    assert r1.store is True
    got = c.responses.retrieve(r1.id)
    assert (got.id, got.output_text, got.usage.output_tokens) == (r1.id, r1.output_text, 4)
    r2 = c.responses.create(input="What is my name?", previous_response_id=r1.id, **kw)
    assert r2.previous_response_id == r1.id
    chat = c.chat.completions.create(model=MODEL, max_completion_tokens=4, temperature=0.0,
                                     messages=[{"role": "user", "content": "My name is Ada."},
                                               {"role": "assistant", "content": r1.output_text},
                                               {"role": "user", "content": "What is my name?"}])
    assert r2.output_text == chat.choices[0].message.content
    assert r2.usage.input_tokens == chat.usage.prompt_tokens
    events = list(c.responses.create(input="And again?", previous_response_id=r2.id,
                                     stream=True, **kw))
    final = events[-1].response
    assert c.responses.retrieve(final.id).output_text == final.output_text == "".join(
        e.delta for e in events if e.type == "response.output_text.delta")
    r4 = c.responses.create(input="Forget me.", store=False, **kw)
    assert r4.store is False
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r4.id)
    c.responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r1.id)
    with pytest.raises(openai.NotFoundError, match="previous_response_id|not found"):
        c.responses.create(input="x", previous_response_id=r1.id, **kw)
    assert c.responses.retrieve(r2.id).id == r2.id  # the others stay
    # background: answered at once, generated detached, polled; cancelled mid-way
    bg = c.responses.create(input="My name is Ada.", background=True, **kw)
    assert bg.status == "in_progress" and bg.background is True and bg.output == []
    deadline = time.time() + 60
    while (got := c.responses.retrieve(bg.id)).status == "in_progress":
        assert time.time() < deadline
        time.sleep(0.05)
    assert got.status == "incomplete" and got.usage.output_tokens == 4
    assert got.output_text == c.responses.create(input="My name is Ada.", **kw).output_text
    with pytest.raises(openai.BadRequestError, match="not a running background"):
        c.responses.cancel(bg.id)
    # ~200 tokens of a random model (an EOS ~1 in 49k a token): far longer than the cancel
    long = c.responses.create(input="Count.", background=True, model=MODEL,
                              max_output_tokens=200)
    with pytest.raises(openai.BadRequestError, match="still in progress"):
        c.responses.create(input="x", previous_response_id=long.id, **kw)
    stopped = c.responses.cancel(long.id)
    assert stopped.status == "cancelled" and c.responses.retrieve(long.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError, match="is cancelled"):
        c.responses.create(input="x", previous_response_id=long.id, **kw)
    _wait_idle(engine)  # its engine request ended and gave its pages back
    for extra in ({"stream": True}, {"store": False}):
        status, _, resp = _post(servers, "/v1/responses", {
            "model": MODEL, "input": "x", "background": True, **extra}, base=base)
        _assert_error(status, resp, 400, next(iter(extra)))
    status, _, resp = _post(servers, f"/v1/responses/{r2.id}/stop", {}, base=base)
    assert status == 404


def test_anthropic_messages_through_the_sdk(servers, engine):
    """Anthropic's Messages API (server/anthropic.py) through the anthropic SDK: the same
    greedy text and prompt tokens as the chat route over the same system and user turn,
    max_tokens / stop_sequence stop reasons, a stream whose deltas join to the text,
    count_tokens, a forced tool call's tool_use block (round-tripped with its tool_result),
    the SDK's x-api-key on a keyed server, and Anthropic's error shape."""
    anthropic = pytest.importorskip("anthropic")
    jsonschema = pytest.importorskip("jsonschema")
    c = anthropic.Anthropic(base_url=servers.main, api_key="unused", max_retries=0)
    oa = openai.OpenAI(base_url=servers.main + "/v1", api_key="unused", max_retries=0)
    kw = dict(model=MODEL, max_tokens=8, system="Be brief.", extra_body={"temperature": 0.0},
              messages=[{"role": "user", "content": "Say hi."}])
    m = c.messages.create(**kw)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 8
    chat = oa.chat.completions.create(
        model=MODEL, max_completion_tokens=8, temperature=0.0,
        messages=[{"role": "system", "content": "Be brief."}, *kw["messages"]])
    [block] = m.content
    assert block.type == "text" and block.text == chat.choices[0].message.content
    assert m.usage.input_tokens == chat.usage.prompt_tokens
    assert c.messages.count_tokens(model=MODEL, system="Be brief.",
                                   messages=kw["messages"]).input_tokens == m.usage.input_tokens
    stop = block.text[len(block.text) // 2:][:3]
    cut = c.messages.create(**{**kw, "stop_sequences": [stop]})
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    assert cut.content[0].text == block.text[:block.text.index(stop)]
    events = list(c.messages.create(**kw, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == block.text
    assert events[-2].delta.stop_reason == "max_tokens" and events[-2].usage.output_tokens == 8
    tool = {"name": "get_weather", "description": "Weather in a city",
            "input_schema": WEATHER["function"]["parameters"]}
    tkw = dict(model=MODEL, max_tokens=80, tools=[tool],
               tool_choice={"type": "tool", "name": "get_weather"},
               messages=[{"role": "user", "content": "Weather in Paris?"}],
               extra_body={"seed": 3, "temperature": 1.0, **TIGHT})
    called = c.messages.create(**tkw)
    [use] = [b for b in called.content if b.type == "tool_use"]
    assert called.stop_reason == "tool_use" and use.name == "get_weather"
    jsonschema.validate(use.input, tool["input_schema"])
    streamed = list(c.messages.create(**tkw, stream=True))
    parts = [e.delta.partial_json for e in streamed if e.type == "content_block_delta"]
    assert len(parts) == 1 and json.loads(parts[0]) == use.input
    reply = c.messages.create(model=MODEL, max_tokens=4, tools=[tool],
                              tool_choice={"type": "none"}, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id,
                                           "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": "18 C, sunny"}]}])
    assert reply.content[0].type == "text" and reply.stop_reason == "max_tokens"
    for seed in range(3):  # output_config.format: a JSON schema the reply follows
        fmt = c.messages.create(model=MODEL, max_tokens=20, messages=kw["messages"],
                                output_config={"format": {"type": "json_schema", "schema": {
                                    "enum": ["yes", "no"]}}},
                                extra_body={"seed": seed, "temperature": 1.0})
        assert json.loads(fmt.content[0].text) in ("yes", "no")
    keyed = anthropic.Anthropic(base_url=servers.tight, api_key=API_KEY, max_retries=0)
    assert keyed.messages.create(**{**kw, "max_tokens": 2}).usage.output_tokens == 2
    with pytest.raises(anthropic.AuthenticationError) as denied:
        anthropic.Anthropic(base_url=servers.tight, api_key="wrong",
                            max_retries=0).messages.create(**kw)
    assert denied.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        c.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "http://x"}}]}])
    assert bad.value.body["type"] == "error"
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    assert "not supported" in bad.value.body["error"]["message"]
    _wait_idle(engine)


def test_the_response_store_keeps_the_latest_responses():
    from server.responses import ResponseStore

    store = ResponseStore(capacity=2)
    for i in range(3):
        store.put({"id": f"resp_{i}"}, [{"role": "user", "content": str(i)}])
    assert store.get("resp_0") is None and store.get("resp_2")[1][0]["content"] == "2"
    assert store.pop("resp_1") and not store.pop("resp_1") and store.get("resp_1") is None


@pytest.mark.parametrize("extra,param", [
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "bad"}}}},
     "text"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_responses_requests_are_400(servers, engine, extra, param):
    body = {"model": MODEL, "input": "x", "max_output_tokens": 4, **extra}
    status, _, resp = _post(servers, "/v1/responses", body)
    _assert_error(status, resp, 400, param)
    _wait_idle(engine)


# -- errors ---------------------------------------------------------------------------------------
def _assert_error(status, body, expected_status, param=None):
    assert status == expected_status, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    if param is not None:
        assert body["error"]["param"] == param, body


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL}, "prompt"),  # missing field
    ({"model": MODEL, "prompt": "x", "bogus": 1}, "bogus"),  # unknown field
    ({"model": MODEL, "prompt": "x", "max_tokens": "many"}, "max_tokens"),  # wrong type
    ({"model": MODEL, "prompt": "x", "temperature": -1.0}, "temperature"),  # out of range
    ({"model": MODEL, "prompt": "x", "top_p": 1.5}, "top_p"),
    ({"model": MODEL, "prompt": "x", "n": 0}, "n"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"99999999": 1.0}}, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "suffix": "after"}, "suffix"),  # unsupported, said clearly
    ({"model": MODEL, "prompt": [999999]}, None),  # out-of-vocab prompt token
    ({"model": MODEL, "prompt": "", "max_tokens": 3}, "prompt"),
    ({"model": MODEL, "prompt": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"model": MODEL, "prompt": "x", "priority": 1}, "priority"),  # the engine runs fcfs
])
def test_bad_completion_requests_are_400_in_openai_shape(servers, body, param):
    status, _, resp = _post(servers, "/v1/completions", body)
    _assert_error(status, resp, 400, param)


def test_priority_reaches_the_engine_from_every_route(client, engine, monkeypatch):
    """vLLM's priority field goes to the engine's add_request (the server's engine runs fcfs,
    so the spy records it and adds the request at priority 0)."""
    seen = []
    real = engine.engine.add_request

    def spy(rid, prompt, params=None, arrival_time=None, priority=0, lora_request=None):
        seen.append(priority)
        return real(rid, prompt, params, arrival_time, lora_request=lora_request)

    monkeypatch.setattr(engine.engine, "add_request", spy)
    client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body={"priority": 3})
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                   max_tokens=1, extra_body={"priority": -2})
    client.responses.create(model=MODEL, input="x", max_output_tokens=1,
                            extra_body={"priority": 5})
    client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert seen == [3, -2, 5, 0]


def test_vllm_token_extras_prompt_logprobs_token_ids_and_ids_as_tokens(client, servers,
                                                                          engine):
    """prompt_logprobs (the engine's, per prompt position), return_token_ids (prompt and
    output ids; a stream sends the prompt's first and each chunk's own ids) and
    return_tokens_as_token_ids (per request, or the server's flag) on both routes."""
    ids = engine.tokenizer("The sky is blue").input_ids
    kw = dict(model=MODEL, max_tokens=5, temperature=0.0)
    r = client.completions.create(prompt="The sky is blue", logprobs=2, **kw, extra_body={
        "prompt_logprobs": 1, "return_token_ids": True, "return_tokens_as_token_ids": True})
    c = r.choices[0].model_extra
    assert c["prompt_token_ids"] == ids and len(c["token_ids"]) == 5
    plp = c["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for tid, d in zip(ids[1:], plp[1:]):
        assert str(tid) in d and 1 <= len(d) <= 2 and all(
            set(v) == {"logprob", "rank", "decoded_token"} for v in d.values())
    assert r.choices[0].logprobs.tokens == [f"token_id:{t}" for t in c["token_ids"]]
    assert all(k.startswith("token_id:") for top in r.choices[0].logprobs.top_logprobs
               for k in top)
    # the same prompt log-probs as the engine's own (LLMEngine prompt_logprobs)
    from jaxllm import SamplingParams

    async def direct():
        return [o async for o in engine.generate(
            {"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=1),
            "plp-direct")][-1]
    ref = servers.run(direct()).prompt_logprobs
    for d, e in zip(plp[1:], ref[1:]):
        assert {int(t): v["logprob"] for t, v in d.items()} == pytest.approx(
            {t: v.logprob for t, v in e.items()}, abs=1e-5)
    # nothing extra unless asked
    plain = client.completions.create(prompt="The sky is blue", **kw).choices[0].model_extra
    assert not {"prompt_logprobs", "prompt_token_ids", "token_ids"} & set(plain)
    # a stream: prompt ids once, then each chunk's ids, adding up to the output
    chunks = list(client.completions.create(prompt="The sky is blue", stream=True, **kw,
                                            extra_body={"return_token_ids": True}))
    extras = [ch.choices[0].model_extra for ch in chunks if ch.choices]
    assert extras[0]["prompt_token_ids"] == ids
    assert all("prompt_token_ids" not in e or e["prompt_token_ids"] is None
               for e in extras[1:])
    assert [t for e in extras for t in e["token_ids"]] == c["token_ids"]
    # chat: prompt_logprobs and prompt_token_ids on the response, token_ids on the choice
    msgs = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(messages=msgs, **kw, extra_body={
        "prompt_logprobs": 0, "return_token_ids": True})
    ptoks = r.model_extra["prompt_token_ids"]
    assert len(r.model_extra["prompt_logprobs"]) == len(ptoks) == r.usage.prompt_tokens
    out_ids = r.choices[0].model_extra["token_ids"]
    assert len(out_ids) == 5 and engine.tokenizer.decode(
        out_ids, skip_special_tokens=True) == r.choices[0].message.content
    chunks = list(client.chat.completions.create(messages=msgs, stream=True, **kw,
                                                 extra_body={"return_token_ids": True}))
    assert chunks[0].model_extra["prompt_token_ids"] == ptoks
    assert [t for ch in chunks for x in ch.choices
            for t in (x.model_extra.get("token_ids") or [])] == r.choices[0].model_extra[
        "token_ids"]
    # the server's flag, and a request turning it off
    base = servers.start(build_app(engine, served_model_name=MODEL,
                                   options={"return_tokens_as_token_ids": True}))
    other = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    r = other.chat.completions.create(messages=msgs, logprobs=True, top_logprobs=1, **kw)
    assert all(x.token.startswith("token_id:") for x in r.choices[0].logprobs.content)
    r = other.chat.completions.create(messages=msgs, logprobs=True, **kw,
                                      extra_body={"return_tokens_as_token_ids": False})
    assert not any(x.token.startswith("token_id:") for x in r.choices[0].logprobs.content)
    # prompt_logprobs cannot stream (vLLM's rule)
    status, _, resp = _post(servers, "/v1/completions", {
        "model": MODEL, "prompt": "x", "stream": True, "prompt_logprobs": 1})
    _assert_error(status, resp, 400, "prompt_logprobs")
    _wait_idle(engine)


def test_cache_salt_reaches_the_engine_with_the_prompt(client, engine, monkeypatch):
    seen = []
    real = engine.engine.add_request

    def spy(rid, prompt, params=None, arrival_time=None, priority=0, lora_request=None):
        seen.append(prompt.get("cache_salt"))
        return real(rid, prompt, params, arrival_time, priority, lora_request)

    monkeypatch.setattr(engine.engine, "add_request", spy)
    client.completions.create(model=MODEL, prompt="x", max_tokens=1,
                              extra_body={"cache_salt": "tenant-a"})
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                   max_tokens=1, extra_body={"cache_salt": "tenant-b"})
    client.responses.create(model=MODEL, input="x", max_output_tokens=1,
                            extra_body={"cache_salt": "tenant-c"})
    client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert seen == ["tenant-a", "tenant-b", "tenant-c", None]
    with pytest.raises(openai.BadRequestError, match="cache_salt") as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1,
                                  extra_body={"cache_salt": ""})
    assert e.value.body["param"] == "cache_salt"


def test_cors_answers_preflights_before_auth_and_names_the_origin_on_replies(servers, engine):
    """vLLM's CORS defaults (every origin, method and header) on the keyed server: a preflight
    needs no key; replies (JSON, errors, streams) carry Access-Control-Allow-Origin."""
    from server.app import Call

    pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}
    status, h, body = _post(servers, "/v1/chat/completions", base=servers.tight,
                            method="OPTIONS", headers=pre)
    assert status == 200 and h["Access-Control-Allow-Origin"] == "*"
    assert h["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert "POST" in h["Access-Control-Allow-Methods"]
    origin = {"Origin": "http://app.example"}
    status, h, _ = _post(servers, "/v1/models", method="GET", headers=origin)
    assert status == 200 and h["Access-Control-Allow-Origin"] == "*"
    status, h, _ = _post(servers, "/v1/models", method="GET", base=servers.tight,
                         headers=origin)  # no key: the 401 is readable by the page too
    assert status == 401 and h["Access-Control-Allow-Origin"] == "*"
    status, h, text = _post(servers, "/v1/completions", {
        "model": MODEL, "prompt": "x", "max_tokens": 2, "stream": True}, headers=origin)
    assert status == 200 and h["Access-Control-Allow-Origin"] == "*" and "[DONE]" in text
    status, h, _ = _post(servers, "/v1/models", method="GET")  # no Origin: no CORS headers
    assert "Access-Control-Allow-Origin" not in h
    # a narrowed policy: one origin, credentials, a short header list
    base = servers.start(build_app(engine, served_model_name=MODEL, options=ServerOptions(
        allowed_origins=["http://ok.example"], allowed_headers=["Authorization"],
        allow_credentials=True)))
    ok = {**pre, "Origin": "http://ok.example"}
    status, h, _ = _post(servers, "/v1/completions", base=base, method="OPTIONS", headers=ok)
    assert status == 200 and h["Access-Control-Allow-Origin"] == "http://ok.example"
    assert h["Access-Control-Allow-Credentials"] == "true" and h["Vary"] == "Origin"
    for bad, what in (({**ok, "Origin": "http://evil.example"}, "origin"),
                      ({**ok, "Access-Control-Request-Headers": "x-secret"}, "headers")):
        status, _, text = _post(servers, "/v1/completions", base=base, method="OPTIONS",
                                headers=bad)
        assert status == 400 and what in text
    status, h, _ = _post(servers, "/v1/models", method="GET", base=base,
                         headers={"Origin": "http://evil.example"})
    assert status == 200 and "Access-Control-Allow-Origin" not in h
    # the Ray Serve front end goes through OpenAIServer.handle: the same answers
    srv = build_app(engine, served_model_name=MODEL, api_key="k")[SERVER_KEY]
    reply = servers.run(srv.handle(Call("OPTIONS", "/v1/completions", pre)))
    assert reply.status == 200 and reply.headers["Access-Control-Allow-Origin"] == "*"
    reply = servers.run(srv.handle(Call("GET", "/v1/models", origin)))
    assert reply.status == 401 and reply.headers["Access-Control-Allow-Origin"] == "*"
    with pytest.raises(ValueError, match="allowed_origins"):
        build_app(engine, options={"allowed_origins": "*"})


def test_x_request_id_names_the_request_and_comes_back_with_the_flag(client, servers, engine):
    """vLLM's request ids: a request's X-Request-Id header is its id (the reply's id is the
    route's prefix and it; the header wins over the body's request_id); with
    --enable-request-id-headers every reply (JSON, stream, error, preflight, both front ends)
    carries X-Request-Id, the request's own or a new one. Without the flag, no such header."""
    from server.app import Call

    hdr = {"X-Request-Id": "trace-7"}
    c = client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_headers=hdr)
    assert c.id == "cmpl-trace-7"
    chat = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1,
        extra_headers={"X-Request-Id": "trace-8"}, extra_body={"request_id": "body-id"})
    assert chat.parse().id == "chatcmpl-trace-8" and "X-Request-Id" not in chat.headers
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=1,
                                     extra_body={"request_id": "body-id"}).id == "cmpl-body-id"
    r = client.responses.create(model=MODEL, input="x", max_output_tokens=1, extra_headers=hdr)
    assert r.id == "resp_trace-7"

    base = servers.start(build_app(engine, served_model_name=MODEL, options=ServerOptions(
        enable_request_id_headers=True)))
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    status, h, out = _post(servers, "/v1/completions", body, base=base, headers=hdr)
    assert status == 200 and h["X-Request-Id"] == "trace-7" and out["id"] == "cmpl-trace-7"
    status, h, out = _post(servers, "/v1/completions", body, base=base)
    assert status == 200 and re.fullmatch(r"[0-9a-f]{32}", h["X-Request-Id"])
    status, h, text = _post(servers, "/v1/completions", {**body, "stream": True}, base=base,
                            headers=hdr)
    assert status == 200 and h["X-Request-Id"] == "trace-7" and "[DONE]" in text
    status, h, err = _post(servers, "/v1/completions", {**body, "model": "nope"}, base=base,
                           headers=hdr)
    assert status == 404 and h["X-Request-Id"] == "trace-7" and "error" in err
    status, h, _ = _post(servers, "/v1/completions", base=base, method="OPTIONS", headers={
        **hdr, "Origin": "http://a.example", "Access-Control-Request-Method": "POST"})
    assert status == 200 and h["X-Request-Id"] == "trace-7"
    srv = build_app(engine, served_model_name=MODEL, options=ServerOptions(
        enable_request_id_headers=True))[SERVER_KEY]
    reply = servers.run(srv.handle(Call("GET", "/v1/models", hdr)))
    assert reply.status == 200 and reply.headers["X-Request-Id"] == "trace-7"
    reply = servers.run(srv.handle(Call("GET", "/v1/nowhere", {})))
    assert reply.status == 404 and re.fullmatch(r"[0-9a-f]{32}", reply.headers["X-Request-Id"])


def test_prompt_tokens_details_and_forced_usage_flags(client, servers, engine):
    """--enable-prompt-tokens-details: usage counts the prompt's prefix-cache hit;
    --enable-force-include-usage: a stream ends with usage without stream_options."""
    base = servers.start(build_app(engine, served_model_name=MODEL, options=ServerOptions(
        enable_prompt_tokens_details=True, enable_force_include_usage=True)))
    c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    prompt = " ".join(["cached words"] * 40)  # 80+ tokens: several full pages
    kw = dict(model=MODEL, prompt=prompt, max_tokens=2, temperature=0.0)
    c.completions.create(**kw)
    usage = c.completions.create(**kw).usage
    page = engine.engine_config.page_size
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % page == 0 and cached < usage.prompt_tokens
    status, _, body = _post(servers, "/v1/completions", kw)  # the flag off: no details
    assert status == 200 and set(body["usage"]) == {"prompt_tokens", "completion_tokens",
                                                    "total_tokens"}
    chunks = list(c.chat.completions.create(model=MODEL, max_tokens=2, stream=True,
                                            messages=[{"role": "user", "content": prompt}]))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2
    assert all(ch.usage is None for ch in chunks[:-1])
    _wait_idle(engine)


def test_request_chat_template_documents_special_tokens_and_echo(client, servers, engine):
    """vLLM's chat extras: a request's chat_template (only with
    --trust-request-chat-template), documents for the template, add_special_tokens, and echo
    (the continued assistant message starts the reply)."""
    tmpl = ("{% for d in documents or [] %}[doc {{ d.title }}: {{ d.text }}]{% endfor %}"
            "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
    msgs = [{"role": "user", "content": "Hi"}]
    extra = {"chat_template": tmpl, "return_token_ids": True,
             "documents": [{"title": "A", "text": "apples"}]}
    status, _, body = _post(servers, "/v1/chat/completions", {
        "model": MODEL, "messages": msgs, "max_tokens": 1, **extra})
    _assert_error(status, body, 400, "chat_template")
    assert "trust-request-chat-template" in body["error"]["message"]
    base = servers.start(build_app(engine, served_model_name=MODEL,
                                   options={"trust_request_chat_template": True}))
    c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    tok = engine.tokenizer
    want = "[doc A: apples]<user>Hi<assistant>"
    for special in (False, True):
        r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1,
                                      extra_body={**extra, "add_special_tokens": special})
        assert r.model_extra["prompt_token_ids"] == tok(
            want, add_special_tokens=special).input_ids
    # echo: a continued assistant message comes back in front of the new text
    cont = msgs + [{"role": "assistant", "content": "The answer is"}]
    kw = dict(model=MODEL, messages=cont, max_tokens=3, temperature=0.0)
    ex = {"continue_final_message": True, "add_generation_prompt": False}
    plain = client.chat.completions.create(**kw, extra_body=ex).choices[0].message.content
    echoed = client.chat.completions.create(**kw, extra_body={**ex, "echo": True})
    assert echoed.choices[0].message.content == "The answer is" + plain
    chunks = client.chat.completions.create(**kw, stream=True, extra_body={**ex, "echo": True})
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks
                   if ch.choices) == "The answer is" + plain
    _wait_idle(engine)


def test_enable_log_requests_logs_each_prompt_cut_to_max_log_len(client, servers, engine,
                                                                  caplog):
    base = servers.start(build_app(engine, served_model_name=MODEL,
                                   options=ServerOptions(enable_log_requests=True,
                                                         max_log_len=5)))
    c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    with caplog.at_level("INFO", logger="jaxllm.server"):
        c.completions.create(model=MODEL, prompt="abcdefghij", max_tokens=1,
                             extra_body={"request_id": "logme"})
    [line] = [r.getMessage() for r in caplog.records if "Received request" in r.getMessage()]
    assert "cmpl-logme" in line and "'abcde'" in line and "abcdef" not in line
    assert "max_tokens=1" in line
    caplog.clear()
    with caplog.at_level("INFO", logger="jaxllm.server"):  # the default server logs none
        client.completions.create(model=MODEL, prompt="abc", max_tokens=1)
    assert not any("Received request" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="max_log_len"):
        ServerOptions(max_log_len=-1)
    _wait_idle(engine)


def test_invalid_json_and_non_object_bodies_are_400(servers):
    for data in (b"{not json", b"[1, 2]", b'{"prompt": NaN}'):
        status, _, body = _post(servers, "/v1/completions", data=data,
                                headers={"Content-Type": "application/json"})
        _assert_error(status, body, 400)


def test_prompt_plus_max_tokens_over_the_context_is_400_with_both_numbers(client, engine):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hello world", max_tokens=1000)
    msg = e.value.body["message"]
    assert str(engine.max_model_len) in msg and "1000" in msg
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       max_completion_tokens=5000)


def test_unsupported_chat_features_are_400(servers):
    base = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    for extra, param in (({"tools": [{"type": "function", "function": {"name": "f"}}]},
                          "tool_choice"),  # "auto" without --enable-auto-tool-choice
                         ({"top_logprobs": 2}, "top_logprobs"),
                         ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
                         ({"messages": []}, "messages")):
        status, _, body = _post(servers, "/v1/chat/completions", {**base, **extra})
        _assert_error(status, body, 400, param)
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    status, _, body = _post(servers, "/v1/chat/completions", {**base, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]})
    _assert_error(status, body, 400, "messages")
    assert "'image_url' are not supported" in body["error"]["message"]
    # text parts are the text
    status, _, body = _post(servers, "/v1/chat/completions", {**base, "max_tokens": 1, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]})
    assert status == 200, body
    # harmless OpenAI fields are accepted
    status, _, body = _post(servers, "/v1/chat/completions",
                            {**base, "max_tokens": 1, "user": "u1", "store": False,
                             "metadata": {"k": "v"}})
    assert status == 200, body


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert e.value.body["param"] == "model"


def test_unknown_route_is_404_and_wrong_method_is_405_in_json(servers):
    status, _, body = _post(servers, "/v1/nothing", {})
    _assert_error(status, body, 404)
    status, headers, body = _post(servers, "/v1/completions", method="GET")
    _assert_error(status, body, 405)
    assert "POST" in headers["Allow"]


def test_api_key_guards_v1_routes_only(servers, engine):
    status, _, body = _post(servers, "/v1/models", method="GET", base=servers.tight)
    _assert_error(status, body, 401)
    status, _, body = _post(servers, "/v1/models", method="GET", base=servers.tight,
                            headers={"Authorization": "Bearer wrong"})
    _assert_error(status, body, 401)
    c = openai.OpenAI(base_url=servers.tight + "/v1", api_key=API_KEY, max_retries=0)
    assert c.models.list().data[0].id == MODEL
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=servers.tight + "/v1", api_key="nope",
                      max_retries=0).models.list()
    status, _, _ = _post(servers, "/health", method="GET", base=servers.tight)
    assert status == 200
    # vLLM's several keys: any of them opens the routes
    base = servers.start(build_app(engine, served_model_name=MODEL,
                                   api_key=["first", "second"]))
    for key, status in (("first", 200), ("second", 200), ("third", 401), ("", 401)):
        got, _, _ = _post(servers, "/v1/models", method="GET", base=base,
                          headers={"Authorization": f"Bearer {key}"})
        assert got == status, key


def test_body_over_the_limit_is_413(servers):
    body = {"model": MODEL, "prompt": "x" * 10_000}
    status, _, resp = _post(servers, "/v1/completions", body, base=servers.tight,
                            headers={"Authorization": f"Bearer {API_KEY}"})
    _assert_error(status, resp, 413)


def test_too_many_requests_in_flight_is_429_with_retry_after(servers, engine):
    auth = {"Authorization": f"Bearer {API_KEY}"}

    async def go():
        async with aiohttp.ClientSession(headers=auth) as s:
            body = {"model": MODEL, "prompt": "hold", "max_tokens": 100, "ignore_eos": True,
                    "stream": True}
            held = await s.post(servers.tight + "/v1/completions", json=body)
            await held.content.readline()
            async with s.post(servers.tight + "/v1/completions",
                              json={"model": MODEL, "prompt": "x", "max_tokens": 1}) as r:
                out = r.status, r.headers.get("Retry-After"), await r.json()
            held.close()
            return out

    status, retry_after, body = asyncio.run(go())
    _assert_error(status, body, 429)
    assert retry_after is not None and int(retry_after) >= 1
    _wait_idle(engine)


# -- utility routes -------------------------------------------------------------------------------
def test_tokenize_and_detokenize_round_trip(servers, engine):
    status, _, t = _post(servers, "/tokenize", {"prompt": "Hello world, round trip!"})
    assert status == 200
    assert t["tokens"] == engine.tokenizer("Hello world, round trip!").input_ids
    assert t["count"] == len(t["tokens"]) and t["max_model_len"] == engine.max_model_len
    status, _, d = _post(servers, "/detokenize", {"tokens": t["tokens"]})
    assert status == 200 and d["prompt"] == "Hello world, round trip!"
    status, _, c = _post(servers, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and c["count"] > 2
    status, _, body = _post(servers, "/detokenize", {"tokens": [10**9]})
    _assert_error(status, body, 400, "tokens")


def test_health_version_and_openapi(servers):
    status, _, _ = _post(servers, "/health", method="GET")
    assert status == 200
    status, _, v = _post(servers, "/version", method="GET")
    assert status == 200 and v["version"]
    status, _, spec = _post(servers, "/openapi.json", method="GET")
    assert status == 200 and spec["openapi"].startswith("3.")
    for path in ("/v1/models", "/v1/models/{model}", "/v1/completions", "/v1/chat/completions",
                 "/v1/responses", "/tokenize", "/detokenize", "/health", "/metrics", "/ping",
                 "/invocations"):
        assert path in spec["paths"]
    ref = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]["$ref"]
    assert ref.split("/")[-1] in spec["components"]["schemas"]


def test_sagemaker_ping_and_invocations_route_by_the_bodys_shape(servers):
    """vLLM's SageMaker routes: /ping (GET and POST) is /health; /invocations sends a chat
    body to chat completions and a completion body to completions, and answers a body no
    generation route takes (an embeddings one) or not JSON with a 400."""
    for method in ("GET", "POST"):
        status, _, _ = _post(servers, "/ping", method=method)
        assert status == 200, method
    status, _, chat = _post(servers, "/invocations", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "temperature": 0.0})
    assert status == 200 and chat["object"] == "chat.completion", chat
    assert chat["usage"]["completion_tokens"] == 2
    status, _, cmpl = _post(servers, "/invocations", {
        "model": MODEL, "prompt": "hello", "max_tokens": 3, "temperature": 0.0,
        "ignore_eos": True})
    assert status == 200 and cmpl["object"] == "text_completion", cmpl
    status, _, direct = _post(servers, "/v1/completions", {
        "model": MODEL, "prompt": "hello", "max_tokens": 3, "temperature": 0.0,
        "ignore_eos": True})
    assert cmpl["choices"][0]["text"] == direct["choices"][0]["text"]
    status, _, err = _post(servers, "/invocations", {"model": MODEL, "input": "hi"})
    assert status == 400 and "Cannot find suitable handler" in err["error"]["message"]
    assert "ChatCompletionRequest" in err["error"]["message"]
    status, _, err = _post(servers, "/invocations", {"prompt": "hi", "max_tokns": 2})
    assert status == 400 and "max_tokns" in err["error"]["message"]  # the completions 400
    status, _, err = _post(servers, "/invocations", data=b"{not json")
    assert status == 400 and "not valid JSON" in err["error"]["message"]


def test_metrics_expose_vllm_names_and_counters_move(servers, client):
    def scrape():
        status, _, text = _post(servers, "/metrics", method="GET")
        assert status == 200
        vals = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, val = line.rpartition(" ")
                vals[name.split("{")[0] if "_bucket" not in name else name] = float(val)
        return text, vals

    text, before = scrape()
    for name in ("jaxllm:num_requests_running", "jaxllm:num_requests_waiting",
                 "jaxllm:kv_cache_usage_perc", "jaxllm:prefix_cache_hits_total",
                 "jaxllm:prefix_cache_queries_total", "jaxllm:prompt_tokens_total",
                 "jaxllm:generation_tokens_total", "jaxllm:time_to_first_token_seconds_count",
                 "jaxllm:time_per_output_token_seconds_count",
                 "jaxllm:e2e_request_latency_seconds_count"):
        assert name in text, name
    out = client.completions.create(model=MODEL, prompt="count me", max_tokens=3, n=2,
                                    temperature=0.0, extra_body={"ignore_eos": True})
    _, after = scrape()

    def moved(name):
        return after[name] - before.get(name, 0.0)

    assert moved("jaxllm:generation_tokens_total") >= 6
    assert after["jaxllm:prompt_tokens_total"] > before["jaxllm:prompt_tokens_total"]
    assert moved("jaxllm:e2e_request_latency_seconds_count") == 1
    assert moved("jaxllm:time_to_first_token_seconds_count") == 2  # one per sample
    # vLLM's per-request histograms, from the request's RequestStateStats
    for phase in ("queue", "prefill", "decode", "inference"):
        assert moved(f"jaxllm:request_{phase}_time_seconds_count") == 1, phase
    inference = moved("jaxllm:request_inference_time_seconds_sum")
    parts = moved("jaxllm:request_prefill_time_seconds_sum") + moved(
        "jaxllm:request_decode_time_seconds_sum")
    assert inference > 0 and abs(inference - parts) < 1e-6
    assert moved("jaxllm:request_generation_tokens_sum") == 6
    assert moved("jaxllm:request_prompt_tokens_sum") == out.usage.prompt_tokens
    assert moved("jaxllm:request_params_n_sum") == 2
    assert moved("jaxllm:request_params_max_tokens_sum") == 3  # the request's, not per sample
    assert moved("jaxllm:request_params_max_tokens_count") == 1
    assert moved("jaxllm:iteration_tokens_total_count") >= 3  # a prefill and two decodes
    assert moved("jaxllm:iteration_tokens_total_sum") >= out.usage.prompt_tokens + 2


# -- load, fuzz, lifecycle ------------------------------------------------------------------------
def test_64_concurrent_streams_with_a_third_disconnecting_leave_the_server_healthy(servers, engine):
    _wait_idle(engine)

    async def one(s, i):
        body = {"model": MODEL, "prompt": f"stream number {i}", "max_tokens": 8,
                "ignore_eos": True, "stream": True, "temperature": 1.0, "seed": i}
        async with s.post(servers.main + "/v1/completions", json=body) as r:
            assert r.status == 200
            if i % 3 == 0:
                await r.content.readline()
                r.close()  # gone mid-stream
                return None
            events = (await r.text()).split("\n\n")
            assert "data: [DONE]" in events
            return sum(1 for e in events if e.startswith("data: {"))

    async def go():
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as s:
            return await asyncio.gather(*(one(s, i) for i in range(64)))

    results = asyncio.run(go())
    assert sum(r is None for r in results) == 22 and all(r for r in results if r is not None)
    _wait_idle(engine, timeout=20)
    status, _, _ = _post(servers, "/health", method="GET")
    assert status == 200
    status, _, text = _post(servers, "/metrics", method="GET")
    assert 'jaxllm:num_requests_running{model_name="tiny-llama"} 0.0' in text


def test_fuzzed_requests_never_get_a_5xx(servers, engine):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.sampled_from([-1, 0, 1, 2, 20, 21, 2**31, -2**31]),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
    values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                       st.dictionaries(st.text(max_size=4), c,
                                                                       max_size=3)), max_leaves=6)
    fields = ["model", "prompt", "messages", "n", "temperature", "top_p", "seed", "stop",
              "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
              "echo", "stream", "stream_options", "user", "top_k", "min_p", "repetition_penalty",
              "min_tokens", "ignore_eos", "stop_token_ids", "best_of", "suffix",
              "max_completion_tokens", "response_format", "tools", "tokens", "bogus",
              "structured_outputs", "guided_json", "guided_regex", "guided_choice",
              "allowed_token_ids", "input", "instructions", "text", "tool_choice"]
    bodies = st.dictionaries(st.sampled_from(fields), values, max_size=6)
    small = st.one_of(st.sampled_from([1, 2]), values)  # long generations only slow the fuzz
    paths = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize",
                             "/detokenize", "/v1/responses"])
    seen = []

    @hypothesis.settings(max_examples=80, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(path=paths, body=bodies, max_tokens=small,
                      prompt=st.one_of(st.just("fuzz"), values),
                      messages=st.one_of(st.just([{"role": "user", "content": "fuzz"}]), values))
    def check(path, body, max_tokens, prompt, messages):
        base = {"/v1/completions": {"prompt": prompt, "max_tokens": max_tokens},
                "/v1/chat/completions": {"messages": messages, "max_tokens": max_tokens},
                "/tokenize": {"prompt": prompt}, "/detokenize": {"tokens": [1, 2]},
                "/v1/responses": {"input": messages, "max_output_tokens": max_tokens}}[path]
        body = {**base, **body}
        if "max_tokens" in base:
            body["max_tokens"] = max_tokens
        if path == "/v1/responses":
            body = {k: v for k, v in body.items() if k not in ("max_tokens", "prompt")}
            body["max_output_tokens"] = max_tokens
        body.pop("stream", None)
        status, _, resp = _post(servers, path, body)
        seen.append(status)
        assert status < 500, (path, body, resp)
        if status >= 400:
            assert set(resp["error"]) == {"message", "type", "param", "code"}

    check()
    assert any(s == 200 for s in seen) and any(s == 400 for s in seen)
    _wait_idle(engine)
    assert engine.is_running


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_stops_gracefully_when_asked(engine, caplog):
    from server.cli import serve

    port = _free_port()

    async def go():
        stop = asyncio.Event()
        task = asyncio.create_task(serve(engine, host="127.0.0.1", port=port, stop=stop,
                                         shutdown_timeout=2.0, served_model_name=MODEL,
                                         started_at=time.perf_counter() - 42.0))
        for _ in range(100):
            try:
                async with aiohttp.ClientSession() as s:
                    async with s.get(f"http://127.0.0.1:{port}/health") as r:
                        assert r.status == 200
                        break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 10)

    with caplog.at_level("INFO", logger="jaxllm.server"):
        asyncio.run(go())
    assert engine.is_running  # the engine is the caller's to stop
    # the start-up time is logged once the server accepts requests (issue 9)
    assert re.search(r"ready 4\d\.\d s after start", caplog.text), caplog.text


def test_serve_over_tls_with_vllms_ssl_flags(engine, tmp_path):
    """--ssl-certfile / --ssl-keyfile: the server speaks HTTPS (a self-signed certificate the
    client trusts here); a plain-HTTP client gets no answer from it."""
    import ssl
    import subprocess

    from server.cli import serve

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    port = _free_port()

    async def go():
        stop = asyncio.Event()
        task = asyncio.create_task(serve(engine, host="127.0.0.1", port=port, stop=stop,
                                         shutdown_timeout=2.0, served_model_name=MODEL,
                                         ssl_certfile=str(cert), ssl_keyfile=str(key)))
        trust = ssl.create_default_context(cafile=str(cert))
        try:
            for _ in range(100):
                try:
                    async with aiohttp.ClientSession() as s:
                        async with s.get(f"https://127.0.0.1:{port}/v1/models",
                                         ssl=trust) as r:
                            assert r.status == 200 and (await r.json())["data"][0]["id"] == MODEL
                            break
                except aiohttp.ClientConnectorError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the TLS server never answered")
            with pytest.raises(aiohttp.ClientError):
                async with aiohttp.ClientSession() as s:
                    async with s.get(f"http://127.0.0.1:{port}/v1/models") as r:
                        await r.read()
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)

    asyncio.run(go())
    with pytest.raises(ValueError, match="ssl_certfile"):
        asyncio.run(serve(engine, host="127.0.0.1", port=port, ssl_keyfile=str(key)))


def test_serve_parser_reads_flags_and_the_api_key_from_the_environment(monkeypatch):
    import argparse

    from jaxllm.cli import add_engine_args
    from server.cli import add_serve_parser

    monkeypatch.setenv("JAXLLM_API_KEY", "from-env")
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"), add_engine_args)
    args = parser.parse_args(["serve", "/models/x", "--port", "9000", "--served-model-name", "m"])
    assert (args.model, args.port, args.api_key, args.served_model_name) == (
        "/models/x", 9000, ["from-env"], ["m"])
    monkeypatch.delenv("JAXLLM_API_KEY")
    monkeypatch.setenv("VLLM_API_KEY", "vllm-env")  # vLLM's variable, when ours is unset
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"), add_engine_args)
    assert parser.parse_args(["serve"]).api_key == ["vllm-env"]
    assert parser.parse_args(["serve", "--api-key", "a", "b"]).api_key == ["a", "b"]
    assert parser.parse_args(["serve"]).model is None
    args = parser.parse_args(["serve", "--enable-auto-tool-choice", "--tool-call-parser",
                              "llama3_json"])
    assert (args.enable_auto_tool_choice, args.tool_call_parser) == (True, "llama3_json")
    args = parser.parse_args(["serve", "--reasoning-parser", "qwen3",
                              "--structured-outputs-config", '{"disable_any_whitespace": true}'])
    from jaxllm.cli import engine_kwargs
    from server.cli import serve_engine_kwargs

    kw = serve_engine_kwargs(args, engine_kwargs(args))
    assert kw["structured_outputs_config"] == {"disable_any_whitespace": True,
                                               "reasoning_parser": "qwen3"}
    assert kw["usage_context"] == "server"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--tool-call-parser", "jamba"])  # not written here
    # every ServerOptions field has its flag (server_options reads them all)
    from server.cli import server_options

    args = parser.parse_args(["serve", "--enable-log-requests", "--max-log-len", "7",
                              "--allowed-origins", '["https://a"]', "--allow-credentials",
                              "--return-tokens-as-token-ids", "--enable-prompt-tokens-details",
                              "--enable-force-include-usage", "--trust-request-chat-template",
                              "--enable-request-id-headers"])
    assert server_options(args) == ServerOptions(
        return_tokens_as_token_ids=True, allowed_origins=("https://a",), allow_credentials=True,
        enable_prompt_tokens_details=True, enable_force_include_usage=True,
        trust_request_chat_template=True, enable_log_requests=True, max_log_len=7,
        enable_request_id_headers=True)
    assert server_options(parser.parse_args(["serve"])) == ServerOptions()


def test_client_disconnect_mid_request_aborts_a_non_streamed_completion(servers, engine):
    _wait_idle(engine)
    before = engine.get_stats()["generation_tokens"]

    async def go():
        timeout = aiohttp.ClientTimeout(total=0.3)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 240, "ignore_eos": True}
            with pytest.raises(asyncio.TimeoutError):
                async with s.post(servers.main + "/v1/completions", json=body) as r:
                    await r.read()

    asyncio.run(go())
    _wait_idle(engine, timeout=20)  # aborted: nothing running, every page back
    assert engine.get_stats()["generation_tokens"] - before < 240


@pytest.mark.slow
def test_sigterm_stops_a_real_server_process_gracefully_with_exit_0(small_llama_folder,
                                                                    tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxllm.cli", "serve", str(small_llama_folder), "--port", str(port),
         "--dtype", "float32", "--max-model-len", "64", "--max-num-batched-tokens", "16",
         "--num-pages", "16", "--max-num-seqs", "4",
         "--compilation-cache-dir", str(tmp_path / "xla")],
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        healthy = False
        while time.time() < deadline and proc.poll() is None and not healthy:
            try:
                status, _, _ = _post(None, "/health", base=f"http://127.0.0.1:{port}",
                                     method="GET")
                healthy = status == 200
            except aiohttp.ClientConnectionError:
                time.sleep(0.5)
        assert healthy, proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timeout"
        # The start-up compiles went to the persistent cache a restart reads.
        assert len(list((tmp_path / "xla").iterdir())) >= 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_an_unusable_compilation_cache_dir_is_a_warning_not_a_failure(tmp_path, caplog):
    import jax

    from jaxllm.cli import enable_compilation_cache

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    before = jax.config.jax_compilation_cache_dir
    with caplog.at_level("WARNING", logger="jaxllm"):
        enable_compilation_cache(str(blocker / "xla"))  # a directory under a file: cannot exist
    assert "compilation cache off" in caplog.text
    assert jax.config.jax_compilation_cache_dir == before  # left as it was
    enable_compilation_cache("")  # '' turns it off: nothing to do, nothing said
    assert jax.config.jax_compilation_cache_dir == before


def test_a_client_that_stops_reading_does_not_stall_other_streams(servers, engine, client):
    _wait_idle(engine)

    async def go():
        # A: a streaming request whose client never reads a byte of the response.
        host, port = servers.main.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        body = json.dumps({"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 200,
                           "ignore_eos": True, "stream": True}).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        await asyncio.sleep(0.2)
        # B: another client's stream runs to the end meanwhile.
        t0 = time.time()
        out = await asyncio.to_thread(lambda: "".join(
            c.choices[0].text for c in client.completions.create(
                model=MODEL, prompt=[8, 9], max_tokens=20, stream=True, extra_body={
                    "ignore_eos": True}) if c.choices))
        assert out and time.time() - t0 < 60
        writer.close()

    asyncio.run(go())
    _wait_idle(engine, timeout=20)


def test_jaxllm_serve_builds_its_engine_with_the_server_batch_defaults(monkeypatch):
    # `jaxllm serve` is vLLM's OPENAI_API_SERVER usage context: its engine (and any distributed
    # follower, which gets the same keywords) derives the server's token budget, not the LLM
    # class's. The engine is stubbed: it records its keywords and refuses to start.
    import jaxllm
    from jaxllm.cli import main

    seen = {}

    def recording_engine(**kwargs):
        seen.update(kwargs)
        raise ValueError("stub engine: not started")
    monkeypatch.setattr(jaxllm, "AsyncEngine", recording_engine)
    assert main(["serve", "--max-num-seqs", "3", "--compilation-cache-dir", ""]) != 0
    assert seen["usage_context"] == "server" and seen["max_num_seqs"] == 3
    assert seen["max_num_batched_tokens"] is None  # left to default_batch_limits
