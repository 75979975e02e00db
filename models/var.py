"""The VAR transformer: class-conditional next-scale prediction over the VQ-VAE's multi-scale token maps.

The sequence is the concatenation of the K token maps (L = sum pn^2 tokens). The first pn_0^2 positions hold
the start token (class embedding + pos_start); position block k >= 1 holds the word embedding of the
cumulative f_hat after scale k-1, area-downsampled to pn_k. Attention is block-causal over scales, every
block is modulated by the class (AdaLN), and sampling runs scale by scale with a KV cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checkpoint import load_model
from models.vqvae import VQVAE


def unit_rows(t: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """F.normalize over the last dimension, kept in t's dtype. Under CUDA autocast F.normalize runs in fp32: every
    block would save an fp32 copy of q and k for backward, and the KV cache would keep fp32 keys. Here only the
    sum of squares is fp32 (accumulated, never materialised as an fp32 copy of t). fp16 is the exception: the squares
    of a small row underflow its range and the inverse norm overflows it (65504), so the row would become inf; there
    the row is normalised in fp32, as the reference's F.normalize does. bf16 has fp32's range."""
    if t.dtype == torch.float16:
        return F.normalize(t.float(), dim=-1, eps=eps).to(t.dtype)
    sum_sq = (t * t).sum(-1, keepdim=True, dtype=torch.float32)
    return t * sum_sq.clamp_min(eps * eps).rsqrt().to(t.dtype)


# Queries [q_begin, q_end) of a sequence see its keys [0, k_end), through the boolean mask (True = attend) if any.
AttnGroup = tuple[int, int, int, torch.Tensor | None]


class _GroupedAttention(torch.autograd.Function):
    """Attention over groups of queries by plain matmuls, keeping each group's probabilities for the backward pass:
    for bf16/fp16 on the CPU, where SDPA's fused kernel runs no faster than in fp32 and recomputes every
    exponential in its backward, while matmuls run at the reduced precision's speed (twice as fast as SDPA per
    group at the benchmark's shapes; errors against fp32 ~1.4x SDPA's, within bf16's own rounding)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: Sequence[AttnGroup],
                scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        probs = []
        for q_begin, q_end, k_end, mask in groups:
            scores = q[:, :, q_begin:q_end] @ k[:, :, :k_end].transpose(-1, -2)
            if scale != 1.0:
                scores.mul_(scale)
            if mask is not None:
                scores.masked_fill_(~mask, -torch.inf)
            probs.append(scores.softmax(dim=-1))
            out[:, :, q_begin:q_end] = probs[-1] @ v[:, :, :k_end]
        ctx.groups, ctx.scale = groups, scale
        ctx.save_for_backward(q, k, v, out, *probs)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, *probs = ctx.saved_tensors
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for (q_begin, q_end, k_end, _), p in zip(ctx.groups, probs):
            g = grad_out[:, :, q_begin:q_end]
            grad_v[:, :, :k_end] += p.transpose(-1, -2) @ g
            # softmax backward: dS = P * (dP - rowsum(dO * O)), then the score scale
            grad_s = (g @ v[:, :, :k_end].transpose(-1, -2)).sub_((g * out[:, :, q_begin:q_end]).sum(-1, keepdim=True))
            grad_s.mul_(p)
            if ctx.scale != 1.0:
                grad_s.mul_(ctx.scale)
            grad_q[:, :, q_begin:q_end] = grad_s @ k[:, :, :k_end]
            grad_k[:, :, :k_end] += grad_s.transpose(-1, -2) @ q[:, :, q_begin:q_end]
        return grad_q, grad_k, grad_v, None, None


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: Sequence[AttnGroup], scale: float,
                      dropout_p: float) -> torch.Tensor:
    """softmax(q k^T * scale) v of (B, heads, n, d) tensors, one call per group of queries on the keys it sees:
    a block-causal layout costs the unmasked scores only, with no mask for groups that see all of their keys."""
    if q.device.type == "cpu" and q.dtype != torch.float32 and dropout_p == 0:
        with torch.autocast("cpu", enabled=False):
            return _GroupedAttention.apply(q, k, v, groups, scale)
    return torch.cat([F.scaled_dot_product_attention(q[:, :, q_begin:q_end], k[:, :, :k_end], v[:, :, :k_end],
                                                     attn_mask=mask, dropout_p=dropout_p, scale=scale)
                      for q_begin, q_end, k_end, mask in groups], dim=2)


