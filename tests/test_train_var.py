"""train_var.py on tiny tokens made here: a random 8x8-pixel VQ-VAE with scales 1,2,3,4 tokenizes random images,
and a 2-block VAR trains on them in seconds.

train_var.py's rule functions at non-default settings: every constant's allowed range at its edges, the exact
losses and per-scale sums, the seeded streams of class dropout and token copies, the model a config builds, the
fine-tuning class rows, the KID probe's refusals and bookkeeping, and the wording of each refusal (issue 16)."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_var
from common.checkpoint import CheckpointError, load_checkpoint
from common.distributed import DistContext
from common.fidelity import FidelityError
from common.io import atomic_torch_save, file_sha256
from common.plotting import save_image
from common.tokens import TokenFileError, TokenSet, load_tokens, save_tokens
from common.training import NonFiniteLossError
from config_refusal import assert_edges, refusal_of
from models.var import VAR, SamplingSettings, load_var
from models.vqvae import VQVAE
from reference_keys import renamed

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["breast", "heart", "liver"]
TINY = dict(depth=2, embed_dim=32, num_heads=2, batch_size=8, lr=2e-3, warmup_epochs=1.0, samples_per_class=2,
            eval_batch_size=16, sample_every=0, plot_every=0, kid_every=0)


def make_vqvae(path: Path, seed: int) -> VQVAE:
    torch.manual_seed(seed)
    vqvae = VQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1, scales=(1, 2, 3, 4))
    atomic_torch_save({"model": vqvae.state_dict(), "model_config": vqvae.config}, path)
    return vqvae.eval()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """vqvae.pth, another_vqvae.pth and tokens/tokens_multiscale_maps.npz (32 train + 16 val images, 3 classes)."""
    root = tmp_path_factory.mktemp("var_data")
    vqvae = make_vqvae(root / "vqvae.pth", seed=0)
    make_vqvae(root / "another_vqvae.pth", seed=1)
    n = 48
    labels = np.arange(n) % len(CLASSES)
    # Class-dependent brightness gives the coarse scales something to learn.
    images = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.6 - 0.9
    images += torch.from_numpy(labels).float()[:, None, None, None] * 0.6
    maps = [m.numpy() for m in vqvae.img_to_idx(images)]
    npz = root / "tokens" / "tokens_multiscale_maps.npz"
    npz.parent.mkdir()
    save_tokens(npz, scales=list(vqvae.scales), maps=maps, labels=labels,
                split=np.array(["train"] * 32 + ["val"] * 16), source=np.array([f"img{i}.png" for i in range(n)]),
                vqvae_sha256=file_sha256(root / "vqvae.pth"), vqvae_config=vqvae.config, classes=CLASSES)
    # The same tokens with 3 augmented copies of each training image. Copy c of image i is marked in its first two
    # tokens (scale 1: the copy, scale 2's first token: the image), so a test can read which copy a batch used.
    copies = np.stack([np.concatenate([m.reshape(n, -1) for m in maps], axis=1)] * 4, axis=1)[:32]  # (32, 4, L)
    copies[:, :, 0] = np.arange(4)
    copies[:, :, 1] = np.arange(32)[:, None]
    aug = root / "tokens_aug" / "tokens_multiscale_maps.npz"
    aug.parent.mkdir()
    idx = np.concatenate([m.reshape(n, -1) for m in maps], axis=1)
    idx[:32] = copies[:, 0]
    offsets = np.cumsum([0, 1, 4, 9, 16])
    bounds = list(zip(offsets, offsets[1:], (1, 2, 3, 4)))
    save_tokens(aug, scales=list(vqvae.scales), maps=[idx[:, a:b].reshape(n, pn, pn) for a, b, pn in bounds],
                labels=labels, split=np.array(["train"] * 32 + ["val"] * 16),
                source=np.array([f"img{i}.png" for i in range(n)]), vqvae_sha256=file_sha256(root / "vqvae.pth"),
                vqvae_config=vqvae.config, classes=CLASSES, aug_rows=np.arange(32),
                aug_maps=[copies[:, 1:, a:b].reshape(32, 3, pn, pn) for a, b, pn in bounds])
    return {"root": root, "vqvae": root / "vqvae.pth", "other": root / "another_vqvae.pth", "tokens": npz, "aug": aug}


def config(data: dict[str, Path], out: Path, **overrides) -> train_var.Config:
    values = {"tokens": str(data["tokens"]), "vqvae": str(data["vqvae"]), "out_dir": str(out), **TINY, **overrides}
    return train_var.Config(**values)


def cli(data: dict[str, Path], out: Path, **overrides) -> list[str]:
    values = {"tokens": data["tokens"], "vqvae": data["vqvae"], "out_dir": out, **TINY, **overrides}
    return [f"--{k}={v}" for k, v in values.items()]


SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def run_script(args: list[str], nproc: int = 1, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        cmd = [sys.executable]
    return subprocess.Popen(cmd + ["train_var.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def finish(proc: subprocess.Popen, timeout: float = 60) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def test_token_losses_per_scale_match_cross_entropy():
    scales, vocab = (1, 2), 7
    logits = torch.randn(3, 5, vocab)
    target = torch.randint(0, vocab, (3, 5))
    logits[:, 0].scatter_(1, target[:, :1], 100.0)  # the 1x1 scale is always right
    ids = train_var.scale_of_position(scales, torch.device("cpu"))
    loss, sums = train_var.token_losses(logits, target, ids, len(scales), 0.0)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.transpose(1, 2), target).item(), rel=1e-5)
    m = train_var.summarise(sums)
    assert m["acc_scales"][0] == 1.0 and sums[2].tolist() == [3, 12]
    expected_fine = F.cross_entropy(logits[:, 1:].transpose(1, 2), target[:, 1:]).item()
    assert m["loss_scales"][1] == pytest.approx(expected_fine, rel=1e-5) and m["loss_last"] == m["loss_scales"][1]
    smooth, smooth_sums = train_var.token_losses(logits, target, ids, len(scales), 0.1)
    ref = F.cross_entropy(logits.transpose(1, 2), target, label_smoothing=0.1).item()
    assert smooth.item() == pytest.approx(ref, rel=1e-5)
    assert torch.equal(smooth_sums, sums)  # metrics stay plain cross-entropy


def test_class_drop_masks_drop_the_rate_and_depend_only_on_seed_and_step():
    masks = train_var.class_drop_masks(range(5, 9), 20_000, seed=3, rate=0.1)
    assert masks.shape == (4, 20_000) and masks.dtype == torch.bool
    assert abs(masks.float().mean().item() - 0.1) < 0.005  # the rate dropped, not 1 - rate
    # A step's mask is the same whichever epoch window it is drawn in, and differs between steps and seeds.
    assert torch.equal(train_var.class_drop_masks(range(7, 8), 20_000, seed=3, rate=0.1)[0], masks[2])
    assert not torch.equal(masks[0], masks[1])
    assert not torch.equal(train_var.class_drop_masks(range(5, 6), 20_000, seed=4, rate=0.1)[0], masks[0])
    assert not train_var.class_drop_masks(range(3), 64, seed=3, rate=0.0).any()


def test_grad_accum_from_memory_takes_the_fewest_micro_batches_that_fit():
    # 32 samples per process, 10 GiB fixed + 1 GiB per sample, 20 GiB budget: micro-batches of 8 (32 / 4) fit.
    gib = 2**30
    assert train_var.choose_grad_accum(32, 10 * gib, gib, 20 * gib) == 4
    assert train_var.choose_grad_accum(32, 10 * gib, gib, 42 * gib) == 1  # the whole batch fits
    assert train_var.choose_grad_accum(24, 10 * gib, gib, 17.9 * gib) == 4  # divisors only: 24/3 = 8 > 7.9, 24/4 = 6
    with pytest.raises(train_var.TrainVarError, match="one sample needs 11.0 GiB, over the 10.5 GiB"):
        train_var.choose_grad_accum(32, 10 * gib, gib, 10.5 * gib)


def test_grad_accum_budget_is_the_memory_this_process_can_have_less_headroom(monkeypatch):
    # 80 GiB card, 30 GiB free, 10 GiB held by torch: the CUDA context and other processes hold the other 40 GiB.
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (30 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 * gib)
    assert train_var.memory_budget(torch.device("cuda", 0), 0.85) == pytest.approx(0.85 * 40 * gib)


def test_training_learns_and_writes_outputs(data, tmp_path):
    out = tmp_path / "run"
    train_var.train(config(data, out, epochs=6), SINGLE)
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == list(range(1, 7))
    assert history[-1]["train_loss"] < history[0]["train_loss"] < math.log(32) + 0.5
    assert len(history[-1]["val_acc_scales"]) == 4 and history[-1]["step"] == 6 * 4
    for name in ("config.json", "loss.png", "accuracy.png", "lr.png", "samples/epoch_001.png", "samples/epoch_006.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["depth"] == 2
    best = load_checkpoint(out / "best.pth")
    assert best["vqvae_sha256"] == file_sha256(data["vqvae"]) and Path(best["vqvae_path"]) == data["vqvae"].resolve()
    assert best["classes"] == CLASSES and "optimizer" not in best
    assert best["best_val_loss"] == min(r["val_loss"] for r in history)
    model = load_var(out / "best.pth")
    assert model.config["num_classes"] == 3 and model.config["embed_dim"] == 32
    assert model.config["cond_drop_rate"] == 0.1  # the true training setting, though the script draws it itself
    last = load_checkpoint(out / "last.pth")
    assert {"optimizer", "rng", "history"} <= set(last) and last["epoch"] == 6


# Our VAR key -> the reference's (the inverse of models/convert_upstream.py's renaming), to fake a public checkpoint.
TO_REFERENCE = [(r"^pos_embed$", "pos_1LC"), (r"\.attn\.qkv\.", ".attn.mat_qkv."), (r"\.attn\.scale_mul$", ".attn.scale_mul_1H11"),
                (r"\.mlp\.", ".ffn."), (r"^(blocks\.\d+)\.ada_lin\.", r"\1.ada_lin.1."), (r"^head_norm\.ada_lin\.", "head_nm.ada_lin.1.")]


def to_reference(model: VAR) -> dict[str, torch.Tensor]:
    return renamed(model.state_dict(), TO_REFERENCE)


def test_fine_tuning_starts_from_the_reference_checkpoint_with_resized_classes(data, tmp_path):
    torch.manual_seed(5)
    upstream = VAR(vocab_size=32, z_channels=8, scales=(1, 2, 3, 4), num_classes=5, depth=2, embed_dim=64, num_heads=2)
    torch.save(to_reference(upstream), tmp_path / "var_d2.pth")
    out = tmp_path / "run"
    # lr 0: the weights after one epoch are exactly the ones fine-tuning started from.
    train_var.train(config(data, out, epochs=1, lr=0.0, base_lr=0.0, init_upstream=str(tmp_path / "var_d2.pth")), SINGLE)
    tuned = load_checkpoint(out / "last.pth")
    assert tuned["model_config"]["num_classes"] == 3 and tuned["model_config"]["depth"] == 2
    ours = tuned["model"]
    assert torch.equal(ours["blocks.1.attn.qkv.weight"], upstream.blocks[1].attn.qkv.weight)
    # Our 3 classes start as the reference's average class (init_class_rows=mean); the null class stays last.
    torch.testing.assert_close(ours["class_emb.weight"][:3], upstream.class_emb.weight[:5].mean(0).expand(3, 64))
    assert torch.equal(ours["class_emb.weight"][-1], upstream.class_emb.weight[-1])
    random = train_var.with_new_class_rows(upstream, 3, "random")
    assert random.class_emb.weight.shape == (4, 64)
    assert torch.equal(random.class_emb.weight[-1], upstream.class_emb.weight[-1])
    assert not any(torch.equal(random.class_emb.weight[i], upstream.class_emb.weight[i]) for i in range(3))
    assert torch.equal(random.blocks[0].mlp.fc1.weight, upstream.blocks[0].mlp.fc1.weight)
    # A reference checkpoint for another vocabulary is refused by name.
    other = VAR(vocab_size=16, z_channels=8, scales=(1, 2, 3, 4), num_classes=5, depth=2, embed_dim=64, num_heads=2)
    torch.save(to_reference(other), tmp_path / "v16.pth")
    with pytest.raises(train_var.TrainVarError, match="its vocab_size is 16 but the VQ-VAE's is 32"):
        train_var.build_var(config(data, out, init_upstream=str(tmp_path / "v16.pth")),
                            {"vocab_size": 32, "z_channels": 8, "scales": [1, 2, 3, 4]}, 3)


def test_mismatched_vqvae_is_refused(data, tmp_path):
    with pytest.raises(TokenFileError, match="came from VQ-VAE sha") as err:
        train_var.train(config(data, tmp_path / "run", vqvae=str(data["other"])), SINGLE)
    assert str(data["tokens"]) in str(err.value) and "tokenize_multiscale_maps" in str(err.value)
    assert not (tmp_path / "run" / "last.pth").exists()


def test_corrupt_npz_is_refused(data, tmp_path):
    bad = tmp_path / "tokens_multiscale_maps.npz"
    bad.write_bytes(data["tokens"].read_bytes()[:300])
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    with pytest.raises(TokenFileError, match="not a readable npz token file") as err:
        train_var.train(config(data, tmp_path / "run", tokens=str(bad)), SINGLE)
    assert str(bad) in str(err.value)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoints(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    calls = {"train": 0}
    real = train_var.token_losses

    def poisoned(logits, *args):
        loss, sums = real(logits, *args)
        if torch.is_grad_enabled():  # training micro-batches only; 4 per epoch here
            calls["train"] += 1
            if calls["train"] > 8:
                loss = loss * float("nan")
        return loss, sums

    monkeypatch.setattr(train_var, "token_losses", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 8"):
        train_var.train(config(data, out, epochs=5), SINGLE)
    last = load_checkpoint(out / "last.pth")
    assert last["epoch"] == 2 and last["step"] == 8
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    load_var(out / "best.pth")
    calls["train"] = 0
    monkeypatch.setattr(sys, "argv", ["train_var.py", *cli(data, tmp_path / "cli", epochs=5)])
    with pytest.raises(SystemExit) as exit_info:
        train_var.main()
    assert exit_info.value.code == 1 and "loss became nan at step 8" in capsys.readouterr().err


@pytest.mark.e2e
def test_resume_after_kill_continues_and_matches_an_uninterrupted_run(data, tmp_path, capsys):
    # With augmented tokens: the copy drawn for each image must not depend on where the run was interrupted.
    epochs = 10
    data = {**data, "tokens": data["aug"]}
    reference = run_script(cli(data, tmp_path / "reference", epochs=epochs))
    out = tmp_path / "killed"
    proc = run_script(cli(data, out, epochs=epochs))
    deadline = time.time() + 60
    while not (out / "last.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(out / "last.pth")
    assert killed_at["epoch"] < epochs
    log = finish(run_script(cli(data, out, epochs=epochs)))
    assert f"resuming from {out / 'last.pth'}: {killed_at['epoch']} epochs done, step {killed_at['step']}" in log
    finish(reference)
    resumed, uninterrupted = load_checkpoint(out / "last.pth"), load_checkpoint(tmp_path / "reference" / "last.pth")
    assert resumed["epoch"] == epochs and resumed["step"] == epochs * 4
    assert [r["epoch"] for r in resumed["history"]] == list(range(1, epochs + 1))
    for key, value in uninterrupted["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    train_var.train(config(data, out, epochs=epochs), SINGLE)
    assert f"already trained for {epochs} epochs" in capsys.readouterr().out


@pytest.mark.e2e
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(data, tmp_path):
    # One process accumulating two micro-batches of 4 vs two processes with one micro-batch of 4 each.
    one = run_script(cli(data, tmp_path / "one", epochs=3, grad_accum=2))
    two = run_script(cli(data, tmp_path / "two", epochs=3), nproc=2)
    finish(one)
    log = finish(two, timeout=90)
    assert "2 process(es)" in log
    a, b = load_checkpoint(tmp_path / "one" / "last.pth"), load_checkpoint(tmp_path / "two" / "last.pth")
    assert a["step"] == b["step"] == 12
    for ra, rb in zip(a["history"], b["history"]):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
        assert ra["val_acc_scales"] == pytest.approx(rb["val_acc_scales"], abs=1 / 64)
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-4)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-3, atol=1e-4, msg=key)


NO_CUDA_DEVICE = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.mark.parametrize("override, message", [
    ({"batch_size": 0}, "--batch_size=0: must be >= 1"),
    ({"grad_accum": -1}, "--grad_accum=-1: must be >= 0"),
    ({"depth": 0}, "--depth=0: must be >= 1"),
    ({"epochs": 0}, "--epochs=0: must be >= 1"),
    ({"precision": "fp8"}, "--precision='fp8': must be one of auto, bf16, fp16, fp32"),
    ({"device": NO_CUDA_DEVICE}, f"--device='{NO_CUDA_DEVICE}': must be auto, cpu, or a cuda / mps device this machine has"),
    ({"cond_drop_rate": 2}, "--cond_drop_rate=2.0: must be in [0, 1]"),
    ({"label_smoothing": -1}, "--label_smoothing=-1.0: must be in [0, 1)"),
    ({"top_k": -5}, "--top_k=-5: must be >= 0"),
    ({"lr_schedule": "step"}, "--lr_schedule='step': must be one of cosine, lin0"),
    ({"batch_size": 6, "grad_accum": 4}, "--batch_size=6: must be a multiple of --grad_accum=4"),
])
def test_bad_constants_stop_before_anything_is_read_or_written(data, tmp_path, override, message):
    with pytest.raises(SystemExit) as err:
        train_var.main(cli(data, tmp_path / "run", **override))
    assert str(err.value).startswith(f"error: {message}")
    assert list(tmp_path.iterdir()) == []


def test_unusable_out_dir_or_misspelt_name_stop_at_once(data, tmp_path):
    (tmp_path / "file").write_bytes(b"not a folder")
    with pytest.raises(SystemExit, match=f"^error: --out_dir: {tmp_path / 'file'} exists and is not a folder$"):
        train_var.main(cli(data, tmp_path / "file"))
    with pytest.raises(SystemExit, match=f"^error: --out_dir: cannot write in {tmp_path / 'file' / 'run'} "):
        train_var.main(cli(data, tmp_path / "file" / "run"))
    with pytest.raises(SystemExit, match="unknown constant 'epoch' \\(did you mean 'epochs'\\?\\)"):
        train_var.main(cli(data, tmp_path / "run") + ["--epoch=3"])
    assert (tmp_path / "file").read_bytes() == b"not a folder" and [p.name for p in tmp_path.iterdir()] == ["file"]


def test_a_vqvae_checkpoint_where_a_var_one_is_expected_and_the_reverse(data, tmp_path, capsys):
    var = VAR(vocab_size=32, z_channels=8, scales=(1, 2, 3, 4), num_classes=3, depth=1, embed_dim=8, num_heads=2)
    atomic_torch_save({"model": var.state_dict(), "model_config": var.config}, tmp_path / "var.pth")
    with pytest.raises(SystemExit):
        train_var.main(cli(data, tmp_path / "run", vqvae=tmp_path / "var.pth"))
    assert (f"{tmp_path / 'var.pth'}: is a VAR checkpoint (train_var.py), but a VQVAE checkpoint is needed here"
            in capsys.readouterr().err)
    with pytest.raises(SystemExit):
        train_var.main(cli(data, tmp_path / "run", resume=data["vqvae"]))
    assert (f"{data['vqvae']}: is a VQ-VAE checkpoint (train_vqvae.py), but a VAR checkpoint is needed here"
            in capsys.readouterr().err)


def test_lr_follows_the_batch_scaling_rule_unless_given():
    assert train_var.Config().lr == 0 and train_var.peak_lr(train_var.Config()) == pytest.approx(1e-4)  # 1e-4 at 256
    assert train_var.peak_lr(train_var.Config(batch_size=768)) == pytest.approx(3e-4)  # the reference's d16 run
    assert train_var.peak_lr(train_var.Config(batch_size=768, base_lr=2e-4)) == pytest.approx(6e-4)
    assert train_var.peak_lr(train_var.Config(batch_size=768, lr=5e-5)) == 5e-5


def test_init_adaln_gamma_scales_the_initial_adaln_gains(data):
    vq_config = {"vocab_size": 32, "z_channels": 8, "scales": [1, 2, 3, 4]}
    models = {}
    for gamma in (1e-5, 1e-3):
        torch.manual_seed(0)
        models[gamma] = train_var.build_var(config(data, Path("unused"), init_adaln_gamma=gamma), vq_config, 3)
    c = 32
    for reference, recipe in zip(models[1e-5].blocks, models[1e-3].blocks):
        torch.testing.assert_close(recipe.ada_lin.weight[:2 * c], reference.ada_lin.weight[:2 * c] * 100)
        assert torch.equal(recipe.ada_lin.weight[2 * c:], reference.ada_lin.weight[2 * c:])


def test_a_nan_in_the_last_step_of_an_epoch_leaves_the_checkpoints_untouched(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_var.train(config(data, out, epochs=1, sample_every=1), SINGLE)
    before = {name: (out / name).read_bytes() for name in ("last.pth", "best.pth", "history.json")}
    for stale in (out / ".last.pth.a1b2c3d4.tmp", out / "samples" / ".epoch_002.png.e5f6g7h8.tmp"):
        stale.write_bytes(b"left by a killed write")
        os.utime(stale, (time.time() - 3600,) * 2)  # an hour ago
    calls = {"train": 0}
    real = train_var.token_losses

    def nan_gradients_on_the_last_step(logits, *args):
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] == 4:  # the epoch's last micro-batch: a finite loss whose update makes NaN weights
                logits.register_hook(lambda grad: grad * float("nan"))
        return real(logits, *args)

    monkeypatch.setattr(train_var, "token_losses", nan_gradients_on_the_last_step)
    with pytest.raises(NonFiniteLossError, match=r"^epoch 2: non-finite val loss nan, weights .*; stopping without "
                                                 r"writing its checkpoints"):
        train_var.train(config(data, out, epochs=3, sample_every=1), SINGLE)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not (out / ".last.pth.a1b2c3d4.tmp").exists() and not (out / "samples" / ".epoch_002.png.e5f6g7h8.tmp").exists()
    assert not (out / "samples" / "epoch_002.png").exists()


def test_each_image_uses_each_of_its_copies_once_per_cycle_of_epochs():
    draws = np.stack([train_var.epoch_copies(5, 3, seed=7, epoch=e) for e in range(6)])  # (epochs, images)
    assert np.array_equal(draws, np.stack([train_var.epoch_copies(5, 3, seed=7, epoch=e) for e in range(6)]))
    for cycle in (draws[:3], draws[3:]):
        assert np.array_equal(np.sort(cycle, axis=0), np.tile(np.arange(3)[:, None], (1, 5)))
    assert not np.array_equal(draws[:3], draws[3:])  # a fresh order in every cycle
    assert not np.array_equal(draws, np.stack([train_var.epoch_copies(5, 3, seed=8, epoch=e) for e in range(6)]))
    assert np.array_equal(train_var.epoch_copies(5, 1, seed=7, epoch=4), np.zeros(5))


def test_training_draws_one_copy_per_image_per_epoch(data, tmp_path, monkeypatch):
    seen = []
    real = train_var.teacher_batch

    def recording(idx, scales, vqvae):
        if idx.shape[0] == 8 and torch.is_grad_enabled():  # training batches (evaluation runs under no_grad)
            seen.append(idx[:, :2].clone())
        return real(idx, scales, vqvae)

    monkeypatch.setattr(train_var, "teacher_batch", recording)
    train_var.train(config(data, tmp_path / "run", tokens=str(data["aug"]), epochs=4), SINGLE)
    per_epoch = torch.cat(seen).view(4, 32, 2).numpy()  # 4 steps of 8 per epoch: every image once
    for epoch, rows in enumerate(per_epoch):
        image, copy = rows[:, 1], rows[:, 0]
        assert sorted(image) == list(range(32))
        assert np.array_equal(copy, train_var.epoch_copies(32, 4, seed=0, epoch=epoch)[image])
    by_image = np.take_along_axis(per_epoch[..., 0], np.argsort(per_epoch[..., 1], axis=1), 1)  # (epoch, image)
    assert np.array_equal(np.sort(by_image, axis=0), np.tile(np.arange(4)[:, None], (1, 32)))  # all 4 copies used


def test_best_kid_checkpoint_is_the_epoch_with_the_lowest_kid(data, tmp_path, monkeypatch):
    scripted = iter([0.30, 0.10, 0.20, 0.15])

    class ScriptedKid:
        def __init__(self, cfg, val, image_size, device):
            assert len(val) == 16 and image_size == 8

        def __call__(self, model, vqvae, num_classes, precision, device):
            return next(scripted)

    monkeypatch.setattr(train_var, "KidProbe", ScriptedKid)
    out = tmp_path / "run"
    train_var.train(config(data, out, epochs=7, kid_every=2, plot_every=1), SINGLE)  # KID at epochs 2, 4, 6 and 7
    history = json.loads((out / "history.json").read_text())
    assert [(r["epoch"], r.get("kid")) for r in history if "kid" in r] == [(2, 0.30), (4, 0.10), (6, 0.20), (7, 0.15)]
    best_kid = load_checkpoint(out / "best_kid.pth")
    assert best_kid["epoch"] == 4 and best_kid["best_kid"] == 0.10
    assert load_checkpoint(out / "last.pth")["best_kid"] == 0.10
    assert load_checkpoint(out / "best.pth")["epoch"] == min(history, key=lambda r: r["val_loss"])["epoch"]
    assert (out / "kid.png").is_file()
    # The train subset in eval mode: as many images as val, scored every epoch beside val.
    assert all(r["train_eval_loss"] > 0 and len(r["train_eval_acc_scales"]) == 4 for r in history)


def test_a_resume_with_changed_run_settings_or_a_live_lock_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    train_var.main(cli(data, out, epochs=1))
    before = (out / "last.pth").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_var.main(cli(data, out, epochs=2, lr=1e-3, weight_decay=0.0))
    assert capsys.readouterr().err == (f"error (rank 0): {out / 'last.pth'}: this run was started with other settings "
                                       "(lr: 0.002 -> 0.001, weight_decay: 0.05 -> 0.0); resume with the same values, "
                                       "start afresh in another output folder, or pass --allow_changed_run=true to "
                                       "continue with the new ones\n")
    assert (out / "last.pth").read_bytes() == before
    (out / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "step": "train_var.py"}))
    with pytest.raises(SystemExit):
        train_var.main(cli(data, out, epochs=2))
    assert f"{out} is in use by train_var.py (pid {os.getppid()}" in capsys.readouterr().err
    (out / ".lock").unlink()
    train_var.main(cli(data, out, epochs=2, lr=1e-3, weight_decay=0.0, allow_changed_run=True))
    assert "continuing with changed lr, weight_decay (--allow_changed_run)" in capsys.readouterr().out
    assert load_checkpoint(out / "last.pth")["epoch"] == 2 and not (out / ".lock").exists()
    with pytest.raises(SystemExit):  # the VQ-VAE's folder is not a VAR's (here: it holds this run's inputs)
        train_var.main(cli(data, data["root"], epochs=1))
    assert "contains the input" in capsys.readouterr().err


SCALES = (1, 2, 3)
VQ_CONFIG = {"vocab_size": 32, "z_channels": 8, "scales": list(SCALES)}


def refusal(tmp_path: Path, **overrides) -> str | None:
    """validate's message for the default config with these constants, or None when it accepts them."""
    return refusal_of(train_var.validate, replace(train_var.Config(out_dir=str(tmp_path / "run")), **overrides))


