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
