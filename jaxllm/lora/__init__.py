"""LoRA adapters (vLLM's ``enable_lora``): PEFT adapters served beside the base model.

``request.LoRARequest`` names an adapter; ``peft`` reads one; ``layers`` holds the model's
device slots and the delta each projection adds; ``manager`` keeps adapters in host memory
and slots.
"""

from jaxllm.lora.request import LoRARequest

__all__ = ["LoRARequest"]
