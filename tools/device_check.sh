#!/usr/bin/env bash
# The cross-backend check for a GPU backend (tools/device_check.py says what each step does).
#
#   tools/device_check.sh prepare [--python-version 3.12] [--checkpoint T --draft D]
#       here, with the full TVM and nvcc: CPU reference and CUDA artifacts plus a runtime-only TVM,
#       all under .device_check/ (keep it out of git: echo /.device_check/ >> .git/info/exclude)
#   tools/device_check.sh run
#       on the GPU machine, in one call, with .device_check/ carried along: CUDA against the CPU
#       reference, then the benchmark; prints the figures and writes .device_check/report.json
#   PYTHON=~/.cache/mlc_spec/tvm-vulkan/venv/bin/python tools/device_check.sh both --device vulkan [--work DIR]
#       both halves here with tools/build_tvm_vulkan.sh's TVM, on this machine's Vulkan device (lavapipe)
#   tools/device_check.sh --cpu-only [--work DIR]
#       both halves on this machine, the CPU standing in for CUDA (tests/test_cross_backend.py runs it)
set -euo pipefail
cd "$(dirname "$0")/.."

step=${1:-run}
case "$step" in
  prepare|run|both) shift ;;
  --cpu-only) step=both ;;
  *) echo "usage: $0 prepare|run|both|--cpu-only [options]" >&2; exit 2 ;;
esac
work=.device_check
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  if [[ ${args[i]} == --work ]]; then work=${args[i + 1]}; fi
done

# Only the runtime-only TVM (and mlc_spec beside it) may be imported by the run step, and
# TVM's CUDA runtime library needs libcudart.so.13: the CUDA toolkit's, or a pip package's.
run_step() {
  local cudart
  cudart=$(find /usr/local /opt -name libcudart.so.13 -print -quit 2>/dev/null || true)
  PYTHONPATH="$work/site" LD_LIBRARY_PATH="${cudart:+$(dirname "$cudart"):}${LD_LIBRARY_PATH:-}" PYTHONUNBUFFERED=1 \
    "${PYTHON:-python3}" tools/device_check.py run "$@"
}

case "$step" in
  prepare) "${PYTHON:-python3}" tools/device_check.py prepare --work "$work" "${args[@]}" ;;
  run) run_step --work "$work" "${args[@]}" ;;
  both)
    "${PYTHON:-python3}" tools/device_check.py prepare --work "$work" "${args[@]}"
    run_step --work "$work" "${args[@]}" ;;
esac
