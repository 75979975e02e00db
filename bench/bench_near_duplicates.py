"""Where the near-duplicate threshold (near_duplicates.NEAR_DUPLICATE_BITS) should lie, measured on a processed set.

For every kept image of a prepare.py output folder: the perceptual-hash distance to copies of itself altered the
way two releases of one scan differ (JPEG re-encoding, a smaller copy scaled back up, brightness and contrast, a
crop a few per cent off, faint noise), and the distances between images of different subjects. A threshold must
catch the copies and leave distinct images alone: the table gives both rates for each candidate.

    python data_preprocessing/prepare.py --recipe=configs/recipe_six_organs.json --out=/tmp/six
    python bench/bench_near_duplicates.py --processed=/tmp/six
"""
from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image, ImageEnhance  # noqa: E402

from common.config import parse_config  # noqa: E402
from data_preprocessing.near_duplicates import NEAR_DUPLICATE_BITS, hamming, perceptual_hash  # noqa: E402


@dataclass
class Config:
    processed: str = "data/processed"  # a prepare.py output folder (manifest.csv and its images)
    max_bits: int = 64  # largest threshold in the table (of the hash's 256 bits)
    step: int = 4  # threshold step in the table
    seed: int = 0  # seeds the crops and the noise


def altered_copies(image: Image.Image, rng: np.random.Generator) -> dict[str, Image.Image]:
    """The image as another release of the same scan might hold it."""
    side = image.size[0]
    buffer = io.BytesIO()
    image.save(buffer, format="jpeg", quality=70)
    small = image.resize((int(side * 0.6),) * 2, Image.BILINEAR).resize((side, side), Image.BICUBIC)
    crops = {}
    for keep in (0.98, 0.96):
        dx, dy = (int(v) for v in rng.integers(0, int(side * (1 - keep)) + 1, 2))
        box = (dx, dy, dx + int(side * keep), dy + int(side * keep))
        crops[f"crop {keep:.0%}, shifted"] = image.crop(box).resize((side, side), Image.LANCZOS)
    noisy = np.asarray(image, np.float32) + rng.normal(0, 4, (side, side, 1))
    return {
        "jpeg q70": Image.open(buffer),
        "60% and back": small,
        "brightness +8%, contrast -10%": ImageEnhance.Contrast(ImageEnhance.Brightness(image).enhance(1.08)).enhance(0.9),
        **crops,
        "noise sigma 4": Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)),
    }


def main() -> None:
    cfg = parse_config(Config)
    out = Path(cfg.processed)
    with open(out / "manifest.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["status"] == "ok"]
    rng = np.random.default_rng(cfg.seed)
    hashes, subjects, planted = [], [], {}
    for r in rows:
        image = Image.open(out / r["output"]).convert("RGB")
        h = perceptual_hash(image)
        hashes.append(h)
        subjects.append((r["dataset"], r["subject"]))
        for name, copy in altered_copies(image, rng).items():
            planted.setdefault(name, []).append(hamming(h, perceptual_hash(copy)))
    distinct, same_subject = [], []
    for i, a in enumerate(hashes):
        for j in range(i + 1, len(hashes)):
            (distinct if subjects[i] != subjects[j] else same_subject).append(hamming(a, hashes[j]))
    distinct, same_subject = np.array(distinct), np.array(same_subject)
    print(f"{len(rows)} images of {len(set(subjects))} subjects in {out}: {distinct.size} pairs of different subjects, "
          f"{same_subject.size} pairs within a subject")
    print("planted copies, distance to their image: " + "; ".join(
        f"{name}: median {np.median(d):.0f}, max {max(d)}" for name, d in planted.items()))
    print(f"distinct subjects, smallest distances: {np.sort(distinct)[:10].tolist()}")
    all_planted = np.concatenate([np.array(d) for d in planted.values()])
    print(f"\n{'bits':>4} {'copies caught':>14} {'distinct pairs flagged':>23} {'same-subject pairs':>19}")
    for bits in range(0, cfg.max_bits + 1, cfg.step):
        mark = "  <- NEAR_DUPLICATE_BITS" if bits == NEAR_DUPLICATE_BITS else ""
        print(f"{bits:4d} {np.mean(all_planted <= bits):14.1%} {int(np.sum(distinct <= bits)):12d} "
              f"({np.mean(distinct <= bits):7.4%}) {int(np.sum(same_subject <= bits)):10d}{mark}")


if __name__ == "__main__":
    main()
