"""The VAR transformer on small random models: masking, KV cache, guidance, teacher prefix, precision, checkpoints."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.checkpoint import CheckpointError
from common.io import atomic_torch_save
from models.var import VAR, KVCache, SamplingSettings, load_var, sample_tokens
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
