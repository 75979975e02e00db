"""common/image_data.py: listing and loading the processed set, and the per-epoch (balanced, sharded) sampler.

Its rules: hidden folders and stray files, the exact messages,
the resampling filters, the exact [-1, 1] mapping both ways, the scan-area threshold, and the epoch sampler's sizes
at lengths that do not divide evenly."""
from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from common import image_data
from common.image_data import (EpochSampler, ImageDataError, ImageSplit, augment, epoch_index_list, list_classes,
                               list_split, read_image, scan_area_mask, to_grey_uint8, to_rgb_uint8, to_tensor, worker_error_line)
from common.scan_area import ScanAreaError


def write_grey_png(path: Path, grey: np.ndarray) -> None:
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
                write_grey_png(tmp_path / split / name / f"{i:02d}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
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


@pytest.mark.usefixtures("no_hang")  # it makes FIFOs
def test_processed_images_that_are_fifos_or_bombs_are_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.png")
    with pytest.raises(ImageDataError, match=r"x.png: cannot read the image: not a regular file: a named pipe"):
        read_image(tmp_path / "x.png", 16)
    # a 1 x 1 PNG whose header is made to declare 20000 x 20000 pixels (with its checksum redone)
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="png")
    png = bytearray(buffer.getvalue())
    png[16:24] = struct.pack(">II", 20000, 20000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    (tmp_path / "bomb.png").write_bytes(bytes(png))
    with pytest.raises(ImageDataError, match=r"bomb.png: .*(20000x20000 pixels|decompression bomb)"):
        read_image(tmp_path / "bomb.png", 16)


class Broken(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> None:
        raise ImageDataError("a.png: cannot read the image: truncated")


def test_a_dataloader_workers_error_is_one_line() -> None:
    with pytest.raises(ImageDataError) as err:
        list(DataLoader(Broken(), num_workers=1))
    assert "Traceback" in str(err.value)  # what torch gives
    assert worker_error_line(err.value) == "a.png: cannot read the image: truncated (in DataLoader worker process 0)"
    assert worker_error_line(ImageDataError("plain")) == "plain"



def test_a_balanced_epoch_is_each_class_s_seeded_cycles_then_one_shuffle_of_all() -> None:
    labels = np.array([2, 0, 2, 5, 0, 2, 0])  # class 0: rows 1, 4, 6; class 2: rows 0, 2, 5; class 5: row 3
    for length, per_class in ((8, 3), (12, 4)):  # ceil(length / 3 classes) draws of each
        rng = np.random.default_rng([5, 2])  # (seed, epoch)
        # the classes in sorted order; a fresh permutation of the class's rows for each cycle through them
        picks = [np.concatenate([rng.permutation(rows) for _ in range(-(-per_class // len(rows)))])[:per_class]
                 for rows in ([1, 4, 6], [0, 2, 5], [3])]
        expected = rng.permutation(np.concatenate(picks))[:length]
        assert epoch_index_list(labels, length, seed=5, epoch=2, balanced=True).tolist() == expected.tolist()
    assert epoch_index_list(labels, 8, seed=5, epoch=2, balanced=True).tolist() == [2, 6, 5, 3, 1, 0, 4, 3]


def test_each_rank_takes_its_slice_of_every_global_batch_of_the_epoch_s_list() -> None:
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 0])
    ranks = [EpochSampler(labels, batch_size=2, world_size=2, rank=r, seed=1) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(3)
    whole = epoch_index_list(labels, 8, seed=1, epoch=3, balanced=True).tolist()  # 2 global batches of 4
    assert whole == [3, 8, 1, 6, 2, 0, 9, 7]
    assert [list(s) for s in ranks] == [whole[0:2] + whole[4:6], whole[2:4] + whole[6:8]]
    plain = EpochSampler(labels, batch_size=2, world_size=2, rank=1, seed=1, balanced=False)
    plain.set_epoch(3)
    whole = np.random.default_rng([1, 3]).permutation(10)[:8].tolist()
    assert list(plain) == whole[2:4] + whole[6:8]


def crop_boxes(monkeypatch) -> list:
    boxes = []
    crop = Image.Image.crop

    def spy(self, box=None):
        boxes.append(box)
        return crop(self, box)

    monkeypatch.setattr(Image.Image, "crop", spy)
    return boxes


def picture(size: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_a_copy_is_a_square_crop_resized_back_with_lanczos(monkeypatch):
    boxes = crop_boxes(monkeypatch)
    image = picture()
    out = augment(image, np.random.default_rng(7), 0.5, 0.1, hflip=False)
    rng = np.random.default_rng(7)
    side = 20 * np.sqrt(rng.uniform(0.5, 1.0))
    x0, y0 = rng.uniform(-2.0, 20 - side + 2.0, 2)
    box = (round(x0), round(y0), round(x0 + side), round(y0 + side))
    assert boxes == [box] and box[2] - box[0] == box[3] - box[1] != 20
    expected = np.array(Image.fromarray(image).crop(box).resize((20, 20), Image.Resampling.LANCZOS))
    assert out.dtype == np.uint8 and np.array_equal(out, expected)
    assert np.array_equal(augment(image, np.random.default_rng(0), 1.0, 0.0, hflip=False), image)


def test_crops_cover_the_area_range_and_reach_the_shift_beyond_each_edge(monkeypatch):
    boxes = crop_boxes(monkeypatch)
    image, rng = picture(40), np.random.default_rng(3)
    for _ in range(1500):
        augment(image, rng, 0.6, 0.25, hflip=False)
    box = np.array(boxes, float)
    area = ((box[:, 2] - box[:, 0]) / 40) ** 2
    assert 0.58 < area.min() < 0.62 and area.max() > 0.97 and abs(area.mean() - 0.8) < 0.01  # uniform in [0.6, 1]
    for lo, hi in ((box[:, 0], box[:, 2]), (box[:, 1], box[:, 3])):
        assert lo.min() >= -10 and lo.min() <= -9 and hi.max() <= 50 and hi.max() >= 49  # 0.25 x 40 px beyond
        assert abs((lo + hi).mean() / 2 - 20) < 0.5  # centred on the image on average


def test_only_mirrorable_classes_are_mirrored_half_the_time():
    image = picture()
    mirrored = 0
    for seed in range(400):
        kept = augment(image, np.random.default_rng(seed), 0.7, 0.05, hflip=False)
        flipped = augment(image, np.random.default_rng(seed), 0.7, 0.05, hflip=True)
        same, mirror = np.array_equal(flipped, kept), np.array_equal(flipped, kept[:, ::-1])
        assert same or mirror
        mirrored += mirror
        rng = np.random.default_rng(seed)
        rng.uniform(size=3)
        assert mirror == (rng.random() < 0.5)  # the fourth draw decides
    assert 170 < mirrored < 230
    assert augment(image, np.random.default_rng(1), 1.0, 0.0, hflip=True).flags.c_contiguous
