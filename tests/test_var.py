"""The VAR transformer on small random models: masking, KV cache, guidance, teacher prefix, precision, checkpoints.

models/var.py rules at non-default settings: the class-dropout rate on a large draw, and which label a dropped
sample gets; the sampling temperature on both sides of 1.

models/var.py against hand-written references at non-default settings: one attention layer (cosine and scaled
dot-product, temperature cap), one AdaLN block and the head (order of the six modulation vectors, LayerNorm eps),
the block-causal mask and scale layout, stochastic depth, the init's scalings, the sampler's global-stream path and
every refusal. Behaviour only, so that the tests hold for any sampler or KV cache that draws the same tokens."""
from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.checkpoint import CheckpointError
from common.io import atomic_torch_save
from models.var import (MLP, VAR, DropPath, KVCache, SamplingSettings, SelfAttention, grouped_attention, load_var,
                        sample_tokens, scale_generators, unit_rows)
from models.vqvae import VQVAE

SCALES = (1, 2, 3, 4)
L = sum(pn * pn for pn in SCALES)
VOCAB, Z, CLASSES = 64, 8, 3


def small_var(**kwargs) -> VAR:
    torch.manual_seed(0)
    config = dict(vocab_size=VOCAB, z_channels=Z, scales=SCALES, num_classes=CLASSES, depth=2, embed_dim=64,
                  num_heads=2, cond_drop_rate=0.1) | kwargs
    model = VAR(**config)
    # Larger AdaLN gains than the reference init (1e-5) so that every block really changes the output.
    model.init_weights(init_adaln_gamma=0.5, init_head=1.0)
    return model.eval()


@pytest.fixture(scope="module")
def vqvae() -> VQVAE:
    torch.manual_seed(0)
    # A shallow VQ-VAE (downsampling 2, 8 px images): the transformer's tests only need its quantizer and a decoder.
    model = VQVAE(vocab_size=VOCAB, z_channels=Z, ch=32, ch_mult=(1, 1), num_res_blocks=1, scales=SCALES).eval()
    torch.nn.init.normal_(model.quantizer.embedding.weight, std=0.5)
    return model


@pytest.fixture(scope="module")
def model() -> VAR:
    return small_var()


def teacher_batch(vqvae: VQVAE, b: int = 3) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    idx = [torch.randint(0, VOCAB, (b, pn, pn), generator=g) for pn in SCALES]
    labels = torch.arange(b) % CLASSES
    return labels, idx, vqvae.idx_to_var_input(idx)


def test_forward_shape_and_config(model: VAR, vqvae: VQVAE) -> None:
    labels, _, x = teacher_batch(vqvae)
    logits = model(labels, x)
    assert logits.shape == (3, L, VOCAB) and logits.dtype == torch.float32
    assert VAR(**model.config).config == model.config
    assert model.class_emb.weight.shape[0] == CLASSES + 1


def test_mask_hides_later_scales(model: VAR, vqvae: VQVAE) -> None:
    labels, _, x = teacher_batch(vqvae)
    changed = x.clone()
    start = SCALES[0] ** 2 + SCALES[1] ** 2 - 1  # teacher input of the third scale onward
    changed[:, start:] += torch.randn_like(changed[:, start:])
    with torch.no_grad():
        a, b = model(labels, x), model(labels, changed)
    cut = start + 1  # logits positions are shifted by the start token
    assert torch.allclose(a[:, :cut], b[:, :cut], atol=1e-6)
    assert not torch.allclose(a[:, cut:], b[:, cut:], atol=1e-3)


@pytest.mark.parametrize("variant", [{}, {"shared_aln": True}, {"attn_l2_norm": False}])
def test_cached_incremental_logits_match_forward(vqvae: VQVAE, variant: dict) -> None:
    model = small_var(**variant)
    labels, _, x_teacher = teacher_batch(vqvae)
    with torch.no_grad():
        full = model(labels, x_teacher)
        x, cond = model.embed_inputs(labels, x_teacher)
        block_cond = model._block_cond(cond)
        caches = [KVCache(L) for _ in model.blocks]
        for begin, end in model.begin_ends:
            h = x[:, begin:end]
            for block, cache in zip(model.blocks, caches):
                h = block(h, block_cond, (), cache)
            assert torch.allclose(model.get_logits(h, cond), full[:, begin:end], atol=1e-5)
        with pytest.raises(ValueError, match="cannot hold"):
            KVCache(1).extend(h[:, None, :2], h[:, None, :2])


@pytest.mark.parametrize("variant", [{}, {"shared_aln": True, "attn_l2_norm": False}])
def test_generate_with_and_without_cache_agree(vqvae: VQVAE, variant: dict) -> None:
    model = small_var(**variant)
    labels = torch.tensor([0, 1, 2, 1])
    sampling = SamplingSettings(2.0, top_k=20, top_p=0.9, temperature=1.2)
    outs = [model.generate(vqvae, labels, sampling, seeds=[7, 8, 9, 10], use_cache=cache) for cache in (True, False)]
    (img_a, idx_a), (img_b, idx_b) = outs
    assert all(torch.equal(a, b) for a, b in zip(idx_a, idx_b))
    assert torch.allclose(img_a, img_b, atol=1e-5)
    assert img_a.shape == (4, 3, 8, 8) and img_a.min() >= 0 and img_a.max() <= 1
    assert [t.shape for t in idx_a] == [(4, pn, pn) for pn in SCALES]
    # Sampled tokens, fed back as teacher input, are what the images decode from.
    assert torch.allclose(vqvae.idx_to_img(idx_a).add(1).mul(0.5), img_a, atol=1e-5)
    again, _ = model.generate(vqvae, labels, sampling, seeds=[7, 8, 9, 10])
    assert torch.equal(again, img_a)


def test_greedy_is_argmax_of_guided_logits(model: VAR, vqvae: VQVAE) -> None:
    labels = torch.tensor([2, 0])
    _, idx = model.generate(vqvae, labels, SamplingSettings(1.5, top_k=1))
    x = vqvae.idx_to_var_input(idx)
    with torch.no_grad():
        cond, uncond = model(labels, x), model(torch.full_like(labels, CLASSES), x)
    for k, (begin, end) in enumerate(model.begin_ends):
        t = 1.5 * k / (len(SCALES) - 1)
        guided = (1 + t) * cond[:, begin:end] - t * uncond[:, begin:end]
        assert torch.equal(guided.argmax(-1), idx[k].flatten(1))


def test_the_guidance_schedules_ramp_or_hold_the_guidance_over_the_scales() -> None:
    assert [SamplingSettings(2.0).guidance_at(k, 5) for k in range(5)] == [0.0, 0.5, 1.0, 1.5, 2.0]  # the default
    assert [SamplingSettings(2.0, "constant").guidance_at(k, 5) for k in range(5)] == [2.0] * 5
    with pytest.raises(ValueError, match="guidance_schedule must be one of linear, constant, got 'cosine'"):
        SamplingSettings(2.0, "cosine")


