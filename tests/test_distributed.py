"""common/distributed.py with a recording stand-in for torch.distributed: which collective each helper calls, with
which reduction, on which ranks; the environment read; the DDP settings on a CPU. The real two-process
group under torchrun, where mutmut cannot see it (e2e)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from common import distributed
from common.distributed import DistContext, setup_distributed, wrap_ddp


class FakeDist:
    """torch.distributed as far as DistContext uses it; records each call."""

    ReduceOp = torch.distributed.ReduceOp

    def __init__(self, initialized: bool = True) -> None:
        self.calls: list[tuple] = []
        self.initialized = initialized

    def barrier(self) -> None:
        self.calls.append(("barrier",))

    def all_reduce(self, tensor: torch.Tensor, op: object) -> None:
        self.calls.append(("all_reduce", op))
        tensor.mul_(3)  # stands in for the other processes' share

    def is_initialized(self) -> bool:
        return self.initialized

    def destroy_process_group(self) -> None:
        self.calls.append(("destroy",))

    def init_process_group(self, **kwargs: object) -> None:
        self.calls.append(("init", kwargs))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeDist:
    stand_in = FakeDist()
    monkeypatch.setattr(distributed, "torch_dist", stand_in)
    return stand_in


def test_collectives_run_with_more_than_one_process_and_reduce_as_named(fake: FakeDist) -> None:
    ctx = DistContext(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    assert ctx.enabled and not ctx.is_main
    t = torch.ones(2)
    assert ctx.all_reduce_sum(t) is t and t.tolist() == [3.0, 3.0]
    assert ctx.all_reduce_max(t) is t
    ctx.barrier()
    ctx.cleanup()
    ops = torch.distributed.ReduceOp
    assert fake.calls == [("all_reduce", ops.SUM), ("all_reduce", ops.MAX), ("barrier",), ("barrier",), ("destroy",)]
    fake.calls.clear()
    fake.initialized = False
    ctx.cleanup()  # a group never joined (or already left): nothing to tear down
    assert fake.calls == []


def test_one_process_calls_no_collective_and_prints_on_rank_0_only(fake: FakeDist,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    alone = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    t = torch.ones(2)
    assert alone.all_reduce_max(t) is t and alone.all_reduce_sum(t) is t and t.tolist() == [1.0, 1.0]
    alone.barrier()
    alone.cleanup()
    assert fake.calls == [] and not alone.enabled and alone.is_main
    alone.print("a", 1, sep="-", end="!")
    DistContext(rank=1, world_size=2, local_rank=1, device=torch.device("cpu")).print("never")
    DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu")).print("main")
    assert capsys.readouterr().out == "a-1!main\n"


def test_the_environment_sets_rank_and_an_initialized_group_is_not_joined_again(
        fake: FakeDist, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = setup_distributed(torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.device) == (3, 4, 1, torch.device("cpu"))
    assert fake.calls == []  # FakeDist starts initialized
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(distributed, "pick_device", lambda: torch.device("meta"))
    ctx = setup_distributed()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.device) == (0, 1, 0, torch.device("meta"))
    fake.initialized = False
    assert setup_distributed(torch.device("cpu")).device == torch.device("cpu") and fake.calls == []


def test_ddp_on_a_cpu_gets_no_device_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    made = {}

    def ddp(model, device_ids=None, find_unused_parameters=False, gradient_as_bucket_view=False,
            forward_sync_buffers=True):
        made.update(model=model, device_ids=device_ids, find_unused_parameters=find_unused_parameters,
                    gradient_as_bucket_view=gradient_as_bucket_view, forward_sync_buffers=forward_sync_buffers)
        return "wrapped"

    monkeypatch.setattr(distributed.nn.parallel, "DistributedDataParallel", ddp)
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model, torch.device("cpu")) == "wrapped"
    assert made == {"model": model, "device_ids": None, "find_unused_parameters": False,
                    "gradient_as_bucket_view": True, "forward_sync_buffers": False}


def test_ddp_before_torch_2_13_turns_buffer_sync_off_with_broadcast_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    made = {}

    def ddp(model, device_ids=None, find_unused_parameters=False, gradient_as_bucket_view=False,
            broadcast_buffers=True):  # torch 2.11's signature: no forward_sync_buffers
        made.update(device_ids=device_ids, gradient_as_bucket_view=gradient_as_bucket_view,
                    broadcast_buffers=broadcast_buffers)

    monkeypatch.setattr(distributed.nn.parallel, "DistributedDataParallel", ddp)
    wrap_ddp(torch.nn.Linear(2, 2), torch.device("cuda", 1))
    assert made == {"device_ids": [1], "gradient_as_bucket_view": True, "broadcast_buffers": False}



def test_the_collective_timeout_is_two_hours() -> None:
    assert distributed.COLLECTIVE_TIMEOUT.total_seconds() == 7200


def test_rank_0_flushes_each_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # torchrun pipes stdout: unflushed lines would arrive late, or never if a process dies
    printed = []
    monkeypatch.setattr(distributed, "print", lambda *args, **kwargs: printed.append((args, kwargs)), raising=False)
    DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu")).print("step", 3, end="")
    assert printed == [(("step", 3), {"end": "", "flush": True})]


def test_after_an_error_the_group_is_left_without_a_barrier(fake: FakeDist) -> None:
    ctx = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    ctx.cleanup(finished=False)  # a peer may wait in another collective: a barrier would hang
    assert fake.calls == [("destroy",)]


def test_one_process_on_a_numbered_gpu_makes_it_the_current_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.cuda's per-device calls (the saved random state among them) default to the current device.
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = setup_distributed(torch.device("cuda", 3))
    assert chosen == [torch.device("cuda", 3)] and ctx.device == torch.device("cuda", 3) and not ctx.enabled
    chosen.clear()
    setup_distributed(torch.device("cuda"))  # no number: the current device stays
    assert chosen == []


RANK_0_FAILS = """
import sys, torch, train_var
def train(cfg, dist):
    if dist.rank == 0:  # e.g. the KID probe failing on rank 0 alone, after the group is set up
        raise train_var.TrainVarError("rank 0 failed alone")
    dist.all_reduce_sum(torch.ones(1))  # rank 1 waits for rank 0 in a collective
train_var.train = train
train_var.main(["--device=cpu", "--out_dir=" + sys.argv[1]])
"""


@pytest.mark.e2e
def test_an_error_on_rank_0_alone_ends_both_processes_at_once(repo_root, tmp_path) -> None:
    # Before the fix rank 0 waited in a barrier and rank 1 in an all-reduce, up to the 2-hour collective timeout.
    script = tmp_path / "rank_0_fails.py"
    script.write_text(RANK_0_FAILS)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path / "out")], cwd=repo_root, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(repo_root)})
    assert done.returncode != 0
    assert "error (rank 0): rank 0 failed alone" in done.stderr


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


@pytest.mark.e2e
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
