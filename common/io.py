"""Atomic file writes, guarded reads of side files, and content checksums.

Every artifact is written to a temporary file in its destination folder, flushed to disk and renamed
over the destination, so a crash mid-write leaves either the previous file or the new one, never half.

Every side file (a JSON preset, recipe, config.json, metrics.json, history.json, classes.json, a CSV manifest, the
header of an npz archive) is read through `read_json`, `read_csv_rows` or `load_npz`: regular files only (a FIFO, a
folder or a device is refused from its stat, never opened for reading), at most MAX_SIDE_FILE_BYTES, JSON nested at
most MAX_NESTING deep, and array sizes checked against the npz headers before anything is allocated. Each failure
is a SideFileError naming the file.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import stat
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np


MAX_SIDE_FILE_BYTES = 256 << 20  # a side file beyond this is not one of ours (the largest, a manifest, is a few MB)
MAX_NESTING = 64  # JSON nesting: our files need 4 levels; Python's parser would crash past ~1000
MAX_NAME_BYTES = 255  # a file name's limit on common file systems (ext4, APFS, NTFS)

FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a device"),
              (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))


class SideFileError(ValueError):
    """A side file that is missing, not a regular file, too large, too deeply nested, not UTF-8 or not parseable."""


def not_a_regular_file(path: str | Path) -> str | None:
    """Why `path` cannot be read as a file, or None for a regular file (symlinks followed).

    Checked before anything opens a file: opening a FIFO waits for a writer and /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "file not found"
    except OSError as err:
        return f"cannot read file: {err.strerror or err}"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in FILE_KINDS if test(mode)), "a special file")
    return f"not a regular file: {kind}, not read"


