"""Load checkpoints in the reference VAR format (github.com/FoundationVision/VAR, e.g. the public
vae_ch160v4096z32.pth and var_d16.pth ... var_d30.pth) into this project's models, and convert them to
this project's checkpoint format {"model", "model_config"}.

    python -m models.convert_upstream --kind=vqvae --src=vae_ch160v4096z32.pth --dst=pretrained/vqvae.pth
    python -m models.convert_upstream --kind=var --src=var_d16.pth --dst=pretrained/var_d16.pth --num_classes=6

What the reference's weights cannot tell (VQ-VAE scales, phi ratio, z-norm; VAR scales when the sequence
length is ambiguous, LayerNorm eps, dropout rates) falls back to the reference's defaults unless overridden.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from common.checkpoint import CheckpointError, load_checkpoint
from common.config import parse_config
from common.io import atomic_torch_save
from models.var import VAR
from models.vqvae import VQVAE

REFERENCE_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)

# Reference key pattern -> ours; applied in order, each at most once per key.
_VQVAE_RULES = [
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.levels.\1.res."),
    (r"^encoder\.down\.(\d+)\.attn\.", r"encoder.levels.\1.attn."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.levels.\1.resample."),
    (r"^decoder\.up\.(\d+)\.block\.", r"decoder.levels.\1.res."),
    (r"^decoder\.up\.(\d+)\.attn\.", r"decoder.levels.\1.attn."),
    (r"^decoder\.up\.(\d+)\.upsample\.", r"decoder.levels.\1.resample."),
    (r"\.mid\.block_1\.", ".mid.res1."),
    (r"\.mid\.block_2\.", ".mid.res2."),
    (r"\.mid\.attn_1\.", ".mid.attn."),
    (r"\.nin_shortcut\.", ".skip."),
    (r"\.proj_out\.", ".proj."),
    (r"^quantize\.embedding\.", "quantizer.embedding."),
    (r"^quantize\.quant_resi\.qresi_ls\.(\d+)\.", r"quantizer.phis.\1."),  # partially shared phi
    (r"^quantize\.quant_resi\.qresi\.", "quantizer.phis.0."),              # one shared phi
    (r"^quantize\.quant_resi\.(\d+)\.", r"quantizer.phis.\1."),            # one phi per scale
]
_VQVAE_DERIVED = re.compile(r"^quantize\.ema_vocab_hit_SV$")

_VAR_RULES = [
    (r"^pos_1LC$", "pos_embed"),
    (r"^shared_ada_lin\.1\.", "shared_ada_lin."),
    (r"\.attn\.mat_qkv\.", ".attn.qkv."),
    (r"\.attn\.scale_mul_1H11$", ".attn.scale_mul"),
    (r"\.ffn\.", ".mlp."),
    (r"^blocks\.(\d+)\.ada_lin\.1\.", r"blocks.\1.ada_lin."),
    (r"^head_nm\.ada_lin\.1\.", "head_norm.ada_lin."),
]
# Buffers the reference stores but that follow from the config (or are always zero).
_VAR_DERIVED = re.compile(r"^(lvl_1L|attn_bias_for_masking|blocks\.\d+\.attn\.zero_k_bias)$")


def _rename(state: dict[str, torch.Tensor], rules: list[tuple[str, str]], derived: re.Pattern) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if derived.match(key):
            continue
        new = key
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new, count=1)
        out[new] = value
    return out


def _state_dict(src: str | Path | dict[str, Any], what: str, required: str) -> dict[str, torch.Tensor]:
    """A reference state dict from a path or a dict (also unwraps {"model": ...}-style wrappers)."""
    name = str(src) if isinstance(src, (str, Path)) else f"the given {what} state dict"
    state = load_checkpoint(src) if isinstance(src, (str, Path)) else src
    for wrapper in ("model", "state_dict", "trainer"):
        if wrapper in state and isinstance(state[wrapper], dict) and not torch.is_tensor(state[wrapper]):
            state = state[wrapper]
    if not state or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{name}: not a state dict of tensors in the reference {what} format")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    if required not in state:
        raise CheckpointError(f"{name}: no {required!r}, so not a reference {what} checkpoint")
    return state


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise CheckpointError(f"{name}: reference weights do not fit the model built from them: {err}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{name}: reference weights do not fit the model built from them "
            f"(missing {missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{'...' if len(unexpected) > 8 else ''}); pass the right config overrides")


def vqvae_config_from_upstream_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Our VQVAE kwargs from the reference VQVAE constructor's (vocab_size, z_channels, ch, beta, using_znorm,
    quant_resi, share_quant_resi, v_patch_nums, dropout)."""
    names = {"vocab_size": "vocab_size", "z_channels": "z_channels", "ch": "ch", "dropout": "dropout", "beta": "beta",
             "using_znorm": "using_znorm", "quant_resi": "phi_ratio", "share_quant_resi": "phi_share",
             "v_patch_nums": "scales"}
    out = {}
    for key, value in kwargs.items():
        if key in names:
            out[names[key]] = list(value) if key == "v_patch_nums" else value
        elif key == "quant_conv_ks" and value == 3 or key == "default_qresi_counts" and value == 0 or key == "test_mode":
            continue
        else:
            raise ValueError(f"reference VQVAE option {key}={value!r} is not supported by models.vqvae.VQVAE")
    return out


