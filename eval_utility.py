"""Are the synthetic images useful? Train a downstream classifier with and without them, and try to tell them from
real images.

    python eval_utility.py --samples=runs/samples_cpu                  # writes runs/samples_cpu/utility/
    python eval_utility.py --config=configs/utility_real_findings_cpu.json

From one sweep point of a sample_var.py folder (default: its first no-prefix point) and the processed real set:
- TSTR and augmentation: the same classifier (torchvision ResNet-18, or ShuffleNetV2 x0.5: `arch`) is trained on
  (a) the real training split, (b) real + synthetic, `ratios` synthetic images per real training image of the same
  class, (c) the synthetic images only, and scored on the real test split: accuracy, balanced accuracy, macro-F1,
  one-vs-rest AUC, per class recall / F1 / AUC. Every setting is trained once per seed; the table gives the mean
  with a t interval over seeds, and (b) minus (a), paired by seed, says whether the synthetic images help
  detectably (interval excluding 0).
  Every setting takes the same number of optimisation steps (an epoch = as many images as the real training split,
  drawn class-balanced): only what the images are differs, not how long the network trains.
- Detectability: the same network learns to tell real training images from synthetic images of the same class
  (equally many of each per class), in detect_folds folds split by subject (no patient in two folds); the held-out
  scores, averaged over seeds, give an AUC with a subject bootstrap interval (0.5 = indistinguishable).

Outputs in `out` (default <samples>/utility): metrics.json, metrics.csv, learning_curves.png, confusion_matrices.png,
roc.png, detectability_roc.png, config.json, and runs/<setting>/seed<k>/ (history.json, result.npz; last.pth while a
run trains). Every run resumes from its last.pth and a finished run (result.npz made from the same images and
settings) is not retrained. docs/7_utility.md: what each number means and what would fool it.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from common.checkpoint import CheckpointError, load_checkpoint
from common.classification_metrics import (classification_scores, roc_auc, roc_curve, subject_bootstrap_auc,
                                           subject_folds, t_interval)
from common.config import (DEVICE, above, at_least, check_constants, config_dict, each, one_of, save_config,
                           script_config)
from common.history import History
from common.image_data import EpochSampler, ImageDataError, list_classes, list_split, manifest_subjects, read_image
from common.io import (SideFileError, atomic_save_npz, atomic_torch_save, atomic_write_json, atomic_write_text,
                       files_fingerprint, load_npz, os_error_line)
from common.plotting import save_figure
from common.progress import progress
from common.run_folder import RunFolderError, own_output_folder
from common.runtime import pick_device, seed_everything
from common.sweep import SweepError, load_sweep
from common.training import (check_epoch_finite, lr_at, param_groups, resume_training_checkpoint, set_lr,
                             training_state)
from models.classifier import ARCHS, Classifier, load_init


@dataclass
class Config:
    samples: str = "runs/samples"  # folder written by sample_var.py (samples_manifest.csv, config.json)
    point: str = ""  # sweep point whose images are the synthetic set ('' = the first no-prefix point, NOP_cfg...)
    data_dir: str = ""  # processed real set with manifest.csv ('' = the one sample_var.py used)
    out: str = ""  # where metrics and plots go ('' = <samples>/utility)
    ratios: tuple[float, ...] = (0.5, 1.0)  # real + synthetic: synthetic images per real training image of a class
    seeds: int = 3  # training runs per setting (seeds 0 .. seeds-1): the intervals are over them
    epochs: int = 10  # passes of as many images as the real training split
    batch_size: int = 32  # images per step
    lr: float = 1e-3  # AdamW peak learning rate (cosine decay after warmup)
    weight_decay: float = 0.05  # AdamW weight decay (not on norms and biases)
    warmup_epochs: float = 1.0  # linear learning-rate warmup
    image_size: int = 64  # classifier input side in pixels (real and synthetic images resized to it)
    augment: bool = True  # random resized crop, horizontal flip, brightness / contrast jitter while training
    arch: str = "resnet18"  # classifier: resnet18 or shufflenet_v2_x0_5 (torchvision; the CPU presets take the latter)
    init: str = ""  # weights of arch to start from (torchvision state dict, loaded weights_only; '' = from scratch)
    detect_folds: int = 3  # detectability: folds split by subject
    bootstrap: int = 1000  # detectability: subject resamplings for the AUC interval
    device: str = "auto"  # auto, cpu, cuda, mps
    cpu_threads: int = 0  # torch CPU threads (0 = torch's default)


class EvalUtilityError(RuntimeError):
    """Settings or inputs this script cannot use."""


REAL, SYNTHETIC = "real", "synthetic"  # the TSTR settings (a) and (c); (b) is named by mixed_name(ratio)
DETECT = "detect"  # the runs folder of the detectability folds
ALL = "all"  # the class column of the scores over every class
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")
PER_CLASS = ("recall", "f1", "auc")


def validate(config: Config) -> None:
    """Every constant in its allowed range, before anything is read or written."""
    check_constants(config, {
        "ratios": each(above(0), non_empty=False), "seeds": at_least(1), "epochs": at_least(1),
        "batch_size": at_least(2), "lr": above(0), "weight_decay": at_least(0), "warmup_epochs": at_least(0),
        "image_size": at_least(32), "arch": one_of(*ARCHS), "detect_folds": at_least(2), "bootstrap": at_least(1),
        "device": DEVICE, "cpu_threads": at_least(0),
    })


def mixed_name(ratio: float) -> str:
    return f"real+synthetic x{ratio:g}"


def run_folder(out: Path, setting: str) -> Path:
    """out/runs/<setting> with a file-system-friendly name (real_plus_synthetic_x0.5)."""
    return out / "runs" / setting.replace("+", "_plus_").replace(" ", "_")


@dataclass
class Images:
    """uint8 (N, S, S, 3) images with their labels, subjects and file paths."""
    x: np.ndarray
    y: np.ndarray
    subject: np.ndarray
    path: list[Path]

    def take(self, rows: np.ndarray) -> "Images":
        return Images(self.x[rows], self.y[rows], self.subject[rows], [self.path[i] for i in rows])

    @staticmethod
    def join(a: "Images", b: "Images") -> "Images":
        return Images(np.concatenate([a.x, b.x]), np.concatenate([a.y, b.y]), np.concatenate([a.subject, b.subject]),
                      a.path + b.path)


def read_subjects(data_dir: Path) -> dict[str, str]:
    """Output path (split/class/file.png) -> "dataset/subject" of every kept image in prepare.py's manifest.csv."""
    manifest = data_dir / "manifest.csv"
    if not manifest.is_file():
        raise EvalUtilityError(f"{manifest}: missing; the processed set must come from prepare.py, whose manifest "
                               "gives each image's subject (the unit of the detectability folds)")
    return manifest_subjects(data_dir)


