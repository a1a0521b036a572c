"""PoolingParams: what an embedding request asks of a pooling model (vLLM's PoolingParams)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PoolingParams:
    """normalize: L2-normalize the embedding (None: the model's pooler config says; jaxllm's
    default for a decoder LLM is True, as vLLM's). dimensions: vLLM's Matryoshka truncation,
    refused unless the model's config declares it Matryoshka (``is_matryoshka`` or
    ``matryoshka_dimensions``). truncate_prompt_tokens: the prompt's last k tokens (-1: up to
    max_model_len)."""

    dimensions: int | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        d = self.dimensions
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 1):
            raise ValueError(f"dimensions must be a positive integer, got {d!r}.")
        k = self.truncate_prompt_tokens
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k == 0
                              or k < -1):
            raise ValueError(f"truncate_prompt_tokens must be an integer >= 1, or -1, got "
                             f"{k!r}.")
