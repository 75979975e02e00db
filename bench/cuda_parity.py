"""CUDA against the CPU on a trained VQ-VAE, each a PASS/FAIL/SKIP line within a stated tolerance:
- the tokens of the same test images encoded in fp32 on the CPU and on the device, after strict_fp32 (cuDNN's TF32
  off, as every script sets it): the two run different convolution algorithms, whose sums differ in the last bits,
  enough to flip a nearest code that was a near tie, and a flip at one scale changes the residual of the scales
  after it, so a small share of tokens may differ; --min_token_agreement is the share that must agree;
- batched against one-by-one decoding on the device under the sampling precision (sample_var.py --decode):
  the largest difference in grey levels (uint8) must be at most --max_decode_diff;
- the VQ-VAE's attention in bf16 on a fused kernel, not SDPA's math fallback (CUDA only).
bench/gpu_check.py runs it as one of its steps; with --device=cpu it compares the CPU with itself (a dry run).

    python bench/cuda_parity.py --vqvae=runs/vqvae_gpu/best.pth --data_dir=data/processed
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find common/


@dataclass
class Config:
    vqvae: str = "runs/vqvae_gpu/best.pth"  # the VQ-VAE checkpoint
    data_dir: str = "data/processed"  # its processed set: the test images are encoded
    images: int = 16  # test images encoded on both devices and decoded both ways
    device: str = "auto"  # the device compared with the CPU
    min_token_agreement: float = 0.995  # share of the fp32 tokens that must be equal on the CPU and the device
    max_decode_diff: int = 4  # grey levels a batched decoding may differ from one image at a time (bf16 on CUDA)


import torch  # noqa: E402

from common.config import DEVICE, at_least, between, check_constants, script_config  # noqa: E402
from common.image_data import ImageSplit, list_classes  # noqa: E402
from common.runtime import pick_device, select_precision, strict_fp32  # noqa: E402
from models.decoding import decode_images  # noqa: E402
from models.vqvae import VQVAE, load_vqvae  # noqa: E402


def validate(cfg: Config) -> None:
    check_constants(cfg, {"images": at_least(2), "device": DEVICE, "min_token_agreement": between(0, 1),
                          "max_decode_diff": at_least(0)})


def report(name: str, ok: bool | None, detail: str) -> None:
    """One check's line, as bench/gpu_check.py reads it: [PASS|FAIL|SKIP] name: detail."""
    print(f"[{'SKIP' if ok is None else 'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)


def token_agreement(cfg: Config, images: torch.Tensor, device: torch.device) -> float:
    """Share of equal tokens when `images` are encoded in fp32 on the CPU and on `device`."""
    tokens = []
    for where in (torch.device("cpu"), device):
        model = load_vqvae(cfg.vqvae, map_location=where).eval()
        with torch.no_grad():
            tokens.append(torch.cat([m.flatten(1).cpu() for m in model.img_to_idx(images.to(where))], dim=1))
    return float((tokens[0] == tokens[1]).double().mean())


def decode_difference(vqvae: VQVAE, images: torch.Tensor, device: torch.device) -> tuple[int, float]:
    """Largest difference (grey levels) and share of differing pixel values between a batched and a one-by-one
    decoding of the images' tokens on `device`, under the precision sample_var.py samples in."""
    with torch.no_grad():
        idx_list = vqvae.img_to_idx(images.to(device))
    with select_precision(device).autocast():
        batched = torch.from_numpy(decode_images(vqvae, idx_list, "batch")).int()
        alone = torch.from_numpy(decode_images(vqvae, idx_list, "one_by_one")).int()
    diff = (batched - alone).abs()
    return int(diff.max()), float((diff > 0).double().mean())


def attention_kernels(vqvae: VQVAE, device: torch.device) -> list[str]:
    """The scaled-dot-product-attention kernels one bf16 VQ-VAE forward pass launches (names from the profiler)."""
    x = torch.zeros(2, 3, vqvae.image_size, vqvae.image_size, device=device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            vqvae.reconstruct(x)
    return sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key and e.key.startswith("aten::_")})


def main(argv: list[str] | None = None) -> None:
    cfg = script_config(Config, argv, validate)
    device = pick_device(cfg.device)
    strict_fp32(device)  # first: with cuDNN's TF32 on, fp32 convolutions would round to a 10-bit mantissa
    vqvae = load_vqvae(cfg.vqvae, map_location=device).eval()
    data = Path(cfg.data_dir)
    split = ImageSplit(data, "test", vqvae.image_size, list_classes(data))
    images = torch.stack([split[i][0] for i in range(min(cfg.images, len(split)))])
    where = f"{len(images)} test images, the CPU against {device}" + (" (itself)" if device.type == "cpu" else "")

    share = token_agreement(cfg, images, device)
    report("fp32 tokens on the CPU and the device", share >= cfg.min_token_agreement,
           f"{100 * share:.3f}% equal (at least {100 * cfg.min_token_agreement:g}%), {where}")
    largest, share_differing = decode_difference(vqvae, images, device)
    report("batched decoding against one by one", largest <= cfg.max_decode_diff,
           f"largest difference {largest} grey level(s) (at most {cfg.max_decode_diff}), "
           f"{100 * share_differing:.3f}% of the pixel values differ, {len(images)} images on {device}")
    if device.type != "cuda":
        report("VQ-VAE attention on a fused kernel", None, "CUDA only")
    else:
        kernels = attention_kernels(vqvae, device)
        report("VQ-VAE attention on a fused kernel", bool(kernels) and not any("math" in k for k in kernels),
               ", ".join(kernels) or "none seen")


if __name__ == "__main__":
    main()
