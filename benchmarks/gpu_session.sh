#!/usr/bin/env bash
# Everything the CUDA backend needs a GPU for, in one call: the Triton kernel tests compiled on the
# GPU (tests/ops/triton), the engine on cuda against the CPU reference with CUDA graphs
# (tests/e2e/test_cuda_backend.py), and benchmarks/bench_cuda.py. Each step has its own time cap,
# so one stuck step cannot eat the others'; logs and the results JSON go to $OUT when it is set
# (the device tool's folder that comes back), else to benchmarks/results/.
#
# Usage, from the repository root of a machine with a CUDA GPU:
#   bash benchmarks/gpu_session.sh [tests|kernels|decode|offline|all]
#     tests    the two test files only
#     kernels  tests, then bench_cuda.py --skip-decode (GEMMs and memory-bound kernels; the default)
#     decode   bench_cuda.py: kernels, then batch-1 decode of the 7B model per method (no offline rows)
#     offline  bench_cuda.py: kernels, HF and bf16 batch-1 decode, then the 256-request offline rows
#     all      tests, then the whole of bench_cuda.py (longer than one 10-minute device call)
# Caps in seconds: KERNEL_TESTS_S (default 150), ENGINE_TESTS_S (150), BENCH_S (330). The results
# JSON is named cuda_<gpu>_<date>_<mode>.json and rewritten after every row.
#
# Packages the GPU image lacks travel as wheels: run `bash scripts/fetch_gpu_wheels.sh` here first;
# with .whl/ present they are installed into /tmp/site before anything runs.
set -uo pipefail

mode="${1:-kernels}"
case "$mode" in tests|kernels|decode|offline|all) ;;
  *) echo "gpu_session.sh: unknown mode '$mode' (tests|kernels|decode|offline|all)" >&2; exit 2 ;;
esac
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

echo "== environment"
"$py" - <<'EOF' || exit 1
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_session.sh: no CUDA device is visible (torch.cuda.is_available() is False)")
import triton
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs; "
      f"torch {torch.__version__}, triton {triton.__version__}, python {sys.version.split()[0]}")
EOF

if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_session.sh: installing the wheels in .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

status=0
run_step() {   # run_step NAME CAP_S COMMAND...: time-capped, logged to $out/NAME.log, summary on stdout
  local name="$1" cap="$2"
  shift 2
  echo "== $name (cap ${cap}s): $*"
  local start=$SECONDS
  timeout "$cap" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$out/$name.log"
  echo "== $name: rc=$rc in $((SECONDS - start))s$([ "$rc" = 124 ] && echo ' (hit its cap)')"
  [ "$rc" = 0 ] || status=1
}

bench=("$py" benchmarks/bench_cuda.py --out "$out" --tag "$mode")
case "$mode" in tests|kernels|all)
  run_step gpu_kernel_tests "${KERNEL_TESTS_S:-150}" "$py" -m pytest -q -rfE --maxfail=25 -p no:cacheprovider tests/ops/triton
  run_step gpu_engine_tests "${ENGINE_TESTS_S:-150}" "$py" -m pytest -q -rfE --maxfail=25 -p no:cacheprovider \
    tests/e2e/test_cuda_backend.py ;;
esac
case "$mode" in
  kernels) run_step bench_cuda "${BENCH_S:-330}" "${bench[@]}" --skip-decode ;;
  decode) run_step bench_cuda "${BENCH_S:-330}" "${bench[@]}" --offline-requests 0 ;;
  offline) run_step bench_cuda "${BENCH_S:-330}" "${bench[@]}" --methods bf16 ;;
  all) run_step bench_cuda "${BENCH_S:-330}" "${bench[@]}" ;;
esac
exit "$status"
