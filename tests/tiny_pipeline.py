"""A tiny pipeline for the sampling and evaluation tests: a random 32 px VQ-VAE (scales 1,2,3,4) tokenizes a
processed set of random grey images (3 classes; 4 train, 2 val, 5 test images each), and a random 2-block VAR is
saved the way train_var.py saves one. No training: only the plumbing and the numbers' definitions are tested."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import tokenize_multiscale_maps
from common.io import atomic_torch_save, file_sha256
from common.plotting import save_image
from models.var import VAR
from models.vqvae import VQVAE

CLASSES = ["breast", "heart", "liver"]
SCALES = (1, 2, 3, 4)
SIZE = 32  # 4 x 2^3: the VQ-VAE downsamples 8 times
SPLIT_SIZES = {"train": 4, "val": 2, "test": 5}


def tiny_vqvae(path: Path, seed: int) -> VQVAE:
    torch.manual_seed(seed)
    vqvae = VQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, scales=SCALES).eval()
    torch.nn.init.normal_(vqvae.quantizer.embedding.weight, std=0.5)  # spread codes: images use many tokens
    atomic_torch_save({"model": vqvae.state_dict(), "model_config": vqvae.config, "config": {"image_size": SIZE}}, path)
    return vqvae


def build(root: Path) -> dict[str, Path]:
    tiny_vqvae(root / "vqvae.pth", seed=0)
    rng = np.random.default_rng(0)
    for split, n in SPLIT_SIZES.items():
        for label, name in enumerate(CLASSES):
            for i in range(n):
                # A bright blob on a class-dependent background: classes differ, images of a class vary.
                grey = rng.normal(40 + 60 * label, 25, (SIZE, SIZE))
                y, x = rng.integers(8, SIZE - 8, 2)
                grey[y - 5:y + 5, x - 5:x + 5] += 80
                image = np.clip(grey, 0, 255).astype(np.uint8)
                save_image(np.repeat(image[..., None], 3, axis=2), root / "processed" / split / name / f"img{i}.png")
    tokens = root / "tokens" / "tokens_multiscale_maps.npz"
    tokenize_multiscale_maps.main([f"--data_dir={root / 'processed'}", f"--vqvae={root / 'vqvae.pth'}",
                                   f"--out={tokens}", "--num_workers=0", "--device=cpu"])
    torch.manual_seed(1)
    var = VAR(vocab_size=32, z_channels=8, scales=SCALES, num_classes=len(CLASSES), depth=2, embed_dim=32, num_heads=2)
    var.init_weights(init_adaln_gamma=0.5, init_head=1.0)  # larger gains than the reference: classes differ
    atomic_torch_save({"model": var.state_dict(), "model_config": var.config, "classes": CLASSES,
                       "vqvae_path": str(root / "vqvae.pth"), "vqvae_sha256": file_sha256(root / "vqvae.pth"),
                       "tokens_path": str(tokens)}, root / "var.pth")
    return {"root": root, "var": root / "var.pth", "vqvae": root / "vqvae.pth", "tokens": tokens,
            "data": root / "processed"}
