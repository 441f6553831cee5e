"""`localmoe plan file.gguf`: a GGUF file's weights counted tensor by tensor as the loader holds them
(models/gguf_file.py), since its types vary by tensor (a Q4_K_M file keeps some layers' down projections and its
head in Q6_K): Q8_0, Q4_K and Q6_K blocks packed, as a QuantizedWeight of their bits with a float32 scale and zero
point per group; every other tensor, and the embedding, norms and routers whatever their type, dense in the
serving dtype."""

from __future__ import annotations

import math
from pathlib import Path

from localmoe.models.gguf_file import PACKED_FORM, read_gguf
from localmoe.planner.params import ParamCounts
from localmoe.planner.quantization import WeightBytes, served_bytes
from localmoe.planner.shape import PlanError
from localmoe.quant.scheme import QuantScheme

LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output")


def is_gguf(model: str) -> bool:
    return model.endswith(".gguf") and Path(model).expanduser().is_file()


def gguf_config(model: str) -> dict:
    """config.json of the Mixtral the file holds, as serving reads it."""
    try:
        return read_gguf(Path(model).expanduser()).config
    except ValueError as e:
        raise PlanError(str(e)) from None


def gguf_weight_bytes(model: str, params: ParamCounts, dtype_bytes: int) -> WeightBytes:
    """Bytes per parameter of each kind, from the file's own tensor types; the routed experts' share is their
    average over layers (exact in total)."""
    fused: dict[tuple[str, str], list] = {}  # a layer's q/k/v, and its experts' gate/up: one weight when served
    for tensor in read_gguf(Path(model).expanduser()).reader.tensors:
        name = tensor.name
        expert = "ffn_gate." in name or "ffn_up" in name or "ffn_down" in name or "_exps" in name
        kind = ("expert" if expert else "head" if name == "output.weight"
                else "linear" if name.split(".")[-2] in LINEAR else None)
        if kind is None:
            continue  # embedding, norms, routers: `other`
        layer = name.split(".")[1] if name.startswith("blk.") else ""
        key = (("qkv" + layer if name.split(".")[-2] in LINEAR[:3] else name) if kind == "linear"
               else ("w13" + layer if "ffn_down" not in name else name) if kind == "expert" else name)
        fused.setdefault((kind, key), []).append(tensor)
    totals = {"linear": 0, "expert": 0, "head": 0}
    for (kind, _), tensors in fused.items():
        scheme = _served_form([PACKED_FORM.get(t.tensor_type) for t in tensors])
        for tensor in tensors:
            columns = int(tensor.shape[0])  # GGUF lists dimensions innermost first
            rows = math.prod(int(n) for n in tensor.shape) // columns
            totals[kind] += served_bytes(rows, columns, scheme, dtype_bytes)
    experts = params.routed_experts // params.expert if params.expert else 0
    return WeightBytes(linear=totals["linear"] / params.attention if params.attention else dtype_bytes,
                       expert=totals["expert"] // experts if experts else 0,
                       head=totals["head"] / params.lm_head if params.lm_head else dtype_bytes, other=dtype_bytes)


def _served_form(forms: list[tuple[int, int] | None]) -> QuantScheme | None:
    """The form of weights served as one (a layer's q/k/v): dense if any is, else the widest bits in the smallest
    groups, as the loader widens them."""
    if any(form is None for form in forms):
        return None
    return QuantScheme("gguf", max(bits for bits, _ in forms), min(group for _, group in forms), False)
