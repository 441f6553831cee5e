"""The built-in checkpoints.

`localmoe-builtin` (the default model) is the small MoE LocalMoE trained itself (`localmoe train`),
shipped inside the package. `localmoe-random` is a Mixtral-architecture MoE with seeded random
weights shaped by the `model:` section of the config, for benchmarks (LocalMoE's own architecture,
models/localmoe.py, where that section asks for another routing or a capacity factor): it is made once
per shape, deterministically (a byte-level tokenizer that needs no training text), in a cache folder. Both are
ordinary Hugging Face directories loaded through the same loader as any checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from localmoe.config import ModelConfig
from localmoe.models.args import ModelArgs

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
BUILTIN_NAME = "localmoe-builtin"
RANDOM_NAME = "localmoe-random"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "data" / BUILTIN_NAME


def byte_level_tokenizer(bpe: models.BPE, use_regex: bool = True) -> Tokenizer:
    """A BPE over GPT-2's byte alphabet: any text encodes, nothing falls back to <unk>."""
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """Write tokenizer.json plus the tokenizer_config.json (special tokens, chat template) transformers reads."""
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "add_bos_token": False, "model_max_length": 1 << 20, "chat_template": CHAT_TEMPLATE,
    }, indent=2))


def write_byte_tokenizer(directory: Path) -> int:
    """Write the merge-free byte-level tokenizer (every byte a token, no training text needed)
    and return its size."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tokenizer = byte_level_tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"), use_regex=False)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    save_tokenizer(tokenizer, directory)
    return tokenizer.get_vocab_size()


def builtin_hf_config(cfg: ModelConfig, vocab_size: int) -> dict:
    """Mixtral's config.json (so transformers loads it too) unless the routing needs LocalMoE's architecture."""
    routing = {}
    if cfg.routing != "topk_softmax" or cfg.capacity_factor is not None:
        routing = {"architectures": ["LocalMoEForCausalLM"], "model_type": "localmoe", "routing": cfg.routing,
                   "capacity_factor": cfg.capacity_factor, "slots_per_expert": cfg.slots_per_expert}
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.hidden_size // cfg.num_attention_heads,
        "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k_experts,
        "max_position_embeddings": cfg.max_sequence_length,
        "rms_norm_eps": 1e-5,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        "router_jitter_noise": 0.0,
        "sliding_window": None,
        **routing,
    }


def _random_weights(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """Seeded N(0, 0.02) weights with hub tensor names; norms near 1 so activations stay sane."""
    g = torch.Generator().manual_seed(seed)
    d, i, v = args.hidden_size, args.intermediate_size, args.vocab_size
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def norm() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(d, generator=g)).to(torch.bfloat16)

    w = {"model.embed_tokens.weight": normal(v, d)}
    for layer in range(args.num_hidden_layers):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = normal(q, d)
        w[p + "self_attn.k_proj.weight"] = normal(kv, d)
        w[p + "self_attn.v_proj.weight"] = normal(kv, d)
        w[p + "self_attn.o_proj.weight"] = normal(d, q)
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "block_sparse_moe.gate.weight"] = normal(args.num_local_experts, d)
        for e in range(args.num_local_experts):
            w[p + f"block_sparse_moe.experts.{e}.w1.weight"] = normal(i, d)
            w[p + f"block_sparse_moe.experts.{e}.w2.weight"] = normal(d, i)
            w[p + f"block_sparse_moe.experts.{e}.w3.weight"] = normal(i, d)
    w["model.norm.weight"] = norm()
    w["lm_head.weight"] = normal(v, d)
    # LocalMoE's other routers: hash routing has no gate, soft MoE its Phi in the gate's place (gates are drawn
    # anyway, so a seed gives the same experts whatever the routing)
    for layer in range(args.num_hidden_layers):
        p = f"model.layers.{layer}.block_sparse_moe."
        if args.routing in ("hash", "soft_moe"):
            del w[p + "gate.weight"]
        if args.routing == "soft_moe":
            w[p + "phi"] = normal(d, args.num_local_experts * args.slots_per_expert)
    return w


def cache_root() -> Path:
    return Path(os.environ.get("LOCALMOE_CACHE", Path.home() / ".cache" / "localmoe"))


def resolve_model(model_name: str, cfg: ModelConfig) -> tuple[Path, str]:
    """Checkpoint directory and served name for `model_name` (empty: the built-in model)."""
    if model_name in ("", BUILTIN_NAME):
        return SHIPPED_DIR, BUILTIN_NAME
    if model_name == RANDOM_NAME:
        return ensure_random_checkpoint(cfg), RANDOM_NAME
    return Path(model_name), model_name


def ensure_random_checkpoint(cfg: ModelConfig) -> Path:
    """Return the directory of the random checkpoint for this shape, creating it on first use."""
    key = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]
    directory = cache_root() / f"{RANDOM_NAME}-{key}"
    if (directory / "model.safetensors").exists():
        return directory
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    vocab_size = write_byte_tokenizer(tmp)
    hf = builtin_hf_config(cfg, vocab_size)
    (tmp / "config.json").write_text(json.dumps(hf, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    save_file(_random_weights(ModelArgs.from_hf(hf), cfg.seed), str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    try:
        tmp.rename(directory)
    except OSError:  # another process won the race; its copy is identical
        pass
    return directory
