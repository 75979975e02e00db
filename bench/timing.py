"""Timing and peak memory, shared by the benchmarks (each puts bench/ on sys.path by being run from it)."""
from __future__ import annotations

import resource
import statistics
import time
from typing import Callable

import torch


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of fn in seconds, waiting for the GPU to finish each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mib(device: torch.device) -> float:
    """torch.cuda.max_memory_allocated on CUDA, the process's maximum resident set size elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
