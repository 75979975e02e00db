"""Sample a trained VAR over the coarse-K sweep: no prefix (NOP) and teacher prefix (TP) at every k, per class.

    python sample_var.py --config=configs/sample_cpu.json     # CPU demo, phantoms
    python sample_var.py --var=runs/var_gpu/best.pth --out=runs/samples_gpu --batch_size=128

Sweep points, each sampled at every guidance value in `guidance`:
- NOP_cfg<g>: every scale sampled from the class alone, samples_per_class images per class.
- TP_K<k>_cfg<g>: the first k token maps come from a real image of the class (teachers_per_class teachers of
  teacher_split, the same for every k), the rest are sampled; samples_per_teacher images per teacher. k = all scales
  is the teacher's VQ-VAE reconstruction (a check).
Every image has its own seed, derived from (seed, class, teacher, sample index) and shared by all sweep points, so
the points are compared on the same random numbers, and an image does not depend on the batch it was drawn in
(each is decoded on its own: convolution kernels change with the batch size).

Outputs in `out`: <POINT>/<class>/*.png, teachers/<class>/tNN.png (the real teacher at the model's size) and
teachers_recon/<class>/tNN.png, grids/<POINT>.png (a row per class; for TP each teacher, framed in red, then its
samples), samples_tokens.npz (every generated token map with its point, k, guidance, class, teacher, sample index
and seed; no pickles), samples_manifest.csv (one row per image, enough to regenerate it) and config.json (the resolved
constants). A finished sweep point (its tokens.npz written last) is skipped on a rerun; a half-written one is redone.
"""
from __future__ import annotations

import csv
import io
import json
import sys
import zipfile
from dataclasses import astuple, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from common.checkpoint import CheckpointError, check_model_kind, load_checkpoint, model_from_checkpoint
from common.config import (DEVICE, PRECISION, SEED, ConfigError, above, at_least, between, check_constants, distinct,
                           each, one_of,
                           save_config, script_config)
from common.image_data import SPLITS, ImageDataError, read_image
from common.io import (SideFileError, atomic_save_npz, atomic_write_text, file_sha256, load_npz, os_error_line,
                       read_json)
from common.plotting import save_image, save_labelled_grid
from common.progress import progress
from common.run_folder import RunFolderError, own_output_folder
from common.runtime import DeviceError, Precision, pick_device, select_precision
from common.tokens import TokenFileError, TokenSet, load_tokens
from models.decoding import DECODE_MODES, decode_images
from models.var import GUIDANCE_SCHEDULES, VAR, SamplingSettings
from models.vqvae import VQVAE, load_vqvae


@dataclass
class Config:
    var: str = "runs/var/best.pth"  # VAR checkpoint from train_var.py (it records its VQ-VAE, token file and classes)
    vqvae: str = ""  # VQ-VAE checkpoint ('' = the one recorded in the VAR checkpoint); must be the one the tokens came from
    tokens: str = ""  # token file with the teachers' token maps ('' = the one recorded in the VAR checkpoint)
    data_dir: str = "data/processed"  # the processed set the tokens were made from (the teachers' images)
    out: str = "runs/samples"  # output folder
    teacher_split: str = "test"  # split the teachers come from: train, val or test
    nop: bool = True  # sample without a prefix (NOP)
    tp: bool = True  # sample with a teacher prefix (TP) at every k of coarse_ks
    coarse_ks: tuple[int, ...] = ()  # TP: numbers of coarse scales taken from the teacher (empty = every k from 1 to all scales)
    guidance: tuple[float, ...] = (1.5,)  # classifier-free guidance scales; every point is sampled at each
    guidance_schedule: str = "linear"  # guidance over the scales: linear (ramps up to the scale), constant
    samples_per_class: int = 16  # NOP images per class and guidance value
    teachers_per_class: int = 4  # TP teachers per class (fewer when the split has fewer images of the class)
    samples_per_teacher: int = 4  # TP images per teacher and sweep point
    top_k: int = 900  # top-k filtering (0 = off)
    top_p: float = 0.95  # nucleus filtering (0 = off)
    temperature: float = 1.0  # softmax temperature (> 0)
    batch_size: int = 32  # images sampled at once
    decode: str = "auto"  # VQ-VAE decoding: batch (one call), one_by_one (independent of the batch), auto (batch on CUDA only)
    seed: int = 0  # seed of the teacher choice and of every image's own seed
    precision: str = "auto"  # autocast dtype: auto (bf16 on capable CUDA, fp32 on CPU), bf16, fp16, fp32
    device: str = "auto"  # auto, cpu, cuda, mps
    cpu_threads: int = 0  # torch CPU threads (0 = torch's default)


