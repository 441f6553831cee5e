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
#   CPU_FEATURES     CPU flags the CPU kernels need (localmoe/layers/cpu_kernels.py: avx512_bf16): when this
#                    machine has them all, the kernels are built now into $LOCALMOE_KERNEL_CACHE, else it says
#                    which are missing and a pod builds them on first start; empty or "none": no kernels
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source_dir="${1:-$here/../..}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
cpu_features="${CPU_FEATURES:-none}"

index_args=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    index_args=(--index-url "$TORCH_INDEX_URL")
fi
python -m pip install "${index_args[@]}" "$torch_spec"
python -m pip install -c "$here/constraints.txt" "$source_dir"
localmoe --help >/dev/null

if [ "$cpu_features" = none ]; then
    echo "install.sh: CPU_FEATURES=none: no CPU kernels in this image (the PyTorch paths serve)"
    exit 0
fi
missing=()
for feature in $cpu_features; do
    grep -qw -- "$feature" /proc/cpuinfo || missing+=("$feature")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install.sh: this build machine's CPU lacks ${missing[*]}: the CPU kernels are not prebuilt; a pod on" \
         "a CPU with ${cpu_features} builds them on first start into \$LOCALMOE_KERNEL_CACHE (~40 s)"
    exit 0
fi
python - <<'PY'
from localmoe.layers import cpu_kernels

if cpu_kernels.kernels() is None:
    raise SystemExit("install.sh: building the CPU kernels failed (see the warning above)")
print(f"install.sh: CPU kernels built into {cpu_kernels.cache_dir()}; they load on nodes with this CPU model,"
      " and build on first start on others")
PY
