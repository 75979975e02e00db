"""tokenize_multiscale_maps.py and common/tokens.py: the exported tokens decode to exactly the VQ-VAE's own
reconstruction; tokens from another VQ-VAE and corrupt files are refused; a bare (e.g. converted) checkpoint works;
a rerun with the same inputs skips.

tokenize_multiscale_maps.py's rules at non-default settings (issue 16): every constant's allowed range at its edges,
the outputs it refuses to overwrite, the crop, shift and mirror of an augmented copy (exactly, and over many draws),
copies seeded by the image's path, what makes a token file up to date, and the layout of the file a tiny random
VQ-VAE (scales 1,2,3, 6 px images) writes in-process."""
from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import tokenize_multiscale_maps
import tokenize_multiscale_maps as tok
import train_vqvae
from common.checkpoint import CheckpointError
from common.image_data import ImageSplit, read_image, to_tensor
from common.io import atomic_torch_save, file_sha256, files_fingerprint
from common.plotting import save_image
from common.runtime import select_precision
from common.tokens import TokenFileError, load_tokens, made_from_of, save_tokens, split_scales
from config_refusal import assert_edges, refusal_of
from models.var import VAR
from models.vqvae import VQVAE, load_vqvae
from test_image_data import picture


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_image_set(root: Path, size: int = 64, seed: int = 0) -> Path:
    """Two grey classes (disks, bands) at 64 px; training resizes them to 32 px."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for ci, (name, per_split) in enumerate({"band": (8, 3, 2), "disk": (8, 2, 3)}.items()):
        for split, n in zip(("train", "val", "test"), per_split):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cx, cy, r = *rng.uniform(0.3, 0.7, 2), rng.uniform(0.1, 0.3)
                base = [0.5 + 0.4 * np.sin(12 * yy + 6 * cx), ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) * 0.8][ci]
                grey = (np.clip(base + rng.normal(0, 0.05, (size, size)), 0, 1) * 255).astype(np.uint8)
                Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(folder / f"{name}_{i}.png")
    return root


def call(main: Callable[[list[str]], None], args: dict[str, object]) -> None:
    main([f"--{k}={v}" for k, v in args.items()])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A processed set and a VQ-VAE trained on it for two epochs (dead-code re-init spreads the codes)."""
    data = make_image_set(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("vqvae")
    call(train_vqvae.main, dict(data_dir=data, out_dir=out, image_size=32, ch=32, ch_mult="1,1,2", num_res_blocks=1,
                                z_channels=8, vocab_size=64, scales="1,2,4,8", epochs=2, batch_size=8, lr=2e-3,
                                warmup_steps=1, dead_code_steps=1, dead_code_every=1, num_workers=0, plot_every=2,
                                num_recon=2, cpu_threads=1, device="cpu"))
    return data, out


@pytest.fixture(scope="module")
def tokens(trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    data, vq = trained
    npz = tmp_path_factory.mktemp("tokens") / "tokens_multiscale_maps.npz"
    call(tokenize_multiscale_maps.main, dict(data_dir=data, vqvae=vq / "best.pth", out=npz, batch_size=64,
                                             num_workers=0, cpu_threads=1, device="cpu"))
    return npz


def test_token_file_holds_every_image_with_its_label_split_and_source(trained: tuple[Path, Path], tokens: Path) -> None:
    data, vq = trained
    with np.load(tokens, allow_pickle=False) as raw:
        assert raw["scales"].tolist() == [1, 2, 4, 8] and raw["scales"].dtype == np.int64
        assert raw["map_8"].shape == (26, 8, 8) and raw["map_8"].dtype == np.int16
        assert raw["idx"].shape == (26, 1 + 4 + 16 + 64) and raw["idx"].dtype == np.int16
    ts = load_tokens(tokens, vq / "best.pth")
    assert ts.classes == ["band", "disk"] == json.loads((tokens.parent / "classes.json").read_text())
    assert ts.vqvae_sha256 == file_sha256(vq / "best.pth")
    assert ts.vqvae_config == load_vqvae(vq / "best.pth").config
    assert [len(ts.select(s)) for s in ("train", "val", "test")] == [16, 5, 5]
    for source, label, split in zip(ts.source, ts.labels, ts.split):
        assert (data / source).is_file() and source.split("/")[0] == split and source.split("/")[1] == ts.classes[label]
    assert ts.maps(3).shape == (26, 8, 8) and np.array_equal(ts.maps(0).reshape(-1), ts.idx[:, 0])
    assert len(np.unique(ts.maps(3))) > 8  # the codebook is actually used, so the exactness test below means something


def test_decoding_the_tokens_reproduces_the_vqvae_reconstruction_exactly(trained: tuple[Path, Path], tokens: Path) -> None:
    data, vq = trained
    model = load_vqvae(vq / "best.pth")
    ts = load_tokens(tokens, vq / "best.pth")
    for split in ("train", "val", "test"):
        part = ts.select(split)
        dataset = ImageSplit(data, split, 32)  # the image_size the VQ-VAE was trained with
        assert [dataset.relative_path(i) for i in range(len(dataset))] == part.source.tolist()
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])  # the same single batch as tokenization
        idx_list = part.idx_list(np.arange(len(part)))
        assert all(torch.equal(a, b) for a, b in zip(idx_list, model.img_to_idx(images)))
        assert torch.equal(model.idx_to_img(idx_list), model.reconstruct(images))


