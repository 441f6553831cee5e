"""Settings: one frozen dataclass per section of configs/config.yaml.

The file keeps the original LocalMoE shape: a `model:` section describing the built-in MoE and a
`vllm:` section (alias `engine:`) keyed by vLLM's engine argument names. Command-line flags override
the file, one flag per key; an unknown key is an error that names it.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from localmoe.distributed.expert_placement import PLACEMENTS
from localmoe.engine.speculative_config import SpeculativeConfig, parse_speculative_config
from localmoe.models.hub import HubError, hub_checkpoint, hub_tokenizer, is_hub_id
from localmoe.quant.scheme import LOAD_TIME, QuantScheme, quant_scheme
from localmoe.server.chat_template import load_chat_template
from localmoe.server.tenants import APIKey, key_ring, read_keys_file
from localmoe.server.tool_parsers import TOOL_PARSERS
from localmoe.server.tool_use import ToolSettings

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "config.yaml"


class ConfigError(ValueError):
    """A configuration that cannot be used, with a message naming the offending key."""


# how the built-in architecture's MoE layers route (models/localmoe.py); the first is Mixtral's
ROUTINGS = ("topk_softmax", "expert_choice", "soft_moe", "hash")
EXPERT_CACHE_POLICIES = ("lru", "lfu", "lfru")
EXPERT_OFFLOAD_TARGETS = ("host", "disk")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")  # what redis-py's from_url reads
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # vLLM's names; fp8 means e4m3
# model.quantization_type values that name an unquantized dtype (the original guide's "fp16"): they set the dtype
QUANTIZATION_DTYPES = {"fp16": "float16", "float16": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16",
                       "fp32": "float32", "float32": "float32"}


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the built-in MoE (the `model:` section)."""

    num_experts: int = 8
    top_k_experts: int = 2
    hidden_size: int = 768
    intermediate_size: int = 3072
    max_sequence_length: int = 2048
    quantization_type: str = "none"
    enable_compilation: bool = False
    num_layers: int = 2
    num_attention_heads: int = 12
    num_key_value_heads: int = 4
    rope_theta: float = 10000.0
    routing: str = "topk_softmax"
    capacity_factor: float | None = None  # token dropping past this many times an even share; None: off
    slots_per_expert: int = 1  # soft_moe routing only
    seed: int = 0

    def validate(self) -> None:
        refusals = [
            (self.routing not in ROUTINGS, "routing", f"routing {self.routing!r} is not one of {', '.join(ROUTINGS)}"),
            (self.capacity_factor is not None and self.capacity_factor <= 0, "capacity_factor",
             "capacity_factor must be positive (null turns token dropping off)"),
            (self.capacity_factor is not None and self.routing == "soft_moe", "capacity_factor",
             "soft_moe routing drops no tokens; leave capacity_factor null"),
            (self.slots_per_expert < 1, "slots_per_expert", "slots_per_expert must be positive"),
            (str(self.quantization_type).lower() not in (*QUANTIZATION_DTYPES, *LOAD_TIME, "none", ""),
             "quantization_type", f"quantization_type {self.quantization_type!r} is not one of none, "
             f"{', '.join(QUANTIZATION_DTYPES)}, {', '.join(LOAD_TIME)}"),
            (self.enable_compilation, "enable_compilation",
             "compilation is not available yet (the CPU kernels already fuse the hot paths); use false"),
        ]
        for bad, key, message in refusals:
            if bad:
                raise ConfigError(f"model.{key}: {message}")


