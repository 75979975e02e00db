"""The multi-scale token file written by tokenize_multiscale_maps.py and read by VAR training.

tokens_multiscale_maps.npz (no pickles) holds, for N images and scales pn_1..pn_K:
`scales` int64 (K,), `map_<pn>` int16 (N, pn, pn) per scale, `idx` int16 (N, L) (the maps flattened and
concatenated, L = sum pn^2), `labels` int64 (N,), `split` str (N,), `source` str (N,) (image path relative
to the processed set), `vqvae_sha256` str (checksum of the VQ-VAE checkpoint that made the tokens) and
`vqvae_config` str (JSON of its model_config), `classes` str (K,) (the class names; label = index) and
`made_from` str (JSON: VQ-VAE checksum, settings and a fingerprint of the images; a rerun with the same inputs
skips). classes.json beside it lists the same names for people; a file from before `classes` was stored inside
takes its names from classes.json.

Format 2 (`format_version` 2) may add augmented copies of some rows (the training images): `aug_rows` int64 (M,)
(which rows) and `aug_idx` int16 (M, A, L) (A augmented copies of each, copy 0 being the row's own `idx`). Every
other array is as in format 1, so a reader that ignores these two sees exactly the un-augmented token set; a file
without `format_version` is format 1. A file of a newer format than FORMAT_VERSION is refused with a clear error.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import preset_hint
from common.io import SideFileError, atomic_save_npz, atomic_write_json, file_sha256, load_npz, read_json

CLASSES_FILE = "classes.json"
_KEYS = ("scales", "idx", "labels", "split", "source", "vqvae_sha256", "vqvae_config")
FORMAT_VERSION = 2  # 2: optional augmented copies (aug_rows, aug_idx); 1: without them


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
    aug_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (M,) rows that have augmented copies
    aug_idx: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.int16))  # (M, A, L) their copies 1..A

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, split: str) -> "TokenSet":
        return self.take(np.flatnonzero(self.split == split))

    def take(self, rows: np.ndarray) -> "TokenSet":
        """The given rows (sorted, distinct), with their augmented copies."""
        position = np.full(len(self), -1)
        position[rows] = np.arange(len(rows))
        kept = position[self.aug_rows] >= 0
        return replace(self, idx=self.idx[rows], labels=self.labels[rows], split=self.split[rows],
                       source=self.source[rows], aug_rows=position[self.aug_rows[kept]], aug_idx=self.aug_idx[kept])

    @property
    def num_copies(self) -> int:
        """Token copies per augmented row: 1 (the un-augmented tokens only) when the file holds no augmented copies."""
        return 1 + (self.aug_idx.shape[1] if len(self.aug_rows) else 0)

    def copies(self) -> np.ndarray:
        """(N, C, L) int16: every row's C = num_copies token copies, copy 0 the un-augmented one. Each row must have
        the augmented copies (true of the train split of a file tokenized with augmentation), or the file none."""
        if self.num_copies == 1:
            return self.idx[:, None].astype(np.int16)
        if not np.array_equal(np.sort(self.aug_rows), np.arange(len(self))):
            raise TokenFileError(f"{len(self.aug_rows)} of {len(self)} rows have augmented copies; all or none must")
        out = np.empty((len(self), self.num_copies, self.idx.shape[1]), np.int16)
        out[:, 0] = self.idx
        out[self.aug_rows, 1:] = self.aug_idx
        return out

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
                vqvae_sha256: str, vqvae_config: dict[str, Any], classes: list[str], made_from: str = "",
                aug_rows: np.ndarray | None = None, aug_maps: list[np.ndarray] | None = None) -> None:
    """Write the npz and classes.json beside it, each atomically. made_from: what the tokens were made from (see
    made_from_of), so that a rerun with the same inputs can skip the work. aug_rows (M,) and aug_maps (one
    (M, A, pn, pn) array per scale): A augmented copies of each of those rows (copy 0 is the row itself)."""
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
    if aug_rows is not None and len(aug_rows):
        aug_rows = np.asarray(aug_rows, dtype=np.int64)
        copies = aug_maps[0].shape[1] if aug_maps else 0
        for pn, m in zip(scales, aug_maps or []):
            if m.shape != (len(aug_rows), copies, pn, pn):
                raise ValueError(f"{npz_path}: augmented maps of scale {pn} have shape {m.shape}, expected "
                                 f"{(len(aug_rows), copies, pn, pn)}")
        if aug_maps is None or len(aug_maps) != len(scales) or copies < 1:
            raise ValueError(f"{npz_path}: aug_rows given without one (M, A >= 1, pn, pn) map per scale")
        if aug_rows.min() < 0 or aug_rows.max() >= n or len(np.unique(aug_rows)) != len(aug_rows):
            raise ValueError(f"{npz_path}: aug_rows must be distinct rows in [0, {n})")
        arrays["aug_rows"] = aug_rows
        arrays["aug_idx"] = np.concatenate([np.asarray(m, dtype=np.int16).reshape(len(aug_rows), copies, -1)
                                            for m in aug_maps], axis=2)
    atomic_save_npz(
        npz_path,
        scales=np.asarray(scales, dtype=np.int64),
        idx=np.concatenate([m.reshape(n, pn * pn) for pn, m in zip(scales, maps16)], axis=1),
        labels=np.asarray(labels, dtype=np.int64),
        split=np.asarray(split, dtype=str),
        source=np.asarray(source, dtype=str),
        vqvae_sha256=np.asarray(vqvae_sha256),
        vqvae_config=np.asarray(json.dumps(vqvae_config, sort_keys=True)),
        made_from=np.asarray(made_from),
        classes=np.asarray(list(classes), dtype=str),
        format_version=np.asarray(FORMAT_VERSION, dtype=np.int64),
        **arrays,
    )
    atomic_write_json(Path(npz_path).parent / CLASSES_FILE, list(classes))


def is_token_file(path: str | Path) -> bool:
    """Whether path is an npz archive with the arrays of a token file (what tokenization may overwrite)."""
    try:
        loaded = load_npz(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # SideFileError is a ValueError
        return False
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        return False  # a single .npy array
    with loaded as data:
        return all(k in data.files for k in _KEYS)


def made_from_of(npz_path: str | Path) -> str | None:
    """The made_from record of an existing token file (None when there is none or the file is unreadable)."""
    try:
        with load_npz(npz_path) as data:
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
        loaded = load_npz(npz_path)
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
            version = int(data["format_version"]) if "format_version" in data.files else 1
            if version > FORMAT_VERSION:
                raise TokenFileError(f"{npz_path}: token file format {version}, newer than the {FORMAT_VERSION} this "
                                     "code reads; update the code or re-run tokenize_multiscale_maps.py")
            optional = [k for k in ("classes", "aug_rows", "aug_idx") if k in data.files]
            arrays = {k: data[k] for k in (*_KEYS, *map_keys, *optional)}
    except TokenFileError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise TokenFileError(f"{npz_path}: not a readable npz token file (truncated or corrupt?): {err}") from None
    try:
        vqvae_config = json.loads(str(arrays["vqvae_config"]))
    except (json.JSONDecodeError, RecursionError) as err:
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
    aug_rows, aug_idx = _augmented(npz_path, arrays, n, length, vocab)
    classes = _classes(npz_path, arrays.get("classes"))
    if n and labels.min() < 0:
        raise TokenFileError(f"{npz_path}: label {labels.min()} is negative (labels index the classes {classes})")
    if n and labels.max() >= len(classes):
        raise TokenFileError(f"{npz_path}: label {labels.max()} has no class ({len(classes)} classes: {classes})")
    return TokenSet(scales=scales, idx=idx.astype(np.int64), labels=labels.astype(np.int64), split=arrays["split"],
                    source=arrays["source"], classes=classes, vqvae_sha256=sha, vqvae_config=vqvae_config,
                    aug_rows=aug_rows, aug_idx=aug_idx)


def _augmented(npz_path: Path, arrays: dict[str, np.ndarray], n: int, length: int,
               vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """The augmented copies (aug_rows (M,), aug_idx (M, A, L)), checked; empty when the file has none."""
    if "aug_rows" not in arrays and "aug_idx" not in arrays:
        return np.zeros(0, np.int64), np.zeros((0, 0, length), np.int16)
    if "aug_rows" not in arrays or "aug_idx" not in arrays:
        raise TokenFileError(f"{npz_path}: holds only one of aug_rows and aug_idx (damaged file); re-run "
                             "tokenize_multiscale_maps.py")
    rows, idx = arrays["aug_rows"], arrays["aug_idx"]
    if rows.ndim != 1 or idx.ndim != 3 or idx.shape[0] != len(rows) or idx.shape[2] != length:
        raise TokenFileError(f"{npz_path}: augmented copies of shape {idx.shape} for aug_rows {rows.shape}; expected "
                             f"(M, A, {length}) for (M,)")
    if len(rows) and (rows.min() < 0 or rows.max() >= n or len(np.unique(rows)) != len(rows)):
        raise TokenFileError(f"{npz_path}: aug_rows must be distinct rows in [0, {n}) (damaged file)")
    if idx.size and (idx.min() < 0 or idx.max() >= vocab):
        raise TokenFileError(f"{npz_path}: augmented token ids outside [0, {vocab}) of the VQ-VAE's codebook")
    return rows.astype(np.int64), idx.astype(np.int16)


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
    if not classes_path.exists():
        if stored is not None:
            return [str(c) for c in stored]
        raise TokenFileError(f"{classes_path}: missing (written beside {npz_path.name} by tokenize_multiscale_maps.py)")
    try:
        beside = read_json(classes_path)
    except SideFileError as err:
        raise TokenFileError(str(err)) from None
    if not isinstance(beside, list) or not all(isinstance(c, str) for c in beside):
        raise TokenFileError(f"{classes_path}: expected a JSON list of class names")
    if stored is not None and [str(c) for c in stored] != beside:
        raise TokenFileError(f"{npz_path} holds classes {[str(c) for c in stored]} but {classes_path} beside it lists "
                             f"{beside} (written for another token file in this folder?); keep each token file in its "
                             "own folder, or re-run tokenize_multiscale_maps.py")
    return beside
