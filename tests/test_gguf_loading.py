"""Our GGUF reading (dequantize, rename, un-permute q/k, config) equals transformers' own.

The reference is ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` in float32: its
state_dict is what transformers makes of the file, so ours must match it tensor by tensor,
exactly (both dequantize with gguf-py's numpy code and permute rows; no arithmetic differs).
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.loading.gguf_loader import (gguf_to_hf_name, iter_hf_tensors, open_gguf,
                                        unpermute_rope_rows)
from jaxllm.loading.hf_config import model_config_from_hf


@pytest.fixture(scope="module")
def ckpt(default_gguf_path):
    return open_gguf(default_gguf_path)


def test_every_dequantized_tensor_equals_transformers_gguf_loading(ckpt, hf_default_model):
    ref = {k: v.numpy() for k, v in hf_default_model.state_dict().items()}
    seen = set()
    for name, get in iter_hf_tensors(ckpt):
        w = get()
        assert name in ref, f"{name} is not a parameter of transformers' model"
        assert w.dtype == np.float32 and w.shape == ref[name].shape, name
        np.testing.assert_array_equal(w, ref[name], err_msg=name)
        seen.add(name)
    # Tied embeddings: transformers lists lm_head.weight (the embedding itself); the file has none.
    assert set(ref) - seen == {"lm_head.weight"}
    np.testing.assert_array_equal(ref["lm_head.weight"], ref["model.embed_tokens.weight"])


def test_hf_config_from_metadata_matches_transformers(ckpt, hf_default_model):
    ours, theirs = ckpt.hf_config.to_dict(), hf_default_model.config.to_dict()
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "attention_bias"):
        assert ours.get(key) == theirs.get(key), key
    assert ckpt.hf_config.architectures == ["LlamaForCausalLM"]


def test_model_config_describes_smollm2_135m(ckpt):
    cfg = model_config_from_hf(ckpt.hf_config)
    assert (cfg.architecture, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (
        "LlamaForCausalLM", 49152, 576, 1536)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        30, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.rope_scaling is None
    assert cfg.max_position_embeddings == 8192 and cfg.eos_token_ids == (2,)
    assert cfg.rms_norm_eps == pytest.approx(1e-5)


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's ``LlamaModel.permute`` (HF rows -> GGUF rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("shape,n_head", [((9 * 64, 576), 9), ((3 * 64, 576), 3), ((4 * 8,), 4)])
def test_unpermute_inverts_llama_cpp_permute(shape, n_head):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rope_rows(_llama_cpp_permute(w, n_head), n_head), w)


@pytest.mark.parametrize("gguf_name,hf_name", [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
    ("blk.12.ffn_norm.weight", "model.layers.12.post_attention_layernorm.weight"),
    ("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
    ("blk.3.attn_k.bias", "model.layers.3.self_attn.k_proj.bias"),
    ("blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"),
    ("blk.3.attn_q_norm.weight", "model.layers.3.self_attn.q_norm.weight"),
    ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"),
    ("rope_freqs.weight", None),
])
def test_gguf_names_map_to_hf_names(gguf_name, hf_name):
    assert gguf_to_hf_name(gguf_name) == hf_name


def test_unknown_gguf_tensor_name_is_an_error():
    with pytest.raises(ValueError, match="blk.0.ffn_gate_exps.weight"):
        gguf_to_hf_name("blk.0.ffn_gate_exps.weight")


@pytest.mark.slow
def test_cached_tokenizer_equals_the_one_converted_from_the_gguf(default_gguf_path, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from jaxllm.loading.gguf_loader import load_gguf_tokenizer

    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(tmp_path))
    real = AutoTokenizer.from_pretrained
    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    # cache=False converts (the same call as a cache miss below) and writes nothing. The
    # conversion itself is stubbed here: it takes ~17 s, and the miss below runs it for real.
    with monkeypatch.context() as m:
        m.setattr(AutoTokenizer, "from_pretrained", lambda *a, **kw: calls.append((a, kw)) or "tok")
        assert load_gguf_tokenizer(default_gguf_path, cache=False) == "tok"
    assert calls == [((str(default_gguf_path.resolve().parent),),
                      {"gguf_file": default_gguf_path.name, "local_files_only": True})]
    assert not any(tmp_path.iterdir())
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    fresh = load_gguf_tokenizer(default_gguf_path)  # a miss: converts, writes the cache, returns it
    assert calls[1] == calls[0]  # the conversion, as cache=False calls it
    assert any(tmp_path.rglob("tokenizer.json"))
    cached = load_gguf_tokenizer(default_gguf_path)  # a hit: reads the cache, no conversion
    assert len(calls) == 3 and "gguf_file" not in calls[2][1]
    for text in ["Hello world", "Ça va? 日本語 😀 émigré", "  spaces\n\nnew lines\t", "Hi , there . isn't it ?",
                 "<|im_start|>user\nhi<|im_end|>"]:
        ids = fresh.encode(text)
        assert cached.encode(text) == ids, text
        assert cached.decode(ids) == fresh.decode(ids), text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    for messages in (chat, chat[1:2]):
        assert (cached.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                == fresh.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "all_special_ids"):
        assert getattr(cached, attr) == getattr(fresh, attr), attr
