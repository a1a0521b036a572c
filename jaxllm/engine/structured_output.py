"""Structured outputs, allowed_token_ids and bad_words: a per-row mask of the tokens a row
may sample.

Dimension keys: S sequences (rows), V vocabulary, W = ceil(V / 32) mask words.

A constrained request's sequences each get a ``TokenMask`` (``StructuredOutputs.token_mask``):
its grammar matcher, its fixed allowed ids (allowed_token_ids less the one-token bad words)
and/or its multi-token bad words (the last token of a bad word is banned when the row's output
ends with the word's other tokens, vLLM's rule). Each step the host writes the row's allowed
tokens as a bitmask (bit t of word t // 32 set: token t may be sampled) into the sampler's
``token_bitmask`` [S, W] int32 (``sampler.build_sampling_tensors``), and the sampler sets every
other logit to -inf before anything else (``sampler.apply_token_bitmask``). After the step the
engine feeds the sampled token to the matcher (``TokenMask.accept``), so a constrained row's
token must be on the host before its next mask: the engine reads such a step back between the
next step's forward and its sampler (late sampling, ``LLMEngine.step``) and never puts the row
in a multi-step launch (engine/llm_engine.py).

Backend: llguidance, vLLM's "guidance" backend. It compiles a JSON schema, regex, choice list,
Lark or GBNF grammar in milliseconds with no per-schema preprocessing of the vocabulary, needs no
torch (xgrammar, vLLM's default, does), and computes a mask in ~0.1-1 ms per row on the CPU
(several rows at once on its own threads, ``LLExecutor``). The constraint is compiled and checked
when the request is added, so a bad schema or regex is a ValueError (a 400 from the server) that
names the problem, never an error in the step loop. When the grammar is complete, its mask allows
only the end-of-sequence tokens, so the row stops there with finish_reason "stop".
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Iterable, Sequence

import numpy as np

from jaxllm.sampling_params import SamplingParams, StructuredOutputsParams

logger = logging.getLogger("jaxllm")


def mask_words(vocab_size: int) -> int:
    """W: int32 words of one row's bitmask."""
    return (vocab_size + 31) // 32


def ids_to_bitmask(ids: Iterable[int], vocab_size: int) -> np.ndarray:
    """[W] int32 with the bits of ``ids`` set."""
    bits = np.zeros(mask_words(vocab_size) * 32, np.uint8)
    bits[np.asarray(list(ids), np.int64)] = 1
    return np.packbits(bits, bitorder="little").view(np.int32)


def clear_bits(words: np.ndarray, ids: Iterable[int]) -> None:
    """Clears the bits of ``ids`` in one row's [W] int32 bitmask, in place."""
    b = words.view(np.uint8)
    for t in ids:
        b[t >> 3] &= ~np.uint8(1 << (t & 7))


def bitmask_to_ids(words: np.ndarray, vocab_size: int) -> np.ndarray:
    """The token ids whose bits are set in one row's [W] int32 bitmask."""
    bits = np.unpackbits(np.ascontiguousarray(words, np.int32).view(np.uint8),
                         bitorder="little")[:vocab_size]
    return np.nonzero(bits)[0]


def _no_extra_properties(schema: Any) -> None:
    """vLLM's disable_additional_properties: every object schema with ``properties`` gets
    ``additionalProperties: false`` unless it says otherwise (in place, through subschemas)."""
    if isinstance(schema, list):
        for item in schema:
            _no_extra_properties(item)
        return
    if not isinstance(schema, dict):
        return
    for key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"):
        if isinstance(schema.get(key), dict):
            for sub in schema[key].values():
                _no_extra_properties(sub)
    for key in ("additionalProperties", "items", "prefixItems", "allOf", "anyOf", "oneOf",
                "not", "if", "then", "else", "contains"):
        if isinstance(schema.get(key), (dict, list)):
            _no_extra_properties(schema[key])
    if "additionalProperties" not in schema and isinstance(schema.get("properties"), dict):
        schema["additionalProperties"] = False


