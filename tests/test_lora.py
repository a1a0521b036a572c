"""LoRA adapters (jaxllm/lora): real PEFT adapters served beside the base model, against PEFT's
own outputs (HF transformers + peft, torch, float32, CPU)."""

from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pytest
import torch

from .helpers import small_llama_folder, write_peft_adapter  # noqa: F401  (fixture)

_KW = dict(dtype="float32", max_model_len=128, page_size=8, num_pages=64,
           max_num_batched_tokens=64, max_num_seqs=8, skip_compile_at_start=True,
           enable_lora=True, max_loras=2, max_lora_rank=8)
_N = 8  # tokens generated
# Prompts with repeats (n-gram drafts find matches) of several lengths: one page to four.
_PROMPTS = [[11, 12, 13, 14, 15, 16, 17], [7, 8, 9], list(range(100, 110)) * 3,
            [5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6]]


@pytest.fixture(scope="module")
def adapters(small_llama_folder, tmp_path_factory):
    """Two PEFT adapters of the small Llama, each (path, PEFT model): "a1" rank 8 on every
    projection; "a2" rank 4 with rsLoRA on q / v / down only, v's alpha and down's rank set
    by PEFT's alpha_pattern / rank_pattern."""
    root = tmp_path_factory.mktemp("lora")
    a1 = write_peft_adapter(small_llama_folder, root / "a1", seed=1, r=8, lora_alpha=16)
    a2 = write_peft_adapter(small_llama_folder, root / "a2", seed=2, r=4, lora_alpha=8,
                            use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                            alpha_pattern={"v_proj": 32}, rank_pattern={"down_proj": 2})
    return {"a1": (str(root / "a1"), a1), "a2": (str(root / "a2"), a2)}


