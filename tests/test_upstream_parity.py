"""Our VQ-VAE and VAR, loaded from reference-format weights, reproduce what the reference implementation computed.

The fixture (weights, inputs and outputs recorded by running github.com/FoundationVision/VAR) is named by the
env var UPSTREAM_FIXTURE, default ../shared/fixtures/upstream_var/upstream_small.pt beside the checkout, with
its configs in the .json next to it. Everything about the models comes from that JSON. The last tests need no
fixture: they check the key mapping and config inference for every phi-sharing mode, shared AdaLN and plain attention.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sample_var
import tokenize_multiscale_maps
from common.image_data import read_image, to_tensor
from common.tokens import load_tokens

from models.convert_upstream import (main as convert_main, var_config_from_upstream_kwargs, var_from_upstream,
                                     vqvae_config_from_upstream_kwargs, vqvae_from_upstream)
from models.var import VAR, SamplingSettings, load_var
from models.vqvae import VQVAE, load_vqvae

ATOL = 1e-4
REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("UPSTREAM_FIXTURE", REPO_ROOT / "../shared/fixtures/upstream_var/upstream_small.pt"))


@pytest.fixture(scope="module")
def ref() -> dict:
    if not FIXTURE.is_file() or not FIXTURE.with_suffix(".json").is_file():
        pytest.skip(f"reference fixture {FIXTURE} (and its .json) is absent: set UPSTREAM_FIXTURE or provide ../shared")
    data = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    data["json"] = json.loads(FIXTURE.with_suffix(".json").read_text())
    return data


@pytest.fixture(scope="module")
def configs(ref: dict) -> tuple[dict, dict]:
    vq_config = vqvae_config_from_upstream_kwargs(ref["json"]["vqvae_config"])
    return vq_config, var_config_from_upstream_kwargs(ref["json"]["var_config"], vq_config)


@pytest.fixture(scope="module")
def vqvae(ref: dict, configs: tuple[dict, dict]):
    return vqvae_from_upstream(ref["vqvae_state_dict"], **configs[0])


@pytest.fixture(scope="module")
def var(ref: dict, configs: tuple[dict, dict]):
    return var_from_upstream(ref["var_state_dict"], **configs[1])


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    err = (ours.float() - theirs.float()).abs().max().item()
    assert err <= ATOL, f"{what}: max abs error {err:.3g} > {ATOL}"


def test_models_match_recorded_sizes(ref: dict, vqvae, var) -> None:
    info = ref["json"]
    if "vqvae_params" in info:
        assert sum(p.numel() for p in vqvae.parameters()) == info["vqvae_params"]
    if "var_params" in info:
        assert sum(p.numel() for p in var.parameters()) == info["var_params"]


@torch.no_grad()
def test_encoder_tokens_and_fhat(ref: dict, vqvae) -> None:
    f = vqvae.encode(ref["images"])
    assert_close(f, ref["encoder_f"], "encoder_f")
    idx = vqvae.img_to_idx(ref["images"])
    assert len(idx) == len(ref["idx_per_scale"])
    for k, (ours, theirs) in enumerate(zip(idx, ref["idx_per_scale"])):
        assert torch.equal(ours.flatten(1), theirs), f"tokens of scale {k} differ"
    for k, (ours, theirs) in enumerate(zip(vqvae.quantizer.f_to_fhats(f), ref["fhat_per_scale"])):
        assert_close(ours, theirs, f"f_hat after scale {k}")
    for k, (ours, theirs) in enumerate(zip(vqvae.idx_to_fhats(ref["idx_per_scale"]), ref["fhat_per_scale"])):
        assert_close(ours, theirs, f"f_hat from tokens after scale {k}")


@torch.no_grad()
def test_vqvae_training_forward(ref: dict, vqvae) -> None:
    out = vqvae(ref["images"])
    assert_close(out.rec, ref["vqvae_forward_rec"], "training forward reconstruction")
    assert_close(out.vq_loss, ref["vqvae_forward_vq_loss"], "VQ loss")
    b = ref["images"].shape[0]
    for k, pn in enumerate(vqvae.scales):
        assert out.code_hits[k].sum().item() == b * pn * pn
        expected = torch.bincount(ref["idx_per_scale"][k].flatten(), minlength=vqvae.quantizer.vocab_size)
        assert torch.equal(out.code_hits[k], expected)


@torch.no_grad()
def test_reconstructions(ref: dict, vqvae) -> None:
    assert_close(vqvae.reconstruct(ref["images"]), ref["rec_last_scale"], "reconstruction from images")
    assert_close(vqvae.idx_to_img(ref["idx_per_scale"]), ref["rec_from_idx"], "reconstruction from tokens")


@torch.no_grad()
def test_teacher_forcing_input(ref: dict, vqvae) -> None:
    assert_close(vqvae.idx_to_var_input(ref["idx_per_scale"]), ref["var_teacher_input"], "teacher-forcing input")


@torch.no_grad()
def test_var_logits(ref: dict, var) -> None:
    assert_close(var(ref["labels"], ref["var_teacher_input"]), ref["var_logits"], "VAR logits")


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("guidance,key", [(1.5, "greedy_cfg1p5_images01"), (0.0, "greedy_cfg0_images01")])
def test_greedy_sampling(ref: dict, vqvae, var, guidance: float, key: str, use_cache: bool) -> None:
    images, idx = var.generate(vqvae, ref["labels"], SamplingSettings(guidance, top_k=1), use_cache=use_cache)
    assert_close(images, ref[key], f"greedy sample, guidance {guidance}")
    assert [tuple(t.shape[1:]) for t in idx] == [(pn, pn) for pn in vqvae.scales]


@torch.no_grad()
def test_class_embedding_resize(ref: dict, configs: tuple[dict, dict]) -> None:
    old = ref["var_state_dict"]["class_emb.weight"]
    n_old = old.shape[0] - 1
    for n_new in (n_old + 2, max(1, n_old - 1)):
        config = {k: v for k, v in configs[1].items() if k != "num_classes"}
        model = var_from_upstream(ref["var_state_dict"], num_classes=n_new, **config)
        new = model.class_emb.weight
        assert new.shape == (n_new + 1, old.shape[1]) and model.num_classes == n_new
        keep = min(n_old, n_new)
        assert torch.equal(new[:keep], old[:keep]) and torch.equal(new[-1], old[-1])


def test_converter_cli_round_trip(ref: dict, configs: tuple[dict, dict], tmp_path: Path, monkeypatch) -> None:
    vq_config, var_config = configs
    torch.save(ref["vqvae_state_dict"], tmp_path / "vae_upstream.pth")
    torch.save(ref["var_state_dict"], tmp_path / "var_upstream.pth")
    scales = ",".join(str(s) for s in vq_config["scales"])
    runs = [
        ["--kind=vqvae", f"--src={tmp_path / 'vae_upstream.pth'}", f"--dst={tmp_path / 'vae.pth'}", f"--scales={scales}",
         f"--phi_ratio={vq_config.get('phi_ratio', 0.5)}", f"--using_znorm={vq_config.get('using_znorm', False)}"],
        ["--kind=var", f"--src={tmp_path / 'var_upstream.pth'}", f"--dst={tmp_path / 'var.pth'}", f"--scales={scales}",
         f"--norm_eps={var_config.get('norm_eps', 1e-6)}", f"--num_heads={var_config.get('num_heads', -1)}"],
    ]
    for args in runs:
        monkeypatch.setattr(sys, "argv", ["convert_upstream.py", *args])
        convert_main()
    vqvae = load_vqvae(tmp_path / "vae.pth")
    var = load_var(tmp_path / "var.pth")
    for key in ("vocab_size", "z_channels", "ch", "scales", "phi_share"):
        if key in vq_config:
            assert vqvae.config[key] == vq_config[key], key
    with torch.no_grad():
        assert_close(vqvae.idx_to_img(ref["idx_per_scale"]), ref["rec_from_idx"], "CLI-converted VQ-VAE")
        assert_close(var(ref["labels"], ref["var_teacher_input"]), ref["var_logits"], "CLI-converted VAR")
    images, _ = var.generate(vqvae, ref["labels"], SamplingSettings(1.5, top_k=1))
    assert_close(images, ref["greedy_cfg1p5_images01"], "CLI-converted greedy sample")


# Our key -> the reference's, for models in every sharing mode (the reference's module names: PhiPartiallyShared
# keeps `qresi_ls`, PhiShared `qresi`, PhiNonShared is itself the list; shared AdaLN is Sequential(SiLU, Linear)).
_TO_REFERENCE = [
    (r"^encoder\.levels\.(\d+)\.res\.", r"encoder.down.\1.block."),
    (r"^encoder\.levels\.(\d+)\.attn\.", r"encoder.down.\1.attn."),
    (r"^encoder\.levels\.(\d+)\.resample\.", r"encoder.down.\1.downsample."),
    (r"^decoder\.levels\.(\d+)\.res\.", r"decoder.up.\1.block."),
    (r"^decoder\.levels\.(\d+)\.attn\.", r"decoder.up.\1.attn."),
    (r"^decoder\.levels\.(\d+)\.resample\.", r"decoder.up.\1.upsample."),
    (r"\.mid\.res1\.", ".mid.block_1."), (r"\.mid\.res2\.", ".mid.block_2."), (r"\.mid\.attn\.", ".mid.attn_1."),
    (r"\.skip\.", ".nin_shortcut."), (r"(coder\..*attn.*)\.proj\.", r"\1.proj_out."),
    (r"^quantizer\.embedding\.", "quantize.embedding."),
    (r"^pos_embed$", "pos_1LC"), (r"^shared_ada_lin\.", "shared_ada_lin.1."), (r"\.attn\.qkv\.(?=weight$)", ".attn.mat_qkv."),
    (r"\.attn\.scale_mul$", ".attn.scale_mul_1H11"), (r"\.mlp\.", ".ffn."),
    (r"^(blocks\.\d+)\.ada_lin\.", r"\1.ada_lin.1."), (r"^head_norm\.ada_lin\.", "head_nm.ada_lin.1."),
]


def to_reference(state: dict, phi_share: int | None = None) -> dict:
    out = {}
    for key, value in state.items():
        for pattern, repl in _TO_REFERENCE:
            key = re.sub(pattern, repl, key, count=1)
        match = re.match(r"^quantizer\.phis\.(\d+)\.(.*)$", key)
        if match:
            i, rest = match.groups()
            key = {0: f"quantize.quant_resi.{i}.{rest}", 1: f"quantize.quant_resi.qresi.{rest}"}.get(
                phi_share, f"quantize.quant_resi.qresi_ls.{i}.{rest}")
        out[key] = value
    return out


@pytest.mark.parametrize("phi_share", [0, 1, 2, 4])
def test_vqvae_conversion_in_every_phi_mode(phi_share: int) -> None:
    config = dict(vocab_size=32, z_channels=8, ch=32, scales=[1, 2, 4], phi_share=phi_share)
    ours = VQVAE(**config).eval()
    converted = vqvae_from_upstream(to_reference(ours.state_dict(), phi_share), scales=[1, 2, 4])
    assert converted.config == ours.config
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(converted.reconstruct(img), ours.reconstruct(img))


@pytest.mark.parametrize("variant", [dict(shared_aln=True), dict(attn_l2_norm=False, embed_dim=128, num_heads=2)])
def test_var_conversion_variants(variant: dict) -> None:
    config = dict(vocab_size=32, z_channels=8, scales=[1, 2, 4], num_classes=3, depth=2, embed_dim=64, num_heads=2,
                  mlp_ratio=2.0) | variant
    ours = VAR(**config).eval()
    state = to_reference(ours.state_dict())
    state["lvl_1L"] = ours.level[None]
    converted = var_from_upstream(state, scales=[1, 2, 4], num_heads=config["num_heads"])
    assert {k: converted.config[k] for k in config} == config
    labels, x = torch.tensor([0, 2]), torch.randn(2, 20, 8)
    with torch.no_grad():
        assert torch.equal(converted(labels, x), ours(labels, x))


@pytest.mark.e2e
def test_reference_checkpoints_work_in_the_pipeline_as_they_are(tiny_pipeline: dict[str, Path], tmp_path: Path,
                                                                monkeypatch, capsys, one_torch_thread) -> None:
    """A reference-format VQ-VAE, converted by the CLI, tokenizes the processed set with no training config; a
    converted VAR (which records no VQ-VAE or token file) samples once they are named."""
    torch.manual_seed(3)
    ours = VQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, scales=[1, 2, 3, 4]).eval()
    torch.save(to_reference(ours.state_dict(), phi_share=4), tmp_path / "vae_reference.pth")
    monkeypatch.setattr(sys, "argv", ["convert_upstream.py", "--kind=vqvae", f"--src={tmp_path / 'vae_reference.pth'}",
                                      f"--dst={tmp_path / 'vae.pth'}", "--scales=1,2,3,4"])
    convert_main()
    tokens = tmp_path / "tokens" / "tokens_multiscale_maps.npz"
    tokenize_multiscale_maps.main([f"--data_dir={tiny_pipeline['data']}", f"--vqvae={tmp_path / 'vae.pth'}",
                                   f"--out={tokens}", "--num_workers=0", "--device=cpu"])
    ts = load_tokens(tokens, tmp_path / "vae.pth")
    image = read_image(tiny_pipeline["data"] / ts.source[0], ours.image_size)
    expected = torch.cat([m.flatten(1) for m in ours.img_to_idx(to_tensor(image)[None])], dim=1)
    assert np.array_equal(ts.idx[0], expected[0].numpy())

    var = VAR(vocab_size=32, z_channels=8, scales=[1, 2, 3, 4], num_classes=3, depth=2, embed_dim=64, num_heads=2)
    state = to_reference(var.state_dict())
    state["lvl_1L"] = var.level[None]
    torch.save(state, tmp_path / "var_reference.pth")
    monkeypatch.setattr(sys, "argv", ["convert_upstream.py", "--kind=var", f"--src={tmp_path / 'var_reference.pth'}",
                                      f"--dst={tmp_path / 'var.pth'}", "--scales=1,2,3,4", "--num_heads=2"])
    convert_main()
    common = [f"--var={tmp_path / 'var.pth'}", f"--data_dir={tiny_pipeline['data']}", "--samples_per_class=1",
              "--teachers_per_class=1", "--samples_per_teacher=1", "--coarse_ks=2", "--device=cpu"]
    with pytest.raises(SystemExit):
        sample_var.main([*common, f"--out={tmp_path / 'nothing'}"])
    assert "records no vqvae_path (not written by train_var.py?); pass --vqvae=PATH" in capsys.readouterr().err
    sample_var.main([*common, f"--out={tmp_path / 'samples'}", f"--vqvae={tmp_path / 'vae.pth'}", f"--tokens={tokens}"])
    assert len((tmp_path / "samples" / "samples_manifest.csv").read_text().splitlines()) == 1 + 3 + 3
