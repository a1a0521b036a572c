"""What generation returns: RequestOutput -> CompletionOutput per sample, as in vLLM's outputs.py.

Log-probs are a list with one entry per generated (or prompt) token; each entry maps token id ->
Logprob and holds the chosen token plus the top-k most likely ones (rank 1 = most likely).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# One position's log-probs: token id -> Logprob.
LogprobsDict = dict[int, "Logprob"]
SampleLogprobs = list[LogprobsDict]
PromptLogprobs = list[LogprobsDict | None]  # the first prompt token has none


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One sample of a request.

    finish_reason: None while running, else "stop" (EOS, stop token or stop string), "length"
        (max_tokens / context length) or "abort".
    stop_reason: the stop string or stop token id that ended it; None for EOS, length or running.
    cumulative_logprob: sum of the sampled tokens' log-probs (None unless logprobs was asked).
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestStateStats:
    """A request's timings (vLLM's V1 ``RequestStateStats``, ``RequestOutput.metrics``).
    ``arrival_time`` is wall-clock (``time.time()``, or the caller's ``arrival_time``); the
    ``*_ts`` are ``time.monotonic()`` on the engine's host, 0.0 until they happen: queued (the
    request added), scheduled (its first sequence first admitted to the running batch), the
    first and the latest output token (the host had their ids). ``first_token_latency``:
    seconds from arrival to the first token. Each output holds its own copy, as of its step."""

    num_generation_tokens: int = 0
    arrival_time: float = 0.0
    queued_ts: float = 0.0
    scheduled_ts: float = 0.0
    first_token_ts: float = 0.0
    last_token_ts: float = 0.0
    first_token_latency: float = 0.0


@dataclass
class RequestOutput:
    """All samples of one request, as streamed or at the end (see SamplingParams.output_kind)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int | None = None
    metrics: RequestStateStats | None = None  # the request's timings
    kv_transfer_params: dict[str, Any] | None = field(default=None, repr=False)
    lora_request: Any | None = None  # the request's LoRARequest (jaxllm/lora), as vLLM's


@dataclass
class BeamSearchSequence:
    """One beam (vLLM's): ``tokens`` holds the prompt and the generated tokens; ``logprobs`` one
    dict per generated token (the step's 2 * beam_width candidates and the sampled token);
    ``text`` (filled at the end) decodes ``tokens``, prompt included, as in vLLM."""

    tokens: list[int]
    logprobs: SampleLogprobs
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (an end-of-sequence token) or "length"
    stop_reason: int | None = None  # the stop token when it is not the tokenizer's EOS


@dataclass
class BeamSearchOutput:
    """``LLM.beam_search``'s result for one prompt: the best beams, best first."""

    sequences: list[BeamSearchSequence]


@dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclass
class EmbeddingRequestOutput:
    """One prompt's embedding (vLLM's): ``outputs.embedding``, a list of floats."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass
class ClassificationOutput:
    """A sequence classifier's class probabilities (vLLM's): softmax of the logits, or the
    sigmoid of the one logit of a single-label model."""

    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ClassificationRequestOutput:
    """One prompt's classification (vLLM's ``LLM.classify``)."""

    request_id: str
    outputs: ClassificationOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass
class PoolingOutput:
    """``LLM.encode``'s result for one prompt (vLLM's): ``data``, a float32 array: [E] (embed),
    [num_labels] (classify), [tokens, E] (token_embed) or [tokens, num_labels]
    (token_classify)."""

    data: Any


@dataclass
class PoolingRequestOutput:
    """One prompt's ``LLM.encode`` output (vLLM's)."""

    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass
class ScoringOutput:
    score: float


@dataclass
class ScoringRequestOutput:
    """One pair's score (vLLM's ``LLM.score``): ``outputs.score``, the cosine similarity of
    the two texts' embeddings; ``prompt_token_ids`` the pair's tokens (the first text's, a
    pad token where the tokenizer has one, the second's), which usage counts."""

    request_id: str
    outputs: ScoringOutput
    prompt_token_ids: list[int]
    finished: bool = True
