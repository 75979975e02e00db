"""The processed image set (DATA/{split}/<class>/*.png) as a torch Dataset, and the epoch sampler training uses.

Images load as float tensors in [-1, 1], shape (3, S, S), resized (anti-aliased) to the model's side S.
The sampler draws a seeded index list per epoch (class-balanced by default) and gives each torchrun
process its own slice of every global batch, so N processes see exactly the batches one process would.
Subjects (prepare.py's manifest.csv) split a set into two halves that share no subject, for reference metrics.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from common.io import SideFileError, not_a_regular_file, read_csv_rows
from common.progress import progress
from common.scan_area import ScanAreaError, detect_scan_area

SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = ".png"
MAX_PIXELS = 64_000_000  # a processed image beyond this (prepare.py writes 256 x 256) is refused before decoding


class ImageDataError(RuntimeError):
    """A processed set that is missing, empty, or holds an unreadable image."""


def list_classes(data_dir: str | Path) -> list[str]:
    """Class names = the sorted folder names under DATA/train; the label of a class is its index here."""
    train_dir = Path(data_dir) / "train"
    if not train_dir.is_dir():
        raise ImageDataError(f"{train_dir}: no such folder; expected a processed set DATA/{{train,val,test}}/<class>/*.png")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ImageDataError(f"{train_dir}: holds no class folders")
    return classes


def list_split(data_dir: str | Path, split: str, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    """Sorted PNG paths of one split and their labels (index into `classes`)."""
    split_dir = Path(data_dir) / split
    if not split_dir.is_dir():
        raise ImageDataError(f"{split_dir}: no such folder (the processed set needs train, val and test)")
    unknown = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in classes and not p.name.startswith("."))
    if unknown:
        raise ImageDataError(f"{split_dir}: class folders {unknown} are not among the training classes {classes}")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted((split_dir / name).glob(f"*{IMAGE_SUFFIX}"))
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise ImageDataError(f"{split_dir}: holds no {IMAGE_SUFFIX} images")
    return paths, np.asarray(labels, dtype=np.int64)


def read_rgb(path: str | Path) -> Image.Image:
    """A processed image decoded as RGB: a FIFO, a folder or a device is refused without being opened, and an image
    whose header declares more than MAX_PIXELS (a decompression bomb) before it is decoded."""
    problem = not_a_regular_file(path)
    if problem:
        raise ImageDataError(f"{path}: cannot read the image: {problem}")
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageDataError(f"{path}: {img.width}x{img.height} pixels, more than a processed image has "
                                     f"({MAX_PIXELS}); not decoded")
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDataError(f"{path}: cannot read the image: {err}") from None


def read_image(path: str | Path, image_size: int) -> np.ndarray:
    """A square PNG as uint8 (S, S, 3) RGB, resized to `image_size` when it has another side."""
    img = read_rgb(path)
    if img.width != img.height:
        raise ImageDataError(f"{path}: expected a square image, got {img.width}x{img.height}")
    if img.width != image_size:
        img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return np.array(img)


# The token copies' augmentation (tokenize_multiscale_maps.py) and its defaults; eval_var.py plants copies made
# the same way to check that its copy rule catches them.
AUG_MIN_AREA = 0.8
AUG_MAX_SHIFT = 0.04
AUG_HFLIP_CLASSES = ("breast", "fetal_head", "thyroid")


def augment(image: np.ndarray, rng: np.random.Generator, min_area: float, max_shift: float,
            hflip: bool) -> np.ndarray:
    """One augmented copy of a uint8 (S, S, 3) image: a square crop of min_area..1 of the area, its window shifted by
    up to max_shift * S beyond the edges (PIL's crop fills outside the image with black), resized back to S x S
    as read_image resizes, then mirrored left-right with probability 1/2 when hflip."""
    size = image.shape[0]
    side = size * np.sqrt(rng.uniform(min_area, 1.0))
    reach = max_shift * size
    x0, y0 = rng.uniform(-reach, size - side + reach, 2)
    crop = Image.fromarray(image).crop((round(x0), round(y0), round(x0 + side), round(y0 + side)))
    out = np.array(crop.resize((size, size), Image.Resampling.LANCZOS))
    if hflip and rng.random() < 0.5:
        out = out[:, ::-1].copy()
    return out


def worker_error_line(err: BaseException) -> str:
    """An error raised in a DataLoader worker as one line: torch re-raises it with the worker's whole traceback in its
    message, whose last line is the error itself."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    for name in (f"{type(err).__module__}.{type(err).__qualname__}", type(err).__name__):
        last = last.removeprefix(f"{name}: ")
    where = text.split("\n", 1)[0].removeprefix(f"Caught {type(err).__name__} ").rstrip(".")
    return f"{last} ({where})"


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (S, S, 3) -> float (3, S, S) in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_rgb_uint8(img: torch.Tensor) -> np.ndarray:
    """float (B, 3, S, S) in [-1, 1] -> uint8 (B, S, S, 3): the inverse of to_tensor."""
    return ((img.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def to_grey_uint8(img: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W) uint8 grey, the scale PSNR/SSIM are measured on."""
    return ((img.float().clamp(-1, 1).mean(1) + 1) * 127.5).round().byte().cpu().numpy()


def scan_area_mask(path: str | Path, image_size: int) -> np.ndarray | None:
    """The scan area of a processed image as a bool (S, S) mask at the model's side, or None where none is found.

    Processed images store no mask, but prepare.py blacked out everything outside the scan area, so the detector
    that drew it finds it again in the stored image (fan or rectangle, measured at the stored resolution, then
    area-resized). A grey threshold would not do: dark cysts, fluid and shadows reaching the edge are inside."""
    stored = np.asarray(read_rgb(path))
    try:
        mask = detect_scan_area(stored).mask
    except ScanAreaError:
        return None
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(resized) >= 128


class ImageSplit(Dataset):
    """One split of the processed set; items are (image (3, S, S) in [-1, 1], label)."""

    def __init__(self, data_dir: str | Path, split: str, image_size: int, classes: list[str] | None = None,
                 preload: bool = False) -> None:
        self.data_dir = Path(data_dir)
        self.split = split
        self.image_size = image_size
        self.classes = classes if classes is not None else list_classes(data_dir)
        self.paths, self.labels = list_split(data_dir, split, self.classes)
        self.images: list[np.ndarray] | None = None
        if preload:
            self.images = [read_image(p, image_size)
                           for p in progress(self.paths, desc=f"loading {split}", leave=False)]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i] if self.images is not None else read_image(self.paths[i], self.image_size)
        return to_tensor(image), int(self.labels[i])

    def relative_path(self, i: int) -> str:
        return self.paths[i].relative_to(self.data_dir).as_posix()

    def class_counts(self, indices: np.ndarray | None = None) -> dict[str, int]:
        labels = self.labels if indices is None else self.labels[indices]
        counts = np.bincount(labels, minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, counts)}


def epoch_index_list(labels: np.ndarray, length: int, seed: int, epoch: int, balanced: bool) -> np.ndarray:
    """The `length` dataset indices of one epoch, a pure function of (seed, epoch).

    balanced: every class is drawn (almost) equally often, cycling through a fresh permutation of its
    images, so small classes repeat and large ones are subsampled; otherwise a plain permutation.
    """
    rng = np.random.default_rng([seed, epoch])
    if not balanced:
        return rng.permutation(len(labels))[:length]
    present = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    per_class = -(-length // len(present))
    picks = []
    for members in present:
        cycles = -(-per_class // len(members))
        picks.append(np.concatenate([rng.permutation(members) for _ in range(cycles)])[:per_class])
    return rng.permutation(np.concatenate(picks))[:length]


class EpochSampler(Sampler[int]):
    """Seeded per-epoch index list cut into global batches; process `rank` takes its slice of each batch.

    Global batch b is list[b*G:(b+1)*G] with G = batch_size * world_size, and rank r gets
    list[b*G + r*batch_size : b*G + (r+1)*batch_size]: concatenating the ranks' batches in rank order
    gives the batch a single process would see. Every epoch has the same number of full batches.
    """

    def __init__(self, labels: np.ndarray, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 balanced: bool = True, num_samples: int | None = None) -> None:
        self.labels = np.asarray(labels)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.seed, self.balanced = seed, balanced
        global_batch = batch_size * world_size
        wanted = len(self.labels) if num_samples is None else num_samples
        self.num_batches = wanted // global_batch
        if self.num_batches == 0:
            raise ImageDataError(
                f"{len(self.labels)} training images cannot fill one global batch of {global_batch}: lower batch_size")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_indices(self, epoch: int) -> np.ndarray:
        return epoch_index_list(self.labels, self.num_batches * self.batch_size * self.world_size, self.seed, epoch,
                                self.balanced)

    def __iter__(self) -> Iterator[int]:
        batches = self.global_indices(self.epoch).reshape(self.num_batches, self.world_size, self.batch_size)
        return iter(batches[:, self.rank].reshape(-1).tolist())

    def __len__(self) -> int:
        return self.num_batches * self.batch_size


def manifest_subjects(data_dir: Path) -> dict[str, str]:
    """{output path (split/class/file.png): '<dataset>/<subject>'} of every image prepare.py's manifest.csv kept
    (skipped rows have no output); {} for a set without a manifest."""
    manifest = data_dir / "manifest.csv"
    if not manifest.exists():
        return {}
    try:
        columns, rows = read_csv_rows(manifest)
    except SideFileError as err:
        raise ImageDataError(str(err)) from None
    missing = {"output", "subject", "dataset"} - set(columns)
    if missing:
        raise ImageDataError(f"{manifest}: lacks the column(s) {', '.join(sorted(missing))}: not prepare.py's manifest")
    return {r["output"]: f"{r['dataset']}/{r['subject']}" for r in rows if r["output"] and r["subject"]}


def subject_ids(data_dir: Path, sources: np.ndarray | list[str]) -> np.ndarray:
    """The subject of each processed image (its `output` path), from prepare.py's manifest.csv: '<dataset>/<subject>'.
    An image the manifest does not list (or a set without a manifest) is its own subject."""
    known = manifest_subjects(data_dir)
    return np.array([known.get(str(s), f"image:{s}") for s in sources])


def halves(labels: np.ndarray, subjects: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of each class (masks over labels) that share no subject: the class's subjects in a seeded order,
    each to the half with fewer images so far. A class of one subject has an empty second half."""
    first = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        in_class = labels == label
        names = np.unique(subjects[in_class])
        sizes = [0, 0]
        for name in names[np.random.default_rng([seed, int(label)]).permutation(len(names))]:
            members = in_class & (subjects == name)
            half = int(sizes[1] < sizes[0])
            first[members] = half == 0
            sizes[half] += int(members.sum())
    return first, ~first
