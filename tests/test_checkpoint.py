"""common/checkpoint.py: each refusal's full message, the preset hint of a missing file, map_location, and the
model kind check; the safe loader's refusal of pickled objects."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from common import checkpoint
from common.checkpoint import (CheckpointError, check_model_kind, load_checkpoint, load_model, model_from_checkpoint,
                               require_keys)


class Payload:
    """Any class instance inside a checkpoint needs pickle to rebuild it, so it could run code."""

    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_every_load_refusal_says_the_file_and_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"^missing\.pth: checkpoint file does not exist$"):
        load_checkpoint("missing.pth")
    (tmp_path / "runs" / "var_cpu").mkdir(parents=True)
    torch.save({}, tmp_path / "runs" / "var_cpu" / "missing.pth")
    with pytest.raises(CheckpointError, match=r"^missing\.pth: checkpoint file does not exist; found "
                                              r"runs/var_cpu/missing\.pth$"):
        load_checkpoint("missing.pth")
    Path("empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"^empty\.pth: checkpoint file is empty$"):
        load_checkpoint("empty.pth")
    Path("garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"^garbage\.pth: not a PyTorch checkpoint \(no zip archive inside; "
                                              r"corrupt or another format\)$"):
        load_checkpoint("garbage.pth")
    Path("pickled.pth").write_bytes(pickle.dumps([1]))  # a plain pickle, no zip: also "not a PyTorch checkpoint"
    with pytest.raises(CheckpointError, match=r"^pickled\.pth: not a PyTorch checkpoint"):
        load_checkpoint("pickled.pth")
    torch.save({"w": torch.ones(1), "extra": Payload()}, "evil.pth")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint("evil.pth")
    message = str(err.value)
    assert message.startswith("evil.pth: refused, the file holds pickled Python objects beyond tensors and plain "
                              "containers, which could run code when loaded (Weights only load failed")
    assert message.endswith(")") and "\n" not in message  # only the first line of torch's explanation
    torch.save({"w": torch.ones(100)}, "good.pth")
    Path("cut.pth").write_bytes(Path("good.pth").read_bytes()[:200])
    with pytest.raises(CheckpointError,
                       match=r"^cut\.pth: not a readable PyTorch checkpoint \(truncated or corrupt\?\): "):
        load_checkpoint("cut.pth")
    torch.save(torch.ones(2), "tensor.pth")
    with pytest.raises(CheckpointError, match=r"^tensor\.pth: expected a dict checkpoint, found Tensor$"):
        load_checkpoint("tensor.pth")


RAN: list[str] = []


def _ran() -> None:
    RAN.append("code ran")


class Recorded:
    def __reduce__(self):
        return (_ran, ())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_weights_only_is_asked_for_even_where_the_environment_turns_the_default_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.load without weights_only=True follows TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD and unpickles anything
    path = tmp_path / "evil.pth"
    torch.save({"extra": Recorded()}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="refused, the file holds pickled Python objects"):
        load_checkpoint(path)
    assert RAN == []


def test_load_checkpoint_maps_tensors_where_asked(tmp_path: Path) -> None:
    path = tmp_path / "c.pth"
    torch.save({"w": torch.ones(2)}, path)
    assert load_checkpoint(path)["w"].device.type == "cpu"
    assert load_checkpoint(str(path), map_location="meta")["w"].device.type == "meta"


def test_require_keys_lists_what_is_missing_and_what_is_there(tmp_path: Path) -> None:
    require_keys({"a": 1, "b": 2}, ["a", "b"], "x.pth")
    with pytest.raises(CheckpointError, match=r"^x\.pth: not a checkpoint of this project: missing a, c \(has b, d\)$"):
        require_keys({"d": 1, "b": 2}, ["a", "b", "c"], "x.pth")
    with pytest.raises(CheckpointError, match=r"^y\.pth: not a checkpoint of this project: missing a \(has nothing\)$"):
        require_keys({}, ["a"], Path("y.pth"))


class Small(nn.Module):
    def __init__(self, width: int = 2, scale: float = 1.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError("scale must be positive")
        self.fc = nn.Linear(width, width)


def test_the_model_kind_is_checked_by_its_config_keys() -> None:
    check_model_kind({"model": {}, "model_config": {"width": 3}}, Small, "s.pth")
    with pytest.raises(CheckpointError, match=r"^v\.pth: is a VAR checkpoint \(train_var\.py\), but a Small checkpoint "
                                              r"is needed here$"):
        check_model_kind({"model": {}, "model_config": {"width": 3, "num_classes": 2}}, Small, "v.pth")
    with pytest.raises(CheckpointError, match=r"^q\.pth: is a VQ-VAE checkpoint \(train_vqvae\.py\), but a Small "):
        check_model_kind({"model": {}, "model_config": {"ch_mult": [1]}}, Small, "q.pth")
    check_model_kind({"model": {}, "model_config": {"depth": 2}}, Small, "f.pth")  # unknown: the constructor tells
    with pytest.raises(CheckpointError, match=r"^l\.pth: model_config is a list, not a dict of constructor arguments$"):
        check_model_kind({"model": {}, "model_config": [1]}, Small, "l.pth")
    with pytest.raises(CheckpointError, match=r"^m\.pth: not a checkpoint of this project: missing model_config"):
        check_model_kind({"model": {}}, Small, "m.pth")


def test_a_model_is_built_from_its_config_loaded_and_put_in_eval_mode(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model = Small(3)
    ckpt = {"model": model.state_dict(), "model_config": {"width": 3}}
    built = model_from_checkpoint(ckpt, Small, "s.pth")
    assert not built.training and torch.equal(built.fc.weight, model.fc.weight)
    with pytest.raises(CheckpointError, match=r"^s\.pth: model_config does not describe a Small: .*depth"):
        model_from_checkpoint({"model": {}, "model_config": {"depth": 2}}, Small, "s.pth")
    with pytest.raises(CheckpointError,
                       match=r"^s\.pth: model_config does not describe a Small: scale must be positive$"):
        model_from_checkpoint({"model": {}, "model_config": {"scale": -1.0}}, Small, "s.pth")
    with pytest.raises(CheckpointError, match=r"^s\.pth: weights do not fit its model_config: Error\(s\) in loading "
                                              r"state_dict for Small:\n\tsize mismatch"):
        model_from_checkpoint({"model": model.state_dict(), "model_config": {"width": 4}}, Small, "s.pth")
    assert model_from_checkpoint(ckpt, Small, "s.pth", map_location="meta").fc.weight.device.type == "meta"
    path = tmp_path / "s.pth"
    torch.save(ckpt, path)
    assert torch.equal(load_model(path, Small).fc.bias, model.fc.bias) and not load_model(path, Small).training
    asked = []
    real_load = checkpoint.load_checkpoint
    monkeypatch.setattr(checkpoint, "load_checkpoint",
                        lambda p, map_location: asked.append(map_location) or real_load(p))
    assert load_model(path, Small, map_location="meta").fc.weight.device.type == "meta" and asked == ["meta"]
    torch.save({"model": {}, "model_config": {"num_classes": 2}}, path)  # every refusal names the file
    with pytest.raises(CheckpointError, match=rf"^{path}: is a VAR checkpoint \(train_var\.py\), but a Small "):
        load_model(path, Small)
    with pytest.raises(CheckpointError, match=r"^v\.pth: is a VAR checkpoint"):
        model_from_checkpoint({"model": {}, "model_config": {"num_classes": 2}}, Small, "v.pth")


def test_safe_loader_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused, the file holds pickled Python objects"):
        load_checkpoint(path)


def test_safe_loader_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.pth")
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.ones(100)}}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated.pth: not a readable PyTorch checkpoint"):
        load_checkpoint(truncated)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="garbage.pth: not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "garbage.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project: missing model_config"):
        require_keys(load_checkpoint(good), ["model", "model_config"], good)


def test_a_checkpoint_whose_model_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    from common.checkpoint import check_model_kind
    from models.vqvae import VQVAE

    torch.save({"model": [torch.zeros(2)], "model_config": {}}, tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list.pth: its model entry is a list, not a dict of tensors"):
        check_model_kind(load_checkpoint(tmp_path / "list.pth"), VQVAE, tmp_path / "list.pth")
    os.mkfifo(tmp_path / "fifo.pth")
    with pytest.raises(CheckpointError, match=r"fifo.pth: not a regular file: a named pipe"):
        load_checkpoint(tmp_path / "fifo.pth")
