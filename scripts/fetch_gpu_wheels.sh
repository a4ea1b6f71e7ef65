#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels benchmarks/gpu_session.sh needs on the GPU
# machine's image that it lacks: that image has torch, triton, transformers, safetensors,
# tokenizers, pytest and the rest, but not gguf (imported by the model loader). The GPU machine
# reaches no package index, so the wheels travel with the working tree (device tool: carry .whl).
# Usage: bash scripts/fetch_gpu_wheels.sh [python version of the GPU image, default 3.12]
set -euo pipefail

pyver="${1:-3.12}"
cd "$(dirname "$0")/.."
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
gguf_version="$("$py" -c 'import importlib.metadata as m; print(m.version("gguf"))' 2>/dev/null || true)"
mkdir -p .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  -d .whl "gguf${gguf_version:+==$gguf_version}"
ls -l .whl