class SampleVarError(RuntimeError):
    """Settings or inputs this script cannot sample with."""


@dataclass(frozen=True)
class Point:
    """One sweep point: k teacher scales (0 = NOP) at a guidance scale."""
    k: int
    guidance: float

    @property
    def name(self) -> str:
        return f"NOP_cfg{self.guidance:g}" if self.k == 0 else f"TP_K{self.k}_cfg{self.guidance:g}"


@dataclass(frozen=True)
class Job:
    """One image of a sweep point. teacher = -1 and teacher_row = -1 for NOP."""
    label: int
    teacher: int
    teacher_row: int
    sample: int
    seed: int

    def file_name(self) -> str:
        return f"s{self.sample:03d}.png" if self.teacher < 0 else f"t{self.teacher:02d}_s{self.sample:02d}.png"


def validate(config: Config) -> None:
    """Every constant in its allowed range, before anything is loaded or written."""
    check_constants(config, {
        "teacher_split": one_of(*SPLITS),
        "coarse_ks": each(at_least(1), non_empty=False),
        "guidance": each(at_least(0)), "guidance_schedule": one_of(*GUIDANCE_SCHEDULES),
        **({"samples_per_class": at_least(1)} if config.nop else {}),
        **({"teachers_per_class": at_least(1), "samples_per_teacher": at_least(1)} if config.tp else {}),
        "top_k": at_least(0), "top_p": between(0, 1), "temperature": above(0), "batch_size": at_least(1),
        "seed": SEED, "precision": PRECISION, "device": DEVICE, "cpu_threads": at_least(0),
        "decode": one_of(*DECODE_MODES),
    })
    # Two values that name the same sweep point (guidance 1 and 1.0000001 are both "cfg1") would be sampled into one
    # folder.
    check_constants(config, {"coarse_ks": distinct(), "guidance": distinct(lambda g: f"{g:g}")})
    if not (config.nop or config.tp):
        raise ConfigError(f"--tp={config.tp}: must be true when --nop=false (nothing would be sampled)")


def image_seed(seed: int, label: int, teacher: int, sample: int) -> int:
    """A 63-bit seed per image (it fits the int64 columns), independent of the sweep point."""
    a, b = np.random.SeedSequence([seed, label, teacher + 1, sample]).generate_state(2, np.uint32)
    return (int(a) << 31) ^ int(b)


def sweep_points(config: Config, num_scales: int) -> list[Point]:
    """The sweep: NOP, then TP at each k of coarse_ks (every k from 1 to all scales when empty), each at every
    guidance value; a k beyond the VAR's scales is refused."""
    if any(k > num_scales for k in config.coarse_ks):
        raise SampleVarError(f"--coarse_ks: must be in [1, {num_scales}] (the VAR has {num_scales} scales), "
                             f"got {config.coarse_ks}")
    ks = ([0] if config.nop else []) + (list(config.coarse_ks or range(1, num_scales + 1)) if config.tp else [])
    return [Point(k, g) for k in ks for g in config.guidance]


