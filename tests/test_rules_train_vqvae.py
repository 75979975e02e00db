"""train_vqvae.py's rule functions at non-default settings: every constant's allowed range at its edges, the loss
terms under both reductions, the adaptive adversarial weight and its clamp, the model a config builds, codebook usage
and perplexity, the order of the grid images, when the test split counts as scored, and each refusal (issue 16)."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import models.convert_upstream
import train_vqvae
from common.config import ConfigError
from common.distributed import DistContext
from common.fidelity import FidelityError
from models import vqvae_losses
from models.vqvae import VQOutput, VQVAE

from config_refusal import assert_edges, refusal_of

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def refusal(tmp_path: Path, **overrides) -> str | None:
    """validate's message for a config with these constants (no KID by default), or None when it accepts them."""
    cfg = replace(train_vqvae.Config(out_dir=str(tmp_path / "run"), recon_kid=False), **overrides)
    return refusal_of(train_vqvae.validate, cfg)


def test_every_constant_is_refused_just_outside_its_range_and_accepted_at_its_edge(tmp_path):
    # name -> (values accepted at the edges, (refused value, the range its message names))
    table = {
        **{name: ([1], (0, ">= 1")) for name in ("z_channels", "num_res_blocks", "disc_layers", "epochs", "batch_size",
                                                 "dead_code_every", "dead_code_pool", "num_recon", "plot_every",
                                                 "eval_batch_size")},
        "vocab_size": ([2, 2**15], (2**15 + 1, "in [2, 32768]")),
        "seed": ([0, 2**32 - 1], (2**32, "in [0, 4294967295]")),
        **{name: ([0], (-1, ">= 0")) for name in ("disc_start", "phi_share", "warmup_steps", "dead_code_steps",
                                                  "num_workers", "cpu_threads")},
        **{name: ([0.0], (-0.5, ">= 0")) for name in ("beta", "perceptual_weight", "prefix_weight", "disc_weight",
                                                      "disc_lr", "lr",
                                                      "weight_decay", "grad_clip")},
        **{name: ([0.0, 0.999], (1.0, "in [0, 1)")) for name in ("dropout", "adam_beta1", "adam_beta2")},
        **{name: ([0.0, 1.0], (1.5, "in [0, 1]")) for name in ("phi_ratio", "final_lr_ratio")},
        "in_channels": ([1, 3], (2, "one of 1, 3")),
        "loss_reduction": (["mean", "sum"], ("none", "one of mean, sum")),
        "ch": ([32, 64], (48, "a positive multiple of 32 (GroupNorm with 32 groups)")),
        "disc_ch": ([16, 32], (24, "a positive multiple of 16 (GroupNorm with 32 groups)")),
        "precision": (["auto", "bf16", "fp16", "fp32"], ("fp8", "one of auto, bf16, fp16, fp32")),
        "device": (["auto", "cpu"], ("tpu", "auto, cpu, or a cuda / mps device this machine has")),
    }
    assert_edges(lambda **constant: refusal(tmp_path, **constant), table)
    for name in ("dropout", "phi_ratio", "final_lr_ratio"):  # the low edge too
        assert refusal(tmp_path, **{name: -0.1}).startswith(f"--{name}=-0.1: must be in [0, 1"), name
    assert refusal(tmp_path, ch=0) == "--ch=0: must be a positive multiple of 32 (GroupNorm with 32 groups)"
    assert refusal(tmp_path, disc_ch=0).startswith("--disc_ch=0: must be a positive multiple of 16")


def test_prefix_lengths_cover_1_to_k_minus_1_and_depend_on_seed_step_and_process_only():
    draw = train_vqvae.prefix_lengths(4000, 6, seed=0, step=7, rank=0, device=torch.device("cpu"))
    assert sorted(draw.unique().tolist()) == [1, 2, 3, 4, 5]  # never the whole set of scales: that is the recon
    assert torch.equal(draw, train_vqvae.prefix_lengths(4000, 6, seed=0, step=7, rank=0, device=torch.device("cpu")))
    for other in (dict(seed=1, step=7, rank=0), dict(seed=0, step=8, rank=0), dict(seed=0, step=7, rank=1)):
        assert not torch.equal(draw, train_vqvae.prefix_lengths(4000, 6, device=torch.device("cpu"), **other)), other


