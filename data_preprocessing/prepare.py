"""Build the processed training set from raw ultrasound datasets.

A recipe (JSON) maps datasets to organ classes. For every source file: read its frames (readers.py), find
the scan area (common/scan_area.py), blank what lies outside it, crop, square and resize to 256x256 grey-as-RGB,
and write OUT/{train,val,test}/<class>/<dataset>__<stem>[_<frame>].png. Splits are made once every file is
read: every subject in one split, stratified by class, weighted by the images each subject gave, seeded.
OUT/manifest.csv has one row per source file (per frame for multi-frame sources): kept or skipped, and why.
Re-running reuses every output whose source is unchanged (same sha256), so only new or changed files are
processed; sources are only ever read.

    python data_preprocessing/prepare.py                          # phantoms in data/raw_phantoms
    python data_preprocessing/prepare.py --recipe=my_recipe.json --out=data/processed

Recipe: {"datasets": [{"name": "busi", "adapter": "busi", "root": "../shared/us_data/BUSI",
"class": "breast", "options": {}}, ...]}; relative roots are relative to the recipe file's folder,
"class" may be left out when the adapter gives one (folder, csv). Adapters: see adapters.py. An optional top-level
"data_root" is the folder the dataset roots are relative to; a dataset whose root is missing is reported and left
out. Images that repeat an earlier one (perceptual hash, near_duplicates.py) are dropped before the split.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

from common.config import (SEED, ConfigError, at_least, between, check_constants, check_output_folder, config_dict,  # noqa: E402
                           one_of, parse_config, save_config)
from common.io import (SideFileError, atomic_write_bytes, atomic_write_text, file_sha256, os_error_line,  # noqa: E402
                       read_csv_rows, read_json, remove_stale_temp_files)
from common.plotting import bar_counts, image_grid, save_figure, save_image  # noqa: E402
from common.progress import progress  # noqa: E402
from common.run_folder import RunFolderError, check_not_an_input, own_output_folder  # noqa: E402
from data_preprocessing.adapters import ADAPTERS, WHERE_TO_GET, RecipeError, Source, check_options, stem  # noqa: E402
from data_preprocessing.near_duplicates import NEAR_DUPLICATE_BITS, perceptual_hash, repeats  # noqa: E402
from data_preprocessing.readers import UnreadableFileError, not_a_regular_file, read_frames  # noqa: E402
from common.scan_area import ScanArea, ScanAreaError, detect_scan_area, to_model_image  # noqa: E402


@dataclass
class Config:
    recipe: str = ""  # JSON recipe mapping datasets to organ classes; empty = the phantoms in phantom_dir
    phantom_dir: str = "data/raw_phantoms"  # default dataset (make_phantoms.py output, read through its labels.csv)
    out: str = "data/processed"  # output folder: {train,val,test}/<class>/*.png, manifest.csv, plots
    size: int = 256  # output side in pixels
    square: str = "pad"  # make the cropped scan area square: "pad" (keep all of it) or "crop" (centre)
    max_per_dataset: int = 1000  # at most this many images per dataset (seeded pick of its files)
    max_frames_per_file: int = 20  # at most this many frames from one video / cine DICOM / volume
    video_stride: int = 10  # keep every n-th frame of multi-frame sources: neighbours are near-duplicates
    keep_annotated: bool = True  # keep frames with burned-in calipers/text/colour (flagged in the manifest either way)
    near_duplicate_bits: int = NEAR_DUPLICATE_BITS  # two subjects' images with hashes <= this many bits apart are one; -1: off
    val_frac: float = 0.1  # share of each class's images (by whole subjects) in val
    test_frac: float = 0.1  # share in test; train gets the rest
    seed: int = 0  # seeds the per-dataset pick, the split and the plotted samples
    workers: int = 0  # worker processes; 0 = one per CPU core
    contact_sheet_images: int = 48  # processed images shown per class in contact_sheets/<class>.png
    scan_area_samples: int = 4  # originals per class drawn with their detected scan area


SPLITS = ("train", "val", "test")
STAGING = ".incoming"  # new images wait here until the split is known (it depends on which files gave images)
# Allowed range of each numeric constant (None: no upper bound), checked before any file is touched.
RULES = {
    "size": between(32, 4096), "square": one_of("pad", "crop"), "max_per_dataset": at_least(1),
    "max_frames_per_file": at_least(1), "video_stride": at_least(1), "val_frac": between(0, 1),
    "test_frac": between(0, 1), "seed": SEED, "workers": at_least(0), "contact_sheet_images": at_least(0),
    "scan_area_samples": at_least(0), "near_duplicate_bits": between(-1, 128),
}
# Constants that change what an output looks like: when any differs from the previous run, nothing is reused.
PROCESSING_KEYS = ("size", "square", "max_per_dataset", "max_frames_per_file", "video_stride", "keep_annotated")
MANIFEST_COLUMNS = (
    "source", "sha256", "dataset", "class", "subject", "split", "frame", "status", "reason",
    "geometry", "geometry_expected", "crop_box", "calipers", "text", "color", "output",
)
NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
DUPLICATE_REASON = "near-duplicate of "  # how a dropped repeat's reason starts (such rows are never reused)
OUTPUT_RE = re.compile(r"^(train|val|test)/[A-Za-z0-9_\-]+/[^/]+\.png$")  # what a manifest's output column may hold
# Recipe fields and the JSON types they take.
FIELD_TYPES = {"name": (str, "a string"), "adapter": (str, "a string"), "root": (str, "a string"),
               "class": ((str, type(None)), "a string or null"), "options": ((dict, type(None)), "an object or null")}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    adapter: str
    root: Path
    cls: str | None
    options: dict = field(default_factory=dict)
    missing: str = ""  # why the dataset is left out (its root does not exist); empty when present


@dataclass
class Task:
    """One source file for a worker: where it goes and what the previous run made of it."""

    source: Source
    dataset: str
    cls: str
    base_name: str  # output file name without frame key and suffix
    max_frames: int
    prev_rows: list[dict]


# ---------------------------------------------------------------- constants, output folder, recipe

def check_config(cfg: Config) -> None:
    """Every constant in its allowed range, before any file is touched: a typo must never reprocess or empty a set."""
    check_constants(cfg, RULES)
    if cfg.val_frac + cfg.test_frac >= 1:
        raise ConfigError(f"--val_frac={cfg.val_frac} and --test_frac={cfg.test_frac}: "
                          "their sum must be below 1 (train gets the rest)")
    if not cfg.out:
        raise ConfigError("--out is empty: it must name the output folder")


def read_previous_run(out: Path) -> tuple[list[dict], dict | None]:
    """The manifest rows and constants of the run that made OUT, checked: their output paths are moved and deleted."""
    manifest, config = out / "manifest.csv", out / "config.json"
    hint = "move it away or choose another --out"
    rows = []
    if manifest.is_file():
        try:
            columns, rows = read_csv_rows(manifest)
        except SideFileError as err:
            raise ConfigError(f"{err}; {hint}") from None
        missing = [c for c in MANIFEST_COLUMNS if c not in columns]
        if missing:
            raise ConfigError(f"{manifest}: not a manifest written by prepare.py (columns {missing} missing); {hint}")
        # a row cut short has None for its missing cells
        bad = next((r["output"] or "" for r in rows if r["status"] == "ok" and not OUTPUT_RE.match(r["output"] or "")), None)
        if bad is not None:
            raise ConfigError(f"{manifest}: not a manifest written by prepare.py (output {bad!r} is not "
                              f"<split>/<class>/<name>.png); {hint}")
    previous_config = None
    if rows and config.is_file():
        try:
            previous_config = read_json(config)
        except SideFileError as err:
            raise ConfigError(f"{err}; {hint}") from None
        if not isinstance(previous_config, dict):
            raise ConfigError(f"{config}: not a JSON object of constants; {hint}")
    return rows, previous_config


def load_recipe(cfg: Config) -> list[DatasetSpec]:
    if not cfg.recipe:
        root = Path(cfg.phantom_dir)
        if not (root / "labels.csv").is_file():
            raise RecipeError(
                f"no --recipe given and {root}/labels.csv does not exist: make the phantoms first "
                f"(python data_preprocessing/make_phantoms.py --out={root}) or pass --recipe=FILE.json"
            )
        return [DatasetSpec("phantoms", "csv", root, None)]
    recipe_path = Path(cfg.recipe)
    try:
        recipe = read_json(recipe_path)
    except SideFileError as err:
        raise RecipeError(f"recipe {err}") from None
    entries = recipe.get("datasets") if isinstance(recipe, dict) else None
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"recipe {recipe_path}: field 'datasets' must be a non-empty list: "
                          f"{{\"datasets\": [{{name, adapter, root, class, options}}, ...]}}")
    unknown = set(recipe) - {"datasets", "data_root"}
    if unknown:
        raise RecipeError(f"recipe {recipe_path}: unknown top-level keys {sorted(unknown)} (known: data_root, datasets)")
    data_root = recipe.get("data_root", ".")
    if not isinstance(data_root, str):
        raise RecipeError(f"recipe {recipe_path}: field 'data_root' must be a string, got {json.dumps(data_root)}")
    data_root = Path(data_root).expanduser()
    data_root = data_root if data_root.is_absolute() else recipe_path.parent / data_root
    specs = []
    for i, entry in enumerate(entries):
        where = f"recipe {recipe_path}, dataset #{i}"
        if not isinstance(entry, dict) or not {"name", "adapter", "root"} <= entry.keys():
            raise RecipeError(f"{where}: needs at least name, adapter and root")
        unknown = set(entry) - set(FIELD_TYPES)
        if unknown:
            raise RecipeError(f"{where}: unknown keys {sorted(unknown)}")
        for key, (types, what) in FIELD_TYPES.items():
            if key in entry and not isinstance(entry[key], types):
                raise RecipeError(f"{where}: field {key!r} must be {what}, got {json.dumps(entry[key])}")
        if entry["adapter"] not in ADAPTERS:
            raise RecipeError(f"{where}: unknown adapter {entry['adapter']!r}; known: {', '.join(ADAPTERS)}")
        if not NAME_RE.match(entry["name"]):
            raise RecipeError(f"{where}: name {entry['name']!r} must be letters, digits, _ or -")
        options = entry.get("options") or {}
        try:
            check_options(entry["adapter"], options)
        except RecipeError as err:
            raise RecipeError(f"{where} ({entry['name']}): {err}") from None
        if options.get("classes") == "finding" and entry.get("class"):
            raise RecipeError(f"{where} ({entry['name']}): \"class\" would override the finding-level classes of "
                              "options.classes = \"finding\": leave \"class\" out")
        root = Path(entry["root"]).expanduser()
        root = root if root.is_absolute() else data_root / root
        missing = "" if root.exists() else f"root {root} does not exist"
        specs.append(DatasetSpec(entry["name"], entry["adapter"], root, entry.get("class"), options, missing))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise RecipeError(f"recipe {recipe_path}: dataset names must be unique, got {names}")
    return specs


# ---------------------------------------------------------------- listing, capping, splitting

def list_sources(specs: list[DatasetSpec], cfg: Config) -> tuple[list[tuple[DatasetSpec, Source, str, int]], list[dict]]:
    """(spec, source, class, frame budget) per kept file, and manifest rows for the files set aside."""
    chosen, ignored_rows, seen = [], [], {}
    for spec in specs:
        if spec.missing:
            where = f" (get it from {WHERE_TO_GET[spec.adapter]})" if spec.adapter in WHERE_TO_GET else ""
            print(f"{spec.name}: MISSING, {spec.missing}{where}; the run goes on without it")
            continue
        n_ignored = len(ignored_rows)
        try:
            listing = ADAPTERS[spec.adapter](spec.root, spec.options)
        except RecipeError as err:  # adapters know the option, not the recipe: name both
            where = f"recipe {cfg.recipe}, dataset {spec.name}" if cfg.recipe else f"dataset {spec.name}"
            raise RecipeError(f"{where}: {err}") from None
        for path, reason in listing.ignored:
            ignored_rows.append(_row(source=str(path.absolute()), dataset=spec.name, status="skipped", reason=reason))
        sources = []
        for source in listing.sources:
            key = _file_key(source.path)
            if key in seen and seen[key][0] != spec.name:
                raise RecipeError(f"{source.path} is the file {seen[key][1]} of dataset {seen[key][0]} again "
                                  f"(in dataset {spec.name}): each file may be used once")
            if key in seen:
                ignored_rows.append(_row(source=str(source.path.absolute()), dataset=spec.name, status="skipped",
                                         reason=f"same file as {seen[key][1]} (listed twice, e.g. through a symlink)"))
                continue
            seen[key] = (spec.name, source.path.absolute())
            sources.append(source)
        if len(sources) > cfg.max_per_dataset:
            rng = np.random.default_rng([cfg.seed, _stable_int(spec.name)])
            keep = sorted(rng.choice(len(sources), cfg.max_per_dataset, replace=False))
            print(f"{spec.name}: {len(sources)} files, using a seeded pick of {cfg.max_per_dataset} (max_per_dataset)")
            sources = [sources[i] for i in keep]
        # Multi-frame files share the dataset's image budget so no dataset exceeds max_per_dataset images.
        budget = max(1, min(cfg.max_frames_per_file, cfg.max_per_dataset // max(1, len(sources))))
        for source in sources:
            cls = spec.cls or source.cls
            if not cls:
                raise RecipeError(f"dataset {spec.name}: no class for {source.path}: give \"class\" in the recipe")
            if not NAME_RE.match(cls):
                raise RecipeError(f"dataset {spec.name}: class {cls!r} must be letters, digits, _ or -")
            chosen.append((spec, source, cls, budget))
        print(f"{spec.name}: {len(sources)} files ({spec.adapter} adapter, root {spec.root}), "
              f"{len(ignored_rows) - n_ignored} set aside (masks, annotations, duplicates, refused paths)"
              + ("; NO IMAGES: the run goes on without it" if not sources else ""))
    return chosen, ignored_rows


def _file_key(path: Path) -> tuple:
    """What makes two listed paths one file: (device, inode) through symlinks; the path itself when it cannot be stat'ed."""
    try:
        info = os.stat(path)
    except OSError:
        return ("path", str(path.absolute()))
    return ("inode", info.st_dev, info.st_ino)


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


