"""common/sample_metrics.py against exact values, hand computations and the libraries called directly.

Its rules: the exact pair order at the all-pairs boundary, the
PSNR cap and the SSIM border of the masked scores, and every refusal fed its bad input.

The feature-space metrics (fidelity and coverage, feature diversity, copy detection) and the bootstrap, pinned
against values worked out by hand on tiny inputs."""
from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity
from torch_fidelity.metric_prc import prc_features_to_metric
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

from common import sample_metrics
from common.image_data import to_grey_uint8
from common.sample_metrics import (MSSSIM_BETAS, above_threshold, bootstrap_weights, class_thresholds, diversity,
                                   feature_diversity, fidelity_coverage, grey_uint8, knn_radii, masked_psnr_ssim,
                                   matched_subsample, msssim_betas, msssim_levels, nearest_neighbours,
                                   percentile_interval, psnr_ssim, sample_pairs, teacher_similarity, token_agreement,
                                   token_usage_entropy)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def smooth_image(side: int, fx: float, fy: float) -> np.ndarray:
    """A grey (side, side, 3) uint8 pattern with structure at several scales (MS-SSIM's coarse levels see it)."""
    yy, xx = np.mgrid[:side, :side]
    grey = 128 + 60 * np.sin(xx / fx) * np.cos(yy / fy) + 0.2 * (xx - yy)
    return np.repeat(np.clip(grey, 0, 255).round().astype(np.uint8)[..., None], 3, axis=-1)


# Tokens.

def test_entropy_of_uniform_tokens_is_log2_vocab_and_of_constant_tokens_zero():
    rng = np.random.default_rng(0)
    balanced = rng.permutation(np.repeat(np.arange(16), 3)).reshape(6, 8)  # every id exactly 3 times
    assert token_usage_entropy(balanced, 16) == (1.0, 4.0)
    usage, entropy = token_usage_entropy(rng.permutation(np.repeat(np.arange(10), 7)).reshape(7, 10), 10)
    assert usage == 1.0 and entropy == pytest.approx(math.log2(10), abs=1e-12)
    assert token_usage_entropy(np.full((4, 5, 5), 3, dtype=np.int16), 16) == (1 / 16, 0.0)


def test_usage_and_entropy_of_a_handmade_map():
    maps = np.array([[0, 0, 3], [3, 3, 7]])  # counts 2, 3, 1 of 6 tokens; 3 of 10 ids used
    usage, entropy = token_usage_entropy(maps, 10)
    assert usage == 0.3
    assert entropy == pytest.approx(-(2 / 6 * math.log2(2 / 6) + 3 / 6 * math.log2(3 / 6) + 1 / 6 * math.log2(1 / 6)),
                                    abs=1e-12)


@pytest.mark.parametrize("maps, match", [(np.array([0, 10]), r"\[0, 10\), found 0..10"),
                                         (np.array([-1, 2]), r"found -1..2"),
                                         (np.array([0.0, 1.0]), "integer ids"),
                                         (np.zeros(0, dtype=np.int64), "no tokens")])
def test_token_ids_outside_the_vocabulary_are_refused(maps, match):
    with pytest.raises(ValueError, match=match):
        token_usage_entropy(maps, 10)


def test_matched_subsample_keeps_as_many_real_rows_as_samples():
    assert matched_subsample(5, 10, seed=0).tolist() == [0, 1, 2, 3, 4]
    rows = matched_subsample(100, 10, seed=3)
    assert len(np.unique(rows)) == 10 and rows.min() >= 0 and rows.max() < 100 and np.all(np.diff(rows) > 0)
    assert np.array_equal(rows, matched_subsample(100, 10, seed=3))
    assert not np.array_equal(rows, matched_subsample(100, 10, seed=4))


# Diversity.

