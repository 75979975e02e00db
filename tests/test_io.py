"""common/io.py rules the first tests left open: the exact bytes the JSON and text writers produce, compressed npz,
chunked checksums, the fingerprint's exact recipe, and which temp files count as stale (age, kind, recursion)."""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from common.checkpoint import CheckpointError, load_checkpoint, require_keys
from common.io import (atomic_save_npz, atomic_torch_save, atomic_write, atomic_write_bytes, atomic_write_json,
                       atomic_write_text, file_sha256, files_fingerprint, remove_stale_temp_files)


def test_atomic_write_replaces_only_on_success(tmp_path):
    path = tmp_path / "a.bin"
    with atomic_write(path) as handle:
        handle.write(b"first")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as handle:
            handle.write(b"half of the second")
            raise RuntimeError("crash mid-write")
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # the temp file is cleaned up


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_respects_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with atomic_write(tmp_path / "a.bin") as handle:
            handle.write(b"x")
        plain = tmp_path / "b.bin"
        plain.write_bytes(b"x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o666 & ~umask == stat.S_IMODE(plain.stat().st_mode)


def test_killed_process_mid_save_leaves_previous_checkpoint(tmp_path, repo_root):
    path = tmp_path / "last.pth"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)
    # The child dies abruptly (no exception handling, no cleanup) after writing part of a large checkpoint.
    child = (
        "import os, torch\n"
        "from common import io\n"
        "real_save = torch.save\n"
        "def dying_save(obj, f):\n"
        "    f.write(b'x' * 1000)\n"
        "    os._exit(9)\n"
        "torch.save = dying_save\n"
        f"io.atomic_torch_save({{'step': 2, 'w': torch.zeros(10**6)}}, {str(path)!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", child], env={"PYTHONPATH": str(repo_root)})
    assert result.returncode == 9
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))


def test_npz_refuses_object_arrays_and_round_trips(tmp_path):
    path = tmp_path / "t.npz"
    atomic_save_npz(path, idx=np.arange(6, dtype=np.int16).reshape(2, 3), names=np.array(["a", "bb"]))
    with np.load(path, allow_pickle=False) as data:
        assert data["idx"].tolist() == [[0, 1, 2], [3, 4, 5]] and data["names"].tolist() == ["a", "bb"]
    with pytest.raises(TypeError, match="dtype object"):
        atomic_save_npz(path, bad=np.array([{"a": 1}], dtype=object))


class Payload:
    """Any class instance inside a checkpoint needs pickle to rebuild it, so it could run code."""

    def __reduce__(self):
        return (print, ("this must never run",))


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


