"""sample_var.py on the tiny pipeline of tests/tiny_pipeline.py (random 32 px VQ-VAE and 2-block VAR).

sample_var.py's rule functions at non-default settings (issue 16): every constant's allowed range at its edges,
the sweep and its order, which teachers are drawn and each image's seed, what a batch is sampled with, the layout of
the grids, the token files and the manifest, when a finished point is kept or redone, and the wording of each refusal.
Built on a tiny random VQ-VAE (scales 1,2,3, 6 px images), a hand-made token file and a 1-block VAR."""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import sample_var
from common.checkpoint import CheckpointError, load_checkpoint
from common.image_data import read_image, to_rgb_uint8
from common.io import atomic_torch_save, file_sha256
from common.plotting import save_image
from common.runtime import select_precision
from common.tokens import TokenFileError, TokenSet, load_tokens, save_tokens
from config_refusal import assert_edges, refusal_of
from models.decoding import decode_images, decode_one_by_one
from models.var import VAR, SamplingSettings
from models.vqvae import VQVAE
from tiny_pipeline import CLASSES as PIPELINE_CLASSES, SCALES as PIPELINE_SCALES, SIZE as PIPELINE_SIZE, tiny_vqvae

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


@pytest.mark.e2e
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
    for name in PIPELINE_CLASSES:
        assert sorted(f.name for f in (sweep / "teachers" / name).iterdir()) == ["t00.png", "t01.png"]
        assert sorted(f.name for f in (sweep / "teachers_recon" / name).iterdir()) == ["t00.png", "t01.png"]
    with np.load(sweep / "samples_tokens.npz", allow_pickle=False) as data:
        assert data["idx"].shape == (len(rows), sum(pn * pn for pn in PIPELINE_SCALES))
        assert data["image_path"].tolist() == [r["path"] for r in rows]
        assert data["seed"].tolist() == [int(r["seed"]) for r in rows]
        assert data["coarse_k"].tolist() == [int(r["coarse_k"]) for r in rows]
        assert data["classes"].tolist() == PIPELINE_CLASSES
    assert json.loads((sweep / "config.json").read_text())["vqvae"].endswith("vqvae.pth")  # resolved from the VAR


@pytest.mark.e2e
def test_seeds_are_shared_across_points_and_distinct_within(sweep: Path) -> None:
    rows = read_manifest(sweep)
    key = {(r["class"], r["teacher"], r["sample"]): r["seed"] for r in rows}
    assert all(key[(r["class"], r["teacher"], r["sample"])] == r["seed"] for r in rows)
    assert len(set(key.values())) == len(key)
    nop0 = [r for r in rows if r["point"] == "NOP_cfg0"]
    nop15 = [r for r in rows if r["point"] == "NOP_cfg1.5"]
    assert [r["seed"] for r in nop0] == [r["seed"] for r in nop15]
    assert any((sweep / a["path"]).read_bytes() != (sweep / b["path"]).read_bytes() for a, b in zip(nop0, nop15))


@pytest.mark.e2e
def test_teacher_prefix_and_full_prefix_reconstruction(sweep: Path, pipeline: dict[str, Path]) -> None:
    tokens = load_tokens(pipeline["tokens"])
    with np.load(sweep / "samples_tokens.npz", allow_pickle=False) as data:
        idx, k, rows, points = data["idx"], data["coarse_k"], data["teacher_row"], data["point"]
    assert (tokens.split[rows[k > 0]] == "test").all()
    for kk in range(1, len(PIPELINE_SCALES) + 1):
        n = sum(pn * pn for pn in PIPELINE_SCALES[:kk])
        sel = k == kk
        assert np.array_equal(idx[sel, :n], tokens.idx[rows[sel], :n])
        if kk < len(PIPELINE_SCALES):
            assert not np.array_equal(idx[sel], tokens.idx[rows[sel]])
    # k = all scales: token for token the teacher's, and the image is the teacher's reconstruction.
    full = k == len(PIPELINE_SCALES)
    assert np.array_equal(idx[full], tokens.idx[rows[full]])
    for r in read_manifest(sweep):
        if r["coarse_k"] == str(len(PIPELINE_SCALES)):
            recon = sweep / "teachers_recon" / r["class"] / f"t{int(r['teacher']):02d}.png"
            assert (sweep / r["path"]).read_bytes() == recon.read_bytes()
    assert set(points[k == 0]) == {"NOP_cfg0", "NOP_cfg1.5"}


