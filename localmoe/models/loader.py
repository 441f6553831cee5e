"""Load a Hugging Face checkpoint directory into our own model classes.

Weights come from safetensors (one file or a sharded index), memory-mapped, tensor by tensor,
cast to the serving dtype. Any missing, unexpected or misshapen tensor stops the load with a
message naming it. A quantized checkpoint (config.json's quantization_config: AWQ, GPTQ, compressed-tensors,
fp8) fills the same dense parameters, dequantized, and keeps its own integers beside them for the quantization
pass (models/quantized_checkpoint.py), as `model.quantized_checkpoint`; the tensors of its offloaded experts are left
for the expert store, which keeps them packed (experts/store.py). A GGUF file (models/gguf_file.py) is read the
same way: its config from the file's metadata, its Q8_0 and Q4_K blocks kept packed beside the dense parameters.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from unittest.mock import patch

import torch
from rich.progress import Progress
from safetensors import safe_open
from torch import nn

from localmoe.models.args import ModelArgs
from localmoe.models.checkpoint import TensorLocation, safetensors_files, safetensors_locations
from localmoe.models.gguf_file import GgufBlocks, read_gguf
from localmoe.models.quantized_checkpoint import QuantizedCheckpoint
from localmoe.models.registry import model_class
from localmoe.quant.formats import CheckpointFormat, checkpoint_format

DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
}


def read_hf_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.exists():
        raise ValueError(f"{model_dir} is not a checkpoint directory: config.json is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def resolve_dtype(dtype: str, hf_config: dict, device: torch.device) -> torch.dtype:
    """`auto` takes the checkpoint's dtype; float16 becomes bfloat16 on CPU, where it is slow."""
    if dtype == "auto":
        dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
        if dtype == "float16" and device.type == "cpu":
            dtype = "bfloat16"
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, float32, bfloat16, float16")
    return DTYPES[dtype]


def load_model(model_dir: str | Path, dtype: str = "auto", device: str | torch.device = "cpu",
               unread: Callable[[str], bool] | None = None,
               quantization: str | None = None) -> tuple[nn.Module, dict]:
    """Build the architecture named by config.json and fill it from the checkpoint's tensors.

    Parameters for which `unread(name)` holds are left shape-only, on the meta device, for another owner to fill
    (expert offloading keeps experts out of the model): the checkpoint tensors that only fill them are checked
    for name and shape but never read. `quantization` (the --quantization asked for) must agree with a quantized
    checkpoint's own."""
    model_dir = Path(model_dir)
    device = torch.device(device)
    gguf = read_gguf(model_dir) if model_dir.suffix == ".gguf" else None
    hf_config = read_hf_config(model_dir) if gguf is None else gguf.config
    cls = model_class(hf_config)
    source = f"{model_dir}/config.json" if gguf is None else str(model_dir)
    args = ModelArgs.from_hf(hf_config, cls.required_fields, source)
    torch_dtype = resolve_dtype(dtype, hf_config, device)
    try:
        with _uninitialized(torch_dtype, device):
            model = cls(args)
    except KeyError as e:  # a field inside one, e.g. rope_parameters' original_max_position_embeddings
        raise ValueError(f"{source} lacks the field {e.args[0]!r}") from e
    if (quantization == "gguf") != (gguf is not None) and quantization not in (None, "", "none"):
        raise ValueError(f"quantization {quantization!r}: " + ("a GGUF file is served in its own quantization"
                                                               if gguf is not None else "--model is not a .gguf file"))
    fmt = checkpoint_format(hf_config.get("quantization_config"), None if gguf is not None else quantization)
    if gguf is not None:  # its blocks come combined (gguf_file.py): the QuantizedCheckpoint only keeps them
        fmt = GgufBlocks()
    quantized = QuantizedCheckpoint(fmt) if fmt is not None else None
    left_out = {name for name, _ in model.named_parameters() if unread is not None and unread(name)}
    _to_meta(model, left_out)
    params = dict(model.named_parameters())
    loaded: dict[str, dict] = {}  # parameter -> {piece: elements}
    files = safetensors_files(model_dir) if gguf is None else []
    with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
        for path in files:
            locations = safetensors_locations(path) if left_out else {}
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                task = progress.add_task(f"Loading {path.name}", total=len(names))
                for name in names:
                    location = locations.get(name)
                    if location is not None and quantized is not None and _offloaded(model, fmt, left_out, name,
                                                                                     location.stand_in()):
                        progress.advance(task)
                        continue
                    held = quantized is not None and quantized.take(name, lambda: f.get_tensor(name))
                    if not held and not model.ignored_weight(name):
                        tensor = _stand_in(model, left_out, locations.get(name), name)
                        _load_tensor(model, params, loaded, name, f.get_tensor(name) if tensor is None else tensor,
                                     path, left_out)
                    progress.advance(task)
    if quantized is not None:
        offloaded = partial(_offloaded, model, fmt, left_out, stand_in=torch.empty(0, device="meta"))
        for name, tensor, weight in quantized.weights() if gguf is None else gguf.tensors(offloaded):
            for target, value, where in _load_tensor(model, params, loaded, name, tensor, model_dir, left_out):
                quantized.record(target, where, weight if value is tensor else None)
    model.quantized_checkpoint = quantized
    complete = _complete(params, loaded) | (left_out if quantized is not None else set())  # the store checks those
    missing = [n for n in params if n not in complete]
    if missing:
        raise ValueError(f"checkpoint {model_dir} is missing weight {missing[0]} ({len(missing)} missing in all)")
    return model.eval(), hf_config


