"""models/classifier.py: the networks eval_utility.py trains, and starting one from weights a user holds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.checkpoint import CheckpointError
from models.classifier import Classifier, load_init


def test_init_loads_every_weight_but_the_last_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pretrained = Classifier(1000, "shufflenet_v2_x0_5")  # an ImageNet-sized head, as torchvision's files have
    torch.save(pretrained.net.state_dict(), tmp_path / "weights.pth")
    torch.manual_seed(1)
    model = Classifier(4, "shufflenet_v2_x0_5")
    fresh_fc = model.net.fc.weight.clone()
    loaded = load_init(model, tmp_path / "weights.pth")
    state, source = model.net.state_dict(), pretrained.net.state_dict()
    assert loaded == len(state) - 2  # all but fc.weight and fc.bias
    assert all(torch.equal(state[k], source[k]) for k in state if not k.startswith("fc."))
    assert torch.equal(model.net.fc.weight, fresh_fc) and model.net.fc.out_features == 4


def test_init_refuses_another_network_s_weights(tmp_path: Path) -> None:
    torch.save(Classifier(2, "shufflenet_v2_x0_5").net.state_dict(), tmp_path / "shufflenet.pth")
    with pytest.raises(CheckpointError, match=r"shufflenet.pth: not resnet18 weights: \d+ tensors missing"):
        load_init(Classifier(2, "resnet18"), tmp_path / "shufflenet.pth")
