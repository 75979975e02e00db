"""train_vqvae.py end to end on a tiny model: outputs and plots, resume after SIGKILL, clear errors for bad
checkpoints and non-finite losses, a two-process torchrun run matching one process with the same global batch, the
loss reductions, the delayed discriminator and its exact resume, and the refusal of LPIPS without local weights."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace


import numpy as np
import pytest
import torch
from PIL import Image

import train_vqvae
from common.checkpoint import load_checkpoint
from common.distributed import DistContext
from common.runtime import select_precision
from common.training import EpochSums
from models import vqvae_losses
from models.vqvae import load_vqvae

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