def setting(default: Any, help: str) -> Any:
    """A key with its help text: the one place a flag's meaning is written (`localmoe serve --help` shows it, with
    the default added; tests/test_cli.py fails a key without one)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings with vLLM's engine-argument names (the `vllm:` / `engine:` section); help in vLLM's words
    where the key is vLLM's."""

    model_name: str = setting("", "Name or path of the Hugging Face model to use: a checkpoint directory, a hub "
                              "id ORG/NAME (from the Hugging Face cache, downloaded where the network allows), a "
                              "GGUF file (with --tokenizer), or localmoe-random. If unspecified, the built-in "
                              "model localmoe-builtin.")
    served_model_name: str | None = setting(None, "The model name used in the API and in the model_name label "
                                            "of the metrics. If unspecified, the --model argument.")
    tokenizer: str | None = setting(None, "Name or path of the Hugging Face tokenizer to use (a directory or a "
                                    "hub id, found like --model). If unspecified, model name or path will be used.")
    revision: str | None = setting(None, "The specific model version to use. It can be a branch name, a tag "
                                   "name, or a commit id. If unspecified, will use the default version (main).")
    tokenizer_revision: str | None = setting(None, "The specific revision to use for the tokenizer on the Hugging "
                                             "Face Hub: a branch name, a tag name, or a commit id. If unspecified, "
                                             "will use the default version (main).")
    download_dir: str | None = setting(None, "Directory to download and load the weights of a hub id. If "
                                       "unspecified, the default cache directory of Hugging Face (HF_HUB_CACHE, "
                                       "or HF_HOME/hub, ~/.cache/huggingface/hub).")
    dtype: str = setting("auto", "Data type for model weights and activations: auto (the checkpoint's torch_dtype; "
                         "float16 runs as bfloat16 on CPU, where it is slow), float32 (float, fp32), bfloat16 "
                         "(bf16), float16 (half, fp16).")
    device: str = setting("auto", "Device type for execution: auto (CUDA where available, else CPU), cpu, cuda, "
                          "cuda:N.")
    seed: int = setting(0, "Random seed for reproducibility (a request's own seed gives it its own generator).")
    tensor_parallel_size: int = setting(1, "Number of tensor parallel groups: the engine core and N - 1 worker "
                                        "processes each hold 1/N of the attention heads, of the MLP and expert "
                                        "intermediate features, of the vocabulary and of the KV cache.")
    distributed_executor_backend: str | None = setting(None, "Backend to use for distributed model workers: mp "
                                                       "(processes on this machine) or ray (actors on the Ray "
                                                       "cluster RAY_ADDRESS names, else a local one). If "
                                                       "unspecified: mp when tensor_parallel_size > 1.")
    gpu_memory_utilization: float = setting(0.9, "The fraction of GPU memory to be used for the model executor, "
                                            "which can range from 0 to 1 (0.5: 50%); the KV cache gets what the "
                                            "weights leave of it. CUDA only: on CPU, --kv-cache-memory.")
    # bytes for the KV pool when the device is the CPU; the default fits inside a container's limit
    kv_cache_memory: str | None = setting(None, "Size of the KV cache, in bytes (4294967296, 4GiB, 512M), each "
                                          "rank's with tensor parallelism; on CUDA it replaces "
                                          "--gpu-memory-utilization's sizing (vLLM's --kv-cache-memory-bytes). "
                                          "If unspecified, on CPU: 2 GiB, or an eighth of the memory left after "
                                          "loading where that is less, and at least one sequence of "
                                          "--max-model-len.")
    max_model_len: int | None = setting(None, "Model context length (prompt and output), in tokens. If "
                                        "unspecified, will be automatically derived from the model config "
                                        "(max_position_embeddings).")
    block_size: int = setting(16, "Size of a contiguous cache block in number of tokens.")
    swap_space: float = setting(0.0, "Size of the CPU swap space, in GiB: a preempted request's KV blocks are "
                                "copied there and back; 0: preemption recomputes them.")
    kv_cache_dtype: str = setting("auto", "Data type for kv cache storage. If auto, will use model data type. fp8 "
                                  "(= fp8_e4m3): e4m3 with a scale per row, about half the bytes.")
    # on 2 CPU cores a 512-token step of the benchmark model takes ~0.15 s, short enough that a burst of prompts
    # does not stall running decodes (c=16 mean TTFT 571 ms vs 722 ms at 2048)
    enforce_eager: bool = setting(False, "Always use eager-mode PyTorch: the model's modules one by one. If False, "
                                  "decode steps on CUDA replay CUDA graphs captured at batch sizes 1, 2, 4, 8, 16, ... "
                                  "up to --max-num-seqs (prefill and larger batches run eagerly), and on CPU the "
                                  "decoder layers of models of Mixtral's shape run in one kernel call.")
    max_num_batched_tokens: int = setting(512, "Maximum number of tokens to be processed in a single iteration.")
    max_num_seqs: int = setting(64, "Maximum number of sequences to be processed in a single iteration.")
    max_waiting_requests: int = setting(1024, "Sequences queued beyond --max-num-seqs; past it the server "
                                        "answers 503 with Retry-After.")
    disable_log_stats: bool = setting(False, "Disable logging statistics (the periodic 'Avg prompt throughput' "
                                      "line; /metrics is unaffected).")
    max_logprobs: int = setting(20, "Maximum number of log probabilities to return when logprobs or "
                                "prompt_logprobs is specified in a request (OpenAI's cap).")
    enable_prefix_caching: bool = setting(True, "Whether to enable prefix caching: full KV blocks of a prompt "
                                          "prefix already seen are reused, not recomputed.")
    enable_chunked_prefill: bool = setting(True, "If True, prefill requests can be chunked based on the remaining "
                                           "max_num_batched_tokens, so a long prompt never stalls decodes.")
    max_chunked_prefill_tokens: int | None = setting(None, "Most prompt tokens of one request prefilled in a "
                                                     "single iteration. If unspecified: --max-num-batched-tokens.")
    quantization: str | None = setting(None, f"Method used to quantize the weights at load: {', '.join(LOAD_TIME)}. "
                                       "If unspecified, the checkpoint's quantization_config "
                                       "(awq, gptq, compressed-tensors, fp8) is served; without one the weights "
                                       "are unquantized, in --dtype.")
    quantize_experts_only: bool = setting(False, "With --quantization int8, int4 or fp8, quantize the experts alone; "
                                          "dense layers keep the checkpoint's dtype.")
    trust_remote_code: bool = setting(False, "Trust remote code (e.g., from HuggingFace) when downloading the "
                                      "tokenizer: it lets a checkpoint's tokenizer run its own code. The forward "
                                      "pass is always LocalMoE's.")
    load_format: str = setting("auto", "The format of the model weights to load: auto or safetensors (both read "
                               "safetensors, a single file or a sharded index).")
    use_v2_block_manager: bool = setting(True, "[DEPRECATED] Accepted for old configs; setting it to True or "
                                         "False has no effect.")
    speculative_config: str | dict | None = setting(
        None, "The configurations for speculative decoding, as JSON: {\"method\": \"ngram\", "
        "\"num_speculative_tokens\": 4, \"prompt_lookup_max\": 4, \"prompt_lookup_min\": 1} (n-gram lookup in the "
        "prompt and output) or {\"method\": \"draft_model\", \"model\": PATH, \"num_speculative_tokens\": 4} (a "
        "small checkpoint with the same tokenizer); \"disable_by_batch_size\": N turns it off for steps with more "
        "running sequences. If unspecified, no speculation.")
    routing_trace: str | None = setting(None, "File to append each token's chosen experts to, as JSON lines (one "
                                        "per sequence per engine step). If unspecified, no trace.")
    expert_cache_size: int = setting(0, "Expert offloading: experts per MoE layer kept in cache slots on the "
                                     "compute device, the others where --expert-offload-target says; 0: all "
                                     "resident. With --enable-expert-parallel: each rank's, of its own experts.")
    expert_cache_memory: str | None = setting(None, "Expert offloading by size: the expert cache's bytes over all "
                                              "MoE layers (512MiB, 4G, ...), or auto: what the process's memory "
                                              "limit leaves. Excludes --expert-cache-size. With "
                                              "--enable-expert-parallel: each rank's, for its own experts.")
    expert_cache_policy: str = setting("lru", "Which cached expert makes room for another: lru, lfu or lfru.")
    expert_offload_target: str = setting("host", "Where experts outside the cache live: host (memory) or disk "
                                         "(the checkpoint's safetensors, read by offset).")
    expert_prefetch: bool = setting(False, "Load the next layer's likely experts (its router applied to this "
                                    "layer's hidden state) while this layer computes.")
    # data parallelism (distributed/data_parallel.py): replicas of the whole server behind one API server
    data_parallel_size: int = setting(1, "Number of data parallel replicas: independent engines, each in a process "
                                      "of its own with 1/N of the CPU cores (and tensor_parallel_size GPUs of its "
                                      "own on CUDA), behind one API server that sends each request to the least "
                                      "loaded replica, or to the one holding its prompt's prefix. With "
                                      "--enable-expert-parallel the replicas also spread the routed experts "
                                      "among them and run their MoE layers together.")
    data_parallel_rank: int | None = setting(None, "With --data-parallel-size and --enable-expert-parallel: serve "
                                             "only this rank, one engine and no API server in front (the ranks "
                                             "started one by one, as vLLM's external launch; `localmoe serve "
                                             "--data-parallel-size N` alone starts them all itself).")
    data_parallel_address: str = setting("127.0.0.1", "The address of data-parallel rank 0, where the ranks "
                                         "of --enable-expert-parallel meet (torch.distributed).")
    data_parallel_master_port: int = setting(29550, "The port on --data-parallel-address where the ranks of "
                                             "--enable-expert-parallel meet.")
    # multi-LoRA (lora/): PEFT adapters served beside the base model, chosen per request by `model`
    enable_lora: bool = setting(False, "If True, enable handling of LoRA adapters (PEFT's format). The fused "
                                "decoder and CUDA graphs are off with it: every step runs the model's modules.")
    lora_modules: list[str] | None = setting(None, "LoRA module configurations in either 'name=path' format "
                                                    "or JSON format ('{\"name\": ..., \"path\": ..., "
                                                    "\"base_model_name\": ...}'); the flag may be repeated.")
    max_loras: int = setting(1, "Max number of LoRAs in a single batch (adapters resident at once; the least "
                             "recently used one makes room for another).")
    max_lora_rank: int = setting(16, "Max LoRA rank: adapters of a higher rank are refused.")
    # expert parallelism (distributed/expert_parallel.py, distributed/expert_placement.py)
    enable_expert_parallel: bool = setting(False, "Use expert parallelism instead of tensor parallelism for MoE "
                                           "layers: each of the --tensor-parallel-size ranks (or of the "
                                           "--data-parallel-size replicas) holds whole routed experts, a share of "
                                           "them; attention, dense layers and shared experts stay tensor-parallel "
                                           "(whole on each data-parallel replica).")
    expert_placement: str = setting("contiguous", "Which rank holds each routed expert with "
                                    "--enable-expert-parallel: contiguous (rank r the r-th block), round-robin "
                                    "(expert e on rank e mod N), or balanced (the busiest experts spread first, by "
                                    "the token counts of --expert-placement-stats).")
    expert_placement_stats: str | None = setting(None, "Routing counts for --expert-placement balanced: a routing "
                                                 "trace (--routing-trace's JSON lines) or a saved "
                                                 "/v1/stats/experts answer.")

    @property
    def data_expert_parallel(self) -> bool:
        """Expert parallelism over data-parallel replicas (distributed/dp_expert_parallel.py)."""
        return self.enable_expert_parallel and self.data_parallel_size > 1

    @property
    def model_ranks(self) -> int:
        """The processes one model is spread over: the data-parallel ranks under expert parallelism over them, else
        the tensor-parallel ones."""
        return self.data_parallel_size if self.data_expert_parallel else self.tensor_parallel_size

    @property
    def expert_parallel_size(self) -> int:
        """The ranks the routed experts are spread over (1: none)."""
        return self.model_ranks if self.enable_expert_parallel else 1

    def _expert_parallel_refusals(self) -> list[tuple[bool, str, str]]:
        balanced = self.expert_placement == "balanced"
        return [
            (self.enable_expert_parallel and self.tensor_parallel_size < 2 and self.data_parallel_size < 2,
             "enable_expert_parallel", "expert parallelism spreads the experts over the tensor-parallel ranks or "
             "the data-parallel replicas: set tensor_parallel_size > 1 or data_parallel_size > 1"),
            (self.enable_expert_parallel and self.tensor_parallel_size > 1 and self.data_parallel_size > 1,
             "enable_expert_parallel", "expert parallelism over data-parallel replicas of a tensor-parallel engine "
             "is not available yet; use tensor_parallel_size 1 or data_parallel_size 1"),
            (self.data_expert_parallel and self.enable_lora, "enable_lora", "LoRA adapters are not available with "
             "expert parallelism over data-parallel replicas yet"),
            (self.data_expert_parallel and self.speculative_config is not None, "speculative_config",
             "speculative decoding is not available with expert parallelism over data-parallel replicas yet"),
            (self.data_parallel_rank is not None and not self.data_expert_parallel, "data_parallel_rank",
             "a data-parallel rank is served alone only for --enable-expert-parallel (its ranks meet); plain "
             "replicas are independent servers"),
            (self.data_parallel_rank is not None and not 0 <= self.data_parallel_rank < self.data_parallel_size,
             "data_parallel_rank", f"data_parallel_rank must be in [0, data_parallel_size {self.data_parallel_size})"),
            (self.data_expert_parallel and self.offloads_experts, "enable_expert_parallel",
             "expert offloading is not available with expert parallelism over data-parallel replicas yet; keep "
             "experts resident (expert_cache_size: 0) or use tensor_parallel_size > 1"),
            (self.enable_expert_parallel and self.expert_cache_bytes == "auto", "expert_cache_memory",
             "auto sizes one process's cache from the memory it may use; with expert parallelism the ranks share "
             "it: give each rank's cache in bytes"),
            (self.expert_placement not in PLACEMENTS, "expert_placement",
             f"expert_placement {self.expert_placement!r} is not one of {', '.join(PLACEMENTS)}"),
            (self.expert_placement != "contiguous" and not self.enable_expert_parallel, "expert_placement",
             "an expert placement places experts on the ranks of --enable-expert-parallel, which is off"),
            (balanced and self.expert_placement_stats is None, "expert_placement_stats",
             "balanced placement needs the experts' token counts: a routing trace or a /v1/stats/experts JSON"),
            (not balanced and self.expert_placement_stats is not None, "expert_placement_stats",
             "routing counts are read for expert_placement: balanced alone"),
        ]
    # the Ray executor (distributed/ray_executor.py)
    ray_cpus_per_worker: int = setting(1, "With --distributed-executor-backend ray: the CPUs each rank's placement "
                                       "group bundle reserves (rank 0's, on the engine core's node, too); Ray "
                                       "sets a worker's OMP_NUM_THREADS to it.")

    def validate(self) -> None:
        self.validate_lora()
        refusals = [
            *self._expert_parallel_refusals(),
            (self.tensor_parallel_size < 1, "tensor_parallel_size", "tensor_parallel_size must be positive"),
            (self.distributed_executor_backend not in (None, "mp", "ray"), "distributed_executor_backend",
             f"distributed_executor_backend {self.distributed_executor_backend!r} is not one of mp, ray"),
            (self.distributed_executor_backend == "ray" and importlib.util.find_spec("ray") is None,
             "distributed_executor_backend", "the ray backend needs Ray: pip install 'localmoe[ray]'"),
            (self.ray_cpus_per_worker < 1, "ray_cpus_per_worker", "ray_cpus_per_worker must be positive"),
            (self.tensor_parallel_size > 1 and self.offloads_experts and not self.enable_expert_parallel,
             "tensor_parallel_size", "expert offloading does not split experts by feature across tensor-parallel "
             "ranks; add enable_expert_parallel (each rank offloads its own experts), keep experts resident "
             "(expert_cache_size: 0) or use tensor_parallel_size: 1"),
            (self.swap_space < 0, "swap_space", "swap_space must not be negative"),
            (self.model_name.endswith(".gguf") and not self.tokenizer, "tokenizer",
             "a GGUF file needs --tokenizer pointing at the original checkpoint directory"),
            (self.revision is not None and not is_hub_id(self.model_name), "revision",
             f"a revision picks a version of a hub id (ORG/NAME); {self.model_name or 'the built-in model'} is "
             "not one"),
            (self.tokenizer_revision is not None and not is_hub_id(self.tokenizer), "tokenizer_revision",
             "a tokenizer revision picks a version of a hub id given as --tokenizer"),
            (self.download_dir is not None and not (is_hub_id(self.model_name) or is_hub_id(self.tokenizer)),
             "download_dir", "the download directory holds hub ids' files; neither --model nor --tokenizer is one"),
            (self.load_format not in ("auto", "safetensors"), "load_format",
             f"load_format {self.load_format!r} is not supported (auto, safetensors)"),
            (self.dtype not in ("auto", "float32", "bfloat16", "float16", "half", "float", "bf16", "fp16", "fp32"),
             "dtype", f"dtype {self.dtype!r} is not one of auto, float32, bfloat16, float16"),
            (self.kv_cache_dtype not in KV_CACHE_DTYPES, "kv_cache_dtype",
             f"kv_cache_dtype {self.kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)} (fp8 is e4m3; "
             "e5m2 is not served)"),
            (self.block_size < 1, "block_size", "block_size must be positive"),
            (self.max_num_seqs < 1, "max_num_seqs", "max_num_seqs must be positive"),
            (self.max_waiting_requests < 0, "max_waiting_requests", "max_waiting_requests must not be negative"),
            (self.max_logprobs < 0, "max_logprobs", "max_logprobs must not be negative"),
            (self.max_num_batched_tokens < 1, "max_num_batched_tokens", "max_num_batched_tokens must be positive"),
            (self.max_model_len is not None and self.max_model_len < 1, "max_model_len",
             "max_model_len must be positive"),
            (self.expert_cache_size < 0, "expert_cache_size",
             "expert_cache_size must not be negative (0 keeps every expert resident)"),
            (self.expert_cache_size > 0 and self.expert_cache_memory is not None, "expert_cache_memory",
             "give expert_cache_size (experts per layer) or expert_cache_memory (bytes), not both"),
            (self.expert_cache_policy not in EXPERT_CACHE_POLICIES, "expert_cache_policy",
             f"expert_cache_policy {self.expert_cache_policy!r} is not one of {', '.join(EXPERT_CACHE_POLICIES)}"),
            (self.expert_offload_target not in EXPERT_OFFLOAD_TARGETS, "expert_offload_target",
             f"expert_offload_target {self.expert_offload_target!r} is not one of "
             f"{', '.join(EXPERT_OFFLOAD_TARGETS)}"),
        ]
        for bad, key, message in refusals:
            if bad:
                raise ConfigError(f"{key}: {message}")
        self.quant_scheme  # noqa: B018 -- a name we do not serve is refused at start
        self.speculative  # noqa: B018 -- refused at start too
        self.expert_cache_bytes, self.kv_cache_bytes  # noqa: B018 -- parsed now: a bad value is refused at start

    def validate_lora(self) -> None:
        if not self.enable_lora:
            if self.lora_modules:
                raise ConfigError("lora_modules: serving LoRA adapters needs enable_lora (--enable-lora)")
            return
        refusals = [
            (self.max_loras < 1, "max_loras", "max_loras must be positive"),
            (self.max_lora_rank < 1, "max_lora_rank", "max_lora_rank must be positive"),
            (self.tensor_parallel_size > 1, "enable_lora", "LoRA adapters are not split across tensor-parallel "
             "ranks yet; use tensor_parallel_size: 1"),
            (self.offloads_experts, "enable_lora", "LoRA adapters run on resident experts; expert offloading is "
             "not available with them yet"),
            (self.quantization not in (None, "", "none"), "enable_lora",
             "LoRA adapters over quantized weights are not available yet"),
            (self.speculative_config is not None, "enable_lora",
             "speculative decoding with LoRA adapters is not available yet"),
        ]
        for bad, key, message in refusals:
            if bad:
                raise ConfigError(f"{key}: {message}")
        self.lora_module_list  # noqa: B018 -- a malformed entry is refused at start

    @property
    def lora_module_list(self) -> list[tuple[str, str, str | None]]:
        """lora_modules as (name, path, base_model_name or None)."""
        modules = []
        for entry in self.lora_modules or []:
            if isinstance(entry, str) and entry.lstrip().startswith("{"):
                try:
                    entry = json.loads(entry)
                except ValueError as error:
                    raise ConfigError(f"lora_modules: {entry!r} is not valid JSON: {error}") from None
            if isinstance(entry, dict):
                if not isinstance(entry.get("name"), str) or not isinstance(entry.get("path"), str) or \
                        set(entry) - {"name", "path", "base_model_name"}:
                    raise ConfigError(f"lora_modules: {entry} must have name and path (and may have "
                                      "base_model_name), nothing else")
                modules.append((entry["name"], entry["path"], entry.get("base_model_name")))
                continue
            name, sep, path = str(entry).partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"lora_modules: {entry!r} is not name=path or a JSON object")
            modules.append((name, path, None))
        return modules

    @property
    def quant_scheme(self) -> QuantScheme | None:
        try:
            return quant_scheme(self.quantization, self.quantize_experts_only)
        except ValueError as error:
            raise ConfigError(f"quantization: {error}") from None

    @property
    def speculative(self) -> SpeculativeConfig | None:
        try:
            return parse_speculative_config(self.speculative_config)
        except ValueError as error:
            raise ConfigError(f"speculative_config: {error}") from None

    @property
    def expert_cache_bytes(self) -> int | str | None:
        """expert_cache_memory in bytes, "auto", or None."""
        return parse_memory(self.expert_cache_memory, "expert_cache_memory")

    @property
    def kv_cache_bytes(self) -> int | str | None:
        """kv_cache_memory in bytes, or None for the default (engine/model_runner.py)."""
        return parse_memory(self.kv_cache_memory, "kv_cache_memory", auto=False)

    @property
    def offloads_experts(self) -> bool:
        return self.expert_cache_size > 0 or self.expert_cache_memory is not None


