"""``LLM``: the offline batch API, named and behaving like vLLM's ``vllm.LLM``."""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, Sequence as TypingSequence

from jaxllm.config import EngineConfig
from jaxllm.engine.data_parallel import create_engine
from jaxllm.outputs import BeamSearchOutput, RequestOutput
from jaxllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

PromptType = str | dict | list[int]


def per_prompt(value: Any, n: int, what: str) -> list[Any]:
    """One ``value`` per prompt: a list (or tuple) of n as it is, else the one value n times;
    ValueError naming ``what`` for a list of another length."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"got {len(value)} {what} for {n} prompts: pass one, or one per "
                             "prompt.")
        return list(value)
    return [value] * n


class LLM:
    """An engine for offline generation: ``LLM().generate(prompts, SamplingParams(...))``.

    ``model=None`` loads the embedded default model (SmolLM2-135M-Instruct). Every keyword of
    ``EngineConfig`` is accepted (max_model_len, max_num_seqs, max_num_batched_tokens, page_size,
    num_pages, gpu_memory_utilization, enable_prefix_caching, tensor_parallel_size,
    pipeline_parallel_size, data_parallel_size, ...).
    """

    def __init__(self, model: str | None = None, **kwargs: Any):
        self.llm_engine = create_engine(EngineConfig(model=model, **kwargs))
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` and ``chat`` use without SamplingParams: the model's generation
        config defaults (``generation_config``, jaxllm/loading/generation_config.py), else
        SamplingParams()."""
        return SamplingParams(**self.llm_engine.get_diff_sampling_param())

    def embed(self, prompts: PromptType | TypingSequence[PromptType],
              pooling_params: Any = None, use_tqdm: bool = False,
              lora_request: Any = None) -> list[Any]:
        """Embeddings (vLLM's ``LLM.embed``) of an engine built with ``runner="pooling"``:
        EmbeddingRequestOutputs in input order, each ``outputs.embedding`` a list of floats.
        ``pooling_params``: a PoolingParams (jaxllm.pooling_params), or one per prompt.
        ``lora_request``: a LoRARequest for all prompts, or one (or None) per prompt (with
        enable_lora). ``use_tqdm`` is accepted for vLLM's signature (one call embeds the
        whole list)."""
        return self.llm_engine.embed(self._prompt_list(prompts), pooling_params,
                                     lora_request=lora_request)

    def encode(self, prompts: PromptType | TypingSequence[PromptType],
               pooling_params: Any = None, *, use_tqdm: bool = True, lora_request: Any = None,
               pooling_task: str | None = None, truncate_prompt_tokens: int | None = None
               ) -> list[Any]:
        """vLLM's ``LLM.encode`` on a pooling model: PoolingRequestOutputs in input order,
        each ``outputs.data`` a float32 array of ``pooling_task``: "embed" ([E], as
        ``embed``), "token_embed" (every prompt token's final hidden state, [tokens, E], each
        row normalized unless ``normalize=False``), and on a sequence classifier "classify"
        ([num_labels], as ``classify``) or "token_classify" (every token's class
        probabilities). ``pooling_task`` is required (vLLM's current rule: it names what the
        model should pool). ``pooling_params``, ``lora_request`` as ``embed``'s;
        ``truncate_prompt_tokens`` keeps each prompt's last tokens; ``use_tqdm`` is accepted
        for vLLM's signature."""
        from jaxllm.pooling_params import PoolingParams

        params = pooling_params
        if truncate_prompt_tokens is not None:
            def cut(p):
                return dataclasses.replace(p or PoolingParams(),
                                           truncate_prompt_tokens=truncate_prompt_tokens)
            params = ([cut(p) for p in params] if isinstance(params, (list, tuple))
                      else cut(params))
        return self.llm_engine.encode(self._prompt_list(prompts), params,
                                      lora_request=lora_request, pooling_task=pooling_task)

    def classify(self, prompts: PromptType | TypingSequence[PromptType], *,
                 use_tqdm: bool = True, pooling_params: Any = None,
                 lora_request: Any = None) -> list[Any]:
        """Class probabilities (vLLM's ``LLM.classify``) of a sequence classification model
        (config.json's architecture ``LlamaForSequenceClassification``, ``Qwen2...``, ...:
        loaded as a pooling model on its own): ClassificationRequestOutputs in input order,
        each ``outputs.probs`` the softmax of the labels' logits (a one-label model: the
        sigmoid of its logit); the labels' names are ``llm.llm_engine.model_config.id2label``.
        ``pooling_params`` (truncate_prompt_tokens) and ``lora_request`` as ``embed``'s."""
        return self.llm_engine.classify(self._prompt_list(prompts), pooling_params,
                                        lora_request=lora_request)

    def score(self, data_1: PromptType | TypingSequence[PromptType],
              data_2: PromptType | TypingSequence[PromptType], /, *,
              truncate_prompt_tokens: int | None = None, use_tqdm: bool = True,
              pooling_params: Any = None, lora_request: Any = None) -> list[Any]:
        """vLLM's ``LLM.score`` for an embedding model (``runner="pooling"``): one
        ScoringRequestOutput per pair, ``outputs.score`` the cosine similarity of the two
        texts' embeddings; for a one-label sequence classifier (a cross-encoder reranker) the
        sigmoid of its logit over the pair encoded as one prompt. ``data_1`` is one text
        paired with every item of ``data_2`` (1:N), or as many as ``data_2`` (N:N); both run
        with ``lora_request``'s adapter (one LoRARequest, with enable_lora). ``use_tqdm`` is
        accepted for vLLM's signature."""
        from jaxllm.pooling_params import PoolingParams

        params = pooling_params or PoolingParams()
        if truncate_prompt_tokens is not None:
            params = dataclasses.replace(params, truncate_prompt_tokens=truncate_prompt_tokens)
        return self.llm_engine.score(self._prompt_list(data_1), self._prompt_list(data_2),
                                     params, lora_request=lora_request)

    def sleep(self, level: int = 1) -> None:
        """vLLM's sleep mode (``LLM(..., enable_sleep_mode=True)``): frees the KV cache's and
        the weights' device memory; level 1 keeps the weights in host memory, level 2 drops
        them. ``LLMEngine.sleep``."""
        self.llm_engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Puts back what ``sleep`` freed ("weights" and / or "kv_cache"; default both)."""
        self.llm_engine.wake_up(tags)

    def update_weights(self, weights) -> None:
        """New weights, without a recompile (an RL loop's weight sync): ``(hf_name, array)``
        pairs of every tensor, as a checkpoint names and lays them out.
        ``LLMEngine.update_weights``."""
        self.llm_engine.update_weights(weights)

    def get_metrics(self) -> list[Any]:
        """vLLM's ``LLM.get_metrics()``: the engine's gauges and counters now, as
        jaxllm.metrics Counter / Gauge / Vector objects named as the server's /metrics names
        them (``jaxllm:generation_tokens``; with a speculative config also
        ``jaxllm:spec_decode_num_drafts``, ``..._num_draft_tokens``, ``..._num_accepted_tokens``
        and the Vector ``..._num_accepted_tokens_per_pos``)."""
        from jaxllm.metrics import engine_stats, read_metrics

        return read_metrics(engine_stats(self.llm_engine))

    def start_profile(self) -> None:
        """vLLM's profiler: records a jax.profiler trace (every kernel of every step, and the
        host) into $JAXLLM_PROFILER_DIR or $VLLM_TORCH_PROFILER_DIR until ``stop_profile``
        writes it (TensorBoard / XProf files). RuntimeError when neither variable is set or
        a profile already runs (jaxllm/profiler.py)."""
        self.llm_engine.start_profile()

    def stop_profile(self) -> None:
        """Stops the profile ``start_profile`` began and writes its trace."""
        self.llm_engine.stop_profile()

    def reset_prefix_cache(self) -> bool:
        """Empties the prefix cache; False (nothing done) while requests are running, as vLLM."""
        return self.llm_engine.reset_prefix_cache()

    def generate(self, prompts: PromptType | TypingSequence[PromptType],
                 sampling_params: SamplingParams | TypingSequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: list[int] | None = None,
                 lora_request: Any = None) -> list[RequestOutput]:
        """Generates for every prompt; returns RequestOutputs in input order.

        prompts: a str, a list of token ids, or a list of those or of ``{"prompt_token_ids":
          [...]}`` items (or a mix).
        sampling_params: one for all prompts, or one per prompt.
        priority: one per prompt, for an engine with scheduling_policy="priority" (lower first).
        lora_request: a ``jaxllm.lora.LoRARequest`` for all prompts, or one (or None) per
          prompt, with ``enable_lora=True``.
        """
        prompts = self._prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if not isinstance(sampling_params, SamplingParams):  # any iterable of them
            sampling_params = list(sampling_params)
        params_list = per_prompt(sampling_params, len(prompts), "SamplingParams")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts: pass "
                             "one per prompt.")
        return self._run(prompts, params_list, use_tqdm, priority,
                         per_prompt(lora_request, len(prompts), "LoRA requests"))

    def beam_search(self, prompts: PromptType | TypingSequence[PromptType],
                    params: BeamSearchParams, lora_request: Any = None, use_tqdm: bool = False,
                    concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
        """Beam search (vLLM's ``LLM.beam_search``): the ``params.beam_width`` best sequences
        of each prompt, best first. Each beam's ``tokens`` and ``text`` hold the prompt too, as
        in vLLM. ``lora_request``: a LoRARequest for all prompts, or one (or None) per prompt
        (with enable_lora). ``concurrency_limit``: how many prompts are searched at once (None:
        all). jaxllm/engine/beam_search.py says how a step runs."""
        from jaxllm.engine.beam_search import (BeamSearchInstance, cache_salt, engine_stop_ids,
                                               step_params)

        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        if concurrency_limit is not None and concurrency_limit < 1:
            raise ValueError(f"concurrency_limit must be >= 1, got {concurrency_limit}.")
        engine, tok = self.llm_engine, self.get_tokenizer()
        prompts = self._prompt_list(prompts)
        loras = per_prompt(lora_request, len(prompts), "LoRA requests")
        sp = step_params(params, engine.config.max_logprobs)
        stop_ids = engine_stop_ids(engine)
        eos = tok.eos_token_id if tok is not None else None
        instances = []
        for p in prompts:
            text, ids = engine.prompt_inputs(p)
            instances.append(BeamSearchInstance(ids, text, params, eos_ids=stop_ids,
                                                eos_token_id=eos,
                                                max_model_len=engine.max_model_len,
                                                cache_salt=cache_salt(p)))
        limit = concurrency_limit or max(len(instances), 1)
        pbar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            # steps, an upper bound: beams that all end early finish sooner
            pbar = tqdm(total=sum(max(i.steps_left for i in instances[s:s + limit])
                                  for s in range(0, len(instances), limit)),
                        desc="Beam search", unit="token")
        try:
            for start in range(0, len(instances), limit):
                batch = instances[start:start + limit]
                while live := [(i, loras[start + j]) for j, i in enumerate(batch)
                               if not i.done]:
                    reqs = [r for i, _ in live for r in i.prompts()]
                    outs = self._run(reqs, [sp] * len(reqs), use_tqdm=False,
                                     loras=[lora for i, lora in live for _ in i.beams])
                    pos = 0
                    for inst, _ in live:
                        k = len(inst.beams)
                        inst.advance(outs[pos:pos + k])
                        pos += k
                    if pbar is not None:
                        pbar.update(1)
        finally:
            if pbar is not None:
                pbar.close()
        results = []
        for inst in instances:
            best = inst.best()
            for b in best:
                b.text = tok.decode(b.tokens, skip_special_tokens=params.skip_special_tokens) \
                    if tok is not None else None
            results.append(BeamSearchOutput(sequences=best))
        return results

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | TypingSequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict | None = None, tools: list[dict] | None = None,
             lora_request: Any = None) -> list[RequestOutput]:
        """Generates replies to one conversation or a list of them, with the tokenizer's chat
        template (a conversation is a list of {"role", "content"} dicts). ``tools``: OpenAI
        function tools for the template (vLLM's LLM.chat(tools=)); the reply is the model's
        text, its tool calls in the model's own format."""
        if not messages:
            raise ValueError("messages must not be empty")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        tok = self.get_tokenizer()
        extra = dict(chat_template_kwargs or {})
        if tools is not None:
            extra["tools"] = tools
        prompts = []
        for conv in conversations:
            ids = tok.apply_chat_template(
                conv, chat_template=chat_template, tokenize=True,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message, **extra)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            prompts.append({"prompt_token_ids": list(ids),
                            "prompt": tok.decode(ids, skip_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm,
                             lora_request=lora_request)

    @staticmethod
    def _prompt_list(prompts: PromptType | TypingSequence[PromptType]) -> list[PromptType]:
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, (list, tuple)) and prompts
                and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts)):
            return [prompts]  # one prompt: a str, a dict or a flat list of token ids
        return list(prompts)

    def _run(self, prompts: list[PromptType], params_list: list[SamplingParams],
             use_tqdm: bool, priority: list[int] | None = None,
             loras: list[Any] | None = None) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list)):
                if params.output_kind != RequestOutputKind.FINAL_ONLY:
                    params = dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
                rid = str(next(self._counter))
                engine.add_request(rid, prompt, params,
                                   priority=0 if priority is None else priority[i],
                                   lora_request=None if loras is None else loras[i])
                ids.append(rid)
        except Exception:
            for rid in ids:  # nothing half-submitted stays in the engine
                engine.abort_request(rid)
            raise
        results: dict[str, RequestOutput] = {}
        pbar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            pbar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True,
                        postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s")
        t0 = time.perf_counter()
        n_in = n_out = 0
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        if pbar is not None:
                            n_in += len(out.prompt_token_ids)
                            n_out += sum(len(c.token_ids) for c in out.outputs)
                            dt = max(time.perf_counter() - t0, 1e-9)
                            pbar.postfix = (f"est. speed input: {n_in / dt:.2f} toks/s, "
                                            f"output: {n_out / dt:.2f} toks/s")
                            pbar.update(1)
        except BaseException:
            for rid in ids:
                engine.abort_request(rid)
            raise
        finally:
            if pbar is not None:
                pbar.close()
        return [results[rid] for rid in ids]
