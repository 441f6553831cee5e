"""`localmoe plan`: the report a person reads, or the same fields as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import partial
from typing import Any

from localmoe.models.hub import HubError, hub_snapshot, is_hub_id
from localmoe.planner.gguf import gguf_weight_bytes, is_gguf, read_for_plan
from localmoe.planner.memory import KV_BYTES, KV_SCALE_BYTES, MARGIN_FRACTION, Plan, parse_device, plan_memory
from localmoe.planner.parallel import ParallelPlan
from localmoe.planner.shape import PlanError, load_config, model_shape


def plan_command(model: str, dtype: str = "bf16", device: str = "H100-80GB", max_model_len: int | None = None,
                 max_num_seqs: int = 256, kv_cache_dtype: str = "auto", json_output: bool = False,
                 quantization: str = "auto", tensor_parallel_size: int = 1,
                 enable_expert_parallel: bool = False, data_parallel_size: int = 1) -> str:
    """Plan `model` (checkpoint dir, config.json, GGUF file, known name or hub id) on `device`; the text to print.
    With `tensor_parallel_size` > 1 (and `enable_expert_parallel`), or `data_parallel_size` > 1 with
    `enable_expert_parallel`, the plan adds that layout, per rank.

    Raises PlanError (a ValueError) with a message for the user on any bad input.
    """
    gguf = read_for_plan(model) if is_gguf(model) else None
    name, config = (model, gguf.config) if gguf is not None else model_config(model)
    plan = plan_memory(model_shape(name, config), parse_device(device), dtype=dtype, max_model_len=max_model_len,
                       max_num_seqs=max_num_seqs, kv_cache_dtype=kv_cache_dtype, quantization=quantization,
                       quantization_config=config.get("quantization_config"),
                       held=partial(gguf_weight_bytes, gguf) if gguf is not None else None,
                       tensor_parallel_size=tensor_parallel_size, expert_parallel=enable_expert_parallel,
                       data_parallel_size=data_parallel_size)
    return json.dumps(plan_dict(plan), indent=2) if json_output else format_plan(plan)


def model_config(model: str) -> tuple[str, dict[str, Any]]:
    """(display name, config dict) of a checkpoint, config.json or known name, else of a hub id: its config.json
    from the Hugging Face cache, fetched where the network allows."""
    try:
        return load_config(model)
    except PlanError:
        if not is_hub_id(model):
            raise
    try:
        snapshot = hub_snapshot(model, None, None, ["config.json"])
    except HubError as e:
        raise PlanError(str(e)) from None
    return model, load_config(str(snapshot))[1]


def plan_dict(plan: Plan) -> dict[str, Any]:
    """The plan as JSON-ready fields, parameter totals included."""
    out = asdict(plan)
    p = plan.params
    out["params"].update(total=p.total, active=p.active, active_without_embedding=p.active_without_embedding,
                         non_expert=p.non_expert)
    return out


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def layout_rows(layout: ParallelPlan, max_model_len: int) -> list[tuple[str, str]]:
    """The layout's lines of the report: memory per rank, then what the collectives move per token."""
    if layout.data_parallel_size > 1:
        return _data_parallel_rows(layout, max_model_len)
    n = layout.tensor_parallel_size
    experts = (f"{layout.experts_per_rank} whole experts per MoE layer" if layout.expert_parallel
               else "1/{n} of every expert".format(n=n))
    rows = [
        ("Layout", f"tensor_parallel_size {n}" + (", expert parallel (EP size = TP size)" if layout.expert_parallel
                                                  else "")),
        *_memory_rows(layout, experts, max_model_len),
        ("  collectives per token", f"{layout.all_reduces_per_token} all-reduces, "
                                    f"{_bytes(layout.all_reduce_bytes_per_token)} per rank "
                                    f"({_bytes(layout.link_bytes_per_token)} over each link in a ring); logits "
                                    f"gather {_bytes(layout.gather_bytes_per_sampled_token)} per rank per sampled "
                                    "token"),
    ]
    if layout.experts_cached_per_rank is not None:
        rows.append(("  expert cache per rank", f"{layout.experts_cached_per_rank} of its {layout.experts_per_rank} "
                                                "experts per MoE layer (--expert-cache-size; the others offloaded, "
                                                "each rank's store holding its own)"))
    return rows


def _data_parallel_rows(layout: ParallelPlan, max_model_len: int) -> list[tuple[str, str]]:
    n = layout.data_parallel_size
    return [
        ("Layout", f"data_parallel_size {n}, expert parallel (EP size = DP size): attention, dense layers and "
                   "shared experts whole on each rank"),
        *_memory_rows(layout, f"{layout.experts_per_rank} whole experts per MoE layer", max_model_len),
        ("  collectives per token", f"all-gather {_bytes(layout.all_gather_bytes_per_token)} and reduce-scatter "
                                    f"{_bytes(layout.reduce_scatter_bytes_per_token)} per rank over the MoE "
                                    f"layers ({_bytes(layout.link_bytes_per_token)} over each link in a ring); "
                                    "steps pad to the busiest rank's tokens"),
    ]


