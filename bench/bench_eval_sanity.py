"""Do eval_var.py's feature-space metrics move the expected way on this domain? Real held-out images (query_split)
are changed in ways whose effect is known, then scored against the real images of ref_split, all classes together:

- blur (Gaussian, sigma `blur_sigma` px) and speckle removal (median filter of `median_size` px, which smooths
  speckle like the VQ-VAE's reconstructions do): KID should rise and precision fall; feature diversity should move
  little under speckle removal (the anatomy is unchanged), while MS-SSIM diversity falls (it counts speckle);
- shift (the image rolled by `shift_px` px, the edge filled black): KID should rise a little; MS-SSIM diversity
  counts shifts as new images, feature diversity should not move much;
- class swap (each class's images scored against the next class's real images): KID should rise and precision,
  recall and coverage fall, per class (mean over classes shown; n per class, so small).

    python bench/bench_eval_sanity.py --data_dir=data/processed            # phantoms at 64 px, CPU
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
    nn_k: int = 3
    cache: str = "runs/feature_cache/inception.npz"
    device: str = "auto"
    threads: int = 0


import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.ndimage import gaussian_filter, median_filter  # noqa: E402

from common.config import parse_config  # noqa: E402
from common.fidelity import extract_features, kid_bootstrap, load_feature_extractor  # noqa: E402
from common.image_data import list_classes, list_split, read_image  # noqa: E402
from common.plotting import save_image  # noqa: E402
from common.runtime import pick_device  # noqa: E402
from common.sample_metrics import diversity, feature_diversity, fidelity_coverage  # noqa: E402


def shifted(image: np.ndarray, px: int) -> np.ndarray:
    out = np.zeros_like(image)
    out[:, px:] = image[:, :-px]
    return out


def main() -> None:
    config = parse_config(Config)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    classes = list_classes(config.data_dir)
    ref_paths, ref_labels = list_split(config.data_dir, config.ref_split, classes)
    query_paths, query_labels = list_split(config.data_dir, config.query_split, classes)
    query = np.stack([read_image(p, config.size) for p in query_paths])
    changes = {
        "unchanged": lambda im: im,
        f"blur (sigma {config.blur_sigma:g} px)": lambda im: gaussian_filter(im, (config.blur_sigma, config.blur_sigma, 0)),
        f"speckle removed (median {config.median_size} px)": lambda im: median_filter(im, (config.median_size,
                                                                                       config.median_size, 1)),
        f"shift ({config.shift_px} px)": lambda im: shifted(im, config.shift_px),
    }
    net = load_feature_extractor("", device)
    cache = Path(config.cache) if config.cache else None
    with tempfile.TemporaryDirectory() as tmp:
        ref_files = []
        for i, p in enumerate(ref_paths):
            ref_files.append(Path(tmp) / f"ref{i}.png")
            save_image(read_image(p, config.size), ref_files[-1])
        f_ref = extract_features(ref_files, net, cache_path=cache, desc="features: reference")
        sets = {}
        for name, change in changes.items():
            images = np.stack([change(im) for im in query])
            files = [Path(tmp) / f"{len(sets)}_{i}.png" for i in range(len(images))]
            for image, path in zip(images, files):
                save_image(image, path)
            sets[name] = (images, extract_features(files, net, cache_path=cache, desc=f"features: {name}"))

    print(f"{len(query)} {config.query_split} images changed, scored against {len(ref_paths)} {config.ref_split} "
          f"images; {len(classes)} classes; {config.size} px; k = {config.nn_k}")
    print(f"{'change':<32} {'KID':>8} {'precision':>9} {'recall':>7} {'coverage':>8} {'feat. div.':>10} "
          f"{'MS-SSIM div.':>12}")

    def row(name: str, kid: float, fc: dict[str, float], feat_div: float, msssim_div: float) -> None:
        print(f"{name:<32} {kid:>8.4f} {fc['precision']:>9.2f} {fc['recall']:>7.2f} {fc['coverage']:>8.2f} "
              f"{feat_div:>10.3f} {msssim_div:>12.3f}")

    def per_class_mean(images: np.ndarray, features: np.ndarray, shift: int) -> tuple[float, dict[str, float], float,
                                                                                        float]:
        """Each class's images against the real images of class (c + shift) mod C, averaged over classes."""
        kids, fcs, feat, ms = [], [], [], []
        for c in range(len(classes)):
            mine, theirs = query_labels == c, ref_labels == (c + shift) % len(classes)
            kids.append(kid_bootstrap(features[mine], f_ref[theirs])[0])
            fcs.append(fidelity_coverage(features[mine], f_ref[theirs], config.nn_k))
            feat.append(feature_diversity(features[mine]))
            ms.append(diversity(images[mine], 200, 0)[0])
        return (float(np.mean(kids)), {k: float(np.mean([f[k] for f in fcs])) for k in fcs[0]}, float(np.mean(feat)),
                float(np.mean(ms)))

    for name, (images, features) in sets.items():
        row(name, kid_bootstrap(features, f_ref)[0], fidelity_coverage(features, f_ref, config.nn_k),
            float(np.mean([feature_diversity(features[query_labels == c]) for c in range(len(classes))])),
            float(np.mean([diversity(images[query_labels == c], 200, 0)[0] for c in range(len(classes))])))
    print("per class (mean over classes):")
    images, features = sets["unchanged"]
    row("  own class", *per_class_mean(images, features, 0))
    row("  class swapped (next class)", *per_class_mean(images, features, 1))


if __name__ == "__main__":
    main()