def test_every_constant_is_refused_just_outside_its_range_and_accepted_at_its_edge(tmp_path):
    # name -> (values accepted at the edges, (refused value, the range its message names))
    table = {
        **{name: ([1], (0, ">= 1")) for name in ("depth", "epochs", "batch_size", "eval_batch_size",
                                                 "samples_per_class")},
        **{name: ([0], (-1, ">= 0")) for name in ("embed_dim", "num_heads", "grad_accum", "cpu_threads",
                                                  "train_eval_size", "kid_every", "sample_every", "plot_every",
                                                  "top_k")},
        "seed": ([0, 2**32 - 1], (2**32, "in [0, 4294967295]")),
        "kid_per_class": ([2], (1, ">= 2")),
        **{name: ([0.0], (-0.5, ">= 0")) for name in ("init_adaln_gamma", "base_lr", "lr", "weight_decay",
                                                      "warmup_epochs", "grad_clip", "guidance")},
        "mlp_ratio": ([0.25], (0.0, "> 0")),
        **{name: ([0.0, 0.999], (1.0, "in [0, 1)")) for name in ("drop_rate", "attn_drop_rate", "drop_path_rate",
                                                                 "label_smoothing", "adam_beta1", "adam_beta2")},
        **{name: ([0.0, 1.0], (1.5, "in [0, 1]")) for name in ("cond_drop_rate", "final_lr_ratio", "top_p")},
        "init_class_rows": (["mean", "first", "random"], ("last", "one of mean, first, random")),
        "lr_schedule": (["cosine", "lin0"], ("step", "one of cosine, lin0")),
        "precision": (["auto", "bf16", "fp16", "fp32"], ("fp8", "one of auto, bf16, fp16, fp32")),
        "device": (["auto", "cpu"], ("tpu", "auto, cpu, or a cuda / mps device this machine has")),
    }
    assert_edges(lambda **constant: refusal(tmp_path, **constant), table)
    for name in ("drop_rate", "cond_drop_rate", "final_lr_ratio", "top_p", "adam_beta2"):  # the low edge too
        assert refusal(tmp_path, **{name: -0.1}).startswith(f"--{name}=-0.1: must be in [0, 1"), name


