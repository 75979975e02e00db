"""tokenize_multiscale_maps.py's rules at non-default settings (issue 16): every constant's allowed range at its edges,
the outputs it refuses to overwrite, the crop, shift and mirror of an augmented copy (exactly, and over many draws),
copies seeded by the image's path, what makes a token file up to date, and the layout of the file a tiny random
VQ-VAE (scales 1,2,3, 6 px images) writes in-process."""
from __future__ import annotations

import json
import zlib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import tokenize_multiscale_maps as tok
from common.checkpoint import CheckpointError
from common.image_data import ImageSplit, read_image, to_tensor
from common.io import atomic_torch_save, file_sha256, files_fingerprint
from common.plotting import save_image
from common.runtime import select_precision
from common.tokens import load_tokens, made_from_of, save_tokens
from models.vqvae import VQVAE

from config_refusal import assert_edges, refusal_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCALES = (1, 2, 3)
CPU = torch.device("cpu")


def refusal(tmp_path: Path, **overrides) -> str | None:
    cfg = tok.Config(out=str(tmp_path / "tokens" / "t.npz"), vqvae=str(tmp_path / "vqvae.pth"))
    return refusal_of(tok.validate, replace(cfg, **overrides))


def test_every_constant_is_refused_just_outside_its_range_and_accepted_at_its_edge(tmp_path):
    table = {
        **{name: ([1], (0, ">= 1")) for name in ("batch_size", "aug_copies")},
        **{name: ([0], (-1, ">= 0")) for name in ("num_workers", "cpu_threads")},
        "aug_seed": ([0, 2**32 - 1], (2**32, "in [0, 4294967295]")),
        "aug_min_area": ([1.0, 1e-6], (0.0, "in (0, 1]")),
        "aug_max_shift": ([0.0, 0.5], (0.6, "in [0, 0.5]")),
        "precision": (["auto", "bf16", "fp16", "fp32"], ("fp8", "one of auto, bf16, fp16, fp32")),
        "device": (["auto", "cpu"], ("tpu", "auto, cpu, or a cuda / mps device this machine has")),
    }
    assert_edges(lambda **constant: refusal(tmp_path, **constant), table)
    assert refusal(tmp_path, aug_min_area=1.01) == "--aug_min_area=1.01: must be in (0, 1]"
    assert refusal(tmp_path, aug_max_shift=-0.01) == "--aug_max_shift=-0.01: must be in [0, 0.5]"


def test_out_may_replace_a_token_file_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert refusal(tmp_path, out="vqvae.pth") == ("--out=vqvae.pth: is the VQ-VAE checkpoint (--vqvae); the output "
                                                  "would overwrite it")  # the same file by another path
    (tmp_path / "folder").mkdir()
    assert refusal(tmp_path, out=str(tmp_path / "folder")) == (
        f"--out={tmp_path / 'folder'}: is a folder; give the token file's path (e.g. "
        f"{tmp_path / 'folder' / 'tokens_multiscale_maps.npz'})")
    (tmp_path / "notes.npz").write_bytes(b"my notes")
    assert refusal(tmp_path, out=str(tmp_path / "notes.npz")) == (
        f"--out={tmp_path / 'notes.npz'}: exists and is not a token file; refusing to overwrite it (choose another --out)")
    save_tokens(tmp_path / "old.npz", scales=(1,), maps=[np.zeros((1, 1, 1), np.int64)], labels=np.array([0]),
                split=["train"], source=["a.png"], vqvae_sha256="", vqvae_config={}, classes=["x"])
    assert refusal(tmp_path, out=str(tmp_path / "old.npz")) is None
    (tmp_path / "a_file").write_text("x")
    assert refusal(tmp_path, out=str(tmp_path / "a_file" / "t.npz")) == f"--out: {tmp_path / 'a_file'} exists and is not a folder"
    assert refusal(tmp_path, out=str(tmp_path / "new" / "deeper" / "t.npz")) is None
    assert (tmp_path / "new" / "deeper").is_dir()  # made (and tried) before any work


def test_the_vocabulary_must_fit_int16():
    tok.check_vocab(SimpleNamespace(config={"vocab_size": 32768}), Path("q.pth"))
    with pytest.raises(CheckpointError) as err:
        tok.check_vocab(SimpleNamespace(config={"vocab_size": 32769}), Path("q.pth"))
    assert str(err.value) == "q.pth: vocab 32769 does not fit the int16 token format"


