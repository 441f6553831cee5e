#!/usr/bin/env bash
# Fetch, on a machine with network, the wheels LocalMoE needs beyond what the GPU machine's image holds (its Python
# 3.12 has torch, triton, transformers, tokenizers, safetensors, sentencepiece, protobuf, numpy, pyyaml, typer,
# rich, prometheus-client, httpx, psutil and pytest, and no network). `from localmoe import LLM` also imports gguf
# and xgrammar (with pydantic); the HTTP server's packages (fastapi, uvicorn, openai) are not needed by
# benchmarks/gpu_check.sh. The wheels land in .whl/ (ignored by git; about 15 MB), which the device run carries.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
platforms=()
for n in 28 27 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl gguf==0.19.0 xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 pydantic==2.13.4 pydantic-core==2.46.4 \
    annotated-types==0.7.0 typing-inspection==0.4.2
du -sh .whl
