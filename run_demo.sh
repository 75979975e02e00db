#!/usr/bin/env bash
# The whole pipeline with the CPU presets, then a report page:
#   bash run_demo.sh          the built-in synthetic ultrasound phantoms -> runs/report.html
#   bash run_demo.sh real     the BUSI + HC18 samples in ../shared/us_data -> runs/report_real.html
# Every step resumes: re-running skips what is already done. Outputs go to data/ and runs/.
# Each step's stdout and stderr are shown and appended to runs/logs/<step>.log (runs/logs_real/ for real; a header
# line per run); the first step that fails stops the script with its own exit status, and the last lines say which
# step and which log.
set -euo pipefail
cd "$(dirname "$0")"

case "${1:-phantoms}" in
    phantoms) LOGS=runs/logs ;;
    real) LOGS=runs/logs_real ;;
    *) echo "usage: bash run_demo.sh [phantoms|real]" >&2; exit 2 ;;
esac
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1  # print() reaches the log as it happens, not in blocks

step() {
    local name=$1
    shift
    local log="$LOGS/$name.log"
    printf '\n=== %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >> "$log"
    local status=0
    "$@" 2>&1 | tee -a "$log" || status=$?  # pipefail: the step's status, not tee's
    if ((status != 0)); then
        echo "run_demo.sh: step $name failed (exit status $status); its log: $log" >&2
        exit "$status"
    fi
}

if [ "${1:-phantoms}" = real ]; then
    step prepare python data_preprocessing/prepare.py --recipe=configs/recipe_busi_hc18.json --out=data/processed_real
    step train_vqvae python train_vqvae.py --config=configs/vqvae_real_cpu.json
    step tokenize python tokenize_multiscale_maps.py --data_dir=data/processed_real --vqvae=runs/vqvae_real_cpu/best.pth \
        --out=runs/tokens_real_cpu/tokens_multiscale_maps.npz --cpu_threads=1
    step train_var python train_var.py --config=configs/var_real_cpu.json
    step sample_var python sample_var.py --config=configs/sample_real_cpu.json
    step eval_var python eval_var.py --samples=runs/samples_real_cpu --device=cpu --cpu_threads=2
    step report python report.py --config=configs/report_real_cpu.json
    exit 0
fi
step make_phantoms python data_preprocessing/make_phantoms.py --out=data/raw_phantoms
step prepare python data_preprocessing/prepare.py --phantom_dir=data/raw_phantoms --out=data/processed
step train_vqvae python train_vqvae.py --config=configs/vqvae_cpu.json
step tokenize python tokenize_multiscale_maps.py --data_dir=data/processed --vqvae=runs/vqvae_cpu/best.pth \
    --out=runs/tokens_cpu/tokens_multiscale_maps.npz --cpu_threads=1
step train_var python train_var.py --config=configs/var_cpu.json
step sample_var python sample_var.py --config=configs/sample_cpu.json
step eval_var python eval_var.py --samples=runs/samples_cpu --device=cpu --cpu_threads=2
step report python report.py --out=runs/report.html
