"""common/io.py: atomic writes and their durability, the exact bytes the JSON and text writers produce, compressed npz,
chunked checksums, the fingerprint's exact recipe, and which temp files count as stale (age, kind, recursion).

The guarded reader for side files, refusals of damaged checkpoints and processed images, write failures as one
line that leave earlier outputs intact, and DataLoader worker errors as one line."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
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

from common import io as common_io
from common.checkpoint import load_checkpoint
from common.config import ConfigError, parse_config
from common.io import (SideFileError, atomic_save_npz, atomic_torch_save, atomic_torch_save_all, atomic_write,
                       atomic_write_bytes, atomic_write_group, atomic_write_json, atomic_write_text, file_sha256,
                       files_fingerprint, load_npz, os_error_line, read_csv_rows, read_json, remove_stale_temp_files)
from data_preprocessing import make_phantoms


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


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.usefixtures("no_hang")  # it makes FIFOs
def test_fifos_folders_and_devices_are_refused_without_being_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "preset.json")
    for path, kind in [(tmp_path / "preset.json", "a named pipe (FIFO)"), (tmp_path, "a folder"),
                       (Path("/dev/zero"), "a device")]:
        with pytest.raises(SideFileError, match=rf"^{path}: not a regular file: {re.escape(kind)}, not read$"):
            read_json(path)
    with pytest.raises(ConfigError, match=r"^--config: preset .*preset.json: not a regular file: a named pipe"):
        parse_config(make_phantoms.Config, [f"--config={tmp_path / 'preset.json'}"])
    with pytest.raises(SideFileError, match="does not exist"):
        read_csv_rows(tmp_path / "missing.csv")


def test_size_nesting_and_encoding_limits_name_the_file(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    for depth in (65, 100_000):  # past the limit, and past Python's own recursion limit
        deep.write_text("[" * depth + "]" * depth)
        with pytest.raises(SideFileError, match=rf"^{deep}: JSON nested deeper than 64 levels$"):
            read_json(deep)
    deep.write_text("[" * 64 + "]" * 64)
    assert read_json(deep) is not None
    (tmp_path / "big.json").write_text(json.dumps(list(range(100))))
    with pytest.raises(SideFileError, match=r"larger than 50 bytes"):
        read_json(tmp_path / "big.json", max_bytes=50)
    (tmp_path / "latin1.csv").write_bytes("path,class\nbr\xfcst.png,a\n".encode("latin-1"))
    with pytest.raises(SideFileError, match=rf"^{tmp_path / 'latin1.csv'}: not UTF-8 text \(byte 13: invalid start byte\)"):
        read_csv_rows(tmp_path / "latin1.csv")
    (tmp_path / "ok.csv").write_text("\ufeffpath,class\na.png,b\n")  # a spreadsheet's BOM
    assert read_csv_rows(tmp_path / "ok.csv") == (["path", "class"], [{"path": "a.png", "class": "b"}])


def npy_bytes(header: dict) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def test_an_npz_header_declaring_more_than_the_file_holds_is_refused_before_allocating(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w") as archive:
        archive.writestr("idx.npy", npy_bytes({"descr": "<i8", "fortran_order": False, "shape": (10**6, 10**6)}))
    with pytest.raises(SideFileError, match=r"array 'idx' declares shape \(1000000, 1000000\) of int64 "
                                            r"\(8000000000000 bytes\) but holds 0 bytes"):
        load_npz(bomb)
    np.savez(tmp_path / "fine.npz", a=np.arange(5), s=np.asarray(["x", "yz"]))
    with load_npz(tmp_path / "fine.npz") as data:
        assert data["a"].tolist() == [0, 1, 2, 3, 4] and data["s"].tolist() == ["x", "yz"]


def failing(call_number: int, code: int):
    """common.io's flush to disk, failing (disk full / read-only) at its call_number-th call."""
    calls = []
    real = common_io._sync

    def sync(handle) -> None:
        calls.append(handle)
        if len(calls) == call_number:
            raise OSError(code, os.strerror(code))
        real(handle)
    return sync


def test_checkpoints_that_belong_together_are_written_all_or_none(tmp_path: Path, monkeypatch) -> None:
    best, last = tmp_path / "best.pth", tmp_path / "last.pth"
    atomic_torch_save_all({best: {"epoch": 1}, last: {"epoch": 1}})
    monkeypatch.setattr(common_io, "_sync", failing(2, errno.ENOSPC))  # last.pth's write fails
    with pytest.raises(OSError) as err:
        atomic_torch_save_all({best: {"epoch": 2}, last: {"epoch": 2}})
    assert os_error_line(err.value) == f"{last}: No space left on device"
    assert torch.load(best, weights_only=True)["epoch"] == torch.load(last, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "last.pth"]  # no temp file left


def test_a_long_name_gets_a_temp_name_within_the_limit(tmp_path: Path) -> None:
    path = tmp_path / ("é" * 120 + ".png")  # 244 bytes: "." + name + ".XXXXXXXX.tmp" would be 258
    atomic_write_bytes(path, b"x")
    assert path.read_bytes() == b"x"


