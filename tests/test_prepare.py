"""prepare.py end to end: phantoms (default recipe), a recipe with bad files and masks, the shared BUSI + HC18
samples; adapters and the subject-wise split on their own; bad input (symlink loops, FIFOs and devices, CSV paths
outside the table, splits after reading, bad constants, --out and recipe-type errors).

prepare.py's rules one function at a time, in process and fast (issue 16): every refusal fed its bad input and
its message checked in full, the seeded picks and the split assignment at exact values, the manifest rows field by
field, reuse and output moves, the summary lines and the scan-area figure's artists; then the whole step in process
(readers, detector and worker pool stood in for). The end-to-end runs are in test_prepare.py."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import shutil
import signal
import stat
import sys
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.patches import Rectangle
from PIL import Image

from common.config import ConfigError
from data_preprocessing import make_phantoms, prepare
from data_preprocessing.adapters import ADAPTERS, RecipeError, Source
from data_preprocessing.prepare import (MANIFEST_COLUMNS, Config, DatasetSpec, Task, assign_splits, check_config,
                                        list_sources, load_recipe, output_name, output_names, place_outputs,
                                        read_previous_run, run, write_manifest)
from data_preprocessing.readers import UnreadableFileError
from common.scan_area import ScanArea, ScanAreaError, to_model_image

CLASSES = {"breast", "thyroid", "kidney", "fetal_head", "liver", "heart"}


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def read_manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def output_files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for split in ("train", "val", "test") for p in (out / split).rglob("*.png")}


def check_outputs(out: Path, rows: list[dict]) -> None:
    ok = [r for r in rows if r["status"] == "ok"]
    assert output_files(out) == {r["output"] for r in ok}  # one file per kept image, nothing else
    for r in ok:
        assert r["output"].startswith(f"{r['split']}/{r['class']}/{r['dataset']}__")
        image = np.asarray(Image.open(out / r["output"]))
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
        assert image.max() > 50  # content, not a blank frame
    splits_of = defaultdict(set)
    for r in ok:
        splits_of[(r["dataset"], r["subject"])].add(r["split"])
    assert all(len(s) == 1 for s in splits_of.values()), "a subject straddles splits"


class Hang(BaseException):
    """Not an Exception: the code under test catches those (and OSError) per file and would carry on."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Turn a hang (a blocking open of a FIFO, hashing /dev/zero) into a test failure."""
    def expired(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def file_modes(root: Path) -> set[int]:
    return {stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw_phantoms")
    make_phantoms.main(make_phantoms.Config(out=str(out), n_subjects_per_class=2, frames_per_subject=2, workers=2))
    return out


def test_default_recipe_on_phantoms_and_rerun(phantom_dir, tmp_path):
    before = tree_hashes(phantom_dir)
    out = tmp_path / "processed"
    with umask(0o027):
        stats = run(Config(phantom_dir=str(phantom_dir), out=str(out), workers=2, scan_area_samples=2))
    assert file_modes(out) == {0o640}  # images, manifest, config and plots all follow the umask
    rows = read_manifest(out)
    assert stats["files"] == 24 and stats["processed"] == 24 and stats["ok"] == 24 and stats["skipped"] == 0
    assert len(rows) == 24 and all(r["status"] == "ok" for r in rows)
    assert {r["class"] for r in rows} == CLASSES
    assert not any("_mask" in r["source"] for r in rows)
    check_outputs(out, rows)
    mismatched = [(r["source"], r["geometry"]) for r in rows if r["geometry"] != r["geometry_expected"]]
    assert not mismatched, f"scan geometry detected wrongly: {mismatched}"
    for name in ["manifest.csv", "config.json", "per_class_by_split.png", "scan_area_samples.png"] + [
        f"contact_sheets/{c}.png" for c in CLASSES
    ]:
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["phantom_dir"] == str(phantom_dir)

    # Temp files of atomic writes killed mid-way: removed on the next run once stale, a fresh one is left alone.
    stale = out / "train" / "liver" / ".x.png.k3j9_a2b.tmp"
    fresh = out / ".manifest.csv.q8w2e4r6.tmp"
    stale.write_bytes(b"half an image")
    fresh.write_bytes(b"being written")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    mtimes = {p: (out / p).stat().st_mtime_ns for p in output_files(out)}
    again = run(Config(phantom_dir=str(phantom_dir), out=str(out), workers=2, scan_area_samples=2))
    assert again["processed"] == 0 and again["reused"] == 24 and again["ok"] == 24
    assert {p: (out / p).stat().st_mtime_ns for p in output_files(out)} == mtimes  # nothing rewritten
    assert read_manifest(out) == rows
    assert tree_hashes(phantom_dir) == before  # sources untouched
    assert not stale.exists() and fresh.read_bytes() == b"being written"

    # A changed source (new content, same name) is the only file processed on the next run.
    changed = phantom_dir / "liver" / "s0000_f0.png"
    saved = changed.read_bytes()
    try:
        changed.write_bytes((phantom_dir / "liver" / "s0001_f1.png").read_bytes())
        third = run(Config(phantom_dir=str(phantom_dir), out=str(out), workers=1, scan_area_samples=0,
                           near_duplicate_bits=-1))  # the new content is another subject's frame: no removal
    finally:
        changed.write_bytes(saved)
    assert third["processed"] == 1 and third["reused"] == 23

    # A bad constant stops before any file is touched (--size=0 used to reprocess into nothing and delete every image).
    kept = tree_hashes(out)
    with pytest.raises(ConfigError, match=r"^--size=0: must be in \[32, 4096\]$"):
        run(Config(phantom_dir=str(phantom_dir), out=str(out), workers=1, size=0))
    assert tree_hashes(out) == kept

    # Other split fractions move whole subjects between split folders without reprocessing them.
    moved = run(Config(phantom_dir=str(phantom_dir), out=str(out), workers=2, val_frac=0.0, test_frac=0.0, scan_area_samples=0,
                       near_duplicate_bits=-1))
    rows = read_manifest(out)
    assert moved["processed"] == 1 and {r["split"] for r in rows} == {"train"}  # 1: the source restored above
    check_outputs(out, rows)


def test_recipe_with_bad_files_masks_and_two_datasets(phantom_dir, tmp_path):
    extra = tmp_path / "extra"
    (extra / "thyroid" / "masks").mkdir(parents=True)
    good = phantom_dir / "thyroid" / "s0000_f0.png"
    shutil.copy(good, extra / "thyroid" / "scan1.png")
    shutil.copy(good, extra / "thyroid" / "scan1_mask.png")  # real image content: must still be set aside
    shutil.copy(good, extra / "thyroid" / "scan1_Annotation.png")
    shutil.copy(good, extra / "thyroid" / "masks" / "scan1.png")
    (extra / "thyroid" / "scan2.png").write_text("not an image\n")
    Image.new("RGB", (640, 480)).save(extra / "thyroid" / "black.png")
    (extra / "thyroid" / "empty.png").write_bytes(b"")
    with open(phantom_dir / "labels.csv", newline="") as handle:  # frame 0 of each subject, absolute paths
        labels = [{**r, "path": str(phantom_dir / r["path"])} for r in csv.DictReader(handle) if r["path"].endswith("_f0.png")]
    with open(tmp_path / "few.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(labels[0]))
        writer.writeheader()
        writer.writerows(labels)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"datasets": [
        {"name": "phantoms", "adapter": "csv", "root": "few.csv", "options": {"allow_paths_outside_root": True}},
        {"name": "extra", "adapter": "folder", "root": "extra", "options": {"subject": "stem"}},
    ]}))
    before = tree_hashes(extra)
    out = tmp_path / "processed"
    stats = run(Config(recipe=str(recipe), out=str(out), workers=2, scan_area_samples=1, val_frac=0.25, test_frac=0.25,
                       near_duplicate_bits=-1))  # scan1.png is a copy of a phantom frame on purpose
    rows = read_manifest(out)
    by_name = {Path(r["source"]).relative_to(extra).as_posix(): r for r in rows if r["dataset"] == "extra"}
    assert by_name["thyroid/scan1.png"]["status"] == "ok"
    assert "not a recognisable image" in by_name["thyroid/scan2.png"]["reason"]
    assert by_name["thyroid/black.png"]["reason"].startswith("no scan area found")
    assert by_name["thyroid/empty.png"]["reason"] == "empty file (0 bytes)"
    for name in ("thyroid/scan1_mask.png", "thyroid/scan1_Annotation.png", "thyroid/masks/scan1.png"):
        assert by_name[name]["status"] == "skipped" and "mask/annotation" in by_name[name]["reason"], name
        assert by_name[name]["output"] == ""
    assert len(labels) == 12 and stats["ok"] == 13 and stats["skipped"] == 3 and stats["ignored"] == 3
    assert all(len(r["sha256"]) == 64 for r in rows if r["status"] == "ok")
    check_outputs(out, rows)
    for cls in CLASSES - {"thyroid"}:  # 2 subjects in these classes: one goes to train, one to val
        assert sorted(r["split"] for r in rows if r["class"] == cls) == ["train", "val"], cls
    assert tree_hashes(extra) == before
    assert run(Config(recipe=str(recipe), out=str(out), workers=2, scan_area_samples=0, val_frac=0.25, test_frac=0.25,
                      near_duplicate_bits=-1))["processed"] == 0


def test_recipe_errors_are_clear(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"datasets": [{"name": "x", "adapter": "nope", "root": "."}]}))
    with pytest.raises(RecipeError, match="unknown adapter 'nope'; known: busi, hc18"):
        run(Config(recipe=str(recipe), out=str(tmp_path / "o")))
    recipe.write_text(json.dumps({"datasets": [{"name": "x", "adapter": "busi", "root": "missing"}]}))
    with pytest.raises(RecipeError, match="root .*missing does not exist"):
        run(Config(recipe=str(recipe), out=str(tmp_path / "o")))
    (tmp_path / "imgs").mkdir()
    Image.new("L", (64, 64)).save(tmp_path / "imgs" / "a.png")
    recipe.write_text(json.dumps({"datasets": [{"name": "x", "adapter": "busi", "root": "imgs"}]}))
    with pytest.raises(RecipeError, match='give "class" in the recipe'):
        run(Config(recipe=str(recipe), out=str(tmp_path / "o")))
    with pytest.raises(RecipeError, match="make the phantoms first"):
        run(Config(phantom_dir=str(tmp_path / "none"), out=str(tmp_path / "o")))


def test_adapters_know_the_public_layouts(tmp_path):
    def touch(rel: str) -> None:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")

    for rel in ["busi/benign/benign (1).png", "busi/benign/benign (1)_mask.png", "busi/benign/benign (1)_mask_1.png",
                "busi/malignant/malignant (1).png", "busi/normal/._normal (1).png",
                "hc18/training_set/010_HC.png", "hc18/training_set/010_2HC.png", "hc18/training_set/010_HC_Annotation.png",
                "hc18/test_set/010_HC.png", "hc18/training_set_pixel_size_and_HC.csv",
                "camus/database_nifti/patient0001/patient0001_2CH_ED.nii.gz",
                "camus/database_nifti/patient0001/patient0001_2CH_ED_gt.nii.gz",
                "camus/database_nifti/patient0001/patient0001_4CH_half_sequence.nii.gz",
                "echonet/Videos/0X1A.avi", "echonet/FileList.csv",
                "folder/kidney/p1/a.png", "folder/kidney/p1/b.png", "folder/liver/p2/a.dcm", "folder/loose.png"]:
        touch(rel)
    (tmp_path / "folder/liver/p2/IM0001").write_bytes(bytes(128) + b"DICM")  # a suffix-less DICOM export
    (tmp_path / "folder/liver/p2/README").write_text("not an image")

    def subjects(adapter: str, options=None) -> dict[str, tuple[str, str | None]]:
        root = tmp_path / adapter
        listing = ADAPTERS[adapter](root, options or {})
        return {s.path.relative_to(root).as_posix(): (s.subject, s.cls) for s in listing.sources}

    assert subjects("busi") == {"benign/benign (1).png": ("benign (1)", None), "malignant/malignant (1).png": ("malignant (1)", None)}
    assert subjects("hc18") == {"test_set/010_HC.png": ("test_set/010", None), "training_set/010_2HC.png": ("training_set/010", None),
                                "training_set/010_HC.png": ("training_set/010", None)}
    assert set(subjects("camus").values()) == {("patient0001", None)} and len(subjects("camus")) == 2
    assert subjects("echonet") == {"Videos/0X1A.avi": ("0X1A", None)}
    assert subjects("folder", {"subject": "parent"}) == {
        "kidney/p1/a.png": ("kidney/p1", "kidney"), "kidney/p1/b.png": ("kidney/p1", "kidney"), "liver/p2/a.dcm": ("liver/p2", "liver"),
        "liver/p2/IM0001": ("liver/p2", "liver")}
    ignored = dict(ADAPTERS["busi"](tmp_path / "busi", {}).ignored)
    assert len(ignored) == 3 and all("mask" in r or "hidden" in r for r in ignored.values())