Subject = tuple[str, str]  # (dataset, subject id): ids of different datasets never merge


def assign_splits(weights: dict[Subject, int], classes: dict[Subject, str], fracs: dict[str, float], seed: int) -> dict[Subject, str]:
    """Whole subjects to splits, per class: each subject (largest first) goes to the split furthest below
    its target share, so each split gets a subject early and the shares approach the targets."""
    split_of = {}
    by_class: dict[str, list] = defaultdict(list)
    for subject in sorted(weights):
        by_class[classes[subject]].append(subject)
    for cls, subjects in sorted(by_class.items()):
        rng = np.random.default_rng([seed, _stable_int(cls)])
        order = [subjects[i] for i in rng.permutation(len(subjects))]
        order.sort(key=lambda s: -weights[s])  # stable: equal sizes keep the seeded order
        filled = dict.fromkeys(SPLITS, 0)
        for subject in order:
            split = max((s for s in SPLITS if fracs[s] > 0), key=lambda s: -filled[s] / fracs[s])
            filled[split] += weights[subject]
            split_of[subject] = split
    return split_of


def output_names(chosen: list[tuple[DatasetSpec, Source, str, int]]) -> list[str]:
    """<dataset>__<stem>, readable; a short hash of the path is added where two files would collide."""
    names = [f"{spec.name}__{re.sub(r'[^A-Za-z0-9.-]+', '_', stem(src.path)).strip('_') or 'image'}" for spec, src, _, _ in chosen]
    counts = Counter((name, cls) for name, (_, _, cls, _) in zip(names, chosen))
    return [
        f"{name}_{hashlib.sha1(str(src.path).encode()).hexdigest()[:8]}" if counts[(name, cls)] > 1 else name
        for name, (_, src, cls, _) in zip(names, chosen)
    ]


