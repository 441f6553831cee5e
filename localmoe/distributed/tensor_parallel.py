"""Tensor parallelism applied to a loaded single-device model from outside (gpt-fast's `apply_tp`).

Shapes: N ranks, r this rank, H query heads, Hkv key/value heads, Dh head dim, I intermediate, E experts,
V vocabulary, D hidden.

Each decoder layer's attention keeps H/N query heads and their key/value heads (Hkv/N of them, or the one their
group reads where Hkv < N: replicated), so its KV cache holds only those; o_proj keeps the matching columns.
Multi-head latent attention (DeepSeek) keeps its heads' query and up-projection rows; its latent cache is every
head's, so each rank holds all of it.
Feed-forward blocks keep I/N of the intermediate features: dense MLPs and shared experts their gate/up rows and
down columns, routed experts the same slice of every expert's w13 and w2. Each block's output is then a partial
sum, and one all-reduce per attention block and one per MLP/MoE block (forward hooks on the layer's
`self_attn` and `mlp`) makes it whole; a row-parallel bias is kept on rank 0 alone so it is added once. Routers
and norms stay replicated: every rank routes the same tokens to the same experts. The embedding and the output
head keep V/N rows each (padded to equal shards): the embedding's partial lookups are all-reduced, the head's
logits gathered on rank 0, the only rank that samples.

Runs before the experts pass (experts/runtime.py), the quantization pass and pack_model, which then lay out each
rank's shard; it names the parameters it split along their columns (row-parallel: o_proj, down projections, the
experts' w2), whose rows a quantization of the shard must treat as parts of whole rows
(distributed/sharded_quantization.py).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from localmoe.distributed.collectives import all_reduce, gather
from localmoe.layers.linear import Linear, MergedLinear
from localmoe.layers.mla import MultiHeadLatentAttention
from localmoe.layers.norm import RMSNorm
from localmoe.layers.moe import GroupedExperts, SparseMoE
from localmoe.models.llama import MLP, Attention, LlamaForCausalLM


def apply_tp(model: nn.Module, split_experts: bool = True) -> frozenset[str]:
    """Shard `model` in place for this process's rank of the default process group; returns the names of the
    parameters split along their columns. Raises ValueError, naming the part, for a model it cannot split. Without
    `split_experts` the routed experts stay whole, for apply_ep (distributed/expert_parallel.py) to spread over the
    ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"tensor parallelism does not split {type(model).__name__} yet")
    for i, layer in enumerate(model.layers):
        if isinstance(layer.self_attn, Attention):
            _shard_attention(layer.self_attn, rank, world)
        elif isinstance(layer.self_attn, MultiHeadLatentAttention):
            _shard_latent_attention(layer.self_attn, rank, world)
        else:
            raise ValueError(f"tensor parallelism does not split {type(layer.self_attn).__name__} (layer {i}) yet; "
                             "use tensor_parallel_size: 1")
        _shard_feed_forward(layer.mlp, rank, world, f"layer {i}", split_experts)
        for block in (layer.self_attn, layer.mlp):
            block.register_forward_hook(_all_reduce_output)
    _shard_vocabulary(model, rank, world)
    return frozenset(f"{path}.{name}" for path, module in model.named_modules()
                     for name in getattr(module, ROW_PARALLEL, ()))


ROW_PARALLEL = "row_parallel_params"  # a module's attribute: its parameters split along their columns


def _all_reduce_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    all_reduce(output)
    return output


def _part(size: int, rank: int, world: int, what: str) -> torch.Tensor:
    """Indices of this rank's equal share of `size`."""
    if size % world:
        raise ValueError(f"tensor_parallel_size {world} does not divide {what} ({size})")
    share = size // world
    return torch.arange(rank * share, (rank + 1) * share)


def _keep(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().index_select(dim, index.to(tensor.device)), requires_grad=False)


def _column_parallel(linear: nn.Linear, rows: torch.Tensor) -> None:
    linear.weight = _keep(linear.weight, 0, rows)
    if linear.bias is not None:
        linear.bias = _keep(linear.bias, 0, rows)
    linear.out_features = len(rows)