def test_tokens_from_another_vqvae_are_refused(trained: tuple[Path, Path], tokens: Path, tmp_path: Path) -> None:
    _, vq = trained
    with pytest.raises(TokenFileError, match=r"came from VQ-VAE sha .*last\.pth has sha .*re-run tokenize_multiscale_maps\.py"):
        load_tokens(tokens, vq / "last.pth")
    shutil.copy(vq / "best.pth", tmp_path / "same_bytes.pth")
    assert len(load_tokens(tokens, tmp_path / "same_bytes.pth")) == 26  # the checksum is of the content, not the path


def test_corrupt_or_foreign_token_files_are_refused(tokens: Path, tmp_path: Path) -> None:
    shutil.copy(tokens.parent / "classes.json", tmp_path / "classes.json")
    bad = tmp_path / "tokens_multiscale_maps.npz"
    good = tokens.read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(TokenFileError, match=r"tokens_multiscale_maps\.npz: not a readable npz token file"):
        load_tokens(bad)
    bad.write_bytes(b"garbage")
    with pytest.raises(TokenFileError, match=r"tokens_multiscale_maps\.npz: not a readable npz token file"):
        load_tokens(bad)
    with open(bad, "wb") as handle:
        np.save(handle, np.zeros(3))
    with pytest.raises(TokenFileError, match="holds a single array, not an npz archive"):
        load_tokens(bad)
    np.savez(bad, idx=np.zeros((2, 5), dtype=np.int16))
    with pytest.raises(TokenFileError, match="not a token file of this project: missing scales"):
        load_tokens(bad)
    with np.load(tokens, allow_pickle=False) as raw:
        arrays = {k: raw[k] for k in raw.files}
    arrays["map_4"] = (arrays["map_4"] + 1) % 64
    np.savez(bad, **arrays)
    with pytest.raises(TokenFileError, match="idx does not match the per-scale maps"):
        load_tokens(bad)
    with pytest.raises(TokenFileError, match="does not exist; run tokenize_multiscale_maps.py first"):
        load_tokens(tmp_path / "missing.npz")


def test_a_bare_checkpoint_tokenizes_like_a_training_one(trained: tuple[Path, Path], tokens: Path,
                                                         tmp_path: Path) -> None:
    """A checkpoint with only model + model_config (e.g. converted from the reference) takes its image side from the
    network, so it gives the same tokens as the training checkpoint it came from."""
    data, vq = trained
    bare = tmp_path / "bare.pth"
    ckpt = torch.load(vq / "best.pth", weights_only=True)
    torch.save({"model": ckpt["model"], "model_config": ckpt["model_config"]}, bare)
    out = tmp_path / "bare" / "t.npz"
    call(tokenize_multiscale_maps.main, dict(data_dir=data, vqvae=bare, out=out, num_workers=0, device="cpu"))
    assert np.array_equal(load_tokens(out).idx, load_tokens(tokens).idx)
    with pytest.raises(SystemExit, match=r"nothing\.pth: checkpoint file does not exist"):
        call(tokenize_multiscale_maps.main, dict(data_dir=data, vqvae=tmp_path / "nothing.pth", out=tmp_path / "none" / "t.npz"))


