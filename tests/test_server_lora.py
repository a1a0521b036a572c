"""LoRA adapters through the OpenAI-compatible server, as vLLM serves them: --lora-modules are
models of their own (by name, on every generation route), /v1/models lists them, and
/v1/load_lora_adapter / /v1/unload_lora_adapter change them at runtime when the environment
allows it (VLLM_ALLOW_RUNTIME_LORA_UPDATING).

One AsyncEngine (enable_lora, two device slots) on the small random Llama serves every test;
its adapters are real PEFT adapters, and the PEFT torch model is the reference of their tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import openai
import pytest

from server.app import ServerOptions, build_app

from .helpers import small_llama_folder, write_peft_adapter  # noqa: F401  (fixture)
from .test_server import _post, _Servers

MODEL = "tiny-llama"
PROMPT_IDS = [1, 504, 3287, 314, 260, 1345, 28, 469]  # a prompt as token ids: no tokenizer doubt
N_TOKENS = 8


@pytest.fixture(scope="module")
def adapters(small_llama_folder, tmp_path_factory):
    """Two PEFT adapters of the small Llama (different weights): {name: (folder, reference's
    greedy tokens)}, and the base model's greedy tokens under None."""
    import torch

    ids = torch.tensor([PROMPT_IDS])

    def greedy(model) -> list[int]:  # min_new_tokens: the reference never stops at EOS
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=N_TOKENS, min_new_tokens=N_TOKENS,
                                 do_sample=False, pad_token_id=0)
        return out[0, len(PROMPT_IDS):].tolist()

    out = {}
    for name, seed in (("sql-lora", 1), ("chat-lora", 2)):
        folder = tmp_path_factory.mktemp(name)
        peft_model = write_peft_adapter(small_llama_folder, folder, seed=seed)
        out[name] = (str(folder), greedy(peft_model))
        with peft_model.disable_adapter():
            out[None] = (None, greedy(peft_model))
    return out


@pytest.fixture(scope="module")
def engine(small_llama_folder):
    from jaxllm import AsyncEngine

    eng = AsyncEngine(model=str(small_llama_folder), dtype="float32", max_model_len=256,
                      page_size=8, num_pages=128, max_num_batched_tokens=64, max_num_seqs=8,
                      token_buckets=(64,), enable_lora=True, max_loras=2)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def servers(engine, adapters):
    """``main``: both adapters as --lora-modules (one in each of vLLM's formats), runtime
    loading on; ``plain``: the same engine, runtime loading off (the variable unset)."""
    s = _Servers()
    modules = [f"sql-lora={adapters['sql-lora'][0]}",
               json.dumps({"name": "chat-lora", "path": adapters["chat-lora"][0],
                           "base_model_name": MODEL})]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "true")
        s.main = s.start(build_app(engine, served_model_name=MODEL,
                                   options=ServerOptions(lora_modules=modules)))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
        mp.delenv("JAXLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
        s.plain = s.start(build_app(engine, served_model_name=MODEL))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(servers):
    return openai.OpenAI(base_url=servers.main + "/v1", api_key="unused", max_retries=0)


def _tokens(client, model: str) -> list[int]:
    r = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=N_TOKENS,
                                  temperature=0.0, extra_body={"ignore_eos": True,
                                                               "return_token_ids": True})
    assert r.model == model
    return r.choices[0].model_extra["token_ids"]


def _send(servers, path, body, *, base=None):
    """(status, parsed JSON or text) of a POST."""
    status, _, out = _post(servers, path, body, base=base)
    return status, out


def _error(status, body, expected, code=None):
    """The message of an error reply in the server's OpenAI shape."""
    assert status == expected, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]["message"]


