"""Draft-model proposals: a small checkpoint with the target's tokenizer decodes k tokens ahead.

The draft has its own ModelRunner (loaded by our loader, any family we serve) and its own KV pool with as many
blocks as the target's, addressed by the target's block tables (vLLM v0's arrangement): a block the scheduler
gives a sequence holds the target's K/V in the target's pool and the draft's in the draft's. The draft keeps
K/V of the tokens it has computed itself, `Sequence.num_draft_computed` of them (reset when the sequence's blocks
go); the part past what the target has verified (rejected drafts) is recomputed. Each proposal first catches up
(on the first proposal: the whole prompt) while drawing the first draft token, then decodes one token per step.

The draft's logits are adjusted as the target's are (logit_bias, penalties, min_tokens); greedy requests take
their argmax, the others draw from them at the request's temperature, top-k, top-p and min-p, and that
distribution (q) goes with the draft to the rejection rule.
Stale K/V in the draft's cache (a prefix block another sequence computed, which the draft never saw) only makes
drafts worse, never output wrong: the target verifies every token.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from localmoe.config import ConfigError, EngineConfig
from localmoe.engine.model_runner import ModelRunner, StepInputs
from localmoe.engine.rejection_sampler import Draft, with_drafts
from localmoe.engine.sampler import Sampler
from localmoe.engine.sequence import Sequence
from localmoe.layers.cpu_kernels import argmax


class DraftModelProposer:
    def __init__(self, config: EngineConfig, model_dir: str, num_blocks: int, max_model_len: int,
                 vocab_size: int, sampler: Sampler) -> None:
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise ConfigError(f"speculative_config: the draft model {model_dir!r} is not a checkpoint directory "
                              "(no config.json)")
        own = replace(config, model_name=str(path), tokenizer=None, quantization=None, quantize_experts_only=False,
                      tensor_parallel_size=1, distributed_executor_backend=None, swap_space=0.0,
                      expert_cache_size=0, expert_cache_memory=None, routing_trace=None, speculative_config=None,
                      max_model_len=max_model_len)
        try:
            self.runner = ModelRunner(own, path)
            self.runner.allocate_kv_cache(num_blocks)
        except (ConfigError, ValueError) as error:
            raise ConfigError(f"speculative_config: the draft model {model_dir}: {error}") from None
        self.vocab_size = vocab_size  # the target's: draft rows are cut or padded to it
        self.sampler = sampler

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        """Up to ks[i] draft tokens for each sequence, which is decoding: its last token is not yet computed."""
        tokens_of: list[list[int]] = [[] for _ in seqs]
        probs_of: list[list[torch.Tensor]] = [[] for _ in seqs]
        live = list(range(len(seqs)))
        for step in range(max(ks)):
            step_seqs = [seqs[i] for i in live]
            inputs = StepInputs(block_tables=[s.block_table for s in step_seqs], sampling=list(range(len(live))))
            for i, seq in zip(live, step_seqs):
                tokens = seq.token_ids + tokens_of[i]
                start = min(seq.num_draft_computed, seq.num_computed_tokens) if step == 0 else len(tokens) - 1
                inputs.input_ids += tokens[start:]
                inputs.positions += range(start, len(tokens))
                inputs.query_lens.append(len(tokens) - start)
                inputs.context_lens.append(len(tokens))
                inputs.sample_rows.append(len(inputs.input_ids) - 1)
                seq.num_draft_computed = len(tokens)
            as_drafted = [with_drafts(seq, tokens_of[i]) for i, seq in zip(live, step_seqs)]
            logits = self.sampler.adjusted_logits(self._fit(self.runner.run(inputs).sample), as_drafted)
            tokens, probs = self._draw(logits, step_seqs)
            for row, (i, seq) in enumerate(zip(live, step_seqs)):
                tokens_of[i].append(tokens[row])
                if not seq.params.greedy:
                    probs_of[i].append(probs[row])
            live = [i for i in live if len(tokens_of[i]) < ks[i]]
        return [Draft(t, torch.stack(q) if q else None) for t, q in zip(tokens_of, probs_of)]

    def _fit(self, logits: torch.Tensor) -> torch.Tensor:
        """The draft's logits over the target's vocabulary: tokens only the draft has are never proposed."""
        vocab = logits.shape[-1]
        if vocab >= self.vocab_size:
            return logits[:, :self.vocab_size]
        return torch.nn.functional.pad(logits, (0, self.vocab_size - vocab), value=float("-inf"))

    @staticmethod
    def _draw(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor | None]:
        tokens = argmax(logits)
        if all(s.params.greedy for s in seqs):
            return tokens.tolist(), None
        probs = Sampler.probs(logits, [s.params for s in seqs])
        greedy = torch.tensor([s.params.greedy for s in seqs], device=logits.device)
        return torch.where(greedy, tokens, Sampler.draw(probs, seqs)).tolist(), probs
