#!/usr/bin/env bash
# The whole pipeline with the CPU presets, then a report page:
#   bash run_demo.sh          the built-in synthetic ultrasound phantoms -> runs/report.html
#   bash run_demo.sh real     the BUSI + HC18 samples in ../shared/us_data -> runs/report_real.html
#   bash run_demo.sh real_findings   the same samples, BUSI's finding as the class -> runs/report_real_findings.html
# Every step resumes: re-running skips what is already done. Outputs go to data/ and runs/.
# Each step's stdout and stderr are shown and appended to runs/logs/<step>.log (runs/logs_real/ for real; a header
# line per run); the first step that fails stops the script with its own exit status, and the last lines say which
# step and which log.
set -euo pipefail
cd "$(dirname "$0")"

case "${1:-phantoms}" in
    phantoms) LOGS=runs/logs; DATA=data/processed; PRESET=cpu; AUG=4; REPORT=(--out=runs/report.html) ;;
    real) LOGS=runs/logs_real; DATA=data/processed_real; PRESET=real_cpu; AUG=4; RECIPE=configs/recipe_busi_hc18.json
        REPORT=(--config=configs/report_real_cpu.json) ;;
    real_findings) LOGS=runs/logs_real_findings; DATA=data/processed_real_findings; PRESET=real_findings_cpu; AUG=1
        RECIPE=configs/recipe_busi_findings_hc18.json; REPORT=(--config=configs/report_real_findings_cpu.json) ;;
    *) echo "usage: bash run_demo.sh [phantoms|real|real_findings]" >&2; exit 2 ;;
esac
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1  # print() reaches the log as it happens, not in blocks
PYTHON=${PYTHON:-python}  # the interpreter every step runs in: PYTHON=.venv/bin/python uses a venv not activated

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

if [ "$PRESET" = cpu ]; then
    step make_phantoms "$PYTHON" data_preprocessing/make_phantoms.py --out=data/raw_phantoms
    step prepare "$PYTHON" data_preprocessing/prepare.py --phantom_dir=data/raw_phantoms --out="$DATA"
else
    step prepare "$PYTHON" data_preprocessing/prepare.py --recipe="$RECIPE" --out="$DATA"
fi
step train_vqvae "$PYTHON" train_vqvae.py --config=configs/vqvae_$PRESET.json
# 3 augmented copies per training image, with the VAR presets' doubled epochs: the samples reach held-out layouts
# (issue 25's fourth round, docs/4_var.md); real_findings was not measured with them.
step tokenize "$PYTHON" tokenize_multiscale_maps.py --data_dir="$DATA" --vqvae=runs/vqvae_$PRESET/best.pth \
    --out=runs/tokens_$PRESET/tokens_multiscale_maps.npz --cpu_threads=1 --aug_copies=$AUG
step train_var "$PYTHON" train_var.py --config=configs/var_$PRESET.json
step sample_var "$PYTHON" sample_var.py --config=configs/sample_$PRESET.json
step eval_var "$PYTHON" eval_var.py --samples=runs/samples_$PRESET --device=cpu --cpu_threads=2
step eval_utility "$PYTHON" eval_utility.py --config=configs/utility_$PRESET.json
step report "$PYTHON" report.py "${REPORT[@]}"
