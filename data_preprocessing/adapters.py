"""Dataset adapters: turn a public dataset's folder layout into a list of source images with subjects.

Each adapter is `adapter(root, options) -> Listing`. It lists the image files (any format
readers.py reads), gives each a subject id (the unit the train/val/test split keeps together) and,
where the layout carries it, an organ class. Masks, segmentations and annotation overlays shipped beside
the images are never listed as images: they go to `Listing.ignored` with the reason.

Layouts known here (from each dataset's documentation):
- busi: BUSI (Al-Dhabyani et al. 2020) `{benign,malignant,normal}/[images/]<class> (n).png`, masks
  `<class> (n)_mask.png` / `_mask_1.png` interleaved. benign/malignant/normal is a finding, NOT an organ
  class: the recipe maps the whole set to one organ class (or options {"classes": "finding"}, below). BUSI has
  no patient ids, so subject = file stem: two images of one patient may land in different splits (a known
  limitation of this dataset; prepare.py's near-duplicate removal drops its repeated scans).
- hc18: HC18 `training_set/NNN_HC.png`, `NNN_2HC.png`, `NNN_3HC.png` (same subject NNN), annotations
  `NNN_HC_Annotation.png`; `test_set/` has its own numbering, so subject = folder + NNN. Every frame
  carries a black anonymisation box at the bottom right: its sources declare it (overlay_corners), so
  scan-area detection cuts it off; options {"overlay_corners": [...]} overrides the corners.
- camus: CAMUS NIfTI release `database_nifti/patientNNNN/patientNNNN_{2CH,4CH}_{ED,ES,half_sequence}.nii.gz`,
  segmentations `*_gt.nii.gz`, or the 2019 release `training/patientNNNN/patientNNNN_2CH_ED.mhd` (+ .raw);
  subject = patientNNNN (the innermost patientNNNN folder, else the file name's patientNNNN_ prefix; a file
  with neither is set aside).
- echonet: EchoNet-Dynamic / EchoNet-Pediatric `Videos/<id>.avi`, one clip per study: subject = file stem.
- folder: generic `root/<class>/**/<file>`: class = first folder name; subject = file stem, or with
  options {"subject": "parent"} the file's own folder (for `<class>/<patient>/<file>` layouts).
- csv: a labels table (path, class, subject columns; optional geometry) such as make_phantoms.py's
  labels.csv; options {"file", "path_col", "class_col", "subject_col", "geometry_col",
  "allow_paths_outside_root"}. Paths are relative to the table; rows leading outside its folder are refused
  unless allow_paths_outside_root is true.

The public datasets of the six-organ recipe (bus_bra ... mmotu, below the generic adapters) each follow their
published download: subject and, for the breast sets, the finding (benign / malignant / normal) come from the
dataset's own label files or naming, and a file the layout cannot place (no patient, no label row) is set aside
with the reason. Breast adapters give organ-level classes (the recipe's "class") unless options
{"classes": "finding"}, which makes the class breast_benign / breast_malignant / breast_normal. Every adapter
declares the option keys it accepts (ADAPTER_OPTIONS); check_options refuses any other key.
"""
from __future__ import annotations

import csv
import io
import os
import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from common.io import SideFileError, read_side_bytes, read_side_text
from data_preprocessing.readers import file_suffix, is_supported, not_a_regular_file
from common.scan_area import CORNERS

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
            if not is_supported(path):  # still a manifest row: every file the step saw is accounted for
                listing.ignored.append((path, not_a_regular_file(path)
                                        or f"not an image format read here ({file_suffix(path) or 'no suffix'})"))
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


CAMUS_PATIENT = re.compile(r"patient\d+", re.IGNORECASE)


def camus(root: Path, options: dict) -> Listing:
    def place(path: Path) -> Source | str:
        patient = next((p for p in reversed(path.parts[:-1]) if CAMUS_PATIENT.fullmatch(p)), None)
        patient = patient or (CAMUS_PATIENT.match(stem(path)) or [None])[0]
        if not patient:
            return "neither in a patientNNNN folder nor named patientNNNN_...: CAMUS patient unknown"
        return Source(path, patient)

    return placed(walk_images(root), place)


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
        reader = csv.DictReader(io.StringIO(read_side_text(table), newline=""))
        rows = [(reader.line_num, row) for row in reader]
        header = reader.fieldnames or []
    except SideFileError as err:
        raise RecipeError(f"csv adapter: {err}") from None
    except csv.Error as err:
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


