"""pallas_kernels.fused_mlp (the decode MLP in one kernel) on CPU through the Pallas interpreter.

Metric: ||out - ref|| / ||ref|| over the live rows. Against ``fused_mlp_reference`` the kernel
differs only in summation order (float32 inputs: 1e-5; bf16 / fp8: 1e-4, the rounding points
are the same). Against the plain Llama MLP (RMSNorm, gate/up, SiLU x up, down, in float32) the
reference must agree to float32 precision for dense weights, and to the fp8 path's
quantization error (< 0.08: 3-bit mantissas on weights and activations) for e4m3 weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8_matmul import quantize_weight_per_channel
from pallas_kernels.fused_mlp import fused_mlp, fused_mlp_reference

H, F, EPS = 256, 384, 1e-5
BLOCKS = dict(block_f=64, block_k=64, block_n=128)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _operands(seed, M, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, H)) * 3.0, dtype)
    g = jnp.asarray(1 + 0.2 * rng.standard_normal(H), dtype)
    wgu = jnp.asarray(rng.standard_normal((H, 2 * F)) * 0.06, dtype)
    wd = jnp.asarray(rng.standard_normal((F, H)) * 0.05, dtype)
    return x, g, wgu, wd


def _plain_mlp(x, g, wgu, wd):
    """The Llama MLP as the model computes it, in float32: gate of channel f at column 2f."""
    xf = np.asarray(x, np.float64)
    n = xf / np.sqrt(np.mean(xf * xf, axis=1, keepdims=True) + EPS) * np.asarray(g, np.float64)
    gu = n @ np.asarray(wgu, np.float64)
    gate, up = gu[:, 0::2], gu[:, 1::2]
    return (gate / (1 + np.exp(-gate)) * up) @ np.asarray(wd, np.float64)


@pytest.mark.parametrize("M,n_valid", [(1, 1), (8, 3), (5, 5)])
def test_fused_mlp_dense_matches_reference_and_llama_mlp(M, n_valid):
    """float32 and bf16 weights, both accumulations; the atomic one leaves rows past n_valid
    at zero and the partial sums compute every row."""
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-4)):
        x, g, wgu, wd = _operands(10 + M, M, dtype)
        ref = fused_mlp_reference(x, g, wgu, wd, eps=EPS)
        if dtype == jnp.float32:
            assert _rel(ref, _plain_mlp(x, g, wgu, wd)) < 1e-5
        else:  # bf16 rounds the GEMMs' inputs: the plain MLP within bf16 error
            assert _rel(ref, _plain_mlp(x, g, wgu, wd)) < 2e-2
        atomic = fused_mlp(x, g, wgu, wd, n_valid=n_valid, eps=EPS, interpret=True, **BLOCKS)
        assert atomic.shape == (M, H) and atomic.dtype == jnp.float32
        assert _rel(atomic[:n_valid], ref[:n_valid]) < tol
        assert np.all(np.asarray(atomic[n_valid:]) == 0)
        partials = fused_mlp(x, g, wgu, wd, eps=EPS, accumulate="partials", interpret=True,
                             **BLOCKS)
        assert _rel(partials, ref) < tol


def test_fused_mlp_fp8_matches_reference_and_llama_mlp():
    """e4m3 weights in their [N, K] layouts with per-channel scales: W8A8 with activations
    quantized per (row, block) in the kernel, exactly as the reference emulates them."""
    M = 6
    x, g, wgu, wd = _operands(3, M, jnp.float32)
    q, s = quantize_weight_per_channel(wgu)  # [H, 2F] -> scale per gate/up column
    qd, sd = quantize_weight_per_channel(wd)  # [F, H] -> scale per output column
    wq, wdq = jnp.asarray(q.T), jnp.asarray(qd.T)
    xb = x.astype(jnp.bfloat16)
    ref = fused_mlp_reference(xb, g, wq, wdq, s, sd, eps=EPS, block_k=BLOCKS["block_k"],
                              block_f=BLOCKS["block_f"])
    for acc in ("atomic", "partials"):
        got = fused_mlp(xb, g, wq, wdq, s, sd, eps=EPS, accumulate=acc, interpret=True, **BLOCKS)
        assert _rel(got, ref) < 1e-4
    assert _rel(ref, _plain_mlp(xb, g, wgu, wd)) < 0.08
    # The activation-scale blocks matter: a reference with other blocks rounds elsewhere.
    other = fused_mlp_reference(xb, g, wq, wdq, s, sd, eps=EPS, block_k=32, block_f=32)
    assert _rel(other, ref) > 1e-4


def test_fused_mlp_rejects_what_it_does_not_take():
    x, g, wgu, wd = _operands(0, 4, jnp.float32)
    kw = dict(eps=EPS, interpret=True, **BLOCKS)
    with pytest.raises(ValueError, match="M <= 64"):
        fused_mlp(jnp.ones((65, H)), g, wgu, wd, **kw)
    with pytest.raises(ValueError, match="w_down must be"):
        fused_mlp(x, g, wgu, wd.T, **kw)
    with pytest.raises(ValueError, match="power of two"):
        fused_mlp(x, g, wgu, wd, eps=EPS, block_f=48, block_k=64, block_n=128)
    with pytest.raises(ValueError, match="block_f dividing F"):
        fused_mlp(x, g, wgu, wd, eps=EPS, block_f=256, block_k=64, block_n=128, interpret=True)
    with pytest.raises(ValueError, match="accumulate"):
        fused_mlp(x, g, wgu, wd, accumulate="sum", **kw)
    q, s = quantize_weight_per_channel(wgu)
    with pytest.raises(ValueError, match="gu_scale"):
        fused_mlp(x, g, jnp.asarray(q.T), wd.T.astype(q.dtype), **kw)
    with pytest.raises(ValueError, match="w_down is"):
        fused_mlp(x, g, jnp.asarray(q.T), wd.T, s, jnp.ones((H,)), **kw)


def test_gate_up_swiglu_matches_reference_and_llama_swiglu():
    """The MLP's first half (norm folded, fused gate/up, SwiGLU) in float32, bf16 and fp8; its
    output is the fused MLP's activation: down of it is the plain MLP."""
    from pallas_kernels.fused_mlp import gate_up_swiglu, gate_up_swiglu_reference

    kw = dict(eps=EPS, block_f=64, block_k=64, interpret=True)
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):  # bf16: the output rounded
        x, g, wgu, wd = _operands(21, 5, dtype)
        got = gate_up_swiglu(x, g, wgu, **kw)
        assert got.shape == (5, F) and got.dtype == dtype
        ref = gate_up_swiglu_reference(x, g, wgu, eps=EPS)
        assert _rel(got, ref) < tol
        if dtype == jnp.float32:
            assert _rel(np.asarray(got, np.float64) @ np.asarray(wd, np.float64),
                        _plain_mlp(x, g, wgu, wd)) < 1e-5
    x, g, wgu, _ = _operands(22, 3, jnp.bfloat16)
    q, s = quantize_weight_per_channel(wgu)
    got = gate_up_swiglu(x, g, jnp.asarray(q.T), s, **kw)
    assert _rel(got, gate_up_swiglu_reference(x, g, jnp.asarray(q.T), s, eps=EPS,
                                              block_k=64)) < 1e-2
    with pytest.raises(ValueError, match="gu_scale"):
        gate_up_swiglu(x, g, jnp.asarray(q.T), **kw)
    with pytest.raises(ValueError, match="w_gu must be"):
        gate_up_swiglu(x, g, wgu.T, **kw)