def test_msssim_level_count_and_weights():
    assert [msssim_levels(s) for s in (64, 128, 256)] == [3, 4, 5]
    # The coarsest level must exceed 10 px (side > 10 * 2^(L-1)) and torchmetrics' side // (L-1)^2 > 10 must hold.
    assert [msssim_levels(s) for s in (11, 20, 21, 43, 44, 98, 99, 175, 176, 1000)] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    with pytest.raises(ValueError, match="too small"):
        msssim_levels(10)
    assert msssim_betas(5) == MSSSIM_BETAS
    head = MSSSIM_BETAS[:3]
    assert msssim_betas(3) == pytest.approx([b / sum(head) for b in head], abs=1e-15)
    assert math.fsum(msssim_betas(3)) == pytest.approx(1.0, abs=1e-15)


def test_torchmetrics_accepts_the_level_count_at_every_side():
    rng = np.random.default_rng(0)
    for side in range(11, 181):
        images = rng.integers(0, 256, (2, side, side, 3), dtype=np.uint8)
        value, n_pairs = diversity(images)
        assert n_pairs == 1 and 0.0 <= value <= 1.0, side


def test_diversity_of_identical_images_is_zero():
    image = smooth_image(64, 5, 7)
    assert diversity(np.stack([image] * 3)) == (pytest.approx(0.0, abs=1e-6), 3)


def test_diversity_of_very_different_images_is_large_and_never_nan():
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    # Opposite structure: SSIM is negative at some level; normalize="relu" makes MS-SSIM 0, not NaN.
    assert diversity(np.concatenate([noise, 255 - noise])) == (1.0, 1)
    value, _ = diversity(np.stack([smooth_image(64, 5, 7), smooth_image(64, 2, 13)]))
    assert 0.3 < value <= 1.0


def test_noise_is_more_diverse_than_perturbed_copies():
    rng = np.random.default_rng(2)
    base = smooth_image(64, 5, 7).astype(np.float64)
    copies = np.clip(base[None] + rng.normal(0, 3, (8, 64, 64, 1)), 0, 255).round().astype(np.uint8)
    noise = rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    copies_value, copies_pairs = diversity(copies)
    noise_value, noise_pairs = diversity(noise)
    assert copies_pairs == noise_pairs == 28
    assert 0.0 < copies_value < 0.05 and noise_value > 0.9


STANDARD_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


@pytest.mark.parametrize("side, betas", [
    (256, STANDARD_BETAS),  # the published metric, unchanged
    (128, tuple(b / sum(STANDARD_BETAS[:4]) for b in STANDARD_BETAS[:4])),
    (64, tuple(b / sum(STANDARD_BETAS[:3]) for b in STANDARD_BETAS[:3])),
])
def test_diversity_is_torchmetrics_msssim_with_the_first_betas(side, betas):
    images = np.stack([smooth_image(side, 9, 14), smooth_image(side, 6, 23)])
    value, n_pairs = diversity(images)
    a, b = (torch.from_numpy(images[k : k + 1]).permute(0, 3, 1, 2).float() / 255 for k in (0, 1))
    direct = multiscale_structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=11, betas=betas)
    assert n_pairs == 1 and 0.05 < value < 0.95
    assert value == pytest.approx(1 - direct.item(), abs=1e-6)


def test_diversity_batches_do_not_change_the_mean():
    images = np.random.default_rng(3).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    images[3] = images[0]
    one_batch, n = diversity(images)
    several, m = diversity(images, pairs_per_batch=4)
    assert n == m == 15 and one_batch == pytest.approx(several, abs=1e-6)


def test_pair_subsampling_is_exact_distinct_and_seeded():
    assert sorted(map(tuple, sample_pairs(5, 10).tolist())) == list(itertools.combinations(range(5), 2))
    pairs = sample_pairs(50, 1224, seed=1)  # all but one of the 1225 pairs: every pair number maps to a valid pair
    assert pairs.shape == (1224, 2) and len(set(map(tuple, pairs.tolist()))) == 1224
    assert np.all(pairs[:, 0] < pairs[:, 1]) and pairs.min() >= 0 and pairs.max() < 50
    big = sample_pairs(20_000, 2000, seed=7)
    assert len(set(map(tuple, big.tolist()))) == 2000 and np.all(big[:, 0] < big[:, 1]) and big.max() < 20_000
    assert np.array_equal(big, sample_pairs(20_000, 2000, seed=7))
    assert not np.array_equal(big, sample_pairs(20_000, 2000, seed=8))
    assert sample_pairs(1, 5).shape == (0, 2)
    with pytest.raises(ValueError, match="max_pairs"):
        sample_pairs(5, 0)


