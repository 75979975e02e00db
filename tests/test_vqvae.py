"""The multi-scale VQ-VAE on small random models: shapes, code hits, consistency of its paths, precision, checkpoints.

models/vqvae.py pinned down on tiny models (8 px images): every constructor argument reaches the part it configures,
each path composes its parts exactly (bit for bit, not to a tolerance), the grey model's channel mean and repeat,
the clamp and float32 of the image paths, and the checkpoint's device (issue 16)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.checkpoint import CheckpointError
from common.io import atomic_torch_save
from models import vqvae as vqvae_module
from models.basic_vae import Decoder, Encoder
from models.quantizer import MultiScaleQuantizer, phi_indices
from models.vqvae import VQVAE, load_vqvae

pytestmark = pytest.mark.usefixtures("one_torch_thread")
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


TINY_SCALES = (1, 2, 4)  # ch_mult (1, 2) downsamples by 2: 8 px images


def tiny(**kwargs) -> VQVAE:
    torch.manual_seed(0)
    model = VQVAE(**(dict(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, scales=TINY_SCALES)
                     | kwargs)).eval()
    nn.init.normal_(model.quantizer.embedding.weight, std=0.5)  # codes on the encoder's scale: many get picked
    return model


def tiny_images(b: int = 2, c: int = 3) -> torch.Tensor:
    return torch.rand(b, c, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_every_argument_is_recorded_and_reaches_its_part():
    model = VQVAE(vocab_size=24, z_channels=6, ch=32, ch_mult=np.array([1, 2, 2]), num_res_blocks=1, dropout=0.1,
                  beta=0.4, using_znorm=True, phi_ratio=0.3, phi_share=2, scales=np.array([1, 2, 3]), in_channels=1)
    assert model.config == dict(vocab_size=24, z_channels=6, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, dropout=0.1,
                                beta=0.4, using_znorm=True, phi_ratio=0.3, phi_share=2, scales=[1, 2, 3],
                                in_channels=1)
    # numpy sides become plain ints: the config is saved in checkpoints loaded with weights_only=True
    assert [type(v) for v in model.config["ch_mult"] + model.config["scales"]] == [int] * 6
    assert model.in_channels == 1 and model.downsample == 4 and model.image_size == 12 and model.scales == (1, 2, 3)
    assert shapes(model.encoder) == shapes(Encoder(32, (1, 2, 2), 1, 6, 1, 0.0))
    assert shapes(model.decoder) == shapes(Decoder(32, (1, 2, 2), 1, 6, 1, 0.0))
    assert model.encoder.conv_in.in_channels == 1 and model.decoder.conv_out.out_channels == 1
    for part in (model.encoder, model.decoder):
        rates = [m.p for m in part.modules() if isinstance(m, nn.Dropout)]
        assert len(rates) > 0 and set(rates) == {0.1}
    for conv in (model.quant_conv, model.post_quant_conv):
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (
            6, 6, (3, 3), (1, 1), (1, 1))
    q = model.quantizer
    assert (q.vocab_size, q.z_channels, q.scales, q.beta, q.using_znorm, q.phi_ratio, len(q.phis)) == (
        24, 6, (1, 2, 3), 0.4, True, 0.3, 2)
    assert VQVAE(**model.config).config == model.config
    assert tiny(ch_mult=(1, 1, 2, 2)).image_size == 32  # 2^(4 - 1) times the last scale


def test_the_defaults_are_the_reference_s_where_a_converted_checkpoint_relies_on_them():
    """models/convert_upstream.py builds a VQVAE from what the reference's weights tell; the rest (beta, z-norm, phi
    ratio, dropout, scales) are these defaults, the reference's."""
    config = VQVAE(ch=32).config
    assert config == dict(vocab_size=2048, z_channels=32, ch=32, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2,
                          dropout=0.0, beta=0.25, using_znorm=False, phi_ratio=0.5, phi_share=4,
                          scales=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16], in_channels=3)
    assert VQVAE(ch_mult=(1, 1), num_res_blocks=1).config["ch"] == 128


def test_encode_is_the_quant_conv_of_the_encoder_and_a_grey_model_sees_the_channel_mean():
    rgb = tiny()
    img = tiny_images()
    with torch.no_grad():
        assert torch.equal(rgb.encode(img), rgb.quant_conv(rgb.encoder(img)))
        grey = tiny(in_channels=1)
        f = grey.encode(img)
        assert f.shape == (2, 4, 4, 4)
        assert torch.equal(f, grey.quant_conv(grey.encoder(img.mean(1, keepdim=True))))