def test_greedy_under_the_constant_schedule_is_the_argmax_of_equally_guided_logits(vqvae: VQVAE) -> None:
    model = small_var()
    with torch.no_grad():
        model.class_emb.weight[-1].normal_(std=5.0)  # a null class far from the others: guidance moves the argmax
    labels = torch.tensor([2, 0, 1])
    _, idx = model.generate(vqvae, labels, SamplingSettings(3.0, "constant", top_k=1))
    _, ramped = model.generate(vqvae, labels, SamplingSettings(3.0, top_k=1))
    assert not torch.equal(idx[0], ramped[0])  # the first scale is guided here, unguided under the linear ramp
    x = vqvae.idx_to_var_input(idx)
    with torch.no_grad():
        cond, uncond = model(labels, x), model(torch.full_like(labels, CLASSES), x)
    for k, (begin, end) in enumerate(model.begin_ends):
        guided = 4.0 * cond[:, begin:end] - 3.0 * uncond[:, begin:end]
        assert torch.equal(guided.argmax(-1), idx[k].flatten(1)), k


def test_sample_tokens_filters() -> None:
    logits = torch.randn(2, 5, 30, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_tokens(logits, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_tokens(logits, top_p=1e-6), logits.argmax(-1))
    top3 = logits.topk(3, dim=-1).indices
    draws = sample_tokens(logits.repeat(50, 1, 1), top_k=3)
    assert (draws[..., None] == top3.repeat(50, 1, 1)).any(-1).all()
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens(logits, temperature=0)


def multinomial_after_masking(logits: torch.Tensor, top_k: int, top_p: float, g: torch.Generator) -> torch.Tensor:
    """The textbook filter (mask below the k-th logit, sort for the nucleus) and torch.multinomial, one row."""
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1)
        drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, sorted_idx, drop), -torch.inf)
    return torch.multinomial(logits.softmax(dim=-1), 1, replacement=True, generator=g)[:, 0]


@pytest.mark.parametrize("top_k, top_p", [(900, 0.96), (2048, 0.5), (50, 0.0)])
def test_sample_tokens_draws_what_multinomial_draws(top_k: int, top_p: float) -> None:
    # The sampler filters the top-k survivors only and draws argmax(p / q) by hand: the same tokens as the
    # textbook filter + torch.multinomial from the same seeds (logits at the sampler's scale: real ties are absent).
    logits = torch.randn(3, 200, 2048, generator=torch.Generator().manual_seed(1)) * 3
    seeds = [5, 6, 7]
    ours = sample_tokens(logits, top_k=top_k, top_p=top_p, generators=[torch.Generator().manual_seed(s) for s in seeds])
    theirs = torch.stack([multinomial_after_masking(row, top_k, top_p, torch.Generator().manual_seed(s))
                          for row, s in zip(logits, seeds)])
    assert torch.equal(ours, theirs)
    torch.manual_seed(3)
    ours = sample_tokens(logits, top_k=top_k, top_p=top_p)
    torch.manual_seed(3)
    theirs = multinomial_after_masking(logits.flatten(0, 1), top_k, top_p, torch.default_generator).view(3, 200)
    assert torch.equal(ours, theirs)


def test_sample_tokens_temperature_divides_logits() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0]).expand(1, 40_000, 4)
    g = torch.Generator().manual_seed(0)
    draws = sample_tokens(logits, temperature=2.0, generators=[g])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / draws.numel()
    # Binomial std of each frequency is below 0.0025: 0.01 is four of them.
    assert torch.allclose(freq, torch.softmax(logits[0, 0] / 2.0, dim=0), atol=0.01)
    with pytest.raises(ValueError, match="generators"):
        sample_tokens(logits, generators=[g, g])


def test_seeded_images_do_not_depend_on_the_batch(model: VAR, vqvae: VQVAE) -> None:
    labels = torch.tensor([0, 1, 2, 1])
    kwargs = dict(sampling=SamplingSettings(1.5, top_k=20, top_p=0.9, temperature=1.3))
    batch_idx = model.generate_idx(vqvae, labels, seeds=[11, 12, 13, 14], **kwargs)
    for i in (3, 0):
        alone_idx = model.generate_idx(vqvae, labels[i:i + 1], seeds=[[11, 12, 13, 14][i]], **kwargs)
        assert all(torch.equal(a[i:i + 1], b) for a, b in zip(batch_idx, alone_idx))
    other_idx = model.generate_idx(vqvae, labels, seeds=[11, 12, 13, 99], **kwargs)
    assert all(torch.equal(a[:3], b[:3]) for a, b in zip(batch_idx, other_idx))
    assert not all(torch.equal(a[3], b[3]) for a, b in zip(batch_idx, other_idx))
    with pytest.raises(ValueError, match="seeds"):
        model.generate_idx(vqvae, labels, seeds=[1, 2], **kwargs)


def test_guidance_zero_ignores_null_class(vqvae: VQVAE) -> None:
    model = small_var()
    labels = torch.tensor([0, 2])

    def run(guidance: float) -> torch.Tensor:
        return model.generate(vqvae, labels, SamplingSettings(guidance, top_k=10), seeds=[3, 4])[0]

    before = {guidance: run(guidance) for guidance in (0.0, 3.0)}
    with torch.no_grad():
        model.class_emb.weight[-1].normal_(std=5.0)
    assert torch.equal(run(0.0), before[0.0])
    assert not torch.equal(run(3.0), before[3.0])


@pytest.mark.parametrize("use_cache", [True, False])
def test_teacher_prefix(model: VAR, vqvae: VQVAE, use_cache: bool) -> None:
    labels, idx, _ = teacher_batch(vqvae)
    full, full_idx = model.generate(vqvae, labels, coarse_idx=idx, coarse_k=len(SCALES), use_cache=use_cache)
    assert all(torch.equal(a, b) for a, b in zip(full_idx, idx))
    assert torch.allclose(full, vqvae.idx_to_img(idx).add(1).mul(0.5), atol=1e-6)
    flat = [t.flatten(1) for t in idx]
    part, part_idx = model.generate(vqvae, labels, SamplingSettings(top_k=5), coarse_idx=flat, coarse_k=2,
                                    use_cache=use_cache, seeds=[0, 1, 2])
    assert all(torch.equal(a, b) for a, b in zip(part_idx[:2], idx[:2]))
    with pytest.raises(ValueError, match="coarse_k"):
        model.generate(vqvae, labels, coarse_idx=idx[:1], coarse_k=2)


def test_class_dropout_only_in_training(vqvae: VQVAE) -> None:
    model = small_var(cond_drop_rate=1.0)
    labels, _, x = teacher_batch(vqvae)
    null = torch.full_like(labels, CLASSES)
    with torch.no_grad():
        assert not torch.allclose(model(labels, x), model(null, x))
        model.train()
        assert torch.equal(model(labels, x), model(null, x))
    model.eval()


def test_drop_path_and_dropout_only_in_training(vqvae: VQVAE) -> None:
    model = small_var(drop_path_rate=0.5, drop_rate=0.1, attn_drop_rate=0.1, cond_drop_rate=0.0)
    labels, _, x = teacher_batch(vqvae)
    with torch.no_grad():
        assert torch.equal(model(labels, x), model(labels, x))
        model.train()
        torch.manual_seed(0)
        assert not torch.equal(model(labels, x), model(labels, x))
    model.eval()


def test_bf16_autocast(model: VAR, vqvae: VQVAE) -> None:
    labels, _, x = teacher_batch(vqvae)
    train_model = small_var()
    train_model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = train_model(labels, x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.randint(0, VOCAB, (3 * L,)))
        images, idx = model.generate(vqvae, labels, SamplingSettings(1.5, top_k=5), seeds=[0, 1, 2])
    loss.backward()
    assert logits.shape == (3, L, VOCAB) and logits.dtype == torch.float32
    assert train_model.blocks[0].attn.qkv.weight.grad is not None
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.float32 and 0 <= images.min() <= images.max() <= 1
    assert [t.shape for t in idx] == [(3, pn, pn) for pn in SCALES]


