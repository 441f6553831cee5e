"""A request and its sequences: the unit the scheduler moves between waiting, running and finished.

A request asks for `n` completions of one prompt; each completion is a Sequence with its own
tokens and block table. Prompt blocks are shared between them through the prefix cache.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from localmoe.outputs import Logprob
from localmoe.sampling_params import SamplingParams

if TYPE_CHECKING:
    from xgrammar import CompiledGrammar

    from localmoe.lora.adapter import LoraAdapter


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # KV blocks copied to host memory, to be copied back before it runs again
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None  # the start of the first step that computed it (queue time ends)
    first_token_time: float | None = None
    finished_time: float | None = None
    generator: torch.Generator | None = None  # set when params.seed is given
    seqs: list["Sequence"] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    grammar: CompiledGrammar | None = None  # params.structured_outputs, compiled (engine/structured_output.py)
    lora: LoraAdapter | None = None  # the LoRA adapter it runs with (lora/); None: the base model

    @property
    def lora_int_id(self) -> int:
        """Its adapter's number, 0 for the base model."""
        return 0 if self.lora is None else self.lora.lora_int_id

    @property
    def finished(self) -> bool:
        return all(s.status is SequenceStatus.FINISHED for s in self.seqs)


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int  # which of the request's n completions
    token_ids: list[int]
    num_prompt_tokens: int
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V sit in the cache
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    swap_table: list[int] = field(default_factory=list)  # host swap blocks while SWAPPED
    block_hashes: list[int] = field(default_factory=list)  # hashes of the leading full blocks
    spec_token_ids: list[int] = field(default_factory=list)  # draft tokens the current step verifies
    num_draft_computed: int = 0  # tokens whose K/V the draft model holds (engine/draft_proposer.py)
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def priority(self) -> tuple[int, float, int]:
        """Sort key: lower is more urgent; FCFS within a priority value."""
        return (self.request.priority, self.request.arrival_time, self.seq_id)
