"""The on-device sampler: one jittable call turns a batch's logits into next tokens.

Dimension keys: S sequences (rows, padded to a bucket), V vocabulary, NB sparse logit-bias
entries per row, E penalty entries of the whole batch, W = ceil(V / 32) token-bitmask words per
row.

Host side (numpy, every step): ``build_sampling_tensors(rows, pad_to=S)`` -> SamplingTensors.
Device side (pure jnp, jit): ``sample(logits[S, V], tensors, num_logprobs, sort)`` ->
SamplerOutput, a jitted call of its own after the model's forward (see engine/model_runner.py).

Order of operations, as vLLM V1's Sampler:
  0. the token bitmask (structured outputs, allowed_token_ids): tokens a row may not sample get
     -inf (vLLM applies the grammar bitmask to the logits before its sampler too)
  1. logit_bias and bans (bans = -inf bias; the engine bans EOS/stop_token_ids until min_tokens)
  2. penalties: repetition (prompt + output tokens, vLLM's divide-positive/multiply-negative
     rule), then frequency (x count in output) and presence (x [count > 0] in output)
  3. greedy rows (temperature < 1e-5) take the argmax of the result; the others go on:
  4. temperature, 5. min_p (on the tempered probabilities), 6. top_k, 7. top_p,
  8. one draw with the Gumbel-max trick from the row's own key (exact, like vLLM's
     exponential race: argmax(log p + Gumbel) ~ Categorical(p)).

Log-probs are of the *raw* model distribution (log_softmax of the logits before any of the
above), vLLM V1's default ``logprobs_mode="raw_logprobs"``. rank = #tokens whose log-prob is
>= the sampled token's (vLLM's batched_count_greater_than), so the argmax has rank 1. The
engine's ``logprobs_mode`` (vLLM's; jaxllm.config.LOGPROBS_MODES) picks another: "raw_logits"
(the logits themselves), "processed_logprobs" / "processed_logits" (what the row was sampled
from: after steps 0-2 for a greedy row, after 0-7 (temperature, min_p, top-k / top-p; cut
tokens -inf) for a random one, as vLLM's sampler returns them). Ranks and the top-k are read
from the same values.

Reproducibility: a row's key is ``fold_in(key(seed), step)`` with step = number of tokens the
sequence has generated so far, and its noise is drawn over [V] from that key alone, so a seeded
sequence gets the same tokens whatever else is in the batch, wherever its row is, and after a
recompute preemption.

Cost: top_k/top_p need one descending sort of [S, V] (for V = 128k, O(S V log V)), and log-probs
a log_softmax and a top-k over [S, V]: both are static variants (``sort``, ``num_logprobs``) the
host picks per batch (``needs_sort``, ``logprobs_width``), so a greedy batch without log-probs
does neither. A device-side ``lax.cond`` was tried first: on the GPU it still cost the sort
(benchmarks/RESULTS.md, step profile). The bitmask's W is 0 unless some row is constrained
(engine/structured_output.py), so unconstrained batches do not unpack it. Penalties scatter
into dense [S, V] counts only when the penalty arrays are non-empty (E > 0): E is a static
shape, 0 unless some row in the batch uses a penalty. The entries are one flat list of the
batch's (row, token) pairs, not a [S, N] block: its width is the batch's total, bucketed from
``penalty_min`` up (the engine passes max_model_len's bucket), so one penalty row of any length
is one program, which the engine compiles at start-up on accelerators, instead of a program
per power of two its prompt + output passes while it is served.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.sampling_params import SAMPLING_EPS, SamplingParams

_MASK32 = 0xFFFFFFFF


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling inputs of one step. Padding rows (beyond the real batch) are greedy with
    every knob neutral; their outputs are ignored.

    temperature:       [S] f32   0 = greedy (rows below 1e-5 are greedy)
    top_p:             [S] f32   1 = off
    top_k:             [S] i32   0 = off (>= V also means off)
    min_p:             [S] f32   0 = off
    repetition_penalty:[S] f32   1 = off
    presence_penalty:  [S] f32   0 = off
    frequency_penalty: [S] f32   0 = off
    seeds:             [S, 2] u32  raw threefry key of the row's seed: (seed >> 32, seed & 0xffffffff)
                                   (= jax.random.PRNGKey(seed) for 64-bit seeds)
    steps:             [S] i32   tokens generated so far; key = fold_in(key(seed), step)
    bias_ids:          [S, NB] i32  token ids to bias (padding entries: id 0 with value 0.0)
    bias_values:       [S, NB] f32  added to the logit; -inf bans the token
    penalty_rows:      [E] i32   the row of each penalty entry (S: padding, dropped)
    penalty_ids:       [E] i32   prompt + output token ids of the rows with penalties
    penalty_is_output: [E] bool  True where the id is a generated (output) token
    token_bitmask:     [S, W] i32  bit t % 32 of word t // 32 set: the row may sample token t
                                   (W = 0 when no row is constrained; unconstrained rows: all -1)
    """

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    seeds: jax.Array
    steps: jax.Array
    bias_ids: jax.Array
    bias_values: jax.Array
    penalty_rows: jax.Array
    penalty_ids: jax.Array
    penalty_is_output: jax.Array
    token_bitmask: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    """token_ids [S] i32; logprobs [S] f32 (raw log-prob of the sampled token); ranks [S] i32;
    topk_ids [S, k] i32 and topk_logprobs [S, k] f32 (k = num_logprobs, most likely first)."""

    token_ids: jax.Array
    logprobs: jax.Array
    ranks: jax.Array
    topk_ids: jax.Array
    topk_logprobs: jax.Array


