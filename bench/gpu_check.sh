#!/usr/bin/env bash
# GPU check (see bench/gpu_check.py): every step's CUDA path on phantoms, throughput, peak memory and the
# GPU-only checks. Run it whenever a GPU is lent; --dry_run runs it at tiny sizes on the CPU.
#
#   bash bench/gpu_check.sh              # a GPU box
#   bash bench/gpu_check.sh --dry_run    # the CPU (the test suite does this)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
args=()
for arg in "$@"; do
    [ "$arg" = "--dry_run" ] && arg="--dry_run=true"  # the scripts' convention is --name=value
    args+=("$arg")
done
"${PYTHON:-python}" bench/gpu_check.py "${args[@]}"  # PYTHON: the interpreter to use (a venv not activated)
