"""eval_var.py on a sample_var.py sweep of the tiny pipeline (tests/tiny_pipeline.py), with the real InceptionV3."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import eval_var
import sample_var
from common.fidelity import extract_features, kid_from_features, load_feature_extractor
from common.image_data import read_image
from common.plotting import save_image
from tiny_pipeline import CLASSES, SCALES, SIZE

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PLOTS = ("kid_vs_k.png", "diversity_vs_k.png", "teacher_similarity_vs_k.png", "token_usage_entropy.png",
         "memorisation_hist.png", "memorisation_pairs.png")


@pytest.fixture(scope="module")
def evaluated(tiny_pipeline: dict[str, Path], tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_var")
    samples = root / "samples"
    sample_var.main([f"--var={tiny_pipeline['var']}", f"--data_dir={tiny_pipeline['data']}", f"--out={samples}",
                     "--samples_per_class=4", "--teachers_per_class=2", "--samples_per_teacher=2", "--top_k=10",
                     "--device=cpu"])
    # One NOP sample replaced by a training image: a copy that the memorisation check must flag.
    copied = read_image(tiny_pipeline["data"] / "train" / "heart" / "img1.png", SIZE)
    save_image(copied, samples / "NOP_cfg1.5" / "heart" / "s002.png")
    eval_var.main([f"--samples={samples}", f"--cache={root / 'cache.npz'}", "--kid_subsets=20", "--device=cpu"])
    return {"samples": samples, "out": samples / "eval", "cache": root / "cache.npz"}


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def row(table: list[dict[str, str]], point: str, name: str) -> dict[str, str]:
    return next(r for r in table if r["point"] == point and r["class"] == name)


def test_every_table_and_plot_is_written(evaluated: dict[str, Path]) -> None:
    out = evaluated["out"]
    table = rows(out)
    points = ["REAL", "RECON", "NOP_cfg1.5"] + [f"TP_K{k}_cfg1.5" for k in range(1, len(SCALES) + 1)]
    assert [r["point"] for r in table] == [p for p in points for _ in range(len(CLASSES) + 1)]
    assert [r["class"] for r in table] == (CLASSES + ["all"]) * len(points)
    for name in PLOTS:
        assert (out / name).stat().st_size > 1000
    info = json.loads((out / "metrics.json").read_text())["info"]
    assert info["token_images_per_class"] == 4 and info["msssim_levels"] == 2 and info["ref_images"] == 15
    assert row(table, "NOP_cfg1.5", "all")["n"] == "12" and row(table, "TP_K2_cfg1.5", "liver")["n"] == "4"
    assert all(row(table, "NOP_cfg1.5", c)["psnr_teacher"] == "" for c in CLASSES)  # no teacher without a prefix


def test_full_prefix_samples_are_the_teachers_reconstructions(evaluated: dict[str, Path]) -> None:
    table = rows(evaluated["out"])
    for name in CLASSES + ["all"]:
        full = row(table, f"TP_K{len(SCALES)}_cfg1.5", name)
        assert float(full["psnr_recon"]) == 100 and float(full["ssim_recon"]) == 1
        assert float(full["diversity_per_teacher"]) == 0  # every sample of a teacher is the same image
        shorter = row(table, "TP_K1_cfg1.5", name)
        assert float(shorter["psnr_recon"]) < 100 and float(shorter["diversity_per_teacher"]) > 0


def test_kid_compares_the_samples_with_the_real_images(evaluated: dict[str, Path]) -> None:
    out, samples = evaluated["out"], evaluated["samples"]
    manifest = [r for r in csv.DictReader(open(samples / "samples_manifest.csv")) if r["point"] == "TP_K2_cfg1.5"]
    net = load_feature_extractor("", "cpu")
    gen = extract_features([samples / r["path"] for r in manifest], net, cache_path=evaluated["cache"])
    real = extract_features([p for c in CLASSES for p in sorted((out / "real" / "test" / c).glob("*.png"))], net,
                            cache_path=evaluated["cache"])
    # 12 samples against 15 real test images: subsets of half the smaller set, so that their spread means something.
    expected = kid_from_features(gen, real, subsets=20, max_subset_size=6, seed=0)
    measured = row(rows(out), "TP_K2_cfg1.5", "all")
    assert float(measured["kid"]) == pytest.approx(expected["mean"], rel=1e-5)
    assert float(measured["kid_std"]) == pytest.approx(expected["std"], rel=1e-5) and expected["std"] > 0
    assert int(measured["kid_subset"]) == 6
    # Per class: 4 samples and 5 real images give subsets of 2.
    assert row(rows(out), "TP_K2_cfg1.5", "liver")["kid_subset"] == "2"
    # Real images are compared at the model's size, and the reconstructions come from the token file.
    assert read_image(out / "real" / "test" / "liver" / "img0.png", SIZE).shape == (SIZE, SIZE, 3)
    assert len(list((out / "recon" / "test").rglob("*.png"))) == 15


def test_a_copied_training_image_is_flagged(evaluated: dict[str, Path]) -> None:
    table = rows(evaluated["out"])
    assert float(row(table, "NOP_cfg1.5", "heart")["copy_fraction"]) == pytest.approx(1 / 4)
    assert float(row(table, "NOP_cfg1.5", "all")["copy_fraction"]) == pytest.approx(1 / 12)
    with np.load(evaluated["out"] / "nearest_train.npz", allow_pickle=False) as data:
        i = data["sample_path"].tolist().index("NOP_cfg1.5/heart/s002.png")
        assert data["similarity"][i] == pytest.approx(1.0, abs=1e-5)
        assert data["train_source"][i] == "train/heart/img1.png"
        assert data["similarity"].argmax() == i


def test_reference_rows(evaluated: dict[str, Path]) -> None:
    table = rows(evaluated["out"])
    real = row(table, "REAL", "all")
    assert real["copy_fraction"] == "" and 0 < float(real["nn_train_sim"]) < 1
    assert float(real["diversity"]) > 0
    for pn in SCALES:
        assert 0 < float(real[f"usage_{pn}"]) <= 1 and float(real[f"entropy_{pn}"]) >= 0
    assert math.isfinite(float(row(table, "RECON", "all")["kid"]))
    assert row(table, "RECON", "breast")["n"] == "2"  # the first half of the 5 test images
    assert row(table, "RECON", "breast")["kid"] == ""  # subsets of 1: too few for a KID, blank, not a made-up number


def test_bad_inputs_are_refused(evaluated: dict[str, Path], tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit, match=r"^error: --ref_split='holdout': must be one of train, val, test$"):
        eval_var.main([f"--samples={evaluated['samples']}", "--ref_split=holdout"])
    with pytest.raises(SystemExit, match=r"^error: --kid_subsets=0: must be >= 1$"):
        eval_var.main([f"--samples={evaluated['samples']}", "--kid_subsets=0"])
    broken = tmp_path / "broken"
    shutil.copytree(evaluated["samples"], broken, ignore=shutil.ignore_patterns("eval", "*.png"))
    (broken / "samples_manifest.csv").unlink()
    with pytest.raises(SystemExit):
        eval_var.main([f"--samples={broken}"])
    assert "not a finished sample_var.py folder" in capsys.readouterr().err


def test_a_rerun_with_the_same_inputs_rewrites_nothing(evaluated: dict[str, Path], tmp_path: Path, capsys) -> None:
    args = [f"--samples={evaluated['samples']}", f"--cache={evaluated['cache']}", "--kid_subsets=20", "--device=cpu"]
    before = {p: p.stat().st_mtime_ns for p in evaluated["out"].rglob("*")}
    capsys.readouterr()
    eval_var.main(args)
    assert "up to date" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in evaluated["out"].rglob("*")} == before
    # A changed sample image is a changed input.
    samples = tmp_path / "samples"
    shutil.copytree(evaluated["samples"], samples, ignore=shutil.ignore_patterns("eval"))
    args = [f"--samples={samples}", f"--cache={evaluated['cache']}", "--kid_subsets=20", "--device=cpu"]
    eval_var.main(args)
    first = float(row(rows(samples / "eval"), "NOP_cfg1.5", "all")["kid"])
    save_image(np.zeros((SIZE, SIZE, 3), np.uint8), samples / "NOP_cfg1.5" / "breast" / "s000.png")
    capsys.readouterr()
    eval_var.main(args)
    assert "up to date" not in capsys.readouterr().out
    assert float(row(rows(samples / "eval"), "NOP_cfg1.5", "all")["kid"]) != first