# ---------------------------------------------------------------- per-file work (runs in the workers)

def _row(**values) -> dict:
    row = dict.fromkeys(MANIFEST_COLUMNS, "")
    row.update(values)
    return row


class OutputError(Exception):
    """An output that cannot be written (read-only file system, disk full): the run stops; the source is not at fault."""


def output_name(base_name: str, frame: str) -> str:
    return f"{base_name}_{frame}.png" if frame else f"{base_name}.png"


def process_source(task: Task, out: Path, cfg: Config) -> tuple[list[dict], bool]:
    """Manifest rows for one source file, and whether the previous run's outputs were reused.

    Never raises for a bad file: every failure becomes a skipped row with its reason."""
    src = task.source
    base = dict(source=str(src.path.absolute()), dataset=task.dataset, **{"class": task.cls}, subject=src.subject,
                geometry_expected=src.geometry)
    problem = not_a_regular_file(src.path)  # before hashing: a FIFO or /dev/zero would never finish
    if problem:
        return [_row(**base, status="skipped", reason=problem)], False
    try:
        sha = file_sha256(src.path)
    except OSError as err:
        return [_row(**base, status="skipped", reason=f"cannot read file: {err.strerror or err}")], False
    base["sha256"] = sha
    reused = _reuse(task, out, base)
    if reused is not None:
        return reused, True
    rows = []
    try:
        for frame_key, frame in read_frames(src.path, video_stride=cfg.video_stride, max_frames=task.max_frames):
            rows.append(_process_frame(task, out, cfg, base, frame_key, frame))
    except UnreadableFileError as err:
        rows.append(_row(**base, status="skipped", reason=err.reason))
    except OutputError:
        raise
    except Exception as err:  # a reader bug on one odd file must not stop the run
        rows.append(_row(**base, status="skipped", reason=f"unexpected {type(err).__name__} while reading: {err}"))
    return rows, False


