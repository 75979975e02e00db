"""Speed of the two networks, ours alone or side by side with the reference implementation: the VAR training step
(teacher-forcing input + forward + backward + AdamW step) and sampling (guidance, top-k, top-p, decoded to images),
in fp32 and in bf16 autocast.

    python bench/bench_models.py                                  # ours alone, the issue's shapes (a few minutes)
    python bench/bench_models.py --reference_repo=/path/to/VAR    # ours vs github.com/FoundationVision/VAR
    python bench/bench_models.py --reference_repo=/path/to/VAR --dry_run   # tiny shapes, seconds (the test)
    python bench/bench_models.py --depth=16 --embed_dim=1024 --num_heads=16 --vqvae_ch=160 --device=cuda

With --reference_repo, the reference's VQVAE and VAR are imported from that checkout (never copied here), built
with the same shapes, and ours get the very same weights through models/convert_upstream.py. Both run on the same
inputs in the same process, interleaved (reference, ours, reference, ours, ...), so that load from other jobs
hits both alike. Printed per task and precision: the median time of each, the spread (min-max over the
repetitions) and the ratio ours / reference (median of the per-pair ratios). Without the flag, ours alone.
"""
from __future__ import annotations

import statistics
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find common/, models/


@dataclass
class Config:
    reference_repo: str = ""          # checkout of github.com/FoundationVision/VAR to compare with ("" = ours alone)
    depth: int = 6                    # VAR blocks (the 17.3M-parameter model)
    embed_dim: int = 384              # VAR width (the reference ties it to depth: 64 per block)
    num_heads: int = 6                # VAR attention heads (the reference: one per block)
    num_classes: int = 6              # classes (plus the null class)
    vocab_size: int = 2048            # codebook size
    z_channels: int = 32              # codebook vector size
    scales: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # token-map sides (680 tokens), image = 16 x the last
    vqvae_ch: int = 64                # VQ-VAE base width (the public checkpoint uses 160)
    batch_size: int = 4               # images per training step
    sample_batch: int = 4             # images per sampling call
    guidance: float = 1.5             # classifier-free guidance scale during sampling
    top_k: int = 900                  # top-k during sampling
    top_p: float = 0.96               # nucleus (top-p) during sampling
    precisions: tuple[str, ...] = ("fp32", "bf16")  # autocast precisions to time, in turn
    warmup: int = 1                   # untimed repetitions of each first
    repeats: int = 5                  # timed repetitions (median and spread reported)
    device: str = "auto"              # auto, cpu, cuda, mps
    seed: int = 0                     # weights, tokens and samples
    dry_run: bool = False             # tiny shapes, one repetition: checks that everything runs


DRY_RUN = dict(depth=1, embed_dim=64, num_heads=2, vocab_size=64, z_channels=8, scales=(1, 2, 3), vqvae_ch=32,
               batch_size=2, sample_batch=2, top_k=16, warmup=0, repeats=1)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common.config import DEVICE, at_least, between, check_constants, each, one_of, script_config  # noqa: E402
from common.runtime import pick_device, seed_everything, select_precision  # noqa: E402
from models.convert_upstream import var_from_upstream, vqvae_from_upstream  # noqa: E402
from models.var import VAR, SamplingSettings  # noqa: E402
from models.vqvae import VQVAE  # noqa: E402
from timing import timed_once  # noqa: E402  (bench/, the script's folder, is on sys.path)



def validate(cfg: Config) -> None:
    if cfg.dry_run:
        for key, value in DRY_RUN.items():
            setattr(cfg, key, value)
    check_constants(cfg, {
        "depth": at_least(1), "embed_dim": at_least(1), "num_heads": at_least(1), "num_classes": at_least(1),
        "vocab_size": at_least(2), "z_channels": at_least(1), "vqvae_ch": at_least(32), "batch_size": at_least(1),
        "sample_batch": at_least(1), "guidance": at_least(0), "top_k": at_least(0), "top_p": between(0.0, 1.0),
        "warmup": at_least(0), "repeats": at_least(1), "precisions": each(one_of("fp32", "bf16", "fp16")), "device": DEVICE})


