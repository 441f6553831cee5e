"""A GGUF file of the Mixtral family read as a Hugging Face checkpoint: a config.json dict from its metadata and its
tensors under Mixtral's names (vLLM's convention: the file holds the weights, `--tokenizer` names the original
checkpoint directory for the tokenizer).

llama.cpp writes Mixtral as its `llama` architecture with experts (convert_hf_to_gguf.py, LlamaModel): a layer's
experts stacked in one tensor per projection, `blk.N.ffn_{gate,up,down}_exps.weight` [E, N, K] (files from before
2024 hold one tensor per expert, `blk.N.ffn_gate.E.weight`), the router `blk.N.ffn_gate_inp.weight`, and the rows
of q_proj and k_proj permuted for its rotary layout, which `tensors()` undoes.

Blocks that map exactly onto our quantized form (quant/weight.py, w = s (q - z)) come back as a QuantizedWeight,
which the quantization pass serves packed:
- Q8_0: blocks of 32 columns, an fp16 scale d and 32 int8 qs, w = d qs: 8 bits, q = qs + 128, z = 128, s = d.
- Q4_K: super-blocks of 256 columns in 8 groups of 32, each with a 6-bit scale sc and min m, and fp16 d and dmin
  per super-block, w = d sc q - dmin m: 4 bits, s = d sc, z = dmin m / s (a float32 division: within 1e-6 of
  the group's magnitude, not bit for bit).
- Q6_K: super-blocks of 256 columns in 16 groups of 16, each with an int8 scale sc, and an fp16 d per super-block,
  w = d sc (q - 32) with q of 6 bits: 8 bits, group 16, s = d sc, z = 32. Exact.
Every other type the gguf library dequantizes (F32, F16, BF16, Q5_K, ...) comes back dense, float32.

Offloaded experts are read by the expert store from the file itself (`locations`), each expert's blocks under the
name of its type (GgufBlocks, a checkpoint format whose one tensor per weight is its blocks).

Shapes: GGUF lists dimensions innermost first; the reader's arrays are in PyTorch's order [..., N, K] (N rows,
K columns), a quantized one as its bytes [..., N, K / block * block bytes].
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from localmoe.models.checkpoint import TensorLocation
from localmoe.quant.formats import CheckpointFormat
from localmoe.quant.weight import QuantizedWeight

TOP_LEVEL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
PER_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate_inp": "block_sparse_moe.gate"}
EXPERT_PROJECTIONS = {"gate": "w1", "up": "w3", "down": "w2"}
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_EXPERTS = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)(?:_exps|\.(\d+))\.weight")  # stacked, or one expert
_REQUIRED = object()


@dataclass
class GgufCheckpoint:
    path: Path
    config: dict  # config.json of a MixtralForCausalLM, from the file's metadata
    reader: GGUFReader

    def tensors(self, skip: Callable[[str], bool] = lambda name: False) \
            -> Iterator[tuple[str, torch.Tensor, QuantizedWeight | None]]:
        """(Hugging Face name, float32 values, the QuantizedWeight they are where the blocks map onto ours, else None)
        of every tensor in the file, one per expert, but those `skip` names (left unread); q_proj and k_proj rows in
        Hugging Face's order."""
        heads = {"q_proj": self.config["num_attention_heads"], "k_proj": self.config["num_key_value_heads"]}
        for tensor in self.reader.tensors:
            for name, expert in hf_names(tensor.name, self.config["num_local_experts"], self.path):
                if skip(name):
                    continue
                dense, weight = read_blocks(tensor.data if expert is None else tensor.data[expert],
                                            tensor.tensor_type)
                projection = name.split(".")[-2]
                if projection in heads:
                    rows = _rotary_rows(dense.shape[0], heads[projection])
                    dense = dense[rows]
                    weight = None if weight is None else weight.like(
                        weight.packed[rows], weight.scales[rows], weight.zeros[rows])
                yield name, dense, weight

    def locations(self) -> Iterator[tuple[str, TensorLocation]]:
        """Where each tensor's blocks are in the file, one per expert, named as GgufBlocks reads them (q_proj and k_proj
        in llama.cpp's row order: the store reads experts alone)."""
        for tensor in self.reader.tensors:
            dtype = torch.from_numpy(np.empty(0, tensor.data.dtype)).dtype
            whole = TensorLocation(self.path, int(tensor.data_offset), dtype, tuple(tensor.data.shape))
            for name, expert in hf_names(tensor.name, self.config["num_local_experts"], self.path):
                location = whole if expert is None else whole.rows(expert, 1)
                yield f"{name.removesuffix('.weight')}.{tensor.tensor_type.name}", TensorLocation(
                    location.path, location.offset, dtype, whole.shape[-2:])