def _memory_rows(layout: ParallelPlan, experts: str, max_model_len: int) -> list[tuple[str, str]]:
    return [
        ("  weights per rank", f"{_bytes(layout.weight_bytes_per_rank)} (routed experts "
                               f"{_bytes(layout.expert_bytes_per_rank)}: {experts})"),
        ("  KV per rank", f"{_bytes(layout.kv_bytes_per_token_per_rank)} per token; budget "
                          f"{_bytes(layout.kv_budget_bytes_per_rank)}, {layout.max_concurrent_tokens:,} tokens; "
                          f"weights + one {max_model_len}-token sequence {_fits(layout.fits)}"),
    ]


def _fits(ok: bool) -> str:
    return "fits" if ok else "does not fit"


def format_plan(plan: Plan) -> str:
    """A readable report, one fact per line."""
    p = plan.params
    requested = f"max_num_seqs x max_model_len = {plan.max_num_seqs} x {plan.max_model_len} = {plan.requested_tokens:,}"
    len_source = " (default: min(max_position_embeddings, 32768))" if plan.max_model_len_is_default else ""
    kv_bytes = KV_BYTES[plan.kv_cache_dtype]
    mla = plan.kv_attention == "mla"
    kv_how = ("MLA: layers x (kv_lora_rank + qk_rope_head_dim)" if mla
              else "2 x layers x kv_heads x head_dim") + f" x {kv_bytes} bytes"
    if KV_SCALE_BYTES[plan.kv_cache_dtype]:
        kv_how += f" + {'layers' if mla else '2 x layers x kv_heads'} scale bytes (one a row)"
    rows = [
        ("Model", f"{plan.model} ({plan.architecture})"),
        ("Parameters", f"total {_count(p.total)}, active {_count(p.active)} "
                       f"({_count(p.active_without_embedding)} without the input embedding)"),
        ("  breakdown", f"embedding {_count(p.embedding)}, lm_head {_count(p.lm_head)}, "
                        f"attention {_count(p.attention)}, dense MLP {_count(p.dense_mlp)}, "
                        f"routed experts {_count(p.routed_experts)}, shared experts {_count(p.shared_experts)}, "
                        f"routers {_count(p.routers)}, norms {_count(p.norms)}"),
        ("  experts", f"{p.num_moe_layers} MoE layers, top-{p.top_k}, {_count(p.expert)} per expert"),
        ("Weights", " | ".join(f"{q} {_bytes(b)}" for q, b in plan.weight_bytes_per_quantization.items())
                    + f"  (planning with {plan.dtype}, quantization {plan.quantization})"),
        ("KV cache per token", f"{_bytes(plan.kv_bytes_per_token)} ({kv_how}; kv_cache_dtype {plan.kv_cache_dtype})"),
        ("max_model_len", f"{plan.max_model_len}{len_source}; one sequence: {_bytes(plan.kv_bytes_per_sequence)}"),
        ("Device", f"{plan.device}: {_bytes(plan.device_memory_bytes)} - CUDA context "
                   f"{_bytes(plan.cuda_context_bytes)} - margin {_bytes(plan.margin_bytes)} "
                   f"({MARGIN_FRACTION:.0%}) = {_bytes(plan.usable_bytes)} usable"),
        ("KV budget, 1 device", f"{_bytes(plan.kv_budget_bytes)} after {_bytes(plan.weight_bytes)} of weights"
                                + ("" if plan.weight_bytes <= plan.usable_bytes else " (weights do not fit)")),
        ("Concurrent tokens", f"{plan.max_concurrent_tokens:,}; {requested}: {_fits(plan.requested_fits)}"),
    ]
    if plan.parallel_degree is None:
        rows.append(("TP/EP degree", "none up to 64 holds the weights and one max_model_len sequence"))
    else:
        rows.append(("TP/EP degree", f"{plan.parallel_degree} (smallest power of two holding the weights "
                                     "and one max_model_len sequence)"))
        if plan.parallel_degree > 1:
            rows.append((f"  at degree {plan.parallel_degree}",
                         f"KV budget {_bytes(plan.parallel_kv_budget_bytes)}, "
                         f"{plan.parallel_max_concurrent_tokens:,} tokens; {_fits(plan.parallel_requested_fits)}"))
    if plan.experts_per_layer_cached is not None:
        rows.append(("Expert cache, 1 device", f"{plan.experts_per_layer_cached} of {plan.num_experts} experts "
                                               f"per MoE layer ({_bytes(plan.expert_bytes)} per expert per layer; "
                                               "non-expert weights resident, KV for one sequence)"))
    if plan.layout is not None:
        rows += layout_rows(plan.layout, plan.max_model_len)
    rows += [("Note", note) for note in plan.notes]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