@pytest.fixture(scope="module")
def reference(small_llama_folder, adapters):
    """PEFT's greedy tokens: reference[(prompt index, adapter name or None)]."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(small_llama_folder),
                                                dtype=torch.float32).eval()
    models = {None: base, **{name: m for name, (_, m) in adapters.items()}}
    out = {}
    with torch.no_grad():
        for name, model in models.items():
            for i, p in enumerate(_PROMPTS):
                ids = model.generate(input_ids=torch.tensor([p]), max_new_tokens=_N,
                                     min_new_tokens=_N, do_sample=False)
                out[(i, name)] = ids[0, len(p):].tolist()
    return out


def _requests(adapters, names):
    from jaxllm.lora import LoRARequest

    ids = {"a1": 1, "a2": 2}
    return [None if n is None else LoRARequest(n, ids[n], adapters[n][0]) for n in names]


def _generate(llm, adapters, cases, **params):
    """Greedy outputs of ``cases`` [(prompt index, adapter name or None)] in one batch."""
    from jaxllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=_N, ignore_eos=True, **params)
    return llm.generate([{"prompt_token_ids": _PROMPTS[i]} for i, _ in cases], sp,
                        use_tqdm=False, lora_request=_requests(adapters, [n for _, n in cases]))


_ALL = [(i, n) for i in range(len(_PROMPTS)) for n in (None, "a1", "a2")]


def test_adapters_in_one_batch_give_pefts_tokens_and_logprobs(small_llama_folder, adapters,
                                                              reference):
    """Requests of two adapters and of the base model, mixed in one batch, give what PEFT
    gives for each: greedy tokens, and the sampled tokens' log-probs (teacher-forced through
    the PEFT model) within float32 noise. The adapters change every prompt's tokens, so a
    LoRA path that did nothing would fail."""
    from jaxllm import LLM

    llm = LLM(str(small_llama_folder), **_KW)
    outs = _generate(llm, adapters, _ALL, logprobs=0)
    got = {c: o.outputs[0].token_ids for c, o in zip(_ALL, outs)}
    assert got == {c: reference[c] for c in _ALL}
    for i in range(len(_PROMPTS)):
        assert reference[(i, "a1")] != reference[(i, None)] != reference[(i, "a2")]
    for (i, name), o in zip(_ALL, outs):
        if name is None:
            continue
        assert o.lora_request.lora_name == name
        ids = _PROMPTS[i] + reference[(i, name)]
        with torch.no_grad():
            lp = torch.log_softmax(adapters[name][1](input_ids=torch.tensor([ids])).logits[0],
                                   -1).numpy()
        want = [lp[len(_PROMPTS[i]) - 1 + j, t] for j, t in enumerate(reference[(i, name)])]
        mine = [d[t].logprob for d, t in zip(o.outputs[0].logprobs, reference[(i, name)])]
        np.testing.assert_allclose(mine, want, atol=2e-4)
    # Prompt log-probs run the adapter too: PEFT's log-probs of a prompt that is a1's reply.
    from jaxllm import SamplingParams

    ids = _PROMPTS[0] + reference[(0, "a1")]
    (o,) = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1,
                                                                    prompt_logprobs=0),
                        use_tqdm=False, lora_request=_requests(adapters, ["a1"]))
    with torch.no_grad():
        lp = torch.log_softmax(adapters["a1"][1](input_ids=torch.tensor([ids])).logits[0],
                               -1).numpy()
    np.testing.assert_allclose([o.prompt_logprobs[k][t].logprob for k, t in enumerate(ids)
                                if k], [lp[k - 1, t] for k, t in enumerate(ids) if k],
                               atol=2e-4)
    # Finished requests gave their pages back; the adapters stay loaded.
    eng = llm.llm_engine
    assert eng.page_pool.num_free_pages == eng.page_pool.num_usable_pages
    assert eng.list_loras() == {1, 2}


@pytest.mark.parametrize("extra", [
    dict(max_loras=1),
    dict(num_scheduler_steps=4),
    dict(speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                             "prompt_lookup_min": 1, "prompt_lookup_max": 3}),
    dict(attention_backend="pallas"),
], ids=["max_loras_1", "multi_step", "ngram_drafts", "pallas"])
def test_adapters_under_the_engines_paths(small_llama_folder, adapters, reference, extra,
                                          monkeypatch):
    """The same tokens through one adapter slot (max_loras=1: at most one adapter a step, the
    slot rewritten as the batch moves from one adapter to the other), multi-step decode
    launches, n-gram speculative decoding, and the Pallas kernels' paths (interpreted: the
    decode kernel's rope path with the q/k/v GEMM's LoRA delta)."""
    from jaxllm import LLM
    from jaxllm.lora import manager

    steps = []
    real = manager.LoraManager.activate

    def activate(self, seqs):
        seqs = list(seqs)
        steps.append({s.lora_int_id for s in seqs if s.lora_int_id})
        return real(self, seqs)

    monkeypatch.setattr(manager.LoraManager, "activate", activate)
    cases = _ALL if extra.get("attention_backend") != "pallas" else _ALL[:6]
    llm = LLM(str(small_llama_folder), **{**_KW, **extra})
    outs = _generate(llm, adapters, cases)
    assert {c: o.outputs[0].token_ids for c, o in zip(cases, outs)} == {
        c: reference[c] for c in cases}
    assert max(len(s) for s in steps) == llm.llm_engine.config.max_loras
    if "speculative_config" in extra:
        assert llm.llm_engine.stats["spec_decode_num_draft_tokens"] > 0


@pytest.mark.parametrize("specialize", [True, False], ids=["specialized", "one_set"])
def test_adapter_free_steps_run_the_programs_without_lora(small_llama_folder, adapters,
                                                          reference, specialize, monkeypatch):
    """With specialize_lora (vLLM's cudagraph_specialize_lora, the default) the start-up
    compiles the step programs twice, with and without the LoRA path, and a step runs the
    second exactly when none of its sequences has an adapter: base-only batches, and the base
    requests' steps after the adapters' requests finished. Off, every step carries the slots.
    Either way the tokens are PEFT's and serving compiles nothing more."""
    from jaxllm import LLM
    from jaxllm.engine.model_runner import ModelRunner

    kinds = []  # per step: "lora" / "plain", and whether a sequence had an adapter
    real = ModelRunner.prepare

    def prepare(self, scheduled, *args, **kw):
        inputs = real(self, scheduled, *args, **kw)
        if scheduled:
            kinds.append(("plain" if inputs.lora_slots is None else "lora",
                          any(s.seq.lora_slot >= 0 for s in scheduled)))
        return inputs

    llm = LLM(str(small_llama_folder), **{**_KW, "skip_compile_at_start": False,
                                          "max_num_seqs": 4, "specialize_lora": specialize})
    runner = llm.llm_engine.runner
    assert len(runner.step_programs()) == len(runner.step_variants()) * (2 if specialize else 1)
    compiled = runner.num_compiles
    assert runner._forward._cache_size() == len(runner.step_programs())
    monkeypatch.setattr(ModelRunner, "prepare", prepare)
    from jaxllm import SamplingParams

    outs = _generate(llm, adapters, [(0, None), (1, None)])  # base only
    assert [o.outputs[0].token_ids for o in outs] == [reference[(0, None)], reference[(1, None)]]
    # a1's request stops after 3 tokens; the base requests decode on without it.
    cases = [(1, "a1"), (2, None), (3, None)]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, _N, _N)]
    outs = llm.generate([{"prompt_token_ids": _PROMPTS[i]} for i, _ in cases], params,
                        use_tqdm=False, lora_request=_requests(adapters, [n for _, n in cases]))
    assert [o.outputs[0].token_ids for o in outs] == [reference[(1, "a1")][:3],
                                                      reference[(2, None)], reference[(3, None)]]
    assert runner.num_compiles == compiled
    if specialize:
        assert all(kind == ("lora" if adapter else "plain") for kind, adapter in kinds)
        assert {k for k, _ in kinds} == {"lora", "plain"}
    else:
        assert {k for k, _ in kinds} == {"lora"}


