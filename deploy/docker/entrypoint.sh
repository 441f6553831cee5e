#!/usr/bin/env bash
# The image's entry point: `localmoe serve` configured from environment variables, ours (LOCALMOE_*) or
# text-generation-inference's names for the same settings, so a TGI deployment's env block carries over.
# Arguments given to the container are appended (a flag given twice: the last one wins).
#
#   ours                             TGI's              localmoe serve flag
#   LOCALMOE_MODEL                   MODEL_ID           --model (unset: the built-in model)
#   LOCALMOE_SERVED_MODEL_NAME                          --served-model-name
#   LOCALMOE_REVISION                REVISION           --revision
#   LOCALMOE_DTYPE                   DTYPE              --dtype
#   LOCALMOE_QUANTIZATION            QUANTIZE           --quantization
#   LOCALMOE_HOST (0.0.0.0)                             --host
#   LOCALMOE_PORT (8000)             PORT               --port
#   LOCALMOE_MAX_NUM_SEQS            MAX_BATCH_SIZE     --max-num-seqs
#   LOCALMOE_MAX_MODEL_LEN           MAX_TOTAL_TOKENS   --max-model-len
#   LOCALMOE_MAX_NUM_BATCHED_TOKENS  MAX_BATCH_PREFILL_TOKENS  --max-num-batched-tokens
#   LOCALMOE_TENSOR_PARALLEL_SIZE    NUM_SHARD          --tensor-parallel-size
#   LOCALMOE_CONFIG                                     --config (a config.yaml, e.g. from a ConfigMap)
#   LOCALMOE_SHUTDOWN_TIMEOUT                           --shutdown-timeout
#   LOCALMOE_KV_CACHE_MEMORY, LOCALMOE_GPU_MEMORY_UTILIZATION, LOCALMOE_MAX_WAITING_REQUESTS,
#   LOCALMOE_EXPERT_CACHE_SIZE, LOCALMOE_EXPERT_CACHE_MEMORY, LOCALMOE_LOG_LEVEL: the flag of the same name
#   LOCALMOE_ARGS                                       more flags, split on spaces
# LOCALMOE_API_KEY is read by `localmoe serve` itself; HF_TOKEN / HF_HOME by huggingface_hub.
#
# LOCALMOE_CPU_TARGET (set from the image's CPU_TARGET build argument) is read by `localmoe serve` itself: on a CPU
# without what the kernels built for it assume, it logs what is missing and takes the next target or the PyTorch
# paths (/v1/stats/performance: cpu_kernels).
set -euo pipefail

args=(serve --host "${LOCALMOE_HOST:-0.0.0.0}" --port "${LOCALMOE_PORT:-${PORT:-8000}}")

flag() {  # flag --name VALUE: appended when VALUE is not empty
    if [ -n "$2" ]; then args+=("$1" "$2"); fi
}
flag --model "${LOCALMOE_MODEL:-${MODEL_ID:-}}"
flag --served-model-name "${LOCALMOE_SERVED_MODEL_NAME:-}"
flag --revision "${LOCALMOE_REVISION:-${REVISION:-}}"
flag --dtype "${LOCALMOE_DTYPE:-${DTYPE:-}}"
flag --quantization "${LOCALMOE_QUANTIZATION:-${QUANTIZE:-}}"
flag --max-num-seqs "${LOCALMOE_MAX_NUM_SEQS:-${MAX_BATCH_SIZE:-}}"
flag --max-model-len "${LOCALMOE_MAX_MODEL_LEN:-${MAX_TOTAL_TOKENS:-}}"
flag --max-num-batched-tokens "${LOCALMOE_MAX_NUM_BATCHED_TOKENS:-${MAX_BATCH_PREFILL_TOKENS:-}}"
flag --tensor-parallel-size "${LOCALMOE_TENSOR_PARALLEL_SIZE:-${NUM_SHARD:-}}"
flag --config "${LOCALMOE_CONFIG:-}"
flag --shutdown-timeout "${LOCALMOE_SHUTDOWN_TIMEOUT:-}"
flag --kv-cache-memory "${LOCALMOE_KV_CACHE_MEMORY:-}"
flag --gpu-memory-utilization "${LOCALMOE_GPU_MEMORY_UTILIZATION:-}"
flag --max-waiting-requests "${LOCALMOE_MAX_WAITING_REQUESTS:-}"
flag --expert-cache-size "${LOCALMOE_EXPERT_CACHE_SIZE:-}"
flag --expert-cache-memory "${LOCALMOE_EXPERT_CACHE_MEMORY:-}"
flag --log-level "${LOCALMOE_LOG_LEVEL:-}"
if [ -n "${LOCALMOE_ARGS:-}" ]; then
    read -r -a extra <<< "$LOCALMOE_ARGS"
    args+=("${extra[@]}")
fi

exec localmoe "${args[@]}" "$@"