def test_reference_init() -> None:
    model = VAR(vocab_size=VOCAB, z_channels=Z, scales=SCALES, num_classes=CLASSES, depth=4, embed_dim=96, num_heads=3)
    c = 96
    std = (1 / c / 3) ** 0.5
    assert torch.equal(model.blocks[0].attn.q_bias, torch.zeros(c))
    assert torch.allclose(model.blocks[0].attn.scale_mul, torch.full((1, 3, 1, 1), 4.0).log())
    assert model.head.weight.std().item() == pytest.approx(0.02 * std, rel=0.15)
    assert model.blocks[0].ada_lin.weight[:2 * c].std().item() == pytest.approx(1e-5 * std, rel=0.15)
    assert model.blocks[0].ada_lin.weight[2 * c:].std().item() == pytest.approx(0.5 * std, rel=0.15)
    assert model.blocks[0].mlp.fc2.weight.std().item() == pytest.approx(std / 8 ** 0.5, rel=0.15)


def test_load_var_round_trip(model: VAR, vqvae: VQVAE, tmp_path: Path) -> None:
    path = tmp_path / "var.pth"
    atomic_torch_save({"model": model.state_dict(), "model_config": model.config}, path)
    loaded = load_var(path)
    assert not loaded.training and loaded.config == model.config
    labels, _, x = teacher_batch(vqvae)
    with torch.no_grad():
        assert torch.equal(loaded(labels, x), model(labels, x))
    assert "attn_mask" not in model.state_dict() and "level" not in model.state_dict()
    atomic_torch_save({"model": model.state_dict(), "model_config": model.config | {"depth": 3}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_var(tmp_path / "bad.pth")


def test_cosine_attention_keeps_the_compute_dtype_when_normalize_runs_in_fp32(monkeypatch) -> None:
    """CUDA autocast runs F.normalize in fp32 (the CPU's does not, so it is simulated): neither the KV cache nor
    the tensors saved for backward may hold fp32 queries or keys."""
    attn = small_var().blocks[0].attn.train()
    real = torch.nn.functional.normalize
    monkeypatch.setattr(torch.nn.functional, "normalize", lambda t, dim: real(t.float(), dim=dim))
    heads, head_dim = attn.num_heads, attn.head_dim
    saved: list[tuple[torch.dtype, tuple[int, ...]]] = []
    cache = KVCache(5)
    x = torch.randn(2, 5, heads * head_dim, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x, None, cache)
    assert out.dtype == torch.bfloat16
    assert cache.k.dtype == cache.v.dtype == torch.bfloat16
    assert (torch.float32, (2, heads, 5, head_dim)) not in saved
    assert (torch.bfloat16, (2, heads, 5, head_dim)) in saved


def test_class_dropout_replaces_the_given_fraction_by_the_null_class_in_training_only():
    torch.manual_seed(0)
    model = VAR(vocab_size=16, z_channels=4, scales=(1, 2), num_classes=5, depth=1, embed_dim=8, num_heads=1,
                cond_drop_rate=0.3)
    b = 40_000
    labels = torch.arange(b) % 5
    x = torch.zeros(b, 4, 4)
    emb = model.class_emb.weight.detach()

    def kept_and_null(cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (cond == emb[labels]).all(1), (cond == emb[5]).all(1)

    model.train()
    with torch.no_grad():
        kept, null = kept_and_null(model.embed_inputs(labels, x)[1])
    assert bool((kept ^ null).all())  # every sample keeps its class or gets the null class, nothing else
    # Binomial std of the fraction is 0.0023: +-0.01 is over four of them.
    assert abs(null.float().mean().item() - 0.3) < 0.01
    model.eval()
    with torch.no_grad():
        kept, null = kept_and_null(model.embed_inputs(labels, x)[1])
    assert bool(kept.all()) and not bool(null.any())


def test_temperature_below_one_sharpens_and_above_one_flattens():
    logits = torch.tensor([0.0, 1.0, 2.0]).expand(1, 30_000, 3)
    for temperature in (0.5, 3.0):
        draws = sample_tokens(logits, temperature=temperature, generators=[torch.Generator().manual_seed(1)])
        freq = torch.bincount(draws.flatten(), minlength=3).float() / draws.numel()
        # Binomial std of each frequency is below 0.003: 0.012 is four of them.
        assert torch.allclose(freq, torch.softmax(logits[0, 0] / temperature, dim=0), atol=0.012)


def test_top_k_and_top_p_keep_exactly_the_expected_tokens():
    # probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625 (sorted by token index)
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    logits = probs.log().expand(1, 20_000, 5)
    draws = sample_tokens(logits, top_k=2, generators=[torch.Generator().manual_seed(2)])
    freq = torch.bincount(draws.flatten(), minlength=5).float() / draws.numel()
    assert torch.allclose(freq, torch.tensor([2 / 3, 1 / 3, 0, 0, 0]), atol=0.012)
    # top_p 0.7: the smallest set of most likely tokens holding >= 0.7 of the mass is {0, 1} (0.75)
    draws = sample_tokens(logits, top_p=0.7, generators=[torch.Generator().manual_seed(3)])
    freq = torch.bincount(draws.flatten(), minlength=5).float() / draws.numel()
    assert torch.allclose(freq, torch.tensor([2 / 3, 1 / 3, 0, 0, 0]), atol=0.012)
    # top_p 0.8 needs token 2 as well (0.875)
    draws = sample_tokens(logits, top_p=0.8, generators=[torch.Generator().manual_seed(4)])
    freq = torch.bincount(draws.flatten(), minlength=5).float() / draws.numel()
    assert torch.allclose(freq, torch.tensor([4 / 7, 2 / 7, 1 / 7, 0, 0]), atol=0.012)
    # top_k larger than the vocabulary keeps everything
    draws = sample_tokens(logits, top_k=50, generators=[torch.Generator().manual_seed(5)])
    freq = torch.bincount(draws.flatten(), minlength=5).float() / draws.numel()
    assert torch.allclose(freq, probs, atol=0.012)


def ref_attention(attn, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    b, n, c = x.shape
    heads, d = attn.num_heads, c // attn.num_heads
    w = attn.qkv.weight
    q, k, v = x @ w[:c].T + attn.q_bias, x @ w[c:2 * c].T, x @ w[2 * c:].T + attn.v_bias
    q, k, v = (t.view(b, n, heads, d).transpose(1, 2) for t in (q, k, v))
    if attn.l2_norm:
        temp = attn.scale_mul.detach().clamp(max=math.log(100.0)).exp()
        q = q / q.norm(dim=-1, keepdim=True) * temp
        k = k / k.norm(dim=-1, keepdim=True)
        scale = 1.0
    else:
        scale = 0.25 / math.sqrt(d)
    att = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        att = att.masked_fill(~mask, -torch.inf)
    out = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    return out @ attn.proj.weight.T + attn.proj.bias


def ref_block(block, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None, eps: float) -> torch.Tensor:
    c = block.dim
    if block.shared_aln:
        mod = block.ada_gss + cond
    else:
        mod = (F.silu(cond) @ block.ada_lin.weight.T + block.ada_lin.bias).view(-1, 1, 6, c)
    gain1, gain2, scale1, scale2, shift1, shift2 = (mod[:, :, i] for i in range(6))

    def norm(t: torch.Tensor) -> torch.Tensor:
        mean, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mean) / torch.sqrt(var + eps)

    x = x + ref_attention(block.attn, norm(x) * (1 + scale1) + shift1, mask) * gain1
    h = norm(x) * (1 + scale2) + shift2
    mlp = block.mlp
    h = F.gelu(h @ mlp.fc1.weight.T + mlp.fc1.bias, approximate="tanh") @ mlp.fc2.weight.T + mlp.fc2.bias
    return x + h * gain2


def tiny_var(**kwargs) -> VAR:
    torch.manual_seed(0)
    config = dict(vocab_size=16, z_channels=4, scales=(1, 2, 3), num_classes=3, depth=2, embed_dim=16, num_heads=2,
                  norm_eps=0.05, cond_drop_rate=0.0) | kwargs
    model = VAR(**config)
    model.init_weights(init_adaln_gamma=0.7, init_head=1.0, init_adaln=0.9)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_bias.normal_()
            block.attn.v_bias.normal_()
            if block.attn.l2_norm:
                # one head's temperature above the cap of 100, the other below it
                block.attn.scale_mul.copy_(torch.tensor([math.log(400.0), math.log(2.5)]).view(1, 2, 1, 1))
    return model.eval()


@pytest.mark.parametrize("variant", [{}, {"attn_l2_norm": False}, {"shared_aln": True}])
def test_forward_matches_a_hand_written_transformer(variant: dict) -> None:
    model = tiny_var(**variant)
    labels = torch.tensor([2, 0])
    g = torch.Generator().manual_seed(1)
    # small teacher inputs, so that LayerNorm's eps (0.05 here) matters
    x_teacher = torch.randn(2, model.L - 1, 4, generator=g) * 0.1
    with torch.no_grad():
        logits = model(labels, x_teacher)
        cond = model.class_emb.weight[labels]
        level = torch.tensor([0] + [1] * 4 + [2] * 9)
        x = torch.cat((cond[:, None] + model.pos_start, x_teacher @ model.word_embed.weight.T + model.word_embed.bias),
                      dim=1) + model.lvl_embed.weight[level] + model.pos_embed
        mask = level[None, :] <= level[:, None]
        if model.shared_ada_lin is None:
            block_cond = cond
        else:
            block_cond = (F.silu(cond) @ model.shared_ada_lin.weight.T + model.shared_ada_lin.bias).view(-1, 1, 6, 16)
        for block in model.blocks:
            x = ref_block(block, x, block_cond, mask, 0.05)
        head = model.head_norm.ada_lin
        scale, shift = (F.silu(cond) @ head.weight.T + head.bias).view(-1, 1, 2, 16).unbind(2)
        x = F.layer_norm(x, (16,), eps=0.05) * (1 + scale) + shift
        expected = x @ model.head.weight.T + model.head.bias
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_scale_layout_and_block_causal_mask() -> None:
    model = VAR(vocab_size=8, z_channels=2, scales=(2, 3, 1), num_classes=2, depth=1, embed_dim=8, num_heads=2)
    assert model.first_l == 4 and model.L == 14
    assert model.begin_ends == [(0, 4), (4, 13), (13, 14)]
    assert model.level.tolist() == [0] * 4 + [1] * 9 + [2]
    expected = torch.tensor([[model.level[j] <= model.level[i] for j in range(14)] for i in range(14)])
    assert torch.equal(model.attn_mask, expected)
    assert model.attn_mask[3, 0] and model.attn_mask[0, 3] and not model.attn_mask[3, 4] and model.attn_mask[13, 0]
    assert model.pos_start.shape == (1, 4, 8) and model.pos_embed.shape == (1, 14, 8)
    assert model.lvl_embed.weight.shape == (3, 8)
    assert model.config["scales"] == [2, 3, 1]


def test_construction_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="^embed_dim 10 is not divisible by num_heads 4$"):
        VAR(embed_dim=10, num_heads=4, depth=1)
    with pytest.raises(ValueError, match=r"^VAR needs at least two scales, got \[3\]$"):
        VAR(scales=(3,), embed_dim=8, num_heads=2, depth=1)
    VAR(scales=(1, 2), embed_dim=8, num_heads=2, depth=1)  # two scales are enough


def test_stochastic_depth_grows_linearly_with_depth() -> None:
    model = VAR(vocab_size=8, z_channels=2, scales=(1, 2), num_classes=2, depth=3, embed_dim=8, num_heads=2,
                drop_path_rate=0.3)
    assert isinstance(model.blocks[0].drop_path, torch.nn.Identity)  # rate 0 at the first block
    assert [b.drop_path.p for b in model.blocks[1:]] == pytest.approx([0.15, 0.3])


def test_drop_path_drops_whole_samples_at_its_rate_and_rescales_the_rest() -> None:
    torch.manual_seed(0)
    drop = DropPath(0.25).train()
    x = torch.ones(40_000, 3, 2)
    out = drop(x)
    dropped = (out == 0).all(-1).all(-1)
    kept = (out == 1 / 0.75).all(-1).all(-1)
    assert bool((dropped ^ kept).all())
    # binomial std of the fraction is 0.0022: 0.01 is over four of them
    assert abs(dropped.float().mean().item() - 0.25) < 0.01
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)


def test_init_scalings_at_non_default_settings() -> None:
    torch.manual_seed(0)
    c, depth = 96, 3
    model = VAR(vocab_size=512, z_channels=8, scales=(1, 2), num_classes=3, depth=depth, embed_dim=c, num_heads=3)
    model.init_weights(init_adaln=0.3, init_adaln_gamma=0.01, init_head=0.1, init_std=0.05)

    def std(t: torch.Tensor) -> float:
        return t.detach().std().item()

    assert std(model.word_embed.weight) == pytest.approx(0.05, rel=0.05)
    assert std(model.class_emb.weight) == pytest.approx(0.05, rel=0.1)
    assert std(model.lvl_embed.weight) == pytest.approx(0.05, rel=0.3)
    assert std(model.head.weight) == pytest.approx(0.05 * 0.1, rel=0.05)
    assert std(model.head_norm.ada_lin.weight) == pytest.approx(0.05 * 0.3, rel=0.05)
    for block in model.blocks:
        assert std(block.attn.proj.weight) == pytest.approx(0.05 / math.sqrt(2 * depth), rel=0.05)
        assert std(block.mlp.fc2.weight) == pytest.approx(0.05 / math.sqrt(2 * depth), rel=0.05)
        assert std(block.mlp.fc1.weight) == pytest.approx(0.05, rel=0.05)
        assert std(block.ada_lin.weight[:2 * c]) == pytest.approx(0.05 * 0.01, rel=0.05)
        assert std(block.ada_lin.weight[2 * c:]) == pytest.approx(0.05 * 0.3, rel=0.05)
        assert not block.ada_lin.bias.any() and not block.mlp.fc1.bias.any() and not block.attn.proj.bias.any()
    # the defaults: init_std sqrt(1 / (3 C)), head 0.02, AdaLN 0.5, gains 1e-5
    model.init_weights()
    base = math.sqrt(1 / (3 * c))
    assert std(model.word_embed.weight) == pytest.approx(base, rel=0.05)
    assert std(model.head.weight) == pytest.approx(0.02 * base, rel=0.05)
    assert std(model.head_norm.ada_lin.weight) == pytest.approx(0.5 * base, rel=0.05)
    assert std(model.blocks[0].ada_lin.weight[:2 * c]) == pytest.approx(1e-5 * base, rel=0.05)


def test_shared_adaln_init_scales_the_gains_and_the_rest_separately() -> None:
    torch.manual_seed(0)
    c = 256
    model = VAR(vocab_size=8, z_channels=2, scales=(1, 2), num_classes=2, depth=2, embed_dim=c, num_heads=4,
                shared_aln=True, init_adaln_gamma=0.01)
    model.init_weights(init_adaln=0.3, init_adaln_gamma=0.01)
    for block in model.blocks:
        gss = block.ada_gss.detach()
        assert gss.shape == (1, 1, 6, c)
        # ada_gss starts as randn / sqrt(C), then the constructor's init and this one scale its gains and the rest apart
        # each of the six vectors on its own (C = 256 entries: the std is estimated within ~5%)
        for i in range(6):
            want = 0.01 * 0.01 if i < 2 else 0.5 * 0.3
            assert gss[:, :, i].std().item() == pytest.approx(want / math.sqrt(c), rel=0.15), i
    assert model.shared_ada_lin.weight.shape == (6 * c, c)


def test_unit_rows_normalises_the_last_dimension_in_the_input_dtype() -> None:
    t = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-7, 0.0]])
    out = unit_rows(t)
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]]))
    big = torch.full((2, 64), 300.0, dtype=torch.bfloat16)
    out = unit_rows(big)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), torch.full((2, 64), 0.125), atol=1e-3)
    # eps bounds the divisor from below: a tiny row is scaled by 1 / eps, not blown up to unit length
    assert torch.allclose(unit_rows(torch.tensor([[1e-7, 0.0]]), eps=1e-3), torch.tensor([[1e-4, 0.0]]))
    # fp16 (CUDA autocast): each square of 100 fits, their sum 6.4e5 is past fp16's 65504 and is summed in fp32
    half = unit_rows(torch.full((2, 64), 100.0, dtype=torch.float16))
    assert half.dtype == torch.float16 and torch.equal(half, torch.full((2, 64), 0.125, dtype=torch.float16))


