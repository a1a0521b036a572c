"""Beam search over the engine, as vLLM does it: each step runs every live beam as a one-token
request asking for 2 * beam_width log-probs, and keeps the best beam_width extensions.

The prompt and the beam's tokens so far are one new request per beam and step; the prefix cache
(on by default) holds their full pages, so a step recomputes only the tokens past the last full
page. ``BeamSearchInstance`` is the search state of one prompt; ``LLM.beam_search`` (sync) and
``AsyncEngine.beam_search`` (the server's ``use_beam_search``) drive it.
"""

from __future__ import annotations

from typing import Any, Iterable

from jaxllm.outputs import BeamSearchSequence, CompletionOutput, RequestOutput
from jaxllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams


def beam_score(beam: BeamSearchSequence, eos_ids: frozenset[int], length_penalty: float
               ) -> float:
    """vLLM's ranking: cumulative log-prob / length ** length_penalty, the length counting the
    prompt and not a final end-of-sequence token."""
    n = len(beam.tokens) - (1 if beam.tokens and beam.tokens[-1] in eos_ids else 0)
    return beam.cum_logprob / (max(n, 1) ** length_penalty)


def step_params(params: BeamSearchParams, max_logprobs: int) -> SamplingParams:
    """The one-token request each beam runs per step. ValueError when 2 * beam_width log-probs
    exceed the engine's max_logprobs (vLLM's default 20 allows beam_width <= 10)."""
    k = 2 * params.beam_width
    if max_logprobs != -1 and k > max_logprobs:
        raise ValueError(f"beam_width={params.beam_width} needs {k} log-probs per step, more "
                         f"than max_logprobs={max_logprobs}; use a smaller beam_width or start "
                         f"the engine with max_logprobs >= {k}.")
    return SamplingParams(logprobs=k, max_tokens=1, temperature=params.temperature,
                          ignore_eos=True, skip_special_tokens=False,
                          output_kind=RequestOutputKind.FINAL_ONLY)


class BeamSearchInstance:
    """The search state of one prompt. ``eos_ids``: the tokens that end a beam (the engine's
    end-of-sequence tokens and the generation config's end-of-turn ones, the set it stops free
    generation on); ``eos_token_id``: the tokenizer's, reported as stop_reason None."""

    def __init__(self, prompt_ids: list[int], prompt_text: str | None,
                 params: BeamSearchParams, *, eos_ids: Iterable[int],
                 eos_token_id: int | None, max_model_len: int, cache_salt: str | None = None):
        if not prompt_ids:
            raise ValueError("The prompt is empty; beam search needs at least one token.")
        if len(prompt_ids) >= max_model_len:
            raise ValueError(
                f"This model's maximum context length is {max_model_len} tokens. However, "
                f"your prompt has {len(prompt_ids)} tokens (no room for a generated token). "
                "Please reduce the length of the prompt.")
        room = max_model_len - len(prompt_ids)
        self.params = params
        self.prompt_ids, self.prompt_text = list(prompt_ids), prompt_text
        self.steps_left = room if params.max_tokens is None else min(params.max_tokens, room)
        self.eos_ids = frozenset(eos_ids)
        self.eos_token_id = eos_token_id
        self.cache_salt = cache_salt  # the prompt's, passed on to every step's requests
        self.beams = [BeamSearchSequence(tokens=list(prompt_ids), logprobs=[])]
        self.completed: list[BeamSearchSequence] = []

    @property
    def done(self) -> bool:
        return self.steps_left <= 0 or not self.beams

    def prompts(self) -> list[dict[str, Any]]:
        """This step's one request per live beam."""
        salt = {} if self.cache_salt is None else {"cache_salt": self.cache_salt}
        return [{"prompt_token_ids": b.tokens, **salt} for b in self.beams]

    def _key(self, beam: BeamSearchSequence) -> float:
        return beam_score(beam, self.eos_ids, self.params.length_penalty)

    def advance(self, outputs: list[RequestOutput]) -> None:
        """Folds in this step's outputs (one per beam, in ``prompts()`` order)."""
        width, ignore_eos = self.params.beam_width, self.params.ignore_eos
        new = []
        for beam, out in zip(self.beams, outputs, strict=True):
            lps = out.outputs[0].logprobs
            if not lps:
                continue
            step = lps[0]
            for tid, lp in step.items():
                cand = BeamSearchSequence(tokens=beam.tokens + [tid],
                                          logprobs=beam.logprobs + [step],
                                          cum_logprob=beam.cum_logprob + lp.logprob)
                if tid in self.eos_ids and not ignore_eos:
                    cand.finish_reason = "stop"
                    cand.stop_reason = None if tid == self.eos_token_id else tid
                    self.completed.append(cand)
                else:
                    new.append(cand)
        new.sort(key=self._key, reverse=True)
        self.beams = new[:width]
        self.steps_left -= 1

    def best(self) -> list[BeamSearchSequence]:
        """The final beams, best first: the finished ones and those still live."""
        for b in self.beams:
            b.finish_reason = "length"
        ranked = sorted(self.completed + self.beams, key=self._key, reverse=True)
        return ranked[:self.params.beam_width]

    def request_output(self, request_id: str, tokenizer: Any) -> RequestOutput:
        """The server's view: one finished CompletionOutput per beam with the generated part
        only (the end-of-sequence token kept when include_stop_str_in_output)."""
        n = len(self.prompt_ids)
        outs = []
        for i, b in enumerate(self.best()):
            ids = b.tokens[n:]
            lps = b.logprobs
            if b.finish_reason == "stop" and not self.params.include_stop_str_in_output:
                ids, lps = ids[:-1], lps[:-1]
            text = tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens) \
                if tokenizer is not None else ""
            outs.append(CompletionOutput(index=i, text=text, token_ids=ids,
                                         cumulative_logprob=b.cum_logprob, logprobs=lps,
                                         finish_reason=b.finish_reason,
                                         stop_reason=b.stop_reason))
        return RequestOutput(request_id=request_id, prompt=self.prompt_text,
                             prompt_token_ids=self.prompt_ids, prompt_logprobs=None,
                             outputs=outs, finished=True)


def cache_salt(prompt: Any) -> str | None:
    return prompt.get("cache_salt") if isinstance(prompt, dict) else None


def engine_stop_ids(engine: Any) -> frozenset[int]:
    """The tokens an engine ends free generation on: end-of-sequence and end-of-turn."""
    return frozenset(engine.eos_token_ids) | frozenset(
        getattr(engine, "generation_stop_token_ids", ()))
