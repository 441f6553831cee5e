"""Which model class serves which `config.json` `architectures[0]`."""

from __future__ import annotations

from torch import nn

from localmoe.models.llama import LlamaForCausalLM
from localmoe.models.mixtral import MixtralForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "MixtralForCausalLM": MixtralForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
}


def model_class(hf_config: dict) -> type[nn.Module]:
    archs = hf_config.get("architectures") or []
    if not archs:
        raise ValueError(f"config.json has no 'architectures' entry; supported: {', '.join(ARCHITECTURES)}")
    if archs[0] not in ARCHITECTURES:
        raise ValueError(f"architecture {archs[0]!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[archs[0]]
