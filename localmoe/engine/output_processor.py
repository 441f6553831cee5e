"""From sampled tokens to what a request returns (nano-vllm's Scheduler.postprocess, vLLM v1's output processor).

Each new token is detokenized incrementally, checked against the request's stop conditions (EOS, stop token
ids, stop strings, max_tokens, the context length) and its logprobs recorded; prompt logprobs are scored as the
prompt is computed; a RequestOutput is assembled from the sequences' state. The engine decides what runs; this
decides what it means to the caller.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from localmoe.engine.detokenizer import IncrementalDetokenizer
from localmoe.engine.sequence import Request, Sequence
from localmoe.outputs import CompletionOutput, Logprob, RequestOutput


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: set[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}

    def add(self, request: Request) -> None:
        for seq in request.seqs:
            self.detokenizers[seq.seq_id] = IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, request.params.skip_special_tokens)

    def release(self, seq: Sequence) -> None:
        self.detokenizers.pop(seq.seq_id, None)

    def append_token(self, seq: Sequence, token: int, logprob: float | None,
                     top: list[tuple[int, float]] | None, grammar_ended: bool = False) -> bool:
        """Add a sampled token to `seq`, its text and logprobs; True when that finished the sequence.
        `grammar_ended`: the request's structured-output grammar has taken its end, so nothing may follow."""
        seq.token_ids.append(token)
        params = seq.params
        if logprob is not None:
            seq.cumulative_logprob += logprob
            entry = {token: Logprob(logprob, self.tokenizer.decode([token]))}
            for alt, value in top or []:
                entry.setdefault(alt, Logprob(value, self.tokenizer.decode([alt])))
            seq.logprobs = (seq.logprobs or []) + [entry]
        previous = len(seq.text)
        ends = (not params.ignore_eos and token in self.eos_token_ids) or grammar_ended
        if not ends:  # the end-of-sequence token is no text, even where special tokens are kept (as in vLLM)
            seq.text += self.detokenizers[seq.seq_id].step(token)
        if ends:
            seq.finish_reason = "stop"
        elif token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif params.stop and self._find_stop_string(seq, previous):
            seq.finish_reason = "stop"
        elif params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            seq.finish_reason = "length"
        elif seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        if seq.finish_reason is None:
            return False
        if seq.stop_reason is None or isinstance(seq.stop_reason, int):
            seq.text += self.detokenizers[seq.seq_id].flush()
        return True

    def record_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Logprob of each prompt token given the ones before it (the first token has none)."""
        request = seq.request
        if seq.index != 0:
            return
        if request.prompt_logprobs is None:
            request.prompt_logprobs = [None]
        logprobs = torch.log_softmax(logits, dim=-1)
        top_n = seq.params.prompt_logprobs
        for row, position in enumerate(range(seq.num_computed_tokens, seq.num_computed_tokens + len(logits))):
            if position + 1 != len(request.prompt_logprobs) or position + 1 >= seq.num_prompt_tokens:
                continue  # already recorded before a preemption, or the last prompt token (it predicts output)
            target = seq.token_ids[position + 1]
            entry = {target: Logprob(float(logprobs[row, target]), self.tokenizer.decode([target]))}
            if top_n:
                values, ids = logprobs[row].topk(top_n)
                for alt, value in zip(ids.tolist(), values.tolist()):
                    entry.setdefault(alt, Logprob(value, self.tokenizer.decode([alt])))
            request.prompt_logprobs.append(entry)

    def _find_stop_string(self, seq: Sequence, previous: int) -> bool:
        """Look for a stop string overlapping the new text; cut the text there."""
        params = seq.params
        for stop in params.stop:
            at = seq.text.find(stop, max(0, previous - len(stop) + 1))
            if at != -1:
                seq.text = seq.text[:at + (len(stop) if params.include_stop_str_in_output else 0)]
                seq.stop_reason = stop
                return True
        return False

    @staticmethod
    def request_output(request: Request) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=s.index, text=s.text, token_ids=list(s.output_token_ids),
                cumulative_logprob=s.cumulative_logprob if s.params.logprobs is not None else None,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason)
            for s in request.seqs
        ]
        metrics = {"arrival_time": request.arrival_time}
        for key in ("scheduled_time", "first_token_time", "finished_time"):
            if getattr(request, key) is not None:
                metrics[key] = getattr(request, key)
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outputs,
                             request.finished, num_cached_tokens=max(s.num_cached_tokens for s in request.seqs),
                             prompt_logprobs=request.prompt_logprobs, metrics=metrics)
