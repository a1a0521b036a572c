"""Incremental detokenization and stop handling, per generated sequence (host side).

IncrementalDetokenizer: token ids in, text deltas out. vLLM's prefix_offset/read_offset scheme,
on token ids with ``tokenizer.decode`` (not convert_ids_to_tokens/convert_tokens_to_string:
with transformers 5 fast tokenizers those disagree with ``decode`` on which added tokens are
"special", and ``decode`` is what users compare against):

    prefix_text = decode(ids[prefix_offset:read_offset])   # already emitted, as context
    new_text    = decode(ids[prefix_offset:])
    emit new_text[len(prefix_text):] unless it is empty or ends with U+FFFD (an unfinished
    multi-byte character: wait for the next token), then move both offsets forward.

The window starts with the last few prompt tokens so the first generated token decodes with its
left context (leading-space rules of SentencePiece tokenizers). At the end of a sequence,
``flush()`` emits whatever is still pending (an incomplete character becomes U+FFFD, exactly as
``tokenizer.decode`` of all the ids would show it).

OutputProcessor: one per sequence; ``process(token_id, logprobs)`` appends the token,
detokenizes, checks stops (vLLM V1 semantics) and returns (finished, status):
  - EOS (unless ignore_eos) -> "stop", stop_reason None; a stop_token_id -> "stop", stop_reason =
    the id; neither is checked before min_tokens tokens exist (the engine also bans them then,
    see ``banned_token_ids``). The stop token's text is not added to the output unless
    include_stop_str_in_output; its id is in token_ids (as vLLM).
  - a stop string in the text -> "stop", stop_reason = the string, text cut before it (or after
    it with include_stop_str_in_output); text produced by the first min_tokens tokens is not
    searched. When several stop strings complete in one step the earliest in the text wins.
  - max_tokens reached -> "length" (a stop on that same token wins: "stop").
Streaming: while running, a suffix of the text that could still grow into a stop string is held
back (``held_back_text_len``) so that no output ever has to be retracted; vLLM holds back a fixed
max(len(stop)) - 1 characters, we hold back only a real partial match.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple

from jaxllm.engine.sequence import SequenceStatus
from jaxllm.outputs import CompletionOutput, Logprob
from jaxllm.sampling_params import SamplingParams

# Prompt tokens kept as left context for the first generated token (vLLM: 5 + 2).
_PROMPT_CONTEXT_TOKENS = 7
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas; ``output_text`` is their concatenation."""

    def __init__(self, tokenizer: Any, prompt_token_ids: Iterable[int] = (),
                 params: SamplingParams | None = None, *,
                 skip_special_tokens: bool | None = None,
                 spaces_between_special_tokens: bool | None = None):
        self.tokenizer = tokenizer
        params = params or SamplingParams()
        self.skip_special_tokens = (params.skip_special_tokens if skip_special_tokens is None
                                    else skip_special_tokens)
        # Only slow (Python) tokenizers use it; fast ones ignore it, as in vLLM.
        self.spaces_between_special_tokens = (
            params.spaces_between_special_tokens if spaces_between_special_tokens is None
            else spaces_between_special_tokens)
        self._vocab_len = len(tokenizer)
        prompt = list(prompt_token_ids)[-_PROMPT_CONTEXT_TOKENS:]
        self._ids: list[int] = [t for t in prompt if 0 <= t < self._vocab_len]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.output_text = ""

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        kw = {"skip_special_tokens": self.skip_special_tokens}
        if not getattr(self.tokenizer, "is_fast", True):
            kw["spaces_between_special_tokens"] = self.spaces_between_special_tokens
        return self.tokenizer.decode(ids, **kw)

    def append(self, token_id: int) -> str:
        """Adds one token; returns the new text (possibly "" while a character is incomplete)."""
        token_id = int(token_id)
        if not 0 <= token_id < self._vocab_len:  # padded model vocab: no text, as vLLM
            return ""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Emits any pending text (end of sequence), even an incomplete character."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        p, r = self._prefix_offset, self._read_offset
        if r >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[p:r])
        new_text = self._decode(self._ids[p:])
        if len(new_text) <= len(prefix_text) or (
                not final and new_text.endswith(_REPLACEMENT_CHAR)):
            if final:  # nothing printable will come; drop the pending ids
                self._prefix_offset = self._read_offset = len(self._ids)
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = r, len(self._ids)
        self.output_text += delta
        return delta


class ProcessResult(NamedTuple):
    finished: bool
    status: SequenceStatus | None  # FINISHED_STOPPED / FINISHED_LENGTH when finished


# process() returns this one object while a sequence runs: a NamedTuple's __new__ is a Python
# function, and process() runs per sequence per step.
_RUNNING = ProcessResult(False, None)
_finish_reason = SequenceStatus.finish_reason  # None -> None


