"""run_demo.sh: every step runs in the interpreter PYTHON names (a venv that is not activated), in order."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.mark.e2e
def test_every_step_runs_in_the_interpreter_that_PYTHON_names(repo_root: Path, tmp_path: Path) -> None:
    shutil.copy(repo_root / "run_demo.sh", tmp_path)  # the script works in its own folder: logs land in tmp_path
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "stub_python"
    stub.write_text(f'#!/bin/sh\necho "$1" >> {calls}\n')
    stub.chmod(0o755)
    no_python = tmp_path / "bin"  # a PATH without python: the script must not fall back to it
    no_python.mkdir()
    env = {**os.environ, "PYTHON": str(stub), "PATH": f"{no_python}:/usr/bin:/bin"}
    done = subprocess.run(["bash", "run_demo.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert calls.read_text().split() == [
        "data_preprocessing/make_phantoms.py", "data_preprocessing/prepare.py", "train_vqvae.py",
        "tokenize_multiscale_maps.py", "train_var.py", "sample_var.py", "eval_var.py", "eval_utility.py", "report.py"]
    assert (tmp_path / "runs" / "logs" / "report.log").is_file()
