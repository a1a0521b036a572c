"""Speculative decoding with n-gram prompt lookup (vLLM's ``speculative_config={"method":
"ngram", ...}``): drafts from the sequence's own tokens, verified by the model in one step.

Proposing (host, before each schedule): for a decode whose last ``n`` tokens (n from
``prompt_lookup_max`` down to ``prompt_lookup_min``) occurred earlier in its prompt + output,
the ``num_speculative_tokens`` tokens that followed their latest earlier occurrence are its
draft (``propose_ngram``). No match: no draft, the row is an ordinary decode.

Verifying (one step): the row computes its last token and its k drafts as one ragged chunk of
k + 1 query tokens (causal, like a prefill chunk), and the sampler samples each of the k + 1
positions as a row of its own, position i with the sampling step of the token it would be
(``fold_in(seed, step + i)``). Draft i is accepted when the token sampled at position i equals
it; the emitted tokens are the accepted drafts and the sample at the first mismatch (or after the
last draft). This is the rejection sampler of speculative decoding for a one-hot draft
distribution (accept d with probability p(d), else sample from p without d): sampling y ~ p and
accepting when y == d accepts with probability p(d), and a rejected y is distributed as p
restricted to tokens != d. More: the emitted tokens are the very tokens the same seeds give
without speculation (each is sampled with its own step's key from logits over the same prefix),
so greedy and seeded outputs do not change with speculation, up to the float rounding of a
k + 1 token chunk against one token at a time.

K/V of rejected drafts stays in its slots beyond the sequence's computed tokens, where the next
steps overwrite it; the prefix cache registers only pages of computed, known tokens, so never
one holding a rejected draft's K/V (``LLMEngine._read_inflight`` rolls the computed count back
before the accepted tokens are resolved).

Each position's sampler row is the one that token would get: min_tokens' bans while step + i
is below it, and penalty lists over the output and the draft before it (a penalty row's draft
is cut so the step's list stays within the width compiled at start-up), and a constrained
row's mask after the draft before it (a copy of its grammar advanced over it; the draft is cut
where the constraint stops allowing it, ``TokenMask.draft_prefix``).

Async scheduling: a draft needs the previous step's tokens on the host. A step with drafts is
read back before the next schedule; a step without is left in flight as usual, unless some
running sequence's known tokens already have a match (``LLMEngine._propose_drafts(dry=True)``),
in which case it too is read first so the next step can carry the draft. Text that does not
repeat keeps the overlap; text that does trades it for drafts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

SPECULATIVE_METHODS = ("ngram",)
# vLLM's default window when neither bound is given ("arbitrarily chosen" there; kept so a
# config behaves as it does under vLLM).
DEFAULT_PROMPT_LOOKUP = 5


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's SpeculativeConfig fields for the n-gram method."""

    num_speculative_tokens: int
    prompt_lookup_max: int
    prompt_lookup_min: int
    method: str = "ngram"
    # vLLM's: no drafts while this many sequences or more are running or waiting (large
    # batches keep the GPU busy; a draft's extra positions then cost more than they save).
    disable_by_batch_size: int | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any] | None) -> SpeculativeConfig | None:
        """Validates vLLM's ``speculative_config`` dict (None: no speculation). vLLM's rules: a
        missing bound mirrors the other, both missing are 5, min <= max, all >= 1."""
        if config is None:
            return None
        if not isinstance(config, dict):
            raise ValueError(f"speculative_config must be a dict, got {config!r}.")
        known = {"method", "model", "num_speculative_tokens", "prompt_lookup_max",
                 "prompt_lookup_min", "disable_by_batch_size"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"speculative_config: unsupported keys {unknown}; this engine takes "
                             f"{sorted(known)} (the n-gram method).")
        method = config.get("method")
        model = config.get("model")
        if method is None and model in ("ngram", "[ngram]"):
            method = "ngram"
        if method == "[ngram]":
            method = "ngram"
        if method not in SPECULATIVE_METHODS:
            raise ValueError(
                f"speculative_config: method {method!r} is not supported; choose 'ngram' "
                "(prompt lookup). Draft models, EAGLE and MTP heads are not built here.")
        if model not in (None, "ngram", "[ngram]"):
            raise ValueError(f"speculative_config: the n-gram method takes no model, got "
                             f"{model!r}.")
        k = config.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError("speculative_config: num_speculative_tokens must be a positive "
                             f"integer, got {k!r}.")
        lo, hi = config.get("prompt_lookup_min"), config.get("prompt_lookup_max")
        if lo is None and hi is None:
            lo = hi = DEFAULT_PROMPT_LOOKUP
        elif lo is None:
            lo = hi
        elif hi is None:
            hi = lo
        for name, v in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"speculative_config: {name}={v!r} must be an integer > 0.")
        if lo > hi:
            raise ValueError(f"speculative_config: prompt_lookup_min={lo} must be <= "
                             f"prompt_lookup_max={hi}.")
        off = config.get("disable_by_batch_size")
        if off is not None and (not isinstance(off, int) or isinstance(off, bool) or off < 2):
            raise ValueError("speculative_config: disable_by_batch_size must be an integer > 1 "
                             f"(vLLM's rule), got {off!r}.")
        return cls(num_speculative_tokens=k, prompt_lookup_max=hi, prompt_lookup_min=lo,
                   disable_by_batch_size=off)


def propose_ngram(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """The draft for a sequence whose known tokens are ``tokens`` (1-D int array): for the
    longest n in [min_n, max_n] whose last-n suffix occurs earlier, the ``k`` tokens after its
    latest earlier occurrence. A continuation that runs into the end of the sequence goes on
    with its own draft (the text after the match is assumed to repeat), so a repeating pattern
    of period p drafts k tokens, not p. [] when there is no match or k <= 0.

    One pass over the sequence finds the earlier positions of its last token; the match length
    of each is then extended backwards over those positions only (at 2,048 tokens without a
    match ~10x faster than comparing every window for every n; tests/test_spec_decode.py
    checks it against that plain version)."""
    L = len(tokens)
    if k <= 0 or L < min_n + 1:
        return []
    ends = np.flatnonzero(tokens[:L - 1] == tokens[L - 1])  # where an earlier match would end
    if not ends.size:
        return []
    length = np.ones(ends.size, np.int64)
    alive = np.ones(ends.size, bool)
    for j in range(1, max_n):
        at = ends - j
        alive &= (at >= 0) & (tokens[np.maximum(at, 0)] == tokens[L - 1 - j])
        if not alive.any():
            break
        length += alive
    n = int(length.max())
    if n < min_n:
        return []
    start = int(ends[np.flatnonzero(length == n)[-1]]) + 1  # after the latest longest match
    draft = tokens[start:start + k].tolist()
    for j in range(len(draft), k):  # past the end: the draft's own tokens
        draft.append(draft[start + j - L])
    return draft