def test_prefix_cache_pages_are_shared_by_one_adapters_requests_only(small_llama_folder,
                                                                     adapters, reference):
    """An adapter's K/V is its own: a repeated prompt hits the cache under the same adapter
    and misses under another adapter or none; the tokens stay PEFT's."""
    from jaxllm import LLM

    llm = LLM(str(small_llama_folder), **_KW)
    cached = {}
    for name in ("a1", "a1", "a2", None, "a2"):
        (out,) = _generate(llm, adapters, [(2, name)])
        assert out.outputs[0].token_ids == reference[(2, name)]
        cached.setdefault(name, []).append(out.num_cached_tokens)
    assert cached["a1"][0] == 0 and cached["a1"][1] >= 24
    assert cached["a2"][0] == 0 and cached["a2"][1] >= 24
    assert cached[None] == [0]


def test_host_memory_keeps_max_cpu_loras_and_reads_evicted_adapters_again(
        small_llama_folder, adapters, reference, monkeypatch):
    """With one slot and one host copy an adapter that lost its slot leaves host memory and is
    read again from its folder when a request names it (same tokens); a pinned one is not."""
    from jaxllm import LLM
    from jaxllm.lora import LoRARequest, manager

    reads = []
    real = manager.load_peft_adapter
    monkeypatch.setattr(manager, "load_peft_adapter",
                        lambda path, **kw: (reads.append(kw["name"]), real(path, **kw))[1])
    llm = LLM(str(small_llama_folder), **{**_KW, "max_loras": 1, "max_cpu_loras": 1})
    for name in ("a1", "a2", "a1"):
        (out,) = _generate(llm, adapters, [(0, name)])
        assert out.outputs[0].token_ids == reference[(0, name)]
    assert reads == ["a1", "a2", "a1"]
    assert llm.llm_engine.pin_lora(1)
    for name in ("a2", "a1"):
        (out,) = _generate(llm, adapters, [(0, name)])
        assert out.outputs[0].token_ids == reference[(0, name)]
    assert reads == ["a1", "a2", "a1", "a2"]  # a1 pinned: kept in host memory
    eng = llm.llm_engine
    assert eng.remove_lora(2) and not eng.remove_lora(2) and eng.list_loras() == {1}
    assert eng.add_lora(LoRARequest("a2", 2, adapters["a2"][0]))
    assert eng.list_loras() == {1, 2}


