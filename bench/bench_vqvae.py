"""VQ-VAE throughput: training images/s (forward + backward + AdamW step, the loss of train_vqvae.py),
peak memory, and tokenization images/s (img_to_idx). Synthetic images, so no data set is needed.

    python bench/bench_vqvae.py                                   # the CPU preset's model (configs/vqvae_cpu.json)
    python bench/bench_vqvae.py --image_size=256 --ch=160 --z_channels=32 --vocab_size=2048 \
        --ch_mult=1,1,2,2,4 --num_res_blocks=2 --scales=1,2,3,4,5,6,8,10,13,16 --batch_size=32   # the GPU preset's
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

from common.config import parse_config  # noqa: E402
from common.runtime import pick_device, select_precision  # noqa: E402
from models.vqvae import VQVAE  # noqa: E402
from models.vqvae_losses import recon_loss  # noqa: E402


@dataclass
class Config:
    image_size: int = 64  # side of the synthetic images
    vocab_size: int = 512  # codebook entries
    z_channels: int = 16  # width of a code vector
    ch: int = 32  # base width of encoder and decoder
    ch_mult: tuple[int, ...] = (1, 1, 2, 2)  # width multiplier per resolution
    num_res_blocks: int = 1  # residual blocks per resolution
    scales: tuple[int, ...] = (1, 2, 3, 4, 6, 8)  # token map sides
    batch_size: int = 16  # training batch
    eval_batch_size: int = 64  # tokenization batch
    warmup: int = 2  # untimed iterations first
    iters: int = 10  # timed iterations
    device: str = "auto"  # auto | cpu | cuda | mps
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (the quantizer always runs fp32)
    cpu_threads: int = 1  # torch CPU threads (0 = torch's default); 1 as the CPU preset: 2 threads crawl on a busy 2-core box
    seed: int = 0  # seeds the weights and the synthetic images


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth random grey images in [-1, 1] (upsampled noise), three equal channels like the processed set."""
    low = torch.rand(n, 1, max(2, size // 8), max(2, size // 8), generator=gen)
    grey = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (grey * 2 - 1).expand(-1, 3, -1, -1).contiguous()


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Print and return training and tokenization images/s and the training step's peak memory."""
    cfg = parse_config(Config, argv)
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    device = pick_device(cfg.device)
    precision = select_precision(device, cfg.precision)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = VQVAE(vocab_size=cfg.vocab_size, z_channels=cfg.z_channels, ch=cfg.ch, ch_mult=cfg.ch_mult,
                  num_res_blocks=cfg.num_res_blocks, scales=cfg.scales).to(device)
    if model.image_size != cfg.image_size:
        raise SystemExit(f"error: image_size {cfg.image_size} does not fit the model ({model.image_size})")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = precision.make_scaler()
    train_batch = images(cfg.batch_size, cfg.image_size, gen).to(device)
    eval_batch = images(cfg.eval_batch_size, cfg.image_size, gen).to(device)
    print(f"VQ-VAE {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {cfg.image_size}px, scales "
          f"{cfg.scales}, {precision.name} on {device} ({torch.get_num_threads()} CPU threads)")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    for i in range(cfg.warmup + cfg.iters):
        if i == cfg.warmup:
            synchronize(device)
            start = time.perf_counter()
        with precision.autocast():
            out = model(train_batch)
        loss = recon_loss(out.rec, train_batch, "mean") + out.vq_loss  # train_vqvae.py's default reduction
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    synchronize(device)
    train_ips = cfg.iters * cfg.batch_size / (time.perf_counter() - start)
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        peak = f"peak GPU memory allocated {peak_gib:.2f} GiB"
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        peak = f"peak process RSS {peak_gib:.2f} GiB"

    model.eval()
    with torch.no_grad():
        for i in range(cfg.warmup + cfg.iters):
            if i == cfg.warmup:
                synchronize(device)
                start = time.perf_counter()
            with precision.autocast():
                model.img_to_idx(eval_batch)
        synchronize(device)
    token_ips = cfg.iters * cfg.eval_batch_size / (time.perf_counter() - start)

    print(f"training: {train_ips:.1f} images/s (batch {cfg.batch_size}); {peak}")
    print(f"tokenization: {token_ips:.1f} images/s (batch {cfg.eval_batch_size})")
    return {"train_images_per_s": train_ips, "tokenize_images_per_s": token_ips, "peak_gib": peak_gib}


if __name__ == "__main__":
    main()
