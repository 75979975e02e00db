"""A sample_var.py sweep folder as the evaluation steps (eval_var.py, eval_utility.py) read it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import preset_hint
from common.io import load_npz, read_csv_rows, read_json

# samples_manifest.csv's columns the evaluation steps read, and those an older sample_var.py named otherwise.
MANIFEST_COLUMNS = ("path", "point", "mode", "coarse_k", "guidance", "class", "label")
RENAMED_COLUMNS = {"cfg": "guidance"}


class SweepError(RuntimeError):
    """A folder that is not a finished sample_var.py sweep of this version."""


@dataclass
class Sweep:
    """What sample_var.py wrote: one manifest row and one token row per image, in the same order."""
    folder: Path
    rows: list[dict[str, str]]
    idx: np.ndarray  # (N, L) generated tokens
    config: dict[str, Any]
    vqvae_sha256: str
    classes: list[str]

    @property
    def points(self) -> list[str]:
        return list(dict.fromkeys(r["point"] for r in self.rows))


def load_sweep(folder: Path) -> Sweep:
    files = {name: folder / name for name in ("config.json", "samples_manifest.csv", "samples_tokens.npz")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SweepError(f"{folder}: not a finished sample_var.py folder (missing {', '.join(missing)})"
                         f"{preset_hint(files['samples_manifest.csv'])}")
    try:
        config = read_json(files["config.json"])
        columns, rows = read_csv_rows(files["samples_manifest.csv"])
        with load_npz(files["samples_tokens.npz"]) as data:
            idx, paths = data["idx"].astype(np.int64), data["image_path"].tolist()
            vqvae_sha, classes = str(data["vqvae_sha256"]), data["classes"].tolist()
    except (OSError, ValueError, KeyError) as err:  # SideFileError is a ValueError
        raise SweepError(f"{folder}: unreadable sample_var.py output: {err}") from None
    if not isinstance(config, dict):
        raise SweepError(f"{files['config.json']}: not a JSON object of sample_var.py's constants")
    for old, new in RENAMED_COLUMNS.items():
        if old in columns and new not in columns:
            raise SweepError(f"{files['samples_manifest.csv']}: written by an older sample_var.py (column {old!r}, "
                             f"now {new!r}); re-run sample_var.py into a new folder")
    absent = [c for c in MANIFEST_COLUMNS if c not in columns]
    if absent:
        raise SweepError(f"{files['samples_manifest.csv']}: not sample_var.py's manifest (columns {absent} missing)")
    if paths != [r["path"] for r in rows]:
        raise SweepError(f"{folder}: samples_manifest.csv and samples_tokens.npz list different images; re-run sample_var.py")
    return Sweep(folder, rows, idx, config, vqvae_sha, classes)