def test_width_heads_and_batch_accumulation_must_divide(tmp_path):
    assert refusal(tmp_path, embed_dim=48, num_heads=5) == "--embed_dim=48: must be a multiple of --num_heads=5"
    assert refusal(tmp_path, embed_dim=48, num_heads=4) is None
    assert refusal(tmp_path, embed_dim=0, num_heads=5) is None and refusal(tmp_path, embed_dim=48, num_heads=0) is None
    assert refusal(tmp_path, batch_size=12, grad_accum=8) == "--batch_size=12: must be a multiple of --grad_accum=8"
    assert refusal(tmp_path, batch_size=12, grad_accum=4) is None
    assert refusal(tmp_path, batch_size=13, grad_accum=0) is None  # 0: derived later, never divides here
    assert not (tmp_path / "run").exists() or list((tmp_path / "run").iterdir()) == []


def test_out_dir_that_is_a_file_is_refused_by_name(tmp_path):
    (tmp_path / "run").write_text("a file")
    assert refusal(tmp_path) == f"--out_dir: {tmp_path / 'run'} exists and is not a folder"


def test_a_fresh_model_takes_every_architecture_constant(tmp_path):
    cfg = train_var.Config(depth=3, embed_dim=0, num_heads=0, mlp_ratio=2.5, drop_rate=0.1, attn_drop_rate=0.2,
                           drop_path_rate=0.3, shared_aln=True, cond_drop_rate=0.4, attn_l2_norm=False)
    model = train_var.build_var(cfg, {**VQ_CONFIG, "vocab_size": 24, "z_channels": 6}, 5)
    assert model.config == dict(vocab_size=24, z_channels=6, scales=[1, 2, 3], num_classes=5, depth=3, embed_dim=192,
                                num_heads=3, mlp_ratio=2.5, drop_rate=0.1, attn_drop_rate=0.2, drop_path_rate=0.3,
                                norm_eps=1e-6, shared_aln=True, cond_drop_rate=0.4, attn_l2_norm=False)
    given = train_var.build_var(replace(cfg, embed_dim=40, num_heads=4), VQ_CONFIG, 2).config
    assert (given["embed_dim"], given["num_heads"], given["num_classes"]) == (40, 4, 2)
    # init_adaln_gamma reaches the initial AdaLN gains (the model's config does not keep it)
    torch.manual_seed(0)
    small = train_var.build_var(replace(cfg, depth=1, embed_dim=16, num_heads=2, shared_aln=False), VQ_CONFIG, 2)
    torch.manual_seed(0)
    large = train_var.build_var(replace(cfg, depth=1, embed_dim=16, num_heads=2, shared_aln=False,
                                        init_adaln_gamma=1e-3), VQ_CONFIG, 2)
    torch.testing.assert_close(large.blocks[0].ada_lin.weight[:32], small.blocks[0].ada_lin.weight[:32] * 100)