def llguidance_tokenizer_json(tokenizer: Any) -> str:
    """The HF fast tokenizer's tokenizer.json as llguidance reads it (llguidance.hf does the
    same, but for the decoder below).

    llguidance takes each token's bytes from the decoder's type: "ByteLevel" (GPT-2 style
    byte-to-character tokens) or a "Sequence" with "ByteFallback" (sentencepiece style), and it
    does not look for a ByteLevel inside a Sequence. transformers' GGUF conversion gives
    byte-level BPE vocabularies (the default model's) the decoder Sequence[ByteFallback, Fuse,
    Replace, ByteLevel], so llguidance took "Ċ" for the text "Ċ", not a newline, and let JSON
    strings hold raw newlines (tests/test_structured_outputs.py). With a ByteLevel
    pre-tokenizer the tokens are byte-level, so the ByteLevel decoder alone reads them right."""
    backend = copy.copy(tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    spec = json.loads(backend.to_str())
    decoder, pre = spec.get("decoder") or {}, spec.get("pre_tokenizer") or {}

    def byte_level(part: dict) -> dict | None:
        if part.get("type") == "ByteLevel":
            return part
        for sub in part.get("decoders") or part.get("pretokenizers") or ():
            if sub.get("type") == "ByteLevel":
                return sub
        return None

    if decoder.get("type") == "Sequence" and byte_level(pre) and byte_level(decoder):
        spec["decoder"] = byte_level(decoder)
    return json.dumps(spec)


BACKENDS = ("auto", "guidance")
CONFIG_KEYS = {"backend", "disable_any_whitespace", "disable_additional_properties",
               "reasoning_parser", "enable_in_reasoning"}
# The thinking tags of the reasoning parsers (server/reasoning.py): with one set, a grammar
# starts after the model closes its thinking, as vLLM's (unless enable_in_reasoning).
THINK_TAGS = {"deepseek_r1": ("<think>", "</think>"), "qwen3": ("<think>", "</think>")}


def check_config(config: Any) -> None:
    """EngineConfig.structured_outputs_config: ValueError naming what is wrong."""
    if not isinstance(config, dict):
        raise ValueError(f"structured_outputs_config must be a dict, got {config!r}.")
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise ValueError(f"structured_outputs_config: unknown keys {unknown}; known: "
                         f"{sorted(CONFIG_KEYS)}.")
    if config.get("backend", "auto") not in BACKENDS:
        raise ValueError(f"structured_outputs_config backend {config['backend']!r} is not "
                         f"available; jaxllm has {BACKENDS} (llguidance).")
    for key in ("disable_any_whitespace", "disable_additional_properties",
                "enable_in_reasoning"):
        if not isinstance(config.get(key, False), bool):
            raise ValueError(f"structured_outputs_config {key} must be true or false.")
    if config.get("reasoning_parser") not in (None, *THINK_TAGS):
        raise ValueError(f"structured_outputs_config reasoning_parser must be one of "
                         f"{sorted(THINK_TAGS)}, got {config['reasoning_parser']!r}.")


class StructuredOutputs:
    """One engine's structured-output backend: the llguidance view of its tokenizer (built on
    the first constrained request, ~0.3 s for a 49k vocabulary) and the compile / check of each
    request's constraint. ``config``: EngineConfig.structured_outputs_config."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int],
                 config: dict[str, Any] | None = None):
        config = config or {}
        self.disable_any_whitespace = bool(config.get("disable_any_whitespace", False))
        self.disable_additional_properties = bool(
            config.get("disable_additional_properties", False))
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(set(eos_token_ids))
        # (think-open id, think-close id) when a grammar waits for the thinking to end
        self.think_ids: tuple[int, int] | None = None
        parser = config.get("reasoning_parser")
        if parser is not None and not config.get("enable_in_reasoning", False):
            ids = []
            for tag in THINK_TAGS[parser]:
                tid = tokenizer.convert_tokens_to_ids(tag)
                if not isinstance(tid, int) or tid == tokenizer.unk_token_id or \
                        tokenizer.convert_ids_to_tokens(tid) != tag:
                    raise ValueError(f"structured_outputs_config reasoning_parser={parser!r}: "
                                     f"the tokenizer has no {tag!r} token, so the end of the "
                                     "thinking cannot be seen; set enable_in_reasoning=true "
                                     "or leave the parser out.")
                ids.append(tid)
            self.think_ids = (ids[0], ids[1])
        self._ll_tokenizer = None
        self.executor = None  # llguidance's thread pool for the masks of a step's rows

    @property
    def ll_tokenizer(self):
        if self._ll_tokenizer is None:
            try:
                import llguidance
            except ImportError as e:
                raise ValueError("structured outputs need the llguidance package "
                                 "(pip install llguidance)") from e
            n_vocab = max(self.vocab_size, len(self._tokenizer))
            self._ll_tokenizer = llguidance.LLTokenizer(
                llguidance_tokenizer_json(self._tokenizer), n_vocab=n_vocab,
                eos_token=self._eos or None)
            self.executor = llguidance.LLExecutor()
        return self._ll_tokenizer

    def grammar(self, so: StructuredOutputsParams) -> str:
        """The llguidance grammar of ``so``, checked against the tokenizer. ValueError names
        what is wrong with it."""
        import llguidance

        def from_schema(schema: Any) -> str:
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
            if so.disable_additional_properties or self.disable_additional_properties:
                schema = copy.deepcopy(schema)
                _no_extra_properties(schema)
            options: dict[str, Any] = {"whitespace_flexible": not (
                so.disable_any_whitespace or self.disable_any_whitespace)}
            if so.whitespace_pattern is not None:
                options["whitespace_pattern"] = so.whitespace_pattern
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)

        kind = so.kind
        try:
            if kind == "json":
                grammar = from_schema(so.json)
            elif kind == "json_object":
                grammar = from_schema({"type": "object"})
            elif kind == "regex":
                grammar = llguidance.grammar_from("regex", so.regex)
            elif kind == "choice":
                grammar = llguidance.grammar_from("choice", so.choice)
            elif kind == "grammar":
                grammar = llguidance.grammar_from("grammar", so.grammar)
            else:
                grammar = self._structural_tag(so, from_schema)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"Invalid structured outputs {kind}: {e}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        if error:
            raise ValueError(f"Invalid structured outputs {kind}: {error}")
        return grammar

    @staticmethod
    def _structural_tag(so: StructuredOutputsParams, from_schema) -> str:
        import llguidance

        spec = so.structural_tag
        if isinstance(spec, str):
            spec = json.loads(spec)
        triggers = list(spec["triggers"])
        tags = []
        for s in spec["structures"]:
            trigger = next((t for t in triggers if s["begin"].startswith(t)), None)
            if trigger is None:
                raise ValueError(f"the begin {s['begin']!r} starts with none of the triggers "
                                 f"{triggers}")
            tags.append(llguidance.StructTag(trigger=trigger, begin=s["begin"],
                                             grammar=from_schema(s["schema"]), end=s["end"]))
        if not tags:
            raise ValueError("the structural tag has no structures")
        return llguidance.StructTag.to_grammar(tags)

    def bad_words_token_ids(self, words: Sequence[str]) -> list[list[int]]:
        """vLLM's tokenization of bad_words: each word alone and, when that gives the same
        number of tokens with another first token, after a space (a word mid-text)."""
        if self._tokenizer is None:
            raise ValueError("bad_words need a tokenizer, and this engine has none.")
        out: list[list[int]] = []
        for word in words:
            alone = None
            for prefix in ("", " "):
                ids = list(self._tokenizer.encode(prefix + word.lstrip(),
                                                  add_special_tokens=False))
                if not ids:
                    continue
                if alone is None:
                    alone = ids
                    out.append(ids)
                elif ids[0] != alone[0] and len(ids) == len(alone):
                    out.append(ids)
        bad = [t for ids in out for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"bad_words tokenize to ids {bad} outside the model's vocabulary.")
        return out

    def token_mask(self, params: SamplingParams, prompt_token_ids: Sequence[int] = ()
                   ) -> TokenMask | None:
        """The first sequence's TokenMask for ``params`` (None when it has no constraint);
        siblings (n > 1) take ``TokenMask.fork()``. ValueError for a bad constraint. With a
        reasoning parser its grammar waits for the think-close token, unless the prompt's last
        think tag closes the thinking already (Qwen3's template with thinking off)."""
        allowed = None
        if params.allowed_token_ids is not None:
            allowed = ids_to_bitmask(params.allowed_token_ids, self.vocab_size)
        bad_words: tuple[tuple[tuple[int, ...], int], ...] = ()
        if params.bad_words:
            ids = self.bad_words_token_ids(params.bad_words)
            single = [w[0] for w in ids if len(w) == 1]
            if single:  # banned at every step: folded into the fixed mask
                if allowed is None:
                    allowed = np.full(mask_words(self.vocab_size), -1, np.int32)
                clear_bits(allowed, single)
            bad_words = tuple((tuple(w[:-1]), w[-1]) for w in ids if len(w) > 1)
        matcher = None
        if params.structured_outputs is not None:
            import llguidance

            matcher = llguidance.LLMatcher(
                self.ll_tokenizer, self.grammar(params.structured_outputs),
                log_level=int(os.environ.get("LLGUIDANCE_LOG_LEVEL", "0")))
            if matcher.is_error():
                raise ValueError(f"Invalid structured outputs: {matcher.get_error()}")
        if allowed is None and matcher is None and not bad_words:
            return None
        start_after = None
        if matcher is not None and self.think_ids is not None:
            think_open, think_close = self.think_ids
            tags = [t for t in prompt_token_ids if t == think_open or t == think_close]
            if not tags or tags[-1] != think_close:
                start_after = think_close
        return TokenMask(self, matcher, allowed, start_after, bad_words)


class TokenMask:
    """One sequence's constraint: an llguidance matcher (structured outputs), a fixed
    allowed-ids bitmask (allowed_token_ids, less the one-token bad words) and the multi-token
    bad words ((prefix ids, last id) pairs); a token must pass all three."""

    __slots__ = ("backend", "matcher", "allowed", "start_after", "bad_words", "recent")

    def __init__(self, backend: StructuredOutputs, matcher: Any, allowed: np.ndarray | None,
                 start_after: int | None = None,
                 bad_words: tuple[tuple[tuple[int, ...], int], ...] = (),
                 recent: Sequence[int] = ()):
        self.backend, self.matcher, self.allowed = backend, matcher, allowed
        self.start_after = start_after  # the grammar waits for this token (the thinking's end)
        self.bad_words = bad_words
        self.recent = list(recent)  # the output's last tokens, as many as a bad word's prefix

    def fork(self) -> TokenMask:
        """A copy for a sibling sequence (n > 1): the same constraint, its own parse state."""
        matcher = self.matcher.deep_copy() if self.matcher is not None else None
        return TokenMask(self.backend, matcher, self.allowed, self.start_after, self.bad_words,
                         self.recent)

    @property
    def changes_per_token(self) -> bool:
        """Whether the mask depends on the tokens sampled so far (a grammar, or a bad word of
        several tokens)."""
        return self.matcher is not None or bool(self.bad_words)

    def banned_now(self) -> list[int]:
        """The last tokens of the multi-token bad words whose other tokens end the output."""
        r = self.recent
        return [last for prefix, last in self.bad_words
                if len(prefix) <= len(r) and r[len(r) - len(prefix):] == list(prefix)]

    def draft_prefix(self, draft: Sequence[int]) -> int:
        """How many leading tokens of a speculative draft (engine/spec_decode.py) this
        constraint allows in turn, without changing its state. 0 while a reasoning parser's
        thinking runs (its end token starts the grammar) or once the grammar has stopped."""
        if self.start_after is not None:
            return 0
        n = len(draft)
        m = self.matcher
        if m is not None:
            if m.is_stopped() or m.is_error():
                return 0
            n = m.validate_tokens(list(draft))
        if self.allowed is not None:
            for i in range(n):
                t = draft[i]
                if not (int(self.allowed[t >> 5]) >> (t & 31)) & 1:
                    return i
        if self.bad_words:
            probe = TokenMask(self.backend, None, None, bad_words=self.bad_words,
                              recent=self.recent)
            for i in range(n):
                if draft[i] in probe.banned_now():
                    return i
                probe.accept(draft[i])
        return n

    def accept(self, token: int) -> None:
        """Advances the grammar past a sampled token. A token the grammar refuses (one the
        mask could not stop, such as a stop token below min_tokens) leaves the matcher in its
        error state, whose mask allows only EOS: the row ends instead of going on unchecked."""
        if self.bad_words:
            keep = max(len(prefix) for prefix, _ in self.bad_words)
            self.recent.append(token)
            del self.recent[:-keep]
        m = self.matcher
        if self.start_after is not None:  # still thinking: the grammar has not started
            if token == self.start_after:
                self.start_after = None
            return
        if m is None or m.is_stopped():
            return
        if not m.consume_token(token) and m.is_error():
            logger.warning("structured outputs: token %d does not fit the grammar (%s); the "
                           "sequence ends at the next token", token, m.get_error())

    @staticmethod
    def fill_rows(items: Sequence[tuple[int, TokenMask]], out: np.ndarray) -> None:
        """Writes each (row, mask)'s allowed tokens into ``out[row]`` ([S, W] int32, rows not
        listed untouched). Grammar rows are computed together on llguidance's threads."""
        if not items:
            return
        W = out.shape[1]
        grammar_rows = [(i, m) for i, m in items
                        if m.matcher is not None and m.start_after is None]
        if grammar_rows:
            from llguidance.numpy import fill_next_token_bitmask_par

            backend = grammar_rows[0][1].backend
            words = mask_words(backend.ll_tokenizer.vocab_size)
            buf = np.empty((len(grammar_rows), words), np.int32)
            fill_next_token_bitmask_par(
                backend.executor, [(m.matcher, j) for j, (_, m) in enumerate(grammar_rows)], buf)
            for j, (i, _) in enumerate(grammar_rows):
                out[i] = buf[j, :W]
        for i, m in items:
            if m.allowed is not None:
                if m.matcher is None or m.start_after is not None:
                    out[i] = m.allowed
                else:
                    out[i] &= m.allowed
            if m.bad_words:
                clear_bits(out[i], m.banned_now())