def test_packed_qkv_and_gate_up_adapters_split_like_the_weights(small_llama_folder, tmp_path):
    """An adapter of HF's packed projections (Phi-3's qkv_proj / gate_up_proj: one A, B over
    the concatenated outputs) gives the tokens and log-probs of the same adapter written per
    projection (A repeated, B split), and not the base model's."""
    from safetensors.numpy import save_file

    from jaxllm import LLM, SamplingParams
    from jaxllm.lora import LoRARequest

    E, F, HD, KD, r = 64, 128, 64, 32, 4
    rng = np.random.default_rng(0)
    packed, split = {}, {}
    for layer in range(2):
        for block, module, parts in (("self_attn", "qkv_proj", (("q_proj", HD), ("k_proj", KD),
                                                                 ("v_proj", KD))),
                                     ("mlp", "gate_up_proj", (("gate_proj", F), ("up_proj", F)))):
            pre = f"base_model.model.model.layers.{layer}.{block}"
            a = rng.normal(0, 0.3, (r, E)).astype(np.float32)
            b = rng.normal(0, 0.3, (sum(n for _, n in parts), r)).astype(np.float32)
            packed[f"{pre}.{module}.lora_A.weight"] = a
            packed[f"{pre}.{module}.lora_B.weight"] = b
            for (name, _), bp in zip(parts, np.split(b, np.cumsum([n for _, n in parts])[:-1])):
                split[f"{pre}.{name}.lora_A.weight"] = a
                split[f"{pre}.{name}.lora_B.weight"] = np.ascontiguousarray(bp)
    for name, tensors in (("packed", packed), ("split", split)):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "adapter_model.safetensors"))
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": r, "lora_alpha": 8, "bias": "none"}))
    llm = LLM(str(small_llama_folder), **_KW)
    sp = SamplingParams(temperature=0.0, max_tokens=_N, ignore_eos=True, logprobs=0)
    loras = [None, LoRARequest("packed", 1, str(tmp_path / "packed")),
             LoRARequest("split", 2, str(tmp_path / "split"))]
    outs = llm.generate([{"prompt_token_ids": _PROMPTS[0]}] * 3, sp, use_tqdm=False,
                        lora_request=loras)
    base, pk, sp_ = (o.outputs[0] for o in outs)
    assert pk.token_ids == sp_.token_ids != base.token_ids
    np.testing.assert_allclose([d[t].logprob for d, t in zip(pk.logprobs, pk.token_ids)],
                               [d[t].logprob for d, t in zip(sp_.logprobs, sp_.token_ids)],
                               atol=1e-5)


@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2),
                                      dict(data_parallel_size=2)], ids=["tp2", "dp2"])
def test_parallel_engines_serve_pefts_tokens(small_llama_folder, adapters, reference, parallel):
    """tensor_parallel_size=2 (the slots replicated, the deltas added to the sharded
    projections) and data_parallel_size=2 (each replica its own slots; the second replica's
    weights copied from the first without its slots): PEFT's tokens."""
    from jaxllm import LLM

    llm = LLM(str(small_llama_folder), **{**_KW, **parallel})
    cases = [(0, "a1"), (1, "a2"), (3, None), (3, "a1")]
    outs = _generate(llm, adapters, cases)
    assert [o.outputs[0].token_ids for o in outs] == [reference[c] for c in cases]