def test_file_sha256(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_identical_content_is_not_rewritten(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_bytes(path, b"same")
    os.utime(path, ns=(1, 1))
    atomic_write_bytes(path, b"same")
    assert path.stat().st_mtime_ns == 1  # left alone
    atomic_write_bytes(path, b"sane")  # same size, other bytes
    assert path.read_bytes() == b"sane" and path.stat().st_mtime_ns != 1


def test_files_fingerprint_follows_names_and_contents(tmp_path):
    (tmp_path / "a").mkdir()
    for name, data in (("a/x.png", b"1"), ("a/y.png", b"2")):
        (tmp_path / name).write_bytes(data)
    paths = [tmp_path / "a/x.png", tmp_path / "a/y.png"]
    first = files_fingerprint(paths, tmp_path)
    assert files_fingerprint(paths, tmp_path) == first
    assert files_fingerprint(paths[::-1], tmp_path) != first  # order is part of it
    (tmp_path / "a/y.png").write_bytes(b"3")
    assert files_fingerprint(paths, tmp_path) != first
    (tmp_path / "a/y.png").write_bytes(b"2")
    (tmp_path / "a/y.png").rename(tmp_path / "a/z.png")
    assert files_fingerprint([paths[0], tmp_path / "a/z.png"], tmp_path) != first


def test_remove_stale_temp_files_removes_only_what_killed_atomic_writes_left(tmp_path):
    keep = {"best.pth": b"good", ".hidden.tmp": b"not ours", "a.tmp": b"not ours", "x.best.pth.abcd1234.tmp": b"no dot"}
    for name, data in keep.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".last.pth.abcd1234.tmp").write_bytes(b"not recursive: only this folder is cleaned")
    # What a kill inside atomic_write leaves: its mkstemp file, named as atomic_write names it.
    fd, left = tempfile.mkstemp(prefix=".best.pth.", suffix=".tmp", dir=tmp_path)
    os.close(fd)
    (tmp_path / ".last.pth.q9w8e7r6.tmp").write_bytes(b"stale")
    old = time.time() - 3600  # killed an hour ago
    for path in tmp_path.rglob("*"):
        os.utime(path, (old, old))
    removed = remove_stale_temp_files(tmp_path)
    assert [p.name for p in removed] == [Path(left).name, ".last.pth.q9w8e7r6.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, "sub"])
    assert all((tmp_path / name).read_bytes() == data for name, data in keep.items())
    assert (tmp_path / "sub" / ".last.pth.abcd1234.tmp").exists()
    assert remove_stale_temp_files(tmp_path / "absent") == []


def test_stale_temp_files_of_killed_writes_are_removed(tmp_path, repo_root):
    # A real leftover: the child dies inside atomic_write, after its temp file exists and before the rename.
    child = (
        "import os\n"
        "from common import io\n"
        f"with io.atomic_write({str(tmp_path / 'sub' / 'a.png')!r}) as handle:\n"
        "    handle.write(b'half')\n"
        "    os._exit(9)\n"
    )
    assert subprocess.run([sys.executable, "-c", child], env={"PYTHONPATH": str(repo_root)}).returncode == 9
    [leftover] = (tmp_path / "sub").iterdir()
    fresh = tmp_path / ".best.pth.q1w2e3r4.tmp"  # a write still in progress elsewhere
    others = [tmp_path / "notes.tmp", tmp_path / "last.pth", tmp_path / ".hidden"]
    for path in [fresh] + others:
        path.write_bytes(b"x")
    link = tmp_path / ".link.abcdefgh.tmp"
    link.symlink_to(tmp_path / "last.pth")
    old = time.time() - 3600
    for path in [leftover] + others:
        os.utime(path, (old, old))
    os.utime(link, (old, old), follow_symlinks=False)
    assert remove_stale_temp_files(tmp_path, recursive=True) == [leftover]
    assert not leftover.exists() and fresh.exists() and link.is_symlink() and all(p.exists() for p in others)
    assert remove_stale_temp_files(tmp_path, recursive=True, min_age_s=0) == [fresh]


def test_json_and_text_writers_produce_exact_bytes(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "a.json"  # missing parent folders are made
    atomic_write_json(path, {"z": 1, "a": [1, "é"]})
    assert path.read_bytes() == b'{\n  "z": 1,\n  "a": [\n    1,\n    "\\u00e9"\n  ]\n}\n'  # key order kept
    atomic_write_text(tmp_path / "t.txt", "naïve\n")
    assert (tmp_path / "t.txt").read_bytes() == "naïve\n".encode("utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "t.txt"]


def test_a_failed_write_leaves_no_file_and_no_temp(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(tmp_path / "new.bin") as handle:
            handle.write(b"x")
            raise KeyboardInterrupt  # not an Exception: cleaned up all the same
    assert list(tmp_path.iterdir()) == []


def test_a_folder_in_the_way_is_not_taken_for_identical_content(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write_bytes(tmp_path / "d", b"")
    atomic_write_bytes(tmp_path / "e", b"")  # an empty file is written, then left alone
    assert (tmp_path / "e").read_bytes() == b""


def test_compressed_npz_is_deflated_and_plain_npz_is_stored(tmp_path: Path) -> None:
    data = np.zeros(10_000, np.int64)
    atomic_save_npz(tmp_path / "c.npz", compressed=True, x=data)
    atomic_save_npz(tmp_path / "p.npz", x=data)
    for name, kind in (("c.npz", zipfile.ZIP_DEFLATED), ("p.npz", zipfile.ZIP_STORED)):
        with zipfile.ZipFile(tmp_path / name) as z:
            assert [i.compress_type for i in z.infolist()] == [kind]
        with np.load(tmp_path / name, allow_pickle=False) as loaded:
            assert np.array_equal(loaded["x"], data)
    with pytest.raises(TypeError, match=r"bad\.npz: array 'names' has dtype object"):
        atomic_save_npz(tmp_path / "bad.npz", ok=data, names=[{"a": 1}])
    assert not (tmp_path / "bad.npz").exists()


def test_checksum_is_the_same_in_any_chunk_size(tmp_path: Path) -> None:
    path = tmp_path / "f"
    payload = bytes(range(256)) * 13
    path.write_bytes(payload)
    want = hashlib.sha256(payload).hexdigest()
    assert file_sha256(path) == want
    assert file_sha256(path, chunk_size=7) == want and file_sha256(path, chunk_size=1) == want


def test_fingerprint_recipe(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"1")
    (tmp_path / "y.png").write_bytes(b"22")
    want = hashlib.sha256()
    for rel, data in (("a/x.png", b"1"), ("y.png", b"22")):
        want.update(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    assert files_fingerprint([tmp_path / "a" / "x.png", tmp_path / "y.png"], tmp_path) == want.hexdigest()
    assert files_fingerprint([], tmp_path) == hashlib.sha256().hexdigest()


def test_stale_means_old_enough_regular_and_named_as_ours(tmp_path: Path) -> None:
    names = [".a.pth.abcd1234.tmp", ".b.pth.efgh5678.tmp", ".c.pth.ijkl9012.tmp"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    now = time.time()
    os.utime(tmp_path / names[0], (now - 120, now - 120))
    os.utime(tmp_path / names[1], (now - 30, now - 30))
    (tmp_path / ".d.pth.mnop3456.tmp").mkdir()  # a folder with such a name is not a temp file
    os.symlink(tmp_path / names[2], tmp_path / ".e.pth.qrst7890.tmp")  # nor is a link
    old = now - 3600
    os.utime(tmp_path / ".d.pth.mnop3456.tmp", (old, old))
    os.utime(tmp_path / ".e.pth.qrst7890.tmp", (old, old), follow_symlinks=False)
    removed = remove_stale_temp_files(tmp_path, min_age_s=60)
    assert removed == [tmp_path / names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:] + [".d.pth.mnop3456.tmp",
                                                                            ".e.pth.qrst7890.tmp"])
    assert remove_stale_temp_files(tmp_path, min_age_s=0) == [tmp_path / names[1], tmp_path / names[2]]
    assert remove_stale_temp_files(tmp_path / names[1]) == []  # not a folder: nothing to clean


def test_recursive_cleaning_reaches_subfolders(tmp_path: Path) -> None:
    (tmp_path / "s" / "t").mkdir(parents=True)
    deep = tmp_path / "s" / "t" / ".best.pth.abcd1234.tmp"
    top = tmp_path / ".last.pth.abcd1234.tmp"
    for path in (deep, top):
        path.write_bytes(b"x")
        os.utime(path, (time.time() - 3600,) * 2)
    assert remove_stale_temp_files(tmp_path / "s") == []
    assert remove_stale_temp_files(tmp_path, recursive=True) == [top, deep]
    assert not deep.exists() and not top.exists()
    # the default age is ten minutes
    deep.write_bytes(b"x")
    os.utime(deep, (time.time() - 590,) * 2)
    assert remove_stale_temp_files(tmp_path, recursive=True) == []
    os.utime(deep, (time.time() - 610,) * 2)
    assert remove_stale_temp_files(tmp_path, recursive=True) == [deep]


def test_a_file_exactly_ten_minutes_old_is_stale(tmp_path: Path, monkeypatch) -> None:
    now = 1_800_000_000
    monkeypatch.setattr(time, "time", lambda: float(now))
    fresh, stale = tmp_path / ".a.pth.abcd1234.tmp", tmp_path / ".b.pth.abcd1234.tmp"
    for path, age in ((fresh, 599), (stale, 600)):
        path.write_bytes(b"x")
        os.utime(path, ns=((now - age) * 10**9,) * 2)
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert remove_stale_temp_files(tmp_path, min_age_s=599) == [fresh]


def test_a_temp_file_that_vanishes_while_listed_does_not_stop_the_cleaning(tmp_path: Path, monkeypatch) -> None:
    stale = tmp_path / ".b.pth.abcd1234.tmp"
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 3600,) * 2)
    listdir = os.listdir
    # another process removes .a... between the listing and its lstat
    monkeypatch.setattr(os, "listdir", lambda folder: listdir(folder) + [".a.pth.abcd1234.tmp"])
    assert remove_stale_temp_files(tmp_path) == [stale]