@pytest.mark.e2e
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
        assert np.array_equal(image[0], read_image(sweep / r["path"], PIPELINE_SIZE))


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_changed_settings_redo_a_point(sweep: Path, pipeline: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "s"
    common = dict(tp=False, guidance=(1.5,))
    sample_var.main(args(pipeline, out, **common))
    before = (out / "NOP_cfg1.5" / "breast" / "s000.png").read_bytes()
    sample_var.main(args(pipeline, out, **common, temperature=0.5, samples_per_class=2))
    assert (out / "NOP_cfg1.5" / "breast" / "s000.png").read_bytes() != before
    assert not (out / "NOP_cfg1.5" / "breast" / "s002.png").exists()  # the outdated third image is gone
    assert len(read_manifest(out)) == 2 * len(PIPELINE_CLASSES)


@pytest.mark.e2e
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


@pytest.mark.e2e
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


SCALES = (1, 2, 3)
CLASSES = ["a", "b"]
# 10 rows: class 0 has test rows 1, 3, 5, 7 and class 1 test rows 2, 9; rows 0, 4, 6, 8 are train or val.
LABELS = [0, 0, 1, 0, 1, 0, 1, 0, 1, 1]
SPLIT = ["train", "test", "test", "test", "val", "test", "train", "test", "train", "test"]
CPU = torch.device("cpu")


def refusal(**overrides) -> str | None:
    return refusal_of(sample_var.validate, replace(sample_var.Config(), **overrides))


def test_every_constant_is_refused_just_outside_its_range_and_accepted_at_its_edge():
    table = {
        "teacher_split": (["train", "val", "test"], ("holdout", "one of train, val, test")),
        "coarse_ks": ([(), (1,), (3, 1)], ((2, 0), "values >= 1")),
        "guidance": ([(0.0,), (0.0, 2.5)], ((1.0, -0.5), "a non-empty list of values >= 0")),
        "guidance_schedule": (["linear", "constant"], ("cosine", "one of linear, constant")),
        **{name: ([1], (0, ">= 1")) for name in ("samples_per_class", "teachers_per_class", "samples_per_teacher",
                                                 "batch_size")},
        **{name: ([0], (-1, ">= 0")) for name in ("top_k", "cpu_threads")},
        "seed": ([0, 2**32 - 1], (2**32, "in [0, 4294967295]")),
        "top_p": ([0.0, 1.0], (1.5, "in [0, 1]")),
        "temperature": ([1e-6], (0.0, "> 0")),
        "precision": (["auto", "bf16", "fp16", "fp32"], ("fp8", "one of auto, bf16, fp16, fp32")),
        "device": (["auto", "cpu"], ("tpu", "auto, cpu, or a cuda / mps device this machine has")),
    }
    assert_edges(refusal, table)
    assert refusal(top_p=-0.1) == "--top_p=-0.1: must be in [0, 1]"
    assert refusal(guidance=()) == "--guidance=(): must be a non-empty list of values >= 0"


def test_the_counts_of_a_mode_that_is_off_are_not_checked():
    assert refusal(nop=False, samples_per_class=0) is None
    assert refusal(tp=False, teachers_per_class=0, samples_per_teacher=0) is None
    assert refusal(tp=False, samples_per_class=0) == "--samples_per_class=0: must be >= 1"
    assert refusal(nop=False, samples_per_teacher=0) == "--samples_per_teacher=0: must be >= 1"


def test_nothing_to_sample_and_repeated_guidance_values_are_refused():
    assert refusal(nop=False, tp=False) == "--tp=False: must be true when --nop=false (nothing would be sampled)"
    assert refusal(nop=False) is None and refusal(tp=False) is None
    assert refusal(guidance=(1.0, 2.0, 1.0)) == ("--guidance=(1.0, 2.0, 1.0): must be distinct values (also once "
                                                 "rounded for names)")
    assert refusal(guidance=(1.0, 2.0)) is None


def test_the_sweep_is_nop_then_each_k_at_every_guidance_value():
    config = sample_var.Config(guidance=(2.0, 0.5))
    names = [p.name for p in sample_var.sweep_points(config, 3)]
    assert names == ["NOP_cfg2", "NOP_cfg0.5", "TP_K1_cfg2", "TP_K1_cfg0.5", "TP_K2_cfg2", "TP_K2_cfg0.5",
                     "TP_K3_cfg2", "TP_K3_cfg0.5"]
    assert sample_var.sweep_points(replace(config, coarse_ks=(3, 1)), 3) == [
        sample_var.Point(0, 2.0), sample_var.Point(0, 0.5), sample_var.Point(3, 2.0), sample_var.Point(3, 0.5),
        sample_var.Point(1, 2.0), sample_var.Point(1, 0.5)]
    assert sample_var.sweep_points(replace(config, nop=False, guidance=(1.5,)), 2) == [sample_var.Point(1, 1.5),
                                                                                       sample_var.Point(2, 1.5)]
    assert sample_var.sweep_points(replace(config, tp=False, coarse_ks=(1,)), 3) == [sample_var.Point(0, 2.0),
                                                                                     sample_var.Point(0, 0.5)]


def test_a_k_beyond_the_var_s_scales_is_refused():
    assert len(sample_var.sweep_points(sample_var.Config(coarse_ks=(4, 2)), 4)) == 3
    with pytest.raises(sample_var.SampleVarError) as err:
        sample_var.sweep_points(sample_var.Config(coarse_ks=(2, 5)), 4)
    assert str(err.value) == "--coarse_ks: must be in [1, 4] (the VAR has 4 scales), got (2, 5)"
    with pytest.raises(sample_var.SampleVarError):  # checked even when TP is off: the constant is still wrong
        sample_var.sweep_points(sample_var.Config(tp=False, coarse_ks=(5,)), 4)


def test_point_names_and_file_names():
    assert [sample_var.Point(0, 1.5).name, sample_var.Point(3, 0.0).name, sample_var.Point(10, 2.25).name] == \
        ["NOP_cfg1.5", "TP_K3_cfg0", "TP_K10_cfg2.25"]
    assert sample_var.Job(1, -1, -1, 7, 0).file_name() == "s007.png"
    assert sample_var.Job(1, 3, 12, 2, 0).file_name() == "t03_s02.png"
    assert sample_var.Job(1, 0, 12, 0, 0).file_name() == "t00_s00.png"  # teacher 0 is a teacher


def test_an_image_s_seed_is_63_bits_of_its_seed_sequence():
    a, b = np.random.SeedSequence([5, 1, 3, 2]).generate_state(2, np.uint32)  # teacher 2 -> 3: NOP's -1 -> 0
    assert sample_var.image_seed(5, 1, 2, 2) == (int(a) << 31) ^ int(b)
    seeds = {sample_var.image_seed(5, label, teacher, s) for label in range(3) for teacher in (-1, 0, 1)
             for s in range(4)}
    assert len(seeds) == 36 and all(0 <= s < 2 ** 63 for s in seeds)
    assert max(seeds) >= 2 ** 62  # the top bit is used: a << 30 would leave it 0
    assert sample_var.image_seed(6, 1, 2, 2) != sample_var.image_seed(5, 1, 2, 2)


def token_set(n_rows: int = 10, seed: int = 0) -> TokenSet:
    rng = np.random.default_rng(seed)
    length = sum(pn * pn for pn in SCALES)
    return TokenSet(scales=SCALES, idx=rng.integers(0, 32, (n_rows, length)), labels=np.array(LABELS[:n_rows]),
                    split=np.array(SPLIT[:n_rows]), source=np.array([f"{c}/img{i}.png" for i, c in
                                                                     zip(range(n_rows), "abbabababb")]),
                    classes=list(CLASSES), vqvae_sha256="0" * 64, vqvae_config={})


@pytest.mark.e2e
def test_teachers_are_a_seeded_draw_without_replacement_from_the_class_s_images_of_the_split(capsys, monkeypatch):
    printed = []
    monkeypatch.setattr(sample_var, "print", lambda *args, **kwargs: printed.append(kwargs) or print(*args, **kwargs),
                        raising=False)
    tokens = token_set()
    chosen = sample_var.choose_teachers(tokens, "test", 2, 3, seed=4)
    members = {0: np.array([1, 3, 5, 7]), 1: np.array([2, 9])}
    expected = {label: members[label][np.random.default_rng([4, label]).choice(len(members[label]), n, replace=False)]
                .tolist() for label, n in ((0, 3), (1, 2))}
    assert chosen == expected
    assert len(set(chosen[0])) == 3 and set(chosen[1]) == {2, 9}
    assert capsys.readouterr().out == "note: class 'b' has 2 images in split 'test': 2 teachers instead of 3\n"
    assert printed == [{"flush": True}]  # seen at once, also when piped
    assert sample_var.choose_teachers(tokens, "test", 2, 3, seed=4) == chosen
    capsys.readouterr()
    draws = {tuple(sample_var.choose_teachers(tokens, "test", 2, 2, seed=s)[0]) for s in range(8)}
    assert len(draws) > 3  # the seed matters
    assert sample_var.choose_teachers(tokens, "train", 2, 1, seed=0) == {0: [0], 1: [np.random.default_rng(
        [0, 1]).choice([6, 8], 1).item()]}
    assert capsys.readouterr().out == ""  # enough images: no note


def test_a_class_without_images_in_the_split_is_refused_by_name():
    with pytest.raises(sample_var.SampleVarError) as err:
        sample_var.choose_teachers(token_set(), "val", 2, 1, seed=0)
    assert str(err.value) == ("split 'val' of the token file has no image of class 'a': choose another --teacher_split "
                              "or turn TP off (--tp=false)")


def test_jobs_are_class_major_then_teacher_then_sample_with_their_own_seeds():
    config = sample_var.Config(samples_per_class=3, samples_per_teacher=2, seed=9)
    nop = sample_var.point_jobs(sample_var.Point(0, 1.0), config, 2, {})
    J, seed = sample_var.Job, sample_var.image_seed
    assert nop == [J(label, -1, -1, s, seed(9, label, -1, s)) for label in (0, 1) for s in range(3)]
    teachers = {0: [7, 3], 1: [2]}
    tp = sample_var.point_jobs(sample_var.Point(2, 1.0), config, 2, teachers)
    assert tp == [J(0, 0, 7, 0, seed(9, 0, 0, 0)), J(0, 0, 7, 1, seed(9, 0, 0, 1)), J(0, 1, 3, 0, seed(9, 0, 1, 0)),
                  J(0, 1, 3, 1, seed(9, 0, 1, 1)), J(1, 0, 2, 0, seed(9, 1, 0, 0)), J(1, 0, 2, 1, seed(9, 1, 0, 1))]
    assert sample_var.point_jobs(sample_var.Point(1, 3.0), config, 2, teachers) == tp  # the same seeds at every k


def test_framed_paints_a_red_border_of_the_given_width_on_a_copy():
    image = np.arange(6 * 6 * 3, dtype=np.uint8).reshape(6, 6, 3)
    original = image.copy()
    for width, out in ((2, sample_var.framed(image)), (1, sample_var.framed(image, 1))):  # 2 px by default
        red = np.zeros((6, 6), bool)
        red[:width] = red[-width:] = red[:, :width] = red[:, -width:] = True
        assert (out[red] == (220, 30, 30)).all() and np.array_equal(out[~red], image[~red]), width
    assert np.array_equal(image, original)


def fake_grid(monkeypatch) -> dict:
    drawn = {}

    def save(tiles, ncols, row_labels, path, title):
        drawn.update(tiles=tiles, ncols=ncols, row_labels=row_labels, path=path, title=title)

    monkeypatch.setattr(sample_var, "save_labelled_grid", save)
    return drawn


def tile(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, np.uint8)


def test_a_nop_grid_has_a_row_per_class_in_job_order(monkeypatch, tmp_path):
    drawn = fake_grid(monkeypatch)
    config = sample_var.Config(samples_per_class=2, top_k=7, top_p=0.5, temperature=0.75)
    jobs = sample_var.point_jobs(sample_var.Point(0, 2.5), config, 2, {})
    images = np.stack([tile(10 * i) for i in range(4)])
    sample_var.save_point_grid(sample_var.Point(0, 2.5), jobs, images, {}, CLASSES, config, tmp_path / "g.png")
    assert drawn["ncols"] == 2 and drawn["row_labels"] == CLASSES and drawn["path"] == tmp_path / "g.png"
    assert np.array_equal(drawn["tiles"], images)
    assert drawn["title"] == "NOP_cfg2.5: no prefix; guidance 2.5 (linear), top-k 7, top-p 0.5, temperature 0.75"


def test_a_tp_grid_puts_each_framed_teacher_before_its_samples_and_pads_short_rows_white(monkeypatch, tmp_path):
    drawn = fake_grid(monkeypatch)
    config = sample_var.Config(samples_per_teacher=2, top_k=0, top_p=0.0, temperature=1.0)
    point = sample_var.Point(1, 0.0)
    jobs = sample_var.point_jobs(point, config, 2, {0: [1, 3], 1: [2]})  # class a: 2 teachers, class b: 1
    images = np.stack([tile(10 * (i + 1)) for i in range(6)])
    teachers = {0: [tile(100), tile(110)], 1: [tile(120)]}
    sample_var.save_point_grid(point, jobs, images, teachers, CLASSES, config, tmp_path / "g.png")
    white = tile(255)
    expected = [sample_var.framed(tile(100)), tile(10), tile(20), sample_var.framed(tile(110)), tile(30), tile(40),
                sample_var.framed(tile(120)), tile(50), tile(60), white, white, white]
    assert drawn["ncols"] == 6
    assert np.array_equal(drawn["tiles"], np.stack(expected)) and drawn["tiles"].dtype == np.uint8  # white blanks too
    assert drawn["title"] == ("TP_K1_cfg0: first 1 scales from the teacher (red frame), the rest sampled; 2 per "
                              "teacher; guidance 0 (linear), top-k 0, top-p 0.0, temperature 1")


def precision_of(name: str = "fp32"):
    return select_precision(CPU, name)


def test_the_fingerprint_holds_everything_an_image_depends_on_and_not_the_batch_size():
    config = sample_var.Config(top_k=5, top_p=0.25, temperature=0.5, batch_size=3)
    point, shas = sample_var.Point(2, 1.5), {"var": "v", "vqvae": "q", "tokens": "t"}
    jobs = [sample_var.Job(1, 0, 7, 2, 12345), sample_var.Job(0, 1, 3, 0, 6789)]
    fp = sample_var.fingerprint(point, jobs, config, shas, precision_of())
    assert json.loads(fp) == {"point": "TP_K2_cfg1.5", "shas": shas, "guidance_schedule": "linear", "top_k": 5,
                              "top_p": 0.25, "temperature": 0.5, "precision": "fp32", "device": "cpu",
                              "jobs": [[1, 0, 7, 2, 12345], [0, 1, 3, 0, 6789]]}
    assert sample_var.fingerprint(point, jobs, replace(config, batch_size=8, seed=3), shas, precision_of()) == fp
    assert sample_var.fingerprint(point, jobs, replace(config, guidance_schedule="constant"), shas,
                                  precision_of()) != fp


def write_point(point_dir: Path, files: list[str], fingerprint: str, **extra) -> None:
    for f in files:
        save_image(tile(0), point_dir / f)
    np.savez(point_dir / "tokens.npz", label=np.array([0, 1]), image_path=np.array(files),
             fingerprint=np.array(fingerprint), **extra)


def test_a_finished_point_is_kept_only_when_complete_readable_and_made_with_the_same_settings(tmp_path):
    point_dir = tmp_path / "NOP_cfg1"
    assert sample_var.load_finished_point(point_dir, "fp") is None  # never started
    files = ["a/s000.png", "b/s000.png"]
    write_point(point_dir, files, "fp")
    arrays = sample_var.load_finished_point(point_dir, "fp")
    assert sorted(arrays) == ["fingerprint", "image_path", "label"] and arrays["image_path"].tolist() == files
    assert arrays["label"].tolist() == [0, 1]
    assert sample_var.load_finished_point(point_dir, "other settings") is None
    (point_dir / "b" / "s000.png").unlink()
    assert sample_var.load_finished_point(point_dir, "fp") is None  # an image is missing
    save_image(tile(0), point_dir / "b" / "s000.png")
    (point_dir / "tokens.npz").write_bytes(b"PK\x03\x04 cut short")
    assert sample_var.load_finished_point(point_dir, "fp") is None  # a damaged marker
    (point_dir / "tokens.npz").write_bytes(b"")
    assert sample_var.load_finished_point(point_dir, "fp") is None


def test_a_marker_holding_pickles_is_never_unpickled(tmp_path):
    point_dir = tmp_path / "NOP_cfg1"
    write_point(point_dir, ["a/s000.png"], "fp", extra=np.array([{"x": 1}], dtype=object))
    assert sample_var.load_finished_point(point_dir, "fp") is None


def test_clearing_a_point_removes_its_marker_and_class_images_only(tmp_path):
    point_dir = tmp_path / "TP_K1_cfg1"
    for f in ("a/s000.png", "a/t00_s01.png", "b/s000.png", "c/s000.png", "a/notes.txt", "top.png"):
        (point_dir / f).parent.mkdir(parents=True, exist_ok=True)
        (point_dir / f).write_bytes(b"x")
    (point_dir / "tokens.npz").write_bytes(b"x")
    sample_var.clear_point(point_dir, CLASSES)
    left = sorted(p.relative_to(point_dir).as_posix() for p in point_dir.rglob("*") if p.is_file())
    assert left == ["a/notes.txt", "c/s000.png", "top.png"]
    sample_var.clear_point(tmp_path / "never_started", CLASSES)  # nothing there: nothing to do


class Bar:
    def __init__(self) -> None:
        self.updates: list[int] = []

    def update(self, n: int) -> None:
        self.updates.append(n)


@pytest.mark.e2e
def test_a_point_is_sampled_in_batches_saved_by_name_and_marked_finished_last(tmp_path, monkeypatch):
    calls = []

    def fake_sample_jobs(*args):
        var, vqvae, tokens, point, jobs, config, precision = args
        assert (var, vqvae, tokens, point, config, precision) == passed
        calls.append([j.sample for j in jobs])
        images = np.stack([tile(j.label * 100 + j.teacher * 10 + j.sample + 10) for j in jobs])
        return images, np.array([[j.sample, j.seed % 1000] for j in jobs], np.int64)

    monkeypatch.setattr(sample_var, "sample_jobs", fake_sample_jobs)
    config = sample_var.Config(samples_per_teacher=2, batch_size=3, seed=2)
    point = sample_var.Point(1, 1.0)
    jobs = sample_var.point_jobs(point, config, 2, {0: [1, 3], 1: [2]})
    point_dir = tmp_path / point.name
    (point_dir / "a").mkdir(parents=True)
    (point_dir / "a" / "t05_s00.png").write_bytes(b"left by an older run")
    (point_dir / "tokens.npz").write_bytes(b"outdated marker")
    bar, tokens = Bar(), token_set()
    passed = ("the var", "the vqvae", tokens, point, config, "the precision")
    arrays = sample_var.run_point(point, jobs, "the var", "the vqvae", tokens, config, "the precision", tmp_path,
                                  "the fp", bar)
    assert calls == [[0, 1, 0], [1, 0, 1]] and bar.updates == [3, 3]
    names = ["a/t00_s00.png", "a/t00_s01.png", "a/t01_s00.png", "a/t01_s01.png", "b/t00_s00.png", "b/t00_s01.png"]
    assert sorted(p.relative_to(point_dir).as_posix() for p in point_dir.rglob("*.png")) == names
    for name, job in zip(names, jobs):
        assert np.array_equal(read_image(point_dir / name, 4), tile(job.label * 100 + job.teacher * 10 + job.sample + 10))
    with np.load(point_dir / "tokens.npz", allow_pickle=False) as saved:
        on_disk = {k: saved[k] for k in saved.files}
    assert sorted(on_disk) == ["fingerprint", "idx", "image_path", "label", "sample", "seed", "teacher", "teacher_row"]
    assert on_disk["label"].tolist() == [0, 0, 0, 0, 1, 1] and on_disk["teacher"].tolist() == [0, 0, 1, 1, 0, 0]
    assert on_disk["teacher_row"].tolist() == [1, 1, 3, 3, 2, 2] and on_disk["sample"].tolist() == [0, 1, 0, 1, 0, 1]
    assert on_disk["seed"].tolist() == [j.seed for j in jobs] and all(on_disk[k].dtype == np.int64 for k in
                                                                        sample_var._ROW_ARRAYS)
    assert on_disk["idx"].dtype == np.int16 and on_disk["idx"].tolist() == [[j.sample, j.seed % 1000] for j in jobs]
    assert on_disk["image_path"].tolist() == names and str(on_disk["fingerprint"]) == "the fp"
    assert np.array_equal(arrays["images"], np.stack([tile(j.label * 100 + j.teacher * 10 + j.sample + 10) for j in jobs]))
    assert all(np.array_equal(arrays[k], on_disk[k]) for k in on_disk)
    assert sample_var.load_finished_point(point_dir, "the fp") is not None


@pytest.mark.e2e
def test_a_point_killed_while_sampling_leaves_no_marker(tmp_path, monkeypatch):
    def dying(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_var, "sample_jobs", dying)
    point_dir = tmp_path / "NOP_cfg1"
    point_dir.mkdir()
    (point_dir / "tokens.npz").write_bytes(b"outdated marker")
    jobs = sample_var.point_jobs(sample_var.Point(0, 1.0), sample_var.Config(samples_per_class=1), 2, {})
    with pytest.raises(KeyboardInterrupt):
        sample_var.run_point(sample_var.Point(0, 1.0), jobs, None, None, token_set(), sample_var.Config(), None,
                             tmp_path, "fp", Bar())
    assert not (point_dir / "tokens.npz").exists()


def point_result(point: sample_var.Point, jobs: list[sample_var.Job], idx_value: int) -> dict[str, np.ndarray]:
    arrays = {name: np.array([getattr(j, name) for j in jobs], np.int64) for name in sample_var._ROW_ARRAYS}
    arrays["idx"] = np.full((len(jobs), 3), idx_value, np.int16)
    arrays["image_path"] = np.array([f"{CLASSES[j.label]}/{j.file_name()}" for j in jobs])
    return arrays


def test_the_merged_token_arrays_follow_the_sweep_with_each_row_s_point_and_teacher_source():
    config = sample_var.Config(samples_per_class=1, samples_per_teacher=1, seed=1)
    points = [sample_var.Point(0, 1.5), sample_var.Point(2, 0.5)]
    jobs = [sample_var.point_jobs(points[0], config, 2, {}), sample_var.point_jobs(points[1], config, 2, {0: [0], 1: [9]})]
    results = [point_result(p, j, v) for p, j, v in zip(points, jobs, (4, 7))]
    tokens = token_set()
    merged = sample_var.merged_arrays(points, results, tokens, {"var": "v1", "vqvae": "q1", "tokens": "t1"})
    assert sorted(merged) == sorted([*sample_var._ROW_ARRAYS, "idx", "scales", "point", "coarse_k", "guidance", "image_path",
                                     "teacher_source", "classes", "var_sha256", "vqvae_sha256", "tokens_sha256"])
    assert merged["label"].tolist() == [0, 1, 0, 1] and merged["teacher_row"].tolist() == [-1, -1, 0, 9]
    assert merged["seed"].tolist() == [j.seed for js in jobs for j in js]
    assert merged["idx"].tolist() == [[4] * 3] * 2 + [[7] * 3] * 2
    assert merged["scales"].tolist() == [1, 2, 3] and merged["scales"].dtype == np.int64
    assert merged["point"].tolist() == ["NOP_cfg1.5"] * 2 + ["TP_K2_cfg0.5"] * 2
    assert merged["coarse_k"].tolist() == [0, 0, 2, 2] and merged["coarse_k"].dtype == np.int64
    assert merged["guidance"].tolist() == [1.5, 1.5, 0.5, 0.5] and merged["guidance"].dtype == np.float64
    assert merged["image_path"].tolist() == ["NOP_cfg1.5/a/s000.png", "NOP_cfg1.5/b/s000.png",
                                             "TP_K2_cfg0.5/a/t00_s00.png", "TP_K2_cfg0.5/b/t00_s00.png"]
    assert merged["teacher_source"].tolist() == ["", "", "a/img0.png", "b/img9.png"]  # row 0 is a teacher too
    assert merged["classes"].tolist() == CLASSES
    assert [str(merged[k]) for k in ("var_sha256", "vqvae_sha256", "tokens_sha256")] == ["v1", "q1", "t1"]


def test_the_manifest_has_a_row_per_image_with_what_regenerates_it(tmp_path):
    config = sample_var.Config(samples_per_class=1, samples_per_teacher=2, seed=1, top_k=3, top_p=0.5,
                               temperature=0.8, guidance_schedule="constant")
    points = [sample_var.Point(0, 1.5), sample_var.Point(3, 0.0)]
    jobs = [sample_var.point_jobs(points[0], config, 1, {}), sample_var.point_jobs(points[1], config, 1, {0: [0]})]
    results = [point_result(p, j, 0) for p, j in zip(points, jobs)]
    sample_var.write_manifest(tmp_path / "m.csv", points, results, token_set(), config, precision_of())
    seeds = [j.seed for js in jobs for j in js]
    expected = ("path,point,mode,coarse_k,guidance,guidance_schedule,class,label,teacher,teacher_row,teacher_source,"
                "sample,seed,top_k,top_p,temperature,precision,device\n"
                f"NOP_cfg1.5/a/s000.png,NOP_cfg1.5,NOP,0,1.5,constant,a,0,-1,-1,,0,{seeds[0]},3,0.5,0.8,fp32,cpu\n"
                f"TP_K3_cfg0/a/t00_s00.png,TP_K3_cfg0,TP,3,0,constant,a,0,0,0,a/img0.png,0,{seeds[1]},3,0.5,0.8,fp32,cpu\n"
                f"TP_K3_cfg0/a/t00_s01.png,TP_K3_cfg0,TP,3,0,constant,a,0,0,0,a/img0.png,1,{seeds[2]},3,0.5,0.8,fp32,cpu\n")
    assert (tmp_path / "m.csv").read_bytes() == expected.encode()  # "\n" line ends, as every file of the project
    assert len(list(csv.DictReader(io.StringIO(expected)))) == 3


def test_inputs_left_empty_come_from_the_var_checkpoint_and_given_ones_are_kept():
    ckpt = {"vqvae_path": "runs/vq.pth", "vqvae_sha256": "ab", "tokens_path": "runs/t.npz", "classes": ["x"],
            "model": {}}
    config, recorded = sample_var.resolve_inputs(sample_var.Config(var="v.pth"), ckpt)
    assert (config.vqvae, config.tokens, config.var) == ("runs/vq.pth", "runs/t.npz", "v.pth")
    assert recorded == {"vqvae_path": "runs/vq.pth", "vqvae_sha256": "ab", "tokens_path": "runs/t.npz",
                        "classes": ["x"]}
    config, _ = sample_var.resolve_inputs(sample_var.Config(vqvae="mine.pth", tokens="mine.npz"), ckpt)
    assert (config.vqvae, config.tokens) == ("mine.pth", "mine.npz")
    config, recorded = sample_var.resolve_inputs(sample_var.Config(vqvae="q.pth", tokens="t.npz"), {})
    assert (config.vqvae, config.tokens) == ("q.pth", "t.npz")
    assert recorded == {"vqvae_path": None, "vqvae_sha256": None, "tokens_path": None, "classes": None}


@pytest.mark.parametrize("field,key", [("vqvae", "vqvae_path"), ("tokens", "tokens_path")])
def test_an_input_neither_given_nor_recorded_is_refused_by_name(field, key):
    ckpt = {"vqvae_path": "q.pth", "tokens_path": "t.npz", key: ""}
    with pytest.raises(sample_var.SampleVarError) as err:
        sample_var.resolve_inputs(sample_var.Config(var="v.pth"), ckpt)
    assert str(err.value) == f"v.pth: records no {key} (not written by train_var.py?); pass --{field}=PATH"
    config, _ = sample_var.resolve_inputs(sample_var.Config(var="v.pth", **{field: "given"}), ckpt)
    assert getattr(config, field) == "given"


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict:
    """A tiny random VQ-VAE (scales 1,2,3, 6 px), a token file of 10 rows made 'by' it, the processed images they
    came from, and a 1-block VAR checkpoint that records them."""
    root = tmp_path_factory.mktemp("rules_sample_var")
    torch.manual_seed(0)
    vqvae = VQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1, scales=SCALES).eval()
    atomic_torch_save({"model": vqvae.state_dict(), "model_config": vqvae.config}, root / "vqvae.pth")
    tokens = token_set()
    maps = [tokens.maps(i) for i in range(len(SCALES))]
    save_tokens(root / "tokens.npz", scales=list(SCALES), maps=maps, labels=tokens.labels, split=tokens.split,
                source=tokens.source, vqvae_sha256=file_sha256(root / "vqvae.pth"), vqvae_config=vqvae.config,
                classes=CLASSES)
    rng = np.random.default_rng(1)
    for source in tokens.source:
        save_image(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), root / "data" / source)  # resized to 6 px
    torch.manual_seed(1)
    var = VAR(vocab_size=32, z_channels=8, scales=SCALES, num_classes=2, depth=1, embed_dim=16, num_heads=2)
    var.init_weights(init_adaln_gamma=0.5, init_head=1.0)
    ckpt = {"model": var.state_dict(), "model_config": var.config, "classes": CLASSES,
            "vqvae_path": str(root / "vqvae.pth"), "vqvae_sha256": file_sha256(root / "vqvae.pth"),
            "tokens_path": str(root / "tokens.npz")}
    atomic_torch_save(ckpt, root / "var.pth")
    torch.manual_seed(5)
    other = VQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1, scales=SCALES)
    atomic_torch_save({"model": other.state_dict(), "model_config": other.config}, root / "other_vqvae.pth")
    config = sample_var.Config(var=str(root / "var.pth"), vqvae=str(root / "vqvae.pth"), tokens=str(root / "tokens.npz"),
                               data_dir=str(root / "data"))
    return {"root": root, "vqvae": vqvae, "var": var.eval(), "ckpt": ckpt, "config": config,
            "tokens": load_tokens(root / "tokens.npz")}