def test_new_weights_and_sleep_keep_the_adapters(small_llama_folder, adapters, reference):
    """update_weights (the base model's own weights again) and a level-2 sleep followed by
    new weights: the adapters' slots are written again, the tokens stay PEFT's."""
    from safetensors.numpy import load_file

    from jaxllm import LLM

    weights = list(load_file(str(small_llama_folder / "model.safetensors")).items())
    llm = LLM(str(small_llama_folder), **{**_KW, "enable_sleep_mode": True})
    cases = [(0, "a1"), (1, "a2")]
    assert [o.outputs[0].token_ids for o in _generate(llm, adapters, cases)] == [
        reference[c] for c in cases]
    llm.update_weights(weights)
    assert [o.outputs[0].token_ids for o in _generate(llm, adapters, cases)] == [
        reference[c] for c in cases]
    llm.sleep(level=2)
    llm.wake_up(["weights"])
    llm.update_weights(weights)
    llm.wake_up()
    assert [o.outputs[0].token_ids for o in _generate(llm, adapters, cases)] == [
        reference[c] for c in cases]


def _variant(adapters, tmp_path, name, config=None, tensors=None):
    """A copy of adapter a1 with its config updated by ``config`` and / or tensors added."""
    from safetensors.numpy import load_file, save_file

    src, dst = adapters["a1"][0], tmp_path / name
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    if tensors:
        t = load_file(str(dst / "adapter_model.safetensors"))
        save_file({**t, **tensors}, str(dst / "adapter_model.safetensors"))
    return str(dst)


def test_bad_adapters_and_options_are_refused_with_clear_errors(small_llama_folder, adapters,
                                                                tmp_path):
    """Each adapter the engine cannot serve fails its request at submission with the reason,
    and nothing of it stays (no request, no page, not listed); bad options fail at start."""
    from jaxllm import LLM, SamplingParams
    from jaxllm.lora import LoRARequest

    llm = LLM(str(small_llama_folder), **_KW)
    eng = llm.llm_engine
    sp = SamplingParams(max_tokens=4)
    zero = np.zeros((8, 64), np.float32)
    bad = [
        (LoRARequest("gone", 3, str(tmp_path / "missing")), FileNotFoundError,
         "no adapter_config.json"),
        (LoRARequest("dora", 3, _variant(adapters, tmp_path, "dora", {"use_dora": True})),
         ValueError, "DoRA"),
        (LoRARequest("bias", 3, _variant(adapters, tmp_path, "bias", {"bias": "all"})),
         ValueError, "biases"),
        (LoRARequest("save", 3, _variant(adapters, tmp_path, "save",
                                         {"modules_to_save": ["lm_head"]})),
         ValueError, "modules_to_save"),
        (LoRARequest("emb", 3, _variant(adapters, tmp_path, "emb", tensors={
            "base_model.model.model.embed_tokens.lora_embedding_A": zero})),
         ValueError, "embeddings"),
        (LoRARequest("other", 3, _variant(adapters, tmp_path, "other", tensors={
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                np.zeros((8, 32), np.float32)})),
         ValueError, "another model"),
        (LoRARequest("clash", 1, adapters["a2"][0]), ValueError, "already adapter"),
    ]
    llm.generate([_PROMPTS[0]], sp, use_tqdm=False,
                 lora_request=LoRARequest("a1", 1, adapters["a1"][0]))
    for req, exc, match in bad:
        with pytest.raises(exc, match=match):
            llm.generate([_PROMPTS[0], _PROMPTS[1]], sp, use_tqdm=False,
                         lora_request=[None, req])
        assert not eng.has_unfinished_requests()
        assert eng.page_pool.num_free_pages == eng.page_pool.num_usable_pages
        assert eng.list_loras() == {1}
    with pytest.raises(ValueError, match="rank 8 is greater than max_lora_rank 1"):
        LLM(str(small_llama_folder), **{**_KW, "max_lora_rank": 1}).generate(
            [_PROMPTS[0]], sp, use_tqdm=False,
            lora_request=LoRARequest("a1", 1, adapters["a1"][0]))
    eng.add_request("busy", _PROMPTS[0], sp, lora_request=LoRARequest("a1", 1,
                                                                       adapters["a1"][0]))
    with pytest.raises(ValueError, match="used by running requests"):
        eng.remove_lora(1)
    eng.abort_request("busy")
    assert eng.page_pool.num_free_pages == eng.page_pool.num_usable_pages
    with pytest.raises(ValueError, match="2 LoRA requests for 1 prompts"):
        llm.generate([_PROMPTS[0]], sp, lora_request=[None, None])
    with pytest.raises(ValueError, match="id must be > 0"):
        LoRARequest("x", 0, adapters["a1"][0])
    for options, match in ((dict(max_lora_rank=7), "max_lora_rank"),
                           (dict(max_loras=2, max_cpu_loras=1), "max_cpu_loras"),
                           (dict(max_loras=0), "max_loras"),
                           (dict(pipeline_parallel_size=2), "pipeline")):
        with pytest.raises(ValueError, match=match):
            LLM(str(small_llama_folder), **{**_KW, **options})
    plain = LLM(str(small_llama_folder), **{**_KW, "enable_lora": False})
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        plain.generate([_PROMPTS[0]], sp, use_tqdm=False,
                       lora_request=LoRARequest("a1", 1, adapters["a1"][0]))


