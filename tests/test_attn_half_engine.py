"""benchmarks/gpu/attn_half_engine.py: the engine's batch-1 fp8 attention-half chain (its own
modules and kernels) against the benchmark's independent float32 reference, on the CPU.

Small shapes (E 256, 4 q heads, 2 KV heads, D 64, page size 16, 2 layers, ctx 200 and 300: 13
and 19 pages out of pools of 27 and 39, the new token mid-page). Two engine paths:

- the CPU's own ("reference" attention backend, fp8 W8A8: per-token e4m3 activations);
- the GPU's, interpreted ("pallas" backend with ``JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS=16`` as on a
  GPU: W8A16 split-K q/k/v partials, the folded input norm, rope and the K/V write inside the
  decode kernel).

Error bounds (max|engine - ref| / max|ref| over row 0): the reference uses the same e4m3
weights, so what differs is rounding. W8A16: bf16 roundings (relative 2^-9) of x * g, q/k/v,
the attention output, o_proj's output and x: at most 8.7e-3 measured (6 seeds), bound 2e-2.
W8A8: the q/k/v and o_proj inputs rounded to e4m3 (3 mantissa bits: relative error up to 2^-4,
~2.5% rms), which the dots average but do not remove: at most 6.5e-2 measured for a layer's
branch, 5e-2 for x and the new K/V (6 seeds, both backends); bounds 0.1 (x, new K/V) and 0.15
(the branch). Mistakes of the kind the reference is there to catch give O(1) errors: rope
turned the other way 1-1.8, a wrong GQA mapping 0.7-1.2, too few context pages read (a bug
the first version of the reference had past 128 positions) 0.4-0.9. Two tests keep the
reference honest: ``test_reference_sees_a_wrong_rope_direction`` and
``test_reference_reads_exactly_the_live_context``.
"""
import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "attn_half_engine.py"
_spec = importlib.util.spec_from_file_location("attn_half_engine", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

SMALL = dict(H=256, num_heads=4, num_kv_heads=2, head_dim=64, page_size=16)
L = 2
# (attention backend, fp8 weight-only row limit or None for the platform's, ctx, bounds)
CASES = {
    "cpu_w8a8": ("auto", None, 200, dict(last=0.1, branch=0.15, new_kv=0.1)),
    "gpu_path_w8a16_interpreted": ("pallas", "16", 300, dict(last=2e-2, branch=2e-2,
                                                             new_kv=2e-2)),
}


def _run(case, monkeypatch):
    backend, weight_only, ctx, bounds = CASES[case]
    if weight_only is None:
        monkeypatch.delenv("JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS", raising=False)
    else:
        monkeypatch.setenv("JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS", weight_only)
    for env in ("JAXLLM_ATTENTION_KNOBS", "JAXLLM_LAYER_JIT", "JAXLLM_FP8_SKINNY_MGPU_QX",
                "JAXLLM_FP8_SKINNY_MGPU_WO"):
        monkeypatch.delenv(env, raising=False)
    fn, args, inputs = bench.make_engine_chain(L, ctx, backend=backend, seed=1, **SMALL)
    pages_before = [(np.asarray(k), np.asarray(v)) for k, v in args[2]]
    xs, kv = fn(*args)  # traced here, under the environment set above
    return xs, kv, inputs, pages_before, bounds


@pytest.mark.parametrize("case", list(CASES))
def test_engine_chain_row0_matches_the_float32_reference(case, monkeypatch):
    xs, kv, inputs, pages_before, bounds = _run(case, monkeypatch)
    ref = bench.reference_chain(inputs)
    assert xs.shape == (L, bench.T, SMALL["H"]) and xs.dtype == jnp.bfloat16
    errs = bench.row0_errors(xs, kv, ref, inputs)
    for name, bound in bounds.items():
        assert errs[name] < bound, (case, errs)
    # padding rows attend to nothing: o_proj adds 0, x passes through unchanged
    np.testing.assert_array_equal(np.asarray(xs[:, 1:]),
                                  np.broadcast_to(np.asarray(inputs["x0"][1:]), xs[:, 1:].shape))
    # the live token's slot is the only one written (padding writes are dropped)
    B, ctx = inputs["page_size"], inputs["position"]
    page = int(np.asarray(inputs["page_table"])[ctx // B])
    for (k, v), (k0, v0) in zip(kv, pages_before):
        for new, old in ((np.array(k), k0), (np.array(v), v0)):
            new[page, ctx % B] = old[page, ctx % B]
            np.testing.assert_array_equal(new, old)


def test_reference_sees_a_wrong_rope_direction(monkeypatch):
    xs, kv, inputs, _, bounds = _run("gpu_path_w8a16_interpreted", monkeypatch)
    wrong = dict(inputs, inv_freq=-inputs["inv_freq"])  # rope rotated the other way
    errs = bench.row0_errors(xs, kv, bench.reference_chain(wrong), inputs)
    assert errs["branch"] > 10 * bounds["branch"] and errs["new_kv"] > 10 * bounds["new_kv"]


def _poisoned(inputs, keep):
    """``inputs`` with NaN in every K/V slot of every layer but ``keep`` (flat slot ids)."""
    B, layers = inputs["page_size"], []
    for lay in inputs["layers"]:
        new = dict(lay)
        for name in ("k_pages", "v_pages"):
            P, _, K, D = lay[name].shape
            flat = np.full((P * B, K, D), np.nan, np.float32)
            flat[keep] = np.asarray(lay[name], np.float32).reshape(P * B, K, D)[keep]
            new[name] = jnp.asarray(flat.reshape(P, B, K, D), jnp.bfloat16)
        layers.append(new)
    return dict(inputs, layers=layers)


def test_reference_reads_exactly_the_live_context():
    # Slots of positions 0..ctx-1 through the page table are all the reference may read (its
    # own slot holds junk before the write): NaN everywhere else leaves it unchanged, and NaN
    # at position ctx - 1 alone must reach its output (a reference reading too few pages
    # would miss it: the first version did, past 128 positions).
    inputs = bench.chain_inputs(2, 200, seed=2, **SMALL)
    B, ctx = inputs["page_size"], inputs["position"]
    pages = np.asarray(inputs["page_table"])[:-(-(ctx + 1) // B)]
    slots = (pages[:, None] * B + np.arange(B)[None, :]).reshape(-1)[:ctx]  # positions < ctx
    clean = bench.reference_chain(inputs)["xs"]
    np.testing.assert_array_equal(
        np.asarray(bench.reference_chain(_poisoned(inputs, slots))["xs"]), np.asarray(clean))
    last = bench.reference_chain(_poisoned(inputs, slots[:-1]))["xs"]
    assert np.isnan(np.asarray(last[:, 0])).all()


def test_fused_qkv_rows_are_the_engines_layout():
    # The chain fuses w_q / w_k / w_v with the engine's own rule; the engine's inverse gives
    # the plain weights back (the reference reads those).
    from jaxllm.models.fused import unfuse_tensor

    inputs = bench.chain_inputs(1, 5, **SMALL)
    fn, args, _ = bench.make_engine_chain(1, 5, inputs=inputs, **SMALL)
    fused = np.asarray(args[0][0]["self_attn"]["qkv_proj"]["weight"].get_value())
    config = bench.model_config(inputs, 1)
    parts = unfuse_tensor(("self_attn", "qkv_proj", "weight"), fused, config)
    lay = inputs["layers"][0]
    for (path, value), name in zip(parts, ("w_q", "w_k", "w_v")):
        assert path[-2] == name[-1] + "_proj"
        np.testing.assert_array_equal(value.view(np.uint8), np.asarray(lay[name]).view(np.uint8))