def test_diversity_uses_max_pairs_and_handles_tiny_sets():
    images = np.random.default_rng(4).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    value, n_pairs = diversity(images, max_pairs=5, seed=2)
    assert n_pairs == 5 and diversity(images, max_pairs=5, seed=2) == (value, 5)
    for tiny in (images[:1], images[:0]):
        value, n_pairs = diversity(tiny)
        assert math.isnan(value) and n_pairs == 0


@pytest.mark.parametrize("images, match", [(np.zeros((2, 64, 64, 3), dtype=np.float32), "uint8"),
                                           (np.zeros((2, 64, 64), dtype=np.uint8), "uint8"),
                                           (np.zeros((2, 64, 48, 3), dtype=np.uint8), "square")])
def test_diversity_refuses_other_images(images, match):
    with pytest.raises(ValueError, match=match):
        diversity(images)


# Similarity to the teacher.

def test_teacher_similarity_of_identical_and_offset_images():
    reference = smooth_image(64, 5, 7)
    assert reference.max() <= 245
    offset = reference + np.uint8(10)
    tinted = reference.astype(np.int16) + np.array([-1, 0, 1])  # same channel mean: the same grey image
    psnr, ssim = teacher_similarity(np.stack([reference, offset, tinted.astype(np.uint8)]), reference)
    assert psnr.tolist() == [100.0, pytest.approx(20 * math.log10(255 / 10), abs=1e-9), 100.0]
    assert ssim[0] == ssim[2] == 1.0 and 0.9 < ssim[1] < 1.0


def test_grey_conversion_matches_the_one_of_vqvae_scoring():
    images = np.random.default_rng(5).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    as_model_output = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert np.array_equal(grey_uint8(images), to_grey_uint8(as_model_output))


def test_teacher_similarity_refuses_a_reference_of_another_size():
    with pytest.raises(ValueError, match="do not match the reference"):
        teacher_similarity(np.zeros((2, 64, 64, 3), dtype=np.uint8), np.zeros((32, 32, 3), dtype=np.uint8))


# Nearest neighbours and copies.

def brute_force(query: np.ndarray, bank: np.ndarray, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ b.T.astype(np.float64)
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    return sims.max(axis=1), sims.argmax(axis=1)


@pytest.mark.parametrize("chunk", [1, 7, 8, 1024])
def test_nearest_neighbours_match_brute_force(chunk):
    rng = np.random.default_rng(6)
    query, bank = rng.normal(size=(37, 16)).astype(np.float32), rng.normal(size=(53, 16)).astype(np.float32)
    sims, index = nearest_neighbours(query, bank, chunk=chunk)
    want_sims, want_index = brute_force(query, bank, exclude_self=False)
    assert np.array_equal(index, want_index) and np.allclose(sims, want_sims, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 8, 1024])
def test_nearest_neighbours_exclude_self(chunk):
    rng = np.random.default_rng(7)
    bank = rng.normal(size=(41, 16)).astype(np.float32)
    bank[17] = 3 * bank[5]  # same direction: each other's neighbour at similarity 1
    sims, index = nearest_neighbours(bank, bank, exclude_self=True, chunk=chunk)
    want_sims, want_index = brute_force(bank, bank, exclude_self=True)
    assert np.array_equal(index, want_index) and np.allclose(sims, want_sims, atol=1e-6)
    assert np.all(index != np.arange(41)) and index[5] == 17 and index[17] == 5
    assert sims[5] == pytest.approx(1.0, abs=1e-6)
    self_sims, self_index = nearest_neighbours(bank, bank, chunk=chunk)
    assert np.array_equal(self_index[[0, 1, 2]], [0, 1, 2]) and np.allclose(self_sims, 1.0, atol=1e-6)


