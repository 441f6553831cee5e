"""Load a Hugging Face checkpoint directory into our own model classes.

Weights come from safetensors (one file or a sharded index), memory-mapped, tensor by tensor,
cast to the serving dtype. Any missing, unexpected or misshapen tensor stops the load with a
message naming it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest.mock import patch

import torch
from rich.progress import Progress
from safetensors import safe_open
from torch import nn

from localmoe.experts.store import ExpertStore, TensorLocation, safetensors_locations
from localmoe.layers.moe import SparseMoE
from localmoe.models.registry import model_class

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


def load_model(model_dir: str | Path, dtype: str = "auto", device: str | torch.device = "cpu",
               expert_offload: str | None = None) -> tuple[nn.Module, dict]:
    """Build the architecture named by config.json and fill it from the checkpoint's tensors.

    With `expert_offload` ("host" or "disk") the MoE layers' experts go to an ExpertStore (`model.expert_store`)
    instead of the model: a host-memory copy, or only the experts' places in the files (nothing read now)."""
    model_dir = Path(model_dir)
    device = torch.device(device)
    hf_config = read_hf_config(model_dir)
    cls = model_class(hf_config)
    torch_dtype = resolve_dtype(dtype, hf_config, device)
    try:
        with _uninitialized(torch_dtype, device):
            model = cls(hf_config)
    except KeyError as e:
        raise ValueError(f"{model_dir}/config.json lacks the field {e.args[0]!r}") from e
    store = None
    if expert_offload is not None:
        store = model.expert_store = ExpertStore(expert_offload, torch_dtype, model.map_weight,
                                                 pin_memory=device.type == "cuda")
        for path, module in model.named_modules():
            if isinstance(module, SparseMoE):
                module.offload(path, store)
    params = dict(model.named_parameters())
    loaded: dict[str, dict] = {}  # parameter -> {piece: elements}
    files = safetensors_files(model_dir)
    with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
        for path in files:
            locations = safetensors_locations(path) if store is not None else {}
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                task = progress.add_task(f"Loading {path.name}", total=len(names))
                for name in names:
                    tensor = _offloaded_only(model, store, name, locations)
                    if tensor is None:
                        tensor = f.get_tensor(name)
                    _load_tensor(model, params, loaded, name, tensor, path, store, locations.get(name))
                    progress.advance(task)
    complete = _complete(params, loaded)
    missing = [n for n in params if n not in complete]
    if missing:
        raise ValueError(f"checkpoint {model_dir} is missing weight {missing[0]} ({len(missing)} missing in all)")
    return model.eval(), hf_config


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


def _offloaded_only(model: nn.Module, store: ExpertStore | None, name: str,
                    locations: dict[str, TensorLocation]) -> torch.Tensor | None:
    """A shape-only stand-in for a tensor that only fills experts a disk store leaves in the file, so it is
    never read at load; None where the real tensor is needed."""
    if store is None or store.needs_data or model.ignored_weight(name):
        return None
    loc = locations[name]
    stand_in = torch.empty(loc.shape, dtype=loc.dtype, device="meta")
    mapped = list(model.map_weight(name, stand_in))
    return stand_in if mapped and all(store.owns(target) for target, _, _ in mapped) else None


def _load_tensor(model: nn.Module, params: dict[str, nn.Parameter], loaded: dict[str, dict], name: str,
                 tensor: torch.Tensor, path: Path, store: ExpertStore | None = None,
                 location: TensorLocation | None = None) -> None:
    if model.ignored_weight(name):
        return
    for target, value, where in model.map_weight(name, tensor):
        if target not in params:
            raise ValueError(f"{path.name}: unexpected tensor {name!r} for {type(model).__name__}")
        dest = params[target].data if where is None else params[target].data[where]
        if dest.shape != value.shape:
            raise ValueError(f"{path.name}: tensor {name!r} has shape {tuple(value.shape)}, "
                             f"expected {tuple(dest.shape)}")
        if store is not None and store.owns(target):
            store.add(target, value, where, name, location)
        else:
            dest.copy_(value)
        loaded.setdefault(target, {})[repr(where)] = dest.numel()


def _complete(params: dict[str, nn.Parameter], loaded: dict[str, dict]) -> set[str]:
    """A parameter filled piece by piece (stacked experts, fused projections) counts as loaded once
    its distinct pieces cover every element."""
    return {name for name, pieces in loaded.items() if sum(pieces.values()) == params[name].numel()}
