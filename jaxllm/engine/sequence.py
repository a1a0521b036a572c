"""One generation stream: its tokens, its status and the KV pages it owns.

A request with `n > 1` becomes n sequences that share `request_id` and differ in `index`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


PLACEHOLDER_TOKEN = -1  # a token sampled by a step still on the device (see Sequence.num_pending)


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()   # stop token / stop string
    FINISHED_LENGTH = enum.auto()    # max_tokens or max_model_len reached
    FINISHED_ABORTED = enum.auto()   # cancelled by the client

    @property
    def is_finished(self) -> bool:
        return self._is_finished  # set below: a set lookup hashes the enum in Python

    @staticmethod
    def finish_reason(status: SequenceStatus) -> str | None:
        """OpenAI's finish_reason for a finished status ('stop', 'length', 'abort'), else None."""
        return _FINISH_REASON.get(status)


_FINISHED = frozenset({SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
                       SequenceStatus.FINISHED_ABORTED})
for _status in SequenceStatus:
    _status._is_finished = _status in _FINISHED
_FINISH_REASON = {SequenceStatus.FINISHED_STOPPED: "stop", SequenceStatus.FINISHED_LENGTH: "length",
                  SequenceStatus.FINISHED_ABORTED: "abort"}


@dataclass(eq=False)  # identity semantics: sequences are hashable and `list.remove` is by identity
class Sequence:
    """Mutable per-sequence state shared by the scheduler, the runner and the engine.

    Append generated tokens with `append_token` (not `output_token_ids.append`): it keeps the
    prompt+output list `all_token_ids` up to date without rebuilding it every step.

    num_computed_tokens: tokens at the front of `all_token_ids` whose K/V is in the cache (pages
        `page_ids`); the next step computes from position num_computed_tokens on.
    num_cached_tokens: prompt tokens served from the prefix cache at the first admission (kept
        across preemptions: it is what RequestOutput.num_cached_tokens reports).
    page_hashes: prefix-cache hashes of the full pages of all_token_ids computed so far (memoized
        by `PrefixCache.seq_page_hash`; tokens only grow, so they stay valid across preemption).
    num_registered_pages: leading entries of page_ids already in the prefix-cache index (or
        deliberately left out of it); reset when the pages are released.
    cache_extra_keys: per-sequence extra keys folded into every page hash (anything besides the
        tokens that changes the K/V, e.g. a LoRA id or a cache salt).
    num_pending: placeholder tokens at the end of the sequence: sampled by a step still running
        on the device (async scheduling), so their ids are not known on the host yet; 0 or 1,
        or up to num_scheduler_steps after a multi-step launch, or 1 + its draft's length after
        a speculative step. ``pending_row`` is the row of that launch's sampler output that
        holds the last one.
    """

    seq_id: int
    request_id: str
    index: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: Any  # opaque here; has .max_tokens (int or None)
    arrival_time: float
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    page_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    page_hashes: list[bytes] = field(default_factory=list, repr=False)
    num_registered_pages: int = 0
    cache_extra_keys: tuple = ()
    num_pending: int = 0
    pending_row: int = -1
    token_mask: Any = None  # engine/structured_output.TokenMask of a constrained request
    priority: int = 0  # the "priority" scheduling policy's: lower is served first
    # sampler.TokenArray: the known ids of a sequence that uses penalties or speculative
    # drafts as one growing array
    token_array: Any = field(default=None, repr=False)
    # The n-gram draft of the next step (engine/spec_decode.py): the scheduler gives a decode
    # 1 + len(spec_token_ids) tokens; the engine sets it before each schedule.
    spec_token_ids: list[int] = field(default_factory=list, repr=False)
    # LoRA (jaxllm/lora): the adapter's lora_int_id (0: none), and the device slot the engine
    # put it in for the next step (-1: none).
    lora_int_id: int = 0
    lora_slot: int = -1
    # time.monotonic() when the scheduler first admitted it to the running batch (0.0: not yet)
    scheduled_ts: float = 0.0
    _all_token_ids: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.output_token_ids = list(self.output_token_ids)
        self._all_token_ids = self.prompt_token_ids + self.output_token_ids

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def append_placeholder(self, row: int) -> None:
        """Appends a token sampled on the device into output row ``row``, id not known yet."""
        self.append_token(PLACEHOLDER_TOKEN)
        self.num_pending += 1
        self.pending_row = row

    def resolve_token(self, output_index: int, token_id: int) -> None:
        """Fills in the placeholder at ``output_token_ids[output_index]`` (oldest first)."""
        if self.output_token_ids[output_index] != PLACEHOLDER_TOKEN:
            raise RuntimeError(f"sequence {self.seq_id}: output token {output_index} is not pending")
        self.output_token_ids[output_index] = token_id
        self._all_token_ids[self.num_prompt_tokens + output_index] = token_id
        self.num_pending -= 1

    def discard_pending(self, count: int) -> None:
        """Drops the last ``count`` placeholders (a speculative step's rejected drafts)."""
        if count <= 0:
            return
        if count > self.num_pending:
            raise RuntimeError(f"sequence {self.seq_id}: {count} placeholders to drop, "
                               f"{self.num_pending} pending")
        del self.output_token_ids[-count:]
        del self._all_token_ids[-count:]
        self.num_pending -= count

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids the host knows (all but the pending placeholders at the end)."""
        return len(self._all_token_ids) - self.num_pending

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + output tokens. The live list (no copy): do not mutate it."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self._all_token_ids[-1]

    @property
    def max_tokens(self) -> int | None:
        return getattr(self.sampling_params, "max_tokens", None)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