class SamplingRow(NamedTuple):
    """What the engine knows about one row, host side (a plain tuple works too)."""

    params: SamplingParams
    seed: int  # the user's seed or one the engine derived for this sequence
    step: int  # number of tokens this sequence has generated so far
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    banned_token_ids: Sequence[int] = ()  # e.g. EOS + stop_token_ids while below min_tokens
    # engine/structured_output.TokenMask: the tokens the row may sample this step (None: all)
    token_mask: Any = None
    # A penalty row's prompt + output ids as one int32 array (TokenArray.ids), so the
    # penalty list is built without converting the lists each step; None: from the lists.
    penalty_ids: Any = None


class TokenArray:
    """A sequence's prompt + output token ids as one int32 array that grows in place as its
    tokens come, for the penalty list and the n-gram drafts (engine/spec_decode.py): at batch
    256 with 612 tokens a row, building the penalty list from every penalty row's token lists
    took 6.05 ms a step on the CI machine, 2.13 from these (benchmarks/penalty_tensors.py). The
    engine keeps one per sequence that uses penalties or drafts; ``ids`` appends only the new
    tokens."""

    __slots__ = ("seq_id", "num_prompt", "buf", "n")

    def __init__(self, seq_id: int, prompt: Sequence[int]):
        self.seq_id = seq_id
        self.num_prompt = len(prompt)
        self.buf = np.empty(max(64, 2 * len(prompt)), np.int32)
        self.buf[:len(prompt)] = prompt
        self.n = len(prompt)

    def ids(self, output: Sequence[int], n_out: int) -> np.ndarray:
        """The prompt + ``output[:n_out]`` (known tokens only) as an array view, valid until
        the next call."""
        p = self.num_prompt
        have = self.n - p
        if have > n_out or (have and self.buf[self.n - 1] != output[have - 1]):
            have = 0  # not a continuation of what is held: rebuild the output part
        need = p + n_out
        if need > len(self.buf):
            buf = np.empty(max(need, 2 * len(self.buf)), np.int32)
            buf[:p + have] = self.buf[:p + have]
            self.buf = buf
        if n_out > have:
            self.buf[p + have:need] = output[have:n_out]
        self.n = need
        return self.buf[:need]


def bucket_size(n: int, minimum: int) -> int:
    """0 for 0, else the next power of two >= max(n, minimum): few distinct static shapes."""
    if n <= 0:
        return 0
    return max(minimum, 1 << (n - 1).bit_length())


class KnobCache:
    """The previous call's [n, 7] knob array and the SamplingParams objects it was read from
    (one per ModelRunner). In steady decode the batch's rows, so its params objects, are the
    same step after step: a C-level identity check of the n objects replaces n tuples of seven
    attribute reads and their conversion to numpy (benchmarks/host_overhead.py,
    sampling_tens). Sound because the engine owns its params objects (LLMEngine.add_request
    copies the caller's) and never mutates them."""

    __slots__ = ("params", "knobs")

    def __init__(self):
        self.params: list | None = None
        self.knobs: np.ndarray | None = None


