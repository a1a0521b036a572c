"""Embeddings from a decoder LLM (engine/pooling.py, LLM.embed, /v1/embeddings) against HF
transformers' final hidden states (torch, float32): LAST / MEAN / CLS pooling, normalized or
not, prompts packed into steps and a prompt longer than a step run in chunks."""

from __future__ import annotations

import base64

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxllm import LLM, SamplingParams
from jaxllm.pooling_params import PoolingParams

from .helpers import small_llama_folder  # noqa: F401  (fixture)

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
    import argparse

    from jaxllm.cli import add_engine_args, engine_kwargs

    p = argparse.ArgumentParser()
    add_engine_args(p)
    got = engine_kwargs(p.parse_args(["--runner", "pooling", "--pooler-config",
                                      '{"pooling_type": "MEAN"}']))
    assert (got["runner"], got["pooler_config"]) == ("pooling", {"pooling_type": "MEAN"})
    assert engine_kwargs(p.parse_args([]))["runner"] == "auto"


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

