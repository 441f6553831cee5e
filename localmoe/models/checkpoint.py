"""Where a checkpoint's tensors are: its safetensors files, and each tensor's bytes inside them.

The loader reads tensors through safetensors; the expert store (experts/store.py) reads single experts' bytes
straight from the files, so it needs each tensor's offset, dtype and shape, which the file's header gives.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
}


@dataclass(frozen=True)
class TensorLocation:
    """A tensor's bytes inside a safetensors file."""

    path: Path
    offset: int  # of its first byte, from the start of the file
    dtype: torch.dtype
    shape: tuple[int, ...]

    def rows(self, first: int, count: int) -> "TensorLocation":
        """Rows [first, first + count) along dimension 0: contiguous bytes in a row-major file."""
        row_bytes = self.dtype.itemsize * int(torch.Size(self.shape[1:]).numel())
        return TensorLocation(self.path, self.offset + first * row_bytes, self.dtype, (count, *self.shape[1:]))

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * int(torch.Size(self.shape).numel())

    def stand_in(self) -> torch.Tensor:
        """A shape-only (meta) tensor like this one: for mapping names and shapes without reading bytes."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


def safetensors_locations(path: Path) -> dict[str, TensorLocation]:
    """Every tensor's location in one safetensors file, from its header (8-byte length, then JSON)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    return {name: TensorLocation(path, base + info["data_offsets"][0], SAFETENSORS_DTYPES[info["dtype"]],
                                 tuple(info["shape"]))
            for name, info in header.items() if name != "__metadata__"}


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (model_dir / s).exists()]
        if missing:
            raise ValueError(f"{index} names shard {missing[0]}, which is missing")
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} holds no *.safetensors weights")
    return files
