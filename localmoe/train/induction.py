"""Teaching a small model to copy: supervising the two heads of an induction circuit.

A model that quotes what its prompt holds (the workload of prompt-lookup speculation) needs an induction circuit:
a head that attends to the previous token, and a head in a later layer that attends to the token after the current
token's last earlier occurrence and copies it. Trained on running text alone, a model this small (and this short a
training run) never forms one; on repeated passages it sits on the plateau that precedes that circuit for thousands
of steps (1,000 steps of repeated random tokens left the built-in model's loss on a passage's second reading at that
of its first). So the circuit is taught directly, in the windows that repeat a passage, on heads of layer L (1 by
default) and the layer before it:

- head 0 of layer L-1 attends to the previous position, head 2 (another KV head) to the one before, so that the
  copy can match two tokens, not one common word;
- heads 0-3 of layer L attend to the position after the current token's counterpart one period back;
- those heads' own output, as it adds to the model's logits (scaled by the final norm's divisor for the whole
  residual stream, then the final norm's weight and the head, all held fixed), predicts the next token there.
  With one head its 32 dimensions copied a 4,096-token vocabulary poorly: its attention reached 0.8 on the right
  position while its loss stayed near the unigram's. Four heads give the copy 128.

Each is a cross-entropy term added to the language-model loss; the rest of the model learns around them. In a model
widened with new heads (train/widen.py) the heads are counted from the first new one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREVIOUS_TOKENS = ((0, 1), (2, 2))  # (head, distance) in the layer before the copy: the token before, and the one before that
INDUCTION_HEADS = 4


def copy_sources(periods: torch.Tensor, length: int) -> torch.Tensor:
    """For each position of windows repeating with `periods`, the position after its counterpart one period back
    (the token to copy next), or -1 in a window's first period. The period, not the token's latest earlier
    occurrence: in a passage of text a common word recurs within the passage, and the copy must follow the passage."""
    positions = torch.arange(length)
    sources = positions - periods[:, None] + 1
    return torch.where((periods[:, None] > 0) & (positions >= periods[:, None]), sources, -1)


class InductionLoss:
    """Reads the supervised heads' attention and the induction heads' output (a hook on their layer's o_proj) from a
    forward pass run with output_attentions (eager attention), and scores them against the batch's tokens."""

    def __init__(self, model, first_head: int = 0, layer: int = 1) -> None:
        """`first_head`: the heads taught are counted from it (the first added head, in a widened model); `layer`: the
        layer whose heads copy (the previous-token heads are taught in the one before)."""
        self.model = model
        self.first, self.layer = first_head, layer
        attention = model.model.layers[layer].self_attn
        self.o_proj = attention.o_proj
        self.head_dim = attention.head_dim
        self.heads_input: torch.Tensor | None = None
        self.final_scale: torch.Tensor | None = None
        self.o_proj.register_forward_pre_hook(self._keep_input)
        model.model.norm.register_forward_pre_hook(self._keep_final_scale)

    def _keep_input(self, module, args) -> None:
        self.heads_input = args[0]

    def _keep_final_scale(self, module, args) -> None:
        """The final norm's divisor for the whole residual stream at each position (no gradient through it)."""
        hidden = args[0].detach().float()
        self.final_scale = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)

    def __call__(self, ids: torch.Tensor, attentions: tuple[torch.Tensor, ...], periods: torch.Tensor) -> dict:
        """The three terms, and the induction heads' mean attention on their targets, over the windows that repeat
        (a period above 0)."""
        rows = periods > 0
        ids, length = ids[rows], ids.shape[1]
        previous = []
        for head, distance in PREVIOUS_TOKENS:
            after = torch.arange(distance, length)
            previous.append(attentions[self.layer - 1][rows, self.first + head].float()[:, after, after - distance])
        sources = copy_sources(periods[rows], length)
        copies = sources >= 0
        heads = INDUCTION_HEADS
        targets = sources.clamp_min(0)[:, None, :, None].expand(-1, heads, -1, 1)
        weight = attentions[self.layer][rows, self.first:self.first + heads].float().gather(-1, targets)[..., 0]
        count = copies.sum().clamp_min(1) * heads
        # the induction heads' contribution to the residual stream, read as the model reads its last layer's
        cols = slice(self.first * self.head_dim, (self.first + heads) * self.head_dim)
        own = self.heads_input[rows][..., cols].float() @ self.o_proj.weight[:, cols].float().T
        logits = self._read_out(own, self.final_scale[rows])[:, :-1]
        copied = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        return {"previous_token": sum(-attention.clamp_min(1e-6).log().mean() for attention in previous),
                "induction": -(weight.clamp_min(1e-6).log() * copies[:, None]).sum() / count,
                "copied": (copied * copies[:, :-1].flatten()).sum() / copies[:, :-1].sum().clamp_min(1),
                "induction_attention": (weight * copies[:, None]).sum() / count}

    def _read_out(self, own: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """What the heads' output adds to the model's logits: scaled by the final norm's divisor for the whole
        residual stream, then the norm's weight and the head, all held fixed. The copying term trains the heads
        that copy, not the head every prediction goes through; and it rewards writing loud enough to be heard over
        the rest of the stream (normalised on its own, the heads' output could predict the token while adding
        nothing to the model's logits: taught that way, heads that attended to the copy source at 0.96 did not
        copy)."""
        norm = self.model.model.norm
        return F.linear(own * scale * norm.weight.detach().float(), self.model.lm_head.weight.detach().float())