def label_file(root: Path, pattern: str, adapter: str) -> Path:
    """The one file under root matching `pattern` (the dataset's label table); an error naming it otherwise."""
    found = sorted(p for p in root.rglob(pattern) if p.is_file() and not p.name.startswith("."))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} files named"
        raise RecipeError(f"{adapter} adapter: {what} {pattern} under {root}: the dataset's label file is needed "
                          "to place its images (download it with the images)")
    return found[0]


def read_table(path: Path, adapter: str, columns: tuple[str, ...], delimiter: str = ",") -> list[dict]:
    """Rows of a label CSV (a UTF-8 byte-order mark and CRLF line ends allowed), with the columns checked."""
    try:
        reader = csv.DictReader(io.StringIO(read_side_text(path), newline=""), delimiter=delimiter)
        rows = list(reader)
        header = reader.fieldnames or []
    except SideFileError as err:
        raise RecipeError(f"{adapter} adapter: {err}") from None
    except csv.Error as err:
        raise RecipeError(f"{adapter} adapter: {path} is not a readable CSV text table: {err}") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise RecipeError(f"{adapter} adapter: {path} lacks the column(s) {', '.join(missing)} (columns: {', '.join(header)})")
    return [{k: (v or "").strip() for k, v in row.items() if k} for row in rows]


def bus_bra(root: Path, options: dict) -> Listing:
    """BUS-BRA `BUSBRA/Images/bus_NNNN-{l,r,s}.png` + `bus_data.csv`: subject = Case, finding = Pathology."""
    by_finding = finding_classes("bus_bra", options)
    table = label_file(root, "bus_data.csv", "bus_bra")
    rows = {row["ID"]: row for row in read_table(table, "bus_bra", ("ID", "Case", "Pathology"))}

    def place(path: Path) -> Source | str:
        row = rows.get(stem(path))
        if row is None or not row["Case"]:
            return f"no row with a Case for {stem(path)!r} in {table}: BUS-BRA patient unknown"
        if by_finding and row["Pathology"].lower() not in FINDINGS:
            return f"Pathology {row['Pathology']!r} in {table} is not benign or malignant"
        return Source(path, f"case{row['Case']}", finding_class(by_finding, row["Pathology"].lower()))

    return placed(walk_images(root), place)


BREAST_CASE = re.compile(r"^case(\d+)$")
BREAST_MASK = re.compile(r"^case\d+_(?:tumor|other\d*)$")


def breast_lesions_usg(root: Path, options: dict) -> Listing:
    """BrEaST (TCIA Breast-Lesions-USG) `caseNNN.png`, masks `caseNNN_tumor.png` / `_otherK.png`: one image per
    patient, subject = caseNNN; the finding is the clinical xlsx's Classification column (read only when asked)."""
    by_finding = finding_classes("breast_lesions_usg", options)
    classification = _breast_classification(root) if by_finding else {}

    def place(path: Path) -> Source | str:
        if BREAST_MASK.match(stem(path)):
            return "BrEaST lesion mask (caseNNN_tumor / caseNNN_otherK), not an image"
        if not BREAST_CASE.match(stem(path)):
            return "not named caseNNN: BrEaST patient unknown"
        if by_finding and classification.get(path.name) not in FINDINGS:
            return f"no benign/malignant/normal Classification for {path.name} in the clinical xlsx"
        return Source(path, stem(path), finding_class(by_finding, classification.get(path.name)))

    return placed(walk_images(root), place)


def _breast_classification(root: Path) -> dict[str, str]:
    """Image_filename -> Classification from the first sheet of BrEaST's clinical-data xlsx."""
    import openpyxl  # only needed for finding-level classes

    table = label_file(root, "BrEaST-Lesions-USG-clinical-data*.xlsx", "breast_lesions_usg")
    try:
        book = openpyxl.load_workbook(io.BytesIO(read_side_bytes(table)), read_only=True, data_only=True)
        rows = list(book.worksheets[0].iter_rows(values_only=True))
        book.close()
    except Exception as err:  # openpyxl raises zip, XML and key errors for damaged files
        raise RecipeError(f"breast_lesions_usg adapter: {table} is not a readable xlsx file: {type(err).__name__}: {err}") from None
    header = [str(c).strip() if c is not None else "" for c in (rows[0] if rows else ())]
    if "Image_filename" not in header or "Classification" not in header:
        raise RecipeError(f"breast_lesions_usg adapter: {table}'s first sheet lacks the Image_filename or "
                          f"Classification column (columns: {', '.join(header)})")
    name, finding = header.index("Image_filename"), header.index("Classification")
    return {str(r[name]).strip(): str(r[finding]).strip().lower() for r in rows[1:] if r[name] is not None}


