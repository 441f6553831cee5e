"""What the planner needs to know about a model, read from its `config.json`.

Each family spells the same facts differently (`num_local_experts`, `num_experts`,
`n_routed_experts`, DBRX's nested `ffn_config`); `model_shape` turns any of them into one
`ModelShape`, and nothing after it looks at the raw config again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any


class PlanError(ValueError):
    """The model or an option cannot be planned for; the message says why."""


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = ""  # "" | "head" (Qwen3: one head_dim weight) | "full" (OLMoE: the whole projection)
    sinks: bool = False  # gpt-oss: one learned logit per head
    # Multi-head latent attention (DeepSeek-V2/V3) when kv_lora_rank > 0.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    sliding_window: int = 0
    num_sliding_layers: int = 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0


@dataclass(frozen=True)
class MoeShape:
    num_experts: int
    top_k: int
    intermediate_size: int
    expert_bias: bool = False  # gpt-oss: gate_up and down projections carry biases
    router_bias: bool = False
    correction_bias: bool = False  # DeepSeek-V3 e_score_correction_bias (a buffer in transformers)
    shared_intermediate_size: int = 0
    shared_gate: bool = False  # Qwen-MoE: sigmoid gate on the shared expert


@dataclass(frozen=True)
class ModelShape:
    name: str
    architecture: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    attention: AttentionShape
    dense_intermediate_size: int
    moe: MoeShape | None
    moe_layers: tuple[int, ...]


KNOWN_MODELS_DIR = resources.files("localmoe") / "data" / "known_models"


def known_models() -> dict[str, dict[str, Any]]:
    """The configs that ship with LocalMoE, by their short name."""
    return {entry.name.removesuffix(".json"): json.loads(entry.read_text())
            for entry in sorted(KNOWN_MODELS_DIR.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(".json")}


def load_config(model: str) -> tuple[str, dict[str, Any]]:
    """(display name, config dict) from a checkpoint directory, a config.json path or a known name."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise PlanError(f"{model} is a directory without a config.json")
    if path.is_file():
        try:
            return model, json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path} is not valid JSON: {e}") from None
    wanted = model.lower()
    for name, config in known_models().items():
        hub_id = config.get("_name_or_path", "")
        if wanted in (name.lower(), hub_id.lower(), hub_id.rsplit("/", 1)[-1].lower()):
            return name, config
    raise PlanError(f"{model!r} is neither a checkpoint directory, a config.json, nor a known model "
                    f"({', '.join(known_models())})")


def _sliding_layers(config: dict[str, Any], num_layers: int) -> int:
    if config.get("layer_types"):
        return sum(t == "sliding_attention" for t in config["layer_types"])
    if config.get("use_sliding_window") and config.get("sliding_window"):
        return max(0, num_layers - config.get("max_window_layers", 0))
    if config.get("model_type") in ("mistral", "mixtral") and config.get("sliding_window"):
        return num_layers
    return 0


def _standard_attention(config: dict[str, Any], num_layers: int, **features: Any) -> AttentionShape:
    heads = config["num_attention_heads"]
    return AttentionShape(num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
                          head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                          sliding_window=config.get("sliding_window") or 0,
                          num_sliding_layers=_sliding_layers(config, num_layers), **features)


def _mla_attention(config: dict[str, Any]) -> AttentionShape:
    bias = bool(config.get("attention_bias", False))
    return AttentionShape(num_heads=config["num_attention_heads"],
                          num_kv_heads=config["num_attention_heads"],
                          head_dim=config["qk_nope_head_dim"] + config["qk_rope_head_dim"],
                          qkv_bias=bias, o_bias=bias,
                          q_lora_rank=config.get("q_lora_rank") or 0,
                          kv_lora_rank=config["kv_lora_rank"],
                          qk_nope_head_dim=config["qk_nope_head_dim"],
                          qk_rope_head_dim=config["qk_rope_head_dim"],
                          v_head_dim=config["v_head_dim"])


def _num_experts(config: dict[str, Any]) -> int:
    """Families name it differently, and transformers' own config classes rename it on save."""
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if config.get(key) is not None:
            return config[key]
    raise KeyError("num_local_experts")


def _qwen_moe_layers(config: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    step, dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
    return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)


