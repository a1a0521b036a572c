"""The executable cache: a restart runs the step programs it stored instead of lowering them."""
from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
from jax import monitoring

from jaxllm import LLM, SamplingParams
from jaxllm.engine import executable_cache as ec

from .helpers import small_llama_folder  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def _on_this_backend(monkeypatch, no_xla_persistent_cache):
    # The cache is on for GPUs only (XLA:CPU executables do not load in another process); here
    # the CPU runs it within one process, which checks the keys, the stores and the step calls'
    # use of the loaded programs. tests/test_gpu.py checks a restart in a new process. (XLA's
    # persistent cache is off here: its CPU programs, serialized again, do not run.)
    monkeypatch.setattr(ec, "PLATFORMS", (jax.default_backend(),))

KW = dict(dtype="float32", max_model_len=64, page_size=8, num_pages=16,
          max_num_batched_tokens=32, max_num_seqs=4, seed=0, num_scheduler_steps=2)
PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8, 9, 10, 11]}, {"prompt_token_ids": [3, 4]},
           {"prompt_token_ids": list(range(20, 47))}]


def _generate(llm):
    # greedy (the multi-step programs), then sampled rows with top-k / log-probs (the sort and
    # log-probs samplers)
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=6,
                                                  ignore_eos=True), use_tqdm=False)
    sampled = llm.generate(PROMPTS, SamplingParams(temperature=0.8, top_k=5, max_tokens=4,
                                                   logprobs=2, seed=1, ignore_eos=True),
                           use_tqdm=False)
    return ([o.outputs[0].token_ids for o in greedy],
            [(o.outputs[0].token_ids, [sorted(lp) for lp in o.outputs[0].logprobs])
             for o in sampled])


def _compiles():
    events = []
    monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: events.append(name)
        if name == "/jax/core/compile/backend_compile_duration" else None)
    return events


