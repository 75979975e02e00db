"""eval_var.py on a sample_var.py sweep of the tiny pipeline (tests/tiny_pipeline.py), with the real InceptionV3.

eval_var.py's rules at non-default settings, with the Inception network stubbed by a 3-number feature of each file:
every constant's range, the refusals of a broken or mismatched sweep, which images each set holds and in what order,
the halves and token subsamples, each KID / FID / diversity / token / teacher / memorisation number of every row
computed by hand, and the rows and cells the tables write (issue 16)."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import warnings
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval_var
import sample_var
from common.fidelity import extract_features, fid_from_features, kid_bootstrap, load_feature_extractor
from common.image_data import read_image
from common.io import atomic_torch_save, file_sha256
from common.plotting import save_image
from common.sample_metrics import (bootstrap_weights, diversity, feature_diversity, fidelity_coverage,
                                   matched_subsample, percentile_interval, token_usage_entropy)
from common.sweep import SweepError
from common.tokens import TokenFileError, load_tokens, save_tokens, split_scales
from config_refusal import assert_edges, refusal_of
from models.decoding import decode_one_by_one
from models.vqvae import VQVAE, load_vqvae
from tiny_pipeline import CLASSES as PIPELINE_CLASSES, SCALES as PIPELINE_SCALES, SIZE as PIPELINE_SIZE

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
    save_image(decode_one_by_one(vqvae, tokens.idx_list([row]))[0], samples / "NOP_cfg1.5" / "heart" / "s002.png")
    eval_var.main([f"--samples={samples}", f"--cache={root / 'cache.npz'}", *SMALL, "--device=cpu"])
    return {"samples": samples, "out": samples / "eval", "cache": root / "cache.npz"}


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def row(table: list[dict[str, str]], point: str, name: str) -> dict[str, str]:
    return next(r for r in table if r["point"] == point and r["class"] == name)


@pytest.mark.e2e
def test_every_table_and_plot_is_written(evaluated: dict[str, Path]) -> None:
    out = evaluated["out"]
    table = rows(out)
    points = ["REAL", "REAL_TRAIN", "RECON", "NOP_cfg1.5"] + [f"TP_K{k}_cfg1.5" for k in range(1, len(PIPELINE_SCALES) + 1)]
    assert [r["point"] for r in table] == [p for p in points for _ in range(len(PIPELINE_CLASSES) + 1)]
    assert [r["class"] for r in table] == (PIPELINE_CLASSES + ["all"]) * len(points)
    for name in PLOTS:
        assert (out / name).stat().st_size > 1000
    info = json.loads((out / "metrics.json").read_text())["info"]
    assert info["token_images_per_class"] == 4 and info["msssim_levels"] == 2 and info["ref_images"] == 15
    assert info["copy_split_images"] == 6 and info["copy_bank_images"] == 12 * 8  # 8 token copies per training image
    assert row(table, "NOP_cfg1.5", "all")["n"] == "12" and row(table, "TP_K2_cfg1.5", "liver")["n"] == "4"
    assert all(row(table, "NOP_cfg1.5", c)["psnr_teacher"] == "" for c in PIPELINE_CLASSES)  # no teacher without a prefix


@pytest.mark.e2e
def test_full_prefix_samples_are_the_teachers_reconstructions(evaluated: dict[str, Path]) -> None:
    table = rows(evaluated["out"])
    for name in PIPELINE_CLASSES + ["all"]:
        full = row(table, f"TP_K{len(PIPELINE_SCALES)}_cfg1.5", name)
        assert float(full["psnr_recon"]) == 100 and float(full["ssim_recon"]) == 1
        assert float(full["diversity_per_teacher"]) == 0  # every sample of a teacher is the same image
        shorter = row(table, "TP_K1_cfg1.5", name)
        assert float(shorter["psnr_recon"]) < 100 and float(shorter["diversity_per_teacher"]) > 0


@pytest.mark.e2e
def test_tp_samples_are_compared_with_the_test_images_less_their_teachers(evaluated: dict[str, Path]) -> None:
    out, samples = evaluated["out"], evaluated["samples"]
    manifest = [r for r in csv.DictReader(open(samples / "samples_manifest.csv")) if r["point"] == "TP_K2_cfg1.5"]
    tokens = load_tokens(json.loads((samples / "config.json").read_text())["tokens"])
    teachers = {tokens.source[int(r["teacher_row"])] for r in manifest}
    assert len(teachers) == 2 * len(PIPELINE_CLASSES)
    net = load_feature_extractor("", "cpu")
    gen = extract_features([samples / r["path"] for r in manifest], net, cache_path=evaluated["cache"])
    real = [p for c in PIPELINE_CLASSES for p in sorted((out / "real" / "test" / c).glob("*.png"))]
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
    assert read_image(out / "real" / "test" / "liver" / "img0.png", PIPELINE_SIZE).shape == (PIPELINE_SIZE, PIPELINE_SIZE, 3)
    assert len(list((out / "recon" / "test").rglob("*.png"))) == 15


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_reference_rows(evaluated: dict[str, Path]) -> None:
    table = rows(evaluated["out"])
    real = row(table, "REAL", "all")
    assert real["copy_fraction"] == "" and real["diversity"] == ""  # MS-SSIM only beside the reconstructions'
    assert 0 < float(real["feature_diversity"]) < 1 and float(row(table, "RECON", "all")["diversity"]) > 0
    for pn in PIPELINE_SCALES:
        assert 0 < float(real[f"usage_{pn}"]) <= 1 and float(real[f"entropy_{pn}"]) >= 0
    assert row(table, "REAL_TRAIN", "all")["n"] == "12" and math.isfinite(float(row(table, "REAL_TRAIN", "all")["kid"]))
    assert row(table, "RECON", "breast")["n"] == "3"  # one half of the 5 test images (no manifest: one subject each)
    assert row(table, "RECON", "breast")["kid"] == ""  # 3 against 2 images: below min_class_images, blank
    assert 0 <= float(row(table, "RECON", "all")["copy_fraction"]) < 1


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
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
    save_image(np.zeros((PIPELINE_SIZE, PIPELINE_SIZE, 3), np.uint8), samples / "NOP_cfg1.5" / "breast" / "s000.png")
    capsys.readouterr()
    eval_var.main(args)
    assert "up to date" not in capsys.readouterr().out
    assert float(row(rows(samples / "eval"), "NOP_cfg1.5", "all")["kid"]) != first


CLASSES = ["a", "b"]
SCALES = (1, 2, 4)
SIZE = 16  # 4 x 2^2
VOCAB = 16
# The real images: val (the ref_split here) 4 + 8, test 2 + 1 (never used), train 8 + 2, listed out of order. Class
# b's val halves are large enough for a KID, class a's are not, and they differ in size; class a has more training
# token rows than the 3 per class that are compared (56 ways to draw them), class b fewer.
COUNTS = {("val", 0): 4, ("val", 1): 8, ("test", 0): 2, ("test", 1): 1, ("train", 0): 8, ("train", 1): 2}
# The sweep: (point, coarse_k, guidance, class, teacher of each sample); class b written before class a, and the points
# in the order sample_var.py was given them, which is not their sorted order.
SWEEP = [("TP_K1_cfg2.5", 1, 2.5, 1, [0, 0, 1]), ("TP_K1_cfg2.5", 1, 2.5, 0, [1, 0, 1, 0]),
         ("NOP_cfg2", 0, 2.0, 1, [-1] * 5), ("NOP_cfg2", 0, 2.0, 0, [-1] * 4)]


SETTINGS = dict(ref_split="val", copy_split="test", inception_weights="w.pth", fid_min_images=4, min_class_images=4,
                bootstrap=10, control_per_class=2, max_pairs=3, batch_size=5, seed=7, device="cpu")


def refusal(**overrides) -> str | None:
    return refusal_of(eval_var.validate, replace(eval_var.Config(), **overrides))


def test_every_constant_is_refused_just_outside_its_range_and_accepted_at_its_edge():
    table = {
        **{name: ([1], (0, ">= 1")) for name in ("nn_k", "control_per_class", "max_pairs", "closest_pairs",
                                                  "batch_size")},
        "fid_min_images": ([2], (1, ">= 2")),
        "min_class_images": ([4], (3, ">= 4")),  # k-NN balls of nn_k = 3 need 4 images
        "bootstrap": ([10], (9, ">= 10")),
        "level": ([0.001, 0.999], (1.0, "in (0, 1)")),
        "copy_margin": ([0.0, 0.999], (1.0, "in [0, 1)")),
        **{name: ([0], (-1, ">= 0")) for name in ("cpu_threads",)},
        "seed": ([0, 2**32 - 1], (2**32, "in [0, 4294967295]")),
        "ref_split": (["train", "test"], ("holdout", "one of train, val, test")),
        "copy_split": (["val"], ("holdout", "one of train, val, test")),
        "device": (["auto", "cpu"], ("tpu", "auto, cpu, or a cuda / mps device this machine has")),
    }
    assert_edges(refusal, table)
    for ref_split, copy_split in (("test", "train"), ("val", "val")):
        assert refusal(ref_split=ref_split, copy_split=copy_split) == (
            f"--copy_split={copy_split}: must be a held-out split other than ref_split ({ref_split}); its "
            "reconstructions set the copy thresholds, ref_split's check them")
    assert refusal(compare="a") == "--compare=a: expected two evaluations, A,B (each a folder or folder:POINT)"


def feature(path: Path) -> np.ndarray:
    """The stand-in network: three means of the file as it is stored (no resizing), less 0.45:
    vectors that point many ways, so that cosine similarities spread."""
    image = np.asarray(Image.open(path).convert("RGB"), np.float64) / 255
    side = image.shape[0] // 2
    return np.array([image.mean(), image[:side].mean(), image[:, :side, 0].mean()], np.float32) - 0.45


class StubNet:
    name = "stub network"


@pytest.fixture
def stubs(monkeypatch) -> dict:
    """The network, its features and the plots replaced: records what each is given."""
    calls: dict = {"features": [], "loaded": [], "plots": [], "vqvae": [], "diversity_on": set(), "desc": []}
    load_vqvae, measure_diversity = eval_var.load_vqvae, eval_var.diversity

    def vqvae(path, **kwargs):
        calls["vqvae"].append((path, kwargs))
        return load_vqvae(path, **kwargs)

    def spread(*args, device):
        calls["diversity_on"].add(device)
        return measure_diversity(*args, device=device)

    def load(weights, device):
        calls["loaded"].append((weights, device))
        return StubNet

    def extract(paths, net, batch_size, cache, desc):
        assert net is StubNet
        calls["features"].append((list(paths), batch_size, cache))
        calls["desc"].append(desc)
        return np.stack([feature(p) for p in paths]) if paths else np.zeros((0, 3), np.float32)

    def plot(name):
        def draw(*args):
            calls["plots"].append((name, args))
            out = args[-1]
            for file in eval_var.OUTPUTS:
                if file.endswith(".png"):
                    (out / file).write_bytes(b"png")
        return draw

    monkeypatch.setattr(eval_var, "load_feature_extractor", load)
    monkeypatch.setattr(eval_var, "load_vqvae", vqvae)
    monkeypatch.setattr(eval_var, "diversity", spread)
    monkeypatch.setattr(eval_var, "extract_features", extract)
    for name in ("plot_vs_k", "plot_tokens", "plot_memorisation"):
        monkeypatch.setattr(eval_var, name, plot(name))
    return calls


def noise(rng: np.random.Generator, side: int, level: int) -> np.ndarray:
    """Noise around a level, its top half and the red of its left half shifted at random: features that differ."""
    image = rng.normal(level, 30, (side, side, 3))
    image[: side // 2] += rng.uniform(-60, 60)
    image[:, : side // 2, 0] += rng.uniform(-60, 60)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A random VQ-VAE, a processed set of 20 px images (the model's side is 16), its token file and a sweep folder."""
    root = tmp_path_factory.mktemp("rules_eval_var")
    torch.manual_seed(0)
    vqvae = VQVAE(vocab_size=VOCAB, z_channels=4, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, scales=SCALES).eval()
    atomic_torch_save({"model": vqvae.state_dict(), "model_config": vqvae.config}, root / "vqvae.pth")
    rng = np.random.default_rng(0)
    entries = [(split, label, i) for (split, label), n in COUNTS.items() for i in range(n)]
    entries = [entries[i] for i in rng.permutation(len(entries))]
    source = [f"{split}/{CLASSES[label]}/img{i}.png" for split, label, i in entries]
    for name, (_, label, _) in zip(source, entries):
        save_image(noise(rng, 20, 60 + 80 * label), root / "data" / name)
    n, length = len(entries), sum(pn * pn for pn in SCALES)
    idx = rng.integers(0, VOCAB, (n, length))
    offsets = np.cumsum([0] + [pn * pn for pn in SCALES])
    save_tokens(root / "tokens.npz", scales=list(SCALES),
                maps=[idx[:, offsets[k]:offsets[k + 1]].reshape(n, pn, pn) for k, pn in enumerate(SCALES)],
                labels=np.array([e[1] for e in entries]), split=np.array([e[0] for e in entries]),
                source=np.array(source), vqvae_sha256=file_sha256(root / "vqvae.pth"), vqvae_config=vqvae.config,
                classes=CLASSES)
    samples = root / "samples"
    manifest = []
    for point, k, guidance, label, teachers in SWEEP:
        for s, teacher in enumerate(teachers):
            path = f"{point}/{CLASSES[label]}/s{s:03d}.png"
            save_image(noise(rng, SIZE, 90 + 40 * label), samples / path)
            manifest.append({"path": path, "point": point, "mode": "NOP" if k == 0 else "TP", "coarse_k": k,
                             "guidance": guidance, "class": CLASSES[label], "label": label, "teacher": teacher})
            if teacher >= 0:
                for kind in ("teachers", "teachers_recon"):
                    file = samples / kind / CLASSES[label] / f"t{teacher:02d}.png"
                    if not file.exists():
                        save_image(noise(rng, SIZE, 100), file)
    # One NOP sample of class a is a training image at the model's side: a copy the memorisation check must flag.
    copied = source[next(i for i, e in enumerate(entries) if e[:2] == ("train", 0))]
    save_image(read_image(root / "data" / copied, SIZE), samples / "NOP_cfg2/a/s002.png")
    with open(samples / "samples_manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(manifest[0]))
        writer.writeheader()
        writer.writerows(manifest)
    np.savez(samples / "samples_tokens.npz", idx=rng.integers(0, VOCAB, (len(manifest), length)),
             image_path=np.array([r["path"] for r in manifest]), vqvae_sha256=np.array(file_sha256(root / "vqvae.pth")),
             classes=np.array(CLASSES))
    (samples / "config.json").write_text(json.dumps({"data_dir": str(root / "data"), "tokens": str(root / "tokens.npz"),
                                                     "vqvae": str(root / "vqvae.pth")}))
    return {"root": root, "samples": samples, "vqvae": vqvae, "tokens": load_tokens(root / "tokens.npz"),
            "manifest": manifest, "copied": copied}


def run_config(world: dict, tmp_path: Path, **overrides) -> eval_var.Config:
    return eval_var.Config(**{"samples": str(world["samples"]), "out": str(tmp_path / "eval"),
                              "cache": str(tmp_path / "c.npz"), **SETTINGS, **overrides})


def test_out_defaults_to_the_eval_folder_of_the_sweep_and_inputs_to_what_sample_var_used(world, tmp_path):
    sweep = eval_var.load_sweep(world["samples"])
    filled = eval_var.resolve(eval_var.Config(samples=str(world["samples"])), sweep)
    assert (filled.out, filled.data_dir, filled.tokens, filled.vqvae) == (
        str(world["samples"] / "eval"), str(world["root"] / "data"), str(world["root"] / "tokens.npz"),
        str(world["root"] / "vqvae.pth"))
    given = eval_var.Config(samples="s", out="o", data_dir="d", tokens="t", vqvae="v")
    assert eval_var.resolve(given, sweep) == given
    sweep.config = {"tokens": "t2"}  # a key sample_var.py did not write stays empty
    assert eval_var.resolve(eval_var.Config(data_dir="d"), sweep) == eval_var.Config(data_dir="d", tokens="t2", out=str(
        world["samples"] / "eval"))
    assert sweep.points == ["TP_K1_cfg2.5", "NOP_cfg2"]
    assert sweep.vqvae_sha256 == world["tokens"].vqvae_sha256 and sweep.classes == CLASSES
    assert sweep.idx.dtype == np.int64 and sweep.idx.shape == (16, 21) and sweep.rows[0]["path"] == "TP_K1_cfg2.5/b/s000.png"


def copy_sweep(world: dict, tmp_path: Path) -> Path:
    folder = tmp_path / "sweep"
    folder.mkdir(parents=True)
    for name in ("config.json", "samples_manifest.csv", "samples_tokens.npz"):
        (folder / name).write_bytes((world["samples"] / name).read_bytes())
    return folder


def test_a_broken_or_mismatched_sweep_is_refused_by_name(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a missing file's message names the files of that name under ./runs
    folder = copy_sweep(world, tmp_path)
    (folder / "samples_manifest.csv").unlink()
    (folder / "config.json").unlink()
    with pytest.raises(SweepError) as err:
        eval_var.load_sweep(folder)
    assert str(err.value) == (f"{folder}: not a finished sample_var.py folder (missing {folder / 'config.json'}, "
                              f"{folder / 'samples_manifest.csv'})")
    folder = copy_sweep(world, tmp_path / "2")
    (folder / "config.json").write_text("{")
    with pytest.raises(SweepError, match=r"sweep: unreadable sample_var.py output: .*config.json: not valid JSON: Expecting"):
        eval_var.load_sweep(folder)
    folder = copy_sweep(world, tmp_path / "3")
    with np.load(folder / "samples_tokens.npz") as data:
        arrays = {k: data[k] for k in data.files if k != "classes"}
    np.savez(folder / "samples_tokens.npz", **arrays)
    with pytest.raises(SweepError) as err:
        eval_var.load_sweep(folder)
    assert str(err.value) == f"{folder}: unreadable sample_var.py output: 'classes is not a file in the archive'"
    arrays["image_path"] = arrays["image_path"][::-1]
    np.savez(folder / "samples_tokens.npz", **arrays, classes=np.array(CLASSES))
    with pytest.raises(SweepError) as err:
        eval_var.load_sweep(folder)
    assert str(err.value) == (f"{folder}: samples_manifest.csv and samples_tokens.npz list different images; "
                              "re-run sample_var.py")


def test_inputs_that_do_not_match_the_sweep_are_refused_before_any_work(world, stubs, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(eval_var.EvalVarError) as err:
        eval_var.evaluate(run_config(world, tmp_path, out=str(tmp_path / "file")))
    assert str(err.value) == f"{tmp_path / 'file'}: exists and is not a folder"
    tokens, root = world["tokens"], world["root"]
    other = tmp_path / "other.npz"
    keep = tokens.split != "train"
    save_tokens(other, scales=list(SCALES), maps=[m[keep] for m in split_maps(tokens.idx)], labels=tokens.labels[keep],
                split=tokens.split[keep], source=tokens.source[keep], vqvae_sha256=tokens.vqvae_sha256,
                vqvae_config=tokens.vqvae_config, classes=CLASSES)
    with pytest.raises(eval_var.EvalVarError) as err:
        eval_var.evaluate(run_config(world, tmp_path, tokens=str(other)))
    assert str(err.value) == f"{other}: 12 val, 0 train and 3 test (copy_split) images; all three are needed"
    with pytest.raises(eval_var.EvalVarError) as err:
        eval_var.evaluate(run_config(world, tmp_path, tokens=str(other), ref_split="test", copy_split="val"))
    assert str(err.value) == f"{other}: 3 test, 0 train and 12 val (copy_split) images; all three are needed"
    save_tokens(other, scales=list(SCALES), maps=split_maps(tokens.idx), labels=tokens.labels, split=tokens.split,
                source=tokens.source, vqvae_sha256=tokens.vqvae_sha256, vqvae_config=tokens.vqvae_config,
                classes=["a", "c"])
    sha = tokens.vqvae_sha256[:12]
    with pytest.raises(eval_var.EvalVarError) as err:
        eval_var.evaluate(run_config(world, tmp_path, tokens=str(other)))
    assert str(err.value) == (f"{world['samples']} was sampled with VQ-VAE sha {sha}... and classes ['a', 'b'], but "
                              f"{other} has sha {sha}... and classes ['a', 'c']")
    folder = copy_sweep(world, tmp_path)
    with np.load(folder / "samples_tokens.npz") as data:
        arrays = {k: data[k] for k in data.files}
    np.savez(folder / "samples_tokens.npz", **{**arrays, "vqvae_sha256": np.array("f" * 64)})
    with pytest.raises(eval_var.EvalVarError) as err:
        eval_var.evaluate(run_config(world, tmp_path, samples=str(folder)))
    assert str(err.value) == (f"{folder} was sampled with VQ-VAE sha ffffffffffff... and classes ['a', 'b'], but "
                              f"{root / 'tokens.npz'} has sha {sha}... and classes ['a', 'b']")
    other_vqvae = tmp_path / "other_vqvae.pth"  # tokens of another VQ-VAE than the one given
    other_vqvae.write_bytes((root / "vqvae.pth").read_bytes() + b"\0")
    with pytest.raises(TokenFileError, match=r"came from VQ-VAE sha .*, but .*other_vqvae.pth has sha"):
        eval_var.evaluate(run_config(world, tmp_path, vqvae=str(other_vqvae)))
    assert stubs["features"] == [] and stubs["loaded"] == []


def split_maps(idx: np.ndarray) -> list[np.ndarray]:
    offsets = np.cumsum([0] + [pn * pn for pn in SCALES])
    return [idx[:, offsets[k]:offsets[k + 1]].reshape(len(idx), pn, pn) for k, pn in enumerate(SCALES)]


def test_real_images_are_resized_once_and_rewritten_only_when_their_source_is_newer(world, tmp_path):
    tokens = world["tokens"]
    rows = np.array([3, 0])
    paths = eval_var.at_model_size(tokens, rows, world["root"] / "data", 8, tmp_path / "real")
    assert paths == [tmp_path / "real" / tokens.source[r] for r in rows]
    for r, path in zip(rows, paths):
        assert np.array_equal(np.asarray(Image.open(path)), read_image(world["root"] / "data" / tokens.source[r], 8))
    save_image(np.zeros((8, 8, 3), np.uint8), paths[0])
    os.utime(paths[0], (0, os.stat(world["root"] / "data" / tokens.source[3]).st_mtime))  # as old as its source
    eval_var.at_model_size(tokens, rows, world["root"] / "data", 8, tmp_path / "real")
    assert np.asarray(Image.open(paths[0])).max() == 0  # not rewritten
    os.utime(paths[0], (0, os.stat(world["root"] / "data" / tokens.source[3]).st_mtime - 1))  # older: rewritten
    eval_var.at_model_size(tokens, rows, world["root"] / "data", 8, tmp_path / "real")
    assert np.asarray(Image.open(paths[0])).max() > 0
    with pytest.raises(eval_var.EvalVarError) as err:
        eval_var.at_model_size(tokens, rows, tmp_path / "nowhere", 8, tmp_path / "real")
    assert str(err.value) == (f"{tmp_path / 'nowhere' / tokens.source[3]}: real image missing; --data_dir must be "
                              "the processed set that the token file was made from")


def test_evaluated_already_needs_every_output_and_the_same_inputs(tmp_path):
    made_from = {"settings": {"seed": 3}, "real": "abc"}
    for name in eval_var.OUTPUTS:
        (tmp_path / name).write_text("x")
    (tmp_path / "metrics.json").write_text(json.dumps({"info": {"made_from": made_from}}))
    assert eval_var.evaluated_already(tmp_path, made_from)
    assert not eval_var.evaluated_already(tmp_path, {**made_from, "real": "abd"})
    for text in ("{", json.dumps({"rows": []}), json.dumps([1]), json.dumps({"info": 3})):
        (tmp_path / "metrics.json").write_text(text)
        assert not eval_var.evaluated_already(tmp_path, made_from), text
    (tmp_path / "metrics.json").write_text(json.dumps({"info": {"made_from": made_from}}))
    for name in eval_var.OUTPUTS:
        (tmp_path / name).rename(tmp_path / "gone")
        assert not eval_var.evaluated_already(tmp_path, made_from), name
        (tmp_path / "gone").rename(tmp_path / name)


def test_against_leaves_small_sets_blank_and_gives_kid_over_all_pairs_with_an_interval():
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(9, 4)) + 1, rng.normal(size=(7, 4)) + 1.5
    measure = eval_var.Measure(eval_var.Config(min_class_images=5, fid_min_images=7, bootstrap=30, seed=3), SCALES,
                               VOCAB, torch.device("cpu"))
    out = measure.against(f1, f2, "P|a")
    weights = bootstrap_weights(9, 7, 30, 3 * 2 ** 32 + zlib.crc32(b"P|a"))  # a seed per row
    whole, values = kid_bootstrap(f1, f2, weights)
    assert out["kid"] == whole and (out["kid_lo"], out["kid_hi"]) == percentile_interval(values, 0.95)
    assert out["fid"] == fid_from_features(f1, f2)
    assert {k: out[k] for k in ("precision", "recall", "density", "coverage")} == fidelity_coverage(f1, f2, 3)
    subjects = np.array([0, 0, 0, 1, 1, 1, 2])  # the reference's subjects bound its balls (density changes)
    grouped = measure.against(f1, f2, "U|a", (None, subjects))
    assert ({k: grouped[k] for k in ("precision", "recall", "density", "coverage")}
            == fidelity_coverage(f1, f2, 3, real_groups=subjects) != fidelity_coverage(f1, f2, 3))
    assert np.array_equal(measure.replicates["P|a|kid"], values) and len(measure.replicates["P|a|coverage"]) == 30
    assert math.isnan(measure.against(f1[:6], f2[:6], "Q|a")["fid"])  # FID from 7 images
    small = measure.against(f1[:4], f2, "R|a")  # 4 < min_class_images: blank, nothing kept
    assert all(math.isnan(small[k]) for k in ("kid", "precision", "recall", "density", "coverage", "fid"))
    assert not any(key.startswith("R|") for key in measure.replicates)
    assert measure.spread(f1, "S|a")["feature_diversity"] == feature_diversity(f1)
    assert math.isnan(measure.spread(f1[:4], "T|a")["feature_diversity"])


def test_class_matched_draws_the_target_class_proportions_as_far_as_the_scarcest_class_allows():
    labels = np.array([0] * 6 + [1] * 6 + [2] * 2)
    kept = eval_var.class_matched(labels, np.array([0, 0, 1, 1, 2]), seed=1)  # proportions 2 : 2 : 1
    assert np.bincount(labels[kept]).tolist() == [4, 4, 2]  # class 2 has 2: twice the target
    assert np.array_equal(kept, eval_var.class_matched(labels, np.array([0, 0, 1, 1, 2]), seed=1))
    assert np.bincount(labels[eval_var.class_matched(labels, np.array([0, 1, 2]), seed=1)]).tolist() == [2, 2, 2]


def test_diversity_and_token_numbers_take_the_run_s_settings(monkeypatch):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    measure = eval_var.Measure(eval_var.Config(max_pairs=3, seed=4, min_class_images=5), (1, 2), 6, torch.device("cpu"))
    assert measure.diversity(images) == diversity(images, 3, 4)[0] != diversity(images, 10, 4)[0]
    assert measure.diversity(images) != diversity(images, 3, 0)[0]
    assert math.isnan(measure.diversity(images[:4]))  # below min_class_images
    on = []
    monkeypatch.setattr(eval_var, "diversity", lambda *args, device: on.append(device) or (0.5, 3))
    measure.device = torch.device("cuda", 1)  # MS-SSIM runs on the run's device
    assert measure.diversity(images) == 0.5 and on == [torch.device("cuda", 1)]
    idx = np.array([[5, 0, 1, 1, 2], [3, 1, 1, 1, 1]])
    assert measure.tokens(idx) == {"usage_1": 2 / 6, "entropy_1": 1.0, "usage_2": 3 / 6,
                                   "entropy_2": pytest.approx(-(6 / 8 * math.log2(6 / 8) + 2 / 8 * math.log2(1 / 8)))}


def test_class_mean_skips_missing_and_nan_values():
    rows = [{"x": 1.0}, {"x": math.nan}, {}, {"x": 4.0}]
    assert eval_var.class_mean(rows, "x") == 2.5 and isinstance(eval_var.class_mean(rows, "x"), float)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" in the run's output
        assert math.isnan(eval_var.class_mean([{}, {"x": math.nan}], "x"))


def test_token_subsample_keeps_per_class_rows_of_every_class_in_class_order():
    idx = np.arange(20).reshape(10, 2)
    labels = np.array([1, 0, 1, 1, 0, 1, 2, 1, 0, 1])
    kept = eval_var.token_subsample(idx, labels, 2, seed=3)
    rows = []
    for label in (0, 1, 2):
        members = np.flatnonzero(labels == label)
        rows += members[matched_subsample(len(members), 2, 3)].tolist()
    assert np.array_equal(kept, idx[rows]) and len(kept) == 5  # class 2 has one row: all of it
    assert not np.array_equal(eval_var.token_subsample(idx, labels, 2, seed=4), kept)


def test_tables_write_every_column_with_six_digits_and_blanks_for_nan(tmp_path):
    rows = [{"point": "TP_K1_cfg2", "mode": "TP", "coarse_k": 1, "guidance": 2.0, "class": "a", "n": 3, "kid": 0.123456789,
             "kid_lo": math.nan, "copy_fraction": 0.25, "usage_2": 0.5, "entropy_2": 1234567.0},
            {"point": "REAL", "mode": "REAL", "coarse_k": 0, "guidance": math.nan, "class": "all", "n": 9}]
    eval_var.write_tables(rows, {"x": 1}, (2,), tmp_path)
    lines = (tmp_path / "metrics.csv").read_text().split("\n")
    columns = eval_var.COLUMNS + ["usage_2", "entropy_2"]
    assert lines[0] == ",".join(columns)
    blank = len(columns) - 10  # the columns between kid and copy_fraction
    assert lines[1] == "TP_K1_cfg2,TP,1,2,a,3,0.123457" + "," * blank + ",0.25,0.5,1.23457e+06"
    assert lines[2] == "REAL,REAL,0,,all,9" + "," * (len(columns) - 6) and lines[3:] == [""]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["info"] == {"x": 1} and saved["rows"][0]["kid_lo"] is None and saved["rows"][1]["guidance"] is None
    assert saved["rows"][0]["kid"] == 0.123456789 and saved["rows"][1]["usage_2"] is None
    assert list(saved["rows"][0]) == columns


def test_the_summary_prints_the_all_rows_and_the_controls(capsys):
    rows = [{"point": "REAL", "class": "a", "n": 2}, {"point": "RECON", "class": "all", "n": 4},
            {"point": "TP_K1_cfg2", "class": "all", "n": 12, "kid": 0.01234, "kid_lo": 0.001, "kid_hi": 0.02,
             "precision": 0.5, "diversity": 0.25, "copy_fraction": 0.125}]
    info = {"feature_extractor": "net", "ref_images": 9, "ref_split": "val", "train_images": 5, "level": 0.9,
            "halves_subjects": 3, "copy_split": "test", "copy_split_images": 4, "copy_bank_images": 10,
            "controls": {"planted_recon_flagged": 1.0, "planted_augmented_flagged": 0.5, "held_out_recon_flagged": 0.0}}
    eval_var.print_summary(rows, info)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "all classes; [90% bootstrap interval]"
    assert out[2].split() == ["RECON", "4"] + ["nan"] * 9
    assert out[3].split() == ["TP_K1_cfg2", "12", "0.0123", "[0.0010,", "0.0200]", "0.50", "nan", "nan", "nan", "nan",
                              "nan", "0.250", "0.12"]
    assert out[4] == "net; 9 val / 5 train images; halves of val by subject (3 subjects)"
    assert out[5] == ("copy check controls: planted training reconstructions flagged 100%, planted augmented copies "
                      "50% (target missed), held-out val reconstructions 0%; thresholds from 4 test "
                      "reconstructions against 10 training token rows and reconstructions")


def test_the_copy_rule_flags_by_tokens_or_by_features_above_each_class_s_held_out_maximum():
    bank_idx = np.array([[1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]])
    bank_features = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # Held out: class 0 agrees with a bank row in 2 of 4 tokens at cosine 0.8; class 1 in 1 of 4 at cosine 0.6.
    held_idx = np.array([[1, 1, 0, 0], [2, 0, 0, 0]])
    held_features = np.array([[0.8, 0.6], [0.6, -0.8]])
    check = eval_var.CopyCheck.calibrated(bank_idx, bank_features, held_idx, held_features, np.array([0, 1]), 3,
                                          margin=0.0)
    assert check.token_thresholds[:2].tolist() == [0.5, 0.25] and math.isnan(check.token_thresholds[2])
    assert check.image_thresholds[:2] == pytest.approx([0.8, 0.6])
    wider = eval_var.CopyCheck.calibrated(bank_idx, bank_features, held_idx, held_features, np.array([0, 1]), 3,
                                          margin=0.5)
    assert wider.token_thresholds[:2].tolist() == [0.75, 0.625] and wider.image_thresholds[:2] == pytest.approx([0.9, 0.8])
    scored = check.score(np.array([[1, 1, 1, 0], [1, 1, 0, 0], [2, 2, 0, 0], [0, 0, 0, 0], [3, 3, 3, 3]]),
                         np.array([[0.0, -1.0], [0.0, 1.0], [0.0, -1.0], [0.0, -1.0], [-1.0, 0.0]]),
                         np.array([0, 0, 1, 1, 2]))
    assert scored["by_tokens"].tolist() == [True, False, True, False, False]  # 3/4 > 0.5; 2/4 is not above 0.5
    assert scored["by_image"].tolist() == [False, True, False, False, False]  # cosine 1 to bank row 1 > 0.8
    assert scored["flagged"].tolist() == [True, True, True, False, False]  # class 2: no held-out image, no threshold
    assert scored["token_sim"].tolist() == [0.75, 0.5, 0.5, 0.0, 1.0] and scored["nearest"][1] == 1


def test_the_controls_plant_bank_rows_and_score_the_held_out_reconstructions():
    bank_idx = np.repeat(np.arange(8)[:, None], 4, axis=1)  # 4 training images x 2 copies, all different
    bank_features = np.eye(8)
    labels, copy = np.array([0, 0, 1, 1, 0, 0, 1, 1]), np.array([0, 1] * 4)
    check = eval_var.CopyCheck(bank_idx, bank_features, np.array([0.5, 0.5]), np.array([0.9, 0.9]))
    recon_idx, recon_features = np.array([[9, 9, 9, 9], [0, 0, 9, 9]]), np.array([[1.0, 1.0] + [0] * 6, [0.0] * 7 + [1]])
    # Planted augmented copies: the first matches row 2's tokens (class 1), the second nothing: half flagged.
    augmented = eval_var.Planted(np.array([[2, 2, 2, 2], [9, 9, 9, 9]]), np.array([1, 0]), np.eye(8)[[0, 0]] * 0.5
                                 + np.eye(8)[[1, 4]] * 0.5)
    out = eval_var.controls(check, labels, copy, augmented, recon_idx, recon_features, np.array([0, 1]), per_class=1,
                            seed=0)
    assert out["planted_recon_flagged"] == 1.0 and out["planted_augmented_flagged"] == 0.5
    assert out["planted_augmented_by_tokens"] == 0.5 and out["planted_augmented_by_image"] == 0.0
    assert out["planted_recon_by_image"] == out["planted_recon_by_tokens"] == 1.0
    # Held out: the first agrees with no row (and sits between two at cosine 0.71); the second's features equal
    # bank row 7 (class 1, cosine 1 > 0.9) and its tokens half of row 0: flagged by its features only.
    assert out["held_out_recon_flagged"] == 0.5 and out["held_out_recon_by_image"] == 0.5
    assert out["held_out_recon_by_tokens"] == 0.0


def test_the_copy_bank_holds_every_training_row_and_its_augmented_copies(world):
    tokens = world["tokens"]
    train = np.flatnonzero(tokens.split == "train")
    idx, labels, copy, names = eval_var.copy_bank(tokens, train)
    assert np.array_equal(idx, tokens.idx[train]) and np.array_equal(labels, tokens.labels[train])
    assert copy.tolist() == [0] * len(train) and names == [str(s) for s in tokens.source[train]]


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


def test_a_large_sample_set_meets_the_tokenizer_level_reference_as_the_mean_over_draws_of_recons_size() -> None:
    """The reference of the test above; six samples measured in draws of four. Draw A is the spread set above
    (1, 1, 1.75, 1). Draw B, 0.5, 2.5, 10 and 11 (radii 2, 2, 1, 1): 10 and 11 are in no reference ball (precision
    0.5), 0.5 and 2.5 reach every reference image and lie in two balls each (density 4 / 4)."""
    measure = eval_var.Measure(eval_var.Config(nn_k=1, min_class_images=2, bootstrap=10), (1,), 4, torch.device("cpu"))
    reference = np.array([[0.0], [1.0], [2.0], [3.0]])
    samples = np.array([[0.5], [2.5], [3.2], [1.4], [10.0], [11.0]])
    draw_a, draw_b = np.array([0, 1, 2, 3]), np.array([0, 1, 4, 5])
    both = measure.against_recon(samples, reference, "NOP|heart", draws=[draw_a, draw_b, draw_a])
    assert {m: both[m] for m in eval_var.VS_RECON_METRICS} == pytest.approx(  # a repeated draw counts once
        {"precision_vs_recon": 0.75, "recall_vs_recon": 1.0, "density_vs_recon": 1.375, "coverage_vs_recon": 1.0})
    alone = []
    for draw in (draw_a, draw_b):  # the same key resamples alike, so the replicates are averaged alike
        single = eval_var.Measure(measure.config, (1,), 4, torch.device("cpu"))
        alone.append((single.against_recon(samples, reference, "NOP|heart", draws=[draw]),
                      single.replicates["NOP|heart|precision_vs_recon"]))
    assert [a["precision_vs_recon"] for a, _ in alone] == [1.0, 0.5]
    assert np.allclose(measure.replicates["NOP|heart|precision_vs_recon"], (alone[0][1] + alone[1][1]) / 2)
    with pytest.raises(ValueError, match="unequal sizes"):
        measure.against_recon(samples, reference, "NOP|liver", draws=[draw_a, np.array([0, 1, 2])])


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
    assert np.bincount(labels).tolist() == [2] * len(PIPELINE_CLASSES) and all(n.endswith("_seed0.png") for n in names)
    bank = run.tokens.take(run.train_rows).copies().reshape(-1, idx.shape[1])
    assert not (idx[:, None, :] == bank[None]).all(axis=2).any()  # no planted row is a token-file row
    assert sorted(str(p.relative_to(out / "planted_augmented")) for p in (out / "planted_augmented").rglob("*.png")) \
        == sorted(names)
    vqvae = load_vqvae(tiny_pipeline["vqvae"])
    decoded = decode_one_by_one(vqvae, split_scales(torch.from_numpy(idx[:1]), PIPELINE_SCALES))[0]
    assert np.array_equal(read_image(out / "planted_augmented" / names[0], PIPELINE_SIZE), decoded)


def test_token_statistics_of_the_real_rows_are_the_held_out_and_the_training_tokens(evaluated: dict[str, Path]) -> None:
    table = rows(evaluated["out"])
    tokens = load_tokens(json.loads((evaluated["samples"] / "config.json").read_text())["tokens"])
    for point, split in (("REAL", "test"), ("REAL_TRAIN", "train")):
        rows_of_split = np.flatnonzero(tokens.split == split)
        idx = eval_var.token_subsample(tokens.idx[rows_of_split], tokens.labels[rows_of_split], 4, 0)
        usage, entropy = token_usage_entropy(idx[:, -PIPELINE_SCALES[-1] ** 2:], 32)
        measured = row(table, point, "all")
        assert float(measured[f"usage_{PIPELINE_SCALES[-1]}"]) == pytest.approx(usage, rel=1e-5)
        assert float(measured[f"entropy_{PIPELINE_SCALES[-1]}"]) == pytest.approx(entropy, rel=1e-5)
