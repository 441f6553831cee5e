"""`localmoe plan file.gguf`: a GGUF file's weights counted tensor by tensor as the loader holds them
(models/gguf_file.py), since its types vary by tensor (a Q4_K_M file keeps some layers' down projections and its
head in Q6_K): Q8_0, Q4_K and Q6_K blocks packed, as a QuantizedWeight of their bits with a float32 scale and zero
point per group; every other tensor, and the embedding, norms and routers whatever their type, dense in the
serving dtype."""

from __future__ import annotations

import math
from pathlib import Path

from localmoe.models.gguf_file import PACKED_FORM, GgufCheckpoint, hf_names, read_gguf
from localmoe.planner.params import ParamCounts
from localmoe.planner.quantization import WeightBytes, served_bytes
from localmoe.planner.shape import PlanError
from localmoe.quant.scheme import QuantScheme
from localmoe.quant.weight import common_form


def is_gguf(model: str) -> bool:
    return model.endswith(".gguf") and Path(model).expanduser().is_file()


def read_for_plan(model: str) -> GgufCheckpoint:
    """The file as serving reads it (its config among it); PlanError where serving would refuse it."""
    try:
        return read_gguf(Path(model).expanduser())
    except ValueError as e:
        raise PlanError(str(e)) from None


def gguf_weight_bytes(checkpoint: GgufCheckpoint, params: ParamCounts, dtype_bytes: int) -> WeightBytes:
    """Bytes per parameter of each kind, from the file's own tensor types; the routed experts' share is their
    average over layers (exact in total)."""
    served: dict[tuple[str, str, str], list] = {}  # the tensors of one served weight: a layer's q/k/v, w13, w2
    for tensor in checkpoint.reader.tensors:
        name = hf_names(tensor.name, checkpoint.config["num_local_experts"], checkpoint.path)[0][0]
        parts = name.split(".")  # model.layers.L.{self_attn.q_proj, block_sparse_moe.experts.E.w1}.weight, ...
        if parts[-2] in ("q_proj", "k_proj", "v_proj", "o_proj"):
            kind, weight = "linear", "o" if parts[-2] == "o_proj" else "qkv"
        elif ".experts." in name:
            kind, weight = "expert", "w2" if parts[-2] == "w2" else "w13"
        elif name == "lm_head.weight":
            kind, weight = "head", ""
        else:
            continue  # embedding, norms, routers: `other`
        served.setdefault((kind, parts[2] if parts[1] == "layers" else "", weight), []).append(tensor)
    totals = {"linear": 0, "expert": 0, "head": 0}
    for (kind, _, _), tensors in served.items():
        forms = [PACKED_FORM.get(t.tensor_type) for t in tensors]
        scheme = None if None in forms else QuantScheme("gguf", *common_form(forms), False)  # dense if any is
        for tensor in tensors:
            columns = int(tensor.shape[0])  # GGUF lists dimensions innermost first
            rows = math.prod(int(n) for n in tensor.shape) // columns
            totals[kind] += served_bytes(rows, columns, scheme, dtype_bytes)
    experts = params.routed_experts // params.expert if params.expert else 0
    return WeightBytes(linear=totals["linear"] / params.attention if params.attention else dtype_bytes,
                       expert=totals["expert"] // experts if experts else 0,
                       head=totals["head"] / params.lm_head if params.lm_head else dtype_bytes, other=dtype_bytes)
