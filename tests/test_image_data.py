"""common/image_data.py: listing and loading the processed set, and the per-epoch (balanced, sharded) sampler."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.image_data import (EpochSampler, ImageDataError, ImageSplit, epoch_index_list, list_classes, list_split,
                               read_image, scan_area_mask)


def write_png(path: Path, grey: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(path)


@pytest.fixture
def image_set(tmp_path: Path) -> Path:
    """3 classes (folder order deliberately not sorted on disk), 8x8 gradients of known values."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", {"zeta": 5, "alpha": 2, "mid": 3}), ("val", {"alpha": 1, "zeta": 1}),
                             ("test", {"mid": 1})):
        for name, n in per_class.items():
            for i in range(n):
                write_png(tmp_path / split / name / f"{i:02d}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    return tmp_path


def test_classes_sorted_and_labels_follow_them(image_set: Path) -> None:
    classes = list_classes(image_set)
    assert classes == ["alpha", "mid", "zeta"]
    paths, labels = list_split(image_set, "train", classes)
    assert [p.parent.name for p in paths] == ["alpha"] * 2 + ["mid"] * 3 + ["zeta"] * 5
    assert labels.tolist() == [0] * 2 + [1] * 3 + [2] * 5
    val = ImageSplit(image_set, "val", 8, classes)
    assert val.labels.tolist() == [0, 2]  # a class missing from a split keeps its label
    assert val.relative_path(1) == "val/zeta/00.png"
    assert val.class_counts() == {"alpha": 1, "mid": 0, "zeta": 1}


def test_images_load_as_minus1_1_tensors_and_resize(image_set: Path) -> None:
    path = image_set / "train" / "alpha" / "00.png"
    grey = np.array(Image.open(path))[..., 0]
    ds = ImageSplit(image_set, "train", 8)
    img, label = ds[0]
    assert img.shape == (3, 8, 8) and img.dtype == torch.float32 and label == 0
    assert torch.allclose(img[0], torch.from_numpy(grey).float() / 127.5 - 1)
    assert img.min() >= -1 and img.max() <= 1
    small = ImageSplit(image_set, "train", 4)[0][0]
    assert small.shape == (3, 4, 4)
    assert abs(small.mean().item() - img.mean().item()) < 0.1  # anti-aliased resize keeps the mean brightness
    preloaded = ImageSplit(image_set, "train", 4, preload=True)
    assert all(torch.equal(preloaded[i][0], ImageSplit(image_set, "train", 4)[i][0]) for i in range(len(preloaded)))


def test_bad_sets_give_clear_errors(image_set: Path, tmp_path: Path) -> None:
    bad = image_set / "train" / "mid" / "01.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageDataError, match=r"01\.png: cannot read the image"):
        ImageSplit(image_set, "train", 8)[3]
    Image.fromarray(np.zeros((4, 6), dtype=np.uint8)).save(bad)
    with pytest.raises(ImageDataError, match=r"01\.png: expected a square image, got 6x4"):
        read_image(bad, 8)
    (image_set / "val" / "unknown").mkdir()
    with pytest.raises(ImageDataError, match=r"\['unknown'\] are not among the training classes"):
        ImageSplit(image_set, "val", 8)
    with pytest.raises(ImageDataError, match="no such folder"):
        list_classes(tmp_path / "nowhere")
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(ImageDataError, match="holds no .png images"):
        list_split(tmp_path / "empty", "train", ["a"])


def test_balanced_epoch_draws_classes_equally_and_is_seeded() -> None:
    labels = np.array([0] * 90 + [1] * 8 + [2] * 2)
    idx = epoch_index_list(labels, 99, seed=3, epoch=0, balanced=True)
    counts = Counter(labels[idx].tolist())
    assert len(idx) == 99 and max(counts.values()) - min(counts.values()) <= 2
    # The small class cycles through all of its images before repeating one.
    assert sorted(Counter(idx[labels[idx] == 2].tolist()).values()) == [16, 17]
    assert np.array_equal(idx, epoch_index_list(labels, 99, seed=3, epoch=0, balanced=True))
    assert not np.array_equal(idx, epoch_index_list(labels, 99, seed=3, epoch=1, balanced=True))
    plain = epoch_index_list(labels, 100, seed=3, epoch=0, balanced=False)
    assert sorted(plain.tolist()) == list(range(100))


def test_ranks_split_each_global_batch_like_one_process() -> None:
    labels = np.array([0] * 13 + [1] * 5 + [2] * 4)
    single = EpochSampler(labels, batch_size=6, seed=1)
    ranks = [EpochSampler(labels, batch_size=3, world_size=2, rank=r, seed=1) for r in range(2)]
    for epoch in (0, 4):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        one = list(single)
        per_rank = [list(r) for r in ranks]
        assert len(one) == len(single) == 18 and all(len(p) == len(r) == 9 for p, r in zip(per_rank, ranks))
        for b in range(3):  # global batch b = rank 0's batch b followed by rank 1's
            assert one[6 * b : 6 * b + 6] == per_rank[0][3 * b : 3 * b + 3] + per_rank[1][3 * b : 3 * b + 3]
    with pytest.raises(ImageDataError, match="cannot fill one global batch of 32"):
        EpochSampler(labels, batch_size=16, world_size=2)


def test_scan_area_mask_finds_the_area_prepare_kept_dark_tissue_included(tmp_path: Path) -> None:
    """A processed image is black outside its scan area: the mask is that area at the model's side, with a black
    cyst at its edge inside (a grey threshold would cut it out); an all-black image has none."""
    rng = np.random.default_rng(0)
    grey = np.zeros((128, 128), np.uint8)
    grey[16:112, 32:96] = rng.integers(40, 200, (96, 64))  # speckle-like tissue in a rectangle
    yy, xx = np.mgrid[0:128, 0:128]
    cyst = ((yy - 111) ** 2 + (xx - 70) ** 2 < 14 ** 2) & (yy < 112)  # black half-disk on the bottom edge
    grey[cyst] = 0
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(tmp_path / "img.png")
    mask = scan_area_mask(tmp_path / "img.png", 64)
    expected = np.zeros((64, 64), bool)
    expected[8:56, 16:48] = True
    assert np.array_equal(mask, expected)
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(tmp_path / "black.png")
    assert scan_area_mask(tmp_path / "black.png", 64) is None
