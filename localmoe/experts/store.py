"""ExpertStore: where the expert weights live while they are not in an ExpertCache's slots.

Offloading keeps each MoE layer's stacked expert parameters (w13, w2) out of the model; the store holds them
instead, in one of two places:
- `host`: a copy in host memory (pinned on CUDA, so copies to the device can overlap compute);
- `disk`: nothing but where each expert's bytes sit in the checkpoint's safetensors files. A miss reads
  exactly those byte ranges (os.pread), never a whole file, and casts them to the serving dtype.

The loader hands every checkpoint tensor that lands in an offloaded parameter to `add`, with the model's own
name mapping already applied to a shape-only (meta) copy of it, so the store knows which expert, and which rows
of it, the tensor fills; `read` later replays that mapping on the real bytes of one expert.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from localmoe.config import EXPERT_OFFLOAD_TARGETS as OFFLOAD_TARGETS

SAFETENSORS_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

# (checkpoint tensor name, tensor) -> [(parameter name, value, where in the parameter)]: the model's map_weight
WeightMap = Callable[[str, torch.Tensor], Iterable[tuple[str, torch.Tensor, object]]]
# (w13, w2) of one or all experts -> the same, rearranged for the compute that reads them
Layout = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _lay_out(layout: Layout, experts: dict[str, torch.Tensor], dest: dict[str, torch.Tensor]) -> None:
    """Copy `experts` ("w13"/"w2" -> tensors) into `dest`, rearranged by `layout` (dest may be experts itself)."""
    for kind, value in zip(("w13", "w2"), layout(experts["w13"], experts["w2"])):
        dest[kind].copy_(value)


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


def safetensors_locations(path: Path) -> dict[str, TensorLocation]:
    """Every tensor's location in one safetensors file, from its header (8-byte length, then JSON)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    return {name: TensorLocation(path, base + info["data_offsets"][0], SAFETENSORS_DTYPES[info["dtype"]],
                                 tuple(info["shape"]))
            for name, info in header.items() if name != "__metadata__"}


@dataclass
class _Piece:
    """One checkpoint tensor's share of one expert: read `source`, map it, write it at `where` in the expert."""

    name: str
    source: TensorLocation
    stacked: bool  # the source is one expert's row of a tensor stacking all experts (the mapping keeps dim 0)


@dataclass
class _Layer:
    num_experts: int
    shapes: dict[str, tuple[int, ...]]  # "w13"/"w2" -> one expert's shape
    host: dict[str, torch.Tensor] = field(default_factory=dict)  # host target: stacked copies
    pieces: list[list[_Piece]] = field(default_factory=list)  # disk target: per expert
    layout: Layout | None = None  # how the layer's compute wants each expert laid out (see set_layout)


class ExpertStore:
    def __init__(self, target: str, dtype: torch.dtype, weight_map: WeightMap, pin_memory: bool = False) -> None:
        if target not in OFFLOAD_TARGETS:
            raise ValueError(f"expert offload target {target!r} is not one of {', '.join(OFFLOAD_TARGETS)}")
        self.target = target
        self.dtype = dtype
        self.weight_map = weight_map
        self.pin_memory = pin_memory
        self.layers: dict[str, _Layer] = {}  # MoE module path -> its experts
        self._files: dict[Path, int] = {}  # disk target: descriptors, open for the store's lifetime

    def add_layer(self, path: str, num_experts: int, shapes: dict[str, tuple[int, ...]]) -> None:
        layer = _Layer(num_experts, shapes)
        if self.target == "host":
            layer.host = {kind: torch.empty(num_experts, *shape, dtype=self.dtype, pin_memory=self.pin_memory)
                          for kind, shape in shapes.items()}
        else:
            layer.pieces = [[] for _ in range(num_experts)]
        self.layers[path] = layer

    def owns(self, param: str) -> bool:
        """Is `param` (e.g. "layers.3.mlp.w13") a stacked expert parameter this store holds?"""
        path, _, kind = param.rpartition(".")
        return path in self.layers and kind in self.layers[path].shapes

    @property
    def needs_data(self) -> bool:
        """Whether the loader must read offloaded tensors now (host) or only note where they are (disk)."""
        return self.target == "host"

    def add(self, param: str, value: torch.Tensor, where: object, name: str, source: TensorLocation) -> None:
        """Take one mapped checkpoint tensor for an offloaded parameter. `where` is as in map_weight: an expert
        index, (expert, rows...), or for a tensor stacking every expert along dimension 0, None or
        (slice(None), rows...)."""
        path, _, kind = param.rpartition(".")
        layer = self.layers[path]
        if self.target == "host":
            dest = layer.host[kind] if where is None else layer.host[kind][where]
            dest.copy_(value)
            return
        index = where[0] if isinstance(where, tuple) else where
        stacked = index is None or index == slice(None)
        for expert in range(layer.num_experts) if stacked else [index]:
            layer.pieces[expert].append(_Piece(name, source.rows(expert, 1) if stacked else source, stacked))

    def set_layout(self, path: str, layout: Layout) -> None:
        """Serve this layer's experts rearranged by `layout` ((w13, w2) -> (w13, w2), same shapes; the CPU kernel's
        tiles): host copies are rearranged once, here; experts read from disk as they are read."""
        layer = self.layers[path]
        layer.layout = layout
        if self.target == "host":
            _lay_out(layout, layer.host, layer.host)  # in place: the copies stay pinned

    def expert_bytes(self, path: str) -> int:
        """Bytes of one expert of this layer in the serving dtype (what a cache slot holds)."""
        return sum(int(torch.Size(s).numel()) for s in self.layers[path].shapes.values()) * self.dtype.itemsize

    def read(self, path: str, expert: int, dest: dict[str, torch.Tensor]) -> int:
        """Copy one expert's weights into `dest` ("w13"/"w2" -> one slot's tensors); returns the bytes moved."""
        layer = self.layers[path]
        if self.target == "host":
            for kind, slot in dest.items():
                slot.copy_(layer.host[kind][expert], non_blocking=True)
            return self.expert_bytes(path)
        moved = 0
        target = dest if layer.layout is None else {kind: torch.empty_like(slot) for kind, slot in dest.items()}
        for piece in layer.pieces[expert]:
            raw = self._pread(piece.source)
            moved += piece.source.nbytes
            for param, value, where in self.weight_map(piece.name, raw):
                rows = where[1:] if isinstance(where, tuple) else ()  # within the expert
                # one expert's row of a stacked tensor is mapped with its dimension 0 (of size 1) kept
                target[param.rpartition(".")[2]][rows].copy_(value[0] if piece.stacked else value)
        if layer.layout is not None:
            _lay_out(layer.layout, target, dest)
        return moved

    def _pread(self, loc: TensorLocation) -> torch.Tensor:
        fd = self._files.get(loc.path)
        if fd is None:
            fd = self._files[loc.path] = os.open(loc.path, os.O_RDONLY)
        data = bytearray(loc.nbytes)
        view, done = memoryview(data), 0
        while done < loc.nbytes:  # pread may return less than asked
            done += os.preadv(fd, [view[done:]], loc.offset + done)
        return torch.frombuffer(data, dtype=loc.dtype).view(loc.shape)

    def drop_page_cache(self) -> None:
        """Ask the OS to forget the checkpoint files' cached pages, so the next reads come from the disk
        (measuring a cold `disk` target on a machine whose RAM would otherwise hold the whole file)."""
        paths = {p.source.path for layer in self.layers.values() for pieces in layer.pieces for p in pieces}
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers.values() for t in layer.host.values())
