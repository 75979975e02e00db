"""Readers on a corpus of good and bad files made here: every file is read or refused with a clear reason."""
from __future__ import annotations

import os
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

from data_preprocessing.adapters import Source
from data_preprocessing.make_phantoms import generate_frame
from data_preprocessing.prepare import Config, Task, process_source
from data_preprocessing.readers import MAX_PIXELS, MIN_SIDE, UnreadableFileError, pick_indices, read_frames


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
