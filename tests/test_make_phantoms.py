"""Synthetic phantoms: format, ground truth, determinism (in memory and through the CLI), resume."""
from __future__ import annotations

import csv
import errno
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from common import io as common_io
from data_preprocessing import make_phantoms, make_phantoms as mp
from test_io import failing


@pytest.mark.parametrize("organ", mp.CLASSES)
def test_frame_format_and_geometry(organ):
    frame = mp.generate_frame(organ, np.random.default_rng([3, mp.CLASSES.index(organ)]))
    h, w, c = frame.image.shape
    assert frame.image.dtype == np.uint8 and c == 3
    assert mp.CANVAS_H[0] <= h <= mp.CANVAS_H[1] and mp.CANVAS_W[0] <= w <= mp.CANVAS_W[1]
    assert frame.mask.dtype == bool and frame.mask.shape == (h, w)
    assert 0.2 < frame.mask.mean() < 0.8  # the scan area sits on a larger canvas
    assert frame.geometry == ("rect" if mp.PROBE[organ] == "linear" else "fan")
    ys, xs = np.nonzero(frame.mask)
    box_fill = frame.mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    assert (box_fill == 1.0) if frame.geometry == "rect" else (box_fill < 0.9)
    outside = frame.image[~frame.mask]
    assert outside.max() > 100  # UI clutter (text, ruler, bar, logo) is drawn outside the scan area
    assert (outside == 0).mean() > 0.8  # ...on a black canvas
    inside = frame.image[frame.mask].mean(axis=1)
    assert 20 < inside.mean() < 160 and inside.std() > 15  # speckled tissue, not a flat fill


def test_frames_of_a_subject_differ_but_share_anatomy():
    subject = mp.sample_subject("kidney", np.random.default_rng(5))
    a = mp.render_frame(subject, np.random.default_rng(1)).image.astype(float).mean(axis=2)
    b = mp.render_frame(subject, np.random.default_rng(2)).image.astype(float).mean(axis=2)
    assert not np.array_equal(a, b)  # fresh speckle and probe motion

    def anatomy(x):  # speckle averaged out: what is left is the anatomy
        return cv2.GaussianBlur(x, (0, 0), 8)[subject.mask]

    assert np.corrcoef(anatomy(a), anatomy(b))[0, 1] > 0.8


def test_generate_frame_is_deterministic_and_rejects_unknown_organ():
    a = mp.generate_frame("heart", np.random.default_rng(11))
    b = mp.generate_frame("heart", np.random.default_rng(11))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    with pytest.raises(ValueError, match="unknown organ"):
        mp.generate_frame("spleen", np.random.default_rng(0))


def _run(out, **overrides):
    cfg = mp.Config(out=str(out), n_subjects_per_class=1, frames_per_subject=2, seed=7, **overrides)
    mp.main(cfg)
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_cli_outputs_are_byte_identical_across_runs_and_workers_and_resume(tmp_path):
    first = _run(tmp_path / "a")
    second = _run(tmp_path / "b", workers=2)
    # config.json records the workers, .owner.json its folder's own run id
    differ = ("config.json", ".owner.json")
    assert {k: v for k, v in first.items() if k not in differ} == {k: v for k, v in second.items() if k not in differ}
    assert len([k for k in first if k.endswith("_mask.png")]) == 2 * len(mp.CLASSES)
    # resume: a lost frame is rewritten identically, the others are left alone
    lost = tmp_path / "a" / "liver" / f"{mp.frame_name(0, 1)}.png"
    lost.unlink()
    kept = tmp_path / "a" / "liver" / f"{mp.frame_name(0, 0)}.png"
    mtime = kept.stat().st_mtime_ns
    assert _run(tmp_path / "a") == first
    assert kept.stat().st_mtime_ns == mtime
    rows = list(csv.DictReader((tmp_path / "a" / "labels.csv").open()))
    assert len(rows) == 2 * len(mp.CLASSES) and set(rows[0]) == {"path", "class", "subject", "geometry"}
    for row in rows:
        image = np.array(Image.open(tmp_path / "a" / row["path"]))
        mask = np.array(Image.open(tmp_path / "a" / row["path"].replace(".png", "_mask.png")))
        assert image.ndim == 3 and mask.ndim == 2 and set(np.unique(mask)) <= {0, 255}
        assert row["geometry"] == ("rect" if row["class"] in ("breast", "thyroid") else "fan")
    assert len({r["subject"] for r in rows}) == len(mp.CLASSES)  # frames of one subject share its id


def test_a_write_failure_ends_with_one_line_and_a_rerun_resumes(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "raw"
    config = make_phantoms.Config(out=str(out), n_subjects_per_class=1, frames_per_subject=1)
    make_phantoms.main(config)
    before = {p: p.read_bytes() for p in out.rglob("*.png")}
    config = make_phantoms.Config(out=str(out), n_subjects_per_class=1, frames_per_subject=2)
    monkeypatch.setattr(common_io, "_sync", failing(4, errno.EROFS))  # a frame
    with pytest.raises(SystemExit) as err:
        make_phantoms.main(config)
    assert str(err.value).startswith(f"error: {out}/") and str(err.value).endswith(": Read-only file system")
    assert "\n" not in str(err.value)
    assert all(p.read_bytes() == data for p, data in before.items())
    monkeypatch.undo()
    make_phantoms.main(config)
    assert len(list(out.rglob("*_mask.png"))) == 2 * len(make_phantoms.CLASSES)
