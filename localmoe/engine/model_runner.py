"""The model on its device: loaded, its experts set up for serving, its KV pool allocated; each step it turns a
scheduled batch into one flat forward pass over the paged KV cache.

Loading (models/loader.py) gives the plain single-device model; the experts pass (experts/runtime.py) then
decides how each MoE layer's experts are kept and run (offloaded, quantized, the CPU kernel's tiles, oneDNN's
layout), a quantization asked for replaces the dense linear layers (layers/quant_linear.py), and pack_model lays
the other weights out for their matmuls. The KV pool takes what the budget allows
(`kv_cache_memory` on CPU, `gpu_memory_utilization` of the device on CUDA, measured after loading), in the model's
dtype or, with `kv_cache_dtype` fp8, in e4m3 rows with their scales (layers/kv_cache_dtype.py): about twice the
blocks for the same bytes.

The step's tokens from every sequence are concatenated ([T]); attention metadata says where each
token's K/V goes and which blocks each sequence reads. Logits are computed only for sequences
whose last token is in this step (those are the ones that sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from localmoe.config import ConfigError, EngineConfig
from localmoe.engine.scheduler import ScheduledBatch
from localmoe.experts.memory_budget import RUNTIME_RESERVE, auto_cache_bytes, memory_left
from localmoe.experts.offload import OffloadPlan, offloaded_weight
from localmoe.experts.runtime import convert_experts
from localmoe.layers.attention import AttentionMetadata
from localmoe.layers.cpu_kernels import kernels
from localmoe.layers.huge_pages import huge_page_zeros
from localmoe.layers.kv_cache_dtype import cache_dtype, cache_shape
from localmoe.layers.linear import pack_model, packing_supported
from localmoe.layers.quant_linear import quantize_linears
from localmoe.models.loader import load_model, resolve_dtype


DEFAULT_KV_BYTES = 2 * 2**30  # the CPU KV pool where memory allows


def context_length(config: EngineConfig, hf_config: dict) -> int:
    """max_model_len: as configured, at most the model's max_position_embeddings; by default that."""
    limit = hf_config["max_position_embeddings"]
    if config.max_model_len is not None and config.max_model_len > limit:
        raise ConfigError(f"max_model_len {config.max_model_len} exceeds the model's max_position_embeddings {limit}")
    return config.max_model_len or limit


def kv_cache_shapes(model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype) -> list[tuple[int, ...]]:
    """Each layer's cache in a pool of `dtype` (each attention kind says what it caches per token)."""
    return [cache_shape(layer.self_attn.kv_cache_shape(num_blocks, block_size), dtype) for layer in model.layers]