@pytest.mark.parametrize("query, bank, kwargs, match", [
    (np.ones((3, 4)), np.ones((5, 6)), {}, "feature matrices"),
    (np.ones((3, 4)), np.ones((5, 4)), {"exclude_self": True}, "query to be the bank"),
    (np.ones((1, 4)), np.ones((1, 4)), {"exclude_self": True}, "no neighbour"),
    (np.ones((3, 4)), np.zeros((5, 4)), {}, "non-zero"),
])
def test_nearest_neighbours_refuse_bad_input(query, bank, kwargs, match):
    with pytest.raises(ValueError, match=match):
        nearest_neighbours(query, bank, **kwargs)


def test_masked_psnr_and_ssim_score_only_the_masked_pixels() -> None:
    reference = np.full((32, 32), 100, np.uint8)
    image = reference.copy()
    image[:, 16:] += 10  # inside the mask: every pixel off by 10 grey levels
    image[:, :4] = 255  # outside: far off, and must not count
    mask = np.zeros((32, 32), bool)
    mask[:, 16:] = True
    psnr, _ = masked_psnr_ssim(reference, image, mask)
    assert psnr == pytest.approx(20 * np.log10(255 / 10), abs=1e-12)  # 28.1308 dB: MSE 100 over the masked pixels
    assert psnr_ssim(reference, image)[0] < 15  # the whole image, with its far-off strip, scores much lower
    # SSIM: identical inside a mask whose 7x7 windows never reach the changed strip -> exactly 1 there.
    image = reference.copy()
    image[:, :4] = 255
    mask = np.zeros((32, 32), bool)
    mask[:, 8:] = True
    assert masked_psnr_ssim(reference, image, mask) == (sample_metrics.PSNR_CAP, pytest.approx(1.0, abs=1e-12))
    assert psnr_ssim(reference, image)[1] < 0.9
    assert all(np.isnan(masked_psnr_ssim(reference, image, np.zeros((32, 32), bool))))


def test_token_usage_refuses_an_empty_vocabulary_and_counts_a_vocabulary_of_one() -> None:
    for vocab in (0, -3):
        with pytest.raises(ValueError, match=f"vocab_size must be positive, got {vocab}"):
            token_usage_entropy(np.zeros(4, np.int64), vocab)
    usage, entropy = token_usage_entropy(np.zeros((2, 2), np.int64), 1)
    assert (usage, entropy) == (1.0, 0.0) and math.copysign(1.0, entropy) == 1.0  # +0.0, not -0.0
    usage, entropy = token_usage_entropy(np.array([0, 1, 1, 1], np.uint8), 8)
    assert usage == 0.25 and entropy == pytest.approx(-(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)), abs=1e-12)


def test_matched_subsample_bounds() -> None:
    for n_real, n in ((-1, 3), (3, -1)):
        with pytest.raises(ValueError, match=rf"non-negative, got n_real={n_real}, n={n}"):
            matched_subsample(n_real, n)
    assert matched_subsample(6, 6, seed=9).tolist() == [0, 1, 2, 3, 4, 5]
    assert matched_subsample(7, 6, seed=9).shape == (6,)
    assert matched_subsample(7, 0).shape == (0,)


def test_all_pairs_come_in_order_when_max_pairs_allows_exactly_all() -> None:
    assert sample_pairs(4, 6).tolist() == [[0, 1], [0, 2], [1, 2], [0, 3], [1, 3], [2, 3]]
    assert sample_pairs(4, 6).dtype == np.int64
    five = sample_pairs(4, 5, seed=0)
    assert five.shape == (5, 2) and len({tuple(p) for p in five.tolist()}) == 5
    assert {tuple(p) for p in five.tolist()} < {(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)}
    with pytest.raises(ValueError, match="max_pairs must be positive, got -2"):
        sample_pairs(4, -2)


def test_diversity_refuses_bad_batches_and_bad_images() -> None:
    images = np.zeros((3, 32, 32, 3), np.uint8)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"pairs_per_batch must be positive, got {bad}"):
            diversity(images, pairs_per_batch=bad)
    with pytest.raises(ValueError, match=r"images must be uint8 \(N, H, W, 3\), got uint8 \(3, 32, 32, 4\)"):
        diversity(np.zeros((3, 32, 32, 4), np.uint8))
    with pytest.raises(ValueError, match="images must be square, got 32x30 px"):
        diversity(np.zeros((3, 32, 30, 3), np.uint8))
    # one pair per batch gives the mean of the three pairs, as one batch does
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    one, n_one = diversity(images, pairs_per_batch=1)
    assert n_one == 3 and one == pytest.approx(diversity(images)[0], abs=1e-12)


