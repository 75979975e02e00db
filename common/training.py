"""Pieces every training script shares: learning-rate schedule, parameter groups, an epoch's summed losses,
non-finite-loss guard, and checkpoints that hold the whole training state so a killed run resumes where it stopped."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.checkpoint import CheckpointError, check_model_kind, load_checkpoint, require_keys
from common.distributed import DistContext
from common.runtime import rng_state, set_rng_state


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf: stop, keeping the last good checkpoints untouched."""


LR_SCHEDULES = ("cosine", "lin0")
LIN0_FLAT = 0.05  # lin0: the share of the post-warmup steps held at the peak before the linear decay (the reference's)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, final_ratio: float = 0.01,
          schedule: str = "cosine") -> float:
    """Linear warmup to peak_lr over warmup_steps, then down to peak_lr * final_ratio at total_steps:
    "cosine" along a half cosine; "lin0" (the reference VAR's d16 recipe) flat at the peak for the first LIN0_FLAT
    of the remaining steps, then a straight line."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return peak_lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if schedule == "lin0":
        rest = min(1.0, (1 - progress) / (1 - LIN0_FLAT))
        return peak_lr * (final_ratio + (1 - final_ratio) * rest)
    raise ValueError(f"learning-rate schedule {schedule!r} is not one of {', '.join(LR_SCHEDULES)}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as in the reference VAR: no weight decay on 1-D parameters (norm gains, biases) and on those whose
    name contains one of the model's NO_WEIGHT_DECAY keys (e.g. position embeddings, the VQ-VAE's codebook); every
    other weight decays, embeddings included (the VAR's class embedding and word embedding)."""
    keys = getattr(unwrap(model), "NO_WEIGHT_DECAY", ())
    decay, no_decay = [], []
    for name, param in unwrap(model).named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim <= 1 or name.endswith("bias") or any(key in name for key in keys)
        (no_decay if exempt else decay).append(param)
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


class EpochSums:
    """What one epoch's training steps report, keyed by name (a loss term, a weight, per-scale counts), summed on
    the device without a host sync per step. A name may be reported on only some steps (e.g. the adversarial terms
    once the discriminator starts); every process must report the same names on the same steps."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype  # what the sums are kept in (None: each value's own dtype)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}  # steps that reported each name, in the order names first appeared

    def add(self, **values: torch.Tensor) -> None:
        for name, value in values.items():
            value = value.detach().to(self.dtype or value.dtype)
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
            self.counts[name] = self.counts.get(name, 0) + 1

    def totals(self, dist: DistContext) -> dict[str, torch.Tensor]:
        """The sums over every process, with one all_reduce: stacked flat in sorted name order (the same in every
        process, whatever order the names came in), then split back by name; the names in first-reported order."""
        names = sorted(self.sums)
        flat = dist.all_reduce_sum(torch.cat([self.sums[name].flatten() for name in names]))
        parts = dict(zip(names, flat.split([self.sums[name].numel() for name in names])))
        return {name: parts[name].view_as(self.sums[name]) for name in self.counts}

    def means(self, dist: DistContext) -> dict[str, Any]:
        """Per name, the mean over processes (equal local batches: the global batch's value) and over the steps
        that reported it: a float, or a list for a name with several elements."""
        return {name: (total / dist.world_size / self.counts[name]).tolist()
                for name, total in self.totals(dist).items()}


def check_epoch_finite(model: nn.Module, epoch: int, losses: dict[str, float]) -> None:
    """Before an epoch's checkpoints are written: its losses and every weight must be finite. A NaN from the epoch's
    last update shows only here (in the weights and the val loss), and must not reach last.pth."""
    bad = [f"{name} {value}" for name, value in losses.items() if not math.isfinite(value)]
    weights = [name for name, tensor in unwrap(model).state_dict().items()
               if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if weights:
        bad.append(f"weights {', '.join(weights[:3])}" + (f" and {len(weights) - 3} more" if len(weights) > 3 else ""))
    if bad:
        raise NonFiniteLossError(
            f"epoch {epoch}: non-finite {', '.join(bad)}; stopping without writing its checkpoints. The last good "
            "checkpoints are kept: lower the learning rate or switch precision (e.g. --precision=fp32) and resume."
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def training_state(
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
) -> dict[str, Any]:
    """Everything a resumed run needs; `model` + `model_config` alone rebuild the network."""
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
    return state


def checkpoint_to_resume(resume: str, out_dir: str | Path) -> Path | None:
    """The checkpoint a run's `resume` constant names: 'auto' = out_dir/last.pth when it exists, 'none' = none (start
    afresh), else the path given (a missing one is refused when it is read)."""
    if resume == "none":
        return None
    if resume == "auto":
        last = Path(out_dir) / "last.pth"
        return last if last.is_file() else None
    return Path(resume)


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
    check_model_kind(ckpt, type(unwrap(model)), path)
    require_keys(ckpt, ["optimizer", "epoch", "step", "history", "rng"], path)
    if ckpt["model_config"] != model_config:
        raise CheckpointError(
            f"{path}: was written for a different network ({ckpt['model_config']}) than this run's ({model_config}); "
            "use another out_dir or the same constants"
        )
    non_finite = [k for k, v in ckpt["model"].items() if torch.is_tensor(v) and v.is_floating_point()
                  and not torch.isfinite(v).all()]
    if non_finite:
        raise CheckpointError(f"{path}: holds non-finite weights ({', '.join(non_finite[:3])}; saved after a NaN?); "
                              "resume from another checkpoint (--resume=PATH) or start afresh (--resume=none)")
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