def test_scales_and_ch_mult_lists_and_the_image_side_they_fix(tmp_path):
    scales_rule = "must be a non-empty, strictly increasing list of sides >= 1"
    for bad in ((), (0, 2), (2, 2), (1, 3, 2)):
        assert refusal(tmp_path, scales=bad) == f"--scales={bad!r}: {scales_rule}", bad
    assert refusal(tmp_path, scales=(1,), image_size=16) is None
    assert refusal(tmp_path, scales=(2, 3), image_size=48) is None
    for bad in ((), (1, 0)):
        assert refusal(tmp_path, ch_mult=bad) == f"--ch_mult={bad!r}: must be a non-empty list of values >= 1", bad
    assert refusal(tmp_path, ch_mult=(1,), image_size=16) is None  # no downsampling: the side of the finest map
    assert refusal(tmp_path, image_size=0) == "--image_size=0: must be >= 1"
    assert refusal(tmp_path, image_size=128) == ("--image_size=128: must equal scales[-1] x 2^(len(ch_mult)-1) = "
                                                 "16 x 16 = 256")
    assert refusal(tmp_path, scales=(1, 2, 4), ch_mult=(1, 2, 2), image_size=16) is None


def test_perceptual_and_kid_inputs_are_checked_only_when_used(tmp_path, monkeypatch):
    monkeypatch.setattr(train_vqvae, "lpips_problem", lambda: "no lpips here")
    assert refusal(tmp_path, perceptual_weight=0.5) == "--perceptual_weight=0.5: no lpips here"
    assert refusal(tmp_path, perceptual_weight=0.0) is None
    monkeypatch.setattr(train_vqvae, "lpips_problem", lambda: None)
    assert refusal(tmp_path, perceptual_weight=0.5) is None
    missing = tmp_path / "inception.pth"
    assert refusal(tmp_path, recon_kid=True, inception_weights=str(missing)) == (
        f"--inception_weights={missing}: file does not exist (it is read for the reconstruction KID; --recon_kid=false "
        "skips that)")
    assert refusal(tmp_path, recon_kid=False, inception_weights=str(missing)) is None
    missing.write_bytes(b"weights")
    assert refusal(tmp_path, recon_kid=True, inception_weights=str(missing)) is None

    def no_package():
        raise FidelityError("the packaged weights are missing")

    monkeypatch.setattr(train_vqvae, "packaged_weights_path", no_package)
    assert refusal(tmp_path, recon_kid=True) == "--recon_kid: the packaged weights are missing; or --recon_kid=false"
    assert refusal(tmp_path, recon_kid=True, inception_weights=str(missing)) is None
    monkeypatch.setattr(train_vqvae, "packaged_weights_path", lambda: tmp_path)
    assert refusal(tmp_path, recon_kid=True) is None


def test_out_dir_that_is_a_file_is_refused_by_name(tmp_path):
    (tmp_path / "run").write_text("a file")
    assert refusal(tmp_path) == f"--out_dir: {tmp_path / 'run'} exists and is not a folder"


def test_lpips_problem_names_the_missing_package_or_backbone(tmp_path, monkeypatch):
    monkeypatch.setattr(vqvae_losses, "LPIPS_PACKAGE", "no_such_package_here")
    assert train_vqvae.lpips_problem() == (
        "the perceptual loss needs the 'no_such_package_here' package, which is not installed: pip install "
        "lpips==0.1.4 (its LPIPS layers come with it; VGG16 weights, see below, too)")
    monkeypatch.setattr(vqvae_losses, "LPIPS_PACKAGE", "json")  # a package that is there
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    backbone = tmp_path / "checkpoints" / vqvae_losses.LPIPS_BACKBONE_FILE
    assert train_vqvae.lpips_problem() == (
        f"LPIPS's VGG16 backbone weights {backbone} are missing, and are not downloaded at run time; on a machine "
        "with network run python -c \"import torchvision; torchvision.models.vgg16(weights='IMAGENET1K_V1')\" and "
        f"copy ~/.cache/torch/hub/checkpoints/vgg16-397923af.pth to {backbone}")
    backbone.parent.mkdir()
    backbone.write_bytes(b"")
    assert train_vqvae.lpips_problem() is None


