"""Qwen2 (dense; the small ones serve as draft models): the Llama decoder with biases on the query, key and
value projections (none on the output projection)."""

from __future__ import annotations

from localmoe.models.llama import Attention, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def make_attention(self, cfg: dict, layer: int) -> Attention:
        return Attention(cfg, layer, qkv_bias=True)