def _process_frame(task: Task, out: Path, cfg: Config, base: dict, frame_key: str, frame: np.ndarray) -> dict:
    try:
        area = detect_scan_area(frame, overlay_corners=task.source.overlay_corners)
    except ScanAreaError as err:
        return _row(**base, frame=frame_key, status="skipped", reason=f"no scan area found: {err}")
    except Exception as err:
        return _row(**base, frame=frame_key, status="skipped", reason=f"unexpected {type(err).__name__} in scan-area detection: {err}")
    flags = {k: bool(area.annotations.get(k, False)) for k in ("calipers", "text", "color")}
    info = dict(
        frame=frame_key, geometry=area.geometry, crop_box=" ".join(str(int(v)) for v in area.box),
        **{k: int(v) for k, v in flags.items()},
    )
    if any(flags.values()) and not cfg.keep_annotated:
        found = ", ".join(k for k, v in flags.items() if v)
        return _row(**base, **info, status="skipped", reason=f"burned-in annotations ({found}) excluded: keep_annotated=false")
    image = to_model_image(frame, area, size=cfg.size, square=cfg.square)
    path = out / STAGING / task.cls / output_name(task.base_name, frame_key)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="png", compress_level=1)  # 3x faster than the default, ~6% larger
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as err:
        raise OutputError(os_error_line(err)) from None
    return _row(**base, **info, status="ok", output=path.relative_to(out).as_posix())


