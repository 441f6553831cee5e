"""Quantized checkpoints as AWQ, GPTQ, compressed-tensors (llm-compressor) and fp8 (DeepSeek-V3, vLLM) publish them:
which tensors make up one quantized linear layer, which layers a checkpoint leaves unquantized, and how the tensors
become the one form we serve (weight.py: integers, or float8 bytes, with scales per row and group of columns) or,
where a format does not map onto it exactly, a dense float32 weight.

Shapes: N output features and K input features (a weight is [N, K], as nn.Linear holds it), G groups of columns.

Activation and KV-cache quantization are not applied: a W8A8 checkpoint (int8 or fp8 activations, dynamic or static)
serves its weights with activations in the model's dtype, which is more precise than what it was calibrated for and
needs no kernel we lack. The scales of that quantization (UNREAD_SUFFIXES) are not read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from localmoe.quant.scheme import LOAD_TIME, NONE
from localmoe.quant.weight import QuantizedWeight

UNREAD_SUFFIXES = ("input_scale", "input_zero_point", "input_global_scale", "output_scale", "k_scale", "v_scale",
                   "activation_scale")
# AutoAWQ, GPTQModel and the fp8 tools quantize the decoder's linear layers, never the MoE routers, and their configs
# do not say so (compressed-tensors lists its routers in `ignore`)
ROUTERS = ("mlp.gate", "block_sparse_moe.gate", "mlp.router", "mlp.shared_expert_gate")


@dataclass(frozen=True)
class CheckpointFormat:
    """A checkpoint's quantization: its quant_method, the layers it quantizes (`targets`) and those it leaves in the
    checkpoint's dtype (`skip`). A pattern starting with "re:" is a regular expression matched from the start of the
    layer's name (compressed-tensors' rule); any other names whole dotted components of it: "mlp.gate" matches
    model.layers.0.mlp.gate and not model.layers.0.mlp.gate_proj; "Linear" as a target matches every layer."""

    method: str
    skip: tuple[str, ...] = ()
    targets: tuple[str, ...] = ("Linear",)
    suffixes: ClassVar[tuple[str, ...]] = ()  # the tensors of one quantized linear, after its prefix; bias aside

    def is_quantized(self, prefix: str) -> bool:
        """Whether the linear layer `prefix` (e.g. model.layers.0.self_attn.q_proj) is stored quantized."""
        targeted = any(target == "Linear" or _matches(prefix, target) for target in self.targets)
        return targeted and not any(_matches(prefix, pattern) for pattern in self.skip)

    def split(self, name: str) -> tuple[str, str]:
        """(the weight a checkpoint tensor belongs to, its suffix): model.layers.0.self_attn.q_proj.qweight ->
        (model.layers.0.self_attn.q_proj.weight, qweight)."""
        prefix, _, suffix = name.rpartition(".")
        return f"{prefix}.weight", suffix

    def regroup(self, held: dict[str, dict[str, torch.Tensor]]) -> None:
        """Give each weight held (name -> suffix -> tensor) the tensors the checkpoint stored under another's name."""

    def combine(self, tensors: dict[str, torch.Tensor]) -> QuantizedWeight | torch.Tensor:
        """One linear's tensors, keyed by those of `suffixes` the checkpoint has, as a weight [N, K]."""
        raise NotImplementedError


