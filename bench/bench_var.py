"""Training throughput of the VAR transformer: tokens/s, images/s and peak memory of one optimizer step.

    python bench/bench_var.py                                   # depth 4 on the CPU
    python bench/bench_var.py --depth=16 --batch_size=64        # GPU box (bf16 by default there)

Times the training step of train_var.py (teacher input from the VQ-VAE quantizer, forward, cross-entropy over
every token of every scale, backward, clipping, AdamW) on random tokens. The VQ-VAE's encoder and decoder play no
part in it, so a narrow one stands in for the real one.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find common/


@dataclass
class Config:
    depth: int = 4  # transformer blocks
    embed_dim: int = 0  # width (0 = 64 * depth)
    num_heads: int = 0  # attention heads (0 = depth)
    batch_size: int = 16  # images per step
    vocab_size: int = 2048  # codebook size
    z_channels: int = 32  # codebook vector size
    scales: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # token-map sides (the reference's for 256 px)
    num_classes: int = 6  # classes
    warmup_steps: int = 2  # untimed steps first
    steps: int = 5  # timed steps
    device: str = "auto"  # auto, cpu, cuda, mps
    precision: str = "auto"  # auto (bf16 on capable CUDA, fp32 on CPU), bf16, fp16, fp32
    seed: int = 0  # random tokens and weights
    compile: bool = False  # torch.compile the forward, as train_var.py --compile=true (the warmup steps compile)
    peak_tflops: float = 0.0  # the device's dense peak in this precision, for model FLOP utilisation (0 = not shown; H100/H200 bf16: 989)


import resource  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from common.config import parse_config  # noqa: E402
from common.runtime import pick_device, seed_everything, select_precision  # noqa: E402
from common.training import param_groups  # noqa: E402
from models.vqvae import VQVAE  # noqa: E402
from train_var import Config as TrainConfig  # noqa: E402
from train_var import build_var, scale_of_position, token_losses  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print and return the step time, tokens/s, peak memory and FLOPs of one training step."""
    cfg = parse_config(Config, argv)
    device = pick_device(cfg.device)
    precision = select_precision(device, cfg.precision)
    seed_everything(cfg.seed)
    vqvae = VQVAE(vocab_size=cfg.vocab_size, z_channels=cfg.z_channels, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                  scales=cfg.scales).to(device).eval().requires_grad_(False)
    train_cfg = TrainConfig(depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads)
    model = build_var(train_cfg, vqvae.config, cfg.num_classes).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, train_cfg.weight_decay), lr=1e-4, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
                                  fused=device.type == "cuda")
    scaler = precision.make_scaler()
    forward = torch.compile(model) if cfg.compile else model
    scale_ids = scale_of_position(tuple(cfg.scales), device)
    tokens_per_image = scale_ids.numel()
    idx_list = [torch.randint(0, cfg.vocab_size, (cfg.batch_size, pn, pn), device=device) for pn in cfg.scales]
    labels = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device)

    def step(forward: nn.Module = forward) -> None:
        x_in = vqvae.idx_to_var_input(idx_list)
        target = torch.cat([m.flatten(1) for m in idx_list], dim=1)
        with precision.autocast():
            logits = forward(labels, x_in)
        loss, _ = token_losses(logits, target, scale_ids, len(cfg.scales), 0.0)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(cfg.warmup_steps):
        step()
    with FlopCounterMode(display=False) as counter:  # forward and backward: matmuls, attention, convolutions
        step(model)  # eager: the counter sees no aten calls inside compiled code
    flops = counter.get_total_flops()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(cfg.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / cfg.steps
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        memory = f"peak GPU memory allocated {peak_gib:.2f} GiB"
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        memory = f"peak process RSS {peak_gib:.2f} GiB"
    achieved_tflops = flops / seconds / 1e12
    mfu = achieved_tflops / cfg.peak_tflops if cfg.peak_tflops > 0 else None
    n_params = sum(p.numel() for p in model.parameters())
    print(f"VAR depth {cfg.depth} ({model.config['embed_dim']} wide, {model.config['num_heads']} heads, "
          f"{n_params / 1e6:.1f}M parameters), batch {cfg.batch_size} x {tokens_per_image} tokens, vocab "
          f"{cfg.vocab_size}, on {device} ({precision.name}, {torch.get_num_threads()} CPU threads"
          + (", compiled)" if cfg.compile else ")"))
    print(f"step {seconds * 1000:.1f} ms: {cfg.batch_size * tokens_per_image / seconds:,.0f} training tokens/s, "
          f"{cfg.batch_size / seconds:.2f} images/s; {memory}")
    print(f"{flops / 1e12:.4g} TFLOP per step (forward + backward), {achieved_tflops:.4g} TFLOP/s"
          + (f" = {100 * mfu:.1f}% model FLOP utilisation of {cfg.peak_tflops:g} TFLOP/s" if mfu is not None else ""))
    return {"step_seconds": seconds, "tokens_per_s": cfg.batch_size * tokens_per_image / seconds,
            "peak_gib": peak_gib, "tflop_per_step": flops / 1e12, "mfu": mfu}


if __name__ == "__main__":
    main()