def _row_parallel(linear: Linear, columns: torch.Tensor, rank: int) -> None:
    linear.weight = _keep(linear.weight, 1, columns)
    linear.in_features = len(columns)
    setattr(linear, ROW_PARALLEL, ("weight",))
    if rank != 0:
        linear.bias = None


def _merged_rows(linear: MergedLinear, shares: dict[str, torch.Tensor]) -> torch.Tensor:
    """The merged weight's rows of each piece's share (indices within that piece), pieces in their order."""
    return torch.cat([linear.pieces[name].start + share for name, share in shares.items()])


def _kv_heads(num_heads: int, num_kv_heads: int, rank: int, world: int) -> torch.Tensor:
    """The KV heads this rank's query heads read: an equal share, or the one head of their group where there are
    fewer KV heads than ranks (replicated)."""
    if num_kv_heads % world == 0:
        return _part(num_kv_heads, rank, world, "the number of key/value heads")
    if world % num_kv_heads:
        raise ValueError(f"tensor_parallel_size {world} neither divides nor is a multiple of the number of "
                         f"key/value heads ({num_kv_heads})")
    return torch.tensor([rank * num_kv_heads // world])


def _features(heads: torch.Tensor, width: int) -> torch.Tensor:
    """The features of these heads in a projection of `width` features per head."""
    return (heads[:, None] * width + torch.arange(width)).flatten()


def _shard_attention(attn: Attention, rank: int, world: int) -> None:
    dh = attn.head_dim
    heads = _part(attn.num_heads, rank, world, "the number of attention heads")
    kv_heads = _kv_heads(attn.num_heads, attn.num_kv_heads, rank, world)
    if attn.q_norm is not None and attn.q_norm.weight.shape[0] != dh:  # QK-norm over the whole projection (OLMoE)
        if attn.num_kv_heads % world:
            raise ValueError("QK-norm over the whole projection needs the key/value heads split, not replicated: "
                             f"tensor_parallel_size {world} does not divide {attn.num_kv_heads}")
        attn.q_norm = ShardedRMSNorm(attn.q_norm, _features(heads, dh))
        attn.k_norm = ShardedRMSNorm(attn.k_norm, _features(kv_heads, dh))
    _column_parallel(attn.qkv_proj, _merged_rows(attn.qkv_proj, {
        "q_proj": _features(heads, dh), "k_proj": _features(kv_heads, dh), "v_proj": _features(kv_heads, dh)}))
    _row_parallel(attn.o_proj, _features(heads, dh), rank)
    if attn.sinks is not None:
        attn.sinks = _keep(attn.sinks, 0, heads)
    attn.num_heads, attn.num_kv_heads = len(heads), len(kv_heads)
    attn.qkv_sizes = [len(heads) * dh, len(kv_heads) * dh, len(kv_heads) * dh]


class ShardedRMSNorm(nn.Module):
    """RMSNorm over features split across the ranks (OLMoE's QK-norm spans the whole projection): the mean square
    is taken over every rank's features (an all-reduce), and each rank scales its own."""

    def __init__(self, norm: RMSNorm, features: torch.Tensor) -> None:
        super().__init__()
        self.weight = _keep(norm.weight, 0, features)
        self.eps = norm.eps
        self.dim = norm.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        squares = x32.square().sum(dim=-1, keepdim=True)
        all_reduce(squares)
        return (x32 * torch.rsqrt(squares / self.dim + self.eps)).to(x.dtype) * self.weight


def _shard_latent_attention(attn: MultiHeadLatentAttention, rank: int, world: int) -> None:
    """MLA by heads: each rank keeps its heads' query rows, their rows of the latent's up-projection (W_uk_h over
    W_uv_h) and their o_proj columns. The latent and rotary key are every head's, so their projection, norm and
    cache stay whole on every rank."""
    heads = _part(attn.num_heads, rank, world, "the number of attention heads")
    _column_parallel(attn.q_b_proj if attn.low_rank_queries else attn.q_proj,
                     _features(heads, attn.nope_dim + attn.rope_dim))
    _column_parallel(attn.kv_b_proj, _features(heads, attn.nope_dim + attn.v_dim))
    _row_parallel(attn.o_proj, _features(heads, attn.v_dim), rank)
    attn.num_heads = len(heads)


def _shard_mlp(mlp: MLP, rank: int, world: int) -> None:
    intermediate = mlp.down_proj.in_features
    share = _part(intermediate, rank, world, "the MLP's intermediate size")
    _column_parallel(mlp.gate_up_proj, _merged_rows(mlp.gate_up_proj, {"gate_proj": share, "up_proj": share}))
    _row_parallel(mlp.down_proj, share, rank)


def _shard_experts(experts: GroupedExperts, rank: int, world: int) -> None:
    intermediate = experts.w2.shape[2]
    share = _part(intermediate, rank, world, "the experts' intermediate size")
    rows = torch.cat([share, intermediate + share])  # w13: gate rows, then up rows
    experts.w13 = _keep(experts.w13, 1, rows)
    experts.w2 = _keep(experts.w2, 2, share)
    setattr(experts, ROW_PARALLEL, ("w2",))
    if experts.w13_bias is not None:
        experts.w13_bias = _keep(experts.w13_bias, 1, rows)
        if rank != 0:  # mixed by the routing weights like the rest, so added once when kept on one rank
            experts.w2_bias = nn.Parameter(torch.zeros_like(experts.w2_bias), requires_grad=False)


def _shard_feed_forward(mlp: nn.Module, rank: int, world: int, where: str, split_experts: bool) -> None:
    if isinstance(mlp, MLP):
        _shard_mlp(mlp, rank, world)
        return
    # every MoE block routes from its (replicated) input and mixes its experts' outputs linearly (token choice,
    # expert choice, soft MoE's slots alike), so per-rank partial outputs sum to the whole
    if not isinstance(mlp, SparseMoE):
        raise ValueError(f"tensor parallelism does not split {type(mlp).__name__} ({where}) yet")
    if not isinstance(mlp.experts, GroupedExperts):
        raise ValueError(f"tensor parallelism does not split {type(mlp.experts).__name__} ({where})")
    if split_experts:
        _shard_experts(mlp.experts, rank, world)
    if mlp.shared_expert is not None:
        _shard_mlp(mlp.shared_expert, rank, world)


class VocabParallelEmbedding(nn.Module):
    """This rank's rows [start, start + rows) of the embedding; other tokens look up zeros here and take their
    vector from the rank that holds it (the all-reduce)."""

    def __init__(self, weight: nn.Parameter, start: int) -> None:
        super().__init__()
        self.weight = weight
        self.start = start

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[:, None], 0)
        all_reduce(out)
        return out


def _shard_vocabulary(model: LlamaForCausalLM, rank: int, world: int) -> None:
    vocab = model.embed_tokens.weight.shape[0]
    share = -(-vocab // world)  # the last rank's shard is padded with zero rows
    rows = torch.arange(rank * share, min(vocab, (rank + 1) * share))

    def shard(weight: torch.Tensor) -> nn.Parameter:
        kept = weight.new_zeros(share, weight.shape[1])
        kept[:len(rows)] = weight.detach()[rows.to(weight.device)]
        return nn.Parameter(kept, requires_grad=False)

    model.embed_tokens = VocabParallelEmbedding(shard(model.embed_tokens.weight), rank * share)
    if model.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    else:
        model.lm_head.weight = shard(model.lm_head.weight)
    model.lm_head.out_features = share
    model.lm_head.register_forward_hook(partial(_gather_logits, vocab))


def _gather_logits(vocab: int, module: nn.Module, inputs: tuple, logits: torch.Tensor) -> torch.Tensor:
    """Rank 0 gets the whole vocabulary's logits [T, V]; the other ranks keep their shard (never read)."""
    logits = logits.contiguous()
    if dist.get_rank() != 0:
        gather(logits, None, dst=0)
        return logits
    shards = [torch.empty_like(logits) for _ in range(dist.get_world_size())]
    gather(logits, shards, dst=0)
    return torch.cat(shards, dim=-1)[..., :vocab]
