"""How a loaded model's experts are kept and run while serving, decided in one pass after loading.

The model files build, and the loader fills, plain GroupedExperts on one device (gpt-fast's model.py). This pass
(gpt-fast's `convert_for_runtime`, `apply_tp`) swaps in, per MoE layer:
- OffloadedExperts (experts/offload.py) when offloading is asked for: experts in a store, a cache of slots;
- else quantized experts (experts/quantized.py) when a quantization is asked for;
- else TritonExperts (experts/gpu.py) on CUDA where triton imports (SwiGLU experts without biases);
- else TiledExperts (experts/cpu.py) where our CPU kernel serves them;
- else OneDNNExperts where oneDNN's layouts are supported (CPU), else the GroupedExperts stay.
Under expert parallelism (distributed/expert_parallel.py) each rank's own experts get the same choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from localmoe.distributed.expert_parallel import ExpertParallelExperts
from localmoe.experts.cache import ExpertCache
from localmoe.experts.cpu import OneDNNExperts, TiledExperts, grouped_kernel_serves
from localmoe.experts.gpu import TritonExperts, triton_serves
from localmoe.experts.offload import OffloadPlan, offload_experts
from localmoe.experts.quantized import quantize_experts
from localmoe.experts.store import ExpertStore
from localmoe.layers.moe import Experts, GroupedExperts, moe_blocks
from localmoe.models.quantized_checkpoint import QuantizedCheckpoint
from localmoe.quant.scheme import Quantizer


@dataclass
class ServingExperts:
    """What the pass set up beside the model: the store and caches of offloaded experts (none when resident)."""

    store: ExpertStore | None = None
    caches: list[ExpertCache] = field(default_factory=list)


def convert_experts(model: nn.Module, device: torch.device, packing: bool, offload: OffloadPlan | None = None,
                    quant: Quantizer | None = None) -> ServingExperts:
    """Give every MoE layer of `model` its serving experts; `packing`: oneDNN layouts are supported here; `quant`:
    the experts are quantized by it (offloaded ones by a QuantScheme, which quantizes each as it is read, or kept
    as a quantized checkpoint packs them)."""
    blocks = moe_blocks(model)
    if offload is not None:
        checkpoint = quant.format if isinstance(quant, QuantizedCheckpoint) else None
        plan = replace(offload, quant=None if checkpoint is not None else quant)
        return ServingExperts(*offload_experts(model, blocks, plan, device, checkpoint))
    for path, moe in blocks:
        if isinstance(moe.experts, ExpertParallelExperts):
            moe.experts.local = _serving(moe.experts.local, f"{path}.experts", packing, quant)
        elif isinstance(moe.experts, GroupedExperts):
            moe.experts = _serving(moe.experts, f"{path}.experts", packing, quant)
    return ServingExperts()


def _serving(experts: GroupedExperts, path: str, packing: bool, quant: Quantizer | None) -> Experts:
    """Resident plain experts in the implementation that serves them here (`experts` unchanged where none)."""
    quantized = quantize_experts(experts, path, quant) if quant is not None else None
    if quantized is not None:
        return quantized
    if triton_serves(experts):
        return TritonExperts(experts)
    if grouped_kernel_serves(experts):
        return TiledExperts.of(experts)
    if packing:
        return OneDNNExperts(experts)
    return experts