def load_real(data_dir: Path, classes: list[str], size: int) -> dict[str, Images]:
    """The train, val and test splits at the classifier's size, with subjects from manifest.csv."""
    subjects = read_subjects(data_dir)
    splits = {}
    for split in ("train", "val", "test"):
        paths, labels = list_split(data_dir, split, classes)
        names = [p.relative_to(data_dir).as_posix() for p in paths]
        unlisted = [n for n in names if n not in subjects]
        if unlisted:
            raise EvalUtilityError(f"{data_dir / 'manifest.csv'}: does not list {len(unlisted)} image(s) of the set, "
                                   f"e.g. {unlisted[0]}; re-run prepare.py")
        x = np.stack([read_image(p, size) for p in progress(paths, desc=f"loading real {split}", leave=False)])
        splits[split] = Images(x, labels, np.array([subjects[n] for n in names]), paths)
    return splits


def load_synthetic(folder: Path, rows: list[dict[str, str]], size: int) -> Images:
    """The sweep point's images; each is its own subject (samples are drawn independently)."""
    paths = [folder / r["path"] for r in rows]
    x = np.stack([read_image(p, size) for p in progress(paths, desc="loading synthetic", leave=False)])
    return Images(x, np.array([int(r["label"]) for r in rows], np.int64),
                  np.array([f"synthetic/{r['path']}" for r in rows]), paths)


