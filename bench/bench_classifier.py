"""Training speed of eval_utility.py's classifiers (models/classifier.py): one AdamW step on a batch, per network.

    python bench/bench_classifier.py                      # 64 px, batch 32, every network of ARCHS
    python bench/bench_classifier.py --side=32 --threads=1

Random images already in memory: this times forward + backward + AdamW, not augmentation or PNG decoding.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find common/

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common.config import parse_config  # noqa: E402
from common.runtime import pick_device  # noqa: E402
from models.classifier import ARCHS, Classifier  # noqa: E402
from timing import timed  # noqa: E402


@dataclass
class Config:
    side: int = 64          # image side in pixels
    batch_size: int = 32    # images per step
    num_classes: int = 4    # outputs
    device: str = "auto"    # auto, cpu, cuda, mps
    threads: int = 0        # torch CPU threads; 0 = torch's default
    warmup: int = 2         # untimed steps first
    repeats: int = 5        # timed steps (median reported)
    seed: int = 0           # random images and weights


def main() -> None:
    cfg = parse_config(Config)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    generator = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(cfg.batch_size, 3, cfg.side, cfg.side, generator=generator).to(device)
    labels = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=generator).to(device)
    print(f"device {device}, {torch.get_num_threads()} torch threads, batch {cfg.batch_size} x {cfg.side} px, "
          f"load average {os.getloadavg()[0]:.1f}")
    for arch in ARCHS:
        torch.manual_seed(cfg.seed)
        model = Classifier(cfg.num_classes, arch).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step() -> None:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        seconds = timed(step, device, cfg.warmup, cfg.repeats)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"RESULT {arch}: {cfg.batch_size / seconds:.0f} images/s ({seconds * 1000:.0f} ms per step, "
              f"{params:.1f}M parameters, median of {cfg.repeats})")


if __name__ == "__main__":
    main()