def test_split_is_by_subject_stratified_and_seeded():
    rng = np.random.default_rng(0)
    weights, classes = {}, {}
    for cls, n in (("a", 200), ("b", 40)):
        for i in range(n):
            weights[("d", f"{cls}{i}")] = int(rng.integers(1, 4))
            classes[("d", f"{cls}{i}")] = cls
    fracs = {"train": 0.8, "val": 0.1, "test": 0.1}
    split = assign_splits(weights, classes, fracs, seed=1)
    assert split == assign_splits(weights, classes, fracs, seed=1)
    assert split != assign_splits(weights, classes, fracs, seed=2)
    for cls in ("a", "b"):
        total = sum(w for s, w in weights.items() if classes[s] == cls)
        for name, frac in fracs.items():
            share = sum(w for s, w in weights.items() if classes[s] == cls and split[s] == name) / total
            assert abs(share - frac) < 0.03, (cls, name, share)
    few = {("d", "x"): 3, ("d", "y"): 1, ("d", "z"): 1}
    assert sorted(assign_splits(few, dict.fromkeys(few, "c"), fracs, 0).values()) == ["test", "train", "val"]


def test_shared_busi_and_hc18(shared_dir, tmp_path):
    us = shared_dir / "us_data"
    if not (us / "BUSI").is_dir() or not (us / "HC18").is_dir():
        pytest.skip(f"{us} lacks BUSI/ or HC18/")
    # A layout of symlinks (sources stay where they are) plus the mask/annotation files the full sets hold.
    busi_src = sorted((us / "BUSI").rglob("*.png"))
    busi_pick = busi_src[::len(busi_src) // 12][:12]
    for src in busi_pick:
        link = tmp_path / "BUSI" / src.parent.parent.name / src.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(src)
    first = busi_pick[0]
    (tmp_path / "BUSI" / first.parent.parent.name / f"{first.stem}_mask.png").symlink_to(first)
    hc_src = sorted((us / "HC18" / "training_set").glob("*.png"))
    per_subject = Counter(p.name.split("_")[0] for p in hc_src)
    repeat_subjects = sorted(s for s, n in per_subject.items() if n >= 2)[:4]  # NNN_HC.png with NNN_2HC.png ...
    assert repeat_subjects, "the HC18 sample should hold subjects with several images"
    hc_pick = [p for p in hc_src if p.name.split("_")[0] in repeat_subjects] + hc_src[::40]
    (tmp_path / "HC18" / "training_set" / "mask").mkdir(parents=True)
    for src in dict.fromkeys(hc_pick):
        (tmp_path / "HC18" / "training_set" / src.name).symlink_to(src)
    (tmp_path / "HC18" / "training_set" / f"{hc_pick[0].stem}_Annotation.png").symlink_to(hc_pick[0])
    (tmp_path / "HC18" / "training_set" / "mask" / hc_pick[0].name).symlink_to(hc_pick[0])
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"datasets": [
        {"name": "busi", "adapter": "busi", "root": "BUSI", "class": "breast"},
        {"name": "hc18", "adapter": "hc18", "root": "HC18", "class": "fetal_head"},
    ]}))
    sources = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in busi_pick + hc_pick}
    out = tmp_path / "processed"
    stats = run(Config(recipe=str(recipe), out=str(out), workers=2, scan_area_samples=3))
    rows = read_manifest(out)
    n_images = len(busi_pick) + len(set(hc_pick))
    assert stats["files"] == n_images and stats["ignored"] == 3
    failed = [(r["source"], r["reason"]) for r in rows if r["status"] == "skipped" and "mask/annotation" not in r["reason"]]
    assert not failed, failed
    assert stats["ok"] == n_images
    check_outputs(out, rows)
    hc_rows = [r for r in rows if r["dataset"] == "hc18" and r["status"] == "ok"]
    assert {r["geometry"] for r in rows if r["status"] == "ok"} <= {"fan", "rect"}
    for subject in repeat_subjects:
        group = [r for r in hc_rows if r["subject"] == f"training_set/{subject}"]
        assert len(group) >= 2 and len({r["split"] for r in group}) == 1
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sources} == sources
    assert (out / "contact_sheets" / "breast.png").is_file() and (out / "contact_sheets" / "fetal_head.png").is_file()
    assert run(Config(recipe=str(recipe), out=str(out), workers=2, scan_area_samples=0))["processed"] == 0


# ---------------------------------------------------------------- bad input (issue #12)

def test_symlinked_folders_and_files_are_listed_once(tmp_path):
    root = tmp_path / "data"
    (root / "kidney" / "p1").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for path in (root / "kidney" / "p1" / "a.png", root / "kidney" / "p1" / "b.png", tmp_path / "elsewhere" / "c.png"):
        path.write_bytes(b"x")  # listing looks at names only
    (root / "kidney" / "p1" / "loop").symlink_to(".")  # used to list p1 41 times, down to the symlink depth limit
    (root / "kidney" / "p1" / "alias.png").symlink_to("a.png")
    (root / "kidney" / "link_to_p1").symlink_to("p1")
    (root / "kidney" / "ext1").symlink_to(tmp_path / "elsewhere")  # a folder outside: walked once, first link wins
    (root / "kidney" / "ext2").symlink_to(tmp_path / "elsewhere")
    chosen, ignored = list_sources([DatasetSpec("d", "folder", root, None)], Config())
    assert [src.path.relative_to(root).as_posix() for _, src, _, _ in chosen] == ["kidney/ext1/c.png", "kidney/p1/a.png", "kidney/p1/b.png"]
    link_reason = "link to a folder walked once under another path (a symlink loop or a second link)"
    assert {Path(r["source"]).relative_to(root).as_posix(): r["reason"] for r in ignored} == {
        "kidney/ext2": link_reason, "kidney/link_to_p1": link_reason, "kidney/p1/loop": link_reason,
        "kidney/p1/alias.png": f"same file as {root / 'kidney/p1/a.png'} (listed twice, e.g. through a symlink)",
    }
    # The same real file in two datasets is a recipe error, whatever path leads to it.
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "kidney").symlink_to(root / "kidney" / "p1")
    specs = [DatasetSpec("d", "folder", root, None), DatasetSpec("e", "folder", tmp_path / "again", None)]
    with pytest.raises(RecipeError, match=r"again/kidney/a\.png is the file .*p1/a\.png of dataset d again \(in dataset e\)"):
        list_sources(specs, Config())


def test_csv_paths_outside_the_table_folder_are_refused(tmp_path):
    table = tmp_path / "set" / "labels.csv"
    (table.parent / "sub").mkdir(parents=True)
    (table.parent / "sub" / "in.png").write_bytes(b"x")
    (tmp_path / "out.png").write_bytes(b"x")
    table.write_text("path,class\nsub/in.png,kidney\nsub/../sub/in.png,kidney\n../out.png,kidney\n/etc/shadow,kidney\n,kidney\n")
    listing = ADAPTERS["csv"](table, {})
    folder = table.parent
    assert [s.path for s in listing.sources] == [folder / "sub/in.png", folder / "sub/in.png"]  # the duplicate goes later
    refused = "leads outside the table's folder {}; refused (set options.allow_paths_outside_root to true to allow)"
    assert listing.ignored == [
        (tmp_path / "out.png", f"line 4 of {table}: path '../out.png' {refused.format(folder)}"),
        (Path("/etc/shadow"), f"line 5 of {table}: path '/etc/shadow' {refused.format(folder)}"),
        (folder, f"line 6 of {table}: empty 'path' cell"),
    ]
    allowed = ADAPTERS["csv"](table, {"allow_paths_outside_root": True})
    assert [s.path for s in allowed.sources][2:] == [tmp_path / "out.png", Path("/etc/shadow")]
    with pytest.raises(RecipeError, match="options.allow_paths_outside_root must be true or false, got 'yes'"):
        ADAPTERS["csv"](table, {"allow_paths_outside_root": "yes"})


def test_fifos_devices_and_outside_paths_are_skipped_unread(phantom_dir, tmp_path):
    """A FIFO named like an image, /dev/zero in a table and ../ or absolute table paths: skipped with the reason."""
    images = tmp_path / "images" / "kidney"
    images.mkdir(parents=True)
    shutil.copy(phantom_dir / "kidney" / "s0000_f0.png", images / "good.png")
    os.mkfifo(images / "x.png")  # hashing opened it and waited for a writer forever
    os.mkfifo(images / "IM0001")  # no suffix: DICOM sniffing opened it
    (tmp_path / "devices.csv").write_text("path,class\n/dev/zero,kidney\n")
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "labels.csv").write_text("path,class\n../images/kidney/good.png,kidney\n/etc/shadow,kidney\n")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"datasets": [
        {"name": "images", "adapter": "folder", "root": "images"},
        {"name": "devices", "adapter": "csv", "root": "devices.csv", "options": {"allow_paths_outside_root": True}},
        {"name": "table", "adapter": "csv", "root": "tables"},
    ]}))
    out = tmp_path / "out"
    with deadline(30):
        stats = run(Config(recipe=str(recipe), out=str(out), workers=1, scan_area_samples=0))
    reasons = {(r["dataset"], r["source"]): (r["status"], r["reason"]) for r in read_manifest(out)}
    refused = f"leads outside the table's folder {tmp_path / 'tables'}; refused (set options.allow_paths_outside_root to true to allow)"
    table = tmp_path / "tables" / "labels.csv"
    assert reasons == {
        ("images", str(images / "good.png")): ("ok", ""),
        ("images", str(images / "x.png")): ("skipped", "not a regular file: a named pipe (FIFO), not read"),
        ("images", str(images / "IM0001")): ("skipped", "not a regular file: a named pipe (FIFO), not read"),
        ("devices", "/dev/zero"): ("skipped", "not a regular file: a device, not read"),
        ("table", str(images / "good.png")): ("skipped", f"line 2 of {table}: path '../images/kidney/good.png' {refused}"),
        ("table", "/etc/shadow"): ("skipped", f"line 3 of {table}: path '/etc/shadow' {refused}"),
    }
    assert stats["ok"] == 1 and stats["skipped"] == 2 and stats["ignored"] == 3


