"""LoRA adapters' cost: decode ms/token with and without them, in one process.

Two engines over one loaded model (the same base weights, each with its own small KV pool):
``plain`` (enable_lora off) and ``lora`` (enable_lora, ``--max-loras`` slots of rank
``--max-lora-rank``). Random PEFT-format adapters of rank ``--rank`` on every projection
(q/k/v/o, gate/up/down) are written to a temporary folder and read as any adapter is. Rows,
each at ``--batch`` sequences of prompt length ``--context``, greedy:
  plain        the engine without LoRA
  lora, base   the LoRA engine, no request naming an adapter: with specialize_lora (the
               default) its steps run the programs without the LoRA path; with
               ``--no-specialize-lora`` the LoRA path's cost alone
  lora, 1      every request under one adapter
  lora, mixed  the requests spread over max_loras adapters (one step serves them all)

``--impl`` times other formulations of the delta beside the engine's (``flat``), each in its
own LoRA engine over the same slots (a benchmark-only A/B: ``IMPLS``).

decode ms/token = (time(1 + N tokens) - time(1 token)) / N, median of ``--repeats``: the
time of a decode step (all ``--batch`` sequences advance one token).

    python benchmarks/lora.py --shape llama3-8b --batch 1 32        # GPU, random 8B weights
    python benchmarks/lora.py --model default --context 32 --tokens 8 --repeats 1  # CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import append_jsonl, bench_model  # noqa: E402
from spec_decode import ms_per_token  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_adapter(folder: Path, config, rank: int, seed: int) -> None:
    """A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) for
    ``config``'s model: rank ``rank`` on every projection, weights of a size that changes the
    outputs (the timing does not depend on the values)."""
    import numpy as np
    from safetensors.numpy import save_file

    from jaxllm.lora.peft import target_dims

    rng = np.random.default_rng(seed)
    dims = target_dims(config)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module in TARGETS:
            block = "self_attn" if module in TARGETS[:4] else "mlp"
            d_in, d_out = dims[module]
            key = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, d_in)) /
                                               np.sqrt(d_in)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((d_out, rank)) *
                                               0.01).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules":
        list(TARGETS), "bias": "none", "lora_dropout": 0.0, "use_rslora": False,
        "use_dora": False, "modules_to_save": None}))


def _impls():
    """Formulations of ``LoraPair.__call__`` over its stored slots (a [I, L, R], b [L, R, O]);
    ``flat`` is the engine's own."""
    import jax.numpy as jnp

    from jaxllm.lora.layers import LoraPair

    def slots_mask(slots, L):
        return (slots[:, None] == jnp.arange(L, dtype=slots.dtype))[:, :, None]  # [T, L, 1]

    def einsum32(self, x, slots):  # the first form: 3-D shrink, float32 expand
        a, b = self.a[...], self.b[...]
        xa = jnp.einsum("ti,ilr->tlr", x, a, preferred_element_type=jnp.float32)
        xa = jnp.where(slots_mask(slots, a.shape[1]), xa, 0.0)
        return jnp.einsum("tlr,lro->to", xa, b.astype(jnp.float32)).astype(x.dtype)

    def einsum16(self, x, slots):  # 3-D shrink, expand in x's dtype
        a, b = self.a[...], self.b[...]
        xa = jnp.einsum("ti,ilr->tlr", x, a, preferred_element_type=jnp.float32)
        xa = jnp.where(slots_mask(slots, a.shape[1]), xa, 0.0).astype(x.dtype)
        return jnp.einsum("tlr,lro->to", xa, b,
                          preferred_element_type=jnp.float32).astype(x.dtype)

    def flat32(self, x, slots):  # 2-D shrink, float32 expand
        a, b = self.a[...], self.b[...]
        I, L, R = a.shape
        xa = jnp.dot(x, a.reshape(I, L * R), preferred_element_type=jnp.float32)
        xa = jnp.where(slots[:, None] == jnp.arange(L * R, dtype=slots.dtype) // R, xa, 0.0)
        return jnp.dot(xa, b.reshape(L * R, -1).astype(jnp.float32)).astype(x.dtype)

    return {"flat": LoraPair.__call__, "einsum32": einsum32, "einsum16": einsum16,
            "flat32": flat32}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default=None, help="random weights in this shape (e.g. llama3-8b)")
    ap.add_argument("--model", default=None, help="a model to load ('default': SmolLM2-135M)")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens timed (N)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16, help="the adapters' rank")
    ap.add_argument("--max-loras", type=int, default=4)
    ap.add_argument("--max-lora-rank", type=int, default=16)
    ap.add_argument("--specialize-lora", action=argparse.BooleanOptionalAction, default=True,
                    help="the LoRA engine's specialize_lora (default on, as the engine's)")
    ap.add_argument("--impl", nargs="+", default=["flat"],
                    help="formulations of the delta to time (" + " ".join(_impls()) + ")")
    ap.add_argument("--out", default=None, help="append JSON rows here")
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    from jaxllm.config import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine
    from jaxllm.lora import LoRARequest

    loaded, name, on_cpu = bench_model(args.shape, args.model, args.attention)
    mc = loaded.model_config
    tmp = Path(tempfile.mkdtemp(prefix="jaxllm-lora-bench-"))
    requests = []
    for i in range(args.max_loras):
        write_random_adapter(tmp / f"a{i}", mc, args.rank, seed=i)
        requests.append(LoRARequest(f"a{i}", i + 1, str(tmp / f"a{i}")))

    B = max(args.batch)
    max_len = args.context + args.tokens + 16
    page_size = 16
    # token buckets: the decode steps' (8 up to 2 x the batch) and one for the prompt
    buckets = tuple(b for b in (8, 16, 32, 64, 128, 256) if b == 8 or b < 2 * B) + (
        max(256, args.context),)
    base = dict(model=None, dtype="float32" if on_cpu else "bfloat16", max_model_len=max_len,
                max_num_seqs=max(8, B), num_pages=B * (max_len // page_size + 2) + 8,
                page_size=page_size, enable_prefix_caching=False,
                max_num_batched_tokens=max(256, args.context), token_buckets=buckets)
    from jaxllm.lora.layers import LoraPair

    impls, flat = _impls(), LoraPair.__call__
    plain = LLMEngine(EngineConfig(**base), loaded=loaded)
    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(0, mc.vocab_size, size=(b, args.context)).tolist()
               for b in args.batch}
    rows = []

    def time_case(label, engine, b, loras, impl="-"):
        ms = ms_per_token(engine, prompts[b], args.tokens, args.repeats, loras=loras)
        rows.append(dict(bench="lora", model=name, case=label, impl=impl, batch=b,
                         context=args.context, tokens=args.tokens, rank=args.rank,
                         max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                         specialize_lora=args.specialize_lora,
                         adapters=len({x.lora_int_id for x in loras if x is not None}),
                         device=jax.devices()[0].device_kind, ms_per_token=ms,
                         date=time.strftime("%Y-%m-%d %H:%M")))

    for b in args.batch:
        time_case("plain", plain, b, [None] * b)
    for impl in args.impl:
        LoraPair.__call__ = impls[impl]  # traced by this engine's programs (compiled at start)
        lora = LLMEngine(EngineConfig(**base, enable_lora=True, max_loras=args.max_loras,
                                      max_lora_rank=args.max_lora_rank,
                                      specialize_lora=args.specialize_lora), loaded=loaded)
        for b in args.batch:
            time_case("lora, base", lora, b, [None] * b, impl)
            time_case("lora, 1", lora, b, [requests[0]] * b, impl)
            if b > 1:
                time_case("lora, mixed", lora, b, [requests[i % len(requests)]
                                                   for i in range(b)], impl)
        del lora
        LoraPair.__call__ = flat
    if len(args.impl) > 1:  # the plain engine again: drift over the run
        for b in args.batch:
            time_case("plain", plain, b, [None] * b)
    first = {r["batch"]: r["ms_per_token"] for r in reversed(rows) if r["case"] == "plain"}
    print(f"{'case':>12} {'impl':>9} {'batch':>5} {'adapters':>8} {'ms/step':>8} {'vs plain':>8}")
    for r in rows:
        print(f"{r['case']:>12} {r['impl']:>9} {r['batch']:>5} {r['adapters']:>8} "
              f"{r['ms_per_token']:>8.2f} {r['ms_per_token'] / first[r['batch']]:>7.2f}x")
    append_jsonl(args.out, rows)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
