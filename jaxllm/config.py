"""Configuration: one frozen dataclass each for the model and the engine, validated in one place.

``ModelConfig`` is what the Flax model needs, read from an HF ``config.json`` (via transformers)
or from GGUF metadata. ``EngineConfig`` is what a user passes to ``LLM(...)`` / ``jaxllm serve``;
every argument is checked once in ``__post_init__`` with a message naming the argument and the
allowed values, and nothing deeper re-validates it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

DTYPES = {
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
    "half": jnp.float16,
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "float": jnp.float32,
}


def gemm_out_dtype_from_env(env: str, model_dtype: Any, default: str = "float32") -> jnp.dtype:
    """An in-engine A/B switch for a GEMM's output type, read from ``env`` at trace time:
    "float32" or "model" (``model_dtype``); ``default`` when unset or empty."""
    import os

    raw = os.environ.get(env, default).strip() or default
    if raw == "float32":
        return jnp.dtype(jnp.float32)
    if raw == "model":
        return jnp.dtype(model_dtype)
    raise ValueError(f"{env} must be 'float32' or 'model', got {raw!r}.")


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """Maps "bfloat16"/"float16"/"float32" (or a jnp dtype) to a jnp dtype.

    "auto" is bfloat16 on accelerators and float32 on CPU: XLA's CPU backend emulates bf16
    matmuls (slower than f32), and the CPU runs small models where f32 costs little.
    """
    if dtype is None or dtype == "auto":
        import jax

        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(
                f"dtype={dtype!r} is not supported; choose one of 'auto', 'bfloat16', 'float16', 'float32'."
            )
        return jnp.dtype(DTYPES[dtype.lower()])
    d = jnp.dtype(dtype)
    if d not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        raise ValueError(f"dtype={dtype!r} is not supported; choose bfloat16, float16 or float32.")
    return d


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3,
    SmolLM2, Phi-3/4, Gemma, Gemma 2, Gemma 3 text, Granite 3)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF rope scaling dict ({"rope_type": "llama3", "factor": ..., ...}) or None; stored as a tuple
    # of items so the config stays hashable.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    # Gemma 3: the sliding-window layers' own (plain) rope base; None: every layer uses the above.
    rope_local_theta: float | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projection bias (Qwen2; Llama's attention_bias)
    o_proj_bias: bool = False  # output projection bias (Llama's attention_bias; not Qwen2)
    mlp_bias: bool = False  # gate/up/down bias (Llama's mlp_bias)
    qk_norm: bool = False  # per-head RMSNorm on q and k before rope (Qwen3)
    sliding_window: int | None = None
    # Which layers use the sliding window (Qwen2/3 apply it from max_window_layers on);
    # None: every layer does when sliding_window is set (Mistral).
    sliding_window_layers: tuple[bool, ...] | None = None
    hidden_act: str = "silu"  # "silu" (SwiGLU), or Gemma's "gelu_pytorch_tanh" / "gelu" (GeGLU)
    # Gemma / Gemma 2 (jaxllm/models/llama.py): norms scale by (offset + weight) in float32;
    # the embeddings are multiplied by embed_multiplier (sqrt(E)); Gemma 2's four norms a layer
    # (sandwich_norms), its attention scale (query_pre_attn_scalar ** -0.5) and its tanh
    # soft-caps on the attention scores and the final logits.
    norm_weight_offset: float = 0.0
    embed_multiplier: float | None = None
    sandwich_norms: bool = False
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Granite (IBM Granite 3): each layer's attention and MLP outputs scaled before the residual
    # add, and the logits divided by logits_scaling (its embedding and attention multipliers
    # are embed_multiplier and attn_scale above).
    residual_multiplier: float | None = None
    logits_scaling: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # "fp8": the attention and MLP projections are jaxllm.models.fp8.Fp8Linear (e4m3 weights,
    # per-channel scales); set by quantization="fp8" at load or by a pre-quantized checkpoint.
    quantization: str | None = None
    # fp8 activations: "dynamic" (per-token scales at run time) or "static" (the checkpoint's
    # per-tensor input_scale).
    activation_scheme: str = "dynamic"
    # A pre-quantized checkpoint's format, its quantization_config's quant_method ("fp8",
    # "compressed-tensors", "modelopt"); None for dense weights and quantization at load.
    quant_method: str | None = None
    # A block-wise fp8 checkpoint's [block_n, block_k] (HF's weight_block_size: one scale per
    # block_n x block_k tile of a weight). Fp8Linear then holds one scale per output channel and
    # block of block_k input features, weight_scale [O, ceil(I / block_k)] (jaxllm/models/fp8.py).
    weight_block_size: tuple[int, int] | None = None
    # Per layer (k_scale, v_scale) of an fp8 KV cache, from a checkpoint that calibrated them
    # (compressed-tensors kv_cache_scheme); None: 1.0 (jaxllm/models/attention.py).
    kv_cache_scales: tuple[tuple[float, float], ...] | None = None
    # q/k/v and gate/up as one GEMM each (jaxllm/models/fused.py). The loaders and checkpoints
    # hold the separate projections (False); the engine builds the fused model it runs.
    fused_projections: bool = False
    # Built from a headless checkpoint (HF's LlamaModel, MistralModel, Qwen2Model, Qwen3Model:
    # weights named without "model.", no lm_head): it can only embed (runner="pooling").
    embedding_only: bool = False
    # A sequence classifier (HF's LlamaForSequenceClassification, ...): its head ``score``
    # [hidden, num_labels] over the last token's final hidden state, and the labels' names
    # (config.json's id2label, in index order). 0: not a classifier. Classifiers are
    # embedding_only too (no lm_head).
    num_labels: int = 0
    id2label: tuple[str, ...] = ()

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        """The sliding window of layer ``layer_idx`` (None: full attention)."""
        if self.sliding_window is None:
            return None
        if self.sliding_window_layers is not None and not self.sliding_window_layers[layer_idx]:
            return None
        return self.sliding_window

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


USAGE_CONTEXTS = ("llm", "server")


# Defaults as in vLLM where they make sense on this project's machines.
# vLLM's logprobs modes (EngineConfig.logprobs_mode; engine/sampler.py says what each is).
# EngineConfig.quantization, as vLLM names them: None (the checkpoint decides: dense, or
# loaded as its quantization_config says), "fp8" (quantize a dense checkpoint at load; a
# pre-quantized one loads as it is), or a pre-quantized checkpoint's format, which must then
# be the checkpoint's (vLLM's check; jaxllm.loading.check_quantization_matches).
QUANTIZATION_METHODS = (None, "fp8", "compressed-tensors", "modelopt")
# EngineConfig.kv_cache_dtype, as vLLM names them: "auto" (the model dtype), "fp8" (=
# "fp8_e4m3": e4m3 pages with per-layer scales), "fp8_e5m2" (e5m2 pages: float16's range, one
# mantissa bit less). jaxllm.models.attention.FP8_KV_CACHE_DTYPES maps them to dtypes.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")


@dataclass(frozen=True)
class EngineConfig:
    """Everything ``LLM(...)`` and ``jaxllm serve`` accept; validated once, here."""

    model: str | None = None  # None: the embedded default model (SmolLM2-135M-Instruct)
    tokenizer: str | None = None
    # orbax cache of the converted params: restored when present, written after loading when not
    checkpoint_dir: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    # None for both: vLLM's defaults for the device and usage_context
    # (jaxllm.engine.llm_engine.default_batch_limits): on a GPU of >= 70 GiB other than an A100
    # (H100, H200) 1024 sequences and 16384 tokens (8192 for the server), on other GPUs 256 and
    # 8192 (2048 for the server), on the CPU 256 and 1024. Without chunked prefill the token
    # budget is at least max_model_len.
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    page_size: int = 16
    num_pages: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    # vLLM's calculate_kv_scales: an fp8 cache's per-layer K/V scales computed at start-up
    # (jaxllm/engine/kv_scales.py) instead of the checkpoint's (or 1.0). Not with pp > 1 yet.
    calculate_kv_scales: bool = False
    seed: int = 0
    max_logprobs: int = 20
    # vLLM's logprobs_mode: what sampled tokens' log-probs are ("raw_logprobs", "raw_logits",
    # "processed_logprobs", "processed_logits"; engine/sampler.py). Prompt log-probs stay raw.
    logprobs_mode: str = "raw_logprobs"
    attention_backend: str = "auto"  # "auto" | "reference" | "pallas"
    # Compiled token buckets; None derives powers of two up to the limits above. A step's
    # sequence slots follow from its token bucket: min(bucket, max_num_seqs).
    token_buckets: tuple[int, ...] | None = None
    # Decode-only programs for pure decode steps of fewer sequences than the smallest token
    # bucket (as vLLM captures CUDA graphs for 1, 2 and 4 sequences): e.g. (1, 2, 4) gives a
    # step of 1 sequence a 1-row program, whose attention launch is sized for one sequence
    # instead of the bucket's 8 slots. Default none, by measurement (H200, 2026-12-01,
    # docs/DESIGN_NOTES.md): at batch 1 the 1-row program's attention took 5.1 instead of 7.4 us
    # a layer, but XLA fuses a 1-row step into more kernels (633 against 472), so the bf16 step
    # was no faster (4.42 against 4.39 ms) and the fp8 one, bound by the host, slower.
    small_decode_buckets: tuple[int, ...] = ()
    skip_compile_at_start: bool = False  # compile buckets lazily (tests); serving compiles all first
    # Schedule and dispatch step k+1 while step k runs on the device (vLLM's --async-scheduling);
    # False: every step waits for its results before the next is scheduled.
    async_scheduling: bool = True
    # vLLM's --scheduling-policy: "fcfs" (first come, first served) or "priority" (each request's
    # priority, lower first, then arrival; preemption takes the last in that order).
    scheduling_policy: str = "fcfs"
    # vLLM's: LLM.sleep() / wake_up() may free and restore the weights' and the KV cache's
    # device memory (engine/llm_engine.py); off, sleep() is refused.
    enable_sleep_mode: bool = False
    # vLLM's --runner: "generate", "pooling" (embeddings only: engine/pooling.py) or "auto":
    # pooling for a headless checkpoint (LlamaModel, Qwen2Model, ...: no lm_head), else
    # generate. With vLLM's --pooler-config {"pooling_type": "LAST" | "MEAN" | "CLS",
    # "normalize": bool}.
    runner: str = "auto"
    pooler_config: dict[str, Any] | None = None
    # Run q/k/v and gate/up as one GEMM each (jaxllm/models/fused.py), as vLLM always does;
    # False keeps the loaded separate projections (for A/B measurements).
    fuse_projections: bool = True
    # Who drives the engine, for the batch-size defaults above (vLLM's UsageContext): "llm" (the
    # LLM class, offline batches: the larger token budget), "server" (the OpenAI server).
    usage_context: str = "llm"
    # vLLM's enforce_eager (no CUDA graphs): compile the step programs without XLA's command
    # buffers, every kernel launched on its own (jaxllm/engine/model_runner.py,
    # EAGER_COMPILER_OPTIONS, for what was measured). Nothing changes on a CPU.
    enforce_eager: bool = False
    # vLLM's (V0) multi-step scheduling: a batch of pure decodes runs this many forward + sample
    # steps in one device program (a loop on the device; each step's token feeds the next), so
    # the host schedules, launches and reads back once per num_scheduler_steps tokens. Stop
    # conditions are checked afterwards and tokens past a stop are dropped. Only batches that
    # can (engine/llm_engine.py, ``_lookahead_steps``): pure decode, no admission held back,
    # no penalties, log-probs, logit_bias or min_tokens still to reach. 1 (default): one step
    # per launch.
    num_scheduler_steps: int = 1
    # The model's generation_config.json (jaxllm/loading/generation_config.py, as vLLM's
    # --generation-config): "auto" takes its sampling defaults, "vllm" does not, a folder path
    # reads that folder's file instead; its eos_token_id entries stop generation in every mode.
    generation_config: str = "auto"
    override_generation_config: dict[str, Any] | None = None  # fields that win over the file's
    # A chat template that replaces the tokenizer's (vLLM's --chat-template): a file's path, or
    # the Jinja template itself. LLM.chat, the server and /tokenize all use it.
    chat_template: str | None = None
    # vLLM's structured outputs config (engine/structured_output.py): {"backend": "auto" |
    # "guidance", "disable_any_whitespace": bool, "disable_additional_properties": bool,
    # "reasoning_parser": "deepseek_r1" | "qwen3", "enable_in_reasoning": bool}; the two JSON
    # options apply to every request's schema, as if each request had set them; with a
    # reasoning parser a grammar starts after the thinking unless enable_in_reasoning.
    structured_outputs_config: dict[str, Any] | None = None
    # vLLM's speculative_config (engine/spec_decode.py): {"method": "ngram",
    # "num_speculative_tokens": k, "prompt_lookup_max": n, "prompt_lookup_min": m}: decodes
    # take up to k drafts from n-gram lookup in their own tokens, verified in one step. Steps
    # with a draft are read back before the next schedule (the rest stay asynchronous).
    speculative_config: dict[str, Any] | None = None
    # vLLM's LoRA options (jaxllm/lora): requests may name a PEFT LoRA adapter
    # (LoRARequest); at most max_loras distinct adapters run in a step (each a device slot of
    # rank max_lora_rank), at most max_cpu_loras (default max_loras) stay in host memory.
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # With enable_lora, steps where no running sequence has an adapter run a second set of
    # step programs without the LoRA path (as fast as an engine without LoRA; the start-up
    # compiles both sets). vLLM's compilation_config.cudagraph_specialize_lora (default on).
    specialize_lora: bool = True
    # vLLM's names for two of the fields above, so its keyword arguments work as they are:
    # block_size is page_size (tokens a KV page holds), num_gpu_blocks_override is num_pages.
    # Taken into those fields here and then None.
    block_size: int | None = None
    num_gpu_blocks_override: int | None = None

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")

        for alias, name, default in (("block_size", "page_size", 16),
                                     ("num_gpu_blocks_override", "num_pages", None)):
            v = getattr(self, alias)
            if v is not None:
                if getattr(self, name) not in (default, v):
                    raise ValueError(f"{alias}={v} and {name}={getattr(self, name)} disagree: "
                                     f"{alias} is vLLM's name for {name}; pass one.")
                object.__setattr__(self, name, v)
                object.__setattr__(self, alias, None)
        resolve_dtype(self.dtype)
        for name in ("page_size", "tensor_parallel_size", "pipeline_parallel_size",
                     "data_parallel_size", "max_logprobs", "num_scheduler_steps"):
            positive(name)
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got "
                             f"{self.logprobs_mode!r}.")
        if self.runner not in ("auto", "generate", "pooling"):
            raise ValueError(f"runner must be 'auto', 'generate' or 'pooling', got "
                             f"{self.runner!r}.")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got "
                             f"{self.scheduling_policy!r}.")
        if self.usage_context not in USAGE_CONTEXTS:
            raise ValueError(f"usage_context must be one of {USAGE_CONTEXTS}, got "
                             f"{self.usage_context!r}.")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "num_pages"):
            if getattr(self, name) is not None:
                positive(name)
        b = self.small_decode_buckets
        if not isinstance(b, (tuple, list)) or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in b):
            raise ValueError(f"small_decode_buckets must be a tuple of positive integers, got "
                             f"{b!r}.")
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two (8, 16, 32, ...), got {self.page_size}.")
        if not (0.0 < self.gpu_memory_utilization <= 1.0):
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization={self.quantization!r} is not supported; choose "
                             f"{', '.join(map(repr, QUANTIZATION_METHODS))}.")
        if self.calculate_kv_scales and self.pipeline_parallel_size > 1:
            raise ValueError("calculate_kv_scales is not supported with pipeline parallelism "
                             "yet (its calibration forward runs the layers in one program); "
                             "drop it, or give the checkpoint's scales.")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported; choose "
                f"{', '.join(map(repr, KV_CACHE_DTYPES))}.")
        from jaxllm.loading import read_chat_template
        from jaxllm.loading.generation_config import check_generation_config

        check_generation_config(self.generation_config)
        if self.chat_template is not None:
            read_chat_template(self.chat_template)  # a missing file fails here, not at a request
        if self.override_generation_config is not None and not isinstance(
                self.override_generation_config, dict):
            raise ValueError("override_generation_config must be a dict of generation config "
                             f"fields, got {self.override_generation_config!r}.")
        if self.structured_outputs_config is not None:
            from jaxllm.engine.structured_output import check_config

            check_config(self.structured_outputs_config)
        if self.speculative_config is not None:
            from jaxllm.engine.spec_decode import SpeculativeConfig

            SpeculativeConfig.from_dict(self.speculative_config)
            if self.pipeline_parallel_size > 1:
                raise ValueError("speculative_config is not supported with pipeline "
                                 "parallelism (pipeline_parallel_size > 1); use tensor "
                                 "parallelism.")
            if self.runner == "pooling":
                raise ValueError("speculative_config needs a generating model; "
                                 "runner='pooling' generates nothing.")
        if self.enable_lora:
            from jaxllm.lora.manager import MAX_LORA_RANKS

            positive("max_loras")
            if self.max_lora_rank not in MAX_LORA_RANKS:
                raise ValueError(f"max_lora_rank ({self.max_lora_rank!r}) must be one of "
                                 f"{MAX_LORA_RANKS}.")
            if self.max_cpu_loras is not None:
                positive("max_cpu_loras")
                if self.max_cpu_loras < self.max_loras:
                    raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= "
                                     f"max_loras ({self.max_loras}).")
            if self.pipeline_parallel_size > 1:
                raise ValueError("enable_lora is not supported with pipeline parallelism "
                                 "(pipeline_parallel_size > 1); use tensor parallelism.")
        if self.attention_backend not in ("auto", "reference", "pallas"):
            raise ValueError(
                f"attention_backend={self.attention_backend!r} is not supported; "
                "choose 'auto', 'reference' or 'pallas'.")
        if (self.max_num_batched_tokens is not None and self.max_model_len is not None
                and not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len):
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than max_model_len "
                f"({self.max_model_len}) with chunked prefill disabled: a long prompt could never be "
                "scheduled. Raise max_num_batched_tokens or enable chunked prefill.")

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)
