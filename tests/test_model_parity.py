"""Our Llama-family model, loaded from an HF folder, gives HF transformers' logits.

Each case builds a tiny random HF model (torch, float32) with every parameter randomised (norm
weights and biases too, so a misplaced one shows), saves it as safetensors, loads it with
``load_hf_folder`` and runs one ragged prefill of several sequences through a shuffled page
table. Error measure: ``max|ours - hf| / max|hf|`` over every position's logits.

Bounds: float32 < 1e-4 (measured ~5e-7: the only differences are summation order). bfloat16
weights and activations vs HF float32: < 2e-2, or, where HF's own bf16 forward is further than
that from its float32, within 10% of HF's own distance (bf16 keeps 8 mantissa bits, ~4e-3 per
rounding; measured 2026-12-05: HF's own bf16 lands 0.9-2.2e-2 from its float32 on the Llama,
Qwen, Mistral, Phi-3 and Gemma cases, ours 1.0-1.7e-2; Gemma 2, with four norms a layer and
two soft-caps, HF 2.72e-2 and ours 2.70e-2).
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.loading.hf_config import model_config_from_hf
from jaxllm.loading.safetensors_loader import iter_safetensors, load_hf_folder, safetensors_files
from jaxllm.loading.weights import load_params_from_tensors
from jaxllm.models.attention import AttentionMetadata
from jaxllm.models.llama import LlamaForCausalLM, init_kv_cache
from jaxllm.models.registry import MODEL_REGISTRY, get_model_class

PAGE_SIZE = 4
NUM_PAGES = 40
T_PAD = 48  # token bucket: every step in these tests fits, so each model compiles once or twice
S_PAD = 4
M_PAD = 8  # max pages per sequence (32 tokens)
SEQ_LENS = (5, 17, 11)

F32_BOUND = 1e-4
BF16_BOUND = 2e-2

_SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5)

# name -> (HF config class, overrides). Together they cover every registered architecture, GQA
# (4/2) and MHA, tied embeddings, rope scaling (llama3, linear), sliding windows (every layer;
# Qwen's layers >= max_window_layers), q/k/v (+o, MLP) bias and q/k norm with head_dim != E/H.
# Each case costs a compile per dtype, so features share cases.
CASES = {
    "llama3_rope_gqa_tied_smollm2": (transformers.LlamaConfig, dict(
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64})),
    "llama_linear_rope_bias_mha": (transformers.LlamaConfig, dict(
        attention_bias=True, mlp_bias=True, num_key_value_heads=4,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "mistral_sliding_window": (transformers.MistralConfig, dict(sliding_window=6)),
    "qwen2_qkv_bias_tied_sliding_upper_layers": (transformers.Qwen2Config, dict(
        tie_word_embeddings=True, use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "qwen3_qk_norm": (transformers.Qwen3Config, dict(head_dim=32)),
    "phi3_packed_projections_sliding": (transformers.Phi3Config, dict(
        sliding_window=7, pad_token_id=0)),
    "gemma_geglu_mqa": (transformers.GemmaConfig, dict(num_key_value_heads=1, head_dim=32)),
    # soft-caps small enough to bind on these random activations
    "gemma2_sandwich_norms_softcaps_alternate_sliding": (transformers.Gemma2Config, dict(
        head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0, sliding_window=6)),
    # a rope base per layer type (scaled on the full layers), q/k norms with Gemma's offset
    "gemma3_text_local_and_global_rope_qk_norm": (transformers.Gemma3TextConfig, dict(
        architectures=["Gemma3ForCausalLM"], head_dim=16, query_pre_attn_scalar=16,
        sliding_window=6, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1e6,
                                            "factor": 2.0}})),
    "granite_multipliers_tied": (transformers.GraniteConfig, dict(
        embedding_multiplier=12.0, attention_multiplier=0.05, residual_multiplier=0.22,
        logits_scaling=8.0, tie_word_embeddings=True)),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (HF inits norms to 1 and biases to 0, which would hide mix-ups)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def _tokens(seed: int, vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).astype(np.int32) for n in SEQ_LENS]


HF_BF16_ERR: dict[str, float] = {}  # per case: HF's own bf16 forward against its float32


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(name, folder, per-sequence token ids, per-sequence HF float32 logits [L, V])."""
    name = request.param
    cls, overrides = CASES[name]
    hf_config = cls(**{**_SMALL, **overrides})
    if not hf_config.architectures:
        hf_config.architectures = [cls.__name__.replace("Config", "ForCausalLM")]
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    _randomise(hf_model, seed=len(name))
    folder = tmp_path_factory.mktemp(name)
    hf_model.save_pretrained(folder, safe_serialization=True)
    seqs = _tokens(1, hf_config.vocab_size)
    with torch.no_grad():
        ref = [hf_model(torch.from_numpy(s[None].astype(np.int64))).logits[0].float().numpy() for s in seqs]
        hf_bf16 = hf_model.to(torch.bfloat16)
        hf_bf16_err = rel_err([hf_bf16(torch.from_numpy(s[None].astype(np.int64))).logits[0]
                               .float().numpy() for s in seqs], ref)
    HF_BF16_ERR[name] = hf_bf16_err
    return name, folder, seqs, ref