def _reuse(task: Task, out: Path, base: dict) -> list[dict] | None:
    """The previous rows of an unchanged source whose outputs all still exist (place_outputs moves them); None = redo."""
    prev = task.prev_rows
    if not prev or any(r["sha256"] != base["sha256"] for r in prev):
        return None
    if any(r["reason"].startswith(DUPLICATE_REASON) for r in prev):  # its twin may be gone: judge it again
        return None
    for r in prev:
        renamed = Path(r["output"]).name != output_name(task.base_name, r["frame"])
        if r["status"] == "ok" and (renamed or not (out / r["output"]).is_file()):
            return None
    return [{**r, **base} for r in prev]


def place_outputs(rows: list[dict], out: Path, split_of: dict[Subject, str]) -> None:
    """Give every row its subject's split and move each kept image to OUT/<split>/<class>/.

    Images that move pass through the staging folder, so no move overwrites a file another row has yet to move."""
    moves = []
    for r in rows:
        r["split"] = split_of.get((r["dataset"], r["subject"]), "")
        if r["status"] != "ok":
            continue
        current = out / r["output"]
        final = out / r["split"] / r["class"] / current.name
        staged = out / STAGING / r["class"] / current.name
        if current == final:
            continue
        if current != staged:
            staged.parent.mkdir(parents=True, exist_ok=True)
            os.replace(current, staged)
        moves.append((r, staged, final))
    for r, staged, final in moves:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, final)
        r["output"] = final.relative_to(out).as_posix()
    shutil.rmtree(out / STAGING, ignore_errors=True)


_WORKER_ARGS: tuple[Path, Config] | None = None


def _init_worker(out: Path, cfg: Config) -> None:
    global _WORKER_ARGS
    _WORKER_ARGS = (out, cfg)
    cv2.setNumThreads(1)  # one process per core already: OpenCV's own threads would only oversubscribe


def _work(task: Task) -> tuple[list[dict], bool]:
    return process_source(task, *_WORKER_ARGS)


def _hash_output(path: Path) -> int:
    with Image.open(path) as image:
        return perceptual_hash(image)


def drop_near_duplicates(rows: list[dict], out: Path, cfg: Config, parallel_map=map) -> int:
    """Drop every kept image whose perceptual hash is within cfg.near_duplicate_bits of an earlier kept image of
    another subject (rows are in recipe order, so the first dataset's copy stays): its output is deleted and its
    row says which image it repeats. Run before the split, so no image and its copy can land in two splits.
    Returns the count dropped; -1 turns the removal off."""
    if cfg.near_duplicate_bits < 0:
        return 0
    kept = [r for r in rows if r["status"] == "ok"]
    hashes = list(parallel_map(_hash_output, [out / r["output"] for r in kept]))
    found = repeats(hashes, cfg.near_duplicate_bits, [(r["dataset"], r["subject"]) for r in kept])
    for i, (twin_index, bits) in found.items():
        row, twin = kept[i], kept[twin_index]
        (out / row["output"]).unlink(missing_ok=True)
        across = "another dataset, " if twin["dataset"] != row["dataset"] else ""
        twin_name = Path(twin["source"]).name + (f" {twin['frame']}" if twin["frame"] else "")
        row.update(status="skipped", output="", reason=f"{DUPLICATE_REASON}{twin['dataset']}: {twin_name} "
                   f"({across}perceptual hashes {bits} bits apart, near_duplicate_bits={cfg.near_duplicate_bits})")
    return len(found)


