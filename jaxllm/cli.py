"""Command line: ``jaxllm generate`` (a quick try) and, with the server, ``jaxllm serve``."""

from __future__ import annotations

import argparse
import decimal
import json
import logging
import os
import sys
from pathlib import Path

from jaxllm.config import KV_CACHE_DTYPES, LOGPROBS_MODES, QUANTIZATION_METHODS

# Where `jaxllm` keeps compiled step programs between runs (XLA's persistent compilation cache).
DEFAULT_COMPILATION_CACHE_DIR = os.environ.get(
    "JAXLLM_COMPILATION_CACHE_DIR", str(Path.home() / ".cache" / "jaxllm" / "xla"))


_DECIMAL = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9}
_BINARY = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}


def human_readable_int(text: str) -> int:
    """vLLM's lengths on the command line: an integer, or a number with a suffix, k / m / g
    decimal (25.6k = 25,600) and K / M / G binary (32K = 32,768, whole numbers only)."""
    t = text.strip()
    try:
        if t[-1:] in _DECIMAL:
            value = decimal.Decimal(t[:-1]) * _DECIMAL[t[-1]]
            if not value.is_finite() or value != value.to_integral_value():
                raise ValueError
            return int(value)
        if t[-1:] in _BINARY:
            return int(t[:-1]) * _BINARY[t[-1]]
        return int(t)
    except (ValueError, decimal.InvalidOperation):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number of tokens (e.g. 8192, 8k = 8000, 8K = 8192, "
            "25.6k = 25600)") from None


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags with vLLM's names (``--max-model-len``, ``--page-size`` = vLLM's block size)."""
    p.add_argument("--tokenizer", default=None,
                   help="another tokenizer (an HF folder or .gguf) than the model's own")
    p.add_argument("--chat-template", default=None,
                   help="a chat template to use instead of the tokenizer's: a file's path, or "
                        "the Jinja template itself")
    p.add_argument("--max-logprobs", type=int, default=20,
                   help="the most log-probs a request may ask for (logprobs, top_logprobs)")
    p.add_argument("--logprobs-mode", default="raw_logprobs", choices=LOGPROBS_MODES,
                   help="what sampled tokens' log-probs are, as vLLM's: the model's own "
                        "(raw_logprobs, the default; raw_logits), or those of the "
                        "distribution each token was drawn from after penalties, temperature, "
                        "min_p, top-k and top-p (processed_logprobs, processed_logits)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="orbax cache of the converted params (restored if present, else written)")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU) | bfloat16 | float16 | float32")
    p.add_argument("--max-model-len", type=human_readable_int, default=None,
                   help="context length in tokens (default: the model's); as vLLM, 32k = "
                        "32000 and 32K = 32768")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="default: vLLM's for the device (1024 on an H100/H200, 256 on smaller "
                        "GPUs and the CPU)")
    p.add_argument("--max-num-batched-tokens", type=human_readable_int, default=None,
                   help="tokens per step; default: vLLM's for the device (8192 for the server "
                        "on an H100/H200, 2048 on smaller GPUs, 1024 on the CPU)")
    p.add_argument("--page-size", "--block-size", type=int, default=16,
                   help="tokens a KV page holds (--block-size: vLLM's name)")
    p.add_argument("--num-pages", "--num-gpu-blocks-override", type=int, default=None,
                   help="KV pages in the pool (default: sized from --gpu-memory-utilization; "
                        "--num-gpu-blocks-override: vLLM's name)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="accepted so vLLM command lines run; no effect: jaxllm builds each "
                        "architecture itself and runs no code from a checkpoint")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="independent engine replicas, each on tp x pp devices")
    p.add_argument("--quantization", "-q", default=None,
                   choices=[m for m in QUANTIZATION_METHODS if m],
                   help="fp8: e4m3 attention/MLP weights (per-channel scales) and per-token "
                        "activations, quantized at load; pre-quantized fp8 checkpoints are "
                        "detected from config.json without this flag (compressed-tensors, "
                        "modelopt: load a checkpoint of that format, refuse any other)")
    p.add_argument("--calculate-kv-scales", action="store_true",
                   help="with an fp8 KV cache: per-layer K/V scales computed at start-up "
                        "(max |k| / 200, max |v| / 100 over a calibration text) instead of "
                        "the checkpoint's or 1.0")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="fp8 (= fp8_e4m3): e4m3 KV pages, about twice the pages in the same "
                        "memory; fp8_e5m2: e5m2 pages (wider range, less precision)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="schedule step k+1 while step k runs on the device (default on)")
    p.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                   help="priority: requests with a lower 'priority' value are served first "
                        "(and preempted last), as vLLM's (default fcfs)")
    p.add_argument("--enable-sleep-mode", action="store_true",
                   help="let sleep / wake_up free and restore the weights' and KV cache's "
                        "device memory (vLLM's; the server's /sleep and /wake_up routes need "
                        "JAXLLM_SERVER_DEV_MODE=1)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="compile the step programs without XLA's command buffers (its CUDA "
                        "graphs): every kernel launched on its own, as vLLM's --enforce-eager")
    p.add_argument("--num-scheduler-steps", type=int, default=1,
                   help="decode steps run in one device program for a batch of pure decodes "
                        "(vLLM's multi-step scheduling): less host work per token (default 1)")
    p.add_argument("--generation-config", default="auto",
                   help="auto: the model's generation_config.json gives the sampling defaults; "
                        "vllm: neutral defaults; or a folder holding a generation_config.json")
    p.add_argument("--override-generation-config", type=_json_object, default=None,
                   help='JSON of generation config fields that win over the file\'s, e.g. '
                        '\'{"temperature": 0.5}\'')
    p.add_argument("--runner", default="auto", choices=["auto", "generate", "pooling"],
                   help="pooling: an embedding model (LLM.embed, /v1/embeddings) that generates "
                        "nothing, as vLLM's --runner pooling (auto: generate)")
    p.add_argument("--pooler-config", type=_json_object, default=None,
                   help='the pooling runner\'s JSON, vLLM\'s: {"pooling_type": "LAST" | "MEAN" '
                        '| "CLS", "normalize": true}')
    p.add_argument("--structured-outputs-config", type=_json_object, default=None,
                   help='JSON, vLLM\'s: {"backend": "auto" | "guidance", '
                        '"disable_any_whitespace": bool, "disable_additional_properties": bool, '
                        '"reasoning_parser": "deepseek_r1" | "qwen3", "enable_in_reasoning": '
                        'bool}')
    p.add_argument("--speculative-config", type=_json_object, default=None,
                   help='JSON, vLLM\'s: {"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_max": 5, "prompt_lookup_min": 2, '
                        '"disable_by_batch_size": 32} (n-gram drafts from the prompt and '
                        'output, verified in one step)')
    lora = p.add_argument_group("LoRA adapters (vLLM's flags; jaxllm/lora)")
    lora.add_argument("--enable-lora", action="store_true",
                      help="serve PEFT LoRA adapters beside the base model (the server's "
                           "--lora-modules, or a request's LoRARequest)")
    lora.add_argument("--max-loras", type=int, default=1,
                      help="distinct adapters in one step (each a device slot; default 1)")
    lora.add_argument("--max-lora-rank", type=int, default=16,
                      help="the largest adapter rank served: 1, 8, 16, 32, 64, 128, 256, 320 "
                           "or 512 (default 16)")
    lora.add_argument("--max-cpu-loras", type=int, default=None,
                      help="adapters kept in host memory (default: --max-loras)")
    lora.add_argument("--specialize-lora", action=argparse.BooleanOptionalAction, default=True,
                      help="steps without an adapter run programs without the LoRA path (the "
                           "start-up compiles both sets; vLLM's cudagraph_specialize_lora)")
    p.add_argument("--compilation-cache-dir", default=DEFAULT_COMPILATION_CACHE_DIR,
                   help="keep compiled step programs here, so a restart with the same model and "
                        "flags skips most of the start-up compile (default: "
                        "$JAXLLM_COMPILATION_CACHE_DIR or ~/.cache/jaxllm/xla; '' turns it off)")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, got {text!r}")
    return value


def enable_compilation_cache(path: str | None) -> None:
    """Turns on XLA's persistent compilation cache at ``path`` (nothing for None or '').

    Call it before anything compiles: jax reads the setting when it first compiles. Every
    program is cached, however quick to compile (the start-up compiles many), and the setting is
    also exported, so processes started from this one (Ray replicas, local followers) share it.
    """
    if not path:
        return
    import jax

    path = os.path.expanduser(path)
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as e:  # a cache is an optimization: never a reason not to start
        logging.getLogger("jaxllm").warning(
            "compilation cache off: cannot use %s (%s); pass --compilation-cache-dir DIR or ''",
            path, e)
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(tokenizer=args.tokenizer, chat_template=args.chat_template,
                max_logprobs=args.max_logprobs, logprobs_mode=args.logprobs_mode,
                checkpoint_dir=args.checkpoint_dir,
                dtype=args.dtype,
                max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, page_size=args.page_size,
                num_pages=args.num_pages, gpu_memory_utilization=args.gpu_memory_utilization,
                enable_prefix_caching=args.enable_prefix_caching,
                enable_chunked_prefill=args.enable_chunked_prefill,
                tensor_parallel_size=args.tensor_parallel_size,
                pipeline_parallel_size=args.pipeline_parallel_size,
                data_parallel_size=args.data_parallel_size,
                quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                calculate_kv_scales=args.calculate_kv_scales, seed=args.seed,
                async_scheduling=args.async_scheduling, enforce_eager=args.enforce_eager,
                scheduling_policy=args.scheduling_policy,
                enable_sleep_mode=args.enable_sleep_mode,
                num_scheduler_steps=args.num_scheduler_steps,
                generation_config=args.generation_config,
                override_generation_config=args.override_generation_config,
                structured_outputs_config=args.structured_outputs_config,
                speculative_config=args.speculative_config,
                runner=args.runner, pooler_config=args.pooler_config,
                enable_lora=args.enable_lora, max_loras=args.max_loras,
                max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras,
                specialize_lora=args.specialize_lora)


def _generate(args: argparse.Namespace) -> int:
    from jaxllm import LLM, SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.sampling_seed)
    prompts = args.prompt or ["Write a haiku about the sea."]
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        print(f"--- prompt: {prompt!r}")
        print(out.outputs[0].text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm", description="LLM inference on JAX/XLA")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for a few prompts")
    g.add_argument("--model", default=None, help="HF folder or .gguf file (default: the embedded "
                   "SmolLM2-135M-Instruct)")
    g.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the chat template (default on)")
    add_engine_args(g)

    try:
        from server import cli as server_cli  # the server adds `jaxllm serve`
    except ImportError:
        server_cli = None
    serve_parser = None
    if server_cli is not None:
        serve_parser = server_cli.add_serve_parser(sub, add_engine_args)

    args = parser.parse_args(argv)
    if args.command == "serve":
        server_cli.check_serve_args(serve_parser, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    enable_compilation_cache(getattr(args, "compilation_cache_dir", None))
    try:
        if args.command == "generate":
            return _generate(args)
        return server_cli.run_serve(args, engine_kwargs(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