def _deepseek_moe_layers(config: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    first, freq = config.get("first_k_dense_replace", 0), config.get("moe_layer_freq", 1)
    return tuple(i for i in range(num_layers) if i >= first and i % freq == 0)


def model_shape(name: str, config: dict[str, Any]) -> ModelShape:
    """Read a `config.json` dict of any supported family into a ModelShape."""
    try:
        return _model_shape(name, config)
    except KeyError as e:
        raise PlanError(f"{name}: config.json lacks {e.args[0]!r}") from None


def _model_shape(name: str, config: dict[str, Any]) -> ModelShape:
    arch = (config.get("architectures") or [ARCHITECTURE_BY_MODEL_TYPE.get(config.get("model_type", ""), "")])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise PlanError(f"cannot plan for architecture {arch or '(none)'!r}; supported: "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    if arch == "DbrxForCausalLM":
        return _dbrx_shape(name, config)
    layers = config["num_hidden_layers"]
    all_layers = tuple(range(layers))
    bias = bool(config.get("attention_bias", False))
    moe: MoeShape | None
    if arch in ("MixtralForCausalLM", "GptOssForCausalLM", "LocalMoEForCausalLM"):  # LocalMoE: Mixtral's shape
        gpt_oss = arch == "GptOssForCausalLM"
        attention = _standard_attention(config, layers, qkv_bias=gpt_oss, o_bias=gpt_oss, sinks=gpt_oss)
        moe = MoeShape(_num_experts(config), config["num_experts_per_tok"], config["intermediate_size"],
                       expert_bias=gpt_oss, router_bias=gpt_oss)
        dense_size, moe_layers = 0, all_layers
    elif arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM"):
        olmoe = arch == "OlmoeForCausalLM"
        if arch == "Qwen2MoeForCausalLM":
            attention = _standard_attention(config, layers, qkv_bias=config.get("qkv_bias", True))
        else:
            attention = _standard_attention(config, layers, qkv_bias=bias, o_bias=bias,
                                            qk_norm="full" if olmoe else "head")
        shared = config.get("shared_expert_intermediate_size", 0)
        moe = MoeShape(_num_experts(config), config["num_experts_per_tok"],
                       config["intermediate_size" if olmoe else "moe_intermediate_size"],
                       shared_intermediate_size=shared, shared_gate=shared > 0)
        dense_size = 0 if olmoe else config["intermediate_size"]
        moe_layers = all_layers if olmoe else _qwen_moe_layers(config, layers)
    elif arch in ("DeepseekForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"):
        if arch == "DeepseekForCausalLM":
            attention = _standard_attention(config, layers, qkv_bias=bias, o_bias=bias)
        else:
            attention = _mla_attention(config)
        moe = MoeShape(_num_experts(config), config["num_experts_per_tok"], config["moe_intermediate_size"],
                       correction_bias=arch == "DeepseekV3ForCausalLM" or config.get("topk_method") == "noaux_tc",
                       shared_intermediate_size=config["moe_intermediate_size"] * (config.get("n_shared_experts") or 0))
        dense_size, moe_layers = config["intermediate_size"], _deepseek_moe_layers(config, layers)
    else:  # dense Llama, Mistral, Qwen2 (draft models)
        qwen2 = arch == "Qwen2ForCausalLM"
        attention = _standard_attention(config, layers, qkv_bias=bias or qwen2, o_bias=bias and not qwen2)
        moe, dense_size, moe_layers = None, config["intermediate_size"], ()
    return ModelShape(name=name, architecture=arch, hidden_size=config["hidden_size"], num_layers=layers,
                      vocab_size=config["vocab_size"],
                      tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                      max_position_embeddings=config.get("max_position_embeddings") or 0,
                      attention=attention, dense_intermediate_size=dense_size, moe=moe, moe_layers=moe_layers)


def _dbrx_shape(name: str, config: dict[str, Any]) -> ModelShape:
    attn, ffn = config.get("attn_config") or {}, config.get("ffn_config") or {}
    heads, hidden = config["n_heads"], config["d_model"]
    attention = AttentionShape(num_heads=heads, num_kv_heads=attn.get("kv_n_heads", 1), head_dim=hidden // heads)
    moe = MoeShape(ffn.get("moe_num_experts", 4), ffn.get("moe_top_k", 1), ffn.get("ffn_hidden_size", 3584))
    return ModelShape(name=name, architecture="DbrxForCausalLM", hidden_size=hidden,
                      num_layers=config["n_layers"], vocab_size=config["vocab_size"],
                      tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                      max_position_embeddings=config.get("max_seq_len") or 0, attention=attention,
                      dense_intermediate_size=0, moe=moe, moe_layers=tuple(range(config["n_layers"])))


# For configs without `architectures` (as transformers' config classes write them).
ARCHITECTURE_BY_MODEL_TYPE = {
    "mixtral": "MixtralForCausalLM", "gpt_oss": "GptOssForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM", "deepseek": "DeepseekForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM", "dbrx": "DbrxForCausalLM",
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "localmoe": "LocalMoEForCausalLM",
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURE_BY_MODEL_TYPE.values())
