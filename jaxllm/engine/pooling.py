"""Embeddings: a decoder LLM run as a pooling model (vLLM's ``runner="pooling"``).

An engine built with ``EngineConfig(runner="pooling")`` generates nothing: ``LLMEngine.embed``
packs whole prompts into steps of at most ``max_num_batched_tokens`` tokens and
``max_num_seqs`` sequences, runs the model's forward over each (the KV pages a prefill would
write, taken from the engine's pool and given back after), and pools each prompt's final
hidden states: its last token's ("LAST", vLLM's default for decoder models), its first's
("CLS") or their mean ("MEAN"), then L2-normalizes unless told not to. A prompt longer than a
step runs as chunks over several steps, attending to its earlier chunks through its pages, the
chunks' pooled parts combined. The forward is compiled per token bucket on first use; the
generation programs are not compiled at all.

``pooler_config`` (vLLM's ``--pooler-config``): {"pooling_type": "LAST" | "MEAN" | "CLS",
"normalize": bool}.

``score`` (vLLM's ``LLM.score`` and its /score and /rerank routes, for an embedding model):
the cosine similarity of two texts' embeddings, pairs 1:1, 1:N (one query against N
documents) or N:N.

``classify`` (vLLM's ``LLM.classify`` and /classify, for a sequence classifier such as HF's
LlamaForSequenceClassification): the head ``score`` on each prompt's last token's final
hidden state (unnormalized LAST pooling, whatever the pooler config says), then softmax, or
the sigmoid of a single-label model's one logit, as vLLM's classifier pooler. On a one-label
classifier ``score`` cross-encodes: each pair is one prompt (the tokenizer's pair encoding)
and its score that sigmoid, as vLLM's rerankers.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any

import numpy as np

from jaxllm.outputs import (ClassificationOutput, ClassificationRequestOutput, EmbeddingOutput,
                            EmbeddingRequestOutput, PoolingOutput, PoolingRequestOutput,
                            ScoringOutput, ScoringRequestOutput)
from jaxllm.pooling_params import PoolingParams

POOLING_TYPES = ("LAST", "MEAN", "CLS")


def check_pooler_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """The pooler config with its defaults (LAST, normalized); ValueError for a bad one."""
    config = dict(config or {})
    bad = sorted(set(config) - {"pooling_type", "normalize"})
    if bad:
        raise ValueError(f"pooler_config keys {bad} are not supported (pooling_type, "
                         "normalize).")
    kind = str(config.get("pooling_type", "LAST")).upper()
    if kind not in POOLING_TYPES:
        raise ValueError(f"pooler_config pooling_type must be one of {POOLING_TYPES}, got "
                         f"{config['pooling_type']!r}.")
    normalize = config.get("normalize", True)
    if not isinstance(normalize, bool):
        raise ValueError(f"pooler_config normalize must be true or false, got {normalize!r}.")
    return {"pooling_type": kind, "normalize": normalize}


class _Pooled:
    """One prompt's pooling state across its chunks ("ALL" keeps every row)."""

    def __init__(self, index: int, ids: list[int], seq: Any, keep_all: bool = False):
        self.index, self.ids, self.seq = index, ids, seq
        self.start = 0  # tokens computed so far
        self.total: np.ndarray | None = None  # MEAN: the sum of the rows so far
        self.first: np.ndarray | None = None
        self.last: np.ndarray | None = None
        self.rows: list[np.ndarray] | None = [] if keep_all else None

    def take(self, rows: np.ndarray) -> None:
        if self.first is None:
            self.first = rows[0]
        self.last = rows[-1]
        s = rows.sum(axis=0, dtype=np.float64)
        self.total = s if self.total is None else self.total + s
        if self.rows is not None:
            self.rows.append(np.asarray(rows))
        self.start += len(rows)

    def vector(self, kind: str) -> np.ndarray:
        """The pooled state [E] (ALL: every token's, [tokens, E])."""
        if kind == "ALL":
            return np.concatenate(self.rows).astype(np.float64)
        if kind == "LAST":
            return self.last.astype(np.float64)
        if kind == "CLS":
            return self.first.astype(np.float64)
        return self.total / len(self.ids)