def choose_teachers(tokens: TokenSet, split: str, num_classes: int, per_class: int, seed: int) -> dict[int, list[int]]:
    """Per class, the token-file rows of its teachers: a seeded draw from the class's images in the split."""
    rows = np.flatnonzero(tokens.split == split)
    chosen = {}
    for label in range(num_classes):
        members = rows[tokens.labels[rows] == label]
        if len(members) == 0:
            raise SampleVarError(f"split {split!r} of the token file has no image of class {tokens.classes[label]!r}: "
                                 "choose another --teacher_split or turn TP off (--tp=false)")
        if len(members) < per_class:
            print(f"note: class {tokens.classes[label]!r} has {len(members)} images in split {split!r}: "
                  f"{len(members)} teachers instead of {per_class}", flush=True)
        picks = np.random.default_rng([seed, label]).choice(len(members), min(per_class, len(members)), replace=False)
        chosen[label] = members[picks].tolist()
    return chosen


def point_jobs(point: Point, config: Config, num_classes: int, teachers: dict[int, list[int]]) -> list[Job]:
    jobs = []
    for label in range(num_classes):
        if point.k == 0:
            jobs += [Job(label, -1, -1, s, image_seed(config.seed, label, -1, s)) for s in range(config.samples_per_class)]
        else:
            jobs += [Job(label, t, row, s, image_seed(config.seed, label, t, s))
                     for t, row in enumerate(teachers[label]) for s in range(config.samples_per_teacher)]
    return jobs


def save_teachers(teachers: dict[int, list[int]], tokens: TokenSet, vqvae: VQVAE, config: Config,
                  out: Path) -> dict[int, list[np.ndarray]]:
    """Per class, its teachers' real images at the model's size, saved with their VQ-VAE reconstructions."""
    teacher_images: dict[int, list[np.ndarray]] = {}
    for label, rows in teachers.items():
        teacher_images[label] = []
        recons = decode_images(vqvae, tokens.idx_list(rows), config.decode)  # like every sample: TP at k = all gives these
        for t, (row, recon) in enumerate(zip(rows, recons)):
            source = Path(config.data_dir) / tokens.source[row]
            if not source.is_file():
                raise SampleVarError(f"{source}: teacher image missing; --data_dir must be the processed set that "
                                     f"{config.tokens} was made from")
            image = read_image(source, vqvae.image_size)
            teacher_images[label].append(image)
            save_image(image, out / "teachers" / tokens.classes[label] / f"t{t:02d}.png")
            save_image(recon, out / "teachers_recon" / tokens.classes[label] / f"t{t:02d}.png")
    return teacher_images


def sampling_settings(config: Config, guidance: float) -> SamplingSettings:
    """How the VAR draws the images of a sweep point at this guidance scale."""
    return SamplingSettings(guidance, config.guidance_schedule, config.top_k, config.top_p, config.temperature)


@torch.no_grad()
def sample_jobs(var: VAR, vqvae: VQVAE, tokens: TokenSet, point: Point, jobs: list[Job], config: Config,
                precision: Precision) -> tuple[np.ndarray, np.ndarray]:
    """Images (B, S, S, 3) uint8 and token rows (B, L) of the jobs, sampled in one batch."""
    device = next(var.parameters()).device
    labels = torch.tensor([j.label for j in jobs], device=device)
    coarse = None
    if point.k:
        coarse = [m.to(device) for m in tokens.idx_list([j.teacher_row for j in jobs])]
    with precision.autocast():
        idx_list = var.generate_idx(vqvae, labels, sampling_settings(config, point.guidance),
                                    seeds=[j.seed for j in jobs], coarse_idx=coarse, coarse_k=point.k)
        images = decode_images(vqvae, idx_list, config.decode)
    return images, torch.cat([m.flatten(1) for m in idx_list], dim=1).cpu().numpy()


def framed(image: np.ndarray, width: int = 2) -> np.ndarray:
    """A copy with a red frame: marks the real teacher in the TP grids."""
    out = image.copy()
    for region in (out[:width], out[-width:], out[:, :width], out[:, -width:]):
        region[:] = (220, 30, 30)
    return out


