"""common/sample_metrics.py rules the first tests left open: the exact pair order at the all-pairs boundary, the
PSNR cap and the SSIM border of the masked scores, and every refusal fed its bad input."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from common.sample_metrics import (diversity, grey_uint8, masked_psnr_ssim, matched_subsample,
                                   nearest_neighbours, psnr_ssim, sample_pairs, teacher_similarity,
                                   token_usage_entropy)

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