def _to_meta(model: nn.Module, names: set[str]) -> None:
    """Replace these parameters by shape-only ones (their memory is never touched)."""
    for name in names:
        path, _, leaf = name.rpartition(".")
        module = model.get_submodule(path)
        value = getattr(module, leaf)
        setattr(module, leaf, nn.Parameter(torch.empty(value.shape, dtype=value.dtype, device="meta"), False))


@contextmanager
def _uninitialized(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Build modules straight in their serving dtype and device, skipping the random init every
    loaded weight would overwrite anyway (it costs seconds on a large model)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), patch.object(nn.Linear, "reset_parameters", _skip), \
                patch.object(nn.Embedding, "reset_parameters", _skip):
            yield
    finally:
        torch.set_default_dtype(saved)


def _skip(self: nn.Module) -> None:
    pass


def _stand_in(model: nn.Module, left_out: set[str], location: TensorLocation | None,
              name: str) -> torch.Tensor | None:
    """A shape-only stand-in for a tensor that fills only parameters left unread, so it is never read; None where
    the real tensor is needed."""
    if location is None:
        return None
    stand_in = location.stand_in()
    mapped = list(model.map_weight(name, stand_in))
    return stand_in if mapped and all(target in left_out for target, _, _ in mapped) else None


def _offloaded(model: nn.Module, fmt: CheckpointFormat, left_out: set[str], name: str, stand_in: torch.Tensor) -> bool:
    """Whether a quantized checkpoint's tensor (one of its format's, e.g. an expert's qweight; stand_in: its shape)
    fills only parameters left unread: the expert store reads those itself, packed as they are (experts/store.py)."""
    weight, suffix = fmt.split(name)
    mapped = list(model.map_weight(weight if suffix in fmt.suffixes else name, stand_in))
    return bool(mapped) and all(target in left_out for target, _, _ in mapped)


def _load_tensor(model: nn.Module, params: dict[str, nn.Parameter], loaded: dict[str, dict], name: str,
                 tensor: torch.Tensor, path: Path, left_out: set[str]) -> list[tuple[str, torch.Tensor, object]]:
    """Copy one checkpoint tensor into the parameters it fills; returns model.map_weight's (target, value, where)."""
    mapped = list(model.map_weight(name, tensor))
    for target, value, where in mapped:
        if target not in params:
            raise ValueError(f"{path.name}: unexpected tensor {name!r} for {type(model).__name__}")
        dest = params[target].data if where is None else params[target].data[where]
        if dest.shape != value.shape:
            raise ValueError(f"{path.name}: tensor {name!r} has shape {tuple(value.shape)}, "
                             f"expected {tuple(dest.shape)}")
        if target not in left_out:
            dest.copy_(value)
        loaded.setdefault(target, {})[repr(where)] = dest.numel()
    return mapped


def _complete(params: dict[str, nn.Parameter], loaded: dict[str, dict]) -> set[str]:
    """A parameter filled piece by piece (stacked experts, fused projections) counts as loaded once
    its distinct pieces cover every element."""
    return {name for name, pieces in loaded.items() if sum(pieces.values()) == params[name].numel()}
