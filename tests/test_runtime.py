"""common/runtime.py: which device 'auto' takes and with which index, every
precision's name, autocast and loss scaling, TF32 left alone off CUDA, the deterministic settings, the numpy seed of
a seed past 2^32, and the numpy Gaussian cache in the saved random state."""
from __future__ import annotations

import os
import random
import resource
import sys

import numpy as np
import pytest
import torch

from common.runtime import (DeviceError, Precision, make_deterministic, pick_device, reuse_freed_memory, rng_state,
                            seed_everything, select_precision, set_rng_state)


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


def test_auto_device_order_and_local_rank(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pick_device("auto") == torch.device("cuda", 3)
    monkeypatch.delenv("LOCAL_RANK")
    assert pick_device() == torch.device("cuda", 0)
    assert pick_device("cuda:1") == torch.device("cuda", 1)  # a name is taken as given when CUDA is there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("mps")
    assert pick_device("cpu") == torch.device("cpu")  # a name wins over what auto would take
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"device 'cuda:2' was asked for but CUDA is not available.*--device=cpu"):
        pick_device("cuda:2")


def test_every_precision_name_autocast_and_scaler() -> None:
    cpu = torch.device("cpu")
    for name, dtype, scaled in (("bf16", torch.bfloat16, False), ("fp16", torch.float16, True), ("fp32", None, False)):
        precision = select_precision(cpu, name)
        assert precision == Precision(cpu, dtype) and precision.name == name
        assert precision.make_scaler().is_enabled() is scaled
    with select_precision(cpu, "fp16").autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
    with select_precision(cpu, "fp32").autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert select_precision(torch.device("mps"), "auto").name == "fp16"
    for bad in ("", "AUTO", "float32"):
        with pytest.raises(DeviceError, match=f"precision {bad!r} is not one of auto, bf16, fp16, fp32"):
            select_precision(cpu, bad)


def test_tf32_is_left_alone_off_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    select_precision(torch.device("cpu"), "auto")
    assert torch.backends.cudnn.allow_tf32 is True


def test_make_deterministic_settings(monkeypatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        make_deterministic()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.benchmark is False
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a setting of the user's is kept
        make_deterministic()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_seed_past_two_to_the_32_seeds_numpy_with_its_remainder() -> None:
    seed = 2**32 + 5
    seed_everything(seed)
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(seed)
    np.random.seed(5)
    torch.manual_seed(seed)
    assert draws == (random.random(), np.random.rand(), torch.rand(1).item())


def test_rng_state_keeps_numpy_s_cached_gaussian() -> None:
    seed_everything(7)
    np.random.standard_normal()  # the Box-Muller pair leaves its second value cached
    state = rng_state()
    assert state["numpy"]["has_gauss"] == 1 and state["numpy"]["key"].dtype == torch.int64
    want = (np.random.standard_normal(), np.random.standard_normal(), random.random(), torch.rand(2))
    np.random.seed(0)
    random.seed(0)
    torch.manual_seed(0)
    set_rng_state(state)
    got = (np.random.standard_normal(), np.random.standard_normal(), random.random(), torch.rand(2))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])


def test_refusal_messages_end_with_the_way_out(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError) as err:
        pick_device("cuda")
    assert str(err.value) == ("device 'cuda' was asked for but CUDA is not available on this machine; "
                              "use --device=auto or --device=cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bool(including_emulation))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    with pytest.raises(DeviceError) as err:
        select_precision(torch.device("cuda", 0), "bf16")
    assert str(err.value) == ("precision 'bf16' on Tesla T4 (compute capability 7.5): bf16 needs 8.0 or newer and "
                              "would only be emulated here; use --precision=auto (fp16 with loss scaling on this card) "
                              "or fp16")


def test_a_cpu_run_s_random_state_resumes_on_a_gpu_machine(monkeypatch) -> None:
    seed_everything(3)
    state = rng_state()  # no CUDA here: no "cuda" entry
    assert "cuda" not in state
    want = torch.rand(3)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *args: calls.append(args))
    set_rng_state(state)  # the GPU's stream is left as it is
    assert calls == [] and torch.equal(torch.rand(3), want)


def test_a_cpu_device_and_only_a_cpu_device_keeps_freed_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import common.runtime as runtime
    calls = []
    monkeypatch.setattr(runtime, "reuse_freed_memory", lambda: calls.append(1) or True)
    assert pick_device("cpu") == torch.device("cpu") and calls == [1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda", 0) and calls == [1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_freed_large_blocks_are_reused_without_page_faults() -> None:
    assert reuse_freed_memory() is True
    faults = []
    for _ in range(10):
        torch.ones(1 << 24)  # 64 MB, touched, then freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(1 << 24)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    # glibc's default maps every such block afresh: one fault per 4 KiB page, 16384 each time. With the setting the
    # heap first grows to hold it (a few rounds), then the same pages serve every later request.
    assert faults[-3:] == [0, 0, 0], faults
