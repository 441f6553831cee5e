#!/usr/bin/env bash
# The GPU checks of issue 22 in one run of at most 5 minutes, on a machine with one CUDA GPU, its own python3 with
# torch and triton, and no network. Run from the repository root, with the wheels of benchmarks/gpu_wheels.sh in
# .whl/ (carried along); results go to $OUT (default results/gpu_check), at most 8 files:
#   gpu_check.log        everything printed, with the device, versions and each step's exit status
#   tests_gpu.xml        pytest -m gpu (CUDA graphs, the profiling run, offloading on streams)
#   tests_cuda.xml       the Triton kernels compiled and the parity suite against transformers, on CUDA
#   gpu_roofline.json    one-stream decode tokens/s and fraction of the copy roofline, graphs on/off, the PyTorch
#                        paths, concurrency 16 and 64 (benchmarks/gpu_roofline.py)
#   offload_sweep.json   the offload sweep with the host store (benchmarks/offload_sweep.py)
# The 1.2B benchmark checkpoint is built there (benchmarks/make_checkpoint.py --shape large) while the tests run.
# A dry run elsewhere: DEVICE=cpu CKPT=<an existing Mixtral checkpoint> benchmarks/gpu_check.sh (no nvidia-smi needed;
# the tests then run on the CPU, the Triton kernels in Triton's interpreter).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results/gpu_check}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CKPT="${CKPT:-/tmp/bench-large}"
DEVICE="${DEVICE:-cuda}"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log its exit status, go on either way
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@"
    echo "=== $name: exit $?"
}

[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, 'triton', triton.__version__)"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if ! python3 -c "from localmoe import LLM"; then
    echo "localmoe does not import: fetch the missing wheels with benchmarks/gpu_wheels.sh and carry .whl"
    exit 1
fi

: > /tmp/make_checkpoint.log
BUILD=
if [ ! -f "$CKPT/config.json" ]; then
    ( python3 benchmarks/make_checkpoint.py --out "$CKPT" --shape large > /tmp/make_checkpoint.log 2>&1
      echo "make_checkpoint: exit $?" >> /tmp/make_checkpoint.log ) &
    BUILD=$!
fi

step "pytest -m gpu" 50 python3 -m pytest -q -p no:cacheprovider -m gpu --junitxml="$OUT/tests_gpu.xml" \
    tests/test_cuda_graphs.py tests/test_memory_profile.py tests/test_expert_offload.py
LOCALMOE_TEST_DEVICE=$DEVICE step "Triton kernels and parity suite on CUDA" 80 python3 -m pytest -q -p no:cacheprovider \
    --junitxml="$OUT/tests_cuda.xml" tests/test_triton_kernels.py tests/test_parity.py

[ -n "$BUILD" ] && wait "$BUILD"
cat /tmp/make_checkpoint.log
step "roofline" 100 python3 benchmarks/gpu_roofline.py --model "$CKPT" --device "$DEVICE" \
    --out "$OUT/gpu_roofline.json" --new-tokens 128 --rounds 2 --concurrency 16 64
step "offload sweep, host store" 50 python3 benchmarks/offload_sweep.py --model "$CKPT" --targets host \
    --policies lru --out "$OUT/offload_sweep.json"
echo "done $(date +%T)"
