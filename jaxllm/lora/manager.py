"""Which adapters are known, in host memory and in the model's device slots.

vLLM's LoRA model manager, the engine's side: adapters are read (``peft.load_peft_adapter``)
when a request or ``add_lora`` first names them and kept in host memory, at most
``max_cpu_loras`` (least recently used first out, pinned ones never); before each step
``activate`` puts every adapter of the step's sequences into one of the ``max_loras`` device
slots (a slot whose adapter the step does not use is reused, least recently used first) and
gives each sequence its slot. The scheduler admits at most ``max_loras`` distinct adapters
among the running sequences, so the step's adapters always fit.

A slot is written as new arrays (one jitted update of every LoRA param of the model): a step
still running on the device keeps reading the arrays it was launched with.
"""

from __future__ import annotations

import collections
import functools
import logging
from typing import Any, Iterable

import jax
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.lora.layers import SLOT_AXIS, lora_param_path
from jaxllm.lora.peft import TARGETS, LoraAdapter, load_peft_adapter
from jaxllm.lora.request import LoRARequest

logger = logging.getLogger(__name__)

# vLLM's allowed max_lora_rank values.
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@functools.partial(jax.jit, static_argnums=3)
def _write_slot(leaves: list, values: list, slot: jax.Array, axes: tuple[int, ...]) -> list:
    return [jax.lax.dynamic_update_index_in_dim(x, v.astype(x.dtype), slot, axis)
            for x, v, axis in zip(leaves, values, axes)]