# ---------------------------------------------------------------------------------------------
# Ragged-batch driver: builds AttentionMetadata the way the model runner will.


class PagedSequences:
    """Host-side page bookkeeping for a few sequences; pages handed out in a shuffled order."""

    def __init__(self, num_seqs: int, seed: int = 0):
        pages = np.random.default_rng(seed).permutation(np.arange(1, NUM_PAGES))  # page 0 = scratch
        self.page_table = np.zeros((S_PAD, M_PAD), np.int32)
        self.page_table[:num_seqs] = pages[: num_seqs * M_PAD].reshape(num_seqs, M_PAD)
        self.lens = [0] * num_seqs

    def step(self, chunks: list[tuple[int, np.ndarray]]):
        """chunks: (seq index, new token ids). Returns jnp inputs padded to (T_PAD, S_PAD)."""
        tok = np.zeros(T_PAD, np.int32)
        pos = np.zeros(T_PAD, np.int32)
        slot = np.arange(T_PAD, dtype=np.int32) % PAGE_SIZE  # padding -> scratch page 0
        qsl = np.zeros(S_PAD + 1, np.int32)
        seq_lens = np.zeros(S_PAD, np.int32)
        table = np.zeros((S_PAD, M_PAD), np.int32)
        t = 0
        for i, (s, ids) in enumerate(chunks):
            start = self.lens[s]
            p = np.arange(start, start + len(ids), dtype=np.int32)
            tok[t:t + len(ids)] = ids
            pos[t:t + len(ids)] = p
            slot[t:t + len(ids)] = self.page_table[s, p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE
            t += len(ids)
            qsl[i + 1] = t
            seq_lens[i] = start + len(ids)
            table[i] = self.page_table[s]
            self.lens[s] += len(ids)
        qsl[len(chunks) + 1:] = t
        md = AttentionMetadata(slot_mapping=jnp.asarray(slot), query_start_loc=jnp.asarray(qsl),
                               seq_lens=jnp.asarray(seq_lens), page_table=jnp.asarray(table),
                               num_seqs=jnp.asarray([len(chunks)], jnp.int32))
        return jnp.asarray(tok), jnp.asarray(pos), md, t


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, token_ids, positions, kv_caches, md):
    model = nnx.merge(graphdef, state)
    hidden, kv_caches = model(token_ids, positions, kv_caches, md)
    return model.compute_logits(hidden), kv_caches


def run_steps(model, config: ModelConfig, steps: list[list[tuple[int, np.ndarray]]], num_seqs: int):
    """Runs ragged steps through one paged cache; returns per-sequence logits [L, V] float32."""
    graphdef, state = nnx.split(model)
    kv = init_kv_cache(config, NUM_PAGES, PAGE_SIZE, model.dtype)
    seqs = PagedSequences(num_seqs)
    out = [[] for _ in range(num_seqs)]
    for chunks in steps:
        tok, pos, md, _ = seqs.step(chunks)
        logits, kv = _forward(graphdef, state, tok, pos, kv, md)
        logits = np.asarray(logits)
        t = 0
        for s, ids in chunks:
            out[s].append(logits[t:t + len(ids)])
            t += len(ids)
    return [np.concatenate(o) for o in out]