def test_main_sets_the_threads_and_ends_a_refused_input_with_its_message(monkeypatch):
    threads, seen = [], []
    monkeypatch.setattr(tok.torch, "set_num_threads", threads.append)

    def refused(cfg):
        seen.append(cfg)
        raise CheckpointError("q.pth: checkpoint file does not exist")

    monkeypatch.setattr(tok, "tokenize", refused)
    monkeypatch.setattr(tok, "validate", lambda cfg: None)
    with pytest.raises(SystemExit) as exit_info:
        tok.main(["--cpu_threads=1", "--vqvae=q.pth"])
    assert str(exit_info.value) == "error: q.pth: checkpoint file does not exist"
    assert threads == [1] and seen[0].vqvae == "q.pth"
    with pytest.raises(SystemExit):
        tok.main(["--cpu_threads=0"])
    assert threads == [1]  # 0: torch's default, untouched


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
    out = tok.augment(image, np.random.default_rng(7), 0.5, 0.1, hflip=False)
    rng = np.random.default_rng(7)
    side = 20 * np.sqrt(rng.uniform(0.5, 1.0))
    x0, y0 = rng.uniform(-2.0, 20 - side + 2.0, 2)
    box = (round(x0), round(y0), round(x0 + side), round(y0 + side))
    assert boxes == [box] and box[2] - box[0] == box[3] - box[1] != 20
    expected = np.array(Image.fromarray(image).crop(box).resize((20, 20), Image.Resampling.LANCZOS))
    assert out.dtype == np.uint8 and np.array_equal(out, expected)
    assert np.array_equal(tok.augment(image, np.random.default_rng(0), 1.0, 0.0, hflip=False), image)


def test_crops_cover_the_area_range_and_reach_the_shift_beyond_each_edge(monkeypatch):
    boxes = crop_boxes(monkeypatch)
    image, rng = picture(40), np.random.default_rng(3)
    for _ in range(1500):
        tok.augment(image, rng, 0.6, 0.25, hflip=False)
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
        kept = tok.augment(image, np.random.default_rng(seed), 0.7, 0.05, hflip=False)
        flipped = tok.augment(image, np.random.default_rng(seed), 0.7, 0.05, hflip=True)
        same, mirror = np.array_equal(flipped, kept), np.array_equal(flipped, kept[:, ::-1])
        assert same or mirror
        mirrored += mirror
        rng = np.random.default_rng(seed)
        rng.uniform(size=3)
        assert mirror == (rng.random() < 0.5)  # the fourth draw decides
    assert 170 < mirrored < 230
    assert tok.augment(image, np.random.default_rng(1), 1.0, 0.0, hflip=True).flags.c_contiguous


def image_set(root: Path, per_split: dict[str, dict[str, int]], size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for split, counts in per_split.items():
        for name, n in counts.items():
            for i in range(n):
                save_image(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), root / split / name / f"{name}{i}.png")
    return root


def test_augmented_copies_are_seeded_by_the_image_s_path_and_mirror_by_class(tmp_path):
    data = image_set(tmp_path / "data", {"train": {"breast": 2, "liver": 2}})
    split = ImageSplit(data, "train", 6)
    cfg = tok.Config(aug_copies=4, aug_min_area=0.7, aug_max_shift=0.1, aug_seed=5, aug_hflip_classes=("liver", "x"))
    copies = tok.AugmentedCopies(split, cfg)
    assert len(copies) == 4 and copies.hflip == [False, True]
    for i in range(4):
        got, label = copies[i]
        assert label == int(split.labels[i]) and got.shape == (3, 3, 6, 6)
        rng = np.random.default_rng([5, zlib.crc32(split.relative_path(i).encode())])
        image = read_image(split.paths[i], 6)
        expected = [to_tensor(tok.augment(image, rng, 0.7, 0.1, label == 1)) for _ in range(3)]
        assert torch.equal(got, torch.stack(expected)), i
    # Another set holding the same file (here, after two more images) gives it the same copies.
    bigger = ImageSplit(image_set(tmp_path / "more", {"train": {"breast": 2, "liver": 2, "aaa": 2}}), "train", 6)
    assert bigger.relative_path(4) == "train/liver/liver0.png" == split.relative_path(2)
    assert torch.equal(tok.AugmentedCopies(bigger, cfg)[4][0], copies[2][0])
    assert tok.AugmentedCopies(split, replace(cfg, aug_copies=2))[0][0].shape == (1, 3, 6, 6)