def build_sampling_tensors(rows: Sequence[SamplingRow | tuple], pad_to: int, *,
                           bias_len: int | None = None, penalty_len: int | None = None,
                           penalty_min: int = 64, mask_words: int | None = None,
                           knob_cache: KnobCache | None = None,
                           vocab_size: int | None = None) -> SamplingTensors:
    """Builds the step's SamplingTensors (numpy) for ``rows`` padded to ``pad_to`` rows.

    vocab_size: V, needed when a row has a token_mask (the bitmask is [S, ceil(V / 32)]).

    bias_len / penalty_len: the NB / E widths; by default bucketed (0 when no row needs them, else
    a power of two >= 8 / >= ``penalty_min``) so the jitted step sees few shapes. Pass a fixed
    width to pin it.
    mask_words: a token bitmask of this width (every token allowed in unconstrained rows) even
    when no row is constrained: the engine's start-up runs the constrained program so.
    knob_cache: reuse the previous call's knobs when every row has the same params object as
    then (the params must not be mutated in between; see KnobCache).
    """
    S = pad_to
    n = len(rows)
    if n > S:
        raise ValueError(f"{n} sampling rows do not fit pad_to={S}")
    params = [r[0] for r in rows]

    temperature = np.zeros(S, np.float32)
    top_p = np.ones(S, np.float32)
    top_k = np.zeros(S, np.int32)
    min_p = np.zeros(S, np.float32)
    rep = np.ones(S, np.float32)
    pres = np.zeros(S, np.float32)
    freq = np.zeros(S, np.float32)
    seeds = np.zeros((S, 2), np.uint32)
    steps = np.zeros(S, np.int32)
    if n:
        # One [n, 7] float64 array from one list of tuples: fewer passes over the rows than a
        # list per field (per-step host time at batch 256, benchmarks/host_overhead.py). The
        # ints (top_k) are exact in float64; the floats round to float32 as before.
        knobs = None
        if knob_cache is not None:
            prev = knob_cache.params
            if prev is not None and len(prev) == n and all(map(operator.is_, params, prev)):
                knobs = knob_cache.knobs  # read only below: safe to share between calls
        if knobs is None:
            knobs = np.array([(p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty,
                               p.presence_penalty, p.frequency_penalty) for p in params],
                             np.float64)
            if knob_cache is not None:
                knob_cache.params, knob_cache.knobs = params, knobs
        temperature[:n] = knobs[:, 0]
        top_p[:n] = knobs[:, 1]
        top_k[:n] = np.clip(knobs[:, 2], 0, np.iinfo(np.int32).max)
        min_p[:n] = knobs[:, 3]
        rep[:n] = knobs[:, 4]
        pres[:n] = knobs[:, 5]
        freq[:n] = knobs[:, 6]
        seed_list = [r[1] for r in rows]
        try:  # seed % 2**64 is the two's-complement bits of an int64 seed
            s64 = np.array(seed_list, np.int64).view(np.uint64)
        except OverflowError:  # a seed outside the int64 range
            s64 = np.array([x % (1 << 64) for x in seed_list], np.uint64)
        seeds[:n, 0] = (s64 >> np.uint64(32)).astype(np.uint32)
        seeds[:n, 1] = (s64 & np.uint64(_MASK32)).astype(np.uint32)
        steps[:n] = [r[2] for r in rows]

    # Sparse logit bias + bans.
    bias_rows = []
    for i, r in enumerate(rows):
        lb = r[0].logit_bias
        banned = r[5] if len(r) > 5 else ()
        if lb or banned:
            ids = list(lb.keys()) if lb else []
            vals = list(lb.values()) if lb else []
            ids.extend(banned)
            vals.extend([-np.inf] * len(banned))
            bias_rows.append((i, ids, vals))
    need_nb = max((len(ids) for _, ids, _ in bias_rows), default=0)
    NB = bucket_size(need_nb, 8) if bias_len is None else bias_len
    if need_nb > NB:
        raise ValueError(f"bias_len={NB} is smaller than the {need_nb} bias entries of a row")
    bias_ids = np.zeros((S, NB), np.int32)
    bias_values = np.zeros((S, NB), np.float32)
    for i, ids, vals in bias_rows:
        bias_ids[i, :len(ids)] = ids
        bias_values[i, :len(vals)] = vals

    # Penalty entries: the prompt + output tokens of the rows that use a penalty, one flat list
    # (a row's ids from its TokenArray when it has one, else from its lists).
    pen_rows = [i for i, p in enumerate(params) if p.uses_penalties]
    need_e = sum(len(rows[i][3]) + len(rows[i][4]) for i in pen_rows)
    E = bucket_size(need_e, penalty_min) if penalty_len is None else penalty_len
    if need_e > E:
        raise ValueError(f"penalty_len={E} is smaller than the {need_e} prompt+output tokens of "
                         "the rows with penalties")
    penalty_rows = np.full(E, S, np.int32)
    penalty_ids = np.zeros(E, np.int32)
    penalty_is_output = np.zeros(E, bool)
    at = 0
    for i in pen_rows:
        r = rows[i]
        lp, n = len(r[3]), len(r[3]) + len(r[4])
        if len(r) > 7 and r[7] is not None:
            penalty_ids[at:at + n] = r[7]
        else:
            penalty_ids[at:at + lp] = r[3]
            penalty_ids[at + lp:at + n] = r[4]
        penalty_rows[at:at + n] = i
        penalty_is_output[at + lp:at + n] = True
        at += n

    # Token bitmask, only when some row is constrained.
    masked = [(i, r[6]) for i, r in enumerate(rows) if len(r) > 6 and r[6] is not None]
    if masked:
        if vocab_size is None:
            raise ValueError("a row with a token_mask needs build_sampling_tensors(vocab_size=)")
        from jaxllm.engine.structured_output import TokenMask
        from jaxllm.engine.structured_output import mask_words as words_for

        token_bitmask = np.full((S, words_for(vocab_size)), -1, np.int32)
        TokenMask.fill_rows(masked, token_bitmask)
    else:
        token_bitmask = np.full((S, mask_words or 0), -1, np.int32)

    return SamplingTensors(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq,
        seeds=seeds, steps=steps, bias_ids=bias_ids, bias_values=bias_values,
        penalty_rows=penalty_rows, penalty_ids=penalty_ids,
        penalty_is_output=penalty_is_output, token_bitmask=token_bitmask)


