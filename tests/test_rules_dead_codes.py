"""train_vqvae.DeadCodes pinned down: which counters reset, when a code counts as dead, which rows and optimizer
moments a re-initialisation touches, and that the new codes are residuals of the batch at the quantizer's scales."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.distributed import DistContext
from models.vqvae import VQVAE
from train_vqvae import DeadCodes

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


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
    codes.reinit(model, optimizer, feats, dead, CPU, seed=4, step=7, pool_images=3)

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
    DeadCodes(12, 1, torch.device("cpu")).reinit(again, optimizer_again, feats, dead, CPU, seed=4, step=7, pool_images=3)
    assert torch.equal(again.quantizer.embedding.weight[dead], weight[dead])
    other, optimizer_other, _ = tiny_setup()
    DeadCodes(12, 1, torch.device("cpu")).reinit(other, optimizer_other, feats, dead, CPU, seed=4, step=8, pool_images=3)
    assert not torch.equal(other.quantizer.embedding.weight[dead], weight[dead])


def test_reinit_draws_only_from_the_first_pool_images_and_repeats_when_the_pool_is_small():
    model, optimizer, feats = tiny_setup(vocab=40)
    weight = model.quantizer.embedding.weight
    first = residual_pool(model, feats[:1].float())  # 1 + 4 + 9 = 14 vectors
    dead = torch.arange(20)
    DeadCodes(40, 1, torch.device("cpu")).reinit(model, optimizer, feats, dead, CPU, seed=0, step=1, pool_images=1)
    rows = weight[dead].detach()
    assert all((row - first).abs().amax(1).min() < 1e-5 for row in rows)  # the other two images are not drawn from
    assert len({tuple(r) for r in rows.tolist()}) <= 14  # 20 codes from 14 vectors: some repeat
