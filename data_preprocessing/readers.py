"""Read every file format public ultrasound data comes in as 8-bit frames.

`read_frames(path)` yields `(frame_key, array)` pairs: key "" for a single image, "f0003" for frame 3 of a
video / cine DICOM / 2D+t NIfTI / multi-page TIFF, "z012" for slice 12 of a 3D NIfTI volume. Arrays are
uint8 (H,W) grey or (H,W,3) RGB. Any file that cannot give a sensible frame raises
`UnreadableFileError(path, reason)` so the caller can skip it and record why.

Intensity policy: 8-bit data is kept as is (ultrasound is displayed 8-bit, its grey levels are the
vendor's display mapping); wider data (16-bit PNG/TIFF, float NIfTI, 12/16-bit DICOM without a window)
is scaled by its actual robust range (percentiles below), DICOM with a window centre/width by that window.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from common.io import not_a_regular_file  # noqa: F401 (read_frames' guard, and prepare.py's)

MAX_PIXELS = 40_000_000  # larger frames (e.g. 10000x10000) are refused: no scanner makes them, decoding one costs GBs
MIN_SIDE = 32  # frames narrower or lower than this (in pixels) hold no usable image
ROBUST_PERCENTILES = (0.5, 99.5)  # range mapped to 0..255 when wider-than-8-bit data has no window

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
METAIMAGE_SUFFIXES = (".mhd",)  # a text header naming its .raw data file (CAMUS's 2019 release)
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")
SUPPORTED_SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES + METAIMAGE_SUFFIXES + VIDEO_SUFFIXES


class UnreadableFileError(Exception):
    """A source file that gives no usable frame; `reason` says why in words."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def file_suffix(path: str | Path) -> str:
    """Lower-case suffix, with the double suffix of gzipped NIfTI (".nii.gz") kept whole."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def is_supported(path: str | Path) -> bool:
    """A suffix read here, or no suffix and DICOM content (scanner exports name files like IM000001)."""
    suffix = file_suffix(path)
    return suffix in SUPPORTED_SUFFIXES or (suffix == "" and _has_dicom_preamble(Path(path)))


def read_frames(path: str | Path, video_stride: int = 10, max_frames: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (frame_key, uint8 frame) for every frame kept from `path`.

    Multi-frame sources (video, cine DICOM, NIfTI time series or volumes, multi-page TIFF) keep every
    `video_stride`-th frame (neighbours are near-duplicates); `max_frames` caps the count, spread evenly.
    """
    path = Path(path)
    problem = not_a_regular_file(path)
    if problem:
        raise UnreadableFileError(path, problem)
    size = path.stat().st_size
    if size == 0:
        raise UnreadableFileError(path, "empty file (0 bytes)")
    suffix = file_suffix(path)
    if suffix in IMAGE_SUFFIXES:
        reader = _read_image
    elif suffix in DICOM_SUFFIXES or (suffix == "" and _has_dicom_preamble(path)):
        reader = _read_dicom
    elif suffix in NIFTI_SUFFIXES:
        reader = _read_nifti
    elif suffix in METAIMAGE_SUFFIXES:
        reader = _read_metaimage
    elif suffix in VIDEO_SUFFIXES:
        reader = _read_video
    else:
        raise UnreadableFileError(path, f"unsupported file type {suffix or '(no suffix)'!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}")
    for key, frame in reader(path, max(1, video_stride), max_frames):
        yield key, _checked(path, key, frame)


def _checked(path: Path, key: str, frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    if h < MIN_SIDE or w < MIN_SIDE:
        where = f" (frame {key})" if key else ""
        raise UnreadableFileError(path, f"image too small{where}: {w}x{h} pixels, need at least {MIN_SIDE}x{MIN_SIDE} (MIN_SIDE)")
    if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] != 3):
        raise UnreadableFileError(path, f"internal: reader returned {frame.dtype} {frame.shape}, expected uint8 (H,W) or (H,W,3)")
    return np.ascontiguousarray(frame)


