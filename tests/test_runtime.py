import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.distributed import setup_distributed
from common.runtime import DeviceError, pick_device, rng_state, seed_everything, select_precision, set_rng_state


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
    with pytest.raises(DeviceError, match="'fp8' is not one of auto, bf16, fp16, fp32"):
        select_precision(torch.device("cpu"), "fp8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        pick_device("cuda")


@pytest.fixture
def fake_cuda_card(monkeypatch):
    """Pretend a CUDA card of the given compute capability is present (only the queries select_precision makes)."""
    def install(capability: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: including_emulation or capability >= (8, 0))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100" if capability < (8, 0) else "H200")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # torch's default; restored after the test
    return install


def test_precision_on_pre_ampere_cards_is_fp16_and_bf16_is_refused(fake_cuda_card):
    cuda = torch.device("cuda", 0)
    fake_cuda_card((7, 0))
    auto = select_precision(cuda, "auto")
    assert auto.name == "fp16"
    with pytest.raises(DeviceError, match=r"'bf16' on Tesla V100 \(compute capability 7.0\).*--precision=auto"):
        select_precision(cuda, "bf16")
    assert select_precision(cuda, "fp32").dtype is None


def test_precision_on_ampere_or_newer_is_bf16_and_fp32_means_no_tf32(fake_cuda_card):
    cuda = torch.device("cuda", 0)
    fake_cuda_card((9, 0))
    assert select_precision(cuda, "auto").name == "bf16" and select_precision(cuda, "bf16").name == "bf16"
    assert torch.backends.cudnn.allow_tf32 is False  # the phi convolutions and fp32 encoders stay fp32


def test_rng_state_saves_and_restores_only_this_process_s_gpu(monkeypatch):
    """A run saved on GPU 3 of 8 resumes on a machine with one GPU: one state, restored into the current device."""
    generators = {d: torch.Generator().manual_seed(100 + d) for d in range(8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: generators[device].get_state())
    state = rng_state()
    assert torch.equal(state["cuda"], generators[3].get_state())

    restored = {}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # the only GPU of the resuming machine
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new_state, device: restored.__setitem__(device, new_state))
    set_rng_state(state)
    assert list(restored) == [0] and torch.equal(restored[0], generators[3].get_state())


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


def test_process_group_gets_a_long_timeout_and_its_gpu(monkeypatch):
    """Rank 0 alone writes checkpoints while the others wait: NCCL's 10-minute default would kill a long save."""
    from common import distributed
    calls = []
    monkeypatch.setattr(distributed.torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.torch_dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append({"set_device": device}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    dist = setup_distributed(torch.device("cuda", 0))
    assert dist.device == torch.device("cuda", 1) and (dist.rank, dist.world_size) == (1, 2)
    assert calls == [{"set_device": torch.device("cuda", 1)},
                     {"backend": "nccl", "timeout": distributed.COLLECTIVE_TIMEOUT, "device_id": torch.device("cuda", 1)}]
    assert distributed.COLLECTIVE_TIMEOUT.total_seconds() >= 3600
    calls.clear()
    setup_distributed(torch.device("cpu"))
    assert calls == [{"backend": "gloo", "timeout": distributed.COLLECTIVE_TIMEOUT}]


def test_ddp_keeps_gradients_in_its_buckets_and_does_not_rebroadcast_buffers(monkeypatch):
    from common import distributed
    made = {}

    def ddp(model, device_ids=None, find_unused_parameters=False, gradient_as_bucket_view=False,
            forward_sync_buffers=True):
        made.update(device_ids=device_ids, find_unused_parameters=find_unused_parameters,
                    gradient_as_bucket_view=gradient_as_bucket_view, forward_sync_buffers=forward_sync_buffers)

    monkeypatch.setattr(distributed.nn.parallel, "DistributedDataParallel", ddp)
    distributed.wrap_ddp(torch.nn.Linear(2, 2), torch.device("cuda", 3), find_unused_parameters=True)
    assert made == {"device_ids": [3], "find_unused_parameters": True, "gradient_as_bucket_view": True,
                    "forward_sync_buffers": False}


def test_gpu_presets_leave_the_precision_to_the_card(repo_root):
    """A hard-coded bf16 would be refused on pre-Ampere cards: the presets say auto (bf16 or fp16 + loss scaling)."""
    import json
    presets = sorted((repo_root / "configs").glob("*_gpu.json"))
    assert [p.name for p in presets] == ["sample_gpu.json", "var_finetune_gpu.json", "var_gpu.json", "vqvae_gpu.json",
                                         "vqvae_perceptual_gpu.json"]
    assert {p.name: json.loads(p.read_text())["precision"] for p in presets} == {p.name: "auto" for p in presets}