def kv_block_bytes(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes over all layers."""
    return sum(math.prod(shape) for shape in kv_cache_shapes(model, 1, block_size, dtype)) * dtype.itemsize


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class StepLogits:
    sample: torch.Tensor  # float32 [S, V] at the last token of each sampling sequence
    sampling: list[int]  # batch index of each of those S sequences
    prompt: dict[int, torch.Tensor]  # batch index -> [n, V] at every prompt token computed this step


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.model, self.hf_config = load_model(model_dir, config.dtype, self.device,
                                                unread=offloaded_weight if config.offloads_experts else None,
                                                quantization=config.quantization)
        self.dtype = resolve_dtype(config.dtype, self.hf_config, self.device)
        self.max_model_len = context_length(config, self.hf_config)
        self.kv_dtype = cache_dtype(config.kv_cache_dtype, self.dtype)
        self.block_bytes = kv_block_bytes(self.model, config.block_size, self.kv_dtype)
        self.swap_bytes = int(config.swap_space * 2**30)
        # on CPU the KV pool's size is known before the experts are: an auto-sized expert cache takes what it leaves
        self.kv_bytes = self._host_kv_bytes() if self.device.type == "cpu" else None
        if self.device.type == "cpu":
            kernels()  # built (or loaded from their cache) now, before the server is ready, never inside a request
        packing = packing_supported(self.dtype, self.device)
        # the checkpoint's own integers, or a quantization asked for at load
        quant = self.model.quantized_checkpoint or config.quant_scheme
        try:
            self.experts = convert_experts(self.model, self.device, packing, self._offload_plan(model_dir), quant)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if quant is not None and not quant.experts_only:
            quantize_linears(self.model, quant)
        if packing:
            pack_model(self.model)
        self.block_size = config.block_size
        self.kv_caches: list[torch.Tensor] = []
        self.swap_caches: list[torch.Tensor] = []

    def _offload_plan(self, model_dir: Path) -> OffloadPlan | None:
        config = self.config
        if not config.offloads_experts:
            return None
        memory, source = config.expert_cache_bytes, ""
        if memory == "auto":
            if self.device.type != "cpu":
                raise ConfigError("expert_cache_memory: auto sizes a cache in host memory; on "
                                  f"{self.device.type} give the cache's bytes")
            # the weights that stay resident are loaded; the KV pool and swap space come next
            memory = auto_cache_bytes(self.kv_bytes + self.swap_bytes)
            source = (f" (auto: what this process may still use, {memory_left()} bytes, less the KV pool's "
                      f"{self.kv_bytes}, swap space's {self.swap_bytes} and the runtime's {RUNTIME_RESERVE}; a "
                      "larger memory limit, a shorter max_model_len or kv_cache_memory leave more)")
        return OffloadPlan(model_dir, config.expert_offload_target, config.expert_cache_size or None,
                           config.expert_cache_policy, config.expert_prefetch, memory,
                           memory_source=source)

    def _host_kv_bytes(self) -> int:
        """kv_cache_memory; by default 2 GiB, or an eighth of what the process may still use where that is less
        (never below one sequence of max_model_len tokens: less is refused in allocate_kv_cache)."""
        configured = self.config.kv_cache_bytes
        if configured is not None:
            return configured
        one_sequence = -(-self.max_model_len // self.config.block_size) * self.block_bytes
        return max(one_sequence, min(DEFAULT_KV_BYTES, memory_left() // 8))

    def allocate_kv_cache(self) -> tuple[int, int]:
        """Allocate the KV pool the budget allows, and its host swap space; returns (blocks, swap blocks). Refuses
        a budget that cannot hold one sequence of max_model_len tokens."""
        config = self.config
        num_blocks = (self.kv_bytes if self.kv_bytes is not None else self._device_kv_bytes()) // self.block_bytes
        if num_blocks * config.block_size < self.max_model_len:
            raise ConfigError(f"the KV cache budget holds {num_blocks * config.block_size} tokens, fewer than "
                              f"max_model_len {self.max_model_len}; raise kv_cache_memory / "
                              f"gpu_memory_utilization or lower max_model_len")
        num_swap_blocks = self.swap_bytes // self.block_bytes
        # a layer's cache is [parts, blocks, ...]: block ids index dimension 1 whatever the attention kind.
        # Zero-filled, so every page is mapped now: the block manager hands blocks out across the whole pool
        # (LRU, for the prefix cache), and first touches during serving cost a page fault each, some of them
        # milliseconds on a virtual machine (lazily mapped, a 2 GiB pool took 4.5x the system time under load
        # and served 8% fewer tokens/s at concurrency 16). On CPU, on huge pages (layers/huge_pages.py): attention
        # reads blocks from all over the pool.
        shapes = kv_cache_shapes(self.model, num_blocks, config.block_size, self.kv_dtype)
        self.kv_caches = [huge_page_zeros(shape, self.kv_dtype) if self.device.type == "cpu"
                          else torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for shape in shapes]
        self.swap_caches = [torch.zeros((shape[0], num_swap_blocks, *shape[2:]), dtype=self.kv_dtype)
                            for shape in shapes]
        return num_blocks, num_swap_blocks

    def _device_kv_bytes(self) -> int:
        """On CUDA, gpu_memory_utilization of the device less what loading took."""
        free, total = torch.cuda.mem_get_info(self.device)
        return int(total * self.config.gpu_memory_utilization) - (total - free)

    def swap(self, batch: ScheduledBatch) -> None:
        """Copy preempted sequences' blocks to host memory, then swapped-in ones back (in that order:
        a block freed by a swap-out may be the target of a swap-in in the same step)."""
        for copies, to_host in ((batch.swap_out, True), (batch.swap_in, False)):
            if not copies:
                continue
            src, dst = (torch.tensor(ids, dtype=torch.long) for ids in zip(*copies))
            for cache, swap in zip(self.kv_caches, self.swap_caches):
                if to_host:
                    swap[:, dst] = cache[:, src.to(cache.device)].to("cpu")
                else:
                    cache[:, dst.to(cache.device)] = swap[:, src].to(cache.device)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepLogits:
        input_ids: list[int] = []
        positions: list[int] = []
        context_lens: list[int] = []
        sample_rows: list[int] = []  # row in the flat batch of each sampling sequence's last token
        sampling: list[int] = []
        prompt_rows: dict[int, range] = {}
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            start = seq.num_computed_tokens
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens:
                prompt_rows[i] = range(len(input_ids), len(input_ids) + min(n, seq.num_prompt_tokens - start))
            input_ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            context_lens.append(start + n)
            if start + n == seq.num_tokens:
                sampling.append(i)
                sample_rows.append(len(input_ids) - 1)
        meta = AttentionMetadata.build(
            batch.num_tokens, context_lens, [s.block_table for s in batch.seqs], self.block_size, self.device)
        hidden = self.model(
            torch.tensor(input_ids, device=self.device), torch.tensor(positions, device=self.device),
            self.kv_caches, meta)
        prompt = {i: self.model.compute_logits(hidden[r.start:r.stop]).float() for i, r in prompt_rows.items()}
        if sampling:
            rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
            sample = self.model.compute_logits(hidden[rows]).float()
        else:  # only prompt chunks that end before their prompt does: nothing samples, no output head runs
            sample = torch.empty(0, self.model.lm_head.out_features, dtype=torch.float32, device=self.device)
        return StepLogits(sample, sampling, prompt)