# -- device side ------------------------------------------------------------------------------

def apply_token_bitmask(x: jax.Array, bitmask: jax.Array) -> jax.Array:
    """x[S, V] with -inf where the row's bit is clear in bitmask [S, W] (W = 0: unchanged)."""
    if bitmask.shape[1] == 0:
        return x
    S, V = x.shape
    shifts = jnp.arange(32, dtype=jnp.int32)
    # Arithmetic shifts of int32 words; bit k of a negative word is still (w >> k) & 1.
    bits = (bitmask[:, :, None] >> shifts) & 1  # [S, W, 32]
    allowed = bits.reshape(S, -1)[:, :V].astype(jnp.bool_)
    return jnp.where(allowed, x, -jnp.inf)


def apply_bias(x: jax.Array, t: SamplingTensors) -> jax.Array:
    """x[S, V] + sparse bias (duplicates add; -inf bans). Padding entries add 0 to id 0."""
    if t.bias_ids.shape[1] == 0:
        return x
    rows = jnp.arange(x.shape[0])[:, None]
    return x.at[rows, t.bias_ids].add(t.bias_values, mode="drop")


def apply_penalties(x: jax.Array, t: SamplingTensors) -> jax.Array:
    """vLLM's apply_penalties: repetition over prompt+output, frequency/presence over output."""
    if t.penalty_ids.shape[0] == 0:
        return x
    S, V = x.shape
    rows, ids = t.penalty_rows, t.penalty_ids  # padding: row S, out of range: dropped
    counts = jnp.zeros((S, V), jnp.float32).at[rows, ids].add(
        t.penalty_is_output.astype(jnp.float32), mode="drop")
    seen = jnp.zeros((S, V), jnp.bool_).at[rows, ids].set(True, mode="drop")
    rp = jnp.where(seen, t.repetition_penalty[:, None], 1.0)
    x = jnp.where(x > 0, x / rp, x * rp)
    x = x - t.frequency_penalty[:, None] * counts
    x = x - t.presence_penalty[:, None] * (counts > 0).astype(jnp.float32)
    return x


def apply_min_p(x: jax.Array, min_p: jax.Array) -> jax.Array:
    """Drops tokens whose probability is below min_p * (the most likely token's probability)."""
    probs = jax.nn.softmax(x, axis=-1)
    thresh = min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < thresh, -jnp.inf, x)


