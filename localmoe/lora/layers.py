"""LoRA applied to a loaded model from outside, for a batch whose tokens run under different adapters.

y = W x + scale * B (A x) per token, with each token's adapter (S-LoRA / Punica's idea, in plain PyTorch): every
adaptable weight gets stacked factors, one set per slot (`--max-loras` adapters resident at once), and a step runs
each slot's low-rank update over that slot's rows only; tokens of the base model skip it. Shapes: S slots, R the
rank room of a weight (`--max-lora-rank` per piece), E experts.

- Linear layers (q/k/v, o, the dense and shared MLPs' projections, routers): A [S, R, in], B [S, out, R]. A merged
  projection (qkv_proj, gate_up_proj) holds one rank block per piece, B's rows of a piece only in its block, so
  q, k and v keep their own factors and one matmul still serves them all.
- Routed experts on the grouped path: per expert A [S, E, R, in], B [S, E, out, R], applied to each (token,
  expert) pair inside the experts' own computation (layers/moe.py `pair_outputs`), gate/up blocks as above.

The scale is folded into B when an adapter is written into a slot. Factors are allocated the first time an adapter
touches a weight, so a model whose adapters leave the experts alone holds no expert factors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from localmoe.layers.linear import Linear, MergedLinear
from localmoe.layers.moe import GroupedExperts, GroupedPathExperts, SparseMoE, pair_outputs


@dataclass
class LoraBatch:
    """The step's tokens by slot, shared by every LoRA layer of a model (set once per step)."""

    token_slots: torch.Tensor | None = None  # [T] each token's slot, -1 for the base model
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # slot -> the rows of its tokens

    def set(self, token_slots: list[int], device: torch.device) -> None:
        self.token_slots = torch.tensor(token_slots, dtype=torch.long, device=device)
        self.rows = {slot: torch.nonzero(self.token_slots == slot).flatten() for slot in set(token_slots) if slot >= 0}


class LoraWeights:
    """One weight's stacked factors: A [S, *experts, R * pieces, in], B [S, *experts, out, R * pieces]."""

    def __init__(self, num_slots: int, rank: int, pieces: list[slice], in_features: int, out_features: int,
                 num_experts: int | None, dtype: torch.dtype, device: torch.device) -> None:
        """`pieces`: the rows of each piece of a merged weight (one rank block each)."""
        self.num_slots, self.rank, self.pieces = num_slots, rank, pieces
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts
        self.dtype, self.device = dtype, device
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self.filled: set[int] = set()  # slots whose adapter has factors here

    def clear(self, slot: int) -> None:
        if slot in self.filled:
            self.a[slot].zero_()
            self.b[slot].zero_()
            self.filled.discard(slot)

    def write(self, slot: int, index: int | slice | tuple, piece: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Factors a [.., r, in] and scaled b [.., piece's rows, r] into `slot`, at expert `index` (() for a linear
        layer; a slice for all experts at once), in the rank block of `piece`."""
        if self.a is None:
            experts = () if self.num_experts is None else (self.num_experts,)
            width = self.rank * len(self.pieces)
            self.a = torch.zeros(self.num_slots, *experts, width, self.in_features, dtype=self.dtype,
                                 device=self.device)
            self.b = torch.zeros(self.num_slots, *experts, self.out_features, width, dtype=self.dtype,
                                 device=self.device)
        r, start = a.shape[-2], piece * self.rank
        self.a[slot][index][..., start:start + r, :] = a.to(self.device, self.dtype)
        self.b[slot][index][..., self.pieces[piece], start:start + r] = b.to(self.device, self.dtype)
        self.filled.add(slot)


class LoraLinear(nn.Module):
    """A linear layer plus each slot's update on its rows."""

    def __init__(self, base: Linear, weights: LoraWeights, batch: LoraBatch) -> None:
        super().__init__()
        self.base, self.lora, self.batch = base, weights, batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        lora = self.lora
        for slot, rows in self.batch.rows.items():
            if slot in lora.filled:
                y.index_add_(0, rows, (x[rows] @ lora.a[slot].T) @ lora.b[slot].T)
        return y


class LoraExperts(GroupedPathExperts):
    """Plain grouped experts whose (token, expert) pairs also get their token's slot's update of that expert (not a
    GroupedExperts: the experts pass, experts/runtime.py, leaves it on the grouped path)."""

    def __init__(self, experts: GroupedExperts, w13: LoraWeights, w2: LoraWeights, batch: LoraBatch) -> None:
        super().__init__()
        self.base = experts
        self.num_experts, self.activation = experts.num_experts, experts.activation
        self.w13_bias, self.w2_bias = experts.w13_bias, experts.w2_bias
        self.lora = {"w13": w13, "w2": w2}
        self.batch = batch

    def weights_of(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.w13[index], self.base.w2[index]

    def partial(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return pair_outputs(x, ids, self.num_experts, self.expert, self.activation, self.pair_delta)

    def pair_delta(self, part: str, inputs: torch.Tensor, spans: list[tuple[int, slice]],
                   tokens: torch.Tensor) -> torch.Tensor | None:
        """The update of weight `part` for pairs grouped by expert (`spans`: expert, its rows of `inputs`), whose
        tokens are `tokens`; None where no slot of this step has factors here."""
        lora = self.lora[part]
        slots = [slot for slot in self.batch.rows if slot in lora.filled]
        if not slots:
            return None
        pair_slots = self.batch.token_slots[tokens]
        out = inputs.new_zeros(inputs.shape[0], lora.out_features)
        for slot in slots:
            mine = pair_slots == slot
            for expert, span in spans:
                rows = span.start + torch.nonzero(mine[span]).flatten()
                if len(rows):
                    out[rows] = (inputs[rows] @ lora.a[slot, expert].T) @ lora.b[slot, expert].T
        return out


def apply_lora(model: nn.Module, num_slots: int, rank: int, batch: LoraBatch) -> dict[str, LoraWeights]:
    """Wrap every linear layer of the decoder (not the embedding or the output head) and every plain experts module
    with its LoRA form; returns the factors by the parameter name the loader uses (`map_weight`'s names:
    "layers.0.self_attn.qkv_proj.weight", "layers.0.mlp.experts.w13")."""
    dtype = model.embed_tokens.weight.dtype
    device = model.embed_tokens.weight.device
    targets: dict[str, LoraWeights] = {}
    for path, module in list(model.named_modules()):
        if not path.startswith("layers."):
            continue
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        if isinstance(module, Linear) and not module.keep_dense:  # routers and weights others read stay plain
            pieces = list(module.pieces.values()) if isinstance(module, MergedLinear) else [slice(None)]
            weights = LoraWeights(num_slots, rank, pieces, module.in_features, module.out_features, None, dtype,
                                  device)
            setattr(parent, attr, LoraLinear(module, weights, batch))
            targets[f"{path}.weight"] = weights
        elif isinstance(module, GroupedExperts) and isinstance(parent, SparseMoE):
            num_experts, out13, hidden = module.w13.shape
            gate_up = [slice(0, out13 // 2), slice(out13 // 2, out13)]
            w13 = LoraWeights(num_slots, rank, gate_up, hidden, out13, num_experts, dtype, device)
            w2 = LoraWeights(num_slots, rank, [slice(None)], out13 // 2, hidden, num_experts, dtype, device)
            setattr(parent, attr, LoraExperts(module, w13, w2, batch))
            targets[f"{path}.w13"], targets[f"{path}.w2"] = w13, w2
    return targets