def save_point_grid(point: Point, jobs: list[Job], images: np.ndarray, teacher_images: dict[int, list[np.ndarray]],
                    classes: list[str], config: Config, path: Path) -> None:
    rows = []
    for label in range(len(classes)):
        members = [i for i, j in enumerate(jobs) if j.label == label]
        if point.k == 0:
            rows.append(images[members])
        else:
            tiles = []
            for t, teacher in enumerate(teacher_images[label]):
                tiles += [framed(teacher)] + [images[i] for i in members if jobs[i].teacher == t]
            rows.append(np.stack(tiles))
    ncols = max(len(r) for r in rows)
    side = images.shape[1]
    blank = np.full((side, side, 3), 255, np.uint8)
    tiles = np.stack([tile for r in rows for tile in list(r) + [blank] * (ncols - len(r))])
    what = ("no prefix" if point.k == 0 else
            f"first {point.k} scales from the teacher (red frame), the rest sampled; {config.samples_per_teacher} per teacher")
    save_labelled_grid(tiles, ncols, classes, path, f"{point.name}: {what}; guidance {point.guidance:g} "
                                                    f"({config.guidance_schedule}), top-k {config.top_k}, "
                                                    f"top-p {config.top_p}, temperature {config.temperature:g}")


def fingerprint(point: Point, jobs: list[Job], config: Config, shas: dict[str, str], precision: Precision) -> str:
    """What a point's images are a function of (not the batch size): a finished point with another is redone."""
    return json.dumps({"point": point.name, "shas": shas, "guidance_schedule": config.guidance_schedule,
                       "top_k": config.top_k, "top_p": config.top_p,
                       "temperature": config.temperature, "precision": precision.name,
                       "device": precision.device.type, "jobs": [astuple(j) for j in jobs]},
                      sort_keys=True)


_ROW_ARRAYS = ("label", "teacher", "teacher_row", "sample", "seed")


def load_finished_point(point_dir: Path, expected: str) -> dict[str, np.ndarray] | None:
    """The point's saved arrays when it is complete and made with the same settings, else None."""
    marker = point_dir / "tokens.npz"
    try:
        with load_npz(marker) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # SideFileError is a ValueError
        return None
    if str(arrays.get("fingerprint")) != expected:
        return None
    if not all((point_dir / p).is_file() for p in arrays["image_path"]):
        return None
    return arrays


def clear_point(point_dir: Path, classes: list[str]) -> None:
    """Remove what an unfinished or outdated run of the point left: its marker and its images, nothing else."""
    (point_dir / "tokens.npz").unlink(missing_ok=True)
    for name in classes:
        for png in (point_dir / name).glob("*.png"):
            png.unlink()


def run_point(point: Point, jobs: list[Job], var: VAR, vqvae: VQVAE, tokens: TokenSet, config: Config,
              precision: Precision, out: Path, expected: str, bar: tqdm) -> dict[str, np.ndarray]:
    point_dir = out / point.name
    clear_point(point_dir, tokens.classes)
    images, idx = [], []
    for start in range(0, len(jobs), config.batch_size):
        batch = jobs[start:start + config.batch_size]
        batch_images, batch_idx = sample_jobs(var, vqvae, tokens, point, batch, config, precision)
        for job, image in zip(batch, batch_images):
            save_image(image, point_dir / tokens.classes[job.label] / job.file_name())
        images.append(batch_images)
        idx.append(batch_idx)
        bar.update(len(batch))
    arrays = {name: np.array([getattr(j, name) for j in jobs], dtype=np.int64) for name in _ROW_ARRAYS}
    arrays["idx"] = np.concatenate(idx).astype(np.int16)
    arrays["image_path"] = np.array([f"{tokens.classes[j.label]}/{j.file_name()}" for j in jobs])
    arrays["fingerprint"] = np.array(expected)
    atomic_save_npz(point_dir / "tokens.npz", **arrays)  # last: its presence marks the point finished
    arrays["images"] = np.concatenate(images)
    return arrays


