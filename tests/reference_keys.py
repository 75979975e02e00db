"""Our models' weights under the reference VAR's key names, for the conversion tests: each renaming rule of
models/convert_upstream.py read backwards."""
from __future__ import annotations

import re
from typing import Callable

import torch

Rule = tuple[str, str | Callable[[re.Match], str]]


def renamed(state: dict[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """`state` with every key rewritten by each rule in turn (its first match only)."""
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key, count=1)
        out[key] = value
    return out
