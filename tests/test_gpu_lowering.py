"""The engine's GPU step programs lower for Hopper on a machine without a GPU.

CI has no GPU: the Pallas kernels run there through the interpreter (``interpret=True``), which
checks their math but not their Triton lowering, and the model's GPU-only paths (the fused MLP
kernel at <= 8 rows, fp8 KV pages read by the kernel) are not taken at all. Here the engine is
built on the CPU, then its step programs are traced again as on a GPU (``jax.default_backend``
reads "gpu") and lowered for CUDA against an abstract H100 (``jax.sharding.AbstractDevice``):
every kernel of the GPU path goes through the Pallas Triton lowering, so a kernel that no
longer lowers (an op Triton lacks, a block shape it refuses) fails here, not on the device.
The kernels outside the engine's default path are lowered the same way, one call each at its
GPU test's shape and config. Compiling the Triton IR to PTX happens in XLA's GPU backend and is
not covered (nor is shared-memory fit, which only the compile checks).
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

TRITON_CALL = "__gpu$xla.gpu.triton"
PREFETCH_ASM = "cp.async.bulk.prefetch.L2.global"  # pallas_kernels/l2_prefetch.py


def _spec(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


@pytest.mark.parametrize("shape,quantization,kv_cache_dtype,knobs", [
    ("tiny", None, "auto", ""), ("tiny", "fp8", "fp8", ""), ("tiny-gemma2", None, "auto", ""),
    ("tiny", "fp8", "auto", '{"l2_prefetch_o": "start"}')])
def test_engine_step_programs_lower_for_hopper_through_the_pallas_kernels(
        monkeypatch, shape, quantization, kv_cache_dtype, knobs):
    from jax.sharding import AbstractDevice, AbstractMesh
    from offline_throughput import random_model

    from jaxllm.config import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine
    from jaxllm.models.attention import ATTENTION_KNOBS_ENV

    monkeypatch.setenv(ATTENTION_KNOBS_ENV, knobs)

    engine = LLMEngine(EngineConfig(
        dtype="bfloat16", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
        enable_prefix_caching=False, quantization=quantization, kv_cache_dtype=kv_cache_dtype,
        num_scheduler_steps=2), loaded=random_model(shape, "pallas", quantization=quantization))
    runner = engine.runner
    h100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = AbstractMesh((1,), ("x",), abstract_device=h100)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    runner.state = runner.state  # fresh jits: the programs are traced anew, on the GPU path

    def lower(fn, *args):
        with jax.sharding.use_abstract_mesh(mesh):
            return fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    texts = {}
    for T, decode_only in runner.step_variants():
        fwd_in, _ = runner._device_inputs(runner.prepare([], [], T=T, decode_only=decode_only))
        texts[("forward", T, decode_only)] = lower(
            runner.forward_for(T), _spec(runner._leaves), _spec(runner.kv_caches),
            _spec(fwd_in), _spec(runner._prev_tokens))
    for T, sort in runner.multi_step_variants():
        fwd_in, samp_in = runner._device_inputs(runner.prepare([], [], T=T, decode_only=True))
        texts[("multi", T, sort)] = lower(
            runner.multi_step_for(T), runner.num_scheduler_steps, _spec(runner._leaves),
            _spec(runner.kv_caches), _spec(fwd_in), _spec(runner._prev_tokens), _spec(samp_in),
            sort)
    assert any(k[0] == "multi" for k in texts) and len(texts) >= 4, sorted(texts)
    # Every program attends through the Triton kernel, not the interpreter's HLO.
    for key, text in texts.items():
        assert TRITON_CALL in text and "ragged_paged_attention" in text, key
    # The l2_prefetch_o knob: the decode kernel of the rope path (the decode-only steps)
    # streams the o weight into the L2; nowhere without it.
    prefetching = {k for k, t in texts.items() if PREFETCH_ASM in t}
    if knobs:
        assert prefetching == {k for k in texts if k[0] == "multi" or k[2]}, sorted(texts)
    else:
        assert not prefetching
    if shape == "tiny-gemma2":  # GeGLU and (1 + w) norms: XLA's MLP, not the SwiGLU kernel
        assert not any("gate_up_swiglu" in t for t in texts.values())
    elif quantization is None:  # bf16 at <= 8 rows: the MLP's norm, gate/up and SwiGLU kernel
        assert "gate_up_swiglu" in texts[("forward", 8, True)]


def _kernel_calls():
    """(id, function, argument specs) of the Pallas kernels outside the engine's default GPU
    path, at the Llama-3-8B shapes and configs their GPU tests (tests/test_gpu.py) compile."""
    import functools

    import jax.numpy as jnp

    from jaxllm.models.fp8 import SWIGLU_TILE
    from pallas_kernels import fp8_matmul as fm
    from pallas_kernels import fused_mlp as mlp
    from pallas_kernels import silu_mul_quant as smq
    from pallas_kernels import skinny_matmul as sk

    S, bf16, e4m3, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float8_e4m3fn, jnp.float32
    E, F, Q = 4096, 14336, 6144
    p = functools.partial
    calls = [
        ("fp8_matmul", p(fm.fp8_matmul, out_dtype=f32, w_transposed=True, block_m=16, split_k=4),
         (S((40, 1000), e4m3), S((40,), f32), S((384, 1000), e4m3), S((384,), f32))),
        ("skinny_bf16_split_k", p(sk.skinny_matmul, w_layout="kn", block_n=64, block_k=256,
                                  split_k=4, num_stages=3), (S((8, E), bf16), S((E, Q), bf16))),
        ("skinny_w8a16", p(sk.skinny_matmul, block_n=32, block_k=128),
         (S((8, E), bf16), S((Q, E), e4m3), S((Q,), f32))),
        ("skinny_w8a8", p(sk.skinny_matmul, block_n=32, block_k=128),
         (S((8, E), e4m3), S((Q, E), e4m3), S((Q,), f32), S((8,), f32))),
        ("skinny_residual", p(sk.skinny_matmul, w_layout="kn", split_k=1, **dict(zip(
            ("block_n", "block_k", "num_warps", "num_stages"), sk.RESIDUAL_GEMM_BLOCKS))),
         (S((8, E), bf16), S((E, E), bf16), None, None, S((8, E), bf16))),
        ("fused_mlp_fp8", p(mlp.fused_mlp, eps=1e-5, accumulate="partials"),
         (S((8, E), bf16), S((E,), bf16), S((2 * F, E), e4m3), S((E, F), e4m3),
          S((2 * F,), f32), S((E,), f32))),
        ("silu_mul_quant", p(smq.silu_mul_quant, **dict(zip(
            ("rows", "chunk", "num_warps", "num_stages"), SWIGLU_TILE))),
         (S((1024, 2 * F), bf16), S((1024,), f32), S((2 * F,), f32))),
    ]
    for wo in (None, "float16"):
        calls.append((f"gate_up_swiglu_fp8_{wo}", p(
            mlp.gate_up_swiglu, eps=1e-5, weight_only=wo,
            **mlp.gate_up_swiglu_blocks(E, F, fp8=True)),
            (S((8, E), bf16), S((E,), bf16), S((2 * F, E), e4m3), S((2 * F,), f32))))
    return calls


def test_standalone_pallas_kernels_lower_for_hopper():
    # The kernels the engine does not call by default (benchmarked, GPU-tested on the device
    # machine): each lowers through Triton for an abstract H100 at its GPU test's config.
    from jax.sharding import AbstractDevice, AbstractMesh

    h100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = AbstractMesh((1,), ("x",), abstract_device=h100)
    failed = {}
    for name, fn, args in _kernel_calls():
        try:
            with jax.sharding.use_abstract_mesh(mesh):
                text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            assert TRITON_CALL in text, "no Triton call"
        except Exception as e:  # collect all, then fail with every kernel that did not lower
            failed[name] = f"{type(e).__name__}: {str(e)[:200]}"
    assert not failed, failed


def test_mosaic_block_fp8_kernel_lowers_for_hopper_at_the_8b_shapes():
    # pallas_kernels/fp8_block_mgpu.py (Mosaic GPU: TMA, fp8 wgmma) at the Llama-3-8B
    # projections and the tiles its benchmark sweeps: each lowers to one Mosaic GPU call for an
    # abstract H100 (its math is checked by the interpreter in test_pallas_kernels.py, its
    # compile and speed on the GPU).
    import functools
    import re

    import jax.numpy as jnp
    from jax.sharding import AbstractDevice, AbstractMesh

    from pallas_kernels.fp8_block_mgpu import DEFAULT_TILE, fp8_block_matmul_mgpu

    S, e4m3, f32 = jax.ShapeDtypeStruct, jnp.float8_e4m3fn, jnp.float32
    h100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = AbstractMesh((1,), ("x",), abstract_device=h100)
    for (M, K, N), (tm, steps, k_blocks, group_m, cluster_m) in zip(
            [(1024, 4096, 6144), (256, 14336, 4096), (72, 4096, 28672), (1024, 4096, 4096),
             (16384, 4096, 28672), (4096, 4096, 4096)],
            [DEFAULT_TILE, (64, 6, 1, 0, 1), (32, 8, 1, 0, 1), (128, 2, 2, 0, 1),
             (128, 4, 1, 8, 2), (128, 2, 2, 16, 1)]):
        fn = jax.jit(functools.partial(fp8_block_matmul_mgpu, tile_m=tm, steps=steps,
                                       k_blocks=k_blocks, group_m=group_m,
                                       cluster_m=cluster_m, num_sms=132))
        with jax.sharding.use_abstract_mesh(mesh):
            text = fn.trace(S((M, K), e4m3), S((M, K // 128), f32), S((N, K), e4m3),
                            S((N, K // 128), f32)).lower(lowering_platforms=("cuda",)).as_text()
        assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 1, (M, K, N)



def test_mosaic_skinny_fp8_kernel_lowers_for_hopper_at_the_8b_shapes():
    # pallas_kernels/fp8_skinny_mgpu.py (Mosaic GPU: TMA, fp8 wgmma; the engine's per-channel
    # W8A8 projections of <= 64 rows on Hopper) at the Llama-3-8B projections, the rows the
    # engine's buckets and issue 5's table take, and every tile of its sweep: one Mosaic GPU
    # call each, no pad or slice around it at M = 1 (the rows past M are TMA's out-of-bounds).
    import functools
    import re

    import jax.numpy as jnp
    from jax.sharding import AbstractDevice, AbstractMesh

    from pallas_kernels.fp8_skinny_mgpu import TILES, fp8_skinny_matmul_mgpu

    S, e4m3, f32 = jax.ShapeDtypeStruct, jnp.float8_e4m3fn, jnp.float32
    h100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = AbstractMesh((1,), ("x",), abstract_device=h100)
    for (K, N), M, (tile_k, steps) in zip(
            [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)] * 2,
            [1, 8, 16, 64, 64, 1, 8, 16], TILES * 2):
        fn = jax.jit(functools.partial(fp8_skinny_matmul_mgpu, tile_k=tile_k, steps=steps))
        with jax.sharding.use_abstract_mesh(mesh):
            text = fn.trace(S((M, K), e4m3), S((M,), f32), S((N, K), e4m3),
                            S((N,), f32)).lower(lowering_platforms=("cuda",)).as_text()
        assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 1, (M, K, N)
        assert "stablehlo.pad" not in text and "stablehlo.slice" not in text, (M, K, N)
        if M > 16:
            continue
        # Weight-only: bf16 rows, the e4m3 chunks upcast in registers (through float16), by
        # one compute warpgroup or by as many as the step's 128-wide chunks allow (up to 2),
        # the residual added in the epilogue: still one Mosaic call and no add around it.
        wgs = min(2, tile_k // 128)
        fn = jax.jit(lambda x, w, s, r, tile_k=tile_k, steps=steps, wgs=wgs:
                     (fp8_skinny_matmul_mgpu(x, None, w, s, tile_k=tile_k, steps=steps),
                      fp8_skinny_matmul_mgpu(x, None, w, s, tile_k=tile_k, steps=steps,
                                             compute_wgs=wgs, residual=r)))
        with jax.sharding.use_abstract_mesh(mesh):
            text = fn.trace(S((M, K), jnp.bfloat16), S((N, K), e4m3), S((N,), f32),
                            S((M, N), jnp.bfloat16)).lower(
                                lowering_platforms=("cuda",)).as_text()
        assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 2, (M, K, N, "w8a16")
        assert "stablehlo.add" not in text, (M, K, N, "w8a16")
        # The rows quantized in the kernel (quantize_x): one Mosaic call, no quantization
        # (no reduce) or add around it.
        fn = jax.jit(lambda x, w, s, r, tile_k=tile_k, steps=steps:
                     fp8_skinny_matmul_mgpu(x, None, w, s, tile_k=tile_k, steps=steps,
                                            quantize_x=True, residual=r))
        with jax.sharding.use_abstract_mesh(mesh):
            text = fn.trace(S((M, K), jnp.bfloat16), S((N, K), e4m3), S((N,), f32),
                            S((M, N), jnp.bfloat16)).lower(
                                lowering_platforms=("cuda",)).as_text()
        assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 1, (M, K, N, "qx")
        assert "stablehlo.add" not in text and "stablehlo.reduce" not in text, (M, K, N, "qx")


def test_mosaic_fp8_mlp_kernel_lowers_for_hopper_at_the_8b_shapes():
    # pallas_kernels/fp8_mlp_mgpu.py (Mosaic GPU: two TMA rings, fp8 wgmma, TMA reductions
    # into the output) at the Llama-3-8B MLP and 1, 8 and 16 rows, both forms of its down
    # GEMM: one Mosaic GPU call each.
    import functools
    import re

    import jax.numpy as jnp
    from jax.sharding import AbstractDevice, AbstractMesh

    from pallas_kernels.fp8_mlp_mgpu import fp8_mlp_mgpu

    S, e4m3, f32 = jax.ShapeDtypeStruct, jnp.float8_e4m3fn, jnp.float32
    h100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = AbstractMesh((1,), ("x",), abstract_device=h100)
    H, F = 4096, 14336
    for M, down_t in ((1, False), (8, False), (16, False), (1, True), (16, True)):
        with jax.sharding.use_abstract_mesh(mesh):
            text = jax.jit(functools.partial(fp8_mlp_mgpu, down_t=down_t)).trace(
                S((M, H), jnp.bfloat16), S((F, 2, H), e4m3), S((F,), f32), S((F,), f32),
                S((H, F), e4m3), S((H,), f32), S((M, H), f32)).lower(
                    lowering_platforms=("cuda",)).as_text()
        assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 1, (M, down_t)
