"""Token maps to uint8 images through the VQ-VAE, batched or one image at a time: how sample_var.py decodes its
samples and eval_var.py its reconstructions, so that both are decoded alike."""
from __future__ import annotations

import numpy as np
import torch

from common.image_data import to_rgb_uint8
from models.vqvae import VQVAE

DECODE_MODES = ("auto", "batch", "one_by_one")


@torch.no_grad()
def decode_one_by_one(vqvae: VQVAE, idx_list: list[torch.Tensor]) -> np.ndarray:
    """Token maps (B, pn, pn) -> uint8 images (B, S, S, 3), each decoded alone: convolution kernels change with the
    batch size, and an image must not depend on the batch it came in."""
    device = next(vqvae.parameters()).device
    return np.concatenate([to_rgb_uint8(vqvae.idx_to_img([m[i:i + 1].to(device) for m in idx_list]))
                           for i in range(len(idx_list[0]))])


@torch.no_grad()
def decode_images(vqvae: VQVAE, idx_list: list[torch.Tensor], mode: str) -> np.ndarray:
    """Token maps (B, pn, pn) -> uint8 images (B, S, S, 3). 'batch' decodes them in one call: on CUDA the kernels,
    and so the last bits of an image, may depend on the batch size (docs/5_sample.md gives the measured difference),
    but a GPU decodes a batch many times faster than its images one at a time. 'auto' takes 'batch' on CUDA and
    'one_by_one' elsewhere, where batching gains little."""
    device = next(vqvae.parameters()).device
    if mode == "one_by_one" or (mode == "auto" and device.type != "cuda"):
        return decode_one_by_one(vqvae, idx_list)
    return to_rgb_uint8(vqvae.idx_to_img([m.to(device) for m in idx_list]))