def test_splits_are_made_from_the_images_subjects_gave(phantom_dir, tmp_path):
    """Unreadable files take no split slot, and a clip weighs as many images as it gave."""
    kidney = tmp_path / "data" / "kidney"
    kidney.mkdir(parents=True)
    frame = Image.open(phantom_dir / "kidney" / "s0000_f0.png")
    frame.save(kidney / "clip.tif", save_all=True, append_images=[frame] * 7)  # 8 frames
    for i, name in enumerate("abcd"):
        shutil.copy(phantom_dir / "kidney" / f"s000{i // 2}_f{i % 2}.png", kidney / f"{name}.png")
    for name in ("e", "f", "g"):
        (kidney / f"{name}.png").write_bytes(b"")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"datasets": [{"name": "d", "adapter": "folder", "root": "data"}]}))
    out = tmp_path / "out"
    stats = run(Config(recipe=str(recipe), out=str(out), workers=2, video_stride=1, val_frac=0.25, test_frac=0.25,
                       scan_area_samples=0, contact_sheet_images=4, near_duplicate_bits=-1))  # the clip repeats one frame
    rows = read_manifest(out)
    assert stats["ok"] == 12 and stats["skipped"] == 3
    split_of = {Path(r["source"]).name: r["split"] for r in rows}
    # The 8-frame clip fills train's half of the 12 images; the four single images share val and test.
    assert Counter(r["split"] for r in rows if r["status"] == "ok") == {"train": 8, "val": 2, "test": 2}
    assert split_of["clip.tif"] == "train"
    assert sorted(split_of[f"{n}.png"] for n in "abcd") == ["test", "test", "val", "val"]
    assert [split_of[f"{n}.png"] for n in "efg"] == ["", "", ""]  # no images, no split
    check_outputs(out, rows)
    assert not (out / ".incoming").exists()
    again = run(Config(recipe=str(recipe), out=str(out), workers=2, video_stride=1, val_frac=0.25, test_frac=0.25,
                       scan_area_samples=0, contact_sheet_images=4, near_duplicate_bits=-1))
    assert again["processed"] == 0 and read_manifest(out) == rows  # same weights, same splits: nothing moves


@pytest.mark.parametrize("override,message", [
    ({"size": 0}, "--size=0: must be in [32, 4096]"),
    ({"size": 5000}, "--size=5000: must be in [32, 4096]"),
    ({"video_stride": 0}, "--video_stride=0: must be >= 1"),
    ({"max_per_dataset": 0}, "--max_per_dataset=0: must be >= 1"),
    ({"workers": -1}, "--workers=-1: must be >= 0"),
    ({"val_frac": -0.1}, "--val_frac=-0.1: must be in [0, 1]"),
    ({"test_frac": math.nan}, "--test_frac=nan: must be in [0, 1]"),
    ({"val_frac": 0.5, "test_frac": 0.5}, "--val_frac=0.5 and --test_frac=0.5: their sum must be below 1 (train gets the rest)"),
    ({"square": "fit"}, "--square='fit': must be one of pad, crop"),
])
def test_bad_constants_are_refused_before_any_file_is_touched(tmp_path, override, message):
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as info:
        run(Config(phantom_dir=str(tmp_path / "none"), out=str(out), **override))
    assert str(info.value) == message
    assert not out.exists()


def test_output_folder_problems_are_clear_and_come_first(tmp_path, monkeypatch):
    (tmp_path / "imgs" / "kidney").mkdir(parents=True)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"datasets": [{"name": "x", "adapter": "folder", "root": "imgs"}]}))
    monkeypatch.setattr(prepare, "list_sources", lambda *a: pytest.fail("listed sources before checking --out"))
    a_file = tmp_path / "processed"
    a_file.write_text("keep me")
    with pytest.raises(ConfigError, match=rf"^--out: {a_file} exists and is not a folder$"):
        run(Config(recipe=str(recipe), out=str(a_file)))
    assert a_file.read_text() == "keep me"
    if os.geteuid() == 0:  # root writes through any mode bits; nobody may create files in /sys/kernel
        locked = Path("/sys/kernel")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
    denied = r"\((Permission denied|Operation not permitted)\)"
    with pytest.raises(ConfigError, match=rf"^--out: cannot write in {locked} {denied}$"):
        run(Config(recipe=str(recipe), out=str(locked)))
    # From the command line: the message, no traceback, exit status 1.
    monkeypatch.setattr(sys, "argv", ["prepare.py", f"--recipe={recipe}", f"--out={a_file}"])
    with pytest.raises(SystemExit) as info:
        prepare.main()
    assert info.value.code == f"error: --out: {a_file} exists and is not a folder"


@pytest.mark.parametrize("entry,message", [
    ({"options": []}, "field 'options' must be an object or null, got []"),
    ({"root": 5}, "field 'root' must be a string, got 5"),
    ({"name": ["x"]}, "field 'name' must be a string, got [\"x\"]"),
    ({"class": 1}, "field 'class' must be a string or null, got 1"),
    ({"adapter": {"csv": 1}}, "field 'adapter' must be a string, got {\"csv\": 1}"),
    ({"adapter": "hc18", "options": {"overlay_corners": [["top_left"]]}},
     "dataset x: hc18 adapter: options.overlay_corners must be a list of top_left, top_right, bottom_left, bottom_right, "
     "got [['top_left']]"),
    ({"adapter": "csv", "root": "t.csv", "options": {"path_col": 3}}, "dataset x: csv adapter: options.path_col must be a string, got 3"),
])
def test_recipe_fields_of_the_wrong_type_name_the_recipe_and_field(tmp_path, entry, message):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "t.csv").write_text("path\n")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"datasets": [{"name": "x", "adapter": "folder", "root": "imgs", **entry}]}))
    with pytest.raises(RecipeError) as info:
        run(Config(recipe=str(recipe), out=str(tmp_path / "out")))
    where = f"recipe {recipe}, dataset #0: " if message.startswith("field") else f"recipe {recipe}, "
    assert str(info.value) == where + message


HINT = "move it away or choose another --out"