# ---------------------------------------------------------------- manifest and plots

def write_manifest(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def plot_counts(rows: list[dict], out: Path) -> dict[str, dict[str, int]]:
    counts = {s: dict(Counter(r["class"] for r in rows if r["status"] == "ok" and r["split"] == s)) for s in SPLITS}
    bar_counts(counts, out / "per_class_by_split.png", "processed images per class and split")
    return counts


def contact_sheets(rows: list[dict], out: Path, cfg: Config) -> None:
    if cfg.contact_sheet_images == 0:
        return
    by_class = defaultdict(list)
    for r in rows:
        if r["status"] == "ok":
            by_class[r["class"]].append(r["output"])
    for cls, outputs in sorted(by_class.items()):
        rng = np.random.default_rng([cfg.seed, _stable_int(cls)])
        pick = sorted(rng.permutation(len(outputs))[: cfg.contact_sheet_images])
        thumbs = np.stack([np.asarray(Image.open(out / outputs[i]).convert("RGB").resize((128, 128), Image.BILINEAR)) for i in pick])
        save_image(image_grid(thumbs, ncols=8), out / "contact_sheets" / f"{cls}.png")


def scan_area_picks(rows: list[dict], cfg: Config) -> list[dict]:
    """A seeded few kept rows per class whose originals the scan-area figure shows."""
    by_class = defaultdict(list)
    for r in rows:
        if r["status"] == "ok":
            by_class[r["class"]].append(r)
    picks = []
    for cls, cls_rows in sorted(by_class.items()):
        rng = np.random.default_rng([cfg.seed, _stable_int(cls), 1])
        picks += [cls_rows[i] for i in sorted(rng.permutation(len(cls_rows))[: cfg.scan_area_samples])]
    return picks


def scan_panel(args: tuple[dict, int, tuple[str, ...]]) -> tuple[dict, np.ndarray, ScanArea] | None:
    """Re-read one kept frame and detect its scan area again (runs in the workers)."""
    row, video_stride, overlay_corners = args
    try:
        for key, frame in read_frames(row["source"], video_stride=video_stride):
            if key == row["frame"]:
                return row, frame, detect_scan_area(frame, overlay_corners=overlay_corners)
    except (UnreadableFileError, ScanAreaError):
        return None
    return None


def scan_area_figure(panels: list[tuple[dict, np.ndarray, ScanArea]], out: Path) -> None:
    """Originals: outside the detected scan area tinted red (what gets blanked), the crop box in yellow."""
    classes = sorted({row["class"] for row, _, _ in panels})
    per_class = max(Counter(row["class"] for row, _, _ in panels).values())  # below the asked number for small sets
    # Constrained layout puts the title just above the panels; the default margins left a band ~2 in high.
    fig, axes = plt.subplots(len(classes), per_class, figsize=(4.0 * per_class, 3.4 * len(classes)), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    column = Counter()
    for row, frame, area in panels:
        ax = axes[classes.index(row["class"]), column[row["class"]]]
        column[row["class"]] += 1
        ax.imshow(frame, cmap="gray", vmin=0, vmax=255)
        outside = np.zeros(area.mask.shape + (4,), np.float32)
        outside[~area.mask] = (1.0, 0.0, 0.0, 0.35)
        ax.imshow(outside)
        x0, y0, x1, y1 = area.box
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=1.0))
        flags = ",".join(f for f in ("calipers", "text", "color") if area.annotations.get(f)) or "clean"
        label = f"{Path(row['source']).name}{(' ' + row['frame']) if row['frame'] else ''}"
        ax.set_title(f"{row['class']}: {label[-30:]}\n{area.geometry}, {flags}", fontsize=8)
    fig.suptitle("originals: red tint = outside the detected scan area (blanked), yellow = crop box")
    save_figure(fig, out / "scan_area_samples.png")


# ---------------------------------------------------------------- main