def pick_per_class(labels: np.ndarray, wanted: dict[int, int], seed: int) -> np.ndarray:
    """Seeded pick of wanted[c] rows of each class c (all of a class that has fewer)."""
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in sorted(wanted.items())]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)


def as_batch(x: np.ndarray) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, S, S) in [-1, 1], as the other steps feed images."""
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def augmenter(size: int) -> v2.Compose:
    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.9, 1.1), antialias=True),
                       v2.RandomHorizontalFlip(), v2.ColorJitter(brightness=0.2, contrast=0.2)])


@torch.no_grad()
def predict(model: Classifier, x: np.ndarray, device: torch.device, batch_size: int = 128) -> np.ndarray:
    """Class probabilities (N, C) in eval mode, no augmentation."""
    model.eval()
    out = [F.softmax(model(as_batch(x[i:i + batch_size]).to(device)).float(), 1).cpu().numpy()
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out)


def finished(result: Path, made_from: str) -> dict[str, np.ndarray] | None:
    """A run's saved probabilities when result.npz exists and was made from exactly these inputs and settings."""
    if not result.is_file():
        return None
    try:
        with load_npz(result) as data:
            if str(data["made_from"]) != made_from:
                return None
            return {k.removeprefix("probs_"): data[k] for k in data.files if k.startswith("probs_")}
    except (SideFileError, OSError, ValueError, KeyError):
        return None  # damaged: train it again