UCLM_NAME = re.compile(r"^([A-Za-z]{4})_\d+$")


def bus_uclm(root: Path, options: dict) -> Listing:
    """BUS-UCLM `BUS-UCLM/images/<PAT>_<NNN>.png` + `INFO.csv` (semicolons, BOM): subject = the 4-letter patient
    prefix, finding = Label; an image without an INFO.csv row is set aside."""
    by_finding = finding_classes("bus_uclm", options)
    table = label_file(root, "INFO.csv", "bus_uclm")
    labels = {row["Image"]: row["Label"].lower() for row in read_table(table, "bus_uclm", ("Image", "Label"), delimiter=";")}

    def place(path: Path) -> Source | str:
        match = UCLM_NAME.match(stem(path))
        if not match:
            return "not named <PAT>_<NNN>: BUS-UCLM patient unknown"
        if path.name not in labels:
            return f"no row for {path.name} in {table}"
        if by_finding and labels[path.name] not in FINDINGS:
            return f"Label {labels[path.name]!r} in {table} is not Normal, Benign or Malignant"
        return Source(path, match.group(1).upper(), finding_class(by_finding, labels[path.name]))

    return placed(walk_images(root), place)


def bus_uc(root: Path, options: dict) -> Listing:
    """BUS_UC `{Benign,Malignant}/images/N.png` (masks/ set aside): no patient ids, subject = finding/N."""
    by_finding = finding_classes("bus_uc", options)

    def place(path: Path) -> Source | str:
        finding = next((p.lower() for p in reversed(path.relative_to(root).parts[:-1]) if p.lower() in FINDINGS), None)
        if finding is None:
            return "not inside a Benign or Malignant folder: BUS_UC's finding unknown"
        return Source(path, f"{finding}/{stem(path)}", finding_class(by_finding, finding))

    return placed(walk_images(root), place)


BUID_NAME = re.compile(r"^(\d+)\s+(benign|malignant)\s+(image|mask|lesion)$", re.IGNORECASE)


def buid(root: Path, options: dict) -> Listing:
    """BUID `{Benign,Malignant}/NNN <Finding> Image.bmp` beside `NNN <Finding> Mask.tif` (and `... Lesion`):
    subject = the case number within its finding."""
    by_finding = finding_classes("buid", options)

    def place(path: Path) -> Source | str:
        match = BUID_NAME.match(stem(path))
        if not match:
            return "not named 'NNN Benign|Malignant Image': BUID case unknown"
        if match.group(3).lower() != "image":
            return f"BUID {match.group(3).lower()} file, not the B-mode image"
        finding = match.group(2).lower()
        return Source(path, f"{finding}_{int(match.group(1))}", finding_class(by_finding, finding))

    return placed(walk_images(root), place)


def mask_folder(path: Path, root: Path) -> str | None:
    """The folder below root whose name says it holds masks (TN3K's trainval-mask, CCAUI's "Expert mask images",
    kidneyUS's reviewed_masks_1), for the adapters whose layout has one; None when there is none."""
    return next((p for p in path.relative_to(root).parts[:-1] if "mask" in p.lower()), None)


def _numbered_in_folder(root: Path, adapter: str, folders: tuple[str, ...], with_folder: bool) -> Listing:
    """Images named by a number alone in one of `folders` (TN3K, TG3K): subject = the number, prefixed with the
    folder when the folders number their images separately."""
    def place(path: Path) -> Source | str:
        if mask_folder(path, root):
            return f"inside {adapter}'s mask folder {mask_folder(path, root)!r}: a mask, not an image"
        if path.parent.name.lower() not in folders or not stem(path).isdigit():
            return f"not {' or '.join(folders)}/<number>: outside {adapter}'s published layout"
        return Source(path, f"{path.parent.name}/{stem(path)}" if with_folder else stem(path))

    return placed(walk_images(root), place)


def tn3k(root: Path, options: dict) -> Listing:
    """TN3K `tn3k/{trainval,test}-image/NNNN.jpg` (the -mask folders set aside): no patient ids; the two folders
    number their images separately, so subject = folder/NNNN."""
    return _numbered_in_folder(root, "tn3k", ("trainval-image", "test-image"), with_folder=True)


def tg3k(root: Path, options: dict) -> Listing:
    """TG3K `tg3k/thyroid-image/NNNN.jpg`: frames of thyroid videos published without a video id, subject = NNNN
    (near-duplicate removal is the only guard against neighbouring frames in two splits)."""
    return _numbered_in_folder(root, "tg3k", ("thyroid-image",), with_folder=False)