def test_reconstruction_and_vq_terms_under_each_reduction_by_hand():
    assert train_vqvae.reduction_scale("sum", 12) == 12.0 and train_vqvae.reduction_scale("mean", 12) == 1.0
    img = torch.zeros(2, 3, 2, 2)
    rec = torch.zeros(2, 3, 2, 2, dtype=torch.float16, requires_grad=True)
    with torch.no_grad():
        rec[0, 0, 0, 0], rec[1, 2, 1, 1] = 2.0, 1.0  # squared errors 4 and 1: sums per image 4 and 1
    assert train_vqvae.recon_loss(rec, img, "sum").item() == pytest.approx(2.5)  # mean of the per-image sums
    assert train_vqvae.recon_loss(rec, img, "mean").item() == pytest.approx(5 / 24)
    assert train_vqvae.recon_loss(rec, img, "mean").dtype == torch.float32
    assert train_vqvae.recon_loss(rec[1:], img[1:], "sum").item() == pytest.approx(1.0)  # a batch of one image

    calls = []

    def fake_lpips(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (B, 1, 1, 1), as LPIPS returns
        calls.append((a.dtype, a is img, b is img))
        return (a.sum((1, 2, 3)) + 10 * b.sum((1, 2, 3)) + torch.tensor([1.0, 3.0]))[:, None, None, None]

    output = VQOutput(rec=rec, vq_loss=torch.tensor(0.5, dtype=torch.float16), code_hits=torch.zeros(1, 4))
    r, vq, perceptual = train_vqvae.loss_terms(output, img, "sum", fake_lpips, 0.3, 40)
    assert (r.item(), vq.item()) == (pytest.approx(2.5), pytest.approx(20.0)) and vq.dtype == torch.float32
    assert perceptual.item() == pytest.approx(0.3 * (3.0 + 4.0) / 2 * 12)  # LPIPS of (rec, img), mean, x 3*H*W
    assert calls == [(torch.float32, False, True)]
    r, vq, perceptual = train_vqvae.loss_terms(output, img, "mean", fake_lpips, 0.3, 40)
    assert (r.item(), vq.item(), perceptual.item()) == (pytest.approx(5 / 24), 0.5, pytest.approx(0.3 * 3.5))
    perceptual.backward()
    assert rec.grad is not None and rec.grad.abs().sum() > 0  # the perceptual term trains the decoder
    one = VQOutput(rec=rec[1:], vq_loss=output.vq_loss, code_hits=output.code_hits)  # a batch of one image
    ones = lambda a, b: torch.ones(len(a), 1, 1, 1)
    assert train_vqvae.loss_terms(one, img[1:], "sum", ones, 0.3, 40)[2].item() == pytest.approx(0.3 * 12)
    for net, weight in ((fake_lpips, 0.0), (None, 0.3)):
        assert train_vqvae.loss_terms(output, img, "sum", net, weight, 40)[2].item() == 0.0
    assert len(calls) == 2


def test_the_discriminator_sees_grey_for_a_grey_model():
    img = torch.arange(24.0).view(2, 3, 2, 2)
    assert torch.equal(train_vqvae.discriminator_input(img, 1), img.mean(1, keepdim=True))
    assert train_vqvae.discriminator_input(img, 3) is img


class Shard(DistContext):
    """One of `world_size` processes without a process group: sums come back as this process's own."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer_clamped():
    last = torch.nn.Parameter(torch.ones(2))
    other = torch.nn.Parameter(torch.ones(1))
    one = Shard(0, 1, 0, CPU)
    # d rec / d last = (3, 4), d gan / d last = (0.6, 0.8) (+ a term in another parameter that must not count)
    rec = (last * torch.tensor([3.0, 4.0])).sum()
    gan = (last * torch.tensor([0.6, 0.8])).sum() + 100 * other.sum()
    weight = train_vqvae.adaptive_weight(rec, gan, last, one)
    assert weight.item() == pytest.approx(5 / (1 + 1e-4)) and not weight.requires_grad
    assert rec.grad_fn is not None and last.grad is None  # the losses' graphs stay usable; nothing accumulated
    small = train_vqvae.adaptive_weight(gan, rec, last, one)  # below 1: no lower clamp at 1
    assert small.item() == pytest.approx(1 / (5 + 1e-4))
    # Two processes with these gradients each: the averaged gradients, not their sums, give the ratio.
    two = train_vqvae.adaptive_weight(rec, gan, last, Shard(0, 2, 0, CPU))
    assert two.item() == pytest.approx(2.5 / (0.5 + 1e-4))
    flat = (last * 0).sum() + (other * 0).sum()  # no adversarial gradient at the layer: 5 / 1e-4, clamped
    assert train_vqvae.adaptive_weight(rec, flat, last, one).item() == vqvae_losses.ADAPTIVE_WEIGHT_MAX == 1e4


def small_config(**overrides) -> train_vqvae.Config:
    values = dict(vocab_size=24, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, dropout=0.1, beta=0.4,
                  phi_ratio=0.3, phi_share=2, scales=(1, 2, 4), in_channels=3, image_size=8)
    return train_vqvae.Config(**{**values, **overrides})


def test_a_fresh_model_takes_every_architecture_constant():
    model = train_vqvae.build_model(small_config())
    assert model.config == dict(vocab_size=24, z_channels=4, ch=32, ch_mult=[1, 2], num_res_blocks=1, dropout=0.1,
                                beta=0.4, using_znorm=False, phi_ratio=0.3, phi_share=2, scales=[1, 2, 4],
                                in_channels=3)
    grey = train_vqvae.build_model(small_config(in_channels=1))  # not VQVAE's default of 3
    assert grey.config["in_channels"] == 1 and grey.encoder.conv_in.in_channels == 1


def test_starting_from_the_reference_passes_the_quantizer_settings_and_refuses_another_architecture(monkeypatch):
    calls = []

    def fake(path, **overrides):
        calls.append((path, overrides))
        return VQVAE(vocab_size=24, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, phi_share=2,
                     scales=overrides["scales"], in_channels=3).eval()

    monkeypatch.setattr(models.convert_upstream, "vqvae_from_upstream", fake)
    model = train_vqvae.build_model(small_config(init_from_upstream="ref.pth"))
    assert calls == [("ref.pth", dict(scales=[1, 2, 4], beta=0.4, phi_ratio=0.3, dropout=0.1))]
    assert model.training
    with pytest.raises(ValueError) as err:
        train_vqvae.build_model(small_config(init_from_upstream="ref.pth", ch=64, ch_mult=(1, 1), in_channels=1))
    assert str(err.value) == ("ref.pth: its architecture differs from this config (ch: 32 vs 64, ch_mult: [1, 2] vs "
                              "[1, 1], in_channels: 3 vs 1); run with --ch=32 --ch_mult=1,2 --in_channels=3")
    with pytest.raises(ValueError) as err:
        train_vqvae.build_model(small_config(init_from_upstream="ref.pth", vocab_size=32, z_channels=8,
                                             num_res_blocks=2, phi_share=0))
    assert str(err.value) == ("ref.pth: its architecture differs from this config (vocab_size: 24 vs 32, z_channels: 4 "
                              "vs 8, num_res_blocks: 1 vs 2, phi_share: 2 vs 0); run with --vocab_size=24 "
                              "--z_channels=4 --num_res_blocks=1 --phi_share=2")


def test_usage_and_perplexity_per_scale():
    hits = torch.tensor([[3, 1, 0, 0], [2, 2, 2, 2], [0, 0, 0, 0]])
    usage, perplexity = train_vqvae.usage_stats(hits)
    assert usage == [0.5, 1.0, 0.0]
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert perplexity == pytest.approx([math.exp(entropy), 4.0, 1.0])  # an unused scale: 1, not a division by 0
    assert train_vqvae.usage_stats(torch.tensor([[0, 1, 0, 0]])) == ([0.25], [1.0])  # one hit: one code, certain


def test_grid_images_take_every_class_s_first_image_then_the_second():
    labels = np.array([0, 0, 1, 2, 1, 0])
    assert train_vqvae.spread_over_classes(labels, 4) == [0, 2, 3, 1]
    assert train_vqvae.spread_over_classes(labels, 10) == [0, 2, 3, 1, 4, 5]
    assert train_vqvae.spread_over_classes(np.array([2, 1, 2]), 3) == [1, 0, 2]  # by class within a rank


def test_images_without_a_found_scan_area_are_scored_whole_and_counted(monkeypatch):
    found = np.zeros((4, 4), bool)
    found[1:3, 1:3] = True
    monkeypatch.setattr(train_vqvae, "scan_area_mask", lambda path, size: found if (path, size) == ("a.png", 4) else None)
    bars = []

    def progress(items, **kwargs):
        bars.append(kwargs)
        return items

    monkeypatch.setattr(train_vqvae, "progress", progress)
    split = SimpleNamespace(paths=["b.png", "a.png", "c.png", "d.png"], image_size=4, split="val")
    masks, fallback = train_vqvae.scan_area_masks(split, Shard(0, 1, 0, CPU))
    assert fallback == 3 and masks.shape == (4, 4, 4) and masks.dtype == bool
    assert np.array_equal(masks[1], found) and masks[0].all() and masks[2].all() and masks[3].all()
    train_vqvae.scan_area_masks(split, Shard(1, 2, 1, CPU))
    assert bars == [dict(desc="scan areas val", leave=False, disable=False),  # a bar on the main process only
                    dict(desc="scan areas val", leave=False, disable=True)]


def test_the_test_split_counts_as_scored_only_with_every_output_from_this_checkpoint(tmp_path):
    made_from = {"checkpoint_sha256": "abc", "test_images": "def"}
    assert not train_vqvae.scored_already(tmp_path, made_from)
    (tmp_path / "test_metrics.json").write_text(json.dumps({"psnr": 30.0, "made_from": made_from}))
    (tmp_path / "recon_test.png").write_bytes(b"")
    assert not train_vqvae.scored_already(tmp_path, made_from)  # the histogram is missing
    (tmp_path / "code_usage_hist_test.png").write_bytes(b"")
    assert train_vqvae.scored_already(tmp_path, made_from)
    assert not train_vqvae.scored_already(tmp_path, {**made_from, "test_images": "other"})
    (tmp_path / "recon_test.png").unlink()
    assert not train_vqvae.scored_already(tmp_path, made_from)
    (tmp_path / "recon_test.png").write_bytes(b"")
    for broken in ("{not json", "[1, 2]"):  # a damaged file means not scored, never a traceback
        (tmp_path / "test_metrics.json").write_text(broken)
        assert not train_vqvae.scored_already(tmp_path, made_from)


def test_dead_after_exactly_the_given_steps():
    codes = train_vqvae.DeadCodes(vocab_size=3, after=2, device=CPU)
    assert codes.since_hit.dtype == torch.int64 and codes.since_hit.tolist() == [0, 0, 0]
    codes.update(torch.tensor([[0, 1, 0]]))
    assert codes.dead().tolist() == []
    codes.update(torch.tensor([[0, 0, 1]]))
    assert codes.dead().tolist() == [0]


def tiny_vqvae() -> VQVAE:
    torch.manual_seed(2)
    return VQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, scales=(1, 2, 4, 8),
                 in_channels=1, dropout=0.5)  # dropout: a score in train mode would differ


def test_evaluate_sums_per_image_terms_of_this_process_s_share_over_the_whole_split():
    from common.runtime import select_precision
    from common.sample_metrics import masked_psnr_ssim, psnr_ssim
    from common.image_data import to_grey_uint8

    model, gen = tiny_vqvae(), torch.Generator().manual_seed(0)
    dataset = [(torch.rand(3, 16, 16, generator=gen) * 2 - 1, 0) for _ in range(5)]
    masks = torch.rand(5, 16, 16, generator=gen).numpy() > 0.3
    cfg = train_vqvae.Config(loss_reduction="sum", eval_batch_size=2, num_workers=0)
    fp32 = select_precision(CPU, "fp32")

    def by_hand(rows: list[int]) -> dict:
        model.eval()
        sums, hits = np.zeros(7), torch.zeros(4, 16, dtype=torch.int64)
        with torch.no_grad():
            for i in rows:
                img = dataset[i][0][None]
                out = model(img)
                rec = (out.rec - img).square().sum().item()  # sum: the per-image sum of squares
                vq = out.vq_loss.item() * 4 * 8 * 8  # x z*h*w
                a, b = to_grey_uint8(img)[0], to_grey_uint8(out.rec)[0]
                sums += [rec + vq, rec, vq, *psnr_ssim(a, b), *masked_psnr_ssim(a, b, masks[i])]
                hits += out.code_hits
        return dict(zip(["loss", "rec_loss", "vq_loss", "psnr", "ssim", "psnr_scan", "ssim_scan"], sums / 5), hits=hits)

    for dist, rows in ((Shard(0, 1, 0, CPU), [0, 1, 2, 3, 4]), (Shard(1, 2, 1, CPU), [1, 3])):
        model.train()
        got = train_vqvae.evaluate(model, dataset, masks, cfg, dist, fp32, "val")
        expected = by_hand(rows)
        for key in ("loss", "rec_loss", "vq_loss", "psnr", "ssim", "psnr_scan", "ssim_scan"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5), (rows, key)
        assert torch.equal(got["hits"], expected["hits"])
        assert (got["usage"], got["perplexity"]) == train_vqvae.usage_stats(expected["hits"])


class MeanNet:
    """A stand-in feature network: per-image channel means of uint8 RGB."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        return images.float().mean((2, 3))


class ListSplit(list):
    """A stand-in ImageSplit: (image, label) items of one class, each image its own subject (no manifest)."""

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self]

    def relative_path(self, i: int) -> str:
        return f"test/a/img{i}.png"


