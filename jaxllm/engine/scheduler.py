"""Continuous-batching scheduler: which sequences run this step, and how many tokens each.

vLLM V1-like: there is no separate prefill and decode phase. Every step is one ragged batch of
at most `max_num_batched_tokens` tokens from at most `max_num_seqs` sequences, in which a
sequence contributes either its one decode token or a chunk of its prompt (chunked prefill).

Order within a step:
1. running sequences with exactly one token to compute (decodes), in admission order;
2. running sequences still prefilling (continuing chunks), in admission order;
3. waiting sequences, FCFS, while token budget, sequence slots and free pages allow; admission
   never preempts, and nothing is admitted in a step that preempted (the pool is under pressure).
Doing decodes first means a long prompt never starves decodes of the token budget.

Policy (vLLM's --scheduling-policy): "fcfs" as above; "priority" keeps the waiting queue ordered
by (priority, arrival time), lower values first, a preempted sequence going back to its place
in that order, and preempts the running sequence with the largest (priority, arrival time)
instead of the newest.

Pages: before a sequence is given `num_new` tokens it owns ceil((computed + num_new) / B) pages
(B = page size). When the pool runs dry for a running sequence the scheduler preempts by
recompute: the newest running sequence not yet scheduled this step (possibly the one asking)
loses all its pages, goes back to `num_computed_tokens = 0` with its output tokens kept, and is
put at the front of the waiting queue. A continuing prefill chunk is first shortened to the pages
it can get, so a chunk never evicts another sequence when it can make progress without it.

Prefix caching (with a `PrefixCache`): on admission a waiting sequence takes the longest cached
prefix of full pages (`PagePool.acquire`, ref +1) and starts with num_computed_tokens there; at
least one token is always computed (so there are logits to sample: hits are capped at
(token limit - 1) // B pages, i.e. a fully cached page-aligned prompt recomputes its last page,
as vLLM). Pages are registered in the cache by `update` as soon as they are full of computed
tokens (prompt or decode). Siblings of an n > 1 request wait while another sibling is still
computing their shared prompt pages, then hit them (admission skips them meanwhile; later
requests may go first). Sequences with prompt_logprobs do not look up (the cached positions
would have no logits), as vLLM; their pages are still cached.

LoRA (``max_loras``, vLLM's): admission skips a sequence whose adapter would be one more than
max_loras distinct adapters among the running sequences (later ones may go first); the engine
keeps every running adapter in a device slot.

Async scheduling (the engine's default): the engine schedules step k+1 while step k still runs
on the device. It calls `commit` when it dispatches a step: computed counts advance and every
sampling sequence gets a placeholder token (`Sequence.append_placeholder`), so the next schedule
sees it as a decode whose input token the device supplies; `resolve` fills the real id in once the
step's results are read. A sequence whose placeholder already reaches max_tokens is not scheduled
again (it finishes when its token is resolved), waiting sequences never hold placeholders when
admitted (a preempted one is resolved before the next schedule can admit it), and pages are
registered in the prefix cache only as far as token ids are known. `update` is the synchronous
path: commit and resolve at once.

Multi-step launches (EngineConfig.num_scheduler_steps): the engine may run a batch of decodes as
k steps in one device program. `reserve_lookahead` then gives each sequence the pages of its k
K/V positions (all or nothing; it never preempts), and `commit(out, num_steps=k)` appends k
placeholders and advances computed tokens by k, so the next schedule sees one decode left.

Speculative decoding (engine/spec_decode.py): a decode whose ``spec_token_ids`` the engine
set gets 1 + len(draft) tokens (the draft cut to the token budget and to the pages it can get
without preempting; each draft position also takes a sequence slot, as it is sampled), and
``commit`` gives it 1 + len(draft) placeholders; ``reject_drafts`` drops those of the rejected
drafts once the step is read.

Length: no K/V is ever computed at a position >= max_model_len, and no token is sampled for a
sequence that is already max_model_len long. Stop conditions (max_tokens, stop tokens, length)
are the engine's: it calls `finish`.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass

from jaxllm.engine.sequence import Sequence, SequenceStatus
from jaxllm.kv_cache.page_pool import PagePool
from jaxllm.kv_cache.prefix_cache import PrefixCache

_RUNNING = SequenceStatus.RUNNING
SCHEDULING_POLICIES = ("fcfs", "priority")


def priority_key(seq: Sequence) -> tuple[int, float, int]:
    """The "priority" policy's order: lower first; siblings by index."""
    return (seq.priority, seq.arrival_time, seq.seq_id)