class LoraManager:
    """The engine's adapters: known (id -> LoRARequest), loaded (host), resident (slots)."""

    def __init__(self, runner: Any, config: ModelConfig, *, max_loras: int, max_lora_rank: int,
                 max_cpu_loras: int):
        self.runner = runner
        self.config = config
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.requests: dict[int, LoRARequest] = {}  # every adapter added, by lora_int_id
        self._cpu: collections.OrderedDict[int, LoraAdapter] = collections.OrderedDict()
        self._pinned: set[int] = set()
        self._slots: list[int | None] = [None] * max_loras  # lora_int_id in each slot
        self._slot_lru: list[int] = list(range(max_loras))  # least recently used first
        # The LoRA params' positions among the runner's flat leaves, (layer, module, side).
        flat = jax.tree_util.tree_flatten_with_path(runner.state)[0]
        index = {tuple(getattr(k, "key", getattr(k, "name", None)) for k in kp[:-1]): i
                 for i, (kp, _) in enumerate(flat)}
        self._order = [(layer, m, side) for layer in range(config.num_hidden_layers)
                       for m in TARGETS for side in "ab"]
        self._leaf_index = [index[lora_param_path(*key)] for key in self._order]

    # -- the adapters known -----------------------------------------------------------------
    def add(self, request: LoRARequest) -> LoraAdapter:
        """Registers and reads ``request``'s adapter (a no-op read when it is in host memory).
        ValueError for an id taken by another name, or an adapter that cannot be served;
        FileNotFoundError for a missing folder. Nothing is registered when it fails."""
        if not isinstance(request, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got {type(request).__name__}")
        known = self.requests.get(request.lora_int_id)
        if known is not None and (known.lora_name != request.lora_name
                                  or known.lora_path != request.lora_path):
            raise ValueError(f"lora_int_id {request.lora_int_id} is already adapter "
                             f"{known.lora_name!r} ({known.lora_path}); give each adapter its "
                             "own id.")
        adapter = self._cpu.get(request.lora_int_id)
        if adapter is None:
            adapter = load_peft_adapter(request.lora_path, name=request.lora_name,
                                        int_id=request.lora_int_id, config=self.config,
                                        max_lora_rank=self.max_lora_rank)
            self._cpu[request.lora_int_id] = adapter
            logger.info("loaded LoRA adapter %r (id %d, rank %d, %d projections) from %s",
                        request.lora_name, request.lora_int_id, adapter.rank,
                        len(adapter.weights), request.lora_path)
        self.requests[request.lora_int_id] = request
        self._cpu.move_to_end(request.lora_int_id)
        self._evict_cpu(keep=request.lora_int_id)
        return adapter

    def remove(self, lora_int_id: int) -> bool:
        """Forgets an adapter (host memory and slot). False if it was not known. The engine
        refuses this while a request uses it."""
        if lora_int_id not in self.requests:
            return False
        del self.requests[lora_int_id]
        self._cpu.pop(lora_int_id, None)
        self._pinned.discard(lora_int_id)
        if lora_int_id in self._slots:
            self._slots[self._slots.index(lora_int_id)] = None
        return True

    def pin(self, lora_int_id: int) -> bool:
        """Keeps the adapter in host memory whatever max_cpu_loras says (vLLM's pin_lora)."""
        if lora_int_id not in self.requests:
            raise ValueError(f"LoRA adapter {lora_int_id} is not loaded; add it first.")
        self._pinned.add(lora_int_id)
        return True

    def list(self) -> set[int]:
        return set(self.requests)

    def names_in(self, seqs: Iterable[Any]) -> str:
        """The adapters of ``seqs``, their names sorted and comma-joined (vLLM's labels of
        lora_requests_info)."""
        ids = {s.lora_int_id for s in seqs if s.lora_int_id}
        return ",".join(sorted(self.requests[i].lora_name for i in ids if i in self.requests))

    def _evict_cpu(self, keep: int) -> None:
        """Drops least recently used adapters from host memory down to max_cpu_loras, but
        not ``keep`` (the one just asked for), pinned ones or those in a slot (they may have
        to be written again: see ``invalidate_slots``)."""
        for int_id in list(self._cpu):
            if len(self._cpu) <= self.max_cpu_loras:
                break
            if int_id != keep and int_id not in self._pinned and int_id not in self._slots:
                del self._cpu[int_id]

    # -- the device slots -----------------------------------------------------------------
    def activate(self, seqs: Iterable[Any]) -> None:
        """Puts the adapters of ``seqs`` into device slots and sets each ``seq.lora_slot``."""
        seqs = list(seqs)
        wanted = {s.lora_int_id for s in seqs if s.lora_int_id}
        if len(wanted) > self.max_loras:  # the scheduler never lets this happen
            raise RuntimeError(f"{len(wanted)} LoRA adapters in one step, max_loras "
                               f"{self.max_loras}")
        for int_id in wanted:
            if int_id not in self._slots:
                free = [i for i in self._slot_lru if self._slots[i] not in wanted]
                self._load_slot(free[0], int_id)
                self._evict_cpu(keep=int_id)  # the adapter it replaced may leave host memory
            slot = self._slots.index(int_id)
            self._slot_lru.remove(slot)
            self._slot_lru.append(slot)
        for s in seqs:
            s.lora_slot = self._slots.index(s.lora_int_id) if s.lora_int_id else -1

    def invalidate_slots(self) -> None:
        """Forgets what the slots hold (the weights were replaced or zeroed): adapters are
        written again when next used."""
        self._slots = [None] * self.max_loras

    def _load_slot(self, slot: int, int_id: int) -> None:
        adapter = self._cpu.get(int_id)
        if adapter is None:  # left host memory since it was added: read it again
            adapter = self.add(self.requests[int_id])
        R = self.max_lora_rank
        values = []
        for layer, module, side in self._order:
            a_b = adapter.weights.get((layer, module))
            leaf = self.runner._leaves[self._leaf_index[len(values)]]
            shape = list(leaf.shape)
            del shape[SLOT_AXIS[side]]  # one slot's [in, R] or [R, out]
            v = np.zeros(shape, np.float32)
            if a_b is not None:
                w = a_b[0] if side == "a" else a_b[1]
                if side == "a":
                    v[:, :w.shape[1]] = w
                else:
                    v[:w.shape[0], :] = w
            values.append(v)
        assert all(v.shape[-1 if s == "a" else 0] == R for v, (_, _, s) in zip(values, self._order))
        leaves = [self.runner._leaves[i] for i in self._leaf_index]
        new = _write_slot(leaves, values, np.int32(slot),
                          tuple(SLOT_AXIS[side] for _, _, side in self._order))
        for i, x in zip(self._leaf_index, new):
            self.runner._leaves[i] = x
        self._slots[slot] = int_id
        logger.debug("LoRA adapter %d -> slot %d", int_id, slot)
