#!/usr/bin/env bash
# Rebuild the msModelSlim golden fixtures in tests/fixtures/peer_checkpoints/msmodelslim/.
#
# The real tool writes them: a private virtualenv (outside the repository) gets msmodelslim from
# PyPI and a CPU torch, then scripts/peer_msmodelslim.py quantizes tiny random Llama / Qwen2
# models with msModelSlim's classic API on CPU (and one case with the v1 `msmodelslim quant` CLI)
# and saves, per case, the checkpoint, the float and (classic API) the tool's own fake-quant logits
# on a fixed input, and a MANIFEST.json. About 4-5 minutes on 2 cores; ~2 MB in all. tests/quant/test_peer_msmodelslim.py loads every case with our runtime.
#
# Usage: scripts/make_peer_fixtures.sh [case,case,...]     (default: every case)
# Env:   PEER_VENV (default ~/.cache/ascend_llm/peer-msmodelslim-venv), PYTHON (default python3),
#        PEER_FIXTURES_OUT (default tests/fixtures/peer_checkpoints/msmodelslim),
#        MSMODELSLIM_VERSION (default 26.1.0), TORCH_VERSION (default 2.13.0)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEER_VENV:-$HOME/.cache/ascend_llm/peer-msmodelslim-venv}"
OUT="${PEER_FIXTURES_OUT:-$ROOT/tests/fixtures/peer_checkpoints/msmodelslim}"
MSMODELSLIM_VERSION="${MSMODELSLIM_VERSION:-26.1.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[make_peer_fixtures] creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import msmodelslim, torch, transformers, safetensors" 2>/dev/null; then
    echo "[make_peer_fixtures] installing msmodelslim==$MSMODELSLIM_VERSION, torch==$TORCH_VERSION (CPU)"
    "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" "msmodelslim==$MSMODELSLIM_VERSION" transformers safetensors
fi

CASES=()
if [ $# -gt 0 ]; then CASES=(--cases "$1"); fi
"$VENV/bin/python" "$ROOT/scripts/peer_msmodelslim.py" --out "$OUT" "${CASES[@]}"
chmod -R u+rwX,go+rX "$OUT"          # the tool writes its files read-only for the owner
du -sh "$OUT"
