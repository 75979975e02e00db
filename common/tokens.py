"""The multi-scale token file written by tokenize_multiscale_maps.py and read by VAR training.

tokens_multiscale_maps.npz (no pickles) holds, for N images and scales pn_1..pn_K:
`scales` int64 (K,), `map_<pn>` int16 (N, pn, pn) per scale, `idx` int16 (N, L) (the maps flattened and
concatenated, L = sum pn^2), `labels` int64 (N,), `split` str (N,), `source` str (N,) (image path relative
to the processed set), `vqvae_sha256` str (checksum of the VQ-VAE checkpoint that made the tokens) and
`vqvae_config` str (JSON of its model_config), `classes` str (K,) (the class names; label = index) and
`made_from` str (JSON: VQ-VAE checksum, settings and a fingerprint of the images; a rerun with the same inputs
skips). classes.json beside it lists the same names for people; a file from before `classes` was stored inside
takes its names from classes.json.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import preset_hint
from common.io import atomic_save_npz, atomic_write_json, file_sha256

CLASSES_FILE = "classes.json"
_KEYS = ("scales", "idx", "labels", "split", "source", "vqvae_sha256", "vqvae_config")


class TokenFileError(RuntimeError):
    """A token file that is missing, damaged, inconsistent, or made by another VQ-VAE."""


@dataclass
class TokenSet:
    scales: tuple[int, ...]
    idx: np.ndarray      # (N, L) int64
    labels: np.ndarray   # (N,) int64
    split: np.ndarray    # (N,) str
    source: np.ndarray   # (N,) str
    classes: list[str]
    vqvae_sha256: str
    vqvae_config: dict[str, Any]

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, split: str) -> "TokenSet":
        rows = self.split == split
        return replace(self, idx=self.idx[rows], labels=self.labels[rows], split=self.split[rows], source=self.source[rows])

    def _offset(self, i_scale: int) -> int:
        return sum(pn * pn for pn in self.scales[:i_scale])

    def maps(self, i_scale: int) -> np.ndarray:
        """Token maps (N, pn, pn) of scale number i_scale."""
        pn = self.scales[i_scale]
        start = self._offset(i_scale)
        return self.idx[:, start : start + pn * pn].reshape(-1, pn, pn)

    def idx_list(self, rows: np.ndarray | list[int]) -> list[torch.Tensor]:
        """The given rows as VQVAE.idx_to_img input: one LongTensor (B, pn, pn) per scale."""
        return split_scales(torch.from_numpy(self.idx[np.asarray(rows)]), self.scales)


def split_scales(idx: torch.Tensor, scales: tuple[int, ...] | list[int]) -> list[torch.Tensor]:
    """Token rows (B, L), scales concatenated coarse to fine -> one LongTensor (B, pn, pn) per scale."""
    maps = torch.split(idx.long(), [pn * pn for pn in scales], dim=1)
    return [m.reshape(-1, pn, pn) for m, pn in zip(maps, scales)]


def save_tokens(npz_path: str | Path, *, scales: tuple[int, ...] | list[int], maps: list[np.ndarray],
                labels: np.ndarray, split: np.ndarray | list[str], source: np.ndarray | list[str],
                vqvae_sha256: str, vqvae_config: dict[str, Any], classes: list[str], made_from: str = "") -> None:
    """Write the npz and classes.json beside it, each atomically. made_from: what the tokens were made from (see
    made_from_of), so that a rerun with the same inputs can skip the work."""
    scales = [int(s) for s in scales]
    if len(maps) != len(scales):
        raise ValueError(f"{npz_path}: {len(maps)} token maps for {len(scales)} scales")
    n = len(labels)
    for pn, m in zip(scales, maps):
        if m.shape != (n, pn, pn):
            raise ValueError(f"{npz_path}: token map of scale {pn} has shape {m.shape}, expected {(n, pn, pn)}")
        if m.size and (m.min() < 0 or m.max() > np.iinfo(np.int16).max):
            raise ValueError(f"{npz_path}: token ids of scale {pn} do not fit int16")
    maps16 = [np.asarray(m, dtype=np.int16) for m in maps]
    arrays = {f"map_{pn}": m for pn, m in zip(scales, maps16)}
    atomic_save_npz(
        npz_path,
        scales=np.asarray(scales, dtype=np.int64),
        idx=np.concatenate([m.reshape(n, -1) for m in maps16], axis=1),
        labels=np.asarray(labels, dtype=np.int64),
        split=np.asarray(split, dtype=str),
        source=np.asarray(source, dtype=str),
        vqvae_sha256=np.asarray(vqvae_sha256),
        vqvae_config=np.asarray(json.dumps(vqvae_config, sort_keys=True)),
        made_from=np.asarray(made_from),
        classes=np.asarray(list(classes), dtype=str),
        **arrays,
    )
    atomic_write_json(Path(npz_path).parent / CLASSES_FILE, list(classes))


def is_token_file(path: str | Path) -> bool:
    """Whether path is an npz archive with the arrays of a token file (what tokenization may overwrite)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        return False  # a single .npy array
    with loaded as data:
        return all(k in data.files for k in _KEYS)