def import_reference(repo: Path) -> types.SimpleNamespace:
    """The reference's VQVAE and VAR classes from its checkout. Its package is also called `models`: ours is set
    aside in sys.modules while the reference's imports, then put back. Optional dependencies the models never use
    on this path (huggingface_hub's hub mixin) get an empty stand-in when not installed."""
    if not (repo / "models" / "var.py").is_file() or not (repo / "dist.py").is_file():
        raise SystemExit(f"error: --reference_repo {repo}: not a checkout of github.com/FoundationVision/VAR "
                         "(models/var.py or dist.py is missing)")
    ours = {name: mod for name, mod in sys.modules.items() if name == "models" or name.startswith("models.")}
    for name in ours:
        del sys.modules[name]
    if "huggingface_hub" not in sys.modules:
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:
            sys.modules["huggingface_hub"] = types.SimpleNamespace(PyTorchModelHubMixin=object)
    sys.path.insert(0, str(repo))
    try:
        import models as ref_models  # the reference's package, found first on sys.path now
        reference = types.SimpleNamespace(VQVAE=ref_models.VQVAE, VAR=ref_models.VAR)
    finally:
        sys.path.remove(str(repo))
        for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
            del sys.modules[name]
        sys.modules.update(ours)
    return reference


def build_pair(cfg: Config, ref: types.SimpleNamespace, device: torch.device) -> tuple[nn.Module, nn.Module, VQVAE, VAR]:
    """The reference's VQVAE and VAR (its own init), and ours with the same weights through convert_upstream."""
    ref_vqvae = ref.VQVAE(vocab_size=cfg.vocab_size, z_channels=cfg.z_channels, ch=cfg.vqvae_ch, test_mode=True,
                          share_quant_resi=4, v_patch_nums=cfg.scales)
    ref_var = ref.VAR(ref_vqvae, num_classes=cfg.num_classes, depth=cfg.depth, embed_dim=cfg.embed_dim,
                      num_heads=cfg.num_heads, drop_path_rate=0.0, attn_l2_norm=True, patch_nums=cfg.scales)
    ref_var.init_weights()
    vqvae = vqvae_from_upstream({k: v.clone() for k, v in ref_vqvae.state_dict().items()}, scales=list(cfg.scales))
    var = var_from_upstream({k: v.clone() for k, v in ref_var.state_dict().items()}, num_heads=cfg.num_heads,
                            scales=list(cfg.scales))
    return ref_vqvae.to(device), ref_var.to(device), vqvae.to(device), var.to(device)


@torch.no_grad()
def logit_difference(ref_vqvae: nn.Module, ref_var: nn.Module, vqvae: VQVAE, var: VAR, labels: torch.Tensor,
                     idx: list[torch.Tensor]) -> float:
    """Max |logit difference| of the two VARs on the same teacher-forcing batch, without class dropout."""
    ref_var.eval()
    var.eval()
    drop, ref_var.cond_drop_rate = ref_var.cond_drop_rate, 0.0  # the reference drops classes even in eval mode
    theirs = ref_var(labels, ref_vqvae.quantize.idxBl_to_var_input([t.flatten(1) for t in idx]))
    ref_var.cond_drop_rate = drop
    return (var(labels, vqvae.idx_to_var_input(idx)) - theirs).abs().max().item()


def adamw(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The same optimizer for both: AdamW with train_var.py's betas and weight decay, fused where train_var.py
    fuses it (CUDA)."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                             fused=device.type == "cuda")


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn (a, b, a, b, ...) so that load changes hit all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed_once(fn, device))
    return times


def report(task: str, precision: str, times: dict[str, list[float]]) -> None:
    cells = [f"{name} {statistics.median(t) * 1000:8.1f} ms ({min(t) * 1000:.0f}-{max(t) * 1000:.0f})"
             for name, t in times.items()]
    line = f"{task:<14} {precision:<5} " + "   ".join(cells)
    if "reference" in times:
        ratios = [o / r for o, r in zip(times["ours"], times["reference"])]
        line += f"   ratio ours/reference {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
    print(line, flush=True)


