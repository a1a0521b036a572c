"""``LoRARequest``: which LoRA adapter a request runs with (vLLM's ``vllm.lora.request``)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(eq=False)
class LoRARequest:
    """A LoRA adapter for a request, as vLLM's: ``lora_name`` names it (the server's model
    name), ``lora_int_id`` (>= 1) identifies it across requests (adapters with one id share
    their device slot and their prefix-cache pages), ``lora_path`` is a local PEFT adapter
    folder (``adapter_config.json`` + ``adapter_model.safetensors``) or a Hugging Face hub id.

    Two requests are the same adapter when their names are equal (vLLM's ``__eq__``)."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if (not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool)
                or self.lora_int_id < 1):
            raise ValueError(f"id must be > 0, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"lora_path must name the adapter's folder or hub id, got "
                             f"{self.lora_path!r}")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRARequest) and self.lora_name == other.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)
