import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors (tests/test_triton_kernels.py). Triton
# reads this when it is first imported and when a kernel is defined, so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from checkpoints import make_checkpoint  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI a skipped test fails the run (tests that need hardware a machine may lack aside: gpu,
    avx512_bf16): no silent skips."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not any(
            item.get_closest_marker(hardware) for hardware in ("gpu", "avx512_bf16")):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true: {report.longrepr}"


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-mixtral"), "mixtral", seed=0)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """The built-in checkpoint is written to a per-session cache, never the user's."""
    os.environ.setdefault("LOCALMOE_CACHE", str(tmp_path_factory.mktemp("localmoe-cache")))
