"""common/sample_metrics.py rules the first tests left open: the exact pair order at the all-pairs boundary, the
PSNR cap and the SSIM border of the masked scores, and every refusal fed its bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest

from common.sample_metrics import (copy_fraction, diversity, masked_psnr_ssim, matched_subsample, nearest_neighbours,
                                   sample_pairs, teacher_similarity, token_usage_entropy)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_copy_fraction_refuses_no_samples() -> None:
    with pytest.raises(ValueError, match="need samples and references, got 0 and 2"):
        copy_fraction(np.array([]), np.array([0.1, 0.2]))
    assert copy_fraction(np.array([0.3, 0.2, 0.25, 0.1]), np.array([0.2])) == 0.5
