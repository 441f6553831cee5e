"""ExpertStore: where the expert weights live while they are not in an ExpertCache's slots.

Offloading keeps each MoE layer's stacked expert parameters (w13, w2) out of the model; the store holds them
instead, in one of two places:
- `host`: a copy in host memory (pinned on CUDA, so copies to the device can overlap compute);
- `disk`: nothing in memory. Where each expert's bytes sit in the checkpoint's safetensors files is noted at
  start, and `lay_out_on_disk` writes every expert once, in its serving form, to a local ExpertFile
  (experts/expert_file.py) that each miss then reads directly into its slot.

Each layer's experts are kept in the form its compute reads (`ExpertForm`): w13 and w2 as the checkpoint has
them, in the kernel's tiles, or quantized (experts/quantized.py), so a cache slot holds what the compute reads
and a quantized expert moves a quarter or an eighth of its bf16 bytes.

The loader leaves offloaded experts unread; `fill` then goes over the checkpoint's tensors itself, applying the
model's own name mapping to a shape-only (meta) copy of each, so the store knows which expert, and which rows
of it, a tensor fills (and a host store reads those tensors); `_assemble` replays that mapping on the real
bytes of one expert, read by offset (os.pread), never a whole file.

A quantized checkpoint's experts (`checkpoint`: its format, quant/formats.py) are kept as it packs them: the store
notes each expert's format tensors (AWQ's qweight, qzeros and scales, an fp8 weight and its scales, or one expert's
rows of a tensor stacking them all), and `packed_expert` reads them by offset and combines them into the expert's w13
and w2 QuantizedWeights, the checkpoint's own integers, which its form lays out (experts/quantized.py,
checkpoint_form). A host store does that once for every expert at set_form.

Under expert parallelism (distributed/expert_parallel.py) a rank's store holds its own experts alone: a layer added
with `held` (the checkpoint's expert ids this rank serves) numbers them 0..len(held)-1 in that order, and the
checkpoint's tensors of other experts are neither read nor noted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from localmoe.config import EXPERT_OFFLOAD_TARGETS as OFFLOAD_TARGETS
from localmoe.experts.expert_file import ExpertFile, read_fully
from localmoe.models.checkpoint import TensorLocation, safetensors_files, safetensors_locations
from localmoe.models.gguf_file import read_gguf
from localmoe.quant.formats import CheckpointFormat
from localmoe.quant.weight import QuantizedWeight, assemble

# (checkpoint tensor name, tensor) -> [(parameter name, value, where in the parameter)]: the model's map_weight
WeightMap = Callable[[str, torch.Tensor], Iterable[tuple[str, torch.Tensor, object]]]


@dataclass(frozen=True)
class ExpertForm:
    """How a layer's compute keeps one expert: its tensors (kind -> shape and dtype of one expert's) and `make`,
    which turns the checkpoint's w13 and w2 (of one expert or stacked, in the serving dtype; a quantized checkpoint's
    QuantizedWeights of one expert) into them."""

    name: str
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]
    make: Callable[[torch.Tensor | QuantizedWeight, torch.Tensor | QuantizedWeight], dict[str, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        """Bytes of one expert in this form."""
        return sum(int(torch.Size(shape).numel()) * dtype.itemsize for shape, dtype in self.tensors.values())


def plain_form(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> ExpertForm:
    """w13 and w2 as the checkpoint has them, in the serving dtype."""
    return ExpertForm("plain", {kind: (shape, dtype) for kind, shape in shapes.items()},
                      lambda w13, w2: {"w13": w13, "w2": w2})


@dataclass
class _Piece:
    """One checkpoint tensor's share of one expert: read `source`, map it, write it at `where` in the expert."""

    name: str
    source: TensorLocation
    stacked: bool  # the source is one expert's row of a tensor stacking all experts (the mapping keeps dim 0)


