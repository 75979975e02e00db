"""The multi-scale VQ-VAE on small random models: shapes, code hits, consistency of its paths, precision, checkpoints."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.checkpoint import CheckpointError
from common.io import atomic_torch_save
from models.quantizer import MultiScaleQuantizer, phi_indices
from models.vqvae import VQVAE, load_vqvae

SCALES = (1, 2, 3, 4)  # 64 px images -> 4x4 features with the default ch_mult (downsampling 16)


def small_vqvae(**kwargs) -> VQVAE:
    torch.manual_seed(0)
    config = dict(vocab_size=64, z_channels=8, ch=32, scales=SCALES) | kwargs
    model = VQVAE(**config).eval()
    # Codes on the scale of the encoder's output, so that many different codes get picked.
    torch.nn.init.normal_(model.quantizer.embedding.weight, std=0.5)
    return model


def images(b: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module")
def model() -> VQVAE:
    return small_vqvae()


def test_config_rebuilds_the_same_model(model: VQVAE) -> None:
    again = VQVAE(**model.config)
    assert again.config == model.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert model.image_size == 64 and model.scales == SCALES


def test_forward_outputs_and_code_hits(model: VQVAE) -> None:
    img = images(3)
    out = model(img)
    assert out.rec.shape == img.shape and out.rec.dtype == torch.float32
    assert out.vq_loss.dim() == 0 and out.vq_loss.item() > 0
    assert out.code_hits.shape == (len(SCALES), 64) and out.code_hits.dtype == torch.int64
    assert out.code_hits.sum(1).tolist() == [3 * pn * pn for pn in SCALES]
    idx = model.img_to_idx(img)
    for k, pn in enumerate(SCALES):
        assert idx[k].shape == (3, pn, pn) and idx[k].dtype == torch.int64
        assert torch.equal(out.code_hits[k], torch.bincount(idx[k].flatten(), minlength=64))


def test_gradients_reach_every_part(model: VQVAE) -> None:
    model.zero_grad()
    out = model(images())
    (F.mse_loss(out.rec, images()) + out.vq_loss).backward()
    for name in ("encoder.conv_in.weight", "quant_conv.weight", "quantizer.embedding.weight", "quantizer.phis.0.weight",
                 "post_quant_conv.weight", "decoder.conv_out.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    model.zero_grad()


def test_prefix_decode_is_each_images_own_prefix_and_leaves_the_full_reconstruction_alone(model: VQVAE) -> None:
    img = images(3)
    prefix_k = torch.tensor([1, 3, len(SCALES)])
    with torch.no_grad():
        out, plain = model(img, prefix_k), model(img)
        idx = model.img_to_idx(img)
        want = torch.cat([model.decode(model.idx_to_fhats([m[i:i + 1] for m in idx[:k]])[-1])
                          for i, k in enumerate(prefix_k.tolist())])
    assert plain.rec_prefix is None
    torch.testing.assert_close(out.rec, plain.rec, atol=1e-5, rtol=1e-5)  # one decoder batch of both: last bits
    torch.testing.assert_close(out.rec_prefix, want, atol=1e-4, rtol=1e-4)
    assert (out.rec_prefix[0] - out.rec_prefix[1]).abs().max() > 1e-3  # a 1-scale prefix is not a 3-scale one


def test_the_prefix_reaches_the_encoder_through_the_low_pass_and_the_codes_directly(model: VQVAE) -> None:
    q = model.quantizer
    f = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    weight = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(3))
    out = q(f, torch.tensor([2, 2]))
    q.embedding.weight.grad = None
    (out.f_prefix * weight).sum().backward()
    low = q.low_pass(1, f.detach().clone().requires_grad_())
    (low * weight).sum().backward()
    # The straight-through part: f's gradient is the low pass at the 2x2 scale's, not the identity of the full f_hat.
    torch.testing.assert_close(f.grad, torch.autograd.grad((q.low_pass(1, f) * weight).sum(), f)[0])
    assert not torch.allclose(f.grad, weight)
    assert q.embedding.weight.grad is not None and q.embedding.weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(out.f_prefix, q.f_to_fhats(f)[1])


def test_paths_agree(model: VQVAE) -> None:
    img = images()
    idx = model.img_to_idx(img)
    rec = model.reconstruct(img)
    assert rec.min() >= -1 and rec.max() <= 1
    assert torch.allclose(model.idx_to_img(idx), rec, atol=1e-5)
    flat = [t.flatten(1) for t in idx]  # (B, pn*pn) is accepted as well
    assert torch.allclose(model.idx_to_img(flat), rec, atol=1e-5)
    with torch.no_grad():
        fhats = model.quantizer.f_to_fhats(model.encode(img))
        out = model(img)
    for ours, theirs in zip(model.idx_to_fhats(idx), fhats):
        assert torch.allclose(ours, theirs, atol=1e-5)
    # The training forward decodes the same f_hat (straight-through only changes gradients). Its f_hat differs in the
    # last bit ((f_hat - f) + f), which the random decoder's convolutions amplify to ~2e-5: the parity tolerance.
    assert torch.allclose(out.rec.clamp(-1, 1), rec, atol=1e-4)
    coarse = model.idx_to_img(idx[:2])
    assert coarse.shape == rec.shape and not torch.allclose(coarse, rec)


def test_teacher_input_and_sampling_steps(model: VQVAE) -> None:
    idx = model.img_to_idx(images())
    x = model.idx_to_var_input(idx)
    assert x.shape == (2, sum(pn * pn for pn in SCALES) - 1, 8)
    fhats = model.idx_to_fhats(idx)
    expected = torch.cat([F.interpolate(f, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)
                          for f, pn in zip(fhats[:-1], SCALES[1:])], dim=1)
    assert torch.allclose(x, expected)
    # next_scale_input, used by the transformer's sampler, walks the same path one scale at a time.
    q = model.quantizer
    f_hat = torch.zeros_like(fhats[0])
    inputs = []
    with torch.no_grad():
        for k in range(len(SCALES)):
            f_hat, nxt = q.next_scale_input(k, f_hat, q.embed(idx[k], k))
            assert torch.allclose(f_hat, fhats[k], atol=1e-6)
            if nxt is not None:
                inputs.append(nxt.flatten(2).transpose(1, 2))
    assert nxt is None and torch.allclose(torch.cat(inputs, 1), x, atol=1e-6)


def test_phi_sharing_modes() -> None:
    assert phi_indices(10, 1) == [0] * 10
    assert phi_indices(10, 10) == list(range(10))
    for k in (2, 3, 4, 6):
        chosen = phi_indices(10, k)
        assert chosen[0] == 0 and chosen[-1] == k - 1 and chosen == sorted(chosen)
    for share, count in ((0, len(SCALES)), (1, 1), (2, 2), (4, 4)):
        assert len(small_vqvae(phi_share=share).quantizer.phis) == count
    identity = small_vqvae(phi_ratio=0.0).quantizer
    h = torch.randn(1, 8, 4, 4)
    assert len(identity.phis) == 0 and torch.equal(identity.phi(0, h), h)


def test_cosine_code_search() -> None:
    q = MultiScaleQuantizer(16, 4, SCALES, using_znorm=True)
    z = torch.randn(32, 4)
    expected = (F.normalize(z, dim=1) @ F.normalize(q.embedding.weight, dim=1).T).argmax(1)
    assert torch.equal(q.nearest_code(z), expected)
    l2 = MultiScaleQuantizer(16, 4, SCALES)
    assert torch.equal(l2.nearest_code(z), torch.cdist(z, l2.embedding.weight).argmin(1))


def test_bf16_autocast(model: VQVAE) -> None:
    img = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(img)
        idx = model.img_to_idx(img)
        rec = model.idx_to_img(idx)
    assert out.rec.shape == img.shape and out.vq_loss.dtype == torch.float32
    assert out.code_hits.sum(1).tolist() == [2 * pn * pn for pn in SCALES]
    assert [t.shape for t in idx] == [(2, pn, pn) for pn in SCALES] and rec.shape == img.shape


def test_bad_inputs_are_named(model: VQVAE) -> None:
    with pytest.raises(ValueError, match="image size"):
        model(images(size=32))
    with pytest.raises(ValueError, match="scale 1"):
        model.idx_to_img([torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)])
    with pytest.raises(ValueError, match="strictly increasing"):
        VQVAE(scales=(1, 3, 2))


def test_load_vqvae_round_trip(model: VQVAE, tmp_path: Path) -> None:
    path = tmp_path / "vqvae.pth"
    atomic_torch_save({"model": model.state_dict(), "model_config": model.config}, path)
    loaded = load_vqvae(path)
    assert not loaded.training and loaded.config == model.config
    img = images()
    assert torch.equal(loaded.reconstruct(img), model.reconstruct(img))
    atomic_torch_save({"model": model.state_dict()}, tmp_path / "no_config.pth")
    with pytest.raises(CheckpointError, match="model_config"):
        load_vqvae(tmp_path / "no_config.pth")
    atomic_torch_save({"model": model.state_dict(), "model_config": model.config | {"ch": 64}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_vqvae(tmp_path / "bad.pth")


def test_grey_model_sees_the_grey_and_gives_grey_rgb_images() -> None:
    """in_channels=1: the encoder sees the channel mean (of a grey image, the grey), every output is three equal
    channels, so no colour can appear; gradients flow through the one channel."""
    grey = small_vqvae(in_channels=1).train()
    assert grey.encoder.conv_in.weight.shape[1] == 1 and grey.decoder.conv_out.weight.shape[0] == 1
    img = images(2)
    as_grey = img.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    assert torch.equal(grey.encode(img), grey.encode(as_grey))  # a colour input is reduced to its mean
    out = grey(as_grey)
    assert out.rec.shape == (2, 3, 64, 64)
    assert torch.equal(out.rec[:, 0], out.rec[:, 1]) and torch.equal(out.rec[:, 1], out.rec[:, 2])
    (out.rec.square().mean() + out.vq_loss).backward()
    assert grey.decoder.conv_out.weight.grad.abs().sum() > 0 and grey.encoder.conv_in.weight.grad.abs().sum() > 0
    grey.eval()
    rec = grey.reconstruct(as_grey)
    assert rec.shape == (2, 3, 64, 64) and torch.equal(rec[:, 0], rec[:, 2])
    assert torch.equal(grey.idx_to_img(grey.img_to_idx(as_grey)), rec)
    assert VQVAE(**grey.config).config["in_channels"] == 1