DDTI_NAME = re.compile(r"^(\d+)_(\d+)$")


def ddti(root: Path, options: dict) -> Listing:
    """DDTI `N_M.jpg` (image M of case N) beside the case's `N.xml`: subject = the XML's <number>; an image whose
    case XML is missing, unreadable or numbered otherwise is set aside."""
    cases: dict[Path, str | None] = {}

    def case_number(xml: Path) -> str | None:
        if xml not in cases:
            try:
                number = ElementTree.fromstring(read_side_bytes(xml)).findtext("number")
            except (SideFileError, ElementTree.ParseError):
                number = None
            cases[xml] = number.strip() if number else None
        return cases[xml]

    def place(path: Path) -> Source | str:
        match = DDTI_NAME.match(stem(path))
        if not match:
            return "not named N_M (case_image): DDTI case unknown"
        xml = path.parent / f"{match.group(1)}.xml"
        if not xml.is_file():
            return f"no case file {xml.name} beside it: DDTI case unknown"
        if case_number(xml) != match.group(1):
            return f"{xml.name} is unreadable or has no <number>{match.group(1)}</number>: DDTI case unknown"
        return Source(path, f"case{match.group(1)}")

    return placed(walk_images(root), place)


KIDNEY_NAME = re.compile(r"^(\d+)_IM-\d+-\d+(?:-\d+)?_anon$")


def kidneyus(root: Path, options: dict) -> Listing:
    """Open Kidney Ultrasound `<N>_IM-XXXX-YYYY[-ZZZZ]_anon.png`: subject = the leading N (a patient; a few N hold
    two images); the label masks in labels/reviewed_masks_*/ are set aside."""
    def place(path: Path) -> Source | str:
        if mask_folder(path, root):
            return f"inside kidneyUS's mask folder {mask_folder(path, root)!r}: a mask, not an image"
        match = KIDNEY_NAME.match(stem(path))
        if not match:
            return "not named <N>_IM-XXXX-YYYY_anon: kidneyUS patient unknown"
        return Source(path, match.group(1))

    return placed(walk_images(root), place)


AUL_FINDINGS = ("normal", "benign", "malignant")


def aul(root: Path, options: dict) -> Listing:
    """AUL `{Normal,Benign,Malignant}/image/N.jpg` (polygons in segmentation/*.json): one image per patient."""
    def place(path: Path) -> Source | str:
        parts = [p.lower() for p in path.relative_to(root).parts[:-1]]
        if len(parts) < 2 or parts[-1] != "image" or parts[-2] not in AUL_FINDINGS:
            return "not <Normal|Benign|Malignant>/image/<file>: outside AUL's published layout"
        return Source(path, f"{parts[-2]}/{stem(path)}")

    return placed(walk_images(root), place)


def abdomenus(root: Path, options: dict) -> Listing:
    """AbdomenUS (Kaggle ussimandsegm) `abdominal_US/{RUS,AUS}/images/{train,test}/*.png`: RUS holds real scans,
    AUS images simulated from CT, used only with options {"simulated": true}; no patient ids, subject =
    RUS|AUS/split/stem."""
    simulated = options.get("simulated", False)
    if not isinstance(simulated, bool):
        raise RecipeError(f"abdomenus adapter: options.simulated must be true or false, got {simulated!r}")
    kinds = ("rus", "aus") if simulated else ("rus",)

    def place(path: Path) -> Source | str:
        parts = path.relative_to(root).parts
        kind = next((i for i, p in enumerate(parts[:-1]) if p.lower() in ("rus", "aus")), None)
        if kind is None or parts[kind + 1: kind + 2] != ("images",):
            return "not <RUS|AUS>/images/...: outside AbdomenUS's published layout"
        if parts[kind].lower() not in kinds:
            return "simulated (AUS) image: used only with options.simulated = true"
        return Source(path, "/".join((*parts[kind: kind + 1], *parts[kind + 2: -1], stem(path))))

    return placed(walk_images(root), place)


CCAUI_NAME = re.compile(r"^(\d+VAS)_slice_\d+$", re.IGNORECASE)


def ccaui(root: Path, options: dict) -> Listing:
    """CCAUI `US images/<ACQ>VAS_slice_<k>.png` (frames of one recording): subject = the recording <ACQ>VAS."""
    def place(path: Path) -> Source | str:
        if mask_folder(path, root):
            return f"inside CCAUI's mask folder {mask_folder(path, root)!r}: a mask, not an image"
        match = CCAUI_NAME.match(stem(path))
        return Source(path, match.group(1).upper()) if match else "not named <ACQ>VAS_slice_<k>: CCAUI recording unknown"

    return placed(walk_images(root), place)