@dataclass
class _Layer:
    num_experts: int  # experts the store holds for the layer
    shapes: dict[str, tuple[int, ...]]  # "w13"/"w2" -> one expert's shape in the checkpoint
    held: list[int]  # the checkpoint's id of each expert held (all of them but under expert parallelism)
    form: ExpertForm  # how the layer's compute keeps each expert (see set_form)
    host: dict[str, torch.Tensor] = field(default_factory=dict)  # host target: stacked copies, in `form`
    pieces: list[list[_Piece]] = field(default_factory=list)  # disk target or a quantized checkpoint: per expert


class ExpertStore:
    def __init__(self, target: str, dtype: torch.dtype, weight_map: WeightMap, pin_memory: bool = False,
                 checkpoint: CheckpointFormat | None = None) -> None:
        if target not in OFFLOAD_TARGETS:
            raise ValueError(f"expert offload target {target!r} is not one of {', '.join(OFFLOAD_TARGETS)}")
        self.target = target
        self.checkpoint = checkpoint  # a quantized checkpoint's format: its experts are kept packed
        self.dtype = dtype
        self.weight_map = weight_map
        self.pin_memory = pin_memory
        self.layers: dict[str, _Layer] = {}  # MoE module path -> its experts
        self._files: dict[Path, int] = {}  # disk target: descriptors, open for the store's lifetime
        self.file: ExpertFile | None = None  # disk target: the experts laid out for serving (lay_out_on_disk)

    def add_layer(self, path: str, num_experts: int, shapes: dict[str, tuple[int, ...]],
                  held: list[int] | None = None) -> None:
        """`held`: the checkpoint's ids of the experts to hold, as experts 0, 1, ... of the layer; None: all
        `num_experts` of them."""
        held = list(range(num_experts)) if held is None else list(held)
        layer = _Layer(len(held), shapes, held, plain_form(shapes, self.dtype))
        if self.target == "host" and self.checkpoint is None:
            layer.host = {kind: torch.empty(len(held), *shape, dtype=self.dtype, pin_memory=self.pin_memory)
                          for kind, shape in shapes.items()}
        else:
            layer.pieces = [[] for _ in held]
        self.layers[path] = layer

    def owns(self, param: str) -> bool:
        """Is `param` (e.g. "layers.3.mlp.experts.w13") a stacked expert parameter this store holds?"""
        path, _, kind = param.rpartition(".")
        return path in self.layers and kind in self.layers[path].shapes

    def holds(self, param: str, where: object) -> bool:
        """Does a mapped checkpoint tensor (`param`, `where` as in map_weight) fill an expert this store holds?"""
        if not self.owns(param):
            return False
        index = where[0] if isinstance(where, tuple) else where
        return index is None or index == slice(None) or index in self.layers[param.rpartition(".")[0]].held

    def add(self, param: str, value: torch.Tensor, where: object, name: str, source: TensorLocation) -> None:
        """Take one mapped checkpoint tensor for a held expert (`holds`). `where` is as in map_weight: an expert
        index, (expert, rows...), or for a tensor stacking every expert along dimension 0, None or
        (slice(None), rows...)."""
        path, _, kind = param.rpartition(".")
        layer = self.layers[path]
        index, rows = (where[0], where[1:]) if isinstance(where, tuple) else (where, ())
        stacked = index is None or index == slice(None)
        if self.target == "host" and self.checkpoint is None:
            if stacked:
                layer.host[kind][(slice(None), *rows)].copy_(value[layer.held])
            else:
                layer.host[kind][(layer.held.index(index), *rows)].copy_(value)
            return
        if not stacked:
            layer.pieces[layer.held.index(index)].append(_Piece(name, source, False))
            return
        for expert, row in enumerate(layer.held):
            layer.pieces[expert].append(_Piece(name, source.rows(row, 1), True))

    def fill(self, model_dir: Path, ignored: Callable[[str], bool]) -> None:
        """Take every checkpoint tensor that fills an expert of the layers added (`ignored`: names the model
        skips): for a disk store or a quantized checkpoint, where its bytes are; for a host store, its values, read
        now."""
        for name, location in _locations(model_dir):
            if ignored(name):
                continue
            stand_in = location.stand_in()
            mapped = [m for m in self.weight_map(self._weight_of(name, stand_in), stand_in) if self.holds(m[0], m[2])]
            if mapped and self.target == "host" and self.checkpoint is None:
                mapped = [m for m in self.weight_map(name, self._pread(location)) if self.holds(m[0], m[2])]
            for param, value, where in mapped:
                self.add(param, value, where, name, location)

    def _weight_of(self, name: str, stand_in: torch.Tensor) -> str:
        """The weight a checkpoint tensor belongs to (for a quantized checkpoint's format tensors), which the model's
        name mapping knows; a tensor of experts the checkpoint did not quantize is refused, naming it."""
        if self.checkpoint is None:
            return name
        weight, suffix = self.checkpoint.split(name)
        if suffix in self.checkpoint.suffixes and self.checkpoint.is_quantized(weight.removesuffix(".weight")):
            return weight
        if any(self.owns(param) for param, _, _ in self.weight_map(name, stand_in)):
            raise ValueError(f"expert offloading of a {self.checkpoint.method} checkpoint keeps its experts as it "
                             f"quantized them, but {name} is not quantized")
        return name

    def set_form(self, path: str, form: ExpertForm) -> None:
        """Serve this layer's experts in `form`: host copies are converted once, here; experts read from disk as
        they are laid out (lay_out_on_disk). Set once, before any cache reads the layer."""
        layer = self.layers[path]
        if layer.form.name == form.name:
            return
        if layer.form.name != "plain":
            raise ValueError(f"{path}: the experts are kept for another compute already ({layer.form.name})")
        layer.form = form
        if self.target == "host" and self.checkpoint is not None:
            experts = [self._assemble(path, expert) for expert in range(layer.num_experts)]
            layer.host = {kind: _pinned(torch.stack([e[kind] for e in experts]), self.pin_memory)
                          for kind in form.tensors}
        elif self.target == "host":
            made = form.make(layer.host["w13"], layer.host["w2"])
            layer.host = {}  # the plain copies go before the new ones are pinned
            layer.host = {kind: _pinned(value, self.pin_memory) for kind, value in made.items()}

    def expert_bytes(self, path: str) -> int:
        """Bytes of one expert of this layer in its serving form (what a cache slot holds)."""
        return self.layers[path].form.nbytes

    def read(self, path: str, expert: int, dest: dict[str, torch.Tensor]) -> int:
        """Copy one expert's weights into `dest` ("w13"/"w2" -> one slot's tensors); returns the bytes moved. A
        disk store reads from its expert file (lay_out_on_disk)."""
        if self.target == "disk":
            return self.file.read_into(path, expert, dest)
        for kind, slot in dest.items():
            slot.copy_(self.layers[path].host[kind][expert], non_blocking=True)
        return self.expert_bytes(path)

    def lay_out_on_disk(self, root: Path) -> None:
        """Disk target: write every expert once, laid out for its compute, to an ExpertFile under `root` (or find
        it there from an earlier start); later reads come from it."""
        layers = {path: (layer.num_experts, {kind: int(torch.Size(shape).numel()) * dtype.itemsize
                                             for kind, (shape, dtype) in layer.form.tensors.items()})
                  for path, layer in self.layers.items()}
        sources = sorted({p.source.path.resolve() for layer in self.layers.values() for pieces in layer.pieces
                          for p in pieces})
        key = ExpertFile.key({
            "version": 2, "dtype": str(self.dtype),
            "layers": [[path, layer.held, layer.shapes, layer.form.name,
                        {kind: [shape, str(dtype)] for kind, (shape, dtype) in layer.form.tensors.items()}]
                       for path, layer in self.layers.items()],
            "sources": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in sources]})
        file = ExpertFile(root / key / "experts.bin", layers)
        file.build(self._assemble, lambda _: self.drop_page_cache())
        self.file = file

    def _assemble(self, path: str, expert: int) -> dict[str, torch.Tensor]:
        """One expert read from the checkpoint: each piece mapped into place, cast, then made into its form."""
        layer = self.layers[path]
        if self.checkpoint is not None:
            return layer.form.make(*self.packed_expert(path, expert))
        out = {kind: torch.empty(shape, dtype=self.dtype) for kind, shape in layer.shapes.items()}
        for piece in layer.pieces[expert]:
            raw = self._pread(piece.source)
            for param, value, where in self.weight_map(piece.name, raw):
                rows = where[1:] if isinstance(where, tuple) else ()  # within the expert
                # one expert's row of a stacked tensor is mapped with its dimension 0 (of size 1) kept
                out[param.rpartition(".")[2]][rows].copy_(value[0] if piece.stacked else value)
        return layer.form.make(out["w13"], out["w2"])

    def packed_expert(self, path: str, expert: int) -> tuple[QuantizedWeight, QuantizedWeight]:
        """A quantized checkpoint's expert as its w13 and w2 QuantizedWeights: its format tensors read (a stacked one's
        row of this expert), combined per weight, and each weight put at the rows the model's mapping gives it."""
        layer, fmt = self.layers[path], self.checkpoint
        held: dict[str, dict[str, torch.Tensor]] = {}
        stacked = set()  # weights read as one expert's row of a stacked tensor
        for piece in layer.pieces[expert]:
            weight, suffix = fmt.split(piece.name)
            raw = self._pread(piece.source)
            held.setdefault(weight, {})[suffix] = raw[0] if piece.stacked else raw
            if piece.stacked:
                stacked.add(weight)
        fmt.regroup(held)
        parts: dict[str, list[tuple[object, QuantizedWeight]]] = {kind: [] for kind in layer.shapes}
        for weight, tensors in held.items():
            combined = fmt.combine(tensors)
            if not isinstance(combined, QuantizedWeight):
                raise ValueError(f"expert offloading of a {fmt.method} checkpoint keeps its experts packed, but "
                                 f"{weight} does not map onto our packed form (GPTQ desc_act groups out of column "
                                 "order, fp8 blocks that do not divide its columns, GGUF types other than Q8_0, Q4_K "
                                 "and Q6_K): serve it without offloading")
            stand_in = torch.empty((1, *combined.shape) if weight in stacked else combined.shape, device="meta")
            for param, value, where in self.weight_map(weight, stand_in):
                if value is not stand_in:
                    raise ValueError(f"{weight}: the model rearranges it as it loads, which packed experts cannot")
                parts[param.rpartition(".")[2]].append((where[1:] if isinstance(where, tuple) else None, combined))
        packed = {kind: assemble(torch.Size(shape), parts[kind]) if parts[kind] else None
                  for kind, shape in layer.shapes.items()}
        if any(weight is None for weight in packed.values()):
            raise ValueError(f"{path}: the checkpoint's tensors do not make expert {expert}'s w13 and w2 whole, packed "
                             "alike")
        return packed["w13"], packed["w2"]

    def _pread(self, loc: TensorLocation) -> torch.Tensor:
        fd = self._files.get(loc.path)
        if fd is None:
            fd = self._files[loc.path] = os.open(loc.path, os.O_RDONLY)
        data = bytearray(loc.nbytes)
        read_fully(fd, memoryview(data), loc.offset)
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


def _locations(model_dir: Path) -> Iterator[tuple[str, TensorLocation]]:
    """Every tensor of the checkpoint and where its bytes are: its safetensors files', or a GGUF file's (under Hugging
    Face names, models/gguf_file.py)."""
    if model_dir.suffix == ".gguf":
        yield from read_gguf(model_dir).locations()
        return
    for file in safetensors_files(model_dir):
        yield from safetensors_locations(file).items()


def _pinned(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    """`tensor` contiguous, in pinned memory where asked (CUDA copies from it can then overlap compute)."""
    if not pin:
        return tensor.contiguous()
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor)
