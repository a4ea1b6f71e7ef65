#!/usr/bin/env bash
# Start the ascend-llm OpenAI-compatible server on an Atlas server (Ascend NPUs).
#
#   scripts/serve_atlas.sh --model /models/Qwen2-7B-w8a8 [--quantization ascend] [--tp 8]
#                          [--port 8000] [--metrics-port 8001] [--dry-run] [-- EXTRA SERVER ARGS]
#
# Sources the CANN environment (set_env.sh) when present, pins the visible NPUs
# (ASCEND_RT_VISIBLE_DEVICES), sets the HCCL variables tensor parallelism needs, and runs
# `python -m ascend_llm.server.api_server` in the foreground. Logs go to --log-dir:
# rank0.log (this process, also echoed to the terminal), ascend/ (CANN plogs, one per device
# process), and ASCEND_LLM_LOG_DIR tells tensor-parallel worker ranks where to write rank<N>.log.
# --device cpu runs the same command on the CPU backend (for testing the script itself).
set -euo pipefail

header() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

usage() {
  header
  cat <<'TXT'
Options:
  --model PATH          model directory or alias (required)
  --quantization NAME   e.g. ascend, wint8, wint4 (default: auto-detect from the checkpoint)
  --tp N                tensor-parallel size (default: 8)
  --host ADDR           bind address (default: 0.0.0.0)
  --port N              HTTP port (default: 8000)
  --metrics-port N      also serve /metrics on this port
  --device NAME         npu | cpu | auto (default: npu)
  --devices LIST        ASCEND_RT_VISIBLE_DEVICES (default: 0..tp-1)
  --log-dir DIR         log directory (default: ./logs)
  --cann-env FILE       CANN set_env.sh (default: $ASCEND_TOOLKIT_HOME/set_env.sh or
                        /usr/local/Ascend/ascend-toolkit/set_env.sh)
  --python EXE          Python interpreter (default: $PYTHON or python3)
  --dry-run             print the environment and the exact command, then exit
TXT
}

die() { echo "serve_atlas.sh: $*" >&2; exit 2; }

model="" quantization="" tp=8 host="0.0.0.0" port=8000 metrics_port="" device="npu" devices=""
log_dir="./logs" dry_run=0 python="${PYTHON:-python3}"
cann_env="${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/ascend-toolkit}/set_env.sh"
extra=()

while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="${2:?--model needs a value}"; shift 2 ;;
    --quantization) quantization="${2:?--quantization needs a value}"; shift 2 ;;
    --tp|--tensor-parallel-size) tp="${2:?--tp needs a value}"; shift 2 ;;
    --host) host="${2:?--host needs a value}"; shift 2 ;;
    --port) port="${2:?--port needs a value}"; shift 2 ;;
    --metrics-port) metrics_port="${2:?--metrics-port needs a value}"; shift 2 ;;
    --device) device="${2:?--device needs a value}"; shift 2 ;;
    --devices) devices="${2:?--devices needs a value}"; shift 2 ;;
    --log-dir) log_dir="${2:?--log-dir needs a value}"; shift 2 ;;
    --cann-env) cann_env="${2:?--cann-env needs a value}"; shift 2 ;;
    --python) python="${2:?--python needs a value}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done

[ -n "$model" ] || die "--model is required"
[[ "$tp" =~ ^[1-9][0-9]*$ ]] || die "--tp must be a positive integer, got '$tp'"
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"
if [ -z "$devices" ]; then
  devices="$(seq -s, 0 $((tp - 1)))"
fi

if [ -f "$cann_env" ] && [ "$dry_run" -eq 0 ]; then
  set +u   # CANN's script reads unset variables
  # shellcheck source=/dev/null
  source "$cann_env"
  set -u
fi

envs=(
  "ASCEND_RT_VISIBLE_DEVICES=$devices"
  "HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}"
  "HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-1200}"
  "HCCL_BUFFSIZE=${HCCL_BUFFSIZE:-200}"
  "HCCL_OP_EXPANSION_MODE=${HCCL_OP_EXPANSION_MODE:-AIV}"
  "ASCEND_PROCESS_LOG_PATH=$log_dir/ascend"
  "ASCEND_LLM_LOG_DIR=$log_dir"
)

cmd=("$python" -m ascend_llm.server.api_server --model "$model" --device "$device"
     --tensor-parallel-size "$tp" --host "$host" --port "$port")
[ -n "$quantization" ] && cmd+=(--quantization "$quantization")
[ -n "$metrics_port" ] && cmd+=(--metrics-port "$metrics_port")
cmd+=("${extra[@]}")

if [ "$dry_run" -eq 1 ]; then
  if [ -f "$cann_env" ]; then echo "source $cann_env"; fi
  for kv in "${envs[@]}"; do echo "export $kv"; done
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi

mkdir -p "$log_dir/ascend"
export "${envs[@]}"
echo "serve_atlas.sh: $(printf '%q ' "${cmd[@]}")" | tee "$log_dir/rank0.log"
"${cmd[@]}" 2>&1 | tee -a "$log_dir/rank0.log"