def upstream_var(num_classes: int = 4, vocab: int = 32, z: int = 8) -> VAR:
    torch.manual_seed(3)
    return VAR(vocab_size=vocab, z_channels=z, scales=SCALES, num_classes=num_classes, depth=1, embed_dim=16,
               num_heads=2)


def test_fine_tuning_passes_the_run_s_settings_to_the_conversion(monkeypatch):
    calls = []

    def fake(path, num_classes=None, **overrides):
        calls.append((path, num_classes, overrides))
        return upstream_var().eval()

    monkeypatch.setattr(train_var, "var_from_upstream", fake)
    cfg = train_var.Config(init_upstream="ref.pth", drop_rate=0.1, attn_drop_rate=0.2, drop_path_rate=0.3,
                           cond_drop_rate=0.4)
    settings = dict(drop_rate=0.1, attn_drop_rate=0.2, drop_path_rate=0.3, cond_drop_rate=0.4, scales=[1, 2, 3])
    model = train_var.build_var(replace(cfg, init_class_rows="first"), VQ_CONFIG, 3)
    assert calls == [("ref.pth", 3, settings)]
    assert model.training and model.class_emb.weight.shape == (5, 16)  # first: convert_upstream resizes, not us
    model = train_var.build_var(cfg, VQ_CONFIG, 3)  # mean: converted at the reference's size, then new rows
    assert calls[1] == ("ref.pth", None, settings)
    assert model.training and model.class_emb.weight.shape == (4, 16)
    rows = upstream_var().class_emb.weight.detach()
    torch.testing.assert_close(model.class_emb.weight, torch.cat([rows[:4].mean(0).expand(3, 16), rows[4:]]))


