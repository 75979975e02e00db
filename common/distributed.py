"""torchrun-aware helpers: rank, world size, main-process-only printing; a no-op without torchrun."""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from common.runtime import pick_device

# Other ranks wait in a barrier while rank 0 alone writes checkpoints (GBs, fsynced), plots and sample grids;
# NCCL's default of 10 minutes would end the run.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes in place (returned for chaining); identity when not distributed."""
        if self.enabled:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Maximum over all processes in place (returned for chaining); identity when not distributed."""
        if self.enabled:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
        return tensor

    def cleanup(self, finished: bool = True) -> None:
        """Leave the process group. After a finished run every process first waits for the others: tearing gloo down
        under a peer's pending work can abort it. After an error there is no barrier: a peer may be waiting in
        another collective, never joins it, and the barrier would hang until the collective timeout; the peers
        waiting on this process then fail at once (gloo) or are ended by torchrun when it exits."""
        if self.enabled and torch_dist.is_initialized():
            if finished:
                torch_dist.barrier()
            torch_dist.destroy_process_group()


def setup_distributed(device: torch.device | None = None) -> DistContext:
    """Join the process group that torchrun describes in the environment (nccl on CUDA, gloo otherwise).

    `device` is the device picked for a single-process run; under torchrun on CUDA each process takes
    cuda:LOCAL_RANK instead.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = device if device is not None else pick_device()
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and device.index is not None:
        # The current device is what torch.cuda's per-device calls (the saved random state among them) default to:
        # without this, one process on cuda:N would save and restore GPU 0's generator.
        torch.cuda.set_device(device)
    if world_size > 1:
        if not torch_dist.is_initialized():
            if device.type == "cuda":  # device_id: NCCL binds this process's communicator to its GPU at once
                torch_dist.init_process_group(backend="nccl", timeout=COLLECTIVE_TIMEOUT, device_id=device)
            else:
                torch_dist.init_process_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def wrap_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel with gradients kept in its buckets (no second copy) and no per-step re-broadcast of
    buffers: the models' buffers are constants (masks, scale indices) that every process builds identically."""
    ddp = nn.parallel.DistributedDataParallel
    # torch 2.13 added forward_sync_buffers; before it, broadcast_buffers=False is the same switch.
    no_buffer_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                      else "broadcast_buffers")
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=find_unused_parameters, gradient_as_bucket_view=True, **{no_buffer_sync: False})
