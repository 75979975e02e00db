"""models/convert_upstream.py without building the reference models: every key renaming rule, what the configs are
read from (tensor shapes and key names), the constructor-option mappings, the class-row resize, and each refusal,
with its message (issue 16). tests/test_upstream_parity.py checks the converted models against the reference."""
from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

from common.checkpoint import CheckpointError
from models import convert_upstream as cu
from reference_keys import renamed


def test_every_vqvae_key_rule():
    pairs = {
        "encoder.down.2.block.1.conv1.weight": "encoder.levels.2.res.1.conv1.weight",
        "encoder.down.3.attn.0.qkv.weight": "encoder.levels.3.attn.0.qkv.weight",
        "encoder.down.0.downsample.conv.bias": "encoder.levels.0.resample.conv.bias",
        "decoder.up.1.block.2.norm1.weight": "decoder.levels.1.res.2.norm1.weight",
        "decoder.up.4.attn.1.proj_out.weight": "decoder.levels.4.attn.1.proj.weight",
        "decoder.up.3.upsample.conv.weight": "decoder.levels.3.resample.conv.weight",
        "encoder.mid.block_1.conv2.weight": "encoder.mid.res1.conv2.weight",
        "decoder.mid.block_2.norm2.bias": "decoder.mid.res2.norm2.bias",
        "encoder.mid.attn_1.proj_out.bias": "encoder.mid.attn.proj.bias",
        "encoder.down.1.block.0.nin_shortcut.weight": "encoder.levels.1.res.0.skip.weight",
        "quantize.embedding.weight": "quantizer.embedding.weight",
        "quantize.quant_resi.qresi_ls.3.weight": "quantizer.phis.3.weight",
        "quantize.quant_resi.qresi.bias": "quantizer.phis.0.bias",
        "quantize.quant_resi.7.weight": "quantizer.phis.7.weight",
        "encoder.conv_in.weight": "encoder.conv_in.weight",
        "quant_conv.weight": "quant_conv.weight",
        "quantize.ema_vocab_hit_SV": None,  # follows from the config: dropped
    }
    state = {key: torch.tensor(float(i)) for i, key in enumerate(pairs)}
    renamed = cu._rename(state, cu._VQVAE_RULES, cu._VQVAE_DERIVED)
    assert renamed == {new: state[old] for old, new in pairs.items() if new is not None}
    assert list(renamed) == [new for new in pairs.values() if new is not None]  # order kept


def test_every_var_key_rule_applies_once_and_derived_buffers_are_dropped():
    pairs = {
        "pos_1LC": "pos_embed",
        "shared_ada_lin.1.weight": "shared_ada_lin.weight",
        "blocks.3.attn.mat_qkv.weight": "blocks.3.attn.qkv.weight",
        "blocks.0.attn.scale_mul_1H11": "blocks.0.attn.scale_mul",
        "blocks.11.ffn.fc2.bias": "blocks.11.mlp.fc2.bias",
        "blocks.12.ada_lin.1.weight": "blocks.12.ada_lin.weight",
        "head_nm.ada_lin.1.bias": "head_norm.ada_lin.bias",
        "class_emb.weight": "class_emb.weight",
        "pos_1LC_extra": "pos_1LC_extra",  # anchored: only the whole name is renamed
        "blocks.1.ffn.ffn.weight": "blocks.1.mlp.ffn.weight",  # each rule at most once per key
        "blocks.2.ffn.x.ffn.weight": "blocks.2.mlp.x.ffn.weight",  # ... even where it matches twice apart
        "lvl_1L": None, "attn_bias_for_masking": None, "blocks.4.attn.zero_k_bias": None,
        "blocks.4.attn.zero_k_bias_x": "blocks.4.attn.zero_k_bias_x",
    }
    state = {key: torch.tensor(float(i)) for i, key in enumerate(pairs)}
    renamed = cu._rename(state, cu._VAR_RULES, cu._VAR_DERIVED)
    assert renamed == {new: state[old] for old, new in pairs.items() if new is not None}