def test_the_augmentation_record_names_the_mirrored_classes_of_this_set_in_its_order():
    classes = ["thyroid", "breast", "liver"]
    cfg = tok.Config(aug_copies=3, aug_min_area=0.7, aug_max_shift=0.1, aug_seed=4,
                     aug_hflip_classes=("breast", "thyroid", "kidney"))
    assert tok.augmentation_record(cfg, classes) == {"copies": 3, "min_area": 0.7, "max_shift": 0.1, "seed": 4,
                                                     "hflip": ["thyroid", "breast"]}
    assert tok.augmentation_record(replace(cfg, aug_copies=1), classes) == {"copies": 1}  # nothing else matters then
    assert tok.augmentation_record(replace(cfg, aug_copies=2), classes)["copies"] == 2


def test_copies_per_batch_make_about_one_batch():
    sizes = [(64, 8, 9), (16, 2, 16), (5, 9, 1), (8, 9, 1), (17, 9, 2)]
    assert [tok.copies_per_batch(tok.Config(batch_size=b, aug_copies=a)) for b, a, _ in sizes] == [n for *_, n in sizes]


@pytest.fixture(scope="module")
def vq(tmp_path_factory) -> dict:
    """A tiny random VQ-VAE (scales 1,2,3: 6 px images) saved as a checkpoint, and a processed set of 8 px images."""
    root = tmp_path_factory.mktemp("rules_tokenize")
    torch.manual_seed(0)
    vqvae = VQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1, scales=SCALES).eval()
    torch.nn.init.normal_(vqvae.quantizer.embedding.weight, std=0.5)  # spread codes: images use many tokens
    atomic_torch_save({"model": vqvae.state_dict(), "model_config": vqvae.config}, root / "vqvae.pth")
    data = image_set(root / "data", {"train": {"breast": 3, "liver": 2}, "val": {"liver": 1, "breast": 1},
                                     "test": {"breast": 1, "liver": 2}})
    return {"root": root, "vqvae": vqvae, "data": data}


def test_copies_are_encoded_image_by_image_in_order(vq):
    copies = torch.stack([torch.stack([to_tensor(picture(6, seed=10 * i + j)) for j in range(3)]) for i in range(2)])
    maps = tok.copy_maps(vq["vqvae"], copies, select_precision(CPU, "fp32"))
    assert [m.shape for m in maps] == [(2, 3, pn, pn) for pn in SCALES] and all(m.dtype == np.int16 for m in maps)
    with torch.no_grad():
        for i in range(2):
            for j in range(3):
                one = vq["vqvae"].img_to_idx(copies[i, j:j + 1])
                assert all(np.array_equal(m[i, j], o[0].numpy()) for m, o in zip(maps, one)), (i, j)


def test_the_made_from_record_holds_what_the_tokens_depend_on(vq, tmp_path):
    splits = {s: ImageSplit(vq["data"], s, 6) for s in ("train", "val", "test")}
    augmentation = {"copies": 2, "hflip": ["breast"]}
    record = tok.made_from_record("abc", select_precision(CPU, "fp32"), splits, str(vq["data"]), augmentation)
    paths = [p for s in ("train", "val", "test") for p in splits[s].paths]
    assert json.loads(record) == {"vqvae_sha256": "abc", "precision": "fp32", "device": "cpu",
                                  "images": files_fingerprint(paths, vq["data"]), "augmentation": augmentation}
    assert len(paths) == 10


def tokenize(vq: dict, out: Path, **overrides) -> None:
    cfg = tok.Config(data_dir=str(vq["data"]), vqvae=str(vq["root"] / "vqvae.pth"), out=str(out), batch_size=3,
                     num_workers=0, device="cpu", aug_copies=3, aug_min_area=0.6, aug_max_shift=0.1, aug_seed=2,
                     aug_hflip_classes=("liver",))
    tok.tokenize(replace(cfg, **overrides))