@pytest.mark.parametrize("weight_only", ["bfloat16", "float16"])
def test_gate_up_swiglu_weight_only_fp8_matches_reference(weight_only):
    """W8A16 (``weight_only``): e4m3 gate/up weights under x * g rounded to bf16 / float16, no
    activation quantization: against its reference to the output's rounding, against the dense
    first half to the weights' e4m3 error alone (closer than W8A8, which also quantizes x).
    float16 clips x * g to its range instead of overflowing."""
    from pallas_kernels.fused_mlp import gate_up_swiglu, gate_up_swiglu_reference

    kw = dict(eps=EPS, block_f=64, block_k=64, interpret=True)
    x, g, wgu, _ = _operands(23, 6, jnp.bfloat16)
    q, s = quantize_weight_per_channel(wgu)
    wq = jnp.asarray(q.T)
    got = gate_up_swiglu(x, g, wq, s, weight_only=weight_only, **kw)
    assert got.shape == (6, F) and got.dtype == jnp.bfloat16
    ref = gate_up_swiglu_reference(x, g, wq, s, eps=EPS, weight_only=weight_only)
    assert _rel(got, ref) < 1e-2
    dense = gate_up_swiglu_reference(x, g, wgu, eps=EPS)
    w8a8 = gate_up_swiglu_reference(x, g, wq, s, eps=EPS, block_k=64)
    assert _rel(ref, dense) < 0.06 and _rel(ref, dense) < _rel(w8a8, dense)
    if weight_only == "float16":  # a row past float16's range stays finite
        big = x.at[0, 0].set(1e5)
        out = gate_up_swiglu(big, g, wq, s, weight_only=weight_only, **kw)
        assert np.isfinite(np.asarray(out, np.float32)).all()
    with pytest.raises(ValueError, match="weight_only takes"):
        gate_up_swiglu(x, g, wgu, weight_only=weight_only, **kw)  # dense weights
    with pytest.raises(ValueError, match="weight_only takes"):
        gate_up_swiglu(x, g, wq, s, weight_only="float32", **kw)


