"""Which model class serves which `config.json` `architectures[0]`."""

from __future__ import annotations

from localmoe.models.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from localmoe.models.gpt_oss import GptOssForCausalLM
from localmoe.models.llama import LlamaForCausalLM
from localmoe.models.localmoe import LocalMoEForCausalLM
from localmoe.models.mixtral import MixtralForCausalLM
from localmoe.models.olmoe import OlmoeForCausalLM
from localmoe.models.qwen2 import Qwen2ForCausalLM
from localmoe.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

ARCHITECTURES: dict[str, type[LlamaForCausalLM]] = {
    "MixtralForCausalLM": MixtralForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "OlmoeForCausalLM": OlmoeForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "LocalMoEForCausalLM": LocalMoEForCausalLM,
}


def model_class(hf_config: dict) -> type[LlamaForCausalLM]:
    archs = hf_config.get("architectures") or []
    if not archs:
        raise ValueError(f"config.json has no 'architectures' entry; supported: {', '.join(ARCHITECTURES)}")
    if archs[0] not in ARCHITECTURES:
        raise ValueError(f"architecture {archs[0]!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[archs[0]]