def resolve_inputs(config: Config, ckpt: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    """Fill vqvae and tokens from what the VAR checkpoint recorded; return them with the checkpoint's records."""
    recorded = {k: ckpt.get(k) for k in ("vqvae_path", "vqvae_sha256", "tokens_path", "classes")}
    for field, key in (("vqvae", "vqvae_path"), ("tokens", "tokens_path")):
        if not getattr(config, field):
            if not recorded[key]:
                raise SampleVarError(f"{config.var}: records no {key} (not written by train_var.py?); pass --{field}=PATH")
            config = replace(config, **{field: recorded[key]})
    return config, recorded


def load_models(config: Config, ckpt: dict[str, Any], recorded: dict[str, Any],
                device: torch.device) -> tuple[VAR, VQVAE, TokenSet]:
    """The VAR (from its checkpoint, read once), its VQ-VAE and the token file, refusing any that do not belong
    together."""
    tokens = load_tokens(config.tokens, config.vqvae)
    if recorded["vqvae_sha256"] and recorded["vqvae_sha256"] != tokens.vqvae_sha256:
        raise SampleVarError(f"{config.var} was trained on tokens of VQ-VAE sha {recorded['vqvae_sha256'][:12]}..., but "
                             f"{config.tokens} and {config.vqvae} have sha {tokens.vqvae_sha256[:12]}...")
    if recorded["classes"] and list(recorded["classes"]) != list(tokens.classes):
        raise SampleVarError(f"{config.var} was trained on classes {recorded['classes']}, but {config.tokens} has "
                             f"{tokens.classes}")
    var = model_from_checkpoint(ckpt, VAR, config.var, map_location=device)
    vqvae = load_vqvae(config.vqvae, map_location=device)
    if var.num_classes != len(tokens.classes) or tuple(var.scales) != tuple(tokens.scales):
        raise SampleVarError(f"{config.var}: {var.num_classes} classes and scales {var.scales}, but {config.tokens} has "
                             f"{len(tokens.classes)} classes and scales {tokens.scales}")
    return var, vqvae, tokens


def check_out(out: Path) -> None:
    """The output folder can be written, and is not another script's folder (its config.json would be replaced)."""
    if out.exists() and not out.is_dir():
        raise SampleVarError(f"{out}: exists and is not a folder")
    previous = out / "config.json"
    if previous.is_file():
        try:
            keys = set(read_json(previous))
        except (SideFileError, TypeError):
            keys = set()
        if not {"var", "teacher_split", "coarse_ks"} <= keys:
            raise SampleVarError(f"{out}: holds a config.json that sample_var.py did not write; choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def merged_arrays(points: list[Point], results: list[dict[str, np.ndarray]], tokens: TokenSet,
                  shas: dict[str, str]) -> dict[str, np.ndarray]:
    """samples_tokens.npz: the points' rows in sweep order, each with its point, k, guidance, path under out and
    teacher's source file, and the inputs' checksums."""
    merged = {name: np.concatenate([r[name] for r in results]) for name in (*_ROW_ARRAYS, "idx")}
    rows = merged["teacher_row"]
    return {**merged, "scales": np.asarray(tokens.scales, dtype=np.int64),
            "point": np.concatenate([[p.name] * len(r["label"]) for p, r in zip(points, results)]),
            "coarse_k": np.concatenate([[p.k] * len(r["label"]) for p, r in zip(points, results)]).astype(np.int64),
            "guidance": np.concatenate([[p.guidance] * len(r["label"])
                                        for p, r in zip(points, results)]).astype(np.float64),
            "image_path": np.concatenate([[f"{p.name}/{f}" for f in r["image_path"]] for p, r in zip(points, results)]),
            "teacher_source": np.where(rows >= 0, tokens.source[np.maximum(rows, 0)], ""),
            "classes": np.asarray(tokens.classes), "var_sha256": np.asarray(shas["var"]),
            "vqvae_sha256": np.asarray(shas["vqvae"]), "tokens_sha256": np.asarray(shas["tokens"])}


def write_manifest(path: Path, points: list[Point], results: list[dict[str, np.ndarray]], tokens: TokenSet,
                   config: Config, precision: Precision) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "point", "mode", "coarse_k", "guidance", "guidance_schedule", "class", "label", "teacher",
                     "teacher_row", "teacher_source", "sample", "seed", "top_k", "top_p", "temperature", "precision",
                     "device"])
    for point, arrays in zip(points, results):
        for i in range(len(arrays["label"])):
            row = int(arrays["teacher_row"][i])
            writer.writerow([f"{point.name}/{arrays['image_path'][i]}", point.name, "NOP" if point.k == 0 else "TP",
                             point.k, f"{point.guidance:g}", config.guidance_schedule,
                             tokens.classes[arrays["label"][i]], arrays["label"][i], arrays["teacher"][i], row,
                             tokens.source[row] if row >= 0 else "", arrays["sample"][i], arrays["seed"][i],
                             config.top_k, config.top_p, config.temperature, precision.name, precision.device.type])
    atomic_write_text(path, buffer.getvalue())