def mmotu(root: Path, options: dict) -> Listing:
    """MMOTU `OTU_2d/images/N.JPG` (annotations/ set aside): no patient ids, subject = N; the OTU_CEUS subset is
    contrast-enhanced, not B-mode, and is set aside."""
    def place(path: Path) -> Source | str:
        parts = [p.lower() for p in path.relative_to(root).parts[:-1]]
        if "otu_ceus" in parts:
            return "OTU_CEUS: contrast-enhanced ultrasound, not B-mode"
        if parts[-2:] != ["otu_2d", "images"]:
            return "not OTU_2d/images/<file>: outside MMOTU's published layout"
        return Source(path, stem(path))

    return placed(walk_images(root), place)


ADAPTERS: dict[str, Callable[[Path, dict], Listing]] = {
    "busi": busi,
    "hc18": hc18,
    "camus": camus,
    "echonet": echonet,
    "folder": folder,
    "csv": csv_labels,
    "bus_bra": bus_bra,
    "breast_lesions_usg": breast_lesions_usg,
    "bus_uclm": bus_uclm,
    "bus_uc": bus_uc,
    "buid": buid,
    "tn3k": tn3k,
    "tg3k": tg3k,
    "ddti": ddti,
    "kidneyus": kidneyus,
    "aul": aul,
    "abdomenus": abdomenus,
    "ccaui": ccaui,
    "mmotu": mmotu,
}
# The option keys each adapter reads; any other key in a recipe is a typo and refused (check_options).
ADAPTER_OPTIONS: dict[str, tuple[str, ...]] = {
    "busi": ("classes",), "hc18": ("overlay_corners",), "camus": (), "echonet": (), "folder": ("subject",),
    "csv": ("file", "path_col", "class_col", "subject_col", "geometry_col", "allow_paths_outside_root"),
    "bus_bra": ("classes",), "breast_lesions_usg": ("classes",), "bus_uclm": ("classes",), "bus_uc": ("classes",),
    "buid": ("classes",), "tn3k": (), "tg3k": (), "ddti": (), "kidneyus": (), "aul": (), "abdomenus": ("simulated",),
    "ccaui": (), "mmotu": (),
}
# Where each public dataset is published: named when a recipe's root for it is missing.
WHERE_TO_GET = {
    "busi": "Al-Dhabyani et al. 2020, Data in Brief, doi:10.1016/j.dib.2019.104863",
    "hc18": "Zenodo, doi:10.5281/zenodo.1327317",
    "camus": "humanheart-project.creatis.insa-lyon.fr (CAMUS_public, registration)",
    "echonet": "echonet.github.io (Stanford AIMI, registration)",
    "bus_bra": "Zenodo, doi:10.5281/zenodo.7730709",
    "breast_lesions_usg": "TCIA collection Breast-Lesions-USG, doi:10.7937/9WKK-Q141",
    "bus_uclm": "Mendeley Data, doi:10.17632/7fvgj4jsp7",
    "bus_uc": "Mendeley Data, dataset 3ksd7w7jkx",
    "buid": "qamebi.com, Breast Ultrasound Images Database",
    "tn3k": "github.com/haifangong/TRFE-Net-for-thyroid-nodule-segmentation",
    "tg3k": "github.com/haifangong/TRFE-Net-for-thyroid-nodule-segmentation",
    "ddti": "cimalab.unal.edu.co, Digital Database Thyroid Image (Pedraza et al. 2015)",
    "kidneyus": "github.com/rsingla92/kidneyUS (registration form)",
    "aul": "Zenodo, doi:10.5281/zenodo.7272660",
    "abdomenus": "Kaggle dataset ignaciorlando/ussimandsegm",
    "ccaui": "Mendeley Data, doi:10.17632/d4xt63mgjm.1",
    "mmotu": "github.com/cv516Buaa/MMOTU_DS2Net",
}


def check_options(adapter: str, options: dict) -> None:
    """Refuse option keys the adapter does not read: a typo such as "subjet" must not be ignored silently."""
    unknown = sorted(set(options) - set(ADAPTER_OPTIONS[adapter]))
    if unknown:
        accepted = ", ".join(ADAPTER_OPTIONS[adapter]) or "no options"
        raise RecipeError(f"unknown option {', '.join(map(repr, unknown))} for the {adapter} adapter (it accepts {accepted})")
