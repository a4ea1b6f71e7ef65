#!/usr/bin/env bash
# Convert the ONNX graphs written by `python -m ascend_llm.export` (prefill.onnx,
# decode.onnx) into MindIR files for MindSpore Lite on Ascend, with MindSpore Lite's
# converter_lite (cloud-side inference package; CANN 7.5 or newer).
#
#   scripts/convert_mslite.sh --onnx-dir DIR [--out-dir DIR] [--graphs prefill,decode]
#                             [--precision-mode preferred_fp32] [--converter PATH]
#                             [--cann-env PATH] [--dry-run] [-- EXTRA CONVERTER ARGS]
#
# For each graph G this runs
#   converter_lite --fmk=ONNX --modelFile=ONNX_DIR/G.onnx --outputFile=OUT_DIR/G
#                  --saveType=MINDIR --optimize=ascend_oriented --configFile=OUT_DIR/ascend_context.ini
# (converter_lite appends .mindir), where ascend_context.ini holds [ascend_context]
# precision_mode (enforce_fp32 | preferred_fp32 | enforce_fp16 | enforce_origin | preferred_optimal).
# Fixed shapes can be pinned with `-- --inputShape="input_ids:1,128;positions:1,128"`.
# --dry-run prints the config and the commands without running them (no converter needed).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "convert_mslite.sh: $*" >&2; exit 2; }

onnx_dir="" out_dir="" graphs="prefill,decode" precision_mode="preferred_fp32" dry_run=0
converter="${CONVERTER_LITE:-converter_lite}"
cann_env="${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/ascend-toolkit}/set_env.sh"
extra=()

while [ $# -gt 0 ]; do
  case "$1" in
    --onnx-dir) onnx_dir="${2:?--onnx-dir needs a value}"; shift 2 ;;
    --out-dir) out_dir="${2:?--out-dir needs a value}"; shift 2 ;;
    --graphs) graphs="${2:?--graphs needs a value}"; shift 2 ;;
    --precision-mode) precision_mode="${2:?--precision-mode needs a value}"; shift 2 ;;
    --converter) converter="${2:?--converter needs a value}"; shift 2 ;;
    --cann-env) cann_env="${2:?--cann-env needs a value}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done

[ -n "$onnx_dir" ] || die "--onnx-dir is required (the --out directory of python -m ascend_llm.export)"
out_dir="${out_dir:-$onnx_dir}"
case "$precision_mode" in
  enforce_fp32|preferred_fp32|enforce_fp16|enforce_origin|preferred_optimal) ;;
  *) die "--precision-mode must be enforce_fp32, preferred_fp32, enforce_fp16, enforce_origin" \
         "or preferred_optimal, got '$precision_mode'" ;;
esac

IFS=',' read -r -a graph_list <<< "$graphs"
for graph in "${graph_list[@]}"; do
  case "$graph" in prefill|decode) ;; *) die "--graphs: unknown graph '$graph' (prefill, decode)" ;; esac
  [ -f "$onnx_dir/$graph.onnx" ] ||
    die "$onnx_dir/$graph.onnx not found; run: python -m ascend_llm.export --model MODEL --out $onnx_dir"
done

config="$out_dir/ascend_context.ini"
config_text="[ascend_context]
precision_mode=$precision_mode"

build_cmd() {
  cmd=("$converter" --fmk=ONNX "--modelFile=$onnx_dir/$1.onnx" "--outputFile=$out_dir/$1"
       --saveType=MINDIR --optimize=ascend_oriented "--configFile=$config" "${extra[@]}")
}

if [ "$dry_run" -eq 1 ]; then
  echo "# $config"
  echo "$config_text"
  for graph in "${graph_list[@]}"; do
    build_cmd "$graph"
    printf '%q ' "${cmd[@]}"
    echo
  done
  exit 0
fi

if [ -f "$cann_env" ]; then
  set +u   # CANN's script reads unset variables
  # shellcheck source=/dev/null
  source "$cann_env"
  set -u
fi
if ! command -v "$converter" > /dev/null 2>&1; then
  echo "convert_mslite.sh: MindSpore Lite's converter '$converter' was not found." >&2
  echo "  It ships in the MindSpore Lite cloud-side inference package for Ascend (not in pip):" >&2
  echo "  unpack it, add PACKAGE/tools/converter/lib to LD_LIBRARY_PATH, then put" >&2
  echo "  PACKAGE/tools/converter/converter on PATH or pass --converter PATH (or set CONVERTER_LITE)." >&2
  echo "  The Python runtime for the converted files is the optional extra: pip install -e .[mslite]" >&2
  exit 3
fi

mkdir -p "$out_dir"
printf '%s\n' "$config_text" > "$config"
for graph in "${graph_list[@]}"; do
  echo "converting $onnx_dir/$graph.onnx -> $out_dir/$graph.mindir" >&2
  build_cmd "$graph"
  "${cmd[@]}"
done
