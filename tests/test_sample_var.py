"""sample_var.py on the tiny pipeline of tests/tiny_pipeline.py (random 32 px VQ-VAE and 2-block VAR)."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import sample_var
from common.checkpoint import load_checkpoint
from common.image_data import read_image
from common.runtime import select_precision
from common.tokens import load_tokens
from tiny_pipeline import CLASSES, SCALES, SIZE, tiny_vqvae

SMALL = dict(samples_per_class=3, teachers_per_class=2, samples_per_teacher=2, guidance=(0.0, 1.5), top_k=10, top_p=0.9,
             temperature=1.3, batch_size=5, device="cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipeline(tiny_pipeline: dict[str, Path]) -> dict[str, Path]:
    return tiny_pipeline


def args(pipeline: dict[str, Path], out: Path, **overrides) -> list[str]:
    values = {"var": pipeline["var"], "data_dir": pipeline["data"], "out": out, **SMALL, **overrides}
    return [f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in values.items()]


def read_manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "samples_manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def png_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))
            if p.parts[len(out.parts)] != "grids"}


@pytest.fixture(scope="module")
def sweep(pipeline: dict[str, Path]) -> Path:
    out = pipeline["root"] / "samples"
    sample_var.main(args(pipeline, out))
    return out


def test_sweep_writes_every_file(sweep: Path) -> None:
    rows = read_manifest(sweep)
    points = [f"NOP_cfg{g}" for g in ("0", "1.5")] + [f"TP_K{k}_cfg{g}" for k in range(1, 5) for g in ("0", "1.5")]
    assert sorted({r["point"] for r in rows}) == sorted(points)
    per_point = {p: [r for r in rows if r["point"] == p] for p in points}
    assert all(len(per_point[p]) == 3 * 3 for p in points[:2])
    assert all(len(per_point[p]) == 3 * 2 * 2 for p in points[2:])
    for r in rows:
        assert (sweep / r["path"]).is_file()
        assert r["path"].startswith(f"{r['point']}/{r['class']}/")
    for p in points:
        assert (sweep / "grids" / f"{p}.png").is_file() and (sweep / p / "tokens.npz").is_file()
    for name in CLASSES:
        assert sorted(f.name for f in (sweep / "teachers" / name).iterdir()) == ["t00.png", "t01.png"]
        assert sorted(f.name for f in (sweep / "teachers_recon" / name).iterdir()) == ["t00.png", "t01.png"]
    with np.load(sweep / "samples_tokens.npz", allow_pickle=False) as data:
        assert data["idx"].shape == (len(rows), sum(pn * pn for pn in SCALES))
        assert data["image_path"].tolist() == [r["path"] for r in rows]
        assert data["seed"].tolist() == [int(r["seed"]) for r in rows]
        assert data["coarse_k"].tolist() == [int(r["coarse_k"]) for r in rows]
        assert data["classes"].tolist() == CLASSES
    assert json.loads((sweep / "config.json").read_text())["vqvae"].endswith("vqvae.pth")  # resolved from the VAR


def test_seeds_are_shared_across_points_and_distinct_within(sweep: Path) -> None:
    rows = read_manifest(sweep)
    key = {(r["class"], r["teacher"], r["sample"]): r["seed"] for r in rows}
    assert all(key[(r["class"], r["teacher"], r["sample"])] == r["seed"] for r in rows)
    assert len(set(key.values())) == len(key)
    nop0 = [r for r in rows if r["point"] == "NOP_cfg0"]
    nop15 = [r for r in rows if r["point"] == "NOP_cfg1.5"]
    assert [r["seed"] for r in nop0] == [r["seed"] for r in nop15]
    assert any((sweep / a["path"]).read_bytes() != (sweep / b["path"]).read_bytes() for a, b in zip(nop0, nop15))


def test_teacher_prefix_and_full_prefix_reconstruction(sweep: Path, pipeline: dict[str, Path]) -> None:
    tokens = load_tokens(pipeline["tokens"])
    with np.load(sweep / "samples_tokens.npz", allow_pickle=False) as data:
        idx, k, rows, points = data["idx"], data["coarse_k"], data["teacher_row"], data["point"]
    assert (tokens.split[rows[k > 0]] == "test").all()
    for kk in range(1, len(SCALES) + 1):
        n = sum(pn * pn for pn in SCALES[:kk])
        sel = k == kk
        assert np.array_equal(idx[sel, :n], tokens.idx[rows[sel], :n])
        if kk < len(SCALES):
            assert not np.array_equal(idx[sel], tokens.idx[rows[sel]])
    # k = all scales: token for token the teacher's, and the image is the teacher's reconstruction.
    full = k == len(SCALES)
    assert np.array_equal(idx[full], tokens.idx[rows[full]])
    for r in read_manifest(sweep):
        if r["coarse_k"] == str(len(SCALES)):
            recon = sweep / "teachers_recon" / r["class"] / f"t{int(r['teacher']):02d}.png"
            assert (sweep / r["path"]).read_bytes() == recon.read_bytes()
    assert set(points[k == 0]) == {"NOP_cfg0", "NOP_cfg1.5"}


def test_image_regenerated_from_its_manifest_row_alone(sweep: Path, pipeline: dict[str, Path]) -> None:
    config = sample_var.Config(var=str(pipeline["var"]), vqvae=str(pipeline["vqvae"]), tokens=str(pipeline["tokens"]))
    var, vqvae, tokens = sample_var.load_models(config, load_checkpoint(pipeline["var"]),
                                                {"vqvae_sha256": None, "classes": None}, torch.device("cpu"))
    rows = read_manifest(sweep)
    for r in (rows[4], rows[-1], next(r for r in rows if r["point"] == "TP_K2_cfg1.5")):
        knobs = sample_var.Config(top_k=int(r["top_k"]), top_p=float(r["top_p"]), temperature=float(r["temperature"]),
                                  guidance_schedule=r["guidance_schedule"])
        job = sample_var.Job(int(r["label"]), int(r["teacher"]), int(r["teacher_row"]), int(r["sample"]), int(r["seed"]))
        point = sample_var.Point(int(r["coarse_k"]), float(r["guidance"]))
        image, _ = sample_var.sample_jobs(var, vqvae, tokens, point, [job], knobs,
                                          select_precision(torch.device("cpu"), r["precision"]))
        assert np.array_equal(image[0], read_image(sweep / r["path"], SIZE))


def test_resumed_sweep_equals_uninterrupted(sweep: Path, pipeline: dict[str, Path], monkeypatch) -> None:
    out = pipeline["root"] / "resumed"
    real = sample_var.sample_jobs
    calls = {"n": 0}

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 9:  # inside the third sweep point
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(sample_var, "sample_jobs", dying)
    with pytest.raises(KeyboardInterrupt):
        sample_var.main(args(pipeline, out, batch_size=3))
    monkeypatch.setattr(sample_var, "sample_jobs", real)
    assert not (out / "samples_manifest.csv").exists()
    finished = out / "NOP_cfg0" / "tokens.npz"
    mtime = finished.stat().st_mtime_ns
    (out / "TP_K1_cfg0" / "breast" / "t00_s00.png").write_bytes(b"half-written junk")  # left by the kill
    sample_var.main(args(pipeline, out, batch_size=7))  # another batch size: same images
    assert finished.stat().st_mtime_ns == mtime  # a finished point is not redone
    assert png_bytes(out) == png_bytes(sweep)
    assert (out / "samples_manifest.csv").read_text() == (sweep / "samples_manifest.csv").read_text()
    with np.load(out / "samples_tokens.npz") as a, np.load(sweep / "samples_tokens.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in b.files)


def test_changed_settings_redo_a_point(sweep: Path, pipeline: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "s"
    common = dict(tp=False, guidance=(1.5,))
    sample_var.main(args(pipeline, out, **common))
    before = (out / "NOP_cfg1.5" / "breast" / "s000.png").read_bytes()
    sample_var.main(args(pipeline, out, **common, temperature=0.5, samples_per_class=2))
    assert (out / "NOP_cfg1.5" / "breast" / "s000.png").read_bytes() != before
    assert not (out / "NOP_cfg1.5" / "breast" / "s002.png").exists()  # the outdated third image is gone
    assert len(read_manifest(out)) == 2 * len(CLASSES)


@pytest.mark.parametrize("override,message", [
    ({"top_p": 1.5}, "--top_p=1.5: must be in"),
    ({"temperature": 0}, "--temperature=0.0: must be > 0"),
    ({"teacher_split": "holdout"}, "--teacher_split='holdout'"),
    ({"nop": False, "tp": False}, "--tp=False"),
    ({"guidance": (1.0, 1.0)}, "--guidance=.*distinct"),
    ({"top_k": -5}, "--top_k=-5: must be >= 0"),
    ({"precision": "fp8"}, "--precision='fp8': must be one of auto, bf16, fp16, fp32"),
    ({"device": "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"},
     "--device='cuda.*': must be auto, cpu, or a cuda / mps device this machine has"),
    ({"coarse_ks": (2, 5)}, r"--coarse_ks: must be in \[1, 4\]"),
])
def test_bad_constants_are_refused(pipeline: dict[str, Path], tmp_path: Path, capsys, override: dict,
                                   message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        sample_var.main(args(pipeline, tmp_path / "s", **override))
    # Out-of-range constants end with the message; coarse_ks, checked against the loaded VAR, prints it.
    assert re.search(message, f"{exit_info.value}\n{capsys.readouterr().err}")
    assert not (tmp_path / "s" / "NOP_cfg1.5").exists()


def test_bad_inputs_are_refused(pipeline: dict[str, Path], tmp_path: Path, capsys) -> None:
    foreign = tmp_path / "train_run"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"tokens": "x", "epochs": 3}))
    with pytest.raises(SystemExit):
        sample_var.main(args(pipeline, foreign))
    assert "sample_var.py did not write" in capsys.readouterr().err
    assert json.loads((foreign / "config.json").read_text()) == {"tokens": "x", "epochs": 3}

    other = tmp_path / "other_vqvae.pth"
    tiny_vqvae(other, seed=5)
    with pytest.raises(SystemExit):
        sample_var.main(args(pipeline, tmp_path / "a", vqvae=other))
    assert "re-run tokenize_multiscale_maps.py" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        sample_var.main(args(pipeline, tmp_path / "v", var=pipeline["vqvae"]))
    assert (f"{pipeline['vqvae']}: is a VQ-VAE checkpoint (train_vqvae.py), but a VAR checkpoint is needed here"
            in capsys.readouterr().err)

    with pytest.raises(SystemExit):
        sample_var.main(args(pipeline, tmp_path / "b", data_dir=tmp_path / "nowhere"))
    err = capsys.readouterr().err
    assert "teacher image missing" in err and str(tmp_path / "nowhere") in err
