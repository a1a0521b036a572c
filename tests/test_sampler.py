"""The sampler against numpy references computed from the same logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.engine import sampler as S
from jaxllm.sampling_params import SamplingParams

V = 32
N_DRAWS = 4000


@functools.lru_cache(maxsize=None)
def _jitted(num_logprobs):
    return jax.jit(S.sample, static_argnums=2)


def run(logits, rows, pad_to=8, num_logprobs=4):
    # Fixed widths and few row buckets keep the number of compilations (the cost here) small.
    pad_to = max(pad_to, len(rows))
    t = S.build_sampling_tensors(rows, pad_to=pad_to, bias_len=8, penalty_len=64)
    logits = np.asarray(logits, np.float32)
    if logits.shape[0] < t.temperature.shape[0]:
        logits = np.concatenate(
            [logits, np.zeros((t.temperature.shape[0] - logits.shape[0], logits.shape[1]), np.float32)])
    return jax.device_get(_jitted(num_logprobs)(logits, t, num_logprobs))


def row(params, seed=0, step=0, prompt=(), output=(), banned=()):
    return S.SamplingRow(params, seed, step, list(prompt), list(output), list(banned))


def softmax(x):
    x = x - x.max()
    e = np.exp(x)
    return e / e.sum()


def draws(logits_row, params, n=N_DRAWS, **rowkw):
    """n samples of one distribution: n rows with the same logits and different seeds."""
    rows = [row(params, seed=s, **rowkw) for s in range(n)]
    out = run(np.tile(logits_row, (n, 1)), rows)
    return out.token_ids


def empirical(tokens):
    return np.bincount(tokens, minlength=V) / len(tokens)


def assert_distribution(tokens, ref_probs, tol=0.05):
    emp = empirical(tokens)
    support = set(np.flatnonzero(ref_probs > 0))
    assert set(np.unique(tokens)) <= support, "sampled outside the allowed support"
    tv = 0.5 * np.abs(emp - ref_probs).sum()
    assert tv < tol, f"total variation {tv:.3f} from the reference"


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(0)
    return (rng.standard_normal(V) * 1.5).astype(np.float32)


def test_greedy_rows_take_the_argmax(logits):
    rng = np.random.default_rng(1)
    lg = rng.standard_normal((5, V)).astype(np.float32)
    out = run(lg, [row(SamplingParams(temperature=0.0), seed=i) for i in range(5)], pad_to=8)
    np.testing.assert_array_equal(out.token_ids[:5], lg.argmax(-1))


def test_plain_sampling_follows_softmax(logits):
    assert_distribution(draws(logits, SamplingParams(temperature=1.0)), softmax(logits))


def test_temperature_scales_the_logits(logits):
    for temp in (0.5, 2.0):
        assert_distribution(draws(logits, SamplingParams(temperature=temp)), softmax(logits / temp))


def test_top_k_restricts_support_to_the_k_largest(logits):
    k = 5
    ref = softmax(logits)
    ref[np.argsort(-logits)[k:]] = 0
    ref /= ref.sum()
    toks = draws(logits, SamplingParams(top_k=k))
    assert len(np.unique(toks)) == k
    assert_distribution(toks, ref)


def top_p_reference(probs, p):
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]
    keep = order[before < p]
    ref = np.zeros_like(probs)
    ref[keep] = probs[keep]
    return ref / ref.sum()


def test_top_p_keeps_the_smallest_prefix_reaching_p(logits):
    ref = top_p_reference(softmax(logits), 0.6)
    toks = draws(logits, SamplingParams(top_p=0.6))
    assert set(np.unique(toks)) == set(np.flatnonzero(ref))
    assert_distribution(toks, ref)


def test_top_k_then_top_p_with_temperature(logits):
    probs = softmax(logits / 0.7)
    probs[np.argsort(-logits)[8:]] = 0
    ref = top_p_reference(probs / probs.sum(), 0.8)
    assert_distribution(draws(logits, SamplingParams(temperature=0.7, top_k=8, top_p=0.8)), ref)


def test_min_p_drops_tokens_below_fraction_of_the_max(logits):
    probs = softmax(logits)
    ref = np.where(probs >= 0.2 * probs.max(), probs, 0)
    ref /= ref.sum()
    toks = draws(logits, SamplingParams(min_p=0.2))
    assert set(np.unique(toks)) == set(np.flatnonzero(ref))
    assert_distribution(toks, ref)


def penalties_reference(x, prompt, output, rep, pres, freq):
    x = x.copy()
    seen = np.zeros(V, bool)
    seen[list(prompt) + list(output)] = True
    counts = np.bincount(np.asarray(output, int), minlength=V).astype(np.float32)
    r = np.where(seen, rep, 1.0)
    x = np.where(x > 0, x / r, x * r)
    return x - freq * counts - pres * (counts > 0)


@pytest.mark.parametrize("rep, pres, freq", [(1.5, 0, 0), (0.7, 0, 0), (1, 0.8, 0), (1, 0, 0.6),
                                             (1.3, -0.5, 1.2)])
def test_penalties_match_vllm_formula(logits, rep, pres, freq):
    prompt, output = [1, 2, 3, 3], [3, 4, 4, 4, 9]
    p = SamplingParams(repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq)
    t = S.build_sampling_tensors([row(p, prompt=prompt, output=output),
                                  row(SamplingParams(), prompt=[5], output=[6])], pad_to=4)
    x = np.tile(logits, (4, 1))
    got = np.asarray(S.apply_penalties(jnp.asarray(x), t))
    np.testing.assert_allclose(got[0], penalties_reference(logits, prompt, output, rep, pres, freq),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[1:], x[1:])  # neutral and padding rows untouched


def test_penalized_greedy_pick_follows_the_penalized_logits(logits):
    top = int(np.argmax(logits))
    p = SamplingParams(temperature=0, frequency_penalty=2.0)
    out = run(logits[None], [row(p, prompt=[top], output=[top] * 5)])
    ref = penalties_reference(logits, [top], [top] * 5, 1.0, 0.0, 2.0)
    assert out.token_ids[0] == np.argmax(ref) != top


def test_logit_bias_is_added_to_the_logits(logits):
    low = int(np.argmin(logits))
    p = SamplingParams(temperature=0, logit_bias={low: 100.0, 3: -1.0})
    t = S.build_sampling_tensors([row(p)], pad_to=2)
    got = np.asarray(S.apply_bias(jnp.asarray(np.tile(logits, (2, 1))), t))
    ref = logits.copy()
    ref[low] += 100.0
    ref[3] -= 1.0
    np.testing.assert_allclose(got[0], ref, rtol=1e-6)
    np.testing.assert_array_equal(got[1], logits)
    assert run(logits[None], [row(p)]).token_ids[0] == low


def test_banned_tokens_are_never_sampled(logits):
    banned = list(np.argsort(-logits)[:3])
    toks = draws(logits, SamplingParams(), banned=banned)
    assert not set(toks) & set(banned)
    greedy = run(logits[None], [row(SamplingParams(temperature=0), banned=banned)])
    assert greedy.token_ids[0] == np.argsort(-logits)[3]


def test_seeded_rows_reproduce_regardless_of_batch_position_and_padding():
    rng = np.random.default_rng(3)
    lg = rng.standard_normal((4, V)).astype(np.float32)
    params = [SamplingParams(temperature=1.0), SamplingParams(top_k=10), SamplingParams(top_p=0.9),
              SamplingParams(min_p=0.05, temperature=1.5)]
    rows = [row(p, seed=1000 + i, step=7) for i, p in enumerate(params)]
    a = run(lg, rows).token_ids
    perm = [2, 0, 3, 1]
    b = run(np.concatenate([lg[:2] * 0, lg[perm]]),
            [row(SamplingParams(), seed=1), row(SamplingParams(top_k=2))] + [rows[i] for i in perm]).token_ids[2:]
    np.testing.assert_array_equal(a[perm], b[:4])
    c = run(lg[[1]], [rows[1]]).token_ids
    assert c[0] == a[1]
    # A different step gives fresh randomness (different tokens for at least some rows).
    many = [row(SamplingParams(), seed=5, step=s) for s in range(8)]
    assert len(set(run(np.tile(lg[0], (8, 1)), many).token_ids)) > 1


def test_64_bit_seeds_are_distinct():
    lg = np.zeros((2, V), np.float32)
    outs = {tuple(run(np.zeros((8, V), np.float32),
                      [row(SamplingParams(), seed=s, step=i) for i in range(8)]).token_ids)
            for s in (1, 1 + (1 << 32))}
    assert len(outs) == 2 and lg.shape == (2, V)


def test_logprobs_are_raw_log_softmax_with_topk_and_rank(logits):
    rng = np.random.default_rng(4)
    lg = rng.standard_normal((3, V)).astype(np.float32)
    rows = [row(SamplingParams(temperature=0.3, presence_penalty=1.0), seed=i, output=[1])
            for i in range(3)]
    out = run(lg, rows)
    ref = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    for i in range(3):
        tok = out.token_ids[i]
        np.testing.assert_allclose(out.logprobs[i], ref[i, tok], rtol=1e-5)
        assert out.ranks[i] == np.sum(ref[i] >= ref[i, tok])
        order = np.argsort(-ref[i])[:4]
        np.testing.assert_array_equal(out.topk_ids[i], order)
        np.testing.assert_allclose(out.topk_logprobs[i], ref[i, order], rtol=1e-5)
    assert run(lg, rows, num_logprobs=0).topk_ids.shape == (8, 0)


def test_logprobs_modes_read_raw_or_processed_logits_as_vllm(logits):
    """vLLM's logprobs_mode: raw_logits are the logits; processed_* are what each row was
    sampled from: a greedy row's logits after its penalties, a random row's also tempered and
    top-k cut (cut tokens -inf); ranks and the top-k follow the same values. The tokens do not
    depend on the mode."""
    rng = np.random.default_rng(5)
    lg = rng.standard_normal((2, V)).astype(np.float32)
    rows = [row(SamplingParams(temperature=0.0, presence_penalty=2.0), output=[3]),
            row(SamplingParams(temperature=0.5, top_k=5), seed=1)]
    t = S.build_sampling_tensors(rows, pad_to=2, bias_len=8, penalty_len=64)
    outs = {m: jax.device_get(jax.jit(S.sample, static_argnums=(2, 3, 4))(lg, t, 4, True, m))
            for m in ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")}
    toks = outs["raw_logprobs"].token_ids
    for o in outs.values():
        np.testing.assert_array_equal(o.token_ids, toks)
    greedy = lg[0].copy()
    greedy[3] -= 2.0  # the presence penalty on the token already generated
    tempered = lg[1] / 0.5
    kept = np.argsort(-tempered)[:5]
    cut = np.full(V, -np.inf, np.float32)
    cut[kept] = tempered[kept]
    lse = lambda x: np.log(np.sum(np.exp(x[np.isfinite(x)])))  # noqa: E731
    want = {"raw_logits": [lg[0], lg[1]], "processed_logits": [greedy, cut]}
    want["raw_logprobs"] = [x - lse(x) for x in want["raw_logits"]]
    want["processed_logprobs"] = [x - lse(x) for x in want["processed_logits"]]
    for mode, rows_want in want.items():
        o = outs[mode]
        for i, w in enumerate(rows_want):
            tok = toks[i]
            np.testing.assert_allclose(o.logprobs[i], w[tok], rtol=1e-5, atol=1e-5)
            assert o.ranks[i] == np.sum(w >= w[tok]), mode
            order = np.argsort(-w, kind="stable")[:4]
            np.testing.assert_array_equal(np.sort(o.topk_ids[i]), np.sort(order))
            np.testing.assert_allclose(o.topk_logprobs[i], w[o.topk_ids[i]], rtol=1e-5,
                                       atol=1e-5)
    assert np.isneginf(outs["processed_logprobs"].topk_logprobs[1]).sum() == 0  # 5 kept >= 4


def test_penalty_and_bias_arrays_are_empty_when_unused_and_bucketed_otherwise():
    t = S.build_sampling_tensors([row(SamplingParams(), prompt=range(100), output=[1])], pad_to=4)
    assert t.penalty_ids.shape == (0,) and t.bias_ids.shape == (4, 0)
    pen = SamplingParams(repetition_penalty=1.1)
    t = S.build_sampling_tensors([row(pen, prompt=range(100), output=[1]),
                                  row(SamplingParams(), banned=[2])], pad_to=4)
    assert t.penalty_ids.shape == (128,) and t.bias_ids.shape == (4, 8)
    assert (t.penalty_rows[:101] == 0).all() and (t.penalty_rows[101:] == 4).all()  # 4: padding
    assert t.penalty_is_output.sum() == 1 and t.penalty_is_output[100]
    assert (t.penalty_ids[:101] == [*range(100), 1]).all()
    assert t.bias_values[1, 0] == -np.inf and t.temperature[2] == 0  # padding rows greedy
    # One flat list for the batch: its width is the rows' total, from penalty_min up, so a
    # long row and several short ones are the same program as long as they fit.
    rows = [row(pen, prompt=range(300), output=range(200)), row(pen, prompt=[5]),
            row(SamplingParams()), row(pen, prompt=[6, 7], output=[8])]
    t = S.build_sampling_tensors(rows, pad_to=4, penalty_min=1024)
    assert t.penalty_ids.shape == (1024,)
    assert [int((t.penalty_rows == r).sum()) for r in range(5)] == [500, 1, 0, 3, 1024 - 504]
    assert (t.penalty_ids[t.penalty_rows == 3] == [6, 7, 8]).all()
    assert t.penalty_is_output[t.penalty_rows == 3].tolist() == [False, False, True]
    assert S.build_sampling_tensors(rows * 2, pad_to=8, penalty_min=512).penalty_ids.shape == (
        1024,)
    with pytest.raises(ValueError, match="penalty_len=256 is smaller than the 504"):
        S.build_sampling_tensors(rows, pad_to=4, penalty_len=256)
    # a forced bitmask width with no constrained row: every token allowed
    t = S.build_sampling_tensors([], pad_to=2, mask_words=3)
    assert t.token_bitmask.shape == (2, 3) and (t.token_bitmask == -1).all()


def test_token_arrays_grow_in_place_and_build_the_lists_tensors():
    # TokenArray (the engine keeps one per penalty sequence): the prompt + the known
    # outputs as one array, appended to as tokens come, rebuilt if the output is not a
    # continuation; rows that carry it build the same penalty tensors as rows of lists.
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 1000, 70).tolist()
    pt = S.TokenArray(7, prompt)
    out = []
    for n in range(1, 200):  # past the buffer's first size (2 x 70): it grows
        out.append(int(rng.integers(0, 1000)))
        assert pt.ids(out, n).tolist() == prompt + out
    assert pt.ids(out, 150).tolist() == prompt + out[:150]  # fewer known tokens: a view
    other = out[:120] + [5] * 30  # not a continuation: rebuilt
    assert pt.ids(other, 150).tolist() == prompt + other
    pen = SamplingParams(frequency_penalty=0.5)
    lists = [row(pen, prompt=rng.integers(0, 1000, n), output=rng.integers(0, 1000, m))
             for n, m in ((5, 0), (40, 9), (1, 30))]
    lists.insert(1, row(SamplingParams()))
    arrays = [r._replace(penalty_ids=S.TokenArray(i, r.prompt_token_ids).ids(
        r.output_token_ids, len(r.output_token_ids)) if r.params.uses_penalties else None)
              for i, r in enumerate(lists)]
    a, b = (S.build_sampling_tensors(rs, pad_to=4) for rs in (lists, arrays))
    for f in ("penalty_rows", "penalty_ids", "penalty_is_output"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert (a.penalty_rows[:85] == [0] * 5 + [2] * 49 + [3] * 31).all()


def test_changing_params_within_a_bucket_does_not_recompile(logits):
    traces = []

    def counted(lg, t):
        traces.append(1)
        return S.sample(lg, t, 2)

    f = jax.jit(counted)
    for p in (SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_k=3, top_p=0.5),
              SamplingParams(min_p=0.1, seed=3)):
        f(np.tile(logits, (4, 1)), S.build_sampling_tensors([row(p)], pad_to=4))
    assert len(traces) == 1
