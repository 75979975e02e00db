"""train_vqvae.py end to end on a tiny model: outputs and plots, resume after SIGKILL, clear errors for bad
checkpoints and non-finite losses, a two-process torchrun run matching one process with the same global batch, the
loss reductions, the delayed discriminator and its exact resume, and the refusal of LPIPS without local weights.

train_vqvae.DeadCodes pinned down: which counters reset, when a code counts as dead, which rows and optimizer
moments a re-initialisation touches, and that the new codes are residuals of the batch at the quantizer's scales.

train_vqvae.py's rule functions at non-default settings: every constant's allowed range at its edges, the loss
terms under both reductions, the adaptive adversarial weight and its clamp, the model a config builds, codebook usage
and perplexity, the order of the grid images, when the test split counts as scored, and each refusal (issue 16)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import models.convert_upstream
import train_vqvae
from common.checkpoint import load_checkpoint
from common.distributed import DistContext
from common.fidelity import FidelityError
from common.runtime import select_precision
from common.training import EpochSums
from config_refusal import assert_edges, refusal_of
from models import vqvae_losses
from models.vqvae import VQVAE, VQOutput, load_vqvae
from train_vqvae import DeadCodes

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_image_set(root: Path, size: int = 64, seed: int = 0) -> Path:
    """Three visibly different grey classes (disks, bands, noise ramps), imbalanced in train."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for ci, (name, per_split) in enumerate({"disk": (12, 3, 3), "band": (6, 3, 3), "ramp": (4, 2, 2)}.items()):
        for split, n in zip(("train", "val", "test"), per_split):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cx, cy, r = *rng.uniform(0.3, 0.7, 2), rng.uniform(0.1, 0.3)
                base = [((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) * 0.8, 0.5 + 0.4 * np.sin(12 * yy + 6 * cx),
                        rng.random((size, size)) * 0.3 + 0.3 * xx][ci]
                grey = (np.clip(base + rng.normal(0, 0.05, (size, size)), 0, 1) * 255).astype(np.uint8)
                Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(folder / f"{name}_{i}.png")
    return root


def tiny_args(data: Path, out: Path, **overrides: object) -> list[str]:
    args = dict(data_dir=data, out_dir=out, image_size=32, ch=32, ch_mult="1,1,2", num_res_blocks=1, z_channels=8,
                vocab_size=64, scales="1,2,4,8", epochs=EPOCHS, batch_size=8, lr=2e-3, warmup_steps=2,
                dead_code_steps=2, dead_code_every=2, num_workers=0, eval_batch_size=16, plot_every=EPOCHS, num_recon=3,
                cpu_threads=1, precision="fp32", device="cpu", recon_kid=False)
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


def run_in_process(args: list[str]) -> None:
    train_vqvae.main(args)


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_set(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted single-process run that the other tests compare against."""
    out = tmp_path_factory.mktemp("reference")
    run_in_process(tiny_args(data, out, recon_kid=True))
    return out


GAN_ARGS = dict(disc_weight=0.5, disc_start=4, disc_ch=16, disc_layers=2)  # the discriminator from the third epoch


@pytest.fixture(scope="module")
def gan_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference run with the adversarial loss from step 4 (2 steps per epoch), uninterrupted."""
    out = tmp_path_factory.mktemp("gan")
    run_in_process(tiny_args(data, out, **GAN_ARGS))
    return out


def history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())


def test_run_writes_checkpoints_metrics_and_plots(reference_run: Path) -> None:
    for name in ("best.pth", "last.pth", "config.json", "history.json", "test_metrics.json", "loss.png",
                 "psnr_ssim.png", "usage.png", "code_usage_hist.png", "code_usage_hist_test.png", "class_counts.png",
                 "recon_val_epoch005.png", "recon_test.png"):
        assert (reference_run / name).is_file(), name
    records = history(reference_run)
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    assert [r["step"] for r in records] == [2 * e for e in range(1, EPOCHS + 1)]  # 22 images // batch 8 = 2 steps
    assert records[-1]["val_psnr"] > records[0]["val_psnr"]
    assert sum(r["dead_codes_reinit"] for r in records) > 0
    assert all(len(r["val_usage"]) == 4 and 0 < r["val_usage"][-1] <= 1 for r in records)
    metrics = json.loads((reference_run / "test_metrics.json").read_text())
    assert metrics["n_images"] == 8 and 0 < metrics["ssim"] <= 1 and metrics["psnr"] > 5 and len(metrics["usage"]) == 4
    # The test images fill the frame (no black margin): the scan area is the whole image, found in every one.
    assert metrics["scan_area_fallback"] == 0 and 0 < metrics["ssim_scan"] <= 1 and metrics["psnr_scan"] > 5
    # Reconstructions of 4 test images against the other 4 (disjoint halves), in subsets of half of them
    # (common.fidelity.kid_subset_size), so their std is not a constant 0.
    assert metrics["kid_subset_size"] == 2 and np.isfinite(metrics["kid_recon"]) and metrics["kid_recon_std"] > 0
    best = load_checkpoint(reference_run / "best.pth")
    assert best["epoch"] == metrics["best_epoch"]
    assert best["best_val_loss"] == min(r["val_loss"] for r in records)
    assert best["config"]["image_size"] == 32
    model = load_vqvae(reference_run / "best.pth")
    assert model.scales == (1, 2, 4, 8) and model.config["vocab_size"] == 64
    assert json.loads((reference_run / "config.json").read_text())["balanced"] is True


def test_a_finished_run_rerun_rewrites_nothing(data: Path, reference_run: Path, tmp_path: Path, capsys) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in reference_run.iterdir()}
    capsys.readouterr()
    run_in_process(tiny_args(data, reference_run, recon_kid=True))  # the reference's own constants
    assert "up to date for this best.pth and test set; not scored again" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in reference_run.iterdir()} == before
    # Another test set is scored again.
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    shutil.copytree(data, tmp_path / "data")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "data" / "test" / "disk" / "disk_0.png")
    run_in_process(tiny_args(tmp_path / "data", out, allow_changed_run=True))  # data_dir defines the run
    assert "not scored again" not in capsys.readouterr().out
    assert (out / "test_metrics.json").stat().st_mtime_ns != before["test_metrics.json"]


