"""The downstream classifier eval_utility.py trains: a small torchvision network, from scratch or from weights a
user holds. ResNet-18 is the default; ShuffleNetV2 x0.5 (0.35M parameters for 4 classes, against 11.2M) trains
about 6 times faster on a CPU at 64 px (bench/bench_classifier.py), which is what the CPU presets use.

Grey ultrasound images enter as three equal channels so that ImageNet weights (torchvision's file, or a checkpoint
of this class) load unchanged; every weight but the last layer's (fc in both), whose size is the number of classes.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18, shufflenet_v2_x0_5

from common.checkpoint import CheckpointError, load_checkpoint


ARCHS = {"resnet18": resnet18, "shufflenet_v2_x0_5": shufflenet_v2_x0_5}


class Classifier(nn.Module):
    """A torchvision network of ARCHS with num_classes outputs (logits)."""

    def __init__(self, num_classes: int, arch: str = "resnet18") -> None:
        super().__init__()
        self.config = {"num_classes": num_classes, "arch": arch}
        self.net = ARCHS[arch](num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_init(model: Classifier, path: str | Path) -> int:
    """Start from pretrained weights (weights_only): a torchvision state dict of the model's arch, or a
    {"model": ...} checkpoint of this class. The last layer (fc) is kept fresh; every other weight must be there
    with its shape. Returns the number of tensors loaded."""
    ckpt = load_checkpoint(path)
    state = ckpt.get("model", ckpt)
    state = {k.removeprefix("net."): v for k, v in state.items()}
    own = {k: v for k, v in model.net.state_dict().items() if not k.startswith("fc.")}
    missing = [k for k in own if k not in state]
    misshapen = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or misshapen:
        raise CheckpointError(f"{path}: not {model.config['arch']} weights: {len(missing)} tensors missing "
                              f"({', '.join(missing[:3])}), {len(misshapen)} of another shape "
                              f"({', '.join(misshapen[:3])})")
    model.net.load_state_dict({k: state[k] for k in own}, strict=False)
    return len(own)
