#!/usr/bin/env bash
# Convert msModelSlim and FastDeploy-layout golden fixtures to compressed-tensors with this
# repository's converter, then
# have transformers + compressed-tensors (the llm-compressor virtualenv of
# scripts/make_peer_fixtures_llmcompressor.sh) load each result and record its logits under
# tests/fixtures/peer_checkpoints/converted/<case>/ (kilobytes: logits and a manifest only).
#
#   scripts/make_converted_fixtures.sh [--venv /tmp/venv-llmc] [--cases a,b]
set -euo pipefail

die() { echo "make_converted_fixtures.sh: $*" >&2; exit 2; }
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="/tmp/venv-llmc"
# <tool>/<case> under tests/fixtures/peer_checkpoints/; tool msmodelslim (--from ascendv1) or fastdeploy
cases="msmodelslim/llama_w8a8,msmodelslim/qwen2_w8a8,msmodelslim/llama_w8a8_dynamic,msmodelslim/qwen2_w8a8_dynamic"
cases="$cases,msmodelslim/llama_w8a16,msmodelslim/llama_w8a8_disabled,msmodelslim/qwen2_v1_w8a8"
cases="$cases,msmodelslim/llama_w8a16_g32,msmodelslim/llama_w4a16_g32,msmodelslim/llama_w4a16_g32_asym,msmodelslim/llama_w4a16"
cases="$cases,fastdeploy/llama_wint8,fastdeploy/llama_wint4"
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv="${2:?--venv needs a value}"; shift 2 ;;
    --cases) cases="${2:?--cases needs a value}"; shift 2 ;;
    *) die "unknown option: $1" ;;
  esac
done
[ -x "$venv/bin/python" ] || die "no virtualenv at $venv: run scripts/make_peer_fixtures_llmcompressor.sh first"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
py="$root/.venv/bin/python"
names=""
for entry in ${cases//,/ }; do
  tool="${entry%%/*}" case="${entry#*/}"
  case "$tool" in msmodelslim) from=ascendv1 ;; fastdeploy) from=fastdeploy ;; *) die "unknown tool in $entry" ;; esac
  src="$root/tests/fixtures/peer_checkpoints/$tool/$case"
  names="$names${names:+,}$case"
  (cd "$root" && "$py" -m calib.convert --from "$from" --to compressed-tensors "$src" "$work/$case")
  "$py" -c "import json,sys; from safetensors.torch import load_file; \
r = load_file(sys.argv[1]); json.dump(r['input_ids'].tolist(), open(sys.argv[2], 'w'))" \
    "$src/reference/logits.safetensors" "$work/$case/input_ids.json"
done
"$venv/bin/python" "$root/scripts/peer_transformers_reads_converted.py" --converted "$work" \
  --out "$root/tests/fixtures/peer_checkpoints/converted" --cases "$names" --sources "$cases"