def train_run(run: Path, made_from: str, train: Images, evals: dict[str, Images], num_classes: int, seed: int,
              steps_images: int, config: Config, device: torch.device) -> dict[str, np.ndarray]:
    """Train the classifier on `train` (class-balanced epochs of steps_images images) and
    return its probabilities on each eval set; the history (per epoch: train loss, each eval set's loss and
    balanced accuracy) goes to run/history.json. Resumes from run/last.pth; a finished run is only loaded."""
    done = finished(run / "result.npz", made_from)
    if done is not None:
        return done
    seed_everything(seed)
    model = Classifier(num_classes, config.arch).to(device)
    if config.init:
        load_init(model, config.init)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    sampler = EpochSampler(train.y, config.batch_size, seed=seed, num_samples=steps_images)
    steps = sampler.num_batches
    history, start = History(), 0
    last = run / "last.pth"
    if last.is_file() and load_checkpoint(last).get("config", {}).get("made_from") == made_from:
        ckpt = resume_training_checkpoint(last, model, optimizer, None, model.config)
        history, start = History(ckpt["history"]), ckpt["epoch"]
    augment = augmenter(config.image_size) if config.augment else None
    for epoch in progress(range(start, config.epochs), desc=f"{run.parent.name} {run.name}", unit="epoch",
                          total=config.epochs, initial=start):
        model.train()
        sampler.set_epoch(epoch)
        order = np.fromiter(iter(sampler), np.int64)
        losses = []
        for b in range(steps):
            rows = order[b * config.batch_size:(b + 1) * config.batch_size]
            images = torch.from_numpy(train.x[rows]).permute(0, 3, 1, 2)
            if augment is not None:
                images = torch.stack([augment(image) for image in images])
            set_lr(optimizer, lr_at(epoch * steps + b, config.epochs * steps, round(config.warmup_epochs * steps),
                                    config.lr))
            loss = F.cross_entropy(model(images.float().div(127.5).sub(1.0).to(device)),
                                   torch.from_numpy(train.y[rows]).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        record: dict[str, float] = {"epoch": epoch + 1, "train_loss": float(np.mean(losses))}
        for name, data in evals.items():
            probs = predict(model, data.x, device)
            record[f"{name}_loss"] = float(-np.log(np.clip(probs[np.arange(len(data.y)), data.y], 1e-12, None)).mean())
            record[f"{name}_balanced_accuracy"] = classification_scores(data.y, probs)["balanced_accuracy"]
        check_epoch_finite(model, epoch + 1, {k: v for k, v in record.items() if k.endswith("loss")})
        history.append(**record)
        atomic_torch_save(training_state(model=model, model_config=model.config, config={"made_from": made_from},
                                         optimizer=optimizer, epoch=epoch + 1, step=(epoch + 1) * steps,
                                         history=history.records, best_val_loss=math.nan), last)
    probs = {name: predict(model, data.x, device) for name, data in evals.items()}
    history.save(run / "history.json")
    atomic_save_npz(run / "result.npz", made_from=np.array(made_from), **{f"probs_{k}": v for k, v in probs.items()})
    last.unlink(missing_ok=True)  # the result is what later steps read; the weights are not kept
    return probs


@dataclass
class Inputs:
    """What the runs are made of: the sweep point's images, the real splits and the class names."""
    classes: list[str]
    real: dict[str, Images]
    synthetic: Images
    point: str
    made_from: str


def resolve(config: Config) -> tuple[Config, Inputs]:
    """Fill data_dir and out from the sweep, check the point and the classes, and read every image."""
    try:
        sweep = load_sweep(Path(config.samples))
    except SweepError as err:
        raise EvalUtilityError(str(err)) from None
    no_prefix = [p for p in sweep.points if p.startswith("NOP")]
    point = config.point or (no_prefix[0] if no_prefix else "")
    if not point:
        raise EvalUtilityError(f"{config.samples}: no no-prefix (NOP) point; name one of {', '.join(sweep.points)} "
                               "with --point")
    if point not in sweep.points:
        raise EvalUtilityError(f"{config.samples}: no sweep point {point!r} (points: {', '.join(sweep.points)})")
    rows = [r for r in sweep.rows if r["point"] == point]
    if rows[0]["mode"] == "TP" and sweep.config.get("teacher_split") == "test":
        raise EvalUtilityError(f"{point}: its samples start from teacher images of the test split, on which the "
                               "classifiers are scored (a leak); use a NOP point or sample teachers from train")
    config = replace(config, data_dir=config.data_dir or sweep.config.get("data_dir", ""),
                     out=config.out or str(Path(config.samples) / "utility"))
    data_dir = Path(config.data_dir)
    try:
        classes = list_classes(data_dir)
    except ImageDataError as err:
        raise EvalUtilityError(str(err)) from None
    if classes != sweep.classes:
        raise EvalUtilityError(f"{config.samples} was sampled for classes {sweep.classes}, but {data_dir} has "
                               f"{classes}")
    real = load_real(data_dir, classes, config.image_size)
    synthetic = load_synthetic(sweep.folder, rows, config.image_size)
    short = [classes[c] for c in range(len(classes)) if (synthetic.y == c).sum() < config.detect_folds]
    if short:
        raise EvalUtilityError(f"{point}: fewer than detect_folds={config.detect_folds} synthetic images of "
                               f"{', '.join(short)}")
    # What a run's result depends on (its seed, setting and fold are added per run): a rerun with more seeds or
    # another ratio reuses every run already finished.
    settings = {k: v for k, v in config_dict(config).items()
                if k not in ("samples", "data_dir", "out", "ratios", "seeds", "detect_folds", "bootstrap", "device",
                             "cpu_threads")}
    fingerprint = files_fingerprint([*synthetic.path], sweep.folder) + files_fingerprint(
        [p for split in real.values() for p in split.path], data_dir)
    made_from = hashlib.sha256(json.dumps([settings, point, fingerprint]).encode()).hexdigest()
    return config, Inputs(classes, real, synthetic, point, made_from)


def training_sets(inputs: Inputs, ratios: tuple[float, ...], seed: int) -> dict[str, tuple[Images, dict[str, int]]]:
    """(a) real, (b) real + synthetic at each ratio (a seeded pick of the synthetic images), (c) synthetic; with
    each set's synthetic images per class."""
    train, synthetic, classes = inputs.real["train"], inputs.synthetic, inputs.classes
    per_class = {c: int((train.y == c).sum()) for c in range(len(classes))}

    def count(images: Images) -> dict[str, int]:
        return dict(zip(classes, np.bincount(images.y, minlength=len(classes)).tolist()))

    sets = {REAL: (train, {name: 0 for name in classes})}
    for ratio in ratios:
        extra = synthetic.take(pick_per_class(synthetic.y, {c: round(ratio * n) for c, n in per_class.items()}, seed))
        sets[mixed_name(ratio)] = (Images.join(train, extra), count(extra))
    sets[SYNTHETIC] = (synthetic, count(synthetic))
    return sets


def detection_set(inputs: Inputs, folds: int) -> tuple[Images, np.ndarray, np.ndarray]:
    """Equally many real training and synthetic images of each class (a seeded pick of the larger side), the
    real/synthetic label (1 = synthetic) and a fold per image: subject_folds within each class and side, so no
    subject is in two folds and every fold holds both sides of every class."""
    real, synthetic = inputs.real["train"], inputs.synthetic
    wanted = {c: int(min((real.y == c).sum(), (synthetic.y == c).sum())) for c in range(len(inputs.classes))}
    both = Images.join(real.take(pick_per_class(real.y, wanted, 0)),
                       synthetic.take(pick_per_class(synthetic.y, wanted, 0)))
    is_synthetic = np.r_[np.zeros(sum(wanted.values()), np.int64), np.ones(sum(wanted.values()), np.int64)]
    fold = np.zeros(len(both.y), np.int64)
    for c in wanted:
        for side in (0, 1):
            members = np.flatnonzero((both.y == c) & (is_synthetic == side))
            if len(np.unique(both.subject[members])) < folds:
                raise EvalUtilityError(f"class {inputs.classes[c]}: fewer than detect_folds={folds} "
                                       f"{'synthetic' if side else 'real training'} subjects")
            fold[members] = subject_folds(both.subject[members], folds, seed=c)
    return both, is_synthetic, fold


def interval_row(section: str, setting: str, name: str, metric: str, values: list[float]) -> dict[str, Any]:
    mean, low, high = t_interval(np.array(values))
    return {"section": section, "setting": setting, "class": name, "metric": metric, "mean": mean, "low": low,
            "high": high, "values": values}


def verdict(low: float, high: float) -> str:
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no detectable difference"


def evaluate(config: Config) -> None:
    config, inputs = resolve(config)
    samples = Path(config.samples)
    sources = [samples / "config.json", samples / "samples_manifest.csv", config.data_dir, config.init]
    with own_output_folder(config.out, "eval_utility.py", sources, config_keys=vars(config)):
        measure(config, inputs)


def measure(config: Config, inputs: Inputs) -> None:
    """Every TSTR and detectability run (each resumed or reused), then the tables and plots, into config.out."""
    out = Path(config.out)
    save_config(config, out)  # also proves that out can be written before the long work
    device = pick_device(config.device)
    classes, test = inputs.classes, inputs.real["test"]
    steps_images = len(inputs.real["train"].y)  # an epoch of every setting: the same number of steps
    seeds = range(config.seeds)

    tstr: dict[str, list[np.ndarray]] = {}
    counts: dict[str, dict[str, int]] = {}
    runs: dict[str, list[Path]] = {}
    for seed in seeds:
        for setting, (train, synthetic_counts) in training_sets(inputs, config.ratios, seed).items():
            runs.setdefault(setting, []).append(run_folder(out, setting) / f"seed{seed}")
            probs = train_run(runs[setting][-1], f"{inputs.made_from}/{setting}/{seed}", train,
                              {"val": inputs.real["val"], "test": test}, len(classes), seed, steps_images, config,
                              device)
            tstr.setdefault(setting, []).append(probs["test"])
            counts[setting] = synthetic_counts

    both, is_synthetic, fold = detection_set(inputs, config.detect_folds)
    detect_scores = np.zeros((config.seeds, len(both.y)))
    for seed in seeds:
        for k in range(config.detect_folds):
            held = fold == k
            train = Images(both.x[~held], is_synthetic[~held], both.subject[~held], [])
            heldout = Images(both.x[held], is_synthetic[held], both.subject[held], [])
            runs.setdefault(DETECT, []).append(run_folder(out, DETECT) / f"seed{seed}_fold{k}")
            probs = train_run(runs[DETECT][-1], f"{inputs.made_from}/detect/{config.detect_folds}/{seed}/{k}",
                              train, {"heldout": heldout}, 2, seed, steps_images, config, device)
            detect_scores[seed, held] = probs["heldout"][:, 1]

    rows, differences = score_tstr(tstr, test.y, classes)
    detectability = score_detection(detect_scores, is_synthetic, both, classes, config)
    info = {"made_from": inputs.made_from, "samples": config.samples, "point": inputs.point,
            "data_dir": config.data_dir, "classes": classes, "image_size": config.image_size, "seeds": config.seeds,
            "epochs": config.epochs, "arch": config.arch, "init": config.init or "from scratch",
            "real_images": {s: dict(zip(classes, np.bincount(d.y, minlength=len(classes)).tolist()))
                            for s, d in inputs.real.items()},
            "synthetic_images_added": counts, "epoch_images": steps_images,
            "notes": "TSTR: the classifier (arch) trained on each setting, scored on the real test split; mean and "
                     "95% t interval over seeds. differences: setting minus real, paired by seed. detectability: "
                     "held-out AUC of real-vs-synthetic (1 = synthetic), folds split by subject, scores averaged "
                     "over seeds, 95% subject-bootstrap interval."}
    atomic_write_json(out / "metrics.json", clean({"info": info, "tstr": rows, "differences": differences,
                                                   "detectability": detectability}))
    write_csv(rows + differences, detectability, out / "metrics.csv")
    plot_learning_curves(runs, out / "learning_curves.png")
    plot_confusions(tstr, test.y, classes, out / "confusion_matrices.png")
    plot_roc(tstr, test.y, classes, out / "roc.png")
    plot_detection_roc(detect_scores.mean(0), is_synthetic, both.y, classes, detectability,
                       out / "detectability_roc.png")
    print_summary(rows, differences, detectability)


def score_tstr(tstr: dict[str, list[np.ndarray]], y: np.ndarray, classes: list[str]
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The interval rows of every setting (all classes and per class) and of each setting minus real, by seed."""
    scores = {setting: [classification_scores(y, p) for p in probs] for setting, probs in tstr.items()}
    rows, differences = [], []
    for setting, per_seed in scores.items():
        for metric in METRICS:
            rows.append(interval_row("tstr", setting, ALL, metric, [s[metric] for s in per_seed]))
        for c, name in enumerate(classes):
            for metric in PER_CLASS:
                rows.append(interval_row("tstr", setting, name, metric, [s[metric][c] for s in per_seed]))
        if setting != REAL:
            for metric in METRICS:
                row = interval_row("difference", f"{setting} - {REAL}", ALL, metric,
                                   [s[metric] - r[metric] for s, r in zip(per_seed, scores[REAL])])
                differences.append({**row, "verdict": verdict(row["low"], row["high"])})
    return rows, differences


def score_detection(scores: np.ndarray, is_synthetic: np.ndarray, both: Images, classes: list[str],
                    config: Config) -> dict[str, Any]:
    mean = scores.mean(0)
    auc, low, high = subject_bootstrap_auc(is_synthetic == 1, mean, both.subject, config.bootstrap, seed=0)
    per_class = {}
    for c, name in enumerate(classes):
        sel = both.y == c
        a, lo, hi = subject_bootstrap_auc(is_synthetic[sel] == 1, mean[sel], both.subject[sel], config.bootstrap,
                                          seed=c)
        per_class[name] = {"auc": a, "low": lo, "high": hi, "images_per_side": int(sel.sum() // 2)}
    per_seed = [roc_auc(is_synthetic == 1, s) for s in scores]
    return {"auc": auc, "low": low, "high": high, "per_seed": per_seed, "per_class": per_class,
            "images_per_side": int(is_synthetic.sum()), "folds": config.detect_folds}


def clean(value: Any) -> Any:
    """NaN (an interval of one seed, the AUC of a class missing from a set) as None, in nested lists and dicts:
    JSON has no NaN."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def write_csv(rows: list[dict[str, Any]], detectability: dict[str, Any], path: Path) -> None:
    columns = ["section", "setting", "class", "metric", "mean", "low", "high", "verdict", "values"]
    detect = [{"section": "detectability", "setting": "real vs synthetic", "class": ALL, "metric": "auc",
               "mean": detectability["auc"], "low": detectability["low"], "high": detectability["high"],
               "values": detectability["per_seed"]}]
    detect += [{"section": "detectability", "setting": "real vs synthetic", "class": name, "metric": "auc",
                "mean": d["auc"], "low": d["low"], "high": d["high"], "values": []}
               for name, d in detectability["per_class"].items()]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for r in rows + detect:
        cells = [r.get(c, "") for c in columns]
        writer.writerow(["" if clean(v) is None else f"{v:.6g}" if isinstance(v, float)
                         else " ".join(f"{x:.6g}" for x in v) if isinstance(v, list) else v for v in cells])
    atomic_write_text(path, buffer.getvalue())


def plot_learning_curves(runs: dict[str, list[Path]], path: Path) -> None:
    """A column per TSTR setting and one for detectability; rows: losses, held-out balanced accuracy; a line per
    run (seed, and fold for detectability)."""
    fig, axes = plt.subplots(2, len(runs), figsize=(3.6 * len(runs), 6), squeeze=False, sharex=True)
    for j, (setting, folders) in enumerate(runs.items()):
        held = "heldout" if setting == DETECT else "val"
        for i, folder in enumerate(folders):
            history = History.load(folder / "history.json")
            line = {"color": f"C{i % 10}", "linewidth": 1, "marker": "o", "markersize": 2}
            axes[0, j].plot(*history.series("train_loss"), **line, label="train" if i == 0 else None)
            axes[0, j].plot(*history.series(f"{held}_loss"), **line, linestyle="--", label=held if i == 0 else None)
            axes[1, j].plot(*history.series(f"{held}_balanced_accuracy"), **line, label=folder.name)
        axes[0, j].set_title("detectability" if setting == DETECT else setting, fontsize=9)
        axes[1, j].set_xlabel("epoch")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
        axes[0, j].legend(fontsize=7)
        axes[1, j].legend(fontsize=6)
    axes[0, 0].set_ylabel("cross-entropy")
    axes[1, 0].set_ylabel("balanced accuracy (real val / held-out fold)")
    fig.suptitle("Learning curves: train (solid) and held-out (dashed) loss, one colour per run", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_confusions(tstr: dict[str, list[np.ndarray]], y: np.ndarray, classes: list[str], path: Path) -> None:
    """A confusion matrix per setting on the real test split, summed over seeds, each row as shares of the class."""
    fig, axes = plt.subplots(1, len(tstr), figsize=(3.4 * len(tstr), 3.6), squeeze=False)
    for ax, (setting, probs) in zip(axes[0], tstr.items()):
        counts = sum(np.array(classification_scores(y, p)["confusion"]) for p in probs)
        shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        ax.imshow(shares, vmin=0, vmax=1, cmap="Blues")
        for (t, p), value in np.ndenumerate(shares):
            ax.text(p, t, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value > 0.5 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_title(setting, fontsize=9)
    axes[0, 0].set_ylabel("true")
    fig.suptitle(f"Real test split, rows = true class (shares), {len(next(iter(tstr.values())))} seeds summed",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_roc(tstr: dict[str, list[np.ndarray]], y: np.ndarray, classes: list[str], path: Path) -> None:
    """One-vs-rest ROC per class and setting, of the probabilities averaged over seeds."""
    fig, axes = plt.subplots(1, len(tstr), figsize=(3.6 * len(tstr), 3.6), squeeze=False, sharey=True)
    for ax, (setting, probs) in zip(axes[0], tstr.items()):
        mean = np.mean(probs, axis=0)
        auc = classification_scores(y, mean)["auc"]
        for c, name in enumerate(classes):
            ax.plot(*roc_curve(y == c, mean[:, c]), linewidth=1, label=f"{name} {auc[c]:.2f}")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set_title(setting, fontsize=9)
        ax.set_xlabel("false-positive rate")
        ax.legend(fontsize=6, loc="lower right", title="AUC", title_fontsize=6)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("true-positive rate")
    fig.suptitle("One-vs-rest ROC on the real test split (probabilities averaged over seeds)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_detection_roc(scores: np.ndarray, is_synthetic: np.ndarray, labels: np.ndarray, classes: list[str],
                       detectability: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot(*roc_curve(is_synthetic == 1, scores), color="black", linewidth=2,
            label=f"all {detectability['auc']:.2f} [{detectability['low']:.2f}, {detectability['high']:.2f}]")
    for c, name in enumerate(classes):
        d = detectability["per_class"][name]
        ax.plot(*roc_curve(is_synthetic[labels == c] == 1, scores[labels == c]), linewidth=1,
                label=f"{name} {d['auc']:.2f} [{d['low']:.2f}, {d['high']:.2f}]")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="indistinguishable (0.5)")
    ax.set_xlabel("real images called synthetic (false-positive rate)")
    ax.set_ylabel("synthetic images called synthetic")
    ax.legend(fontsize=7, loc="lower right", title="AUC [95% subject bootstrap]", title_fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title("Detectability: real vs synthetic of the same class, held-out folds by subject", fontsize=9)
    save_figure(fig, path)


def print_summary(rows: list[dict[str, Any]], differences: list[dict[str, Any]], detectability: dict[str, Any]) -> None:
    print(f"{'setting':<26} " + " ".join(f"{m:>24}" for m in METRICS))
    for setting in dict.fromkeys(r["setting"] for r in rows):
        cells = [next(r for r in rows if r["setting"] == setting and r["class"] == ALL and r["metric"] == m)
                 for m in METRICS]
        print(f"{setting:<26} " + " ".join(f"{r['mean']:.3f} [{r['low']:.3f}, {r['high']:.3f}]".rjust(24)
                                           for r in cells))
    for d in differences:
        print(f"{d['setting']}: {d['metric']} {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] -> {d['verdict']}")
    print(f"detectability AUC {detectability['auc']:.3f} [{detectability['low']:.3f}, {detectability['high']:.3f}] "
          f"(0.5 = indistinguishable; {detectability['images_per_side']} real and synthetic images)")


def main(argv: list[str] | None = None) -> None:
    config = script_config(Config, argv, validate)
    torch.set_num_threads(config.cpu_threads or torch.get_num_threads())
    try:
        evaluate(config)
    except (EvalUtilityError, CheckpointError, ImageDataError, RunFolderError, SideFileError) as err:
        raise SystemExit(f"error: {err}") from None  # the message on stderr, exit status 1, no traceback
    except OSError as err:
        raise SystemExit(f"error: {os_error_line(err)}") from None


if __name__ == "__main__":
    main()