def test_masked_psnr_is_capped_and_the_ssim_border_is_left_out() -> None:
    side = 460  # 211600 px: one grey level off in one pixel is an MSE of 4.7e-6, above the 100 dB cap
    reference = np.full((side, side), 90, np.uint8)
    image = reference.copy()
    image[200, 200] = 91
    mask = np.ones((side, side), bool)
    psnr, ssim = masked_psnr_ssim(reference, image, mask)
    assert 10 * math.log10(255 ** 2 * side * side) > 100 and psnr == 100.0
    assert 0.99 < ssim < 1.0
    # a mask of only the 3-px border: PSNR from its pixels, SSIM nan (the border's SSIM values do not count)
    small = np.full((16, 16), 50, np.uint8)
    other = small.copy()
    other[:3] = 60
    border = np.zeros((16, 16), bool)
    border[:3] = True
    psnr, ssim = masked_psnr_ssim(small, other, border)
    assert psnr == pytest.approx(20 * math.log10(255 / 10), abs=1e-12) and math.isnan(ssim)
    # one pixel inside the border is enough for an SSIM
    border[3, 3] = True
    assert not math.isnan(masked_psnr_ssim(small, other, border)[1])
    with pytest.raises(ValueError, match=r"shapes differ: reference \(16, 16\), image \(16, 15\), mask \(16, 16\)"):
        masked_psnr_ssim(small, other[:, :15], border)
    with pytest.raises(ValueError, match=r"shapes differ: reference \(16, 16\), image \(16, 16\), mask \(16, 15\)"):
        masked_psnr_ssim(small, other, border[:, :15])


def test_teacher_similarity_refuses_bad_samples_or_reference() -> None:
    good = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match=r"samples must be uint8 \(N, H, W, 3\), got float32"):
        teacher_similarity(good.astype(np.float32), good[0])
    with pytest.raises(ValueError, match=r"reference must be uint8 \(N, H, W, 3\), got int16"):
        teacher_similarity(good, good[0].astype(np.int16))
    with pytest.raises(ValueError, match="reference must be square, got 16x8 px"):
        teacher_similarity(good, good[0, :, :8])
    psnr, ssim = teacher_similarity(good[:1], good[0])
    assert psnr.shape == ssim.shape == (1,) and psnr[0] == 100.0


def test_nearest_neighbours_refusals_name_the_input() -> None:
    ones = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="chunk must be positive, got 0"):
        nearest_neighbours(ones, ones, chunk=0)
    with pytest.raises(ValueError, match="the bank has 0 vectors"):
        nearest_neighbours(ones, np.ones((0, 4), np.float32))
    assert nearest_neighbours(ones[:1], ones[:1])[1].tolist() == [0]  # one bank vector is enough without exclude_self
    assert nearest_neighbours(ones[:2], ones[:2], exclude_self=True)[1].tolist() == [1, 0]
    with pytest.raises(ValueError, match="feature matrices"):
        nearest_neighbours(ones[0], ones)
    with pytest.raises(ValueError, match="feature matrices"):
        nearest_neighbours(ones, ones[0])
    bad = ones.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="query: every feature vector must be finite and non-zero"):
        nearest_neighbours(bad, ones)
    bad[1] = 0
    with pytest.raises(ValueError, match="bank: every feature vector must be finite and non-zero"):
        nearest_neighbours(ones, bad)


def test_nearest_neighbour_similarity_is_the_cosine() -> None:
    query = np.array([[3.0, 4.0]], np.float32)
    bank = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]], np.float32)
    sims, index = nearest_neighbours(query, bank)
    assert index.tolist() == [1] and sims[0] == pytest.approx(0.8, abs=1e-7)
    assert sims.dtype == np.float32 and index.dtype == np.int64


