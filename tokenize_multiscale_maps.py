"""Encode every image of the processed set into multi-scale token maps with a trained VQ-VAE.

    python tokenize_multiscale_maps.py --vqvae=runs/vqvae/best.pth --out=runs/tokens/tokens_multiscale_maps.npz

Writes the npz described in common/tokens.py (per-scale maps, concatenated sequences, labels, split and
source file of each row, the VQ-VAE checkpoint's sha256 and quantizer config) and classes.json beside it.
Images get the same preprocessing as in VQ-VAE training: the image_size stored in the checkpoint's config.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.checkpoint import CheckpointError, load_checkpoint, require_keys
from common.config import parse_config
from common.image_data import SPLITS, ImageDataError, ImageSplit, list_classes
from common.io import file_sha256
from common.runtime import pick_device, select_precision
from common.tokens import save_tokens
from models.vqvae import load_vqvae


@dataclass
class Config:
    data_dir: str = "data/processed"  # processed set: DATA/{train,val,test}/<class>/*.png
    vqvae: str = "runs/vqvae/best.pth"  # VQ-VAE checkpoint written by train_vqvae.py
    out: str = "runs/tokens/tokens_multiscale_maps.npz"  # token file (classes.json is written beside it)
    batch_size: int = 64  # images encoded at once
    num_workers: int = 2  # DataLoader worker processes
    device: str = "auto"  # auto | cpu | cuda | mps
    cpu_threads: int = 0  # torch CPU threads (0 = torch's default)
    precision: str = "fp32"  # autocast of encoder/decoder: fp32 (tokens independent of the card) | bf16 | fp16 | auto; the quantizer always runs fp32


def checkpoint_image_size(path: Path, model_image_size: int) -> int:
    """The side images were resized to when the VQ-VAE was trained (its saved config), checked against the network."""
    ckpt = load_checkpoint(path)
    require_keys(ckpt, ["model", "model_config", "config"], path)
    image_size = ckpt["config"].get("image_size") if isinstance(ckpt["config"], dict) else None
    if not isinstance(image_size, int):
        raise CheckpointError(f"{path}: its saved config has no image_size (was it written by train_vqvae.py?)")
    if image_size != model_image_size:
        raise CheckpointError(f"{path}: config image_size {image_size} does not fit the network ({model_image_size})")
    return image_size


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(Config, argv)
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        tokenize(cfg)
    except (CheckpointError, ImageDataError) as err:
        raise SystemExit(f"error: {err}") from None


@torch.no_grad()
def tokenize(cfg: Config) -> None:
    vqvae_path, out = Path(cfg.vqvae), Path(cfg.out)
    if out.resolve() == vqvae_path.resolve():
        raise CheckpointError(f"{out}: the output would overwrite the VQ-VAE checkpoint")
    device = pick_device(cfg.device)
    precision = select_precision(device, cfg.precision)
    model = load_vqvae(vqvae_path, map_location=device)
    sha = file_sha256(vqvae_path)
    image_size = checkpoint_image_size(vqvae_path, model.image_size)
    if model.config["vocab_size"] > np.iinfo(np.int16).max + 1:
        raise CheckpointError(f"{vqvae_path}: vocab {model.config['vocab_size']} does not fit the int16 token format")
    classes = list_classes(cfg.data_dir)
    print(f"VQ-VAE {vqvae_path} (sha256 {sha[:12]}...), scales {model.scales}, {image_size}px, {precision.name} on {device}")

    maps: list[list[np.ndarray]] = [[] for _ in model.scales]
    labels, split_names, sources = [], [], []
    roundtrip_error = 0.0
    for split in SPLITS:
        dataset = ImageSplit(cfg.data_dir, split, image_size, classes)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
        for img, label in tqdm(loader, desc=f"tokenizing {split}"):
            img = img.to(device)
            with precision.autocast():
                idx_list = model.img_to_idx(img)
                if not labels:
                    # The tokens must decode to the VQ-VAE's own reconstruction (checked on the first batch).
                    roundtrip_error = (model.idx_to_img(idx_list) - model.reconstruct(img)).abs().max().item()
            for k, idx in enumerate(idx_list):
                maps[k].append(idx.to(torch.int16).cpu().numpy())
            labels.append(label.numpy())
        split_names += [split] * len(dataset)
        sources += [dataset.relative_path(i) for i in range(len(dataset))]
        print(f"{split}: {len(dataset)} images")

    all_maps = [np.concatenate(m) for m in maps]
    save_tokens(out, scales=model.scales, maps=all_maps, labels=np.concatenate(labels), split=split_names,
                source=sources, vqvae_sha256=sha, vqvae_config=model.config, classes=classes)
    length = sum(pn * pn for pn in model.scales)
    used = len(np.unique(all_maps[-1]))
    print(f"wrote {out}: {len(sources)} images x {length} tokens; finest scale uses {used}/{model.config['vocab_size']} "
          f"codes; first-batch decode vs reconstruct max |diff| = {roundtrip_error:.3g}")


if __name__ == "__main__":
    main()
