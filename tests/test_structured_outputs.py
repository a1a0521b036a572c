"""Structured outputs, allowed_token_ids and bad_words (engine/structured_output.py): the token
bitmask on the device against a numpy reference, the params' validation, and a random Llama's
sampled text fitting each kind of constraint (a random model would almost never write valid
JSON by itself, so a constraint that did not hold would show)."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.engine import sampler as S
from jaxllm.engine import structured_output as so_lib
from jaxllm.sampling_params import StructuredOutputsParams as SO

from .helpers import cli_engine_kwargs, small_llama_folder  # noqa: F401

jsonschema = pytest.importorskip("jsonschema")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
# A random model puts whitespace tokens wherever JSON allows them (between any two tokens) and
# runs out of max_tokens; a real model does not. Its JSON tests allow none.
COMPACT = dict(disable_any_whitespace=True)


@pytest.fixture(scope="module")
def llm(small_llama_folder):
    # A pool of 40 pages of 8 tokens: the n=6 batch below preempts.
    return LLM(str(small_llama_folder), dtype="float32", max_model_len=160, page_size=8,
               num_pages=40, max_num_batched_tokens=32, max_num_seqs=8, seed=0,
               skip_compile_at_start=True)


def _pool_is_full(llm) -> bool:
    pool = llm.llm_engine.page_pool
    return pool.num_free_pages == pool.num_usable_pages


def _texts(llm, so, n=4, max_tokens=96, **kw):
    params = SamplingParams(n=n, temperature=1.0, seed=7, max_tokens=max_tokens,
                            structured_outputs=so, **kw)
    [out] = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], params, use_tqdm=False)
    return out.outputs


# -- the mask ------------------------------------------------------------------------------------
def test_bitmask_round_trips_ids_and_the_sampler_masks_exactly_the_clear_bits():
    V = 77  # not a multiple of 32: the last word's spare bits are ignored
    rng = np.random.default_rng(0)
    allowed = [sorted(rng.choice(V, size=k, replace=False).tolist()) for k in (1, 5, 40)]
    words = np.stack([so_lib.ids_to_bitmask(a, V) for a in allowed]
                     + [np.full(so_lib.mask_words(V), -1, np.int32)])  # an unconstrained row
    for a, w in zip(allowed, words):
        assert so_lib.bitmask_to_ids(w, V).tolist() == a
    logits = rng.normal(size=(4, V)).astype(np.float32)
    got = np.asarray(jax.jit(S.apply_token_bitmask)(jnp.asarray(logits), jnp.asarray(words)))
    want = np.full_like(logits, -np.inf)
    for i, a in enumerate(allowed):
        want[i, a] = logits[i, a]
    want[3] = logits[3]
    np.testing.assert_array_equal(got, want)
    # W = 0: no row constrained, the logits pass unchanged
    empty = jnp.zeros((4, 0), jnp.int32)
    np.testing.assert_array_equal(np.asarray(S.apply_token_bitmask(jnp.asarray(logits), empty)),
                                  logits)


def test_sampled_tokens_stay_in_the_allowed_bits_greedy_and_random():
    V = 300
    rng = np.random.default_rng(1)
    allowed = sorted(rng.choice(V, size=6, replace=False).tolist())
    logits = rng.normal(size=(4, V)).astype(np.float32) * 3
    rows = [S.SamplingRow(SamplingParams(temperature=t), 3 + i, 0, [1], [],
                          token_mask=so_lib.TokenMask(None, None,
                                                      so_lib.ids_to_bitmask(allowed, V)))
            for i, t in enumerate((0.0, 1.0, 1.0))]
    t = S.build_sampling_tensors(rows, pad_to=4, vocab_size=V)
    out = jax.jit(S.sample, static_argnums=(2, 3))(jnp.asarray(logits), t, 2, True)
    ids = np.asarray(out.token_ids)[:3].tolist()
    assert all(i in allowed for i in ids), ids
    assert ids[0] == allowed[int(np.argmax(logits[0, allowed]))]  # greedy: best allowed
    # the log-probs stay those of the raw model (vLLM's raw_logprobs)
    raw = jax.nn.log_softmax(logits[0])
    np.testing.assert_allclose(float(out.logprobs[0]), float(raw[ids[0]]), rtol=1e-5)


def test_the_grammar_reads_each_token_as_the_text_it_decodes_to(llm):
    """llguidance's view of the vocabulary (llguidance_tokenizer_json): decoding through it
    gives the tokenizer's own text, newlines and multi-byte characters included."""
    tok = llm.get_tokenizer()
    ll = llm.llm_engine.structured_outputs.ll_tokenizer
    for text in ("a\n\nb\tc", '{"k": "v"}\r\n', " leading space", "naïve 東京 🙂", "x" * 40):
        ids = tok(text, add_special_tokens=False).input_ids
        assert ll.decode_str(ids) == tok.decode(ids) == text


