"""LocalMoE's own architecture: the Mixtral decoder with a choice of how its MoE layers route.

config.json (`model_type` "localmoe") adds to Mixtral's keys:
- `routing`: `topk_softmax` (Mixtral's: each token its k best experts by softmax score, renormalised),
  `expert_choice` (each expert its best tokens, Zhou et al. 2022), `soft_moe` (experts run on slots that are
  soft mixtures of the tokens, Puigcerver et al. 2023; `slots_per_expert`, default 1) or `hash` (a fixed
  hash of the token id, Roller et al. 2021). The routers are in layers/routing.py.
- `capacity_factor`: null/absent, or a cap on the tokens an expert takes (Switch / GShard token dropping; for
  expert choice it scales how many tokens each expert picks).

Expert choice, soft MoE and capacity limits compare tokens, only ever those of one sequence in the step
(layers/segments.py), so a request's output does not depend on what else is batched with it; it does depend on
how its tokens are split into steps (prompt chunks, the prefix cache, one decoded token at a time). Hash routing
needs the step's token ids. So the decoder layers hand both to their MoE block.

Checkpoint names are Mixtral's (`block_sparse_moe.gate`, `.experts.{e}.w1/w2/w3`); hash routing has no gate,
soft MoE has its slot parameters `block_sparse_moe.phi` [D, E * slots] in place of the gate.
"""

from __future__ import annotations

import torch
from torch import nn

from localmoe.config import ROUTINGS
from localmoe.layers.attention import AttentionMetadata
from localmoe.layers.moe import SparseMoE
from localmoe.layers.routing import drop_over_capacity, expert_choice, hash_topk, soft_moe_weights
from localmoe.layers.segments import Segments
from localmoe.models.args import ModelArgs
from localmoe.models.mixtral import MixtralForCausalLM

TOKEN_MIXING = ("expert_choice", "soft_moe")  # routings where one token's route depends on the others


class LocalMoEBlock(SparseMoE):
    """Shapes: T tokens, D hidden, E experts, S slots per expert (soft MoE), B sequences in the step."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args.hidden_size, args.intermediate_size, args.num_local_experts, args.num_experts_per_tok)
        self.routing = args.routing
        self.capacity_factor = args.capacity_factor
        self.slots_per_expert = args.slots_per_expert
        if self.routing not in ROUTINGS:
            raise ValueError(f"config.json routing {self.routing!r} is not one of {', '.join(ROUTINGS)}")
        if self.capacity_factor is not None and (self.routing == "soft_moe" or self.capacity_factor <= 0):
            raise ValueError("config.json capacity_factor must be positive, and null with soft_moe routing")
        if self.routing in ("hash", "soft_moe"):
            self.gate = None
        if self.routing == "soft_moe":  # Phi: one learned vector per slot
            self.phi = nn.Parameter(torch.empty(args.hidden_size, self.num_experts * self.slots_per_expert))

    @property
    def token_choice(self) -> bool:
        return self.routing not in TOKEN_MIXING

    @property
    def plain_top_k(self) -> bool:
        return self.routing == "topk_softmax" and self.capacity_factor is None

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, segments: Segments) -> torch.Tensor:
        if self.routing == "soft_moe":
            return self.soft_moe(x, segments)
        if self.routing == "expert_choice":
            return self.dispatch(x, *expert_choice(self.gate(x), segments, self.top_k, self.capacity_factor or 1.0))
        if self.routing == "hash":
            weights, expert_ids = hash_topk(token_ids, self.num_experts, self.top_k)
        else:
            weights, expert_ids = self.route(x)
        if self.capacity_factor is not None:
            weights, expert_ids = drop_over_capacity(weights, expert_ids, segments, self.num_experts,
                                                     self.capacity_factor)
        return self.dispatch(x, weights, expert_ids)

    def soft_moe(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        """Each sequence's slots take convex mixtures of its tokens, expert e runs on its S slots, and each token
        takes a convex mixture of its sequence's slot outputs. The experts count slots, not tokens."""
        to_slots, from_slots = soft_moe_weights(x @ self.phi, segments)  # [B, E*S, L], [T, E*S]
        num_seqs = to_slots.shape[0]
        slot_inputs = torch.bmm(to_slots.to(x.dtype), segments.pad(x, 0.0)).flatten(0, 1)  # [B*E*S, D]
        slot_experts = torch.arange(self.num_experts, device=x.device).repeat_interleave(self.slots_per_expert)
        slot_experts = slot_experts.repeat(num_seqs)[:, None]  # [B*E*S, 1]
        ones = torch.ones(slot_experts.shape, dtype=torch.float32, device=x.device)
        slot_outputs = self.experts(slot_inputs, ones, slot_experts).view(num_seqs, -1, x.shape[1])
        return torch.bmm(from_slots.to(x.dtype).unsqueeze(1), slot_outputs[segments.seq]).squeeze(1)


class LocalMoEForCausalLM(MixtralForCausalLM):
    def make_mlp(self, args: ModelArgs, layer: int) -> nn.Module:
        return LocalMoEBlock(args)

    def mlp_inputs(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> tuple:
        """Hash routing reads the token ids; routers that compare tokens do it within each sequence."""
        return input_ids, Segments.of(meta.token_seq)
