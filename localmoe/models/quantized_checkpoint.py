"""A quantized checkpoint read into our model: the loader fills the model's dense parameters as always, and this
keeps the checkpoint's own integers beside them so that the quantization pass serves those instead of rounding
again (layers/quant_linear.py, experts/quantized.py).

A quantized linear layer is several tensors (AWQ's qweight, qzeros and scales; see quant/formats.py), possibly in
different shards, so they are held until the whole checkpoint is read, then combined into a QuantizedWeight (or,
where a format does not map onto ours, a dense weight) and loaded under the layer's `weight` name. A model
parameter made of several checkpoint weights (merged q/k/v rows, stacked experts) is served packed when every
piece came packed: integer pieces of different bits or group sizes (a GGUF Q4_K_M file's Q6_K attn_v beside Q4_K q
and k) are widened to the most bits and the smallest group, which holds each exactly; otherwise it stays dense.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator

import torch

from localmoe.quant.formats import UNREAD_SUFFIXES, CheckpointFormat
from localmoe.quant.weight import QuantizedWeight, assemble


class QuantizedCheckpoint:
    """The checkpoint's integers by model parameter: a Quantizer (quant/scheme.py) for the quantization pass."""

    experts_only = False  # the dense layers the checkpoint quantized are served packed too

    def __init__(self, fmt: CheckpointFormat) -> None:
        self.format = fmt
        self.held: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # weight name -> suffix -> tensor
        self.pieces: dict[str, list[tuple[object, QuantizedWeight]]] = defaultdict(list)  # parameter -> packed
        self.dense_pieces: set[str] = set()  # parameters with a piece the format gave dense
        self.dense: list[str] = []  # checkpoint weights that came dense (desc_act, fp8 blocks not dividing K)

    def take(self, name: str, read: Callable[[], torch.Tensor]) -> bool:
        """Hold `name` if it may belong to a quantized layer (read() gives its tensor), or skip it if it is a scale of
        activation quantization we do not apply, or a scale beside a weight the format left unquantized
        (transformers' fp8 saves one for each linear it could not tile); False: the loader reads it as usual."""
        weight, suffix = self.format.split(name)
        if suffix in UNREAD_SUFFIXES:
            return True
        if suffix not in self.format.suffixes:
            return False
        if not self.format.is_quantized(weight.removesuffix(".weight")):
            return suffix != "weight"
        self.held[weight][suffix] = read()
        return True

    def weights(self) -> Iterator[tuple[str, torch.Tensor, QuantizedWeight | None]]:
        """(checkpoint name, dense tensor, the QuantizedWeight it came from or None) of every weight held: one with
        nothing but a plain `weight` (a norm, an embedding the format's targets took in) comes back as it is."""
        self.format.regroup(self.held)
        for name, tensors in self.held.items():
            if set(tensors) == {"weight"} and tensors["weight"].is_floating_point() \
                    and tensors["weight"].dtype != torch.float8_e4m3fn:
                yield name, tensors["weight"], None
                continue
            combined = self.format.combine(tensors)
            if isinstance(combined, QuantizedWeight):
                yield name, combined.dequantize(), combined
            else:
                self.dense.append(name)
                yield name, combined, None
        self.held.clear()

    def record(self, param: str, where: object, weight: QuantizedWeight | None) -> None:
        """Note which piece of model parameter `param` a checkpoint weight filled, packed or not."""
        if weight is None:
            self.dense_pieces.add(param)
        else:
            self.pieces[param].append((where, weight))

    def weight_for(self, param: str, dense: torch.Tensor) -> QuantizedWeight | None:
        """Parameter `param` (dense: its loaded values) as the checkpoint's integers, or None where it is not all
        packed."""
        pieces = self.pieces.get(param)
        if not pieces or param in self.dense_pieces:
            return None
        return assemble(dense.shape, pieces)