# -- params --------------------------------------------------------------------------------------
def test_structured_outputs_params_need_exactly_one_constraint():
    with pytest.raises(ValueError, match="none are specified"):
        SO()
    with pytest.raises(ValueError, match="multiple are specified"):
        SO(json={"type": "object"}, regex="a+")
    with pytest.raises(ValueError, match="list of strings"):
        SO(choice="yes")
    with pytest.raises(ValueError, match="cannot be empty"):
        SO(choice=[])
    assert SO(json_object=True).kind == "json_object"
    # a dict is read as the params' fields; a pydantic model class as its schema
    p = SamplingParams(structured_outputs={"regex": "[ab]+"})
    assert isinstance(p.structured_outputs, SO) and p.structured_outputs.kind == "regex"
    import pydantic

    class Item(pydantic.BaseModel):
        sku: str
        qty: int

    assert SO(json=Item).json["required"] == ["sku", "qty"]
    with pytest.raises(ValueError, match="allowed_token_ids is not None and empty"):
        SamplingParams(allowed_token_ids=[])
    for bad, match in (([""], "empty"), (["ok", 3], "list of strings")):
        with pytest.raises(ValueError, match=match):
            SamplingParams(bad_words=bad)
    with pytest.raises(ValueError, match="out-of-vocab"):
        SamplingParams(allowed_token_ids=[3, 10**6]).verify_for_model(1000)


# -- the engine ----------------------------------------------------------------------------------
def test_json_schema_outputs_validate_and_unconstrained_ones_do_not(llm):
    outs = _texts(llm, SO(json=PERSON, **COMPACT), n=6)
    for c in outs:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), PERSON)
    # The same seeds without the constraint: a random model writes no such JSON.
    free = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}],
                        SamplingParams(n=6, temperature=1.0, seed=7, max_tokens=96),
                        use_tqdm=False)[0].outputs
    for c in free:
        with pytest.raises(ValueError):
            jsonschema.validate(json.loads(c.text), PERSON)
    assert _pool_is_full(llm)


def test_json_object_regex_choice_and_grammars_hold(llm):
    for c in _texts(llm, SO(json_object=True, disable_any_whitespace=True), max_tokens=120):
        if c.finish_reason == "stop":  # an object can nest past max_tokens
            assert isinstance(json.loads(c.text), dict)
            assert not re.search(r"\s", c.text.replace(" ", "")), c.text  # no \n \t between
        assert c.text.startswith("{")
    for c in _texts(llm, SO(regex=r"[0-9]{3}-[a-c]{2,4}")):
        assert re.fullmatch(r"[0-9]{3}-[a-c]{2,4}", c.text) and c.finish_reason == "stop", c
    texts = {c.text for c in _texts(llm, SO(choice=["alpha", "beta", "gamma delta"]), n=8)}
    assert texts <= {"alpha", "beta", "gamma delta"} and len(texts) > 1
    lark = 'start: "(" item ("," item)* ")"\nitem: /[xyz]/ | "n" /[0-9]/'
    for c in _texts(llm, SO(grammar=lark)):
        assert re.fullmatch(r"\((?:[xyz]|n[0-9])(?:,(?:[xyz]|n[0-9]))*\)", c.text), c.text
    gbnf = 'root ::= "say " ("yes" | "no") "!"'
    for c in _texts(llm, SO(grammar=gbnf)):
        assert c.text in ("say yes!", "say no!"), c.text
    assert _pool_is_full(llm)


def test_constrained_and_free_rows_share_a_batch_without_changing_the_free_ones(llm):
    """The mask is per row: a seeded free request gives the same tokens beside constrained
    ones (which also force the engine to read each step back before the next) as alone."""
    free = {"prompt_token_ids": [9, 10, 11]}
    fp = SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True)
    alone = llm.generate([free], fp, use_tqdm=False)[0].outputs[0].token_ids
    cp = SamplingParams(temperature=1.0, seed=4, max_tokens=40,
                        structured_outputs=SO(json=PERSON, **COMPACT))
    mixed = llm.generate([free, {"prompt_token_ids": [1, 2]}, free], [fp, cp, fp],
                         use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone == mixed[2].outputs[0].token_ids
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), PERSON)


