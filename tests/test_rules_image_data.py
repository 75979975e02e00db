"""common/image_data.py rules test_image_data.py leaves open: hidden folders and stray files, the exact messages,
the resampling filters, the exact [-1, 1] mapping both ways, the scan-area threshold, and the epoch sampler's sizes
at lengths that do not divide evenly."""
from __future__ import annotations

import io
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from common import image_data
from common.image_data import (EpochSampler, ImageDataError, ImageSplit, epoch_index_list, list_classes, list_split,
                               read_image, scan_area_mask, to_grey_uint8, to_rgb_uint8, to_tensor)
from common.scan_area import ScanAreaError


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def test_hidden_folders_and_stray_files_are_no_classes(tmp_path: Path) -> None:
    for folder in ("train/b", "train/a", "train/.cache", "val/a", "val/.ipynb_checkpoints"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "train" / "notes.txt").write_text("x")
    (tmp_path / "val" / "readme").write_text("x")  # a file named like no class: not an unknown class
    assert list_classes(tmp_path) == ["a", "b"]
    write_png(tmp_path / "val" / "a" / "1.png", np.zeros((4, 4, 3), np.uint8))
    write_png(tmp_path / "val" / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "val" / "a" / "2.jpg").write_bytes(b"")
    paths, labels = list_split(tmp_path, "val", ["a", "b"])
    assert [p.name for p in paths] == ["0.png", "1.png"] and labels.tolist() == [0, 0] and labels.dtype == np.int64


def test_the_messages_name_the_folder_and_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ImageDataError) as err:
        list_classes(tmp_path)
    assert str(err.value) == f"{tmp_path / 'train'}: no such folder; expected a processed set " \
                             "DATA/{train,val,test}/<class>/*.png"
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "file.png").write_bytes(b"")
    with pytest.raises(ImageDataError, match=rf"^{tmp_path / 'train'}: holds no class folders$"):
        list_classes(tmp_path)
    with pytest.raises(ImageDataError, match=rf"^{tmp_path / 'val'}: no such folder \(the processed set needs train, "
                                             r"val and test\)$"):
        list_split(tmp_path, "val", ["a"])
    (tmp_path / "val" / "z").mkdir(parents=True)
    (tmp_path / "val" / "y").mkdir()
    with pytest.raises(ImageDataError, match=rf"^{tmp_path / 'val'}: class folders \['y', 'z'\] are not among the "
                                             r"training classes \['a'\]$"):
        list_split(tmp_path, "val", ["a"])
    (tmp_path / "test" / "a").mkdir(parents=True)
    with pytest.raises(ImageDataError, match=rf"^{tmp_path / 'test'}: holds no \.png images$"):
        list_split(tmp_path, "test", ["a"])


def test_images_become_rgb_and_are_resized_with_lanczos_only_when_needed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    grey = write_png(tmp_path / "grey.png", rng.integers(0, 256, (12, 12), dtype=np.uint8))
    image = read_image(grey, 12)
    assert image.shape == (12, 12, 3) and image.dtype == np.uint8
    assert np.array_equal(image, np.repeat(np.array(Image.open(grey))[..., None], 3, axis=2))
    rgba = write_png(tmp_path / "rgba.png", rng.integers(0, 256, (12, 12, 4), dtype=np.uint8))
    want = np.array(Image.open(rgba).convert("RGB").resize((5, 5), Image.Resampling.LANCZOS))
    assert np.array_equal(read_image(rgba, 5), want)
    assert not np.array_equal(want, np.array(Image.open(rgba).convert("RGB").resize((5, 5), Image.Resampling.BICUBIC)))
    wide = write_png(tmp_path / "wide.png", np.zeros((4, 6), np.uint8))
    with pytest.raises(ImageDataError, match=rf"^{wide}: expected a square image, got 6x4$"):
        read_image(wide, 4)
    (tmp_path / "bad.png").write_bytes(b"no image")
    with pytest.raises(ImageDataError, match=rf"^{tmp_path / 'bad.png'}: cannot read the image: "):
        read_image(tmp_path / "bad.png", 4)


