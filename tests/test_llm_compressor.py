"""compressed-tensors checkpoints made by the tool that makes them for real: llm-compressor's `oneshot` quantizes a
tiny random Mixtral (W4A16: 4 bits in groups of 128, W8A16: 8 bits per channel). llm-compressor pins
transformers<=5.17, so it runs in an environment of its own (a venv over ours, built once into the user's cache).
The reference is the compressed-tensors library's own decompressor on the saved tensors: LocalMoE serves the packed
integers, and its logits equal transformers' on the decompressed weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import make_checkpoint
from family_parity import (check_batched_prompt_logits, check_greedy_with_shared_prefix, check_offloaded_like_resident,
                           check_quantized_kernels)
from localmoe.experts.quantized import QuantGroupedExperts
from localmoe.layers.cpu_kernels import cpu_has_avx512_bf16
from localmoe.layers.moe import moe_blocks
from localmoe.layers.quant_linear import QuantLinear

LLMCOMPRESSOR = "0.14.0.1"
TRANSFORMERS = "5.17.0"  # the newest llm-compressor takes
ONESHOT = Path(__file__).parent / "llm_compressor_oneshot.py"
SCHEMES = {"W4A16": 4, "W8A16": 8}
# llm-compressor saves the experts under the names of its linearized modules; transformers reads Mixtral's own
CHECKPOINT_NAMES = {".gate_proj.": ".w1.", ".up_proj.": ".w3.", ".down_proj.": ".w2."}


@pytest.fixture(scope="session")
def llm_compressor_python() -> Path:
    """A venv over this environment (torch and the rest shared) with llm-compressor and the transformers it takes,
    installed once from the package index into the user's cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "localmoe" / "envs"
    root = cache / f"llmcompressor-{LLMCOMPRESSOR}-torch-{torch.__version__.split('+')[0]}"
    if (root / "ready").exists():
        return root / "bin" / "python"
    shutil.rmtree(root, ignore_errors=True)  # a build that did not finish
    root.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(root)], check=True)
    subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "-q", f"llmcompressor=={LLMCOMPRESSOR}",
                    f"transformers=={TRANSFORMERS}", f"torch=={torch.__version__}"], check=True, timeout=1800)
    (root / "ready").touch()
    return root / "bin" / "python"


def decompressed(checkpoint: Path, target: Path) -> Path:
    """`checkpoint` with every quantized layer replaced by what compressed-tensors' own decompressor makes of its
    tensors (float32), and no quantization_config: the reference transformers runs (experts renamed to Mixtral's
    w1/w3/w2)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    shutil.copytree(checkpoint, target)
    config = json.loads((checkpoint / "config.json").read_text())
    quantization = config.pop("quantization_config")
    (group,) = quantization["config_groups"].values()
    scheme = QuantizationScheme.model_validate(group)
    compressor = BaseCompressor.get_value_from_registry(group["format"])
    layers: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    tensors = {}
    for name, tensor in load_file(checkpoint / "model.safetensors").items():
        prefix, _, suffix = name.rpartition(".")
        if suffix.startswith("weight_"):
            layers[prefix][suffix] = tensor
        else:
            tensors[name] = tensor.float()
    for prefix, parts in layers.items():
        name = f"{prefix}.weight"
        for linearized, own in CHECKPOINT_NAMES.items():
            name = name.replace(linearized, own) if ".experts." in name else name
        tensors[name] = compressor.decompress(parts, scheme)["weight"].float()
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def compressed(llm_compressor_python, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per scheme: (llm-compressor's checkpoint, its decompressed float32 reference)."""
    root = tmp_path_factory.mktemp("llm-compressor")
    source = make_checkpoint(root / "source", seed=5, hidden_size=128, intermediate_size=128)
    made = {}
    for scheme in SCHEMES:
        subprocess.run([str(llm_compressor_python), str(ONESHOT), str(source), scheme, str(root / scheme)],
                       check=True, timeout=900)
        made[scheme] = root / scheme, decompressed(root / scheme, root / f"{scheme}-dense")
    return made


@pytest.mark.parametrize("scheme", SCHEMES)
def test_float32_logits_and_greedy_tokens_equal_transformers_on_the_decompressed_weights(compressed, scheme):
    packed, dense = compressed[scheme]
    config = json.loads((packed / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    llm = check_batched_prompt_logits(packed, reference=dense)
    model = llm.engine.model
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * len(model.layers) and all(m.bits == SCHEMES[scheme] for m in linears)
    assert all(isinstance(moe.experts, QuantGroupedExperts) and set(moe.experts.bits.values()) == {SCHEMES[scheme]}
               for _, moe in moe_blocks(model))
    check_greedy_with_shared_prefix(packed, True, new=16, reference=dense)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_bf16_on_the_kernels_meets_the_bf16_bar_against_the_decompressed_weights(compressed, scheme):
    if not cpu_has_avx512_bf16():
        pytest.skip("needs a CPU with AVX512-BF16")
    packed, dense = compressed[scheme]
    check_quantized_kernels(packed, dense)



@pytest.mark.parametrize("scheme,target", [("W4A16", "disk"), ("W8A16", "host")])
def test_offloaded_experts_are_the_checkpoints_packed_integers(compressed, scheme, target):
    check_offloaded_like_resident(compressed[scheme][0], target, "float32")