# -- serving the --lora-modules -------------------------------------------------------------------
def test_a_lora_module_completes_with_the_peft_models_greedy_tokens(client, servers, adapters):
    base = _tokens(client, MODEL)
    assert base == adapters[None][1]
    for name in ("sql-lora", "chat-lora"):
        assert _tokens(client, name) == adapters[name][1]
        assert adapters[name][1] != base
    assert adapters["sql-lora"][1] != adapters["chat-lora"][1]

    async def together():  # both adapters and the base in one batch
        c = openai.AsyncOpenAI(base_url=servers.main + "/v1", api_key="x", max_retries=0)
        rs = await asyncio.gather(*[c.completions.create(
            model=m, prompt=PROMPT_IDS, max_tokens=N_TOKENS, temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True})
            for m in ("sql-lora", MODEL, "chat-lora", "sql-lora")])
        await c.close()
        return [r.choices[0].model_extra["token_ids"] for r in rs]

    assert asyncio.run(together()) == [adapters["sql-lora"][1], base, adapters["chat-lora"][1],
                                       adapters["sql-lora"][1]]
    # /metrics: vLLM's lora_requests_info gauge, the adapters as labels (none running now)
    import urllib.request

    with urllib.request.urlopen(servers.main + "/metrics") as r:
        text = r.read().decode()
    (line,) = [x for x in text.splitlines() if x.startswith("jaxllm:lora_requests_info{")]
    assert 'running_lora_adapters=""' in line and 'max_lora="2"' in line, line


def test_each_module_name_reaches_the_engine_as_one_lora_request_from_every_route(
        client, engine, monkeypatch):
    """Ids 1, 2 in the order of --lora-modules, the same id on every request; the base name
    runs without an adapter."""
    seen = []
    real = engine.engine.add_request

    def spy(rid, prompt, params=None, arrival_time=None, priority=0, lora_request=None):
        seen.append(lora_request and (lora_request.lora_name, lora_request.lora_int_id))
        return real(rid, prompt, params, arrival_time, priority, lora_request)

    monkeypatch.setattr(engine.engine, "add_request", spy)
    msgs = [{"role": "user", "content": "x"}]
    client.completions.create(model="sql-lora", prompt="x", max_tokens=1)
    client.chat.completions.create(model="chat-lora", messages=msgs, max_tokens=1)
    client.responses.create(model="sql-lora", input="x", max_output_tokens=1)
    client.chat.completions.create(model="sql-lora", messages=msgs, max_tokens=1)
    client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert seen == [("sql-lora", 1), ("chat-lora", 2), ("sql-lora", 1),
                                           ("sql-lora", 1), None]


def test_chat_with_a_lora_name_streams_what_it_answers_whole(client):
    kw = dict(messages=[{"role": "user", "content": "Name a river."}], max_tokens=N_TOKENS,
              temperature=0.0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(model="chat-lora", **kw)
    assert full.model == "chat-lora" and full.usage.completion_tokens == N_TOKENS
    chunks = list(client.chat.completions.create(model="chat-lora", stream=True, **kw))
    assert {c.model for c in chunks} == {"chat-lora"}
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    base = client.chat.completions.create(model=MODEL, **kw).choices[0].message.content
    assert base != full.choices[0].message.content


def test_models_list_each_adapter_with_its_path_as_root_and_its_base_as_parent(client,
                                                                               adapters):
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards) == [MODEL, "sql-lora", "chat-lora"]
    for name in ("sql-lora", "chat-lora"):
        assert cards[name].model_extra["root"] == adapters[name][0]
        assert cards[name].model_extra["parent"] == MODEL
    assert cards[MODEL].model_extra["parent"] is None
    assert client.models.retrieve("chat-lora").model_extra["root"] == adapters["chat-lora"][0]


def test_unknown_models_are_404_and_tokenize_takes_adapter_names(client, servers):
    for call in (lambda: client.completions.create(model="nope", prompt="x", max_tokens=1),
                 lambda: client.chat.completions.create(
                     model="nope", messages=[{"role": "user", "content": "x"}], max_tokens=1),
                 lambda: client.models.retrieve("nope")):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["code"] == "model_not_found" and "sql-lora" in e.value.message
    status, body = _send(servers, "/tokenize", {"model": "sql-lora", "prompt": "Hi there"})
    assert status == 200 and body["count"] == len(body["tokens"]) > 0
    status, body = _send(servers, "/detokenize", {"model": "chat-lora", "tokens": body["tokens"]})
    assert status == 200 and body["prompt"] == "Hi there"
    _error(*_send(servers, "/tokenize", {"model": "nope", "prompt": "x"}), 404,
           "model_not_found")
    # a generating engine embeds nothing, under an adapter's name as under the base's
    msg = _error(*_send(servers, "/v1/embeddings", {"model": "sql-lora", "input": "x"}), 400)
    assert "only supported for pooling models" in msg