class KVCache:
    """Keys and values of the scales seen so far, for one attention layer during sampling: buffers for max_len
    positions, allocated at the first scale and filled in place scale by scale (concatenating instead would
    re-allocate and copy the whole prefix at every scale)."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot hold {end}")
        if self.k is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability p (rescaled by 1/(1-p))."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float, l2_norm: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.l2_norm = l2_norm
        if l2_norm:
            # Cosine attention with a learned per-head temperature (log-space, starts at 4, capped at 100).
            self.scale = 1.0
            self.scale_mul = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        # Biases on q and v only (k's bias would cancel in the softmax).
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop

    def forward(self, x: torch.Tensor, groups: Sequence[AttnGroup], cache: KVCache | None) -> torch.Tensor:
        """groups: the block-causal layout of x's positions (VAR.attn_groups); ignored with a cache."""
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        q, k, v = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.l2_norm:
            # The fp32 temperature is cast, so that q, k and v share the compute dtype (SDPA needs one).
            q = unit_rows(q) * self.scale_mul.clamp(max=self.max_scale_mul).exp().to(q.dtype)
            k = unit_rows(k)
        if cache is not None:
            k, v = cache.extend(k, v)
            groups = [(0, n, k.shape[2], None)]  # one new scale: it sees every cached key
        out = grouped_attention(q, k, v, groups, self.scale, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block whose LayerNorm scale/shift and residual gains come from the class.

    The 6 modulation vectors are, in order: gain_attn, gain_mlp, scale_attn, scale_mlp, shift_attn, shift_mlp.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop: float, attn_drop: float, drop_path: float,
                 norm_eps: float, shared_aln: bool, l2_norm: bool) -> None:
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.attn = SelfAttention(dim, num_heads, attn_drop, drop, l2_norm)
        self.mlp = MLP(dim, round(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.shared_aln = shared_aln
        if shared_aln:
            # Per-block offsets added to the modulation that one shared linear layer computes from the class.
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, dim) / math.sqrt(dim))
        else:
            self.ada_lin = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, groups: Sequence[AttnGroup],
                cache: KVCache | None = None) -> torch.Tensor:
        mod = self.ada_gss + cond if self.shared_aln else self.ada_lin(F.silu(cond)).view(-1, 1, 6, self.dim)
        gain1, gain2, scale1, scale2, shift1, shift2 = mod.unbind(2)
        x = x + self.drop_path(self.attn(self.norm(x) * (scale1 + 1) + shift1, groups, cache) * gain1)
        return x + self.drop_path(self.mlp(self.norm(x) * (scale2 + 1) + shift2) * gain2)


class AdaLNHead(nn.Module):
    """Class-modulated LayerNorm applied before the output projection."""

    def __init__(self, dim: int, norm_eps: float) -> None:
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(F.silu(cond)).view(-1, 1, 2, self.dim).unbind(2)
        return self.norm(x) * (scale + 1) + shift


# Guidance t at scale k of K for the guidance scale g. "linear" is the reference's ramp: the coarse layout is drawn
# from the class alone and guidance grows towards the details; "constant" guides every scale alike.
GUIDANCE_SCHEDULES: dict[str, Callable[[float, int, int], float]] = {
    "linear": lambda g, k, num_scales: g * k / (num_scales - 1),
    "constant": lambda g, k, num_scales: g,
}


@dataclass(frozen=True)
class SamplingSettings:
    """How VAR draws its tokens; the scripts build it from their constants.

    At scale k the guided logits are (1 + t) cond - t uncond with t = GUIDANCE_SCHEDULES[guidance_schedule](guidance,
    k, K); guidance = 0 skips the unconditional half. top_k, top_p and temperature filter each draw (sample_tokens).
    """
    guidance: float = 1.5
    guidance_schedule: str = "linear"
    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"guidance_schedule must be one of {', '.join(GUIDANCE_SCHEDULES)}, "
                             f"got {self.guidance_schedule!r}")

    def guidance_at(self, k: int, num_scales: int) -> float:
        """t of scale k (0-based) of num_scales."""
        return GUIDANCE_SCHEDULES[self.guidance_schedule](self.guidance, k, num_scales)


