"""bench/gpu_check.sh --dry_run: the GPU check at tiny sizes on the CPU, so that it keeps working while no GPU is lent."""
import os
import subprocess
import sys
from pathlib import Path

STEPS = ("make_phantoms", "prepare", "train_vqvae", "tokenize", "train_var", "sample_var", "eval_var",
         "bench_sampling", "bench_models", "bench_features")


def test_gpu_check_dry_run_runs_every_step_and_reports_each_check(repo_root: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}  # the interpreter running the tests, venv or not
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--dry_run", f"--work_dir={tmp_path}"], cwd=repo_root,
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    summary = out[out.index("== steps"):]
    for step in STEPS:
        assert f"\n{step} " in summary, step
    [run_dir] = tmp_path.iterdir()
    assert sorted(p.stem for p in (run_dir / "logs").iterdir()) == sorted(STEPS)
    assert "[PASS] fp32 tokens identical on the CPU and CUDA: 100.000% of the tokens" in out
    for cuda_only in ("no host sync in the VAR training step", "VQ-VAE attention on a fused kernel",
                      "VAR depth-16 step at batch 32 under 40 GB", "torchrun on 2 GPUs, resumed on 1"):
        assert f"[SKIP] {cuda_only}" in out
    assert "TFLOP per step" in out and "tokenization:" in out and "RESULT features:" in out
    assert (run_dir / "runs" / "samples" / "eval" / "metrics.csv").is_file()