@pytest.mark.parametrize("key", ["vocab_size", "z_channels"])
def test_fine_tuning_refuses_a_reference_of_another_vocabulary_or_width(monkeypatch, key):
    other = upstream_var(vocab=16) if key == "vocab_size" else upstream_var(z=4)
    monkeypatch.setattr(train_var, "var_from_upstream", lambda *args, **kwargs: other)
    with pytest.raises(train_var.TrainVarError) as err:
        train_var.build_var(train_var.Config(init_upstream="ref.pth"), VQ_CONFIG, 3)
    theirs = other.config[key]
    assert str(err.value) == (f"ref.pth: its {key} is {theirs} but the VQ-VAE's is {VQ_CONFIG[key]}; fine-tuning needs "
                              "tokens from the matching (reference) VQ-VAE")


@pytest.mark.parametrize("error", [CheckpointError("unreadable"), ValueError("unreadable"), KeyError("unreadable")])
def test_an_unusable_reference_checkpoint_is_refused_by_name(monkeypatch, error):
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(train_var, "var_from_upstream", failing)
    with pytest.raises(train_var.TrainVarError) as err:
        train_var.build_var(train_var.Config(init_upstream="ref.pth"), VQ_CONFIG, 3)
    assert str(err.value) == f"ref.pth: cannot initialise from it: {error}"


