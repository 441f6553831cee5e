"""Room to learn a new skill without unlearning the old: attention heads added to a trained model.

Teaching a trained model to copy by retraining its own heads cost it its text (the heads it rewired carried the
language model). Added heads start at no cost: each layer gains `count` query heads and half as many KV heads (the
grouping of queries to keys stays the same), their output projection starting at zero, so the widened model's
function is the trained one's exactly. Training then moves only the new heads (`new_head_masks`) and the old
weights stay byte-equal, though what the new heads learn to write can still cost the text (on the built-in model,
heads taught to copy raised the perplexity: README). The result is an ordinary checkpoint: more heads, `head_dim`
written out.
"""

from __future__ import annotations

import torch


def add_heads(model, count: int):
    """A copy of the transformers Mixtral `model` with `count` more query heads per layer (count/2 more KV heads),
    the new q/k/v rows drawn like an initialisation and the new o_proj columns zero."""
    from transformers import MixtralForCausalLM

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    groups = config.num_attention_heads // config.num_key_value_heads
    if count <= 0 or count % groups:
        raise ValueError(f"heads are added in whole groups of {groups} (one KV head each), not {count}")
    wide = config.to_dict() | {"num_attention_heads": config.num_attention_heads + count,
                               "num_key_value_heads": config.num_key_value_heads + count // groups,
                               "head_dim": head_dim}
    widened = MixtralForCausalLM(type(config).from_dict(wide))
    widened.config._attn_implementation = config._attn_implementation
    state = widened.state_dict()
    g = torch.Generator().manual_seed(0)
    for name, old in model.state_dict().items():
        new = state[name]
        if new.shape == old.shape:
            new.copy_(old)
        elif name.endswith("o_proj.weight"):  # the new heads' columns write nothing yet
            new.zero_()
            new[:, :old.shape[1]] = old
        else:  # q/k/v: the new heads' rows
            new.copy_(torch.randn(new.shape, generator=g) * config.initializer_range)
            new[:old.shape[0]] = old
    return widened.to(next(model.parameters()).dtype)


def new_head_masks(model, old_heads: int) -> dict[str, torch.Tensor]:
    """For each attention projection, 1 where a weight belongs to a head added after the first `old_heads`: the
    gradient mask that trains the new heads alone."""
    config = model.config
    head_dim = config.head_dim
    old_kv = old_heads * config.num_key_value_heads // config.num_attention_heads
    masks = {}
    for name, p in model.named_parameters():
        if ".self_attn." not in name:
            continue
        mask = torch.zeros_like(p)
        if name.endswith("o_proj.weight"):
            mask[:, old_heads * head_dim:] = 1
        elif name.endswith("q_proj.weight"):
            mask[old_heads * head_dim:] = 1
        else:
            mask[old_kv * head_dim:] = 1
        masks[name] = mask
    return masks