def test_state_dicts_are_unwrapped_and_refused_by_name(tmp_path):
    w = torch.tensor(1.5)
    inner = {"module._orig_mod.quantize.embedding.weight": w, "_orig_mod.x": w}
    for wrapped in (inner, {"model": inner}, {"state_dict": inner, "epoch": 3}, {"trainer": inner},
                    {"model": {"state_dict": inner}}):
        assert cu._state_dict(dict(wrapped), "VQ-VAE", "quantize.embedding.weight") == {
            "quantize.embedding.weight": w, "x": w}
    with pytest.raises(CheckpointError) as err:
        cu._state_dict({}, "VAR", "class_emb.weight")
    assert str(err.value) == "the given VAR state dict: not a state dict of tensors in the reference VAR format"
    with pytest.raises(CheckpointError, match=r"^the given VAR state dict: not a state dict of tensors"):
        cu._state_dict({"class_emb.weight": w, "step": 3}, "VAR", "class_emb.weight")
    with pytest.raises(CheckpointError) as err:
        cu._state_dict({"a": w}, "VAR", "class_emb.weight")
    assert str(err.value) == "the given VAR state dict: no 'class_emb.weight', so not a reference VAR checkpoint"
    torch.save({"a": w}, tmp_path / "ref.pth")
    with pytest.raises(CheckpointError) as err:
        cu._state_dict(tmp_path / "ref.pth", "VQ-VAE", "quantize.embedding.weight")
    assert str(err.value) == f"{tmp_path / 'ref.pth'}: no 'quantize.embedding.weight', so not a reference VQ-VAE checkpoint"
    assert cu._state_dict(str(tmp_path / "ref.pth"), "VAR", "a") == {"a": w}


def test_weights_that_do_not_fit_are_refused_with_the_first_eight_keys():
    model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(5)])  # 10 keys: 0.weight ... 4.bias
    state = dict(model.state_dict())
    cu._load_strict(model, state, "ok.pth")
    with pytest.raises(CheckpointError) as err:
        cu._load_strict(model, {f"x{i}": torch.zeros(1) for i in range(9)}, "ref.pth")
    missing = [f"{i}.{p}" for i in range(5) for p in ("weight", "bias")]
    assert str(err.value) == (f"ref.pth: reference weights do not fit the model built from them (missing {missing[:8]}..."
                              f", unexpected {[f'x{i}' for i in range(8)]}...); pass the right config overrides")
    with pytest.raises(CheckpointError) as err:
        cu._load_strict(model, {**state, "extra": torch.zeros(1)}, "ref.pth")
    assert str(err.value) == ("ref.pth: reference weights do not fit the model built from them (missing [], unexpected "
                              "['extra']); pass the right config overrides")
    # the "..." marks more than eight keys: eight are listed in full, nine are cut
    four = nn.Sequential(*[nn.Linear(1, 1) for _ in range(4)])
    with pytest.raises(CheckpointError) as err:
        cu._load_strict(four, {f"x{i}": torch.zeros(1) for i in range(8)}, "ref.pth")
    assert str(err.value) == (f"ref.pth: reference weights do not fit the model built from them (missing {missing[:8]}"
                              f", unexpected {[f'x{i}' for i in range(8)]}); pass the right config overrides")
    with pytest.raises(CheckpointError) as err:
        cu._load_strict(model, {"4.bias": state["4.bias"]}, "ref.pth")
    assert str(err.value) == (f"ref.pth: reference weights do not fit the model built from them (missing {missing[:8]}"
                              "..., unexpected []); pass the right config overrides")
    with pytest.raises(CheckpointError, match=r"^ref\.pth: reference weights do not fit the model built from them: "
                                              r"Error\(s\) in loading"):
        cu._load_strict(model, {**state, "0.weight": torch.zeros(2, 2)}, "ref.pth")