def test_kv_cache_appends_scales_in_order_along_the_sequence() -> None:
    g = torch.Generator().manual_seed(0)
    k1, v1 = torch.randn(2, 3, 1, 4, generator=g), torch.randn(2, 3, 1, 4, generator=g)
    k2, v2 = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    cache = KVCache(5)
    k, v = cache.extend(k1, v1)
    assert torch.equal(k, k1) and torch.equal(v, v1)
    k, v = cache.extend(k2, v2)
    assert torch.equal(k, torch.cat((k1, k2), 2)) and torch.equal(v, torch.cat((v1, v2), 2))


def test_attention_with_a_cache_sees_every_earlier_scale() -> None:
    model = tiny_var()
    attn = model.blocks[0].attn
    # scales of 1, 4 and 9 tokens: 14 keys by the last one, more than the head's 8 dimensions
    x = torch.randn(2, 14, 16, generator=torch.Generator().manual_seed(3))
    mask = model.attn_mask
    with torch.no_grad():
        full = attn(x, [(0, 14, 14, mask)], None)
        cache = KVCache(14)
        steps = [attn(x[:, begin:end], (), cache) for begin, end in model.begin_ends]
        assert torch.allclose(full, ref_attention(attn, x, mask), atol=1e-5)
        # the same layout as unmasked groups, each query block on the keys of its prefix
        assert torch.allclose(attn(x, [(0, 1, 1, None), (1, 5, 5, None), (5, 14, 14, None)], None), full, atol=1e-5)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_global_stream_sampling_is_seeded_row_aligned_and_tempered() -> None:
    # row 0 favours token 0, row 1 favours token 2; probabilities at temperature 0.5 are the squares, renormalised
    p = torch.tensor([0.6, 0.3, 0.1])
    logits = torch.stack((p.log(), p.flip(0).log()))[:, None].expand(2, 20_000, 3)
    torch.manual_seed(5)
    draws = sample_tokens(logits, temperature=0.5)
    torch.manual_seed(5)
    assert torch.equal(sample_tokens(logits, temperature=0.5), draws)
    assert draws.shape == (2, 20_000)
    expected = p.square() / p.square().sum()
    for row, want in ((0, expected), (1, expected.flip(0))):
        freq = torch.bincount(draws[row], minlength=3).float() / 20_000
        # binomial std of each frequency is below 0.0035: 0.014 is four of them
        assert torch.allclose(freq, want, atol=0.014)