def test_a_rerun_with_the_same_inputs_does_nothing(trained: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    data_src, vq = trained
    data = tmp_path / "data"
    shutil.copytree(data_src, data)
    out = tmp_path / "tokens" / "t.npz"
    args = dict(data_dir=data, vqvae=vq / "best.pth", out=out, num_workers=0, device="cpu")
    call(tokenize_multiscale_maps.main, args)
    before = out.stat().st_mtime_ns, (out.parent / "classes.json").stat().st_mtime_ns
    capsys.readouterr()
    call(tokenize_multiscale_maps.main, args)
    assert "up to date" in capsys.readouterr().out
    assert (out.stat().st_mtime_ns, (out.parent / "classes.json").stat().st_mtime_ns) == before
    # A changed image is a changed input: the tokens are made again.
    changed = sorted((data / "test" / "disk").glob("*.png"))[0]
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(changed)
    call(tokenize_multiscale_maps.main, args)
    assert "up to date" not in capsys.readouterr().out
    assert out.stat().st_mtime_ns != before[0]


def test_out_that_is_not_a_token_file_is_never_overwritten(trained: tuple[Path, Path], tokens: Path,
                                                           tmp_path: Path) -> None:
    data, vq = trained
    checkpoint = tmp_path / "last.pth"
    shutil.copy(vq / "last.pth", checkpoint)
    before = checkpoint.read_bytes()
    with pytest.raises(SystemExit, match=rf"^error: --out={checkpoint}: exists and is not a token file; refusing to "
                                         r"overwrite it"):
        call(tokenize_multiscale_maps.main, dict(data_dir=data, vqvae=vq / "best.pth", out=checkpoint, device="cpu"))
    assert checkpoint.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]
    with pytest.raises(SystemExit, match=rf"^error: --out={tmp_path}: is a folder"):
        call(tokenize_multiscale_maps.main, dict(data_dir=data, vqvae=vq / "best.pth", out=tmp_path, device="cpu"))
    with pytest.raises(SystemExit, match=r"^error: --batch_size=0: must be >= 1$"):
        call(tokenize_multiscale_maps.main, dict(data_dir=data, vqvae=vq / "best.pth", out=tmp_path / "t.npz",
                                                 batch_size=0))
    with pytest.raises(SystemExit, match=r"^error: --precision='fp8': must be one of auto, bf16, fp16, fp32$"):
        call(tokenize_multiscale_maps.main, dict(data_dir=data, vqvae=vq / "best.pth", out=tmp_path / "t.npz",
                                                 precision="fp8"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


def test_a_var_checkpoint_given_as_the_vqvae_is_named_as_one(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, _ = trained
    var = VAR(vocab_size=16, z_channels=4, scales=(1, 2), num_classes=2, depth=1, embed_dim=8, num_heads=2)
    atomic_torch_save({"model": var.state_dict(), "model_config": var.config}, tmp_path / "var.pth")
    with pytest.raises(SystemExit, match=rf"^error: {tmp_path / 'var.pth'}: is a VAR checkpoint \(train_var\.py\), but a "
                                         r"VQVAE checkpoint is needed here$"):
        call(tokenize_multiscale_maps.main, dict(data_dir=data, vqvae=tmp_path / "var.pth",
                                                 out=tmp_path / "tok" / "t.npz", num_workers=0, device="cpu"))
    assert not (tmp_path / "tok" / "t.npz").exists()


def test_stale_temp_files_of_a_killed_tokenization_are_removed(trained: tuple[Path, Path], tokens: Path,
                                                               tmp_path: Path) -> None:
    data, vq = trained
    out = tmp_path / "t.npz"
    shutil.copy(tokens, out)
    shutil.copy(tokens.parent / "classes.json", tmp_path / "classes.json")
    (tmp_path / ".t.npz.a1b2c3d4.tmp").write_bytes(b"half an npz")
    os.utime(tmp_path / ".t.npz.a1b2c3d4.tmp", (time.time() - 3600,) * 2)  # killed an hour ago
    call(tokenize_multiscale_maps.main, dict(data_dir=data, vqvae=vq / "best.pth", out=out, num_workers=0, device="cpu"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".owner.json", "classes.json", "t.npz"]


def test_augmented_copies_decode_to_images_of_the_right_class_and_size(trained: tuple[Path, Path], tokens: Path) -> None:
    data, vq = trained
    model = load_vqvae(vq / "best.pth")
    ts = load_tokens(tokens, vq / "best.pth")
    train = ts.select("train")
    assert sorted(ts.split[ts.aug_rows]) == ["train"] * 16  # only the training images have copies
    copies = train.copies()
    assert copies.shape == (16, 8, 85) and ts.num_copies == 8
    assert np.array_equal(copies[:, 0], train.idx)  # copy 0 is exactly the un-augmented tokens
    # Different copies differ (this coarse 2-epoch VQ-VAE maps a few near-identical crops to the same tokens).
    distinct = [len(np.unique(copies[i], axis=0)) for i in range(16)]
    assert min(distinct) >= 5 and sum(distinct) >= 120
    # Each copy is the tokens of its augmented image (regenerated here from the seed and path), so it decodes to
    # the VQ-VAE's reconstruction of that image, at the model's size.
    split = ImageSplit(data, "train", 32)
    augmented = torch.stack([tokenize_multiscale_maps.AugmentedCopies(split, tokenize_multiscale_maps.Config())[i][0]
                             for i in range(16)])  # (16, 7, 3, 32, 32)
    with torch.no_grad():
        for i in (0, 15):
            idx_list = split_scales(torch.from_numpy(copies[i, 1:].astype(np.int64)), ts.scales)
            assert all(torch.equal(a, b) for a, b in zip(idx_list, model.img_to_idx(augmented[i])))
            decoded = model.idx_to_img(idx_list)
            assert decoded.shape == (7, 3, 32, 32)
            torch.testing.assert_close(decoded, model.reconstruct(augmented[i]))
    # The class survives augmentation: bands are horizontal stripes (nearly constant along a row, varying down the
    # columns), a disk varies about as much along x as along y; every crop, shift and mirror keeps that.
    grey = augmented.mean(2)
    along_rows = grey.var(-1).mean(-1) / grey.var(-2).mean(-1)  # (16, 7)
    assert torch.equal(along_rows > 0.5, torch.from_numpy(train.labels == 1)[:, None].expand(16, 7))


def test_augmentations_are_seeded_and_mirror_only_the_classes_allowed(trained: tuple[Path, Path]) -> None:
    data, _ = trained
    split = ImageSplit(data, "train", 32)
    # A full-area crop without shift is the image itself: what is left is the mirror, for "disk" only.
    cfg = tokenize_multiscale_maps.Config(aug_copies=9, aug_min_area=1.0, aug_max_shift=0.0, aug_hflip_classes=("disk",))
    copies = tokenize_multiscale_maps.AugmentedCopies(split, cfg)
    for i in (0, len(split) - 1):
        image, label = split[i]
        augmented, same_label = copies[i]
        assert same_label == label and augmented.shape == (8, 3, 32, 32)
        mirrored = torch.tensor([torch.equal(a, image.flip(-1)) for a in augmented])
        if split.classes[label] == "disk":
            assert all(torch.equal(a, image) or m for a, m in zip(augmented, mirrored)) and 0 < mirrored.sum() < 8
        else:
            assert all(torch.equal(a, image) for a in augmented)
    shifted = tokenize_multiscale_maps.Config(aug_copies=3, aug_seed=5)
    first = tokenize_multiscale_maps.AugmentedCopies(split, shifted)[3][0]
    assert torch.equal(first, tokenize_multiscale_maps.AugmentedCopies(split, shifted)[3][0])  # reproducible
    assert not torch.equal(first, tokenize_multiscale_maps.AugmentedCopies(split, replace(shifted, aug_seed=6))[3][0])


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