def embed(engine: Any, prompts: list[Any], params: PoolingParams | list[PoolingParams] | None,
          pooler: dict[str, Any], lora_request: Any = None) -> list[EmbeddingRequestOutput]:
    """``LLMEngine.embed``'s work (module docstring). ``prompts``: what add_request takes;
    ``lora_request``: a LoRARequest for all, or one (or None) per prompt (with enable_lora).
    A step holds the prompts of at most max_loras distinct adapters, as the scheduler's."""
    items, vectors = pooled_states(engine, prompts, params, pooler, lora_request)
    return [EmbeddingRequestOutput(request_id=str(i), prompt_token_ids=ids,
                                   outputs=EmbeddingOutput(embedding=v.tolist()))
            for i, (ids, v) in enumerate(zip(items, vectors))]


def pooled_states(engine: Any, prompts: list[Any],
                  params: PoolingParams | list[PoolingParams] | None, pooler: dict[str, Any],
                  lora_request: Any = None) -> tuple[list[list[int]], list[np.ndarray]]:
    """(each prompt's token ids, its pooled final hidden state as float32: [E], or [tokens,
    E] for pooling_type "ALL"), cut to ``dimensions`` and L2-normalized (each row for ALL) as
    the params and ``pooler`` say: ``embed``'s work before its output objects."""
    from jaxllm.engine.llm import per_prompt
    from jaxllm.engine.scheduler import ScheduledSeq
    from jaxllm.engine.sequence import Sequence

    params_list = per_prompt_params(params, len(prompts))
    loras = per_prompt(lora_request, len(prompts), "LoRA requests")
    lora_ids = [0] * len(prompts)
    for i, lora in enumerate(loras):
        if lora is not None:  # read (and checked) now, before any step runs
            engine.add_lora(lora)
            lora_ids[i] = lora.lora_int_id
    hidden_size = engine.model_config.hidden_size
    items = []
    for prompt, p in zip(prompts, params_list):
        _, ids = engine.prompt_inputs(prompt)
        k = p.truncate_prompt_tokens
        if k is not None:
            ids = ids[-(engine.max_model_len if k == -1 else k):]
        if not ids:
            raise ValueError("The prompt is empty; an embedding needs at least one token.")
        if len(ids) > engine.max_model_len:
            raise ValueError(f"This model's maximum context length is {engine.max_model_len} "
                             f"tokens. However, your prompt has {len(ids)} tokens. Please "
                             "reduce the length of the prompt.")
        bad = [t for t in ids if not 0 <= t < engine.model_config.vocab_size]
        if bad:
            raise ValueError(f"token_id(s) {bad[:5]} in the prompt are out of vocabulary.")
        if p.dimensions is not None and not engine.is_matryoshka:
            raise ValueError("dimensions (Matryoshka truncation) is not supported by this "
                             "model: its config declares no Matryoshka dimensions.")
        if p.dimensions is not None and p.dimensions > hidden_size:
            raise ValueError(f"dimensions={p.dimensions} exceeds the model's hidden size "
                             f"{hidden_size}.")
        if not engine.scheduler.can_ever_fit(len(ids)):
            raise ValueError(f"The prompt needs more KV-cache pages ({len(ids)} tokens) than "
                             "the pool holds; raise num_pages / gpu_memory_utilization.")
        items.append(ids)

    runner, pool, page_size = engine.runner, engine.page_pool, engine.config.page_size
    budget, max_seqs = engine.max_num_batched_tokens, engine.max_num_seqs
    counter = itertools.count()
    waiting = deque(range(len(items)))
    running: list[_Pooled] = []  # prompts with chunks still to run (at most one at a time)
    vectors: list[np.ndarray | None] = [None] * len(items)
    try:
        while waiting or running:
            step: list[tuple[_Pooled, int]] = []
            tokens = 0
            for st in running:
                n = min(len(st.ids) - st.start, budget - tokens)
                step.append((st, n))
                tokens += n
            adapters = {st.seq.lora_int_id for st in running} - {0}
            while waiting and len(step) < max_seqs and tokens < budget:
                ids, lora_id = items[waiting[0]], lora_ids[waiting[0]]
                n = min(len(ids), budget - tokens)
                if n < len(ids) and step:
                    break  # a prompt longer than what is left runs from an emptier step
                need = -(-len(ids) // page_size)
                if need > pool.num_free_pages:
                    break
                if lora_id and lora_id not in adapters:
                    if len(adapters) == engine.config.max_loras:
                        break  # another adapter waits for a step with a free slot
                    adapters.add(lora_id)
                i = waiting.popleft()
                seq = Sequence(seq_id=next(counter), request_id=f"embed-{i}", index=0,
                               prompt_token_ids=ids, output_token_ids=[],
                               sampling_params=None, arrival_time=0.0)
                seq.lora_int_id = lora_id
                seq.page_ids = pool.allocate(need)
                st = _Pooled(i, ids, seq, keep_all=pooler["pooling_type"] == "ALL")
                running.append(st)
                step.append((st, n))
                tokens += n
            scheduled = [ScheduledSeq(st.seq, n, st.start, st.start + n == len(st.ids))
                         for st, n in step]
            if engine.lora is not None:  # the step's adapters into device slots
                engine.lora.activate([st.seq for st, _ in step])
            inputs = runner.prepare(scheduled, None)
            hidden = runner.hidden_states(inputs)
            qsl = inputs.md.query_start_loc
            for j, (st, n) in enumerate(step):
                st.take(hidden[qsl[j]:qsl[j + 1]])
                st.seq.num_computed_tokens = st.start
                if st.start == len(st.ids):
                    vectors[st.index] = st.vector(pooler["pooling_type"])
                    pool.free(reversed(st.seq.page_ids))
                    st.seq.page_ids = []
                    running.remove(st)
    finally:
        for st in running:  # an error mid-way: every page goes back
            pool.free(reversed(st.seq.page_ids))
    outs = []
    for v, p in zip(vectors, params_list):
        if p.dimensions is not None:
            v = v[..., :p.dimensions]
        normalize = pooler["normalize"] if p.normalize is None else p.normalize
        if normalize:
            v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
        outs.append(v.astype(np.float32))
    return items, outs


def score(engine: Any, texts_1: list[Any], texts_2: list[Any],
          params: PoolingParams | None = None, lora_request: Any = None
          ) -> list[ScoringRequestOutput]:
    """``LLMEngine.score``'s work: the cosine similarity of each pair's embeddings, one pair
    per item of ``texts_2`` (``texts_1`` one item, paired with each, or as many as ``texts_2``:
    vLLM's 1:1, 1:N and N:N); items are what add_request takes; both sides embedded with
    ``lora_request``'s adapter (one LoRARequest or None). ValueError for empty sides or other
    lengths, and as ``embed``."""
    texts_1, texts_2 = list(texts_1), list(texts_2)
    if not texts_1 or not texts_2:
        raise ValueError("At least one text element must be given for each side of a score.")
    if len(texts_1) > 1 and len(texts_1) != len(texts_2):
        raise ValueError(f"Input lengths must be either 1:1, 1:N or N:N; got {len(texts_1)} "
                         f"and {len(texts_2)}.")
    if engine.model_config.num_labels:
        return _cross_encode(engine, texts_1, texts_2, params, lora_request)
    outs = engine.embed(texts_1 + texts_2, params, lora_request=lora_request)
    first, second = outs[:len(texts_1)], outs[len(texts_1):]
    if len(first) == 1:
        first = first * len(second)
    tok = engine.tokenizer
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    results = []
    for i, (a, b) in enumerate(zip(first, second)):
        u = np.asarray(a.outputs.embedding, np.float64)
        v = np.asarray(b.outputs.embedding, np.float64)
        norm = float(np.linalg.norm(u) * np.linalg.norm(v))
        sim = float(u @ v) / norm if norm > 0 else 0.0
        ids = list(a.prompt_token_ids) + ([pad] if pad is not None else []) + list(
            b.prompt_token_ids)
        results.append(ScoringRequestOutput(request_id=f"score-{i}",
                                            outputs=ScoringOutput(score=sim),
                                            prompt_token_ids=ids))
    return results


def classify(engine: Any, prompts: list[Any], params: PoolingParams | list[PoolingParams] | None,
             lora_request: Any = None) -> list[ClassificationRequestOutput]:
    """``LLMEngine.classify``'s work (module docstring): ``embed``'s last-token states through
    the model's classifier head, in float32. ValueError as ``embed``, and for a dimensions or
    normalize setting (a classifier has neither)."""
    _no_embedding_options(params, len(prompts))
    items, states = pooled_states(engine, prompts, params,
                                  {"pooling_type": "LAST", "normalize": False}, lora_request)
    return [ClassificationRequestOutput(
        request_id=str(i), outputs=ClassificationOutput(probs=_class_probs(engine, h).tolist()),
        prompt_token_ids=ids) for i, (ids, h) in enumerate(zip(items, states))]


# vLLM's pooling tasks LLM.encode runs, by the kind of model (a sequence classifier or not).
ENCODE_TASKS = {False: ("embed", "token_embed"), True: ("classify", "token_classify")}


def encode(engine: Any, prompts: list[Any], params: PoolingParams | list[PoolingParams] | None,
           pooler: dict[str, Any], task: str | None, lora_request: Any = None
           ) -> list[PoolingRequestOutput]:
    """``LLMEngine.encode``'s work (vLLM's ``LLM.encode``): ``task`` "embed" / "classify" as
    ``embed`` / ``classify`` give them, "token_embed" every prompt token's final hidden state
    ([tokens, E], each row normalized as an embedding is), "token_classify" every token's
    class probabilities through the classifier head ([tokens, num_labels]); each output's
    ``outputs.data`` a float32 array. ValueError for a task the model has not (vLLM's sets:
    ``ENCODE_TASKS``) or none."""
    tasks = ENCODE_TASKS[bool(engine.model_config.num_labels)]
    if task not in tasks:
        raise ValueError(f"LLM.encode needs pooling_task, one of {tasks} for this model; got "
                         f"{task!r}.")
    if task == "embed":
        results = [(o.prompt_token_ids, o.outputs.embedding)
                   for o in embed(engine, prompts, params, pooler, lora_request)]
    elif task == "classify":
        results = [(o.prompt_token_ids, o.outputs.probs)
                   for o in classify(engine, prompts, params, lora_request)]
    elif task == "token_embed":
        results = list(zip(*pooled_states(engine, prompts, params,
                                          dict(pooler, pooling_type="ALL"), lora_request)))
    else:
        _no_embedding_options(params, len(prompts))
        items, states = pooled_states(engine, prompts, params,
                                      {"pooling_type": "ALL", "normalize": False}, lora_request)
        results = [(ids, _class_probs(engine, h)) for ids, h in zip(items, states)]
    return [PoolingRequestOutput(request_id=str(i), prompt_token_ids=list(ids),
                                 outputs=PoolingOutput(data=np.asarray(data, np.float32)))
            for i, (ids, data) in enumerate(results)]


def _class_probs(engine: Any, hidden: np.ndarray) -> np.ndarray:
    """The classifier head over final hidden states [..., E]: softmax of the labels' logits,
    or the sigmoid of a one-label model's logit, in float64 (vLLM's classifier pooler)."""
    import jax

    w = np.asarray(jax.device_get(engine.runner.state["score"]["kernel"][...]), np.float64)
    logits = np.asarray(hidden, np.float64) @ w
    if logits.shape[-1] == 1:
        return 1.0 / (1.0 + np.exp(-logits))
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _no_embedding_options(params: PoolingParams | list[PoolingParams] | None, n: int) -> None:
    for p in per_prompt_params(params, n):
        if p.dimensions is not None or p.normalize is not None:
            raise ValueError("dimensions and normalize apply to embeddings, not to "
                             "classification.")


def per_prompt_params(params: PoolingParams | list[PoolingParams] | None, n: int
                      ) -> list[PoolingParams]:
    """One PoolingParams per prompt (None: the defaults)."""
    from jaxllm.engine.llm import per_prompt

    return [p or PoolingParams() for p in per_prompt(params, n, "PoolingParams")]


def _cross_encode(engine: Any, texts_1: list[Any], texts_2: list[Any],
                  params: PoolingParams | None, lora_request: Any) -> list[ScoringRequestOutput]:
    """``score`` on a one-label sequence classifier (a cross-encoder, as vLLM's rerankers):
    each pair as one prompt, the tokenizer's pair encoding of the two texts (token-id inputs:
    the two lists joined), its score the sigmoid of the classifier's logit."""
    n = engine.model_config.num_labels
    if n != 1:
        raise ValueError(f"score() on a sequence classifier needs a one-label model (a "
                         f"cross-encoder); this one has {n} labels: use classify().")
    if len(texts_1) == 1:
        texts_1 = texts_1 * len(texts_2)
    tok = engine.tokenizer
    prompts = []
    for a, b in zip(texts_1, texts_2):
        (text_a, ids_a), (text_b, ids_b) = engine.prompt_inputs(a), engine.prompt_inputs(b)
        if text_a is not None and text_b is not None and tok is not None:
            ids = list(tok(text_a, text_pair=text_b)["input_ids"])
        else:
            ids = ids_a + ids_b
        prompts.append({"prompt_token_ids": ids})
    return [ScoringRequestOutput(request_id=f"score-{i}",
                                 outputs=ScoringOutput(score=o.outputs.probs[0]),
                                 prompt_token_ids=o.prompt_token_ids)
            for i, o in enumerate(classify(engine, prompts, params, lora_request))]
