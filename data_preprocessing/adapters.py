"""Dataset adapters: turn a public dataset's folder layout into a list of source images with subjects.

Each adapter is `adapter(root, options) -> Listing`. It lists the image files (any format
readers.py reads), gives each a subject id (the unit the train/val/test split keeps together) and,
where the layout carries it, an organ class. Masks, segmentations and annotation overlays shipped beside
the images are never listed as images: they go to `Listing.ignored` with the reason.

Layouts known here (from each dataset's documentation):
- busi: BUSI (Al-Dhabyani et al. 2020) `{benign,malignant,normal}/[images/]<class> (n).png`, masks
  `<class> (n)_mask.png` / `_mask_1.png` interleaved. benign/malignant/normal is a finding, NOT an organ
  class: the recipe maps the whole set to one organ class, unless options {"classes": "finding"} (and no
  "class" in the recipe) make the class breast_benign / breast_malignant / breast_normal. BUSI has no patient
  ids, so subject = file stem: two images of one patient may land in different splits (a known limitation).
- hc18: HC18 `training_set/NNN_HC.png`, `NNN_2HC.png`, `NNN_3HC.png` (same subject NNN), annotations
  `NNN_HC_Annotation.png`; `test_set/` has its own numbering, so subject = folder + NNN. Every frame
  carries a black anonymisation box at the bottom right: its sources declare it (overlay_corners), so
  scan-area detection cuts it off; options {"overlay_corners": [...]} overrides the corners.
- camus: CAMUS NIfTI release `database_nifti/patientNNNN/patientNNNN_{2CH,4CH}_{ED,ES,half_sequence}.nii.gz`,
  segmentations `*_gt.nii.gz`; subject = patientNNNN. (The original .mhd/.raw release is not readable here.)
- echonet: EchoNet-Dynamic / EchoNet-Pediatric `Videos/<id>.avi`, one clip per study: subject = file stem.
- folder: generic `root/<class>/**/<file>`: class = first folder name; subject = file stem, or with
  options {"subject": "parent"} the file's own folder (for `<class>/<patient>/<file>` layouts).
- csv: a labels table (path, class, subject columns; optional geometry) such as make_phantoms.py's
  labels.csv; options {"file", "path_col", "class_col", "subject_col", "geometry_col",
  "allow_paths_outside_root"}. Paths are relative to the table; rows leading outside its folder are refused
  unless allow_paths_outside_root is true.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from data_preprocessing.readers import file_suffix, is_supported
from data_preprocessing.scan_area import CORNERS

MASK_FOLDERS = {"mask", "masks", "annotation", "annotations", "segmentation", "segmentations", "gt", "ground_truth", "groundtruth"}
# A file stem ending in one of these words (optionally numbered: "_mask_1") is a label image, not an image.
MASK_STEM = re.compile(r"(?:^|[_\-\s.])(?:mask|masks|annotation|annotations|gt|seg|segmentation)(?:[_\-\s]?\d+)?$", re.IGNORECASE)


class RecipeError(ValueError):
    """A dataset entry whose root, options or label table cannot be used."""


@dataclass(frozen=True)
class Source:
    path: Path
    subject: str
    cls: str | None = None  # organ class when the layout or labels carry one
    geometry: str = ""  # expected scan geometry (fan|rect) when the labels carry it
    overlay_corners: tuple[str, ...] = ()  # corners where the dataset draws a dark overlay box (scan_area.CORNERS)


@dataclass
class Listing:
    sources: list[Source] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)  # (path, why it is not an image)


def stem(path: Path) -> str:
    """File name without its format suffix (".nii.gz" removed whole)."""
    return path.name[: len(path.name) - len(file_suffix(path))]


def label_file_reason(path: Path, root: Path) -> str | None:
    """Why `path` is a mask/annotation/hidden file rather than an image, or None for an image."""
    if path.name.startswith("."):
        return "hidden file (e.g. macOS '._' metadata), not an image"
    rel_parts = path.relative_to(root).parts[:-1] if path.is_relative_to(root) else path.parts[:-1]
    folder = next((p for p in rel_parts if p.lower() in MASK_FOLDERS), None)
    if folder:
        return f"inside a '{folder}' folder: mask/annotation, not an image"
    if MASK_STEM.search(stem(path)):
        return "mask/annotation file (name ends in _mask/_Annotation/_gt/_seg), not an image"
    return None


def walk_images(root: Path) -> Listing:
    """Every readable-format file under root (sorted), label files set aside; the Source fields come later.

    Symlinked folders are followed, but every real folder is walked once, under its own path when it lies inside
    root: a link back up the tree (`ln -s . loop`) would otherwise list the same files again at every depth."""
    if not root.is_dir():
        raise RecipeError(f"dataset root {root} is not a folder")
    listing = Listing()
    inside = {_identity(Path(folder)) for folder, _, _ in os.walk(root)}  # reached without following a link
    claimed = {_identity(root)}
    for folder, dirs, files in os.walk(root, followlinks=True):
        keep = []
        for name in sorted(dirs):
            path = Path(folder) / name
            identity = _identity(path)
            if identity in claimed or (path.is_symlink() and identity in inside):
                listing.ignored.append((path, "link to a folder walked once under another path (a symlink loop or a second link)"))
            else:
                claimed.add(identity)
                keep.append(name)
        dirs[:] = keep
        for name in sorted(files):
            path = Path(folder) / name
            if not is_supported(path):
                continue
            reason = label_file_reason(path, root)
            if reason:
                listing.ignored.append((path, reason))
            else:
                listing.sources.append(Source(path, subject=stem(path)))
    return listing


def _identity(path: Path) -> tuple[int, int]:
    info = os.stat(path)  # follows symlinks: two links to one folder share (device, inode)
    return info.st_dev, info.st_ino


def busi(root: Path, options: dict) -> Listing:
    """Subject = stem (BUSI has no patient ids); the finding is the benign/malignant/normal folder."""
    by_finding = finding_classes("busi", options)

    def place(path: Path) -> Source | str:
        finding = next((p.lower() for p in reversed(path.relative_to(root).parts[:-1]) if p.lower() in FINDINGS), None)
        if by_finding and finding is None:
            return "not inside a benign, malignant or normal folder: BUSI's finding unknown"
        return Source(path, stem(path), finding_class(by_finding, finding))

    return placed(walk_images(root), place)


HC18_NAME = re.compile(r"^(\d+)_\d*HC$", re.IGNORECASE)


def hc18(root: Path, options: dict) -> Listing:
    corners = options.get("overlay_corners", ["bottom_right"])
    if not isinstance(corners, list) or not all(isinstance(c, str) and c in CORNERS for c in corners):
        raise RecipeError(f"hc18 adapter: options.overlay_corners must be a list of {', '.join(CORNERS)}, got {corners!r}")
    listing = walk_images(root)
    sources = []
    for s in listing.sources:
        match = HC18_NAME.match(stem(s.path))
        subject = f"{s.path.parent.name}/{match.group(1)}" if match else stem(s.path)
        sources.append(Source(s.path, subject, overlay_corners=tuple(corners)))
    return Listing(sources, listing.ignored)


def camus(root: Path, options: dict) -> Listing:
    listing = walk_images(root)
    sources = []
    for s in listing.sources:
        patient = next((p for p in reversed(s.path.parts[:-1]) if re.fullmatch(r"patient\d+", p, re.IGNORECASE)), None)
        sources.append(Source(s.path, patient or stem(s.path).split("_")[0]))
    return Listing(sources, listing.ignored)


def echonet(root: Path, options: dict) -> Listing:
    return walk_images(root)  # one clip per study, named by its id: subject = stem


def folder(root: Path, options: dict) -> Listing:
    by = options.get("subject", "stem")
    if by not in ("stem", "parent"):
        raise RecipeError(f"folder adapter: options.subject must be 'stem' or 'parent', got {by!r}")
    listing = walk_images(root)
    sources = []
    for s in listing.sources:
        rel = s.path.relative_to(root).parts
        if len(rel) < 2:
            listing.ignored.append((s.path, "directly in the dataset root: the folder adapter needs root/<class>/file"))
            continue
        subject = str(Path(*rel[:-1])) if by == "parent" else stem(s.path)
        sources.append(Source(s.path, subject, cls=rel[0]))
    return Listing(sources, listing.ignored)


def csv_labels(root: Path, options: dict) -> Listing:
    """Rows whose path leads outside the table's folder (absolute, or up through ..) are refused unless
    options.allow_paths_outside_root is true: a table from elsewhere must not make prepare read arbitrary files."""
    for key in ("file", "path_col", "class_col", "subject_col", "geometry_col"):
        if not isinstance(options.get(key, ""), str):
            raise RecipeError(f"csv adapter: options.{key} must be a string, got {options[key]!r}")
    allow_outside = options.get("allow_paths_outside_root", False)
    if not isinstance(allow_outside, bool):
        raise RecipeError(f"csv adapter: options.allow_paths_outside_root must be true or false, got {allow_outside!r}")
    table = root if root.is_file() else root / options.get("file", "labels.csv")
    if not table.is_file():
        raise RecipeError(f"csv adapter: label table {table} does not exist")
    cols = {k: options.get(f"{k}_col", k) for k in ("path", "class", "subject", "geometry")}
    folder = table.parent.absolute()
    try:
        with open(table, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = [(reader.line_num, row) for row in reader]
            header = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as err:
        raise RecipeError(f"csv adapter: {table} is not a readable CSV text table: {err}") from None
    if cols["path"] not in header:
        raise RecipeError(f"csv adapter: {table} has no {cols['path']!r} column (columns: {', '.join(header)})")
    listing = Listing()
    for line, row in rows:
        where = f"line {line} of {table}"
        written = (row.get(cols["path"]) or "").strip()
        path = Path(os.path.normpath(folder / written))  # ".." resolved as written, symlinks not followed
        if not written:
            listing.ignored.append((path, f"{where}: empty {cols['path']!r} cell"))
            continue
        if not allow_outside and not path.is_relative_to(folder):
            listing.ignored.append((path, f"{where}: path {written!r} leads outside the table's folder {folder}; "
                                          "refused (set options.allow_paths_outside_root to true to allow)"))
            continue
        reason = label_file_reason(path, folder)
        if reason:
            listing.ignored.append((path, reason))
            continue
        cls = (row.get(cols["class"]) or "").strip() or None
        subject = (row.get(cols["subject"]) or "").strip() or stem(path)
        listing.sources.append(Source(path, subject, cls, (row.get(cols["geometry"]) or "").strip()))
    return listing


# ---------------------------------------------------------------- the public datasets' published layouts

FINDINGS = ("benign", "malignant", "normal")


def placed(listing: Listing, place: Callable[[Path], Source | str]) -> Listing:
    """Each walked image through `place`: its Source, or the reason the layout cannot place it (set aside)."""
    result = Listing(ignored=list(listing.ignored))
    for source in listing.sources:
        where = place(source.path)
        if isinstance(where, str):
            result.ignored.append((source.path, where))
        else:
            result.sources.append(where)
    return result


def finding_classes(adapter: str, options: dict) -> bool:
    """True for options {"classes": "finding"} (breast_benign, ...), False for the organ-level default."""
    classes = options.get("classes", "organ")
    if classes not in ("organ", "finding"):
        raise RecipeError(f"{adapter} adapter: options.classes must be 'organ' or 'finding', got {classes!r}")
    return classes == "finding"


def finding_class(by_finding: bool, finding: str | None) -> str | None:
    return f"breast_{finding}" if by_finding and finding else None


ADAPTERS: dict[str, Callable[[Path, dict], Listing]] = {
    "busi": busi,
    "hc18": hc18,
    "camus": camus,
    "echonet": echonet,
    "folder": folder,
    "csv": csv_labels,
}