def test_constructor_options_map_to_ours_or_are_refused():
    kwargs = dict(vocab_size=64, z_channels=8, ch=32, dropout=0.1, beta=0.3, using_znorm=True, quant_resi=0.4,
                  share_quant_resi=2, v_patch_nums=(1, 2, 4), quant_conv_ks=3, default_qresi_counts=0, test_mode=True)
    assert cu.vqvae_config_from_upstream_kwargs(kwargs) == dict(
        vocab_size=64, z_channels=8, ch=32, dropout=0.1, beta=0.3, using_znorm=True, phi_ratio=0.4, phi_share=2,
        scales=[1, 2, 4])
    # the options that need no counterpart are skipped wherever they come, not the end of the list
    assert cu.vqvae_config_from_upstream_kwargs({"test_mode": True, "quant_conv_ks": 3, "vocab_size": 64}) == {
        "vocab_size": 64}
    for key, value in (("quant_conv_ks", 1), ("default_qresi_counts", 2), ("ch_mult", (1, 2))):
        with pytest.raises(ValueError) as err:
            cu.vqvae_config_from_upstream_kwargs({key: value})
        assert str(err.value) == f"reference VQVAE option {key}={value!r} is not supported by models.vqvae.VQVAE"
    vq = {"vocab_size": 64, "z_channels": 8, "scales": [1, 2, 4]}
    var_kwargs = dict(num_classes=5, depth=4, embed_dim=256, num_heads=4, mlp_ratio=3.0, drop_rate=0.1,
                      attn_drop_rate=0.2, drop_path_rate=0.3, norm_eps=1e-5, shared_aln=True, cond_drop_rate=0.2,
                      attn_l2_norm=False)
    assert cu.var_config_from_upstream_kwargs({**var_kwargs, "patch_nums": (1, 2, 4), "flash_if_available": True,
                                               "fused_if_available": False}, vq) == {
        "vocab_size": 64, "z_channels": 8, "scales": [1, 2, 4], **var_kwargs}
    assert cu.var_config_from_upstream_kwargs({}, {"vocab_size": 4, "z_channels": 2})["scales"] == list(
        cu.REFERENCE_SCALES)
    with pytest.raises(ValueError) as err:
        cu.var_config_from_upstream_kwargs({"patch_nums": (1, 2, 3)}, vq)
    assert str(err.value) == "VAR patch_nums [1, 2, 3] differ from the VQ-VAE's scales [1, 2, 4]"
    with pytest.raises(ValueError) as err:
        cu.var_config_from_upstream_kwargs({"vae_local": None}, vq)
    assert str(err.value) == "reference VAR option vae_local=None is not supported by models.var.VAR"


def vqvae_shapes(phi_keys: list[str], levels: int = 3, blocks: int = 2, in_channels: int = 3) -> dict:
    state = {"quantize.embedding.weight": torch.empty(48, 6), "encoder.conv_in.weight": torch.empty(32, in_channels, 3, 3)}
    for i in range(levels):
        for b in range(blocks):
            state[f"encoder.down.{i}.block.{b}.conv1.weight"] = torch.empty(32 * (i + 1), 32, 3, 3)
    state.update({key: torch.empty(6, 6, 3, 3) for key in phi_keys})
    return state


def test_the_vqvae_config_is_read_from_the_shapes_and_keys():
    state = vqvae_shapes([f"quantize.quant_resi.qresi_ls.{i}.weight" for i in range(3)] + ["quantize.quant_resi.qresi_ls.2.bias"])
    assert cu.vqvae_config_from_upstream_state(state) == dict(
        vocab_size=48, z_channels=6, ch=32, ch_mult=[1, 2, 3], num_res_blocks=2, phi_share=3,
        scales=list(cu.REFERENCE_SCALES), in_channels=3)
    assert [type(m) for m in cu.vqvae_config_from_upstream_state(state)["ch_mult"]] == [int] * 3  # a layer width
    shared = cu.vqvae_config_from_upstream_state(vqvae_shapes(["quantize.quant_resi.qresi.weight"], 2, 1, 1))
    assert (shared["phi_share"], shared["ch_mult"], shared["num_res_blocks"], shared["in_channels"]) == (1, [1, 2], 1, 1)
    assert cu.vqvae_config_from_upstream_state(vqvae_shapes(["quantize.quant_resi.0.weight"]))["phi_share"] == 0
    assert cu.vqvae_config_from_upstream_state(state, scales=[1, 2], beta=0.5)["scales"] == [1, 2]
    hits = {**state, "quantize.ema_vocab_hit_SV": torch.empty(4, 48)}
    with pytest.raises(ValueError) as err:
        cu.vqvae_config_from_upstream_state(hits)
    assert str(err.value) == ("checkpoint quantizes 4 scales, not the reference's 10: pass scales (--scales on the "
                              "command line)")
    assert cu.vqvae_config_from_upstream_state(hits, scales=[1, 2, 3, 4])["scales"] == [1, 2, 3, 4]
    assert cu.vqvae_config_from_upstream_state({**state, "quantize.ema_vocab_hit_SV": torch.empty(10, 48)})[
        "scales"] == list(cu.REFERENCE_SCALES)