def test_a_restart_runs_the_stored_programs_and_gives_the_same_tokens(
        small_llama_folder, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(ec.ENV_DIR, str(tmp_path / "exec"))
    caplog.set_level(logging.INFO, logger="jaxllm")
    first = LLM(str(small_llama_folder), **KW)
    runner = first.llm_engine.runner
    stored = sorted((tmp_path / "exec").rglob("*.jaxexec"))
    assert len(stored) == len(runner.compile_seconds) == len(runner._programs) > 0
    assert any(n.startswith("multi-step") for n in runner.compile_seconds)
    want = _generate(first)
    assert runner._forward._cache_size() == 0  # every step ran a kept program, not the jit
    del first

    events = _compiles()
    second = LLM(str(small_llama_folder), **KW)
    runner = second.llm_engine.runner
    assert runner.compile_seconds == {}  # nothing lowered or compiled: all loaded
    assert len(runner._programs) == len(stored)
    assert f"{len(stored)} programs loaded" in caplog.text
    assert _generate(second) == want
    assert runner.num_compiles == 0  # no jit fell back to compiling while serving
    # (only tiny helper jits outside the step programs may compile at start-up)
    assert len(events) < len(stored) // 2


def test_a_changed_shape_or_setting_misses_and_a_damaged_entry_is_compiled_again(
        small_llama_folder, tmp_path, monkeypatch, caplog):
    root = tmp_path / "exec"
    monkeypatch.setenv(ec.ENV_DIR, str(root))
    LLM(str(small_llama_folder), **KW)
    n = len(list(root.rglob("*.jaxexec")))
    # another KV pool size: other programs
    runner = LLM(str(small_llama_folder), **{**KW, "num_pages": 24}).llm_engine.runner
    assert len(runner.compile_seconds) == n and len(list(root.rglob("*.jaxexec"))) == 2 * n
    # an engine setting read at trace time changes the salt
    monkeypatch.setenv("JAXLLM_ATTENTION_KNOBS", '{"qkv_split_k": 1}')
    runner = LLM(str(small_llama_folder), **KW).llm_engine.runner
    assert len(runner.compile_seconds) == n
    monkeypatch.delenv("JAXLLM_ATTENTION_KNOBS")
    # damaged entries (a truncated write, a jax that cannot read them): a warning each, and
    # the programs compiled again
    for victim in root.rglob("*.jaxexec"):
        victim.write_bytes(b"not a pickle")
    caplog.set_level(logging.WARNING, logger="jaxllm")
    llm = LLM(str(small_llama_folder), **KW)
    assert len(llm.llm_engine.runner.compile_seconds) == n
    assert caplog.text.count("executable cache: ignoring") == n
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=3),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_cache_dir_and_keys(tmp_path, monkeypatch):
    monkeypatch.setenv(ec.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(ec, "PLATFORMS", ("no-such-backend",))
    assert ec.cache_dir() is None  # off where executables do not load in a new process
    monkeypatch.setattr(ec, "PLATFORMS", (jax.default_backend(),))
    monkeypatch.delenv(ec.ENV_DIR, raising=False)
    monkeypatch.setattr(ec, "_jax_cache_dir", lambda: None)
    assert ec.cache_dir() is None
    monkeypatch.setattr(ec, "_jax_cache_dir", lambda: str(tmp_path))  # jaxllm serve's default
    assert ec.cache_dir() == tmp_path / ec.SUBDIR
    monkeypatch.setenv(ec.ENV_DIR, "")
    assert ec.cache_dir() is None  # "" turns it off
    monkeypatch.setenv(ec.ENV_DIR, str(tmp_path / "x"))
    assert ec.cache_dir() == tmp_path / "x"

    cache = ec.ExecutableCache(tmp_path, "context")
    a = jax.ShapeDtypeStruct((4, 8), np.float32)
    key = cache.key("forward", (a, None, 3))
    assert key == ec.ExecutableCache(tmp_path, "context").key("forward", (a, None, 3))
    others = {cache.key("forward", (jax.ShapeDtypeStruct((4, 9), np.float32), None, 3)),
              cache.key("forward", (jax.ShapeDtypeStruct((4, 8), np.int32), None, 3)),
              cache.key("forward", (a, None, 4)), cache.key("sampler", (a, None, 3)),
              cache.key("forward", ((a,), None, 3)),
              ec.ExecutableCache(tmp_path, "other context").key("forward", (a, None, 3))}
    assert key not in others and len(others) == 6
    monkeypatch.setenv("JAXLLM_SOMETHING", "1")
    assert ec.ExecutableCache(tmp_path, "context").key("forward", (a, None, 3)) != key
    assert ec.static_description(lambda: 0).count("0x") == 0
    assert cache.load(key, jax.devices()[:1]) is None and (cache.hits, cache.misses) == (0, 1)


def test_the_kv_sizing_figure_is_kept_too(small_llama_folder, tmp_path, monkeypatch):
    # The KV pool's sizing compiles the largest step to read its temp memory; a restart takes
    # the figure from the cache instead of compiling again.
    import json

    monkeypatch.setenv(ec.ENV_DIR, str(tmp_path))
    eng = LLM(str(small_llama_folder), skip_compile_at_start=True, **KW).llm_engine
    temp = eng._largest_step_temp_bytes()
    (stored,) = tmp_path.rglob("*.json")
    assert json.loads(stored.read_text()) == {"value": temp} and temp > 0
    events = _compiles()
    assert eng._largest_step_temp_bytes() == temp and events == []
    stored.write_text(json.dumps({"value": temp + 1}))  # what is read is the stored figure
    assert eng._largest_step_temp_bytes() == temp + 1
    monkeypatch.setenv(ec.ENV_DIR, "")
    assert eng._largest_step_temp_bytes() == temp  # off: computed


def test_old_salt_folders_are_pruned(tmp_path):
    import os
    import time

    now = time.time()
    for i in range(ec.KEEP_SALTS + 3):  # older code versions' folders
        d = tmp_path / f"old{i:02d}"
        d.mkdir()
        (d / "x.jaxexec").write_bytes(b"")
        os.utime(d, (now - 1000 + i, now - 1000 + i))
    cache = ec.ExecutableCache(tmp_path, "context")
    kept = sorted(d.name for d in tmp_path.iterdir())
    assert len(kept) == ec.KEEP_SALTS and cache.root.name in kept
    # the most recent old ones survive, the oldest went
    assert "old00" not in kept and f"old{ec.KEEP_SALTS + 2:02d}" in kept