def run(cfg: Config) -> dict:
    """The whole step; returns counts (files processed / reused, images kept / skipped) for callers and tests."""
    start = time.time()
    check_config(cfg)
    specs = load_recipe(cfg)
    out = Path(cfg.out)
    inputs = [cfg.recipe, *(spec.root for spec in specs)]
    check_not_an_input(out, inputs)  # before check_output_folder makes it: never a folder inside a dataset root
    check_output_folder("out", out)
    with own_output_folder(out, "prepare.py", inputs, config_keys=vars(cfg)):
        return process(cfg, specs, out, start)


def process(cfg: Config, specs: list[DatasetSpec], out: Path, start: float) -> dict:
    """run's work, in an output folder this run owns and holds the lock of."""
    previous, previous_config = read_previous_run(out)
    stale = remove_stale_temp_files(out, recursive=True)
    if stale:
        print(f"removed {len(stale)} temporary files left by an interrupted run")
    shutil.rmtree(out / STAGING, ignore_errors=True)  # images of an interrupted run that never got their split
    chosen, ignored_rows = list_sources(specs, cfg)
    missing = [f"{s.name} ({s.missing})" for s in specs if s.missing]
    if not chosen:
        raise RecipeError("the recipe lists no image files" + (f"; missing datasets: {', '.join(missing)}" if missing else ""))
    subject_class = subject_classes(chosen)
    tasks = make_tasks(chosen, previous, previous_config, cfg)
    workers = cfg.workers or os.cpu_count() or 1
    pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (out, cfg)) if workers > 1 else None
    parallel_map = pool.imap if pool else map  # results in task order: the plotted picks must not depend on timing
    try:
        rows, n_reused, panels = process_sources(tasks, out, cfg, parallel_map)
        n_repeats = drop_near_duplicates(rows, out, cfg, parallel_map)
        place_and_record(rows, ignored_rows, previous, subject_class, out, cfg)
        counts = draw_plots(rows, panels, out, cfg, pool)
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    stats = {
        "files": len(tasks),
        "processed": len(tasks) - n_reused,
        "reused": n_reused,
        "ok": sum(r["status"] == "ok" for r in rows),
        "skipped": sum(r["status"] == "skipped" for r in rows),
        "ignored": len(ignored_rows),
        "near_duplicates": n_repeats,
        "missing": [s.name for s in specs if s.name not in {spec.name for spec, _, _, _ in chosen}],  # or no images
        "seconds": time.time() - start,
    }
    _print_summary(rows, counts, stats, out)
    return stats


def subject_classes(chosen: list[tuple[DatasetSpec, Source, str, int]]) -> dict[Subject, str]:
    """The class of every (dataset, subject); a subject in two classes is refused."""
    subject_class: dict[Subject, str] = {}
    for spec, src, cls, _ in chosen:
        key = (spec.name, src.subject)
        if subject_class.setdefault(key, cls) != cls:
            raise RecipeError(f"subject {key[1]} of dataset {key[0]} appears in classes {subject_class[key]} and {cls}")
    return subject_class


def make_tasks(chosen: list[tuple[DatasetSpec, Source, str, int]], previous: list[dict], previous_config: dict | None,
               cfg: Config) -> list[Task]:
    """A task per source file, with the previous run's rows of it when they can be reused (no processing constant
    changed)."""
    changed = [k for k in PROCESSING_KEYS if previous_config is not None and previous_config.get(k) != config_dict(cfg)[k]]
    previous_by_source = defaultdict(list)
    if changed:
        print(f"processing constants changed since the last run ({', '.join(changed)}): reprocessing every file")
    elif previous_config is not None:
        for r in previous:
            if r["sha256"]:
                previous_by_source[r["source"]].append(r)
    return [
        Task(src, spec.name, cls, name, budget, previous_by_source.get(str(src.path.absolute()), []))
        for (spec, src, cls, budget), name in zip(chosen, output_names(chosen))
    ]


def process_sources(tasks: list[Task], out: Path, cfg: Config,
                    parallel_map=map) -> tuple[list[dict], int, list[tuple[dict, np.ndarray, ScanArea]]]:
    """Every task's manifest rows, how many tasks were reused, and the scan-area figure's panels (re-detected
    originals; none when nothing changed and the figure exists)."""
    rows, n_reused = [], 0
    _init_worker(out, cfg)
    with progress(total=len(tasks), desc="prepare", unit="file") as bar:
        for task_rows, reused in parallel_map(_work, tasks):
            rows.extend(task_rows)
            n_reused += reused
            bar.update()
    panels = []
    if cfg.scan_area_samples > 0 and (n_reused < len(tasks) or not (out / "scan_area_samples.png").is_file()):
        picks = scan_area_picks(rows, cfg)
        corners = {str(t.source.path.absolute()): t.source.overlay_corners for t in tasks}
        panels = [p for p in parallel_map(scan_panel, [(r, cfg.video_stride, corners.get(r["source"], ())) for r in picks])
                  if p is not None]
    return rows, n_reused, panels


