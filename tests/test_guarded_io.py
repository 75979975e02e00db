"""The guarded reader for side files, refusals of damaged checkpoints and processed images, write failures as one
line that leave earlier outputs intact, and DataLoader worker errors as one line."""
from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from common import io as common_io
from common.checkpoint import CheckpointError, load_checkpoint
from common.config import ConfigError, parse_config
from common.image_data import ImageDataError, read_image, worker_error_line
from common.io import (SideFileError, atomic_torch_save_all, atomic_write_bytes, load_npz, os_error_line,
                       read_csv_rows, read_json)
from data_preprocessing import make_phantoms


@pytest.fixture(autouse=True)
def no_hang():
    """A read that blocks (a FIFO opened for reading) fails the test instead of hanging the suite."""
    def hung(*_):
        raise TimeoutError("blocked: a read waited for a writer")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


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


def test_a_checkpoint_whose_model_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    from common.checkpoint import check_model_kind
    from models.vqvae import VQVAE

    torch.save({"model": [torch.zeros(2)], "model_config": {}}, tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list.pth: its model entry is a list, not a dict of tensors"):
        check_model_kind(load_checkpoint(tmp_path / "list.pth"), VQVAE, tmp_path / "list.pth")
    os.mkfifo(tmp_path / "fifo.pth")
    with pytest.raises(CheckpointError, match=r"fifo.pth: not a regular file: a named pipe"):
        load_checkpoint(tmp_path / "fifo.pth")


def test_processed_images_that_are_fifos_or_bombs_are_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.png")
    with pytest.raises(ImageDataError, match=r"x.png: cannot read the image: not a regular file: a named pipe"):
        read_image(tmp_path / "x.png", 16)
    # a 1 x 1 PNG whose header is made to declare 20000 x 20000 pixels (with its checksum redone)
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="png")
    png = bytearray(buffer.getvalue())
    png[16:24] = struct.pack(">II", 20000, 20000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    (tmp_path / "bomb.png").write_bytes(bytes(png))
    with pytest.raises(ImageDataError, match=r"bomb.png: .*(20000x20000 pixels|decompression bomb)"):
        read_image(tmp_path / "bomb.png", 16)


class Broken(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> None:
        raise ImageDataError("a.png: cannot read the image: truncated")


def test_a_dataloader_workers_error_is_one_line() -> None:
    with pytest.raises(ImageDataError) as err:
        list(DataLoader(Broken(), num_workers=1))
    assert "Traceback" in str(err.value)  # what torch gives
    assert worker_error_line(err.value) == "a.png: cannot read the image: truncated (in DataLoader worker process 0)"
    assert worker_error_line(ImageDataError("plain")) == "plain"


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


def test_a_write_failure_ends_with_one_line_and_a_rerun_resumes(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "raw"
    config = make_phantoms.Config(out=str(out), n_subjects_per_class=1, frames_per_subject=1)
    make_phantoms.main(config)
    before = {p: p.read_bytes() for p in out.rglob("*.png")}
    config = make_phantoms.Config(out=str(out), n_subjects_per_class=1, frames_per_subject=2)
    monkeypatch.setattr(common_io, "_sync", failing(4, errno.EROFS))  # a frame
    with pytest.raises(SystemExit) as err:
        make_phantoms.main(config)
    assert str(err.value).startswith(f"error: {out}/") and str(err.value).endswith(": Read-only file system")
    assert "\n" not in str(err.value)
    assert all(p.read_bytes() == data for p, data in before.items())
    monkeypatch.undo()
    make_phantoms.main(config)
    assert len(list(out.rglob("*_mask.png"))) == 2 * len(make_phantoms.CLASSES)