def test_seeded_sampling_depends_on_the_generator_only() -> None:
    logits = torch.randn(3, 50, 20, generator=torch.Generator().manual_seed(0))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    a = sample_tokens(logits, top_k=8, top_p=0.9, temperature=1.7, generators=gens())
    torch.manual_seed(123)
    b = sample_tokens(logits, top_k=8, top_p=0.9, temperature=1.7, generators=gens())
    assert torch.equal(a, b)
    # a token outside the 8 most likely of its row is never drawn
    top8 = logits.topk(8, dim=-1).indices
    assert bool((a[..., None] == top8).any(-1).all())
    other = sample_tokens(logits, top_k=8, top_p=0.9, temperature=1.7,
                          generators=[torch.Generator().manual_seed(s) for s in (1, 2, 4)])
    assert torch.equal(other[:2], a[:2]) and not torch.equal(other[2], a[2])


def test_top_k_and_top_p_together_keep_the_intersection() -> None:
    probs = torch.tensor([0.05, 0.4, 0.3, 0.15, 0.1])
    logits = probs.log().expand(1, 30_000, 5)
    # top_k 3 keeps {1, 2, 3} renormalised to 0.47, 0.35, 0.18; top_p 0.75 of that keeps {1, 2} (0.82)
    draws = sample_tokens(logits, top_k=3, top_p=0.75, generators=[torch.Generator().manual_seed(6)])
    freq = torch.bincount(draws.flatten(), minlength=5).float() / draws.numel()
    assert torch.allclose(freq, torch.tensor([0, 4 / 7, 3 / 7, 0, 0]), atol=0.012)
    # at temperature 4 the kept set of top_p 0.75 grows: probabilities flatten before the nucleus is cut
    tempered = (probs.log() / 4).softmax(0)
    draws = sample_tokens(logits, top_p=0.75, temperature=4.0, generators=[torch.Generator().manual_seed(7)])
    freq = torch.bincount(draws.flatten(), minlength=5).float() / draws.numel()
    keep = tempered.sort(descending=True).indices[:4]  # 0.25 + 0.23 + 0.20 = 0.68 < 0.75 needs a fourth
    want = torch.zeros(5)
    want[keep] = tempered[keep] / tempered[keep].sum()
    assert torch.allclose(freq, want, atol=0.012)


def test_sampler_refusals() -> None:
    logits = torch.zeros(2, 3, 4)
    for temperature in (0.0, -0.5):
        with pytest.raises(ValueError, match=f"temperature must be > 0, got {temperature}"):
            sample_tokens(logits, temperature=temperature)
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        sample_tokens(logits, generators=[torch.Generator() for _ in range(3)])


