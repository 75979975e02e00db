"""models/vqvae.py pinned down on tiny models (8 px images): every constructor argument reaches the part it configures,
each path composes its parts exactly (bit for bit, not to a tolerance), the grey model's channel mean and repeat,
the clamp and float32 of the image paths, and the checkpoint's device (issue 16)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common.io import atomic_torch_save
from models.basic_vae import Decoder, Encoder
from models import vqvae as vqvae_module
from models.vqvae import VQVAE, load_vqvae

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCALES = (1, 2, 4)  # ch_mult (1, 2) downsamples by 2: 8 px images


def tiny(**kwargs) -> VQVAE:
    torch.manual_seed(0)
    model = VQVAE(**(dict(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, scales=SCALES)
                     | kwargs)).eval()
    nn.init.normal_(model.quantizer.embedding.weight, std=0.5)  # codes on the encoder's scale: many get picked
    return model


def images(b: int = 2, c: int = 3) -> torch.Tensor:
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
    img = images()
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
    idx = model.img_to_idx(images())
    for out in (model.reconstruct(images()), model.idx_to_img(idx)):
        assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_forward_decodes_the_quantizer_s_f_hat_and_passes_its_loss_and_hits_on():
    model = tiny(beta=0.4)
    img = images()
    out = model(img)
    q = model.quantizer(model.encode(img))
    assert torch.equal(out.rec, model.decode(q.f_hat))
    assert torch.equal(out.vq_loss, q.vq_loss) and torch.equal(out.code_hits, q.code_hits)
    assert out.code_hits.sum().item() == 2 * sum(s * s for s in SCALES)
    assert out.rec.requires_grad and out.vq_loss.requires_grad  # training's path keeps the graph


def test_the_token_paths_compose_the_quantizer_s_with_encode_and_decode():
    model = tiny()
    img = images(3)
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
