"""data_preprocessing/readers.py rules on small files made here: suffixes, the checks every frame passes, which
frames a multi-frame source keeps, and each intensity mapping by exact value."""
from __future__ import annotations

import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from data_preprocessing import readers
from data_preprocessing.readers import (SUPPORTED_SUFFIXES, UnreadableFileError, file_suffix, is_supported,
                                        not_a_regular_file, pick_indices, read_frames, to_uint8)
from test_readers import write_dicom


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
