"""Timing and peak memory, shared by the benchmarks (each puts bench/ on sys.path by being run from it)."""
from __future__ import annotations

import resource
import statistics
import time
from typing import Callable

import torch


def timed_once(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of fn in seconds, waiting for the GPU to finish it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of fn in seconds over repeats calls, after warmup untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed_once(fn, device) for _ in range(repeats))


def peak_memory_mib(device: torch.device) -> float:
    """torch.cuda.max_memory_allocated on CUDA, the process's maximum resident set size elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
