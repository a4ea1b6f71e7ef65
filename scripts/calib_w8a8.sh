#!/usr/bin/env bash
# msModelSlim-style W8A8 / W8A16 conversion of a float HF model with the bundled calibration
# tool (`python -m calib`), on an Atlas server or any machine with --device-type cpu.
#
#   scripts/calib_w8a8.sh --model-path /models/Qwen2-7B --save-directory /models/Qwen2-7B-w8a8
#                         [--calib-file data.jsonl] [--device-type npu] [--w-bit 8] [--a-bit 8]
#                         [--act-method 1] [--anti-method m2] [--disable-level L0] [--is-dynamic]
#                         [--dry-run] [-- EXTRA CALIB ARGS]
#
# The output directory (quant_model_description.json + quant_model_weights*.safetensors) is
# served by scripts/serve_atlas.sh, by ascend-llm on any backend, and by vLLM-Ascend.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "calib_w8a8.sh: $*" >&2; exit 2; }

model_path="" save_directory="" calib_file="" device_type="npu" w_bit=8 a_bit=8 act_method=1
anti_method="" disable_level="L0" is_dynamic="False" dry_run=0 python="${PYTHON:-python3}"
cann_env="${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/ascend-toolkit}/set_env.sh"
extra=()

while [ $# -gt 0 ]; do
  case "$1" in
    --model-path|--model_path) model_path="${2:?--model-path needs a value}"; shift 2 ;;
    --save-directory|--save_directory) save_directory="${2:?--save-directory needs a value}"; shift 2 ;;
    --calib-file|--calib_file) calib_file="${2:?--calib-file needs a value}"; shift 2 ;;
    --device-type|--device_type) device_type="${2:?--device-type needs a value}"; shift 2 ;;
    --w-bit|--w_bit) w_bit="${2:?--w-bit needs a value}"; shift 2 ;;
    --a-bit|--a_bit) a_bit="${2:?--a-bit needs a value}"; shift 2 ;;
    --act-method|--act_method) act_method="${2:?--act-method needs a value}"; shift 2 ;;
    --anti-method|--anti_method) anti_method="${2:?--anti-method needs a value}"; shift 2 ;;
    --disable-level|--disable_level) disable_level="${2:?--disable-level needs a value}"; shift 2 ;;
    --is-dynamic|--is_dynamic) is_dynamic="True"; shift ;;
    --cann-env) cann_env="${2:?--cann-env needs a value}"; shift 2 ;;
    --python) python="${2:?--python needs a value}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done

[ -n "$model_path" ] || die "--model-path is required"
[ -n "$save_directory" ] || die "--save-directory is required"
case "$device_type" in cpu|cuda|npu) ;; *) die "--device-type must be cpu, cuda or npu, got '$device_type'" ;; esac

cmd=("$python" -m calib --model_path "$model_path" --save_directory "$save_directory")
[ -n "$calib_file" ] && cmd+=(--calib_file "$calib_file")
cmd+=(--device_type "$device_type" --w_bit "$w_bit" --a_bit "$a_bit" --act_method "$act_method")
[ -n "$anti_method" ] && cmd+=(--anti_method "$anti_method")
cmd+=(--disable_level "$disable_level" --is_dynamic "$is_dynamic")
cmd+=("${extra[@]}")

if [ "$dry_run" -eq 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi

if [ "$device_type" = "npu" ] && [ -f "$cann_env" ]; then
  set +u   # CANN's script reads unset variables
  # shellcheck source=/dev/null
  source "$cann_env"
  set -u
fi
exec "${cmd[@]}"