def test_the_empty_map_message_is_exact() -> None:
    with pytest.raises(ValueError, match="^no tokens to count$"):
        token_usage_entropy(np.zeros((0, 3), np.int64), 4)


def test_subsample_and_pair_draws_default_to_seed_0_and_never_repeat_a_row() -> None:
    assert np.array_equal(matched_subsample(100, 10), matched_subsample(100, 10, seed=0))
    assert not np.array_equal(matched_subsample(100, 10), matched_subsample(100, 10, seed=1))
    assert np.array_equal(sample_pairs(50, 10), sample_pairs(50, 10, seed=0))
    assert not np.array_equal(sample_pairs(50, 10), sample_pairs(50, 10, seed=1))
    # 9 of 10 rows: a draw with replacement would repeat one (all distinct has probability 3.6e-4)
    for seed in range(3):
        assert len(set(matched_subsample(10, 9, seed=seed).tolist())) == 9
    assert matched_subsample(0, 3).tolist() == [] and matched_subsample(0, 0).tolist() == []


def test_one_pair_is_allowed_and_no_pairs_are_still_integers() -> None:
    assert sample_pairs(2, 1).tolist() == [[0, 1]]
    one = sample_pairs(4, 1, seed=5)
    assert one.shape == (1, 2) and one[0, 0] < one[0, 1] <= 3
    for n in (0, 1):
        empty = sample_pairs(n, 5)
        assert empty.shape == (0, 2) and empty.dtype == np.int64


def test_an_image_without_its_batch_axis_is_refused_as_not_n_h_w_3() -> None:
    with pytest.raises(ValueError, match=r"^images must be uint8 \(N, H, W, 3\), got uint8 \(32, 32, 3\)$"):
        diversity(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"^samples must be uint8 \(N, H, W, 3\), got uint8 \(16, 16, 3\)$"):
        teacher_similarity(np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.uint8))


def test_grey_images_are_uint8() -> None:
    grey = grey_uint8(np.array([[[[10, 11, 11], [0, 0, 1]]]], np.uint8))
    assert grey.dtype == np.uint8 and grey.tolist() == [[[11, 0]]]