def test_pooling_routes_run_the_adapter_the_model_names(small_llama_folder, adapters):
    """On a pooling engine with LoRA, /v1/embeddings, /score and /rerank under an adapter's
    name embed with it (vLLM passes the request's LoRARequest to its pooling runs): the PEFT
    model's last-token final hidden state, normalized; the base name, the base model's."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jaxllm import AsyncEngine

    base = AutoModelForCausalLM.from_pretrained(str(small_llama_folder), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, adapters["sql-lora"][0]).eval()
    texts = ["Hi there", "The capital of France is", "SELECT name FROM users"]

    def ref(prompt, lora: bool):
        with torch.no_grad(), (contextlib.nullcontext() if lora else peft.disable_adapter()):
            h = peft.base_model.model.model(torch.tensor([prompt])).last_hidden_state[0, -1]
        return (h / h.norm()).numpy().astype(np.float64)

    eng = AsyncEngine(model=str(small_llama_folder), runner="pooling", dtype="float32",
                      max_model_len=64, page_size=8, num_pages=32, max_num_batched_tokens=32,
                      max_num_seqs=4, enable_lora=True, max_loras=1)
    s = _Servers()
    try:
        url = s.start(build_app(eng, served_model_name=MODEL, options=ServerOptions(
            lora_modules=[f"sql-lora={adapters['sql-lora'][0]}"])))

        def post(path, body):
            status, _, out = _post(s, path, body, base=url)
            assert status == 200, out
            return out

        scores = {}
        for model, lora in (("sql-lora", True), (MODEL, False)):
            refs = [ref(post("/tokenize", {"model": model, "prompt": t})["tokens"], lora)
                    for t in texts]
            body = post("/v1/embeddings", {"model": model, "input": texts})
            assert body["model"] == model
            for d, r in zip(body["data"], refs):
                np.testing.assert_allclose(d["embedding"], r, atol=2e-5)
            want = [float(refs[0] @ r) for r in refs[1:]]
            body = post("/score", {"model": model, "text_1": texts[0], "text_2": texts[1:]})
            scores[model] = [d["score"] for d in body["data"]]
            np.testing.assert_allclose(scores[model], want, atol=2e-5)
            body = post("/rerank", {"model": model, "query": texts[0], "documents": texts[1:]})
            np.testing.assert_allclose(sorted(r["relevance_score"] for r in body["results"]),
                                       sorted(want), atol=2e-5)
        assert not np.allclose(scores["sql-lora"], scores[MODEL], atol=1e-3)
    finally:
        s.close()
        eng.shutdown()


def test_beam_search_runs_the_adapter_the_model_names(servers, adapters):
    """use_beam_search with an adapter's name searches with the adapter (vLLM passes the
    request's LoRARequest to its beam search): one beam is the PEFT model's greedy tokens,
    and two beams start from them where the base model's do not."""
    def beams(model, n):
        status, body = _send(servers, "/v1/completions", {
            "model": model, "prompt": PROMPT_IDS, "max_tokens": N_TOKENS, "n": n,
            "use_beam_search": True, "ignore_eos": True, "return_token_ids": True})
        assert status == 200, body
        assert body["model"] == model and len(body["choices"]) == n
        return [c["token_ids"] for c in body["choices"]]

    for name in ("sql-lora", "chat-lora", MODEL):
        assert beams(name, 1) == [adapters[None if name == MODEL else name][1]]
    two = beams("sql-lora", 2)
    assert two != beams(MODEL, 2) and len({tuple(t) for t in two}) == 2


# -- runtime loading ------------------------------------------------------------------------------
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


