"""Do eval_var.py's feature-space metrics move the expected way on this domain? Real held-out images (query_split)
are changed in ways whose effect is known, then scored against the real images of ref_split, all classes together:

- blur (Gaussian, sigma `blur_sigma` px) and speckle removal (median filter of `median_size` px, which smooths
  speckle like the VQ-VAE's reconstructions do): KID should rise and precision fall; feature diversity should move
  little under speckle removal (the anatomy is unchanged), while MS-SSIM diversity falls (it counts speckle);
- shift (the image rolled by `shift_px` px, the edge filled black): KID should rise a little; MS-SSIM diversity
  counts shifts as new images, feature diversity should not move much;
- class swap (each class's images scored against the next class's real images): KID should rise and precision,
  recall and coverage fall, per class (mean over classes shown; n per class, so small);
- mode collapse (each class's images replaced by copies of `collapse_to` of them): precision should stay, recall
  and coverage fall.

With --recon_dir (an eval_var.py output's recon/ folder, which holds the VQ-VAE reconstructions of both splits)
the same table is printed again at the tokenizer's level: the reconstructions of query_split changed and scored
against the reconstructions of ref_split, as eval_var.py's *_vs_recon columns score samples. There a mode-collapsed
set must score low recall and coverage while the unchanged reconstructions do not.

    python bench/bench_eval_sanity.py --data_dir=data/processed            # phantoms at 64 px, CPU
    python bench/bench_eval_sanity.py --data_dir=data/processed --recon_dir=runs/samples_cpu/eval/recon
"""
from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find common/


@dataclass
class Config:
    data_dir: str = "data/processed"  # processed set (prepare.py)
    size: int = 64  # image side the metrics see (the model's)
    ref_split: str = "test"  # the real images the changed ones are scored against
    query_split: str = "val"  # the real images that are changed
    blur_sigma: float = 1.5
    median_size: int = 5
    shift_px: int = 8
    collapse_to: int = 2  # mode collapse: each class's images become copies of this many of them
    recon_dir: str = ""  # also at the tokenizer's level: an eval_var.py output's recon/ ('' = real images only)
    nn_k: int = 3
    cache: str = "runs/feature_cache/inception.npz"
    device: str = "auto"
    threads: int = 0


import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.ndimage import gaussian_filter, median_filter  # noqa: E402

from common.config import parse_config  # noqa: E402
from common.fidelity import extract_features, kid_bootstrap, load_feature_extractor  # noqa: E402
from common.image_data import list_classes, list_split, read_image, subject_ids  # noqa: E402
from common.plotting import save_image  # noqa: E402
from common.runtime import pick_device  # noqa: E402
from common.sample_metrics import diversity, feature_diversity, fidelity_coverage  # noqa: E402


def shifted(image: np.ndarray, px: int) -> np.ndarray:
    out = np.zeros_like(image)
    out[:, px:] = image[:, :-px]
    return out


def collapsed(images: np.ndarray, labels: np.ndarray, keep: int) -> np.ndarray:
    """Each class's images replaced, in turn, by copies of its first `keep` images: a mode-collapsed set."""
    out = images.copy()
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        out[members] = images[members[np.arange(len(members)) % keep]]
    return out


def main() -> None:
    config = parse_config(Config)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    classes = list_classes(config.data_dir)
    net = load_feature_extractor("", device)
    table(config, config.data_dir, classes, net, "real images")
    if config.recon_dir:
        table(config, config.recon_dir, classes, net, "VQ-VAE reconstructions (tokenizer level)")


