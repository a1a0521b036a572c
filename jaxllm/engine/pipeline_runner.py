"""Pipeline parallelism: the model's layers in contiguous stages, one jitted program per stage.

Dimension keys as in model_runner.py; E hidden size.

Stage s runs on its own ``("tp",)`` mesh (sharding/mesh.py: row s of the replica's [pp, tp]
devices) and holds only its layers' params and KV cache (sharding/rules.py places them there
as they load); stage 0 also holds the embedding, the last stage the final norm and the lm_head
(a tied embedding is copied to it). A step is:

    stage 0:   token ids (the previous step's samples where prev_rows says) -> embed -> layers
    stage s:   hidden [T, E] (copied from stage s-1's devices) -> its layers
    last:      ... -> final norm -> logits at logits_indices [S, V]
    sampler:   on the last stage's devices, as without pipelining

Micro-batches: a step with several sequences is split into up to ``pp`` micro-batches of whole
sequences (attention never crosses sequences, so each is an independent ragged batch), each
run through every stage and sampled on its own. All programs are dispatched at once in
micro-batch order; each stage's devices run their queue in order and start micro-batch m as
soon as stage s-1 has handed it over, so stage 0 computes micro-batch m+1 while stage 1 computes
m. Across steps too: when micro-batch m of step N+1 holds the sequences of micro-batch m of
step N (steady decode), it takes its input tokens from that micro-batch's samples alone
(``_prev_for``), so stage 0 starts step N+1 while the last stage finishes step N (vLLM's
"virtual engines" effect, without separate schedulers). The micro-batches' outputs are joined
in row order on the last stage for the host (nothing on stage 0 waits for that join).

Why one program per stage driven by async dispatch, not one SPMD program over the whole mesh
(a scan over stacked layers with ppermute between stages, as in MaxText / praxis): the engine's
model is a plain list of layers with a per-layer KV cache and ragged micro-batches of
different token buckets; stacked layers would change the model code and the cache layout, and
the SPMD pipeline's bubble schedule fixes the micro-batch shape at compile time. Separate
programs keep each stage's compile to its own layers, let each micro-batch use its own bucket,
and JAX's async dispatch already gives the overlap. The price is one host dispatch per
(stage, micro-batch) and no overlap across hosts (multi-host runs tensor parallelism only).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.engine import sampler as sampler_lib
from jaxllm.models.llama import embed, final_logits
from jaxllm.engine.model_runner import (ModelRunner, StepInputs, _sample_padded, _traced_over_heads,
                                        step_jit_options, zeros_kv_cache)


def _stage_forward(treedef, graphdefs, inv_freqs, first: bool, last: bool, tied: bool,
                   config, leaves, kv_caches, h, positions, md, logits_indices, token_ids,
                   prev_rows, prev_tokens):
    """One stage over one micro-batch. Returns (kv_caches, hidden [T, E]) or, on the last
    stage, (kv_caches, logits [S, V] float32)."""
    params = jax.tree.unflatten(treedef, leaves)
    freqs = {f: jnp.asarray(f, jnp.float32) for f in set(inv_freqs)}  # per layer (Gemma 3)
    if first:
        from_prev = prev_tokens[jnp.maximum(prev_rows, 0)]
        ids = jnp.where(prev_rows >= 0, from_prev, token_ids)
        h = embed(nnx.merge(graphdefs["embed"], params["embed"]), ids, config)
    new_kv = []
    for gd, p, kv, f in zip(graphdefs["layers"], params["layers"], kv_caches, inv_freqs):
        h, kv = nnx.merge(gd, p)(h, positions, freqs[f], kv, md)
        new_kv.append(kv)
    if not last:
        return new_kv, h
    h = nnx.merge(graphdefs["norm"], params["norm"])(h)[logits_indices]
    w = params["head"]
    if tied:  # [V, E]
        logits = jnp.einsum("ne,ve->nv", h, w, preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("ne,ev->nv", h, w, preferred_element_type=jnp.float32)
    return new_kv, final_logits(logits, config)


def _assemble(rows: jax.Array, max_num_seqs: int, outs: list, tokens: list):
    """The micro-batches' sampler outputs -> the step's, row i from ``rows[i]`` of their
    concatenation after padding each to max_num_seqs rows; and the step's sampled ids padded to
    [max_num_seqs] (the next step's prev tokens)."""
    def pad(x):
        return jnp.pad(x, [(0, max_num_seqs - x.shape[0])] + [(0, 0)] * (x.ndim - 1))

    out = jax.tree.map(lambda *xs: jnp.concatenate([pad(x) for x in xs], axis=0)[rows], *outs)
    joined = jnp.concatenate(tokens, axis=0)[rows]
    return out, jnp.pad(joined, (0, max_num_seqs - joined.shape[0]))


class PipelineRunner(ModelRunner):
    """ModelRunner with the forward split over ``parallel.pp`` stages (see module docstring)."""

    late_sampling = False  # a step is micro-batches, each forward and sampler in turn

    def __init__(self, model: nnx.Module, *, num_layers: int, num_kv_heads: int, head_dim: int,
                 num_pages: int, page_size: int, max_model_len: int, max_num_seqs: int,
                 token_buckets, cache_dtype: Any, vocab_size: int, max_logprobs: int,
                 parallel: Any, enforce_eager: bool = False,
                 cublas_min_tokens: int | None = None, logprobs_mode: str = "raw_logprobs"):
        self._jit_options = step_jit_options(enforce_eager, parallel.tp > 1)
        # Every stage program keeps XLA's GEMM choice (one jit per stage serves all buckets):
        # fp8 under pipeline parallelism still autotunes its large buckets' Triton GEMMs.
        del cublas_min_tokens
        self.cublas_min_tokens = None
        self._set_step_shape(parallel, None, num_pages=num_pages, page_size=page_size,
                             max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                             token_buckets=token_buckets, vocab_size=vocab_size,
                             max_logprobs=max_logprobs, logprobs_mode=logprobs_mode)
        self.stages = parallel.stages
        self.pp = len(self.stages)
        self.model = model
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.stage_kv = [zeros_kv_cache(len(st.layers), shape, cache_dtype, st.kv_sharding)
                         for st in self.stages]
        tied = model.config.tie_word_embeddings
        self._fwd, self._stage_leaves = [], []
        for s, st in enumerate(self.stages):
            first, last = s == 0, s == self.pp - 1
            gds, params = self._stage_params(model, s)
            leaves, treedef = jax.tree.flatten(params)
            self._stage_leaves.append(leaves)
            fn = functools.partial(_stage_forward, treedef, gds,
                                   tuple(model.layer_inv_freq[i] for i in st.layers), first,
                                   last, tied, model.config)
            self._fwd.append(jax.jit(_traced_over_heads(st.mesh, fn), donate_argnums=(1,),
                                     **self._jit_options))
        self._sample = jax.jit(functools.partial(_sample_padded, max_num_seqs,
                                                 logprobs_mode=self.logprobs_mode),
                               static_argnums=(2, 3), **self._jit_options)
        self._assemble = jax.jit(_assemble, static_argnums=(1,))
        self._prev_parts = None  # last step's per-micro-batch (row start, stop, tokens)
        self.num_prev_from_one_micro_batch = 0  # micro-batches that waited for one, not all
        self._stage0_zeros = jax.device_put(np.zeros((max_num_seqs,), np.int32),
                                            parallel.stages[0].replicated)
        self._prev_tokens = np.zeros((max_num_seqs,), np.int32)
        self.last_host_time = 0.0
        self.publisher = None

    def _stage_params(self, model: nnx.Module, s: int) -> tuple[dict, dict]:
        """Stage ``s``'s (graphdefs, params) of ``model``: its layers, and the embedding on the
        first stage, the final norm and the head on the last."""
        st = self.stages[s]
        tied = model.config.tie_word_embeddings
        gds: dict[str, Any] = {"layers": []}
        params: dict[str, Any] = {"layers": []}
        if s == 0:
            gds["embed"], params["embed"] = nnx.split(model.model.embed_tokens)
        for i in st.layers:
            gd, p = nnx.split(model.model.layers[i])
            gds["layers"].append(gd)
            params["layers"].append(p)
        if s == self.pp - 1:
            gds["norm"], params["norm"] = nnx.split(model.model.norm)
            head = (model.model.embed_tokens.embedding if tied else model.lm_head.kernel)[...]
            path = ("model", "embed_tokens", "embedding") if tied else ("lm_head", "kernel")
            # A tied embedding lives on stage 0; the last stage gets its own copy.
            params["head"] = jax.device_put(head, st.state_path_sharding(path, head.shape))
        return gds, params

    # -- sleep mode and weight updates (ModelRunner's, over every stage) --------------------------
    def _param_tree(self):
        return self._stage_leaves

    def _set_param_tree(self, tree) -> None:
        self._stage_leaves = tree

    def _kv_tree(self):
        return self.stage_kv

    def _set_kv_tree(self, tree) -> None:
        self.stage_kv = tree

    def _model_param_tree(self, model: nnx.Module):
        return [jax.tree.leaves(self._stage_params(model, s)[1]) for s in range(self.pp)]

    def replace_weights(self, model: nnx.Module) -> None:
        super().replace_weights(model)
        self.model = model

    # -- what the engine and tests read ---------------------------------------------------------
    @property
    def state(self) -> nnx.State:
        return nnx.state(self.model)

    @property
    def kv_caches(self):
        """Every layer's (k, v) pages, in layer order (each on its stage's devices)."""
        return [kv for stage in self.stage_kv for kv in stage]

    @property
    def num_compiles(self) -> int:
        return (sum(f._cache_size() for f in self._fwd) + self._sample._cache_size()
                + self._assemble._cache_size())

    # -- the step -------------------------------------------------------------------------------
    def _forward(self, mb: StepInputs, prev: jax.Array) -> jax.Array:
        """Dispatches one micro-batch through every stage; returns its logits [S_m, V] on the
        last stage. ``prev``: the tokens its prev_rows index, on stage 0's devices."""
        h = None
        for s, st in enumerate(self.stages):
            if s > 0:
                h = jax.device_put(h, st.replicated)
            # Only stage 0 reads the token inputs: a device array of another stage's devices
            # must not reach this stage's program.
            first = s == 0
            self.stage_kv[s], h = self._fwd[s](
                self._stage_leaves[s], self.stage_kv[s], h, mb.positions, mb.md,
                mb.logits_indices, mb.token_ids if first else None,
                mb.prev_rows if first else None, prev if first else None)
        return h

    def _prev_for(self, mb: StepInputs) -> tuple[jax.Array, StepInputs]:
        """The previous step's sampled tokens this micro-batch reads, on stage 0's devices.

        When the rows it needs all come from one micro-batch of the previous step (decode with
        the same groups), only that micro-batch's tokens are used, rows re-based: then this
        micro-batch waits for that one alone, not for the whole previous step, and stage 0
        starts step N+1 while the last stage still finishes step N.
        """
        need = mb.prev_rows[mb.prev_rows >= 0]
        if need.size == 0:
            return self._stage0_zeros, mb
        if self._prev_parts is not None:
            lo, hi = int(need.min()), int(need.max())
            for start, stop, tokens in self._prev_parts:
                if start <= lo and hi < stop:
                    self.num_prev_from_one_micro_batch += 1
                    rows = np.where(mb.prev_rows >= 0, mb.prev_rows - start, -1).astype(np.int32)
                    return (jax.device_put(tokens, self.stages[0].replicated),
                            dataclasses.replace(mb, prev_rows=rows))
        return jax.device_put(self._prev_tokens, self.stages[0].replicated), mb

    def run(self, inputs: StepInputs, num_logprobs: int | None, sort: bool):
        prev, inputs = self._prev_for(inputs)
        logits = self._forward(inputs, prev)
        out, self._prev_tokens = self._sample(logits, inputs.sampling, num_logprobs, sort)
        self._prev_parts = None
        return out

    def _warm_up(self, inputs: StepInputs, samplers: bool):
        """``compile_all``'s run of one bucket: the stages once, then (``samplers``) every
        sampler variant on the logits."""
        prev, inputs = self._prev_for(inputs)
        out = logits = self._forward(inputs, prev)
        for nl, sort in self.sampler_variants() if samplers else ():
            out, self._prev_tokens = self._sample(logits, inputs.sampling, nl, sort)
        self._prev_parts = None
        return out

    def _split(self, scheduled: list) -> list[list]:
        """Up to pp contiguous groups of whole sequences with about equal token counts."""
        m = min(self.pp, len(scheduled))
        if m <= 1:
            return [scheduled]
        total = sum(s.num_new_tokens for s in scheduled)
        groups, cur, acc = [], [], 0
        for i, s in enumerate(scheduled):
            cur.append(s)
            acc += s.num_new_tokens
            left = len(scheduled) - i - 1
            if len(groups) < m - 1 and (acc >= total * (len(groups) + 1) / m
                                        or left == m - 1 - len(groups)):
                groups.append(cur)
                cur = []
        if cur:
            groups.append(cur)
        return groups

    def dispatch(self, scheduled, sampling_rows, prompt_next_ids: np.ndarray | None = None):
        if prompt_next_ids is not None:
            raise ValueError("prompt_logprobs is not supported with pipeline_parallel_size > 1.")
        t0 = time.perf_counter()
        nl = sampler_lib.logprobs_width(sampling_rows, self.num_logprobs)
        sort = sampler_lib.needs_sort(sampling_rows, self.vocab_size)
        groups = self._split(scheduled)
        if len(groups) == 1:
            full = self.prepare(scheduled, sampling_rows)
            self.last_host_time = time.perf_counter() - t0
            return self.run(full, nl, sort), None
        # Each micro-batch is sampled on its own (its rows' sampling parameters), so the next
        # step's micro-batch m depends on this step's micro-batch m only (see _prev_for).
        mbs, bounds, i = [], [], 0
        for g in groups:
            mbs.append(self.prepare(g, sampling_rows[i:i + len(g)]))
            bounds.append((i, i + len(g)))
            i += len(g)
        # Step row r = row j of micro-batch m = row m * max_num_seqs + j of the concatenation
        # of the micro-batches' padded outputs.
        S = self.seq_bucket(self.token_bucket(sum(s.num_new_tokens for s in scheduled)))
        rows = np.zeros(S, np.int32)
        for m, (a, b) in enumerate(bounds):
            rows[a:b] = m * self.max_num_seqs + np.arange(b - a)
        self.last_host_time = time.perf_counter() - t0
        outs, parts = [], []
        for mb, (a, b) in zip(mbs, bounds):
            prev, mb = self._prev_for(mb)
            out, tokens = self._sample(self._forward(mb, prev), mb.sampling, nl, sort)
            outs.append(out)
            parts.append((a, b, tokens))
        self._prev_parts = parts
        rows_dev = jax.device_put(rows, self.stages[-1].replicated)
        # The step's output in row order, and its tokens for a following step that is not
        # split the same way: joins on the last stage, which stage 0 does not wait for.
        out, self._prev_tokens = self._assemble(rows_dev, self.max_num_seqs, outs,
                                                [t for _, _, t in parts])
        return out, None
