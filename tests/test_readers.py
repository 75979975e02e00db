"""Readers on a corpus of good and bad files made here: every file is read or refused with a clear reason.

data_preprocessing/readers.py rules on small files made here: suffixes, the checks every frame passes, which
frames a multi-frame source keeps, and each intensity mapping by exact value."""
from __future__ import annotations

import os
import socket
import struct
import zlib
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, UltrasoundMultiFrameImageStorage, generate_uid

from data_preprocessing import readers
from data_preprocessing.adapters import Source
from data_preprocessing.make_phantoms import generate_frame
from data_preprocessing.prepare import Config, Task, process_source
from data_preprocessing.readers import (MAX_PIXELS, MIN_SIDE, SUPPORTED_SUFFIXES, UnreadableFileError, file_suffix,
                                        is_supported, not_a_regular_file, pick_indices, read_frames, to_uint8)


def refused(path: Path, **kwargs) -> str:
    with pytest.raises(UnreadableFileError) as info:
        list(read_frames(path, **kwargs))
    assert info.value.path == str(path)
    return info.value.reason


def frames(path: Path, **kwargs) -> list[tuple[str, np.ndarray]]:
    out = list(read_frames(path, **kwargs))
    for _, frame in out:
        assert frame.dtype == np.uint8 and frame.ndim in (2, 3)
    return out


