"""common/io.py rules the first tests left open: the exact bytes the JSON and text writers produce, compressed npz,
chunked checksums, the fingerprint's exact recipe, and which temp files count as stale (age, kind, recursion)."""
from __future__ import annotations

import hashlib
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from common.io import (atomic_save_npz, atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text,
                       file_sha256, files_fingerprint, remove_stale_temp_files)


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
