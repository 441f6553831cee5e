"""The model on its device: loaded, its experts set up for serving, its KV pool allocated; each step it turns a
scheduled batch into one flat forward pass over the paged KV cache.

Loading (models/loader.py) gives the plain single-device model; the experts pass (experts/runtime.py) then
decides how each MoE layer's experts are kept and run (offloaded, quantized, the CPU kernel's tiles, oneDNN's
layout), a quantization asked for replaces the dense linear layers (layers/quant_linear.py), and pack_model lays
the other weights out for their matmuls. The KV pool takes what the budget allows
(`kv_cache_memory` on CPU, `gpu_memory_utilization` of the device on CUDA, measured after loading and a profiling
step), in the model's
dtype or, with `kv_cache_dtype` fp8, in e4m3 rows with their scales (layers/kv_cache_dtype.py): about twice the
blocks for the same bytes.

The step's tokens from every sequence are concatenated ([T]); attention metadata says where each
token's K/V goes and which blocks each sequence reads. Logits are computed only for sequences
whose last token is in this step (those are the ones that sample).

With tensor_parallel_size N > 1 (nano-vllm's shape) the runner of rank 0, in the engine core, starts N - 1 workers
(processes on this machine, distributed/mp_executor.py, or Ray actors, distributed/ray_executor.py), each building a
runner of its own rank; every runner shards its model
after loading (distributed/tensor_parallel.py) and allocates its shard of the KV pool. Rank 0 turns each scheduled
batch into plain StepInputs and sends them to the workers, then all ranks run the same forward pass; the
logits come together on rank 0. With enable_expert_parallel the routed experts are spread whole over the same
ranks instead (distributed/expert_parallel.py), as rank 0 places them before it starts the workers; rank 0 first
refuses a layout whose ranks cannot hold their share (distributed/layout.py). A quantization asked for at load
quantizes each rank's shard as one process would the whole (distributed/sharded_quantization.py). With
data_parallel_size N and enable_expert_parallel this runner is one data-parallel rank of N
(distributed/dp_expert_parallel.py): the whole model but for its share of the routed experts, whose MoE layers
exchange tokens with the other ranks' each step; the fused decoder and CUDA graphs are off there (the exchange is
in the experts modules they bypass).

With --enable-lora the LoRA pass (lora/layers.py) wraps the loaded model before the experts pass, which then
leaves its experts on the grouped path; the fused decoder and CUDA graphs stay off, so every step runs the
modules that apply each token's adapter. Each step puts its adapters in slots first (lora/manager.py).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from localmoe.config import ConfigError, EngineConfig
from localmoe.distributed.collectives import CollectiveStats, counted
from localmoe.distributed.dp_expert_parallel import ExpertGroup, join_step
from localmoe.distributed.layout import expert_placement, refuse_unfit_layout
from localmoe.distributed.executor import Executor
from localmoe.distributed.mp_executor import MultiprocExecutor
from localmoe.distributed.shard_model import shard_model
from localmoe.engine.cuda_graphs import DecodeGraphs, capture_decode_graphs
from localmoe.engine.memory_profile import peak_step_bytes
from localmoe.engine.scheduler import ScheduledBatch
from localmoe.engine.stats import expert_cache_memory, routed_expert_bytes, weights_bytes
from localmoe.experts.memory_budget import RUNTIME_RESERVE, auto_cache_bytes, memory_left
from localmoe.experts.offload import OffloadPlan, offloaded_weight
from localmoe.experts.runtime import convert_experts
from localmoe.experts.stats import layer_caches
from localmoe.layers.attention import AttentionMetadata
from localmoe.layers.cpu_kernels import kernels
from localmoe.engine.fused_decoder import FusedDecoder
from localmoe.layers.huge_pages import huge_page_zeros
from localmoe.layers.kv_cache_dtype import cache_dtype, cache_shape
from localmoe.layers.linear import pack_model, packing_supported
from localmoe.layers.moe import moe_blocks
from localmoe.layers.quant_linear import quantize_linears
from localmoe.lora.manager import LoraManager
from localmoe.models.loader import load_model, resolve_dtype

log = logging.getLogger(__name__)


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


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """The device of `rank`: with CUDA, rank r of a tensor-parallel engine takes device r."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    return torch.device("cuda", rank) if device.type == "cuda" and rank else device


