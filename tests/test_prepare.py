"""prepare.py end to end: phantoms (default recipe), a recipe with bad files and masks, the shared BUSI + HC18
samples; adapters and the subject-wise split on their own."""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_preprocessing import make_phantoms
from data_preprocessing.adapters import ADAPTERS, RecipeError
from data_preprocessing.prepare import Config, assign_splits, run

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


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw_phantoms")
    make_phantoms.main(make_phantoms.Config(out=str(out), n_subjects_per_class=2, frames_per_subject=2, workers=2))
    return out


def test_default_recipe_on_phantoms_and_rerun(phantom_dir, tmp_path):
    before = tree_hashes(phantom_dir)
    out = tmp_path / "processed"
    stats = run(Config(phantom_dir=str(phantom_dir), out=str(out), workers=2, scan_area_samples=2))
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

    mtimes = {p: (out / p).stat().st_mtime_ns for p in output_files(out)}
    again = run(Config(phantom_dir=str(phantom_dir), out=str(out), workers=2, scan_area_samples=2))
    assert again["processed"] == 0 and again["reused"] == 24 and again["ok"] == 24
    assert {p: (out / p).stat().st_mtime_ns for p in output_files(out)} == mtimes  # nothing rewritten
    assert read_manifest(out) == rows
    assert tree_hashes(phantom_dir) == before  # sources untouched

    # A changed source (new content, same name) is the only file processed on the next run.
    changed = phantom_dir / "liver" / "s0000_f0.png"
    saved = changed.read_bytes()
    try:
        changed.write_bytes((phantom_dir / "liver" / "s0001_f1.png").read_bytes())
        third = run(Config(phantom_dir=str(phantom_dir), out=str(out), workers=1, scan_area_samples=0))
    finally:
        changed.write_bytes(saved)
    assert third["processed"] == 1 and third["reused"] == 23

    # Other split fractions move whole subjects between split folders without reprocessing them.
    moved = run(Config(phantom_dir=str(phantom_dir), out=str(out), workers=2, val_frac=0.0, test_frac=0.0, scan_area_samples=0))
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
    stats = run(Config(recipe=str(recipe), out=str(out), workers=2, scan_area_samples=1, val_frac=0.25, test_frac=0.25))
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
    assert run(Config(recipe=str(recipe), out=str(out), workers=2, scan_area_samples=0, val_frac=0.25, test_frac=0.25))["processed"] == 0


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
