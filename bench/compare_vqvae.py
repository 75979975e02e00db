"""Compare finished train_vqvae.py runs: print a markdown table of their test metrics, and save crops of their test
reconstructions at the model's side, upscaled with nearest neighbours so single pixels (speckle) stay visible.

    python bench/compare_vqvae.py --runs=runs/vqvae_sum,runs/vqvae_mean,runs/vqvae_adv --labels=sum,mean,mean+adv \
        --out=docs/img/vqvae_loss_crops.png

Rows: the first test image of each class; columns: the real image, then each run's reconstruction (best.pth),
all cropped to `crop` px around the centre of the image's scan area.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find common/

import matplotlib.pyplot as plt  # noqa: E402

from common.config import ConfigError, parse_config  # noqa: E402
from common.image_data import ImageSplit, list_classes, scan_area_mask, to_grey_uint8  # noqa: E402
from common.plotting import image_grid, save_figure  # noqa: E402
from models.vqvae import load_vqvae  # noqa: E402


@dataclass
class Config:
    runs: tuple[str, ...] = ()  # train_vqvae.py output folders (each with best.pth, config.json, test_metrics.json)
    labels: tuple[str, ...] = ()  # one name per run for the table and the figure ('' = the folder names)
    out: str = ""  # PNG of the crops ('' = table only)
    crop: int = 32  # px of the model's image kept around the scan area's centre
    zoom: int = 4  # nearest-neighbour upscaling of the crops
    split: str = "test"  # split whose images are reconstructed


def table(runs: list[Path], labels: list[str]) -> str:
    head = ("| run | usage (finest scale) | perplexity (finest) | PSNR whole / scan area (dB) | "
            "SSIM whole / scan area | reconstruction KID | best epoch | training (s) |\n|---|---|---|---|---|---|---|---|")
    rows = []
    for run, label in zip(runs, labels):
        m = json.loads((run / "test_metrics.json").read_text())
        kid = f"{m['kid_recon']:.4f}" if "kid_recon" in m else "-"
        rows.append(f"| {label} | {100 * m['usage'][-1]:.1f}% | {m['perplexity'][-1]:.0f} | {m['psnr']:.2f} / "
                    f"{m['psnr_scan']:.2f} | {m['ssim']:.3f} / {m['ssim_scan']:.3f} | {kid} | {m['best_epoch']} | "
                    f"{m['train_seconds']:.0f} |")
    return "\n".join([head, *rows])


@torch.no_grad()
def crops(runs: list[Path], labels: list[str], cfg: Config) -> None:
    config = json.loads((runs[0] / "config.json").read_text())
    data_dir, size = config["data_dir"], config["image_size"]
    split = ImageSplit(data_dir, cfg.split, size, list_classes(data_dir))
    rows = [int(np.flatnonzero(split.labels == c)[0]) for c in range(len(split.classes))]
    img = torch.stack([split[i][0] for i in rows])
    columns = [to_grey_uint8(img)] + [to_grey_uint8(load_vqvae(run / "best.pth").reconstruct(img)) for run in runs]
    tiles = []
    for r, i in enumerate(rows):
        mask = scan_area_mask(split.paths[i], size)
        ys, xs = np.nonzero(mask) if mask is not None else (np.array([size // 2]), np.array([size // 2]))
        y0 = int(np.clip(round(ys.mean()) - cfg.crop // 2, 0, size - cfg.crop))
        x0 = int(np.clip(round(xs.mean()) - cfg.crop // 2, 0, size - cfg.crop))
        for column in columns:
            tile = column[r, y0:y0 + cfg.crop, x0:x0 + cfg.crop]
            tiles.append(np.kron(tile, np.ones((cfg.zoom, cfg.zoom), np.uint8)))
    grid = image_grid(np.stack(tiles), ncols=len(columns), pad=4)
    side = cfg.crop * cfg.zoom
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 100, grid.shape[0] / 100 + 0.4))
    ax.imshow(grid.squeeze(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([4 + k * (side + 4) + side / 2 for k in range(len(columns))], ["real", *labels], fontsize=9)
    ax.set_yticks([4 + k * (side + 4) + side / 2 for k in range(len(rows))], split.classes, fontsize=8)
    ax.tick_params(length=0)
    ax.set_title(f"{cfg.split} images at {size} px, {cfg.crop} px crops x{cfg.zoom} (nearest)", fontsize=9)
    save_figure(fig, cfg.out, dpi=100)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(Config, argv)
    labels = list(cfg.labels) or [Path(r).name for r in cfg.runs]
    if not cfg.runs or len(labels) != len(cfg.runs):
        raise ConfigError(f"--runs: {len(cfg.runs)} run folders for {len(labels)} labels; give one label per run")
    runs = [Path(r) for r in cfg.runs]
    print(table(runs, labels))
    if cfg.out:
        crops(runs, labels, cfg)
        print(f"crops -> {cfg.out}")


if __name__ == "__main__":
    main()
