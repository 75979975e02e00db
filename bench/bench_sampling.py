"""Sampling throughput of sample_var.py's path: VAR token sampling with one seed per image (scale by scale, KV
cache) plus per-image VQ-VAE decoding, in images/s for one batch, with and without guidance and with a teacher prefix.

    python bench/bench_sampling.py                                                # CPU-preset shapes, < 1 minute
    python bench/bench_sampling.py --depth=16 --embed_dim=1024 --num_heads=16 --vqvae_ch=160 --z_channels=32 \
        --vocab_size=2048 --scales=1,2,3,4,5,6,8,10,13,16 --batch_size=64      # GPU preset shapes

Random weights: only time and memory are measured.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find common/, models/


@dataclass
class Config:
    depth: int = 4                    # VAR blocks (CPU preset)
    embed_dim: int = 256              # VAR width
    num_heads: int = 4                # VAR attention heads
    num_classes: int = 6              # classes
    vocab_size: int = 512             # codebook size (CPU preset)
    z_channels: int = 16              # codebook vector size (CPU preset)
    scales: tuple[int, ...] = (1, 2, 3, 4, 6, 8)  # token-map sides (CPU preset: 64 px images)
    vqvae_ch: int = 32                # VQ-VAE base width (CPU preset; the GPU preset uses 160)
    vqvae_ch_mult: tuple[int, ...] = (1, 1, 2, 2)  # VQ-VAE levels (CPU preset; the GPU preset uses 1,1,2,2,4)
    vqvae_res_blocks: int = 1         # VQ-VAE res blocks per level (CPU preset; the GPU preset uses 2)
    batch_size: int = 16              # images per sampling call
    guidance: float = 1.5             # guidance scale of the guided run
    top_k: int = 100                  # top-k filtering
    top_p: float = 0.95               # nucleus filtering
    warmup: int = 1                   # untimed repetitions first
    repeats: int = 3                  # timed repetitions (median reported)
    device: str = "auto"              # auto, cpu, cuda, mps
    precision: str = "auto"           # auto (bf16 on capable CUDA, fp32 on CPU), bf16, fp16, fp32
    cpu_threads: int = 0              # torch CPU threads (0 = torch's default)
    seed: int = 0                     # weights and tokens


import torch  # noqa: E402

from common.config import parse_config  # noqa: E402
from common.runtime import pick_device, seed_everything, select_precision  # noqa: E402
from common.tokens import TokenSet  # noqa: E402
from models.var import VAR  # noqa: E402
from models.vqvae import VQVAE  # noqa: E402
from sample_var import Config as SampleConfig, Job, Point, sample_jobs  # noqa: E402
from timing import peak_memory_mib, timed  # noqa: E402


def main() -> None:
    cfg = parse_config(Config)
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    device = pick_device(cfg.device)
    precision = select_precision(device, cfg.precision)
    seed_everything(cfg.seed)
    vqvae = VQVAE(vocab_size=cfg.vocab_size, z_channels=cfg.z_channels, ch=cfg.vqvae_ch, ch_mult=cfg.vqvae_ch_mult,
                  num_res_blocks=cfg.vqvae_res_blocks, scales=cfg.scales).to(device).eval()
    var = VAR(vocab_size=cfg.vocab_size, z_channels=cfg.z_channels, scales=cfg.scales, num_classes=cfg.num_classes,
              depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads).to(device).eval()
    b = cfg.batch_size
    length = sum(pn * pn for pn in cfg.scales)
    # A token file of b random teachers, for the teacher-prefix run.
    teachers = TokenSet(scales=tuple(cfg.scales), idx=torch.randint(0, cfg.vocab_size, (b, length)).numpy(),
                        labels=(torch.arange(b) % cfg.num_classes).numpy(), split=None, source=None, classes=[],
                        vqvae_sha256="", vqvae_config={})
    knobs = SampleConfig(top_k=cfg.top_k, top_p=cfg.top_p)
    print(f"device {device}, precision {precision.name}, {vqvae.image_size}px, scales {cfg.scales} (L={length}); "
          f"VAR {sum(p.numel() for p in var.parameters()) / 1e6:.2f}M, VQ-VAE "
          f"{sum(p.numel() for p in vqvae.parameters()) / 1e6:.2f}M parameters; batch {b}")
    half = len(cfg.scales) // 2
    runs = [("no guidance (0), NOP", Point(0, 0.0)), (f"guidance {cfg.guidance:g}, NOP", Point(0, cfg.guidance)),
            (f"guidance {cfg.guidance:g}, TP k={half}", Point(half, cfg.guidance))]
    for label, point in runs:
        jobs = [Job(i % cfg.num_classes, 0 if point.k else -1, i if point.k else -1, 0, cfg.seed + i) for i in range(b)]
        seconds = timed(lambda: sample_jobs(var, vqvae, teachers, point, jobs, knobs, precision), device,
                        cfg.warmup, cfg.repeats)
        print(f"{label:<32} {b / seconds:8.1f} images/s  ({seconds * 1000 / b:7.1f} ms per image)")
    # sample_var.py decodes one image at a time (an image must not depend on its batch); batched is the alternative.
    idx = [torch.randint(0, cfg.vocab_size, (b, pn, pn), device=device) for pn in cfg.scales]
    for label, n in (("of which decoding, one at a time", 1), ("decoding batched (comparison)", b)):
        def decode() -> None:
            with precision.autocast():
                for start in range(0, b, n):
                    vqvae.idx_to_img([m[start:start + n] for m in idx])

        seconds = timed(decode, device, cfg.warmup, cfg.repeats)
        print(f"{label:<32} {b / seconds:8.1f} images/s  ({seconds * 1000 / b:7.1f} ms per image)")
    print(f"peak memory: {peak_memory_mib(device):.0f} MiB "
          f"({'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'max resident set size'})")


if __name__ == "__main__":
    main()
