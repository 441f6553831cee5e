"""Llama / Mistral decoder (dense), the skeleton the MoE families reuse.

A layer is pre-norm attention then pre-norm feed-forward, each added to the residual stream.
Forward works on the step's flat batch: input_ids and positions are [T].
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

Piece = int | slice | tuple | None  # where a checkpoint tensor goes inside a parameter

from localmoe.layers.attention import AttentionMetadata, paged_attention
from localmoe.layers.linear import Linear, MergedLinear
from localmoe.layers.norm import RMSNorm
from localmoe.layers.rotary import rotary_embedding
from localmoe.models.args import ModelArgs


def layer_sliding_window(args: ModelArgs, layer: int) -> int | None:
    """The attention window of one layer: `layer_types` names it per layer (transformers 5, gpt-oss);
    otherwise `sliding_window` applies to every layer unless `use_sliding_window` is false (Qwen)."""
    if args.layer_types is not None:
        return args.sliding_window if args.layer_types[layer] == "sliding_attention" else None
    return args.sliding_window if args.use_sliding_window else None


class Attention(nn.Module):
    """Options some families add: biases on the q/k/v projections only (Qwen2); QK-norm, an RMSNorm on
    queries and keys before rotary, over each head ("head", Qwen3) or the whole projection ("full", OLMoE);
    q, k and v clamped to +-clip_qkv after it (OLMoE's config)."""

    def __init__(self, args: ModelArgs, layer: int, sinks: bool = False, qkv_bias: bool | None = None,
                 qk_norm: Literal["head", "full"] | None = None) -> None:
        super().__init__()
        d, bias = args.hidden_size, args.attention_bias
        self.num_heads, self.num_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = args.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = MergedLinear(d, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size},
                                     bias=bias if qkv_bias is None else qkv_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, d, bias=bias)
        self.q_norm = self.k_norm = None
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim if qk_norm == "head" else q_size, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim if qk_norm == "head" else kv_size, args.rms_norm_eps)
        self.clip_qkv = args.clip_qkv
        self.rotary = rotary_embedding(self.head_dim, args.max_position_embeddings, args.rope)
        self.scale = self.head_dim**-0.5
        self.sliding_window = layer_sliding_window(args, layer)
        # a learned logit per head joining the softmax (gpt-oss's attention sinks, see layers/attention.py)
        self.sinks = nn.Parameter(torch.empty(self.num_heads)) if sinks else None

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """What this layer keeps per cached token: a key and a value per KV head."""
        return (2, num_blocks, self.num_kv_heads, block_size, self.head_dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        if self.q_norm is not None:
            qkv = self.normalize_qk(qkv)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        qkv = qkv.view(t, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        qk = self.rotary(positions, qkv[:, : self.num_heads + self.num_kv_heads])  # query and key heads at once
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.num_heads + self.num_kv_heads:]
        out = paged_attention(q, k, v, kv_cache, meta, self.scale, self.sliding_window, self.sinks)
        return self.o_proj(out.reshape(t, -1))

    def normalize_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        """QK-norm on the merged projection [T, q + k + v]: each norm spans as many features as its weight."""
        t = qkv.shape[0]
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        q = self.q_norm(q.reshape(t, -1, self.q_norm.weight.shape[0])).reshape(t, -1)
        k = self.k_norm(k.reshape(t, -1, self.k_norm.weight.shape[0])).reshape(t, -1)
        return torch.cat([q, k, v], dim=-1)


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        sizes = {"gate_proj": intermediate_size, "up_proj": intermediate_size}
        self.gate_up_proj = MergedLinear(hidden_size, sizes, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, mlp: nn.Module, attention: nn.Module | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer) if attention is None else attention
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = mlp

    def forward(self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None, kv_cache: torch.Tensor,
                meta: AttentionMetadata, *mlp_inputs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """h: the previous layer's MLP output, not yet added to the residual stream `residual` (None before the
        first layer; each norm adds its input to the stream, see RMSNorm.add). Returns this layer's (MLP output,
        stream). `mlp_inputs` go to the MLP after its input (the built-in model's routers take the token ids)."""
        x, residual = self.input_layernorm.add(h, residual)
        x, residual = self.post_attention_layernorm.add(self.self_attn(positions, x, kv_cache, meta), residual)
        return self.mlp(x, *mlp_inputs), residual


class LlamaForCausalLM(nn.Module):
    # config.json fields this family cannot do without beyond every decoder's (ModelArgs.from_hf checks them)
    required_fields: tuple[str, ...] = ()

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.config = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i, self.make_mlp(args, i), self.make_attention(args, i))
                                    for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.tie_word_embeddings = args.tie_word_embeddings
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()
        # (parent module, checkpoint projection name) -> (merged module, its rows), e.g.
        # ("layers.0.self_attn", "k_proj") -> ("layers.0.self_attn.qkv_proj", slice(512, 768))
        self.merged_rows: dict[tuple[str, str], tuple[str, slice]] = {
            (path.rpartition(".")[0], piece): (path, rows)
            for path, module in self.named_modules() if isinstance(module, MergedLinear)
            for piece, rows in module.pieces.items()
        }

    def tie_weights(self) -> None:
        """Share the embedding with the output head where the checkpoint says so."""
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def make_attention(self, args: ModelArgs, layer: int) -> nn.Module:
        return Attention(args, layer)

    def make_mlp(self, args: ModelArgs, layer: int) -> nn.Module:
        return MLP(args.hidden_size, args.intermediate_size, args.mlp_bias)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """Returns final hidden states [T, D]; logits are computed only where sampling needs them."""
        h, residual = self.embed_tokens(input_ids), None
        mlp_inputs = self.mlp_inputs(input_ids, meta)
        for layer, kv_cache in zip(self.layers, kv_caches):
            h, residual = layer(positions, h, residual, kv_cache, meta, *mlp_inputs)
        return self.norm.add(h, residual)[0]

    def mlp_inputs(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> tuple:
        """What each layer's MLP takes besides its input: nothing here (see the built-in model)."""
        return ()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def map_weight(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor, Piece]]:
        """Translate one checkpoint tensor into (parameter name, tensor, where in the parameter it goes:
        an index into stacked experts or merged rows, None for the whole parameter)."""
        name = name.removeprefix("model.")
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return []
        parent, _, leaf = name.rpartition(".")
        module_path, _, projection = parent.rpartition(".")
        if merged := self.merged_rows.get((module_path, projection)):
            return [(f"{merged[0]}.{leaf}", tensor, merged[1])]
        return [(name, tensor, None)]

    def ignored_weight(self, name: str) -> bool:
        return name.endswith("rotary_emb.inv_freq")