def stable_int(text: str) -> int:
    """prepare._stable_int written out: the first 4 bytes of the sha256, little-endian."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def row(**values) -> dict:
    return {**dict.fromkeys(MANIFEST_COLUMNS, ""), **values}


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_fractions_summing_to_exactly_one_are_refused_and_just_below_pass():
    with pytest.raises(ConfigError) as info:
        check_config(Config(val_frac=0.6, test_frac=0.4))
    assert str(info.value) == "--val_frac=0.6 and --test_frac=0.4: their sum must be below 1 (train gets the rest)"
    check_config(Config(val_frac=0.6, test_frac=0.3999))
    check_config(Config(size=32, val_frac=0.0, test_frac=0.0, workers=0, contact_sheet_images=0, scan_area_samples=0))


def test_an_empty_out_is_refused():
    with pytest.raises(ConfigError) as info:
        check_config(Config(out=""))
    assert str(info.value) == "--out is empty: it must name the output folder"


def test_constants_out_of_range_are_refused_in_process():
    with pytest.raises(ConfigError) as info:
        check_config(Config(size=31))
    assert str(info.value) == "--size=31: must be in [32, 4096]"
    with pytest.raises(ConfigError) as info:
        check_config(Config(contact_sheet_images=-1))
    assert str(info.value) == "--contact_sheet_images=-1: must be >= 0"


def write_csv(path: Path, columns, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def test_previous_run_rows_and_constants_are_read_back(tmp_path):
    rows = [row(source="/a.png", sha256="1" * 64, status="ok", output="train/kidney/d__a.png"),
            row(source="/b.png", status="skipped", reason="empty file (0 bytes)", output="../not/checked")]
    write_csv(tmp_path / "manifest.csv", MANIFEST_COLUMNS, rows)
    (tmp_path / "config.json").write_text('{"size": 64, "square": "crop"}')
    assert read_previous_run(tmp_path) == (rows, {"size": 64, "square": "crop"})


def test_a_config_without_manifest_rows_is_not_read(tmp_path):
    (tmp_path / "config.json").write_text("not json")
    assert read_previous_run(tmp_path) == ([], None)
    write_csv(tmp_path / "manifest.csv", MANIFEST_COLUMNS, [])  # a header only: no rows either
    assert read_previous_run(tmp_path) == ([], None)


def test_cells_with_line_breaks_read_back_as_written(tmp_path):
    rows = [row(source="/odd\r\nname.png", status="skipped", reason="first line\r\nsecond line")]
    write_manifest(tmp_path / "manifest.csv", rows)
    assert read_previous_run(tmp_path) == (rows, None)


def test_rows_without_a_config_give_no_constants(tmp_path):
    rows = [row(source="/a.png", status="ok", output="val/c/x.png")]
    write_csv(tmp_path / "manifest.csv", MANIFEST_COLUMNS, rows)
    assert read_previous_run(tmp_path) == (rows, None)


def test_a_foreign_manifest_names_its_missing_columns_in_order(tmp_path):
    manifest = tmp_path / "manifest.csv"
    write_csv(manifest, ["source", "split", "status", "output", "extra"], [])
    missing = [c for c in MANIFEST_COLUMNS if c not in ("source", "split", "status", "output")]
    with pytest.raises(ConfigError) as info:
        read_previous_run(tmp_path)
    assert str(info.value) == f"{manifest}: not a manifest written by prepare.py (columns {missing} missing); {HINT}"
    manifest.write_text("")  # no header at all
    with pytest.raises(ConfigError) as info:
        read_previous_run(tmp_path)
    assert str(info.value) == f"{manifest}: not a manifest written by prepare.py (columns {list(MANIFEST_COLUMNS)} missing); {HINT}"


def test_a_manifest_that_is_not_text_is_refused(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes(b"source,sha256\n\xff\xfe\x00\x81\n")
    with pytest.raises(ConfigError) as info:
        read_previous_run(tmp_path)
    assert str(info.value) == f"{manifest}: not UTF-8 text (byte 14: invalid start byte); {HINT}"


@pytest.mark.parametrize("output", ["../../etc/passwd", "train/kidney/x.jpg", "kidney/x.png", "", "train/a b/x.png"])
def test_a_kept_row_whose_output_is_not_split_class_name_png_is_refused(tmp_path, output):
    """The outputs of the previous run are moved and deleted: a path outside <split>/<class>/ must never be."""
    manifest = tmp_path / "manifest.csv"
    write_csv(manifest, MANIFEST_COLUMNS, [row(status="ok", output="train/c/fine.png"), row(status="ok", output=output)])
    with pytest.raises(ConfigError) as info:
        read_previous_run(tmp_path)
    assert str(info.value) == (f"{manifest}: not a manifest written by prepare.py (output {output!r} is not "
                               f"<split>/<class>/<name>.png); {HINT}")


def test_a_kept_row_cut_short_before_its_output_is_refused(tmp_path):
    """A row that ends before the output column (a truncated manifest) has no output path at all."""
    manifest = tmp_path / "manifest.csv"
    write_csv(manifest, MANIFEST_COLUMNS, [row(status="ok", output="train/c/fine.png")])
    with open(manifest, "a") as handle:
        handle.write("/b.png," + "," * 6 + "ok\n")  # source ... status, then nothing
    with pytest.raises(ConfigError) as info:
        read_previous_run(tmp_path)
    assert str(info.value) == (f"{manifest}: not a manifest written by prepare.py (output '' is not "
                               f"<split>/<class>/<name>.png); {HINT}")


def test_a_bad_previous_config_is_refused(tmp_path):
    write_csv(tmp_path / "manifest.csv", MANIFEST_COLUMNS, [row(status="ok", output="train/c/x.png")])
    config = tmp_path / "config.json"
    config.write_text("{size: 64")
    with pytest.raises(ConfigError) as info:
        read_previous_run(tmp_path)
    assert str(info.value).startswith(f"{config}: not valid JSON: Expecting") and str(info.value).endswith(f"; {HINT}")
    config.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ConfigError, match=r"config.json: not UTF-8 text \(byte 7"):
        read_previous_run(tmp_path)
    config.write_text("[64, 256]")
    with pytest.raises(ConfigError) as info:
        read_previous_run(tmp_path)
    assert str(info.value) == f"{config}: not a JSON object of constants; {HINT}"


def recipe_error(tmp_path: Path, recipe) -> str:
    path = tmp_path / "recipe.json"
    path.write_text(recipe if isinstance(recipe, str) else json.dumps(recipe))
    with pytest.raises(RecipeError) as info:
        load_recipe(Config(recipe=str(path)))
    return str(info.value)


def test_the_default_recipe_is_the_phantom_table(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(Config(phantom_dir=str(tmp_path)))
    assert str(info.value) == (f"no --recipe given and {tmp_path}/labels.csv does not exist: make the phantoms first "
                               f"(python data_preprocessing/make_phantoms.py --out={tmp_path}) or pass --recipe=FILE.json")
    (tmp_path / "labels.csv").mkdir()  # a folder is not the table
    with pytest.raises(RecipeError):
        load_recipe(Config(phantom_dir=str(tmp_path)))
    (tmp_path / "labels.csv").rmdir()
    (tmp_path / "labels.csv").write_text("path,class\n")
    assert load_recipe(Config(phantom_dir=str(tmp_path))) == [DatasetSpec("phantoms", "csv", tmp_path, None, {})]


def test_a_recipe_that_is_not_a_json_file_is_refused(tmp_path):
    missing = tmp_path / "none.json"
    with pytest.raises(RecipeError) as info:
        load_recipe(Config(recipe=str(missing)))
    assert str(info.value) == f"recipe {missing}: does not exist"
    with pytest.raises(RecipeError) as info:
        load_recipe(Config(recipe=str(tmp_path)))
    assert str(info.value) == f"recipe {tmp_path}: not a regular file: a folder, not read"
    message = recipe_error(tmp_path, '{"datasets": [}')
    assert message.startswith(f"recipe {tmp_path / 'recipe.json'}: not valid JSON: Expecting value")
    (tmp_path / "recipe.json").write_bytes(b'{"datasets": "\xff"}')
    with pytest.raises(RecipeError, match=r"recipe.json: not UTF-8 text \(byte 14"):
        load_recipe(Config(recipe=str(tmp_path / "recipe.json")))


@pytest.mark.parametrize("recipe", [[], {"datasets": []}, {"datasets": {"name": "x"}}, {"sets": [{}]}, 5])
def test_a_recipe_without_a_list_of_datasets_is_refused(tmp_path, recipe):
    assert recipe_error(tmp_path, recipe) == (
        f"recipe {tmp_path / 'recipe.json'}: field 'datasets' must be a non-empty list: "
        '{"datasets": [{name, adapter, root, class, options}, ...]}')


def test_each_dataset_entry_is_checked_and_named_by_its_index(tmp_path):
    (tmp_path / "imgs").mkdir()
    good = {"name": "a", "adapter": "folder", "root": "imgs"}
    where = f"recipe {tmp_path / 'recipe.json'}, dataset #1"
    assert recipe_error(tmp_path, {"datasets": [good, ["x"]]}) == f"{where}: needs at least name, adapter and root"
    for key in ("name", "adapter", "root"):
        entry = {k: v for k, v in good.items() if k != key}
        assert recipe_error(tmp_path, {"datasets": [good, entry]}) == f"{where}: needs at least name, adapter and root"
    assert recipe_error(tmp_path, {"datasets": [good, {**good, "zeta": 1, "alpha": 2}]}) == (
        f"{where}: unknown keys ['alpha', 'zeta']")
    assert recipe_error(tmp_path, {"datasets": [good, {**good, "adapter": "dicom"}]}) == (
        f"{where}: unknown adapter 'dicom'; known: busi, hc18, camus, echonet, folder, csv, bus_bra, "
        "breast_lesions_usg, bus_uclm, bus_uc, buid, tn3k, tg3k, ddti, kidneyus, aul, abdomenus, ccaui, mmotu")
    for name in ("a b", "a/b", "", "é"):
        assert recipe_error(tmp_path, {"datasets": [good, {**good, "name": name}]}) == (
            f"{where}: name {name!r} must be letters, digits, _ or -")
    (tmp_path / "recipe.json").write_text(json.dumps({"datasets": [good, {**good, "name": "b", "root": "gone"}]}))
    missing = load_recipe(Config(recipe=str(tmp_path / "recipe.json")))[1]  # reported and left out, not an error
    assert missing.missing == f"root {tmp_path / 'gone'} does not exist"
    assert recipe_error(tmp_path, {"datasets": [good, {**good, "class": "breast"}]}) == (
        f"recipe {tmp_path / 'recipe.json'}: dataset names must be unique, got ['a', 'a']")


def test_recipe_roots_are_relative_to_the_recipe_and_fields_are_kept(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "set").mkdir(parents=True)
    (tmp_path / "sub" / "imgs").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    recipe = tmp_path / "sub" / "recipe.json"
    recipe.write_text(json.dumps({"datasets": [
        {"name": "rel", "adapter": "folder", "root": "imgs", "class": "liver", "options": {"subject": "parent"}},
        {"name": "abs", "adapter": "busi", "root": str(home / "set"), "class": None, "options": None},
        {"name": "tilde_2", "adapter": "csv", "root": "~/set"},
    ]}))
    assert load_recipe(Config(recipe=str(recipe))) == [
        DatasetSpec("rel", "folder", tmp_path / "sub" / "imgs", "liver", {"subject": "parent"}),
        DatasetSpec("abs", "busi", home / "set", None, {}),
        DatasetSpec("tilde_2", "csv", home / "set", None, {}),
    ]


def folder_set(root: Path, names: list[str]) -> None:
    for name in names:
        touch(root / name)  # listing looks at names only


def test_a_dataset_above_max_per_dataset_keeps_a_seeded_pick_in_listing_order(tmp_path, capsys):
    root = tmp_path / "set"
    names = [f"kidney/{i:02d}.png" for i in range(10)]
    folder_set(root, names)
    chosen, ignored = list_sources([DatasetSpec("dset", "folder", root, None)], Config(max_per_dataset=4, seed=3))
    pick = sorted(np.random.default_rng([3, stable_int("dset")]).choice(10, 4, replace=False))
    assert [src.path for _, src, _, _ in chosen] == [root / names[i] for i in pick]
    assert len(set(pick)) == 4 and ignored == []
    assert capsys.readouterr().out == (
        "dset: 10 files, using a seeded pick of 4 (max_per_dataset)\n"
        f"dset: 4 files (folder adapter, root {root}), 0 set aside (masks, annotations, duplicates, refused paths)\n")
    other = list_sources([DatasetSpec("dset", "folder", root, None)], Config(max_per_dataset=4, seed=4))[0]
    assert [s.path for _, s, _, _ in other] == [root / names[i] for i in sorted(
        np.random.default_rng([4, stable_int("dset")]).choice(10, 4, replace=False))]


def test_a_dataset_at_max_per_dataset_is_kept_whole(tmp_path, capsys):
    root = tmp_path / "set"
    names = [f"kidney/{i}.png" for i in range(4)]
    folder_set(root, names)
    chosen, _ = list_sources([DatasetSpec("d", "folder", root, None)], Config(max_per_dataset=4))
    assert [src.path for _, src, _, _ in chosen] == [root / n for n in names]
    assert "seeded pick" not in capsys.readouterr().out


@pytest.mark.parametrize("n_files,max_per_dataset,max_frames,budget", [
    (1, 25, 20, 20),  # one file may give max_frames_per_file frames
    (1, 25, 30, 25),  # ... but never more than the dataset's budget
    (10, 25, 5, 2),  # the dataset's images shared among its files
    (4, 4, 20, 1),
    (3, 2, 20, 1),  # two of three files picked, one frame each
])
def test_each_file_s_frame_budget_shares_the_dataset_s_images(tmp_path, n_files, max_per_dataset, max_frames, budget):
    root = tmp_path / "set"
    folder_set(root, [f"kidney/{i}.png" for i in range(n_files)])
    chosen, _ = list_sources([DatasetSpec("d", "folder", root, None)],
                             Config(max_per_dataset=max_per_dataset, max_frames_per_file=max_frames))
    assert [b for _, _, _, b in chosen] == [budget] * min(n_files, max_per_dataset)


def test_the_recipe_class_wins_over_the_layout_s_and_a_missing_or_bad_class_is_refused(tmp_path, capsys):
    root = tmp_path / "set"
    folder_set(root, ["kidney/a.png", "liver/b.png", "liver/b_mask.png"])
    spec = DatasetSpec("d", "folder", root, None)
    chosen, ignored = list_sources([spec], Config())
    assert [(s.name, src.path, cls, b) for s, src, cls, b in chosen] == [
        ("d", root / "kidney/a.png", "kidney", 20), ("d", root / "liver/b.png", "liver", 20)]
    assert ignored == [row(source=str(root / "liver/b_mask.png"), dataset="d", status="skipped",
                           reason="mask/annotation file (name ends in _mask/_Annotation/_gt/_seg), not an image")]
    assert capsys.readouterr().out.splitlines()[0] == (
        f"d: 2 files (folder adapter, root {root}), 1 set aside (masks, annotations, duplicates, refused paths)")
    other = tmp_path / "other"
    touch(other / "x" / "c.png")
    chosen, _ = list_sources([DatasetSpec("o", "folder", other, "thyroid")], Config())
    assert [(src.path, cls) for _, src, cls, _ in chosen] == [(other / "x/c.png", "thyroid")]
    busi = tmp_path / "busi"
    touch(busi / "benign" / "benign (1).png")
    with pytest.raises(RecipeError) as info:
        list_sources([DatasetSpec("b", "busi", busi, None)], Config())
    assert str(info.value) == f'dataset b: no class for {busi / "benign/benign (1).png"}: give "class" in the recipe'
    with pytest.raises(RecipeError) as info:
        list_sources([DatasetSpec("b", "busi", busi, "fetal head")], Config())
    assert str(info.value) == "dataset b: class 'fetal head' must be letters, digits, _ or -"


def test_each_dataset_s_line_counts_only_its_own_set_aside_files(tmp_path, capsys):
    folder_set(tmp_path / "a", ["kidney/x.png", "kidney/x_mask.png", "kidney/y_gt.png"])
    folder_set(tmp_path / "b", ["liver/z.png", "liver/z_mask.png"])
    list_sources([DatasetSpec("a", "folder", tmp_path / "a", None), DatasetSpec("b", "folder", tmp_path / "b", None)],
                 Config())
    assert [line.split("), ")[1] for line in capsys.readouterr().out.splitlines()] == [
        "2 set aside (masks, annotations, duplicates, refused paths)",
        "1 set aside (masks, annotations, duplicates, refused paths)"]


def test_an_adapter_s_refusal_names_the_recipe_and_the_dataset(tmp_path):
    spec = DatasetSpec("d", "folder", tmp_path, None, {"subject": "patient"})
    adapter_says = "folder adapter: options.subject must be 'stem' or 'parent', got 'patient'"
    with pytest.raises(RecipeError) as info:
        list_sources([spec], Config())
    assert str(info.value) == f"dataset d: {adapter_says}"
    with pytest.raises(RecipeError) as info:
        list_sources([spec], Config(recipe="r.json"))
    assert str(info.value) == f"recipe r.json, dataset d: {adapter_says}"


def test_file_keys_follow_symlinks_and_fall_back_to_the_path(tmp_path):
    target = touch(tmp_path / "a.png")
    (tmp_path / "b.png").symlink_to(target)
    info = os.stat(target)
    assert prepare._file_key(tmp_path / "b.png") == ("inode", info.st_dev, info.st_ino) == prepare._file_key(target)
    assert prepare._file_key(Path("gone.png")) == ("path", str(Path("gone.png").absolute()))


def test_stable_int_is_the_first_four_sha256_bytes_little_endian():
    assert prepare._stable_int("breast") == stable_int("breast")
    assert prepare._stable_int("") == 0x42C4B0E3  # sha256(b"") begins e3 b0 c4 42


def test_subjects_go_largest_first_to_the_split_furthest_below_its_share():
    weights = {("d", n): w for n, w in zip("abcde", (10, 5, 3, 2, 1))}
    fracs = {"train": 0.5, "val": 0.3, "test": 0.2}
    # 10 -> train (all empty: the first split wins the tie); 5 -> val; 3 -> test; 2 -> test (3/0.2 = 15 below
    # train's 10/0.5 = 20 and val's 5/0.3 = 16.7); 1 -> val (16.7 below 20 and 25)
    expected = {("d", "a"): "train", ("d", "b"): "val", ("d", "c"): "test", ("d", "d"): "test", ("d", "e"): "val"}
    for seed in (0, 1, 2):  # distinct sizes: the seed only orders equal ones
        assert assign_splits(weights, dict.fromkeys(weights, "c"), fracs, seed) == expected


def test_a_split_with_no_share_gets_no_subject():
    weights = {("d", str(i)): 1 for i in range(6)}
    split = assign_splits(weights, dict.fromkeys(weights, "c"), {"train": 0.7, "val": 0.0, "test": 0.3}, 0)
    assert sorted(split.values()) == ["test", "test", "train", "train", "train", "train"]
    only = assign_splits(weights, dict.fromkeys(weights, "c"), {"train": 1.0, "val": 0.0, "test": 0.0}, 0)
    assert set(only.values()) == {"train"}


def test_equal_subjects_take_the_seeded_order_of_their_class():
    weights, classes = {}, {}
    for cls in ("kidney", "liver"):
        for i in range(5):
            weights[(f"ds_{cls}", f"s{i}")] = 2
            classes[(f"ds_{cls}", f"s{i}")] = cls
    fracs = {"train": 0.6, "val": 0.2, "test": 0.2}
    for seed in (0, 7):
        split = assign_splits(weights, classes, fracs, seed)
        for cls in ("kidney", "liver"):
            subjects = sorted(s for s in weights if classes[s] == cls)
            order = [subjects[i] for i in np.random.default_rng([seed, stable_int(cls)]).permutation(5)]
            # equal weights: train, val, test, then train twice (2/0.6 and 4/0.6 stay below 2/0.2)
            assert [split[s] for s in order] == ["train", "val", "test", "train", "train"], (seed, cls)


def test_a_subject_of_one_class_never_shares_another_class_s_fill():
    weights = {("d", "big"): 100, ("d", "k1"): 1, ("d", "k2"): 1}
    classes = {("d", "big"): "liver", ("d", "k1"): "kidney", ("d", "k2"): "kidney"}
    split = assign_splits(weights, classes, {"train": 0.5, "val": 0.5, "test": 0.0}, 0)
    assert split[("d", "big")] == "train"
    assert sorted(split[s] for s in (("d", "k1"), ("d", "k2"))) == ["train", "val"]


def test_output_names_are_readable_and_hashed_only_where_two_collide():
    def entry(dataset: str, path: str, cls: str):
        return (DatasetSpec(dataset, "folder", Path("/r"), None), Source(Path(path), "s"), cls, 1)

    chosen = [entry("d", "/r/a/scan 1.png", "kidney"), entry("d", "/r/b/scan 1.png", "kidney"),
              entry("d", "/r/c/scan 1.png", "liver"), entry("e", "/r/a/scan 1.png", "kidney"),
              entry("d", "/r/__.png", "liver"), entry("d", "/r/x.y-z.nii.gz", "liver"), entry("d", "/r/_é_q_.dcm", "liver"),
              entry("d", "/r/Xray (IM_07)X.PNG", "liver")]
    short = [hashlib.sha1(p.encode()).hexdigest()[:8] for p in ("/r/a/scan 1.png", "/r/b/scan 1.png")]
    assert output_names(chosen) == [f"d__scan_1_{short[0]}", f"d__scan_1_{short[1]}", "d__scan_1", "e__scan_1",
                                    "d__image", "d__x.y-z", "d__q", "d__Xray_IM_07_X"]


def test_output_name_and_row():
    assert output_name("d__a", "f012") == "d__a_f012.png"
    assert output_name("d__a", "") == "d__a.png"
    assert prepare._row(status="ok", frame="f1") == row(status="ok", frame="f1")
    assert list(prepare._row()) == list(MANIFEST_COLUMNS)


def area(annotations: dict | None = None) -> ScanArea:
    mask = np.zeros((60, 80), bool)
    mask[10:50, 5:70] = True
    mask[10:20, 5:15] = False
    return ScanArea("fan", mask, (5, 10, 70, 50), annotations or {})


FRAME = np.random.default_rng(0).integers(0, 256, (60, 80), dtype=np.uint8)


def make_task(path: Path, prev_rows=(), max_frames: int = 7) -> Task:
    return Task(Source(path, "subj", None, "rect", ("bottom_right",)), "d", "kidney", "d__a", max_frames, list(prev_rows))


def base_of(path: Path, sha: str = "") -> dict:
    return row(source=str(path.absolute()), dataset="d", **{"class": "kidney"}, subject="subj", geometry_expected="rect",
               sha256=sha)


@pytest.fixture
def fake_frames(monkeypatch):
    """read_frames and detect_scan_area stood in for: the frames given, the calls recorded."""
    calls = {"read": [], "detect": []}
    frames = {"f0": FRAME, "f3": 255 - FRAME}
    areas = {}

    def read_frames(path, video_stride=10, max_frames=None):
        calls["read"].append((Path(path), video_stride, max_frames))
        yield from frames.items()

    def detect(frame, overlay_corners=()):
        calls["detect"].append(overlay_corners)
        found = areas.get(int(frame[0, 0]), area())
        if isinstance(found, Exception):
            raise found
        return found

    monkeypatch.setattr(prepare, "read_frames", read_frames)
    monkeypatch.setattr(prepare, "detect_scan_area", detect)
    return calls, frames, areas


def test_a_source_s_frames_become_rows_and_staged_images(tmp_path, fake_frames):
    calls, frames, _ = fake_frames
    src = touch(tmp_path / "a.png", b"some bytes")
    out = tmp_path / "out"
    cfg = Config(size=48, square="crop", video_stride=3)
    rows, reused = prepare.process_source(make_task(src, max_frames=5), out, cfg)
    sha = hashlib.sha256(b"some bytes").hexdigest()
    info = dict(geometry="fan", crop_box="5 10 70 50", calipers=0, text=0, color=0, status="ok")
    assert (rows, reused) == ([
        {**base_of(src, sha), **info, "frame": "f0", "output": ".incoming/kidney/d__a_f0.png"},
        {**base_of(src, sha), **info, "frame": "f3", "output": ".incoming/kidney/d__a_f3.png"}], False)
    assert calls == {"read": [(src, 3, 5)], "detect": [("bottom_right",), ("bottom_right",)]}
    for key, frame in frames.items():
        data = (out / ".incoming" / "kidney" / f"d__a_{key}.png").read_bytes()
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), to_model_image(frame, area(), size=48, square="crop"))
        zlib_flags = data[data.index(b"IDAT") + 5]
        assert zlib_flags >> 6 == 0  # the zlib header's level field: written at the fastest level (compress_level=1)


def test_a_frame_without_scan_area_is_skipped_with_the_detector_s_reason(tmp_path, fake_frames):
    _, frames, areas = fake_frames
    areas[int(FRAME[0, 0])] = ScanAreaError("image is blank (max grey 3): no scan area")
    areas[int(255 - FRAME[0, 0])] = IndexError("index 7 is out of bounds")
    src = touch(tmp_path / "a.png")
    rows, _ = prepare.process_source(make_task(src), tmp_path / "out", Config())
    sha = hashlib.sha256(b"x").hexdigest()
    assert rows == [
        {**base_of(src, sha), "frame": "f0", "status": "skipped",
         "reason": "no scan area found: image is blank (max grey 3): no scan area"},
        {**base_of(src, sha), "frame": "f3", "status": "skipped",
         "reason": "unexpected IndexError in scan-area detection: index 7 is out of bounds"}]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [True, False])
def test_annotated_frames_are_flagged_and_dropped_only_when_asked(tmp_path, fake_frames, keep):
    _, _, areas = fake_frames
    areas[int(FRAME[0, 0])] = area({"calipers": True, "text": False, "color": 1})
    areas[int(255 - FRAME[0, 0])] = area({"text": True})
    src = touch(tmp_path / "a.png")
    rows, _ = prepare.process_source(make_task(src), tmp_path / "out", Config(keep_annotated=keep))
    assert [(r["calipers"], r["text"], r["color"], r["crop_box"], r["geometry"]) for r in rows] == [
        (1, 0, 1, "5 10 70 50", "fan"), (0, 1, 0, "5 10 70 50", "fan")]
    if keep:
        assert [(r["status"], r["reason"], r["output"]) for r in rows] == [
            ("ok", "", ".incoming/kidney/d__a_f0.png"), ("ok", "", ".incoming/kidney/d__a_f3.png")]
    else:
        assert [(r["status"], r["reason"], r["output"]) for r in rows] == [
            ("skipped", "burned-in annotations (calipers, color) excluded: keep_annotated=false", ""),
            ("skipped", "burned-in annotations (text) excluded: keep_annotated=false", "")]
        assert rows[1] == {**base_of(src, hashlib.sha256(b"x").hexdigest()), "frame": "f3", "geometry": "fan",
                           "crop_box": "5 10 70 50", "calipers": 0, "text": 1, "color": 0, "status": "skipped",
                           "reason": "burned-in annotations (text) excluded: keep_annotated=false"}
        assert not (tmp_path / "out").exists()


def test_an_unreadable_source_is_one_skipped_row(tmp_path, monkeypatch):
    src = touch(tmp_path / "a.png")
    sha = hashlib.sha256(b"x").hexdigest()

    def unreadable(path, video_stride=10, max_frames=None):
        raise UnreadableFileError(path, "not a recognisable image")
        yield

    monkeypatch.setattr(prepare, "read_frames", unreadable)
    assert prepare.process_source(make_task(src), tmp_path, Config()) == (
        [{**base_of(src, sha), "status": "skipped", "reason": "not a recognisable image"}], False)

    def broken(path, video_stride=10, max_frames=None):
        yield "f0", FRAME
        raise KeyError("frame_count")

    monkeypatch.setattr(prepare, "read_frames", broken)
    monkeypatch.setattr(prepare, "detect_scan_area", lambda frame, overlay_corners=(): area())
    rows, reused = prepare.process_source(make_task(src), tmp_path, Config())
    assert [(r["frame"], r["status"], r["reason"]) for r in rows] == [
        ("f0", "ok", ""), ("", "skipped", "unexpected KeyError while reading: 'frame_count'")]
    assert rows[1] == {**base_of(src, sha), "status": "skipped", "reason": "unexpected KeyError while reading: 'frame_count'"}
    assert reused is False


def test_a_missing_or_special_source_is_skipped_before_it_is_hashed(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "file_sha256", lambda path: pytest.fail("hashed a file that is not a regular one"))
    missing = tmp_path / "gone.png"
    assert prepare.process_source(make_task(missing), tmp_path, Config()) == (
        [{**base_of(missing), "status": "skipped", "reason": "file not found"}], False)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert prepare.process_source(make_task(fifo), tmp_path, Config()) == (
        [{**base_of(fifo), "status": "skipped", "reason": "not a regular file: a named pipe (FIFO), not read"}], False)


def test_a_source_that_cannot_be_hashed_is_skipped_with_the_os_reason(tmp_path, monkeypatch):
    src = touch(tmp_path / "a.png")

    def denied(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(prepare, "file_sha256", denied)
    assert prepare.process_source(make_task(src), tmp_path, Config()) == (
        [{**base_of(src), "status": "skipped", "reason": "cannot read file: Permission denied"}], False)

    def bare(path):
        raise OSError("stale NFS handle")

    monkeypatch.setattr(prepare, "file_sha256", bare)
    assert prepare.process_source(make_task(src), tmp_path, Config())[0][0]["reason"] == "cannot read file: stale NFS handle"


def previous_rows(tmp_path: Path, src: Path, sha: str) -> list[dict]:
    """Two kept frames and one skipped, as the previous run's manifest holds them."""
    old = dict(source=str(src), dataset="old", **{"class": "kidney"}, subject="old", sha256=sha, split="val")
    rows = [row(**old, frame="f0", status="ok", output="val/kidney/d__a_f0.png", geometry="fan"),
            row(**old, frame="f3", status="ok", output="val/kidney/d__a_f3.png", geometry="rect"),
            row(**old, frame="f6", status="skipped", reason="no scan area found: blank")]
    for r in rows[:2]:
        touch(tmp_path / r["output"])
    return rows


