"""vLLM's profiler API (jaxllm/profiler.py): LLM.start_profile / stop_profile and the server's
/start_profile / /stop_profile record a jax.profiler trace of the engine's steps into the
folder JAXLLM_PROFILER_DIR (or vLLM's VLLM_TORCH_PROFILER_DIR) names; off without it."""

from __future__ import annotations

import asyncio

import pytest

from .helpers import small_llama_folder  # noqa: F401  (fixture)

KW = dict(dtype="float32", max_model_len=64, page_size=8, num_pages=16,
          max_num_batched_tokens=32, max_num_seqs=4, skip_compile_at_start=True)


def _traces(folder):
    """The trace files a stopped profile wrote (TensorBoard / XProf's layout)."""
    return sorted(folder.glob("plugins/profile/*/*.xplane.pb"))


def test_a_profile_records_the_engines_steps(small_llama_folder, tmp_path, monkeypatch):
    from jaxllm import LLM, SamplingParams

    monkeypatch.delenv("JAXLLM_PROFILER_DIR", raising=False)
    monkeypatch.delenv("VLLM_TORCH_PROFILER_DIR", raising=False)
    llm = LLM(str(small_llama_folder), **KW)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    with pytest.raises(RuntimeError, match="Profiler is not enabled"):
        llm.start_profile()
    with pytest.raises(RuntimeError, match="No profile is running"):
        llm.stop_profile()
    for env in ("VLLM_TORCH_PROFILER_DIR", "JAXLLM_PROFILER_DIR"):  # vLLM's name, then ours
        folder = tmp_path / env
        monkeypatch.setenv(env, str(folder))
        llm.start_profile()
        with pytest.raises(RuntimeError, match="already running"):
            llm.start_profile()
        out = llm.generate([[5, 6, 7]], params, use_tqdm=False)
        llm.stop_profile()
        assert len(out[0].outputs[0].token_ids) == 3
        [trace] = _traces(folder)
        data = trace.read_bytes()
        assert b"jit_" in data  # the step programs' executions are in it
        with pytest.raises(RuntimeError, match="No profile is running"):
            llm.stop_profile()


def test_the_servers_profile_routes(small_llama_folder, tmp_path, monkeypatch):
    """POST /start_profile and /stop_profile (vLLM's): 200s around served requests, the trace
    written; a second stop is a 409; API key checked; without a profiler folder the routes
    are 404s, as in vLLM."""
    from jaxllm import AsyncEngine
    from server.app import SERVER_KEY, Call, build_app

    engine = AsyncEngine(model=str(small_llama_folder), **KW)
    monkeypatch.delenv("VLLM_TORCH_PROFILER_DIR", raising=False)
    try:
        async def go():
            monkeypatch.delenv("JAXLLM_PROFILER_DIR", raising=False)
            off = build_app(engine, served_model_name="m")[SERVER_KEY]
            assert (await off.handle(Call("POST", "/start_profile", {}))).status == 404
            monkeypatch.setenv("JAXLLM_PROFILER_DIR", str(tmp_path / "srv"))
            srv = build_app(engine, served_model_name="m", api_key="k")[SERVER_KEY]
            key = {"Authorization": "Bearer k"}
            assert (await srv.handle(Call("POST", "/start_profile", {}))).status == 401
            assert (await srv.handle(Call("POST", "/start_profile", key))).status == 200
            outs = [o async for o in engine.generate({"prompt_token_ids": [5, 6, 7]}, None,
                                                     "r1")]
            assert outs[-1].finished
            assert (await srv.handle(Call("POST", "/stop_profile", key))).status == 200
            reply = await srv.handle(Call("POST", "/stop_profile", key))
            assert reply.status == 409
            assert _traces(tmp_path / "srv")

        asyncio.run(go())
    finally:
        engine.shutdown()
