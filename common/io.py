"""Atomic file writes and content checksums.

Every artifact is written to a temporary file in its destination folder, flushed to disk and renamed
over the destination, so a crash mid-write leaves either the previous file or the new one, never half.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces `path` only once the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp makes 0600 files; give the mode open() would
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


# The names atomic_write gives its temp files: mkstemp's "." + name + "." + 8 random characters + ".tmp".
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def remove_stale_temp_files(folder: str | Path, recursive: bool = False, min_age_s: float = 600.0) -> list[Path]:
    """Delete the temp files of atomic writes whose process was killed, in folder (and its subfolders when
    recursive): regular files named as atomic_write names them and unchanged for min_age_s seconds (a write in
    progress, by this or another process, keeps its file's mtime fresh). Returns them."""
    folder = Path(folder)
    walk = os.walk(folder) if recursive else [(folder, [], os.listdir(folder) if folder.is_dir() else [])]
    removed = []
    now = time.time()
    for parent, _, names in walk:
        for name in sorted(names):
            path = Path(parent) / name
            if not _TEMP_NAME.match(name):
                continue
            try:
                info = path.lstat()
                if stat.S_ISREG(info.st_mode) and now - info.st_mtime >= min_age_s:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:  # another process finished or removed it meanwhile
                continue
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write data atomically; a file that already holds exactly these bytes is left alone (a rerun rewrites nothing)."""
    path = Path(path)
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    except OSError:
        pass  # missing or unreadable: write it
    with atomic_write(path) as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save through a temp file: an interrupted save never corrupts the previous checkpoint."""
    import torch  # here only: scripts that save no checkpoint (prepare.py) start ~1.5 s sooner without it

    with atomic_write(path) as handle:
        torch.save(obj, handle)


def atomic_save_npz(path: str | Path, compressed: bool = False, **arrays: np.ndarray) -> None:
    """np.savez without pickles (object arrays are refused) through a temp file."""
    for name, array in arrays.items():
        if np.asarray(array).dtype == object:
            raise TypeError(f"{path}: array {name!r} has dtype object, which would need pickling")
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def files_fingerprint(paths: Sequence[str | Path], root: str | Path) -> str:
    """sha256 over the files' paths relative to root and their contents: what a derived artifact was made from."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{Path(path).relative_to(root).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()
