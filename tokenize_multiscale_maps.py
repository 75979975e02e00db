"""Encode every image of the processed set into multi-scale token maps with a trained VQ-VAE.

    python tokenize_multiscale_maps.py --vqvae=runs/vqvae/best.pth --out=runs/tokens/tokens_multiscale_maps.npz

Writes the npz described in common/tokens.py (per-scale maps, concatenated sequences, labels, split and
source file of each row, class names, the VQ-VAE checkpoint's sha256 and quantizer config) and classes.json beside
it. `out` may replace an earlier token file, never any other file.
Images get the same preprocessing as in VQ-VAE training: resized to the VQ-VAE's image side. Any checkpoint that
load_vqvae reads works, also one converted from the reference (models/convert_upstream.py). A rerun whose VQ-VAE,
images and settings are unchanged (recorded in the npz) does nothing.

Augmentation (train split only; val and test stay un-augmented): each training image also gets `aug_copies` - 1
augmented copies, seeded by `aug_seed` and the image's path, so a rerun makes the same ones: a random crop of
`aug_min_area`..1 of the image's area (square: the scan geometry is not stretched) whose window may reach
`aug_max_shift` of the side beyond the edge (filled black, like the outside of the scan area), resized back, and
mirrored left-right with probability 1/2 for the classes in `aug_hflip_classes` only. Mirroring is not harmless
for every anatomy: echocardiography views have a fixed side convention (in the apical four-chamber view the left
ventricle is shown on the screen's right), and abdominal and renal scans follow the probe-marker convention
(patient's head or right on the screen's left), so a mirrored heart, liver or kidney image shows an orientation a
scanner never produces; a breast or thyroid lobe, or a fetal head, is seen in either orientation. Vertical flips
are never made: depth (the transducer at the top) has one direction. train_var.py draws one copy per image per epoch.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common.checkpoint import CheckpointError
from common.config import (DEVICE, PRECISION, SEED, ConfigError, Rule, at_least, between, check_constants,
                           check_output_folder, script_config)
from common.image_data import (AUG_HFLIP_CLASSES, AUG_MAX_SHIFT, AUG_MIN_AREA, SPLITS, ImageDataError, ImageSplit,
                               augment, list_classes, read_image, to_tensor, worker_error_line)
from common.io import SideFileError, file_sha256, files_fingerprint, os_error_line, remove_stale_temp_files
from common.progress import progress
from common.run_folder import RunFolderError, own_output_folder
from common.runtime import DeviceError, Precision, pick_device, select_precision
from common.tokens import CLASSES_FILE, is_token_file, made_from_of, save_tokens
from models.vqvae import VQVAE, load_vqvae


@dataclass
class Config:
    data_dir: str = "data/processed"  # processed set: DATA/{train,val,test}/<class>/*.png
    vqvae: str = "runs/vqvae/best.pth"  # VQ-VAE checkpoint written by train_vqvae.py
    out: str = "runs/tokens/tokens_multiscale_maps.npz"  # token file (classes.json is written beside it)
    batch_size: int = 64  # images encoded at once
    num_workers: int = 2  # DataLoader worker processes
    device: str = "auto"  # auto | cpu | cuda | mps
    cpu_threads: int = 0  # torch CPU threads (0 = torch's default)
    precision: str = "fp32"  # autocast of encoder/decoder: fp32 (tokens independent of the card) | bf16 | fp16 | auto; the quantizer always runs fp32
    aug_copies: int = 8  # token copies of each training image: the un-augmented one + aug_copies - 1 augmented (1 = none)
    aug_min_area: float = AUG_MIN_AREA  # random crops keep this..1 of the image area (the reference's 256-of-288 crop keeps 0.79)
    aug_max_shift: float = AUG_MAX_SHIFT  # the crop window may reach this fraction of the side beyond the image (black fill)
    aug_hflip_classes: tuple[str, ...] = AUG_HFLIP_CLASSES  # classes that may be mirrored left-right (see above)
    aug_seed: int = 0  # seed of the augmentations (with each image's path)


def validate(cfg: Config) -> None:
    """Every constant in its allowed range, and out a token file to write or replace (never another file), before
    the VQ-VAE or any image is read."""
    check_constants(cfg, {"batch_size": at_least(1), "num_workers": at_least(0), "device": DEVICE,
                          "cpu_threads": at_least(0), "precision": PRECISION, "aug_copies": at_least(1),
                          "aug_min_area": Rule(lambda v: 0 < v <= 1, "in (0, 1]"), "aug_max_shift": between(0, 0.5),
                          "aug_seed": SEED})
    out = Path(cfg.out)
    if out.resolve() == Path(cfg.vqvae).resolve():
        raise ConfigError(f"--out={out}: is the VQ-VAE checkpoint (--vqvae); the output would overwrite it")
    if out.is_dir():
        raise ConfigError(f"--out={out}: is a folder; give the token file's path (e.g. {out / 'tokens_multiscale_maps.npz'})")
    if out.exists() and not is_token_file(out):
        raise ConfigError(f"--out={out}: exists and is not a token file; refusing to overwrite it (choose another --out)")
    check_output_folder("out", out.parent)


def main(argv: list[str] | None = None) -> None:
    cfg = script_config(Config, argv, validate)
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    out = Path(cfg.out)
    try:
        # The folder is the token file's: the classes.json beside it is shared by whatever npz the folder holds.
        with own_output_folder(out.parent, "tokenize_multiscale_maps.py", [cfg.data_dir, cfg.vqvae], name=out.name,
                               own_files=(out.name, CLASSES_FILE)):
            tokenize(cfg)
    except (CheckpointError, ImageDataError, DeviceError, RunFolderError, SideFileError) as err:
        raise SystemExit(f"error: {worker_error_line(err)}") from None
    except OSError as err:
        raise SystemExit(f"error: {os_error_line(err)}") from None


class AugmentedCopies(Dataset):
    """The augmented copies 1..copies-1 of each image of a split: items (copies - 1, 3, S, S) in [-1, 1], label."""

    def __init__(self, split: ImageSplit, cfg: Config) -> None:
        self.split, self.cfg = split, cfg
        self.hflip = [name in cfg.aug_hflip_classes for name in split.classes]

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        label = int(self.split.labels[i])
        image = read_image(self.split.paths[i], self.split.image_size)
        # Seeded by the image's path, not its position: the same image gets the same copies in any set.
        rng = np.random.default_rng([self.cfg.aug_seed, zlib.crc32(self.split.relative_path(i).encode())])
        copies = [augment(image, rng, self.cfg.aug_min_area, self.cfg.aug_max_shift, self.hflip[label])
                  for _ in range(self.cfg.aug_copies - 1)]
        return torch.stack([to_tensor(c) for c in copies]), label


def check_vocab(model: VQVAE, path: Path) -> None:
    """The token ids must fit the file's int16 maps."""
    if model.config["vocab_size"] > np.iinfo(np.int16).max + 1:
        raise CheckpointError(f"{path}: vocab {model.config['vocab_size']} does not fit the int16 token format")