def parse_memory(value: int | str | None, key: str, auto: bool = True) -> int | str | None:
    """Bytes given as a number, or with a binary unit (512MiB, 4G, 1.5GiB), or (where `auto`) "auto"."""
    if value is None or (auto and isinstance(value, str) and value.strip().lower() == "auto"):
        return None if value is None else "auto"
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(value), re.IGNORECASE)
    if match is None or isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} is not a number of bytes (e.g. 4294967296, 4GiB, 512M)"
                          + (" or auto" if auto else ""))
    number = float(match[1]) * 1024 ** ("kmgt".index(match[2].lower()) + 1 if match[2] else 0)
    if number < 1:
        raise ConfigError(f"{key}: {value!r} must be at least one byte")
    return int(number)


@dataclass(frozen=True)
class ServerConfig:
    host: str = setting("127.0.0.1", "Host name or address to bind (0.0.0.0: every interface).")
    port: int = setting(8000, "Port number to listen on.")
    api_key: str | None = setting(None, "Require this key (Bearer, or HTTP Basic password) on every route but "
                                  "/health. If unspecified, no key.")
    admin_api_key: str | None = setting(None, "Key for the admin routes (/v1/models/load, /v1/models/unload, "
                                        "/v1/models/switch), as Bearer; it opens every other route too. If "
                                        "unspecified, the admin routes are closed.")
    log_level: str = setting("info", "Log level of uvicorn and LocalMoE: critical, error, warning, info, debug, "
                             "trace.")
    shutdown_timeout: float = setting(30.0, "Seconds in-flight requests get to finish after SIGTERM.")
    engine_stall_timeout: float = setting(120.0, "Seconds without engine progress while requests wait after "
                                          "which /health fails.")
    chat_template: str | None = setting(
        None, "The file path to the chat template, or the template in single-line form, for the specified model. "
        "LocalMoE's bundled tool templates are also found by file name (tool_chat_template_hermes.jinja, "
        "tool_chat_template_mistral.jinja, as under vLLM's examples/). If unspecified, the checkpoint's, or for "
        "requests with tools, the --tool-call-parser's template where the checkpoint's does not render tools.")
    enable_auto_tool_choice: bool = setting(
        False, "Enable auto tool choice for supported models. Use --tool-call-parser to specify which parser to use.")
    tool_call_parser: str | None = setting(
        None, "Select the tool call parser depending on the model that you're using. This is used to parse the "
        "model-generated tool call into OpenAI API format. Required for --enable-auto-tool-choice. "
        f"Choices: {', '.join(TOOL_PARSERS)}.")
    # tenants: API keys with roles, limits and priorities, and the counters they share (server/rate_limits.py)
    api_keys_file: str | None = setting(
        None, "YAML file of API keys: `keys:`, a list of {name, key (or key_env: an environment variable holding "
        "it), role (user or admin), priority, requests_per_minute, tokens_per_minute, max_concurrent_requests}; "
        "they are taken beside --api-key and --admin-api-key. If unspecified, those two alone.")
    redis_url: str | None = setting(
        None, "Redis server (redis://HOST:PORT/DB, rediss://, unix://) holding the API keys' limits and usage, "
        "shared by every replica that names it. If unspecified, each process counts on its own.")
    # logs and traces (issue 19): JSON log lines with each request's id; OpenTelemetry spans over OTLP
    log_format: str = setting("text", "Format of the log lines: text, or json (one object per line, with the id of "
                              "the request it belongs to: the caller's X-Request-Id, else a fresh one).")
    otlp_traces_endpoint: str | None = setting(
        None, "Target URL to which OpenTelemetry traces will be sent (gRPC, or OTLP/HTTP where "
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf): a span per request with queue, prefill and decode "
        "spans, under the caller's traceparent. Needs the otel extra. If unspecified, no traces.")

    def validate(self) -> None:
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format: {self.log_format!r} is not one of text, json")
        if self.otlp_traces_endpoint and importlib.util.find_spec("opentelemetry.sdk") is None:
            raise ConfigError("otlp_traces_endpoint: traces need OpenTelemetry: pip install 'localmoe[otel]'")
        try:
            ToolSettings(self.enable_auto_tool_choice, self.tool_call_parser)
            if self.chat_template is not None:
                load_chat_template(self.chat_template)
            key_ring(self.api_key, self.admin_api_key, self.file_keys())
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.redis_url is not None and not self.redis_url.startswith(REDIS_SCHEMES):
            raise ConfigError(f"redis_url: {self.redis_url!r} is not a Redis URL ({', '.join(REDIS_SCHEMES)}...)")

    def file_keys(self) -> tuple[APIKey, ...]:
        """The keys of --api-keys-file (none without one)."""
        return () if self.api_keys_file is None else tuple(read_keys_file(self.api_keys_file))


