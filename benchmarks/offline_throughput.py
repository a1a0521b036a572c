"""Offline throughput and batch-1 decode latency: jaxllm vs HF transformers, random weights.

Random weights in a real shape (default Llama-3-8B: 32 layers, 4096 hidden, GQA 32/8, vocab
128256) time like real ones. Each engine runs in its own process (JAX preallocates the GPU), so
run the two sides one after the other and compare the JSON lines they print:

    python benchmarks/offline_throughput.py --engine jaxllm  --out results.jsonl
    python benchmarks/offline_throughput.py --engine hf      --out results.jsonl

Workload (the engine issue's): 256 prompts of 512 random tokens, 128 generated tokens each
(ignore_eos, greedy); batch-1 decode ms/token = (time for 1+N tokens - time for 1 token) / N.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def parse_buckets(text: str) -> tuple[int, ...]:
    """A --small-decode-buckets value: '1,2,4' -> (1, 2, 4); 'none' -> ()."""
    return () if text.strip().lower() == "none" else tuple(int(x) for x in text.split(","))


SHAPES = {
    "llama3-8b": dict(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=8192, tie_word_embeddings=False),
    # Llama-3-70B: 80 layers, GQA 64/8; ~141 GB in bf16, so it needs tp >= 2 on H200s.
    "llama3-70b": dict(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=8192,
                       intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                       rope_theta=500000.0, max_position_embeddings=8192,
                       tie_word_embeddings=False),
    # The default model's shape (SmolLM2-135M-Instruct): small enough that its step is bound
    # by the host on a GPU, where multi-step scheduling matters most.
    "smollm2-135m": dict(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                         rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "tiny": dict(architecture="LlamaForCausalLM", vocab_size=1024, hidden_size=128,
                 intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=2048, tie_word_embeddings=False),
    # Gemma 2's switches on the tiny shape (tests/test_gpu_lowering.py: the soft-capped,
    # sliding-window attention and GeGLU through the GPU path).
    "tiny-gemma2": dict(architecture="Gemma2ForCausalLM", vocab_size=1024, hidden_size=128,
                        intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                        rope_theta=10000.0, max_position_embeddings=2048,
                        tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh",
                        norm_weight_offset=1.0, embed_multiplier=128 ** 0.5,
                        sandwich_norms=True, attn_scale=32 ** -0.5, attn_logit_softcap=50.0,
                        final_logit_softcap=30.0, sliding_window=64,
                        sliding_window_layers=(True, False)),
}


def append_jsonl(path, rows) -> None:
    """Appends each row (a dict) as one JSON line to ``path`` (nothing when path is None)."""
    import json

    if path is None:
        return
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def log_engine_startup() -> None:
    """Prints the engine's start-up log lines (pool sizing, compile time, KV pages) to stderr:
    what start-up time goes to."""
    import logging

    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("jaxllm").setLevel(logging.INFO)


def random_model(shape: str, attention: str, *, tokenizer=None, vocab_size: int | None = None,
                 fused: bool = True, quantization: str | None = None,
                 fp8_weight_block: tuple[int, int] | None = None):
    """A LoadedModel-like namespace with random bf16 weights in SHAPES[shape] (no files): what
    every benchmark here runs (random weights in a real shape time like real ones).

    ``fused``: built with q/k/v and gate/up fused (jaxllm/models/fused.py), as the engine serves
    it; built so, not fused by the engine, because the engine leaves a caller's model intact and
    the caller would hold a second copy of the projections. False: separate projections (run
    them with ``EngineConfig(fuse_projections=False)``). ``quantization="fp8"``: quantized here,
    as the engine quantizes at load (W8A8, per-channel weight scales; the bf16 weights are freed
    layer by layer); run it with ``EngineConfig(quantization="fp8")``. ``fp8_weight_block``
    (bn, bk) with it: block-wise scales instead, as a Qwen3-FP8-style checkpoint loads
    (quantized unfused, then fused: the tiles are over each projection's own rows)."""
    import dataclasses
    import types

    import jax.numpy as jnp
    from flax import nnx

    from jaxllm.config import ModelConfig
    from jaxllm.models.registry import get_model_class

    mc = ModelConfig(**SHAPES[shape])
    if vocab_size is not None:
        mc = dataclasses.replace(mc, vocab_size=vocab_size)
    if fp8_weight_block and quantization != "fp8":
        raise ValueError("fp8_weight_block needs quantization='fp8'")
    built = dataclasses.replace(mc, fused_projections=fused and not fp8_weight_block)
    model = get_model_class(mc.architecture)(built, dtype=jnp.bfloat16, rngs=nnx.Rngs(0),
                                            attention_backend=attention)
    if quantization == "fp8":
        from jaxllm.models.fp8 import quantize_model
        from jaxllm.models.fused import fuse_projections

        model = quantize_model(model, fp8_weight_block)
        if fused and fp8_weight_block:
            model = fuse_projections(model, consume=True)
        mc = model.config  # says quantization="fp8", which the engine checks
    elif quantization is not None:
        raise ValueError(f"quantization={quantization!r}: only 'fp8'")
    return types.SimpleNamespace(model_config=mc, model=model, tokenizer=tokenizer,
                                 name=f"random-{shape}")


def fp8_weight_block_arg(text: str) -> tuple[int, int]:
    """argparse type of --fp8-weight-block: "BN,BK" -> (BN, BK)."""
    try:
        bn, bk = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BN,BK (e.g. 128,128), got {text!r}") from None
    return bn, bk


def bench_model(shape: str | None, model: str | None, attention: str = "auto"):
    """(loaded model, its name, on_cpu) for a benchmark's ``--shape`` / ``--model``: random
    weights in SHAPES[shape], else ``model`` loaded ('default' or None: SmolLM2-135M), in
    float32 on a CPU and bf16 on a GPU. ``attention`` "auto": the reference on a CPU, Pallas
    on a GPU."""
    import jax

    on_cpu = jax.default_backend() == "cpu"
    if attention == "auto":
        attention = "reference" if on_cpu else "pallas"
    if shape:
        return random_model(shape, attention), shape, on_cpu
    from jaxllm.loading import load_model

    loaded = load_model(None if model in (None, "default") else model,
                        dtype="float32" if on_cpu else "bfloat16", attention_backend=attention)
    return loaded, loaded.name, on_cpu


def engine_generate(engine, prompts: list[list[int]], max_tokens,
                    phases: dict | None = None) -> tuple[float, int]:
    """Submits every prompt at once (greedy, ignore_eos, no detokenization) and steps the engine
    until all finish: (seconds from the first step to the last, output tokens). ``max_tokens`` is
    one int or one per prompt.

    ``phases`` (a dict, filled in): steps and seconds by kind, "mixed" (the step has a prompt
    chunk) or "decode" (one new token per sequence). A step's seconds are the wall of the
    ``engine.step()`` call that waits for it: with async scheduling that call dispatches the
    next step and reads this one, so the split is the GPU's when the steps are GPU-bound."""
    from jaxllm.sampling_params import RequestOutputKind, SamplingParams

    lengths = max_tokens if isinstance(max_tokens, (list, tuple)) else [max_tokens] * len(prompts)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)
        engine.add_request(f"r{time.perf_counter_ns()}-{i}", {"prompt_token_ids": p}, params)
    t = time.perf_counter()
    n_out = 0
    pending: list[str] = []  # kinds of the dispatched steps not read yet, oldest first
    if phases is not None:
        dispatch = engine._dispatch
        own = "_dispatch" in vars(engine)  # an instance attribute already (else the class's)

        def recording_dispatch(sched, *args):
            mixed = any(s.num_new_tokens > 1 for s in sched.scheduled)
            pending.append("mixed" if mixed else "decode")
            return dispatch(sched, *args)

        engine._dispatch = recording_dispatch
    t_step = t
    try:
        while engine.has_unfinished_requests():
            for o in engine.step():
                n_out += len(o.outputs[0].token_ids)
            if phases is None:
                continue
            now = time.perf_counter()
            # This call read the oldest step in flight (or, synchronous, the one it dispatched).
            if pending and (len(pending) > 1 or not engine.async_scheduling
                            or not engine.has_unfinished_requests()):
                kind = pending.pop(0)
                phases[f"{kind}_steps"] = phases.get(f"{kind}_steps", 0) + 1
                phases[f"{kind}_s"] = phases.get(f"{kind}_s", 0.0) + now - t_step
            t_step = now
    finally:
        if phases is not None:
            if own:
                engine._dispatch = dispatch
            else:
                del engine._dispatch  # back to the class's method
    return time.perf_counter() - t, n_out


