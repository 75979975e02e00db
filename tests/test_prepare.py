"""prepare.py end to end: phantoms (default recipe), a recipe with bad files and masks, the shared BUSI + HC18
samples; adapters and the subject-wise split on their own; bad input (symlink loops, FIFOs and devices, CSV paths
outside the table, splits after reading, bad constants, --out and recipe-type errors)."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import signal
import stat
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from common.config import ConfigError
from data_preprocessing import make_phantoms, prepare
from data_preprocessing.adapters import ADAPTERS, RecipeError
from data_preprocessing.prepare import Config, DatasetSpec, assign_splits, list_sources, run

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