def test_gate_up_swiglu_blocks_fit_the_shape():
    """The block table's entries for the 8B shape, halved until they divide other shapes (the
    default model's E = 576 takes block_k 64); no block of 16 divides E = 40."""
    from pallas_kernels.fused_mlp import GATE_UP_SWIGLU_BLOCKS, gate_up_swiglu_blocks

    b = gate_up_swiglu_blocks(4096, 14336, fp8=True)
    assert (b["block_f"], b["block_k"], b["num_warps"], b["num_stages"]) == \
        GATE_UP_SWIGLU_BLOCKS["fp8"]
    b = gate_up_swiglu_blocks(576, 1536, fp8=True)
    assert 576 % b["block_k"] == 0 and 1536 % b["block_f"] == 0 and b["block_k"] == 64
    with pytest.raises(ValueError, match="no blocks"):
        gate_up_swiglu_blocks(40, 1536, fp8=False)


def test_gate_up_swiglu_blocks_env_override(monkeypatch):
    from pallas_kernels.fused_mlp import BLOCKS_ENV, gate_up_swiglu_blocks

    monkeypatch.setenv(BLOCKS_ENV, "64,32,8,6")
    assert gate_up_swiglu_blocks(4096, 14336, fp8=False) == dict(
        block_f=64, block_k=32, num_warps=8, num_stages=6)
    monkeypatch.setenv(BLOCKS_ENV, "64,32")
    with pytest.raises(ValueError, match="four integers"):
        gate_up_swiglu_blocks(4096, 14336, fp8=False)


def test_fused_mlp_benchmark_checks_and_times_the_weight_only_mode(tmp_path):
    # benchmarks/gpu/fused_mlp.py --smoke (tiny shapes, interpret mode, host wall time) with
    # --weight-only: the mode's check row matches its reference, the swept tile is timed in both
    # the W8A8 and the weight-only mode, and one round of the table (--rounds 1 with --cands)
    # times XLA, W8A8 and the weight-only variant side by side.
    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "m.jsonl"
    tile = {"block_f": 64, "block_k": 64, "num_warps": 4, "num_stages": 3}
    run = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "gpu" / "fused_mlp.py"), "--smoke",
         "--dtypes", "fp8", "--rounds", "1", "--weight-only", "float16", "--cands",
         json.dumps([tile]), "--out", str(out)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(repo)})
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    (check,) = [r for r in rows if r.get("check") == "gate_up_swiglu_wo_float16"]
    assert check["rel"] < 1e-2
    assert [r["sweep"] for r in rows if "sweep" in r] == [tile, dict(tile, weight_only="float16")]
    timed = {r["variant"]: r["config"] for r in rows if "variant" in r}
    assert timed["gate_up_swiglu_wo_float16+xla_down"] == dict(tile, weight_only="float16")
    assert timed["gate_up_swiglu+xla_down"] == tile and "xla" in timed