def main(argv: list[str] | None = None) -> None:
    cfg = script_config(Config, argv, validate)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    torch.set_grad_enabled(True)
    if cfg.reference_repo:
        ref = import_reference(Path(cfg.reference_repo).resolve())
        ref_vqvae, ref_var, vqvae, var = build_pair(cfg, ref, device)
    else:
        vqvae = VQVAE(vocab_size=cfg.vocab_size, z_channels=cfg.z_channels, ch=cfg.vqvae_ch, scales=cfg.scales).to(device)
        var = VAR(vocab_size=cfg.vocab_size, z_channels=cfg.z_channels, scales=cfg.scales, num_classes=cfg.num_classes,
                  depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, drop_path_rate=0.0).to(device)
    b = cfg.batch_size
    labels = torch.randint(0, cfg.num_classes, (b,), device=device)
    idx = [torch.randint(0, cfg.vocab_size, (b, pn, pn), device=device) for pn in cfg.scales]
    targets = torch.cat([t.flatten(1) for t in idx], dim=1).flatten()
    if cfg.reference_repo:
        err = logit_difference(ref_vqvae, ref_var, vqvae, var, labels, idx)
        print(f"same weights: max |logit difference| ours vs reference {err:.2e} (fp32, eval)")
        if err > 1e-3:
            raise SystemExit(f"error: the two models disagree (max |logit difference| {err:.3g}): the weight mapping "
                             "of models/convert_upstream.py does not fit this reference checkout")
    n_var = sum(p.numel() for p in var.parameters())
    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, scales {cfg.scales} "
          f"(L={targets.numel() // b}), VAR depth {cfg.depth} width {cfg.embed_dim}: {n_var / 1e6:.1f}M parameters, "
          f"VQ-VAE ch {cfg.vqvae_ch}, image {vqvae.image_size}px, training batch {b}, sampling batch "
          f"{cfg.sample_batch} (guidance {cfg.guidance}, top-k {cfg.top_k}, top-p {cfg.top_p})", flush=True)

    ours_opt = adamw(var, device)
    if cfg.reference_repo:  # one optimizer each for the whole run, as for ours
        ref_opt = adamw(ref_var, device)
        idx_bl = [t.flatten(1) for t in idx]
    sample_labels = torch.arange(cfg.sample_batch, device=device) % cfg.num_classes
    seeds = list(range(cfg.seed, cfg.seed + cfg.sample_batch))
    sampling = SamplingSettings(cfg.guidance, top_k=cfg.top_k, top_p=cfg.top_p)
    for name in cfg.precisions:
        precision = select_precision(device, name)

        def ours_train() -> None:
            var.train()
            with precision.autocast():
                logits = var(labels, vqvae.idx_to_var_input(idx))
                loss = F.cross_entropy(logits.flatten(0, 1), targets)
            loss.backward()
            ours_opt.step()
            ours_opt.zero_grad(set_to_none=True)

        def ours_sample() -> None:
            var.eval()
            with torch.no_grad(), precision.autocast():
                var.generate(vqvae, sample_labels, sampling, seeds=seeds)

        train_fns: dict[str, Callable[[], object]] = {"ours": ours_train}
        sample_fns: dict[str, Callable[[], object]] = {"ours": ours_sample}
        if cfg.reference_repo:
            def ref_train() -> None:
                ref_var.train()
                with precision.autocast():
                    logits = ref_var(labels, ref_vqvae.quantize.idxBl_to_var_input(idx_bl))
                    loss = F.cross_entropy(logits.flatten(0, 1), targets)
                loss.backward()
                ref_opt.step()
                ref_opt.zero_grad(set_to_none=True)

            def ref_sample() -> None:
                ref_var.eval()
                with torch.no_grad(), precision.autocast():
                    ref_var.autoregressive_infer_cfg(cfg.sample_batch, sample_labels, g_seed=cfg.seed, cfg=cfg.guidance,
                                                     top_k=cfg.top_k, top_p=cfg.top_p)

            train_fns = {"reference": ref_train, **train_fns}
            sample_fns = {"reference": ref_sample, **sample_fns}
        report("training step", name, interleaved(train_fns, device, cfg.warmup, cfg.repeats))
        report("sampling", name, interleaved(sample_fns, device, cfg.warmup, cfg.repeats))


if __name__ == "__main__":
    main()
