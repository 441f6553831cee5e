"""Qwen2 (dense; the small ones serve as draft models): the Llama decoder with biases on the query, key and
value projections (none on the output projection)."""

from __future__ import annotations

from localmoe.models.args import ModelArgs
from localmoe.models.llama import Attention, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def make_attention(self, args: ModelArgs, layer: int) -> Attention:
        return Attention(args, layer, qkv_bias=True)