_WAITING = SequenceStatus.WAITING


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """One sequence's share of a step.

    The step computes K/V for tokens `seq.all_token_ids[start_pos : start_pos + num_new_tokens]`
    at positions start_pos.. (its pages are already allocated). When `needs_sample`, the chunk
    reaches the end of the known tokens and the logits of its last token are sampled.

    A speculative decode (``num_spec`` > 0, engine/spec_decode.py) computes its last token and
    the draft ``seq.spec_token_ids[:num_spec]`` after it (num_new_tokens = 1 + num_spec), and
    each of those 1 + num_spec positions is sampled.
    """

    seq: Sequence
    num_new_tokens: int
    start_pos: int  # seq.num_computed_tokens before the step
    needs_sample: bool  # start_pos + num_new_tokens - num_spec == seq.num_tokens
    num_spec: int = 0  # draft tokens after the sequence's last token

    @property
    def token_ids(self) -> list[int]:
        """The ids of the tokens the step computes (a placeholder's id is not known)."""
        start, seq = self.start_pos, self.seq
        if self.num_spec:
            return seq.all_token_ids[start:] + seq.spec_token_ids[:self.num_spec]
        return seq.all_token_ids[start:start + self.num_new_tokens]


@dataclass(frozen=True)
class SchedulerOutput:
    """The scheduler -> runner contract of one step.

    scheduled: decodes first, then prefill chunks, then newly admitted sequences (S entries).
    num_batched_tokens: sum of num_new_tokens (T before padding), <= max_num_batched_tokens.
    preempted: sequences preempted by this step (now WAITING, pages freed, not in `scheduled`).
    """

    scheduled: list[ScheduledSeq]
    num_batched_tokens: int
    preempted: list[Sequence]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 page_size: int, page_pool: PagePool, enable_chunked_prefill: bool = True,
                 prefix_cache: PrefixCache | None = None, policy: str = "fcfs",
                 max_loras: int | None = None):
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got "
                             f"{policy!r}.")
        self.policy = policy
        for name, value in (("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens),
                            ("max_model_len", max_model_len), ("page_size", page_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.page_size = page_size
        self.page_pool = page_pool
        self.enable_chunked_prefill = enable_chunked_prefill
        if prefix_cache is not None and (prefix_cache.pool is not page_pool
                                         or prefix_cache.page_size != page_size):
            raise ValueError("the prefix cache must index this scheduler's page pool and page size")
        self.prefix_cache = prefix_cache
        # LoRA (vLLM's max_loras): at most this many distinct adapters among the running
        # sequences; None: no LoRA.
        self.max_loras = max_loras
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is the newest
        self._requests: dict[str, list[Sequence]] = {}  # request_id -> its unfinished sequences
        self.num_preemptions = 0  # total, for metrics

    # ------------------------------------------------------------------ queue state
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ admission checks
    def can_ever_fit(self, num_tokens: int) -> bool:
        """Could a sequence of `num_tokens` (prompt + max_tokens) run alone: max_model_len and pool."""
        return (num_tokens <= self.max_model_len
                and _cdiv(num_tokens, self.page_size) <= self.page_pool.num_usable_pages)

    def fit_error(self, num_prompt_tokens: int, max_tokens: int | None) -> str | None:
        """Why a request could never be served (a message naming what to change), or None."""
        if num_prompt_tokens > self.max_model_len or (
                max_tokens is not None and num_prompt_tokens + max_tokens > self.max_model_len):
            return (f"This model's maximum context length is {self.max_model_len} tokens. However, "
                    f"you requested {num_prompt_tokens + (max_tokens or 0)} tokens "
                    f"({num_prompt_tokens} in the prompt, {max_tokens or 0} for the completion). "
                    "Reduce the prompt or max_tokens, or raise max_model_len.")
        total = num_prompt_tokens + (max_tokens or 0)
        if not self.can_ever_fit(total):
            return (f"The request needs {_cdiv(total, self.page_size)} KV-cache pages of "
                    f"{self.page_size} tokens ({total} tokens) but the cache has only "
                    f"{self.page_pool.num_usable_pages}. Reduce the prompt or max_tokens, or raise "
                    "num_pages / gpu_memory_utilization.")
        if not self.enable_chunked_prefill and num_prompt_tokens > self.max_num_batched_tokens:
            return (f"The prompt has {num_prompt_tokens} tokens but max_num_batched_tokens is "
                    f"{self.max_num_batched_tokens} with chunked prefill disabled. Enable chunked "
                    "prefill or raise max_num_batched_tokens.")
        return None

    # ------------------------------------------------------------------ public operations
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (last, or in priority order)."""
        if seq.status is not _WAITING:
            raise ValueError(f"sequence {seq.seq_id} is {seq.status.name}, expected WAITING")
        if seq.num_tokens > self.max_model_len:
            raise ValueError(
                f"sequence {seq.seq_id} has {seq.num_tokens} tokens, more than max_model_len "
                f"({self.max_model_len}); reject it at submission (see Scheduler.fit_error)")
        if self.policy == "priority":
            self._enqueue_by_priority(seq)
        else:
            self.waiting.append(seq)
        self._requests.setdefault(seq.request_id, []).append(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        chunked = self.enable_chunked_prefill
        pool = self.page_pool
        scheduled: list[ScheduledSeq] = []
        scheduled_seqs: set[Sequence] = set()  # protected from preemption this step
        preempted: list[Sequence] = []

        # 1+2. Running: decodes first so a long prompt never takes their budget, then chunks.
        # (This loop is per-step host time: locals, no helper calls on the decode fast path.)
        max_model_len, page_size = self.max_model_len, self.page_size
        decodes: list[Sequence] = []
        prefills: list[Sequence] = []
        for seq in self.running:
            n = seq.num_tokens
            limit = n if n < max_model_len else max_model_len - 1
            (decodes if limit - seq.num_computed_tokens == 1 else prefills).append(seq)
        if prefills:
            decodes += prefills
        num_spec_rows = 0  # draft positions sampled this step: they take sequence slots
        for seq in decodes:
            if budget == 0:
                break
            if seq.status is not _RUNNING:  # preempted earlier in this step
                continue
            n = seq.num_tokens
            computed = seq.num_computed_tokens
            remaining = (n if n < max_model_len else max_model_len - 1) - computed
            if remaining <= 0:  # at max_model_len, or awaiting its sampled token
                continue
            if seq.num_pending and seq.num_output_tokens >= (seq.max_tokens or n + 1):
                continue  # its pending token is its last: it finishes when that resolves
            num_new = remaining if remaining < budget else budget
            if num_new < remaining and not chunked:
                continue
            spec = 0
            if seq.spec_token_ids and remaining == 1:  # a decode with a draft
                spec = self._draft_room(seq, min(len(seq.spec_token_ids), budget - 1))
                num_new += spec
            need = -(-(computed + num_new) // page_size) - len(seq.page_ids)
            if need > 0:
                if need <= pool.num_free_pages:
                    seq.page_ids.extend(pool.allocate(need))
                else:
                    num_new = self._reserve_pages(seq, num_new, scheduled_seqs, preempted,
                                                  can_shorten=chunked and remaining > 1)
                    if num_new == 0:  # it was preempted itself
                        continue
            scheduled.append(ScheduledSeq(seq, num_new, computed,
                                          computed + num_new - spec == n, spec))
            scheduled_seqs.add(seq)
            budget -= num_new
            num_spec_rows += spec

        # 3. Admission in queue order. Never preempts; skipped when this step had to preempt.
        waiting, running, cache = self.waiting, self.running, self.prefix_cache
        # Skipped for now, in order: n > 1 siblings waiting for a sibling's prompt pages, and
        # sequences of a LoRA adapter that would be one more than max_loras running.
        deferred: list[Sequence] = []
        loras = (None if self.max_loras is None
                 else {s.lora_int_id for s in running if s.lora_int_id})
        while (not preempted and waiting and budget > 0
               and len(running) + num_spec_rows < self.max_num_seqs):
            seq = waiting[0]
            if seq.num_pending:  # preempted with a token still on the device: next step
                break
            if (loras is not None and seq.lora_int_id and seq.lora_int_id not in loras
                    and len(loras) >= self.max_loras):
                deferred.append(waiting.popleft())
                continue
            limit = self._token_limit(seq)
            hit: list[int] = []
            lookup = cache is not None and getattr(seq.sampling_params, "prompt_logprobs",
                                                   None) is None
            if lookup:
                if self._sibling_computing_prompt(seq, limit):
                    deferred.append(waiting.popleft())
                    continue
                hit = cache.lookup(seq, limit - 1)
            num_hit = len(hit) * page_size
            remaining = limit - num_hit
            num_new = min(remaining, budget)
            if num_new < remaining and not chunked:
                break  # the whole prompt must fit one step; it waits (head of line)
            need = _cdiv(num_hit + num_new, page_size) - len(hit)
            # Hit pages that are free (ref 0) leave the free list too.
            if need + sum(1 for p in hit if pool.is_free(p)) > pool.num_free_pages:
                break
            waiting.popleft()
            seq.status = _RUNNING
            running.append(seq)
            if not seq.scheduled_ts:  # the first admission (RequestStateStats.scheduled_ts)
                seq.scheduled_ts = time.monotonic()
            if loras is not None and seq.lora_int_id:
                loras.add(seq.lora_int_id)
            if hit:
                pool.acquire(hit)
                seq.page_ids = hit
                seq.num_registered_pages = len(hit)  # already indexed
                seq.num_computed_tokens = num_hit
            if lookup and seq.num_preemptions == 0:  # new requests only, as vLLM's counters
                seq.num_cached_tokens = num_hit
                cache.record(seq.num_tokens, num_hit)
            if need > 0:
                seq.page_ids.extend(pool.allocate(need))
            if num_new > 0:
                scheduled.append(self._scheduled(seq, num_new))
                budget -= num_new
        if deferred:
            waiting.extendleft(reversed(deferred))

        return SchedulerOutput(scheduled=scheduled,
                               num_batched_tokens=self.max_num_batched_tokens - budget,
                               preempted=preempted)

    def update(self, out: SchedulerOutput, sampled: list[int | None]) -> None:
        """Record a finished step: `sampled[i]` is the token of `out.scheduled[i]` (or None).

        Sequences finished or aborted since `schedule` are skipped. A `needs_sample` entry given
        None advances its computed tokens but appends nothing; it is not scheduled again until
        a token is appended (`seq.append_token`). The synchronous path; see `commit`/`resolve`.
        """
        if len(sampled) != len(out.scheduled):
            raise ValueError(f"update got {len(sampled)} sampled tokens for "
                             f"{len(out.scheduled)} scheduled sequences")
        for s, token in zip(out.scheduled, sampled):
            seq = s.seq
            if seq.status is not _RUNNING:
                continue
            seq.num_computed_tokens = s.start_pos + s.num_new_tokens
            if s.needs_sample and token is not None:
                seq.append_token(token)
            self._register(seq)

    def commit(self, out: SchedulerOutput, num_steps: int = 1) -> list[int | None]:
        """Record a step just dispatched (async scheduling): computed counts advance and each
        sampling sequence gets a placeholder for the token in its row of the step's output.
        Returns, per scheduled entry, the output index of its placeholder (None: no sample).

        num_steps > 1: a multi-step launch of decodes (``reserve_lookahead``): each sequence
        gets num_steps placeholders (their indices follow the returned one) and num_steps
        computed tokens (its input token and all but the last sampled one)."""
        indices: list[int | None] = []
        extra = num_steps - 1
        caching = self.prefix_cache is not None  # per row per step: no _register call without
        row = -1  # the sampler output's row of the entry's (last) sampled token
        for s in out.scheduled:
            seq = s.seq
            row += 1 + s.num_spec
            if seq.status is not _RUNNING or not s.needs_sample:
                if seq.status is _RUNNING:
                    seq.num_computed_tokens = s.start_pos + s.num_new_tokens
                    if caching:
                        self._register(seq)
                indices.append(None)
                continue
            seq.num_computed_tokens = s.start_pos + s.num_new_tokens + extra
            indices.append(len(seq.output_token_ids))
            for _ in range(1 + extra + s.num_spec):
                seq.append_placeholder(row)
            if caching:
                self._register(seq)
        return indices

    def reject_drafts(self, seq: Sequence, count: int) -> None:
        """A speculative step's last ``count`` drafts were rejected: their placeholders go and
        the computed tokens end before them (their K/V slots are overwritten later). Call it
        before resolving the accepted tokens, so no page holding a rejected draft's K/V is
        registered in the prefix cache."""
        if count > 0 and not seq.status.is_finished:
            seq.discard_pending(count)
            seq.num_computed_tokens -= count

    def reserve_lookahead(self, out: SchedulerOutput, num_steps: int) -> bool:
        """Allocate the pages a multi-step launch of ``out``'s decodes writes: each sequence's
        K/V at num_steps positions from its start. All or nothing, never preempting: False (and
        nothing allocated) when the pool lacks them. Pages a sequence does not use in the end
        (it stops early) are freed with the rest when it finishes."""
        page_size, pool = self.page_size, self.page_pool
        needs = [_cdiv(s.start_pos + num_steps, page_size) - len(s.seq.page_ids)
                 for s in out.scheduled]
        if sum(n for n in needs if n > 0) > pool.num_free_pages:
            return False
        for s, n in zip(out.scheduled, needs):
            if n > 0:
                s.seq.page_ids.extend(pool.allocate(n))
        return True

    def resolve(self, seq: Sequence, output_index: int, token_id: int) -> None:
        """Fill in a committed placeholder with the sampled id (also for a sequence preempted
        meanwhile: the token is valid and is recomputed with the rest). Finished ones: no-op."""
        if seq.status.is_finished:
            return
        seq.resolve_token(output_index, token_id)
        if seq.status is _RUNNING and self.prefix_cache is not None:
            self._register(seq)

    def _register(self, seq: Sequence) -> None:
        cache = self.prefix_cache
        if cache is not None and min(seq.num_computed_tokens, seq.num_known_tokens) >= (
                seq.num_registered_pages + 1) * self.page_size:
            cache.register(seq)  # a page just became full of computed, known tokens

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Mark `seq` finished with `status`, free its pages, drop it from the queues.

        A no-op for a sequence that is already finished (e.g. aborted while its step ran).
        """
        if not status.is_finished:
            raise ValueError(f"finish needs a FINISHED_* status, got {status.name}")
        if seq.status.is_finished:
            return
        if seq.status is _RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._release_pages(seq)
        seq.status = status
        siblings = self._requests.get(seq.request_id)
        if siblings is not None:
            siblings.remove(seq)
            if not siblings:
                del self._requests[seq.request_id]

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished sequence of `request_id` as FINISHED_ABORTED; returns them."""
        seqs = list(self._requests.get(request_id, ()))
        for seq in seqs:
            self.finish(seq, SequenceStatus.FINISHED_ABORTED)
        return seqs

    # ------------------------------------------------------------------ internals
    def _token_limit(self, seq: Sequence) -> int:
        """How many of seq's tokens may have K/V computed.

        All known tokens, except when the sequence is already max_model_len long: computing its
        last token would sample token max_model_len + 1, so that one is left out.
        """
        n = seq.num_tokens
        return n if n < self.max_model_len else self.max_model_len - 1

    def _sibling_computing_prompt(self, seq: Sequence, limit: int) -> bool:
        """Whether a running sibling (same request, same prompt) is still computing pages seq
        could hit: then seq waits a step or more and hits them instead of computing them again."""
        siblings = self._requests.get(seq.request_id)
        if siblings is None or len(siblings) == 1:
            return False
        cacheable = (limit - 1) // self.page_size * self.page_size
        cacheable = min(cacheable, seq.num_prompt_tokens // self.page_size * self.page_size)
        return any(s is not seq and s.status is _RUNNING and s.num_computed_tokens < cacheable
                   for s in siblings)

    def _draft_room(self, seq: Sequence, spec: int) -> int:
        """How many of ``spec`` draft tokens a decode takes: as many as fit the pages it owns
        and the free ones (a draft never preempts anything)."""
        computed = seq.num_computed_tokens
        room = (len(seq.page_ids) + self.page_pool.num_free_pages) * self.page_size
        return max(0, min(spec, room - computed - 1))

    def _scheduled(self, seq: Sequence, num_new: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return ScheduledSeq(seq, num_new, start, start + num_new == seq.num_tokens)

    def _reserve_pages(self, seq: Sequence, num_new: int, protected: set[Sequence],
                       preempted: list[Sequence], can_shorten: bool) -> int:
        """Give running `seq` the pages for `num_new` more tokens; returns the tokens it got.

        Shortens a prefill chunk to the pages available when that is > 0 tokens, else preempts
        the newest running sequence not in `protected` until it fits. Returns 0 if `seq` itself
        was preempted.
        """
        pool, page_size = self.page_pool, self.page_size
        while True:
            need = _cdiv(seq.num_computed_tokens + num_new, page_size) - len(seq.page_ids)
            if need <= pool.num_free_pages:
                break
            if can_shorten:
                fit = (len(seq.page_ids) + pool.num_free_pages) * page_size - seq.num_computed_tokens
                can_shorten = False  # once: after this it fits exactly (or we preempt)
                if fit > 0:
                    num_new = min(num_new, fit)
                    continue
            if self.policy == "priority":
                victim = max((s for s in self.running if s not in protected), key=priority_key)
            else:
                victim = next(s for s in reversed(self.running) if s not in protected)
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return 0
        if need > 0:
            seq.page_ids.extend(pool.allocate(need))
        return num_new

    def _preempt(self, seq: Sequence) -> None:
        """Preempt by recompute: free all pages, forget computed K/V, requeue at the front."""
        self.running.remove(seq)
        self._release_pages(seq)
        seq.num_computed_tokens = 0
        seq.status = _WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if self.policy == "priority":
            self._enqueue_by_priority(seq)
        else:
            self.waiting.appendleft(seq)

    def _enqueue_by_priority(self, seq: Sequence) -> None:
        """Inserts ``seq`` into the waiting queue in priority_key order (after equal keys)."""
        keys = [priority_key(s) for s in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, priority_key(seq)), seq)

    def _release_pages(self, seq: Sequence) -> None:
        # Tail first: with prefix caching the tail is the least shared, so it is evicted first.
        self.page_pool.free(reversed(seq.page_ids))
        seq.page_ids = []
        seq.num_registered_pages = 0