def test_scale_generators_are_seeded_from_image_seed_and_scale() -> None:
    gens = scale_generators([5, 5, 6], 2, torch.device("cpu"))
    a, b = np.random.SeedSequence([5, 2]).generate_state(2, np.uint32)
    assert gens[0].initial_seed() == int(a) << 32 | int(b)
    assert gens[0].initial_seed() == gens[1].initial_seed() != gens[2].initial_seed()
    assert gens[0].initial_seed() != scale_generators([5], 3, torch.device("cpu"))[0].initial_seed()


def test_embed_inputs_refuses_mismatched_shapes() -> None:
    model = tiny_var()
    good_x, good_labels = torch.zeros(2, model.L - 1, 4), torch.tensor([0, 1])
    model.embed_inputs(good_labels, good_x)
    for labels, x in ((good_labels, torch.zeros(2, model.L, 4)), (good_labels, torch.zeros(2, model.L - 1, 3)),
                      (torch.tensor([0, 1, 2]), good_x), (torch.tensor([[0, 1]]), good_x)):
        got = re.escape(f"{tuple(labels.shape)} and {tuple(x.shape)}")
        with pytest.raises(ValueError, match=rf"^expected labels \(2,\) and x_teacher \(2, 13, 4\), got {got}$"):
            model.embed_inputs(labels, x)


def test_generate_refuses_a_mismatched_vqvae_and_bad_teacher_prefixes() -> None:
    model = tiny_var()
    labels = torch.tensor([0, 1])

    def fake(scales=(1, 2, 3), vocab=16, z=4) -> SimpleNamespace:
        return SimpleNamespace(scales=scales, quantizer=SimpleNamespace(vocab_size=vocab, z_channels=z))

    for vq in (fake(scales=(1, 2, 4)), fake(vocab=32), fake(z=8)):
        with pytest.raises(ValueError, match="^the VQ-VAE's scales / vocabulary / z_channels differ from the VAR's$"):
            model.generate_idx(vq, labels)
    idx = [torch.zeros(2, pn, pn, dtype=torch.long) for pn in (1, 2, 3)]
    refusal = r"^coarse_k must be in \[0, 3\] with at least coarse_k token maps in coarse_idx$"
    for coarse_idx, coarse_k in ((idx, -1), (idx, 4), (None, 1), (idx[:1], 2)):
        with pytest.raises(ValueError, match=refusal):
            model.generate_idx(fake(), labels, coarse_idx=coarse_idx, coarse_k=coarse_k)
    with pytest.raises(ValueError, match="^3 seeds for 2 labels$"):
        model.generate_idx(fake(), labels, seeds=[1, 2, 3])


def test_top_p_keeps_the_smallest_set_that_reaches_it_exactly() -> None:
    # four equal logits: probabilities exactly 1/4, so two tokens hold exactly 0.5 of the mass, and top_p 0.5 keeps
    # two of them (not three); which two is the sort's choice among ties
    logits = torch.zeros(1, 4000, 4)
    draws = sample_tokens(logits, top_p=0.5, generators=[torch.Generator().manual_seed(8)])
    kept = torch.bincount(draws.flatten(), minlength=4)
    assert int((kept > 0).sum()) == 2
    assert abs(kept.max().item() / 4000 - 0.5) < 0.04  # the two share the draws evenly (std 0.008)


def tiny_vqvae() -> VQVAE:
    torch.manual_seed(0)
    vqvae = VQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, scales=(1, 2, 3)).eval()
    torch.nn.init.normal_(vqvae.quantizer.embedding.weight, std=0.5)
    return vqvae


@pytest.mark.parametrize("use_cache, guidance", [(True, 2.5), (False, 2.5), (True, 1.0), (True, 0.0)])
def test_greedy_generation_is_the_argmax_of_the_guided_masked_forward(use_cache: bool, guidance: float) -> None:
    model, vqvae = tiny_var(), tiny_vqvae()
    labels = torch.tensor([1, 2, 0, 1])
    idx = model.generate_idx(vqvae, labels, SamplingSettings(guidance, top_k=1), use_cache=use_cache)
    with torch.no_grad():
        x = vqvae.idx_to_var_input(idx)
        cond, uncond = model(labels, x), model(torch.full_like(labels, 3), x)
    for k, (begin, end) in enumerate(model.begin_ends):
        t = guidance * k / 2
        guided = (1 + t) * cond[:, begin:end] - t * uncond[:, begin:end]
        assert torch.equal(guided.argmax(-1), idx[k].flatten(1)), k


def test_each_scale_draws_from_its_own_random_stream() -> None:
    model, vqvae = tiny_var(), tiny_vqvae()
    with torch.no_grad():
        model.head.weight.zero_()  # every logit 0: uniform draws, whatever the model
    n = 64
    idx = model.generate_idx(vqvae, torch.arange(n) % 3, SamplingSettings(1.0), seeds=list(range(n)))
    # the first token of scale 1 equals the token of scale 0 by chance in 1 of 16 images (4 of 64, std 1.9)
    same = (idx[1][:, 0, 0] == idx[0][:, 0, 0]).sum().item()
    assert same <= 14
    assert len(set(idx[2].flatten().tolist())) == 16  # uniform over the whole vocabulary


def test_attention_groups_follow_the_scales() -> None:
    model = VAR(vocab_size=8, z_channels=2, num_classes=2, depth=1, embed_dim=8, num_heads=2)  # the default scales
    # scales of >= 64 tokens (8x8 and up) each form a group; the six smaller ones share the first, masked one
    assert model.group_bounds == [(0, 91), (91, 155), (155, 255), (255, 424), (424, 680)]
    groups = model.attn_groups(model.L)
    assert [g[:3] for g in groups] == [(0, 91, 91), (91, 155, 155), (155, 255, 255), (255, 424, 424), (424, 680, 680)]
    assert torch.equal(groups[0][3], model.attn_mask[:91, :91]) and all(g[3] is None for g in groups[1:])
    # a prefix of whole scales (sampling without the cache) cuts the groups at its end
    (begin, end, k_end, mask), = model.attn_groups(14)
    assert (begin, end, k_end) == (0, 14, 14) and torch.equal(mask, model.attn_mask[:14, :14])
    assert [g[:3] for g in model.attn_groups(255)] == [(0, 91, 91), (91, 155, 155), (155, 255, 255)]
    # a second scale of 64 tokens is a group of its own too
    big_second = VAR(vocab_size=8, z_channels=2, scales=(1, 8, 9), num_classes=2, depth=1, embed_dim=8, num_heads=2)
    assert big_second.group_bounds == [(0, 1), (1, 65), (65, 146)]


