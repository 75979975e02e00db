"""Multi-scale residual vector quantizer of VAR (one codebook shared by every scale).

For scale k (side pn_k) the remaining residual is area-downsampled to pn_k x pn_k and each position takes
its nearest code; the code map is bicubic-upsampled back to the full feature size, refined by
phi(h) = (1 - r) h + r conv3x3(h), added to f_hat and subtracted from the residual. The last scale works
at full size, so it is neither down- nor upsampled. Distances are always computed in float32.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def phi_indices(num_scales: int, num_phis: int) -> list[int]:
    """Which phi conv each scale uses: the one whose tick is nearest to the scale's position in [0, 1].

    The reference places K ticks at linspace(1/(3K), 1 - 1/(3K)) when K == 4, else linspace(1/(2K), 1 - 1/(2K));
    scale k sits at k / (num_scales - 1); ties go to the lower index.
    """
    if num_phis == 1:
        return [0] * num_scales
    margin = 1 / 3 / num_phis if num_phis == 4 else 1 / 2 / num_phis
    ticks = np.linspace(margin, 1 - margin, num_phis)
    return [int(np.argmin(np.abs(ticks - k / (num_scales - 1)))) for k in range(num_scales)]


class QuantOutput(NamedTuple):
    f_hat: torch.Tensor      # (B, z, H, W) quantized features, straight-through to the encoder
    vq_loss: torch.Tensor    # scalar
    code_hits: torch.Tensor  # (num_scales, vocab_size) int64 counts of picked codes in this batch
    f_prefix: torch.Tensor | None = None  # (B, z, H, W) f_hat after each image's prefix of scales (forward's prefix_k)


class MultiScaleQuantizer(nn.Module):
    def __init__(self, vocab_size: int, z_channels: int, scales: Sequence[int], beta: float = 0.25,
                 using_znorm: bool = False, phi_ratio: float = 0.5, phi_share: int = 4) -> None:
        super().__init__()
        scales = tuple(int(s) for s in scales)
        if len(scales) < 2 or any(b <= a for a, b in zip(scales, scales[1:])) or scales[0] < 1:
            raise ValueError(f"scales must be at least two strictly increasing positive sides, got {scales}")
        if phi_share < 0:
            raise ValueError(f"phi_share must be >= 0 (0 = one phi per scale), got {phi_share}")
        self.vocab_size, self.z_channels, self.scales = vocab_size, z_channels, scales
        self.beta, self.using_znorm = beta, using_znorm
        self.phi_ratio = abs(phi_ratio)
        self.embedding = nn.Embedding(vocab_size, z_channels)
        # Small uniform codes (taming's VQ init); all codes start near the origin and spread while training.
        nn.init.uniform_(self.embedding.weight, -1.0 / vocab_size, 1.0 / vocab_size)
        num_phis = len(scales) if phi_share == 0 else phi_share
        # A ratio of ~0 makes phi the identity, as the reference: then no convs exist at all.
        use_phi = self.phi_ratio > 1e-6
        self.phis = nn.ModuleList(
            [nn.Conv2d(z_channels, z_channels, 3, padding=1) for _ in range(num_phis)] if use_phi else [])
        self.phi_index = phi_indices(len(scales), num_phis)

    @property
    def full_size(self) -> int:
        return self.scales[-1]

    def phi(self, k: int, h: torch.Tensor) -> torch.Tensor:
        if not len(self.phis):
            return h
        return h * (1 - self.phi_ratio) + self.phis[self.phi_index[k]](h) * self.phi_ratio

    def nearest_code(self, z: torch.Tensor) -> torch.Tensor:
        """(N, z) float32 -> (N,) index of the nearest code (squared L2, or cosine with using_znorm)."""
        codes = self.embedding.weight.detach().float()
        if self.using_znorm:
            return torch.argmax(F.normalize(z, dim=1) @ F.normalize(codes, dim=1).T, dim=1)
        # ||z||^2 - 2 z.e + ||e||^2 in one fused matmul instead of materialising differences.
        dist = torch.addmm(z.square().sum(1, keepdim=True) + codes.square().sum(1), z, codes.T, beta=1, alpha=-2)
        return torch.argmin(dist, dim=1)

    def embed(self, idx: torch.Tensor, k: int) -> torch.Tensor:
        """Token map of scale k, (B, pn, pn) or (B, pn*pn) -> code vectors (B, z, pn, pn)."""
        pn = self.scales[k]
        if idx.dim() not in (2, 3) or idx[0].numel() != pn * pn:
            raise ValueError(f"token map of scale {k} must be (B, {pn}, {pn}) or (B, {pn * pn}), got {tuple(idx.shape)}")
        return self.embedding(idx.reshape(idx.shape[0], pn, pn)).permute(0, 3, 1, 2)

    def upsample_code(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Code map of scale k -> phi(bicubic upsample to the full feature size), the reference's order."""
        if k != len(self.scales) - 1:
            h = F.interpolate(h, size=(self.full_size, self.full_size), mode="bicubic")
        return self.phi(k, h.contiguous())

    def _check_features(self, f: torch.Tensor) -> None:
        if f.dim() != 4 or f.shape[1] != self.z_channels or f.shape[2] != self.full_size or f.shape[3] != self.full_size:
            raise ValueError(
                f"features must be (B, {self.z_channels}, {self.full_size}, {self.full_size}) (the last scale is the "
                f"feature map's side), got {tuple(f.shape)}: check the image size against scales {self.scales}")

    def _residual_quantize(self, f: torch.Tensor,
                           with_grad: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Per-scale indices (B, pn, pn), cumulative f_hat after each scale, and the VQ loss (zero without grad)."""
        self._check_features(f)
        b = f.shape[0]
        f_ng = f.detach()
        rest = f_ng.clone()
        f_hat = torch.zeros_like(f_ng)
        last = len(self.scales) - 1
        loss = f.new_zeros(())
        idx_list, f_hats = [], []
        for k, pn in enumerate(self.scales):
            r = F.interpolate(rest, size=(pn, pn), mode="area") if k != last else rest
            idx = self.nearest_code(r.permute(0, 2, 3, 1).reshape(-1, self.z_channels)).view(b, pn, pn)
            h = self.upsample_code(k, self.embedding(idx).permute(0, 3, 1, 2))
            f_hat = f_hat + h
            rest = rest - h.detach()
            if with_grad:
                # Commitment pulls the encoder towards f_hat; the codebook term moves codes and phi towards f.
                loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_ng)
            idx_list.append(idx)
            f_hats.append(f_hat)
        return idx_list, f_hats, loss / len(self.scales)

    def low_pass(self, k: int, f: torch.Tensor) -> torch.Tensor:
        """f seen at scale k's side: area-downsampled to pn_k and bicubic-upsampled back, as the quantizer sees it."""
        if k == len(self.scales) - 1:
            return f
        pn = self.scales[k]
        return F.interpolate(F.interpolate(f, size=(pn, pn), mode="area"), size=f.shape[-2:], mode="bicubic")

    def prefix_fhat(self, f: torch.Tensor, f_hats: Sequence[torch.Tensor], prefix_k: torch.Tensor) -> torch.Tensor:
        """Each image's f_hat after its first prefix_k[i] scales (1..K). The codebook and phi get the gradient of the
        prefix itself; the encoder gets it through f's low pass at the prefix's last scale, a straight-through
        estimate that asks for the prefix's content in f's coarse structure (the full f_hat's identity would ask
        for it anywhere in f, where the coarse scales cannot see it)."""
        pick = (prefix_k - 1).view(1, -1, 1, 1, 1)
        stacked = torch.stack(list(f_hats))  # (K, B, z, H, W)
        chosen = stacked.gather(0, pick.expand(1, *stacked.shape[1:]))[0]
        low = torch.stack([self.low_pass(k, f) for k in range(len(f_hats))])
        low = low.gather(0, pick.expand(1, *low.shape[1:]))[0]
        return chosen + (low - low.detach())

    def forward(self, f: torch.Tensor, prefix_k: torch.Tensor | None = None) -> QuantOutput:
        """Training pass: quantized features with the straight-through gradient, the VQ loss and code hits; with
        prefix_k (B,) also each image's f_hat after its first prefix_k[i] scales (see prefix_fhat)."""
        with torch.autocast(device_type=f.device.type, enabled=False):
            f = f.float()
            idx_list, f_hats, loss = self._residual_quantize(f, with_grad=True)
            f_hat = (f_hats[-1].detach() - f.detach()) + f
            f_prefix = None if prefix_k is None else self.prefix_fhat(f, f_hats, prefix_k)
            # scatter_add_, not bincount: bincount reads its output size back to the host on every call.
            hits = torch.zeros(len(idx_list), self.vocab_size, dtype=torch.int64, device=f.device)
            for k, idx in enumerate(idx_list):
                hits[k].scatter_add_(0, idx.flatten(), torch.ones(idx.numel(), dtype=torch.int64, device=f.device))
        return QuantOutput(f_hat, loss, hits, f_prefix)

    @torch.no_grad()
    def f_to_idx(self, f: torch.Tensor) -> list[torch.Tensor]:
        with torch.autocast(device_type=f.device.type, enabled=False):
            return self._residual_quantize(f.float(), with_grad=False)[0]

    @torch.no_grad()
    def f_to_fhats(self, f: torch.Tensor) -> list[torch.Tensor]:
        with torch.autocast(device_type=f.device.type, enabled=False):
            return self._residual_quantize(f.float(), with_grad=False)[1]

    def idx_to_fhats(self, idx_list: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Cumulative f_hat (B, z, H, W) after each given scale (a prefix of the scales is fine)."""
        if not 1 <= len(idx_list) <= len(self.scales):
            raise ValueError(f"expected 1..{len(self.scales)} token maps, got {len(idx_list)}")
        with torch.autocast(device_type=idx_list[0].device.type, enabled=False):
            f_hat = None
            f_hats = []
            for k, idx in enumerate(idx_list):
                h = self.upsample_code(k, self.embed(idx, k))
                f_hat = h if f_hat is None else f_hat + h
                f_hats.append(f_hat)
        return f_hats

    def idx_to_var_input(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input (B, L - pn_0^2, z): for k >= 1, cumulative f_hat after scale k-1 area-downsampled to pn_k."""
        if len(idx_list) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} token maps, got {len(idx_list)}")
        f_hats = self.idx_to_fhats(idx_list[:-1])
        with torch.autocast(device_type=f_hats[0].device.type, enabled=False):
            parts = [F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)
                     for f_hat, pn in zip(f_hats, self.scales[1:])]
        return torch.cat(parts, dim=1)

    def next_scale_input(self, k: int, f_hat: torch.Tensor, h_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sampling step: add scale k's code map h_k (B, z, pn_k, pn_k) to f_hat; return it and the next scale's
        input (B, z, pn_{k+1}, pn_{k+1}), None after the last scale."""
        with torch.autocast(device_type=f_hat.device.type, enabled=False):
            f_hat = f_hat + self.upsample_code(k, h_k.float())
            if k == len(self.scales) - 1:
                return f_hat, None
            pn = self.scales[k + 1]
            return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")
