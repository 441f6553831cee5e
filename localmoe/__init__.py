"""LocalMoE: an inference server for Mixture-of-Experts language models."""

from localmoe.llm import LLM
from localmoe.lora.request import LoRARequest
from localmoe.outputs import CompletionOutput, RequestOutput
from localmoe.sampling_params import SamplingParams

__all__ = ["LLM", "LoRARequest", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
