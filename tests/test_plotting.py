"""common/plotting.py pinned down by what each figure holds, read back from matplotlib's objects (the data of every
line and bar, labels, scales, ticks, legend), not by its pixels; and by the files written: PNG, atomic, the figure
closed (issue 16)."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from common import plotting


@pytest.fixture
def drawn(monkeypatch) -> list[plt.Figure]:
    """The figures the plotting functions hand to save_figure, which still saves (at a low dpi, to be quick) and
    closes them."""
    figures = []
    real = plotting.save_figure

    def spy(fig, path):
        figures.append(fig)
        real(fig, path, dpi=20)

    monkeypatch.setattr(plotting, "save_figure", spy)
    return figures


def png(path: Path) -> Image.Image:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data))


def leftovers(folder: Path, *keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_save_figure_writes_a_tight_png_at_its_dpi_atomically_and_closes_the_figure(tmp_path):
    fig = plt.figure(figsize=(4, 4))
    fig.text(0.5, 0.5, "x")  # one small glyph: a tight box is far smaller than the 4 x 4 in canvas
    path = tmp_path / "fig.png"
    path.write_bytes(b"old")
    later = plt.figure()  # the current figure now: save_figure closes the one it is given
    plotting.save_figure(fig, path)
    assert not plt.fignum_exists(fig.number) and plt.fignum_exists(later.number)
    plt.close(later)
    image = png(path)
    assert image.info["dpi"] == pytest.approx((120, 120), abs=0.05)
    assert image.width < 100 and image.height < 100  # 480 x 480 without bbox_inches="tight"
    assert leftovers(tmp_path, "fig.png") == []
    fig = plt.figure(figsize=(4, 4))
    fig.text(0.5, 0.5, "x")
    plotting.save_figure(fig, tmp_path / "fig50.png", dpi=50)
    assert png(tmp_path / "fig50.png").info["dpi"] == pytest.approx((50, 50), abs=0.05)
    with plt.rc_context({"savefig.format": "pdf"}):  # a user's matplotlibrc saving PDF by default: still a PNG
        plotting.save_figure(plt.figure(figsize=(1, 1)), tmp_path / "rc.png")
    png(tmp_path / "rc.png")


def test_save_image_round_trips_grey_and_rgb_exactly(tmp_path):
    rng = np.random.default_rng(0)
    for shape in ((5, 7), (5, 7, 3)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        path = tmp_path / "img.png"
        plotting.save_image(image, path)
        back = png(path)
        assert back.mode == ("L" if len(shape) == 2 else "RGB")
        assert np.array_equal(np.asarray(back), image)
    assert leftovers(tmp_path, "img.png") == []


def test_plot_curves_draws_each_series_in_order_with_its_labels(tmp_path, drawn):
    long_x = list(range(30))
    series = {"train": ([1, 2, 3], [0.5, 0.25, 0.125]), "val": (long_x, [1.0] * 30)}
    plotting.plot_curves(series, tmp_path / "c.png", title="loss", xlabel="epoch", ylabel="nats", logy=True)
    (fig,) = drawn
    assert not plt.fignum_exists(fig.number) and png(tmp_path / "c.png").width > 0
    assert tuple(fig.get_size_inches()) == (7, 4.5)
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert [(l.get_label(), list(l.get_xdata()), list(l.get_ydata())) for l in lines] == [
        ("train", [1, 2, 3], [0.5, 0.25, 0.125]), ("val", long_x, [1.0] * 30)]
    # dots mark the points of a short series only (under 30 points)
    assert [(l.get_marker(), l.get_markersize()) for l in lines] == [("o", 3), ("None", 3)]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), ax.get_yscale()) == ("loss", "epoch", "nats", "log")
    grid = ax.get_xgridlines() + ax.get_ygridlines()
    assert all(g.get_visible() and g.get_alpha() == 0.3 for g in grid)
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["train", "val"]
    assert {t.get_fontsize() for t in legend.get_texts()} == {8}

    plotting.plot_curves({"only": ([0, 1], [2, 3])}, tmp_path / "one.png", "t", "x", "y")
    ax = drawn[-1].axes[0]
    assert ax.get_yscale() == "linear" and ax.get_legend() is None  # one series needs no legend
    assert [(l.get_marker(), list(l.get_ydata())) for l in ax.get_lines()] == [("o", [2, 3])]
    plotting.plot_curves({"29": (list(range(29)), [1.0] * 29)}, tmp_path / "29.png", "t", "x", "y")
    assert drawn[-1].axes[0].get_lines()[0].get_marker() == "o"


@pytest.mark.filterwarnings("ignore:No artists with labels")  # the empty chart's legend
def test_bar_counts_groups_bars_per_sorted_category_with_zeros_for_the_missing(tmp_path, drawn):
    counts = {"train": {"benign": 5, "normal": 2, "malignant": 3}, "val": {"normal": 1, "benign": 4},
              "test": {"zebra": 7}}
    plotting.bar_counts(counts, tmp_path / "b.png", title="classes per split", ylabel="frames")
    (fig,) = drawn
    assert not plt.fignum_exists(fig.number) and png(tmp_path / "b.png").width > 0
    assert tuple(fig.get_size_inches()) == (6, 4.5)  # 4 categories: the 6 in minimum
    (ax,) = fig.axes
    categories = ["benign", "malignant", "normal", "zebra"]
    width = 0.8 / 3
    assert [c.get_label() for c in ax.containers] == ["train", "val", "test"]
    for i, (group, container) in enumerate(zip(counts, ax.containers)):
        assert [r.get_height() for r in container] == [counts[group].get(c, 0) for c in categories]
        assert [r.get_width() for r in container] == pytest.approx([width] * 4)
        centres = [r.get_x() + r.get_width() / 2 for r in container]
        assert centres == pytest.approx([k + (i - 1) * width for k in range(4)])  # group i of 3 centred at i - 1
    labels = [(t.get_text(), t.get_fontsize()) for t in ax.texts]
    assert labels == [(str(v), 7) for v in (5, 3, 2, 0, 4, 0, 1, 0, 0, 0, 0, 7)]  # each bar's count, group by group
    ticks = ax.get_xticklabels()
    assert list(ax.get_xticks()) == [0, 1, 2, 3] and [t.get_text() for t in ticks] == categories
    assert all(t.get_rotation() == 30 and t.get_ha() == "right" for t in ticks)
    assert (ax.get_title(), ax.get_ylabel()) == ("classes per split", "frames")
    assert ax.margins()[1] == 0.1
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["train", "val", "test"]
    assert legend._loc == 2  # "upper left" of the legend at the anchor: right of the axes, never over the bars
    assert legend.get_bbox_to_anchor().transformed(ax.transAxes.inverted()).bounds == pytest.approx((1.01, 1.0, 0, 0))

    many = {"all": {f"c{i}": i for i in range(7)}}
    plotting.bar_counts(many, tmp_path / "many.png", title="t")
    ax = drawn[-1].axes[0]
    assert tuple(drawn[-1].get_size_inches()) == pytest.approx((1.1 * 7, 4.5)) and ax.get_ylabel() == "images"
    assert [r.get_width() for r in ax.containers[0]] == pytest.approx([0.8] * 7)  # one group: centred on its tick
    assert [r.get_x() for r in ax.containers[0]] == pytest.approx([k - 0.4 for k in range(7)])
    plotting.bar_counts({}, tmp_path / "empty.png", title="none")
    assert drawn[-1].axes[0].containers == [] and (tmp_path / "empty.png").exists()


def test_image_grid_tiles_row_by_row_on_a_padded_canvas():
    images = np.stack([np.full((2, 3), 10 * (i + 1), dtype=np.uint8) for i in range(5)])
    grid = plotting.image_grid(images, ncols=3, pad=1, pad_value=7)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1) and grid.dtype == np.uint8
    expected = np.full((7, 13), 7, dtype=np.uint8)
    for i in range(5):
        r, c = divmod(i, 3)
        expected[1 + 3 * r: 3 + 3 * r, 1 + 4 * c: 4 + 4 * c] = 10 * (i + 1)
    assert np.array_equal(grid, expected)
    rgb = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    wide = plotting.image_grid(rgb, ncols=10)  # more columns than images: one row of two, default pad 2 of white
    assert wide.shape == (6, 10, 3)
    assert np.array_equal(wide[2:4, 2:4], rgb[0]) and np.array_equal(wide[2:4, 6:8], rgb[1])
    canvas = np.ones((6, 10), bool)
    canvas[2:4, 2:4] = canvas[2:4, 6:8] = False
    assert (wide[canvas] == 255).all()
    column = plotting.image_grid(images[:2], ncols=0)  # at least one column
    assert column.shape == (2 * 4 + 2, 3 + 4) and np.array_equal(column[6:8, 2:5], images[1])
    assert plotting.image_grid(list(images[:1]), ncols=1).shape == (6, 7)  # any sequence of images


def test_save_labelled_grid_shows_the_grid_at_full_grey_range_with_a_label_per_row(tmp_path, drawn):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 240, 240), dtype=np.uint8)
    plotting.save_labelled_grid(images, 2, ["a", "b", "c"], tmp_path / "g.png", title="samples")
    (fig,) = drawn
    assert not plt.fignum_exists(fig.number) and png(tmp_path / "g.png").width > 0
    (ax,) = fig.axes
    (shown,) = ax.get_images()
    assert np.array_equal(shown.get_array(), plotting.image_grid(images, ncols=2))
    assert (shown.get_cmap().name, shown.get_clim(), shown.get_interpolation()) == ("gray", (0, 255), "nearest")
    # 240 px at 120 dpi: 2 in per image (full resolution), 2 columns and 3 rows, plus room for the labels and title
    assert tuple(fig.get_size_inches()) == pytest.approx((2 * 2 + 1.2, 2 * 3 + 0.5))
    assert list(ax.get_yticks()) == pytest.approx([2 + 242 * i + 120 for i in range(3)])  # each row's middle
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert list(ax.get_xticks()) == []
    assert (ax.get_title(), ax.title.get_fontsize()) == ("samples", 9)

    small = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    plotting.save_labelled_grid(small, 4, ["x"], tmp_path / "s.png", title="t")
    fig = drawn[-1]
    # small images get 1.2 in each; only as many columns as images
    assert tuple(fig.get_size_inches()) == pytest.approx((1.2 * 2 + 1.2, 1.2 * 1 + 0.5))
    assert np.array_equal(fig.axes[0].get_images()[0].get_array(), plotting.image_grid(small, ncols=4))
    assert list(fig.axes[0].get_yticks()) == pytest.approx([2 + 8])
    plotting.save_labelled_grid(small, 1, ["x", "y"], tmp_path / "c.png", title="t")  # one column: a row per image
    assert tuple(drawn[-1].get_size_inches()) == pytest.approx((1.2 + 1.2, 1.2 * 2 + 0.5))
    tall = rng.integers(50, 100, (4, 20, 10), dtype=np.uint8)  # rows are as high as an image, not as wide
    plotting.save_labelled_grid(tall, 2, ["p", "q"], tmp_path / "t.png", title="t")
    assert list(drawn[-1].axes[0].get_yticks()) == pytest.approx([2 + 10, 2 + 22 + 10])
    assert drawn[-1].axes[0].get_images()[0].get_clim() == (0, 255)  # dark images stay dark: no contrast stretch