@pytest.mark.e2e
def test_sigkill_then_restart_resumes_and_matches_an_uninterrupted_run(data: Path, reference_run: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, "train_vqvae.py", *tiny_args(data, out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "last.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = load_checkpoint(out / "last.pth")
    assert 1 <= saved["epoch"] < EPOCHS, "the run was meant to be killed mid-way"

    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"epoch {saved['epoch']}, step {saved['step']}" in done.stdout
    resumed, reference = history(out), history(reference_run)
    assert [r["epoch"] for r in resumed] == list(range(1, EPOCHS + 1))
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for key in ("train_loss", "val_loss", "val_psnr"):
        np.testing.assert_allclose([r[key] for r in resumed], [r[key] for r in reference], rtol=1e-4, err_msg=key)
    assert (out / "test_metrics.json").is_file()


def test_corrupt_foreign_or_mismatched_checkpoints_are_refused(data: Path, reference_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    good = (reference_run / "last.pth").read_bytes()
    (out / "last.pth").write_bytes(good[: len(good) // 2])  # what a crash mid-copy leaves
    with pytest.raises(SystemExit, match=r"last\.pth: not a readable PyTorch checkpoint \(truncated or corrupt\?\)"):
        run_in_process(tiny_args(data, out))
    (out / "last.pth").write_bytes(b"garbage, not a checkpoint")
    with pytest.raises(SystemExit, match=r"error: .*run/last\.pth: "):
        run_in_process(tiny_args(data, out))
    torch.save({"state_dict": {"w": torch.zeros(2)}}, out / "last.pth")
    with pytest.raises(SystemExit, match=r"last\.pth: not a checkpoint of this project: missing model"):
        run_in_process(tiny_args(data, out))
    (out / "last.pth").write_bytes(good)
    with pytest.raises(SystemExit, match=r"last\.pth: was written for a different network"):
        run_in_process(tiny_args(data, out, z_channels=16))
    with pytest.raises(SystemExit, match=r"missing\.pth: checkpoint file does not exist"):
        run_in_process(tiny_args(data, tmp_path / "other", resume=tmp_path / "missing.pth"))


NO_CUDA_DEVICE = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.mark.parametrize("override, message", [
    ({"image_size": 64}, r"--image_size=64: must equal scales\[-1\] x 2\^\(len\(ch_mult\)-1\) = 8 x 4 = 32"),
    ({"batch_size": 0}, "--batch_size=0: must be >= 1"),
    ({"vocab_size": 0}, r"--vocab_size=0: must be in \[2, 32768\]"),
    ({"in_channels": 2}, "--in_channels=2: must be one of 1, 3"),
    ({"num_recon": 0}, "--num_recon=0: must be >= 1"),
    ({"plot_every": 0}, "--plot_every=0: must be >= 1"),
    ({"epochs": 0}, "--epochs=0: must be >= 1"),
    ({"ch": 48}, "--ch=48: must be a positive multiple of 32"),
    ({"scales": "1,4,2"}, r"--scales=\(1, 4, 2\): must be a non-empty, strictly increasing list"),
    ({"precision": "fp8"}, "--precision='fp8': must be one of auto, bf16, fp16, fp32"),
    ({"device": NO_CUDA_DEVICE}, f"--device='{NO_CUDA_DEVICE}': must be auto, cpu, or a cuda / mps device"),
])
def test_bad_constants_stop_before_anything_is_read_or_written(data: Path, tmp_path: Path, override: dict,
                                                               message: str) -> None:
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        run_in_process(tiny_args(data, tmp_path / "run", **override))
    assert list(tmp_path.iterdir()) == []


def test_unusable_out_dir_or_batch_stop_with_a_clear_error(data: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"not a folder")
    with pytest.raises(SystemExit, match=f"^error: --out_dir: {tmp_path / 'file'} exists and is not a folder$"):
        run_in_process(tiny_args(data, tmp_path / "file"))
    with pytest.raises(SystemExit, match=f"^error: --out_dir: cannot write in {tmp_path / 'file' / 'run'} "):
        run_in_process(tiny_args(data, tmp_path / "file" / "run"))
    assert (tmp_path / "file").read_bytes() == b"not a folder"
    with pytest.raises(SystemExit, match="cannot fill one global batch of 64"):
        run_in_process(tiny_args(data, tmp_path / "run", batch_size=64))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = vqvae_losses.recon_loss

    def nan_from_the_second_epoch(rec: torch.Tensor, img: torch.Tensor, reduction: str) -> torch.Tensor:
        calls.append(1)
        loss = real(rec, img, reduction)
        return loss * float("nan") if len(calls) > 2 else loss

    monkeypatch.setattr(vqvae_losses, "recon_loss", nan_from_the_second_epoch)
    with pytest.raises(SystemExit, match=r"loss became nan at step 2; stopping\. The last good checkpoints are kept"):
        run_in_process(tiny_args(data, tmp_path, epochs=3))
    kept = load_checkpoint(tmp_path / "last.pth")
    assert kept["epoch"] == 1 and kept["step"] == 2
    assert all(torch.isfinite(v).all() for v in kept["model"].values())


@pytest.mark.e2e
def test_two_process_torchrun_matches_one_process(data: Path, gan_run: Path, tmp_path: Path) -> None:
    """With the discriminator from the third epoch: both the plain and the adversarial steps match one process."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_vqvae.py",
           *tiny_args(data, out, **GAN_ARGS)]
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "2 process(es) x batch 4" in done.stdout
    two, one = history(out), history(gan_run)
    assert [r["step"] for r in two] == [r["step"] for r in one]
    # Same global batches, loss averaged over processes, dead codes re-initialised identically on both ranks.
    assert [r["dead_codes_reinit"] for r in two] == [r["dead_codes_reinit"] for r in one]
    for key in ("train_loss", "val_loss", "val_psnr", "val_ssim"):
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=5e-3, err_msg=key)
    np.testing.assert_allclose([r["val_usage"] for r in two], [r["val_usage"] for r in one], atol=0.05)
    # The adaptive weight comes from the gradients of the global batch, averaged over the processes.
    for key in ("gan_weight", "train_gan_loss", "train_disc_loss"):
        np.testing.assert_allclose([r[key] for r in two[2:]], [r[key] for r in one[2:]], rtol=5e-3, err_msg=key)


def test_init_from_the_reference_checkpoint(shared_dir: Path, data: Path, tmp_path: Path) -> None:
    fixture = load_checkpoint(shared_dir / "fixtures" / "upstream_var" / "upstream_small.pt")
    upstream = tmp_path / "reference_vqvae.pth"
    torch.save(fixture["vqvae_state_dict"], upstream)
    args = tiny_args(data, tmp_path / "run", init_from_upstream=upstream, image_size=64, vocab_size=512, z_channels=16,
                     ch_mult="1,1,2,2,4", num_res_blocks=2, scales="1,2,3,4", epochs=1, lr=0.0, dead_code_steps=0,
                     in_channels=3)
    with pytest.raises(SystemExit, match=r"architecture differs from this config \(vocab_size: 512 vs 64, in_channels: 3 "
                                         r"vs 1\); run with --vocab_size=512 --in_channels=3"):
        run_in_process(tiny_args(data, tmp_path / "bad", init_from_upstream=upstream, image_size=64, z_channels=16,
                                 ch_mult="1,1,2,2,4", num_res_blocks=2, scales="1,2,3,4"))
    run_in_process(args)
    # lr 0 and no dead-code re-init: the trained weights are still exactly the reference's.
    model = load_vqvae(tmp_path / "run" / "best.pth")
    assert torch.equal(model.quantizer.embedding.weight, fixture["vqvae_state_dict"]["quantize.embedding.weight"])
    with torch.no_grad():
        # The parity tolerance (tests/test_upstream_parity.py): the CPU decoder's channels-last convolutions
        # accumulate in another order than the reference's NCHW ones (2.8e-5 here).
        assert torch.allclose(model.reconstruct(fixture["images"]), fixture["rec_last_scale"], atol=1e-4)


def test_a_nan_in_the_last_step_of_an_epoch_leaves_the_checkpoints_untouched(data: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    run_in_process(tiny_args(data, tmp_path, epochs=1))
    before = {name: (tmp_path / name).read_bytes() for name in ("last.pth", "best.pth", "history.json")}
    (tmp_path / ".best.pth.a1b2c3d4.tmp").write_bytes(b"left by a killed write")
    os.utime(tmp_path / ".best.pth.a1b2c3d4.tmp", (time.time() - 3600,) * 2)  # an hour ago
    calls = []
    real = vqvae_losses.recon_loss

    def nan_gradients_on_the_last_step(rec: torch.Tensor, img: torch.Tensor, reduction: str) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:  # the second epoch's last step (2 per epoch): a finite loss whose update makes NaN weights
            rec.register_hook(lambda grad: grad * float("nan"))
        return real(rec, img, reduction)

    monkeypatch.setattr(vqvae_losses, "recon_loss", nan_gradients_on_the_last_step)
    with pytest.raises(SystemExit, match=r"^error: epoch 2: non-finite val loss nan, weights .*; stopping without writing"):
        run_in_process(tiny_args(data, tmp_path, epochs=3))
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert not (tmp_path / ".best.pth.a1b2c3d4.tmp").exists()


def test_the_two_loss_reductions_differ_by_the_element_counts(data: Path, tmp_path: Path) -> None:
    """sum = mean x 3*H*W for the reconstruction term (and equals the seed's per-image SSE), mean x z*h*w for the VQ
    term: in the training step's loss_terms and in the evaluation."""
    torch.manual_seed(0)
    model = train_vqvae.VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                              scales=(1, 2, 4, 8), in_channels=1)
    img = torch.rand(3, 3, 32, 32) * 2 - 1
    out = model(img)
    pixels, latents = 3 * 32 * 32, 8 * 8 * 8
    rec_sum, vq_sum, _ = train_vqvae.loss_terms(out, img, "sum", None, 0.0, latents)
    rec_mean, vq_mean, _ = train_vqvae.loss_terms(out, img, "mean", None, 0.0, latents)
    torch.testing.assert_close(rec_sum, rec_mean * pixels, rtol=1e-6, atol=0)
    torch.testing.assert_close(vq_sum, vq_mean * latents, rtol=1e-6, atol=0)
    torch.testing.assert_close(rec_sum, (out.rec - img).square().flatten(1).sum(1).mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(vq_mean, out.vq_loss, rtol=0, atol=0)

    cfg = train_vqvae.Config(data_dir=str(data), image_size=32, eval_batch_size=16, num_workers=0)
    split = train_vqvae.ImageSplit(data, "val", 32)
    masks = np.ones((len(split), 32, 32), bool)
    dist = train_vqvae.setup_distributed(torch.device("cpu"))
    fp32, scores = select_precision(torch.device("cpu"), "fp32"), {}
    for reduction in ("sum", "mean"):
        cfg.loss_reduction = reduction
        scores[reduction] = train_vqvae.evaluate(model, split, masks, cfg, dist, fp32, "val")
    assert scores["sum"]["rec_loss"] == pytest.approx(scores["mean"]["rec_loss"] * pixels, rel=1e-6)
    assert scores["sum"]["vq_loss"] == pytest.approx(scores["mean"]["vq_loss"] * latents, rel=1e-6)
    # A mask covering the whole image scores exactly what the whole image scores.
    mean = scores["mean"]
    assert mean["psnr_scan"] == mean["psnr"] and mean["ssim_scan"] == mean["ssim"]


def test_the_prefix_term_is_weighted_into_the_training_loss_and_logged(data: Path, reference_run: Path,
                                                                        tmp_path: Path) -> None:
    run_in_process(tiny_args(data, tmp_path, epochs=1, plot_every=1, prefix_weight=0.5))
    first = history(tmp_path)[0]
    assert first["train_prefix_loss"] > 0
    assert first["train_loss"] == pytest.approx(first["train_rec_loss"] + first["train_vq_loss"]
                                                + 0.5 * first["train_prefix_loss"], rel=1e-6)  # float32 terms
    assert "train_prefix_loss" not in history(reference_run)[0]


def test_the_discriminator_starts_only_after_its_delay(reference_run: Path, gan_run: Path) -> None:
    plain, gan = history(reference_run), history(gan_run)
    # Steps 0-3 (epochs 1-2): no discriminator step, no adversarial term: exactly the run without one.
    for r_plain, r_gan in zip(plain[:2], gan[:2]):
        assert "gan_steps" not in r_gan and "train_disc_loss" not in r_gan
        for key in ("train_loss", "train_rec_loss", "train_vq_loss", "val_loss", "val_psnr"):
            assert r_gan[key] == r_plain[key], key
    # From step 4 on: both steps of every epoch train the discriminator and add its loss, and the run departs.
    assert [r["gan_steps"] for r in gan[2:]] == [2, 2, 2]
    assert all(r["train_disc_loss"] > 0 and r["gan_weight"] > 0 for r in gan[2:])
    assert gan[2]["train_loss"] != plain[2]["train_loss"]
    last = load_checkpoint(gan_run / "last.pth")
    assert last["discriminator_config"] == {"in_channels": 1, "ch": 16, "num_layers": 2}
    assert len(last["disc_optimizer"]["state"]) > 0
    # best.pth is picked among the epochs with the discriminator on, and loads as a plain VQ-VAE.
    assert load_checkpoint(gan_run / "best.pth")["epoch"] >= 3
    assert load_vqvae(gan_run / "best.pth").scales == (1, 2, 4, 8)
    assert (gan_run / "gan.png").is_file()


def test_resume_with_the_discriminator_on_matches_an_uninterrupted_run(data: Path, gan_run: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real_evaluate = train_vqvae.evaluate
    calls = []

    def killed_at_the_fourth_validation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # after epoch 3's checkpoint, whose discriminator has trained 2 steps
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_vqvae, "evaluate", killed_at_the_fourth_validation)
    with pytest.raises(KeyboardInterrupt):
        run_in_process(tiny_args(data, tmp_path, **GAN_ARGS))
    assert load_checkpoint(tmp_path / "last.pth")["epoch"] == 3
    monkeypatch.setattr(train_vqvae, "evaluate", real_evaluate)
    run_in_process(tiny_args(data, tmp_path, **GAN_ARGS))
    resumed, reference = history(tmp_path), history(gan_run)
    drop = {"seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == \
           [{k: v for k, v in r.items() if k not in drop} for r in reference]
    a, b = load_checkpoint(tmp_path / "last.pth"), load_checkpoint(gan_run / "last.pth")
    for part in ("model", "discriminator"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in b[part]), part


def test_perceptual_loss_without_local_weights_stops_right_after_parsing(data: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vqvae_losses.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"^error: --perceptual_weight=0\.1: the perceptual loss needs the 'lpips' "
                                         r"package, which is not installed: pip install lpips==0\.1\.4"):
        run_in_process(tiny_args(data, tmp_path / "run", perceptual_weight=0.1))
    # The package is there but its VGG16 backbone is not in torch's hub cache: nothing is downloaded.
    monkeypatch.setattr(vqvae_losses.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    missing = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    with pytest.raises(SystemExit, match=f"^error: --perceptual_weight=0\\.1: LPIPS's VGG16 backbone weights "
                                         f"{missing} are missing, and are not downloaded at run time"):
        run_in_process(tiny_args(data, tmp_path / "run", perceptual_weight=0.1))
    assert not (tmp_path / "run").exists()


def test_a_resume_with_another_learning_rate_is_refused(data: Path, reference_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    with pytest.raises(SystemExit, match=rf"^error: {out / 'last.pth'}: this run was started with other settings "
                                         r"\(lr: 0.002 -> 0.001\)"):
        run_in_process(tiny_args(data, out, lr=1e-3))
    with pytest.raises(SystemExit, match=rf"output folder {data} is the input {data}"):
        run_in_process(tiny_args(data, data))


CPU_PROCESS = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_counters_of_used_codes_reset_and_unused_ones_grow():
    codes = DeadCodes(vocab_size=5, after=3, device=torch.device("cpu"))
    # hits per (scale, code): a code counts as used when any scale picked it
    codes.update(torch.tensor([[2, 0, 0, 0, 0], [0, 1, 0, 0, 0]]))
    assert codes.since_hit.tolist() == [0, 0, 1, 1, 1]
    codes.update(torch.tensor([[0, 0, 0, 4, 0], [0, 0, 0, 0, 0]]))
    assert codes.since_hit.tolist() == [1, 1, 2, 0, 2]
    assert codes.dead().tolist() == []
    codes.update(torch.tensor([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]))
    assert codes.since_hit.tolist() == [0, 2, 3, 1, 3]
    assert codes.dead().tolist() == [2, 4]  # unused for exactly `after` steps: dead
    assert codes.dead().dtype == torch.int64 and codes.dead().dim() == 1


def residual_pool(model: VQVAE, feats: torch.Tensor) -> torch.Tensor:
    """Every residual vector the quantizer sees: the features at scale 0, then what the coarser scales left."""
    q = model.quantizer
    f_hats = q.f_to_fhats(feats)
    pool = []
    for k, pn in enumerate(q.scales):
        rest = feats if k == 0 else feats - f_hats[k - 1]
        pool.append(F.adaptive_avg_pool2d(rest, pn).permute(0, 2, 3, 1).reshape(-1, feats.shape[1]))
    return torch.cat(pool)


def tiny_setup(vocab: int = 12):
    torch.manual_seed(0)
    model = VQVAE(vocab_size=vocab, z_channels=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, scales=(1, 2, 3))
    weight = model.quantizer.embedding.weight
    optimizer = torch.optim.Adam([weight], lr=0.1)
    weight.sum().mul(0).add(weight.square().sum()).backward()
    optimizer.step()
    feats = torch.randn(3, 4, 3, 3, generator=torch.Generator().manual_seed(1)) * 2
    return model, optimizer, feats


def test_reinit_replaces_only_dead_rows_with_distinct_residuals_and_clears_their_moments():
    model, optimizer, feats = tiny_setup()
    weight = model.quantizer.embedding.weight
    before = weight.detach().clone()
    moments = {k: v.clone() for k, v in optimizer.state[weight].items() if torch.is_tensor(v) and v.dim() == 2}
    assert set(moments) == {"exp_avg", "exp_avg_sq"} and all(m.abs().min() > 0 for m in moments.values())
    codes = DeadCodes(vocab_size=12, after=1, device=torch.device("cpu"))
    codes.since_hit = torch.arange(12)
    dead = torch.tensor([2, 5, 9])
    pool = residual_pool(model, feats.float())
    codes.reinit(model, optimizer, feats, dead, CPU_PROCESS, seed=4, step=7, pool_images=3)

    alive = torch.tensor([i not in (2, 5, 9) for i in range(12)])
    assert torch.equal(weight[alive], before[alive])
    for row in weight[dead].detach():
        assert (row - pool).abs().amax(1).min() < 1e-5  # each new code is one of the residual vectors
    assert not torch.equal(weight[dead], before[dead])
    assert len({tuple(r) for r in weight[dead].detach().tolist()}) == 3  # drawn without replacement
    for name, old in moments.items():
        assert torch.equal(optimizer.state[weight][name][dead], torch.zeros(3, 4))
        assert torch.equal(optimizer.state[weight][name][alive], old[alive])
    assert codes.since_hit.tolist() == [0, 1, 0, 3, 4, 0, 6, 7, 8, 0, 10, 11]

    # the draw is fixed by (seed, step): same inputs, same codes; another step, other codes
    again, optimizer_again, _ = tiny_setup()
    DeadCodes(12, 1, torch.device("cpu")).reinit(again, optimizer_again, feats, dead, CPU_PROCESS, seed=4, step=7, pool_images=3)
    assert torch.equal(again.quantizer.embedding.weight[dead], weight[dead])
    other, optimizer_other, _ = tiny_setup()
    DeadCodes(12, 1, torch.device("cpu")).reinit(other, optimizer_other, feats, dead, CPU_PROCESS, seed=4, step=8, pool_images=3)
    assert not torch.equal(other.quantizer.embedding.weight[dead], weight[dead])


def test_reinit_draws_only_from_the_first_pool_images_and_repeats_when_the_pool_is_small():
    model, optimizer, feats = tiny_setup(vocab=40)
    weight = model.quantizer.embedding.weight
    first = residual_pool(model, feats[:1].float())  # 1 + 4 + 9 = 14 vectors
    dead = torch.arange(20)
    DeadCodes(40, 1, torch.device("cpu")).reinit(model, optimizer, feats, dead, CPU_PROCESS, seed=0, step=1, pool_images=1)
    rows = weight[dead].detach()
    assert all((row - first).abs().amax(1).min() < 1e-5 for row in rows)  # the other two images are not drawn from
    assert len({tuple(r) for r in rows.tolist()}) <= 14  # 20 codes from 14 vectors: some repeat


CPU = torch.device("cpu")


def refusal(tmp_path: Path, **overrides) -> str | None:
    """validate's message for a config with these constants (no KID by default), or None when it accepts them."""
    cfg = replace(train_vqvae.Config(out_dir=str(tmp_path / "run"), recon_kid=False), **overrides)
    return refusal_of(train_vqvae.validate, cfg)


def test_every_constant_is_refused_just_outside_its_range_and_accepted_at_its_edge(tmp_path):
    # name -> (values accepted at the edges, (refused value, the range its message names))
    table = {
        **{name: ([1], (0, ">= 1")) for name in ("z_channels", "num_res_blocks", "disc_layers", "epochs", "batch_size",
                                                 "dead_code_every", "dead_code_pool", "num_recon", "plot_every",
                                                 "eval_batch_size")},
        "vocab_size": ([2, 2**15], (2**15 + 1, "in [2, 32768]")),
        "seed": ([0, 2**32 - 1], (2**32, "in [0, 4294967295]")),
        **{name: ([0], (-1, ">= 0")) for name in ("disc_start", "phi_share", "warmup_steps", "dead_code_steps",
                                                  "num_workers", "cpu_threads")},
        **{name: ([0.0], (-0.5, ">= 0")) for name in ("beta", "perceptual_weight", "prefix_weight", "disc_weight",
                                                      "disc_lr", "lr",
                                                      "weight_decay", "grad_clip")},
        **{name: ([0.0, 0.999], (1.0, "in [0, 1)")) for name in ("dropout", "adam_beta1", "adam_beta2")},
        **{name: ([0.0, 1.0], (1.5, "in [0, 1]")) for name in ("phi_ratio", "final_lr_ratio")},
        "in_channels": ([1, 3], (2, "one of 1, 3")),
        "loss_reduction": (["mean", "sum"], ("none", "one of mean, sum")),
        "ch": ([32, 64], (48, "a positive multiple of 32 (GroupNorm with 32 groups)")),
        "disc_ch": ([16, 32], (24, "a positive multiple of 16 (GroupNorm with 32 groups)")),
        "precision": (["auto", "bf16", "fp16", "fp32"], ("fp8", "one of auto, bf16, fp16, fp32")),
        "device": (["auto", "cpu"], ("tpu", "auto, cpu, or a cuda / mps device this machine has")),
    }
    assert_edges(lambda **constant: refusal(tmp_path, **constant), table)
    for name in ("dropout", "phi_ratio", "final_lr_ratio"):  # the low edge too
        assert refusal(tmp_path, **{name: -0.1}).startswith(f"--{name}=-0.1: must be in [0, 1"), name
    assert refusal(tmp_path, ch=0) == "--ch=0: must be a positive multiple of 32 (GroupNorm with 32 groups)"
    assert refusal(tmp_path, disc_ch=0).startswith("--disc_ch=0: must be a positive multiple of 16")


def test_prefix_lengths_cover_1_to_k_minus_1_and_depend_on_seed_step_and_process_only():
    draw = train_vqvae.prefix_lengths(4000, 6, seed=0, step=7, rank=0, device=torch.device("cpu"))
    assert sorted(draw.unique().tolist()) == [1, 2, 3, 4, 5]  # never the whole set of scales: that is the recon
    assert torch.equal(draw, train_vqvae.prefix_lengths(4000, 6, seed=0, step=7, rank=0, device=torch.device("cpu")))
    for other in (dict(seed=1, step=7, rank=0), dict(seed=0, step=8, rank=0), dict(seed=0, step=7, rank=1)):
        assert not torch.equal(draw, train_vqvae.prefix_lengths(4000, 6, device=torch.device("cpu"), **other)), other


def test_scales_and_ch_mult_lists_and_the_image_side_they_fix(tmp_path):
    scales_rule = "must be a non-empty, strictly increasing list of sides >= 1"
    for bad in ((), (0, 2), (2, 2), (1, 3, 2)):
        assert refusal(tmp_path, scales=bad) == f"--scales={bad!r}: {scales_rule}", bad
    assert refusal(tmp_path, scales=(1,), image_size=16) is None
    assert refusal(tmp_path, scales=(2, 3), image_size=48) is None
    for bad in ((), (1, 0)):
        assert refusal(tmp_path, ch_mult=bad) == f"--ch_mult={bad!r}: must be a non-empty list of values >= 1", bad
    assert refusal(tmp_path, ch_mult=(1,), image_size=16) is None  # no downsampling: the side of the finest map
    assert refusal(tmp_path, image_size=0) == "--image_size=0: must be >= 1"
    assert refusal(tmp_path, image_size=128) == ("--image_size=128: must equal scales[-1] x 2^(len(ch_mult)-1) = "
                                                 "16 x 16 = 256")
    assert refusal(tmp_path, scales=(1, 2, 4), ch_mult=(1, 2, 2), image_size=16) is None


def test_perceptual_and_kid_inputs_are_checked_only_when_used(tmp_path, monkeypatch):
    monkeypatch.setattr(train_vqvae, "lpips_problem", lambda: "no lpips here")
    assert refusal(tmp_path, perceptual_weight=0.5) == "--perceptual_weight=0.5: no lpips here"
    assert refusal(tmp_path, perceptual_weight=0.0) is None
    monkeypatch.setattr(train_vqvae, "lpips_problem", lambda: None)
    assert refusal(tmp_path, perceptual_weight=0.5) is None
    missing = tmp_path / "inception.pth"
    assert refusal(tmp_path, recon_kid=True, inception_weights=str(missing)) == (
        f"--inception_weights={missing}: file does not exist (it is read for the reconstruction KID; --recon_kid=false "
        "skips that)")
    assert refusal(tmp_path, recon_kid=False, inception_weights=str(missing)) is None
    missing.write_bytes(b"weights")
    assert refusal(tmp_path, recon_kid=True, inception_weights=str(missing)) is None

    def no_package():
        raise FidelityError("the packaged weights are missing")

    monkeypatch.setattr(train_vqvae, "packaged_weights_path", no_package)
    assert refusal(tmp_path, recon_kid=True) == "--recon_kid: the packaged weights are missing; or --recon_kid=false"
    assert refusal(tmp_path, recon_kid=True, inception_weights=str(missing)) is None
    monkeypatch.setattr(train_vqvae, "packaged_weights_path", lambda: tmp_path)
    assert refusal(tmp_path, recon_kid=True) is None


def test_out_dir_that_is_a_file_is_refused_by_name(tmp_path):
    (tmp_path / "run").write_text("a file")
    assert refusal(tmp_path) == f"--out_dir: {tmp_path / 'run'} exists and is not a folder"


def test_lpips_problem_names_the_missing_package_or_backbone(tmp_path, monkeypatch):
    monkeypatch.setattr(vqvae_losses, "LPIPS_PACKAGE", "no_such_package_here")
    assert train_vqvae.lpips_problem() == (
        "the perceptual loss needs the 'no_such_package_here' package, which is not installed: pip install "
        "lpips==0.1.4 (its LPIPS layers come with it; VGG16 weights, see below, too)")
    monkeypatch.setattr(vqvae_losses, "LPIPS_PACKAGE", "json")  # a package that is there
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    backbone = tmp_path / "checkpoints" / vqvae_losses.LPIPS_BACKBONE_FILE
    assert train_vqvae.lpips_problem() == (
        f"LPIPS's VGG16 backbone weights {backbone} are missing, and are not downloaded at run time; on a machine "
        "with network run python -c \"import torchvision; torchvision.models.vgg16(weights='IMAGENET1K_V1')\" and "
        f"copy ~/.cache/torch/hub/checkpoints/vgg16-397923af.pth to {backbone}")
    backbone.parent.mkdir()
    backbone.write_bytes(b"")
    assert train_vqvae.lpips_problem() is None


def test_reconstruction_and_vq_terms_under_each_reduction_by_hand():
    assert train_vqvae.reduction_scale("sum", 12) == 12.0 and train_vqvae.reduction_scale("mean", 12) == 1.0
    img = torch.zeros(2, 3, 2, 2)
    rec = torch.zeros(2, 3, 2, 2, dtype=torch.float16, requires_grad=True)
    with torch.no_grad():
        rec[0, 0, 0, 0], rec[1, 2, 1, 1] = 2.0, 1.0  # squared errors 4 and 1: sums per image 4 and 1
    assert train_vqvae.recon_loss(rec, img, "sum").item() == pytest.approx(2.5)  # mean of the per-image sums
    assert train_vqvae.recon_loss(rec, img, "mean").item() == pytest.approx(5 / 24)
    assert train_vqvae.recon_loss(rec, img, "mean").dtype == torch.float32
    assert train_vqvae.recon_loss(rec[1:], img[1:], "sum").item() == pytest.approx(1.0)  # a batch of one image

    calls = []

    def fake_lpips(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (B, 1, 1, 1), as LPIPS returns
        calls.append((a.dtype, a is img, b is img))
        return (a.sum((1, 2, 3)) + 10 * b.sum((1, 2, 3)) + torch.tensor([1.0, 3.0]))[:, None, None, None]

    output = VQOutput(rec=rec, vq_loss=torch.tensor(0.5, dtype=torch.float16), code_hits=torch.zeros(1, 4))
    r, vq, perceptual = train_vqvae.loss_terms(output, img, "sum", fake_lpips, 0.3, 40)
    assert (r.item(), vq.item()) == (pytest.approx(2.5), pytest.approx(20.0)) and vq.dtype == torch.float32
    assert perceptual.item() == pytest.approx(0.3 * (3.0 + 4.0) / 2 * 12)  # LPIPS of (rec, img), mean, x 3*H*W
    assert calls == [(torch.float32, False, True)]
    r, vq, perceptual = train_vqvae.loss_terms(output, img, "mean", fake_lpips, 0.3, 40)
    assert (r.item(), vq.item(), perceptual.item()) == (pytest.approx(5 / 24), 0.5, pytest.approx(0.3 * 3.5))
    perceptual.backward()
    assert rec.grad is not None and rec.grad.abs().sum() > 0  # the perceptual term trains the decoder
    one = VQOutput(rec=rec[1:], vq_loss=output.vq_loss, code_hits=output.code_hits)  # a batch of one image
    ones = lambda a, b: torch.ones(len(a), 1, 1, 1)
    assert train_vqvae.loss_terms(one, img[1:], "sum", ones, 0.3, 40)[2].item() == pytest.approx(0.3 * 12)
    for net, weight in ((fake_lpips, 0.0), (None, 0.3)):
        assert train_vqvae.loss_terms(output, img, "sum", net, weight, 40)[2].item() == 0.0
    assert len(calls) == 2


def test_the_discriminator_sees_grey_for_a_grey_model():
    img = torch.arange(24.0).view(2, 3, 2, 2)
    assert torch.equal(train_vqvae.discriminator_input(img, 1), img.mean(1, keepdim=True))
    assert train_vqvae.discriminator_input(img, 3) is img


class Shard(DistContext):
    """One of `world_size` processes without a process group: sums come back as this process's own."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer_clamped():
    last = torch.nn.Parameter(torch.ones(2))
    other = torch.nn.Parameter(torch.ones(1))
    one = Shard(0, 1, 0, CPU)
    # d rec / d last = (3, 4), d gan / d last = (0.6, 0.8) (+ a term in another parameter that must not count)
    rec = (last * torch.tensor([3.0, 4.0])).sum()
    gan = (last * torch.tensor([0.6, 0.8])).sum() + 100 * other.sum()
    weight = train_vqvae.adaptive_weight(rec, gan, last, one)
    assert weight.item() == pytest.approx(5 / (1 + 1e-4)) and not weight.requires_grad
    assert rec.grad_fn is not None and last.grad is None  # the losses' graphs stay usable; nothing accumulated
    small = train_vqvae.adaptive_weight(gan, rec, last, one)  # below 1: no lower clamp at 1
    assert small.item() == pytest.approx(1 / (5 + 1e-4))
    # Two processes with these gradients each: the averaged gradients, not their sums, give the ratio.
    two = train_vqvae.adaptive_weight(rec, gan, last, Shard(0, 2, 0, CPU))
    assert two.item() == pytest.approx(2.5 / (0.5 + 1e-4))
    flat = (last * 0).sum() + (other * 0).sum()  # no adversarial gradient at the layer: 5 / 1e-4, clamped
    assert train_vqvae.adaptive_weight(rec, flat, last, one).item() == vqvae_losses.ADAPTIVE_WEIGHT_MAX == 1e4


def small_config(**overrides) -> train_vqvae.Config:
    values = dict(vocab_size=24, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, dropout=0.1, beta=0.4,
                  phi_ratio=0.3, phi_share=2, scales=(1, 2, 4), in_channels=3, image_size=8)
    return train_vqvae.Config(**{**values, **overrides})


def test_a_fresh_model_takes_every_architecture_constant():
    model = train_vqvae.build_model(small_config())
    assert model.config == dict(vocab_size=24, z_channels=4, ch=32, ch_mult=[1, 2], num_res_blocks=1, dropout=0.1,
                                beta=0.4, using_znorm=False, phi_ratio=0.3, phi_share=2, scales=[1, 2, 4],
                                in_channels=3)
    grey = train_vqvae.build_model(small_config(in_channels=1))  # not VQVAE's default of 3
    assert grey.config["in_channels"] == 1 and grey.encoder.conv_in.in_channels == 1


def test_starting_from_the_reference_passes_the_quantizer_settings_and_refuses_another_architecture(monkeypatch):
    calls = []

    def fake(path, **overrides):
        calls.append((path, overrides))
        return VQVAE(vocab_size=24, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, phi_share=2,
                     scales=overrides["scales"], in_channels=3).eval()

    monkeypatch.setattr(models.convert_upstream, "vqvae_from_upstream", fake)
    model = train_vqvae.build_model(small_config(init_from_upstream="ref.pth"))
    assert calls == [("ref.pth", dict(scales=[1, 2, 4], beta=0.4, phi_ratio=0.3, dropout=0.1))]
    assert model.training
    with pytest.raises(ValueError) as err:
        train_vqvae.build_model(small_config(init_from_upstream="ref.pth", ch=64, ch_mult=(1, 1), in_channels=1))
    assert str(err.value) == ("ref.pth: its architecture differs from this config (ch: 32 vs 64, ch_mult: [1, 2] vs "
                              "[1, 1], in_channels: 3 vs 1); run with --ch=32 --ch_mult=1,2 --in_channels=3")
    with pytest.raises(ValueError) as err:
        train_vqvae.build_model(small_config(init_from_upstream="ref.pth", vocab_size=32, z_channels=8,
                                             num_res_blocks=2, phi_share=0))
    assert str(err.value) == ("ref.pth: its architecture differs from this config (vocab_size: 24 vs 32, z_channels: 4 "
                              "vs 8, num_res_blocks: 1 vs 2, phi_share: 2 vs 0); run with --vocab_size=24 "
                              "--z_channels=4 --num_res_blocks=1 --phi_share=2")


def test_usage_and_perplexity_per_scale():
    hits = torch.tensor([[3, 1, 0, 0], [2, 2, 2, 2], [0, 0, 0, 0]])
    usage, perplexity = train_vqvae.usage_stats(hits)
    assert usage == [0.5, 1.0, 0.0]
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert perplexity == pytest.approx([math.exp(entropy), 4.0, 1.0])  # an unused scale: 1, not a division by 0
    assert train_vqvae.usage_stats(torch.tensor([[0, 1, 0, 0]])) == ([0.25], [1.0])  # one hit: one code, certain


def test_grid_images_take_every_class_s_first_image_then_the_second():
    labels = np.array([0, 0, 1, 2, 1, 0])
    assert train_vqvae.spread_over_classes(labels, 4) == [0, 2, 3, 1]
    assert train_vqvae.spread_over_classes(labels, 10) == [0, 2, 3, 1, 4, 5]
    assert train_vqvae.spread_over_classes(np.array([2, 1, 2]), 3) == [1, 0, 2]  # by class within a rank


def test_images_without_a_found_scan_area_are_scored_whole_and_counted(monkeypatch):
    found = np.zeros((4, 4), bool)
    found[1:3, 1:3] = True
    monkeypatch.setattr(train_vqvae, "scan_area_mask", lambda path, size: found if (path, size) == ("a.png", 4) else None)
    bars = []

    def progress(items, **kwargs):
        bars.append(kwargs)
        return items

    monkeypatch.setattr(train_vqvae, "progress", progress)
    split = SimpleNamespace(paths=["b.png", "a.png", "c.png", "d.png"], image_size=4, split="val")
    masks, fallback = train_vqvae.scan_area_masks(split, Shard(0, 1, 0, CPU))
    assert fallback == 3 and masks.shape == (4, 4, 4) and masks.dtype == bool
    assert np.array_equal(masks[1], found) and masks[0].all() and masks[2].all() and masks[3].all()
    train_vqvae.scan_area_masks(split, Shard(1, 2, 1, CPU))
    assert bars == [dict(desc="scan areas val", leave=False, disable=False),  # a bar on the main process only
                    dict(desc="scan areas val", leave=False, disable=True)]


def test_the_test_split_counts_as_scored_only_with_every_output_from_this_checkpoint(tmp_path):
    made_from = {"checkpoint_sha256": "abc", "test_images": "def"}
    assert not train_vqvae.scored_already(tmp_path, made_from)
    (tmp_path / "test_metrics.json").write_text(json.dumps({"psnr": 30.0, "made_from": made_from}))
    (tmp_path / "recon_test.png").write_bytes(b"")
    assert not train_vqvae.scored_already(tmp_path, made_from)  # the histogram is missing
    (tmp_path / "code_usage_hist_test.png").write_bytes(b"")
    assert train_vqvae.scored_already(tmp_path, made_from)
    assert not train_vqvae.scored_already(tmp_path, {**made_from, "test_images": "other"})
    (tmp_path / "recon_test.png").unlink()
    assert not train_vqvae.scored_already(tmp_path, made_from)
    (tmp_path / "recon_test.png").write_bytes(b"")
    for broken in ("{not json", "[1, 2]"):  # a damaged file means not scored, never a traceback
        (tmp_path / "test_metrics.json").write_text(broken)
        assert not train_vqvae.scored_already(tmp_path, made_from)


def test_dead_after_exactly_the_given_steps():
    codes = train_vqvae.DeadCodes(vocab_size=3, after=2, device=CPU)
    assert codes.since_hit.dtype == torch.int64 and codes.since_hit.tolist() == [0, 0, 0]
    codes.update(torch.tensor([[0, 1, 0]]))
    assert codes.dead().tolist() == []
    codes.update(torch.tensor([[0, 0, 1]]))
    assert codes.dead().tolist() == [0]


def tiny_vqvae() -> VQVAE:
    torch.manual_seed(2)
    return VQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, scales=(1, 2, 4, 8),
                 in_channels=1, dropout=0.5)  # dropout: a score in train mode would differ


def test_evaluate_sums_per_image_terms_of_this_process_s_share_over_the_whole_split():
    from common.runtime import select_precision
    from common.sample_metrics import masked_psnr_ssim, psnr_ssim
    from common.image_data import to_grey_uint8

    model, gen = tiny_vqvae(), torch.Generator().manual_seed(0)
    dataset = [(torch.rand(3, 16, 16, generator=gen) * 2 - 1, 0) for _ in range(5)]
    masks = torch.rand(5, 16, 16, generator=gen).numpy() > 0.3
    cfg = train_vqvae.Config(loss_reduction="sum", eval_batch_size=2, num_workers=0)
    fp32 = select_precision(CPU, "fp32")

    def by_hand(rows: list[int]) -> dict:
        model.eval()
        sums, hits = np.zeros(7), torch.zeros(4, 16, dtype=torch.int64)
        with torch.no_grad():
            for i in rows:
                img = dataset[i][0][None]
                out = model(img)
                rec = (out.rec - img).square().sum().item()  # sum: the per-image sum of squares
                vq = out.vq_loss.item() * 4 * 8 * 8  # x z*h*w
                a, b = to_grey_uint8(img)[0], to_grey_uint8(out.rec)[0]
                sums += [rec + vq, rec, vq, *psnr_ssim(a, b), *masked_psnr_ssim(a, b, masks[i])]
                hits += out.code_hits
        return dict(zip(["loss", "rec_loss", "vq_loss", "psnr", "ssim", "psnr_scan", "ssim_scan"], sums / 5), hits=hits)

    for dist, rows in ((Shard(0, 1, 0, CPU), [0, 1, 2, 3, 4]), (Shard(1, 2, 1, CPU), [1, 3])):
        model.train()
        got = train_vqvae.evaluate(model, dataset, masks, cfg, dist, fp32, "val")
        expected = by_hand(rows)
        for key in ("loss", "rec_loss", "vq_loss", "psnr", "ssim", "psnr_scan", "ssim_scan"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5), (rows, key)
        assert torch.equal(got["hits"], expected["hits"])
        assert (got["usage"], got["perplexity"]) == train_vqvae.usage_stats(expected["hits"])


class MeanNet:
    """A stand-in feature network: per-image channel means of uint8 RGB."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        return images.float().mean((2, 3))


class ListSplit(list):
    """A stand-in ImageSplit: (image, label) items of one class, each image its own subject (no manifest)."""

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self]

    def relative_path(self, i: int) -> str:
        return f"test/a/img{i}.png"


def test_reconstruction_kid_compares_reconstructions_of_one_half_with_the_real_images_of_the_other(monkeypatch,
                                                                                                    tmp_path):
    from common.image_data import halves, subject_ids, to_rgb_uint8
    from common.runtime import select_precision

    model, gen = tiny_vqvae(), torch.Generator().manual_seed(1)
    dataset = ListSplit((torch.rand(3, 16, 16, generator=gen) * 2 - 1, 0) for _ in range(8))
    monkeypatch.setattr(train_vqvae, "load_feature_extractor", lambda weights, device: MeanNet() if weights == "w" else None)
    seen = {}

    def fake_kid(fake, real, max_subset_size, seed):
        seen.update(fake=fake, real=real, subset=max_subset_size, seed=seed)
        return {"mean": 0.5}

    monkeypatch.setattr(train_vqvae, "kid_from_features", fake_kid)
    cfg = train_vqvae.Config(data_dir=str(tmp_path), inception_weights="w", eval_batch_size=2, num_workers=0, seed=6)
    assert train_vqvae.reconstruction_kid(model, dataset, cfg, CPU, select_precision(CPU, "fp32")) == {"mean": 0.5}
    assert not model.training and (seen["subset"], seen["seed"]) == (2, 6)  # halves of 4: subsets of 2
    first, second = halves(np.zeros(8, int), subject_ids(tmp_path, [dataset.relative_path(i) for i in range(8)]), 6)
    assert first.sum() == second.sum() == 4
    images = torch.stack([img for img, _ in dataset])
    with torch.no_grad():
        recon = model(images).rec
    real = torch.from_numpy(to_rgb_uint8(images)).permute(0, 3, 1, 2).float().mean((2, 3))[torch.from_numpy(second)]
    fake = torch.from_numpy(to_rgb_uint8(recon)).permute(0, 3, 1, 2).float().mean((2, 3))[torch.from_numpy(first)]
    torch.testing.assert_close(seen["real"], real)
    torch.testing.assert_close(seen["fake"], fake, atol=1.0, rtol=0)  # batched vs whole: a rounding step apart
    assert not torch.allclose(seen["fake"], seen["real"], atol=1.0, rtol=0)


def expected_codes(model: VQVAE, feats: torch.Tensor, n_dead: int, seed: int, step: int) -> torch.Tensor:
    """The residuals a re-initialisation gives n_dead codes: a draw seeded by (seed, step) from the pool, without
    replacement while the pool is large enough, with it otherwise."""
    pool = residual_pool(model, feats.float())
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    pick = torch.randperm(len(pool), generator=gen)[:n_dead] if len(pool) >= n_dead else torch.randint(
        len(pool), (n_dead,), generator=gen)
    return pool[pick]


@pytest.mark.parametrize("vocab, n_dead", [(50, 42), (50, 43)])  # the pool of 3 images holds 3 x (1 + 4 + 9) = 42
def test_reinit_gives_dead_row_i_the_i_th_residual_of_the_seeded_draw(vocab: int, n_dead: int) -> None:
    model, optimizer, feats = tiny_setup(vocab)
    weight = model.quantizer.embedding.weight
    dead = torch.arange(vocab - n_dead, vocab).flip(0)  # in descending order: row dead[i] gets draw i
    expected = expected_codes(model, feats, n_dead, seed=3, step=11)  # before: the residuals depend on the codebook
    DeadCodes(vocab, 1, CPU).reinit(model, optimizer, feats, dead, CPU_PROCESS, seed=3, step=11, pool_images=3)
    assert torch.allclose(weight[dead], expected, atol=1e-5)


def test_reinit_leaves_optimizer_state_of_other_shapes_and_other_parameters_alone() -> None:
    model, optimizer, feats = tiny_setup()
    weight = model.quantizer.embedding.weight
    state = optimizer.state[weight]
    state["step"] = torch.tensor(5.0)  # Adam's step count: a scalar, not a per-row moment
    state["per_row"] = torch.ones(12)  # a state of another shape than the codebook's is not a moment either
    other = torch.nn.Parameter(torch.ones(12, 4))
    optimizer.state[other] = {"exp_avg": torch.ones(12, 4)}
    DeadCodes(12, 1, CPU).reinit(model, optimizer, feats, torch.tensor([0, 3]), CPU_PROCESS, seed=0, step=1,
                                 pool_images=3)
    assert state["step"].item() == 5.0 and torch.equal(optimizer.state[other]["exp_avg"], torch.ones(12, 4))
    assert torch.equal(state["per_row"], torch.ones(12))
    assert state["exp_avg"][[0, 3]].abs().sum() == 0 and state["exp_avg"][[1, 2]].abs().min() > 0


@pytest.mark.parametrize("rank", [0, 1])
def test_reinit_across_processes_draws_on_rank_0_from_the_gathered_batch_and_broadcasts(monkeypatch,
                                                                                       rank: int) -> None:
    model, optimizer, feats = tiny_setup(vocab=12)  # this process's 3 images
    theirs = feats.flip(0) + 1  # the other process's 3 images
    calls = []

    def all_gather(parts, tensor):
        calls.append("all_gather")
        for part, t in zip(parts, (feats, theirs) if rank == 0 else (theirs, feats)):
            part.copy_(t)

    rank_0_codes = torch.full((2, 4), 7.0)

    def broadcast(tensor, src):
        calls.append(("broadcast", src))
        if rank == 0:
            rank_0_codes.copy_(tensor)  # what rank 0 sends
        else:
            tensor.copy_(rank_0_codes)

    monkeypatch.setattr(train_vqvae.torch_dist, "all_gather", all_gather)
    monkeypatch.setattr(train_vqvae.torch_dist, "broadcast", broadcast)
    if rank == 1:  # only rank 0 draws
        monkeypatch.setattr(model.quantizer, "f_to_fhats", lambda _: pytest.fail("rank 1 drew codes"))
    dist = DistContext(rank=rank, world_size=2, local_rank=rank, device=CPU)
    dead = torch.tensor([4, 1])
    # the pool: rank 0's 3 images, then the first of rank 1's
    expected = expected_codes(model, torch.cat([feats, theirs])[:4], 2, seed=2, step=5) if rank == 0 else None
    DeadCodes(12, 1, CPU).reinit(model, optimizer, feats, dead, dist, seed=2, step=5, pool_images=4)
    assert calls == ["all_gather", ("broadcast", 0)]
    weight = model.quantizer.embedding.weight
    assert torch.equal(weight[dead], rank_0_codes)
    if rank == 0:
        assert torch.allclose(rank_0_codes, expected, atol=1e-5)


def test_an_epoch_record_takes_every_reported_term_in_the_order_of_the_history() -> None:
    """The step's terms by name go into the history unchanged: the three of every run first, the others after the
    timing in the order the step reported them, gan_steps before the adversarial terms; a new term is one more
    name the step reports."""
    alone = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    run = SimpleNamespace(dist=alone, model=torch.nn.Linear(1, 1), step=4)
    sums = EpochSums()
    def scalar(value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.float64)

    for step in range(4):
        terms = dict(train_loss=scalar(4.0), train_rec_loss=scalar(2.0), train_vq_loss=scalar(1.0),
                     train_perceptual_loss=scalar(0.5), train_prefix_loss=scalar(0.25), train_new_loss=scalar(step))
        if step >= 1:
            terms.update(train_gan_loss=scalar(-1.0), train_disc_loss=scalar(1.5), gan_weight=scalar(0.1))
        sums.add(**terms)
    val = dict(loss=3.0, rec_loss=2.0, vq_loss=1.0, psnr=20.0, ssim=0.5, psnr_scan=19.0, ssim_scan=0.4,
               usage=[1.0], perplexity=[2.0])
    record = train_vqvae.epoch_record(run, 0, sums, torch.ones(1, 3, dtype=torch.int64), 2, 1e-3, val, time.time())
    assert list(record) == [
        "epoch", "step", "lr", "train_loss", "train_rec_loss", "train_vq_loss", "val_loss", "val_rec_loss",
        "val_vq_loss", "val_psnr", "val_ssim", "val_psnr_scan", "val_ssim_scan", "val_usage", "val_perplexity",
        "train_usage", "dead_codes_reinit", "seconds", "train_perceptual_loss", "train_prefix_loss", "train_new_loss",
        "gan_steps", "train_gan_loss", "train_disc_loss", "gan_weight"]
    assert (record["train_loss"], record["train_new_loss"], record["gan_steps"], record["gan_weight"]) == (
        4.0, 1.5, 3, pytest.approx(0.1))
    sums.add(train_loss=scalar(float("nan")))
    with pytest.raises(train_vqvae.NonFiniteLossError, match="epoch 1: non-finite train loss nan"):
        train_vqvae.epoch_record(run, 0, sums, torch.ones(1, 3, dtype=torch.int64), 2, 1e-3, val, time.time())