def test_models_that_belong_together_are_loaded_in_eval_mode(kit):
    recorded = {k: kit["ckpt"][k] for k in ("vqvae_path", "vqvae_sha256", "tokens_path", "classes")}
    var, vqvae, tokens = sample_var.load_models(kit["config"], kit["ckpt"], recorded, CPU)
    assert not var.training and not vqvae.training and var.num_classes == 2 and tokens.classes == CLASSES
    assert all(torch.equal(a, b) for a, b in zip(var.state_dict().values(), kit["var"].state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(vqvae.state_dict().values(), kit["vqvae"].state_dict().values()))
    assert np.array_equal(tokens.idx, kit["tokens"].idx)


def test_a_var_trained_on_other_tokens_classes_or_scales_is_refused(kit, tmp_path):
    config, ckpt = kit["config"], kit["ckpt"]
    recorded = {"vqvae_sha256": "f" * 64, "classes": None}
    with pytest.raises(sample_var.SampleVarError) as err:
        sample_var.load_models(config, ckpt, recorded, CPU)
    sha = file_sha256(config.vqvae)
    assert str(err.value) == (f"{config.var} was trained on tokens of VQ-VAE sha ffffffffffff..., but {config.tokens} "
                              f"and {config.vqvae} have sha {sha[:12]}...")
    with pytest.raises(sample_var.SampleVarError) as err:
        sample_var.load_models(config, ckpt, {"vqvae_sha256": sha, "classes": ["a", "c"]}, CPU)
    assert str(err.value) == f"{config.var} was trained on classes ['a', 'c'], but {config.tokens} has ['a', 'b']"
    sample_var.load_models(config, ckpt, {"vqvae_sha256": "", "classes": ("a", "b")}, CPU)  # a tuple is the same list
    for other in (dict(num_classes=3, scales=SCALES), dict(num_classes=2, scales=(1, 2, 4))):
        var = VAR(vocab_size=32, z_channels=8, depth=1, embed_dim=16, num_heads=2, **other)
        theirs = {**ckpt, "model": var.state_dict(), "model_config": var.config}
        with pytest.raises(sample_var.SampleVarError) as err:
            sample_var.load_models(config, theirs, {"vqvae_sha256": None, "classes": None}, CPU)
        assert str(err.value) == (f"{config.var}: {var.num_classes} classes and scales {var.scales}, but "
                                  f"{config.tokens} has 2 classes and scales (1, 2, 3)")


def test_tokens_of_another_vqvae_and_weights_that_do_not_fit_are_refused_by_file(kit):
    recorded = {"vqvae_sha256": None, "classes": None}
    other = replace(kit["config"], vqvae=str(kit["root"] / "other_vqvae.pth"))
    with pytest.raises(TokenFileError, match=r"re-run tokenize_multiscale_maps\.py"):
        sample_var.load_models(other, kit["ckpt"], recorded, CPU)
    state = {k: v for k, v in kit["ckpt"]["model"].items() if k != "head.weight"}
    with pytest.raises(CheckpointError) as err:
        sample_var.load_models(kit["config"], {**kit["ckpt"], "model": state}, recorded, CPU)
    assert str(err.value).startswith(f"{kit['config'].var}: weights do not fit its model_config: ")


def test_the_output_folder_is_made_and_another_script_s_folder_is_refused(tmp_path):
    out = tmp_path / "deep" / "samples"
    sample_var.check_out(out)
    assert out.is_dir()
    (out / "config.json").write_text(json.dumps({"var": "v", "teacher_split": "test", "coarse_ks": []}))
    sample_var.check_out(out)  # our own earlier run (the three keys suffice)
    refused = f"{out}: holds a config.json that sample_var.py did not write; choose another --out"
    for foreign in ({"var": "v", "teacher_split": "test"}, {"teacher_split": "t", "coarse_ks": []},
                    {"var": "v", "coarse_ks": []}, [1, 2], 3, "not json {"):
        (out / "config.json").write_text(foreign if isinstance(foreign, str) else json.dumps(foreign))
        with pytest.raises(sample_var.SampleVarError) as err:
            sample_var.check_out(out)
        assert str(err.value) == refused, foreign
    (tmp_path / "file").write_text("x")
    with pytest.raises(sample_var.SampleVarError) as err:
        sample_var.check_out(tmp_path / "file")
    assert str(err.value) == f"{tmp_path / 'file'}: exists and is not a folder"


def test_teachers_are_saved_as_read_and_as_their_tokens_decode(kit, tmp_path):
    config, tokens, vqvae = kit["config"], kit["tokens"], kit["vqvae"]
    images = sample_var.save_teachers({0: [5, 1], 1: [9]}, tokens, vqvae, config, tmp_path)
    recons = decode_one_by_one(vqvae, tokens.idx_list([5, 1, 9]))
    root = Path(config.data_dir)
    expected = {0: [read_image(root / "a/img5.png", 6), read_image(root / "b/img1.png", 6)],
                1: [read_image(root / "b/img9.png", 6)]}
    assert sorted(images) == [0, 1] and all(len(images[k]) == len(expected[k]) for k in expected)
    assert all(np.array_equal(a, b) for k in expected for a, b in zip(images[k], expected[k]))
    for (name, t), image, recon in zip((("a", 0), ("a", 1), ("b", 0)), expected[0] + expected[1], recons):
        assert np.array_equal(read_image(tmp_path / "teachers" / name / f"t{t:02d}.png", 6), image)
        assert np.array_equal(read_image(tmp_path / "teachers_recon" / name / f"t{t:02d}.png", 6), recon)
    assert len(list(tmp_path.rglob("*.png"))) == 6
    assert sample_var.save_teachers({}, tokens, vqvae, config, tmp_path / "none") == {}


def test_a_missing_teacher_image_is_refused_by_path(kit, tmp_path):
    config = replace(kit["config"], data_dir=str(tmp_path / "elsewhere"))
    with pytest.raises(sample_var.SampleVarError) as err:
        sample_var.save_teachers({1: [9]}, kit["tokens"], kit["vqvae"], config, tmp_path)
    assert str(err.value) == (f"{tmp_path / 'elsewhere' / 'b' / 'img9.png'}: teacher image missing; --data_dir must be "
                              f"the processed set that {config.tokens} was made from")


def test_each_image_is_decoded_on_its_own(kit):
    maps = kit["tokens"].idx_list([3, 0, 8])
    images = decode_one_by_one(kit["vqvae"], maps)
    assert images.dtype == np.uint8 and images.shape == (3, 6, 6, 3)
    for i in range(3):
        one = to_rgb_uint8(kit["vqvae"].idx_to_img([m[i:i + 1] for m in maps]))
        assert np.array_equal(images[i], one[0]), i


@pytest.mark.parametrize("mode, calls", [("batch", [3]), ("one_by_one", [1, 1, 1]), ("auto", [1, 1, 1])])
def test_decoding_takes_the_batch_in_one_call_or_each_image_alone(kit, monkeypatch, mode, calls):
    # 'auto' decodes one by one off CUDA (here) and the whole batch on CUDA.
    vqvae, maps = kit["vqvae"], kit["tokens"].idx_list([3, 0, 8])
    sizes = []
    real = vqvae.idx_to_img
    monkeypatch.setattr(vqvae, "idx_to_img", lambda idx_list: sizes.append(len(idx_list[0])) or real(idx_list))
    images = decode_images(vqvae, maps, mode)
    assert sizes == calls
    assert np.array_equal(images, to_rgb_uint8(real(maps)))  # on the CPU this tiny VQ-VAE gives the same bits


@pytest.mark.e2e
def test_a_batch_is_sampled_with_the_sweep_point_s_prefix_guidance_and_filters(kit, monkeypatch):
    var, vqvae, tokens = kit["var"], kit["vqvae"], kit["tokens"]
    seen = []
    real = var.generate_idx

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(var, "generate_idx", spy)
    config = sample_var.Config(top_k=6, top_p=0.7, temperature=1.7, guidance_schedule="constant")
    jobs = [sample_var.Job(1, 0, 9, 0, 11), sample_var.Job(0, 1, 3, 2, 22)]
    point = sample_var.Point(2, 2.5)
    images, idx = sample_var.sample_jobs(var, vqvae, tokens, point, jobs, config, precision_of())
    (args, kwargs), = seen
    settings = SamplingSettings(guidance=2.5, guidance_schedule="constant", top_k=6, top_p=0.7, temperature=1.7)
    assert args[0] is vqvae and args[1].tolist() == [1, 0] and args[2] == settings
    coarse = kwargs.pop("coarse_idx")
    assert kwargs == dict(seeds=[11, 22], coarse_k=2)
    assert all(torch.equal(a, b) for a, b in zip(coarse, tokens.idx_list([9, 3])))
    expected = real(vqvae, torch.tensor([1, 0]), settings, seeds=[11, 22], coarse_idx=tokens.idx_list([9, 3]),
                    coarse_k=2)
    assert np.array_equal(idx, torch.cat([m.flatten(1) for m in expected], 1).numpy())
    assert np.array_equal(idx[:, :5], tokens.idx[[9, 3], :5])  # the two teacher scales: 1 + 4 tokens
    assert np.array_equal(images, decode_one_by_one(vqvae, expected))
    seen.clear()
    sample_var.sample_jobs(var, vqvae, tokens, sample_var.Point(0, 0.5), [sample_var.Job(0, -1, -1, 0, 5)], config,
                           precision_of())
    assert seen[0][1]["coarse_idx"] is None and seen[0][1]["coarse_k"] == 0 and seen[0][0][2].guidance == 0.5
