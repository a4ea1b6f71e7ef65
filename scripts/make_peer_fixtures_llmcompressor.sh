#!/usr/bin/env bash
# Write the compressed-tensors golden fixtures (tests/fixtures/peer_checkpoints/llmcompressor/)
# with llm-compressor itself, in its own virtualenv outside the repository (CPU torch).
#
#   scripts/make_peer_fixtures_llmcompressor.sh [--venv /tmp/venv-llmc] [--out DIR] [--cases a,b]
#
# The virtualenv gets `torch==2.13.0` (CPU) and `llmcompressor` from PyPI; the driver is
# scripts/peer_llmcompressor.py (tiny random Llama / Qwen2, `oneshot`, save_compressed=True, and
# transformers' logits of the decompressed checkpoint as the reference).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "make_peer_fixtures_llmcompressor.sh: $*" >&2; exit 2; }

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="/tmp/venv-llmc" out="$root/tests/fixtures/peer_checkpoints/llmcompressor" cases=""
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv="${2:?--venv needs a value}"; shift 2 ;;
    --out) out="${2:?--out needs a value}"; shift 2 ;;
    --cases) cases="${2:?--cases needs a value}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done
case "$venv" in "$root"/*) die "--venv must be outside the repository" ;; esac

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import llmcompressor" 2>/dev/null; then
  "$venv/bin/pip" install -q torch==2.13.0
  "$venv/bin/pip" install -q llmcompressor
fi
export TOKENIZERS_PARALLELISM=false
exec "$venv/bin/python" "$root/scripts/peer_llmcompressor.py" --out "$out" --cases "$cases"
