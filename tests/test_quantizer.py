"""models/quantizer.py at non-default settings: which phi each scale uses, the phi blend ratio, the VQ loss value
and where its gradients flow (commitment to the encoder, codebook term to the codes), code hits per scale, code
search, and every refusal."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.quantizer import MultiScaleQuantizer, phi_indices

SCALES = (1, 2, 4)


def quantizer(**kwargs) -> MultiScaleQuantizer:
    torch.manual_seed(0)
    q = MultiScaleQuantizer(**(dict(vocab_size=16, z_channels=3, scales=SCALES) | kwargs))
    torch.nn.init.normal_(q.embedding.weight, std=1.0)
    return q


def features(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def test_phi_indices_by_hand():
    # ticks at linspace(1/(3K), 1 - 1/(3K)) for K == 4, else linspace(1/(2K), 1 - 1/(2K)); scale k at k/(n-1)
    assert phi_indices(6, 4) == [0, 0, 1, 2, 3, 3]
    assert phi_indices(6, 3) == [0, 0, 1, 1, 2, 2]
    assert phi_indices(5, 2) == [0, 0, 0, 1, 1]  # 0.5 sits between both ticks: the lower index wins
    assert phi_indices(4, 1) == [0, 0, 0, 0]
    assert phi_indices(3, 3) == [0, 1, 2]
    # where the two margins part ways (values of the reference's float arithmetic, ties included)
    assert phi_indices(9, 4) == [0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert phi_indices(11, 5) == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    q = MultiScaleQuantizer(16, 3, (1, 2, 3, 4, 5), phi_share=0)
    assert len(q.phis) == 5 and q.phi_index == [0, 1, 2, 3, 4]
    q = MultiScaleQuantizer(16, 3, (1, 2, 3, 4, 5), phi_share=2)
    assert len(q.phis) == 2 and q.phi_index == [0, 0, 0, 1, 1]


def test_phi_blends_the_conv_by_the_ratio_and_upsamples_all_but_the_last_scale():
    q = quantizer(phi_ratio=-0.3, phi_share=2)  # the sign of the ratio is ignored, as in the reference
    assert q.phi_ratio == pytest.approx(0.3)
    h = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert torch.allclose(q.phi(2, h), 0.7 * h + 0.3 * q.phis[1](h), atol=1e-6)
        assert torch.allclose(q.phi(0, h), 0.7 * h + 0.3 * q.phis[0](h), atol=1e-6)
        assert torch.allclose(q.upsample_code(2, h), q.phi(2, h))  # last scale: full size, no resampling
        small = torch.randn(2, 3, 2, 2)
        up = F.interpolate(small, size=(4, 4), mode="bicubic")
        assert torch.allclose(q.upsample_code(1, small), q.phi(1, up), atol=1e-6)
    identity = quantizer(phi_ratio=1e-7)
    assert len(identity.phis) == 0 and torch.equal(identity.phi(0, h), h)


def test_nearest_code_by_distance_and_by_angle():
    q = quantizer(vocab_size=3)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[1.0, 0, 0], [10.0, 0, 0], [0, 2.0, 0]]))
    z = torch.tensor([[4.0, 0, 0], [6.0, 0, 0], [0, 1.5, 0], [1.0, 1.2, 0]])
    assert q.nearest_code(z).tolist() == [0, 1, 2, 0]  # [1, 1.2] is nearer to code 0 by distance
    q.using_znorm = True
    # by angle: [4,0,0] and [6,0,0] are equally close to codes 0 and 1 (ties to the first); [1, 1.2] leans to code 2
    assert q.nearest_code(z).tolist() == [0, 0, 2, 2]
    assert q.nearest_code(torch.tensor([[1.0, 0.9, 0]])).tolist() == [0]


def test_vq_loss_value_and_where_its_gradients_flow():
    q = quantizer(beta=0.4, phi_ratio=0.0)
    f = features().requires_grad_(True)
    out = q(f)
    f_hats = q.f_to_fhats(f.detach())
    mse = torch.stack([F.mse_loss(fh, f.detach()) for fh in f_hats])
    assert torch.allclose(out.vq_loss, (1 + 0.4) * mse.mean(), rtol=1e-5)
    out.vq_loss.backward()
    # the encoder gets only the commitment term, scaled by beta; the codes get the codebook term
    expected = sum(0.4 * 2 * (f.detach() - fh) / f.numel() for fh in f_hats) / len(SCALES)
    assert torch.allclose(f.grad, expected, atol=1e-6)
    assert q.embedding.weight.grad.abs().sum() > 0

    f.grad = None
    q.embedding.weight.grad = None
    out = q(f)
    assert torch.allclose(out.f_hat, f_hats[-1], atol=1e-6)
    weights = torch.randn_like(f)
    (out.f_hat * weights).sum().backward()
    assert torch.equal(f.grad, weights)  # straight-through: the decoder's gradient reaches the encoder unchanged
    assert q.embedding.weight.grad is None or q.embedding.weight.grad.abs().sum() == 0


def test_code_hits_count_each_scale_separately():
    q = quantizer()
    f = features(3)
    out = q(f)
    idx = q.f_to_idx(f)
    assert out.code_hits.shape == (3, 16) and out.code_hits.dtype == torch.int64
    for k, pn in enumerate(SCALES):
        assert torch.equal(out.code_hits[k], torch.bincount(idx[k].flatten(), minlength=16))
        assert int(out.code_hits[k].sum()) == 3 * pn * pn


def test_the_residual_shrinks_scale_by_scale_and_paths_agree():
    q = quantizer(phi_ratio=0.0)
    f = features()
    idx = q.f_to_idx(f)
    f_hats = q.f_to_fhats(f)
    # scale 0 quantizes the area-mean of the features: its code is the nearest to that mean
    mean = f.mean((2, 3))
    assert torch.equal(idx[0].flatten(), q.nearest_code(mean))
    errors = [F.mse_loss(fh, f).item() for fh in f_hats]
    assert errors[2] < errors[0]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(q.idx_to_fhats(idx), f_hats))
    assert len(q.idx_to_fhats(idx[:2])) == 2
    var_in = q.idx_to_var_input(idx)
    assert var_in.shape == (2, 4 + 16, 3)
    assert torch.allclose(var_in[:, :4], F.interpolate(f_hats[0], size=(2, 2), mode="area").flatten(2).transpose(1, 2))
    assert torch.allclose(var_in[:, 4:], f_hats[1].flatten(2).transpose(1, 2), atol=1e-6)
    f_hat, nxt = q.next_scale_input(0, torch.zeros_like(f), q.embed(idx[0], 0))
    assert torch.allclose(f_hat, f_hats[0]) and torch.allclose(nxt, F.interpolate(f_hat, size=(2, 2), mode="area"))
    f_hat, nxt = q.next_scale_input(2, f_hats[1], q.embed(idx[2], 2))
    assert torch.allclose(f_hat, f_hats[2], atol=1e-6) and nxt is None
    assert torch.equal(q.embed(idx[1].flatten(1), 1), q.embed(idx[1], 1))


def test_every_refusal():
    for scales in ((4,), (1, 2, 2), (2, 1), (0, 2)):
        with pytest.raises(ValueError, match=rf"^scales must be at least two strictly increasing positive sides, got "
                                             rf"{tuple(scales)}".replace("(", r"\(").replace(")", r"\)")):
            MultiScaleQuantizer(16, 3, scales)
    with pytest.raises(ValueError, match=r"^phi_share must be >= 0 \(0 = one phi per scale\), got -1$"):
        MultiScaleQuantizer(16, 3, SCALES, phi_share=-1)
    q = quantizer()
    with pytest.raises(ValueError, match=r"^token map of scale 1 must be \(B, 2, 2\) or \(B, 4\), got \(2, 3\)$"):
        q.embed(torch.zeros(2, 3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"token map of scale 1"):
        q.embed(torch.zeros(2, 2, 2, 1, dtype=torch.long), 1)
    for shape in ((2, 3, 4), (2, 2, 4, 4), (2, 3, 5, 4), (2, 3, 4, 5)):
        with pytest.raises(ValueError, match=r"^features must be \(B, 3, 4, 4\) \(the last scale is the feature map's "
                                             r"side\), got"):
            q(torch.zeros(shape))
    idx = q.f_to_idx(features())
    with pytest.raises(ValueError, match=r"^expected 1\.\.3 token maps, got 0$"):
        q.idx_to_fhats([])
    with pytest.raises(ValueError, match=r"^expected 1\.\.3 token maps, got 4$"):
        q.idx_to_fhats(idx + idx[:1])
    with pytest.raises(ValueError, match=r"^expected 3 token maps, got 2$"):
        q.idx_to_var_input(idx[:2])


def test_reference_defaults_and_code_init():
    q = MultiScaleQuantizer(512, 3, (1, 2))  # two scales are enough
    assert (q.beta, q.phi_ratio, len(q.phis), q.using_znorm) == (0.25, 0.5, 4, False)
    w = q.embedding.weight.detach()
    # uniform in [-1/V, 1/V] (taming's init), spread over the whole range
    assert w.min() >= -1 / 512 and w.max() <= 1 / 512 and w.min() < -0.9 / 512 and w.max() > 0.9 / 512
    assert len(MultiScaleQuantizer(16, 3, SCALES, phi_ratio=1e-6).phis) == 0  # 1e-6 already counts as no phi


def test_paths_agree_with_phi_convs_and_resample_by_area():
    torch.manual_seed(0)
    q = MultiScaleQuantizer(16, 3, (1, 2, 3, 4), phi_ratio=0.5, phi_share=2)
    torch.nn.init.normal_(q.embedding.weight, std=1.0)
    f = features()
    idx, f_hats = q.f_to_idx(f), q.f_to_fhats(f)
    again = q.idx_to_fhats(idx)
    assert all(a.dtype == torch.float32 and torch.allclose(a, b, atol=1e-5) for a, b in zip(again, f_hats))
    assert len(q.idx_to_fhats(idx[:1])) == 1
    var_in = q.idx_to_var_input(idx)
    area = F.interpolate(f_hats[1], size=(3, 3), mode="area").flatten(2).transpose(1, 2)
    assert var_in.dtype == torch.float32 and torch.allclose(var_in[:, 4:4 + 9], area, atol=1e-6)
    f_hat, nxt = q.next_scale_input(1, f_hats[0], q.embed(idx[1], 1))
    assert torch.allclose(f_hat, f_hats[1], atol=1e-5) and f_hat.dtype == torch.float32
    assert torch.allclose(nxt, F.interpolate(f_hat, size=(3, 3), mode="area"), atol=1e-6)
    one = q.embed(idx[2][:1], 2)  # a batch of one
    assert one.shape == (1, 3, 3, 3)
    two = MultiScaleQuantizer(16, 3, (1, 2), phi_ratio=0.0)
    assert two.idx_to_var_input(two.f_to_idx(torch.randn(1, 3, 2, 2))).shape == (1, 4, 3)
