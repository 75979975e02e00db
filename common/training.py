"""Pieces every training script shares: learning-rate schedule, parameter groups, non-finite-loss guard,
and checkpoints that hold the whole training state so a killed run resumes where it stopped."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.checkpoint import CheckpointError, load_checkpoint, require_keys
from common.io import atomic_torch_save
from common.runtime import rng_state, set_rng_state


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf: stop, keeping the last good checkpoints untouched."""


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, final_ratio: float = 0.01) -> float:
    """Linear warmup to peak_lr, then cosine decay to peak_lr * final_ratio at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms, biases, embeddings and other 1-D or embedding tables."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module_name = name.rsplit(".", 1)[0] if "." in name else ""
        module = model.get_submodule(module_name) if module_name else model
        is_embedding = isinstance(module, nn.Embedding) or "pos_" in name or "emb" in name.lower()
        # squeeze: per-channel tensors stored with singleton dims (e.g. a (1, heads, 1, 1) temperature) are gains too
        (no_decay if param.squeeze().ndim < 2 or is_embedding else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(
            f"loss became {loss.item()} at step {step}; stopping. The last good checkpoints are kept: "
            "lower the learning rate or switch precision (e.g. --precision=fp32) and resume."
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_training_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    model_config: dict[str, Any],
    config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    epoch: int,
    step: int,
    history: list[dict[str, Any]],
    best_val_loss: float,
    extra: dict[str, Any] | None = None,
) -> None:
    """Everything a resumed run needs, written atomically; `model` + `model_config` alone rebuild the network."""
    state: dict[str, Any] = {
        "model": unwrap(model).state_dict(),
        "model_config": model_config,
        "config": config,
        "epoch": epoch,
        "step": step,
        "history": history,
        "best_val_loss": best_val_loss,
        "rng": rng_state(),
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    state.update(extra or {})
    atomic_torch_save(state, path)


def resume_training_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    model_config: dict[str, Any],
) -> dict[str, Any]:
    """Load a last.pth into model/optimizer/scaler and the RNGs; return the checkpoint for epoch/step/history.

    Refuses a checkpoint whose network was built with another configuration than this run's.
    """
    ckpt = load_checkpoint(path)
    require_keys(ckpt, ["model", "model_config", "optimizer", "epoch", "step", "history", "rng"], path)
    if ckpt["model_config"] != model_config:
        raise CheckpointError(
            f"{path}: was written for a different network ({ckpt['model_config']}) than this run's ({model_config}); "
            "use another out_dir or the same constants"
        )
    try:
        unwrap(model).load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the model: {err}") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return ckpt
