"""Can any similarity to the training images flag an augmented copy? A fresh augmented copy of a training image
(tokenize_multiscale_maps.py's augmentation), encoded and decoded by the VQ-VAE, is compared with its own source's
reconstruction under the very same crop, shift and mirroring (the best alignment any rule could find), and the
held-out (val) reconstructions with their nearest training reconstruction. Where the first similarity is not
clearly above the second, no rule that thresholds similarity to training images at the held-out level can flag
augmented copies without flagging held-out images (eval_var.py's planted augmented control).

    python bench/bench_augmented_copies.py --data_dir=data/processed --vqvae=runs/vqvae_cpu/best.pth

Similarity: Pearson correlation of the grey images block-averaged to `side` px (small shifts and the VQ-VAE's
texture do not count), or at full size.
"""
from __future__ import annotations

import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find common/


@dataclass
class Config:
    data_dir: str = "data/processed"  # processed set (prepare.py)
    vqvae: str = "runs/vqvae_cpu/best.pth"
    per_class: int = 10  # training images augmented per class
    seed: int = 0
    threads: int = 0


import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from common.config import parse_config  # noqa: E402
from common.image_data import (AUG_HFLIP_CLASSES, AUG_MAX_SHIFT, AUG_MIN_AREA, augment, list_classes,  # noqa: E402
                               list_split, read_image, to_rgb_uint8, to_tensor)
from models.vqvae import load_vqvae  # noqa: E402


def unit_rows(images: np.ndarray, side: int) -> np.ndarray:
    """Grey images (N, S, S, 3) block-averaged to side x side, as zero-mean unit vectors (N, side * side)."""
    grey = [np.array(Image.fromarray(im.astype(np.float32).mean(-1)).resize((side, side), Image.Resampling.BOX))
            for im in images]
    v = np.stack(grey).reshape(len(images), -1)
    v = v - v.mean(axis=1, keepdims=True)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-8)


def main() -> None:
    config = parse_config(Config)
    if config.threads:
        torch.set_num_threads(config.threads)
    vqvae = load_vqvae(config.vqvae)
    size, classes = vqvae.image_size, list_classes(config.data_dir)

    @torch.no_grad()
    def reconstruct(images: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([to_rgb_uint8(vqvae.reconstruct(torch.stack([to_tensor(x) for x in images[i:i + 32]])))
                               for i in range(0, len(images), 32)])

    def augmented(image: np.ndarray, path: Path, label: int) -> np.ndarray:
        rng = np.random.default_rng([config.seed, 2, zlib.crc32(str(path).encode())])  # the same draw for both
        return augment(image, rng, AUG_MIN_AREA, AUG_MAX_SHIFT, classes[label] in AUG_HFLIP_CLASSES)

    train_paths, train_labels = list_split(config.data_dir, "train", classes)
    val_paths, _ = list_split(config.data_dir, "val", classes)
    train = [read_image(p, size) for p in train_paths]
    train_recon, val_recon = reconstruct(train), reconstruct([read_image(p, size) for p in val_paths])
    rng = np.random.default_rng(config.seed)
    picked = np.concatenate([rng.permutation(np.flatnonzero(train_labels == c))[:config.per_class]
                             for c in range(len(classes))])
    copies = reconstruct([augmented(train[i], train_paths[i], train_labels[i]) for i in picked])
    aligned = np.stack([augmented(train_recon[i], train_paths[i], train_labels[i]) for i in picked])
    print(f"{len(picked)} augmented training images, {len(val_recon)} val images; {size} px VQ-VAE {config.vqvae}")
    print(f"{'side':>5} {'copy vs its aligned source':>28} {'val vs nearest train':>22}   (mean, 5th-95th percentile)")
    for side in (16, 32, size):
        own = (unit_rows(copies, side) * unit_rows(aligned, side)).sum(axis=1)
        held = (unit_rows(val_recon, side) @ unit_rows(train_recon, side).T).max(axis=1)
        print(f"{side:>5} {own.mean():>10.3f} [{np.percentile(own, 5):.3f}, {np.percentile(own, 95):.3f}]"
              f"{held.mean():>12.3f} [{np.percentile(held, 5):.3f}, {np.percentile(held, 95):.3f}]")


if __name__ == "__main__":
    main()