def test_an_unchanged_source_reuses_its_rows_with_today_s_dataset_and_subject(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "read_frames", lambda *a, **k: pytest.fail("re-read an unchanged source"))
    src = touch(tmp_path / "a.png")
    sha = hashlib.sha256(b"x").hexdigest()
    prev = previous_rows(tmp_path, src, sha)
    rows, reused = prepare.process_source(make_task(src, prev), tmp_path, Config())
    assert reused is True
    assert rows == [{**r, **{k: v for k, v in base_of(src, sha).items() if k in (
        "source", "dataset", "class", "subject", "geometry_expected", "sha256")}} for r in prev]
    assert [(r["frame"], r["split"], r["output"], r["geometry"]) for r in rows] == [
        ("f0", "val", "val/kidney/d__a_f0.png", "fan"), ("f3", "val", "val/kidney/d__a_f3.png", "rect"), ("f6", "val", "", "")]
    assert rows[0]["dataset"] == "d" and rows[0]["subject"] == "subj"


@pytest.mark.parametrize("change", ["content", "one_sha", "output_gone", "renamed", "no_rows"])
def test_a_changed_source_or_a_lost_output_is_processed_again(tmp_path, fake_frames, change):
    src = touch(tmp_path / "a.png")
    sha = hashlib.sha256(b"x").hexdigest()
    prev = previous_rows(tmp_path, src, sha)
    if change == "content":
        src.write_bytes(b"y")
    elif change == "one_sha":
        prev[2]["sha256"] = "0" * 64
    elif change == "output_gone":
        (tmp_path / prev[1]["output"]).unlink()
    elif change == "renamed":  # the name now carries a hash (another file of that stem came in)
        prev[1]["output"] = "val/kidney/d__a_1234abcd_f3.png"
        touch(tmp_path / prev[1]["output"])
    else:
        prev = []
    rows, reused = prepare.process_source(make_task(src, prev), tmp_path, Config(size=32))
    assert reused is False and [(r["frame"], r["output"]) for r in rows] == [
        ("f0", ".incoming/kidney/d__a_f0.png"), ("f3", ".incoming/kidney/d__a_f3.png")]