def hf_llama_config(shape: str, max_position_embeddings: int | None = None, **kw):
    """transformers' LlamaConfig of SHAPES[shape] (its context raised to at least
    ``max_position_embeddings``; ``kw`` passed on)."""
    from transformers import LlamaConfig

    s = SHAPES[shape]
    return LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                       intermediate_size=s["intermediate_size"],
                       num_hidden_layers=s["num_hidden_layers"],
                       num_attention_heads=s["num_attention_heads"],
                       num_key_value_heads=s["num_key_value_heads"], head_dim=s["head_dim"],
                       rms_norm_eps=s["rms_norm_eps"], rope_theta=s["rope_theta"],
                       max_position_embeddings=max(s["max_position_embeddings"],
                                                   max_position_embeddings or 0), **kw)


def hf_random_model(shape: str, max_position_embeddings: int | None = None):
    """HF transformers' LlamaForCausalLM with random bf16 weights in SHAPES[shape], on CUDA."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = hf_llama_config(shape, max_position_embeddings)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def _prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=(n, length)).tolist()


def run_jaxllm(args) -> dict:
    import jax
    from flax import nnx

    from jaxllm.config import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine
    t0 = time.perf_counter()
    loaded = random_model(args.shape, args.attention)
    mc = loaded.model_config
    jax.block_until_ready(nnx.state(loaded.model))
    init_s = time.perf_counter() - t0
    max_len = max(args.input_len + args.output_len, args.decode_context + args.decode_tokens + 1)
    cfg = EngineConfig(model=None, dtype="bfloat16", max_model_len=max_len,
                       max_num_seqs=args.num_prompts,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       token_buckets=tuple(sorted({8, args.num_prompts,
                                                   args.max_num_batched_tokens})),
                       enable_prefix_caching=False, gpu_memory_utilization=0.9)
    t0 = time.perf_counter()
    engine = LLMEngine(cfg, loaded=loaded)
    start_s = time.perf_counter() - t0

    def generate(prompts, max_tokens):
        return engine_generate(engine, prompts, max_tokens)

    prompts = _prompts(args.num_prompts, args.input_len, mc.vocab_size)
    generate(prompts[:8], 4)  # warm-up (all buckets are compiled already)
    runs = [generate(prompts, args.output_len) for _ in range(args.repeats)]
    secs = statistics.median(r[0] for r in runs)
    n_out = runs[0][1]
    one = _prompts(1, args.decode_context, mc.vocab_size, seed=1)
    lat = []
    for _ in range(args.repeats):
        t1, _ = generate(one, 1)
        tn, _ = generate(one, 1 + args.decode_tokens)
        lat.append((tn - t1) / args.decode_tokens * 1e3)
    return dict(engine=f"jaxllm ({args.attention} attention)", shape=args.shape, device=jax.devices()[0].device_kind,
                num_prompts=args.num_prompts, input_len=args.input_len,
                output_len=args.output_len, seconds=secs,
                output_tok_s=n_out / secs,
                total_tok_s=(n_out + args.num_prompts * args.input_len) / secs,
                decode_ms_per_token_b1=statistics.median(lat), init_s=init_s,
                startup_s=start_s, num_pages=engine.page_pool.num_usable_pages,
                host_ms_per_step=engine.runner.last_host_time * 1e3)


def run_hf(args) -> dict:
    import torch

    s = SHAPES[args.shape]
    model = hf_random_model(args.shape)

    def generate(prompts, max_tokens, batch):
        torch.cuda.synchronize()
        t = time.perf_counter()
        n_out = 0
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i:i + batch], device="cuda")
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                     do_sample=False, pad_token_id=0)
            n_out += (out.shape[1] - ids.shape[1]) * ids.shape[0]
        torch.cuda.synchronize()
        return time.perf_counter() - t, n_out

    prompts = _prompts(args.num_prompts, args.input_len, s["vocab_size"])
    generate(prompts[:2], 4, 2)
    runs = [generate(prompts, args.output_len, args.hf_batch) for _ in range(args.repeats)]
    secs = statistics.median(r[0] for r in runs)
    n_out = runs[0][1]
    one = _prompts(1, args.decode_context, s["vocab_size"], seed=1)
    lat = []
    for _ in range(args.repeats):
        t1, _ = generate(one, 1, 1)
        tn, _ = generate(one, 1 + args.decode_tokens, 1)
        lat.append((tn - t1) / args.decode_tokens * 1e3)
    return dict(engine="hf-transformers", shape=args.shape,
                device=torch.cuda.get_device_name(), num_prompts=args.num_prompts,
                input_len=args.input_len, output_len=args.output_len, seconds=secs,
                output_tok_s=n_out / secs,
                total_tok_s=(n_out + args.num_prompts * args.input_len) / secs,
                decode_ms_per_token_b1=statistics.median(lat), hf_batch=args.hf_batch)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--engine", choices=["jaxllm", "hf"], required=True)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--attention", default="pallas", choices=["reference", "pallas"])
    p.add_argument("--hf-batch", type=int, default=64, help="HF generate batch size")
    p.add_argument("--decode-context", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    res = run_jaxllm(args) if args.engine == "jaxllm" else run_hf(args)
    line = json.dumps(res)
    print(line, flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