def rel_err(ours: list[np.ndarray], ref: list[np.ndarray]) -> float:
    """max|ours - ref| / max|ref| over every position of every sequence."""
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ours, ref))
    return diff / max(float(np.max(np.abs(b))) for b in ref)


def one_prefill(seqs):
    return [[(i, s) for i, s in enumerate(seqs)]]


# ---------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("dtype,bound", [("float32", F32_BOUND), ("bfloat16", BF16_BOUND)])
def test_ragged_prefill_logits_match_hf(case, dtype, bound):
    name, folder, seqs, ref = case
    config, model = load_hf_folder(folder, dtype)
    ours = run_steps(model, config, one_prefill(seqs), len(seqs))
    err = rel_err(ours, ref)
    if dtype == "bfloat16":  # no worse than HF's own bf16 forward (module docstring)
        bound = max(bound, 1.1 * HF_BF16_ERR[name])
    print(f"\n{name} {dtype}: max rel err {err:.2e}")
    assert err < bound, f"{name} {dtype}: max relative error {err:.3e} >= {bound}"


def test_chunked_prefill_and_decode_match_one_full_prefill(case):
    name, folder, seqs, ref = case
    config, model = load_hf_folder(folder, "float32")
    full = run_steps(model, config, one_prefill(seqs), len(seqs))
    # Seq 0 and 1 prefill in chunks, then all three decode token by token in one ragged batch
    # while seq 2 is still mid-prefill in the first decode steps (mixed prefill + decode).
    a, b, c = seqs
    steps = [[(0, a[:3]), (1, b[:6])],
             [(1, b[6:13]), (0, a[3:4]), (2, c[:2])],
             [(0, a[4:5]), (1, b[13:14]), (2, c[2:9])]]
    for i in range(max(len(b) - 14, len(c) - 9)):
        steps.append([(s, seq[k:k + 1]) for s, seq, k in ((1, b, 14 + i), (2, c, 9 + i)) if k < len(seq)])
    chunked = run_steps(model, config, steps, len(seqs))
    assert [len(x) for x in chunked] == list(SEQ_LENS)
    err = rel_err(chunked, full)
    assert err < 1e-5, f"{name}: chunked vs full prefill relative error {err:.3e}"
    assert rel_err(chunked, ref) < F32_BOUND


def test_model_structure_builds_abstractly_without_allocating():
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128)
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    n_params = sum(int(np.prod(x.shape)) for x in leaves)
    assert 8.0e9 < n_params < 8.1e9  # Llama-3-8B


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    hf_config = transformers.LlamaConfig(**_SMALL, architectures=["LlamaForCausalLM"])
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    folder = tmp_path_factory.mktemp("llama_err")
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _tensors(folder):
    return list(iter_safetensors(safetensors_files(folder)))


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        get_model_class("GPT2LMHeadModel")
    cfg = transformers.LlamaConfig(**_SMALL, architectures=["FalconForCausalLM"])
    with pytest.raises(ValueError, match="FalconForCausalLM.*Qwen3ForCausalLM"):
        model_config_from_hf(cfg)
    assert set(MODEL_REGISTRY) == {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                   "Qwen3ForCausalLM", "Phi3ForCausalLM", "GemmaForCausalLM",
                                   "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                                   "GraniteForCausalLM"}
    # Phi-3.5 / Phi-4-mini: longrope and partial rotary are refused, not run wrong
    cfg = transformers.Phi3Config(**_SMALL, architectures=["Phi3ForCausalLM"],
                                  rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                                   "short_factor": [1.0] * 8,
                                                   "long_factor": [1.0] * 8})
    with pytest.raises(ValueError, match="longrope"):
        model_config_from_hf(cfg)


