import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.distributed import setup_distributed
from common.runtime import pick_device, rng_state, seed_everything, select_precision, set_rng_state


def test_device_and_precision_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    device = pick_device("auto")
    assert device.type == "cpu"
    precision = select_precision(device)
    assert precision.dtype is None and precision.name == "fp32"
    assert not precision.make_scaler().is_enabled()
    bf16 = select_precision(device, "bf16")
    with bf16.autocast():
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16


def test_precision_names_checked(monkeypatch):
    with pytest.raises(ValueError, match="not one of"):
        select_precision(torch.device("cpu"), "fp8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pick_device("cuda")


def test_seed_and_rng_state_round_trip(tmp_path):
    seed_everything(123)
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    torch.save(state, tmp_path / "rng.pth")
    set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_distributed_is_a_no_op_without_torchrun(monkeypatch, capsys):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    dist = setup_distributed(torch.device("cpu"))
    assert (dist.rank, dist.world_size, dist.is_main, dist.enabled) == (0, 1, True, False)
    t = torch.ones(2)
    assert torch.equal(dist.all_reduce_sum(t), torch.ones(2))
    dist.print("hello")
    dist.barrier()
    dist.cleanup()
    assert capsys.readouterr().out == "hello\n"


def test_two_processes_under_torchrun(tmp_path, repo_root):
    script = tmp_path / "worker.py"
    script.write_text(
        "import torch\n"
        "from common.distributed import setup_distributed\n"
        "dist = setup_distributed(torch.device('cpu'))\n"
        "total = dist.all_reduce_sum(torch.tensor([float(dist.rank + 1)]))\n"
        "dist.print(f'world={dist.world_size} total={total.item():.0f}')\n"
        "dist.cleanup()\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True, text=True, cwd=repo_root, env={"PYTHONPATH": str(repo_root), "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("world=2 total=3") == 1  # summed over both ranks, printed by rank 0 only