def var_config_from_upstream_kwargs(kwargs: dict[str, Any], vqvae_config: dict[str, Any]) -> dict[str, Any]:
    """Our VAR kwargs from the reference VAR constructor's plus the VQVAE config (vocab, z, scales)."""
    ours = {"num_classes", "depth", "embed_dim", "num_heads", "mlp_ratio", "drop_rate", "attn_drop_rate",
            "drop_path_rate", "norm_eps", "shared_aln", "cond_drop_rate", "attn_l2_norm"}
    out: dict[str, Any] = dict(vocab_size=vqvae_config["vocab_size"], z_channels=vqvae_config["z_channels"],
                               scales=list(vqvae_config.get("scales", REFERENCE_SCALES)))
    for key, value in kwargs.items():
        if key in ours:
            out[key] = value
        elif key == "patch_nums":
            if list(value) != out["scales"]:
                raise ValueError(f"VAR patch_nums {list(value)} differ from the VQ-VAE's scales {out['scales']}")
        elif key not in ("flash_if_available", "fused_if_available"):
            raise ValueError(f"reference VAR option {key}={value!r} is not supported by models.var.VAR")
    return out


def vqvae_config_from_upstream_state(state: dict[str, torch.Tensor], **overrides: Any) -> dict[str, Any]:
    """Everything the reference VQ-VAE weights tell about its config; the rest is the reference default."""
    vocab, z = state["quantize.embedding.weight"].shape
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    ch_mult = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels]
    num_res_blocks = len({k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")})
    if any(k.startswith("quantize.quant_resi.qresi_ls.") for k in state):
        phi_share = len({k.split(".")[3] for k in state if k.startswith("quantize.quant_resi.qresi_ls.")})
    elif any(k.startswith("quantize.quant_resi.qresi.") for k in state):
        phi_share = 1
    else:
        phi_share = 0
    num_scales = state["quantize.ema_vocab_hit_SV"].shape[0] if "quantize.ema_vocab_hit_SV" in state else None
    scales = list(REFERENCE_SCALES)
    if "scales" not in overrides and num_scales is not None and num_scales != len(scales):
        raise ValueError(f"checkpoint quantizes {num_scales} scales, not the reference's {len(scales)}: "
                         "pass scales (--scales on the command line)")
    config = dict(vocab_size=int(vocab), z_channels=int(z), ch=int(ch), ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                  phi_share=phi_share, scales=scales, in_channels=int(state["encoder.conv_in.weight"].shape[1]))
    config.update(overrides)
    return config


def vqvae_from_upstream(src: str | Path | dict[str, Any], **config_overrides: Any) -> VQVAE:
    """A VQVAE with the reference checkpoint's weights (path or state dict), in eval mode."""
    state = _state_dict(src, "VQ-VAE", "quantize.embedding.weight")
    model = VQVAE(**vqvae_config_from_upstream_state(state, **config_overrides))
    name = str(src) if isinstance(src, (str, Path)) else "VQ-VAE state dict"
    _load_strict(model, _rename(state, _VQVAE_RULES, _VQVAE_DERIVED), name)
    return model.eval()


def var_config_from_upstream_state(state: dict[str, torch.Tensor], **overrides: Any) -> dict[str, Any]:
    """Everything the reference VAR weights tell about its config; the rest is the reference default
    (heads = width / 64 without L2-normalised attention, as the reference's var_d* models)."""
    embed_dim, z = state["word_embed.weight"].shape
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    attn_l2_norm = "blocks.0.attn.scale_mul_1H11" in state
    num_heads = state["blocks.0.attn.scale_mul_1H11"].shape[1] if attn_l2_norm else max(1, embed_dim // 64)
    length = state["pos_1LC"].shape[1]
    num_levels = state["lvl_embed.weight"].shape[0]
    scales = overrides.get("scales", list(REFERENCE_SCALES))
    if len(scales) != num_levels or sum(s * s for s in scales) != length:
        raise ValueError(f"VAR checkpoint has {num_levels} scales with {length} tokens in all, which "
                         f"scales={list(scales)} does not match: pass scales (--scales on the command line)")
    config = dict(vocab_size=int(state["head.weight"].shape[0]), z_channels=int(z), scales=list(scales),
                  num_classes=int(state["class_emb.weight"].shape[0]) - 1, depth=depth, embed_dim=int(embed_dim),
                  num_heads=int(num_heads), mlp_ratio=state["blocks.0.ffn.fc1.weight"].shape[0] / embed_dim,
                  shared_aln="shared_ada_lin.1.weight" in state, attn_l2_norm=attn_l2_norm)
    config.update(overrides)
    return config


def resize_class_embedding(weight: torch.Tensor, num_classes: int, init_std: float) -> torch.Tensor:
    """(n_old + 1, C) -> (num_classes + 1, C): keep the first min(n_old, num_classes) class rows, draw new rows
    like the reference init, and keep the null (guidance) row last."""
    old = weight.shape[0] - 1
    out = torch.empty(num_classes + 1, weight.shape[1], dtype=weight.dtype)
    nn.init.trunc_normal_(out, std=init_std)
    keep = min(old, num_classes)
    out[:keep] = weight[:keep]
    out[-1] = weight[-1]
    return out


def var_from_upstream(src: str | Path | dict[str, Any], num_classes: int | None = None, **config_overrides: Any) -> VAR:
    """A VAR with the reference checkpoint's weights (path or state dict), in eval mode. With num_classes
    different from the checkpoint's, the class embedding is resized (see resize_class_embedding)."""
    state = _state_dict(src, "VAR", "class_emb.weight")
    config = var_config_from_upstream_state(state, **config_overrides)
    ours = _rename(state, _VAR_RULES, _VAR_DERIVED)
    if num_classes is not None and num_classes != config["num_classes"]:
        config["num_classes"] = num_classes
        ours["class_emb.weight"] = resize_class_embedding(ours["class_emb.weight"], num_classes,
                                                          math.sqrt(1 / config["embed_dim"] / 3))
    model = VAR(**config)
    _load_strict(model, ours, str(src) if isinstance(src, (str, Path)) else "VAR state dict")
    return model.eval()


@dataclass
class Config:
    kind: str = "vqvae"          # which network the source holds: vqvae or var
    src: str = ""                # reference checkpoint (.pth) to read
    dst: str = ""                # where to write this project's checkpoint {"model", "model_config"}
    num_classes: int = -1        # VAR only: resize the class embedding to this many classes (-1 keeps the checkpoint's)
    scales: tuple[int, ...] = ()  # scale sides, e.g. 1,2,3,4 (empty: the reference's 1,2,3,4,5,6,8,10,13,16)
    phi_ratio: float = 0.5       # VQ-VAE only: phi blend ratio the checkpoint was trained with (reference 0.5)
    using_znorm: bool = False    # VQ-VAE only: cosine nearest-code search (reference False)
    norm_eps: float = 1e-6       # VAR only: LayerNorm eps (reference 1e-6)
    num_heads: int = -1          # VAR only: attention heads (-1: from the checkpoint, else width / 64 as the reference)


def main() -> None:
    cfg = parse_config(Config)
    if cfg.kind not in ("vqvae", "var"):
        raise SystemExit(f"error: --kind must be vqvae or var, got {cfg.kind!r}")
    if not cfg.src or not cfg.dst:
        raise SystemExit("error: both --src and --dst are required")
    if Path(cfg.src).resolve() == Path(cfg.dst).resolve():
        raise SystemExit(f"error: --dst {cfg.dst} would overwrite the input")
    overrides: dict[str, Any] = {}
    if cfg.scales:
        overrides["scales"] = list(cfg.scales)
    if cfg.kind == "var" and cfg.num_heads > 0:
        overrides["num_heads"] = cfg.num_heads
    try:
        if cfg.kind == "vqvae":
            model: nn.Module = vqvae_from_upstream(cfg.src, phi_ratio=cfg.phi_ratio, using_znorm=cfg.using_znorm,
                                                   **overrides)
        else:
            model = var_from_upstream(cfg.src, num_classes=None if cfg.num_classes < 0 else cfg.num_classes,
                                      norm_eps=cfg.norm_eps, **overrides)
    except CheckpointError as err:  # already names the file
        raise SystemExit(f"error: {err}") from None
    except ValueError as err:
        raise SystemExit(f"error: {cfg.src}: {err}") from None
    atomic_torch_save({"model": model.state_dict(), "model_config": model.config}, cfg.dst)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {cfg.dst}: {cfg.kind} with {n_params / 1e6:.2f}M parameters, config {model.config}")


if __name__ == "__main__":
    main()
