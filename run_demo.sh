#!/usr/bin/env bash
# The whole pipeline on the built-in synthetic ultrasound phantoms, with the CPU presets.
# Every step resumes: re-running skips what is already done. Outputs go to data/ and runs/.
set -euo pipefail
cd "$(dirname "$0")"

python data_preprocessing/make_phantoms.py --out=data/raw_phantoms
python data_preprocessing/prepare.py --phantom_dir=data/raw_phantoms --out=data/processed
python train_vqvae.py --config=configs/vqvae_cpu.json
python tokenize_multiscale_maps.py --data_dir=data/processed --vqvae=runs/vqvae_cpu/best.pth \
    --out=runs/tokens_cpu/tokens_multiscale_maps.npz --cpu_threads=1
python train_var.py --config=configs/var_cpu.json
python sample_var.py --config=configs/sample_cpu.json
python eval_var.py --samples=runs/samples_cpu --device=cpu --cpu_threads=2