def test_a_skipped_previous_row_needs_no_output_file(tmp_path, monkeypatch):
    src = touch(tmp_path / "a.png")
    sha = hashlib.sha256(b"x").hexdigest()
    prev = [row(source=str(src), sha256=sha, frame="", status="skipped", reason="no scan area found: blank",
                output="val/kidney/d__b.png")]
    rows, reused = prepare.process_source(make_task(src, prev), tmp_path, Config())
    assert reused is True and rows[0]["reason"] == "no scan area found: blank"


def test_outputs_move_without_a_staging_folder_there_yet(tmp_path):
    rows = [row(dataset="d", subject="s1", **{"class": "c"}, status="ok", output="val/c/a.png"),
            row(dataset="d", subject="s2", **{"class": "c"}, status="ok", output="train/c/b.png")]
    touch(tmp_path / "val/c/a.png", b"a")
    touch(tmp_path / "train/c/b.png", b"b")
    place_outputs(rows, tmp_path, {("d", "s1"): "test", ("d", "s2"): "train"})
    assert [r["output"] for r in rows] == ["test/c/a.png", "train/c/b.png"]
    assert (tmp_path / "test/c/a.png").read_bytes() == b"a" and not (tmp_path / ".incoming").exists()
    place_outputs(rows, tmp_path, {("d", "s1"): "test", ("d", "s2"): "train"})  # nothing moves, nothing staged
    assert [r["output"] for r in rows] == ["test/c/a.png", "train/c/b.png"]


def test_outputs_move_to_their_subject_s_split_and_the_staging_folder_goes(tmp_path):
    out = tmp_path
    rows = [  # the skipped rows and the one already in place come first: the rows after them still move
        row(dataset="d", subject="s4", **{"class": "liver"}, status="skipped"),
        row(dataset="e", subject="s1", **{"class": "kidney"}, status="skipped"),
        row(dataset="d", subject="s3", **{"class": "liver"}, status="ok", output="test/liver/d__c.png"),
        row(dataset="d", subject="s1", **{"class": "kidney"}, status="ok", output=".incoming/kidney/d__a.png"),
        row(dataset="d", subject="s2", **{"class": "kidney"}, status="ok", output="val/kidney/d__b.png"),
    ]
    for r, data in zip(rows[2:], (b"c", b"a", b"b")):
        touch(out / r["output"], data)
    touch(out / ".incoming" / "kidney" / "orphan.png")
    split_of = {("d", "s1"): "train", ("d", "s2"): "train", ("d", "s3"): "test", ("d", "s4"): "val"}
    place_outputs(rows, out, split_of)
    assert [(r["split"], r["output"]) for r in rows] == [
        ("val", ""), ("", ""), ("test", "test/liver/d__c.png"), ("train", "train/kidney/d__a.png"),
        ("train", "train/kidney/d__b.png")]
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert files == {"train/kidney/d__a.png": b"a", "train/kidney/d__b.png": b"b", "test/liver/d__c.png": b"c"}
    assert not (out / ".incoming").exists()


def test_the_manifest_is_the_rows_in_column_order(tmp_path):
    rows = [row(source="/a,b.png", status="ok", frame="f1", calipers=1),
            row(source="/c.png", status="skipped", reason='said "no"')]
    write_manifest(tmp_path / "m.csv", rows)
    header = ",".join(MANIFEST_COLUMNS)
    assert (tmp_path / "m.csv").read_bytes().decode() == (  # bytes: lines end in \n alone, not csv's \r\n
        f"{header}\n" + '"/a,b.png",,,,,,f1,ok,,,,,1,,,\n' + '/c.png,,,,,,,skipped,"said ""no""",,,,,,,\n')


