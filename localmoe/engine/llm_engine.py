"""The synchronous engine: requests in, one scheduled forward pass per step(), outputs out.

The engine validates requests (the one place that does: the server and the offline API both call make_request),
schedules, runs the model runner, samples, and hands sampled tokens to the output processor. The runner owns
the model and the KV pool; the output processor owns text, stops and logprobs; statistics go out as snapshots.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import CONFIG_MAPPING, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from localmoe.config import Config, ConfigError, EngineConfig
from localmoe.engine.block_manager import BlockManager
from localmoe.engine.draft_proposer import DraftModelProposer
from localmoe.engine.model_runner import ModelRunner
from localmoe.engine.ngram_proposer import NgramProposer
from localmoe.engine.output_processor import OutputProcessor
from localmoe.engine.sampler import Sampler
from localmoe.engine.scheduler import Scheduler
from localmoe.engine.sequence import Request, Sequence
from localmoe.engine.spec_decode import SpecDecoder
from localmoe.engine.structured_output import GrammarError, StructuredOutputs
from localmoe.engine.stats import (
    PUBLISH_INTERVAL_S, EngineStats, MemoryAccount, StatsSnapshot, tensor_bytes,
)
from localmoe.experts.observer import RoutingObserver
from localmoe.experts.stats import expert_stats
from localmoe.experts.trace import RoutingTrace, TracedTokens
from localmoe.lora.adapter import AdapterError
from localmoe.lora.request import LoRARequest
from localmoe.models.builtin import resolve_model
from localmoe.outputs import RequestOutput
from localmoe.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine refuses; `param` names the offending field (for OpenAI error JSON)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def load_tokenizer(path: str | Path, hf_config: dict, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, running the checkpoint's own tokenizer code only with trust_remote_code (the
    forward pass is always ours). For our own architecture (a model_type transformers does not know) it gets an
    empty model config, so it reads only the tokenizer files instead of warning about the model's."""
    known = hf_config.get("model_type") in CONFIG_MAPPING
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                         **({} if known else {"config": PretrainedConfig()}))