def read_side_bytes(path: str | Path, max_bytes: int = MAX_SIDE_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most max_bytes; SideFileError otherwise. Opened non-blocking, so that a file
    swapped for a FIFO after the check cannot hang the read either."""
    problem = not_a_regular_file(path)
    if problem:
        raise SideFileError(f"{path}: {'does not exist' if problem == 'file not found' else problem}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise SideFileError(f"{path}: not a regular file, not read")
            data = handle.read(max_bytes + 1)
    except OSError as err:
        raise SideFileError(f"{path}: cannot read ({err.strerror or err})") from None
    if len(data) > max_bytes:
        raise SideFileError(f"{path}: larger than {max_bytes} bytes; not a side file of this project")
    return data


def read_side_text(path: str | Path, max_bytes: int = MAX_SIDE_FILE_BYTES) -> str:
    """read_side_bytes decoded as UTF-8 (a BOM is dropped); invalid bytes are a SideFileError naming their offset."""
    data = read_side_bytes(path, max_bytes)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SideFileError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, counted no further than limit + 1."""
    depth, level = 0, [value]
    while level and depth <= limit:
        depth += 1
        level = [v for item in level if isinstance(item, (dict, list))
                 for v in (item.values() if isinstance(item, dict) else item)]
    return depth


def read_json(path: str | Path, max_bytes: int = MAX_SIDE_FILE_BYTES, max_nesting: int = MAX_NESTING) -> Any:
    """A JSON side file, guarded as read_side_bytes says, nested at most max_nesting deep."""
    text = read_side_text(path, max_bytes)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise SideFileError(f"{path}: not valid JSON: {err}") from None
    except RecursionError:
        raise SideFileError(f"{path}: JSON nested deeper than {max_nesting} levels") from None
    if _depth(value, max_nesting) > max_nesting:
        raise SideFileError(f"{path}: JSON nested deeper than {max_nesting} levels")
    return value


def read_csv_rows(path: str | Path, max_bytes: int = MAX_SIDE_FILE_BYTES) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a CSV side file with a header line, guarded as read_side_bytes says."""
    text = read_side_text(path, max_bytes)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = list(reader)
        return list(reader.fieldnames or []), rows
    except csv.Error as err:
        raise SideFileError(f"{path}: not a readable CSV file: {err}") from None


def _check_npy_header(handle: BinaryIO, size: int, path: str | Path, name: str) -> None:
    """Refuse an .npy stream of `size` bytes whose header declares more data than it holds."""
    version = np.lib.format.read_magic(handle)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(handle)
    declared, held = int(np.prod(shape, dtype=object)) * dtype.itemsize, size - handle.tell()
    if declared > held:
        raise SideFileError(f"{path}: array {name!r} declares shape {shape} of {dtype} ({declared} bytes) but holds "
                            f"{held} bytes")


def check_npz_sizes(path: str | Path) -> None:
    """Refuse an npz archive (or .npy file) whose array headers declare more bytes than the file holds (np.load would
    allocate what the header says first: 10^12 elements is a MemoryError), or that is not a regular file. Other
    damage is left for np.load to report."""
    problem = not_a_regular_file(path)
    if problem:
        raise SideFileError(f"{path}: {'does not exist' if problem == 'file not found' else problem}")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.infolist():
                    if member.filename.endswith(".npy"):
                        with archive.open(member) as handle:
                            _check_npy_header(handle, member.file_size, path, member.filename[:-4])
        else:
            with open(path, "rb") as handle:
                if handle.read(6) == b"\x93NUMPY":
                    handle.seek(0)
                    _check_npy_header(handle, os.fstat(handle.fileno()).st_size, path, Path(path).stem)
    except SideFileError:
        raise
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as err:
        raise SideFileError(f"{path}: not a readable npz archive: {err}") from None


def load_npz(path: str | Path) -> Any:
    """np.load of an npz archive without pickles, after check_npz_sizes."""
    check_npz_sizes(path)
    return np.load(path, allow_pickle=False)


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


def os_error_line(err: OSError) -> str:
    """One line for a failed read or write (read-only file system, disk full, ...): the file and the system's reason."""
    return f"{err.filename}: {err.strerror or err}" if err.filename else str(err)


@contextlib.contextmanager
def _temp_beside(path: Path) -> Iterator[tuple[BinaryIO, str]]:
    """A temp file in path's folder with the mode open() would give; removed if the block fails. A failure to write
    it is an OSError whose filename is path (not the temp name)."""
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{_temp_stem(path.name)}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp makes 0600 files; give the mode open() would
        with os.fdopen(fd, "wb") as handle:
            yield handle, tmp_name
    except BaseException as err:
        if tmp_name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        if isinstance(err, OSError) and (err.filename is None or str(err.filename).endswith(".tmp")):
            err.filename, err.filename2 = str(path), None  # the file meant, not its temp name
        raise


def _sync(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces `path` only once the block finishes without error."""
    path = Path(path)
    with _temp_beside(path) as (handle, tmp_name):
        yield handle
        _sync(handle)
        os.replace(tmp_name, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write_group() -> Iterator[Any]:
    """Files that belong together (best.pth and last.pth): `open_file(path)` inside the block gives a binary file
    per destination. Only when every one is written and on disk are they renamed into place, in the order opened;
    a failed write (disk full) leaves every destination as it was."""
    with contextlib.ExitStack() as stack:
        opened: list[tuple[Path, BinaryIO, str]] = []

        def open_file(path: str | Path) -> BinaryIO:
            handle, tmp_name = stack.enter_context(_temp_beside(Path(path)))
            opened.append((Path(path), handle, tmp_name))
            return handle

        yield open_file
        for path, handle, _ in opened:
            try:
                _sync(handle)
            except OSError as err:
                err.filename = str(path)
                raise
        for path, _, tmp_name in opened:
            os.replace(tmp_name, path)
    for folder in {path.parent for path, _, _ in opened}:
        _fsync_dir(folder)


def _temp_stem(name: str) -> str:
    """The name, cut (at a character boundary) so that "." + it + ".XXXXXXXX.tmp" stays within MAX_NAME_BYTES."""
    room = MAX_NAME_BYTES - len(".") - len(".12345678.tmp")
    return name.encode("utf-8")[:room].decode("utf-8", errors="ignore")


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


def atomic_torch_save_all(saves: dict[Path, Any]) -> None:
    """torch.save of checkpoints that belong together (path -> object), through atomic_write_group: all or none."""
    import torch

    with atomic_write_group() as open_file:
        for path, obj in saves.items():
            torch.save(obj, open_file(path))


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
