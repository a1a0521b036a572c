"""Sleep mode and weight updates (LLMEngine.sleep / wake_up / update_weights; vLLM's sleep mode
and an RL loop's weight sync): the device memory really goes and comes back, the step programs
are not recompiled, the tokens after a wake-up or an update are those of an engine loaded with
the same weights, and every misuse is a clear error that leaves the engine serving."""

from __future__ import annotations

import asyncio

import jax
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.errors import EngineSleepingError
from jaxllm.loading.safetensors_loader import iter_safetensors, safetensors_files

from .helpers import small_llama_folder, write_small_llama  # noqa: F401  (fixture)

KW = dict(dtype="float32", max_model_len=64, page_size=8, num_pages=16,
          max_num_batched_tokens=32, max_num_seqs=4, seed=0, skip_compile_at_start=True)
PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13]}, {"prompt_token_ids": [3, 4]}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def other_folder(tmp_path_factory):
    """Another random Llama of the small one's shape: the weights an RL step would bring."""
    return write_small_llama(tmp_path_factory.mktemp("other_llama"), seed=1)


def _tensors(folder):
    return iter_safetensors(safetensors_files(folder))


def _tokens(llm) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def _live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted())


def test_sleep_frees_the_device_memory_and_wake_up_serves_the_same_tokens(small_llama_folder):
    llm = LLM(str(small_llama_folder), enable_sleep_mode=True, **KW)
    engine, runner = llm.llm_engine, llm.llm_engine.runner
    want = _tokens(llm)
    compiles = runner.num_compiles
    weights = sum(x.nbytes for x in runner._leaves)
    kv = sum(k.nbytes + v.nbytes for k, v in runner.kv_caches)
    before = _live_bytes()
    llm.sleep(level=1)
    assert engine.is_sleeping() and before - _live_bytes() >= weights + kv
    with pytest.raises(EngineSleepingError, match="wake_up"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert not engine.has_unfinished_requests()
    llm.wake_up(["weights"])  # the weights first: still asleep, the cache is not back
    assert engine.is_sleeping()
    llm.wake_up()
    assert not engine.is_sleeping() and _live_bytes() >= before - 1024
    assert _tokens(llm) == want
    # the prefix cache was emptied with the cache: nothing is a hit right after waking
    llm.sleep(level=1)
    llm.wake_up()
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [0, 0]
    assert [o.outputs[0].token_ids for o in outs] == want
    assert runner.num_compiles == compiles  # the same programs throughout


def test_level_two_drops_the_weights_and_update_weights_brings_new_ones(small_llama_folder,
                                                                         other_folder):
    """RL's loop: sleep(2) while "training", new weights in, the cache back, generate: the
    tokens of an engine loaded from the new weights."""
    want_other = _tokens(LLM(str(other_folder), **KW))
    llm = LLM(str(small_llama_folder), enable_sleep_mode=True, **KW)
    want_own = _tokens(llm)
    assert want_own != want_other
    compiles = llm.llm_engine.runner.num_compiles
    llm.sleep(level=2)
    llm.update_weights(_tensors(other_folder))  # weights back (new ones), the cache still away
    assert llm.llm_engine.is_sleeping()
    llm.sleep(level=1)  # half awake (new weights, no cache): the weights go to host memory
    assert llm.llm_engine.runner._param_tree() is None
    llm.wake_up(["kv_cache"])
    assert llm.llm_engine.is_sleeping()  # the weights are still away
    llm.wake_up(["weights"])
    assert _tokens(llm) == want_other
    # awake, with the old weights freed as the new ones arrive
    llm.update_weights(_tensors(small_llama_folder))
    assert _tokens(llm) == want_own
    # level 2 and a plain wake_up: zeros, which serve (garbage) without a crash
    llm.sleep(level=2)
    llm.wake_up()
    assert all(not np.asarray(x).any() for x in llm.llm_engine.runner._leaves)
    assert len(_tokens(llm)[0]) == 8
    assert llm.llm_engine.runner.num_compiles == compiles


def test_misuse_is_a_clear_error_and_the_engine_keeps_serving(small_llama_folder):
    llm = LLM(str(small_llama_folder), **KW)
    want = _tokens(llm)
    with pytest.raises(ValueError, match="enable_sleep_mode"):
        llm.sleep()
    on = LLM(str(small_llama_folder), enable_sleep_mode=True, **KW)
    engine = on.llm_engine
    for bad, match in ((lambda: on.sleep(level=3), "level"),
                       (lambda: on.wake_up(["weights", "optimizer"]), "optimizer")):
        with pytest.raises(ValueError, match=match):
            bad()
    engine.add_request("busy", PROMPTS[0], GREEDY)
    for busy in (on.sleep, lambda: on.update_weights(_tensors(small_llama_folder))):
        with pytest.raises(RuntimeError, match="still running"):
            busy()
    engine.abort_request("busy")
    tensors = dict(_tensors(small_llama_folder))
    missing = {k: v for k, v in tensors.items() if "layers.1.mlp.down_proj" not in k}
    with pytest.raises(ValueError, match="Missing tensors.*layers.1.mlp.down_proj"):
        on.update_weights(missing.items())
    wrong = {**tensors, "model.norm.weight": np.ones(7, np.float32)}
    with pytest.raises(ValueError, match="Shape mismatch.*model.norm.weight"):
        on.update_weights(wrong.items())
    assert _tokens(on) == want and _tokens(llm) == want


def test_async_engine_and_the_dev_routes(small_llama_folder, other_folder, monkeypatch):
    """AsyncEngine runs sleep / wake_up / update_weights between steps; the server's dev
    routes (JAXLLM_SERVER_DEV_MODE=1, vLLM's /sleep, /wake_up, /is_sleeping) drive them, and a
    request to a sleeping engine is a 503 the client can retry."""
    import aiohttp
    from aiohttp import web

    from jaxllm import AsyncEngine
    from server.app import DEV_MODE_ENV, build_app

    want_other = _tokens(LLM(str(other_folder), **KW))
    engine = AsyncEngine(model=str(small_llama_folder), enable_sleep_mode=True, **KW)

    async def tokens():
        outs = [[o async for o in engine.generate(p, GREEDY, f"r{i}-{id(p)}")][-1]
                for i, p in enumerate(PROMPTS)]
        return [o.outputs[0].token_ids for o in outs]

    async def go():
        await engine.sleep(2)
        assert await engine.is_sleeping()
        await engine.update_weights(_tensors(other_folder))
        await engine.wake_up()
        assert await tokens() == want_other
        monkeypatch.setenv(DEV_MODE_ENV, "1")
        runner = web.AppRunner(build_app(engine, served_model_name="m", api_key="k"))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        key = {"Authorization": "Bearer k"}
        try:
            async with aiohttp.ClientSession() as s:
                async def call(method, path, headers=key, **kw):
                    async with s.request(method, base + path, headers=headers, **kw) as r:
                        return r.status, (await r.json() if r.content_type ==
                                          "application/json" else None)

                assert (await call("POST", "/sleep", headers={}))[0] == 401
                assert await call("GET", "/is_sleeping") == (200, {"is_sleeping": False})
                assert (await call("POST", "/sleep?level=1"))[0] == 200
                assert await call("GET", "/is_sleeping") == (200, {"is_sleeping": True})
                status, body = await call("POST", "/v1/completions", json={
                    "model": "m", "prompt": [1, 2, 3], "max_tokens": 2})
                assert status == 503 and body["error"]["code"] == "engine_sleeping"
                assert (await call("POST", "/sleep?level=7"))[0] == 400
                assert (await call("POST", "/wake_up?tags=weights&tags=kv_cache"))[0] == 200
                assert await call("GET", "/is_sleeping") == (200, {"is_sleeping": False})
                status, body = await call("POST", "/v1/completions", json={
                    "model": "m", "prompt": [1, 2, 3], "max_tokens": 2})
                assert status == 200 and body["usage"]["completion_tokens"] == 2
            monkeypatch.setenv(DEV_MODE_ENV, "0")  # without dev mode: no such routes
            hidden = build_app(engine, served_model_name="m")
            from server.app import SERVER_KEY, Call

            reply = await hidden[SERVER_KEY].handle(Call("POST", "/sleep", {}))
            assert reply.status == 404
        finally:
            await runner.cleanup()

    try:
        asyncio.run(go())
    finally:
        engine.shutdown()