def var_shapes(depth: int = 3, width: int = 128, scales: tuple = (1, 2, 3), l2: bool = True, shared: bool = False) -> dict:
    state = {"word_embed.weight": torch.empty(width, 8), "pos_1LC": torch.empty(1, sum(s * s for s in scales), width),
             "lvl_embed.weight": torch.empty(len(scales), width), "head.weight": torch.empty(40, width),
             "class_emb.weight": torch.empty(6, width), "blocks.0.ffn.fc1.weight": torch.empty(3 * width, width)}
    for i in range(depth):
        state[f"blocks.{i}.attn.mat_qkv.weight"] = torch.empty(3 * width, width)
    if l2:
        state["blocks.0.attn.scale_mul_1H11"] = torch.empty(1, 4, 1, 1)
    if shared:
        state["shared_ada_lin.1.weight"] = torch.empty(6 * width, width)
    return state


def test_the_var_config_is_read_from_the_shapes_and_keys():
    assert cu.var_config_from_upstream_state(var_shapes(), scales=[1, 2, 3]) == dict(
        vocab_size=40, z_channels=8, scales=[1, 2, 3], num_classes=5, depth=3, embed_dim=128, num_heads=4,
        mlp_ratio=3.0, shared_aln=False, attn_l2_norm=True)
    plain = cu.var_config_from_upstream_state(var_shapes(depth=2, width=192, l2=False, shared=True), scales=[1, 2, 3])
    assert (plain["num_heads"], plain["attn_l2_norm"], plain["shared_aln"], plain["depth"]) == (3, False, True, 2)
    narrow = cu.var_config_from_upstream_state(var_shapes(width=32, l2=False), scales=[1, 2, 3], norm_eps=1e-5)
    assert narrow["num_heads"] == 1 and narrow["norm_eps"] == 1e-5  # width / 64, at least 1
    reference = var_shapes(scales=cu.REFERENCE_SCALES)
    assert cu.var_config_from_upstream_state(reference)["scales"] == list(cu.REFERENCE_SCALES)
    for scales in ([1, 2], [1, 2, 4], [1, 2, 2, 2]):
        with pytest.raises(ValueError) as err:
            cu.var_config_from_upstream_state(var_shapes(), scales=scales)
        assert str(err.value) == (f"VAR checkpoint has 3 scales with 14 tokens in all, which scales={scales} does not "
                                  "match: pass scales (--scales on the command line)")


def test_class_rows_resized_keep_the_first_rows_and_the_null_row_last():
    torch.manual_seed(0)
    old = torch.arange(4 * 3, dtype=torch.float32).view(4, 3)  # 3 classes + the null row
    grown = cu.resize_class_embedding(old, 5, init_std=0.02)
    assert grown.shape == (6, 3) and grown.dtype == torch.float32
    assert torch.equal(grown[:3], old[:3]) and torch.equal(grown[5], old[3])
    assert grown[3:5].abs().min() > 0
    big = cu.resize_class_embedding(torch.zeros(2, 4000), 2, init_std=0.5)  # new rows: the reference's trunc_normal_
    assert big[1].std().item() == pytest.approx(0.5, rel=0.05) and big[1].abs().max() <= 2  # cut at +-2 (absolute)
    shrunk = cu.resize_class_embedding(old.double(), 1, init_std=0.02)
    assert shrunk.dtype == torch.float64 and torch.equal(shrunk, old[[0, 3]].double())


def reference_vqvae_state(model) -> dict:
    """Our VQVAE's weights under the reference's key names (each renaming rule read backwards)."""
    backwards = [(r"^(en|de)coder\.levels\.(\d+)\.res\.", lambda m: f"{m[1]}coder.{'down' if m[1] == 'en' else 'up'}.{m[2]}.block."),
                 (r"^(en|de)coder\.levels\.(\d+)\.attn\.", lambda m: f"{m[1]}coder.{'down' if m[1] == 'en' else 'up'}.{m[2]}.attn."),
                 (r"^encoder\.levels\.(\d+)\.resample\.", r"encoder.down.\1.downsample."),
                 (r"^decoder\.levels\.(\d+)\.resample\.", r"decoder.up.\1.upsample."),
                 (r"\.mid\.res1\.", ".mid.block_1."), (r"\.mid\.res2\.", ".mid.block_2."), (r"\.mid\.attn\.", ".mid.attn_1."),
                 (r"\.skip\.", ".nin_shortcut."), (r"\.proj\.", ".proj_out."),
                 (r"^quantizer\.embedding\.", "quantize.embedding."),
                 (r"^quantizer\.phis\.(\d+)\.", r"quantize.quant_resi.qresi_ls.\1.")]
    return renamed(model.state_dict(), backwards)