def made_from_of(npz_path: str | Path) -> str | None:
    """The made_from record of an existing token file (None when there is none or the file is unreadable)."""
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            return str(data["made_from"]) if "made_from" in data.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def load_tokens(npz_path: str | Path, vqvae_path: str | Path | None = None) -> TokenSet:
    """Read and check a token file; with vqvae_path, refuse tokens made by a different VQ-VAE checkpoint."""
    npz_path = Path(npz_path)
    if not npz_path.is_file():
        raise TokenFileError(f"{npz_path}: token file does not exist; run tokenize_multiscale_maps.py first"
                             f"{preset_hint(npz_path)}")
    try:
        loaded = np.load(npz_path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise TokenFileError(f"{npz_path}: holds a single array, not an npz archive of token arrays")
        with loaded as data:
            missing = [k for k in _KEYS if k not in data.files]
            if missing:
                raise TokenFileError(f"{npz_path}: not a token file of this project: missing {', '.join(missing)}")
            scales = tuple(int(s) for s in data["scales"])
            map_keys = [f"map_{pn}" for pn in scales]
            missing = [k for k in map_keys if k not in data.files]
            if missing:
                raise TokenFileError(f"{npz_path}: not a token file of this project: missing {', '.join(missing)}")
            arrays = {k: data[k] for k in (*_KEYS, *map_keys, *(["classes"] if "classes" in data.files else []))}
    except TokenFileError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise TokenFileError(f"{npz_path}: not a readable npz token file (truncated or corrupt?): {err}") from None
    try:
        vqvae_config = json.loads(str(arrays["vqvae_config"]))
    except json.JSONDecodeError as err:
        raise TokenFileError(f"{npz_path}: vqvae_config is not valid JSON: {err}") from None
    _check_vqvae_config(vqvae_config, scales, npz_path)
    idx, labels = arrays["idx"], arrays["labels"]
    n, length = len(labels), sum(pn * pn for pn in scales)
    if idx.shape != (n, length) or arrays["split"].shape != (n,) or arrays["source"].shape != (n,):
        raise TokenFileError(f"{npz_path}: inconsistent shapes: idx {idx.shape} (expected {(n, length)}), "
                             f"labels {labels.shape}, split {arrays['split'].shape}, source {arrays['source'].shape}")
    flat = np.concatenate([arrays[k].reshape(n, -1) for k in map_keys], axis=1) if n else idx
    if not np.array_equal(flat, idx):
        raise TokenFileError(f"{npz_path}: idx does not match the per-scale maps (damaged file)")
    vocab = vqvae_config.get("vocab_size", np.iinfo(np.int16).max + 1)
    if idx.size and (idx.min() < 0 or idx.max() >= vocab):
        raise TokenFileError(f"{npz_path}: token ids outside [0, {vocab}) of the VQ-VAE's codebook")
    sha = str(arrays["vqvae_sha256"])
    if vqvae_path is not None:
        if not Path(vqvae_path).is_file():
            raise TokenFileError(f"{vqvae_path}: VQ-VAE checkpoint does not exist (needed to check {npz_path})")
        actual = file_sha256(vqvae_path)
        if actual != sha:
            raise TokenFileError(f"tokens in {npz_path} came from VQ-VAE sha {sha[:12]}..., but {vqvae_path} has sha "
                                 f"{actual[:12]}...; re-run tokenize_multiscale_maps.py")
    classes = _classes(npz_path, arrays.get("classes"))
    if n and labels.min() < 0:
        raise TokenFileError(f"{npz_path}: label {labels.min()} is negative (labels index the classes {classes})")
    if n and labels.max() >= len(classes):
        raise TokenFileError(f"{npz_path}: label {labels.max()} has no class ({len(classes)} classes: {classes})")
    return TokenSet(scales=scales, idx=idx.astype(np.int64), labels=labels.astype(np.int64), split=arrays["split"],
                    source=arrays["source"], classes=classes, vqvae_sha256=sha, vqvae_config=vqvae_config)


def _check_vqvae_config(config: Any, scales: tuple[int, ...], npz_path: Path) -> None:
    """The recorded VQ-VAE config must be what tokenization wrote: a dict whose vocab_size and scales fit the file."""
    if not isinstance(config, dict):
        raise TokenFileError(f"{npz_path}: vqvae_config is a JSON {type(config).__name__}, not the VQ-VAE's config "
                             "object (edited?); re-run tokenize_multiscale_maps.py")
    vocab = config.get("vocab_size", 1)
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise TokenFileError(f"{npz_path}: vqvae_config has vocab_size {vocab!r}, not a positive integer (edited?); "
                             "re-run tokenize_multiscale_maps.py")
    if "scales" in config and list(config["scales"]) != list(scales):
        raise TokenFileError(f"{npz_path}: vqvae_config has scales {config['scales']} but the file holds token maps of "
                             f"scales {list(scales)} (edited?); re-run tokenize_multiscale_maps.py")


def _classes(npz_path: Path, stored: np.ndarray | None) -> list[str]:
    """The class names: stored in the npz, and in classes.json beside it, which must agree (two token files in one
    folder share that classes.json); a file from before the names were stored inside has only classes.json."""
    classes_path = npz_path.parent / CLASSES_FILE
    try:
        beside = json.loads(classes_path.read_text())
    except FileNotFoundError:
        if stored is not None:
            return [str(c) for c in stored]
        raise TokenFileError(f"{classes_path}: missing (written beside {npz_path.name} by tokenize_multiscale_maps.py)") from None
    except json.JSONDecodeError as err:
        raise TokenFileError(f"{classes_path}: not valid JSON: {err}") from None
    if not isinstance(beside, list) or not all(isinstance(c, str) for c in beside):
        raise TokenFileError(f"{classes_path}: expected a JSON list of class names")
    if stored is not None and [str(c) for c in stored] != beside:
        raise TokenFileError(f"{npz_path} holds classes {[str(c) for c in stored]} but {classes_path} beside it lists "
                             f"{beside} (written for another token file in this folder?); keep each token file in its "
                             "own folder, or re-run tokenize_multiscale_maps.py")
    return beside