# ---- versions, canary weights, ports and devices of the models list (issue 19: several models in one server) ----
DEFAULT_VERSION = "default"  # the version of a served name given one engine


@dataclass(frozen=True)
class Placement:
    """How one engine of a `models:` list is served, beside its engine settings: as which version of its served name,
    with what share of that name's requests (weights are relative: 90 and 10 send 90% and 10%; 0 only what a sticky
    key already holds), and on a port of its own too (the original project's vllm_instances `port`)."""

    version: str = DEFAULT_VERSION
    weight: float = 1.0
    port: int | None = None


def _versions(entry: dict[str, Any], where: str) -> list[tuple[str, dict[str, Any]]]:
    """An entry with a `versions:` list is one served name with one engine per version, each version's keys over
    the entry's own; any other entry is a name with one version."""
    versions = entry.pop("versions", None)
    if versions is None:
        return [(where, entry)]
    if not isinstance(versions, list) or not versions or not all(isinstance(v, dict) for v in versions):
        raise ConfigError(f"{where}.versions: expected a list of mappings, one per version (version, weight, "
                          "model_name and engine settings)")
    if "version" in entry or "weight" in entry:
        raise ConfigError(f"{where}: version and weight belong to each entry of its versions: list")
    return [(f"{where}.versions[{i}]", {**entry, **version}) for i, version in enumerate(versions)]


