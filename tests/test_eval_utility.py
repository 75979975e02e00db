"""eval_utility.py end to end on a sample_var.py sweep of the tiny pipeline (tests/tiny_pipeline.py): one epoch of
ShuffleNetV2 on a few 32 px images, so only the plumbing, the bookkeeping and the split rules are tested, not
whether the images help."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import eval_utility
import report
import sample_var
from common.classification_metrics import classification_scores
from common.image_data import list_split
from tiny_pipeline import CLASSES

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PLOTS = ("learning_curves.png", "confusion_matrices.png", "roc.png", "detectability_roc.png")
FAST = ["--arch=shufflenet_v2_x0_5", "--image_size=32", "--epochs=1", "--batch_size=4", "--seeds=2",
        "--ratios=0.5", "--detect_folds=2", "--bootstrap=50", "--device=cpu"]


def with_manifest(data: Path, dest: Path) -> Path:
    """A copy of the processed set with the manifest.csv prepare.py would write: two images per subject."""
    shutil.copytree(data, dest)
    with open(dest / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "subject", "status", "output"])
        for split in ("train", "val", "test"):
            paths, _ = list_split(dest, split, CLASSES)
            for i, path in enumerate(paths):
                writer.writerow(["tiny", f"{split}{i // 2}", "ok", path.relative_to(dest).as_posix()])
    return dest


@pytest.fixture(scope="module")
def evaluated(tiny_pipeline: dict[str, Path], tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_utility")
    data = with_manifest(tiny_pipeline["data"], root / "processed")
    samples = root / "samples"
    sample_var.main([f"--var={tiny_pipeline['var']}", f"--data_dir={data}", f"--out={samples}", "--tp=false",
                     "--samples_per_class=6", "--top_k=10", "--device=cpu"])
    eval_utility.main([f"--samples={samples}", *FAST])
    return {"samples": samples, "out": samples / "utility", "data": data}


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.e2e
def test_every_table_and_plot_is_written(evaluated: dict[str, Path]) -> None:
    out = evaluated["out"]
    for name in ("metrics.json", "metrics.csv", "config.json", *PLOTS):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    m = metrics(out)
    assert m["info"]["point"] == "NOP_cfg1.5" and m["info"]["data_dir"] == str(evaluated["data"])
    settings = list(dict.fromkeys(r["setting"] for r in m["tstr"]))
    assert settings == ["real", "real+synthetic x0.5", "synthetic"]
    # ratio 0.5 of 4 real training images per class: 2 synthetic ones each; synthetic only: all 6 of each class
    assert m["info"]["synthetic_images_added"]["real+synthetic x0.5"] == {c: 2 for c in CLASSES}
    assert m["info"]["synthetic_images_added"]["synthetic"] == {c: 6 for c in CLASSES}
    assert [d["setting"] for d in m["differences"]][::4] == ["real+synthetic x0.5 - real", "synthetic - real"]
    assert 0 <= m["detectability"]["auc"] <= 1 and len(m["detectability"]["per_seed"]) == 2
    assert not list(out.rglob("last.pth"))  # a finished run keeps its result, not its weights
    with open(out / "metrics.csv", newline="") as handle:
        sections = {r["section"] for r in csv.DictReader(handle)}
    assert sections == {"tstr", "difference", "detectability"}


@pytest.mark.e2e
def test_the_table_scores_the_saved_test_predictions(evaluated: dict[str, Path]) -> None:
    out = evaluated["out"]
    _, y = list_split(evaluated["data"], "test", CLASSES)
    m = metrics(out)
    for setting, folder in (("real", "real"), ("synthetic", "synthetic")):
        per_seed = []
        for seed in (0, 1):
            with np.load(out / "runs" / folder / f"seed{seed}" / "result.npz", allow_pickle=False) as data:
                per_seed.append(classification_scores(y, data["probs_test"])["balanced_accuracy"])
        row = next(r for r in m["tstr"] if r["setting"] == setting and r["class"] == "all"
                   and r["metric"] == "balanced_accuracy")
        assert row["values"] == pytest.approx(per_seed)
        assert row["mean"] == pytest.approx(np.mean(per_seed))
        assert row["low"] <= row["mean"] <= row["high"]
    real = next(r for r in m["tstr"] if r["setting"] == "real" and r["metric"] == "macro_f1" and r["class"] == "all")
    mixed = next(r for r in m["tstr"] if r["setting"] == "real+synthetic x0.5" and r["metric"] == "macro_f1"
                 and r["class"] == "all")
    difference = next(d for d in m["differences"] if d["setting"] == "real+synthetic x0.5 - real"
                      and d["metric"] == "macro_f1")
    assert difference["values"] == pytest.approx(np.subtract(mixed["values"], real["values"]))


@pytest.mark.e2e
def test_a_rerun_trains_nothing_and_a_lost_result_is_retrained_identically(evaluated: dict[str, Path]) -> None:
    out = evaluated["out"]
    result = out / "runs" / "real_plus_synthetic_x0.5" / "seed1" / "result.npz"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("result.npz")}
    with np.load(result, allow_pickle=False) as data:
        probs = data["probs_test"]
    result.unlink()
    eval_utility.main([f"--samples={evaluated['samples']}", *FAST])
    after = {p: p.stat().st_mtime_ns for p in out.rglob("result.npz")}
    assert {p: t for p, t in after.items() if p != result} == {p: t for p, t in before.items() if p != result}
    with np.load(result, allow_pickle=False) as data:
        assert np.array_equal(data["probs_test"], probs)  # seeded: the same run gives the same numbers


@pytest.mark.e2e
def test_an_interrupted_run_resumes_where_it_stopped(evaluated: dict[str, Path], tmp_path: Path,
                                                     monkeypatch) -> None:
    config = eval_utility.Config(arch="shufflenet_v2_x0_5", image_size=32, epochs=2, batch_size=4, device="cpu")
    rng = np.random.default_rng(0)
    train = eval_utility.Images(rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), np.arange(8) % 2,
                                np.arange(8).astype(str), [Path(f"img{i}.png") for i in range(8)])
    evals = {"val": train.take(np.arange(4))}

    def run(folder: Path) -> dict[str, np.ndarray]:
        return eval_utility.train_run(folder, "m", train, evals, 2, 0, 8, config, eval_utility.pick_device("cpu"))

    whole = run(tmp_path / "whole")
    real_check = eval_utility.check_epoch_finite

    def stop_in_epoch_2(model, epoch, losses):
        if epoch == 2:
            raise KeyboardInterrupt
        real_check(model, epoch, losses)

    monkeypatch.setattr(eval_utility, "check_epoch_finite", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    assert (tmp_path / "cut" / "last.pth").is_file() and not (tmp_path / "cut" / "result.npz").exists()
    monkeypatch.setattr(eval_utility, "check_epoch_finite", real_check)
    resumed = run(tmp_path / "cut")
    assert np.array_equal(resumed["val"], whole["val"])
    history = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]


@pytest.mark.e2e
def test_detection_folds_keep_each_subject_in_one_fold(evaluated: dict[str, Path]) -> None:
    config, inputs = eval_utility.resolve(eval_utility.Config(samples=str(evaluated["samples"]), image_size=32))
    both, is_synthetic, fold = eval_utility.detection_set(inputs, 2)
    for subject in np.unique(both.subject):
        assert len(np.unique(fold[both.subject == subject])) == 1, subject
    for c in range(len(CLASSES)):  # equally many real and synthetic images of each class, both sides in each fold
        assert (is_synthetic[both.y == c] == 1).sum() == (is_synthetic[both.y == c] == 0).sum() == 4
        for k in (0, 1):
            assert set(is_synthetic[(both.y == c) & (fold == k)]) == {0, 1}


@pytest.mark.e2e
def test_bad_inputs_are_refused(evaluated: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--arch='vgg16': must be one of resnet18, shufflenet_v2_x0_5"):
        eval_utility.main([f"--samples={evaluated['samples']}", "--arch=vgg16"])
    with pytest.raises(SystemExit, match=re.escape("no sweep point 'TP_K1_cfg1.5' (points: NOP_cfg1.5)")):
        eval_utility.main([f"--samples={evaluated['samples']}", "--point=TP_K1_cfg1.5", f"--out={tmp_path / 'u'}"])
    bare = tmp_path / "bare"
    shutil.copytree(evaluated["data"], bare)
    (bare / "manifest.csv").unlink()
    with pytest.raises(SystemExit, match=re.escape(f"{bare / 'manifest.csv'}: missing")):
        eval_utility.main([f"--samples={evaluated['samples']}", f"--data_dir={bare}", f"--out={tmp_path / 'u'}"])


@pytest.mark.e2e
def test_teacher_prefix_samples_of_the_test_split_are_refused(tiny_pipeline: dict[str, Path], tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    sample_var.main([f"--var={tiny_pipeline['var']}", f"--data_dir={tiny_pipeline['data']}", f"--out={samples}",
                     "--nop=false", "--coarse_ks=1", "--teachers_per_class=1", "--samples_per_teacher=2",
                     "--top_k=10", "--device=cpu"])
    with pytest.raises(SystemExit, match=re.escape("no no-prefix (NOP) point; name one of TP_K1_cfg1.5 with --point")):
        eval_utility.main([f"--samples={samples}", f"--out={tmp_path / 'u'}"])
    with pytest.raises(SystemExit, match="teacher images of the test split, on which the classifiers are scored"):
        eval_utility.main([f"--samples={samples}", "--point=TP_K1_cfg1.5", f"--out={tmp_path / 'u'}"])


@pytest.mark.e2e
def test_the_report_shows_the_tables_and_plots(evaluated: dict[str, Path], tmp_path: Path) -> None:
    text = report.build(report.Config(samples_dir=str(evaluated["samples"]), out=str(tmp_path / "report.html")))
    section = text.split('<h2 id="utility">')[1].split('<h2 id="configs">')[0]
    m = metrics(evaluated["out"])
    real = next(r for r in m["tstr"] if r["setting"] == "real" and r["class"] == "all" and r["metric"] == "macro_f1")
    assert f"{real['mean']:.3f} [{real['low']:.3f}, {real['high']:.3f}]" in section
    assert "real+synthetic x0.5 - real" in section and m["differences"][0]["verdict"] in section
    assert f"{m['detectability']['auc']:.3f} [{m['detectability']['low']:.3f}" in section
    for plot in PLOTS:
        assert f'src="{report.Page(tmp_path / "report.html").link(evaluated["out"] / plot)}"' in section
    assert '<a href="#utility">usefulness</a>' in text and "usefulness (eval_utility.py)" in text
    bare = report.build(report.Config(samples_dir=str(tmp_path / "none"), out=str(tmp_path / "report.html")))
    assert 'id="utility"' not in bare and "usefulness" not in bare  # no section for a step that did not run
