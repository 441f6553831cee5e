"""A weight-only quantized weight in the one form the engine serves, whatever it was read from.

Every scheme we serve (our own int8/int4 quantization at load, and the checkpoint formats) comes down to unsigned
`bits`-bit integers q with a scale s and a zero point z per row and group of columns: w = s (q - z). Symmetric
schemes have z at the middle of the range (128 for int8, 8 for int4). The CPU kernels read q in tiles
(layers/cpu_kernels.py, `QuantTiles`); everywhere else the weight is dequantized where it is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """A weight [..., N, K]: `packed` holds q [..., N, K * bits / 8] (int4: two a byte, column 2i in the low nibble);
    scales and zeros are float32 [..., N, K / group_size]."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int

    @classmethod
    def of(cls, values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> "QuantizedWeight":
        """From the integers themselves (uint8 [..., N, K], each below 2^bits)."""
        values = values.to(torch.uint8)
        if values.numel() and int(values.max()) >> bits:
            raise ValueError(f"a value does not fit in {bits} bits")
        packed = values if bits == 8 else values[..., 0::2] | values[..., 1::2] << 4
        return cls(packed.contiguous(), scales.float().contiguous(), zeros.float().contiguous(), bits)

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
        q = self.values().float().unflatten(-1, (self.scales.shape[-1], self.group_size))
        return ((q - self.zeros[..., None]) * self.scales[..., None]).flatten(-2).to(dtype)

    def to(self, device: torch.device) -> "QuantizedWeight":
        return QuantizedWeight(*(t.to(device) for t in (self.packed, self.scales, self.zeros)), self.bits)

    def __getitem__(self, index: int) -> "QuantizedWeight":
        """Matrix `index` of a stack [E, N, K]."""
        return QuantizedWeight(self.packed[index], self.scales[index], self.zeros[index], self.bits)


def quantize(weight: torch.Tensor, bits: int, group_size: int | None = None,
             symmetric: bool = True) -> QuantizedWeight:
    """Round-to-nearest quantization of weight [..., N, K] per row and group of `group_size` columns (None: the
    whole row). Symmetric: z = 2^(bits-1) and s = max |w| / (2^(bits-1) - 1); asymmetric: the group's range
    [min, max] (always including 0) over all 2^bits levels, z rounded to an integer."""
    k = weight.shape[-1]
    group_size = group_size or k
    if k % group_size:
        raise ValueError(f"a row of {k} columns does not split into groups of {group_size}")
    w = weight.detach().float().unflatten(-1, (k // group_size, group_size))
    top = 2 ** bits - 1
    if symmetric:
        zeros = torch.full(w.shape[:-1], 2.0 ** (bits - 1))
        scales = w.abs().amax(dim=-1) / (2 ** (bits - 1) - 1)
    else:
        low, high = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
        scales = (high - low) / top
        zeros = torch.round(-low / scales.clamp(min=torch.finfo(torch.float32).tiny))
    scales = scales.clamp(min=torch.finfo(torch.float32).tiny)  # an all-zero group: any scale gives zeros
    q = torch.clamp(torch.round(w / scales[..., None]) + zeros[..., None], 0, top)
    return QuantizedWeight.of(q.flatten(-2).to(torch.uint8), scales, zeros.to(scales.device), bits)
