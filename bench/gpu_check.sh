#!/usr/bin/env bash
# GPU check (see bench/gpu_check.py): every step's CUDA path on phantoms, throughput, peak memory and the
# GPU-only checks. Run it whenever a GPU is lent; --dry_run runs it at tiny sizes on the CPU.
#
#   bash bench/gpu_check.sh --quick --log_dir=$OUT   # a lent machine: at most 7 minutes on one H100
#   bash bench/gpu_check.sh                          # your own GPU box: the full check
#   bash bench/gpu_check.sh --quick --dry_run        # the CPU (the test suite does this)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
args=()
for arg in "$@"; do
    case "$arg" in --dry_run|--quick) arg="$arg=true" ;; esac  # the scripts' convention is --name=value
    args+=("$arg")
done
"${PYTHON:-python}" bench/gpu_check.py "${args[@]}"  # PYTHON: the interpreter to use (a venv not activated)
