"""Tensor / pipeline / data parallelism on 8 virtual CPU devices (tests/conftest.py sets
XLA_FLAGS before JAX starts): greedy tokens in float32 equal one device's, and the params and KV
cache are really split."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.config import EngineConfig
from jaxllm.engine.llm_engine import LLMEngine

from .helpers import fused_kv_write_on, small_llama_folder  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")

# Small shapes: two buckets, a short context, few pages.
ENGINE_KW = dict(dtype="float32", max_model_len=96, num_pages=24, max_num_seqs=4,
                 token_buckets=(8, 32), skip_compile_at_start=True)
GREEDY = SamplingParams(temperature=0.0, max_tokens=10)
PROMPTS = [[1, 450, 7483, 310, 3444, 338], [1, 822, 5713, 29898, 29876], [1, 2]]


def _llm(loaded=None, **kw) -> LLM:
    llm = LLM.__new__(LLM)
    llm.llm_engine = LLMEngine(EngineConfig(**{**ENGINE_KW, **kw}), loaded=loaded)
    llm._counter = itertools.count()
    return llm


def _llm_dp(**kw) -> LLM:
    from jaxllm.engine.data_parallel import create_engine

    llm = LLM.__new__(LLM)
    llm.llm_engine = create_engine(EngineConfig(**{**ENGINE_KW, **kw}))
    llm._counter = itertools.count()
    return llm


def _greedy(llm: LLM, prompts=PROMPTS) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _all_reduces(runner) -> int:
    """all-reduce ops in the compiled forward of the smallest bucket."""
    import dataclasses

    inputs = runner.prepare([], [], T=runner.token_buckets[0])
    hlo = runner._forward.lower(runner._leaves, runner.kv_caches,
                                dataclasses.replace(inputs, sampling=None),
                                runner._prev_tokens).compile().as_text()
    return hlo.count(" all-reduce(") + hlo.count(" all-reduce-start(")


def _shard_shapes(arr) -> set[tuple[int, ...]]:
    return {tuple(s.data.shape) for s in arr.addressable_shards}


@pytest.fixture(scope="module")
def small_reference(small_llama_folder):
    return _greedy(_llm(model=str(small_llama_folder)))


# -- mesh and rules -----------------------------------------------------------------------------

def test_mesh_sizes_that_do_not_fit_the_devices_or_heads_say_which_numbers():
    from sharding.mesh import make_mesh, stage_layers
    from sharding.rules import kv_head_layout

    assert make_mesh(2, 2, 2).devices.shape == (2, 2, 2)
    with pytest.raises(ValueError, match=r"\(4\) x .*\(2\) x .*\(2\) = 16 devices, but only 8"):
        make_mesh(4, 2, 2)
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(2\) must divide num_attention_heads \(9\)"):
        kv_head_layout(9, 3, 2)
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(6\) and num_key_value_heads \(4\)"):
        kv_head_layout(12, 4, 6)
    assert kv_head_layout(9, 3, 3) == (3, 1)
    assert kv_head_layout(8, 2, 4) == (4, 2)  # each KV head replicated twice
    from jax.sharding import PartitionSpec as P

    from sharding.rules import param_spec
    attn = ("model", "layers", 0, "self_attn")
    assert param_spec(attn + ("q_proj", "kernel"), (64, 64), 2) == P(None, "tp")  # column
    assert param_spec(attn + ("q_proj", "bias"), (64,), 2) == P("tp")
    assert param_spec(attn + ("q_proj", "kernel_scale"), (), 2) == P()  # a scalar stays whole
    assert param_spec(attn + ("o_proj", "kernel"), (64, 64), 2) == P("tp", None)  # row
    assert param_spec(attn + ("o_proj", "bias"), (64,), 2) == P()
    # Fused q/k/v, gate/up: split on A (kernel [E, A, C], fp8 weight [A, C, E], scale [A, C]).
    assert param_spec(attn + ("qkv_proj", "kernel"), (64, 2, 64), 2) == P(None, "tp", None)
    assert param_spec(attn + ("qkv_proj", "weight"), (2, 64, 64), 2) == P("tp", None, None)
    assert param_spec(attn + ("qkv_proj", "weight_scale"), (2, 64), 2) == P("tp", None)
    assert param_spec(attn + ("qkv_proj", "input_scale"), (), 2) == P()
    mlp = ("model", "layers", 0, "mlp")
    assert param_spec(mlp + ("gate_up_proj", "bias"), (128, 2), 2) == P("tp", None)
    assert param_spec(("model", "embed_tokens", "embedding"), (49152, 64), 3) == P("tp", None)
    assert param_spec(("lm_head", "kernel"), (64, 49153), 2) == P()  # V % tp: replicated
    assert [list(r) for r in stage_layers(5, 2)] == [[0, 1, 2], [3, 4]]
    with pytest.raises(ValueError, match=r"pipeline_parallel_size \(3\) exceeds the model's 2 layers"):
        stage_layers(2, 3)


def test_engine_rejects_tp_that_does_not_divide_the_heads(small_llama_folder):
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(3\) must divide num_attention_heads \(4\)"):
        _llm(model=str(small_llama_folder), tensor_parallel_size=3)


# -- tensor parallelism -------------------------------------------------------------------------

@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_greedy_matches_one_device_and_each_device_holds_its_slice(
        small_llama_folder, small_reference, tp):
    llm = _llm(model=str(small_llama_folder), tensor_parallel_size=tp)
    eng = llm.llm_engine
    model = eng.runner.state["model"]
    layer = model["layers"][0]
    E, H, K, D = 64, 4, 2, 16  # the small model (tests/helpers.py)
    V, F = 49152, 128
    Kb = max(K, tp)  # KV heads built: tp=4 > K=2 replicates each KV head, one per device
    # Column-parallel (fused q/k/v [E, Kb, (H/Kb + 2) D] and gate/up [E, F, 2], split on their
    # middle axis), row-parallel, vocab-parallel: each device holds 1/tp of each weight.
    assert _shard_shapes(layer["self_attn"]["qkv_proj"]["kernel"][...]) == {
        (E, Kb // tp, (H // Kb + 2) * D)}
    assert _shard_shapes(layer["self_attn"]["o_proj"]["kernel"][...]) == {(H * D // tp, E)}
    assert _shard_shapes(layer["mlp"]["gate_up_proj"]["kernel"][...]) == {(E, F // tp, 2)}
    assert _shard_shapes(layer["mlp"]["down_proj"]["kernel"][...]) == {(F // tp, E)}
    assert _shard_shapes(model["embed_tokens"]["embedding"][...]) == {(V // tp, E)}
    assert _shard_shapes(eng.runner.state["lm_head"]["kernel"][...]) == {(E, V // tp)}
    assert _shard_shapes(layer["input_layernorm"]["weight"][...]) == {(E,)}  # replicated
    # KV cache split by KV head, as the projections that write it.
    k_pages = eng.runner.kv_caches[0][0]
    assert len(k_pages.sharding.device_set) == tp
    assert _shard_shapes(k_pages) == {(25, 16, Kb // tp, D)}
    assert _greedy(llm) == small_reference
    # One compile per program used, as on one device (the KV cache keeps one sharding).
    assert eng.runner._forward._cache_size() <= len(eng.runner.step_variants())
    # One all-reduce per block: 2 layers x (attention, MLP), + the vocab-parallel embedding.
    assert _all_reduces(eng.runner) == 2 * 2 + 1
    # Compiled with XLA's one-shot all-reduce kernel off (2x faster all-reduces on 2 x H200).
    assert eng.runner._jit_options["compiler_options"] == {
        "xla_gpu_unsupported_use_all_reduce_one_shot_kernel": False}


def test_sharded_loading_reads_each_devices_slice_from_the_file(small_llama_folder, monkeypatch):
    from jaxllm.loading import load_model
    from jaxllm.loading.weights import LazyTensor
    from sharding.mesh import make_mesh, replica_meshes

    reads = []
    original = LazyTensor.__getitem__

    def spy(self, idx):
        out = original(self, idx)
        reads.append(out.shape)
        return out
    monkeypatch.setattr(LazyTensor, "__getitem__", spy)
    replica = replica_meshes(make_mesh(1, 1, 4))[0]
    loaded = load_model(str(small_llama_folder), dtype="float32", parallel=replica)
    # 4 devices, each read its quarter of the lm_head, the embedding and gate_proj, in the
    # file's [V, E] / [F, E] layout (the lm_head's transpose runs on the devices, a block each).
    assert reads.count((49152 // 4, 64)) == 2 * 4  # lm_head and embed_tokens
    # gate + up, 2 layers, 4 devices; and k / v [32, 64] read whole on the host to replicate
    # their 2 KV heads over 4 devices (the one host-side expansion), 2 layers
    assert reads.count((128 // 4, 64)) == 2 * 2 * 4 + 2 * 2
    assert reads.count((64, 128 // 4)) == 2 * 4  # down_proj [E, F], split on F
    assert (49152, 64) not in reads and (64, 49152) not in reads  # nothing big read whole
    w = loaded.model.lm_head.kernel[...]
    assert _shard_shapes(w) == {(64, 49152 // 4)}


def test_packed_phi3_weights_load_split_under_tensor_parallelism(tmp_path):
    """Phi-3's packed qkv_proj / gate_up_proj are split as they stream in; under tp=2 each
    device still reads only its block of each part, and the greedy tokens match one device."""
    import torch
    import transformers

    from .helpers import save_default_tokenizer

    cfg = transformers.Phi3Config(vocab_size=49152, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256,
                                  pad_token_id=0, architectures=["Phi3ForCausalLM"])
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # clear greedy choices
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    save_default_tokenizer(tmp_path)
    ref = _greedy(_llm(model=str(tmp_path)))
    assert _greedy(_llm(model=str(tmp_path), tensor_parallel_size=2)) == ref


def test_gemma3_under_pipeline_and_tensor_parallelism_matches_one_device(tmp_path):
    """Gemma 3's switches in the pipeline stages' own embed / logits code (sqrt(E) embeddings,
    the final soft-cap) and a rope base per layer type, and Gemma's norms under tp."""
    import torch
    import transformers

    from .helpers import save_default_tokenizer

    cfg = transformers.Gemma3TextConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        max_position_embeddings=256, sliding_window=6, final_logit_softcapping=5.0,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                         "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
        architectures=["Gemma3ForCausalLM"])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.2)  # Gemma's norms scale by 1 + w
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    save_default_tokenizer(tmp_path)
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2)

    def run(**kw):  # tokens and log-probs (a soft-cap never moves an argmax; it moves these)
        outs = _llm(model=str(tmp_path), **kw).generate(
            [{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        return ([o.outputs[0].token_ids for o in outs],
                [lp.logprob for o in outs for d in o.outputs[0].logprobs for lp in d.values()])

    ref_ids, ref_lps = run()
    for kw in (dict(pipeline_parallel_size=2), dict(tensor_parallel_size=2)):
        ids, lps = run(**kw)
        assert ids == ref_ids
        np.testing.assert_allclose(lps, ref_lps, rtol=1e-4, atol=1e-5)


def test_sleep_and_weight_updates_under_pipeline_and_tensor_parallelism(small_llama_folder,
                                                                         tmp_path):
    """Sleep mode frees and restores every stage's and shard's arrays, and update_weights
    places new weights by the sharding rules: the tokens of an engine loaded with them."""
    from jaxllm.loading.safetensors_loader import iter_safetensors, safetensors_files

    from .helpers import write_small_llama

    other = write_small_llama(tmp_path / "other", seed=1)
    want_own, want_other = _greedy(_llm(model=str(small_llama_folder))), _greedy(
        _llm(model=str(other)))
    for kw in (dict(pipeline_parallel_size=2), dict(tensor_parallel_size=2),
               dict(data_parallel_size=2)):  # every replica sleeps and takes the weights
        make = _llm_dp if "data_parallel_size" in kw else _llm
        llm = make(model=str(small_llama_folder), enable_sleep_mode=True, **kw)
        assert _greedy(llm) == want_own
        llm.sleep(level=1)
        llm.wake_up()
        assert _greedy(llm) == want_own
        llm.sleep(level=2)
        llm.update_weights(iter_safetensors(safetensors_files(other)))
        llm.wake_up()
        assert _greedy(llm) == want_other, kw


def test_tp3_on_the_default_model_matches_one_device(default_model_f32):
    # SmolLM2-135M: 9 query heads / 3 KV heads -> 3 + 1 per device.
    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 5248, 8806, 42, 198]]
    ref = _greedy(_llm(loaded=default_model_f32), prompts)
    llm = _llm(loaded=default_model_f32, tensor_parallel_size=3)
    k_pages = llm.llm_engine.runner.kv_caches[0][0]
    assert _shard_shapes(k_pages) == {(25, 16, 1, 64)}
    qkv = llm.llm_engine.runner.state["model"]["layers"][0]["self_attn"]["qkv_proj"]["kernel"][...]
    assert _shard_shapes(qkv) == {(576, 1, (3 + 2) * 64)}  # 1 KV head, its 3 q heads, k, v
    assert _greedy(llm, prompts) == ref


@pytest.mark.parametrize("source,tp", [("quantize", 2), ("quantize", 4), ("checkpoint", 4),
                                       ("block", 4)])
def test_fp8_under_tensor_parallelism_matches_fp8_on_one_device(small_llama_folder, tmp_path,
                                                                  source, tp, monkeypatch):
    # quantization="fp8" converts the sharded model in place: each shard's weights and
    # per-channel scales land in the fp8 layout's shards (row-parallel scales whole), and the
    # row-parallel input's per-token scale is a max over every shard's heads. tp=4 replicates
    # the 2 KV heads first (for a pre-quantized per-tensor checkpoint with static activation
    # scales, its broadcast weight scales too; q/k/v's differing input scales fuse to their
    # max). A block-wise checkpoint's scales [out, K blocks] split with their weight: on out
    # (column-parallel, fused), on the K blocks (row-parallel, whole blocks a shard).
    # Same scales, same products: the same greedy tokens.
    from jaxllm.loading.fp8_checkpoint import write_fp8_checkpoint

    if source == "quantize":
        kw = dict(model=str(small_llama_folder), quantization="fp8")
    elif source == "block":
        kw = dict(model=str(write_fp8_checkpoint(small_llama_folder, tmp_path / "blk", fmt="fp8",
                                                 strategy="block", block_size=(16, 16))))
    else:
        scales = {f"model.layers.{i}.{m}.{p}": (3.0 + j) / 448 for i in range(2)
                  for m, ps in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                ("mlp", ("gate_proj", "up_proj", "down_proj")))
                  for j, p in enumerate(ps)}
        kw = dict(model=str(write_fp8_checkpoint(
            small_llama_folder, tmp_path / "fp8", fmt="fp8", strategy="tensor",
            activation_scheme="static", input_scales=scales)))
    ref = _greedy(_llm(**kw))
    llm = _llm(tensor_parallel_size=tp, **kw)
    layer = llm.llm_engine.runner.state["model"]["layers"][0]
    E, H, F, D, Kb = 64, 4, 128, 16, max(2, tp)
    qkv = layer["self_attn"]["qkv_proj"]["weight"][...]
    assert qkv.dtype == jax.numpy.float8_e4m3fn
    assert _shard_shapes(qkv) == {(Kb // tp, (H // Kb + 2) * D, E)}
    assert _shard_shapes(layer["mlp"]["down_proj"]["weight"][...]) == {(E, F // tp)}
    down_scale = {(E,)} if source != "block" else {(E, F // 16 // tp)}
    assert _shard_shapes(layer["mlp"]["down_proj"]["weight_scale"][...]) == down_scale
    assert _greedy(llm) == ref
    if source == "block":  # the W8A8 block kernel is one device's: sharded, w8a16 runs
        monkeypatch.setenv("JAXLLM_FP8_BLOCK_GEMM", "w8a8")
        assert _greedy(_llm(tensor_parallel_size=tp, **kw)) == ref


def test_block_fp8_checkpoint_refuses_a_tp_that_splits_its_k_blocks(small_llama_folder,
                                                                     tmp_path):
    from jaxllm.loading.fp8_checkpoint import write_fp8_checkpoint

    folder = write_fp8_checkpoint(small_llama_folder, tmp_path / "blk", fmt="compressed-tensors",
                                  strategy="block", block_size=(16, 32))
    # o_proj's 64 input features in 4 shards of 16: half a block of 32 each
    with pytest.raises(ValueError, match=r"o_proj.*16.*weight block \(32\)"):
        _llm(model=str(folder), tensor_parallel_size=4)


# -- pipeline parallelism -----------------------------------------------------------------------

@pytest.mark.parametrize("tp,pp", [(1, 2), (4, 2)])
def test_pipeline_parallel_greedy_matches_one_device(small_llama_folder, small_reference, tp, pp):
    llm = _llm(model=str(small_llama_folder), tensor_parallel_size=tp, pipeline_parallel_size=pp)
    runner = llm.llm_engine.runner
    # Layer 0 lives on stage 0's devices, layer 1 on stage 1's: disjoint sets of tp devices.
    kv = runner.kv_caches
    d0, d1 = kv[0][0].sharding.device_set, kv[1][0].sharding.device_set
    assert len(d0) == len(d1) == tp and not d0 & d1
    state = runner.state["model"]["layers"]
    assert state[0]["mlp"]["gate_up_proj"]["kernel"][...].sharding.device_set == d0
    assert state[1]["mlp"]["gate_up_proj"]["kernel"][...].sharding.device_set == d1
    assert _greedy(llm) == small_reference
    # Decode of 3 sequences in 2 micro-batches: each micro-batch of step N+1 took its tokens
    # from its own micro-batch of step N (no wait for the whole step).
    assert runner.num_prev_from_one_micro_batch >= 8


def test_pipeline_splits_a_batch_into_micro_batches_of_whole_sequences(small_llama_folder):
    llm = _llm(model=str(small_llama_folder), pipeline_parallel_size=2)
    runner = llm.llm_engine.runner

    class S:  # a ScheduledSeq stand-in: only the token count matters to the split
        def __init__(self, n):
            self.num_new_tokens = n
    groups = runner._split([S(1), S(1), S(1)])
    assert [len(g) for g in groups] == [2, 1]
    assert [len(g) for g in runner._split([S(5), S(1)])] == [1, 1]
    assert [len(g) for g in runner._split([S(3)])] == [1]


def test_constrained_sampling_under_tensor_and_pipeline_parallelism_matches_one_device(
        small_llama_folder):
    """The token bitmask rides in the replicated sampler inputs (TP) and in each pipeline
    micro-batch's own inputs (PP)."""
    import re

    from jaxllm.sampling_params import StructuredOutputsParams

    params = [SamplingParams(temperature=0.0, max_tokens=12, structured_outputs=(
                  StructuredOutputsParams(regex="[a-z]{3,8}"))),
              SamplingParams(temperature=0.0, max_tokens=6, allowed_token_ids=[5, 17, 300]),
              GREEDY]

    def run(llm):
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        return [o.outputs[0] for o in outs]

    ref = run(_llm(model=str(small_llama_folder)))
    assert re.fullmatch("[a-z]{3,8}", ref[0].text) and set(ref[1].token_ids) <= {5, 17, 300}
    for kw in ({"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}):
        got = run(_llm(model=str(small_llama_folder), **kw))
        assert [list(c.token_ids) for c in got] == [list(c.token_ids) for c in ref], kw


# -- data parallelism ---------------------------------------------------------------------------

def test_data_parallel_replicas_on_disjoint_devices_match_one_device_and_share_the_load(
        small_llama_folder, small_reference):
    from jaxllm.engine.data_parallel import DataParallelEngine

    llm = _llm_dp(model=str(small_llama_folder), data_parallel_size=2, tensor_parallel_size=2)
    eng = llm.llm_engine
    assert isinstance(eng, DataParallelEngine) and len(eng.engines) == 2
    sets = [e.runner.kv_caches[0][0].sharding.device_set for e in eng.engines]
    assert len(sets[0]) == len(sets[1]) == 2 and not sets[0] & sets[1]
    # Work = prompt + max_tokens: r0 (6 + 10) -> replica 0, r1 (5 + 10) -> replica 1 (0 < 16),
    # r2 (2 + 10) -> replica 1 again (15 < 16): the least outstanding work, not round-robin.
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"r{i}", {"prompt_token_ids": p}, GREEDY)
    assert [sorted(e._requests) for e in eng.engines] == [["r0"], ["r1", "r2"]]
    assert eng.outstanding_work == [16, 27]
    for i in range(len(PROMPTS)):
        eng.abort_request(f"r{i}")
    assert eng.outstanding_work == [0, 0] and not eng.has_unfinished_requests()
    assert _greedy(llm) == small_reference


def test_calculate_kv_scales_under_data_and_tensor_parallelism_match_one_device(
        small_llama_folder):
    # calculate_kv_scales' calibration forward runs where each replica's params are (the second
    # replica's devices are not the default one), sharded on KV heads under tp (tp 4 replicates
    # the 2 KV heads): every engine gets one device's scales and serves its tokens.
    from jaxllm.engine import kv_scales
    from jaxllm.loading import load_model

    kw = dict(model=str(small_llama_folder), kv_cache_dtype="fp8", calculate_kv_scales=True)
    one = _llm(**kw)
    want = np.array(one.llm_engine.model_config.kv_cache_scales)
    plain = load_model(str(small_llama_folder), dtype="float32")  # outside any engine
    ids = kv_scales.calibration_token_ids(plain.tokenizer, plain.model_config.vocab_size)
    np.testing.assert_allclose(want, kv_scales.calculate_kv_scales(plain.model, ids),
                               rtol=1e-6)
    llm = _llm_dp(data_parallel_size=2, tensor_parallel_size=2, **kw)
    engines = llm.llm_engine.engines
    for e in engines:
        np.testing.assert_allclose(np.array(e.model_config.kv_cache_scales), want, rtol=1e-6)
    devices = [e.runner.kv_caches[0][0].sharding.device_set for e in engines]
    assert not devices[0] & devices[1]
    assert _greedy(llm) == _greedy(one)
    tp4 = _llm(tensor_parallel_size=4, **kw)
    np.testing.assert_allclose(np.array(tp4.llm_engine.model_config.kv_cache_scales), want,
                               rtol=1e-6)
    assert _greedy(tp4) == _greedy(one)


# -- multi-host ---------------------------------------------------------------------------------

def test_distributed_args_come_from_flags_or_env_and_name_what_is_missing(monkeypatch):
    from sharding.distributed import resolve_args

    for k in ("JAXLLM_COORDINATOR_ADDRESS", "JAXLLM_NUM_PROCESSES", "JAXLLM_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="--num-processes, --process-id"):
        resolve_args("10.0.0.1:8476", None, None)
    monkeypatch.setenv("JAXLLM_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAXLLM_PROCESS_ID", "1")
    assert resolve_args("10.0.0.1:8476", None, None) == ("10.0.0.1:8476", 2, 1)
    with pytest.raises(ValueError, match="process_id=2, num_processes=2"):
        resolve_args("10.0.0.1:8476", 2, 2)


def test_two_processes_under_jax_distributed_produce_the_tokens_of_one(
        small_llama_folder, small_reference):
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kw = {**ENGINE_KW, "model": str(small_llama_folder), "tensor_parallel_size": 2}
    root = Path(__file__).resolve().parent.parent
    # One CPU device per process: the tp=2 mesh spans both processes.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tests.multihost_worker", str(i), "2", str(port), json.dumps(kw),
         json.dumps(PROMPTS)], cwd=root, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in (1, 0)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    follower, leader = outs
    assert procs[1].returncode == 0, leader[-3000:]
    assert procs[0].returncode == 0, follower[-3000:]
    line = next(ln for ln in leader.splitlines() if ln.startswith("TOKENS "))
    assert json.loads(line[len("TOKENS "):]) == small_reference
    steps = int(next(ln for ln in follower.splitlines() if ln.startswith("FOLLOWED ")).split()[1])
    assert steps >= 10  # it really launched the leader's steps (10 tokens, a prefill first)


@pytest.mark.parametrize("rope,split_k", [(False, 1), (True, 1), (True, 2)])
def test_fused_kv_write_under_tensor_parallelism_matches_one_device(small_llama_folder,
                                                                    small_reference, monkeypatch,
                                                                    rope, split_k):
    # The decode kernel that writes the new K/V itself (JAXLLM_ATTENTION_KNOBS fused_kv_write,
    # Pallas backend interpreted here) runs per head shard like the scatter it replaces: each
    # shard writes its own KV heads' rows. With fused_qkv_rope (rope) each shard's kernel
    # reads its own KV heads' slice of the fused q/k/v output and applies rope itself; with
    # qkv_split_k (split_k) the slice of each of the GEMM's split-K partials.
    fused_traces = fused_kv_write_on(monkeypatch, rope=rope, split_k=split_k)
    llm = _llm(model=str(small_llama_folder), tensor_parallel_size=2, attention_backend="pallas")
    assert _greedy(llm) == small_reference
    assert fused_traces, "the decode-only steps did not take the fused path"
    assert set(fused_traces) == {split_k}


def test_multi_step_decode_under_tensor_parallelism_matches_one_device(small_llama_folder,
                                                                       small_reference, caplog):
    # num_scheduler_steps=4 with tp=2: the device loop of forward + sampler runs over the mesh
    # (attention per head shard) and serves one device's greedy tokens. Pipeline parallelism
    # has no multi-step program: it says so and runs one step per launch.
    llm = _llm(model=str(small_llama_folder), tensor_parallel_size=2, num_scheduler_steps=4)
    runner = llm.llm_engine.runner
    launches = []
    run_multi = runner.run_multi
    runner.run_multi = lambda inputs, sort, k: launches.append(k) or run_multi(inputs, sort, k)
    assert _greedy(llm) == small_reference
    assert launches and set(launches) == {4}
    with caplog.at_level("WARNING", logger="jaxllm"):
        pp = _llm(model=str(small_llama_folder), pipeline_parallel_size=2, num_scheduler_steps=4)
    assert "num_scheduler_steps=4 is not supported" in caplog.text
    assert pp.llm_engine.runner.num_scheduler_steps == 1
    assert _greedy(pp) == small_reference