def test_minus1_1_mapping_is_exact_both_ways() -> None:
    levels = np.array([0, 1, 127, 128, 254, 255], np.uint8)
    image = np.stack([levels.reshape(2, 3)] * 3, axis=-1)
    image[..., 1] = 255 - image[..., 1]
    tensor = to_tensor(image)
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert torch.equal(tensor[0].flatten(), torch.from_numpy(levels).float() / 127.5 - 1)
    assert torch.allclose(tensor[1], -tensor[0], atol=1e-6) and tensor[0, 0, 0] == -1 and tensor[0, 1, 2] == 1
    back = to_rgb_uint8(tensor[None])
    assert back.dtype == np.uint8 and np.array_equal(back[0], image)
    # out of range clamps; 0 is level 127.5, rounded to even; -0.5 is 63.75
    out = torch.tensor([-1.5, 1.5, 0.0, -0.5]).reshape(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert to_rgb_uint8(out)[0, 0].tolist() == [[0] * 3, [255] * 3, [128] * 3, [64] * 3]
    assert to_rgb_uint8(out.double()).dtype == np.uint8


def test_grey_is_the_rounded_channel_mean_of_the_clamped_image() -> None:
    img = torch.tensor([[-1.0, 0.0, 2.0], [-3.0, -1.0, -1.0], [0.5, 0.5, 0.5]]).T.reshape(1, 3, 1, 3)  # per pixel
    # channels -1, 0, 1 (2 clamped): mean 0 -> 127.5 -> 128 (to even); all -1 -> 0; all 0.5 -> 191.25 -> 191
    grey = to_grey_uint8(img)
    assert grey.shape == (1, 1, 3) and grey.dtype == np.uint8 and grey.tolist() == [[[128, 0, 191]]]


def test_a_half_covered_pixel_of_the_scan_area_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stored = np.zeros((8, 8), bool)  # 2x2 blocks covered by 1, 2, 3 and 4 of their 4 pixels
    stored[0, 0] = True
    stored[0, 2:4] = True
    stored[0, 4:6] = stored[1, 4] = True
    stored[:2, 6:8] = True
    stored[2::2, 0] = True  # a column of quarter-covered blocks below
    seen = []
    monkeypatch.setattr(image_data, "detect_scan_area", lambda img: seen.append(img) or SimpleNamespace(mask=stored))
    path = write_png(tmp_path / "img.png", np.full((8, 8), 9, np.uint8))  # grey: the detector gets it as RGB
    mask = scan_area_mask(path, 4)
    assert mask.dtype == bool and mask.tolist()[0] == [False, True, True, True]
    assert not mask[1:].any()
    assert seen[0].shape == (8, 8, 3) and seen[0].dtype == np.uint8 and np.all(seen[0] == 9)
    assert scan_area_mask(path, 8).tolist() == stored.tolist()


def test_no_scan_area_is_none_and_an_unreadable_image_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(img: np.ndarray) -> None:
        raise ScanAreaError("blank")

    monkeypatch.setattr(image_data, "detect_scan_area", refuse)
    assert scan_area_mask(write_png(tmp_path / "img.png", np.zeros((8, 8, 3), np.uint8)), 4) is None
    (tmp_path / "bad.png").write_bytes(b"no image")
    with pytest.raises(ImageDataError, match=rf"^{tmp_path / 'bad.png'}: cannot read the image: "):
        scan_area_mask(tmp_path / "bad.png", 4)


def test_a_split_lists_its_own_classes_preloads_and_counts_subsets(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for name, n in (("b", 2), ("a", 1), (".hidden", 1)):
        for i in range(n):
            write_png(tmp_path / "train" / name / f"{i}.png", np.full((6, 6), 40 * i + (name == "b") * 100, np.uint8))
    split = ImageSplit(tmp_path, "train", 3)
    assert (split.classes, len(split), split.split, split.image_size) == (["a", "b"], 3, "train", 3)
    assert split.relative_path(2) == "train/b/1.png" and split.labels.tolist() == [0, 1, 1]
    assert split.class_counts() == {"a": 1, "b": 2}
    assert split.class_counts(np.array([2, 2, 1])) == {"a": 0, "b": 3}
    assert split.class_counts(np.array([0])) == {"a": 1, "b": 0}  # the last class counted even when absent
    image, label = split[1]
    assert label == 1 and isinstance(label, int) and image.shape == (3, 3, 3)
    assert torch.allclose(image, torch.full((3, 3, 3), 100 / 127.5 - 1))
    given = ImageSplit(tmp_path, "train", 6, classes=["b", "a"])  # the caller's class order sets the labels
    assert given.labels.tolist() == [0, 0, 1] and given.relative_path(0) == "train/b/0.png" and given.images is None
    calls = []
    monkeypatch.setattr(image_data, "read_image",
                        lambda p, s: calls.append((p.name, s)) or np.zeros((s, s, 3), np.uint8))
    preloaded = ImageSplit(tmp_path, "train", 4, preload=True)
    assert calls == [("0.png", 4), ("0.png", 4), ("1.png", 4)] and len(preloaded.images) == 3
    preloaded[2]
    assert len(calls) == 3  # served from memory


def test_balanced_epochs_have_the_asked_length_when_classes_do_not_divide_it() -> None:
    labels = np.array([0] * 7 + [1] * 3 + [2] * 2)
    idx = epoch_index_list(labels, 100, seed=1, epoch=2, balanced=True)
    counts = Counter(labels[idx].tolist())
    assert len(idx) == 100 and set(counts) == {0, 1, 2}
    assert sum(counts.values()) == 100 and min(counts.values()) >= 32 and max(counts.values()) <= 34
    for cls, n in ((0, 7), (1, 3), (2, 2)):  # every image of a class drawn as often as the others, +-1
        per_image = Counter(idx[labels[idx] == cls].tolist())
        assert len(per_image) == n and max(per_image.values()) - min(per_image.values()) <= 1
    # a class larger than its share is subsampled without repeats
    idx = epoch_index_list(labels, 6, seed=0, epoch=0, balanced=True)
    assert len(idx) == 6 and len(set(idx.tolist())) == 6 and Counter(labels[idx].tolist()) == {0: 2, 1: 2, 2: 2}
    # the unbalanced epoch is a plain permutation, cut to length
    plain = epoch_index_list(labels, 5, seed=0, epoch=0, balanced=False)
    assert len(plain) == 5 and len(set(plain.tolist())) == 5
    assert np.array_equal(plain, np.random.default_rng([0, 0]).permutation(12)[:5])
    assert not np.array_equal(epoch_index_list(labels, 12, seed=1, epoch=0, balanced=False),
                              epoch_index_list(labels, 12, seed=0, epoch=1, balanced=False))


def test_the_sampler_sizes_its_epoch_by_num_samples_and_names_the_shortfall() -> None:
    labels = np.array([0] * 5 + [1] * 5)
    sampler = EpochSampler(labels, batch_size=4, num_samples=26, seed=3)
    assert sampler.num_batches == 6 and len(sampler) == 24 and len(list(sampler)) == 24
    two = [EpochSampler(labels, batch_size=2, world_size=2, rank=r, num_samples=26, seed=3) for r in range(2)]
    assert [len(s) for s in two] == [12, 12] and two[1].rank == 1
    assert [i for b in range(6) for s in two for i in list(s)[2 * b:2 * b + 2]] == list(sampler)
    plain = EpochSampler(labels, batch_size=5, balanced=False)
    assert sorted(plain) == list(range(10))
    balanced = EpochSampler(labels, batch_size=5)  # seed 0, balanced by default
    assert list(balanced) == epoch_index_list(labels, 10, seed=0, epoch=0, balanced=True).tolist()
    balanced.set_epoch(3)
    assert balanced.epoch == 3 and list(balanced) == epoch_index_list(labels, 10, 0, 3, True).tolist()
    with pytest.raises(ImageDataError,
                       match="^10 training images cannot fill one global batch of 12: lower batch_size$"):
        EpochSampler(labels, batch_size=6, world_size=2, num_samples=11)
    assert len(EpochSampler(labels, batch_size=6, world_size=2, num_samples=12)) == 6


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_preloading_shows_a_bar_named_after_the_split_that_goes_away(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    write_png(tmp_path / "val" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    ImageSplit(tmp_path, "val", 4, classes=["a"], preload=True)
    text = screen.getvalue()
    assert text.startswith("\rloading val:") and text.endswith("\r")  # leave=False: the bar is erased, no line kept
