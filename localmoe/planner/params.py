"""Parameter counts and KV-cache bytes per token, from a ModelShape.

Counts follow the tensors a checkpoint holds (and transformers' modules build): every
projection, bias, norm weight, router and expert, once. Names used below:
D hidden size, V vocabulary, E experts, I expert intermediate size, H heads, Hkv KV heads, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

from localmoe.planner.shape import AttentionShape, ModelShape, MoeShape


@dataclass(frozen=True)
class ParamCounts:
    embedding: int
    lm_head: int  # 0 when tied to the embedding
    attention: int  # all layers, with the norms and sinks inside attention
    dense_mlp: int  # layers without experts
    routed_experts: int
    shared_experts: int  # with their gates
    routers: int
    norms: int  # two per layer and the final one
    expert: int  # one routed expert of one layer
    num_moe_layers: int
    top_k: int

    @property
    def total(self) -> int:
        return (self.embedding + self.lm_head + self.attention + self.dense_mlp + self.routed_experts
                + self.shared_experts + self.routers + self.norms)

    @property
    def non_expert(self) -> int:
        """Everything but the routed experts: what stays resident when experts are cached."""
        return self.total - self.routed_experts

    @property
    def active(self) -> int:
        """Parameters one token uses: all non-expert ones plus top-k experts in each MoE layer."""
        return self.non_expert + self.top_k * self.expert * self.num_moe_layers

    @property
    def active_without_embedding(self) -> int:
        """`active` without the input embedding table (a lookup, not a matmul), as OpenAI counts."""
        return self.active - (self.embedding if self.lm_head else 0)


def attention_params(a: AttentionShape, hidden: int) -> int:
    """One layer's attention: projections, biases, inner norms (q/kv LoRA norms, QK-norm) and sinks."""
    if a.is_mla:
        qk_dim = a.qk_nope_head_dim + a.qk_rope_head_dim
        if a.q_lora_rank:
            q = hidden * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.num_heads * qk_dim
            q += a.q_lora_rank if a.qkv_bias else 0
        else:
            q = hidden * a.num_heads * qk_dim
        kv_a = a.kv_lora_rank + a.qk_rope_head_dim
        kv = hidden * kv_a + (kv_a if a.qkv_bias else 0) + a.kv_lora_rank
        kv += a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim)
        o = a.num_heads * a.v_head_dim * hidden + (hidden if a.o_bias else 0)
        return q + kv + o
    q_out, kv_out = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    total = hidden * (q_out + 2 * kv_out) + q_out * hidden
    total += (q_out + 2 * kv_out) if a.qkv_bias else 0
    total += hidden if a.o_bias else 0
    total += {"": 0, "head": 2 * a.head_dim, "full": q_out + kv_out}[a.qk_norm]
    return total + (a.num_heads if a.sinks else 0)


def expert_params(moe: MoeShape, hidden: int) -> int:
    """One routed expert: gate, up and down projections (SwiGLU), with gpt-oss's biases."""
    return 3 * hidden * moe.intermediate_size + ((2 * moe.intermediate_size + hidden) if moe.expert_bias else 0)


def count_params(shape: ModelShape) -> ParamCounts:
    """Per-component parameter counts of a model."""
    hidden, moe = shape.hidden_size, shape.moe
    num_moe = len(shape.moe_layers)
    num_dense = shape.num_layers - num_moe
    embedding = shape.vocab_size * hidden
    expert = expert_params(moe, hidden) if moe else 0
    router = (moe.num_experts * hidden + (moe.num_experts if moe.router_bias else 0)
              + (moe.num_experts if moe.correction_bias else 0)) if moe else 0
    shared = (3 * hidden * moe.shared_intermediate_size + (hidden if moe.shared_gate else 0)) if moe else 0
    return ParamCounts(
        embedding=embedding,
        lm_head=0 if shape.tie_word_embeddings else embedding,
        attention=shape.num_layers * attention_params(shape.attention, hidden),
        dense_mlp=num_dense * 3 * hidden * shape.dense_intermediate_size,
        routed_experts=num_moe * (moe.num_experts if moe else 0) * expert,
        shared_experts=num_moe * shared,
        routers=num_moe * router,
        norms=(2 * shape.num_layers + 1) * hidden,
        expert=expert,
        num_moe_layers=num_moe,
        top_k=moe.top_k if moe else 0,
    )


def kv_elements_per_token(shape: ModelShape) -> int:
    """KV-cache elements one token holds across all layers (every layer counted as full attention).

    Standard attention stores K and V (2 * Hkv * d per layer); MLA stores the compressed latent
    and the rope key (kv_lora_rank + qk_rope_head_dim per layer).
    """
    a = shape.attention
    per_layer = a.kv_lora_rank + a.qk_rope_head_dim if a.is_mla else 2 * a.num_kv_heads * a.head_dim
    return shape.num_layers * per_layer


def kv_rows_per_token(shape: ModelShape) -> int:
    """KV-cache rows one token holds across all layers: its key and value of each kv head, or its MLA latent entry
    (an fp8 cache keeps a scale per row: layers/kv_cache_dtype.py)."""
    return shape.num_layers * (1 if shape.attention.is_mla else 2 * shape.attention.num_kv_heads)