def place_and_record(rows: list[dict], ignored_rows: list[dict], previous: list[dict],
                     subject_class: dict[Subject, str], out: Path, cfg: Config) -> None:
    """Split the kept images, move them into place, delete the previous run's outputs no row points to, and write
    the manifest and config.json."""
    # Splits only now: a subject takes part with the images it gave (a clip up to max_frames_per_file, an
    # unreadable file none), so unreadable files cannot leave a split empty.
    fracs = {"train": 1.0 - cfg.val_frac - cfg.test_frac, "val": cfg.val_frac, "test": cfg.test_frac}
    weights = Counter((r["dataset"], r["subject"]) for r in rows if r["status"] == "ok")
    place_outputs(rows, out, assign_splits(weights, subject_class, fracs, cfg.seed))

    # Outputs of the previous run that no row points to any more (file removed, renamed or now skipped).
    current = {r["output"] for r in rows if r["status"] == "ok"}
    for r in previous:
        if r["status"] == "ok" and r["output"] not in current:
            (out / r["output"]).unlink(missing_ok=True)

    rows.sort(key=lambda r: (r["dataset"], r["source"], r["frame"]))
    ignored_rows.sort(key=lambda r: (r["dataset"], r["source"]))
    write_manifest(out / "manifest.csv", rows + ignored_rows)
    save_config(cfg, out)


def draw_plots(rows: list[dict], panels: list[tuple[dict, np.ndarray, ScanArea]], out: Path, cfg: Config,
               pool: multiprocessing.pool.Pool | None) -> dict[str, dict[str, int]]:
    """per_class_by_split.png, the contact sheets and the scan-area figure; returns the counts per split and class."""
    # the scan-area figure, the slowest plot, is drawn in a worker while this process draws the others
    panels.sort(key=lambda p: (p[0]["class"], p[0]["source"], p[0]["frame"]))
    figure_job = pool.apply_async(scan_area_figure, (panels, out)) if pool and panels else None
    counts = plot_counts(rows, out)
    contact_sheets(rows, out, cfg)
    if figure_job is not None:
        figure_job.get()
    elif panels:
        scan_area_figure(panels, out)
    return counts


def _print_summary(rows: list[dict], counts: dict, stats: dict, out: Path) -> None:
    print(f"{stats['files']} files: {stats['processed']} processed, {stats['reused']} unchanged since the last run; "
          f"{stats['ok']} images kept, {stats['skipped']} skipped, {stats['ignored']} set aside "
          f"(masks, annotations, duplicates, refused paths) ({stats['seconds']:.1f} s)")
    for split in SPLITS:
        print(f"  {split:5s} " + "  ".join(f"{c}={n}" for c, n in sorted(counts[split].items())))
    reasons = Counter(r["reason"] for r in rows if r["status"] == "skipped")
    for reason, n in reasons.most_common(8):
        print(f"  skipped {n}x: {reason}")
    if stats["near_duplicates"]:
        across = sum(r["reason"].startswith(DUPLICATE_REASON) and "another dataset" in r["reason"] for r in rows)
        print(f"  near-duplicates dropped before splitting: {stats['near_duplicates']} ({across} of an image in "
              "another dataset); each row's reason names the image kept")
    if stats["missing"]:
        print(f"  datasets missing or without images (the run went on without them): {', '.join(stats['missing'])}")
    checked = [r for r in rows if r["status"] == "ok" and r["geometry_expected"]]
    if checked:
        agree = sum(r["geometry"] == r["geometry_expected"] for r in checked)
        print(f"  detected geometry matches the labelled one for {agree}/{len(checked)} images")
    print(f"manifest: {out / 'manifest.csv'}; plots: per_class_by_split.png, contact_sheets/, scan_area_samples.png")


def main() -> None:
    cfg = parse_config(Config)
    try:
        run(cfg)
    except (ConfigError, RecipeError, RunFolderError, OutputError) as err:
        raise SystemExit(f"error: {err}") from None
    except OSError as err:
        raise SystemExit(f"error: {os_error_line(err)}") from None


if __name__ == "__main__":
    main()
