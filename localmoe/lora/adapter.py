"""PEFT's LoRA adapter format, read onto a model's LoRA weights (lora/layers.py).

A PEFT adapter directory holds adapter_config.json (r, lora_alpha, use_rslora, target_modules, ...) and
adapter_model.safetensors with `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]
per adapted module. Module names are the checkpoint's, so the model's own `map_weight` says where each lands
(q_proj into qkv_proj's rows, `experts.{e}.w1` into expert e's gate rows). Routed experts fused in one parameter
(transformers 5's `experts.gate_up_proj` / `down_proj`, adapted through PEFT's `target_parameters`) come as one
pair for all experts, A [E * r, in] and B [out, r * E] (expert e: A's rows e*r.., B's columns e, e+E, ...); when
both are adapted PEFT nests one wrapper in the other (`experts.base_layer.lora_A`), so which parameter a pair
belongs to is read from its shapes.

What LocalMoE does not serve is refused by name: other PEFT methods, DoRA, LoRA biases, modules_to_save, embedding
or output-head LoRA, per-module rank or alpha patterns, a rank above --max-lora-rank.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from localmoe.lora.layers import LoraWeights

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
_ids = itertools.count(1)


class AdapterError(ValueError):
    """An adapter that cannot be served, with the reason."""


@dataclass(frozen=True)
class LoraPiece:
    """One factor pair, ready to write into a slot: weights.write(slot, index, piece, a, b)."""

    weights: LoraWeights
    index: int | slice | tuple
    piece: int
    a: torch.Tensor
    b: torch.Tensor  # scaled


@dataclass(eq=False)
class LoraAdapter:
    name: str
    path: str
    rank: int
    pieces: list[LoraPiece]
    lora_int_id: int = field(default_factory=lambda: next(_ids))  # unique per load: keys the prefix cache


def load_adapter(name: str, path: str | Path, model: nn.Module, targets: dict[str, LoraWeights],
                 max_rank: int) -> LoraAdapter:
    """Read the PEFT adapter at `path` for `model` (whose LoRA weights are `targets`, by parameter name)."""
    directory = Path(path)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        tensors = load_file(directory / WEIGHTS_FILE)
    except (OSError, ValueError) as error:
        raise AdapterError(f"LoRA adapter {name!r}: cannot read {CONFIG_FILE} and {WEIGHTS_FILE} in {directory}: "
                           f"{error}") from None
    rank = _check_config(name, config, max_rank)
    scale = config.get("lora_alpha", rank) / (math.sqrt(rank) if config.get("use_rslora") else rank)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise AdapterError(f"LoRA adapter {name!r}: tensor {key} is not a LoRA factor of a linear layer or "
                               "experts (embedding LoRA, modules_to_save and DoRA are not supported)")
        pairs.setdefault(match[1], {})[match[2]] = tensor.float()
    pieces: list[LoraPiece] = []
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"LoRA adapter {name!r}: {module} lacks lora_{'A' if 'B' in pair else 'B'}")
        pieces += _place(name, module.replace(".base_layer", ""), pair["A"], pair["B"] * scale, model, targets)
    if not pieces:
        raise AdapterError(f"LoRA adapter {name!r}: {WEIGHTS_FILE} holds no LoRA factors")
    return LoraAdapter(name, str(directory), rank, pieces)


def _check_config(name: str, config: dict, max_rank: int) -> int:
    refusals = [
        (config.get("peft_type", "LORA") != "LORA", f"peft_type {config.get('peft_type')!r} (only LORA is served)"),
        (bool(config.get("modules_to_save")), f"modules_to_save {config.get('modules_to_save')} (whole modules "
         "trained beside the adapter) is not supported"),
        (bool(config.get("use_dora")), "use_dora: DoRA is not supported"),
        (bool(config.get("lora_bias")), "lora_bias: LoRA biases are not supported"),
        (bool(config.get("rank_pattern")) or bool(config.get("alpha_pattern")),
         "rank_pattern / alpha_pattern (per-module ranks or alphas) are not supported"),
        (bool(config.get("trainable_token_indices")), "trainable_token_indices (embedding rows) are not supported"),
        (not isinstance(config.get("r"), int) or config["r"] < 1,
         f"r must be a positive integer, got {config.get('r')}"),
    ]
    for bad, message in refusals:
        if bad:
            raise AdapterError(f"LoRA adapter {name!r}: {message}")
    if config["r"] > max_rank:
        raise AdapterError(f"LoRA adapter {name!r}: rank {config['r']} is above --max-lora-rank {max_rank}")
    return config["r"]


def _place(name: str, module: str, a: torch.Tensor, b: torch.Tensor, model: nn.Module,
           targets: dict[str, LoraWeights]) -> list[LoraPiece]:
    """Where one module's factors go among `targets`."""
    if module.endswith(".experts"):
        return _place_fused_experts(name, module, a, b, model, targets)
    mapped = list(model.map_weight(f"{module}.weight", b))
    if len(mapped) != 1 or mapped[0][0] not in targets:
        raise AdapterError(f"LoRA adapter {name!r}: {module} is not a layer LocalMoE adapts (the attention and MLP "
                           "projections and the routed experts are; embeddings, the output head and routers are not)")
    param, placed, piece = mapped[0]
    _check_layout(name, module, placed, b)
    weights = targets[param]
    index, rows = (piece if isinstance(piece, tuple) else (piece, None)) if weights.num_experts is not None \
        else ((), piece)
    which = 0 if rows is None else weights.pieces.index(rows)
    _check_shapes(name, module, a, b, weights.in_features, len(range(weights.out_features)[weights.pieces[which]]))
    return [LoraPiece(weights, index, which, a, b)]