def _placement(entry: dict[str, Any], where: str) -> tuple[Placement, dict[str, Any]]:
    """The entry's Placement, and its engine settings (gpu_ids turned into the engine's device)."""
    entry = dict(entry)
    version, weight = entry.pop("version", DEFAULT_VERSION), entry.pop("weight", 1.0)
    port, gpu_ids = entry.pop("port", None), entry.pop("gpu_ids", None)
    if not isinstance(version, str) or not version.strip():
        raise ConfigError(f"{where}.version: expected a non-empty name, got {version!r}")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight < float("inf"):
        raise ConfigError(f"{where}.weight: expected a number >= 0, got {weight!r}")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        raise ConfigError(f"{where}.port: expected a TCP port number, got {port!r}")
    if gpu_ids is not None:
        entry.update(_devices(gpu_ids, where))
    return Placement(version.strip(), float(weight), port), entry


def _devices(gpu_ids: Any, where: str) -> dict[str, Any]:
    """vllm_instances' gpu_ids as engine settings: one id is that CUDA device; ids 0..N-1 run tensor parallel over
    N devices (rank r takes device r). Refused on a machine without them."""
    ids = [gpu_ids] if isinstance(gpu_ids, int) else gpu_ids
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                        for i in ids):
        raise ConfigError(f"{where}.gpu_ids: expected a list of CUDA device numbers, got {gpu_ids!r}")
    import torch  # only where devices are named: reading a config never needs it otherwise

    count = torch.cuda.device_count()
    missing = [i for i in ids if i >= count]
    if missing:
        raise ConfigError(f"{where}.gpu_ids: this machine has no CUDA device {missing[0]} (it has {count})")
    if len(ids) == 1:
        return {"device": f"cuda:{ids[0]}"}
    if sorted(ids) != list(range(len(ids))):
        raise ConfigError(f"{where}.gpu_ids: tensor parallel rank r runs on CUDA device r, so several gpu_ids must "
                          f"be 0..{len(ids) - 1}; got {ids}")
    return {"device": "cuda", "tensor_parallel_size": len(ids)}


