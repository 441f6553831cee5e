"""Whether the Triton kernels (layers/triton_moe.py, layers/triton_attention.py) serve a step.

They run on CUDA where triton imports; the PyTorch paths stay the reference, the fallback, and the path on CPU.
LOCALMOE_REFERENCE_KERNELS=1 forces the PyTorch paths on CUDA too, so one GPU run can measure both. The kernel
modules are imported on first use, never at import time: Triton decides when a kernel is defined whether it is
compiled or interpreted (TRITON_INTERPRET=1, how the tests run them on CPU tensors).
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

import torch


@cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def reference_forced() -> bool:
    return os.environ.get("LOCALMOE_REFERENCE_KERNELS", "") not in ("", "0")


def runs_here(tensor: torch.Tensor) -> bool:
    """Whether a layer whose data is `tensor` runs on the Triton kernels."""
    return tensor.is_cuda and triton_importable() and not reference_forced()