def test_unsupported_rope_type_is_rejected():
    cfg = transformers.LlamaConfig(**_SMALL, architectures=["LlamaForCausalLM"],
                                   rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_type='dynamic'.*llama3"):
        model_config_from_hf(cfg)


def test_missing_tensor_is_named(llama_folder):
    _, config = load_hf_folder_config(llama_folder)
    tensors = [(n, t) for n, t in _tensors(llama_folder) if n != "model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"Missing tensors.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_params_from_tensors(None, config, tensors, jnp.float32)


def test_shape_mismatch_names_tensor_expected_and_got(llama_folder):
    _, config = load_hf_folder_config(llama_folder)
    tensors = [(n, t[:, :32] if n == "model.layers.0.self_attn.k_proj.weight" else t)
               for n, t in _tensors(llama_folder)]
    with pytest.raises(ValueError, match=r"k_proj\.weight.*expected \(32, 64\), got \(32, 32\)"):
        load_params_from_tensors(None, config, tensors, jnp.float32)


def test_unexpected_tensor_is_named_and_rotary_buffers_are_ignored(llama_folder):
    _, config = load_hf_folder_config(llama_folder)
    tensors = _tensors(llama_folder)
    extra = [("model.layers.0.self_attn.rotary_emb.inv_freq", np.ones(8, np.float32))]
    load_params_from_tensors(None, config, tensors + extra, jnp.float32)
    with pytest.raises(ValueError, match=r"Unexpected tensor 'model\.layers\.0\.mlp\.experts\.weight'"):
        load_params_from_tensors(None, config, tensors + [("model.layers.0.mlp.experts.weight",
                                                           np.ones(4, np.float32))], jnp.float32)


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_hf_folder(missing, "float32")


def test_folder_without_config_json_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_folder(tmp_path, "float32")


def test_unknown_dtype_is_rejected(llama_folder):
    with pytest.raises(ValueError, match="dtype='int8'"):
        load_hf_folder(llama_folder, "int8")


def test_sharded_checkpoint_loads_like_a_single_file(llama_folder, tmp_path):
    from safetensors.numpy import save_file

    tensors = _tensors(llama_folder)
    half = len(tensors) // 2
    weight_map = {}
    for i, part in enumerate((tensors[:half], tensors[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file(dict(part), str(tmp_path / fname))
        weight_map.update({n: fname for n, _ in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((llama_folder / "config.json").read_text())
    _, sharded = load_hf_folder(tmp_path, "float32")
    _, single = load_hf_folder(llama_folder, "float32")
    for a, b in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(single))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_plain_checkpoints_are_copied_ahead_of_the_config_and_load_the_same(
        llama_folder, monkeypatch, caplog):
    # load_hf_folder copies a plain checkpoint's tensors to the device on a thread while it
    # reads config.json (transformers' import); the params equal the loader's own path's.
    import logging

    from jaxllm.loading import safetensors_loader as sl

    made = []

    class Spy(sl._DevicePrefetch):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(sl, "_DevicePrefetch", Spy)
    with caplog.at_level(logging.INFO, logger="jaxllm"):
        _, ahead = load_hf_folder(llama_folder, "float32")
        _, narrowed = load_hf_folder(llama_folder, "bfloat16")
    # float32 files: copied ahead into a float32 model, not into a bfloat16 one (each copy
    # would be twice its param).
    assert [m.copied_bytes for m in made] == [sum(t.nbytes for _, t in _tensors(llama_folder)), 0]
    assert "of them copied on a thread beside the config's read" in caplog.text
    monkeypatch.setattr(sl, "_plain_checkpoint", lambda folder: None)
    _, plain = load_hf_folder(llama_folder, "float32")
    assert len(made) == 2
    for a, b in zip(jax.tree.leaves(nnx.state(ahead)), jax.tree.leaves(nnx.state(plain))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(narrowed))} == {jnp.dtype(jnp.bfloat16)}


def test_a_bad_config_stops_the_copies_and_raises_its_own_error(llama_folder, tmp_path):
    import threading

    folder = tmp_path / "bad_config"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((llama_folder / "model.safetensors").read_bytes())
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(ValueError, match="no-such-model"):
        load_hf_folder(folder, "float32")
    assert not [t for t in threading.enumerate() if t.name == "jaxllm-weights-prefetch"]
    # A corrupt file under a good config: the reader's error, from the copying thread.
    (folder / "config.json").write_text((llama_folder / "config.json").read_text())
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) - 8)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_hf_folder(folder, "float32")
    # A tensor the model lacks, after the copies: the error names it, and the traceback (which a
    # notebook keeps) holds no copied tensors.
    from safetensors.numpy import save_file

    tensors = dict(_tensors(llama_folder))
    tensors["model.layers.0.mlp.experts.weight"] = np.ones(4, np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="Unexpected tensor") as info:
        load_hf_folder(folder, "float32")
    frames = [tb.tb_frame for tb in _walk(info.value.__traceback__)]
    held = [v for f in frames for v in f.f_locals.values()
            if type(v).__name__ == "_DevicePrefetch"]
    assert held and all(not p._items for p in held)


def _walk(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_device_side_transpose_and_cast_equal_the_host_path(llama_folder, dtype):
    # The default placement puts each tensor on the device as read and transposes / casts it
    # there (numpy's bf16 transpose was the 8B load's bottleneck); a caller's `place` gets the
    # host-converted tensor. Both give the same params, bit for bit, from float32 files.
    _, config = load_hf_folder_config(llama_folder)
    tensors = _tensors(llama_folder)
    on_device = load_params_from_tensors(None, config, tensors, dtype)
    on_host = load_params_from_tensors(None, config, tensors, dtype,
                                       place=lambda _name, arr: jax.device_put(arr))
    flat_d, flat_h = nnx.to_flat_state(nnx.state(on_device)), nnx.to_flat_state(nnx.state(on_host))
    assert [p for p, _ in flat_d] == [p for p, _ in flat_h]
    kernels = 0
    for (path, a), (_, b) in zip(flat_d, flat_h):
        a, b = a.get_value(), b.get_value()
        assert a.dtype == b.dtype == dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        kernels += "kernel" in path
    assert kernels >= 7 * _SMALL["num_hidden_layers"]  # the transposed projections were compared


def _write_aligned_safetensors(path, tensors):
    # float32 tensors with the data and every tensor at a 64-byte boundary (the alignment a
    # CPU device_put needs to alias host memory instead of copying it).
    header, offset = {}, 0
    for name, arr in tensors:
        n = arr.nbytes
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [offset, offset + n]}
        offset += -(-n // 64) * 64
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 64)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, arr in tensors:
            f.seek(8 + len(raw) + header[name]["data_offsets"][0])
            f.write(np.ascontiguousarray(arr, np.float32).tobytes())
        f.truncate(8 + len(raw) + offset)


def test_params_do_not_alias_the_memory_mapped_file(llama_folder, tmp_path):
    # Tensors are views of the memory-mapped file, and a CPU device_put of aligned memory is
    # zero-copy: every param, from the default placement, a caller's place or the sharded
    # path, must own its memory, or rewriting the file in place would change the loaded model.
    folder = tmp_path / "aligned"
    folder.mkdir()
    (folder / "config.json").write_text((llama_folder / "config.json").read_text())
    path = folder / "model.safetensors"
    _write_aligned_safetensors(path, [(n, np.asarray(t)) for n, t in _tensors(llama_folder)])
    _, config = load_hf_folder_config(folder)
    aliased = [n for n, v in iter_safetensors([path])
               if jax.device_put(v).unsafe_buffer_pointer() == v.ctypes.data]
    assert aliased  # the hazard is real for this file
    from sharding.mesh import make_mesh, replica_meshes

    replica = replica_meshes(make_mesh(1, 1, 2))[0]  # tp 2: each device reads its block
    models = [load_params_from_tensors(None, config, iter_safetensors([path]), jnp.float32),
              load_params_from_tensors(None, config, iter_safetensors([path]), jnp.float32,
                                       place=lambda _name, arr: jax.device_put(arr)),
              load_params_from_tensors(None, config, iter_safetensors([path], lazy=True),
                                       jnp.float32, parallel=replica),
              load_hf_folder(folder, "float32")[1]]  # its tensors copied ahead on a thread
    before = [[np.array(x) for x in jax.tree.leaves(nnx.state(m))] for m in models]
    size = path.stat().st_size
    with open(path, "r+b") as f:  # same size, every data byte changed
        f.seek(64)
        f.write(b"\x7f" * (size - 64))
    for m, old in zip(models, before):
        for x, y in zip(jax.tree.leaves(nnx.state(m)), old):
            np.testing.assert_array_equal(np.asarray(x), y)


def test_a_models_own_params_reload_without_a_transpose(llama_folder, monkeypatch):
    # model_to_hf_tensors hands a model's [in, out] kernels back as HF-layout views: the loader
    # places the memory as it lies (no strided host copy, no device transpose) and gets the
    # same model back.
    from jaxllm.loading import weights

    _, config = load_hf_folder_config(llama_folder)
    model = load_params_from_tensors(None, config, _tensors(llama_folder), jnp.float32)
    calls = []
    original = weights._device_layout

    def spy(x, transpose, *args):
        calls.append(transpose)
        return original(x, transpose, *args)
    monkeypatch.setattr(weights, "_device_layout", spy)
    again = load_params_from_tensors(None, config, weights.model_to_hf_tensors(model), jnp.float32)
    assert calls and not any(calls)
    for a, b in zip(jax.tree.leaves(nnx.state(again)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_legacy_rope_theta_and_rope_scaling_in_config_json_are_read(tmp_path):
    # Llama 3.1's config.json as published: rope settings outside rope_parameters.
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", **_SMALL, rope_theta=500000.0,
               rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
               eos_token_id=[128001, 128008, 128009], bos_token_id=128000)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _, config = load_hf_folder_config(tmp_path)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling_dict == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert config.eos_token_ids == (128001, 128008, 128009) and config.bos_token_id == 128000
    hash(config)  # stays usable as a jit static argument


def test_pre_transformers5_config_object_with_separate_rope_fields_is_read():
    from types import SimpleNamespace

    old = SimpleNamespace(architectures=["MistralForCausalLM"], **_SMALL, rope_theta=1e6,
                          rope_scaling={"type": "linear", "factor": 4.0}, sliding_window=4096,
                          eos_token_id=2, tie_word_embeddings=False, hidden_act="silu")
    config = model_config_from_hf(old)
    assert config.rope_theta == 1e6 and config.rope_scaling_dict == {"rope_type": "linear", "factor": 4.0}
    assert config.sliding_window == 4096 and config.layer_sliding_window(1) == 4096
    assert config.head_dim == 16 and config.eos_token_ids == (2,)


def load_hf_folder_config(folder):
    from jaxllm.loading.safetensors_loader import load_hf_config

    return load_hf_config(folder)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_gemm_out_model_dtype_is_bf16_logits_cast_to_float32(tied, monkeypatch):
    # JAXLLM_LOGITS_GEMM_OUT=model: the lm_head GEMM returns the model dtype (as vLLM and HF
    # do), cast to float32. Same logits as the float32-out GEMM rounded to bf16, float32 out.
    config = ModelConfig(architecture="LlamaForCausalLM", head_dim=16, **_SMALL,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
    hidden = jax.random.normal(jax.random.key(4), (3, config.hidden_size), jnp.bfloat16)
    monkeypatch.delenv("JAXLLM_LOGITS_GEMM_OUT", raising=False)
    f32 = model.compute_logits(hidden)
    monkeypatch.setenv("JAXLLM_LOGITS_GEMM_OUT", "model")
    out = model.compute_logits(hidden)
    assert f32.dtype == out.dtype == jnp.float32
    assert not np.array_equal(np.asarray(f32), np.asarray(out))  # the bf16 rounding happened
    np.testing.assert_array_equal(np.asarray(out),
                                  np.asarray(f32.astype(jnp.bfloat16).astype(jnp.float32)))
    monkeypatch.setenv("JAXLLM_LOGITS_GEMM_OUT", "bf16")
    with pytest.raises(ValueError, match="JAXLLM_LOGITS_GEMM_OUT"):
        model.compute_logits(hidden)


def test_a_traced_forward_lowers_one_layer_function_and_gives_the_plain_loops_logits(
        monkeypatch):
    # JAXLLM_LAYER_JIT=1 (the default): the layers run through one nested jit, traced and
    # lowered once a program and called from each layer (the cold start's lowering); the
    # logits are the plain loop's. A bad value is refused at trace time.
    config = ModelConfig(architecture="LlamaForCausalLM", head_dim=16,
                         **{**_SMALL, "num_hidden_layers": 3})
    model = LlamaForCausalLM(config, dtype=jnp.float32, rngs=nnx.Rngs(5))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(6)
    tok, pos, md, _ = PagedSequences(2).step([(0, rng.integers(0, 256, 7)),
                                              (1, rng.integers(0, 256, 4))])
    kv = init_kv_cache(config, NUM_PAGES, PAGE_SIZE, jnp.float32)

    def fresh():  # a function of its own: jit's trace cache is keyed on the function
        return jax.jit(lambda *args: _forward.__wrapped__(*args), static_argnums=0)

    def lowered_and_logits(setting):
        monkeypatch.setenv("JAXLLM_LAYER_JIT", setting)
        fwd = fresh()
        lowered = fwd.lower(graphdef, state, tok, pos, kv, md)
        return lowered.as_text(), np.asarray(fwd(graphdef, state, tok, pos, kv, md)[0])

    plain_text, plain = lowered_and_logits("0")
    text, logits = lowered_and_logits("1")
    assert "@run(" not in plain_text
    assert text.count("func.func private @run(") == 1  # one layer lowered ...
    assert text.count("call @run(") == 3  # ... and called from each of the 3 layers
    np.testing.assert_allclose(logits, plain, rtol=1e-6, atol=1e-6)
    monkeypatch.setenv("JAXLLM_LAYER_JIT", "yes")
    with pytest.raises(ValueError, match="JAXLLM_LAYER_JIT"):
        fresh().lower(graphdef, state, tok, pos, kv, md)


@pytest.mark.parametrize("backend", ["reference", "pallas"])
def test_gemma2_in_the_engine_serves_hfs_greedy_tokens(backend, tmp_path_factory):
    """Gemma 2 through the engine (fused projections, soft-capped attention in the Pallas decode
    kernel's rope path, interpreted here; the final soft-cap before sampling) gives HF's greedy
    tokens."""
    from jaxllm import LLM, SamplingParams

    from .helpers import save_default_tokenizer

    folder = tmp_path_factory.mktemp(f"gemma2_{backend}")
    cfg = transformers.Gemma2Config(**{**_SMALL, "vocab_size": 49152}, head_dim=16,
                                    query_pre_attn_scalar=24, sliding_window=6,
                                    attn_logit_softcapping=0.3, final_logit_softcapping=30.0,
                                    architectures=["Gemma2ForCausalLM"])
    torch.manual_seed(0)
    # eager: HF's sdpa attention leaves Gemma 2's score soft-cap out
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    _randomise(hf, seed=3)  # logits of std ~1 over 49k tokens: no near-ties at float32
    hf.save_pretrained(folder, safe_serialization=True)
    save_default_tokenizer(folder)
    prompts = [[11, 12, 13, 14, 15, 16, 17], [7, 8, 9]]
    with torch.no_grad():
        want = [hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                            min_new_tokens=10)[0, len(p):].tolist() for p in prompts]
    llm = LLM(str(folder), dtype="float32", max_model_len=64, page_size=8, num_pages=16,
              max_num_batched_tokens=16, max_num_seqs=2, attention_backend=backend,
              skip_compile_at_start=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want