def disk_calls(monkeypatch, fail_dir_open: bool = False, fail_dir_fsync: bool = False) -> list[tuple]:
    """common.io's calls that make a write durable, in order: ("fsync", name, bytes on disk) for a file (a temp file
    named "tmp:" + the name it is for), ("fsync", folder) for a folder, ("replace", from, to). A folder that cannot be
    opened or synced (some file systems refuse) fails as the system would."""
    calls: list[tuple] = []
    real_fsync, real_replace, real_open = os.fsync, os.replace, os.open

    def name(path: str) -> str:
        temp = re.fullmatch(r"\.(.+)\.[a-z0-9_]{8}\.tmp", Path(path).name)
        return f"tmp:{temp.group(1)}" if temp else Path(path).name

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.isdir(path):
            calls.append(("fsync", Path(path)))
            if fail_dir_fsync:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        else:
            calls.append(("fsync", name(path), os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(src, dst) -> None:
        calls.append(("replace", name(src), name(dst)))
        real_replace(src, dst)

    def open_(path, flags, *args, **kwargs):
        if fail_dir_open and os.path.isdir(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "open", open_)
    return calls


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a file descriptor's file through /proc (Linux)")
def test_a_write_is_on_disk_before_its_rename_and_the_rename_is_on_disk_after(tmp_path: Path, monkeypatch) -> None:
    calls = disk_calls(monkeypatch)
    fds = open_fds()
    with atomic_write(tmp_path / "a.bin") as handle:
        handle.write(b"abc")  # still in Python's buffer: the sync flushes it before the fsync
    assert calls == [("fsync", "tmp:a.bin", 3), ("replace", "tmp:a.bin", "a.bin"), ("fsync", tmp_path)]
    assert open_fds() == fds  # the folder's descriptor is closed again
    calls.clear()
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "a.bin") as handle:
            handle.write(b"half")
            raise RuntimeError("crash mid-write")
    assert calls == [] and (tmp_path / "a.bin").read_bytes() == b"abc"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a file descriptor's file through /proc (Linux)")
def test_files_of_a_group_are_all_on_disk_before_the_first_rename(tmp_path: Path, monkeypatch) -> None:
    calls = disk_calls(monkeypatch)
    (tmp_path / "sub").mkdir()
    with atomic_write_group() as open_file:
        open_file(tmp_path / "best.pth").write(b"12")
        open_file(tmp_path / "sub" / "last.pth").write(b"345")
        open_file(tmp_path / "log.txt").write(b"6789")
    assert calls[:6] == [("fsync", "tmp:best.pth", 2), ("fsync", "tmp:last.pth", 3), ("fsync", "tmp:log.txt", 4),
                         ("replace", "tmp:best.pth", "best.pth"), ("replace", "tmp:last.pth", "last.pth"),
                         ("replace", "tmp:log.txt", "log.txt")]
    # then each folder once, in any order
    assert sorted(calls[6:]) == [("fsync", tmp_path), ("fsync", tmp_path / "sub")]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a file descriptor's file through /proc (Linux)")
def test_a_group_file_that_cannot_be_synced_is_named_and_nothing_is_renamed(tmp_path: Path, monkeypatch) -> None:
    calls = disk_calls(monkeypatch)
    monkeypatch.setattr(common_io, "_sync", failing(2, errno.EIO))
    with pytest.raises(OSError) as err:
        with atomic_write_group() as open_file:
            open_file(tmp_path / "best.pth").write(b"1")
            open_file(tmp_path / "last.pth").write(b"2")
    assert err.value.filename == str(tmp_path / "last.pth") and err.value.errno == errno.EIO
    assert calls == [("fsync", "tmp:best.pth", 1)] and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(common_io, "_sync", failing(1, errno.EIO))  # the first of two: not the last one opened
    with pytest.raises(OSError) as err:
        with atomic_write_group() as open_file:
            open_file(tmp_path / "best.pth").write(b"1")
            open_file(tmp_path / "last.pth").write(b"2")
    assert err.value.filename == str(tmp_path / "best.pth") and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a file descriptor's file through /proc (Linux)")
@pytest.mark.parametrize("fail", ["fail_dir_open", "fail_dir_fsync"])
def test_a_folder_that_cannot_be_synced_still_gets_its_file(tmp_path: Path, monkeypatch, fail: str) -> None:
    calls = disk_calls(monkeypatch, **{fail: True})
    fds = open_fds()
    atomic_write_bytes(tmp_path / "a.bin", b"abc")
    with atomic_write_group() as open_file:
        open_file(tmp_path / "b.bin").write(b"de")
    assert (tmp_path / "a.bin").read_bytes() == b"abc" and (tmp_path / "b.bin").read_bytes() == b"de"
    folder_syncs = [("fsync", tmp_path)] * 2 if fail == "fail_dir_fsync" else []
    assert [c for c in calls if c[0] == "fsync" and c[1] == tmp_path] == folder_syncs
    assert open_fds() == fds  # a failed folder sync still closes the folder