def test_new_class_rows_are_the_mean_of_the_reference_s_or_fresh_ones_and_keep_the_null_row():
    upstream = upstream_var(num_classes=4)
    rows = upstream.class_emb.weight.detach()
    mean = train_var.with_new_class_rows(upstream, 2, "mean")
    assert mean.config == {**upstream.config, "num_classes": 2}
    expected = torch.cat([rows[:4].mean(0).expand(2, 16), rows[4:]])
    torch.testing.assert_close(mean.class_emb.weight, expected, rtol=0, atol=1e-7)
    for name, value in upstream.state_dict().items():
        if name != "class_emb.weight":
            assert torch.equal(mean.state_dict()[name], value), name
    torch.manual_seed(9)
    fresh_rows = VAR(**{**upstream.config, "num_classes": 6}).class_emb.weight.detach()
    torch.manual_seed(9)
    random = train_var.with_new_class_rows(upstream, 6, "random")
    assert torch.equal(random.class_emb.weight[:6], fresh_rows[:6])
    assert torch.equal(random.class_emb.weight[6], rows[4])


def test_scale_of_each_position():
    ids = train_var.scale_of_position((1, 2, 3), torch.device("cpu"))
    assert ids.dtype == torch.long and ids.tolist() == [0] + [1] * 4 + [2] * 9


def test_token_losses_with_label_smoothing_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4, requires_grad=True)
    target = torch.tensor([[0, 1, 2, 3, 0], [3, 3, 1, 0, 2]])
    ids = torch.tensor([0, 1, 1, 1, 1])
    loss, sums = train_var.token_losses(logits, target, ids, 2, 0.3)
    logp = logits.detach().log_softmax(-1)
    nll = -logp.gather(-1, target[..., None])[..., 0]
    by_hand = (0.7 * nll - 0.3 * logp.mean(-1)).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    torch.testing.assert_close(sums[0], torch.stack([nll[:, 0].sum(), nll[:, 1:].sum()]))
    right = (logits.detach().argmax(-1) == target).float()
    assert sums[1].tolist() == [right[:, 0].sum().item(), right[:, 1:].sum().item()]
    assert sums[2].tolist() == [2.0, 8.0] and sums.dtype == torch.float32
    one = train_var.token_losses(logits[:1], target[:1], ids, 2, 0.3)[1]  # a micro-batch of one sample
    assert one[2].tolist() == [1.0, 4.0]
    loss.backward()  # the gradient of the smoothed loss flows into every logit; the metrics carry none
    grad = (logits.detach().softmax(-1) - 0.3 / 4 - 0.7 * F.one_hot(target, 4)) / 10
    torch.testing.assert_close(logits.grad, grad)
    assert not sums.requires_grad


@pytest.fixture(scope="module")
def vq(tmp_path_factory) -> dict:
    """A tiny random VQ-VAE (scales 1,2,3) saved as a checkpoint, and a token file made by it."""
    root = tmp_path_factory.mktemp("rules_train_var")
    torch.manual_seed(0)
    vqvae = VQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1, scales=SCALES)
    atomic_torch_save({"model": vqvae.state_dict(), "model_config": vqvae.config}, root / "vqvae.pth")
    torch.manual_seed(1)
    other = VQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1, scales=SCALES)
    atomic_torch_save({"model": other.state_dict(), "model_config": other.config}, root / "other_vqvae.pth")
    rng = np.random.default_rng(0)
    maps = [rng.integers(0, 32, (6, pn, pn)) for pn in SCALES]
    save_tokens(root / "tokens.npz", scales=list(SCALES), maps=maps, labels=np.array([0, 1, 0, 1, 0, 1]),
                split=np.array(["train"] * 4 + ["val"] * 2), source=np.array([f"{i}.png" for i in range(6)]),
                vqvae_sha256=file_sha256(root / "vqvae.pth"), vqvae_config=vqvae.config, classes=["a", "b"])
    return {"root": root, "vqvae": vqvae.eval(), "tokens": load_tokens(root / "tokens.npz")}


def test_teacher_batch_is_the_vqvae_s_input_for_the_int16_rows(vq):
    rows = torch.from_numpy(vq["tokens"].idx[:3].astype(np.int16))
    x_in, target = train_var.teacher_batch(rows, SCALES, vq["vqvae"])
    assert target.dtype == torch.long and torch.equal(target, rows.long())
    maps = [rows[:, :1].long().view(3, 1, 1), rows[:, 1:5].long().view(3, 2, 2), rows[:, 5:].long().view(3, 3, 3)]
    assert torch.equal(x_in, vq["vqvae"].idx_to_var_input(maps))


def test_class_drop_masks_are_the_documented_stream_at_a_rate_of_0_3():
    masks = train_var.class_drop_masks(range(4, 7), 50, seed=2, rate=0.3)
    for row, step in zip(masks, range(4, 7)):
        draw = torch.rand(50, generator=torch.Generator().manual_seed(2 * 1_000_003 + step))
        assert torch.equal(row, draw < 0.3)
    everything = train_var.class_drop_masks(range(2), 30, seed=0, rate=1.0)
    assert everything.all() and everything.dtype == torch.bool