def sample(config: Config) -> None:
    out = Path(config.out)
    check_out(out)
    device = pick_device(config.device)
    precision = select_precision(device, config.precision)
    ckpt = load_checkpoint(config.var, map_location=device)
    check_model_kind(ckpt, VAR, config.var)  # before its records are read: a VQ-VAE given here is named as one
    config, recorded = resolve_inputs(config, ckpt)
    var, vqvae, tokens = load_models(config, ckpt, recorded, device)
    del ckpt  # the VAR holds the weights now
    points = sweep_points(config, len(tokens.scales))
    save_config(config, out)
    classes = tokens.classes
    teachers = choose_teachers(tokens, config.teacher_split, len(classes), config.teachers_per_class, config.seed) \
        if config.tp else {}
    teacher_images = save_teachers(teachers, tokens, vqvae, config, out)

    shas = {"var": file_sha256(config.var), "vqvae": tokens.vqvae_sha256, "tokens": file_sha256(config.tokens)}
    all_jobs = [point_jobs(p, config, len(classes), teachers) for p in points]
    print(f"VAR {config.var} ({var.config['depth']} blocks, scales {tokens.scales}), {len(classes)} classes; "
          f"{len(points)} sweep points, {sum(map(len, all_jobs))} images; {precision.name} on {device}", flush=True)
    results = []
    bar = progress(total=sum(map(len, all_jobs)), desc="sampling", unit="img", dynamic_ncols=True)
    for point, jobs in zip(points, all_jobs):
        expected = fingerprint(point, jobs, config, shas, precision)
        arrays = load_finished_point(out / point.name, expected)
        if arrays is None:
            arrays = run_point(point, jobs, var, vqvae, tokens, config, precision, out, expected, bar)
            status = "sampled"
        else:
            arrays["images"] = np.stack([read_image(out / point.name / f, vqvae.image_size) for f in arrays["image_path"]])
            bar.update(len(jobs))
            status = "already done, kept"
        save_point_grid(point, jobs, arrays["images"], teacher_images, classes, config, out / "grids" / f"{point.name}.png")
        bar.write(f"{point.name}: {len(jobs)} images {status}")
        results.append(arrays)
    bar.close()

    merged = merged_arrays(points, results, tokens, shas)
    atomic_save_npz(out / "samples_tokens.npz", **merged)
    write_manifest(out / "samples_manifest.csv", points, results, tokens, config, precision)
    print(f"wrote {len(merged['label'])} images of {len(points)} sweep points to {out} (samples_manifest.csv, "
          "samples_tokens.npz, grids/)", flush=True)


def main(argv: list[str] | None = None) -> None:
    config = script_config(Config, argv, validate)
    if config.cpu_threads > 0:
        torch.set_num_threads(config.cpu_threads)
    inputs = [config.var, config.vqvae, config.tokens, config.data_dir]
    try:
        with own_output_folder(config.out, "sample_var.py", inputs, config_keys=vars(config)):
            sample(config)
    except (SampleVarError, TokenFileError, CheckpointError, ImageDataError, DeviceError, RunFolderError,
            SideFileError, OSError) as err:
        print(f"error: {os_error_line(err) if isinstance(err, OSError) else err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
