"""models/discriminator.py pinned down: the layer widths, strides and patch grid, the init, per-image normalisation,
and the two hinge losses by hand (issue 16)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models.discriminator import PatchDiscriminator
from models.vqvae_losses import hinge_d_loss, hinge_g_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_layers_widen_up_to_eight_times_and_stride_two_except_the_last_two():
    disc = PatchDiscriminator(in_channels=3, ch=16, num_layers=4)
    assert disc.config == {"in_channels": 3, "ch": 16, "num_layers": 4}
    convs = [m for m in disc.net if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0], c.kernel_size[0], c.padding[0]) for c in convs] == [
        (3, 16, 2, 4, 1), (16, 32, 2, 4, 1), (32, 64, 2, 4, 1), (64, 128, 2, 4, 1), (128, 128, 1, 4, 1),
        (128, 1, 1, 4, 1)]
    assert [c.bias is not None for c in convs] == [True, False, False, False, False, True]  # GroupNorm follows the rest
    norms = [m for m in disc.net if isinstance(m, nn.GroupNorm)]
    assert [(n.num_groups, n.num_channels) for n in norms] == [(32, 32), (32, 64), (32, 128), (32, 128)]
    slopes = [m.negative_slope for m in disc.net if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.2] * 5
    kinds = [type(m).__name__ for m in disc.net]
    assert kinds == ["Conv2d", "LeakyReLU"] + ["Conv2d", "GroupNorm", "LeakyReLU"] * 4 + ["Conv2d"]
    # 64 px: three stride-2 convs give 8x8, the two stride-1 4x4 convs (padding 1) 7x7 then 6x6 patch logits
    assert PatchDiscriminator(1, 32, 3)(torch.zeros(2, 1, 64, 64)).shape == (2, 1, 6, 6)
    assert PatchDiscriminator()(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 6, 6)
    assert PatchDiscriminator().config == {"in_channels": 1, "ch": 64, "num_layers": 3}


def test_dcgan_init():
    torch.manual_seed(0)
    disc = PatchDiscriminator(in_channels=1, ch=64, num_layers=3)
    convs = [m for m in disc.net if isinstance(m, nn.Conv2d)]
    big = torch.cat([c.weight.flatten() for c in convs])
    assert abs(big.mean().item()) < 2e-4 and big.std().item() == pytest.approx(0.02, rel=0.01)
    gains = torch.cat([m.weight for m in disc.net if isinstance(m, nn.GroupNorm)])
    assert gains.mean().item() == pytest.approx(1.0, abs=2e-3) and gains.std().item() == pytest.approx(0.02, rel=0.1)
    assert all((m.bias == 0).all() for m in disc.net if isinstance(m, nn.GroupNorm))


def test_each_image_is_judged_on_its_own():
    torch.manual_seed(1)
    disc = PatchDiscriminator(in_channels=1, ch=16, num_layers=2)
    images = torch.rand(3, 1, 24, 24) * 2 - 1
    together = disc(images)
    apart = torch.cat([disc(images[i:i + 1]) for i in range(3)])
    assert together.shape == (3, 1, 4, 4) and (together - apart).abs().max().item() < 1e-5


def test_hinge_losses_by_hand():
    real = torch.tensor([[2.0, 0.5]], dtype=torch.float16)
    fake = torch.tensor([[-2.0, 0.3]], dtype=torch.float16)
    d = hinge_d_loss(real, fake)  # 0.5 * (mean(0, 0.5) + mean(0, 1.3))
    assert d.dtype == torch.float32 and d.item() == pytest.approx(0.5 * (0.25 + 0.65), rel=1e-3)
    g = hinge_g_loss(fake)
    assert g.dtype == torch.float32 and g.item() == pytest.approx(0.85, rel=1e-3)
    assert hinge_d_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -5.0])).item() == 0.0  # beyond the margins