def start_executor(config: EngineConfig, device: torch.device, make_runner: partial) -> Executor:
    if config.distributed_executor_backend == "ray":  # Ray is an optional extra, imported only when asked for
        from localmoe.distributed.ray_executor import RayExecutor
        return RayExecutor(config.tensor_parallel_size, device, make_runner, config.ray_cpus_per_worker)
    return MultiprocExecutor(config.tensor_parallel_size, device, make_runner)


@dataclass
class StepInputs:
    """One step's flat batch in plain numbers: what rank 0 sends every worker."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    # rows in the flat batch of each sampling sequence's last token and of its draft tokens (speculative decoding)
    sample_rows: list[int] = field(default_factory=list)
    sampling: list[int] = field(default_factory=list)  # batch index of each sampling sequence
    prompt_rows: dict[int, range] = field(default_factory=dict)  # batch index -> rows whose prompt logprobs are asked
    lora_ids: list[int] = field(default_factory=list)  # each row's LoRA adapter number (0: the base model)


@dataclass
class StepLogits:
    sample: torch.Tensor  # float32 [R, V] at the last token of each sampling sequence, and at each of its drafts
    sampling: list[int]  # batch index of each of those S sequences
    prompt: dict[int, torch.Tensor]  # batch index -> [n, V] at every prompt token computed this step
    routing: torch.Tensor | None = None  # every MoE layer's expert ids [L, T, K], where the fused decoder ran


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path, rank: int = 0,
                 placement: torch.Tensor | None = None, device: torch.device | None = None) -> None:
        """`placement`: the rank of each routed expert [L, E] under expert parallelism, as rank 0 decided it;
        `device`: where the executor placed this rank (a Ray worker's one visible GPU), else by `rank`."""
        self.config = config
        self.device = resolve_device(config.device, rank) if device is None else device
        self.collectives = CollectiveStats()
        if rank == 0 and (config.tensor_parallel_size > 1 or config.data_expert_parallel):
            hf_config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
            refuse_unfit_layout(config, hf_config, self.device, context_length(config, hf_config))
            placement = expert_placement(config, hf_config) if config.enable_expert_parallel else None
        self.expert_group = (ExpertGroup(config.data_parallel_rank, config.data_parallel_size, f"tcp://"
                                         f"{config.data_parallel_address}:{config.data_parallel_master_port}",
                                         self.device) if config.data_expert_parallel else None)
        # rank 0 starts the other ranks first: they load while it does
        self.workers = (start_executor(config, self.device, partial(ModelRunner, config, model_dir,
                                                                    placement=placement))
                        if rank == 0 and config.tensor_parallel_size > 1 else None)
        try:
            self._load(model_dir, placement)
            if self.workers is not None:
                self.workers.wait_ready()
            if self.expert_group is not None:
                self.expert_group.join()
        except BaseException:
            self.shutdown()
            raise

    def _load(self, model_dir: Path, placement: torch.Tensor | None) -> None:
        config = self.config
        self.model, self.hf_config = load_model(model_dir, config.dtype, self.device,
                                                unread=offloaded_weight if config.offloads_experts else None,
                                                quantization=config.quantization)
        self.lora = None
        if config.enable_lora:
            self.lora = LoraManager(self.model, config.max_loras, config.max_lora_rank)
            log.info("LoRA is enabled: the fused decoder and CUDA graphs are off, experts run on the grouped path")
        # the checkpoint's own integers, or a quantization asked for at load
        quant = self.model.quantized_checkpoint or config.quant_scheme
        quant = shard_model(self.model, config, placement, self.device, self.expert_group, quant)
        self.dtype = resolve_dtype(config.dtype, self.hf_config, self.device)
        self.max_model_len = context_length(config, self.hf_config)
        self.kv_dtype = cache_dtype(config.kv_cache_dtype, self.dtype)
        self.block_bytes = kv_block_bytes(self.model, config.block_size, self.kv_dtype)
        self.swap_bytes = int(config.swap_space * 2**30)
        # on CPU the KV pool's size is known before the experts are: an auto-sized expert cache takes what it leaves.
        # On CUDA kv_cache_memory, where given, replaces the profiled sizing (vLLM's kv_cache_memory_bytes)
        self.kv_bytes = self._host_kv_bytes() if self.device.type == "cpu" else self.config.kv_cache_bytes
        if self.device.type == "cpu":
            kernels()  # built (or loaded from their cache) now, before the server is ready, never inside a request
        packing = packing_supported(self.dtype, self.device)
        try:
            self.experts = convert_experts(self.model, self.device, packing, self._offload_plan(model_dir), quant)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if quant is not None and not quant.experts_only:
            try:
                quantize_linears(self.model, quant)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        if packing:
            pack_model(self.model)
        # the decoder layers in one kernel call where the model is of a shape it runs (one rank: no collectives)
        self.fused = (FusedDecoder.of(self.model) if packing and config.tensor_parallel_size == 1
                      and self.expert_group is None and not config.enforce_eager and self.lora is None else None)
        self.block_size = config.block_size
        self.kv_caches: list[torch.Tensor] = []
        self.swap_caches: list[torch.Tensor] = []
        self.graphs: DecodeGraphs | None = None

    def shutdown(self) -> None:
        """Stop the worker processes, if any, and leave the data-parallel ranks' group."""
        if self.workers is not None:
            self.workers.stop()
        if self.expert_group is not None:
            self.expert_group.leave()

    def health_problem(self) -> str | None:
        """Why this runner cannot run a step (a worker process has gone, the data-parallel ranks fell out of step),
        or None."""
        if self.expert_group is not None:
            return self.expert_group.failure
        return None if self.workers is None else self.workers.problem()

    def weight_bytes(self) -> int:
        return weights_bytes(self.model, self.experts)

    def expert_bytes(self) -> int:
        return routed_expert_bytes(self.model)

    def on_every_rank(self, method: str) -> list:
        """`method()`'s result on each rank, as the ranks compute it, rank 0 first."""
        return [getattr(self, method)(), *(self.workers.call(method, reply=True) if self.workers else [])]

    def rank_weight_bytes(self) -> list[int]:
        """Each rank's bytes of weights, as the ranks count them, rank 0 first."""
        return self.on_every_rank("weight_bytes")

    def parallel_stats(self) -> dict | None:
        """The layout and what the steps' collectives moved (distributed/collectives.py); None with one rank."""
        config = self.config
        if config.tensor_parallel_size == 1 and self.expert_group is None:
            return None
        layout = {"tensor_parallel_size": config.tensor_parallel_size}
        if self.expert_group is not None:
            layout = {"data_parallel_size": config.data_parallel_size, "data_parallel_rank": config.data_parallel_rank,
                      "dummy_steps": self.expert_group.dummy_steps}
        return {**layout, "expert_parallel_size": config.expert_parallel_size,
                "expert_placement": config.expert_placement if config.enable_expert_parallel else None,
                "collective_bytes": self.collectives.summary()}

    def join_step(self, tokens: int, requests: int) -> None:
        """With expert parallelism over data-parallel ranks: agree this step with the other ranks, and take part in
        it with no tokens of this rank's where it has none and another has some (dp_expert_parallel.py)."""
        before = counted()
        join_step(self.model, self.expert_group, tokens, requests)
        if not tokens and self.expert_group.peers_compute:
            self.collectives.observe(before, 0, 0, self.expert_group.rows)

    def expert_caches(self) -> dict:
        """This rank's expert caches: each MoE layer's statistics (experts/stats.py), the experts its store holds per
        layer, and the cache's memory."""
        store = self.experts.store
        return {"layers": layer_caches([moe for _, moe in moe_blocks(self.model)]),
                "held": [layer.held for layer in store.layers.values()] if store is not None else [],
                "memory": expert_cache_memory(self.experts)}

    def rank_caches(self) -> list[dict] | None:
        """Each rank's expert_caches, rank 0 first, where the ranks offload their own experts (expert parallelism
        with offloading); else None: the caches, if any, are this process's."""
        if self.workers is None or not self.config.offloads_experts:
            return None
        return self.on_every_rank("expert_caches")

    def _on_workers(self, method: str, *args: object) -> None:
        """Have every worker run `method(*args)` on its runner, as rank 0 is about to; a no-op without workers."""
        if self.workers is not None:
            self.workers.call(method, *args)

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
                           memory_source=source, measured_before_store=config.expert_cache_bytes == "auto")

    def _host_kv_bytes(self) -> int:
        """kv_cache_memory; by default 2 GiB, or an eighth of what the process may still use where that is less
        (never below one sequence of max_model_len tokens: less is refused in allocate_kv_cache)."""
        configured = self.config.kv_cache_bytes
        if configured is not None:
            return configured
        one_sequence = -(-self.max_model_len // self.config.block_size) * self.block_bytes
        return max(one_sequence, min(DEFAULT_KV_BYTES, memory_left() // 8))

    def allocate_kv_cache(self, num_blocks: int | None = None) -> tuple[int, int]:
        """Allocate the KV pool the budget allows (or `num_blocks` blocks: a draft model's pool, addressed by the
        target's block ids), and its host swap space; returns (blocks, swap blocks). Refuses a budget that cannot
        hold one sequence of max_model_len tokens."""
        self._on_workers("allocate_kv_cache")
        config = self.config
        if num_blocks is None:
            num_blocks = (self.kv_bytes if self.kv_bytes is not None else self._device_kv_bytes()) // self.block_bytes
        if config.tensor_parallel_size > 1:  # every rank holds the same blocks: the fewest any rank's budget allows
            agreed = torch.tensor(num_blocks, device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            num_blocks = int(agreed)
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
        # CUDA graphs pad decode steps with rows that write to one scratch block past those the block manager owns
        graphs = (self.device.type == "cuda" and not config.enforce_eager and config.tensor_parallel_size == 1
                  and self.expert_group is None and not config.offloads_experts and self.lora is None)
        shapes = kv_cache_shapes(self.model, num_blocks + graphs, config.block_size, self.kv_dtype)
        self.kv_caches = [huge_page_zeros(shape, self.kv_dtype) if self.device.type == "cpu"
                          else torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for shape in shapes]
        self.swap_caches = [torch.zeros((shape[0], num_swap_blocks, *shape[2:]), dtype=self.kv_dtype)
                            for shape in shapes]
        if graphs:
            self.graphs = capture_decode_graphs(self.model, self.kv_caches, config.max_num_seqs,
                                                -(-self.max_model_len // config.block_size), config.block_size,
                                                scratch_block=num_blocks)
        return num_blocks, num_swap_blocks

    def _device_kv_bytes(self) -> int:
        """On CUDA, gpu_memory_utilization of the device less what loading took and the peak of a step of the
        largest batch (engine/memory_profile.py, vLLM's profile run)."""
        config = self.config
        activations = peak_step_bytes(
            self.model, lambda n: [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for shape in
                                   kv_cache_shapes(self.model, n, config.block_size, self.kv_dtype)],
            config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len, config.block_size,
            self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        return int(total * config.gpu_memory_utilization) - (total - free) - activations

    def swap(self, batch: ScheduledBatch) -> None:
        if batch.swap_out or batch.swap_in:
            self.swap_blocks(batch.swap_out, batch.swap_in)

    def swap_blocks(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Copy preempted sequences' blocks to host memory, then swapped-in ones back (in that order:
        a block freed by a swap-out may be the target of a swap-in in the same step)."""
        self._on_workers("swap_blocks", swap_out, swap_in)
        for copies, to_host in ((swap_out, True), (swap_in, False)):
            if not copies:
                continue
            src, dst = (torch.tensor(ids, dtype=torch.long) for ids in zip(*copies))
            for cache, swap in zip(self.kv_caches, self.swap_caches):
                if to_host:
                    swap[:, dst] = cache[:, src.to(cache.device)].to("cpu")
                else:
                    cache[:, dst.to(cache.device)] = swap[:, src].to(cache.device)

    def execute(self, batch: ScheduledBatch) -> StepLogits:
        if self.lora is not None:
            self.lora.activate({seq.request.lora for seq in batch.seqs if seq.request.lora is not None})
        return self.run(self.prepare(batch, with_lora=self.lora is not None))

    @staticmethod
    def prepare(batch: ScheduledBatch, with_lora: bool = False) -> StepInputs:
        """`with_lora`: each row's adapter number too (a list as long as the step's tokens: only LoRA reads it)."""
        step = StepInputs(query_lens=batch.num_tokens, block_tables=[s.block_table for s in batch.seqs])
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            start = seq.num_computed_tokens
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens:
                step.prompt_rows[i] = range(len(step.input_ids),
                                            len(step.input_ids) + min(n, seq.num_prompt_tokens - start))
            drafts = seq.spec_token_ids  # verified in this step: every one of their rows samples
            rows = len(step.input_ids)
            step.input_ids += seq.token_ids[start:start + n] + drafts if drafts else seq.token_ids[start:start + n]
            if with_lora:
                step.lora_ids += [seq.request.lora_int_id] * (len(step.input_ids) - rows)
            step.positions += range(start, start + n)
            step.context_lens.append(start + n)
            if start + n == seq.num_tokens + len(drafts):
                step.sampling.append(i)
                step.sample_rows += range(len(step.input_ids) - 1 - len(drafts), len(step.input_ids))
        return step

    def run(self, step: StepInputs) -> StepLogits:
        """The forward pass of one step, on every rank (rank 0 sends the step to the workers first); the logits
        are rank 0's."""
        self._on_workers("run", step)
        before = counted()
        try:
            logits = self._forward(step)
            self.collectives.observe(before, len(step.input_ids),
                                     len(step.sample_rows) + sum(map(len, step.prompt_rows.values())),
                                     self.expert_group.rows if self.expert_group is not None else 0)
            return logits
        except Exception as error:
            # the ranks may be out of step now: no further step can be trusted
            if self.workers is not None:
                self.workers.stop(self.workers.problem() or f"a tensor-parallel step failed: {error!r}")
            if self.expert_group is not None:
                self.expert_group.fail(f"a step failed on data-parallel rank {self.config.data_parallel_rank}: "
                                       f"{error!r}")
            raise

    @torch.inference_mode()
    def _forward(self, step: StepInputs) -> StepLogits:
        decode = self.graphs is not None and max(step.query_lens) == 1
        hidden = self.graphs.replay(step.input_ids, step.positions, step.block_tables) if decode else None
        routing = None
        if hidden is None:  # prefill, mixed, or past the largest captured decode batch: eager
            meta = AttentionMetadata.build(step.query_lens, step.context_lens, step.block_tables, self.block_size,
                                           self.device)
            input_ids = torch.tensor(step.input_ids, device=self.device)
            positions = torch.tensor(step.positions, device=self.device)
            if self.lora is not None:
                self.lora.set_tokens(step.lora_ids, self.device)
            if self.fused is not None:
                hidden, routing = self.fused(input_ids, positions, self.kv_caches, meta)
            else:
                hidden = self.model(input_ids, positions, self.kv_caches, meta)
        prompt = {i: self.model.compute_logits(hidden[r.start:r.stop]).float() for i, r in step.prompt_rows.items()}
        if step.sampling:
            rows = torch.tensor(step.sample_rows, dtype=torch.long, device=self.device)
            sample = self.model.compute_logits(hidden[rows]).float()
        else:  # only prompt chunks that end before their prompt does: nothing samples, no output head runs
            sample = torch.empty(0, self.hf_config["vocab_size"], dtype=torch.float32, device=self.device)
        return StepLogits(sample, step.sampling, prompt, routing)
