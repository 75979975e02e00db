"""Speed and memory of the two networks for one configuration: VQ-VAE and VAR training steps (forward + backward),
VAR sampling time per image with and without the KV cache, and peak memory.

    python bench/bench_models.py                                             # small default, CPU, < 1 minute
    python bench/bench_models.py --depth=16 --embed_dim=1024 --num_heads=16 --vqvae_ch=160 \
        --scales=1,2,3,4,5,6,8,10,13,16 --batch_size=32                      # reference-sized, on a GPU

Random weights and random tokens: only time and memory are measured. Peak memory is
torch.cuda.max_memory_allocated on CUDA and the process's maximum resident set size elsewhere.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find common/, models/


@dataclass
class Config:
    depth: int = 4                    # VAR blocks
    embed_dim: int = 256              # VAR width
    num_heads: int = 4                # VAR attention heads
    num_classes: int = 6              # classes (plus the null class)
    vocab_size: int = 2048            # codebook size
    z_channels: int = 32              # codebook vector size
    scales: tuple[int, ...] = (1, 2, 3, 4, 6, 8)  # token-map sides, image = 16 x the last (reference: 1,2,3,4,5,6,8,10,13,16)
    vqvae_ch: int = 32                # VQ-VAE base width (the public checkpoint uses 160)
    batch_size: int = 4               # images per training step
    sample_batch: int = 4             # images per sampling call
    cfg_scale: float = 1.5            # classifier-free guidance during sampling
    top_k: int = 900                  # top-k during sampling
    warmup: int = 1                   # untimed repetitions first
    repeats: int = 2                  # timed repetitions (median reported)
    device: str = "auto"              # auto, cpu, cuda, mps
    precision: str = "auto"           # auto (bf16 on capable CUDA, fp32 on CPU), bf16, fp16, fp32
    seed: int = 0                     # weights and tokens


import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common.config import parse_config  # noqa: E402
from common.runtime import pick_device, seed_everything, select_precision  # noqa: E402
from models.var import VAR  # noqa: E402
from models.vqvae import VQVAE  # noqa: E402
from timing import peak_memory_mib, timed  # noqa: E402


def main() -> None:
    cfg = parse_config(Config)
    device = pick_device(cfg.device)
    precision = select_precision(device, cfg.precision)
    seed_everything(cfg.seed)
    vqvae = VQVAE(vocab_size=cfg.vocab_size, z_channels=cfg.z_channels, ch=cfg.vqvae_ch, scales=cfg.scales).to(device)
    var = VAR(vocab_size=cfg.vocab_size, z_channels=cfg.z_channels, scales=cfg.scales, num_classes=cfg.num_classes,
              depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads).to(device)
    size = vqvae.image_size
    b = cfg.batch_size
    images = torch.rand(b, 3, size, size, device=device) * 2 - 1
    labels = torch.randint(0, cfg.num_classes, (b,), device=device)
    idx = [torch.randint(0, cfg.vocab_size, (b, pn, pn), device=device) for pn in cfg.scales]
    targets = torch.cat([t.flatten(1) for t in idx], dim=1)
    print(f"device {device}, precision {precision.name}, image {size}px, scales {cfg.scales} (L={targets.shape[1]})")
    print(f"VQ-VAE ch={cfg.vqvae_ch}: {sum(p.numel() for p in vqvae.parameters()) / 1e6:.2f}M parameters; "
          f"VAR depth={cfg.depth} width={cfg.embed_dim}: {sum(p.numel() for p in var.parameters()) / 1e6:.2f}M parameters")

    def vqvae_step() -> None:
        with precision.autocast():
            out = vqvae(images)
            loss = F.mse_loss(out.rec.float(), images) + out.vq_loss
        loss.backward()
        vqvae.zero_grad(set_to_none=True)

    def var_step() -> None:
        with precision.autocast():
            x = vqvae.idx_to_var_input(idx)
            logits = var(labels, x)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        var.zero_grad(set_to_none=True)

    vqvae.train()
    var.train()
    t_vq = timed(vqvae_step, device, cfg.warmup, cfg.repeats)
    print(f"VQ-VAE training step (batch {b}):  {t_vq * 1000:9.1f} ms  ({b / t_vq:.1f} img/s)")
    t_var = timed(var_step, device, cfg.warmup, cfg.repeats)
    print(f"VAR training step (batch {b}):     {t_var * 1000:9.1f} ms  ({b / t_var:.1f} img/s)")

    vqvae.eval()
    var.eval()
    sample_labels = torch.arange(cfg.sample_batch, device=device) % cfg.num_classes
    seeds = list(range(cfg.seed, cfg.seed + cfg.sample_batch))
    for use_cache in (True, False):
        def sample() -> None:
            with precision.autocast():
                var.generate(vqvae, sample_labels, cfg=cfg.cfg_scale, top_k=cfg.top_k, seeds=seeds,
                             use_cache=use_cache)

        t = timed(sample, device, cfg.warmup, cfg.repeats)
        label = "with KV cache" if use_cache else "without cache"
        print(f"VAR sampling {label} (batch {cfg.sample_batch}): {t / cfg.sample_batch * 1000:9.1f} ms per image")
    print(f"peak memory: {peak_memory_mib(device):.0f} MiB "
          f"({'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'max resident set size'})")


if __name__ == "__main__":
    main()