def masked_attention_and_grads(q, k, v, mask, scale, out_grad):
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    out.backward(out_grad.float())
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 0.3, 2.0])
def test_grouped_attention_is_the_masked_attention_in_value_and_gradient(dtype: torch.dtype, scale: float) -> None:
    model = VAR(vocab_size=8, z_channels=2, scales=(1, 2, 8, 9), num_classes=2, depth=1, embed_dim=8, num_heads=2)
    groups = model.attn_groups(model.L)
    assert [g[:3] for g in groups] == [(0, 5, 5), (5, 69, 69), (69, 150, 150)]
    g = torch.Generator().manual_seed(4)
    q, k, v, out_grad = (torch.randn(2, 3, model.L, 16, generator=g) for _ in range(4))
    expected = masked_attention_and_grads(q, k, v, model.attn_mask, scale, out_grad)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out = grouped_attention(q, k, v, groups, scale, 0.0)  # bf16 and fp16 on the CPU: the matmul path
    out.backward(out_grad.to(dtype))
    # bf16 keeps 8 bits: relative rms error ~0.5%, ~3% on the sharper softmax of scale 2; fp16 keeps 11 bits,
    # ~0.1-0.4%, which tells fp16 matmuls from bf16 ones
    tol = {torch.float32: 1e-5, torch.bfloat16: 0.03 if scale <= 1 else 0.05, torch.float16: 0.006}[dtype]
    for got, want in zip((out, q.grad, k.grad, v.grad), expected):
        assert got.dtype == dtype
        rel = (got.float() - want).square().mean().sqrt() / want.square().mean().sqrt()
        assert rel < tol, rel


def test_grouped_attention_drops_probabilities_in_reduced_precision_too() -> None:
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g).bfloat16() for _ in range(3))
    groups = [(0, 2, 2, None), (2, 6, 6, None)]
    assert torch.equal(grouped_attention(q, k, v, groups, 1.0, 1.0), torch.zeros_like(q))  # every probability dropped
    assert grouped_attention(q, k, v, groups, 1.0, 0.0).abs().sum() > 0