def test_lora_requests_info_names_the_running_and_waiting_adapters(small_llama_folder,
                                                                   adapters):
    """vLLM's lora_requests_info gauge (get_metrics; /metrics reads the same stats): with one
    slot, a1 runs and a2 waits (it would be a second adapter), then a2 runs; none after."""
    from jaxllm import LLM, SamplingParams

    llm = LLM(str(small_llama_folder), **{**_KW, "max_loras": 1})
    eng = llm.llm_engine

    def info():
        (g,) = [m for m in llm.get_metrics() if m.name == "jaxllm:lora_requests_info"]
        return g.labels["running_lora_adapters"], g.labels["waiting_lora_adapters"], g

    assert info()[:2] == ("", "") and info()[2].labels["max_lora"] == "1"
    sp = SamplingParams(max_tokens=3, ignore_eos=True)
    for i, lora in enumerate(_requests(adapters, ["a1", "a2", None])):
        eng.add_request(str(i), _PROMPTS[i], sp, lora_request=lora)
    eng.step()
    assert info()[:2] == ("a1", "a2")
    seen = set()
    while eng.has_unfinished_requests():
        eng.step()
        seen.add(info()[:2])
    assert ("a2", "") in seen and info()[:2] == ("", "")
    assert info()[2].value > 0
    plain = LLM(str(small_llama_folder), **{**_KW, "enable_lora": False})
    assert not [m for m in plain.get_metrics() if "lora" in m.name]


def test_fp8_weights_with_an_adapter_err_like_fp8_without_one(small_llama_folder, adapters):
    """quantization="fp8" (W8A8 base GEMMs, the adapter's delta in the model dtype on top):
    teacher-forced over PEFT's own a1 tokens, the log-prob error against PEFT stays within 2x
    (+ 0.05) of what fp8 alone costs the base model against HF on its tokens: the adapter adds
    no error of its own beyond fp8's (measured: 0.16 with a1, 0.24 without; the adapter's
    down_proj delta left out: 15.9). float32 against PEFT is 2e-4: the first test."""
    from transformers import AutoModelForCausalLM

    from jaxllm import LLM, SamplingParams

    llm = LLM(str(small_llama_folder), **{**_KW, "quantization": "fp8"})
    base = AutoModelForCausalLM.from_pretrained(str(small_llama_folder),
                                                dtype=torch.float32).eval()
    errs = {}
    for name, model in ((None, base), ("a1", adapters["a1"][1])):
        ids = torch.tensor([_PROMPTS[2]])
        with torch.no_grad():
            ids = model.generate(input_ids=ids, max_new_tokens=_N, min_new_tokens=_N,
                                 do_sample=False)[0].tolist()
            want = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        (o,) = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1,
                                                                        prompt_logprobs=0),
                            use_tqdm=False, lora_request=_requests(adapters, [name]))
        errs[name] = max(abs(o.prompt_logprobs[k][t].logprob - float(want[k - 1, t]))
                         for k, t in enumerate(ids) if k)
    assert errs["a1"] <= 2 * errs[None] + 0.05, errs


