"""SamplingParams: how one request is sampled and when it stops (vLLM's names, defaults, errors).

Validated once, on construction (``__post_init__``, so ``dataclasses.replace`` re-validates);
every error names the field and the allowed range. Checks that need the model (vocab size for
``logit_bias`` ids, the engine's ``max_logprobs``, ``max_model_len``) live in
``SamplingParams.verify_for_model`` / the engine's request validation.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("jaxllm")

# Below this temperature a row is greedy (argmax), as vLLM's _SAMPLING_EPS.
SAMPLING_EPS = 1e-5
# vLLM raises tiny non-zero temperatures to this (dividing logits by ~1e-5 overflows float32).
MIN_NONZERO_TEMPERATURE = 1e-2


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """A constraint on the generated text (vLLM's StructuredOutputsParams): exactly one of

    json            a JSON schema (dict, its JSON text, or a pydantic model class)
    regex           a regular expression the whole output matches
    choice          a list of strings; the output is one of them
    grammar         a context-free grammar (Lark, or llama.cpp's GBNF)
    json_object     True: any JSON object
    structural_tag  vLLM's structural tag (JSON text or dict): {"structures": [{"begin",
                    "schema", "end"}], "triggers": [...]}; free text in which each trigger
                    starts a tagged JSON value

    The JSON options: ``disable_any_whitespace`` (no whitespace between JSON tokens),
    ``disable_additional_properties`` (objects with ``properties`` get
    ``additionalProperties: false`` unless the schema says otherwise) and
    ``whitespace_pattern`` (a regex for the whitespace allowed between JSON tokens). The
    engine compiles the constraint when the request is added (engine/structured_output.py).
    """

    json: str | dict | type | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json, type) and hasattr(self.json, "model_json_schema"):
            self.json = self.json.model_json_schema()  # a pydantic model class
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice):
                raise ValueError(f"structured outputs choice must be a list of strings, got "
                                 f"{self.choice!r}.")
            self.choice = list(self.choice)
            if not self.choice:
                raise ValueError("structured outputs choice cannot be empty.")
        if self.json_object is False:
            self.json_object = None  # False asks for nothing, as an absent field
        kinds = [k for k in _CONSTRAINTS if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise ValueError("You can only use one kind of structured outputs constraint but "
                             f"multiple are specified: {kinds}.")
        if not kinds:
            raise ValueError("You must use one kind of structured outputs constraint but none "
                             f"are specified (one of {', '.join(_CONSTRAINTS)}).")

    @property
    def kind(self) -> str:
        """Which constraint this is: one of json, regex, choice, grammar, json_object,
        structural_tag."""
        return next(k for k in _CONSTRAINTS if getattr(self, k) is not None)


class RequestOutputKind(enum.IntEnum):
    CUMULATIVE = 0  # every output carries everything generated so far
    DELTA = 1  # every output carries only what is new since the previous one
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass
class SamplingParams:
    """Sampling and stopping parameters of one request (vLLM-compatible).

    temperature 0 (below 1e-5) means greedy; top_k 0 or -1 means off; seed None means the engine
    picks one (reproducible given the engine's seed). max_tokens None means "up to the model's
    context length" (the engine fills it in). logprobs=k returns the sampled token's log-prob and
    the k most likely tokens' (raw model distribution, before temperature/penalties).
    allowed_token_ids keeps sampling to those ids; bad_words are words the output never
    contains (each banned as its tokens, at the start of the text and after a space, as vLLM
    does); structured_outputs constrains the text to a JSON schema, regex, choice or grammar (a
    StructuredOutputsParams, or a dict of its fields).
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    extra_args: dict[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Normalize first (as vLLM does), then validate.
        if self.seed == -1:
            self.seed = None
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        if self.logprobs is True:
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        if self.logit_bias is not None:
            try:  # JSON object keys arrive as strings
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"logit_bias must map token ids (int) to biases (float), got {self.logit_bias!r}"
                ) from e
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        elif not isinstance(self.structured_outputs, (StructuredOutputsParams, type(None))):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams (or a dict "
                             f"of its fields), got {type(self.structured_outputs).__name__}.")
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        elif self.bad_words is not None:
            self.bad_words = list(self.bad_words)
        if not isinstance(self.output_kind, RequestOutputKind):
            self.output_kind = RequestOutputKind(self.output_kind)
        self._verify_args()
        if 0.0 < self.temperature < MIN_NONZERO_TEMPERATURE:
            logger.warning("temperature %s is less than %s, which may cause numerical errors; "
                           "setting it to %s", self.temperature, MIN_NONZERO_TEMPERATURE,
                           MIN_NONZERO_TEMPERATURE)
            self.temperature = max(self.temperature, MIN_NONZERO_TEMPERATURE)
        if self.temperature < SAMPLING_EPS:
            # Greedy: the truncation knobs cannot change an argmax; neutralize them as vLLM does.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _verify_args(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool):
            raise ValueError(f"n must be an int, but is of type {type(self.n).__name__}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not self.repetition_penalty > 0.0:
            raise ValueError(
                f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
            raise ValueError(f"top_k must be an integer, got {type(self.top_k).__name__}")
        if self.top_k < -1:  # -1 is accepted as "off", like 0
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(
                f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be less than or equal to "
                             f"max_tokens={self.max_tokens}, got {self.min_tokens}.")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and v != -1 and v < 0:  # -1: the whole vocabulary, as vLLM
                raise ValueError(f"{name} must be non-negative (or -1 for all), got {v}.")
        k = self.truncate_prompt_tokens
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k == 0 or k < -1):
            raise ValueError(f"truncate_prompt_tokens must be an integer >= 1, or -1 (the "
                             f"model's max_model_len), got {k!r}.")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must contain only integers, got {self.stop_token_ids}.")
        if not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}.")
        if any(not s for s in self.stop):
            raise ValueError("stop cannot contain an empty string.")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are only supported when detokenize is True. "
                             "Set detokenize=True to use stop.")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids is not None and empty!")
            if not all(isinstance(t, int) and not isinstance(t, bool)
                       for t in self.allowed_token_ids):
                raise ValueError(f"allowed_token_ids must contain only integers, got "
                                 f"{self.allowed_token_ids}.")
        if self.bad_words is not None:
            if not all(isinstance(w, str) for w in self.bad_words):
                raise ValueError(f"bad_words must be a list of strings, got {self.bad_words!r}.")
            if any(not w.strip() for w in self.bad_words):
                raise ValueError("bad_words cannot contain an empty (or all-space) string.")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}.")

    def verify_for_model(self, vocab_size: int, max_logprobs: int | None = None) -> None:
        """Checks that need the model: logit_bias / stop_token_ids / allowed_token_ids ids in
        [0, vocab_size), logprobs and prompt_logprobs <= the engine's max_logprobs."""
        for name, ids in (("logit_bias", self.logit_bias or {}),
                          ("stop_token_ids", self.stop_token_ids),
                          ("allowed_token_ids", self.allowed_token_ids or ())):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"token_id(s) {bad} in {name} contain out-of-vocab token ids; "
                                 f"ids must be in [0, {vocab_size}).")
        if max_logprobs is not None:
            for name in ("logprobs", "prompt_logprobs"):
                v = getattr(self, name)
                if v is not None and (v == -1 and max_logprobs != -1 or v > max_logprobs):
                    raise ValueError(f"Requested {name} of {v}, which is greater than max allowed: "
                                     f"{max_logprobs}. Ask for fewer, or start the engine with a "
                                     "larger max_logprobs.")

    # -- derived --------------------------------------------------------------------------------
    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def output_text_buffer_length(self) -> int:
        """Characters vLLM holds back while streaming so a stop string can still be cut off.
        (jaxllm holds back less: only a suffix that can start a stop string; see detokenizer.)"""
        if self.stop and not self.include_stop_str_in_output:
            return max(len(s) for s in self.stop) - 1
        return 0

    def clone(self) -> SamplingParams:
        import copy

        return copy.deepcopy(self)


@dataclass
class BeamSearchParams:
    """Beam search parameters (vLLM's ``BeamSearchParams``), for ``LLM.beam_search`` and the
    server's ``use_beam_search``. Each step every beam is extended by its 2 * beam_width most
    likely next tokens and the best beam_width of those are kept, ranked by cumulative log-prob
    over length ** length_penalty (the length counts the prompt, as in vLLM). A beam ends at an
    end-of-sequence token (unless ignore_eos) or after max_tokens. temperature only changes the
    one sampled token each step's request also returns, which joins the candidates (vLLM's
    behaviour); the ranking uses the model's log-probs. include_stop_str_in_output keeps the
    end-of-sequence token in the server's reply; skip_special_tokens applies to the text."""

    beam_width: int
    max_tokens: int | None
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        w = self.beam_width
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            raise ValueError(f"beam_width must be an integer >= 1, got {w!r}.")
        m = self.max_tokens
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
            raise ValueError(f"max_tokens must be at least 1, got {m!r}.")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature!r}.")
        if not isinstance(self.length_penalty, (int, float)) or isinstance(
                self.length_penalty, bool):
            raise ValueError(f"length_penalty must be a number, got {self.length_penalty!r}.")
