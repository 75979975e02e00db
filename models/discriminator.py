"""Patch discriminator for the VQ-VAE's adversarial loss (the pix2pix / VQGAN "PatchGAN" layout).

A stack of 4x4 convolutions, stride 2 except the last two, LeakyReLU(0.2): each output logit judges one
overlapping patch of the image (70 px across with 3 layers), so the loss rewards local texture such as speckle,
not global layout. GroupNorm replaces VQGAN's BatchNorm: it normalises each image on its own, so a batch split
over torchrun processes, or real and fake images concatenated into one batch, give the same logits. Its hinge
losses are in models/vqvae_losses.py.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 1, ch: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        self.config = dict(in_channels=in_channels, ch=ch, num_layers=num_layers)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = ch
        for i in range(1, num_layers + 1):
            out = ch * min(2 ** i, 8)
            layers += [nn.Conv2d(width, out, 4, stride=2 if i < num_layers else 1, padding=1, bias=False),
                       nn.GroupNorm(32, out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # DCGAN's init, as pix2pix and VQGAN use
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Images (B, in_channels, H, W) in [-1, 1] -> patch logits (B, 1, h, w)."""
        return self.net(img)

