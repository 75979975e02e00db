"""Plots every step saves: curves, bar charts and image grids, written atomically as PNG."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # scripts run headless on GPU boxes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from common.io import atomic_write_bytes  # noqa: E402


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 120) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def save_image(image: np.ndarray, path: str | Path) -> None:
    """A uint8 (H,W) or (H,W,3) array as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def plot_curves(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    logy: bool = False,
) -> None:
    """One line per named (xs, ys) series."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    save_figure(fig, path)


def bar_counts(counts: dict[str, dict[str, int]], path: str | Path, title: str, ylabel: str = "images") -> None:
    """Grouped bars: counts[group][category], e.g. counts[split][class]."""
    groups = list(counts)
    categories = sorted({c for per_group in counts.values() for c in per_group})
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(categories))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(categories)), 4.5))
    for i, group in enumerate(groups):
        values = [counts[group].get(c, 0) for c in categories]
        bars = ax.bar(x + (i - (len(groups) - 1) / 2) * width, values, width, label=group)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, categories, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.margins(y=0.1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, never over the bars
    save_figure(fig, path)


def image_grid(images: np.ndarray, ncols: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile N images (N,H,W) or (N,H,W,3) uint8 row by row into one image."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    n, h, w, c = images.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = image
    return grid[..., 0] if c == 1 else grid


def save_labelled_grid(images: np.ndarray, ncols: int, row_labels: Sequence[str], path: str | Path, title: str) -> None:
    """N uint8 images (N,H,W[,3]) tiled ncols to a row, with a label beside every row, at (about) full resolution."""
    grid = image_grid(images, ncols=ncols)
    side = images.shape[1]
    nrows = -(-len(images) // max(1, min(ncols, len(images))))
    inches = max(1.2, side / 120)  # at the default 120 dpi, large images keep their full resolution
    fig, ax = plt.subplots(figsize=(inches * min(ncols, len(images)) + 1.2, inches * nrows + 0.5))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_yticks([2 + (side + 2) * i + side / 2 for i in range(len(row_labels))], row_labels)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)
