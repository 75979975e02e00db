"""common/training.py at non-default settings: the schedule's exact values, per-group learning-rate scales, the
GPU read interval of LossWatch, the wording of each refusal, and what a checkpoint holds."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.checkpoint import CheckpointError
from common.distributed import DistContext
from common.io import atomic_torch_save
from common.training import (LIN0_FLAT, EpochSums, LossWatch, NonFiniteLossError, check_epoch_finite,
                             checkpoint_to_resume, lr_at, param_groups, resume_training_checkpoint, set_lr,
                             training_state, unwrap)
from models.var import VAR
from models.vqvae import VQVAE


def test_schedule_values_by_hand():
    lr = lambda step, **kw: lr_at(step, **(dict(total_steps=50, warmup_steps=10, peak_lr=3.0, final_ratio=0.2) | kw))
    assert [lr(s) for s in (0, 4, 9)] == pytest.approx([0.3, 1.5, 3.0])  # (step + 1) / warmup of the peak
    # cosine: progress (step - warmup) / (total - warmup); a quarter of the way down is 0.5 (1 + cos(pi / 4))
    assert lr(20) == pytest.approx(3.0 * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert lr(30) == pytest.approx(3.0 * 0.6) and lr(50) == pytest.approx(0.6) and lr(80) == pytest.approx(0.6)
    assert lr(0, warmup_steps=0) == pytest.approx(3.0)  # no warmup: the peak at once
    assert lr(0, warmup_steps=1) == pytest.approx(3.0) and lr(1, warmup_steps=1) == pytest.approx(3.0)
    assert lr(7, total_steps=6, warmup_steps=5) == pytest.approx(0.6)  # one step after warmup: progress 1 at step 6
    assert lr_at(100, 100, 0, 1.0) == pytest.approx(0.01)  # the default floor: 1% of the peak
    assert lr(5, total_steps=5, warmup_steps=5) == pytest.approx(3.0)  # nothing after warmup: progress 0, no 0 / 0
    assert lr(6, total_steps=5, warmup_steps=5) == pytest.approx(0.6)
    assert LIN0_FLAT == 0.05
    lin0 = lambda step: lr(step, total_steps=210, schedule="lin0")  # 200 steps after warmup: flat for 10
    assert [lin0(s) for s in (10, 20)] == pytest.approx([3.0, 3.0])
    assert lin0(21) == pytest.approx(3.0 * (0.2 + 0.8 * (1 - 11 / 200) / 0.95))
    assert lin0(210) == pytest.approx(0.6)


def test_set_lr_scales_each_group():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [a], "lr_scale": 0.25}, {"params": [b]}], lr=1.0)
    set_lr(optimizer, 0.8)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.2, 0.8])


class Named(nn.Module):
    NO_WEIGHT_DECAY = ("pos_",)

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 3)
        self.pos_table = nn.Parameter(torch.zeros(4, 3))
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)
        self.gain = nn.Parameter(torch.ones(3))
        self.rel_bias = nn.Parameter(torch.zeros(2, 3))  # a bias by name, though 2-D


def test_param_groups_by_name_and_shape():
    model = Named()
    decay, no_decay = param_groups(model, 0.3)
    ids = lambda group: {id(p) for p in group["params"]}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.3, 0.0)
    assert ids(decay) == {id(model.proj.weight)}
    assert ids(no_decay) == {id(model.proj.bias), id(model.pos_table), id(model.gain), id(model.rel_bias)}
    plain = nn.Linear(2, 2)  # no NO_WEIGHT_DECAY keys: shape and name decide
    decay, no_decay = param_groups(plain, 0.1)
    assert (ids(decay), ids(no_decay)) == ({id(plain.weight)}, {id(plain.bias)})


def test_loss_watch_intervals_and_message():
    assert LossWatch(torch.device("cpu"), gpu_every=3).every == 1  # reading costs nothing on the CPU
    assert LossWatch(torch.device("meta"), gpu_every=3).every == 3  # any other device: every gpu_every steps
    assert LossWatch(torch.device("meta")).every == 50
    watch = LossWatch(torch.device("cpu"))
    assert watch.check() == 0.0  # nothing recorded yet
    watch.every = 3
    assert [watch.update(torch.tensor(1.0), s) for s in range(6)] == [False, False, True, False, False, True]
    assert watch.check() == 1.0 and isinstance(watch.check(), float)
    watch.update(torch.tensor(-math.inf), 6)
    watch.update(torch.tensor(math.nan), 7)
    watch.update(torch.tensor(2.0), 8)
    with pytest.raises(NonFiniteLossError) as err:
        watch.check()
    first = LossWatch(torch.device("cpu"))
    first.update(torch.tensor(math.nan), 0)
    first.update(torch.tensor(math.inf), 2)
    with pytest.raises(NonFiniteLossError, match="^loss became nan at step 0; "):  # step 0 counts as a bad step too
        first.check()
    assert str(err.value) == ("loss became -inf at step 6; stopping. The last good checkpoints are kept: lower the "
                              "learning rate or switch precision (e.g. --precision=fp32) and resume.")


def test_check_epoch_finite_lists_at_most_three_weights():
    model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(3)))
    with torch.no_grad():
        for layer in model:
            layer.weight.fill_(math.nan)
            layer.bias.fill_(math.inf)
    with pytest.raises(NonFiniteLossError) as err:
        check_epoch_finite(model, 7, {"train loss": math.inf, "val loss": 1.0})
    assert str(err.value).startswith("epoch 7: non-finite train loss inf, weights 0.weight, 0.bias, 1.weight and 3 more; "
                                     "stopping without writing its checkpoints. The last good checkpoints are kept:")
    for count, tail in ((3, ";"), (4, " and 1 more;")):
        model = nn.Sequential(*(nn.Linear(2, 2, bias=False) for _ in range(count)))
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(math.nan)
        with pytest.raises(NonFiniteLossError, match=rf"^epoch 2: non-finite weights 0.weight, 1.weight, 2.weight{tail}"):
            check_epoch_finite(model, 2, {})
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model[0].bias.fill_(math.nan)
    with pytest.raises(NonFiniteLossError, match=r"^epoch 1: non-finite weights 0\.bias; stopping"):
        check_epoch_finite(model, 1, {})
    check_epoch_finite(nn.Linear(2, 2), 1, {"val loss": 0.0})


def test_checkpoint_contents_and_refusals(tmp_path):
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "last.pth"
    atomic_torch_save(training_state(model=model, model_config={"w": 2}, config={"lr": 0.1}, optimizer=optimizer,
                                     epoch=4, step=40, history=[{"epoch": 3}], best_val_loss=0.5,
                                     extra={"note": 7}), path)
    saved = torch.load(path, weights_only=True)
    assert {k: saved[k] for k in ("model_config", "config", "epoch", "step", "history", "best_val_loss", "note")} == \
        {"model_config": {"w": 2}, "config": {"lr": 0.1}, "epoch": 4, "step": 40, "history": [{"epoch": 3}],
         "best_val_loss": 0.5, "note": 7}
    assert set(saved) >= {"model", "optimizer", "rng"} and "scaler" not in saved
    assert torch.equal(saved["model"]["weight"], model.weight)
    atomic_torch_save(training_state(model=model, model_config={"w": 2}, config={}, epoch=1, step=1, history=[],
                                     best_val_loss=1.0), path)
    with pytest.raises(CheckpointError, match=rf"^{path}: not a checkpoint of this project: missing optimizer"):
        resume_training_checkpoint(path, nn.Linear(2, 2), torch.optim.SGD(model.parameters(), lr=0.1), None, {"w": 2})
    atomic_torch_save(training_state(model=model, model_config={"w": 2}, config={}, optimizer=optimizer, epoch=1,
                                     step=1, history=[], best_val_loss=1.0), path)
    with pytest.raises(CheckpointError) as err:
        resume_training_checkpoint(path, nn.Linear(2, 2), optimizer, None, {"w": 3})
    assert str(err.value) == (f"{path}: was written for a different network ({{'w': 2}}) than this run's ({{'w': 3}}); "
                              "use another out_dir or the same constants")
    with pytest.raises(CheckpointError, match=rf"^{path}: weights do not fit the model: "):
        resume_training_checkpoint(path, nn.Linear(2, 3), optimizer, None, {"w": 2})
    with pytest.raises(CheckpointError, match=rf"^{path}: is a VAR checkpoint \(train_var.py\)"):
        atomic_torch_save(training_state(model=model, model_config={"num_classes": 2}, config={}, optimizer=optimizer,
                                         epoch=1, step=1, history=[], best_val_loss=1.0), path)
        resume_training_checkpoint(path, nn.Linear(2, 2), optimizer, None, {"num_classes": 2})
    broken = nn.Sequential(*(nn.Linear(2, 2) for _ in range(2)))
    with torch.no_grad():
        for p in broken.parameters():
            p.fill_(math.nan)
    atomic_torch_save(training_state(model=broken, model_config={}, config={}, optimizer=optimizer, epoch=1, step=1,
                                     history=[], best_val_loss=1.0), path)
    with pytest.raises(CheckpointError) as err:
        resume_training_checkpoint(path, nn.Sequential(*(nn.Linear(2, 2) for _ in range(2))), optimizer, None, {})
    assert str(err.value) == (f"{path}: holds non-finite weights (0.weight, 0.bias, 1.weight; saved after a NaN?); "
                              "resume from another checkpoint (--resume=PATH) or start afresh (--resume=none)")
    assert unwrap(model) is model


def test_resume_from_last_pth_only_when_it_exists_unless_a_path_is_given(tmp_path):
    assert checkpoint_to_resume("auto", tmp_path) is None  # nothing there yet: a fresh start
    (tmp_path / "last.pth").write_bytes(b"")
    assert checkpoint_to_resume("auto", str(tmp_path)) == tmp_path / "last.pth"
    assert checkpoint_to_resume("none", tmp_path) is None
    assert checkpoint_to_resume(str(tmp_path / "gone.pth"), tmp_path) == tmp_path / "gone.pth"  # refused when read


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, total_steps=100, warmup_steps=10, peak_lr=1.0, final_ratio=0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(0.1)


def test_lin0_schedule_warms_up_stays_flat_then_falls_linearly_to_the_final_ratio():
    # 10 warmup steps, then 100: flat for the first 5 (5%), then a straight line from 1 to 0.1 over the other 95.
    lr = lambda s: lr_at(s, total_steps=110, warmup_steps=10, peak_lr=2.0, final_ratio=0.1, schedule="lin0")
    assert [lr(s) for s in (0, 4, 9)] == pytest.approx([0.2, 1.0, 2.0])
    assert [lr(s) for s in (10, 12, 15)] == pytest.approx([2.0, 2.0, 2.0])
    assert lr(16) == pytest.approx(2.0 * (0.1 + 0.9 * 94 / 95))
    assert lr(62.5) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # the middle of the line: halfway down
    assert lr(110) == pytest.approx(0.2) and lr(500) == pytest.approx(0.2)
    cosine = lambda s: lr_at(s, total_steps=110, warmup_steps=10, peak_lr=2.0, final_ratio=0.1, schedule="cosine")
    assert cosine(60) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5)) and cosine(15) < 2.0  # cosine never holds flat
    with pytest.raises(ValueError, match="'step' is not one of cosine, lin0"):
        lr_at(20, 110, 10, 1.0, schedule="step")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.scale_mul = nn.Parameter(torch.ones(1, 2, 1, 1))


def names_by_group(model: nn.Module) -> tuple[set[str], set[str]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    return {by_id[id(p)] for p in decay["params"]}, {by_id[id(p)] for p in no_decay["params"]}


def test_var_weight_decay_groups_match_the_reference():
    """The reference decays every >= 2-D weight (word_embed, class_emb, AdaLN linears included) except position and
    level embeddings, ada_gss and the attention temperature; norms and biases never."""
    model = VAR(vocab_size=16, z_channels=4, scales=(1, 2), num_classes=3, depth=2, embed_dim=8, num_heads=2,
                shared_aln=True)
    decay, no_decay = names_by_group(model)
    per_block_decay = {"attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"}
    per_block_no_decay = {"ada_gss", "attn.scale_mul", "attn.q_bias", "attn.v_bias", "attn.proj.bias", "mlp.fc1.bias",
                          "mlp.fc2.bias"}
    assert decay == {"word_embed.weight", "class_emb.weight", "shared_ada_lin.weight", "head_norm.ada_lin.weight",
                     "head.weight", *(f"blocks.{i}.{n}" for i in range(2) for n in per_block_decay)}
    assert no_decay == {"word_embed.bias", "pos_start", "pos_embed", "lvl_embed.weight", "shared_ada_lin.bias",
                        "head_norm.ada_lin.bias", "head.bias", *(f"blocks.{i}.{n}" for i in range(2) for n in per_block_no_decay)}
    decay, no_decay = names_by_group(VAR(vocab_size=16, z_channels=4, scales=(1, 2), num_classes=3, depth=1,
                                         embed_dim=8, num_heads=2))
    assert {"blocks.0.ada_lin.weight", "class_emb.weight"} <= decay and "blocks.0.ada_lin.bias" in no_decay


def test_vqvae_codebook_is_not_decayed():
    model = VQVAE(vocab_size=8, z_channels=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, scales=(1, 2))
    decay, no_decay = names_by_group(model)
    assert "quantizer.embedding.weight" in no_decay and "encoder.conv_in.weight" in decay
    assert all(n.endswith(("bias", "embedding.weight")) or model.get_parameter(n).ndim == 1 for n in no_decay)
    assert all(model.get_parameter(n).ndim >= 2 for n in decay)


def test_epoch_with_a_non_finite_loss_or_weight_is_refused():
    model = Tiny()
    check_epoch_finite(model, 3, {"train loss": 1.0, "val loss": 2.0})
    with pytest.raises(NonFiniteLossError, match=r"^epoch 3: non-finite val loss nan; stopping without writing"):
        check_epoch_finite(model, 3, {"train loss": 1.0, "val loss": math.nan})
    with torch.no_grad():
        model.lin.weight[0, 0] = math.inf
    with pytest.raises(NonFiniteLossError, match=r"^epoch 4: non-finite weights lin\.weight; "):
        check_epoch_finite(model, 4, {"train loss": 1.0})


def test_non_finite_loss_stops_with_message():
    watch = LossWatch(torch.device("cpu"))
    assert watch.update(torch.tensor(1.5), 3) and watch.check() == 1.5  # on the CPU: checked every step
    watch.update(torch.tensor(float("nan")), 7)
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 7"):
        watch.check()


def test_loss_watch_on_a_gpu_reads_the_device_only_every_few_steps_and_names_the_first_bad_step():
    watch = LossWatch(torch.device("cpu"), gpu_every=4)
    watch.every = 4  # what a CUDA device gets; the arithmetic is the same on the CPU
    due = [watch.update(torch.tensor(v), step) for step, v in enumerate([1.0, 2.0, float("inf"), float("nan"), 3.0])]
    assert due == [False, False, False, True, False]
    with pytest.raises(NonFiniteLossError, match="loss became inf at step 2"):  # the first bad one, not the latest
        watch.check()


def test_scaler_state_crosses_precisions(tmp_path):
    """bf16/fp32 runs save no scaler state; fp16 resumed from them starts afresh, and the reverse ignores it."""
    model = Tiny()
    path = tmp_path / "last.pth"

    def save(scaler):
        atomic_torch_save(training_state(model=model, model_config={}, config={}, scaler=scaler, epoch=1, step=1,
                                         optimizer=torch.optim.AdamW(model.parameters()), history=[],
                                         best_val_loss=1.0), path)

    def resume(scaler):
        return resume_training_checkpoint(path, Tiny(), torch.optim.AdamW(Tiny().parameters()), scaler, {})

    save(torch.amp.GradScaler("cpu", enabled=False))  # a bf16 run
    assert "scaler" not in torch.load(path, weights_only=True)
    fp16 = torch.amp.GradScaler("cpu", init_scale=1024.0)
    resume(fp16)
    assert fp16.get_scale() == 1024.0
    save(torch.amp.GradScaler("cpu", init_scale=256.0))  # an fp16 run ...
    resumed = torch.amp.GradScaler("cpu")
    resume(resumed)
    assert resumed.get_scale() == 256.0  # ... keeps its loss scale when resumed in fp16
    resume(torch.amp.GradScaler("cpu", enabled=False))  # and is ignored when resumed in bf16


def test_training_checkpoint_resumes_state_and_refuses_other_network(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.lin(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    path = tmp_path / "last.pth"
    atomic_torch_save(training_state(model=model, model_config={"width": 4}, config={"lr": 0.1}, optimizer=optimizer,
                                     epoch=2, step=20, history=[{"epoch": 1, "loss": 3.0}], best_val_loss=2.5), path)
    expected_next = torch.rand(3)

    fresh = Tiny()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    ckpt = resume_training_checkpoint(path, fresh, fresh_opt, None, {"width": 4})
    assert (ckpt["epoch"], ckpt["step"], ckpt["history"], ckpt["best_val_loss"]) == (2, 20, [{"epoch": 1, "loss": 3.0}], 2.5)
    assert torch.equal(fresh.lin.weight, model.lin.weight)
    assert torch.equal(fresh_opt.state[fresh.lin.weight]["exp_avg"], optimizer.state[model.lin.weight]["exp_avg"])
    assert torch.equal(torch.rand(3), expected_next)  # the random stream continues where it was saved
    with pytest.raises(CheckpointError, match="different network"):
        resume_training_checkpoint(path, Tiny(), torch.optim.AdamW(Tiny().parameters()), None, {"width": 8})
    with torch.no_grad():
        model.lin.weight[1, 1] = math.nan  # what an older version saved after a NaN on an epoch's last step
    atomic_torch_save(training_state(model=model, model_config={"width": 4}, config={}, optimizer=optimizer,
                                     epoch=3, step=30, history=[], best_val_loss=2.5), path)
    with pytest.raises(CheckpointError, match=r"last\.pth: holds non-finite weights \(lin\.weight; saved after a NaN\?\)"):
        resume_training_checkpoint(path, fresh, fresh_opt, None, {"width": 4})


class Recorded(DistContext):
    """One of two processes without a process group: each all_reduce_sum is recorded and adds the peer's."""

    def __init__(self, peer: torch.Tensor | None = None) -> None:
        super().__init__(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
        self.peer, self.calls = peer, []

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls.append(tensor.clone())
        if self.peer is not None:
            tensor += self.peer
        return tensor


def test_epoch_sums_are_reduced_once_in_name_order_whatever_order_the_names_came_in():
    mine, peer = EpochSums(), EpochSums()
    for step in range(3):
        mine.add(loss=torch.tensor(1.0 + step, dtype=torch.float64),
                 per_scale=torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        if step > 0:  # a term of only some steps (the adversarial ones once the discriminator starts)
            mine.add(gan=torch.tensor(10.0, dtype=torch.float64))
    for step in range(3):  # the other process reports the same names in another order
        if step > 0:
            peer.add(gan=torch.tensor(30.0, dtype=torch.float64))
        peer.add(per_scale=torch.tensor([[0.5, 0.5], [0.5, 0.5]]), loss=torch.tensor(5.0, dtype=torch.float64))
    capture = Recorded()
    peer.totals(capture)
    dist = Recorded(peer=capture.calls[0])
    totals = mine.totals(dist)
    assert len(dist.calls) == 1  # one all_reduce for every name
    assert list(totals) == ["loss", "per_scale", "gan"]  # first-reported order, for the history's key order
    assert totals["loss"].item() == 6.0 + 15.0 and totals["gan"].item() == 20.0 + 60.0
    assert totals["per_scale"].tolist() == [[4.5, 7.5], [10.5, 13.5]]
    assert mine.counts == {"loss": 3, "per_scale": 3, "gan": 2}
    # Means: over the two processes, then over the steps that reported each name.
    means = mine.means(Recorded(peer=capture.calls[0]))
    assert means["gan"] == (20.0 + 60.0) / 2 / 2 and means["loss"] == 21.0 / 2 / 3
    assert means["per_scale"] == [[4.5 / 6, 7.5 / 6], [10.5 / 6, 13.5 / 6]]


def test_epoch_sums_keep_the_dtype_and_never_alias_what_was_added():
    sums = EpochSums()
    first = torch.tensor([1.0, 2.0], requires_grad=True)
    sums.add(x=first)
    sums.add(x=torch.tensor([0.5, 0.5]))
    assert first.tolist() == [1.0, 2.0] and not sums.sums["x"].requires_grad
    assert sums.sums["x"].dtype == torch.float32 and sums.sums["x"].tolist() == [1.5, 2.5]
    # Kept in float64 when asked: float32 losses add up without losing digits.
    wide, narrow = EpochSums(torch.float64), EpochSums()
    for value in (1.0, 1e-8, 1e-8):
        wide.add(loss=torch.tensor(value, dtype=torch.float32))
        narrow.add(loss=torch.tensor(value, dtype=torch.float32))
    assert wide.sums["loss"].dtype == torch.float64 and narrow.sums["loss"].item() == 1.0
    assert wide.sums["loss"].item() == pytest.approx(1.0 + 2 * float(torch.tensor(1e-8)), rel=0, abs=1e-15)
