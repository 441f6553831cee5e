"""Which adapter a request runs with, in vLLM's shape (`vllm.lora.request.LoRARequest`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter by name; `lora_path` loads it on first use where the engine does not know the name yet.
    `lora_int_id` is accepted for vLLM's signature: the engine numbers adapters itself (a name reloaded from
    another path gets a new number, so its prefix-cache blocks are never mistaken for the old one's)."""

    lora_name: str
    lora_int_id: int = 0
    lora_path: str = ""
