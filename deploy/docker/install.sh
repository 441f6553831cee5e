#!/usr/bin/env bash
# Installs LocalMoE, with the dependency versions pinned in constraints.txt, into the Python environment on PATH.
# The image's Dockerfile runs it, and so does tests/test_deploy_image.py (in a clean virtual environment).
#
#   install.sh [SOURCE_DIR]           SOURCE_DIR: the repository (default: two folders up from this script)
#
# Environment:
#   TORCH_SPEC       the torch requirement (default torch==2.13.0, the version the suite runs on)
#   TORCH_INDEX_URL  where torch comes from: PyTorch's CPU wheel index for the CPU image, a CUDA one (cu128, ...)
#                    for the CUDA variant; empty: pip's configured index
#   CPU_TARGET       the -march targets the CPU kernels are built for (LOCALMOE_CPU_TARGET, read by
#                    localmoe/layers/cpu_kernels.py: x86-64-v4, sapphirerapids, znver4, ..., comma-separated in order
#                    of preference): each one but native is built now into $LOCALMOE_KERNEL_CACHE, whatever CPU this
#                    machine has (a build is not run here); empty: none prebuilt (a pod builds for its CPU on start)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source_dir="${1:-$here/../..}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
cpu_target="${CPU_TARGET:-}"

index_args=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    index_args=(--index-url "$TORCH_INDEX_URL")
fi
python -m pip install "${index_args[@]}" "$torch_spec"
python -m pip install -c "$here/constraints.txt" "$source_dir"
localmoe --help >/dev/null

if [ -z "$cpu_target" ]; then
    echo "install.sh: CPU_TARGET is empty: no CPU kernels prebuilt (a pod builds them for its CPU on first start)"
    exit 0
fi
LOCALMOE_CPU_TARGET="$cpu_target" python - <<'PY'
from localmoe.layers import cpu_kernels

for target in cpu_kernels.cpu_targets():
    if target == "native":  # the node's CPU, not this machine's: built on the node
        continue
    build = cpu_kernels.Build.of(target)
    directory = cpu_kernels.build_into(cpu_kernels.cache_dir(build), build)
    print(f"install.sh: CPU kernels for -march={target} built into {directory}; they run on CPUs with "
          f"{' '.join(sorted(build.assumes))}")
PY