def test_load_and_unload_an_adapter_at_runtime(client, servers, adapters, tmp_path):
    path = adapters["chat-lora"][0]
    assert _send(servers, LOAD, {"lora_name": "late", "lora_path": path}) == (
        200, "Success: LoRA adapter 'late' added successfully.")
    card = {m.id: m for m in client.models.list().data}["late"]
    assert (card.model_extra["root"], card.model_extra["parent"]) == (path, MODEL)
    assert _tokens(client, "late") == adapters["chat-lora"][1]
    # vLLM's refusals, 400: a name already loaded, a missing field; also a base model's name
    for body, said in (({"lora_name": "late", "lora_path": path},
                        "The lora adapter 'late' has already been loaded."),
                       ({"lora_name": "x"}, "Both 'lora_name' and 'lora_path' must be provided."),
                       ({"lora_path": path}, "Both 'lora_name' and 'lora_path' must be provided."),
                       ({"lora_name": MODEL, "lora_path": path}, "is the name of a base model")):
        assert said in _error(*_send(servers, LOAD, body), 400)
    # no adapter there: 404; an adapter the engine cannot serve: 400 with the engine's reason
    _error(*_send(servers, LOAD, {"lora_name": "gone", "lora_path": str(tmp_path / "none")}),
           404, "lora_adapter_not_found")
    with open(adapters["sql-lora"][0] + "/adapter_config.json") as f:
        cfg = json.load(f)
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    assert "DoRA" in _error(*_send(servers, LOAD, {"lora_name": "dora",
                                                   "lora_path": str(tmp_path / "dora")}), 400)
    ids = [m.id for m in client.models.list().data]
    assert "gone" not in ids and "dora" not in ids
    # load_inplace (vLLM's): the name now serves the other adapter's weights
    status, _ = _send(servers, LOAD, {"lora_name": "late", "lora_path": adapters["sql-lora"][0],
                                      "load_inplace": True})
    assert status == 200 and _tokens(client, "late") == adapters["sql-lora"][1]
    # unloaded by name, it is gone: 404 on use and on a second unload
    assert _send(servers, UNLOAD, {"lora_name": "late"}) == (
        200, "Success: LoRA adapter 'late' removed successfully.")
    assert "late" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        _tokens(client, "late")
    assert _error(*_send(servers, UNLOAD, {"lora_name": "late"}), 404,
                  "lora_adapter_not_found") == "The lora adapter 'late' cannot be found."
    _error(*_send(servers, UNLOAD, {}), 400)
    # loaded again, it has a new id (ids are never reused), which unloads it too
    assert _send(servers, LOAD, {"lora_name": "late", "lora_path": path})[0] == 200
    late = _server(servers).loras.get("late")
    assert late.lora_int_id > 3
    assert _send(servers, UNLOAD, {"lora_int_id": late.lora_int_id}) == (
        200, "Success: LoRA adapter 'late' removed successfully.")
    assert _error(*_send(servers, UNLOAD, {"lora_int_id": 999}), 404).endswith(
        "with lora_int_id 999 cannot be found.")


def _server(servers):
    from server.app import SERVER_KEY

    return servers.runners[0].app[SERVER_KEY]