@dataclass(frozen=True)
class GgufBlocks(CheckpointFormat):
    """A GGUF file's tensors as a checkpoint format: a weight's one tensor is its blocks, named by their type
    (`locations`), and combines as read_blocks reads it."""

    method: str = "gguf"
    suffixes: ClassVar[tuple[str, ...]] = tuple(qtype.name for qtype in GGMLQuantizationType)

    def combine(self, tensors: dict[str, torch.Tensor]) -> QuantizedWeight | torch.Tensor:
        (qtype, blocks), = tensors.items()
        dense, weight = read_blocks(blocks.numpy(), GGMLQuantizationType[qtype])
        return dense if weight is None else weight


def read_gguf(path: Path) -> GgufCheckpoint:
    """The file's config and tensors; ValueError, naming it, for an architecture other than llama with experts, a
    tensor a Mixtral does not have, or a tensor type the gguf library cannot dequantize."""
    if not path.is_file():
        raise ValueError(f"{path} is not a GGUF file")
    reader = GGUFReader(path)
    config = _config(reader, path)
    for tensor in reader.tensors:
        hf_names(tensor.name, config["num_local_experts"], path)
        if not _dequantizable(tensor.tensor_type):
            raise ValueError(f"{path}: tensor {tensor.name!r} is of type {tensor.tensor_type.name}, which the gguf "
                             "library cannot dequantize")
    return GgufCheckpoint(path, config, reader)


def read_blocks(data: np.ndarray, qtype: GGMLQuantizationType) -> tuple[torch.Tensor, QuantizedWeight | None]:
    """One tensor as the reader gives it: float32 values [..., N, K], and our QuantizedWeight where its blocks map
    exactly onto it."""
    if qtype in PACKED:
        blocks = torch.tensor(data).unflatten(-1, (-1, GGML_QUANT_SIZES[qtype][1]))
        weight = PACKED[qtype](blocks)
        return weight.dequantize(), weight
    return torch.tensor(dequantize(data, qtype)), None


def _q8_0(blocks: torch.Tensor) -> QuantizedWeight:
    """blocks uint8 [..., N, K / 32, 34]: fp16 d, then 32 int8 qs."""
    scales = _halves(blocks, 0)[..., 0]
    values = blocks[..., 2:].contiguous().view(torch.int8).int() + 128
    return QuantizedWeight.of(values.flatten(-2), scales, torch.full_like(scales, 128.0), 8)


def _q4_k(blocks: torch.Tensor) -> QuantizedWeight:
    """blocks uint8 [..., N, K / 256, 144]: fp16 d and dmin, 12 bytes of 6-bit scales and mins, 128 bytes of q: byte
    i of run r (of 4 runs of 32 bytes) holds column i of group 2r in its low nibble, of group 2r + 1 in its high.
    A group whose d sc is 0 holds -dmin m whatever its q: it becomes q = 0, z = 1, s = dmin m, still exact."""
    d, dmin = _halves(blocks, 0), _halves(blocks, 2)
    sc, m = _scales_and_mins(blocks[..., 4:16])
    runs = blocks[..., 16:].unflatten(-1, (4, 32))
    values = torch.stack((runs & 15, runs >> 4), dim=-2).flatten(-3, -2)  # [..., N, K / 256, 8, 32]
    scales, offsets = d * sc.float(), dmin * m.float()  # [..., N, K / 256, 8], as gguf's dequantizer rounds them
    flat = scales == 0
    zeros = torch.where(flat, 1.0, offsets / torch.where(flat, 1.0, scales))
    values = values.masked_fill(flat[..., None], 0)
    scales = torch.where(flat, offsets, scales)
    return QuantizedWeight.of(values.flatten(-3), scales.flatten(-2), zeros.flatten(-2), 4)


def _q6_k(blocks: torch.Tensor) -> QuantizedWeight:
    """blocks uint8 [..., N, K / 256, 210]: 128 bytes ql (the low 4 bits), 64 bytes qh (the top 2), 16 int8 scales,
    fp16 d. Each half of 128 columns takes 64 bytes of ql and 32 of qh: its 4 runs of 32 columns are the low nibbles
    of ql bytes 0-31 and 32-63, then their high nibbles, with the top bits from qh's bits 0-1, 2-3, 4-5, 6-7."""
    ql, qh = blocks[..., :128].unflatten(-1, (2, 1, 64)), blocks[..., 128:192].unflatten(-1, (2, 1, 32))
    low = ((ql >> torch.tensor([0, 4], dtype=torch.uint8)[:, None]) & 15).unflatten(-1, (2, 32)).flatten(-3, -2)
    high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]) & 3
    values = (low | high << 4).flatten(-3)  # [..., N, K / 256, 256]
    scales = _halves(blocks, 208) * blocks[..., 192:208].contiguous().view(torch.int8).float()
    return QuantizedWeight.of(values.flatten(-2), scales.flatten(-2), torch.full_like(scales.flatten(-2), 32.0), 8)