def test_the_token_file_holds_each_split_s_images_in_order_with_their_copies(vq, tmp_path):
    out = tmp_path / "t.npz"
    tokenize(vq, out)
    ts = load_tokens(out, vq["root"] / "vqvae.pth")
    assert ts.classes == ["breast", "liver"] and ts.scales == SCALES
    assert ts.split.tolist() == ["train"] * 5 + ["val"] * 2 + ["test"] * 3
    assert ts.source.tolist() == ["train/breast/breast0.png", "train/breast/breast1.png", "train/breast/breast2.png",
                                  "train/liver/liver0.png", "train/liver/liver1.png", "val/breast/breast0.png",
                                  "val/liver/liver0.png", "test/breast/breast0.png", "test/liver/liver0.png",
                                  "test/liver/liver1.png"]
    assert ts.labels.tolist() == [0, 0, 0, 1, 1, 0, 1, 0, 1, 1]
    images = torch.stack([to_tensor(read_image(vq["data"] / s, 6)) for s in ts.source])
    with torch.no_grad():
        expected = torch.cat([m.flatten(1) for m in vq["vqvae"].img_to_idx(images)], 1).numpy()
    assert np.array_equal(ts.idx, expected)
    assert ts.vqvae_sha256 == file_sha256(vq["root"] / "vqvae.pth") and ts.vqvae_config == vq["vqvae"].config
    assert ts.aug_rows.tolist() == [0, 1, 2, 3, 4] and ts.num_copies == 3
    cfg = tok.Config(aug_copies=3, aug_min_area=0.6, aug_max_shift=0.1, aug_seed=2, aug_hflip_classes=("liver",))
    augmented = tok.AugmentedCopies(ImageSplit(vq["data"], "train", 6), cfg)
    copies = torch.stack([augmented[i][0] for i in range(5)])
    maps = tok.copy_maps(vq["vqvae"], copies, select_precision(CPU, "fp32"))
    assert np.array_equal(ts.aug_idx, np.concatenate([m.reshape(5, 2, -1) for m in maps], axis=2))
    splits = {s: ImageSplit(vq["data"], s, 6) for s in ("train", "val", "test")}
    assert made_from_of(out) == tok.made_from_record(ts.vqvae_sha256, select_precision(CPU, "fp32"), splits,
                                                     str(vq["data"]), tok.augmentation_record(cfg, ts.classes))
    assert json.loads((tmp_path / "classes.json").read_text()) == ["breast", "liver"]


def test_a_rerun_is_skipped_only_while_nothing_it_depends_on_changed(vq, tmp_path, capsys):
    out = tmp_path / "t.npz"
    tokenize(vq, out, aug_copies=1)
    assert load_tokens(out).num_copies == 1 and len(load_tokens(out).aug_rows) == 0
    stamp = out.stat().st_mtime_ns
    capsys.readouterr()
    tokenize(vq, out, aug_copies=1, aug_seed=9, batch_size=7)  # no copies: their settings do not matter
    assert capsys.readouterr().out == f"{out}: up to date (same VQ-VAE, images and settings); nothing to do\n"
    assert out.stat().st_mtime_ns == stamp
    tokenize(vq, out, aug_copies=2)
    assert out.stat().st_mtime_ns != stamp and load_tokens(out).num_copies == 2
    stamp = out.stat().st_mtime_ns
    tokenize(vq, out, aug_copies=2, aug_hflip_classes=("liver", "kidney"))  # kidney is not in this set
    assert out.stat().st_mtime_ns == stamp
    tokenize(vq, out, aug_copies=2, aug_hflip_classes=())
    assert out.stat().st_mtime_ns != stamp


def test_a_vqvae_whose_ids_do_not_fit_int16_is_refused_before_any_image_is_read(vq, tmp_path):
    torch.manual_seed(0)
    big = VQVAE(vocab_size=32769, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1, scales=(1, 2))
    atomic_torch_save({"model": big.state_dict(), "model_config": big.config}, tmp_path / "big.pth")
    cfg = tok.Config(data_dir=str(tmp_path / "no_data"), vqvae=str(tmp_path / "big.pth"), out=str(tmp_path / "t.npz"),
                     device="cpu")
    with pytest.raises(CheckpointError) as err:
        tok.tokenize(cfg)
    assert str(err.value) == f"{tmp_path / 'big.pth'}: vocab 32769 does not fit the int16 token format"