def _check_weights(models: list[EngineConfig], placements: list[Placement], where: str) -> None:
    """Every served name must take some traffic: the weights of its versions may not all be 0."""
    totals: dict[str, float] = {}
    for model, placement in zip(models, placements):
        name = model.served_model_name or model.model_name
        totals[name] = totals.get(name, 0.0) + placement.weight
    idle = sorted(name for name, total in totals.items() if total == 0)
    if idle:
        raise ConfigError(f"{where}: the weights of {idle[0]!r}'s versions are all 0; give one a positive weight")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    # several models behind one endpoint (the file's `models:` or `vllm_instances:` list); empty: `engine` alone
    models: tuple[EngineConfig, ...] = ()
    # versions, canary weights and own ports (issue 19): one Placement per entry of `models` (same order), and the
    # one of the engine a config built by served() serves
    placements: tuple[Placement, ...] = ()
    placement: Placement = field(default_factory=Placement)

    @property
    def engines(self) -> tuple[EngineConfig, ...]:
        """The engine settings of every model served, the first being the default for requests naming none."""
        return self.models or (self.engine,)

    def for_engine(self, engine: EngineConfig) -> "Config":
        """This config serving `engine` alone."""
        return replace(self, engine=engine, models=(), placements=())

    def served(self) -> list["Config"]:
        """One config per engine served, each with its Placement (version, weight, port)."""
        placements = self.placements or (self.placement,) * len(self.engines)
        return [replace(self.for_engine(engine), placement=placement)
                for engine, placement in zip(self.engines, placements)]