PACKED = {GGMLQuantizationType.Q8_0: _q8_0, GGMLQuantizationType.Q4_K: _q4_k, GGMLQuantizationType.Q6_K: _q6_k}
# (bits, columns per scale) of the QuantizedWeight each packed type becomes, for the planner's byte counts
PACKED_FORM = {GGMLQuantizationType.Q8_0: (8, 32), GGMLQuantizationType.Q4_K: (4, 32),
               GGMLQuantizationType.Q6_K: (8, 16)}


def _halves(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte `at` of every block, float32 [..., 1]."""
    return blocks[..., at:at + 2].contiguous().view(torch.float16).float()


def _scales_and_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 8 scales and 8 mins, uint8 [..., 8] each, from their 12 bytes [..., 12]: bytes 0-3 hold scales 0-3 in
    their low 6 bits, bytes 4-7 mins 0-3; scales and mins 4-7 take their low 4 bits from bytes 8-11 (low and high
    nibble) and their top 2 bits from the top bits of bytes 0-3 (scales) and 4-7 (mins)."""
    low, high, rest = packed[..., :4], packed[..., 4:8], packed[..., 8:]
    scales = torch.cat((low & 63, (rest & 15) | (low >> 6) << 4), dim=-1)
    mins = torch.cat((high & 63, (rest >> 4) | (high >> 6) << 4), dim=-1)
    return scales, mins


def _rotary_rows(rows: int, heads: int) -> torch.Tensor:
    """Row r of a Hugging Face q_proj or k_proj is row `result[r]` of llama.cpp's: per head, Hugging Face's rotary
    pairs are rows i and i + d/2, llama.cpp interleaves them as rows 2i and 2i + 1."""
    return torch.arange(rows).view(heads, -1, 2).transpose(1, 2).flatten()


def hf_names(name: str, experts: int, path: Path) -> list[tuple[str, int | None]]:
    """A GGUF tensor's Hugging Face names, each with its index into a stack of experts (None: the whole tensor)."""
    if m := _EXPERTS.fullmatch(name):
        prefix, projection = f"model.layers.{m[1]}.block_sparse_moe.experts", EXPERT_PROJECTIONS[m[2]]
        if m[3] is not None:
            return [(f"{prefix}.{m[3]}.{projection}.weight", None)]
        return [(f"{prefix}.{e}.{projection}.weight", e) for e in range(experts)]
    if (m := _LAYER.fullmatch(name)) and m[2] in PER_LAYER:
        return [(f"model.layers.{m[1]}.{PER_LAYER[m[2]]}.weight", None)]
    if name in TOP_LEVEL:
        return [(TOP_LEVEL[name], None)]
    raise ValueError(f"{path}: tensor {name!r} is not one of a Mixtral's")


def _dequantizable(qtype: GGMLQuantizationType) -> bool:
    """Whether the gguf library dequantizes this type (it says so only by trying)."""
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _config(reader: GGUFReader, path: Path) -> dict:
    """config.json of a MixtralForCausalLM from the metadata llama.cpp's converter writes."""
    def value(key: str, default: Any = _REQUIRED) -> Any:
        field = reader.get_field(key)
        if field is None and default is _REQUIRED:
            raise ValueError(f"{path}: the GGUF metadata lacks {key!r}")
        return default if field is None else field.contents()

    arch, experts = value("general.architecture"), value("llama.expert_count", 0)
    if arch != "llama" or not experts:
        what = f"{arch!r} without experts" if arch == "llama" else repr(arch)
        raise ValueError(f"{path}: GGUF architecture {what} is not served; we read llama.cpp's 'llama' with experts "
                         "(the Mixtral family)")
    heads, hidden = value("llama.attention.head_count"), value("llama.embedding_length")
    head_dim = value("llama.attention.key_length", hidden // heads)
    scaling, rotary = value("llama.rope.scaling.type", "none"), value("llama.rope.dimension_count", head_dim)
    if scaling != "none" or rotary != head_dim:
        raise ValueError(f"{path}: rope scaling {scaling!r} over {rotary} of {head_dim} dimensions is not served; "
                         "we read rotary embeddings without scaling over the whole head")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: the GGUF file has no token_embd.weight")
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "dtype": "bfloat16",
        "vocab_size": int(tensors["token_embd.weight"].shape[1]), "hidden_size": hidden,
        "intermediate_size": value("llama.expert_feed_forward_length", None) or value("llama.feed_forward_length"),
        "num_hidden_layers": value("llama.block_count"), "num_attention_heads": heads,
        "num_key_value_heads": value("llama.attention.head_count_kv", heads), "head_dim": head_dim,
        "num_local_experts": experts, "num_experts_per_tok": value("llama.expert_used_count"),
        "rms_norm_eps": value("llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": value("llama.rope.freq_base", 10000.0),
        "max_position_embeddings": value("llama.context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": value("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": value("tokenizer.ggml.eos_token_id", None),
    }
