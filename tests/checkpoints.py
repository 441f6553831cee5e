"""Tiny random checkpoints written by transformers itself, for parity tests.

Every parameter gets random values, norms included (transformers starts them at 1, so a
forgotten norm would otherwise still match).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from localmoe.models.builtin import write_byte_tokenizer

VOCAB = 263  # the byte-level tokenizer's size

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False)


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def make_checkpoint(directory: Path, arch: str = "mixtral", seed: int = 0, max_shard_size: str | None = None,
                    **overrides) -> Path:
    """Write config, safetensors and tokenizer for a random model of the given family: `arch` is the prefix
    of transformers' class names ("Qwen2Moe" for Qwen2MoeConfig and Qwen2MoeForCausalLM; lower case works
    for single-word ones, "mixtral")."""
    import transformers

    prefix = arch[0].upper() + arch[1:]
    cfg_cls, model_cls = getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}ForCausalLM")
    extra = dict(num_local_experts=4, num_experts_per_tok=2) if arch == "mixtral" else {}
    config = cfg_cls(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config)
    randomize(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    write_byte_tokenizer(directory)
    return directory


def reference_model(directory: Path):
    """transformers' own implementation on the same weights, float32."""
    import transformers

    arch = json.loads((directory / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(directory, dtype=torch.float32).eval()
