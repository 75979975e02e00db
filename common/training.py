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


class LossWatch:
    """The training loss, watched on its device. Reading it every step would be a host sync that stalls a GPU's
    queue, so the first non-finite step is recorded on the device and read only by `check`: every step on the CPU
    (where reading costs nothing), every `gpu_every` steps on a GPU, and always before anything is saved."""

    def __init__(self, device: torch.device, gpu_every: int = 50) -> None:
        self.every = 1 if device.type == "cpu" else gpu_every
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_value = torch.zeros((), dtype=torch.float64, device=device)
        self.latest = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, loss: torch.Tensor, step: int) -> bool:
        """Record the loss of `step`; True when it is time to `check`."""
        self.latest = loss.detach().double()
        new_bad = (self.first_bad < 0) & ~torch.isfinite(self.latest)
        self.first_bad = torch.where(new_bad, step, self.first_bad)
        self.bad_value = torch.where(new_bad, self.latest, self.bad_value)
        return (step + 1) % self.every == 0

    def check(self) -> float:
        """Raise NonFiniteLossError if any loss so far was NaN or infinite; else return the latest loss."""
        first_bad = int(self.first_bad)
        if first_bad >= 0:
            raise NonFiniteLossError(
                f"loss became {float(self.bad_value)} at step {first_bad}; stopping. The last good checkpoints are "
                "kept: lower the learning rate or switch precision (e.g. --precision=fp32) and resume."
            )
        return float(self.latest)


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
    if scaler is not None and scaler.is_enabled():  # a disabled scaler (bf16, fp32) has no state
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
    # Only fp16 uses a scaler: a run resumed in another precision starts a fresh loss scale or ignores the saved one.
    if scaler is not None and scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return ckpt
