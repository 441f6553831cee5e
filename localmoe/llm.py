"""The offline API, in vLLM's shape: LLM(model=...).generate(prompts, SamplingParams)."""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from localmoe.config import load_config
from localmoe.engine.llm_engine import LLMEngine
from localmoe.lora.request import LoRARequest
from localmoe.outputs import RequestOutput
from localmoe.sampling_params import SamplingParams

PromptType = str | dict[str, Any]


class LLM:
    """Loads a checkpoint (or the built-in model when `model` is None) and generates in batches.

    Keyword arguments are engine settings with vLLM's names (`dtype`, `max_model_len`, ...).
    """

    def __init__(self, model: str | None = None, config: str | None = None, **engine_args: Any) -> None:
        overrides = {"engine": {"model_name": model, **engine_args}}
        self.engine = LLMEngine.from_config(load_config(config, overrides))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Prompts are strings or {"prompt_token_ids": [...]}; outputs come back in input order. `lora_request`:
        one LoRA adapter for every prompt, or one per prompt (None: the base model), with enable_lora=True."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            lora_request = [lora_request] * len(prompts)
        if len(lora_request) != len(prompts):
            raise ValueError("give one LoRARequest, or one per prompt")
        order = []
        for prompt, params, lora in zip(prompts, sampling_params, lora_request):
            request_id = str(next(self._ids))
            if isinstance(prompt, str):
                self.engine.add_request(request_id, prompt, None, params, lora_request=lora)
            else:
                self.engine.add_request(request_id, prompt.get("prompt"), prompt["prompt_token_ids"], params,
                                        lora_request=lora)
            order.append(request_id)
        finished: dict[str, RequestOutput] = {}
        # with expert parallelism over data-parallel ranks every rank's generate steps until none has a request
        # (vLLM's offline data parallelism: each rank calls generate as often, with prompts of its own or none)
        lockstep = self.engine.runner.expert_group is not None
        while self.engine.has_unfinished_requests() or lockstep:
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
            for request_id, error in self.engine.take_failures().items():
                for other in order:
                    self.engine.abort_request(other)
                raise RuntimeError(f"prompt {order.index(request_id)} failed: {error}") from error
            lockstep = self.engine.in_lockstep()
        return [finished[i] for i in order]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """One conversation or a list of them, rendered with the checkpoint's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params)