def test_epoch_copies_are_the_documented_stream_and_two_copies_alternate():
    for epoch in range(4):
        cycle, position = divmod(epoch, 3)
        rng = np.random.default_rng([5, cycle, 1])
        expected = rng.permuted(np.tile(np.arange(3), (6, 1)), axis=1)[:, position]
        assert np.array_equal(train_var.epoch_copies(6, 3, seed=5, epoch=epoch), expected)
    two = np.stack([train_var.epoch_copies(8, 2, seed=1, epoch=e) for e in range(2)])
    assert np.array_equal(two.sum(0), np.ones(8))  # each image: copy 0 in one epoch, copy 1 in the other
    ones = train_var.epoch_copies(4, 1, seed=1, epoch=3)
    assert ones.dtype == np.int64 and ones.tolist() == [0, 0, 0, 0]


def test_summarise_divides_each_sum_by_its_own_token_count():
    sums = torch.tensor([[2.0, 6.0, 20.0], [1.0, 3.0, 4.0], [2.0, 8.0, 32.0]])
    m = train_var.summarise(sums)
    assert m == {"loss": pytest.approx(28 / 42), "loss_last": pytest.approx(20 / 32), "acc": pytest.approx(8 / 42),
                 "loss_scales": pytest.approx([1.0, 0.75, 0.625]), "acc_scales": pytest.approx([0.5, 0.375, 0.125])}
    assert all(isinstance(m[k], float) for k in ("loss", "loss_last", "acc"))


def token_set(maps: list[np.ndarray], split: list[str]) -> TokenSet:
    n = len(split)
    idx = np.concatenate([m.reshape(n, -1) for m in maps], axis=1)
    return TokenSet(scales=tuple(m.shape[1] for m in maps), idx=idx, labels=np.zeros(n, np.int64),
                    split=np.array(split), source=np.array([f"{i}.png" for i in range(n)]), classes=["a"],
                    vqvae_sha256="0", vqvae_config={})


def test_majority_baseline_guesses_each_scale_s_most_frequent_training_token():
    train = token_set([np.array([5, 5, 2]).reshape(3, 1, 1), np.array([[1, 1, 1, 7]] * 2 + [[7, 7, 7, 3]]).reshape(3, 2, 2)],
                      ["train"] * 3)
    val = token_set([np.array([5, 2, 2, 2]).reshape(4, 1, 1), np.array([[1, 7, 1, 7]] * 4).reshape(4, 2, 2)], ["val"] * 4)
    assert train_var.majority_baseline(train, val) == [0.25, 0.5]  # scale 1: 5 (2 of 3), scale 2: 1 (6 of 12)


def test_grad_accum_edges():
    gib = 2**30
    assert train_var.choose_grad_accum(8, 4 * gib, gib, 12 * gib) == 1  # exactly the budget fits
    assert train_var.choose_grad_accum(8, 4 * gib, gib, 12 * gib - 1) == 2
    assert train_var.choose_grad_accum(6, 4 * gib, gib, 6 * gib) == 3  # 6 / 4 is no divisor: 3 micro-batches of 2
    assert train_var.choose_grad_accum(1, 0, gib, gib) == 1
    with pytest.raises(train_var.TrainVarError) as err:
        train_var.choose_grad_accum(4, 2.5 * gib, 0.25 * gib, 2.5 * gib)
    assert str(err.value) == ("one sample needs 2.8 GiB, over the 2.5 GiB this GPU offers; use a smaller model "
                              "(--depth) or more GPUs")


def test_load_inputs_names_the_scales_that_differ_and_freezes_the_vqvae(vq, tmp_path):
    cfg = train_var.Config(vqvae=str(vq["root"] / "vqvae.pth"), tokens=str(vq["root"] / "tokens.npz"))
    vqvae, tokens = train_var.load_inputs(cfg, torch.device("cpu"))
    assert not vqvae.training and not any(p.requires_grad for p in vqvae.parameters())
    assert np.array_equal(tokens.idx, vq["tokens"].idx) and tokens.classes == ["a", "b"]
    coarse = tmp_path / "coarse.npz"
    rng = np.random.default_rng(1)
    save_tokens(coarse, scales=[1, 2], maps=[rng.integers(0, 32, (2, pn, pn)) for pn in (1, 2)], labels=np.zeros(2, np.int64),
                split=np.array(["train", "val"]), source=np.array(["0.png", "1.png"]),
                vqvae_sha256=file_sha256(vq["root"] / "vqvae.pth"),
                vqvae_config={**vq["vqvae"].config, "scales": [1, 2]}, classes=["a"])
    with pytest.raises(train_var.TrainVarError) as err:
        train_var.load_inputs(replace(cfg, tokens=str(coarse)), torch.device("cpu"))
    assert str(err.value) == f"{coarse}: scales (1, 2) differ from the VQ-VAE's (1, 2, 3)"
    # The checkpoint is read first: a missing token file is not what a wrong checkpoint is reported as.
    with pytest.raises(CheckpointError):
        train_var.load_inputs(replace(cfg, vqvae=str(tmp_path / "none.pth"), tokens=str(tmp_path / "none.npz")),
                              torch.device("cpu"))
    with pytest.raises(TokenFileError):
        train_var.load_inputs(replace(cfg, tokens=str(tmp_path / "none.npz")), torch.device("cpu"))
    with pytest.raises(TokenFileError, match="came from VQ-VAE sha"):  # tokens of another VQ-VAE
        train_var.load_inputs(replace(cfg, vqvae=str(vq["root"] / "other_vqvae.pth")), torch.device("cpu"))


