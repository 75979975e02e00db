"""The multi-scale VQ-VAE of VAR: encoder -> quant_conv -> multi-scale quantizer -> post_quant_conv -> decoder."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn

from common.checkpoint import load_model
from models.basic_vae import Decoder, Encoder
from models.quantizer import MultiScaleQuantizer


class VQOutput(NamedTuple):
    rec: torch.Tensor        # (B, 3, H, W) decoder output, not clamped
    vq_loss: torch.Tensor    # scalar
    code_hits: torch.Tensor  # (num_scales, vocab_size) int64
    rec_prefix: torch.Tensor | None = None  # (B, 3, H, W) decode of each image's prefix of scales (forward's prefix_k)


class VQVAE(nn.Module):
    NO_WEIGHT_DECAY = ("quantizer.embedding",)  # the codebook: AdamW never decays it (common/training.py param_groups)

    def __init__(self, vocab_size: int = 2048, z_channels: int = 32, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2, dropout: float = 0.0,
                 beta: float = 0.25, using_znorm: bool = False, phi_ratio: float = 0.5, phi_share: int = 4,
                 scales: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), in_channels: int = 3) -> None:
        super().__init__()
        self.config = dict(vocab_size=vocab_size, z_channels=z_channels, ch=ch, ch_mult=[int(m) for m in ch_mult],
                           num_res_blocks=num_res_blocks, dropout=dropout, beta=beta, using_znorm=using_znorm,
                           phi_ratio=phi_ratio, phi_share=phi_share, scales=[int(s) for s in scales],
                           in_channels=in_channels)
        self.in_channels = in_channels
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(ch, tuple(ch_mult), num_res_blocks, z_channels, in_channels, dropout)
        self.decoder = Decoder(ch, tuple(ch_mult), num_res_blocks, z_channels, in_channels, dropout)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 3, padding=1)
        self.quantizer = MultiScaleQuantizer(vocab_size, z_channels, scales, beta, using_znorm, phi_ratio, phi_share)

    @property
    def scales(self) -> tuple[int, ...]:
        return self.quantizer.scales

    @property
    def image_size(self) -> int:
        return self.quantizer.full_size * self.downsample

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """RGB image (B, 3, H, W) in [-1, 1] -> continuous features f (B, z, h, w) before quantization.
        A grey model (in_channels 1) sees the mean of the three channels: of a grey image, the grey itself."""
        if self.in_channels == 1:
            img = img.mean(1, keepdim=True)
        return self.quant_conv(self.encoder(img))

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Quantized features -> RGB image (B, 3, H, W), not clamped. A grey model's one channel is repeated: its
        images are grey by construction, where three free output channels drift into colour blotches."""
        out = self.decoder(self.post_quant_conv(f_hat))
        return out.expand(-1, 3, -1, -1) if self.in_channels == 1 else out

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Quantized features -> image in [-1, 1], float32 even under autocast."""
        return self.decode(f_hat).float().clamp(-1, 1)

    def forward(self, img: torch.Tensor, prefix_k: torch.Tensor | None = None) -> VQOutput:
        """prefix_k (B,): also decode each image's f_hat after its first prefix_k[i] scales (one decoder call)."""
        f_hat, vq_loss, code_hits, f_prefix = self.quantizer(self.encode(img), prefix_k)
        if f_prefix is None:
            return VQOutput(self.decode(f_hat), vq_loss, code_hits)
        rec, rec_prefix = self.decode(torch.cat((f_hat, f_prefix))).chunk(2)
        return VQOutput(rec, vq_loss, code_hits, rec_prefix)

    @torch.no_grad()
    def img_to_idx(self, img: torch.Tensor) -> list[torch.Tensor]:
        return self.quantizer.f_to_idx(self.encode(img))

    @torch.no_grad()
    def reconstruct(self, img: torch.Tensor) -> torch.Tensor:
        return self.fhat_to_img(self.quantizer.f_to_fhats(self.encode(img))[-1])

    def idx_to_fhats(self, idx_list: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.quantizer.idx_to_fhats(idx_list)

    @torch.no_grad()
    def idx_to_img(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Token maps of the first len(idx_list) scales -> image in [-1, 1] (partial lists give coarse images)."""
        return self.fhat_to_img(self.quantizer.idx_to_fhats(idx_list)[-1])

    @torch.no_grad()
    def idx_to_var_input(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.quantizer.idx_to_var_input(idx_list)


def load_vqvae(path: str | Path, map_location: str | torch.device = "cpu") -> VQVAE:
    """A VQVAE from this project's checkpoint format {"model": state_dict, "model_config": dict, ...}, in eval mode."""
    return load_model(path, VQVAE, map_location)