class OutputProcessor:
    """Per-sequence output state: token ids, text, log-probs, stop checks.

    The engine calls ``process(token_id, logprobs)`` once per generated token, uses
    ``banned_token_ids`` when building the sampling row, and reads ``output_text`` (minus
    ``held_back_text_len`` while running), ``logprobs``, ``cumulative_logprob``,
    ``finish_reason`` and ``stop_reason`` for outputs, or calls ``completion_output``.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Iterable[int], params: SamplingParams,
                 eos_token_ids: Iterable[int] | int | None = (), index: int = 0):
        self.params = params
        self.index = index
        if eos_token_ids is None:
            eos_token_ids = ()
        elif isinstance(eos_token_ids, int):
            eos_token_ids = (eos_token_ids,)
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.stop_token_ids = frozenset(params.stop_token_ids or ())
        self.detokenizer = (IncrementalDetokenizer(tokenizer, prompt_token_ids, params)
                            if params.detokenize and tokenizer is not None else None)
        self.output_token_ids: list[int] = []
        self.output_text = ""
        self.logprobs: list[dict[int, Logprob]] | None = (
            [] if params.logprobs is not None else None)
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        self.status: SequenceStatus | None = None
        self.stop_reason: int | str | None = None
        self._stop_check_floor = 0  # text before this index is never searched for stop strings
        self._last_sent = 0  # for get_output_text(delta=True)

    # -- queries --------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.status is not None

    @property
    def finish_reason(self) -> str | None:
        return SequenceStatus.finish_reason(self.status) if self.status is not None else None

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def banned_token_ids(self, num_output_tokens: int | None = None) -> list[int]:
        """Tokens the sampler must not pick now: EOS (unless ignore_eos) and stop_token_ids
        while fewer than min_tokens tokens have been generated. ``num_output_tokens``: the
        engine's count when it is ahead of this processor (tokens still on the device)."""
        n = len(self.output_token_ids) if num_output_tokens is None else num_output_tokens
        if n >= self.params.min_tokens:
            return []
        banned = set(self.stop_token_ids)
        if not self.params.ignore_eos:
            banned |= self.eos_token_ids
        return sorted(banned)

    @property
    def held_back_text_len(self) -> int:
        """Characters at the end of output_text that could be the start of a stop string."""
        if self.finished or not self.params.stop or self.params.include_stop_str_in_output:
            return 0
        text = self.output_text
        best = 0
        for s in self.params.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def get_output_text(self, delta: bool = False) -> str:
        """The text to report now: everything not held back, or (delta) what is new since the
        previous delta call."""
        text = self.output_text
        end = len(text) - self.held_back_text_len
        if not delta:
            return text[:end]
        start = min(self._last_sent, end)
        self._last_sent = max(end, start)
        return text[start:end]

    def completion_output(self, delta: bool = False, token_offset: int = 0) -> CompletionOutput:
        """CompletionOutput of this sequence; with delta, text since the previous delta call and
        token_ids / logprobs from token_offset on. token_ids and logprobs are new lists: a later
        token never changes an output already handed out (vLLM's v1 OutputProcessor hands out
        its live lists for CUMULATIVE; users here may keep every output)."""
        lps = self.logprobs
        if lps is not None:
            lps = lps[token_offset:]
        # Without a detokenizer output_text stays "" (and get_output_text would return it).
        text = "" if self.detokenizer is None else self.get_output_text(delta)
        # Positional, in the fields' order: called per request per step, and a dataclass
        # __init__ given keywords costs ~0.4 us more (x 2 x 256 requests per step).
        return CompletionOutput(
            self.index, text, self.output_token_ids[token_offset:], self.cumulative_logprob, lps,
            _finish_reason(self.status), self.stop_reason)

    # -- the per-token call ---------------------------------------------------------------------
    def process(self, token_id: int, logprobs: dict[int, Logprob] | None = None,
                num_output_tokens: int | None = None) -> ProcessResult:
        """Appends one generated token; returns (finished, status). num_output_tokens, if given,
        is the engine's count including this token (checked for consistency)."""
        if self.status is not None:
            raise RuntimeError("process() called on a finished sequence")
        token_id = int(token_id)
        params = self.params
        ids = self.output_token_ids
        ids.append(token_id)
        n = len(ids)
        if num_output_tokens is not None and num_output_tokens != n:
            raise RuntimeError(f"output token count mismatch: engine has {num_output_tokens}, "
                               f"output processor has {n}")
        if logprobs is not None and self.logprobs is not None:
            self.logprobs.append(logprobs)
            if token_id in logprobs:
                self.cumulative_logprob += logprobs[token_id].logprob

        status: SequenceStatus | None = None
        if n >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                status = SequenceStatus.FINISHED_STOPPED
            elif token_id in self.stop_token_ids:
                status = SequenceStatus.FINISHED_STOPPED
                self.stop_reason = token_id
        if status is None and params.max_tokens is not None and n >= params.max_tokens:
            status = SequenceStatus.FINISHED_LENGTH

        det = self.detokenizer
        if det is not None:
            stop_terminated = status is SequenceStatus.FINISHED_STOPPED
            if not stop_terminated or params.include_stop_str_in_output:
                self.output_text += det.append(token_id)
            if n <= params.min_tokens:
                self._stop_check_floor = len(self.output_text)
            matched = False
            if params.stop and n > params.min_tokens:
                matched = self._check_stop_strings()
            if matched:
                status = SequenceStatus.FINISHED_STOPPED
            elif status is not None:
                self.output_text += det.flush()
        if status is None:
            return _RUNNING
        self.status = status
        return ProcessResult(True, status)

    def _check_stop_strings(self) -> bool:
        text = self.output_text
        best: tuple[int, str] | None = None
        for s in self.params.stop:
            # A match must end in the new text; it may start up to len(s) - 1 chars before it.
            start = max(self._stop_check_floor - len(s) + 1, 0)
            i = text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        self._stop_check_floor = len(text)
        if best is None:
            return False
        i, s = best
        self.output_text = text[:i + len(s)] if self.params.include_stop_str_in_output else text[:i]
        self.stop_reason = s
        return True
