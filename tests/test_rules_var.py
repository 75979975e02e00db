"""models/var.py rules at non-default settings: the class-dropout rate on a large draw, and which label a dropped
sample gets; the sampling temperature on both sides of 1."""
from __future__ import annotations

import torch

from models.var import VAR, sample_tokens


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
