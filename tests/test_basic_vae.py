"""models/basic_vae.py's speed-motivated rewrites against the plain formulas they replace: the upsampling as one
transposed convolution, SiLU in place when no graph is recorded, and the residual additions into the convolution's
own output (value and gradient)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from models.basic_vae import AttnBlock, Decoder, ResBlock, Upsample, group_norm, norm_silu
from models.convert_upstream import vqvae_config_from_upstream_kwargs, vqvae_from_upstream


def test_upsample_is_nearest_doubling_then_the_3x3_convolution() -> None:
    torch.manual_seed(0)
    up = Upsample(4)
    x = torch.randn(2, 4, 5, 7, requires_grad=True)  # odd, non-square: every border phase
    x_ref = x.detach().clone().requires_grad_()
    out = up(x)
    ref = F.conv2d(F.interpolate(x_ref, scale_factor=2.0, mode="nearest"), up.conv.weight, up.conv.bias, padding=1)
    assert out.shape == (2, 4, 10, 14)
    assert torch.allclose(out, ref, atol=1e-5)
    grad = torch.randn_like(ref)
    out.backward(grad)
    weight_grad, bias_grad = up.conv.weight.grad.clone(), up.conv.bias.grad.clone()
    up.zero_grad()
    ref.backward(grad)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert torch.allclose(weight_grad, up.conv.weight.grad, atol=1e-4)
    assert torch.allclose(bias_grad, up.conv.bias.grad, atol=1e-4)
    assert "taps" not in up.state_dict()  # checkpoints keep the reference's keys: conv.weight, conv.bias


def test_upsample_under_bf16_autocast_stays_close_to_fp32() -> None:
    torch.manual_seed(1)
    up = Upsample(8)
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        exact = up(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = up(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - exact).abs().max() < 0.05 * exact.abs().max()


def test_norm_silu_in_place_only_without_a_graph() -> None:
    torch.manual_seed(2)
    norm = torch.nn.GroupNorm(2, 4)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    with_graph = norm_silu(norm, x)
    with_graph.sum().backward()  # an in-place SiLU here would have overwritten what its backward needs
    expected_grad = x.grad.clone()
    x.grad = None
    h = norm(x)
    F.silu(h).sum().backward()
    assert torch.equal(x.grad, expected_grad)
    with torch.no_grad():
        assert torch.equal(norm_silu(norm, x), with_graph)


def plain_res_block(block: ResBlock, x: torch.Tensor) -> torch.Tensor:
    h = block.conv1(F.silu(block.norm1(x)))
    return block.skip(x) + block.conv2(F.silu(block.norm2(h)))


def plain_attn_block(block: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    b, c, hh, ww = x.shape
    q, k, v = block.qkv(block.norm(x)).reshape(b, 3, c, hh * ww).unbind(1)
    att = torch.softmax(q.transpose(1, 2) @ k / c ** 0.5, dim=-1)
    return x + block.proj((v @ att.transpose(1, 2)).reshape(b, c, hh, ww))


def test_blocks_give_the_plain_formulas_values_and_gradients_with_and_without_a_graph() -> None:
    torch.manual_seed(3)
    for block, plain in ((ResBlock(32, 64, 0.0), plain_res_block), (ResBlock(32, 32, 0.0), plain_res_block),
                         (AttnBlock(32), plain_attn_block)):
        x = torch.randn(2, 32, 3, 3, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        out, ref = block(x), plain(block, x_ref)
        assert torch.allclose(out, ref, atol=1e-5)
        with torch.no_grad():
            assert torch.equal(block(x), out)
        grad = torch.randn_like(out)
        out.backward(grad)
        param_grads = [p.grad.clone() for p in block.parameters()]
        block.zero_grad()
        ref.backward(grad)
        assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
        for got, want in zip(param_grads, (p.grad for p in block.parameters())):
            assert torch.allclose(got, want, atol=1e-5)


def test_decoder_output_unchanged_by_grad_mode() -> None:
    torch.manual_seed(4)
    decoder = Decoder(32, (1, 2), 1, 4, 3, 0.0).eval()
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        quiet = decoder(z)
    assert quiet.shape == (2, 3, 8, 8)
    assert torch.equal(decoder(z), quiet)


def test_encoder_and_decoder_reproduce_the_reference_on_its_recorded_weights(shared_dir: Path) -> None:
    """The whole layout (levels, attention at the lowest resolution, res blocks per level, GroupNorm's eps and
    affine, resampling placement) must load the reference's weights strictly and give its numbers."""
    fixture = shared_dir / "fixtures/upstream_var/upstream_small.pt"
    ref = torch.load(fixture, map_location="cpu", weights_only=True)
    config = json.loads(fixture.with_suffix(".json").read_text())["vqvae_config"]
    vqvae = vqvae_from_upstream(ref["vqvae_state_dict"], **vqvae_config_from_upstream_kwargs(config))
    with torch.no_grad():
        assert torch.allclose(vqvae.encode(ref["images"]), ref["encoder_f"], atol=1e-4)
        assert torch.allclose(vqvae.fhat_to_img(ref["fhat_per_scale"][-1]), ref["rec_last_scale"], atol=1e-4)


def test_group_norm_is_the_reference_s() -> None:
    norm = group_norm(64)
    assert (norm.num_groups, norm.num_channels, norm.eps, norm.affine) == (32, 64, 1e-6, True)


class Fixed(torch.nn.Module):
    """A stand-in norm that returns a given tensor, to see whether norm_silu writes into it."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out


def test_norm_silu_writes_into_the_norm_output_only_without_autograd() -> None:
    y = torch.tensor([-1.0, 0.0, 2.0])
    with torch.no_grad():
        out = norm_silu(Fixed(y), y)
    assert out is y and torch.allclose(y, F.silu(torch.tensor([-1.0, 0.0, 2.0])))
    y = torch.tensor([-1.0, 0.0, 2.0])
    out = norm_silu(Fixed(y), y)
    assert out is not y and torch.equal(y, torch.tensor([-1.0, 0.0, 2.0]))


def test_res_block_dropout_and_skip_only_where_asked() -> None:
    assert isinstance(ResBlock(32, 32, 0.0).dropout, torch.nn.Identity)
    dropping = ResBlock(32, 32, 0.25).dropout
    assert isinstance(dropping, torch.nn.Dropout) and dropping.p == 0.25
    assert isinstance(ResBlock(32, 32, 0.0).skip, torch.nn.Identity)
    assert ResBlock(32, 64, 0.0).skip.weight.shape == (64, 32, 1, 1)


def test_decoder_convolutions_see_channels_last_maps_on_the_cpu() -> None:
    decoder = Decoder(32, (1, 2), 1, 4, 3, 0.0).eval()
    layouts = []
    decoder.conv_in.register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        out = decoder(torch.randn(2, 4, 4, 4))
    assert layouts == [True] and out.is_contiguous()  # handed back in the default layout