def test_allowed_token_ids_limit_every_sampled_token(llm):
    allowed = [17, 230, 4001, 12345]
    params = SamplingParams(n=3, temperature=1.5, seed=2, max_tokens=20, ignore_eos=True,
                            allowed_token_ids=allowed)
    [out] = llm.generate([{"prompt_token_ids": [3, 4, 5]}], params, use_tqdm=False)
    seen = set()
    for c in out.outputs:
        assert len(c.token_ids) == 20 and set(c.token_ids) <= set(allowed)
        seen |= set(c.token_ids)
    assert len(seen) > 1
    # with a grammar, a token must pass both
    params = SamplingParams(temperature=1.0, seed=2, max_tokens=20,
                            allowed_token_ids=llm.get_tokenizer()("1").input_ids
                            + llm.get_tokenizer()("2").input_ids + [2],
                            structured_outputs=SO(regex="[0-9]{4}"))
    [out] = llm.generate([{"prompt_token_ids": [3, 4, 5]}], params, use_tqdm=False)
    assert re.fullmatch("[12]{4}", out.outputs[0].text), out.outputs[0].text


def _has_run(ids, run) -> bool:
    return any(ids[i:i + len(run)] == run for i in range(len(ids) - len(run) + 1))


def test_bad_words_never_appear_in_the_output(llm):
    """vLLM's bad_words: a one-token word (alone or after a space) is never sampled; a word of
    several tokens never has its last token right after the others. Sampling is kept to a few
    ids, so without bad_words the banned runs come up often (the control)."""
    tok = llm.get_tokenizer()
    alone, spaced = tok.encode("blueberry", add_special_tokens=False), \
        tok.encode(" blueberry", add_special_tokens=False)
    assert len(alone) == len(spaced) == 2 and alone[1] == spaced[1] != alone[0]  # tokenizer
    ids = sorted({*alone, *spaced})

    def run(**kw):
        # a high temperature: near-uniform over the ids, whatever the random model prefers
        params = SamplingParams(n=4, temperature=50.0, seed=5, max_tokens=40, ignore_eos=True,
                                allowed_token_ids=ids, **kw)
        [out] = llm.generate([{"prompt_token_ids": [3, 4, 5]}], params, use_tqdm=False)
        return [c.token_ids for c in out.outputs]

    free = run()
    assert any(_has_run(t, alone) or _has_run(t, spaced) for t in free), free
    banned = run(bad_words=["blueberry"])
    for t in banned:
        assert len(t) == 40 and not _has_run(t, alone) and not _has_run(t, spaced), t
    assert {t for row in banned for t in row} == set(ids)  # each token alone is still allowed
    # one-token words: "hello" and " hello" are single tokens, so only "Paris" is left
    one = [tok.encode(w, add_special_tokens=False)[0] for w in ("hello", " hello", " Paris")]
    params = SamplingParams(n=2, temperature=50.0, seed=1, max_tokens=12, ignore_eos=True,
                            allowed_token_ids=one, bad_words=[" hello"])
    [out] = llm.generate([{"prompt_token_ids": [3, 4, 5]}], params, use_tqdm=False)
    assert [c.token_ids for c in out.outputs] == [[one[2]] * 12] * 2
    assert _pool_is_full(llm)


def test_bad_constraints_fail_the_request_and_leave_nothing_behind(llm):
    engine = llm.llm_engine
    for so, match in ((SO(regex="[a-"), "regex"), (SO(json={"type": "nonsense"}), "json"),
                      (SO(json="{not json"), "not valid JSON"),
                      (SO(grammar="start: undefined_rule"), "grammar")):
        with pytest.raises(ValueError, match=f"Invalid structured outputs.*{match}|{match}"):
            llm.generate([{"prompt_token_ids": [1, 2]}],
                         SamplingParams(structured_outputs=so), use_tqdm=False)
        assert not engine.has_unfinished_requests() and _pool_is_full(llm)
    for bad, match in (([""], "empty"), (["ok", 3], "list of strings")):
        with pytest.raises(ValueError, match=match):
            SamplingParams(bad_words=bad)
    with pytest.raises(ValueError, match="out-of-vocab"):
        llm.generate([{"prompt_token_ids": [1, 2]}],
                     SamplingParams(allowed_token_ids=[10**7]), use_tqdm=False)
    assert not engine.has_unfinished_requests()