def _check_pixels(path: Path, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise UnreadableFileError(
            path,
            f"image is {width}x{height} = {width * height} pixels, above MAX_PIXELS={MAX_PIXELS}: "
            "not decoded (possible decompression bomb; no ultrasound frame is this large)",
        )


def pick_indices(n: int, stride: int, max_frames: int | None) -> list[int]:
    """Every `stride`-th of n frames, thinned evenly to at most `max_frames`."""
    idx = list(range(0, n, stride))
    if max_frames is not None and len(idx) > max_frames:
        idx = [idx[i] for i in np.linspace(0, len(idx) - 1, max(1, max_frames)).round().astype(int)]
    return idx


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map data wider than 8 bits to uint8 by its robust range; a constant array becomes all zeros."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    data = arr.astype(np.float32)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return np.zeros(arr.shape, np.uint8)
    lo, hi = np.percentile(finite, ROBUST_PERCENTILES)
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    scaled = (np.nan_to_num(data, nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- PNG / JPEG / BMP / TIFF (Pillow)

def _read_image(path: Path, stride: int, max_frames: int | None) -> Iterator[tuple[str, np.ndarray]]:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS below decides
            image = Image.open(path)
    except UnidentifiedImageError:
        raise UnreadableFileError(path, f"content is not a recognisable image (not a real {file_suffix(path)} file)") from None
    except Image.DecompressionBombError as err:
        raise UnreadableFileError(path, f"not decoded (possible decompression bomb): {err}") from None
    except OSError as err:
        raise UnreadableFileError(path, f"cannot open image: {err}") from None
    with image:
        _check_pixels(path, *image.size)
        n = getattr(image, "n_frames", 1)
        keys = pick_indices(n, stride, max_frames) if n > 1 else [0]
        for i in keys:
            try:
                image.seek(i)
                image.load()
                frame = _pil_to_array(ImageOps.exif_transpose(image))  # cameras store photos unrotated plus an EXIF tag
            except (OSError, ValueError, SyntaxError) as err:
                raise UnreadableFileError(path, f"truncated or corrupt image data: {err}") from None
            yield (f"f{i:04d}" if n > 1 else ""), frame


def _pil_to_array(image) -> np.ndarray:
    """Pillow modes to uint8 grey or RGB: palette expanded, alpha composited on black, wide data rescaled."""
    mode = image.mode
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA"):  # no Pillow plugin opens a file as premultiplied "RGBa" or "La"
        arr = np.asarray(image.convert("RGBA"), dtype=np.float32)
        rgb = arr[..., :3] * (arr[..., 3:] / 255.0)  # transparent pixels are outside the image: black
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    if mode == "1":
        return np.asarray(image, dtype=np.uint8) * 255
    if mode in ("L", "RGB"):
        return np.asarray(image)
    if mode.startswith("I") or mode == "F":
        return to_uint8(np.asarray(image))
    return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------- DICOM (pydicom)

def _has_dicom_preamble(path: Path) -> bool:
    if not_a_regular_file(path):
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _read_dicom(path: Path, stride: int, max_frames: int | None) -> Iterator[tuple[str, np.ndarray]]:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, iter_pixels
    from pydicom.pixels.utils import get_expected_length

    try:
        ds = pydicom.dcmread(path, defer_size="1 KB")  # headers now; pixel data decoded frame by frame below
    except InvalidDicomError:
        raise UnreadableFileError(path, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from None
    except Exception as err:  # pydicom raises many types for damaged headers
        raise UnreadableFileError(path, f"corrupt DICOM header: {type(err).__name__}: {err}") from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UnreadableFileError(path, "DICOM has no pixel data (a report, structured document or header-only file)")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        n = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.PhotometricInterpretation).upper()  # required: pydicom decodes nothing without it
    except (AttributeError, ValueError, TypeError) as err:
        raise UnreadableFileError(path, f"DICOM image attributes missing or invalid: {err}") from None
    _check_pixels(path, cols, rows)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    element = ds.get_item("PixelData")
    if syntax is not None and not syntax.is_compressed and element is not None and element.file_tell is not None:
        expected, available = get_expected_length(ds), path.stat().st_size - element.file_tell
        if available < expected:
            raise UnreadableFileError(path, f"truncated DICOM: pixel data needs {expected} bytes, the file holds at most {available}")
    indices = pick_indices(n, stride, max_frames)
    try:
        frames = iter_pixels(path, indices=indices)  # raw=False: pydicom converts YBR_FULL(_422) to RGB
        for i, frame in zip(indices, frames):
            if photometric == "PALETTE COLOR":
                frame = apply_color_lut(frame, ds)
                frame = (frame >> 8).astype(np.uint8) if frame.dtype != np.uint8 else frame
            elif frame.ndim == 2:
                frame = _dicom_grey_to_uint8(frame, ds, photometric)
            elif frame.dtype != np.uint8:
                frame = to_uint8(frame)
            yield (f"f{i:04d}" if n > 1 else ""), frame
    except UnreadableFileError:
        raise
    except Exception as err:  # damaged compressed data, no decoder for the transfer syntax, ...
        syntax_name = getattr(syntax, "name", str(syntax))
        raise UnreadableFileError(path, f"cannot decode DICOM pixel data ({syntax_name}): {type(err).__name__}: {err}") from None


def _dicom_grey_to_uint8(frame: np.ndarray, ds, photometric: str) -> np.ndarray:
    """Rescale slope/intercept, then the first window if the file has one, else the data's robust range."""
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(frame, ds)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c, w = _first_value(center), _first_value(width)
        out = np.clip((values.astype(np.float32) - (c - w / 2)) / max(w, 1.0), 0.0, 1.0)
        out = (out * 255.0 + 0.5).astype(np.uint8)
    elif values.dtype == np.uint8:
        out = values
    else:
        out = to_uint8(values)
    if photometric == "MONOCHROME1":  # 0 means white in MONOCHROME1
        out = 255 - out
    return out


def _first_value(value) -> float:
    """Window centre/width may list several alternative windows: use the first."""
    try:
        return float(value)
    except TypeError:
        return float(value[0])


# ---------------------------------------------------------------- NIfTI (nibabel)

def _read_nifti(path: Path, stride: int, max_frames: int | None) -> Iterator[tuple[str, np.ndarray]]:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        shape = tuple(int(s) for s in image.shape)
    except Exception as err:  # nibabel raises ImageFileError, EOFError, gzip errors, ...
        raise UnreadableFileError(path, f"not a readable NIfTI file: {type(err).__name__}: {err}") from None
    dims = list(shape)
    while len(dims) > 2 and dims[-1] == 1:
        dims.pop()
    if len(dims) == 2:
        axis_kind = ""
    elif len(dims) == 3:
        axis_kind = "z"  # NIfTI's third axis is spatial: a 3D array is a volume
    elif len(dims) == 4 and dims[2] == 1:  # (X, Y, 1, T): a 2D time series
        dims = [dims[0], dims[1], dims[3]]
        axis_kind = "f"
    else:
        raise UnreadableFileError(path, f"NIfTI shape {shape} not supported: expected 2D, 2D+t (X,Y,1,T) or 3D (X,Y,Z)")
    _check_pixels(path, dims[0], dims[1])
    try:
        data = np.asarray(image.dataobj).reshape(dims)
    except Exception as err:
        raise UnreadableFileError(path, f"truncated or corrupt NIfTI data: {type(err).__name__}: {err}") from None
    if data.dtype.fields is not None:
        raise UnreadableFileError(path, f"NIfTI with structured voxel type {data.dtype} (e.g. RGB24) is not supported")
    data = to_uint8(data)  # one mapping for the whole series keeps frames comparable
    if not axis_kind:
        yield "", data.T  # NIfTI's first axis is x: transpose to rows = y
        return
    width = 4 if axis_kind == "f" else 3
    for i in pick_indices(dims[2], stride, max_frames):
        yield f"{axis_kind}{i:0{width}d}", np.ascontiguousarray(data[:, :, i].T)


# ---------------------------------------------------------------- MetaImage .mhd + .raw (no library needed)

METAIMAGE_TYPES = {"MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_USHORT": "u2", "MET_SHORT": "i2", "MET_UINT": "u4",
                   "MET_INT": "i4", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}
METAIMAGE_HEADER_BYTES = 65536  # a MetaImage header is a few hundred bytes of "Key = value" lines


def read_metaimage_header(path: Path) -> tuple[dict[str, str], int]:
    """The `Key = value` lines of a .mhd header up to ElementDataFile (the format puts it last), and the byte
    offset just after that line (where LOCAL data starts)."""
    with open(path, "rb") as handle:
        head = handle.read(METAIMAGE_HEADER_BYTES)
    header, offset = {}, 0
    for line in head.splitlines(keepends=True):
        offset += len(line)
        try:
            key, sep, value = line.decode("ascii").partition("=")
        except UnicodeDecodeError:
            raise UnreadableFileError(path, "not a MetaImage header (.mhd): not ASCII text") from None
        if sep:
            header[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                return header, offset
    raise UnreadableFileError(path, "not a MetaImage header (.mhd): no ElementDataFile line")


def _read_metaimage(path: Path, stride: int, max_frames: int | None) -> Iterator[tuple[str, np.ndarray]]:
    import zlib

    header, data_offset = read_metaimage_header(path)
    try:
        dims = [int(v) for v in header.get("DimSize", "").split()]
        n_dims = int(header.get("NDims", len(dims)))
        channels = int(header.get("ElementNumberOfChannels", "1"))
    except ValueError:
        raise UnreadableFileError(path, f"MetaImage DimSize/NDims not integers: {header.get('DimSize')!r}") from None
    while len(dims) > 2 and dims[-1] == 1:
        dims.pop()
    if n_dims not in (2, 3) or not 2 <= len(dims) <= 3 or min(dims) < 1 or channels != 1:
        raise UnreadableFileError(path, f"MetaImage of NDims {n_dims}, DimSize {header.get('DimSize')!r}, "
                                        f"{channels} channels not supported: expected one-channel 2D or 3D")
    element = header.get("ElementType", "")
    if element not in METAIMAGE_TYPES:
        raise UnreadableFileError(path, f"MetaImage ElementType {element!r} not supported ({', '.join(METAIMAGE_TYPES)})")
    _check_pixels(path, dims[0], dims[1])
    big_endian = "true" in (header.get("BinaryDataByteOrderMSB", "") + header.get("ElementByteOrderMSB", "")).lower()
    dtype = np.dtype(METAIMAGE_TYPES[element]).newbyteorder(">" if big_endian else "<")
    data_name = header["ElementDataFile"]
    if data_name.upper() == "LIST" or "%" in data_name:
        raise UnreadableFileError(path, f"MetaImage ElementDataFile {data_name!r}: multi-file data not supported")
    data_path = path if data_name.upper() == "LOCAL" else path.parent / data_name
    problem = not_a_regular_file(data_path)
    if problem:
        raise UnreadableFileError(path, f"MetaImage data file {data_path.name}: {problem}")
    with open(data_path, "rb") as handle:
        handle.seek(data_offset if data_path == path else 0)  # LOCAL: the data follows the header
        raw = handle.read()
    if header.get("CompressedData", "").lower() == "true":
        try:
            raw = zlib.decompress(raw)
        except zlib.error as err:
            raise UnreadableFileError(path, f"MetaImage data file {data_path.name}: corrupt compressed data: {err}") from None
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) < expected:
        raise UnreadableFileError(path, f"truncated MetaImage data: {data_path.name} holds {len(raw)} bytes, "
                                        f"DimSize {header['DimSize']} of {element} needs {expected}")
    data = to_uint8(np.frombuffer(raw[:expected], dtype=dtype).reshape(dims[::-1]))  # x varies fastest on disk
    if len(dims) == 2:
        yield "", data
        return
    for i in pick_indices(dims[2], stride, max_frames):  # like a 3D NIfTI: the third axis gives the frames
        yield f"z{i:03d}", np.ascontiguousarray(data[i])


# ---------------------------------------------------------------- video (OpenCV)

def _read_video(path: Path, stride: int, max_frames: int | None) -> Iterator[tuple[str, np.ndarray]]:
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise UnreadableFileError(path, "not a decodable video (OpenCV could not open it)")
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        _check_pixels(path, width, height)
        reported = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        # With a frame count the kept frames spread over the whole clip; without one, the first ones.
        wanted = set(pick_indices(reported, stride, max_frames)) if reported > 0 else None
        limit = len(wanted) if wanted is not None else max_frames
        kept = 0
        index = 0
        while limit is None or kept < limit:
            take = index in wanted if wanted is not None else index % stride == 0
            if not capture.grab():
                break
            if take:
                ok, frame = capture.retrieve()
                if not ok or frame is None:
                    break
                kept += 1
                yield f"f{index:04d}", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) if frame.ndim == 3 else frame
            index += 1
        if kept == 0:
            raise UnreadableFileError(path, "video has no decodable frames (empty or truncated)")
    finally:
        capture.release()
