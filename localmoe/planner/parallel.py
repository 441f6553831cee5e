"""Memory per rank and bytes per collective per token of a tensor- or expert-parallel layout (`localmoe plan
--tensor-parallel-size N [--enable-expert-parallel]`, or `--data-parallel-size N --enable-expert-parallel`), split
as distributed/tensor_parallel.py, expert_parallel.py and dp_expert_parallel.py split a model.

Names: N ranks, L layers, L_moe MoE layers, D hidden, V vocabulary, E experts per MoE layer, K experts per token,
b bytes per activation element.

Per rank under tensor parallelism: 1/N of the attention heads (of the KV heads too, or one where there are fewer
than N; MLA's latent projections and latent cache stay whole), of the dense MLPs and shared experts, ceil(V/N) rows
of the embedding and of the head; of the routed experts 1/N of every expert's intermediate features (TP) or
ceil(E/N) whole experts per layer (EP); routers and norms whole. Under data parallelism with expert parallelism
every rank holds everything whole (and a KV cache of its own) but its ceil(E/N) routed experts per layer.

Collectives per token, as payloads (distributed/collectives.py counts the same). Tensor parallelism: an all-reduce
of D activations after the embedding and after every attention and feed-forward block, (2L + 1) D b bytes (OLMoE's
QK-norm over the whole projection adds two float32 sums a layer); each sampled token's logits gathered to rank 0,
ceil(V/N) b bytes from each rank. Expert parallelism adds no collective there: every rank has every token after
the attention block's all-reduce (the dispatch) and the feed-forward block's all-reduce sums the experts' outputs
(the combine). A ring all-reduce sends 2(N-1)/N of its payload over each rank's link: `link_bytes_per_token`.
Data parallelism with expert parallelism: each MoE layer all-gathers a token's D activations and its routing
(K weights and K ids, float32: 8K bytes), and reduce-scatters the N ranks' rows, N D b bytes a token; a ring sends
N - 1 times the first and (N-1)/N of the second over each link. The ranks pad to the step's busiest rank, so a
step's bytes follow its most tokens; these figures are per token of a balanced step.

Where a rank cannot hold its whole experts beside the rest of its weights and one max_model_len sequence, tensor
and expert parallelism compose with offloading: `experts_cached_per_rank` is how many of its own experts per MoE
layer a rank's expert cache holds in what is left (--expert-cache-size), the others kept in its store.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from localmoe.planner.params import ParamCounts, attention_params, kv_elements_per_token, kv_rows_per_token
from localmoe.planner.quantization import WeightBytes
from localmoe.planner.shape import ModelShape, PlanError

QK_NORM_SUM_BYTES = 4  # one float32 sum of squares per token, for q and for k (layers' ShardedRMSNorm)


@dataclass(frozen=True)
class ParallelPlan:
    tensor_parallel_size: int
    expert_parallel: bool
    data_parallel_size: int  # > 1: the experts spread over data-parallel ranks
    weight_bytes_per_rank: int
    expert_bytes_per_rank: int  # the routed experts' share of weight_bytes_per_rank
    experts_per_rank: int  # whole routed experts per MoE layer (EP); every one, sliced, under TP
    kv_bytes_per_token_per_rank: int
    kv_budget_bytes_per_rank: int  # what the weights leave of a device's usable memory; 0 when they do not fit
    max_concurrent_tokens: int
    fits: bool  # each rank holds its weights and its share of one max_model_len sequence
    all_reduces_per_token: int
    all_reduce_bytes_per_token: int
    gather_bytes_per_sampled_token: int
    link_bytes_per_token: int  # what a ring sends over each rank's link, every collective of a token
    all_gather_bytes_per_token: int = 0  # data-parallel expert parallelism: every MoE layer's
    reduce_scatter_bytes_per_token: int = 0
    experts_cached_per_rank: int | None = None  # EP that does not fit: a rank's expert cache, experts per layer


def _kv_heads_per_rank(num_kv_heads: int, world: int) -> int:
    return num_kv_heads // world if num_kv_heads % world == 0 else 1


def plan_parallel(shape: ModelShape, params: ParamCounts, per_param: WeightBytes, world: int, expert_parallel: bool,
                  activation_bytes: int, kv_bytes: int, kv_scale_bytes: int, usable_bytes: int,
                  max_model_len: int, data_parallel_size: int = 1) -> ParallelPlan:
    """The layout of `shape` over `world` tensor-parallel ranks (or `data_parallel_size` data-parallel ones with
    expert parallelism), each a device of `usable_bytes`; `kv_bytes` (and `kv_scale_bytes` a row) per cached
    element."""
    a, moe = shape.attention, shape.moe
    if world < 1 or a.num_heads % world:
        raise PlanError(f"tensor_parallel_size {world} must divide the number of attention heads ({a.num_heads})")
    data_parallel = data_parallel_size > 1
    if data_parallel and (world > 1 or not expert_parallel):
        raise PlanError("a data-parallel layout is planned with --enable-expert-parallel and tensor_parallel_size 1 "
                        "(plain replicas each hold the whole model)")
    experts_world = data_parallel_size if data_parallel else world
    if expert_parallel and (experts_world < 2 or moe is None or moe.num_experts < experts_world):
        raise PlanError("expert parallelism needs tensor_parallel_size > 1 (or data_parallel_size > 1) and at least "
                        f"as many routed experts per layer ({moe.num_experts if moe else 0}) as ranks "
                        f"({experts_world})")
    rank_attention = replace(a, num_heads=a.num_heads // world,
                             num_kv_heads=_kv_heads_per_rank(a.num_kv_heads, world))
    vocab_rows = -(-shape.vocab_size // world) * shape.hidden_size
    experts_per_rank = -(-moe.num_experts // experts_world) if expert_parallel and moe else 0
    routed = (experts_per_rank * params.num_moe_layers * params.expert if expert_parallel
              else params.routed_experts // world)
    rank = replace(params, embedding=vocab_rows, lm_head=vocab_rows if params.lm_head else 0,
                   attention=shape.num_layers * attention_params(rank_attention, shape.hidden_size),
                   dense_mlp=params.dense_mlp // world, routed_experts=routed,
                   shared_experts=params.shared_experts // world)
    weights = per_param.of(rank)
    rank_shape = replace(shape, attention=rank_attention)
    kv_per_token = kv_elements_per_token(rank_shape) * kv_bytes + kv_rows_per_token(rank_shape) * kv_scale_bytes
    budget = max(0, usable_bytes - weights)
    fits = weights + kv_per_token * max_model_len <= usable_bytes
    cached = None
    if expert_parallel and not data_parallel and not fits and params.num_moe_layers:
        room = usable_bytes - per_param.of_non_expert(rank) - kv_per_token * max_model_len
        cached = min(experts_per_rank, max(0, room // (per_param.expert * params.num_moe_layers)))
    reduces = 2 * shape.num_layers + 1 if world > 1 else 0
    reduce_bytes = reduces * shape.hidden_size * activation_bytes
    if a.qk_norm == "full" and world > 1:
        reduce_bytes += 2 * shape.num_layers * QK_NORM_SUM_BYTES
    gathered = scattered = 0
    if data_parallel:
        gathered = params.num_moe_layers * (shape.hidden_size * activation_bytes + 8 * moe.top_k)
        scattered = params.num_moe_layers * data_parallel_size * shape.hidden_size * activation_bytes
    n = experts_world
    return ParallelPlan(
        tensor_parallel_size=world, expert_parallel=expert_parallel, data_parallel_size=data_parallel_size,
        weight_bytes_per_rank=weights, expert_bytes_per_rank=per_param.of(rank) - per_param.of_non_expert(rank),
        experts_per_rank=experts_per_rank if expert_parallel else (moe.num_experts if moe else 0),
        kv_bytes_per_token_per_rank=kv_per_token, kv_budget_bytes_per_rank=budget,
        max_concurrent_tokens=budget // kv_per_token if kv_per_token else 0,
        fits=fits, experts_cached_per_rank=cached,
        all_reduces_per_token=reduces, all_reduce_bytes_per_token=reduce_bytes,
        gather_bytes_per_sampled_token=-(-shape.vocab_size // world) * activation_bytes if world > 1 else 0,
        link_bytes_per_token=reduce_bytes * 2 * (n - 1) // n + (n - 1) * gathered + scattered * (n - 1) // n,
        all_gather_bytes_per_token=gathered, reduce_scatter_bytes_per_token=scattered)