def augmentation_record(cfg: Config, classes: list[str]) -> dict[str, Any]:
    """The augmentation settings the tokens depend on: the copies and, when there are augmented ones, the crop, the
    shift, the seed and the classes of this set that are mirrored."""
    augmentation: dict[str, Any] = {"copies": cfg.aug_copies}
    if cfg.aug_copies > 1:
        augmentation.update(min_area=cfg.aug_min_area, max_shift=cfg.aug_max_shift, seed=cfg.aug_seed,
                            hflip=[c for c in classes if c in cfg.aug_hflip_classes])
    return augmentation


def made_from_record(sha: str, precision: Precision, splits: dict[str, ImageSplit], data_dir: str,
                     augmentation: dict[str, Any]) -> str:
    """What the tokens are a function of (the VQ-VAE, the precision and device, every image, the augmentation): a
    token file that records the same is up to date."""
    return json.dumps({"vqvae_sha256": sha, "precision": precision.name, "device": precision.device.type,
                       "images": files_fingerprint([p for d in splits.values() for p in d.paths], data_dir),
                       "augmentation": augmentation})


def copies_per_batch(cfg: Config) -> int:
    """Images whose augmented copies make about one batch of batch_size (at least one image)."""
    return max(1, cfg.batch_size // (cfg.aug_copies - 1))


def copy_maps(model: VQVAE, copies: torch.Tensor, precision: Precision) -> list[np.ndarray]:
    """The augmented copies (B, A, 3, S, S) of B images -> per scale, their int16 token maps (B, A, pn, pn)."""
    b, a = copies.shape[:2]
    with precision.autocast():
        idx_list = model.img_to_idx(copies.flatten(0, 1).to(precision.device))
    return [idx.to(torch.int16).cpu().numpy().reshape(b, a, *idx.shape[1:]) for idx in idx_list]


@torch.no_grad()
def tokenize(cfg: Config) -> None:
    vqvae_path, out = Path(cfg.vqvae), Path(cfg.out)
    for stale in remove_stale_temp_files(out.parent):
        print(f"removed {stale}, left by an interrupted write", flush=True)
    device = pick_device(cfg.device)
    precision = select_precision(device, cfg.precision)
    model = load_vqvae(vqvae_path, map_location=device)
    sha = file_sha256(vqvae_path)
    # The side the network works at (scales[-1] x its downsampling): a checkpoint converted from the reference
    # has no training config, and one of train_vqvae.py was trained at exactly this side.
    image_size = model.image_size
    check_vocab(model, vqvae_path)
    classes = list_classes(cfg.data_dir)
    splits = {split: ImageSplit(cfg.data_dir, split, image_size, classes) for split in SPLITS}
    augmentation = augmentation_record(cfg, classes)
    made_from = made_from_record(sha, precision, splits, cfg.data_dir, augmentation)
    if made_from_of(out) == made_from:
        print(f"{out}: up to date (same VQ-VAE, images and settings); nothing to do")
        return
    print(f"VQ-VAE {vqvae_path} (sha256 {sha[:12]}...), scales {model.scales}, {image_size}px, {precision.name} on {device}")

    maps: list[list[np.ndarray]] = [[] for _ in model.scales]
    labels, split_names, sources = [], [], []
    roundtrip_error = 0.0
    for split, dataset in splits.items():
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
        for img, label in progress(loader, desc=f"tokenizing {split}"):
            img = img.to(device)
            with precision.autocast():
                idx_list = model.img_to_idx(img)
                if not labels:
                    # The tokens must decode to the VQ-VAE's own reconstruction (checked on the first batch).
                    roundtrip_error = (model.idx_to_img(idx_list) - model.reconstruct(img)).abs().max().item()
            for k, idx in enumerate(idx_list):
                maps[k].append(idx.to(torch.int16).cpu().numpy())
            labels.append(label.numpy())
        split_names += [split] * len(dataset)
        sources += [dataset.relative_path(i) for i in range(len(dataset))]
        print(f"{split}: {len(dataset)} images")

    aug_rows, aug_maps = None, None
    if cfg.aug_copies > 1:
        print(f"augmenting train: {cfg.aug_copies - 1} copies per image; mirrored: {augmentation['hflip'] or 'no class'}")
        aug_maps = [[] for _ in model.scales]
        loader = DataLoader(AugmentedCopies(splits["train"], cfg), batch_size=copies_per_batch(cfg), shuffle=False,
                            num_workers=cfg.num_workers)
        for copies, _ in progress(loader, desc="tokenizing train copies"):
            for k, m in enumerate(copy_maps(model, copies, precision)):
                aug_maps[k].append(m)
        aug_maps = [np.concatenate(m) for m in aug_maps]
        aug_rows = np.flatnonzero(np.asarray(split_names) == "train")

    all_maps = [np.concatenate(m) for m in maps]
    save_tokens(out, scales=model.scales, maps=all_maps, labels=np.concatenate(labels), split=split_names,
                source=sources, vqvae_sha256=sha, vqvae_config=model.config, classes=classes, made_from=made_from,
                aug_rows=aug_rows, aug_maps=aug_maps)
    length = sum(pn * pn for pn in model.scales)
    used = len(np.unique(all_maps[-1]))
    print(f"wrote {out}: {len(sources)} images x {length} tokens; finest scale uses {used}/{model.config['vocab_size']} "
          f"codes; first-batch decode vs reconstruct max |diff| = {roundtrip_error:.3g}")


if __name__ == "__main__":
    main()