def _peft_beams(model, prompt, width, steps):
    """Beam search written out plainly over the PEFT model's full forwards (vLLM's rule: 2 x
    width candidates a beam, ranked by cumulative log-prob over the whole length, no EOS)."""
    beams = [(list(prompt), 0.0)]
    for _ in range(steps):
        cands = []
        for toks, cum in beams:
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([toks])).logits[0, -1],
                                       -1).numpy()
            for t in np.argsort(-lp)[:2 * width]:
                cands.append((toks + [int(t)], cum + float(lp[t])))
        beams = sorted(cands, key=lambda b: b[1] / len(b[0]), reverse=True)[:width]
    return beams


def test_beam_search_runs_each_prompts_adapter(small_llama_folder, adapters):
    """LLM.beam_search(lora_request=[...]) and AsyncEngine.beam_search(lora_request=) (the
    server's use_beam_search) search with the adapter: the beams and cumulative log-probs of a
    plain search over the PEFT model's forwards, one adapter per prompt, the base model
    beside them. The same prompt's beams differ between the adapters, so a search that ran
    the base model would fail."""
    import asyncio

    from jaxllm import LLM, AsyncEngine, BeamSearchParams

    width, steps = 2, 3
    params = BeamSearchParams(beam_width=width, max_tokens=steps, ignore_eos=True)
    base = adapters["a1"][1]
    names = ["a1", None, "a2", "a1"]
    prompts = [_PROMPTS[0], _PROMPTS[0], _PROMPTS[0], _PROMPTS[1]]
    refs = []
    for name, prompt in zip(names, prompts):
        if name is None:
            with base.disable_adapter():
                refs.append(_peft_beams(base, prompt, width, steps))
        else:
            refs.append(_peft_beams(adapters[name][1], prompt, width, steps))
    assert refs[0][0][0] != refs[1][0][0] != refs[2][0][0]

    llm = LLM(str(small_llama_folder), **_KW)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params,
                           lora_request=_requests(adapters, names), concurrency_limit=3)
    for out, ref in zip(outs, refs):
        assert [s.tokens for s in out.sequences] == [r[0] for r in ref]
        np.testing.assert_allclose([s.cum_logprob for s in out.sequences],
                                   [r[1] for r in ref], rtol=1e-4)
    eng = llm.llm_engine
    assert eng.page_pool.num_free_pages == eng.page_pool.num_usable_pages
    with pytest.raises(ValueError, match="got 1 LoRA requests for 2 prompts"):
        llm.beam_search([{"prompt_token_ids": p} for p in prompts[:2]], params,
                        lora_request=_requests(adapters, ["a1"]))

    engine = AsyncEngine(model=str(small_llama_folder), **_KW)
    try:
        async def search():
            [lora] = _requests(adapters, ["a2"])
            return [o async for o in engine.beam_search({"prompt_token_ids": prompts[2]}, "b",
                                                        params, lora_request=lora)]
        [out] = asyncio.run(search())
        assert [prompts[2] + c.token_ids for c in out.outputs] == [r[0] for r in refs[2]]
        assert out.lora_request.lora_name == "a2"
    finally:
        engine.shutdown()


