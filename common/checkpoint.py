"""Loading checkpoints safely: tensors and plain containers only, never pickled code."""
from __future__ import annotations

import inspect
import pickle
import zipfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from common.config import preset_hint
from common.io import not_a_regular_file

M = TypeVar("M", bound=nn.Module)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, or would need to run code to load."""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """torch.load with weights_only=True, turning every failure into a CheckpointError naming the file."""
    path = Path(path)
    problem = not_a_regular_file(path)
    if problem == "file not found":
        raise CheckpointError(f"{path}: checkpoint file does not exist{preset_hint(path)}")
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (no zip archive inside; corrupt or another format)") from None
        raise CheckpointError(
            f"{path}: refused, the file holds pickled Python objects beyond tensors and plain containers, "
            f"which could run code when loaded ({str(err).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {err}") from None
    except MemoryError:
        raise CheckpointError(f"{path}: declares tensors larger than this machine's memory (damaged?)") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    return obj


def require_keys(ckpt: dict[str, Any], keys: list[str], path: str | Path) -> None:
    """Fail clearly when a checkpoint lacks what this project writes (e.g. a foreign file)."""
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path}: not a checkpoint of this project: missing {', '.join(missing)} (has {', '.join(sorted(ckpt)) or 'nothing'})"
        )


# A model_config key that only one of this project's networks has, and what a checkpoint holding it is.
_KINDS = {"num_classes": "a VAR checkpoint (train_var.py)", "ch_mult": "a VQ-VAE checkpoint (train_vqvae.py)"}


def check_model_kind(ckpt: dict[str, Any], cls: type[nn.Module], path: str | Path) -> None:
    """Refuse a checkpoint of another network of this project than cls (a VAR where a VQ-VAE is expected, or the
    reverse), naming the file and what it is."""
    require_keys(ckpt, ["model", "model_config"], path)
    if not isinstance(ckpt["model"], dict) or not all(torch.is_tensor(v) for v in ckpt["model"].values()):
        raise CheckpointError(f"{path}: its model entry is a {type(ckpt['model']).__name__}, not a dict of tensors "
                              "(a state_dict)")
    config = ckpt["model_config"]
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: model_config is a {type(config).__name__}, not a dict of constructor arguments")
    accepted = inspect.signature(cls).parameters
    if all(k in accepted for k in config):
        return
    kind = next((what for key, what in _KINDS.items() if key in config), None)
    if kind:
        raise CheckpointError(f"{path}: is {kind}, but a {cls.__name__} checkpoint is needed here")


def load_model(path: str | Path, cls: type[M], map_location: str | torch.device = "cpu") -> M:
    """A network from this project's checkpoint format {"model": state_dict, "model_config": kwargs, ...}, in eval mode."""
    return model_from_checkpoint(load_checkpoint(path, map_location=map_location), cls, path, map_location)


def model_from_checkpoint(ckpt: dict[str, Any], cls: type[M], path: str | Path,
                          map_location: str | torch.device = "cpu") -> M:
    """load_model for a checkpoint already read (its other entries are wanted too); path is for the messages."""
    check_model_kind(ckpt, cls, path)
    try:
        model = cls(**ckpt["model_config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: model_config does not describe a {cls.__name__}: {err}") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit its model_config: {err}") from None
    return model.to(map_location).eval()