def test_constrained_rows_survive_preemption_and_multi_step_batches(small_llama_folder):
    """Preempted (recomputed) sequences keep their parse state; an engine with multi-step
    decode keeps constrained rows out of its multi-step launches, and the free rows in them
    still run."""
    eng = LLM(str(small_llama_folder), dtype="float32", max_model_len=160, page_size=8,
              num_pages=14, max_num_batched_tokens=32, max_num_seqs=8, seed=0,
              num_scheduler_steps=4, skip_compile_at_start=True)
    before = eng.llm_engine.stats["num_preemptions"]
    prompts = [{"prompt_token_ids": list(range(10 + i, 30 + i))} for i in range(6)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=60,
                             structured_outputs=SO(json=PERSON, **COMPACT) if i % 2 else None,
                             ignore_eos=not i % 2) for i in range(6)]
    outs = eng.generate(prompts, params, use_tqdm=False)
    assert eng.llm_engine.stats["num_preemptions"] > before
    for i, o in enumerate(outs):
        c = o.outputs[0]
        if i % 2:
            jsonschema.validate(json.loads(c.text), PERSON)
        else:
            assert len(c.token_ids) == 60
    assert _pool_is_full(eng)


def test_the_engine_config_turns_json_whitespace_off_for_every_request(small_llama_folder):
    from jaxllm import EngineConfig

    for bad, match in (({"backend": "xgrammar"}, "not available"), ({"colour": 1}, "unknown"),
                       ({"disable_any_whitespace": "yes"}, "true or false")):
        with pytest.raises(ValueError, match=match):
            EngineConfig(structured_outputs_config=bad)
    kw = cli_engine_kwargs("--structured-outputs-config",
                           '{"backend": "guidance", "disable_any_whitespace": true}')
    assert kw["structured_outputs_config"] == {"backend": "guidance",
                                               "disable_any_whitespace": True}
    eng = LLM(str(small_llama_folder), dtype="float32", max_model_len=160, page_size=8,
              num_pages=40, max_num_batched_tokens=32, max_num_seqs=8, seed=0,
              skip_compile_at_start=True, structured_outputs_config=kw["structured_outputs_config"])
    # The request leaves whitespace on; the engine's setting turns it off (the random model
    # would otherwise fill max_tokens with it, see COMPACT).
    for c in _texts(eng, SO(json=PERSON), n=3):
        assert c.finish_reason == "stop" and not re.search(r"\s", c.text.replace(" ", "")), c
        jsonschema.validate(json.loads(c.text), PERSON)


def test_with_a_reasoning_parser_the_grammar_starts_after_the_thinking(llm, monkeypatch):
    """vLLM's default (enable_in_reasoning off): a constrained row samples freely until the
    think-close token, then the grammar holds; a prompt whose last think tag closes the thinking
    starts the grammar at once. SmolLM2's tokenizer has no <think>: two of its single-token
    specials stand in for the tags."""
    tok = llm.get_tokenizer()
    monkeypatch.setitem(so_lib.THINK_TAGS, "deepseek_r1", ("<repo_name>", "<file_sep>"))
    think_open, think_close = tok.convert_tokens_to_ids(["<repo_name>", "<file_sep>"])
    V = llm.llm_engine.model_config.vocab_size
    backend = so_lib.StructuredOutputs(tok, V, [2], {"reasoning_parser": "deepseek_r1"})
    params = SamplingParams(structured_outputs=SO(regex="[0-9]+"))
    digits = {i for i in range(V) if re.fullmatch("[0-9]+", tok.decode([i]))}

    def allowed(mask):
        out = np.full((1, so_lib.mask_words(V)), -1, np.int32)  # as the sampler inits it
        so_lib.TokenMask.fill_rows([(0, mask)], out)
        return set(so_lib.bitmask_to_ids(out[0], V).tolist())

    thinking = backend.token_mask(params, [5, 6, think_open])
    assert len(allowed(thinking)) == V  # free while thinking
    for t in tok("Let me think.", add_special_tokens=False).input_ids:
        thinking.accept(t)
    assert len(allowed(thinking)) == V
    thinking.accept(think_close)
    assert allowed(thinking) <= digits and allowed(thinking)  # the grammar from here
    closed = backend.token_mask(params, [think_open, 7, think_close, 8])
    assert allowed(closed) <= digits  # the prompt closed the thinking: at once
    off = so_lib.StructuredOutputs(tok, V, [2], {"reasoning_parser": "deepseek_r1",
                                                 "enable_in_reasoning": True})
    assert allowed(off.token_mask(params, [think_open])) <= digits
    monkeypatch.setitem(so_lib.THINK_TAGS, "deepseek_r1", ("<think>", "</think>"))
    with pytest.raises(ValueError, match="no '<think>' token"):
        so_lib.StructuredOutputs(tok, V, [2], {"reasoning_parser": "deepseek_r1"})
