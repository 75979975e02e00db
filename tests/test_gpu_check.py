"""bench/gpu_check.sh --quick --dry_run: the GPU check at tiny sizes on the CPU, so that it keeps working while no
GPU is lent; its plan must fit the lent machine's 7 minutes; a step that overruns is killed and the summary says so."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import cuda_parity  # noqa: E402
import gpu_check  # noqa: E402

STEPS = ("make_phantoms", "prepare", "train_vqvae", "tokenize", "train_var", "sample_var", "eval_var",
         "cuda_parity", "bench_var", "bench_vqvae", "bench_sampling", "bench_features")


@pytest.mark.e2e
def test_quick_dry_run_runs_every_step_reports_each_check_and_its_plan_fits_7_minutes(repo_root: Path,
                                                                                      tmp_path: Path) -> None:
    no_wheels = tmp_path / "no_wheels"
    no_wheels.mkdir()
    env = {**os.environ, "PYTHON": sys.executable}  # the interpreter running the tests, venv or not
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--quick", "--dry_run", f"--work_dir={tmp_path / 'work'}",
                           f"--log_dir={tmp_path / 'out'}", f"--wheels={no_wheels}"], cwd=repo_root,
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    required = int(re.search(r"^plan: (\d+) s estimated for the required steps", out, re.MULTILINE).group(1))
    assert required <= 420
    summary = out[out.rindex("== steps"):]
    for step in STEPS:
        assert re.search(rf"^{step} +OK ", summary, re.MULTILINE), step
    assert re.search(r"^wheels +SKIP .*no wheels in", summary, re.MULTILINE)
    assert re.search(r"^bench_var_compiled +SKIP", summary, re.MULTILINE)
    [run_dir] = (tmp_path / "work").iterdir()
    assert sorted(p.stem for p in (run_dir / "logs").iterdir()) == sorted(STEPS)
    assert "[PASS] fp32 tokens on the CPU and the device: 100.000% equal" in out
    assert "[PASS] batched decoding against one by one" in out
    for cuda_only in ("no host sync in the VAR training step", "VQ-VAE attention on a fused kernel",
                      "VAR depth-16 step at batch 32 under 40 GB"):
        assert f"[SKIP] {cuda_only}" in out
    assert "TFLOP per step" in out and "tokenization:" in out and "RESULT features:" in out
    assert (run_dir / "runs" / "samples" / "eval" / "metrics.csv").is_file()
    # What the caller takes back: the whole log and the last summary.
    assert (tmp_path / "out" / "summary.txt").read_text() == (run_dir / "summary.txt").read_text()
    assert "== make_phantoms" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_a_step_past_its_timeout_is_killed_and_the_summary_is_written_at_once(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "out").mkdir()
    report = gpu_check.Report(tmp_path, [tmp_path / "out"], {})
    slow = gpu_check.Step("slow", ["-c", "import time; print('started', flush=True); time.sleep(60)"], 1, 1)
    assert not report.run(slow, timeout_s=2)
    assert "started" in (tmp_path / "logs" / "slow.log").read_text()  # what it printed before the kill is kept
    assert re.search(r"^slow +TIMEOUT +\d", (tmp_path / "out" / "summary.txt").read_text(), re.MULTILINE)
    quick = gpu_check.Step("quick", ["-c", "print('[FAIL] a check: its detail')"], 1, 1)
    assert report.run(quick, timeout_s=30)  # the process succeeded; its check line is read as a failed check
    assert "[FAIL] a check: its detail" in (tmp_path / "summary.txt").read_text() and not report.ok


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5),
                                        ("NVIDIA H100 NVL", 835.5), ("NVIDIA H200", 989.4),
                                        ("NVIDIA H200 NVL", 835.5), ("NVIDIA H100 something new", None)])
def test_the_data_sheet_peak_is_looked_up_by_the_exact_card_name(name: str, peak: float | None) -> None:
    assert gpu_check.datasheet_peak(name) == peak


@pytest.mark.e2e
def test_cuda_parity_turns_tf32_off_before_it_compares_tokens(tiny_pipeline: dict, monkeypatch, capsys) -> None:
    # With cuDNN's TF32 still on, the fp32 tokens on CUDA would differ from the CPU's for a reason the check is not about.
    order = []
    monkeypatch.setattr(cuda_parity, "strict_fp32", lambda device: order.append("strict_fp32"))
    real = cuda_parity.token_agreement
    monkeypatch.setattr(cuda_parity, "token_agreement", lambda *args: order.append("tokens") or real(*args))
    cuda_parity.main([f"--vqvae={tiny_pipeline['vqvae']}", f"--data_dir={tiny_pipeline['data']}", "--device=cpu",
                      "--images=2"])
    assert order == ["strict_fp32", "tokens"]
    assert "[PASS] fp32 tokens on the CPU and the device: 100.000% equal" in capsys.readouterr().out


def test_bench_var_s_figures_are_read_from_its_cuda_output_and_set_against_both_peaks() -> None:
    output = ("VAR depth 16 (1024 wide, 16 heads, 310.3M parameters), batch 32 x 680 tokens, vocab 2048, on cuda:0 (bf16)\n"
              "step 152.0 ms: 143,158 training tokens/s, 210.53 images/s; peak GPU memory allocated 21.37 GiB\n"
              "45.6 TFLOP per step (forward + backward), 300 TFLOP/s\n")
    assert gpu_check.bench_figures(output) == {"step_ms": 152.0, "peak_gib": 21.37, "tflops": 300.0}
    words = gpu_check.utilisation(300.0, gpu_check.Config(), "NVIDIA H100 80GB HBM3")
    assert words == ("300 TFLOP/s: 30.3% of the 989.4 TFLOP/s data-sheet peak, "
                     "38.0% of a measured 790 TFLOP/s matmul")
    assert "unknown peak for 'NVIDIA H100 something new'" in gpu_check.utilisation(
        300.0, gpu_check.Config(), "NVIDIA H100 something new")
