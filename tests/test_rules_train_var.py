"""train_var.py's rule functions at non-default settings: every constant's allowed range at its edges, the exact
losses and per-scale sums, the seeded streams of class dropout and token copies, the model a config builds, the
fine-tuning class rows, the KID probe's refusals and bookkeeping, and the wording of each refusal (issue 16)."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_var
from common.checkpoint import CheckpointError
from common.config import ConfigError
from common.distributed import DistContext
from common.fidelity import FidelityError
from common.io import atomic_torch_save, file_sha256
from common.plotting import save_image
from common.tokens import TokenFileError, TokenSet, load_tokens, save_tokens
from models.var import VAR, SamplingSettings
from models.vqvae import VQVAE

from config_refusal import assert_edges, refusal_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")

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