def test_grouped_forward_and_gradients_equal_one_masked_attention() -> None:
    torch.manual_seed(0)
    model = VAR(vocab_size=16, z_channels=4, scales=(1, 2, 8, 9), num_classes=3, depth=2, embed_dim=16, num_heads=2,
                cond_drop_rate=0.0)
    labels, x_teacher = torch.tensor([2, 0]), torch.randn(2, model.L - 1, 4, generator=torch.Generator().manual_seed(6))

    def logits_and_grads(bounds):
        model.group_bounds = bounds
        model.zero_grad()
        logits = model(labels, x_teacher)
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    grouped, grouped_grads = logits_and_grads([(0, 5), (5, 69), (69, model.L)])
    masked, masked_grads = logits_and_grads([(0, model.L)])  # one group: the whole block-causal mask
    assert torch.allclose(grouped, masked, atol=1e-5)
    assert len(grouped_grads) == len(masked_grads) > 10
    for a, b in zip(grouped_grads, masked_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_the_training_forward_compiles_as_one_graph_with_the_same_values_and_gradients() -> None:
    # train_var.py --compile=true: the grouped attention (bf16: its autograd.Function) must trace without a break
    torch.manual_seed(0)
    model = VAR(vocab_size=16, z_channels=4, scales=(1, 2, 8), num_classes=3, depth=1, embed_dim=16, num_heads=2,
                cond_drop_rate=0.0)
    labels, x_teacher = torch.tensor([1, 2]), torch.randn(2, model.L - 1, 4, generator=torch.Generator().manual_seed(7))
    results = []
    for forward in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = forward(labels, x_teacher)
        logits.square().mean().backward()
        results.append([logits.detach()] + [p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    for eager, compiled in zip(*results):
        assert torch.allclose(eager, compiled, rtol=1e-3, atol=1e-5), (eager - compiled).abs().max()


def test_mlp_is_the_tanh_gelu_between_its_linears_and_drops_its_output_at_its_rate() -> None:
    torch.manual_seed(0)
    mlp = MLP(4, 32, 0.3).eval()
    x = torch.randn(4000, 4) * 2
    h = x @ mlp.fc1.weight.T + mlp.fc1.bias
    gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    with torch.no_grad():
        out = mlp(x)
        expected = gelu @ mlp.fc2.weight.T + mlp.fc2.bias
        assert torch.allclose(out, expected, atol=1e-6)
        exact = F.gelu(h) @ mlp.fc2.weight.T + mlp.fc2.bias
        assert (exact - expected).abs().max() > 1e-4  # the exact GELU would fail the check above
        dropped = mlp.train()(x)
    zero = dropped == 0
    # binomial std of the fraction over 16 000 outputs is 0.0036: 0.015 is four of them
    assert abs(zero.float().mean().item() - 0.3) < 0.015
    assert torch.allclose(dropped[~zero], out[~zero] / 0.7, atol=1e-6)


def test_generate_decodes_what_generate_idx_draws_with_the_same_defaults() -> None:
    model, vqvae = tiny_var(), tiny_vqvae()
    with torch.no_grad():
        model.class_emb.weight.mul_(5)  # the class, and so the guidance, moves 15 of these 168 draws (cfg 0 vs 1.5)
    labels, seeds = torch.arange(12) % 3, list(range(12))
    images, idx = model.generate(vqvae, labels, seeds=seeds)
    assert all(torch.equal(a, b) for a, b in zip(idx, model.generate_idx(vqvae, labels, seeds=seeds)))
    assert torch.allclose(images, vqvae.idx_to_img(idx).add(1).mul(0.5), atol=1e-6)


def test_a_teacher_prefix_of_exactly_coarse_k_maps_is_kept() -> None:
    model, vqvae = tiny_var(), tiny_vqvae()
    labels = torch.tensor([0, 2])
    g = torch.Generator().manual_seed(9)
    teacher = [torch.randint(0, 16, (2, pn, pn), generator=g) for pn in (1, 2, 3)]
    for coarse_k in (1, 3):  # as many maps as coarse_k is enough, up to every scale
        idx = model.generate_idx(vqvae, labels, coarse_idx=teacher[:coarse_k], coarse_k=coarse_k, seeds=[1, 2])
        assert all(torch.equal(a, b) for a, b in zip(idx[:coarse_k], teacher[:coarse_k]))


def test_attention_starts_at_temperature_4_with_zero_biases_and_drops_at_its_rates() -> None:
    torch.manual_seed(0)
    attn = SelfAttention(16, 4, 0.0, 0.3, l2_norm=True)
    assert torch.equal(attn.scale_mul.detach(), torch.full((1, 4, 1, 1), math.log(4.0)))
    assert not attn.q_bias.any() and not attn.v_bias.any()
    x = torch.randn(2, 500, 16)
    groups = [(0, 500, 500, None)]
    with torch.no_grad():
        kept = attn.eval()(x, groups, None)
        assert torch.allclose(kept, ref_attention(attn, x, None), atol=1e-5)
        dropped = attn.train()(x, groups, None)
    zero = dropped == 0
    # the output projection's dropout: binomial std of the fraction over 16 000 outputs is 0.0036
    assert abs(zero.float().mean().item() - 0.3) < 0.015
    assert torch.allclose(dropped[~zero], kept[~zero] / 0.7, atol=1e-5)
    # every attention probability dropped in training leaves the projection's bias, in eval none is
    attn = SelfAttention(16, 4, 1.0, 0.0, l2_norm=False)
    with torch.no_grad():
        assert torch.allclose(attn.train()(x, groups, None), attn.proj.bias.expand(2, 500, 16))
        assert torch.allclose(attn.eval()(x, groups, None), ref_attention(attn, x, None), atol=1e-5)


def test_blocks_take_their_dropout_rates_and_mlp_width_from_the_model() -> None:
    model = VAR(vocab_size=8, z_channels=2, scales=(1, 2), num_classes=2, depth=2, embed_dim=16, num_heads=2,
                mlp_ratio=2.5, drop_rate=0.2, attn_drop_rate=0.4)
    for block in model.blocks:
        assert block.attn.attn_drop == 0.4 and block.attn.proj_drop.p == 0.2 and block.mlp.drop.p == 0.2
        assert block.mlp.fc1.out_features == block.mlp.fc2.in_features == 40


@pytest.mark.parametrize("variant", [{}, {"shared_aln": True, "attn_l2_norm": False}])
def test_the_checkpoint_holds_these_tensors_and_no_others(variant: dict) -> None:
    # the names and shapes a checkpoint holds (and convert_upstream.py maps the reference's onto)
    model = VAR(vocab_size=16, z_channels=4, scales=(1, 2), num_classes=3, depth=1, embed_dim=8, num_heads=2, **variant)
    expected = {"pos_start": (1, 1, 8), "pos_embed": (1, 5, 8), "word_embed.weight": (8, 4), "word_embed.bias": (8,),
                "class_emb.weight": (4, 8), "lvl_embed.weight": (2, 8), "blocks.0.attn.q_bias": (8,),
                "blocks.0.attn.v_bias": (8,), "blocks.0.attn.qkv.weight": (24, 8), "blocks.0.attn.proj.weight": (8, 8),
                "blocks.0.attn.proj.bias": (8,), "blocks.0.mlp.fc1.weight": (32, 8), "blocks.0.mlp.fc1.bias": (32,),
                "blocks.0.mlp.fc2.weight": (8, 32), "blocks.0.mlp.fc2.bias": (8,),
                "head_norm.ada_lin.weight": (16, 8), "head_norm.ada_lin.bias": (16,), "head.weight": (16, 8),
                "head.bias": (16,)}
    if variant:
        expected |= {"shared_ada_lin.weight": (48, 8), "shared_ada_lin.bias": (48,), "blocks.0.ada_gss": (1, 1, 6, 8)}
    else:
        expected |= {"blocks.0.attn.scale_mul": (1, 2, 1, 1), "blocks.0.ada_lin.weight": (48, 8),
                     "blocks.0.ada_lin.bias": (48,)}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_config_holds_every_architecture_argument_and_rebuilds_the_model() -> None:
    args = dict(vocab_size=12, z_channels=3, scales=[1, 3], num_classes=4, depth=2, embed_dim=12, num_heads=3,
                mlp_ratio=2.0, drop_rate=0.1, attn_drop_rate=0.2, drop_path_rate=0.3, norm_eps=1e-3,
                shared_aln=True, cond_drop_rate=0.25, attn_l2_norm=False)
    model = VAR(**args, init_adaln_gamma=0.1)
    assert model.config == args
    assert VAR(**model.config).config == args
    assert (model.vocab_size, model.z_channels, model.scales, model.num_classes) == (12, 3, (1, 3), 4)
    assert (model.embed_dim, model.cond_drop_rate) == (12, 0.25)


def test_position_embeddings_start_at_the_reference_std() -> None:
    torch.manual_seed(0)
    c = 96
    model = VAR(vocab_size=8, z_channels=2, scales=(1, 2, 3, 4, 5), num_classes=2, depth=1, embed_dim=c, num_heads=2)
    std = math.sqrt(1 / (3 * c))
    # init_weights leaves these two alone: the constructor's truncated normal of std sqrt(1 / (3 C)) stays
    assert model.pos_embed.detach().std().item() == pytest.approx(std, rel=0.05)
    assert model.pos_start.detach().std().item() == pytest.approx(std, rel=0.3)


def test_reduced_precision_on_the_cpu_runs_the_matmul_attention_unless_it_drops() -> None:
    # the speed rule of grouped_attention: bf16 on the CPU without dropout takes _GroupedAttention, the rest SDPA
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    groups = [(0, 2, 2, None), (2, 6, 6, None)]

    def backward_of(dtype: torch.dtype, dropout_p: float) -> str:
        a, b, c = (t.to(dtype).requires_grad_() for t in (q, k, v))
        return type(grouped_attention(a, b, c, groups, 0.5, dropout_p).grad_fn).__name__

    assert backward_of(torch.bfloat16, 0.0) == backward_of(torch.float16, 0.0) == "_GroupedAttentionBackward"
    assert backward_of(torch.float32, 0.0) == backward_of(torch.bfloat16, 0.1) == "CatBackward0"


def test_inputs_are_embedded_in_fp32_with_or_without_autocast() -> None:
    model = tiny_var()
    labels, x_teacher = torch.tensor([2, 1]), torch.randn(2, model.L - 1, 4, generator=torch.Generator().manual_seed(2))
    level = torch.tensor([0] + [1] * 4 + [2] * 9)
    with torch.no_grad():
        cond = model.class_emb.weight[labels]
        words = x_teacher @ model.word_embed.weight.T + model.word_embed.bias
        expected = torch.cat((cond[:, None] + model.pos_start, words), 1)
        expected = expected + model.lvl_embed.weight[level] + model.pos_embed
        for autocast in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                x, got_cond = model.embed_inputs(labels, x_teacher)
                half_input = model.embed_inputs(labels, x_teacher.bfloat16())[0]
            # a bf16 word embedding would differ in the third digit
            assert torch.allclose(x, expected, atol=1e-6) and torch.equal(got_cond, cond)
            assert x.dtype == half_input.dtype == torch.float32


def test_cosine_attention_hands_bf16_queries_keys_and_values_to_the_attention(monkeypatch) -> None:
    # the fp32 temperature must not promote q under autocast: a q of another dtype than k and v misses the bf16
    # matmul path on the CPU (and fails SDPA's one-dtype check outside autocast)
    seen: list[tuple[torch.dtype, ...]] = []

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *rest) -> torch.Tensor:
        seen.append((q.dtype, k.dtype, v.dtype))
        return grouped_attention(q, k, v, *rest)

    monkeypatch.setattr("models.var.grouped_attention", spy)
    attn = SelfAttention(16, 2, 0.0, 0.0, l2_norm=True).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(torch.randn(2, 5, 16), [(0, 5, 5, None)], None)
    assert seen == [(torch.bfloat16,) * 3]


def test_constructor_defaults_are_the_d16_shape() -> None:
    # train_var.py passes every constant but norm_eps; the rest are the defaults of a bare VAR(...) (16 blocks 1024 wide
    # take seconds to build, so the default width is checked on one block)
    model = VAR(embed_dim=16)
    assert model.config == dict(vocab_size=2048, z_channels=32, scales=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16], num_classes=6,
                                depth=16, embed_dim=16, num_heads=16, mlp_ratio=4.0, drop_rate=0.0, attn_drop_rate=0.0,
                                drop_path_rate=0.0, norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.1,
                                attn_l2_norm=True)
    assert model.blocks[0].norm.eps == model.head_norm.norm.eps == 1e-6
    assert VAR(depth=1).config["embed_dim"] == 1024  # the width too, on one block (a third of a second)


def test_unit_rows_in_fp16_keeps_a_tiny_row_finite_and_of_unit_length() -> None:
    # 1 / the norm of a row of 1e-6 is about 5e5, past fp16's 65504: cast first, it would make the row inf.
    tiny = torch.full((1, 4), 1e-6, dtype=torch.float16)
    out = unit_rows(tiny)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert torch.allclose(out.float(), torch.full((1, 4), 0.5), atol=1e-3)
    assert torch.equal(unit_rows(torch.zeros(1, 4, dtype=torch.float16)), torch.zeros(1, 4, dtype=torch.float16))