def test_embeddings_and_scores_run_each_prompts_adapter(small_llama_folder, adapters):
    """A pooling engine (runner="pooling") with LoRA: LLM.embed(lora_request=[...]) gives each
    prompt the PEFT model's last-token final hidden state (normalized) under its adapter, the
    base model's beside them; max_loras=1 splits the batch into steps of one adapter each;
    LLM.score(lora_request=) is the cosine of two such states. Every page goes back."""
    from jaxllm import LLM
    from jaxllm.lora import manager

    def peft_last(name, prompt):
        model = adapters["a1" if name is None else name][1]
        with torch.no_grad(), (model.disable_adapter() if name is None
                               else contextlib.nullcontext()):
            h = model.base_model.model.model(torch.tensor([prompt])).last_hidden_state
        return h[0, -1].numpy().astype(np.float64)

    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    names = ["a1", None, "a2", "a1"]
    prompts = [_PROMPTS[0], _PROMPTS[0], _PROMPTS[0], _PROMPTS[3]]
    refs = [unit(peft_last(n, p)) for n, p in zip(names, prompts)]
    assert not np.allclose(refs[0], refs[1], atol=1e-2)  # the adapters move the state
    steps = []
    real = manager.LoraManager.activate

    def activate(self, seqs):
        seqs = list(seqs)
        steps.append({s.lora_int_id for s in seqs})
        return real(self, seqs)

    llm = LLM(str(small_llama_folder), runner="pooling", **{**_KW, "max_loras": 1})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(manager.LoraManager, "activate", activate)
        outs = llm.embed([{"prompt_token_ids": p} for p in prompts],
                         lora_request=_requests(adapters, names))
    for o, ref in zip(outs, refs):
        np.testing.assert_allclose(o.outputs.embedding, ref, rtol=1e-4, atol=1e-5)
    assert steps == [{1, 0}, {2}, {1}]  # FIFO, one adapter (and the base) a step
    [sc] = llm.score({"prompt_token_ids": prompts[0]}, [{"prompt_token_ids": prompts[3]}],
                     lora_request=_requests(adapters, ["a1"])[0])
    assert sc.outputs.score == pytest.approx(float(refs[0] @ refs[3]), abs=1e-5)
    eng = llm.llm_engine
    assert eng.page_pool.num_free_pages == eng.page_pool.num_usable_pages
    with pytest.raises(ValueError, match="got 1 LoRA requests for 2 prompts"):
        llm.embed([{"prompt_token_ids": p} for p in prompts[:2]],
                  lora_request=_requests(adapters, ["a1"]))
    plain = LLM(str(small_llama_folder), runner="pooling",
                **{**_KW, "enable_lora": False})
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        plain.embed([{"prompt_token_ids": prompts[0]}], lora_request=_requests(adapters,
                                                                              ["a1"])[0])


def test_a_projections_lora_delta_reads_its_slots_as_stored():
    """The delta's two GEMMs take the slots as laid out (a [in, L, R], b [L, R, out] reshape
    to row-major [in, L * R] and [L * R, out]): the compiled program holds the two dots, the
    mask and the final cast, and no copy, transpose or convert of the slot arrays (the former
    [L, in, R] layout cost a transpose of a and a convert of b in every projection of every
    step). The delta itself equals a per-token reference."""
    import re

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxllm.lora.layers import LoraPair

    pair = LoraPair(64, 48, 3, 8, jnp.float32)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 3, 8)).astype(np.float32)
    b = rng.standard_normal((3, 8, 48)).astype(np.float32)
    pair.a[...], pair.b[...] = jnp.asarray(a), jnp.asarray(b)
    graphdef, state = nnx.split(pair)
    fn = jax.jit(lambda st, x, s: nnx.merge(graphdef, st)(x, s))
    x = rng.standard_normal((5, 64)).astype(np.float32)
    slots = np.array([0, -1, 2, 1, 2], np.int32)
    got = np.asarray(fn(state, x, slots))
    want = np.stack([np.zeros(48, np.float32) if s < 0 else x[t] @ a[:, s] @ b[s]
                     for t, s in enumerate(slots)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    hlo = fn.lower(state, x, slots).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    slot_params = set(re.findall(r"(%\S+) = f32\[\d+,\d+,\d+\]\S* parameter\(", entry))
    assert len(slot_params) == 2, entry
    for line in entry.splitlines():
        if "parameter(" in line or "bitcast(" in line:
            continue
        ops = re.findall(r"%[\w.-]+", line.split("=", 1)[1]) if "=" in line else []
        assert not (set(ops) & slot_params and ("copy" in line or "convert" in line
                                    or "transpose" in line)), line
