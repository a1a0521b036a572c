"""The engine's GPU step programs lower for Hopper on a machine without a GPU.

CI has no GPU: the Pallas kernels run there through the interpreter (``interpret=True``), which
checks their math but not their Triton lowering, and the model's GPU-only paths (the fused MLP
kernel at <= 8 rows, fp8 KV pages read by the kernel) are not taken at all. Here the engine is
built on the CPU, then its step programs are traced again as on a GPU (``jax.default_backend``
reads "gpu") and lowered for CUDA against an abstract H100 (``jax.sharding.AbstractDevice``):
every kernel of the GPU path goes through the Pallas Triton lowering, so a kernel that no
longer lowers (an op Triton lacks, a block shape it refuses) fails here, not on the device.
Compiling the Triton IR to PTX happens in XLA's GPU backend and is not covered.
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

TRITON_CALL = "__gpu$xla.gpu.triton"


def _spec(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


@pytest.mark.parametrize("quantization,kv_cache_dtype", [(None, "auto"), ("fp8", "fp8")])
def test_engine_step_programs_lower_for_hopper_through_the_pallas_kernels(
        monkeypatch, quantization, kv_cache_dtype):
    from jax.sharding import AbstractDevice, AbstractMesh
    from offline_throughput import random_model

    from jaxllm.config import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(
        dtype="bfloat16", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
        enable_prefix_caching=False, quantization=quantization, kv_cache_dtype=kv_cache_dtype,
        num_scheduler_steps=2), loaded=random_model("tiny", "pallas", quantization=quantization))
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
    if quantization is None:  # bf16 at <= 8 rows: the MLP's norm, gate/up and SwiGLU kernel
        assert "gate_up_swiglu" in texts[("forward", 8, True)]