SECTION_ALIASES = {"model": "model", "vllm": "engine", "engine": "engine", "server": "server"}
MODEL_LISTS = ("models", "vllm_instances")  # the original project's list: name, model_name, port, gpu_ids
INSTANCE_KEYS = {"name": "served_model_name"}  # vllm_instances' names for engine keys


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]} (known keys: {', '.join(sorted(known))})")
    return cls(**values)


def load_config(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read a YAML file and apply per-section overrides.

    `path` None means no file (all defaults). `overrides` maps a section name (model, engine,
    server) to keys whose value is not None.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model, vllm, server)")
    sections: dict[str, dict[str, Any]] = {"model": {}, "engine": {}, "server": {}}
    lists = {name: raw.pop(name) for name in MODEL_LISTS if name in raw}
    for name, body in raw.items():
        if name not in SECTION_ALIASES:
            raise ConfigError(f"unknown section {name!r} (known: {', '.join((*SECTION_ALIASES, *MODEL_LISTS))})")
        if body is not None and not isinstance(body, dict):
            raise ConfigError(f"section {name!r} must be a mapping")
        sections[SECTION_ALIASES[name]].update(body or {})
    for name, body in (overrides or {}).items():
        sections[name].update({k: v for k, v in body.items() if v is not None})
    models, placements = _model_list(lists, sections["engine"], (overrides or {}).get("engine", {}))
    config = Config(
        model=_build(ModelConfig, sections["model"], "model"),
        engine=_build(EngineConfig, sections["engine"], "vllm"),
        server=_build(ServerConfig, sections["server"], "server"),
        models=models,
        placements=placements,
    )
    config.model.validate()
    engines = [config_for(config, engine).engine for engine in config.engines]
    config.server.validate()
    return replace(config, engine=engines[0], models=tuple(engines) if config.models else ())


