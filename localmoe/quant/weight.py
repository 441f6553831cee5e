"""A weight-only quantized weight in the one form the engine serves, whatever it was read from.

Every scheme we serve (our own int8/int4/fp8 quantization at load, and the checkpoint formats) comes down to
unsigned `bits`-bit integers q with a scale s and a zero point z per row and group of columns: w = s (q - z).
Symmetric schemes have z at the middle of the range (128 for int8, 8 for int4). FP8 weights are the one other kind:
q holds float8 e4m3 bytes and w = s fp8(q) (z is zero and unread). The CPU kernels read q in tiles
(layers/cpu_kernels.py, `QuantTiles`); everywhere else the weight is dequantized where it is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """A weight [..., N, K]: `packed` holds q [..., N, K * bits / 8] (int4: two a byte, column 2i in the low nibble;
    float8: e4m3 bytes); scales and zeros are float32 [..., N, K / group_size]."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    float8: bool = False

    @classmethod
    def of(cls, values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> "QuantizedWeight":
        """From the integers themselves (uint8 [..., N, K], each below 2^bits)."""
        values = values.to(torch.uint8)
        if values.numel() and int(values.max()) >> bits:
            raise ValueError(f"a value does not fit in {bits} bits")
        packed = values if bits == 8 else values[..., 0::2] | values[..., 1::2] << 4
        return cls(packed.contiguous(), scales.float().contiguous(), zeros.float().contiguous(), bits)

    @classmethod
    def of_float8(cls, values: torch.Tensor, scales: torch.Tensor) -> "QuantizedWeight":
        """From float8 e4m3 values [..., N, K] and their float32 scales [..., N, K / group]."""
        if values.dtype != torch.float8_e4m3fn:
            raise ValueError(f"a float8 weight is {values.dtype}, not torch.float8_e4m3fn")
        scales = scales.float().contiguous()
        return cls(values.contiguous().view(torch.uint8), scales, torch.zeros_like(scales), 8, float8=True)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.packed.shape[:-1], self.packed.shape[-1] * 8 // self.bits))

    @property
    def group_size(self) -> int:
        return self.shape[-1] // self.scales.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros))

    def values(self) -> torch.Tensor:
        """q as uint8 [..., N, K]."""
        if self.bits == 8:
            return self.packed
        return torch.stack((self.packed & 15, self.packed >> 4), dim=-1).flatten(-2)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s (q - z) [..., N, K] in float32, then `dtype`."""
        values = self.values()
        q = values.view(torch.float8_e4m3fn).float() if self.float8 else values.float()
        q = q.unflatten(-1, (self.scales.shape[-1], self.group_size))
        return ((q - self.zeros[..., None]) * self.scales[..., None]).flatten(-2).to(dtype)

    def to(self, device: torch.device) -> "QuantizedWeight":
        return self.like(*(t.to(device) for t in (self.packed, self.scales, self.zeros)))

    def __getitem__(self, index: int) -> "QuantizedWeight":
        """Matrix `index` of a stack [E, N, K]."""
        return self.like(self.packed[index], self.scales[index], self.zeros[index])

    def widened(self, bits: int, group_size: int) -> "QuantizedWeight":
        """The same numbers in `bits` >= self.bits and groups of `group_size` dividing ours (each group's scale and
        zero point repeated): exact, so that pieces packed differently can share one parameter."""
        if self.float8 or bits < self.bits or self.group_size % group_size:
            raise ValueError(f"a {self.bits}-bit weight in groups of {self.group_size} does not widen to {bits} bits "
                             f"in groups of {group_size}")
        repeat = self.group_size // group_size
        return QuantizedWeight.of(self.values(), *(t.repeat_interleave(repeat, -1) for t in (self.scales, self.zeros)),
                                  bits)

    def like(self, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> "QuantizedWeight":
        """Other tensors of this weight's kind (bits, float8)."""
        return QuantizedWeight(packed, scales, zeros, self.bits, self.float8)


def common_form(forms: list[tuple[int, int]]) -> tuple[int, int]:
    """The (bits, group size) that holds each of these integer forms exactly: the most bits, the greatest common
    group."""
    return max(bits for bits, _ in forms), math.gcd(*(group for _, group in forms))


def assemble(shape: torch.Size, pieces: list[tuple[object, QuantizedWeight]]) -> QuantizedWeight | None:
    """A weight of `shape` [..., N, K] from QuantizedWeights each filling its rows `where` (an index into the leading
    dimensions, as a model's map_weight gives it; None: the whole). Integer pieces of different bits or group sizes
    are widened to the most bits and the smallest group, which hold each exactly; None where float8 and integer
    pieces meet or the pieces leave rows uncovered."""
    first = pieces[0][1]
    if any((w.bits, w.float8, w.group_size) != (first.bits, first.float8, first.group_size) for _, w in pieces):
        if any(w.float8 for _, w in pieces):
            return None
        bits, group = common_form([(w.bits, w.group_size) for _, w in pieces])
        pieces = [(where, w.widened(bits, group)) for where, w in pieces]
        first = pieces[0][1]
    packed = torch.zeros((*shape[:-1], shape[-1] * first.bits // 8), dtype=torch.uint8)
    scales, zeros = (torch.zeros((*shape[:-1], shape[-1] // first.group_size)) for _ in range(2))
    covered = torch.zeros(shape[:-1], dtype=torch.bool)
    for where, weight in pieces:
        at = () if where is None else where
        for whole, part in ((packed, weight.packed), (scales, weight.scales), (zeros, weight.zeros)):
            whole[at] = part
        covered[at] = True
    return first.like(packed, scales, zeros) if bool(covered.all()) else None


Span = tuple[torch.Tensor, torch.Tensor]  # each group's (min, max) [..., N, K / group_size]


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """weight [..., N, K] in float32 as [..., N, K / g, g], g = `group_size` (None: the whole row)."""
    k = weight.shape[-1]
    group_size = group_size or k
    if k % group_size:
        raise ValueError(f"a row of {k} columns does not split into groups of {group_size}")
    return weight.detach().float().unflatten(-1, (k // group_size, group_size))


def _span(grouped: torch.Tensor) -> Span:
    return grouped.amin(dim=-1), grouped.amax(dim=-1)


def group_span(weight: torch.Tensor, group_size: int | None = None) -> Span:
    """The (min, max) of each row's groups of `group_size` columns (None: the whole row), in float32."""
    return _span(_grouped(weight, group_size))


def quantize(weight: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
             span: Span | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of weight [..., N, K] per row and group of `group_size` columns (None: the
    whole row). Symmetric: z = 2^(bits-1) and s = max |w| / (2^(bits-1) - 1); asymmetric: the group's range
    [min, max] (always including 0) over all 2^bits levels, z rounded to an integer. `span`: each group's range
    where the groups reach past these columns (a tensor-parallel shard of whole rows), else `weight`'s own."""
    w = _grouped(weight, group_size)
    low, high = span if span is not None else _span(w)
    top = 2 ** bits - 1
    if symmetric:
        zeros = torch.full(w.shape[:-1], 2.0 ** (bits - 1))
        scales = torch.maximum(-low, high) / (2 ** (bits - 1) - 1)
    else:
        low, high = low.clamp(max=0), high.clamp(min=0)
        scales = (high - low) / top
        zeros = torch.round(-low / scales.clamp(min=torch.finfo(torch.float32).tiny))
    scales = scales.clamp(min=torch.finfo(torch.float32).tiny)  # an all-zero group: any scale gives zeros
    q = torch.clamp(torch.round(w / scales[..., None]) + zeros[..., None], 0, top)
    return QuantizedWeight.of(q.flatten(-2).to(torch.uint8), scales, zeros.to(scales.device), bits)


FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def quantize_fp8(weight: torch.Tensor, group_size: int | None = None, span: Span | None = None) -> QuantizedWeight:
    """weight [..., N, K] as float8 e4m3 with a scale per row and group of `group_size` columns (None: the whole
    row): s = max |w| / 448, the values rounded to the nearest e4m3 number (what vLLM's dynamic fp8 does per tensor,
    here per row: a row's outliers no longer coarsen every other row). `span` as in quantize."""
    w = _grouped(weight, group_size)
    low, high = span if span is not None else _span(w)
    scales = (torch.maximum(-low, high) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    values = (w / scales[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return QuantizedWeight.of_float8(values.flatten(-2), scales)