def apply_top_k_top_p(x: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keeps, per row, the top_k largest logits (ties with the k-th kept, as vLLM), then the
    smallest prefix of the rest (by descending probability) whose mass reaches top_p: a token is
    kept when the mass strictly before it is < top_p (vLLM's ``cumsum_ascending > 1 - p``).
    Works by thresholds on one descending sort, so nothing is scattered back."""
    S, V = x.shape
    srt = -jnp.sort(-x, axis=-1)  # [S, V] descending
    k = jnp.where((top_k <= 0) | (top_k > V), V, top_k)
    kth = jnp.take_along_axis(srt, (k - 1)[:, None], axis=-1)  # [S, 1]
    srt = jnp.where(srt < kth, -jnp.inf, srt)
    ps = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(ps, axis=-1) - ps
    keep = (before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    n_keep = jnp.sum(keep, axis=-1)
    pth = jnp.take_along_axis(srt, (n_keep - 1)[:, None], axis=-1)
    thresh = jnp.maximum(kth, pth)
    return jnp.where(x < thresh, -jnp.inf, x)


def row_keys(t: SamplingTensors) -> jax.Array:
    """[S] PRNG keys: fold_in(key(seed), step), independent of the row's position."""
    def one(kd, step):
        return jax.random.fold_in(jax.random.wrap_key_data(kd, impl="threefry2x32"), step)

    return jax.vmap(one)(t.seeds, t.steps)


def needs_sort(rows: list[SamplingRow], vocab_size: int) -> bool:
    """Whether any row uses top_k or top_p: only then does the sampler sort [S, V] (host side,
    so the choice is a static compile variant, not a device-side branch)."""
    return any(0 < r[0].top_k < vocab_size or r[0].top_p < 1.0 for r in rows)


def logprobs_width(rows: list[SamplingRow], max_logprobs: int) -> int | None:
    """None when no row wants log-probs (the sampler then skips them), else max_logprobs: one
    fixed top-k width, so a different k per request does not compile a new variant."""
    return max_logprobs if any(r[0].logprobs is not None for r in rows) else None


def sample(logits: jax.Array, t: SamplingTensors, num_logprobs: int | None = 0,
           sort: bool = True, logprobs_mode: str = "raw_logprobs") -> SamplerOutput:
    """Samples one token per row of logits [S, V] (f32).

    Static arguments (each value is its own compile variant):
      num_logprobs  top-k width of the returned log-probs; None skips log-probs altogether
                    (logprobs/ranks come back as zeros), for batches where nobody asked.
      sort          apply top_k/top_p (one [S, V] sort); False skips it, for batches where no
                    row uses them (see ``needs_sort``). With True, rows with top_k off and
                    top_p = 1 are left unchanged.
      logprobs_mode what the log-probs are (module docstring).
    """
    logits = logits.astype(jnp.float32)
    S, V = logits.shape

    x = apply_token_bitmask(logits, t.token_bitmask)
    x = apply_bias(x, t)
    x = apply_penalties(x, t)
    penalized = x
    greedy_ids = jnp.argmax(x, axis=-1).astype(jnp.int32)
    is_greedy = t.temperature < SAMPLING_EPS

    x = x / jnp.where(is_greedy, 1.0, t.temperature)[:, None]
    x = apply_min_p(x, t.min_p)
    if sort:
        x = apply_top_k_top_p(x, t.top_k, t.top_p)
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(row_keys(t))
    random_ids = jnp.argmax(x + gumbel, axis=-1).astype(jnp.int32)
    token_ids = jnp.where(is_greedy, greedy_ids, random_ids)

    if num_logprobs is None:
        zeros = jnp.zeros((S,), jnp.float32)
        return SamplerOutput(token_ids=token_ids, logprobs=zeros, ranks=zeros.astype(jnp.int32),
                             topk_ids=jnp.zeros((S, 0), jnp.int32),
                             topk_logprobs=jnp.zeros((S, 0), jnp.float32))
    if logprobs_mode.startswith("processed"):  # what each row was sampled from
        values = jnp.where(is_greedy[:, None], penalized, x)
    else:
        values = logits
    if logprobs_mode.endswith("logprobs"):
        values = jax.nn.log_softmax(values, axis=-1)
    lp = jnp.take_along_axis(values, token_ids[:, None], axis=-1)  # [S, 1]
    ranks = jnp.sum(values >= lp, axis=-1).astype(jnp.int32)
    if num_logprobs > 0:
        topk_lp, topk_ids = jax.lax.top_k(values, num_logprobs)
        topk_ids = topk_ids.astype(jnp.int32)
    else:
        topk_lp = jnp.zeros((S, 0), jnp.float32)
        topk_ids = jnp.zeros((S, 0), jnp.int32)
    return SamplerOutput(token_ids=token_ids, logprobs=lp[:, 0], ranks=ranks,
                         topk_ids=topk_ids, topk_logprobs=topk_lp)