class MeanNet:
    """A stand-in feature network: per-image channel means, and the batch sizes it was called with."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(images))
        return images.float().mean((2, 3))


def probe_inputs(tmp_path: Path, n_val: int, classes: list[str]) -> tuple[train_var.Config, TokenSet]:
    for i in range(n_val):
        save_image(np.full((16, 16, 3), 10 * i, np.uint8), tmp_path / "data" / f"{i}.png")
    val = token_set([np.zeros((n_val, 1, 1), np.int64)], ["val"] * n_val)
    val.classes = classes
    cfg = train_var.Config(data_dir=str(tmp_path / "data"), kid_every=3, kid_per_class=2, eval_batch_size=2,
                           inception_weights="w.pth", seed=4)
    return cfg, val


def test_kid_probe_reads_the_val_images_at_the_model_size_in_batches(tmp_path, monkeypatch):
    net = MeanNet()
    device = torch.device("cpu")
    monkeypatch.setattr(train_var, "load_feature_extractor",
                        lambda weights, on: net if (weights, on) == ("w.pth", device) else None)
    cfg, val = probe_inputs(tmp_path, 5, ["a", "b"])
    probe = train_var.KidProbe(cfg, val, 8, device)
    assert net.batches == [2, 2, 1]
    assert probe.real.shape == (5, 3) and probe.real[:, 0].tolist() == [0.0, 10.0, 20.0, 30.0, 40.0]
    drawn = {}

    def fake_samples(model, vqvae, num_classes, per_class, cfg_, precision, on, seed):
        drawn.update(num_classes=num_classes, per_class=per_class, seed=seed, passed=(model, vqvae, cfg_, precision, on))
        return torch.full((num_classes * per_class, 3, 8, 8), 7, dtype=torch.uint8)

    def fake_kid(fake, real, max_subset_size, seed):
        drawn.update(fake=fake, real=real, subset=max_subset_size, kid_seed=seed)
        return {"mean": 0.125, "std": 9.0}

    monkeypatch.setattr(train_var, "sample_images", fake_samples)
    monkeypatch.setattr(train_var, "kid_from_features", fake_kid)
    model, vqvae, precision = object(), object(), object()
    assert probe(model, vqvae, 3, precision, device) == 0.125
    assert (drawn["num_classes"], drawn["per_class"], drawn["seed"]) == (3, 2, [4, 1])
    assert drawn["passed"] == (model, vqvae, cfg, precision, device)
    assert drawn["fake"].shape == (6, 3) and (drawn["fake"] == 7).all() and drawn["real"] is probe.real
    assert (drawn["subset"], drawn["kid_seed"]) == (2, 4)  # half the smaller set (6 samples, 5 val images)
    assert net.batches[3:] == [2, 2, 2]


def test_kid_probe_refusals(tmp_path, monkeypatch):
    def no_weights(weights, device):
        raise FidelityError("w.pth: missing")

    cfg, val = probe_inputs(tmp_path, 4, ["a", "b"])
    monkeypatch.setattr(train_var, "load_feature_extractor", no_weights)
    with pytest.raises(train_var.TrainVarError) as err:
        train_var.KidProbe(cfg, val, 8, torch.device("cpu"))
    assert str(err.value) == "kid_every=3 needs the InceptionV3 weights: w.pth: missing (or set --kid_every=0)"
    monkeypatch.setattr(train_var, "load_feature_extractor", lambda weights, device: MeanNet())
    train_var.KidProbe(cfg, val, 8, torch.device("cpu"))  # 4 val images and 4 samples: enough
    few = token_set([np.zeros((3, 1, 1), np.int64)], ["val"] * 3)
    with pytest.raises(train_var.TrainVarError) as err:
        train_var.KidProbe(cfg, few, 8, torch.device("cpu"))
    assert str(err.value) == ("3 val images and 2 samples per class of 1 classes: a KID needs 4 or more of each "
                              "(or set --kid_every=0)")
    with pytest.raises(train_var.TrainVarError, match=r"^4 val images and 1 samples per class of 2 classes"):
        train_var.KidProbe(replace(cfg, kid_per_class=1), val, 8, torch.device("cpu"))
    (tmp_path / "data" / "2.png").unlink()
    with pytest.raises(train_var.TrainVarError) as err:
        train_var.KidProbe(replace(cfg, tokens="t.npz"), val, 8, torch.device("cpu"))
    assert str(err.value) == (f"{tmp_path / 'data' / '2.png'}: val image missing; --data_dir must be the processed "
                              "set that t.npz was made from (or set --kid_every=0)")


class Shard(DistContext):
    """Process `rank` of `world_size` without a process group: its sums are not reduced with the others'."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def tiny_var(drop_rate: float = 0.0) -> VAR:
    torch.manual_seed(1)
    return VAR(vocab_size=32, z_channels=8, scales=SCALES, num_classes=2, depth=1, embed_dim=16, num_heads=2,
               drop_rate=drop_rate)


def test_evaluate_scores_every_row_of_this_process_in_eval_mode_with_true_labels(vq):
    from common.runtime import select_precision

    model, tokens = tiny_var(drop_rate=0.5), vq["tokens"]  # dropout: a score in train mode would differ
    cpu = torch.device("cpu")
    cfg, ids = train_var.Config(eval_batch_size=4), train_var.scale_of_position(SCALES, cpu)

    def by_hand(rows: list[int]) -> dict:
        model.eval()
        x_in, target = train_var.teacher_batch(torch.from_numpy(tokens.idx[rows]), SCALES, vq["vqvae"])
        with torch.no_grad():
            logits = model(torch.from_numpy(tokens.labels[rows]), x_in)
        model.train()
        return train_var.summarise(train_var.token_losses(logits, target, ids, 3, 0.0)[1])

    precision = select_precision(cpu, "fp32")
    whole = train_var.evaluate(model, vq["vqvae"], tokens, cfg, Shard(0, 1, 0, cpu), precision, ids)
    assert model.training
    expected = by_hand(list(range(6)))
    assert whole == {k: pytest.approx(v, rel=1e-5) for k, v in expected.items()}
    second = train_var.evaluate(model, vq["vqvae"], tokens, cfg, Shard(1, 2, 1, cpu), precision, ids)
    assert second == {k: pytest.approx(v, rel=1e-5) for k, v in by_hand([1, 3, 5]).items()}


def test_sample_images_are_class_major_per_image_seeded_and_leave_the_random_streams_alone(vq):
    from common.runtime import select_precision

    model, cpu = tiny_var(), torch.device("cpu")
    precision = select_precision(cpu, "fp32")
    cfg = train_var.Config(eval_batch_size=4, guidance=2.0, top_k=5, top_p=0.8)
    torch.manual_seed(11)
    images = train_var.sample_images(model, vq["vqvae"], 2, 3, cfg, precision, cpu, seed=[7, 1])
    after = torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(after, torch.rand(3))  # the training streams go on as if nothing had been drawn
    assert model.training and images.dtype == torch.uint8 and images.shape == (6, 3, 6, 6)
    seeds = np.random.SeedSequence([7, 1]).generate_state(6, np.uint64).tolist()
    model.eval()
    with torch.no_grad():
        for i in range(6):  # image i: class i // 3, its own seed, whatever its batch
            one, _ = model.generate(vq["vqvae"], torch.tensor([i // 3]), SamplingSettings(2.0, top_k=5, top_p=0.8),
                                    seeds=seeds[i:i + 1])
            assert torch.equal(images[i], (one[0].clamp(0, 1) * 255).round().to(torch.uint8)), i
    model.train()
    assert torch.equal(train_var.sample_images(model, vq["vqvae"], 2, 3, replace(cfg, eval_batch_size=6), precision,
                                               cpu, seed=[7, 1]), images)


def test_kid_sample_grid_and_plots_are_due_at_their_epochs():
    def schedule(**kw) -> list[list[int]]:
        cfg = train_var.Config(epochs=7, **kw)
        due = [train_var.epoch_outputs(cfg, epoch) for epoch in range(7)]
        return [[epoch + 1 for epoch in range(7) if due[epoch][i]] for i in range(3)]

    assert schedule(kid_every=3, sample_every=2, plot_every=3) == [[3, 6, 7], [1, 2, 4, 6, 7], [1, 2, 3, 4, 6, 7]]
    assert schedule(kid_every=0, sample_every=0, plot_every=0) == [[], [1, 7], [1, 7]]
    assert schedule(kid_every=7, sample_every=5, plot_every=1) == [[7], [1, 5, 7], [1, 2, 3, 4, 5, 6, 7]]
    every = list(range(1, 8))
    assert schedule(kid_every=1, sample_every=1, plot_every=0) == [every, every, every]
