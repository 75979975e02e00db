"""Convolutional encoder and decoder of the VQ-VAE (the taming / latent-diffusion "vq-f16" layout used by VAR).

ResNet blocks with GroupNorm(32) + SiLU, single-head self-attention after every block of the lowest
resolution and in the middle, stride-2 convolutions down, nearest-neighbour 2x + conv up.

Feature maps at 256x256 are large (67 MB for 4 images of 64 channels): on the CPU every fresh buffer of that size
costs page faults that outweigh the arithmetic of an element-wise op, so the residual additions and, when no graph
is recorded, the SiLU after each GroupNorm write into a buffer they own instead of a new one.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """SiLU(norm(x)), in place on the norm's fresh output when autograd records nothing (SiLU's backward needs its
    input)."""
    return F.silu(norm(x), inplace=not torch.is_grad_enabled())


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(norm_silu(self.norm1, x))
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        return h.add_(self.skip(x))  # h is the convolution's own output: its backward does not need it


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, residual."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2).unbind(1)  # each (B,1,HW,C)
        if x.is_cuda:
            # A last-dimension stride of H*W sends CUDA's SDPA to its slow math kernel. On the CPU that kernel is kept
            # on purpose: unlike the fused one it rounds the same at any batch size, so torchrun runs match one process.
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(C), as the reference
        return self.proj(out.transpose(-1, -2).reshape(b, c, h, w)).add_(x)


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric zero padding (right and bottom only), as the reference: keeps pretrained weights exact.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 convolution (weights in self.conv, as the reference), computed as one
    stride-2 transposed convolution of the small map with a 4x4 kernel: each output pixel sums the same products,
    with 16 instead of 36 multiplications per input pixel and no 4x-sized upsampled copy.

    Output row 2i reads input rows i-1 and i with kernel rows w0 and w1 + w2; row 2i+1 reads rows i and i+1 with
    w0 + w1 and w2. In the transposed kernel (tap t = output row + 1 - 2 * input row) that is rows
    (w2, w1 + w2, w0 + w1, w0), and the same for columns.
    """

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        taps = torch.tensor([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.float32)
        self.register_buffer("taps", taps, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # sum the weights in their own precision
            kernel = (self.taps @ self.conv.weight @ self.taps.T).transpose(0, 1)  # (in, out, 4, 4)
        return F.conv_transpose2d(x, kernel, self.conv.bias, stride=2, padding=1)


class MidBlock(nn.Module):
    def __init__(self, ch: int, dropout: float) -> None:
        super().__init__()
        self.res1 = ResBlock(ch, ch, dropout)
        self.attn = AttnBlock(ch)
        self.res2 = ResBlock(ch, ch, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))


class Level(nn.Module):
    """One resolution: res blocks (each followed by attention at the lowest resolution), then a resampling."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, with_attn: bool, dropout: float,
                 resample: nn.Module) -> None:
        super().__init__()
        self.res = nn.ModuleList([ResBlock(in_ch if i == 0 else out_ch, out_ch, dropout) for i in range(n_blocks)])
        self.attn = nn.ModuleList([AttnBlock(out_ch) for _ in range(n_blocks)]) if with_attn else nn.ModuleList()
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return self.resample(x)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> features (B, z_channels, H/2^(len(ch_mult)-1), ...)."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int,
                 in_channels: int, dropout: float) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        widths = [ch] + [ch * m for m in ch_mult]
        last = len(ch_mult) - 1
        self.levels = nn.ModuleList()
        for i in range(len(ch_mult)):
            resample = Downsample(widths[i + 1]) if i != last else nn.Identity()
            self.levels.append(Level(widths[i], widths[i + 1], num_res_blocks, i == last, dropout, resample))
        self.mid = MidBlock(widths[-1], dropout)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(norm_silu(self.norm_out, h))


class Decoder(nn.Module):
    """Features (B, z_channels, h, w) -> image (B, out_channels, h*2^(len(ch_mult)-1), ...), not clamped."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int,
                 out_channels: int, dropout: float) -> None:
        super().__init__()
        last = len(ch_mult) - 1
        block_in = ch * ch_mult[last]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, dropout)
        levels = []
        for i in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[i]
            resample = Upsample(block_out) if i != 0 else nn.Identity()
            levels.append(Level(block_in, block_out, num_res_blocks + 1, i == last, dropout, resample))
            block_in = block_out
        # levels[i] works at the resolution of the encoder's levels[i] (the reference's indexing); run from the last.
        self.levels = nn.ModuleList(levels[::-1])
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.device.type == "cpu":
            # oneDNN runs channels-last (NHWC) convolutions ~25% faster than NCHW ones, which it reorders on every
            # call; GroupNorm and nearest upsampling keep the layout. Not on CUDA, where GroupNorm would copy back.
            z = z.contiguous(memory_format=torch.channels_last)
        h = self.mid(self.conv_in(z))
        for level in reversed(self.levels):
            h = level(h)
        return self.conv_out(norm_silu(self.norm_out, h)).contiguous()
