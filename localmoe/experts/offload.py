"""Offloaded experts: a MoE layer's experts live in an ExpertStore (host memory or the checkpoint on disk) and
a step's experts are brought into an ExpertCache's slots on the compute device and run there.

`offload_experts` is the pass that does it to a loaded model (the loader left the experts unread, see
`offloaded_weight`): one store for the model, one cache per MoE layer, and each layer's GroupedExperts replaced by
OffloadedExperts. The compute over the slots is the CPU kernel's where it serves (the store lays each expert out
in its tiles as it comes in), else the grouped path; a quantized checkpoint's experts stay as it packs them (the
store's `checkpoint`), on the quantized kernel or the quantized reference path. With prefetch, each layer guesses
the next layer's experts by applying that layer's router to its own input, and has them loaded on a background
thread while it computes.

Under expert parallelism each rank offloads the experts it holds alone (ExpertParallelExperts' `local`): its store
holds those experts, numbered in the rank's local order, and its caches serve the ids the rank maps them to.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from localmoe.distributed.expert_parallel import ExpertParallelExperts
from localmoe.experts.cache import ExpertCache, SlotPool
from localmoe.experts.cpu import TiledExperts, kernel_serves
from localmoe.experts.quantized import checkpoint_form, quant_form, slot_experts
from localmoe.experts.store import ExpertForm, ExpertStore
from localmoe.layers.cpu_kernels import expert_tiles, quant_kernel_serves
from localmoe.layers.moe import Activation, Experts, GroupedExperts, SparseMoE
from localmoe.models.builtin import cache_root
from localmoe.quant.formats import CheckpointFormat
from localmoe.quant.scheme import QuantScheme

EXPERT_PARAMS = ("w13", "w2")  # GroupedExperts' stacked weights: what offloading keeps out of the model


@dataclass(frozen=True)
class OffloadPlan:
    model_dir: Path  # the checkpoint the experts are read from
    target: str  # "host" or "disk" (experts/store.py)
    capacity: int | None  # cache slots per MoE layer; None: as many as `memory` holds
    policy: str  # eviction policy (experts/cache.py)
    prefetch: bool
    memory: int | None = None  # bytes of slots over all MoE layers, split evenly between them
    quant: QuantScheme | None = None  # the experts are kept quantized (experts/quantized.py)
    memory_source: str = ""  # where `memory` came from, for a message when it holds too little
    # `memory` was measured before the store was filled (expert_cache_memory: auto): a host store's own copy of the
    # experts is in the same memory, so it comes out of `memory` too
    measured_before_store: bool = False

    def pools(self, store: ExpertStore, paths: list[str], device: torch.device) -> list[SlotPool]:
        """Each layer's slots: a pool of its own of `capacity` slots or of its even share of `memory`; where that
        share is less than one expert (on CPU), one pool per expert form that its layers share, of their share of
        `memory` (a model whose experts are far larger than the memory it may use still serves)."""
        layers = [store.layers[path] for path in paths]
        if self.capacity is not None:
            return [SlotPool(layer.form.tensors, min(self.capacity, layer.num_experts), self.policy, device)
                    for layer in layers]
        memory, source = self.memory, self.memory_source
        if self.measured_before_store and store.target == "host":
            memory = max(0, memory - store.host_bytes())
            source += f", less the host store's copy of the experts, {store.host_bytes()} bytes"
        per_layer = memory // max(len(paths), 1)
        if all(per_layer >= layer.form.nbytes for layer in layers):
            return [SlotPool(layer.form.tensors, min(per_layer // layer.form.nbytes, layer.num_experts),
                             self.policy, device) for layer in layers]
        forms = {tuple(sorted(layer.form.tensors.items())): layer for layer in layers}  # by tensor shapes, dtypes
        least = sum(layer.form.nbytes for layer in forms.values())  # one expert of each form
        if device.type != "cpu" or memory < least:
            needs = f"{least} bytes" if device.type == "cpu" else \
                f"{sum(layer.form.nbytes for layer in layers)} bytes (one expert per layer on {device.type})"
            raise ValueError(f"expert_cache_memory: {memory} bytes{source} hold less than "
                             f"one expert a layer; the cache needs at least {needs}")
        shared = {}
        for form, first in forms.items():
            alike = [layer for layer in layers if layer.form.tensors == first.form.tensors]
            slots = max(memory * len(alike) // len(layers) // first.form.nbytes, 1)
            shared[form] = SlotPool(first.form.tensors, min(slots, sum(layer.num_experts for layer in alike)),
                                    self.policy, device)
        return [shared[tuple(sorted(layer.form.tensors.items()))] for layer in layers]


def offloaded_weight(name: str) -> bool:
    """Is this parameter one that offloading keeps out of the model (for the loader's `unread`)?"""
    path, _, leaf = name.rpartition(".")
    return path.endswith(".experts") and leaf in EXPERT_PARAMS


class OffloadedExperts(Experts):
    """Experts served from `cache`: each step runs wave by wave of the cache (experts/cache.py), `compute` (whose
    weights are the cache's slots) on slot ids in place of expert ids. Partial results add up exactly and are
    rounded once, so the output is the resident one (exactly, for top-2). Biases stay resident, by expert."""

    def __init__(self, cache: ExpertCache, activation: Activation, biases: tuple[torch.Tensor, torch.Tensor] | None,
                 compute: Experts) -> None:
        super().__init__()
        self.num_experts = cache.num_experts
        self.cache = cache
        self.activation = activation
        self.biases = biases
        self.compute = compute
        self.prefetch: Callable[[torch.Tensor], None] | None = None  # guesses the next layer's experts (see above)

    def partial(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.prefetch is not None:
            self.prefetch(x)
        total = None
        for slots in self.cache.waves(ids):
            if self.biases is not None:  # each slot's biases are its expert's
                held = torch.tensor(self.cache.slot_expert).clamp(min=0).to(self.biases[0].device)
                self.compute.w13_bias.copy_(self.biases[0][held])
                self.compute.w2_bias.copy_(self.biases[1][held])
            part = self.compute.partial(x, weights, slots)
            total = part if total is None else total + part
        if total is None:  # no pair routed here (all on other ranks, under expert parallelism): a zero part
            total = self.compute.partial(x, weights, torch.full_like(ids, -1))
        return total

    def combine(self, weights: torch.Tensor, total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.compute.combine(weights, total, dtype)


def offload_experts(model: nn.Module, blocks: list[tuple[str, SparseMoE]], plan: OffloadPlan, device: torch.device,
                    checkpoint: CheckpointFormat | None = None) -> tuple[ExpertStore, list[ExpertCache]]:
    """Give every MoE layer of `model` (loaded with offloaded_weight left unread) OffloadedExperts over one
    ExpertStore filled from the checkpoint (`checkpoint`: its quantized format, whose experts stay packed); returns
    the store and the layers' caches in depth order."""
    for _, moe in blocks:
        if not moe.plain_top_k:
            raise ValueError(f"expert_cache_size: expert offloading serves plain top-k routing, not the routing of "
                             f"{type(moe).__name__} ({getattr(moe, 'routing', '')})")
    dtype = served(blocks[0][1]).w13.dtype if blocks else torch.get_default_dtype()
    store = ExpertStore(plan.target, dtype, model.map_weight, pin_memory=device.type == "cuda", checkpoint=checkpoint)
    for path, moe in blocks:
        experts = served(moe)
        held = moe.experts.held if isinstance(moe.experts, ExpertParallelExperts) else None
        store.add_layer(f"{path}.experts", experts.num_experts,
                        {kind: tuple(getattr(experts, kind).shape[1:]) for kind in EXPERT_PARAMS}, held)
    store.fill(plan.model_dir, model.ignored_weight)
    caches = attach_caches(blocks, store, plan, device)  # they set each layer's layout
    if plan.target == "disk":
        store.lay_out_on_disk(cache_root() / "experts")
    return store, caches


def attach_caches(blocks: list[tuple[str, SparseMoE]], store: ExpertStore, plan: OffloadPlan,
                  device: torch.device) -> list[ExpertCache]:
    """Give each MoE layer (offloaded to `store`, or about to be) a new, empty cache as `plan` says, and its
    OffloadedExperts; returns the caches in depth order. Called again, it replaces the caches (a sweep of cache
    settings on one loaded model)."""
    prefetcher = ThreadPoolExecutor(1, thread_name_prefix="expert-prefetch") if plan.prefetch else None
    paths = [f"{path}.experts" for path, _ in blocks]
    computes = [_slot_compute(store, path, served(moe).activation, _resident_biases(served(moe)), device, plan.quant)
                for path, (_, moe) in zip(paths, blocks)]  # these set each layer's form, which sizes its slots
    caches = []
    for path, (_, moe), slot_compute, pool in zip(paths, blocks, computes, plan.pools(store, paths, device)):
        cache = ExpertCache(path, store, pool.capacity, plan.policy, device, prefetcher, pool)
        offloaded = OffloadedExperts(cache, served(moe).activation, _resident_biases(served(moe)),
                                     slot_compute(cache))
        if isinstance(moe.experts, ExpertParallelExperts):
            moe.experts.local = offloaded
        else:
            moe.experts = offloaded
        caches.append(cache)
    if prefetcher is not None:
        for (_, moe), (_, following) in zip(blocks, blocks[1:]):
            served(moe).prefetch = _prefetch_for(following)
    return caches


def _slot_compute(store: ExpertStore, path: str, activation: Activation,
                  biases: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device,
                  quant: QuantScheme | None) -> Callable[[ExpertCache], Experts]:
    """Decide how layer `path`'s experts are kept (the store's form for it, set here) and return what makes the
    experts module that runs on a cache's slots: the CPU kernel's tiles, quantized or not, where it serves them,
    else the grouped path on the checkpoint's w13 and w2; a quantized checkpoint's packed experts on the quantized
    kernel where it serves them, else the quantized reference path."""
    hidden_size, intermediate_size = store.layers[path].shapes["w2"]
    kernel = kernel_serves(activation, biases is not None, store.dtype, device, hidden_size, intermediate_size)
    if store.checkpoint is not None:
        if biases is not None:
            raise ValueError(f"expert offloading of a {store.checkpoint.method} checkpoint serves experts without "
                             "biases")
        w13, w2 = store.packed_expert(path, 0)
        kernel = kernel and quant_kernel_serves(w13) and quant_kernel_serves(w2)
        store.set_form(path, checkpoint_form(w13, w2, kernel))
        return lambda cache: slot_experts(cache.slots, (w13.bits, w2.bits), w13.float8, kernel, activation,
                                          store.dtype)
    if quant is not None:
        if not kernel:
            raise ValueError(f"quantization {quant.name!r} of offloaded experts needs the CPU kernel (bf16 SwiGLU "
                             "experts without biases on a CPU with AVX512-BF16)")
        store.set_form(path, quant_form(store.layers[path].shapes, quant))
        return lambda cache: slot_experts(cache.slots, (quant.bits, quant.bits), quant.float8, True, activation,
                                          store.dtype)
    if kernel:
        store.set_form(path, ExpertForm("tiles", store.layers[path].form.tensors,
                                        lambda w13, w2: dict(zip(("w13", "w2"), expert_tiles(w13, w2)))))
        return lambda cache: TiledExperts(cache.slots["w13"], cache.slots["w2"])

    def grouped(cache: ExpertCache) -> Experts:
        with torch.device("meta"):  # shapes only: its weights are the slots, its biases filled per wave
            compute = GroupedExperts(cache.capacity, hidden_size, intermediate_size, biases is not None, activation)
        compute.w13, compute.w2 = nn.Parameter(cache.slots["w13"], False), nn.Parameter(cache.slots["w2"], False)
        if biases is not None:
            compute.w13_bias, compute.w2_bias = (nn.Parameter(b.new_zeros(cache.capacity, b.shape[1]), False)
                                                 for b in biases)
        return compute
    return grouped


def served(moe: SparseMoE) -> Experts:
    """The experts module this process serves `moe`'s experts with: under expert parallelism its own experts'."""
    return moe.experts.local if isinstance(moe.experts, ExpertParallelExperts) else moe.experts


def _resident_biases(experts: Experts) -> tuple[torch.Tensor, torch.Tensor] | None:
    if isinstance(experts, OffloadedExperts):
        return experts.biases
    return None if experts.w13_bias is None else (experts.w13_bias.data, experts.w2_bias.data)


def _prefetch_for(following: SparseMoE) -> Callable[[torch.Tensor], None]:
    """Guess `following`'s experts from an input (its router applied to it) and have its cache load them (those
    this rank holds, under expert parallelism)."""
    cache = served(following).cache
    spread = following.experts if isinstance(following.experts, ExpertParallelExperts) else None

    def prefetch(x: torch.Tensor) -> None:
        ids = following.route(x)[1]
        ids = torch.unique(ids if spread is None else spread.local_ids(ids)).tolist()
        cache.prefetch([e for e in ids if e >= 0])
    return prefetch