def _return_free_memory() -> None:
    """Give the OS back the heap that loading freed (checkpoint tensors copied into place, weights repacked):
    glibc keeps it otherwise, ~100 MB of resident memory for the 1.2B benchmark model, which a memory limit
    counts. Nothing to do where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class LLMEngine:
    def __init__(self, config: EngineConfig, model_dir: str | Path, served_model_name: str) -> None:
        self.config = config
        self.model_name = served_model_name
        model_dir = Path(model_dir)
        self.runner = ModelRunner(config, model_dir)
        self.model, self.hf_config, self.device = self.runner.model, self.runner.hf_config, self.runner.device
        self.experts = self.runner.experts  # offloaded experts' store and caches (experts/runtime.py)
        self.lora = self.runner.lora  # LoRA adapters by name, with --enable-lora (lora/manager.py)
        for name, path, base in config.lora_module_list if self.lora is not None else []:
            if base in (None, served_model_name):
                self.lora.load(name, path)
        self.max_model_len = self.runner.max_model_len
        num_blocks, num_swap_blocks = self.runner.allocate_kv_cache()
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                          num_swap_blocks)
        self.tokenizer = load_tokenizer(config.tokenizer or model_dir, self.hf_config, config.trust_remote_code)
        eos_token_ids = self._eos_token_ids(model_dir)
        self.structured = StructuredOutputs(self.tokenizer, self.hf_config["vocab_size"], eos_token_ids)
        self.sampler = Sampler(eos_token_ids, self.structured)
        self.spec = self._spec_decoder(num_blocks)
        self.scheduler = Scheduler(config, self.block_manager, self.spec.lookahead if self.spec else None)
        self.output = OutputProcessor(self.tokenizer, eos_token_ids, self.max_model_len)
        self.observer = RoutingObserver(self.model)
        self.trace = RoutingTrace(config.routing_trace, self.observer.blocks) if config.routing_trace else None
        self.memory = MemoryAccount(self.device, self.runner.weight_bytes(),
                                    tensor_bytes(self.runner.kv_caches), self.runner.kv_dtype,
                                    tensor_bytes(self.runner.swap_caches), self.experts)
        self.requests: dict[str, Request] = {}
        self.failures: dict[str, Exception] = {}  # requests that failed in a step, until take_failures()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.snapshot = StatsSnapshot()  # the latest published statistics (see engine/stats.py)
        self.publish_stats()
        torch.manual_seed(config.seed)
        # Loading leaves hundreds of thousands of long-lived objects (modules, tokenizer, imports); the cyclic
        # collector would walk them all again every few steps (~7% of a decode step's time on two cores). Frozen,
        # they are left out of collections.
        gc.collect()
        gc.freeze()
        _return_free_memory()

    @classmethod
    def from_config(cls, config: Config) -> "LLMEngine":
        # replicas are processes behind `localmoe serve`'s API server; with expert parallelism one is given its rank
        if config.engine.data_parallel_size != 1 and config.engine.data_parallel_rank is None:
            raise ConfigError("data_parallel_size: one engine is one replica; serve replicas with `localmoe serve "
                              "--data-parallel-size N` (with enable_expert_parallel, an engine per rank: give each "
                              "its data_parallel_rank)")
        model_dir, name = resolve_model(config.engine.model_name, config.model)
        return cls(config.engine, model_dir, config.engine.served_model_name or name)

    def _spec_decoder(self, num_blocks: int) -> SpecDecoder | None:
        spec = self.config.speculative
        if spec is None:
            return None
        if spec.method == "ngram":
            proposer = NgramProposer(spec)
        else:
            proposer = DraftModelProposer(self.config, spec.model, num_blocks, self.max_model_len,
                                          self.hf_config["vocab_size"], self.sampler)
        return SpecDecoder(spec, proposer, self.sampler, self.max_model_len)

    def _eos_token_ids(self, model_dir: Path) -> set[int]:
        ids: set[int] = set()
        sources = [self.hf_config.get("eos_token_id"), self.tokenizer.eos_token_id]
        gen_path = model_dir / "generation_config.json"
        if gen_path.exists():
            sources.append(json.loads(gen_path.read_text()).get("eos_token_id"))
        for src in sources:
            ids.update(src if isinstance(src, list) else [src] if src is not None else [])
        return ids

    # ---- requests -------------------------------------------------------------------------------

    def make_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                     params: SamplingParams, priority: int = 0, lora_request: LoRARequest | None = None) -> Request:
        """Validate and tokenize; raises RequestError. Safe to call from any thread."""
        if prompt_token_ids is None:
            if prompt is None:
                raise RequestError("either prompt or prompt_token_ids is required", "prompt")
            prompt_token_ids = self.tokenizer.encode(prompt)
        if not prompt_token_ids:
            raise RequestError("the prompt is empty", "prompt")
        vocab = self.hf_config["vocab_size"]
        for param, ids in [("prompt", prompt_token_ids), *params.token_ids()]:
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise RequestError(f"{param}: token id {bad} is out of vocabulary (size {vocab})", param)
        self._check_context(len(prompt_token_ids), params.max_tokens)
        if not self.config.enable_chunked_prefill and len(prompt_token_ids) > self.config.max_num_batched_tokens:
            raise RequestError(f"the prompt has {len(prompt_token_ids)} tokens, more than max_num_batched_tokens "
                               f"{self.config.max_num_batched_tokens} (enable chunked prefill)", "prompt")
        self._check_limits(params, vocab)
        request = Request(request_id, prompt, list(prompt_token_ids), params, priority)
        if lora_request is not None:
            if self.lora is None:
                raise RequestError(f"LoRA adapter {lora_request.lora_name!r} asked for, but this engine was started "
                                   "without enable_lora (--enable-lora)", "model")
            try:
                request.lora = self.lora.resolve(lora_request)
            except AdapterError as error:
                raise RequestError(str(error), "model") from None
        if params.structured_outputs is not None:
            try:
                request.grammar = self.structured.compile(params.structured_outputs)
            except GrammarError as error:
                raise RequestError(str(error), "structured_outputs") from None
        if params.seed is not None:
            request.generator = torch.Generator(self.device).manual_seed(params.seed)
        request.seqs = [Sequence(request, i, list(prompt_token_ids), len(prompt_token_ids)) for i in range(params.n)]
        return request

    def _check_context(self, num_prompt: int, max_tokens: int | None) -> None:
        """The prompt leaves room for at least one token, and for max_tokens of them when that is given."""
        limit = self.max_model_len
        if num_prompt >= limit:
            raise RequestError(f"This model's maximum context length is {limit} tokens. However, your request has "
                               f"{num_prompt} input tokens. Please reduce the length of the input.", "prompt")
        if max_tokens is not None and num_prompt + max_tokens > limit:
            raise RequestError(f"This model's maximum context length is {limit} tokens. However, you requested "
                               f"{num_prompt + max_tokens} tokens ({num_prompt} in the input, {max_tokens} in the "
                               f"completion). Please reduce the length of the input or completion.", "max_tokens")

    def _check_limits(self, params: SamplingParams, vocab: int) -> None:
        """The sampling settings whose range depends on the model or the engine's settings."""
        most = self.config.max_logprobs
        checks = [
            (params.top_k <= vocab, "top_k", f"top_k must be at most the vocabulary size {vocab}, got {params.top_k}"),
            (params.n <= self.config.max_num_seqs, "n",
             f"n must be at most max_num_seqs ({self.config.max_num_seqs}), got {params.n}"),
            ((params.logprobs or 0) <= most, "logprobs",
             f"logprobs must be at most {most} (--max-logprobs), got {params.logprobs}"),
            ((params.prompt_logprobs or 0) <= most, "prompt_logprobs",
             f"prompt_logprobs must be at most {most} (--max-logprobs), got {params.prompt_logprobs}"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise RequestError(message, param)

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise RequestError(f"request id {request.request_id!r} is already in use", "request_id")
        self.requests[request.request_id] = request
        self.prompt_tokens_total += len(request.prompt_token_ids)
        self.output.add(request)
        for seq in request.seqs:
            if request.grammar is not None:
                self.structured.add(seq, request.grammar)
            self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                    params: SamplingParams, priority: int = 0, lora_request: LoRARequest | None = None) -> None:
        self.add(self.make_request(request_id, prompt, prompt_token_ids, params, priority, lora_request))

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
            self._release(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def in_lockstep(self) -> bool:
        """Whether other data-parallel ranks may need this engine's steps though it has no request (expert
        parallelism over them): until a step no rank held a request in."""
        group = self.runner.expert_group
        return group is not None and group.failure is None and not group.idle

    # ---- the step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduled forward pass, then a token for every sequence that samples.

        A request fails alone: an error while sampling, detokenizing or scoring one request's tokens fails that
        request, and a failed forward pass fails the requests of its step (their blocks are freed; the others'
        K/V were only read). Failed requests leave the engine and are listed in `failures` for the caller.
        """
        batch = self.scheduler.schedule()
        self.runner.swap(batch)
        if self.runner.expert_group is not None:  # the data-parallel ranks' MoE layers run every step together
            self.runner.join_step(sum(batch.num_tokens), len(self.requests))
        if not batch.seqs:
            return []
        started = time.monotonic()
        for seq in batch.seqs:
            if seq.request.scheduled_time is None:
                seq.request.scheduled_time = started
        if self.spec is not None:
            self.spec.propose(batch)
        try:
            logits = self.runner.execute(batch)
        except Exception as error:  # noqa: BLE001 -- the step's requests fail; the engine serves on
            log.exception("the forward pass failed; failing the requests of its step")
            for seq in batch.seqs:
                self._fail(seq.request, error)
            return []
        if logits.routing is not None:
            self.observer.note_layers(logits.routing)
        routed = self.observer.end_step()
        if self.trace is not None and routed is not None:
            self.trace.write(routed, [TracedTokens(seq.request.request_id, seq.index, seq.num_computed_tokens,
                                                   (seq.token_ids[seq.num_computed_tokens:] + seq.spec_token_ids)[:n])
                                      for seq, n in zip(batch.seqs, batch.num_tokens)])
        for i, logits_of_prompt in logits.prompt.items():
            self._guarded(batch.seqs[i].request, self.output.record_prompt_logprobs, batch.seqs[i],
                          logits_of_prompt)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            if seq.request.request_id in self.requests:
                seq.num_computed_tokens += n - len(seq.spec_token_ids)  # drafts count once accepted
                self.block_manager.cache_full_blocks(seq)
        sample_seqs = [batch.seqs[i] for i in logits.sampling]
        results = self._tokens(logits.sample, sample_seqs) if sample_seqs else []
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for i, tokens in zip(logits.sampling, results):
            seq = batch.seqs[i]
            request = seq.request
            seq.spec_token_ids = []
            if request.request_id not in self.requests:  # failed earlier in this step
                continue
            if isinstance(tokens, Exception):
                self._fail(request, tokens)
                continue
            if request.first_token_time is None:
                request.first_token_time = now
            if all(self._guarded(request, self._append_token, seq, *token) and seq.finish_reason is None
                   for token in tokens):
                if i in batch.lookahead:  # the accepted drafts' K/V is computed; blocks past the sequence go back
                    seq.num_computed_tokens += len(tokens) - 1
                    self.block_manager.cache_full_blocks(seq)
                    self.block_manager.trim(seq, seq.num_tokens)
            if request.request_id in self.requests:
                touched[request.request_id] = request
        outputs = []
        for request in touched.values():
            if request.request_id not in self.requests:
                continue
            if request.finished:
                request.finished_time = now
                del self.requests[request.request_id]
            outputs.append(self.output.request_output(request))
        self.publish_stats(force=not self.requests)
        return outputs

    def take_failures(self) -> dict[str, Exception]:
        """The requests that failed since the last call, with their errors."""
        failures, self.failures = self.failures, {}
        return failures

    def _tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[list[tuple] | Exception]:
        """(token, logprob, top logprobs) of each token a sampling sequence gets this step: one, or with drafts
        verified, the accepted ones and one more (logits: 1 + drafts rows per sequence)."""
        if any(s.spec_token_ids for s in seqs):
            return self.spec.tokens(logits, seqs, self._sample)
        return [row if isinstance(row, Exception) else [row] for row in self._sample(logits, seqs)]

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple | Exception]:
        """(token, logprob, top logprobs) per row. Should the batched draw fail, each row is drawn alone, so a
        row that cannot be sampled fails its own request and no other."""
        try:
            result = self.sampler(logits, seqs)
            return list(zip(result.token_ids, result.logprobs, result.top_logprobs))
        except Exception:  # noqa: BLE001 -- retried row by row below
            log.exception("sampling a batch of %d rows failed; sampling each row alone", len(seqs))
        rows: list[tuple | Exception] = []
        for i, seq in enumerate(seqs):
            try:
                result = self.sampler(logits[i:i + 1], [seq])
                rows.append((result.token_ids[0], result.logprobs[0], result.top_logprobs[0]))
            except Exception as error:  # noqa: BLE001 -- this row's request fails
                rows.append(error)
        return rows

    def _guarded(self, request: Request, work: Callable[..., object], *args: object) -> bool:
        """Run one request's share of the step's work; should it raise, that request fails. False if it did."""
        try:
            work(*args)
            return True
        except Exception as error:  # noqa: BLE001 -- fails this request only
            self._fail(request, error)
            return False

    def _fail(self, request: Request, error: Exception) -> None:
        if request.request_id not in self.requests:
            return
        log.error("request %s failed: %r", request.request_id, error)
        self.abort_request(request.request_id)
        self.failures[request.request_id] = error

    def recover(self) -> list[str]:
        """After a failure outside any one request (the engine's own bookkeeping): abort every request and make
        the block pool whole. Returns the ids of the requests aborted."""
        failed = list(self.requests)
        for request_id in failed:
            self.abort_request(request_id)
        self.block_manager.reset()
        return failed

    def _append_token(self, seq: Sequence, token: int, logprob: float | None,
                      top: list[tuple[int, float]] | None) -> None:
        self.generation_tokens_total += 1
        grammar_ended = self.structured.accept(seq, token)
        if self.output.append_token(seq, token, logprob, top, grammar_ended):
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self.output.release(seq)
        self.structured.release(seq)

    def publish_stats(self, force: bool = True) -> None:
        """Replace the published snapshot by a new one (unless one was published less than PUBLISH_INTERVAL_S ago
        and not `force`). Call on the engine's thread."""
        now = time.monotonic()
        if not force and now - self.snapshot.at < PUBLISH_INTERVAL_S:
            return
        bm = self.block_manager
        ranks = self.runner.rank_caches()  # the workers' caches too, under expert parallelism with offloading
        self.snapshot = StatsSnapshot(self.stats, expert_stats(self.observer, self.runner.parallel_stats(), ranks),
                                      self.memory.snapshot(bm.num_blocks, bm.num_free_blocks, bm.usage, ranks), now)

    @property
    def stats(self) -> EngineStats:
        requests = list(self.requests.values())
        running = sum(1 for r in requests if any(s in self.scheduler.running for s in r.seqs))
        bm = self.block_manager
        return EngineStats(
            num_running=running,
            num_waiting=len(requests) - running,
            kv_cache_usage=bm.usage,
            num_blocks_total=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            num_preemptions_total=self.scheduler.num_preemptions,
            num_swapped_out_total=self.scheduler.num_swapped_out,
            num_prefill_chunks_total=self.scheduler.num_prefill_chunks,
            spec_decode=self.spec.stats if self.spec is not None else None,
        )
