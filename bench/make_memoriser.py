"""A perfect memoriser, as a control for eval_var.py's copy check: a copy of a sample_var.py folder whose NOP
images (and their tokens in samples_tokens.npz) are replaced by VQ-VAE reconstructions of training images, which is
exactly what a VAR that memorised its training tokens would draw. TP points are copied unchanged.

    python bench/make_memoriser.py --samples=runs/samples_cpu --out=runs/samples_cpu_memoriser
    python bench/make_memoriser.py --samples=runs/samples_cpu --out=runs/samples_cpu_memoriser_aug --augmented=true \
        --tokens=runs/tokens_cpu_aug2/tokens_multiscale_maps.npz   # a token file with augmented copies
    python eval_var.py --samples=runs/samples_cpu_memoriser --device=cpu   # its NOP rows must be flagged as copies

Each NOP image of a class becomes the reconstruction of a different training image of that class (seeded), or with
--augmented=true of one of its augmented token copies (the token file must have some).
"""
from __future__ import annotations

import csv
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find common/


@dataclass
class Config:
    samples: str = "runs/samples_cpu"  # sample_var.py folder to copy
    out: str = "runs/samples_cpu_memoriser"  # the memoriser's folder (must not exist)
    augmented: bool = False  # plant augmented copies instead of the training images' own reconstructions
    tokens: str = ""  # token file to draw from ('' = the one sample_var.py used; it must come from the same VQ-VAE)
    seed: int = 0  # which training images


import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.config import parse_config  # noqa: E402
from common.io import atomic_save_npz  # noqa: E402
from common.plotting import save_image  # noqa: E402
from common.tokens import load_tokens, split_scales  # noqa: E402
from models.decoding import decode_one_by_one  # noqa: E402
from models.vqvae import load_vqvae  # noqa: E402


def main() -> None:
    config = parse_config(Config)
    source, out = Path(config.samples), Path(config.out)
    if out.exists():
        raise SystemExit(f"error: {out} exists; choose a new --out (the memoriser never overwrites)")
    sampled = json.loads((source / "config.json").read_text())
    tokens = load_tokens(config.tokens or sampled["tokens"], sampled["vqvae"])
    vqvae = load_vqvae(sampled["vqvae"], map_location="cpu")
    train = np.flatnonzero(tokens.split == "train")
    copies = tokens.take(train).copies()  # (N, C, L)
    if config.augmented and copies.shape[1] < 2:
        raise SystemExit(f"error: {config.tokens or sampled['tokens']} has no augmented copies to plant")
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("eval"))
    with open(out / "samples_manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    with np.load(out / "samples_tokens.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    rng = np.random.default_rng(config.seed)
    planted = 0
    for label in np.unique(tokens.labels[train]):
        nop = [i for i, r in enumerate(rows) if r["mode"] == "NOP" and int(r["label"]) == label]
        members = rng.permutation(np.flatnonzero(tokens.labels[train] == label))
        for i, member in zip(nop, np.resize(members, len(nop))):
            copy = rng.integers(1, copies.shape[1]) if config.augmented else 0
            idx = copies[member, copy].astype(np.int64)
            image = decode_one_by_one(vqvae, split_scales(torch.from_numpy(idx[None]), tokens.scales))[0]
            save_image(image, out / rows[i]["path"])
            arrays["idx"][i] = idx
            planted += 1
    atomic_save_npz(out / "samples_tokens.npz", **arrays)
    print(f"{out}: {planted} NOP images replaced by training {'augmented copies' if config.augmented else 'reconstructions'}")


if __name__ == "__main__":
    main()