def sample_tokens(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0,
                  generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """(B, l, V) logits -> (B, l) tokens drawn after temperature, top-k and nucleus (top-p) filtering.

    top_k=1 keeps only the maximum, so the draw is the argmax (the reference's greedy mode). With one generator per
    row, a row's draw depends only on its own logits and generator, not on the rest of the batch; None draws the
    whole batch from the global random stream.

    The draw is torch.multinomial's over the filtered vocabulary, done by hand: multinomial draws one sample as
    argmax(p / q) with q ~ Exp(1), one q per vocabulary entry, and so does this, from the same random stream, but
    the filtering and the argmax run on the k survivors of one topk instead of a topk, a full sort, a scatter and
    two softmaxes over the vocabulary. Seeded draws are the multinomial's except on exact ties (top-k keeps exactly
    k entries; the mask kept every entry tied with the k-th) and on last-bit differences of the probabilities.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, n, vocab = logits.shape
    if generators is not None and len(generators) != b:
        raise ValueError(f"{len(generators)} generators for a batch of {b}")
    logits = logits.float() / temperature
    ids = None
    if 0 < top_k < vocab:
        logits, ids = logits.topk(top_k, dim=-1)  # sorted, largest first
    elif top_p > 0:
        logits, ids = logits.sort(dim=-1, descending=True)
    if top_p > 0:
        # Drop the least likely tokens whose total probability is at most 1 - top_p (summed from the least likely).
        rising = logits.flip(-1)
        drop = rising.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.flip(-1), -torch.inf)
    probs = logits.softmax(dim=-1)
    if generators is None:
        q = torch.empty(b, n, vocab, device=logits.device).exponential_()
    else:
        q = torch.stack([torch.empty(n, vocab, device=logits.device).exponential_(generator=g) for g in generators])
    if ids is None:
        return (probs / q).argmax(dim=-1)
    choice = (probs / q.gather(-1, ids)).argmax(dim=-1, keepdim=True)
    return ids.gather(-1, choice)[..., 0]


def scale_generators(seeds: Sequence[int], k: int, device: torch.device) -> list[torch.Generator]:
    """One generator per image for scale k, seeded from (image seed, k): an image's draws at a scale are the same
    whatever the batch, and whichever coarser scales came from a teacher prefix."""
    states = [np.random.SeedSequence([int(s), k]).generate_state(2, np.uint32) for s in seeds]
    return [torch.Generator(device=device).manual_seed(int(a) << 32 | int(b)) for a, b in states]


class VAR(nn.Module):
    # Parameters AdamW does not decay besides 1-D ones and biases (common/training.py param_groups), as the reference:
    # position and level embeddings, shared-AdaLN offsets, attention temperatures. The class and word embeddings decay.
    NO_WEIGHT_DECAY = ("pos_start", "pos_embed", "lvl_embed", "ada_gss", "scale_mul")

    def __init__(self, vocab_size: int = 2048, z_channels: int = 32,
                 scales: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), num_classes: int = 6, depth: int = 16,
                 embed_dim: int = 1024, num_heads: int = 16, mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, norm_eps: float = 1e-6,
                 shared_aln: bool = False, cond_drop_rate: float = 0.1, attn_l2_norm: bool = True,
                 init_adaln_gamma: float = 1e-5) -> None:
        """init_adaln_gamma only sets the initial weights (see init_weights), so model_config leaves it out."""
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        scales = [int(s) for s in scales]
        if len(scales) < 2:
            raise ValueError(f"VAR needs at least two scales, got {scales}")
        self.config = dict(vocab_size=vocab_size, z_channels=z_channels, scales=scales, num_classes=num_classes,
                           depth=depth, embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
                           norm_eps=norm_eps, shared_aln=shared_aln, cond_drop_rate=cond_drop_rate,
                           attn_l2_norm=attn_l2_norm)
        self.vocab_size, self.z_channels, self.scales = vocab_size, z_channels, tuple(scales)
        self.num_classes, self.embed_dim, self.cond_drop_rate = num_classes, embed_dim, cond_drop_rate
        self.first_l = scales[0] ** 2
        self.L = sum(pn * pn for pn in scales)
        ends = torch.tensor([pn * pn for pn in scales]).cumsum(0).tolist()
        self.begin_ends = list(zip([0] + ends[:-1], ends))

        std = math.sqrt(1 / embed_dim / 3)
        self.word_embed = nn.Linear(z_channels, embed_dim)
        self.class_emb = nn.Embedding(num_classes + 1, embed_dim)  # last row: the null class for guidance
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, embed_dim))
        self.pos_embed = nn.Parameter(torch.empty(1, self.L, embed_dim))
        self.lvl_embed = nn.Embedding(len(scales), embed_dim)
        for w in (self.class_emb.weight, self.pos_start, self.pos_embed, self.lvl_embed.weight):
            nn.init.trunc_normal_(w, std=std)

        self.shared_ada_lin = nn.Linear(embed_dim, 6 * embed_dim) if shared_aln else None
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList([
            AdaLNBlock(embed_dim, num_heads, mlp_ratio, drop_rate, attn_drop_rate, rates[i], norm_eps, shared_aln,
                       attn_l2_norm) for i in range(depth)])
        self.head_norm = AdaLNHead(embed_dim, norm_eps)
        self.head = nn.Linear(embed_dim, vocab_size)

        level = torch.cat([torch.full((pn * pn,), k) for k, pn in enumerate(scales)])
        self.register_buffer("level", level, persistent=False)
        # Block-causal: a token sees every token of its own and of coarser scales.
        self.register_buffer("attn_mask", level[None, :] <= level[:, None], persistent=False)
        # Attention runs per group of query scales on the keys of their prefix, which skips the L x L scores that
        # the mask would throw away (38% of them at the default 10 scales). Scales of >= 64 tokens are groups of their own (no mask); the
        # smaller leading scales share one masked group, as one call each would cost more than it saves.
        firsts = [0] + [b for (b, e) in self.begin_ends[1:] if e - b >= 64]
        self.group_bounds = list(zip(firsts, firsts[1:] + [self.L]))
        self.init_weights(init_adaln_gamma=init_adaln_gamma)

    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = -1.0) -> None:
        """The reference init: truncated normal linears/embeddings (std sqrt(1/(3C)) when init_std < 0), output
        projections scaled by 1/sqrt(2 depth), small head, AdaLN gains near zero so every block starts near identity."""
        if init_std < 0:
            init_std = math.sqrt(1 / self.embed_dim / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=init_std)
        with torch.no_grad():
            self.head.weight.mul_(init_head)
            self.head_norm.ada_lin.weight.mul_(init_adaln)
            depth, c = len(self.blocks), self.embed_dim
            for block in self.blocks:
                block.attn.proj.weight.div_(math.sqrt(2 * depth))
                block.mlp.fc2.weight.div_(math.sqrt(2 * depth))
                if block.shared_aln:
                    block.ada_gss[:, :, 2:].mul_(init_adaln)
                    block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
                else:
                    block.ada_lin.weight[2 * c:].mul_(init_adaln)
                    block.ada_lin.weight[:2 * c].mul_(init_adaln_gamma)

    def _block_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """Class embedding (B, C) -> what the blocks take: itself, or the shared AdaLN output (B, 1, 6, C)."""
        if self.shared_ada_lin is None:
            return cond
        return self.shared_ada_lin(F.silu(cond)).view(-1, 1, 6, self.embed_dim)

    def get_logits(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_norm(h.float(), cond)).float()

    def forward(self, labels: torch.Tensor, x_teacher: torch.Tensor) -> torch.Tensor:
        """labels (B,), teacher-forcing input (B, L - pn_0^2, z) -> logits (B, L, vocab) in float32."""
        x, cond = self.embed_inputs(labels, x_teacher)
        block_cond = self._block_cond(cond)
        groups = self.attn_groups(self.L)
        for block in self.blocks:
            x = block(x, block_cond, groups)
        return self.get_logits(x, cond)

    def attn_groups(self, length: int) -> list[AttnGroup]:
        """The attention groups of the first `length` positions (whole scales): a group holding one scale needs no
        mask, since its queries see all of their prefix."""
        groups = []
        for begin, end in self.group_bounds:
            end = min(end, length)
            if begin < end:
                one_scale = (begin, end) in self.begin_ends
                groups.append((begin, end, end, None if one_scale else self.attn_mask[begin:end, :end]))
        return groups

    def embed_inputs(self, labels: torch.Tensor, x_teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's input sequence (B, L, C) and the class embedding (B, C), after class dropout."""
        b = x_teacher.shape[0]
        if x_teacher.shape[1:] != (self.L - self.first_l, self.z_channels) or labels.shape != (b,):
            raise ValueError(f"expected labels ({b},) and x_teacher ({b}, {self.L - self.first_l}, {self.z_channels}), "
                             f"got {tuple(labels.shape)} and {tuple(x_teacher.shape)}")
        if self.training and self.cond_drop_rate > 0:
            drop = torch.rand(b, device=labels.device) < self.cond_drop_rate
            labels = torch.where(drop, self.num_classes, labels)
        with torch.autocast(device_type=x_teacher.device.type, enabled=False):
            cond = self.class_emb(labels)
            sos = cond[:, None].expand(b, self.first_l, -1) + self.pos_start
            x = torch.cat((sos, self.word_embed(x_teacher.float())), dim=1)
            x = x + self.lvl_embed(self.level) + self.pos_embed
        return x, cond

    @torch.no_grad()
    def generate(self, vqvae: VQVAE, labels: torch.Tensor, sampling: SamplingSettings = SamplingSettings(),
                 **kwargs: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """generate_idx (same arguments), decoded by the VQ-VAE -> (images in [0, 1] (B, 3, H, W), token maps)."""
        idx_list, f_hat = self._sample(vqvae, labels, sampling, **kwargs)
        return vqvae.fhat_to_img(f_hat).add(1).mul(0.5), idx_list

    @torch.no_grad()
    def generate_idx(self, vqvae: VQVAE, labels: torch.Tensor, sampling: SamplingSettings = SamplingSettings(),
                     seeds: Sequence[int] | None = None, coarse_idx: Sequence[torch.Tensor] | None = None,
                     coarse_k: int = 0, use_cache: bool = True) -> list[torch.Tensor]:
        """Sample the token maps (B, pn, pn) of the given classes scale by scale, as `sampling` says.

        The first coarse_k scales are taken from coarse_idx instead of sampled (coarse_k = K reproduces the VQ-VAE
        reconstruction of those tokens). use_cache=False recomputes the whole prefix with the block-causal mask at
        every scale (same result, slower). seeds gives each image its own random streams (see scale_generators), so
        an image depends on its seed, not on its batch; None draws from the global RNG.
        """
        return self._sample(vqvae, labels, sampling, seeds, coarse_idx, coarse_k, use_cache)[0]

    def _sample(self, vqvae: VQVAE, labels: torch.Tensor, sampling: SamplingSettings = SamplingSettings(),
                seeds: Sequence[int] | None = None, coarse_idx: Sequence[torch.Tensor] | None = None,
                coarse_k: int = 0, use_cache: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
        """generate_idx's token maps and the f_hat they add up to (built along the way: decoding needs no rebuild)."""
        num_scales = len(self.scales)
        if tuple(vqvae.scales) != self.scales or vqvae.quantizer.vocab_size != self.vocab_size \
                or vqvae.quantizer.z_channels != self.z_channels:
            raise ValueError("the VQ-VAE's scales / vocabulary / z_channels differ from the VAR's")
        if not 0 <= coarse_k <= num_scales or (coarse_k > 0 and (coarse_idx is None or len(coarse_idx) < coarse_k)):
            raise ValueError(f"coarse_k must be in [0, {num_scales}] with at least coarse_k token maps in coarse_idx")
        b = labels.shape[0]
        if seeds is not None and len(seeds) != b:
            raise ValueError(f"{len(seeds)} seeds for {b} labels")
        guided = sampling.guidance != 0
        rows = torch.cat((labels, torch.full_like(labels, self.num_classes))) if guided else labels
        cond = self.class_emb(rows)
        block_cond = self._block_cond(cond)
        lvl_pos = self.lvl_embed(self.level) + self.pos_embed
        x = cond[:, None].expand(-1, self.first_l, -1) + self.pos_start + lvl_pos[:, :self.first_l]
        side = self.scales[-1]
        f_hat = torch.zeros(b, self.z_channels, side, side, device=labels.device)
        caches = [KVCache(self.L) for _ in self.blocks]
        inputs: list[torch.Tensor] = []
        idx_list: list[torch.Tensor] = []
        for k, pn in enumerate(self.scales):
            begin, end = self.begin_ends[k]
            teacher = k < coarse_k
            inputs.append(x)
            h = None
            if use_cache and coarse_k < num_scales:  # teacher scales still fill the cache for later ones
                h = x
                for block, cache in zip(self.blocks, caches):
                    h = block(h, block_cond, (), cache)
            elif not teacher:
                h = torch.cat(inputs, dim=1)
                groups = self.attn_groups(end)
                for block in self.blocks:
                    h = block(h, block_cond, groups)
                h = h[:, begin:end]
            if teacher:
                idx = coarse_idx[k].reshape(b, pn * pn).to(labels.device)
            else:
                logits = self.get_logits(h, cond)
                if guided:
                    t = sampling.guidance_at(k, num_scales)
                    logits = (1 + t) * logits[:b] - t * logits[b:]
                generators = None if seeds is None else scale_generators(seeds, k, labels.device)
                idx = sample_tokens(logits, sampling.top_k, sampling.top_p, sampling.temperature, generators)
            idx_list.append(idx.view(b, pn, pn))
            f_hat, next_in = vqvae.quantizer.next_scale_input(k, f_hat, vqvae.quantizer.embed(idx, k))
            if next_in is not None:
                nb, ne = self.begin_ends[k + 1]
                x = self.word_embed(next_in.flatten(2).transpose(1, 2)) + lvl_pos[:, nb:ne]
                if guided:
                    x = torch.cat((x, x))
        return idx_list, f_hat


def load_var(path: str | Path, map_location: str | torch.device = "cpu") -> VAR:
    """A VAR from this project's checkpoint format {"model": state_dict, "model_config": dict, ...}, in eval mode."""
    return load_model(path, VAR, map_location)