def table(config: Config, images_dir: str, classes: list[str], net: torch.nn.Module, what: str) -> None:
    """Print the changes' metrics for the images of query_split under images_dir against those of ref_split."""
    ref_paths, ref_labels = list_split(images_dir, config.ref_split, classes)
    query_paths, query_labels = list_split(images_dir, config.query_split, classes)
    query = np.stack([read_image(p, config.size) for p in query_paths])
    # k-NN balls bounded by other subjects' images, as in eval_var.py (frames of one subject are near-duplicates)
    ref_subjects, query_subjects = (subject_ids(Path(config.data_dir), [str(p.relative_to(images_dir)) for p in paths])
                                    for paths in (ref_paths, query_paths))
    changes = {
        "unchanged": lambda im: im,
        f"blur (sigma {config.blur_sigma:g} px)": lambda im: gaussian_filter(im, (config.blur_sigma, config.blur_sigma, 0)),
        f"speckle removed (median {config.median_size} px)": lambda im: median_filter(im, (config.median_size,
                                                                                       config.median_size, 1)),
        f"shift ({config.shift_px} px)": lambda im: shifted(im, config.shift_px),
    }
    cache = Path(config.cache) if config.cache else None
    with tempfile.TemporaryDirectory() as tmp:
        ref_files = []
        for i, p in enumerate(ref_paths):
            ref_files.append(Path(tmp) / f"ref{i}.png")
            save_image(read_image(p, config.size), ref_files[-1])
        f_ref = extract_features(ref_files, net, cache_path=cache, desc="features: reference")
        changed = {name: np.stack([change(im) for im in query]) for name, change in changes.items()}
        changed[f"mode collapse (copies of {config.collapse_to} per class)"] = collapsed(query, query_labels,
                                                                                       config.collapse_to)
        sets = {}
        for j, (name, images) in enumerate(changed.items()):
            files = [Path(tmp) / f"{j}_{i}.png" for i in range(len(images))]
            for image, path in zip(images, files):
                save_image(image, path)
            sets[name] = (images, extract_features(files, net, cache_path=cache, desc=f"features: {name}"))

    print(f"{what}: {len(query)} {config.query_split} images changed, scored against {len(ref_paths)} "
          f"{config.ref_split} images; {len(classes)} classes; {config.size} px; k = {config.nn_k}")
    print(f"{'change':<40} {'KID':>8} {'precision':>9} {'recall':>7} {'coverage':>8} {'feat. div.':>10} "
          f"{'MS-SSIM div.':>12}")

    def row(name: str, kid: float, fc: dict[str, float], feat_div: float, msssim_div: float) -> None:
        print(f"{name:<40} {kid:>8.4f} {fc['precision']:>9.2f} {fc['recall']:>7.2f} {fc['coverage']:>8.2f} "
              f"{feat_div:>10.3f} {msssim_div:>12.3f}")

    def per_class_mean(images: np.ndarray, features: np.ndarray, shift: int) -> tuple[float, dict[str, float], float,
                                                                                        float]:
        """Each class's images against the real images of class (c + shift) mod C, averaged over classes."""
        kids, fcs, feat, ms = [], [], [], []
        for c in range(len(classes)):
            mine, theirs = query_labels == c, ref_labels == (c + shift) % len(classes)
            kids.append(kid_bootstrap(features[mine], f_ref[theirs])[0])
            fcs.append(fidelity_coverage(features[mine], f_ref[theirs], config.nn_k,
                                         generated_groups=query_subjects[mine], real_groups=ref_subjects[theirs]))
            feat.append(feature_diversity(features[mine]))
            ms.append(diversity(images[mine], 200, 0)[0])
        return (float(np.mean(kids)), {k: float(np.mean([f[k] for f in fcs])) for k in fcs[0]}, float(np.mean(feat)),
                float(np.mean(ms)))

    for name, (images, features) in sets.items():
        row(name, kid_bootstrap(features, f_ref)[0],
            fidelity_coverage(features, f_ref, config.nn_k, generated_groups=query_subjects, real_groups=ref_subjects),
            float(np.mean([feature_diversity(features[query_labels == c]) for c in range(len(classes))])),
            float(np.mean([diversity(images[query_labels == c], 200, 0)[0] for c in range(len(classes))])))
    print("per class (mean over classes):")
    images, features = sets["unchanged"]
    row("  own class", *per_class_mean(images, features, 0))
    row("  class swapped (next class)", *per_class_mean(images, features, 1))
    row("  mode collapse", *per_class_mean(*sets[f"mode collapse (copies of {config.collapse_to} per class)"], 0))


if __name__ == "__main__":
    main()