def test_reconstruction_kid_compares_reconstructions_of_one_half_with_the_real_images_of_the_other(monkeypatch,
                                                                                                    tmp_path):
    from common.image_data import halves, subject_ids, to_rgb_uint8
    from common.runtime import select_precision

    model, gen = tiny_vqvae(), torch.Generator().manual_seed(1)
    dataset = ListSplit((torch.rand(3, 16, 16, generator=gen) * 2 - 1, 0) for _ in range(8))
    monkeypatch.setattr(train_vqvae, "load_feature_extractor", lambda weights, device: MeanNet() if weights == "w" else None)
    seen = {}

    def fake_kid(fake, real, max_subset_size, seed):
        seen.update(fake=fake, real=real, subset=max_subset_size, seed=seed)
        return {"mean": 0.5}

    monkeypatch.setattr(train_vqvae, "kid_from_features", fake_kid)
    cfg = train_vqvae.Config(data_dir=str(tmp_path), inception_weights="w", eval_batch_size=2, num_workers=0, seed=6)
    assert train_vqvae.reconstruction_kid(model, dataset, cfg, CPU, select_precision(CPU, "fp32")) == {"mean": 0.5}
    assert not model.training and (seen["subset"], seen["seed"]) == (2, 6)  # halves of 4: subsets of 2
    first, second = halves(np.zeros(8, int), subject_ids(tmp_path, [dataset.relative_path(i) for i in range(8)]), 6)
    assert first.sum() == second.sum() == 4
    images = torch.stack([img for img, _ in dataset])
    with torch.no_grad():
        recon = model(images).rec
    real = torch.from_numpy(to_rgb_uint8(images)).permute(0, 3, 1, 2).float().mean((2, 3))[torch.from_numpy(second)]
    fake = torch.from_numpy(to_rgb_uint8(recon)).permute(0, 3, 1, 2).float().mean((2, 3))[torch.from_numpy(first)]
    torch.testing.assert_close(seen["real"], real)
    torch.testing.assert_close(seen["fake"], fake, atol=1.0, rtol=0)  # batched vs whole: a rounding step apart
    assert not torch.allclose(seen["fake"], seen["real"], atol=1.0, rtol=0)