def test_ssim_uses_data_range_255_and_identical_images_warn_nothing() -> None:
    # Low contrast, where SSIM's constants C1 = (0.01 L)^2 and C2 = (0.03 L)^2 weigh: L = 256 would shift it.
    rng = np.random.default_rng(3)
    reference = rng.integers(100, 104, (24, 24)).astype(np.uint8)
    image = np.clip(reference.astype(np.int16) + rng.integers(-1, 2, (24, 24)), 0, 255).astype(np.uint8)
    want = structural_similarity(reference, image, data_range=255)
    assert abs(want - structural_similarity(reference, image, data_range=256)) > 5e-5  # the test can tell them apart
    psnr, ssim = psnr_ssim(reference, image)
    assert ssim == want
    assert psnr == pytest.approx(10 * math.log10(255 ** 2 / np.mean((reference - image.astype(np.float64)) ** 2)),
                                 abs=1e-12)
    # the masked score over the whole image is the unmasked one (both leave out the 3-px border)
    full = masked_psnr_ssim(reference, image, np.ones((24, 24), bool))
    assert full == (pytest.approx(psnr, abs=1e-12), pytest.approx(want, abs=1e-12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero for MSE 0, no mean of an empty slice
        assert psnr_ssim(reference, reference) == (100.0, 1.0)
        border = np.zeros((24, 24), bool)
        border[:, :3] = True
        psnr, ssim = masked_psnr_ssim(reference, image, border)
        assert not math.isnan(psnr) and math.isnan(ssim)


def test_a_size_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"^samples of shape \(16, 16, 3\) do not match the reference of shape "
                                         r"\(8, 8, 3\)$"):
        teacher_similarity(np.zeros((2, 16, 16, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))


def test_nearest_neighbours_score_in_float32_whatever_the_input() -> None:
    # Cosines 1 - 2e-8 and 1 - 5e-9 are both 1.0 in float32 (the (chunk, Nb) block's type): a tie the first wins.
    # Scored in float64, the second bank vector would win.
    query = np.array([[1.0, 0.0]])
    bank = np.array([[1.0, 2e-4], [1.0, 1e-4]])
    sims, index = nearest_neighbours(query, bank)
    assert index.tolist() == [0] and sims.tolist() == [1.0]


def test_fidelity_coverage_by_hand_on_a_line():
    # Real 0, 1, 3: k=1 radii 1, 1, 2. Generated 0.5, 10: radii 9.5, 9.5.
    real, gen = np.array([[0.0], [1.0], [3.0]]), np.array([[0.5], [10.0]])
    out = fidelity_coverage(gen, real, k=1)
    assert out["precision"] == 0.5  # 0.5 lies in the balls of 0 and 1; 10 in none
    assert out["recall"] == 1.0  # every real point lies in 0.5's ball of radius 9.5
    assert out["density"] == 1.0  # (2 balls + 0 balls) / (k * 2 samples)
    assert out["coverage"] == pytest.approx(2 / 3)  # 3's ball (radius 2) holds no sample
    weighted = fidelity_coverage(gen, real, k=1, generated_weights=np.array([2.0, 1.0]))
    assert weighted["precision"] == pytest.approx(2 / 3) and weighted["density"] == pytest.approx(4 / 3)
    # A replicate without the real image at 3: its ball leaves the averages, the other balls keep their radii.
    dropped = fidelity_coverage(gen, real, k=1, real_weights=np.array([1.0, 1.0, 0.0]))
    assert dropped == {"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 1.0}
    assert math.isnan(fidelity_coverage(gen, real, k=2)["precision"])  # 2 samples cannot have a 2nd neighbour


def test_subject_groups_bound_the_balls_by_other_subjects_by_hand():
    # Subject a: frames at 0 and 0.1; subject b: 5 and 5.1. Alone, each frame's k=1 ball reaches only its twin
    # (radius 0.1); by subject, it reaches the nearest frame of the other subject: radii 5, 4.9, 4.9, 5.0.
    real, groups = np.array([[0.0], [0.1], [5.0], [5.1]]), np.array(["a", "a", "b", "b"])
    gen = np.array([[2.5], [20.0]])  # k=1 radii 17.5 each
    assert knn_radii(real, 1).tolist() == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert knn_radii(real, 1, groups).tolist() == pytest.approx([5.0, 4.9, 4.9, 5.0])
    assert fidelity_coverage(gen, real, k=1) == {"precision": 0.0, "recall": 1.0, "density": 0.0, "coverage": 0.0}
    out = fidelity_coverage(gen, real, k=1, real_groups=groups)
    assert out == pytest.approx({"precision": 0.5, "recall": 1.0, "density": 2.0, "coverage": 1.0})
    assert knn_radii(real, 2, groups).tolist() == pytest.approx([5.1, 5.0, 5.0, 5.1])
    assert math.isnan(fidelity_coverage(gen, real, k=3, real_groups=groups)["coverage"])  # 2 frames outside each
    with pytest.raises(ValueError, match=r"1 <= k <= 2"):
        knn_radii(real, 3, groups)
    with pytest.raises(ValueError, match=r"a group per row \(4\)"):
        knn_radii(real, 1, groups[:3])


def test_subject_groups_let_coverage_tell_a_collapsed_set_from_an_honest_one():
    # 12 subjects of 5 near-identical frames each. Without groups every real ball is one subject's frame jitter, so
    # an honest set (new subjects of the same distribution) and a collapsed one both cover nothing.
    rng = np.random.default_rng(2)
    subjects = rng.normal(size=(12, 8))
    real = np.repeat(subjects, 5, axis=0) + rng.normal(scale=0.05, size=(60, 8))
    groups = np.repeat(np.arange(12), 5)
    honest = rng.normal(size=(30, 8))
    collapsed = subjects[:1] + rng.normal(scale=0.3, size=(30, 8))
    assert fidelity_coverage(honest, real, 3)["coverage"] == fidelity_coverage(collapsed, real, 3)["coverage"] == 0
    fair, col = (fidelity_coverage(g, real, 3, real_groups=groups) for g in (honest, collapsed))
    assert fair["coverage"] > 2 * col["coverage"] and col["recall"] < 0.1 < fair["recall"]
    # New frames of the same subjects, grouped alike, cover everything (the RECON row's situation).
    again = np.repeat(subjects, 5, axis=0) + rng.normal(scale=0.05, size=(60, 8))
    assert fidelity_coverage(again, real, 3, generated_groups=groups, real_groups=groups)["coverage"] == 1.0


def test_precision_and_recall_equal_torch_fidelitys():
    rng = np.random.default_rng(0)
    gen, real = rng.normal(size=(40, 16)), rng.normal(0.3, 1.2, size=(30, 16))
    ours = fidelity_coverage(gen, real, k=3)
    theirs = prc_features_to_metric(torch.from_numpy(gen).float(), torch.from_numpy(real).float(),
                                    prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1
    assert (ours["precision"], ours["recall"]) == pytest.approx((theirs["precision"], theirs["recall"]))


def test_a_memoriser_and_a_collapsed_set_each_show_in_one_number():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(60, 8))
    memoriser = real[:30] + 1e-3  # near-copies of half the real images
    collapsed = real[:1] + rng.normal(scale=0.05, size=(30, 8))  # everything near one image
    honest = rng.normal(size=(30, 8))
    mem, col, fair = (fidelity_coverage(g, real, k=3) for g in (memoriser, collapsed, honest))
    assert mem["precision"] == 1.0 and mem["density"] > 1.5 * fair["density"]
    assert col["coverage"] < 0.5 * fair["coverage"] and col["recall"] < 0.1 < fair["recall"]


def test_feature_diversity_by_hand():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # cosines 0, 1/sqrt2, 1/sqrt2
    assert feature_diversity(x) == pytest.approx(1 - math.sqrt(2) / 3)
    # Counts 2, 1, 1: pairs (0,1) and (0,2) twice each, (1,2) once; an image with its repeat is no pair.
    assert feature_diversity(x, np.array([2.0, 1.0, 1.0])) == pytest.approx(1 - 3 / math.sqrt(2) / 5)
    assert feature_diversity(np.ones((4, 3))) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(feature_diversity(x[:1]))


def test_token_agreement_finds_the_bank_row_with_most_equal_positions():
    bank = np.array([[1, 2, 0, 0], [1, 2, 3, 0], [9, 9, 9, 9]])
    share, index = token_agreement(np.array([[1, 2, 3, 4], [9, 9, 9, 9]]), bank)
    assert share.tolist() == [0.75, 1.0] and index.tolist() == [1, 2]


def test_thresholds_are_the_largest_held_out_similarity_per_class():
    thresholds = class_thresholds(np.array([0.5, 0.7, 0.6]), np.array([0, 0, 1]), 3)
    assert thresholds[:2].tolist() == [0.7, 0.6] and math.isnan(thresholds[2])
    halfway = class_thresholds(np.array([0.5, 0.7, 0.6]), np.array([0, 0, 1]), 3, margin=0.5)
    assert halfway[:2] == pytest.approx([0.85, 0.8]) and math.isnan(halfway[2])  # half of the way to 1
    flags = above_threshold(np.array([0.71, 0.7, 0.61, 0.99]), np.array([0, 0, 1, 2]), thresholds)
    assert flags.tolist() == [True, False, True, False]  # equal is not above; a class without a threshold never


def test_bootstrap_weights_resample_each_set_and_pair_the_reference_draws():
    weights = bootstrap_weights(5, 7, 50, seed=3)
    assert len(weights) == 50 and all(w1.sum() == 5 and w2.sum() == 7 for w1, w2 in weights)
    other = bootstrap_weights(9, 7, 50, seed=3)
    assert all(np.array_equal(w2, v2) for (_, w2), (_, v2) in zip(weights, other))
    assert not all(np.array_equal(w1, weights[0][0]) for w1, _ in weights)
    assert percentile_interval(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
    assert percentile_interval(np.array([1.0, math.nan, 3.0]), 1.0) == (1.0, 3.0)