def test_vqvae_from_upstream_rebuilds_the_model_from_its_weights_and_names_its_source(tmp_path):
    from models.vqvae import VQVAE

    torch.manual_seed(0)
    ours = VQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, phi_share=2, phi_ratio=0.3,
                 using_znorm=True, scales=(1, 2, 4), in_channels=1)
    state = reference_vqvae_state(ours)
    assert "encoder.down.0.block.0.conv1.weight" in state and "quantize.quant_resi.qresi_ls.1.bias" in state
    state["quantize.ema_vocab_hit_SV"] = torch.zeros(3, 16)  # derived: dropped
    converted = cu.vqvae_from_upstream(state, scales=[1, 2, 4], phi_ratio=0.3, using_znorm=True)
    assert not converted.training and converted.config == ours.config
    assert list(converted.state_dict()) == list(ours.state_dict())
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in ours.state_dict().items())
    torch.save({"model": state}, tmp_path / "ref.pth")
    from_file = cu.vqvae_from_upstream(str(tmp_path / "ref.pth"), scales=[1, 2, 4], phi_ratio=0.3, using_znorm=True)
    assert from_file.config == ours.config
    assert all(torch.equal(from_file.state_dict()[k], v) for k, v in ours.state_dict().items())
    # weights that do not fit (a layer missing) are refused with the source's name
    del state["decoder.conv_out.bias"]
    with pytest.raises(CheckpointError) as err:
        cu.vqvae_from_upstream(state, scales=[1, 2, 4])
    assert str(err.value).startswith("VQ-VAE state dict: reference weights do not fit the model built from them "
                                      "(missing ['decoder.conv_out.bias'], unexpected []")
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError) as err:
        cu.vqvae_from_upstream(tmp_path / "cut.pth", scales=[1, 2, 4])
    assert str(err.value).startswith(f"{tmp_path / 'cut.pth'}: reference weights do not fit")
    with pytest.raises(CheckpointError) as err:
        cu.vqvae_from_upstream({"encoder.conv_in.weight": state["encoder.conv_in.weight"]})
    assert str(err.value) == ("the given VQ-VAE state dict: no 'quantize.embedding.weight', so not a reference VQ-VAE "
                              "checkpoint")


def test_var_from_upstream_resizes_only_to_another_class_count(monkeypatch, tmp_path):
    from models.var import VAR

    torch.manual_seed(0)
    ours = VAR(vocab_size=16, z_channels=4, scales=(1, 2), num_classes=3, depth=1, embed_dim=64, num_heads=1)
    state = {("pos_1LC" if k == "pos_embed" else k.replace(".attn.qkv.", ".attn.mat_qkv.")
              .replace(".attn.scale_mul", ".attn.scale_mul_1H11").replace(".mlp.", ".ffn.")
              .replace("ada_lin.", "ada_lin.1.").replace("head_norm.", "head_nm.")): v for k, v in ours.state_dict().items()}
    stds = []
    real_resize = cu.resize_class_embedding
    monkeypatch.setattr(cu, "resize_class_embedding", lambda w, n, std: stds.append(std) or real_resize(w, n, std))
    same = cu.var_from_upstream(state, num_classes=3, scales=[1, 2])
    assert stds == [] and not same.training and torch.equal(same.class_emb.weight, ours.class_emb.weight)
    grown = cu.var_from_upstream(state, num_classes=5, scales=[1, 2])
    assert stds == [pytest.approx(math.sqrt(1 / 64 / 3))] and grown.num_classes == 5
    assert grown.class_emb.weight.shape == (6, 64) and torch.equal(grown.class_emb.weight[-1], ours.class_emb.weight[-1])
    with pytest.raises(CheckpointError) as err:
        cu.var_from_upstream({"pos_1LC": state["pos_1LC"]})
    assert str(err.value) == "the given VAR state dict: no 'class_emb.weight', so not a reference VAR checkpoint"
    del state["head.bias"]
    with pytest.raises(CheckpointError) as err:
        cu.var_from_upstream(state, scales=[1, 2])
    assert str(err.value).startswith("VAR state dict: reference weights do not fit the model built from them "
                                      "(missing ['head.bias'], unexpected []")
    torch.save(state, tmp_path / "var.pth")
    with pytest.raises(CheckpointError) as err:
        cu.var_from_upstream(tmp_path / "var.pth", scales=[1, 2])
    assert str(err.value).startswith(f"{tmp_path / 'var.pth'}: reference weights do not fit")