@dataclass(frozen=True)
class Awq(CheckpointFormat):
    """AutoAWQ's GEMM layout (awq/modules/linear/gemm.py, WQLinear_GEMM.from_linear; awq/utils/packing_utils.py):
    qweight int32 [K, N / 8] and qzeros int32 [G, N / 8] hold 8 columns a word, column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]
    in bits 4i to 4i + 3; scales fp16 [G, N]; the zero points are the integers themselves. Exact."""

    suffixes: ClassVar[tuple[str, ...]] = ("qweight", "qzeros", "scales")
    NIBBLE_OF_COLUMN: ClassVar[list[int]] = [0, 4, 1, 5, 2, 6, 3, 7]

    def combine(self, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        values, zeros = (self._columns(tensors[name]).T for name in ("qweight", "qzeros"))
        return QuantizedWeight.of(values, tensors["scales"].T, zeros, 4)

    def _columns(self, words: torch.Tensor) -> torch.Tensor:
        nibbles = _unpack(words, 4).unflatten(-1, (-1, 8))
        return nibbles[..., self.NIBBLE_OF_COLUMN].flatten(-2)


@dataclass(frozen=True)
class Gptq(CheckpointFormat):
    """AutoGPTQ's and GPTQModel's layout (GPTQModel nn_modules/qlinear pack_original; utils/model.py for v1 and v2):
    qweight int32 [K * bits / 32, N] holds 32 / bits rows a word, row (32 / bits) r + i in bits `bits` i onwards;
    qzeros int32 [G, N * bits / 32] holds columns the same way; scales [G, N]; g_idx [K] the group of each column.
    checkpoint_format gptq (v1) stores each word of zero points less 0x11111111 (int4; 0x01010101 for int8), i.e. every
    zero point less one with the borrows of a word subtraction: a symmetric int4 checkpoint stores 7 for 8. gptq_v2
    stores the zero points themselves. Exact, unless desc_act ordered the groups otherwise than as runs of columns:
    then dense, since our kernels take each group as a run."""

    bits: int = 4
    v1: bool = True
    suffixes: ClassVar[tuple[str, ...]] = ("qweight", "qzeros", "scales", "g_idx")

    def combine(self, tensors: dict[str, torch.Tensor]) -> QuantizedWeight | torch.Tensor:
        words = tensors["qzeros"].long()
        if self.v1:
            words = words + sum(1 << shift for shift in range(0, 32, self.bits))
        values = _unpack(tensors["qweight"].T, self.bits)
        return _grouped(values, tensors["scales"].T, _unpack(words, self.bits).T, self.bits, tensors.get("g_idx"))


@dataclass(frozen=True)
class CompressedTensors(CheckpointFormat):
    """compressed-tensors 0.19 (compressors/pack_quantized, compressors/naive_quantized, quantization/lifecycle) as
    llm-compressor writes it. Integers there are signed, q' in [-2^(bits-1), 2^(bits-1)) with w = s (q' - z'); ours are
    q = q' + 2^(bits-1) and z = z' + 2^(bits-1).
    - pack-quantized: weight_packed int32 [N, ceil(K * bits / 32)] holds q, each word's low bits first along K;
      weight_shape holds (N, K); an asymmetric weight_zero_point is int32 [ceil(N * bits / 32), G] holding z packed the
      same way along N (group and channel strategies), else int8 z'. Exact.
    - int-quantized, naive-quantized: weight int8 [N, K] holds q', weight_zero_point int8 z'. Exact.
    - float-quantized: weight float8_e4m3fn [N, K], as Fp8's.
    weight_scale is [N, G] (group strategy), [N, 1] (channel), [1] (tensor) or, for fp8, [ceil(N / rows), ceil(K /
    cols)] (block). Checkpoints of actorder=group (removed in 0.19) add weight_g_idx [K], read as GPTQ's g_idx."""

    block: tuple[int, int] | None = None  # the fp8 block strategy's block_structure
    suffixes: ClassVar[tuple[str, ...]] = ("weight_packed", "weight_shape", "weight", "weight_scale",
                                           "weight_zero_point", "weight_g_idx")

    def combine(self, tensors: dict[str, torch.Tensor]) -> QuantizedWeight | torch.Tensor:
        if "weight_packed" in tensors:
            packed = tensors["weight_packed"]
            n, k = (int(size) for size in tensors["weight_shape"])
            bits = next((b for b in (4, 8) if packed.shape[-1] == -(-k * b // 32)), None)
            if bits is None:
                raise ValueError(f"weight_packed {tuple(packed.shape)} holds neither 4- nor 8-bit values of {k} "
                                 "columns")
            values = _unpack(packed, bits)[:, :k]
        elif tensors["weight"].dtype == torch.int8:
            bits, values = 8, (tensors["weight"].int() + 128).to(torch.uint8)
            n = values.shape[0]
        else:
            return _fp8_weight(tensors["weight"], tensors["weight_scale"], self.block)
        scales, zero_point = _per_row(tensors["weight_scale"], n), tensors.get("weight_zero_point")
        if zero_point is None:
            zeros = torch.full_like(scales, 2.0 ** (bits - 1))
        elif zero_point.dtype == torch.int32:
            zeros = _per_row(_unpack(zero_point.T, bits)[:, :n].T, n)
        else:
            zeros = _per_row(zero_point.int() + 2 ** (bits - 1), n)
        return _grouped(values, scales, zeros, bits, tensors.get("weight_g_idx"))


# transformers 5's FineGrainedFP8 (integrations/finegrained_fp8.py, FP8Experts) holds an MoE layer's experts as
# parameters [E, N, K] of module `experts`, each with its scales beside it: gate_up_proj [E, 2I, H] (gate rows, then up
# rows) and gate_up_proj_scale_inv [E, ceil(2I / rows), ceil(H / cols)], down_proj [E, H, I] and down_proj_scale_inv
FUSED_EXPERTS = re.compile(r"(.*\.experts\.(?:gate_up_proj|down_proj))(_scale_inv|_activation_scale)?")
FUSED_SUFFIXES = {None: "weight", "_scale_inv": "weight_scale_inv", "_activation_scale": "activation_scale"}
# its save_pretrained writes the weights back one per expert under the checkpoint's names, the scales still one per
# layer: the parameter and half of it (0: gate rows, 1: up rows) holding each expert weight's scales
SAVED_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(w1|w3|w2|gate_proj|up_proj|down_proj)\.weight")
SAVED_EXPERT_SCALES = {"w1": ("gate_up_proj", 0), "gate_proj": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1),
                       "up_proj": ("gate_up_proj", 1), "w2": ("down_proj", None), "down_proj": ("down_proj", None)}


@dataclass(frozen=True)
class Fp8(CheckpointFormat):
    """float8_e4m3fn weights. DeepSeek-V3 (inference/kernel.py weight_dequant; transformers' FineGrainedFP8):
    weight_scale_inv float32 [ceil(N / 128), ceil(K / 128)] multiplies its 128 x 128 block of weight, the last blocks
    of a row or column smaller. vLLM's fp8 and fbgemm_fp8: weight_scale for the whole tensor ([] or [1]) or per output
    row ([N, 1]). Served as float8 with a scale per row and group of columns (a block's scale repeated over its rows)
    where the column blocks divide K, else dense. transformers' fused experts (FUSED_EXPERTS) are such weights stacked,
    [E, N, K] with scales [E, ., .]; as it saves them (SAVED_EXPERT), each expert's weight takes its rows of them."""

    block: tuple[int, int] | None = None  # weight_block_size
    suffixes: ClassVar[tuple[str, ...]] = ("weight", "weight_scale_inv", "weight_scale")

    def split(self, name: str) -> tuple[str, str]:
        if m := FUSED_EXPERTS.fullmatch(name):
            return m[1], FUSED_SUFFIXES[m[2]]
        return super().split(name)

    def regroup(self, held: dict[str, dict[str, torch.Tensor]]) -> None:
        """Each expert weight saved without its scales gets its rows of its layer's ("weight_scale_rows", a scale per
        row and block of columns); the layer's scales are then spent."""
        for name, tensors in held.items():
            m = SAVED_EXPERT.fullmatch(name)
            if m is None or set(tensors) != {"weight"}:
                continue
            fused, half = SAVED_EXPERT_SCALES[m[3]]
            layer = held.get(f"{m[1]}.{fused}", {})
            if "weight_scale_inv" not in layer or "weight" in layer:
                continue
            rows = tensors["weight"].shape[0]
            whole = rows if half is None else 2 * rows
            scales = layer["weight_scale_inv"]  # every expert's, or (read for one expert alone) this one's
            per_row = (scales[int(m[2])] if scales.dim() == 3 else scales).float().repeat_interleave(
                self.block[0] if self.block else whole, 0)[:whole]
            tensors["weight_scale_rows"] = per_row[(half or 0) * rows:][:rows]
        for name in [name for name, tensors in held.items()
                     if FUSED_EXPERTS.fullmatch(name) and "weight" not in tensors]:
            del held[name]

    def combine(self, tensors: dict[str, torch.Tensor]) -> QuantizedWeight | torch.Tensor:
        weight = tensors["weight"]
        if weight.dtype != torch.float8_e4m3fn and self.block and any(
                size % block for size, block in zip(weight.shape[-2:], self.block)):
            return weight  # transformers leaves a weight its blocks do not tile as it was, with a scale beside it
        if "weight_scale_rows" in tensors:
            return _fp8_weight(weight, tensors["weight_scale_rows"], self.block and (1, self.block[1]))
        scale = tensors["weight_scale_inv"] if "weight_scale_inv" in tensors else tensors["weight_scale"]
        return _fp8_weight(weight, scale, self.block)


def checkpoint_format(quantization_config: dict | None, requested: str | None) -> CheckpointFormat | None:
    """The format of a checkpoint whose config.json holds `quantization_config` (None: not quantized), checked against
    the --quantization the user asked for (`requested`, vLLM's names). ValueError, naming it, for a method or scheme
    we do not serve and for a request the checkpoint contradicts."""
    config = quantization_config or {}
    method = config.get("quant_method") or config.get("method")
    requested = None if requested in NONE else requested
    if not config:  # fp8 is also a quantization at load
        if requested not in LOAD_TIME and any(requested in names for names, _ in READERS.values()):
            raise ValueError(f"quantization {requested!r} reads a quantized checkpoint, but this checkpoint's "
                             "config.json has no quantization_config")
        return None
    if method not in READERS:
        raise ValueError(f"checkpoint quant_method {method!r} is not served; we read {', '.join(READERS)}")
    names, read = READERS[method]
    if requested is not None and requested not in names:
        raise ValueError(f"quantization {requested!r} does not match the checkpoint's quant_method {method!r} "
                         f"(ask for {' or '.join(names)}, or leave --quantization out)")
    return read(config)


def _awq(config: dict) -> Awq:
    version = str(config.get("version") or config.get("format") or "gemm").lower()  # GPTQModel writes `format`
    bits = config.get("bits", config.get("w_bit"))
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r} is not served; we read AutoAWQ's 'gemm' layout")
    if bits != 4:
        raise ValueError(f"AWQ with {bits} bits is not served; AutoAWQ's gemm layout is 4-bit")
    if not config.get("zero_point", True) or config.get("backend", "autoawq") != "autoawq":
        raise ValueError("AWQ without zero points or from llm-awq is not served; we read AutoAWQ's gemm layout")
    return Awq("awq", skip=(*_listed(config, "modules_to_not_convert"), *ROUTERS, "lm_head"))


def _gptq(config: dict) -> Gptq:
    bits = config.get("bits")
    layout = config.get("checkpoint_format") or config.get("format") or (
        "marlin" if config.get("is_marlin_format") else "gptq")
    pack_dtype = str(config.get("pack_dtype", "int32")).removeprefix("torch.")
    if bits not in (4, 8):
        raise ValueError(f"GPTQ with {bits} bits is not served; we read 4 and 8 bits")
    if layout not in ("gptq", "gptq_v2") or pack_dtype != "int32":
        raise ValueError(f"GPTQ checkpoint_format {layout!r} packed in {pack_dtype} is not served; "
                         "we read 'gptq' and 'gptq_v2' packed in int32")
    skip = [*_listed(config, "modules_to_not_convert"), *ROUTERS] + ([] if config.get("lm_head") else ["lm_head"])
    for pattern, override in (config.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            skip.append("re:" + pattern[2:])
        elif override.get("bits", bits) != bits:
            raise ValueError(f"GPTQ dynamic override {pattern!r} to {override['bits']} bits is not served; "
                             f"we read one bit width ({bits})")
    return Gptq("gptq", skip=tuple(skip), bits=bits, v1=layout == "gptq")


def _fp8(config: dict) -> Fp8:
    method, block = config.get("quant_method", "fp8"), config.get("weight_block_size")
    if config.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"{method} with fmt {config['fmt']!r} is not served; we read e4m3")
    if config.get("expert_dtype", "fp8") != "fp8":
        raise ValueError(f"{method} with expert_dtype {config['expert_dtype']!r} is not served; we read fp8 experts")
    if block is not None and len(block) != 2:
        raise ValueError(f"{method} weight_block_size {block!r} is not served; we read blocks of [rows, columns]")
    skip = (*_listed(config, "modules_to_not_convert", "ignored_layers"), *ROUTERS, "lm_head")
    return Fp8(method, skip=skip, block=tuple(block) if block else None)


CT_INT_FORMATS = {"pack-quantized": (4, 8), "int-quantized": (8,), "naive-quantized": (8,)}


def _compressed_tensors(config: dict) -> CompressedTensors:
    sparsity = (config.get("sparsity_config") or {}).get("format", "dense")
    if sparsity != "dense" or config.get("transform_config"):
        raise ValueError(f"compressed-tensors with sparsity {sparsity!r} or a transform_config is not served")
    targets, blocks = [], set()
    for name, group in (config.get("config_groups") or {}).items():
        weights = group.get("weights")
        if weights is None:  # a group that quantizes activations alone
            continue
        _check_compressed_group(name, group.get("format") or config.get("format"), weights)
        targets += group.get("targets") or ["Linear"]
        if weights.get("block_structure"):
            blocks.add(tuple(weights["block_structure"]))
    if len(blocks) > 1:
        raise ValueError(f"compressed-tensors with fp8 blocks of several shapes {sorted(blocks)} is not served")
    return CompressedTensors("compressed-tensors", skip=_listed(config, "ignore"), targets=tuple(targets),
                             block=next(iter(blocks), None))


def _check_compressed_group(name: str, layout: str | None, weights: dict) -> None:
    kind, bits, group_size = weights.get("type", "int"), weights.get("num_bits", 8), weights.get("group_size")
    strategy = weights.get("strategy") or (
        "tensor" if group_size is None else "channel" if group_size == -1 else "group")
    served = not weights.get("dynamic") and (
        kind == "int" and bits in CT_INT_FORMATS.get(layout, ()) and strategy in ("tensor", "channel", "group")
        or kind == "float" and bits == 8 and layout in ("float-quantized", "naive-quantized")
        and strategy in ("tensor", "channel", "block") and weights.get("symmetric", True))
    if not served:
        raise ValueError(
            f"compressed-tensors config group {name!r} ({kind}{bits} weights, strategy {strategy!r}, format "
            f"{layout!r}{', dynamic' if weights.get('dynamic') else ''}) is not served; we read int4 and int8 weights "
            "per tensor, channel or group (pack-quantized; int8 also int-quantized or naive-quantized) and fp8 weights "
            "per tensor, channel or block (float-quantized)")


READERS = {  # quant_method: the --quantization names that read it (vLLM's), and its reader
    "awq": (("awq", "awq_marlin", "moe_wna16"), _awq),
    "gptq": (("gptq", "gptq_marlin", "moe_wna16"), _gptq),
    "compressed-tensors": (("compressed-tensors",), _compressed_tensors),
    "fp8": (("fp8",), _fp8),
    "fbgemm_fp8": (("fbgemm_fp8",), _fp8),
}


def _listed(config: dict, *keys: str) -> tuple[str, ...]:
    return tuple(name for key in keys for name in config.get(key) or ())


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return f".{pattern}." in f".{name}."


def _unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., W * 32 / bits] from 32-bit words [..., W], each word's low bits first."""
    shifts = torch.arange(0, 32, bits)
    return ((words.long()[..., None] >> shifts) & (2 ** bits - 1)).flatten(-2).to(torch.uint8)


def _per_row(values: torch.Tensor, rows: int) -> torch.Tensor:
    """Scales or zero points [rows, G] from [rows, G], [rows, 1] or one for the whole tensor."""
    values = values.float()
    return values.reshape(1, 1).expand(rows, 1) if values.numel() == 1 else values.reshape(rows, -1)


def _grouped(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
             g_idx: torch.Tensor | None) -> QuantizedWeight | torch.Tensor:
    """q uint8 [N, K] with scales and zero points [N, G]; g_idx [K] the group of each column (None: G equal runs of
    columns). Runs map exactly onto QuantizedWeight; any other order becomes the dense weight s (q - z)."""
    k, groups = values.shape[-1], scales.shape[-1]
    runs = torch.arange(k) // (k // groups) if k % groups == 0 else None
    if g_idx is None and runs is None:
        raise ValueError(f"{k} columns do not split into {groups} groups")
    if g_idx is None or runs is not None and torch.equal(g_idx.long(), runs):
        return QuantizedWeight.of(values, scales, zeros, bits)
    group = g_idx.long()
    return scales.float()[:, group] * (values.float() - zeros.float()[:, group])


def _fp8_weight(weight: torch.Tensor, scale: torch.Tensor,
               block: tuple[int, int] | None) -> QuantizedWeight | torch.Tensor:
    """A float8_e4m3fn weight [..., N, K] with a scale per block of `block` (rows, columns) [..., ceil(N / rows),
    ceil(K / cols)], else per matrix ([], [1] or [..., 1, 1]) or output row ([..., N, 1]): as a float8
    QuantizedWeight, or dense float32 where column blocks do not divide K."""
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"an fp8 weight is {weight.dtype}, not torch.float8_e4m3fn")
    if not scale.is_floating_point():
        raise ValueError(f"fp8 scales stored as {scale.dtype} (e8m0 exponents) are not served; we read float scales")
    *stack, n, k = weight.shape
    if block is None:
        return QuantizedWeight.of_float8(weight, scale.float().reshape(*stack, -1, 1).expand(*stack, n, 1))
    rows, cols = block
    if tuple(scale.shape) != (*stack, -(-n // rows), -(-k // cols)):
        raise ValueError(f"fp8 scales {tuple(scale.shape)} do not tile a weight {list(weight.shape)} in blocks of "
                         f"{block}")
    per_row = scale.float().repeat_interleave(rows, -2)[..., :n, :]
    if k % cols == 0:
        return QuantizedWeight.of_float8(weight, per_row)
    return weight.float() * per_row.repeat_interleave(cols, -1)[..., :k]
