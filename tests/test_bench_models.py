"""bench/bench_models.py against a checkout of the reference VAR, at tiny shapes (--dry_run). The checkout is named by
the env var VAR_REFERENCE_REPO (a clone of github.com/FoundationVision/VAR); without it the test skips."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE = os.environ.get("VAR_REFERENCE_REPO", "")


@pytest.mark.e2e
@pytest.mark.skipif(not REFERENCE, reason="no reference checkout: set VAR_REFERENCE_REPO to a clone of "
                                          "github.com/FoundationVision/VAR to compare with it")
def test_bench_models_times_both_on_the_same_weights() -> None:
    out = subprocess.run([sys.executable, str(REPO_ROOT / "bench/bench_models.py"), f"--reference_repo={REFERENCE}",
                          "--dry_run=true", "--device=cpu"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    diff = re.search(r"max \|logit difference\| ours vs reference (\S+)", out.stdout)
    assert diff and float(diff.group(1)) < 1e-4, out.stdout
    rows = re.findall(r"^(training step|sampling)\s+(fp32|bf16)\s+reference .* ratio ours/reference (\d+\.\d+)",
                      out.stdout, re.M)
    assert [(task, precision) for task, precision, _ in rows] == [
        ("training step", "fp32"), ("sampling", "fp32"), ("training step", "bf16"), ("sampling", "bf16")]
    assert all(float(ratio) > 0 for _, _, ratio in rows)


@pytest.mark.e2e
def test_bench_models_rejects_a_folder_that_is_not_the_reference(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPO_ROOT / "bench/bench_models.py"), f"--reference_repo={tmp_path}",
                          "--dry_run=true", "--device=cpu"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "not a checkout of github.com/FoundationVision/VAR" in out.stderr
