import pytest
import torch
from torch import nn

from common.checkpoint import CheckpointError
from common.training import (LossWatch, NonFiniteLossError, lr_at, param_groups, resume_training_checkpoint,
                             save_training_checkpoint)


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, total_steps=100, warmup_steps=10, peak_lr=1.0, final_ratio=0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(0.1)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.scale_mul = nn.Parameter(torch.ones(1, 2, 1, 1))


def test_param_groups_skip_decay_on_norms_biases_embeddings():
    model = Tiny()
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and [p.shape for p in decay["params"]] == [model.lin.weight.shape]
    assert len(no_decay["params"]) == 5 and no_decay["weight_decay"] == 0.0
    assert any(p is model.scale_mul for p in no_decay["params"])


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
        save_training_checkpoint(path, model=model, model_config={}, config={}, scaler=scaler, epoch=1, step=1,
                                 optimizer=torch.optim.AdamW(model.parameters()), history=[], best_val_loss=1.0)

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
    save_training_checkpoint(path, model=model, model_config={"width": 4}, config={"lr": 0.1}, optimizer=optimizer,
                             epoch=2, step=20, history=[{"epoch": 1, "loss": 3.0}], best_val_loss=2.5)
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
