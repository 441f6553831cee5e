"""The adapters an engine knows by name, and which of them sit in its `--max-loras` slots (least recently used
leaves first) for the step about to run.

Requests hold their adapter object, so one unloaded while its requests run finishes them on the same weights;
slots are written only on the engine's thread, between steps (`activate`). The scheduler admits no more distinct
adapters at once than there are slots (engine/scheduler.py), so every step's adapters fit.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from localmoe.lora.adapter import AdapterError, LoraAdapter, load_adapter
from localmoe.lora.layers import LoraBatch, apply_lora
from localmoe.lora.request import LoRARequest


class LoraManager:
    def __init__(self, model: nn.Module, max_loras: int, max_rank: int) -> None:
        self.model, self.max_loras, self.max_rank = model, max_loras, max_rank
        self.batch = LoraBatch()
        self.targets = apply_lora(model, max_loras, max_rank, self.batch)
        self.adapters: dict[str, LoraAdapter] = {}
        self.resident: OrderedDict[int, tuple[LoraAdapter, int]] = OrderedDict()  # id -> (adapter, slot), LRU first
        self.slot_loads = 0  # adapters written into a slot

    def load(self, name: str, path: str | Path) -> LoraAdapter:
        """Read an adapter and know it by `name`; raises AdapterError."""
        if name in self.adapters:
            raise AdapterError(f"The lora adapter '{name}' has already been loaded.")
        adapter = load_adapter(name, path, self.model, self.targets, self.max_rank)
        self.adapters[name] = adapter
        return adapter

    def unload(self, name: str) -> None:
        if self.adapters.pop(name, None) is None:
            raise AdapterError(f"The lora adapter '{name}' cannot be found.")

    def resolve(self, request: LoRARequest) -> LoraAdapter:
        """The adapter a request names; one not known yet is loaded from the request's lora_path (vLLM's offline
        API names adapters that way)."""
        adapter = self.adapters.get(request.lora_name)
        if adapter is not None:
            return adapter
        if not request.lora_path:
            raise AdapterError(f"The lora adapter '{request.lora_name}' cannot be found.")
        return self.load(request.lora_name, request.lora_path)

    def activate(self, adapters: set[LoraAdapter]) -> None:
        """Put every adapter of the coming step in a slot, evicting the least recently used others."""
        if len(adapters) > self.max_loras:
            raise RuntimeError(f"{len(adapters)} adapters in one step, more than max_loras {self.max_loras}")
        for adapter in adapters:
            if adapter.lora_int_id in self.resident:
                self.resident.move_to_end(adapter.lora_int_id)
                continue
            used = {slot for _, slot in self.resident.values()}
            slot = next((s for s in range(self.max_loras) if s not in used), None)
            if slot is None:
                victim = next(i for i, (held, _) in self.resident.items() if held not in adapters)
                slot = self.resident.pop(victim)[1]
            for weights in self.targets.values():
                weights.clear(slot)
            for piece in adapter.pieces:
                piece.weights.write(slot, piece.index, piece.piece, piece.a, piece.b)
            self.resident[adapter.lora_int_id] = (adapter, slot)
            self.slot_loads += 1

    def set_tokens(self, lora_ids: list[int], device: torch.device) -> None:
        """The step's tokens' adapters (0: the base model), once `activate` has given each a slot."""
        self.batch.set([self.resident[i][1] if i else -1 for i in lora_ids], device)