def test_cli_refusals(tmp_path, monkeypatch, capsys):
    def run(*args: str) -> str:
        monkeypatch.setattr(sys, "argv", ["convert_upstream.py", *args])
        with pytest.raises(SystemExit) as err:
            cu.main()
        return str(err.value)

    src, dst = tmp_path / "ref.pth", tmp_path / "ours.pth"
    assert run("--kind=vae", f"--src={src}", f"--dst={dst}") == "error: --kind must be vqvae or var, got 'vae'"
    assert run("--kind=var", f"--dst={dst}") == "error: both --src and --dst are required"
    assert run("--kind=var", f"--src={src}") == "error: both --src and --dst are required"
    assert run("--kind=var", f"--src={src}", f"--dst={tmp_path / '.' / 'ref.pth'}") == (
        f"error: --dst {tmp_path / '.' / 'ref.pth'} would overwrite the input")
    assert run("--kind=vqvae", f"--src={src}", f"--dst={dst}").startswith(f"error: {src}: checkpoint file does not exist")
    torch.save(var_shapes(), src)
    assert run("--kind=var", f"--src={src}", f"--dst={dst}") == (
        f"error: {src}: VAR checkpoint has 3 scales with 14 tokens in all, which scales={list(cu.REFERENCE_SCALES)} "
        "does not match: pass scales (--scales on the command line)")
    assert not dst.exists()


def test_cli_passes_its_overrides(tmp_path, monkeypatch, capsys):
    calls = []

    class Fake(nn.Linear):
        config = {"fake": True}

    def fake_var(src, num_classes=None, **overrides):
        calls.append(("var", src, num_classes, overrides))
        return Fake(2, 2)

    def fake_vqvae(src, **overrides):
        calls.append(("vqvae", src, overrides))
        return Fake(2, 2)

    monkeypatch.setattr(cu, "var_from_upstream", fake_var)
    monkeypatch.setattr(cu, "vqvae_from_upstream", fake_vqvae)
    src, dst = str(tmp_path / "ref.pth"), tmp_path / "ours.pth"
    for args in (["--kind=var", "--num_classes=4", "--num_heads=2", "--scales=1,2", "--norm_eps=1e-5"],
                 ["--kind=var"], ["--kind=vqvae", "--phi_ratio=0.3", "--using_znorm=true", "--num_heads=2"],
                 ["--kind=var", "--num_classes=1", "--num_heads=1"], ["--kind=var", "--num_classes=0", "--num_heads=0"],
                 ["--kind=vqvae", "--scales=1,2,4"]):
        monkeypatch.setattr(sys, "argv", ["convert_upstream.py", f"--src={src}", f"--dst={dst}", *args])
        cu.main()
    # -1 keeps the checkpoint's class count and heads; any other class count is a resize, any positive head count used
    assert calls == [("var", src, 4, {"norm_eps": 1e-5, "scales": [1, 2], "num_heads": 2}),
                     ("var", src, None, {"norm_eps": 1e-6}),
                     ("vqvae", src, {"phi_ratio": 0.3, "using_znorm": True}),
                     ("var", src, 1, {"norm_eps": 1e-6, "num_heads": 1}),
                     ("var", src, 0, {"norm_eps": 1e-6}),
                     ("vqvae", src, {"phi_ratio": 0.5, "using_znorm": False, "scales": [1, 2, 4]})]
    saved = torch.load(dst, weights_only=True)
    assert saved["model_config"] == {"fake": True} and set(saved["model"]) == {"weight", "bias"}
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {dst}: vqvae with 0.00M parameters, config {{'fake': True}}"

    class Big(Fake):  # 1 005 001 parameters: 1.005001M, printed as 1.01M
        def __init__(self):
            super().__init__(1_005_000, 1)

    monkeypatch.setattr(cu, "vqvae_from_upstream", lambda src, **overrides: Big())
    monkeypatch.setattr(sys, "argv", ["convert_upstream.py", f"--src={src}", f"--dst={dst}"])
    cu.main()
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {dst}: vqvae with 1.01M parameters, config {{'fake': True}}"