def test_plot_counts_counts_kept_images_per_split_and_class(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(prepare, "bar_counts", lambda *args: drawn.append(args))
    rows = [row(**{"class": c}, split=s, status=st) for c, s, st in [
        ("kidney", "train", "ok"), ("kidney", "train", "ok"), ("liver", "train", "ok"), ("kidney", "val", "ok"),
        ("liver", "test", "skipped"), ("liver", "", "skipped")]]
    counts = prepare.plot_counts(rows, tmp_path)
    assert counts == {"train": {"kidney": 2, "liver": 1}, "val": {"kidney": 1}, "test": {}}
    assert list(counts) == ["train", "val", "test"]
    assert drawn == [(counts, tmp_path / "per_class_by_split.png", "processed images per class and split")]


def grey_rows(tmp_path: Path, per_class: dict[str, int]) -> list[dict]:
    """Kept rows whose images are grey levels 10, 20, ... in listing order (a bright stripe down the middle, so the
    resampling filter shows), plus a skipped row per class."""
    rows, level = [], 10
    for cls, n in per_class.items():
        for i in range(n):
            out = f"train/{cls}/{i}.png"
            touch(tmp_path / out)
            image = np.full((40, 30), level, np.uint8)
            image[:, 14:16] = 250
            Image.fromarray(image).save(tmp_path / out)
            rows.append(row(**{"class": cls}, status="ok", output=out, source=f"/{cls}/{i}"))
            level += 10
        rows.append(row(**{"class": cls}, status="skipped", output="", source=f"/{cls}/bad"))
    return rows


def test_contact_sheets_show_a_seeded_pick_of_each_class_in_order(tmp_path, monkeypatch):
    grids = {}
    monkeypatch.setattr(prepare, "save_image", lambda image, path: grids.__setitem__(Path(path), image))
    rows = grey_rows(tmp_path, {"liver": 12, "kidney": 3})
    prepare.contact_sheets(rows, tmp_path, Config(contact_sheet_images=9, seed=5))
    assert list(grids) == [tmp_path / "contact_sheets" / "kidney.png", tmp_path / "contact_sheets" / "liver.png"]
    for cls, first_level, n in (("liver", 10, 12), ("kidney", 130, 3)):
        pick = sorted(np.random.default_rng([5, stable_int(cls)]).permutation(n)[:9])
        grid = grids[tmp_path / "contact_sheets" / f"{cls}.png"]
        cols = min(8, len(pick))
        assert grid.shape == (2 + -(-len(pick) // 8) * 130, 2 + cols * 130, 3)
        levels = [int(grid[2 + (k // 8) * 130 + 10, 2 + (k % 8) * 130 + 10, 0]) for k in range(len(pick))]
        assert levels == [first_level + 10 * int(i) for i in pick], cls
        thumb = Image.open(tmp_path / f"train/{cls}/{pick[0]}.png").convert("RGB").resize((128, 128), Image.BILINEAR)
        assert np.array_equal(grid[2:130, 2:130], np.asarray(thumb))  # bilinear thumbnails of 128 px


def test_no_contact_sheets_when_none_are_asked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "save_image", lambda *a: pytest.fail("drew a contact sheet"))
    prepare.contact_sheets(grey_rows(tmp_path, {"liver": 2}), tmp_path, Config(contact_sheet_images=0))


def test_scan_area_picks_are_a_seeded_few_kept_rows_per_class(tmp_path):
    rows = [row(**{"class": c}, status=st, source=f"/{c}/{i}") for c, n in (("liver", 9), ("kidney", 2))
            for i in range(n) for st in ("ok", "skipped")]
    picks = prepare.scan_area_picks(rows, Config(scan_area_samples=3, seed=2))
    expected = []
    for cls, n in (("kidney", 2), ("liver", 9)):
        order = sorted(np.random.default_rng([2, stable_int(cls), 1]).permutation(n)[:3])
        expected += [f"/{cls}/{i}" for i in order]
    assert [(p["source"], p["status"]) for p in picks] == [(s, "ok") for s in expected]
    assert prepare.scan_area_picks(rows, Config(scan_area_samples=0)) == []


def test_a_scan_panel_re_reads_its_own_frame(tmp_path, fake_frames):
    calls, frames, areas = fake_frames
    r = row(source=str(tmp_path / "clip.avi"), frame="f3")
    found = prepare.scan_panel((r, 4, ("top_left",)))
    assert found[0] is r and found[1] is frames["f3"] and found[2].box == (5, 10, 70, 50)
    assert calls == {"read": [(tmp_path / "clip.avi", 4, None)], "detect": [("top_left",)]}
    assert prepare.scan_panel((row(source="x", frame="f9"), 4, ())) is None
    areas[int(FRAME[0, 0])] = ScanAreaError("blank")
    assert prepare.scan_panel((row(source="x", frame="f0"), 4, ())) is None


def test_a_scan_panel_of_a_file_gone_unreadable_is_left_out(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    assert prepare.scan_panel((row(source=str(tmp_path / "a.png"), frame=""), 10, ())) is None


def drawn_figures(monkeypatch) -> list:
    """save_figure stood in for: the (figure, path) pairs it was given, the figures left open to inspect."""
    saved = []
    monkeypatch.setattr(prepare, "save_figure", lambda fig, path: saved.append((fig, Path(path))))
    return saved


def test_the_scan_area_figure_tints_the_outside_boxes_the_crop_and_names_each_panel(tmp_path, monkeypatch):
    saved = drawn_figures(monkeypatch)
    long_name = "a_source_file_name_longer_than_thirty.png"
    frames = [np.full((60, 80), v, np.uint8) for v in (10, 20, 30, 40)]
    panels = [(row(**{"class": "liver"}, source=f"/x/{long_name}", frame="f30"), frames[0],
               area({"calipers": True, "text": False, "color": True})),
              (row(**{"class": "kidney"}, source="/x/k1.png", frame=""), frames[1], area()),
              (row(**{"class": "kidney"}, source="/x/k2.png", frame="f2"), frames[2], area({"text": True})),
              (row(**{"class": "kidney"}, source="/x/k3.png", frame=""), frames[3], area())]
    prepare.scan_area_figure(panels, tmp_path)
    (fig, path), = saved
    assert path == tmp_path / "scan_area_samples.png"
    assert isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)
    assert tuple(fig.get_size_inches()) == (12.0, 6.8)  # 3 per class (kidney's count) x 2 classes
    assert fig._suptitle.get_text() == ("originals: red tint = outside the detected scan area (blanked), yellow = crop "
                                        "box")
    axes = fig.axes
    assert len(axes) == 6 and not any(ax.axison for ax in axes)
    grid = [[ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start] for ax in axes]
    assert grid == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]  # classes sorted by row, panels along a row
    outside = np.zeros((60, 80, 4))
    outside[~area().mask] = (1.0, 0.0, 0.0, 0.35)
    titles = ["kidney: k1.png\nfan, clean", "kidney: k2.png f2\nfan, text", "kidney: k3.png\nfan, clean",
              f"liver: {(long_name + ' f30')[-30:]}\nfan, calipers,color"]
    for ax, frame, title in zip(axes[:4], (frames[1], frames[2], frames[3], frames[0]), titles):
        shown, tint = ax.images
        assert np.array_equal(shown.get_array(), frame) and shown.get_cmap().name == "gray"
        assert shown.get_clim() == (0, 255)
        assert np.allclose(np.ma.filled(tint.get_array(), np.nan), outside)  # nothing masked: every pixel tinted
        assert ax.get_title() == title and ax.title.get_fontsize() == 8
        box, = ax.patches
        assert isinstance(box, Rectangle) and not box.get_fill() and box.get_linewidth() == 1.0
        assert (box.get_x(), box.get_y(), box.get_width(), box.get_height()) == (4.5, 9.5, 65, 40)
        assert box.get_edgecolor() == matplotlib.colors.to_rgba("yellow")
    assert all(len(ax.images) == len(ax.patches) == 0 for ax in axes[4:])  # liver has one panel: two stay empty
    plt.close(fig)
    prepare.scan_area_figure(panels[1:2], tmp_path)  # one panel: a 1 x 1 grid
    fig = saved[-1][0]
    assert len(fig.axes) == 1 and tuple(fig.get_size_inches()) == (4.0, 3.4)
    plt.close(fig)


def test_the_summary_prints_counts_splits_the_commonest_reasons_and_geometry_agreement(tmp_path, capsys):
    reasons = [f"reason {i}" for i in range(9)]
    rows = ([row(status="skipped", reason=r) for i, r in enumerate(reasons) for _ in range(9 - i)]
            + [row(status="skipped", reason="reason 8")] * 2  # 3 of reason 8: above reason 6 and 7
            + [row(status="ok", reason="not counted", geometry="fan", geometry_expected=g) for g in ("fan", "rect", "")]
            + [row(status="ok", geometry="rect", geometry_expected="rect")]
            + [row(status="skipped", geometry="fan", geometry_expected="fan", reason="reason 0")])
    counts = {"train": {"liver": 2, "kidney": 5}, "val": {}, "test": {"kidney": 1}}
    stats = {"files": 7, "processed": 3, "reused": 4, "ok": 6, "skipped": 2, "ignored": 1, "near_duplicates": 0,
             "missing": [], "seconds": 12.345}
    prepare._print_summary(rows, counts, stats, tmp_path)
    assert capsys.readouterr().out.split("\n") == [
        "7 files: 3 processed, 4 unchanged since the last run; 6 images kept, 2 skipped, 1 set aside (masks, "
        "annotations, duplicates, refused paths) (12.3 s)",
        "  train kidney=5  liver=2", "  val   ", "  test  kidney=1",
        "  skipped 10x: reason 0", "  skipped 8x: reason 1", "  skipped 7x: reason 2", "  skipped 6x: reason 3",
        "  skipped 5x: reason 4", "  skipped 4x: reason 5", "  skipped 3x: reason 6", "  skipped 3x: reason 8",
        "  detected geometry matches the labelled one for 2/3 images",
        f"manifest: {tmp_path / 'manifest.csv'}; plots: per_class_by_split.png, contact_sheets/, scan_area_samples.png",
        ""]
    prepare._print_summary([row(status="ok", geometry="fan")], counts, stats, tmp_path)  # no labelled geometry
    assert "detected geometry" not in capsys.readouterr().out
    twins = [row(status="skipped", reason="near-duplicate of a: x.png (another dataset, perceptual hashes 3 bits apart)"),
             row(status="skipped", reason="near-duplicate of b: y.png (perceptual hashes 0 bits apart)")]
    prepare._print_summary(twins, counts, {**stats, "near_duplicates": 2, "missing": ["ddti", "tg3k"]}, tmp_path)
    printed = capsys.readouterr().out.split("\n")
    assert "  near-duplicates dropped before splitting: 2 (1 of an image in another dataset); each row's reason names " \
           "the image kept" in printed
    assert "  datasets missing or without images (the run went on without them): ddti, tg3k" in printed


@pytest.fixture
def quick_run(tmp_path, monkeypatch):
    """A folder dataset of 6 files (3 subjects of kidney, 1 of liver) run in process with one worker, every
    frame read as FRAME and found as area(), no plots: (recipe path, out, a run(**overrides) function)."""
    monkeypatch.setattr(prepare, "read_frames", lambda path, video_stride=10, max_frames=None: iter([("", FRAME)]))
    monkeypatch.setattr(prepare, "detect_scan_area", lambda frame, overlay_corners=(): area())
    monkeypatch.setattr(prepare, "bar_counts", lambda *args: None)
    # every file gives the same FRAME: hashes of the names keep near-duplicate removal out of these tests
    monkeypatch.setattr(prepare, "_hash_output", lambda path: int(hashlib.sha256(path.name.encode()).hexdigest(), 16))
    for rel in ("kidney/p1/a.png", "kidney/p1/b.png", "kidney/p2/c.png", "kidney/p3/d.png", "liver/p4/e.png",
                "liver/p4/e_mask.png"):
        touch(tmp_path / "set" / rel, rel.encode())
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"datasets": [{"name": "d", "adapter": "folder", "root": "set",
                                                "options": {"subject": "parent"}}]}))
    out = tmp_path / "out"

    def go(**overrides) -> dict:
        settings = dict(recipe=str(recipe), out=str(out), workers=1, size=32, scan_area_samples=0,
                        contact_sheet_images=0, val_frac=0.25, test_frac=0.25)
        return prepare.run(Config(**{**settings, **overrides}))

    return recipe, out, go


def manifest_rows(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_run_writes_sorted_rows_then_the_set_aside_ones_and_counts_them(quick_run):
    recipe, out, go = quick_run
    stats = go()
    assert {k: v for k, v in stats.items() if k != "seconds"} == {
        "files": 5, "processed": 5, "reused": 0, "ok": 5, "skipped": 0, "ignored": 1, "near_duplicates": 0,
        "missing": []}
    rows = manifest_rows(out)
    assert [Path(r["source"]).name for r in rows] == ["a.png", "b.png", "c.png", "d.png", "e.png", "e_mask.png"]
    assert [r["status"] for r in rows] == ["ok"] * 5 + ["skipped"]
    splits = {r["subject"]: r["split"] for r in rows[:5]}
    # kidney: p1 (2 images) to train first, then p2 and p3 (1 each) to val and test; liver's one subject to train
    assert splits == {"kidney/p1": "train", "kidney/p2": splits["kidney/p2"], "kidney/p3": splits["kidney/p3"],
                      "liver/p4": "train"}
    assert sorted([splits["kidney/p2"], splits["kidney/p3"]]) == ["test", "val"]
    assert pngs_in_class_folders(out) == {r["output"] for r in rows[:5]}
    assert json.loads((out / "config.json").read_text())["size"] == 32


def pngs_in_class_folders(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*.png") if p.parts[-3] in ("train", "val", "test")}


def test_a_rerun_reuses_unless_a_processing_constant_changed(quick_run, capsys):
    _, out, go = quick_run
    go()
    first = manifest_rows(out)
    assert go(seed=3, contact_sheet_images=2)["reused"] == 5  # not processing constants: outputs reused
    capsys.readouterr()
    again = go(size=48)
    assert (again["processed"], again["reused"]) == (5, 0)
    assert "processing constants changed since the last run (size): reprocessing every file" in capsys.readouterr().out
    assert np.asarray(Image.open(out / manifest_rows(out)[0]["output"])).shape == (48, 48, 3)
    assert go(size=48, keep_annotated=False, square="crop")["processed"] == 5
    assert "(square, keep_annotated)" in capsys.readouterr().out
    assert go(size=48, keep_annotated=False, square="crop")["reused"] == 5
    assert [r["source"] for r in manifest_rows(out)] == [r["source"] for r in first]


def test_outputs_of_sources_gone_since_the_last_run_are_deleted(quick_run, tmp_path):
    _, out, go = quick_run
    go()
    gone = next(r for r in manifest_rows(out) if r["source"].endswith("d.png"))
    assert (out / gone["output"]).is_file()
    (tmp_path / "set" / "kidney" / "p3" / "d.png").unlink()
    stats = go()
    assert (stats["files"], stats["reused"]) == (4, 4)
    assert not (out / gone["output"]).exists()
    assert len(pngs_in_class_folders(out)) == 4


def test_the_split_shares_come_from_the_fractions(quick_run, monkeypatch):
    _, out, go = quick_run
    seen = []
    real = prepare.assign_splits
    monkeypatch.setattr(prepare, "assign_splits", lambda w, c, fracs, seed: seen.append((fracs, seed)) or real(w, c, fracs, seed))
    go(val_frac=0.3, test_frac=0.2, seed=4)
    assert seen == [({"train": pytest.approx(0.5), "val": 0.3, "test": 0.2}, 4)]


def test_a_subject_in_two_classes_and_an_empty_recipe_are_refused(quick_run, tmp_path):
    recipe, _, go = quick_run
    recipe.write_text(json.dumps({"datasets": [{"name": "d", "adapter": "folder", "root": "set"}]}))  # subject = stem
    (tmp_path / "set" / "liver" / "p4" / "a.png").write_bytes(b"other")  # stem "a" in kidney and in liver
    with pytest.raises(RecipeError) as info:
        go()
    assert str(info.value) == "subject a of dataset d appears in classes kidney and liver"
    empty = tmp_path / "empty"
    (empty / "kidney").mkdir(parents=True)
    recipe.write_text(json.dumps({"datasets": [{"name": "d", "adapter": "folder", "root": "empty"}]}))
    with pytest.raises(RecipeError) as info:
        go()
    assert str(info.value) == "the recipe lists no image files"


def test_a_file_listed_twice_in_one_dataset_is_set_aside_with_a_full_row(tmp_path):
    root = tmp_path / "set"
    target = touch(root / "kidney" / "a.png")
    (root / "kidney" / "b.png").symlink_to(target)
    chosen, ignored = list_sources([DatasetSpec("d", "folder", root, None)], Config())
    assert [src.path for _, src, _, _ in chosen] == [target]
    assert ignored == [row(source=str(root / "kidney" / "b.png"), dataset="d", status="skipped",
                           reason=f"same file as {target} (listed twice, e.g. through a symlink)")]


def test_the_scan_area_figure_shows_seeded_picks_and_is_redrawn_only_when_needed(quick_run, monkeypatch):
    _, out, go = quick_run
    drawn, corners_seen = [], []

    def figure(panels, folder):
        drawn.append([(p[0]["source"], p[0]["frame"], p[1] is FRAME, p[2].box) for p in panels])
        (folder / "scan_area_samples.png").write_bytes(b"png")

    def detect(frame, overlay_corners=()):
        corners_seen.append(overlay_corners)
        return area()

    real_list = prepare.list_sources

    def list_with_corners(specs, cfg):  # the liver files declare an overlay box at the top left
        chosen, ignored = real_list(specs, cfg)
        return [(spec, replace(src, overlay_corners=("top_left",)) if cls == "liver" else src, cls, budget)
                for spec, src, cls, budget in chosen], ignored

    monkeypatch.setattr(prepare, "scan_area_figure", figure)
    monkeypatch.setattr(prepare, "detect_scan_area", detect)
    monkeypatch.setattr(prepare, "list_sources", list_with_corners)
    go(scan_area_samples=2, seed=1)
    rows = manifest_rows(out)
    kept = {c: [r["source"] for r in rows if r["class"] == c and r["status"] == "ok"] for c in ("kidney", "liver")}
    pick = sorted(np.random.default_rng([1, stable_int("kidney"), 1]).permutation(4)[:2])
    expected = [(kept["kidney"][i], "", True, (5, 10, 70, 50)) for i in pick] + [(kept["liver"][0], "", True,
                                                                                   (5, 10, 70, 50))]
    assert drawn == [expected]
    assert corners_seen[5:] == [(), (), ("top_left",)]  # 5 files processed, then the three panels re-detected
    go(scan_area_samples=2, seed=1)  # every file reused and the figure there: not drawn again
    assert len(drawn) == 1
    (out / "scan_area_samples.png").unlink()
    go(scan_area_samples=2, seed=1)
    assert drawn[1:] == [expected]
    (out / "scan_area_samples.png").unlink()
    go(scan_area_samples=0)
    assert len(drawn) == 2
    (out / "scan_area_samples.png").write_bytes(b"png")
    touch(out.parent / "set" / "kidney" / "p1" / "a.png", b"changed")  # one file processed again: redrawn
    stats = go(scan_area_samples=1, seed=1)
    assert stats["processed"] == 1 and len(drawn) == 3 and len(drawn[2]) == 2


def test_a_run_clears_what_an_interrupted_run_left_and_says_so(quick_run, capsys):
    _, out, go = quick_run
    go()
    capsys.readouterr()
    old = touch(out / "train" / "kidney" / ".a.png.abcd1234.tmp")
    fresh = touch(out / "train" / "kidney" / ".b.png.abcd1234.tmp")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    staged = touch(out / prepare.STAGING / "kidney" / "d__zz.png")
    go()
    assert capsys.readouterr().out.startswith("removed 1 temporary files left by an interrupted run\n")
    assert not old.exists() and fresh.exists() and not staged.parent.parent.exists()
    go()
    assert "temporary files" not in capsys.readouterr().out


def test_a_run_shows_its_progress_and_prints_its_summary(quick_run, monkeypatch, capsys):
    _, out, go = quick_run
    bars, updates = [], []
    real_progress = prepare.progress

    def recorded(*args, **kwargs):
        bar = real_progress(*args, **{**kwargs, "disable": True})
        bar.update = lambda *step: updates.append(step)
        bars.append((args, kwargs))
        return bar

    monkeypatch.setattr(prepare, "progress", recorded)
    monkeypatch.setattr(prepare, "time", SimpleNamespace(time=iter([100.0, 102.25]).__next__))
    stats = go()
    assert bars == [((), {"total": 5, "desc": "prepare", "unit": "file"})] and updates == [()] * 5
    assert stats["seconds"] == 2.25
    lines = capsys.readouterr().out.split("\n")
    assert lines[1:] == [
        "5 files: 5 processed, 0 unchanged since the last run; 5 images kept, 0 skipped, 1 set aside (masks, "
        "annotations, duplicates, refused paths) (2.2 s)",
        "  train kidney=2  liver=1", "  val   kidney=1", "  test  kidney=1",
        f"manifest: {out / 'manifest.csv'}; plots: per_class_by_split.png, contact_sheets/, scan_area_samples.png", ""]


def test_an_out_that_is_a_file_is_refused_by_name_before_anything_is_read(quick_run):
    _, out, go = quick_run
    out.write_bytes(b"not a folder")
    with pytest.raises(ConfigError) as info:
        go()
    assert str(info.value) == f"--out: {out} exists and is not a folder"


class FakePool:
    """multiprocessing's fork context stood in for: a pool that runs everything here, in order, and records how it
    was made and shut down."""

    def __init__(self, log: list):
        self.log = log

    def Pool(self, processes, initializer, initargs):  # noqa: N802 (multiprocessing's name)
        self.log.append(("Pool", processes, initializer, initargs))
        initializer(*initargs)
        return self

    def imap(self, function, items):
        self.log.append(("imap", function))
        return map(function, items)

    def apply_async(self, function, args):
        self.log.append(("apply_async", function, len(args[0])))
        result = function(*args)
        return SimpleNamespace(get=lambda: self.log.append(("get",)) or result)

    def close(self):
        self.log.append(("close",))

    def join(self):
        self.log.append(("join",))


def test_workers_zero_means_one_per_core_and_the_pool_draws_the_scan_area_figure(quick_run, monkeypatch):
    _, out, go = quick_run
    log, contexts = [], []
    pool = FakePool(log)
    monkeypatch.setattr(prepare.multiprocessing, "get_context", lambda method: contexts.append(method) or pool)
    monkeypatch.setattr(prepare, "scan_area_figure", lambda panels, folder: log.append(("figure", len(panels))))
    monkeypatch.setattr(prepare.os, "cpu_count", lambda: 3)
    stats = go(workers=0, scan_area_samples=1)
    assert stats["ok"] == 5 and contexts == ["fork"]
    cfg = log[0][3][1]
    assert log == [("Pool", 3, prepare._init_worker, (out, cfg)), ("imap", prepare._work),
                   ("imap", prepare.scan_panel), ("imap", prepare._hash_output), ("apply_async", prepare.scan_area_figure, 2),
                   ("figure", 2), ("get",),
                   ("close",), ("join",)]
    assert (cfg.out, cfg.workers, cfg.scan_area_samples) == (str(out), 0, 1)
    log.clear()
    go(workers=2, scan_area_samples=0)  # nothing to draw: no job for the pool
    assert log == [("Pool", 2, prepare._init_worker, log[0][3]), ("imap", prepare._work), ("imap", prepare._hash_output),
                   ("close",), ("join",)]
    log.clear()
    monkeypatch.setattr(prepare.os, "cpu_count", lambda: None)  # unknown: one process, no pool
    go(workers=0, scan_area_samples=1, seed=1)
    assert log == [("figure", 2)]
    monkeypatch.setattr(prepare.os, "cpu_count", lambda: 1)
    go(workers=0)
    assert log == [("figure", 2)] and contexts == ["fork", "fork"]


def test_the_manifest_and_the_figure_s_panels_are_sorted_whatever_order_the_files_came_in(quick_run, tmp_path,
                                                                                          monkeypatch):
    recipe, out, go = quick_run
    for rel in ("kidney/p9/a.png", "kidney/p9/a_mask.png"):
        touch(tmp_path / "set_z" / rel, rel.encode())
    recipe.write_text(json.dumps({"datasets": [  # zeta listed first
        {"name": "zeta", "adapter": "folder", "root": "set_z", "options": {"subject": "parent"}},
        {"name": "alpha", "adapter": "folder", "root": "set", "options": {"subject": "parent"}}]}))
    clip = tmp_path / "set_z" / "kidney" / "p9" / "a.png"
    reads = []
    monkeypatch.setattr(prepare, "read_frames", lambda path, video_stride=10, max_frames=None: reads.append(
        (video_stride, max_frames)) or iter([("f2", FRAME), ("f10", FRAME)] if Path(path) == clip else [("", FRAME)]))
    drawn = []
    monkeypatch.setattr(prepare, "scan_area_figure", lambda panels, folder: drawn.append(
        [(p[0]["dataset"], Path(p[0]["source"]).name, p[0]["frame"]) for p in panels]))
    go(scan_area_samples=6, video_stride=4, max_frames_per_file=3)
    # each file read with the stride and its share of the frame budget, then the 7 panels' frames found again
    assert reads == [(4, 3)] * 6 + [(4, None)] * 7
    listed = [(r["dataset"], Path(r["source"]).name, r["frame"], r["status"]) for r in manifest_rows(out)]
    assert listed == [("alpha", n, "", "ok") for n in ("a.png", "b.png", "c.png", "d.png", "e.png")] + [
        ("zeta", "a.png", "f10", "ok"), ("zeta", "a.png", "f2", "ok"),  # frame keys sort as text
        ("alpha", "e_mask.png", "", "skipped"), ("zeta", "a_mask.png", "", "skipped")]
    assert drawn == [[("alpha", n, "") for n in ("a.png", "b.png", "c.png", "d.png")]
                     + [("zeta", "a.png", "f10"), ("zeta", "a.png", "f2"), ("alpha", "e.png", "")]]


def test_a_run_from_a_relative_recipe_reuses_and_a_lost_output_of_a_gone_source_is_no_error(quick_run, tmp_path,
                                                                                             monkeypatch):
    _, out, go = quick_run
    monkeypatch.chdir(tmp_path)
    go(recipe="recipe.json", out="out")  # sources listed as set/kidney/..., the manifest holds absolute paths
    assert all(Path(r["source"]).is_absolute() for r in manifest_rows(out))
    assert go(recipe="recipe.json", out="out")["reused"] == 5
    gone = next(r for r in manifest_rows(out) if r["source"].endswith("d.png"))
    (tmp_path / "set" / "kidney" / "p3" / "d.png").unlink()
    (out / gone["output"]).unlink()  # its output lost too: nothing left to delete
    assert go(recipe="recipe.json", out="out")["files"] == 4


def test_a_file_that_cannot_be_read_is_counted_as_skipped_and_weighs_nothing_in_the_split(quick_run, monkeypatch,
                                                                                          capsys):
    _, out, go = quick_run

    def read_frames(path, video_stride=10, max_frames=None):
        if Path(path).name == "c.png":
            raise UnreadableFileError(path, "not an image")
        return iter([("", FRAME)])

    monkeypatch.setattr(prepare, "read_frames", read_frames)
    stats = go()
    assert {k: v for k, v in stats.items() if k != "seconds"} == {
        "files": 5, "processed": 5, "reused": 0, "ok": 4, "skipped": 1, "ignored": 1, "near_duplicates": 0,
        "missing": []}
    assert "  skipped 1x: not an image\n" in capsys.readouterr().out
    rows = {Path(r["source"]).name: r for r in manifest_rows(out)}
    assert (rows["c.png"]["status"], rows["c.png"]["split"], rows["c.png"]["output"]) == ("skipped", "", "")
    # kidney: p1 (2 images) to train, p3 (1) to the split furthest below its share; p2 gave none and has no split
    assert [rows[n]["split"] for n in ("a.png", "b.png", "d.png", "e.png")] == ["train", "train", "val", "train"]
