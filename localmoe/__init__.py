"""LocalMoE: an inference server for Mixture-of-Experts language models."""

from localmoe.llm import LLM
from localmoe.outputs import CompletionOutput, RequestOutput
from localmoe.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
