"""ModelArgs: the settings of config.json the model files read, typed and with the defaults the families assume.

Fields are named as config.json names them, so a reader can check one against the other; `from_hf` builds it
from the raw dict (unknown keys ignored, a null value counts as absent). Fields only some families use default
to None; a family names the ones it cannot do without in its class's `required_fields`.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Iterable

from localmoe.layers.rotary import rope_parameters


@dataclass(frozen=True)
class ModelArgs:
    # every decoder
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the dense SwiGLU's width (Mixtral, gpt-oss and OLMoE: each expert's)
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    num_key_value_heads: int | None = None  # None: num_attention_heads
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # rope_type, rope_theta and the scaling, wherever config.json keeps them (layers/rotary.py's rope_parameters)
    rope: dict = field(default_factory=lambda: rope_parameters({}))

    # attention options
    attention_bias: bool = False
    mlp_bias: bool = False
    qkv_bias: bool = True  # Qwen2-MoE's biases on q, k and v
    clip_qkv: float | None = None  # OLMoE
    sliding_window: int | None = None
    use_sliding_window: bool = True  # Qwen's switch for sliding_window
    layer_types: list[str] | None = None  # "sliding_attention" or "full_attention" per layer

    # MoE
    num_experts_per_tok: int | None = None
    num_local_experts: int | None = None  # Mixtral, gpt-oss
    num_experts: int | None = None  # Qwen-MoE, OLMoE
    moe_intermediate_size: int | None = None  # Qwen-MoE, DeepSeek: each routed expert's width
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int | None = None  # Qwen2-MoE
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    # DeepSeek
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    first_k_dense_replace: int | None = None
    moe_layer_freq: int = 1
    routed_scaling_factor: float | None = None
    topk_method: str = "greedy"  # V2
    n_group: int | None = None
    topk_group: int | None = None
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None  # None: queries without a low-rank bottleneck
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    rope_interleave: bool = True  # V3

    # gpt-oss
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    quantization_config: dict | None = None

    # LocalMoE's own architecture (models/localmoe.py)
    routing: str = "topk_softmax"
    capacity_factor: float | None = None
    slots_per_expert: int = 1

    def __post_init__(self) -> None:
        if not self.num_key_value_heads:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @classmethod
    def from_hf(cls, config: dict, required: Iterable[str] = (), source: str = "config.json") -> ModelArgs:
        """Read config.json's dict; a field without a default, or named in `required`, must be there."""
        present = {key: value for key, value in config.items() if value is not None}
        # the hub's Qwen-MoE configs say num_experts; transformers' Qwen3-MoE config writes num_local_experts
        if "num_experts" not in present and "num_local_experts" in present:
            present["num_experts"] = present["num_local_experts"]
        names = [f.name for f in fields(cls) if f.name != "rope"]
        needed = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        for name in [*needed, *required]:
            if name not in present:
                raise ValueError(f"{source} lacks the field {name!r}")
        return cls(**{name: present[name] for name in names if name in present}, rope=rope_parameters(config))
