"""eval_var.py on a sample_var.py sweep of the tiny pipeline (tests/tiny_pipeline.py), with the real InceptionV3."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_var
import sample_var
from common.fidelity import extract_features, kid_bootstrap, load_feature_extractor
from common.image_data import read_image
from common.plotting import save_image
from common.sample_metrics import token_usage_entropy
from common.tokens import load_tokens, split_scales
from models.vqvae import load_vqvae
from tiny_pipeline import CLASSES, SCALES, SIZE

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = ("--min_class_images=4", "--bootstrap=50", "--control_per_class=2")  # sets of 4-15 images
PLOTS = ("kid_vs_k.png", "feature_diversity_vs_k.png", "coverage_vs_recon_vs_k.png", "diversity_vs_k.png",
         "teacher_similarity_vs_k.png", "token_usage_entropy.png", "memorisation_hist.png", "memorisation_pairs.png")


@pytest.fixture(scope="module")
def evaluated(tiny_pipeline: dict[str, Path], tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_var")
    samples = root / "samples"
    sample_var.main([f"--var={tiny_pipeline['var']}", f"--data_dir={tiny_pipeline['data']}", f"--out={samples}",
                     "--samples_per_class=4", "--teachers_per_class=2", "--samples_per_teacher=2", "--top_k=10",
                     "--device=cpu"])
    # One NOP sample replaced by the reconstruction of a training image: what a VAR that memorised it would draw.
    tokens = load_tokens(tiny_pipeline["tokens"])
    row = tokens.source.tolist().index("train/heart/img1.png")
    vqvae = load_vqvae(tiny_pipeline["vqvae"])
    save_image(sample_var.decode_one_by_one(vqvae, tokens.idx_list([row]))[0], samples / "NOP_cfg1.5" / "heart" / "s002.png")
    eval_var.main([f"--samples={samples}", f"--cache={root / 'cache.npz'}", *SMALL, "--device=cpu"])
    return {"samples": samples, "out": samples / "eval", "cache": root / "cache.npz"}


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def row(table: list[dict[str, str]], point: str, name: str) -> dict[str, str]:
    return next(r for r in table if r["point"] == point and r["class"] == name)


def test_every_table_and_plot_is_written(evaluated: dict[str, Path]) -> None:
    out = evaluated["out"]
    table = rows(out)
    points = ["REAL", "REAL_TRAIN", "RECON", "NOP_cfg1.5"] + [f"TP_K{k}_cfg1.5" for k in range(1, len(SCALES) + 1)]
    assert [r["point"] for r in table] == [p for p in points for _ in range(len(CLASSES) + 1)]
    assert [r["class"] for r in table] == (CLASSES + ["all"]) * len(points)
    for name in PLOTS:
        assert (out / name).stat().st_size > 1000
    info = json.loads((out / "metrics.json").read_text())["info"]
    assert info["token_images_per_class"] == 4 and info["msssim_levels"] == 2 and info["ref_images"] == 15
    assert info["copy_split_images"] == 6 and info["copy_bank_images"] == 12 * 8  # 8 token copies per training image
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


def test_tp_samples_are_compared_with_the_test_images_less_their_teachers(evaluated: dict[str, Path]) -> None:
    out, samples = evaluated["out"], evaluated["samples"]
    manifest = [r for r in csv.DictReader(open(samples / "samples_manifest.csv")) if r["point"] == "TP_K2_cfg1.5"]
    tokens = load_tokens(json.loads((samples / "config.json").read_text())["tokens"])
    teachers = {tokens.source[int(r["teacher_row"])] for r in manifest}
    assert len(teachers) == 2 * len(CLASSES)
    net = load_feature_extractor("", "cpu")
    gen = extract_features([samples / r["path"] for r in manifest], net, cache_path=evaluated["cache"])
    real = [p for c in CLASSES for p in sorted((out / "real" / "test" / c).glob("*.png"))]
    kept = [p for p in real if str(p.relative_to(out / "real")) not in teachers]
    assert len(kept) == 9
    # 12 samples (4 per class) against 9 test images (3 per class): the class proportions match already.
    measured = row(rows(out), "TP_K2_cfg1.5", "all")
    whole, _ = kid_bootstrap(gen, extract_features(kept, net, cache_path=evaluated["cache"]))
    assert float(measured["kid"]) == pytest.approx(whole, rel=1e-5)
    assert float(measured["kid_lo"]) < float(measured["kid"]) < float(measured["kid_hi"])
    assert 0 <= float(measured["precision"]) <= 1 and 0 <= float(measured["coverage"]) <= 1
    # Per class: 4 samples but only 3 test images without the teachers: below min_class_images, blank.
    assert row(rows(out), "TP_K2_cfg1.5", "liver")["kid"] == ""
    assert row(rows(out), "NOP_cfg1.5", "liver")["kid"] != ""  # 4 samples against all 5 test images
    assert read_image(out / "real" / "test" / "liver" / "img0.png", SIZE).shape == (SIZE, SIZE, 3)
    assert len(list((out / "recon" / "test").rglob("*.png"))) == 15


def test_a_planted_training_reconstruction_is_flagged_and_the_controls_pass(evaluated: dict[str, Path]) -> None:
    table = rows(evaluated["out"])
    assert float(row(table, "NOP_cfg1.5", "heart")["copy_fraction"]) >= 1 / 4
    with np.load(evaluated["out"] / "nearest_train.npz", allow_pickle=False) as data:
        i = data["sample_path"].tolist().index("NOP_cfg1.5/heart/s002.png")
        assert data["image_similarity"][i] == pytest.approx(1.0, abs=1e-5) and data["flagged"][i]
        assert data["train_recon"][i] == "train/heart/img1.png"
    controls = json.loads((evaluated["out"] / "metrics.json").read_text())["info"]["controls"]
    assert controls["planted_recon_flagged"] == 1.0 and 0 <= controls["planted_augmented_flagged"] <= 1
    assert 0 <= controls["held_out_recon_flagged"] < 1


def test_reference_rows(evaluated: dict[str, Path]) -> None:
    table = rows(evaluated["out"])
    real = row(table, "REAL", "all")
    assert real["copy_fraction"] == "" and real["diversity"] == ""  # MS-SSIM only beside the reconstructions'
    assert 0 < float(real["feature_diversity"]) < 1 and float(row(table, "RECON", "all")["diversity"]) > 0
    for pn in SCALES:
        assert 0 < float(real[f"usage_{pn}"]) <= 1 and float(real[f"entropy_{pn}"]) >= 0
    assert row(table, "REAL_TRAIN", "all")["n"] == "12" and math.isfinite(float(row(table, "REAL_TRAIN", "all")["kid"]))
    assert row(table, "RECON", "breast")["n"] == "3"  # one half of the 5 test images (no manifest: one subject each)
    assert row(table, "RECON", "breast")["kid"] == ""  # 3 against 2 images: below min_class_images, blank
    assert 0 <= float(row(table, "RECON", "all")["copy_fraction"]) < 1


def test_compare_says_whether_a_difference_is_detectable(evaluated: dict[str, Path], capsys) -> None:
    out = evaluated["out"]
    eval_var.main([f"--compare={out},{out}"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "difference" in line]
    assert lines and all(line.endswith("no detectable difference") for line in lines)  # a run against itself
    eval_var.main([f"--compare={out}:REAL_TRAIN,{out}:NOP_cfg1.5", "--level=0.5"])
    printed = capsys.readouterr().out
    assert "REAL_TRAIN/NOP_cfg1.5 all" in printed and "kid" in printed
    with pytest.raises(SystemExit):
        eval_var.main([f"--compare={out},{out / 'missing'}"])
    assert "not a finished eval_var.py folder" in capsys.readouterr().err


def test_bad_inputs_are_refused(evaluated: dict[str, Path], tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit, match=r"^error: --ref_split='holdout': must be one of train, val, test$"):
        eval_var.main([f"--samples={evaluated['samples']}", "--ref_split=holdout"])
    with pytest.raises(SystemExit, match=r"^error: --bootstrap=9: must be >= 10$"):
        eval_var.main([f"--samples={evaluated['samples']}", "--bootstrap=9"])
    with pytest.raises(SystemExit, match=r"copy_split=test: must be a held-out split other than ref_split"):
        eval_var.main([f"--samples={evaluated['samples']}", "--copy_split=test"])
    broken = tmp_path / "broken"
    shutil.copytree(evaluated["samples"], broken, ignore=shutil.ignore_patterns("eval", "*.png"))
    (broken / "samples_manifest.csv").unlink()
    with pytest.raises(SystemExit):
        eval_var.main([f"--samples={broken}"])
    assert "not a finished sample_var.py folder" in capsys.readouterr().err


def test_a_rerun_with_the_same_inputs_rewrites_nothing(evaluated: dict[str, Path], tmp_path: Path, capsys) -> None:
    args = [f"--samples={evaluated['samples']}", f"--cache={evaluated['cache']}", *SMALL, "--device=cpu"]
    before = {p: p.stat().st_mtime_ns for p in evaluated["out"].rglob("*")}
    capsys.readouterr()
    eval_var.main(args)
    assert "up to date" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in evaluated["out"].rglob("*")} == before
    # A changed sample image is a changed input.
    samples = tmp_path / "samples"
    shutil.copytree(evaluated["samples"], samples, ignore=shutil.ignore_patterns("eval"))
    args = [f"--samples={samples}", f"--cache={evaluated['cache']}", *SMALL, "--device=cpu"]
    eval_var.main(args)
    first = float(row(rows(samples / "eval"), "NOP_cfg1.5", "all")["kid"])
    save_image(np.zeros((SIZE, SIZE, 3), np.uint8), samples / "NOP_cfg1.5" / "breast" / "s000.png")
    capsys.readouterr()
    eval_var.main(args)
    assert "up to date" not in capsys.readouterr().out
    assert float(row(rows(samples / "eval"), "NOP_cfg1.5", "all")["kid"]) != first


def test_at_most_keeps_per_class_no_more_than_the_limit_sets_images() -> None:
    labels, limit = np.array([0, 0, 0, 1, 1, 2]), np.array([0, 1, 1, 2, 2, 2])
    kept = eval_var.at_most(labels, limit, seed=0)
    assert np.bincount(labels[kept], minlength=3).tolist() == [1, 2, 1]  # class 0 cut to 1; 1 and 2 have fewer
    assert kept.tolist() == sorted(kept.tolist()) and {3, 4, 5} <= set(kept.tolist())
    assert eval_var.at_most(labels, np.array([1, 1]), seed=0).tolist() == [3, 4]  # no limit image: none kept


def test_the_tokenizer_level_reference_scores_a_mode_collapsed_set_low_recall_and_coverage() -> None:
    """1-D features, k = 1: reference reconstructions at 0, 1, 2, 3 (ball radii 1). A spread set reaches every one;
    four copies of one image (radii 0) are all inside real balls, reach no reference image and only two balls."""
    measure = eval_var.Measure(eval_var.Config(nn_k=1, min_class_images=2, bootstrap=10), (1,), 4, torch.device("cpu"))
    reference = np.array([[0.0], [1.0], [2.0], [3.0]])
    spread = measure.against_recon(np.array([[0.5], [2.5], [3.2], [1.4]]), reference, "NOP|heart")
    collapsed = measure.against_recon(np.array([[0.5]] * 4), reference, "COLLAPSED|heart")
    # density: 0.5 in balls 0 and 1, 2.5 in 2 and 3, 3.2 in 3, 1.4 in 1 and 2: 7 / 4.
    assert {m: spread[m] for m in eval_var.VS_RECON_METRICS} == pytest.approx(
        {"precision_vs_recon": 1.0, "recall_vs_recon": 1.0, "density_vs_recon": 1.75, "coverage_vs_recon": 1.0})
    assert {m: collapsed[m] for m in eval_var.VS_RECON_METRICS} == pytest.approx(
        {"precision_vs_recon": 1.0, "recall_vs_recon": 0.0, "density_vs_recon": 2.0, "coverage_vs_recon": 0.5})
    assert collapsed["coverage_vs_recon_lo"] <= 0.5 <= collapsed["coverage_vs_recon_hi"]
    assert measure.replicates["NOP|heart|recall_vs_recon"].shape == (10,)  # for --compare
    small = measure.against_recon(np.array([[0.5]]), reference, "NOP|liver")
    assert all(math.isnan(small[m]) for m in eval_var.VS_RECON_METRICS)  # below min_class_images: blank


def test_planted_augmented_copies_are_fresh_augmentations_encoded_by_the_vqvae(
        evaluated: dict[str, Path], tiny_pipeline: dict[str, Path], tmp_path: Path) -> None:
    """Two per class (control_per_class) training images, augmented with a seed of eval_var's own: their token rows
    are none of the token file's (whose 8 copies per training image are other augmentations), and they are decoded
    into planted_augmented/ as the tokens say."""
    out = evaluated["out"]
    sweep = eval_var.load_sweep(evaluated["samples"])
    config = eval_var.Config(samples=str(evaluated["samples"]), out=str(tmp_path / "eval"), device="cpu",
                             control_per_class=2)
    run = eval_var.open_run(eval_var.resolve(config, sweep), sweep)
    idx, labels, names = eval_var.planted_augmented(run)
    assert np.bincount(labels).tolist() == [2] * len(CLASSES) and all(n.endswith("_seed0.png") for n in names)
    bank = run.tokens.take(run.train_rows).copies().reshape(-1, idx.shape[1])
    assert not (idx[:, None, :] == bank[None]).all(axis=2).any()  # no planted row is a token-file row
    assert sorted(str(p.relative_to(out / "planted_augmented")) for p in (out / "planted_augmented").rglob("*.png")) \
        == sorted(names)
    vqvae = load_vqvae(tiny_pipeline["vqvae"])
    decoded = sample_var.decode_one_by_one(vqvae, split_scales(torch.from_numpy(idx[:1]), SCALES))[0]
    assert np.array_equal(read_image(out / "planted_augmented" / names[0], SIZE), decoded)


def test_token_statistics_of_the_real_rows_are_the_held_out_and_the_training_tokens(evaluated: dict[str, Path]) -> None:
    table = rows(evaluated["out"])
    tokens = load_tokens(json.loads((evaluated["samples"] / "config.json").read_text())["tokens"])
    for point, split in (("REAL", "test"), ("REAL_TRAIN", "train")):
        rows_of_split = np.flatnonzero(tokens.split == split)
        idx = eval_var.token_subsample(tokens.idx[rows_of_split], tokens.labels[rows_of_split], 4, 0)
        usage, entropy = token_usage_entropy(idx[:, -SCALES[-1] ** 2:], 32)
        measured = row(table, point, "all")
        assert float(measured[f"usage_{SCALES[-1]}"]) == pytest.approx(usage, rel=1e-5)
        assert float(measured[f"entropy_{SCALES[-1]}"]) == pytest.approx(entropy, rel=1e-5)
