#!/usr/bin/env bash
# Golden data for compressed-tensors' transform_config <-> our online_hadamard
# (tests/fixtures/ct_transform/): this repository's converter writes a rotated tiny Llama
# (W8A8 static, online Hadamard block 32 before every down_proj) as compressed-tensors, then
# scripts/peer_ct_transform.py, in the llm-compressor virtualenv, checks its config with
# compressed-tensors' pydantic models, records transformers + compressed-tensors logits for it,
# applies compressed-tensors' own Hadamard to fixed inputs and runs llm-compressor's SpinQuant R4.
#
#   scripts/make_ct_transform_fixtures.sh [--venv /tmp/venv-llmc]
set -euo pipefail

die() { echo "make_ct_transform_fixtures.sh: $*" >&2; exit 2; }
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="/tmp/venv-llmc"
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv="${2:?--venv needs a value}"; shift 2 ;;
    *) die "unknown option: $1" ;;
  esac
done
[ -x "$venv/bin/python" ] || die "no virtualenv at $venv: run scripts/make_peer_fixtures_llmcompressor.sh first"
py="${PYTHON:-$root/.venv/bin/python}"
out="$root/tests/fixtures/ct_transform"
converted="$out/converted_llama_w8a8_r4"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
rm -rf "$converted"
(cd "$root" && PYTHONPATH="$root" "$py" - "$work" "$converted" <<'PY'
import sys
from pathlib import Path
from calib.convert.cli import convert
from tests.quant.hadamard_writer import write_rotated_checkpoint
from tests.tiny_models import make_tiny_model_dir
work, dst = Path(sys.argv[1]), Path(sys.argv[2])
src = write_rotated_checkpoint(make_tiny_model_dir(work / "float", "llama"), work / "rotated", 32)
convert("ascendv1", "compressed-tensors", src, dst)
PY
)
rm -f "$converted/convert_report.json"
export TOKENIZERS_PARALLELISM=false
"$venv/bin/python" "$root/scripts/peer_ct_transform.py" --out "$out" --converted "$converted"