def config_for(config: Config, engine: EngineConfig) -> Config:
    """`config` serving `engine` alone, as an engine is built from it: the model section's quantization_type
    applied, the settings checked, hub ids replaced by their snapshots (for the file's models and for models
    loaded at runtime alike)."""
    one = with_quantization_type(config.for_engine(engine))
    one.engine.validate()
    return with_hub_snapshots(one)


def _model_list(lists: dict[str, Any], defaults: dict[str, Any],
                flags: dict[str, Any]) -> tuple[tuple[EngineConfig, ...], tuple[Placement, ...]]:
    """The engine settings of each entry of a `models:` (or `vllm_instances:`) list: the entry's own keys over the
    vllm section's and the command line's, which hold for every model; each served name once."""
    if len(lists) > 1:
        raise ConfigError("give the models as one list: `models:` or `vllm_instances:`, not both")
    if not lists:
        return (), ()
    (key, entries), = lists.items()
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{key}: expected a list of mappings, one per model (model_name, served_model_name, ...)")
    if flags.get("model_name") is not None:
        raise ConfigError(f"--model names one model; the config file's {key}: list names them: give one of the two")
    models, placements = [], []
    for index, entry in enumerate(entries):
        entry = {INSTANCE_KEYS.get(k, k): v for k, v in entry.items()} if key == "vllm_instances" else dict(entry)
        for where, version in _versions(entry, f"{key}[{index}]"):
            placement, version = _placement(version, where)
            if not version.get("model_name"):
                raise ConfigError(f"{where}: model_name is required (a checkpoint directory, a hub id or "
                                  "localmoe-builtin)")
            models.append(_build(EngineConfig, {**defaults, **version}, where))
            placements.append(placement)
    served = [(m.served_model_name or m.model_name, p.version) for m, p in zip(models, placements)]
    twice = sorted({name for name, version in served if served.count((name, version)) > 1})
    if twice:
        raise ConfigError(f"{key}: the served name {twice[0]!r} is given to more than one model; set "
                          "served_model_name to tell them apart, or give them versions (a `versions:` list)")
    _check_weights(models, placements, key)
    return tuple(models), tuple(placements)


def with_hub_snapshots(config: Config) -> Config:
    """Hub ids in `model_name` and `tokenizer` replaced by their snapshot directories (models/hub.py), fetched
    where the network allows, so the engine only ever loads local files; the API serves the model by its id."""
    engine = config.engine
    changes: dict[str, str] = {}
    try:
        if is_hub_id(engine.model_name):
            changes["model_name"] = str(hub_checkpoint(engine.model_name, engine.revision, engine.download_dir,
                                                       engine.trust_remote_code))
            changes["served_model_name"] = engine.served_model_name or engine.model_name
        if is_hub_id(engine.tokenizer):
            changes["tokenizer"] = str(hub_tokenizer(engine.tokenizer, engine.tokenizer_revision,
                                                     engine.download_dir, engine.trust_remote_code))
    except HubError as e:
        raise ConfigError(str(e)) from None
    return replace(config, engine=replace(engine, **changes)) if changes else config


def with_quantization_type(config: Config) -> Config:
    """model.quantization_type applied to the engine: a dtype name sets `dtype`, a quantization `quantization`;
    it must agree with what the engine section sets itself."""
    wanted = str(config.model.quantization_type).lower()
    engine = config.engine
    if wanted in QUANTIZATION_DTYPES:
        key, value, unset = "dtype", QUANTIZATION_DTYPES[wanted], engine.dtype == "auto"
    elif wanted in LOAD_TIME:
        key, value, unset = "quantization", wanted, engine.quantization in (None, "", "none")
    else:
        return config
    if unset:
        return replace(config, engine=replace(engine, **{key: value}))
    if getattr(engine, key) != value:
        raise ConfigError(f"model.quantization_type {wanted!r} asks for {key} {value}, the vllm section sets "
                          f"{getattr(engine, key)}: set one of them")
    return config