def write_dicom(path: Path, arr: np.ndarray, photometric: str, n_frames: int = 1, window=None, pixels: bool = True) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage if n_frames > 1 else UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "US", "P001"
    shape = arr.shape[1:] if n_frames > 1 else arr.shape
    ds.Rows, ds.Columns = shape[:2]
    ds.SamplesPerPixel = 3 if len(shape) == 3 else 1
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = arr.dtype.itemsize * 8
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    if n_frames > 1:
        ds.NumberOfFrames = n_frames
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if pixels:
        ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def huge_png(path: Path, side: int) -> Path:
    """A side x side grey PNG of zeros, written row by row so it costs kilobytes, not side^2 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    return generate_frame("kidney", np.random.default_rng(3)).image  # a realistic RGB canvas with a fan


# ---------------------------------------------------------------- 2D image files

def test_bad_image_files_are_refused_with_reason(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert refused(empty) == "empty file (0 bytes)"

    text = tmp_path / "notes.png"
    text.write_text("this is a text file, not a PNG\n")
    assert "not a recognisable image" in refused(text)

    good = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "truncated or corrupt image data" in refused(truncated)

    tiny = tmp_path / "tiny.png"
    Image.new("L", (1, 1), 128).save(tiny)
    assert refused(tiny) == f"image too small: 1x1 pixels, need at least {MIN_SIDE}x{MIN_SIDE} (MIN_SIDE)"

    bomb = huge_png(tmp_path / "bomb.png", 10000)
    assert bomb.stat().st_size < 1_000_000
    reason = refused(bomb)
    assert "10000x10000 = 100000000 pixels" in reason and f"MAX_PIXELS={MAX_PIXELS}" in reason
    assert "decompression bomb" in reason

    other = tmp_path / "table.csv"
    other.write_text("a,b\n")
    assert "unsupported file type '.csv'" in refused(other)
    assert refused(tmp_path / "missing.png") == "file not found"

    os.mkfifo(tmp_path / "pipe.png")  # opening it would wait for a writer forever
    assert refused(tmp_path / "pipe.png") == "not a regular file: a named pipe (FIFO), not read"
    assert refused(Path("/dev/zero")) == "not a regular file: a device, not read"
    assert refused(tmp_path) == "not a regular file: a folder, not read"


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((48, 64), np.uint8)
    stored[:16, :16] = 255  # a bright block at the top left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: display the stored pixels turned 90 degrees clockwise (a camera held upright)
    for suffix in (".jpg", ".png"):
        Image.fromarray(stored).save(tmp_path / f"rotated{suffix}", exif=exif.tobytes())
        [(_, out)] = frames(tmp_path / f"rotated{suffix}")
        assert out.shape == (64, 48), suffix
        assert np.abs(out.astype(int) - np.rot90(stored, k=-1)).mean() < 3, suffix  # the block is now at the top right


def test_image_modes_become_uint8_grey_or_rgb(tmp_path):
    ramp16 = (np.arange(256 * 64, dtype=np.uint32).reshape(64, 256) % 256 * 16 + 1000).astype(np.uint16)  # 1000..5080
    Image.fromarray(ramp16).save(tmp_path / "ramp16.png")
    [(key, out)] = frames(tmp_path / "ramp16.png")
    assert key == "" and out.shape == (64, 256)
    assert out.min() <= 2 and out.max() >= 253  # its actual range is stretched, not divided by 257
    assert np.all(np.diff(out[0].astype(int)) >= 0)  # monotonic mapping

    palette = Image.fromarray(np.tile(np.arange(4, dtype=np.uint8), (64, 16)), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * (256 - 4) * 3)
    palette.save(tmp_path / "palette.png")
    [(_, out)] = frames(tmp_path / "palette.png")
    assert out.shape == (64, 64, 3)
    assert out[0, 1].tolist() == [255, 0, 0] and out[0, 3].tolist() == [10, 20, 30]

    rgba = np.full((64, 64, 4), 200, np.uint8)
    rgba[..., 3] = 255
    rgba[:, :32, 3] = 0  # transparent half: outside the image
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    [(_, out)] = frames(tmp_path / "rgba.png")
    assert out.shape == (64, 64, 3) and out[:, :32].max() == 0 and out[:, 32:].min() == 200

    grey = np.random.default_rng(1).integers(0, 256, (80, 96), dtype=np.uint8)
    for suffix in (".bmp", ".tif", ".jpg"):
        Image.fromarray(grey).save(tmp_path / f"grey{suffix}")
        [(_, out)] = frames(tmp_path / f"grey{suffix}")
        assert out.shape == (80, 96)
        assert np.abs(out.astype(int) - grey).mean() < (40 if suffix == ".jpg" else 1e-9)

    Image.fromarray((ramp16 // 20).astype(np.uint16)).save(tmp_path / "ramp16.tif")
    [(_, out)] = frames(tmp_path / "ramp16.tif")
    assert out.dtype == np.uint8 and out.max() >= 253


def test_multipage_tiff_frames_with_stride(tmp_path):
    pages = [Image.fromarray(np.full((64, 64), 10 * i, np.uint8)) for i in range(6)]
    pages[0].save(tmp_path / "cine.tif", save_all=True, append_images=pages[1:])
    out = frames(tmp_path / "cine.tif", video_stride=2)
    assert [k for k, _ in out] == ["f0000", "f0002", "f0004"]
    assert [int(f.mean()) for _, f in out] == [0, 20, 40]


def test_pick_indices_spreads_capped_frames():
    assert pick_indices(100, 10, None) == list(range(0, 100, 10))
    assert pick_indices(100, 10, 3) == [0, 40, 90]
    assert pick_indices(1, 10, 5) == [0]


# ---------------------------------------------------------------- DICOM

def test_dicom_single_and_multi_frame(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (64, 80), dtype=np.uint8)
    [(key, out)] = frames(write_dicom(tmp_path / "mono2.dcm", grey, "MONOCHROME2"))
    assert key == "" and np.array_equal(out, grey)

    wide = rng.integers(0, 4096, (64, 80)).astype(np.uint16)
    [(_, out)] = frames(write_dicom(tmp_path / "mono1.dcm", wide, "MONOCHROME1", window=(2048, 4096)))
    expected = 255 - np.clip(wide / 4096 * 255 + 0.5, 0, 255).astype(np.uint8)  # windowed, then inverted
    assert np.abs(out.astype(int) - expected).max() <= 1

    [(_, out)] = frames(write_dicom(tmp_path / "mono2_12bit.dcm", wide, "MONOCHROME2"))
    assert out.min() <= 2 and out.max() >= 253 and np.corrcoef(out.ravel(), wide.ravel())[0, 1] > 0.99

    rgb = rng.integers(0, 256, (3, 64, 80, 3), dtype=np.uint8)
    out = frames(write_dicom(tmp_path / "rgb_cine.dcm", rgb, "RGB", n_frames=3), video_stride=1)
    assert [k for k, _ in out] == ["f0000", "f0001", "f0002"]
    assert all(np.array_equal(f, rgb[i]) for i, (_, f) in enumerate(out))
    assert [k for k, _ in frames(tmp_path / "rgb_cine.dcm", video_stride=2)] == ["f0000", "f0002"]

    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    out = frames(write_dicom(tmp_path / "ybr_cine.dcm", ybr, "YBR_FULL", n_frames=3), video_stride=1)
    assert all(np.abs(f.astype(int) - rgb[i]).max() <= 2 for i, (_, f) in enumerate(out))  # back to RGB

    no_suffix = tmp_path / "IM0001"
    no_suffix.write_bytes((tmp_path / "mono2.dcm").read_bytes())
    assert np.array_equal(frames(no_suffix)[0][1], grey)  # DICOM without a suffix is sniffed by its 'DICM' marker


def test_bad_dicom_files_are_refused_with_reason(tmp_path):
    grey = np.zeros((64, 80), np.uint8)
    assert refused(write_dicom(tmp_path / "header_only.dcm", grey, "MONOCHROME2", pixels=False)).startswith("DICOM has no pixel data")
    full = write_dicom(tmp_path / "full.dcm", grey, "MONOCHROME2").read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(full[:-2000])
    assert refused(tmp_path / "truncated.dcm") == "truncated DICOM: pixel data needs 5120 bytes, the file holds at most 3120"
    (tmp_path / "fake.dcm").write_text("not a dicom")
    assert refused(tmp_path / "fake.dcm").startswith("not a DICOM file")


# ---------------------------------------------------------------- NIfTI

def test_nifti_2d_2dt_and_3d(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.random((80, 64)).astype(np.float32)  # NIfTI order (x, y)
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "still.nii.gz")
    [(key, out)] = frames(tmp_path / "still.nii.gz")
    assert key == "" and out.shape == (64, 80)  # rows = y
    assert np.corrcoef(out.ravel(), image.T.ravel())[0, 1] > 0.99

    cine = rng.integers(0, 256, (80, 64, 1, 5)).astype(np.uint8)
    nib.save(nib.Nifti1Image(cine, np.eye(4)), tmp_path / "cine.nii")
    out = frames(tmp_path / "cine.nii", video_stride=2)
    assert [k for k, _ in out] == ["f0000", "f0002", "f0004"]
    assert np.array_equal(out[1][1], cine[:, :, 0, 2].T)

    volume = rng.integers(0, 256, (80, 64, 12)).astype(np.uint8)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "volume.nii.gz")
    out = frames(tmp_path / "volume.nii.gz", video_stride=1, max_frames=4)
    assert [k for k, _ in out] == ["z000", "z004", "z007", "z011"]
    assert np.array_equal(out[-1][1], volume[:, :, 11].T)

    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b" + bytes(50))
    assert refused(tmp_path / "broken.nii.gz").startswith("not a readable NIfTI file")


# ---------------------------------------------------------------- video

@pytest.mark.parametrize("suffix,fourcc", [(".mp4", "mp4v"), (".avi", "MJPG")])
def test_video_frames_at_stride(tmp_path, suffix, fourcc):
    path = tmp_path / f"clip{suffix}"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (96, 64))
    assert writer.isOpened()
    for i in range(12):
        writer.write(np.full((64, 96, 3), (20 * i, 0, 0), np.uint8))  # BGR: blue ramp
    writer.release()
    out = frames(path, video_stride=5)
    assert [k for k, _ in out] == ["f0000", "f0005", "f0010"]
    assert out[0][1].shape == (64, 96, 3)
    blue = [float(f[..., 2].mean()) for _, f in out]  # RGB order after reading
    assert abs(blue[1] - 100) < 8 and abs(blue[2] - 200) < 8 and float(out[2][1][..., 0].mean()) < 8

    (tmp_path / f"junk{suffix}").write_bytes(np.random.default_rng(0).bytes(4000))
    assert refused(tmp_path / f"junk{suffix}") in ("not a decodable video (OpenCV could not open it)",
                                                   "video has no decodable frames (empty or truncated)")


# ---------------------------------------------------------------- the whole per-file step on the corpus

def test_every_corpus_file_is_processed_or_skipped_with_reason(tmp_path, phantom):
    """The real pipeline (read, scan area, crop, resize) on each kind of file: ok, or skipped with the reason."""
    grey = cv2.cvtColor(phantom, cv2.COLOR_RGB2GRAY)
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(phantom).save(src / "phantom_rgb.png")
    Image.fromarray(phantom).convert("P", palette=Image.ADAPTIVE).save(src / "phantom_palette.png")
    Image.fromarray((grey.astype(np.uint16) * 200 + 500)).save(src / "phantom_16bit.png")
    write_dicom(src / "phantom_mono1.dcm", 255 - grey, "MONOCHROME1")
    write_dicom(src / "phantom_rgb_cine.dcm", np.stack([phantom] * 2), "RGB", n_frames=2)
    nib.save(nib.Nifti1Image(np.stack([grey.T] * 3, axis=-1)[:, :, None, :], np.eye(4)), src / "phantom_cine.nii.gz")
    writer = cv2.VideoWriter(str(src / "phantom.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, grey.shape[::-1])
    for _ in range(3):
        writer.write(cv2.cvtColor(phantom, cv2.COLOR_RGB2BGR))
    writer.release()
    Image.new("L", (400, 300), 0).save(src / "all_black.png")
    (src / "empty.png").write_bytes(b"")
    (src / "text.png").write_text("hello")
    Image.new("L", (1, 1)).save(src / "one_pixel.png")
    huge_png(src / "huge.png", 10000)
    write_dicom(src / "no_pixels.dcm", grey, "MONOCHROME2", pixels=False)

    expected_skip = {
        "all_black.png": "no scan area found",
        "empty.png": "empty file (0 bytes)",
        "text.png": "content is not a recognisable image",
        "one_pixel.png": "image too small",
        "huge.png": "above MAX_PIXELS",
        "no_pixels.dcm": "DICOM has no pixel data",
    }
    cfg = Config(video_stride=1)
    out = tmp_path / "out"
    n_ok = {}
    for path in sorted(src.iterdir()):
        task = Task(Source(path, subject=path.stem), "corpus", "kidney", path.stem, max_frames=3, prev_rows=[])
        rows, reused = process_source(task, out, cfg)
        assert rows and not reused
        if path.name in expected_skip:
            assert [r["status"] for r in rows] == ["skipped"], path.name
            assert expected_skip[path.name] in rows[0]["reason"], (path.name, rows[0]["reason"])
        else:
            assert all(r["status"] == "ok" for r in rows), (path.name, [r["reason"] for r in rows])
            for r in rows:
                image = np.asarray(Image.open(out / r["output"]))
                assert image.shape == (256, 256, 3) and (image[..., 0] == image[..., 2]).all()
                assert r["geometry"] == "fan", path.name
            n_ok[path.name] = len(rows)
    assert n_ok == {"phantom_rgb.png": 1, "phantom_palette.png": 1, "phantom_16bit.png": 1, "phantom_mono1.dcm": 1,
                    "phantom_rgb_cine.dcm": 2, "phantom_cine.nii.gz": 3, "phantom.avi": 3}
    assert len(list(out.rglob("*.png"))) == sum(n_ok.values())


# ---------------------------------------------------------------- MetaImage (.mhd + .raw, CAMUS's 2019 release)

def write_mhd(path: Path, dims: str, element: str, data: bytes, extra: str = "", data_file: str = "") -> None:
    data_file = data_file or path.with_suffix(".raw").name
    header = f"ObjectType = Image\nNDims = {len(dims.split())}\nDimSize = {dims}\nElementType = {element}\n{extra}"
    if data_file == "LOCAL":
        path.write_bytes(f"{header}ElementDataFile = LOCAL\r\n".encode() + data)
    else:
        path.write_text(f"{header}ElementDataFile = {data_file}\n")
        (path.parent / data_file).write_bytes(data)


def test_metaimage_frames_are_read_row_major_in_either_byte_order_and_compressed(tmp_path):
    clip = (np.arange(3 * 40 * 50) % 251).astype(np.uint8).reshape(3, 40, 50)  # frames, rows, columns
    write_mhd(tmp_path / "patient0001_2CH_sequence.mhd", "50 40 3", "MET_UCHAR", clip.tobytes())
    frames = list(read_frames(tmp_path / "patient0001_2CH_sequence.mhd", video_stride=1))
    assert [k for k, _ in frames] == ["z000", "z001", "z002"]
    assert all((f == c).all() for (_, f), c in zip(frames, clip))
    write_mhd(tmp_path / "one.mhd", "50 40 1", "MET_UCHAR", clip[1].tobytes())  # a trailing 1 is a 2D image
    assert [(k, (f == clip[1]).all()) for k, f in read_frames(tmp_path / "one.mhd")] == [("", True)]
    wide = np.tile(np.arange(50, dtype=np.uint16) * 1000, (40, 1))
    write_mhd(tmp_path / "wide.mhd", "50 40", "MET_USHORT", zlib.compress(wide.astype(">u2").tobytes()),
              "BinaryDataByteOrderMSB = True\nCompressedData = True\n", data_file="LOCAL")
    (_, frame), = read_frames(tmp_path / "wide.mhd")
    assert frame.shape == (40, 50) and (np.diff(frame[0].astype(int)) >= 0).all() and frame[0, 0] < frame[0, -1]


def test_metaimage_refusals_name_the_problem(tmp_path):
    image = tmp_path / "a.mhd"
    write_mhd(image, "50 40", "MET_UCHAR", bytes(100))
    assert refused(image) == "truncated MetaImage data: a.raw holds 100 bytes, DimSize 50 40 of MET_UCHAR needs 2000"
    (tmp_path / "a.raw").unlink()
    assert refused(image) == "MetaImage data file a.raw: file not found"
    write_mhd(image, "50 40", "MET_LONG", bytes(2000))
    assert refused(image).startswith("MetaImage ElementType 'MET_LONG' not supported (MET_UCHAR, ")
    write_mhd(image, "50 40", "MET_UCHAR", bytes(2000), data_file="LIST")
    assert refused(image) == "MetaImage ElementDataFile 'LIST': multi-file data not supported"
    write_mhd(image, "50 40 3 2", "MET_UCHAR", bytes(12000))
    assert refused(image).startswith("MetaImage of NDims 4, DimSize '50 40 3 2', 1 channels not supported")
    image.write_text("NDims = 2\nDimSize = 50 40\n")
    assert refused(image) == "not a MetaImage header (.mhd): no ElementDataFile line"


def refusal(path: Path, **kwargs) -> str:
    with pytest.raises(UnreadableFileError) as err:
        list(read_frames(path, **kwargs))
    assert err.value.path == str(path) and str(err.value) == f"{path}: {err.value.reason}"
    return err.value.reason


def test_suffixes_are_lower_case_and_gzipped_nifti_s_is_kept_whole(tmp_path):
    assert file_suffix("a/B.PNG") == ".png"
    assert file_suffix("a/x.NII.GZ") == ".nii.gz"
    assert file_suffix("a/x.tar.gz") == ".gz"
    assert file_suffix("a/IM0001") == ""
    (tmp_path / "IM0001").write_bytes(bytes(128) + b"DICM")
    (tmp_path / "IM0002").write_bytes(bytes(128) + b"DICX")
    (tmp_path / "notes.txt").write_bytes(bytes(128) + b"DICM")
    assert is_supported(tmp_path / "IM0001") and not is_supported(tmp_path / "IM0002")
    assert not is_supported(tmp_path / "notes.txt")  # the marker counts only without a suffix
    assert not is_supported(tmp_path / "missing")
    assert all(is_supported(tmp_path / f"a{s.upper()}") for s in SUPPORTED_SUFFIXES)


def test_special_files_are_named_by_their_kind(tmp_path):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "s.png"))
        assert not_a_regular_file(tmp_path / "s.png") == "not a regular file: a socket, not read"
    assert not_a_regular_file(tmp_path / ("x" * 300)) == "cannot read file: File name too long"
    (tmp_path / "f.png").write_bytes(b"x")
    (tmp_path / "link.png").symlink_to("f.png")
    assert not_a_regular_file(tmp_path / "f.png") is None and not_a_regular_file(tmp_path / "link.png") is None


def test_an_unsupported_file_names_its_suffix_and_the_supported_ones(tmp_path):
    (tmp_path / "README").write_text("text")
    assert refusal(tmp_path / "README") == (f"unsupported file type '(no suffix)'; supported: "
                                            f"{', '.join(SUPPORTED_SUFFIXES)}")
    (tmp_path / "a.GIF").write_text("text")
    assert refusal(tmp_path / "a.GIF").startswith("unsupported file type '.gif'; supported: .png, .jpg, ")


def test_frames_below_the_minimum_side_are_refused_naming_the_frame(tmp_path):
    pages = [Image.fromarray(np.full((40, width), 9, np.uint8)) for width in (32, 32, 31)]
    pages[0].save(tmp_path / "cine.tif", save_all=True, append_images=pages[1:])  # page 2 is 40 x 31
    assert refusal(tmp_path / "cine.tif", video_stride=1) == \
        "image too small (frame f0002): 31x40 pixels, need at least 32x32 (MIN_SIDE)"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "edge.png")
    [(key, frame)] = read_frames(tmp_path / "edge.png")
    assert key == "" and frame.shape == (32, 32)


def test_the_pixel_cap_allows_exactly_max_pixels(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_PIXELS", 64 * 48)
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(tmp_path / "a.png")
    assert len(list(read_frames(tmp_path / "a.png"))) == 1
    Image.fromarray(np.zeros((49, 64), np.uint8)).save(tmp_path / "b.png")
    assert refusal(tmp_path / "b.png") == ("image is 64x49 = 3136 pixels, above MAX_PIXELS=3072: not decoded "
                                           "(possible decompression bomb; no ultrasound frame is this large)")


def test_multi_frame_sources_keep_every_tenth_frame_by_default(tmp_path):
    pages = [Image.fromarray(np.full((32, 32), i, np.uint8)) for i in range(12)]
    pages[0].save(tmp_path / "cine.tif", save_all=True, append_images=pages[1:])
    assert [k for k, _ in read_frames(tmp_path / "cine.tif")] == ["f0000", "f0010"]


def test_a_stride_below_one_keeps_every_frame(tmp_path):
    pages = [Image.fromarray(np.full((32, 32), 10 * i, np.uint8)) for i in range(3)]
    pages[0].save(tmp_path / "cine.tif", save_all=True, append_images=pages[1:])
    assert [k for k, _ in read_frames(tmp_path / "cine.tif", video_stride=0)] == ["f0000", "f0001", "f0002"]
    assert [k for k, _ in read_frames(tmp_path / "cine.tif", video_stride=1, max_frames=2)] == ["f0000", "f0002"]


def test_pick_indices_thins_evenly_to_the_cap():
    assert pick_indices(10, 3, None) == [0, 3, 6, 9]
    assert pick_indices(10, 3, 4) == [0, 3, 6, 9]  # at the cap: all kept
    assert pick_indices(10, 1, 3) == [0, 4, 9]  # linspace(0, 9, 3) = 0, 4.5, 9 rounds half to even
    assert pick_indices(10, 1, 1) == [0]
    assert pick_indices(10, 1, 0) == [0]  # a cap of 0 still keeps one frame
    assert pick_indices(0, 1, None) == []


def test_wide_data_maps_its_robust_range_to_0_255_with_rounding():
    data = np.arange(1000, dtype=np.uint16).reshape(40, 25) * 4  # 0 .. 3996
    lo, hi = np.percentile(data.astype(np.float32), (0.5, 99.5))
    expected = np.clip((data - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)
    out = to_uint8(data)
    assert np.array_equal(out, expected) and out[0, 0] == 0 and out[-1, -1] == 255
    assert out.flat[500] == int((2000 - lo) * 255 / (hi - lo) + 0.5)


def test_a_range_the_percentiles_miss_falls_back_to_min_and_max():
    data = np.zeros((40, 40), np.float32)
    data[0, 0] = 10.0  # one pixel in 1600: both percentiles are 0
    out = to_uint8(data)
    assert out[0, 0] == 255 and out.sum() == 255
    assert np.array_equal(to_uint8(np.full((3, 3), 7.0)), np.zeros((3, 3), np.uint8))  # constant: all zeros
    assert np.array_equal(to_uint8(np.full((3, 3), np.nan)), np.zeros((3, 3), np.uint8))


def test_nan_becomes_the_low_end_and_infinities_do_not_set_the_range():
    data = np.tile(np.linspace(0, 1, 201, dtype=np.float32), (2, 1))
    data[0, 100], data[1, 0], data[1, 200] = np.nan, -np.inf, np.inf
    out = to_uint8(data)
    assert out[0, 100] == 0 and out[1, 0] == 0 and out[1, 200] == 255
    assert out[0, 1] == pytest.approx(0, abs=1) and out[0, 199] == pytest.approx(255, abs=1)
    assert 120 <= out[0, 101] <= 130  # the middle stays in the middle


def test_bool_and_uint8_keep_their_values():
    assert to_uint8(np.array([[True, False]])).tolist() == [[255, 0]]
    grey = np.array([[3, 250]], np.uint8)
    assert to_uint8(grey) is grey


def test_pillow_modes_by_exact_value(tmp_path):
    bits = np.zeros((32, 32), bool)
    bits[:, 16:] = True
    Image.fromarray(bits).save(tmp_path / "bits.png")
    [(_, out)] = read_frames(tmp_path / "bits.png")
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 255} and out[0, 16] == 255 and out[0, 15] == 0
    la = np.zeros((32, 32, 2), np.uint8)
    la[..., 0], la[..., 1] = 200, 128  # grey 200 at alpha 128/255
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    [(_, out)] = read_frames(tmp_path / "la.png")
    assert out.shape == (32, 32, 3) and np.all(out == int(200 * 128 / 255 + 0.5))
    Image.fromarray(np.full((32, 32, 4), (0, 255, 255, 0), np.uint8), "CMYK").save(tmp_path / "cmyk.tif")
    [(_, out)] = read_frames(tmp_path / "cmyk.tif")
    assert out.shape == (32, 32, 3) and out[0, 0].tolist() == [255, 0, 0]
    Image.fromarray(np.full((32, 32), 2.5, np.float32), "F").save(tmp_path / "flat.tif")
    [(_, out)] = read_frames(tmp_path / "flat.tif")
    assert out.max() == 0  # a constant float image: nothing to stretch


def test_dicom_windows_slopes_and_palettes(tmp_path):
    wide = np.arange(64 * 80, dtype=np.uint16).reshape(64, 80)  # 0 .. 5119
    path = write_dicom(tmp_path / "w.dcm", wide, "MONOCHROME2", window=([1000, 3000], [400, 10]))
    [(_, out)] = read_frames(path)  # the first window: centre 1000, width 400
    expected = (np.clip((wide.astype(np.float32) - 800) / 400, 0, 1) * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(out, expected)
    path = write_dicom(tmp_path / "narrow.dcm", wide, "MONOCHROME2", window=(1000, 0.5))
    [(_, out)] = read_frames(path)  # a width under 1 counts as 1
    assert out.flat[999] == 0 and out.flat[1000] == 64 and out.flat[1001] == 255  # 0.25 of the step at the centre
    grey = np.tile(np.arange(80, dtype=np.uint8) * 3, (64, 1))
    [(_, out)] = read_frames(write_dicom(tmp_path / "m1.dcm", grey, "MONOCHROME1"))
    assert np.array_equal(out, 255 - grey)  # 8-bit without a window: kept, then inverted


def test_nifti_shapes_kept_and_refused(tmp_path):
    image = np.arange(40 * 36, dtype=np.uint8).reshape(40, 36)
    nib.save(nib.Nifti1Image(image[:, :, None, None], np.eye(4)), tmp_path / "flat.nii")
    [(key, out)] = read_frames(tmp_path / "flat.nii")  # trailing axes of size 1 dropped: a 2D image
    assert key == "" and np.array_equal(out, image.T)
    nib.save(nib.Nifti1Image(np.zeros((40, 36, 2, 3), np.uint8), np.eye(4)), tmp_path / "4d.nii")
    assert refusal(tmp_path / "4d.nii") == ("NIfTI shape (40, 36, 2, 3) not supported: expected 2D, 2D+t (X,Y,1,T) "
                                            "or 3D (X,Y,Z)")
    rgb = np.zeros((40, 36), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii")
    assert refusal(tmp_path / "rgb.nii").startswith("NIfTI with structured voxel type")
    series = np.stack([np.full((40, 36), v, np.uint16) for v in (0, 255, 510)], axis=-1)[:, :, None]
    nib.save(nib.Nifti1Image(series, np.eye(4)), tmp_path / "t.nii")
    frames = list(read_frames(tmp_path / "t.nii", video_stride=1))
    # one mapping for the whole series: the frames keep their order of brightness
    assert [k for k, _ in frames] == ["f0000", "f0001", "f0002"] and [int(f[0, 0]) for _, f in frames] == [0, 128, 255]


class FakeCapture:
    """cv2.VideoCapture stood in for: a clip of `frames` (None: grab fails there; "bad": retrieve fails) that reports
    `count` frames of 40 x 36 px, and records whether it was released."""
    released: list[bool] = []

    def __init__(self, frames: list, count: int):
        self.frames, self.count, self.at = frames, count, -1
        FakeCapture.released.append(False)

    def isOpened(self) -> bool:
        return True

    def get(self, prop: int) -> float:
        import cv2
        return {cv2.CAP_PROP_FRAME_WIDTH: 40.0, cv2.CAP_PROP_FRAME_HEIGHT: 36.0,
                cv2.CAP_PROP_FRAME_COUNT: float(self.count)}[prop]

    def grab(self) -> bool:
        self.at += 1
        return self.at < len(self.frames) and self.frames[self.at] is not None

    def retrieve(self):
        frame = self.frames[self.at]
        return (False, np.zeros((36, 40, 3), np.uint8)) if isinstance(frame, str) else (True, frame)

    def release(self) -> None:
        FakeCapture.released[-1] = True


def video(monkeypatch, tmp_path: Path, frames: list, count: int, **kwargs) -> list[tuple[str, np.ndarray]] | str:
    import cv2
    monkeypatch.setattr(cv2, "VideoCapture", lambda path: FakeCapture(frames, count))
    (tmp_path / "clip.avi").write_bytes(b"x")
    try:
        out = list(read_frames(tmp_path / "clip.avi", **kwargs))
    except UnreadableFileError as err:
        assert err.path == str(tmp_path / "clip.avi")
        out = err.reason
    assert FakeCapture.released[-1]  # the capture is released however the read ends
    return out


def bgr(value: int) -> np.ndarray:
    frame = np.zeros((36, 40, 3), np.uint8)
    frame[..., 0] = value  # blue in OpenCV's order
    return frame


def test_video_frames_spread_over_the_reported_count_or_taken_at_the_stride(monkeypatch, tmp_path):
    clip = [bgr(i) for i in range(12)]
    out = video(monkeypatch, tmp_path, clip, 12, video_stride=1, max_frames=3)
    assert [k for k, _ in out] == ["f0000", "f0006", "f0011"] and [int(f[0, 0, 2]) for _, f in out] == [0, 6, 11]
    assert out[0][1][0, 0].tolist() == [0, 0, 0] and out[1][1][0, 0].tolist() == [0, 0, 6]  # RGB order
    assert [k for k, _ in video(monkeypatch, tmp_path, clip, 12, video_stride=5)] == ["f0000", "f0005", "f0010"]
    # a clip that reports one frame gives that one, though more could be read
    assert [k for k, _ in video(monkeypatch, tmp_path, clip, 1, video_stride=1)] == ["f0000"]
    # without a count: every stride-th frame from the start, up to max_frames
    assert [k for k, _ in video(monkeypatch, tmp_path, clip, 0, video_stride=3)] == ["f0000", "f0003", "f0006",
                                                                                      "f0009"]
    assert [k for k, _ in video(monkeypatch, tmp_path, clip, 0, video_stride=3, max_frames=2)] == ["f0000", "f0003"]
    assert [k for k, _ in video(monkeypatch, tmp_path, clip, -1, video_stride=4)] == ["f0000", "f0004", "f0008"]


def test_a_video_read_stops_at_the_first_frame_it_cannot_grab_or_decode(monkeypatch, tmp_path):
    clip = [bgr(0), bgr(1), "bad", bgr(3)]
    assert [k for k, _ in video(monkeypatch, tmp_path, clip, 4, video_stride=1)] == ["f0000", "f0001"]
    assert [k for k, _ in video(monkeypatch, tmp_path, [bgr(0), None, bgr(2)], 3, video_stride=1)] == ["f0000"]
    assert video(monkeypatch, tmp_path, [None], 5) == "video has no decodable frames (empty or truncated)"
    assert video(monkeypatch, tmp_path, ["bad"], 1) == "video has no decodable frames (empty or truncated)"
    grey = np.full((36, 40), 7, np.uint8)
    [(key, frame)] = video(monkeypatch, tmp_path, [grey], 1)
    assert key == "f0000" and np.array_equal(frame, grey)  # a grey frame is kept as it is


def test_a_video_above_the_pixel_cap_is_refused_before_any_frame(monkeypatch, tmp_path):
    monkeypatch.setattr(readers, "MAX_PIXELS", 40 * 36 - 1)
    assert video(monkeypatch, tmp_path, [bgr(0)], 1) == ("image is 40x36 = 1440 pixels, above MAX_PIXELS=1439: not "
                                                         "decoded (possible decompression bomb; no ultrasound frame "
                                                         "is this large)")


def test_single_and_two_page_images_are_keyed_by_their_page_count(tmp_path):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a.bmp")  # BMP has no n_frames
    assert [k for k, _ in read_frames(tmp_path / "a.bmp", video_stride=1)] == [""]
    pages = [Image.fromarray(np.full((32, 32), v, np.uint8)) for v in (5, 9)]
    pages[0].save(tmp_path / "two.tif", save_all=True, append_images=pages[1:])
    out = list(read_frames(tmp_path / "two.tif", video_stride=1))
    assert [k for k, _ in out] == ["f0000", "f0001"] and [int(f[0, 0]) for _, f in out] == [5, 9]


def test_images_pillow_refuses_to_open_are_named(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses above twice this
    assert refusal(tmp_path / "a.png").startswith("not decoded (possible decompression bomb): Image size (4096 "
                                                  "pixels) exceeds limit of 2000 pixels")
    monkeypatch.undo()

    def failing_open(path):
        raise OSError("disk went away")

    monkeypatch.setattr(Image, "open", failing_open)
    assert refusal(tmp_path / "a.png") == "cannot open image: disk went away"


def test_palette_images_with_transparency_are_composited_on_black(tmp_path):
    indices = np.tile(np.array([0, 1], np.uint8), (32, 16))
    for mode in ("P", "PA"):
        image = Image.fromarray(indices, "P")
        image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
        if mode == "P":
            image.info["transparency"] = 0  # index 0 is transparent
        else:
            alpha = Image.fromarray(np.where(indices == 0, 0, 255).astype(np.uint8), "L")
            image = image.convert("PA")
            image.putalpha(alpha)
        out = readers._pil_to_array(image)
        assert out.shape == (32, 32, 3) and out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [200, 100, 50]


def test_the_frame_check_refuses_what_no_reader_should_return(tmp_path):
    path = tmp_path / "x.png"
    for frame in (np.zeros((32, 32), np.float32), np.zeros((32, 32, 4), np.uint8), np.zeros((32, 32, 3, 1), np.uint8)):
        with pytest.raises(UnreadableFileError) as err:
            readers._checked(path, "", frame)
        assert str(err.value) == (f"{path}: internal: reader returned {frame.dtype} {frame.shape}, expected uint8 "
                                  "(H,W) or (H,W,3)")
    assert readers._checked(path, "", np.zeros((32, 33, 3), np.uint8)).shape == (32, 33, 3)


def test_the_dicom_marker_is_the_four_bytes_after_the_preamble(tmp_path, monkeypatch):
    (tmp_path / "IM1").write_bytes(bytes(128) + b"DICM" + b"\x02\x00\x00\x00")
    (tmp_path / "IM2").write_bytes(bytes(127) + b"DICM")
    assert readers._has_dicom_preamble(tmp_path / "IM1") and not readers._has_dicom_preamble(tmp_path / "IM2")

    def failing_open(*args, **kwargs):
        raise PermissionError("no")

    monkeypatch.setattr(readers, "open", failing_open, raising=False)
    assert not readers._has_dicom_preamble(tmp_path / "IM1")


def test_wide_data_below_the_range_and_nan_of_signed_data_map_to_zero():
    data = np.concatenate([[0.0], np.arange(100, 1099, dtype=np.float64)]).reshape(40, 25)
    out = to_uint8(data)
    assert out.dtype == np.uint8 and out[0, 0] == 0 and out[-1, -1] == 255  # far below the 0.5th percentile: 0
    signed = np.linspace(-1, 1, 400).reshape(20, 20)
    signed[10, 10] = np.nan
    assert to_uint8(signed)[10, 10] == 0  # NaN is the low end, not the value 0
    assert to_uint8(np.array([[True, False]])).dtype == np.uint8
    assert to_uint8(np.full((3, 3), 7.0)).dtype == np.uint8 and to_uint8(np.full((3, 3), np.nan)).dtype == np.uint8


def test_nifti_edges(tmp_path, monkeypatch):
    nib.save(nib.Nifti1Image(np.zeros((40, 1), np.uint8), np.eye(4)), tmp_path / "line.nii")
    assert refusal(tmp_path / "line.nii") == "image too small: 40x1 pixels, need at least 32x32 (MIN_SIDE)"
    nib.save(nib.Nifti1Image(np.zeros((64, 48), np.uint8), np.eye(4)), tmp_path / "wide.nii")
    monkeypatch.setattr(readers, "MAX_PIXELS", 3000)
    assert refusal(tmp_path / "wide.nii").startswith("image is 64x48 = 3072 pixels, above MAX_PIXELS=3000")
    monkeypatch.undo()
    (tmp_path / "b.nii.gz").write_bytes(b"\x1f\x8b" + bytes(50))
    assert refusal(tmp_path / "b.nii.gz").startswith("not a readable NIfTI file: ImageFileError: ")
    nib.save(nib.Nifti1Image(np.zeros((64, 48, 5), np.uint8), np.eye(4)), tmp_path / "t.nii")
    whole = (tmp_path / "t.nii").read_bytes()
    (tmp_path / "t.nii").write_bytes(whole[:-3000])
    assert refusal(tmp_path / "t.nii").startswith("truncated or corrupt NIfTI data: OSError: Expected 15360 bytes, "
                                                  "got 12360 bytes")


def edited_dicom(tmp_path: Path, name: str, edit, arr: np.ndarray | None = None, photometric: str = "MONOCHROME2",
                 n_frames: int = 1) -> Path:
    import pydicom
    arr = np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) if arr is None else arr
    ds = pydicom.dcmread(write_dicom(tmp_path / f"{name}.src.dcm", arr, photometric, n_frames=n_frames))
    edit(ds)
    ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
    return tmp_path / f"{name}.dcm"


def test_dicom_headers_without_the_image_attributes_are_refused(tmp_path):
    (tmp_path / "c.dcm").write_bytes(bytes(128) + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + bytes(20))
    assert refusal(tmp_path / "c.dcm") == "DICOM has no pixel data (a report, structured document or header-only file)"
    for attribute in ("Rows", "PhotometricInterpretation"):
        path = edited_dicom(tmp_path, attribute, lambda ds: delattr(ds, attribute))
        assert refusal(path) == f"DICOM image attributes missing or invalid: 'FileDataset' object has no attribute " \
                                f"'{attribute}'"


def test_dicom_frames_are_picked_keyed_and_read_by_index(tmp_path):
    cine = np.stack([np.full((64, 80), 10 * i, np.uint8) for i in range(5)])
    path = write_dicom(tmp_path / "cine.dcm", cine, "MONOCHROME2", n_frames=5)
    out = list(read_frames(path, video_stride=1, max_frames=2))
    assert [k for k, _ in out] == ["f0000", "f0004"] and [int(f[0, 0]) for _, f in out] == [0, 40]
    two = write_dicom(tmp_path / "two.dcm", cine[:2], "MONOCHROME2", n_frames=2)
    assert [k for k, _ in read_frames(two, video_stride=1)] == ["f0000", "f0001"]
    empty_count = edited_dicom(tmp_path, "empty_count", lambda ds: setattr(ds, "NumberOfFrames", None), cine[0])
    with pytest.warns(UserWarning, match="Number of Frames"):  # pydicom's, about the file
        assert [k for k, _ in read_frames(empty_count)] == [""]  # an empty NumberOfFrames: one frame


def test_dicom_windows_need_both_centre_and_width(tmp_path):
    wide = np.arange(64 * 80, dtype=np.uint16).reshape(64, 80)
    centre_only = edited_dicom(tmp_path, "centre", lambda ds: setattr(ds, "WindowCenter", 1000), wide)
    [(_, out)] = read_frames(centre_only)
    assert np.array_equal(out, to_uint8(wide))  # no window: the data's robust range


def test_wide_rgb_dicom_is_mapped_to_8_bits_by_its_range(tmp_path):
    rgb16 = np.arange(64 * 80 * 3, dtype=np.uint16).reshape(64, 80, 3) * 4
    [(_, out)] = read_frames(write_dicom(tmp_path / "rgb16.dcm", rgb16, "RGB"))
    assert out.dtype == np.uint8 and np.array_equal(out, to_uint8(rgb16))


def test_palette_dicom_is_looked_up_and_cut_to_8_bits(tmp_path):
    indices = np.tile(np.arange(4, dtype=np.uint8), (64, 20))
    lut = {"Red": [0, 65535, 0, 4660], "Green": [0, 0, 65535, 22136], "Blue": [0, 0, 0, 39612]}

    def palette(ds):
        from pydicom.datadict import tag_for_keyword
        for colour, values in lut.items():
            ds.add_new(tag_for_keyword(f"{colour}PaletteColorLookupTableDescriptor"), "US", [4, 0, 16])
            ds.add_new(tag_for_keyword(f"{colour}PaletteColorLookupTableData"), "OW",
                       np.array(values, np.uint16).tobytes())

    path = edited_dicom(tmp_path, "palette", palette, indices, "PALETTE COLOR")
    [(_, out)] = read_frames(path)
    assert out.dtype == np.uint8 and out.shape == (64, 80, 3)
    assert out[0, :4].tolist() == [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0x12, 0x56, 0x9A]]  # the LUT's high bytes


def test_undecodable_dicom_pixel_data_names_the_transfer_syntax(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    def jpeg(ds):
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = encapsulate([b"\xff\xd8garbage\xff\xd9"])
        ds["PixelData"].VR = "OB"

    path = edited_dicom(tmp_path, "jpeg", jpeg, np.zeros((64, 80), np.uint8))
    assert refusal(path).startswith("cannot decode DICOM pixel data (JPEG Baseline (Process 1)): RuntimeError: ")


def test_float_pixel_dicom_is_read_and_mapped_by_its_range(tmp_path):
    for keyword, dtype, bits in (("FloatPixelData", np.float32, 32), ("DoubleFloatPixelData", np.float64, 64)):
        values = (np.arange(64 * 80, dtype=dtype) / 10).reshape(64, 80)

        def floats(ds):
            del ds.PixelData
            ds.BitsAllocated = bits
            del ds.BitsStored, ds.HighBit, ds.PixelRepresentation
            setattr(ds, keyword, values.tobytes())

        [(_, out)] = read_frames(edited_dicom(tmp_path, keyword, floats, np.zeros((64, 80), np.uint8)))
        assert np.array_equal(out, to_uint8(values)), keyword


def test_a_damaged_dicom_header_and_an_oversized_dicom_are_refused_by_name(tmp_path, monkeypatch):
    (tmp_path / "c.dcm").write_bytes(bytes(128) + b"DICM" + b"\x02\x00\x10\x00XX\x04\x00abcd" + bytes(8))
    with pytest.warns(UserWarning, match="found explicit VR"):  # pydicom's, about the damaged element
        assert refusal(tmp_path / "c.dcm") == ("corrupt DICOM header: NotImplementedError: Unknown Value "
                                               "Representation 'XX' in tag (0002,0010)")
    monkeypatch.setattr(readers, "MAX_PIXELS", 64 * 80 - 1)
    path = write_dicom(tmp_path / "big.dcm", np.zeros((64, 80), np.uint8), "MONOCHROME2")
    assert refusal(path).startswith("image is 80x64 = 5120 pixels, above MAX_PIXELS=5119")


def test_an_8_bit_palette_is_used_as_it_is(tmp_path):
    from pydicom.datadict import tag_for_keyword
    indices = np.tile(np.arange(4, dtype=np.uint8), (64, 20))

    def palette(ds):
        for colour, values in (("Red", [0, 255, 0, 18]), ("Green", [0, 0, 255, 86]), ("Blue", [0, 0, 0, 154])):
            ds.add_new(tag_for_keyword(f"{colour}PaletteColorLookupTableDescriptor"), "US", [4, 0, 8])
            ds.add_new(tag_for_keyword(f"{colour}PaletteColorLookupTableData"), "OW",
                       np.array(values, np.uint8).tobytes())  # 8-bit entries, packed

    [(_, out)] = read_frames(edited_dicom(tmp_path, "palette8", palette, indices, "PALETTE COLOR"))
    assert out[0, :4].tolist() == [[0, 0, 0], [255, 0, 0], [0, 255, 0], [18, 86, 154]]