def test_unloading_an_adapter_a_request_uses_is_400_and_the_request_finishes(client, servers):
    stream = client.completions.create(model="sql-lora", prompt="Once upon a time",
                                       max_tokens=60, temperature=0.0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = [next(iter(stream))]  # running now
    msg = _error(*_send(servers, UNLOAD, {"lora_name": "sql-lora"}), 400)
    assert "used by running requests" in msg
    chunks += list(stream)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert "sql-lora" in [m.id for m in client.models.list().data]


def test_runtime_lora_routes_are_404_without_the_environment_variable(servers, adapters):
    for path, body in ((LOAD, {"lora_name": "x", "lora_path": adapters["sql-lora"][0]}),
                       (UNLOAD, {"lora_name": "sql-lora"})):
        _error(*_send(servers, path, body, base=servers.plain), 404, "not_found")
    # that app serves no adapters: their names are unknown there
    _error(*_send(servers, "/v1/completions", {"model": "sql-lora", "prompt": "x"},
                  base=servers.plain), 404, "model_not_found")


def test_a_bad_lora_module_stops_the_server_before_it_serves(servers, engine, tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=rf"--lora-modules bad={missing}: .*adapter_config"):
        servers.start(build_app(engine, served_model_name=MODEL,
                                options={"lora_modules": [f"bad={missing}"]}))
    with pytest.raises(ValueError, match="is the name of a base model"):
        build_app(engine, served_model_name=MODEL, options={"lora_modules": [f"{MODEL}=/x"]})
    with pytest.raises(ValueError, match="given more than once"):
        ServerOptions(lora_modules=["a=/x", {"name": "a", "path": "/y"}])


def test_a_front_end_without_start_up_reads_a_module_at_its_first_request(servers, engine,
                                                                          adapters, tmp_path):
    """Ray Serve's replicas call OpenAIServer.handle without aiohttp's start-up: the engine
    reads a module's adapter when a request first names it; a missing folder is then a 400."""
    from server.app import SERVER_KEY, Call

    srv = build_app(engine, served_model_name=MODEL, options={"lora_modules": [
        f"lazy={adapters['sql-lora'][0]}", f"nowhere={tmp_path / 'none'}"]})[SERVER_KEY]

    def post(model):
        body = {"model": model, "prompt": PROMPT_IDS, "max_tokens": N_TOKENS,
                "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
        reply = servers.run(srv.handle(Call("POST", "/v1/completions", {},
                                            json.dumps(body).encode())))
        servers.run(reply.aclose())
        return reply.status, json.loads(reply.body)

    status, body = post("lazy")
    assert status == 200 and body["choices"][0]["token_ids"] == adapters["sql-lora"][1]
    assert "adapter_config.json" in _error(*post("nowhere"), 400)


# -- the command line -----------------------------------------------------------------------------
def test_serve_reads_lora_flags_in_vllms_formats_and_refuses_bad_ones(capsys):
    import argparse

    from jaxllm.cli import add_engine_args, engine_kwargs, main
    from server.cli import add_serve_parser, check_serve_args, server_options
    from server.lora import LoRAModulePath

    parser = argparse.ArgumentParser()
    serve = add_serve_parser(parser.add_subparsers(dest="command"), add_engine_args)
    args = parser.parse_args([
        "serve", "--enable-lora", "--max-loras", "4", "--max-lora-rank", "64",
        "--max-cpu-loras", "8", "--lora-modules", "sql=/a/sql", '{"name": "chat", "path": '
        '"/a/chat", "base_model_name": "m"}', "--lora-modules", '[{"name": "x", "path": "/p=1"}]'])
    check_serve_args(serve, args)
    assert server_options(args).lora_modules == (
        LoRAModulePath("sql", "/a/sql"), LoRAModulePath("chat", "/a/chat", "m"),
        LoRAModulePath("x", "/p=1"))
    kw = engine_kwargs(args)
    assert (kw["enable_lora"], kw["max_loras"], kw["max_lora_rank"], kw["max_cpu_loras"]) == (
        True, 4, 64, 8)
    assert engine_kwargs(parser.parse_args(["serve"]))["enable_lora"] is False
    assert kw["specialize_lora"] is True
    assert engine_kwargs(parser.parse_args(["serve", "--enable-lora", "--no-specialize-lora"])
                         )["specialize_lora"] is False
    for bad, said in ((["nopath"], "expected name=path"), (["a="], "expected name=path"),
                      (["{oops"], "invalid JSON"), (['{"name": "a"}'], "'path'"),
                      (['{"name": "a", "path": "/p", "rank": 8}'], "unknown field"),
                      (["[1]"], "JSON object"), (["a=/x", "a=/y"], "more than once")):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["serve", "--enable-lora", "--lora-modules", *bad])
        assert e.value.code == 2 and said in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # vLLM's rule, before the model loads
        main(["serve", "--lora-modules", "a=/x"])
    assert e.value.code == 2
    assert "--lora-modules needs --enable-lora" in capsys.readouterr().err