def _place_fused_experts(name: str, module: str, a: torch.Tensor, b: torch.Tensor, model: nn.Module,
                         targets: dict[str, LoraWeights]) -> list[LoraPiece]:
    for parameter in ("gate_up_proj", "down_proj"):
        mapped = list(model.map_weight(f"{module}.{parameter}", b))
        weights = targets.get(mapped[0][0]) if len(mapped) == 1 else None
        if weights is None or weights.num_experts is None:
            continue
        _check_layout(name, module, mapped[0][1], b)
        experts = weights.num_experts
        if a.shape[-1] == weights.in_features and b.shape[0] == weights.out_features and a.shape[0] % experts == 0:
            rank = a.shape[0] // experts
            per_a = a.reshape(experts, rank, -1)
            per_b = b.reshape(b.shape[0], rank, experts).permute(2, 0, 1)  # [E, out, r]
            # B's rows of every piece (gate and up) under the same A: each piece its own rank block
            return [LoraPiece(weights, slice(None), i, per_a, per_b[:, rows]) for i, rows in enumerate(weights.pieces)]
    raise AdapterError(f"LoRA adapter {name!r}: the factors of {module} (A {tuple(a.shape)}, B {tuple(b.shape)}) "
                       "fit neither its fused gate_up_proj nor its down_proj")


def _check_layout(name: str, module: str, placed: torch.Tensor, b: torch.Tensor) -> None:
    """The family loads this weight as the checkpoint stores it: a layout the loader rearranges (gpt-oss's
    transposed, interleaved experts) would need its factors rearranged too, which is not done."""
    if placed is not b:
        raise AdapterError(f"LoRA adapter {name!r}: {module} is rearranged when this family loads it; LoRA on it is "
                           "not supported")


def _check_shapes(name: str, module: str, a: torch.Tensor, b: torch.Tensor, in_features: int, rows: int) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape != (rows, a.shape[0]):
        raise AdapterError(f"LoRA adapter {name!r}: the factors of {module} (A {tuple(a.shape)}, B "
                           f"{tuple(b.shape)}) do not fit its {in_features} inputs and {rows} outputs")
