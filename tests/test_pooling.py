"""Embeddings from a decoder LLM (engine/pooling.py, LLM.embed, /v1/embeddings) against HF
transformers' final hidden states (torch, float32): LAST / MEAN / CLS pooling, normalized or
not, prompts packed into steps and a prompt longer than a step run in chunks."""

from __future__ import annotations

import base64
import contextlib

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxllm import LLM, SamplingParams
from jaxllm.pooling_params import PoolingParams

from .helpers import cli_engine_kwargs, small_llama_folder  # noqa: F401

KW = dict(dtype="float32", max_model_len=64, page_size=8, num_pages=16,
          max_num_batched_tokens=16, max_num_seqs=4, seed=0)
PROMPTS = [[5, 6, 7], list(range(3, 40)), [100, 200, 300, 400, 500], [9] * 11, [42]]


@pytest.fixture(scope="module")
def hf_hidden(small_llama_folder):
    """HF's final hidden states (after the last norm) per prompt, float32 [L, E]."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        small_llama_folder, torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return [model.model(torch.tensor([p])).last_hidden_state[0].numpy() for p in PROMPTS]


# A GPU runs float32 GEMMs in TF32 by XLA's default (10 mantissa bits): 2e-4 apart from HF's on
# the H200 (2026-12-05), where a CPU is within 1e-5.
_CPU = jax.default_backend() == "cpu"
TOL = dict(rtol=1e-4, atol=1e-5) if _CPU else dict(rtol=2e-3, atol=1e-3)
RAW_TOL = dict(rtol=1e-4, atol=1e-4) if _CPU else dict(rtol=2e-3, atol=2e-3)  # unnormalized


def _unit(v):
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("kind", ["LAST", "MEAN", "CLS"])
def test_embeddings_match_hf_hidden_states_pooled(small_llama_folder, hf_hidden, kind):
    llm = LLM(str(small_llama_folder), runner="pooling", pooler_config={"pooling_type": kind},
              **KW)
    outs = llm.embed([{"prompt_token_ids": p} for p in PROMPTS])
    pool = {"LAST": lambda h: h[-1], "MEAN": lambda h: h.mean(0), "CLS": lambda h: h[0]}[kind]
    for o, p, h in zip(outs, PROMPTS, hf_hidden):
        assert o.prompt_token_ids == p
        np.testing.assert_allclose(o.outputs.embedding, _unit(pool(h)), **TOL)
    # normalize=False (per request): the raw pooled state
    raw = llm.embed({"prompt_token_ids": PROMPTS[1]}, PoolingParams(normalize=False))[0]
    np.testing.assert_allclose(raw.outputs.embedding, pool(hf_hidden[1]), **RAW_TOL)
    pool_ = llm.llm_engine.page_pool
    assert pool_.num_free_pages == pool_.num_usable_pages  # every page back


def test_encode_pools_every_token_or_the_prompt_as_vllms_tasks(small_llama_folder, hf_hidden):
    """vLLM's LLM.encode: "token_embed" is every prompt token's final hidden state (each row
    normalized; raw with normalize=False), HF's own, across chunks (a 37-token prompt in
    16-token steps); "embed" is LLM.embed's vector; a classifier's "token_classify" is HF's
    per-token head probabilities and "classify" LLM.classify's; no task, or another model's,
    is refused."""
    from jaxllm import PoolingRequestOutput

    llm = LLM(str(small_llama_folder), runner="pooling", **KW)
    outs = llm.encode([{"prompt_token_ids": p} for p in PROMPTS], pooling_task="token_embed")
    for o, p, h in zip(outs, PROMPTS, hf_hidden):
        assert isinstance(o, PoolingRequestOutput) and o.prompt_token_ids == p
        assert o.outputs.data.shape == (len(p), h.shape[1])
        np.testing.assert_allclose(o.outputs.data, h / np.linalg.norm(h, axis=1, keepdims=True),
                                   **TOL)
    [raw] = llm.encode({"prompt_token_ids": PROMPTS[1]}, PoolingParams(normalize=False),
                       pooling_task="token_embed")
    np.testing.assert_allclose(raw.outputs.data, hf_hidden[1], **RAW_TOL)
    [cut] = llm.encode({"prompt_token_ids": PROMPTS[1]}, pooling_task="token_embed",
                       truncate_prompt_tokens=5)
    assert cut.prompt_token_ids == PROMPTS[1][-5:] and cut.outputs.data.shape[0] == 5
    [one] = llm.encode({"prompt_token_ids": PROMPTS[2]}, pooling_task="embed")
    np.testing.assert_allclose(one.outputs.data, llm.embed(
        {"prompt_token_ids": PROMPTS[2]})[0].outputs.embedding, rtol=1e-6)
    for task in (None, "classify", "reward"):
        with pytest.raises(ValueError, match="needs pooling_task"):
            llm.encode([PROMPTS[0]], pooling_task=task)
    pool_ = llm.llm_engine.page_pool
    assert pool_.num_free_pages == pool_.num_usable_pages


def test_encode_classifies_every_token_on_a_classifier(tmp_path):
    hf = _write_classifier(tmp_path / "c3", 3, seed=8)
    llm = LLM(str(tmp_path / "c3"), **KW)
    outs = llm.encode([{"prompt_token_ids": p} for p in PROMPTS[:3]],
                      pooling_task="token_classify")
    with torch.no_grad():
        for o, p in zip(outs, PROMPTS):
            hidden = hf.model(torch.tensor([p])).last_hidden_state
            want = torch.softmax(hf.score(hidden)[0], -1).numpy()
            assert o.outputs.data.shape == (len(p), 3)
            np.testing.assert_allclose(o.outputs.data, want, **RAW_TOL)
    [c] = llm.encode({"prompt_token_ids": PROMPTS[1]}, pooling_task="classify")
    np.testing.assert_allclose(c.outputs.data, llm.classify(
        {"prompt_token_ids": PROMPTS[1]})[0].outputs.probs, rtol=1e-6)
    with pytest.raises(ValueError, match="needs pooling_task"):
        llm.encode([PROMPTS[0]], pooling_task="token_embed")


def _cos(u, v):
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def test_score_is_the_cosine_similarity_of_hf_pooled_states(small_llama_folder, hf_hidden):
    """LLM.score (vLLM's, for an embedding model): 1:N and N:N pairs, each score the cosine
    similarity of the two prompts' pooled final hidden states; the pair's tokens joined by the
    tokenizer's pad token; errors for empty sides and other lengths; every page back."""
    llm = LLM(str(small_llama_folder), runner="pooling", **KW)
    ids = [{"prompt_token_ids": p} for p in PROMPTS]
    want = [[_cos(a[-1].astype(np.float64), b[-1].astype(np.float64)) for b in hf_hidden]
            for a in hf_hidden]
    one_to_n = llm.score(ids[0], ids[1:])
    assert len(one_to_n) == 4
    np.testing.assert_allclose([o.outputs.score for o in one_to_n], want[0][1:], **TOL)
    pad = llm.get_tokenizer().pad_token_id
    assert one_to_n[2].prompt_token_ids == PROMPTS[0] + ([pad] if pad is not None else []) + \
        PROMPTS[3]
    n_to_n = llm.score(ids[:3], ids[2:])
    np.testing.assert_allclose([o.outputs.score for o in n_to_n],
                               [want[0][2], want[1][3], want[2][4]], **TOL)
    assert llm.score(ids[1], ids[1])[0].outputs.score == pytest.approx(1.0, abs=1e-6)
    # a text pair scores as its token ids do; truncate_prompt_tokens keeps each side's last k
    tok = llm.get_tokenizer()
    text = llm.score("The capital of France", ["is Paris", "is Berlin"])
    toks = llm.score({"prompt_token_ids": tok.encode("The capital of France")},
                     [{"prompt_token_ids": tok.encode(t)} for t in ("is Paris", "is Berlin")])
    np.testing.assert_allclose([o.outputs.score for o in text], [o.outputs.score for o in toks],
                               rtol=1e-6)
    cut = llm.score(ids[1], ids[2], truncate_prompt_tokens=2)[0]
    alone = llm.score({"prompt_token_ids": PROMPTS[1][-2:]},
                      {"prompt_token_ids": PROMPTS[2][-2:]})[0]
    assert cut.outputs.score == pytest.approx(alone.outputs.score, rel=1e-6)
    assert cut.prompt_token_ids == alone.prompt_token_ids
    with pytest.raises(ValueError, match="1:1, 1:N or N:N"):
        llm.score(ids[:2], ids[:3])
    with pytest.raises(ValueError, match="At least one"):
        llm.score([], ids[:1])
    pool_ = llm.llm_engine.page_pool
    assert pool_.num_free_pages == pool_.num_usable_pages


def test_pooling_engines_refuse_what_they_cannot_do(small_llama_folder):
    llm = LLM(str(small_llama_folder), runner="pooling", **KW)
    with pytest.raises(ValueError, match="pooling model"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="Matryoshka"):
        llm.embed([[1, 2, 3]], PoolingParams(dimensions=8))
    with pytest.raises(ValueError, match="maximum context length"):
        llm.embed([[1] * 65])
    with pytest.raises(ValueError, match="empty"):
        llm.embed([{"prompt_token_ids": []}])
    # the last k tokens: the same vector as embedding them alone
    a = llm.embed([PROMPTS[1]], PoolingParams(truncate_prompt_tokens=5))[0]
    b = llm.embed([PROMPTS[1][-5:]])[0]
    np.testing.assert_allclose(a.outputs.embedding, b.outputs.embedding, rtol=1e-5, atol=1e-6)
    for bad in (dict(runner="embedding"), dict(runner="pooling",
                                               pooler_config={"pooling_type": "MAX"})):
        with pytest.raises(ValueError, match="runner|pooling_type"):
            LLM(str(small_llama_folder), **{**KW, **bad})
    gen = LLM(str(small_llama_folder), skip_compile_at_start=True, **KW)
    with pytest.raises(ValueError, match="only supported for pooling models"):
        gen.embed([[1, 2, 3]])
    # the flags reach the engine's config
    got = cli_engine_kwargs("--runner", "pooling", "--pooler-config", '{"pooling_type": "MEAN"}')
    assert (got["runner"], got["pooler_config"]) == ("pooling", {"pooling_type": "MEAN"})
    assert cli_engine_kwargs()["runner"] == "auto"


def test_embeddings_endpoint_speaks_openais_format(small_llama_folder, hf_hidden):
    """/v1/embeddings through the openai SDK (which asks for base64 and decodes it), the float
    format, token-id inputs, usage, and a 400 from a generating server."""
    import asyncio

    import openai
    from aiohttp import web

    from jaxllm import AsyncEngine
    from server.app import build_app

    engine = AsyncEngine(model=str(small_llama_folder), runner="pooling", **KW)
    gen_engine = AsyncEngine(model=str(small_llama_folder), skip_compile_at_start=True, **KW)

    async def go():
        runners, bases = [], []
        for eng in (engine, gen_engine):
            r = web.AppRunner(build_app(eng, served_model_name="emb"))
            await r.setup()
            site = web.TCPSite(r, "127.0.0.1", 0)
            await site.start()
            runners.append(r)
            bases.append(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1")
        try:
            c = openai.AsyncOpenAI(base_url=bases[0], api_key="x", max_retries=0)
            r = await c.embeddings.create(model="emb", input=PROMPTS[:3])
            assert [d.index for d in r.data] == [0, 1, 2]
            for d, h in zip(r.data, hf_hidden):
                np.testing.assert_allclose(d.embedding, _unit(h[-1]), **TOL)
            assert r.usage.prompt_tokens == r.usage.total_tokens == 3 + 37 + 5
            raw = await c.embeddings.with_raw_response.create(
                model="emb", input=[PROMPTS[4]], encoding_format="float")
            body = raw.http_response.json()
            assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
            np.testing.assert_allclose(body["data"][0]["embedding"], _unit(hf_hidden[4][-1]),
                                       **TOL)
            raw = await c.embeddings.with_raw_response.create(
                model="emb", input="hello", encoding_format="base64")
            vec = np.frombuffer(base64.b64decode(raw.http_response.json()["data"][0][
                "embedding"]), np.float32)
            assert vec.shape == (64,) and abs(np.linalg.norm(vec) - 1) < 1e-5
            with pytest.raises(openai.BadRequestError, match="Matryoshka"):
                await c.embeddings.create(model="emb", input="hi", dimensions=8)
            with pytest.raises(openai.BadRequestError, match="input"):
                await c.embeddings.create(model="emb", input=[])
            g = openai.AsyncOpenAI(base_url=bases[1], api_key="x", max_retries=0)
            with pytest.raises(openai.BadRequestError, match="pooling"):
                await g.embeddings.create(model="emb", input="hi")
            await _score_and_rerank_routes(bases)
            await _invocations_on_a_pooling_model(bases[0][:-len("/v1")])
            with pytest.raises(openai.BadRequestError, match="pooling model"):
                await c.completions.create(model="emb", prompt="hi", max_tokens=2)
        finally:
            for r in runners:
                await r.cleanup()

    try:
        asyncio.run(go())
    finally:
        engine.shutdown()
        gen_engine.shutdown()


async def _invocations_on_a_pooling_model(base: str) -> None:
    """vLLM's /invocations on an embedding model: an input body is embeddings (the same
    vectors as /v1/embeddings), a text pair a score, a query with documents a rerank; a chat
    body is a 400 naming the request types this model takes."""
    from aiohttp import ClientSession

    async with ClientSession() as s:
        async def post(path, body, status=200):
            async with s.post(base + path, json=body) as resp:
                assert resp.status == status, await resp.text()
                return await resp.json()

        body = {"model": "emb", "input": PROMPTS[:2], "encoding_format": "float"}
        got, want = await post("/invocations", body), await post("/v1/embeddings", body)
        assert got["object"] == "list" and len(got["data"]) == 2
        for g, w in zip(got["data"], want["data"]):
            np.testing.assert_allclose(g["embedding"], w["embedding"], rtol=1e-6, atol=1e-7)
        pair = {"text_1": "a cat", "text_2": "a dog"}
        got, want = await post("/invocations", pair), await post("/score", pair)
        assert got["data"][0]["score"] == pytest.approx(want["data"][0]["score"], abs=1e-6)
        ranked = await post("/invocations", {"query": "cat", "documents": ["a cat", "a car"]})
        assert len(ranked["results"]) == 2
        # vLLM's /pooling: every token's state by default, a task named, base64, and as
        # /invocations' last route (a body with a task is no embeddings request)
        pooled = await post("/pooling", {"model": "emb", "input": [PROMPTS[0], PROMPTS[2]]})
        assert pooled["id"].startswith("pool-") and pooled["data"][0]["object"] == "pooling"
        assert pooled["usage"]["prompt_tokens"] == 3 + 5
        for d, p in zip(pooled["data"], (PROMPTS[0], PROMPTS[2])):
            rows = np.asarray(d["data"])
            assert rows.shape == (len(p), 64)
            np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)
        task = {"input": [PROMPTS[2]], "task": "embed"}
        last = (await post("/pooling", task))["data"][0]["data"]
        np.testing.assert_allclose(last, pooled["data"][1]["data"][-1], rtol=1e-5, atol=1e-6)
        via = (await post("/invocations", task))["data"][0]["data"]
        np.testing.assert_allclose(via, last, rtol=1e-6)
        b64 = (await post("/pooling", {**task, "encoding_format": "base64"}))["data"][0]
        np.testing.assert_allclose(np.frombuffer(base64.b64decode(b64["data"]), "<f4"), last,
                                   rtol=1e-6)
        bad = (await post("/pooling", {"input": "x", "task": "classify"}, 400))["error"]
        assert "needs pooling_task" in bad["message"]
        err = (await post("/invocations", {"messages": [{"role": "user", "content": "hi"}]},
                          400))["error"]["message"]
        assert "Cannot find suitable handler" in err and "EmbeddingRequest" in err
        assert "ChatCompletionRequest" not in err


async def _score_and_rerank_routes(bases: list[str]) -> None:
    """vLLM's /score and /rerank on the pooling server (bases[0]): scores of the text pairs'
    embeddings, the rerank order and top_n, usage, and the 400s (bases[1] generates)."""
    import aiohttp

    root = bases[0][:-len("/v1")]
    query, docs = "What is the capital of France?", ["Paris is.", "Berlin, surely.", "Rome"]
    async with aiohttp.ClientSession() as http:
        async def post(url, body, status=200):
            async with http.post(url, json=body) as r:
                assert r.status == status, await r.text()
                return await r.json()

        got = await post(f"{root}/score", {"model": "emb", "text_1": query, "text_2": docs})
        assert got["object"] == "list" and [d["index"] for d in got["data"]] == [0, 1, 2]
        assert all(d["object"] == "score" for d in got["data"])
        scores = [d["score"] for d in got["data"]]
        assert got["usage"]["prompt_tokens"] == got["usage"]["total_tokens"] > 0
        again = await post(f"{bases[0]}/score", {"text_1": [query, docs[0]],
                                                 "text_2": [docs[0], docs[0]]})
        assert again["data"][0]["score"] == pytest.approx(scores[0], rel=1e-5)
        assert again["data"][1]["score"] == pytest.approx(1.0, abs=1e-5)
        for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
            r = await post(root + path, {"model": "emb", "query": query, "documents": docs,
                                         "top_n": 2})
            order = sorted(range(3), key=lambda i: -scores[i])[:2]
            assert [x["index"] for x in r["results"]] == order
            assert [x["document"]["text"] for x in r["results"]] == [docs[i] for i in order]
            assert [x["relevance_score"] for x in r["results"]] == pytest.approx(
                [scores[i] for i in order], rel=1e-5)
            assert r["usage"]["total_tokens"] == got["usage"]["total_tokens"]
        r = await post(f"{root}/rerank", {"query": query, "documents": docs})
        assert len(r["results"]) == 3  # top_n 0: every document
        for body, param in (({"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, None),
                            ({"text_1": [], "text_2": "c"}, "text_1"),
                            ({"text_1": "a", "text_2": ["c", ""]}, "text_2")):
            err = (await post(f"{root}/score", body, 400))["error"]
            assert err["param"] == param and err["type"] == "invalid_request_error", err
        err = (await post(f"{root}/rerank", {"query": query, "documents": []}, 400))["error"]
        assert err["param"] == "documents"
        gen_root = bases[1][:-len("/v1")]
        err = (await post(f"{gen_root}/score", {"text_1": "a", "text_2": "b"}, 400))["error"]
        assert "score() is only supported for pooling models" in err["message"]


def test_a_headless_checkpoint_is_an_embedding_model_by_default(tmp_path):
    """HF's LlamaModel (no lm_head, weights named without "model."), as embedding checkpoints
    such as e5-mistral are saved: the engine loads it as a pooling model on its own (vLLM's
    --runner auto) and its embeddings are HF's last hidden state; generating is refused."""
    from .helpers import save_default_tokenizer

    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256,
                                   architectures=["LlamaModel"])
    torch.manual_seed(3)
    hf = transformers.LlamaModel(cfg).eval()
    hf.save_pretrained(str(tmp_path), safe_serialization=True)
    save_default_tokenizer(tmp_path)
    llm = LLM(str(tmp_path), **KW)
    assert llm.llm_engine.runner_kind == "pooling"
    [out] = llm.embed([PROMPTS[2]])
    with torch.no_grad():
        want = hf(torch.tensor([PROMPTS[2]])).last_hidden_state[0, -1].numpy()
    np.testing.assert_allclose(out.outputs.embedding, _unit(want), **TOL)
    with pytest.raises(ValueError, match="cannot generate"):
        LLM(str(tmp_path), runner="generate", **KW)



@contextlib.asynccontextmanager
async def _served(engine, name: str):
    """The server's app over ``engine`` on a free local port; yields its base URL."""
    from aiohttp import web

    from server.app import build_app

    r = web.AppRunner(build_app(engine, served_model_name=name))
    await r.setup()
    site = web.TCPSite(r, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    finally:
        await r.cleanup()


def _write_classifier(folder, num_labels: int, seed: int):
    """HF's LlamaForSequenceClassification (random, head scaled so the classes differ), saved
    as a hub checkpoint; returns the HF model."""
    from .helpers import save_default_tokenizer

    labels = {i: f"class_{i}" for i in range(num_labels)}
    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        num_labels=num_labels, id2label=labels, label2id={v: k for k, v in labels.items()},
        pad_token_id=0, architectures=["LlamaForSequenceClassification"])
    torch.manual_seed(seed)
    hf = transformers.LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        hf.score.weight.mul_(30.0)
    hf.save_pretrained(str(folder), safe_serialization=True)
    save_default_tokenizer(folder)
    return hf


def test_a_sequence_classifier_gives_hfs_probabilities(small_llama_folder, tmp_path):
    """HF's LlamaForSequenceClassification loads as a pooling model on its own (vLLM's
    classify task): LLM.classify's probabilities are the softmax of HF's logits (a prompt
    longer than a step runs in chunks; truncate_prompt_tokens keeps the last tokens), a
    one-label model's the sigmoid of its logit; /classify answers with the likeliest
    label's name. Other models, embedding options and bad inputs are refused."""
    import asyncio

    from aiohttp import ClientSession

    from jaxllm import AsyncEngine

    hf = _write_classifier(tmp_path / "c3", 3, seed=4)
    llm = LLM(str(tmp_path / "c3"), **KW)
    eng = llm.llm_engine
    assert eng.runner_kind == "pooling"
    assert eng.model_config.id2label == ("class_0", "class_1", "class_2")
    outs = llm.classify([{"prompt_token_ids": p} for p in PROMPTS])
    with torch.no_grad():
        want = [torch.softmax(hf(torch.tensor([p])).logits[0], -1).numpy() for p in PROMPTS]
    for o, p, w in zip(outs, PROMPTS, want):
        assert o.prompt_token_ids == p and o.outputs.num_classes == 3
        np.testing.assert_allclose(o.outputs.probs, w, **RAW_TOL)
    assert len({int(np.argmax(w)) for w in want}) > 1  # the head separates the prompts
    [cut] = llm.classify({"prompt_token_ids": PROMPTS[1]},
                         pooling_params=PoolingParams(truncate_prompt_tokens=5))
    np.testing.assert_allclose(cut.outputs.probs, llm.classify([PROMPTS[1][-5:]])[0].outputs.probs,
                               **RAW_TOL)
    assert eng.page_pool.num_free_pages == eng.page_pool.num_usable_pages
    with pytest.raises(ValueError, match="normalize apply to embeddings"):
        llm.classify([PROMPTS[0]], pooling_params=PoolingParams(normalize=True))
    with pytest.raises(ValueError, match="cannot generate"):
        LLM(str(tmp_path / "c3"), runner="generate", **KW)
    hf1 = _write_classifier(tmp_path / "c1", 1, seed=5)
    [one] = LLM(str(tmp_path / "c1"), **KW).classify([PROMPTS[2]])
    with torch.no_grad():
        np.testing.assert_allclose(one.outputs.probs, torch.sigmoid(
            hf1(torch.tensor([PROMPTS[2]])).logits[0]).numpy(), **RAW_TOL)
    emb = LLM(str(small_llama_folder), runner="pooling", **KW)
    with pytest.raises(ValueError, match="needs a sequence classification model"):
        emb.classify([PROMPTS[0]])

    engine = AsyncEngine(model=str(tmp_path / "c3"), **KW)

    async def go():
        async with _served(engine, "cls") as base:
            async with ClientSession() as s:
                async def post_to(path, body, status=200):
                    async with s.post(base + path, json=body) as resp:
                        assert resp.status == status, await resp.text()
                        return await resp.json()

                async def post(body, status):
                    return await post_to("/classify", body, status)

                body = await post({"model": "cls", "input": PROMPTS[:2]}, 200)
                assert body["object"] == "list" and body["id"].startswith("classify-")
                assert body["usage"]["prompt_tokens"] == 3 + 37
                for i, (d, w) in enumerate(zip(body["data"], want)):
                    assert d["index"] == i and d["num_classes"] == 3
                    assert d["label"] == f"class_{int(np.argmax(w))}"
                    np.testing.assert_allclose(d["probs"], w, **RAW_TOL)
                text = await post({"input": "hello there"}, 200)
                assert len(text["data"]) == 1 and abs(sum(text["data"][0]["probs"]) - 1) < 1e-6
                tokens = await post_to("/pooling", {"input": [PROMPTS[1]]})  # token_classify
                np.testing.assert_allclose(np.asarray(tokens["data"][0]["data"])[-1], want[1],
                                           **RAW_TOL)
                via = await post_to("/invocations", {"model": "cls", "input": PROMPTS[:2]})
                assert via["id"].startswith("classify-") and [
                    d["label"] for d in via["data"]] == [d["label"] for d in body["data"]]
                for bad, what in (({"input": []}, "input"), ({"input": [[]]}, "input"),
                                  ({"input": "x", "dimensions": 4}, "dimensions"),
                                  ({"input": [999999]}, "vocabulary")):
                    err = (await post(bad, 400))["error"]
                    assert what in err["message"], (bad, err)

    try:
        asyncio.run(go())
    finally:
        engine.shutdown()


def test_a_one_label_classifier_scores_pairs_as_a_cross_encoder(tmp_path):
    """vLLM's rerankers: on a one-label sequence classifier, LLM.score (1:N and N:N) and
    /rerank give each pair the sigmoid of HF's logit over the tokenizer's pair encoding; a
    classifier of several labels refuses to score."""
    import asyncio

    from aiohttp import ClientSession

    from jaxllm import AsyncEngine

    hf = _write_classifier(tmp_path / "c1", 1, seed=6)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "c1"))
    query, docs = "what is jax", ["a numerics library", "a river in europe", "jax"]

    def want(q, d):
        ids = tok(q, text_pair=d)["input_ids"]
        with torch.no_grad():
            return float(torch.sigmoid(hf(torch.tensor([ids])).logits[0, 0]))

    llm = LLM(str(tmp_path / "c1"), **KW)
    got = llm.score(query, docs)
    np.testing.assert_allclose([o.outputs.score for o in got], [want(query, d) for d in docs],
                               **RAW_TOL)
    assert got[0].prompt_token_ids == tok(query, text_pair=docs[0])["input_ids"]
    pairs = llm.score(["a", "b"], ["c", "d"])
    np.testing.assert_allclose([o.outputs.score for o in pairs], [want("a", "c"), want("b", "d")],
                               **RAW_TOL)
    _write_classifier(tmp_path / "c3", 3, seed=7)
    with pytest.raises(ValueError, match="one-label model"):
        LLM(str(tmp_path / "c3"), **KW).score("a", "b")

    engine = AsyncEngine(model=str(tmp_path / "c1"), **KW)

    async def go():
        async with _served(engine, "rr") as base, ClientSession() as s:
            async with s.post(base + "/rerank", json={"query": query,
                                                      "documents": docs}) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
        scores = {x["index"]: x["relevance_score"] for x in body["results"]}
        np.testing.assert_allclose([scores[i] for i in range(3)],
                                   [want(query, d) for d in docs], **RAW_TOL)
        ranked = [x["relevance_score"] for x in body["results"]]
        assert ranked == sorted(ranked, reverse=True)

    try:
        asyncio.run(go())
    finally:
        engine.shutdown()