def test_decode_is_the_decoder_of_the_post_quant_conv_and_a_grey_model_repeats_its_channel():
    f = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        rgb = tiny()
        assert torch.equal(rgb.decode(f), rgb.decoder(rgb.post_quant_conv(f)))
        grey = tiny(in_channels=1)
        one = grey.decoder(grey.post_quant_conv(f))
        out = grey.decode(f)
    assert one.shape == (2, 1, 8, 8) and out.shape == (2, 3, 8, 8)
    assert all(torch.equal(out[:, c], one[:, 0]) for c in range(3))


def test_images_are_clamped_to_the_unit_range_in_float32():
    model = tiny()
    with torch.no_grad():  # the decoder's output is its last bias alone: 3, -3 and 0.25 per channel
        model.decoder.conv_out.weight.zero_()
        model.decoder.conv_out.bias.copy_(torch.tensor([3.0, -3.0, 0.25]))
    f = torch.randn(2, 4, 4, 4)
    expected = torch.tensor([1.0, -1.0, 0.25]).view(1, 3, 1, 1).expand(2, 3, 8, 8)
    assert torch.equal(model.fhat_to_img(f), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img = model.fhat_to_img(f)
    assert img.dtype == torch.float32 and torch.equal(img, expected)
    idx = model.img_to_idx(tiny_images())
    for out in (model.reconstruct(tiny_images()), model.idx_to_img(idx)):
        assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_forward_decodes_the_quantizer_s_f_hat_and_passes_its_loss_and_hits_on():
    model = tiny(beta=0.4)
    img = tiny_images()
    out = model(img)
    q = model.quantizer(model.encode(img))
    assert torch.equal(out.rec, model.decode(q.f_hat))
    assert torch.equal(out.vq_loss, q.vq_loss) and torch.equal(out.code_hits, q.code_hits)
    assert out.code_hits.sum().item() == 2 * sum(s * s for s in TINY_SCALES)
    assert out.rec.requires_grad and out.vq_loss.requires_grad  # training's path keeps the graph


def test_the_token_paths_compose_the_quantizer_s_with_encode_and_decode():
    model = tiny()
    img = tiny_images(3)
    with torch.no_grad():
        f = model.encode(img)
    idx = model.img_to_idx(img)
    assert [t.tolist() for t in idx] == [t.tolist() for t in model.quantizer.f_to_idx(f)]
    assert len({v for t in idx for v in t.flatten().tolist()}) > 3  # many codes picked: the checks below mean something
    fhats = model.idx_to_fhats(idx)
    for ours, theirs in zip(fhats, model.quantizer.idx_to_fhats(idx)):
        assert torch.equal(ours, theirs)
    with torch.no_grad():
        expected = model.decode(model.quantizer.f_to_fhats(f)[-1]).clamp(-1, 1)
        coarse = model.decode(fhats[1]).clamp(-1, 1)
    assert torch.equal(model.reconstruct(img), expected)
    assert torch.equal(model.idx_to_img(idx[:2]), coarse)  # the first two scales alone
    assert not torch.equal(coarse, expected)
    assert torch.equal(model.idx_to_var_input(idx), model.quantizer.idx_to_var_input(idx))
    # the inference paths build no graph, though the model's weights require gradients (the indices never carry one:
    # the encoder's hook sees whether gradients were on)
    grad_on = []
    model.encoder.register_forward_hook(lambda *_: grad_on.append(torch.is_grad_enabled()))
    for out in (model.img_to_idx(img)[0], model.reconstruct(img), model.idx_to_img(idx), model.idx_to_var_input(idx)):
        assert not out.requires_grad
    assert grad_on == [False, False]


def test_load_vqvae_reads_the_weights_in_eval_mode_onto_the_asked_device(tmp_path: Path, monkeypatch):
    model = tiny(in_channels=1).train()
    path = tmp_path / "vqvae.pth"
    atomic_torch_save({"model": model.state_dict(), "model_config": model.config}, path)
    loaded = load_vqvae(path)
    assert not loaded.training and loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    # Only the CPU exists here: the device asked for is seen on its way to the checkpoint loader.
    asked = []
    real = vqvae_module.load_model
    monkeypatch.setattr(vqvae_module, "load_model", lambda p, cls, where: asked.append((p, cls, where)) or real(p, cls))
    assert isinstance(load_vqvae(path, map_location="cuda:1"), VQVAE) and asked == [(path, VQVAE, "cuda:1")]
    load_vqvae(path)
    assert asked[-1] == (path, VQVAE, "cpu")
