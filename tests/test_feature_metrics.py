"""The feature-space metrics (fidelity and coverage, feature diversity, copy detection) and the bootstrap, pinned
against values worked out by hand on tiny inputs."""
import math

import numpy as np
import pytest
import torch
from torch_fidelity.metric_prc import prc_features_to_metric

from common.fidelity import kid_bootstrap, kid_from_features
from common.sample_metrics import (above_threshold, bootstrap_weights, class_thresholds, feature_diversity,
                                   fidelity_coverage, percentile_interval, token_agreement)


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


def test_kid_of_the_whole_sets_and_of_a_weighted_replicate_by_hand():
    # 1-D features, kernel (x y + 1)^3: K11 = [[1, 1], [1, 8]], K22 = [[1, 1], [1, 125]], K12 = [[1, 1], [1, 27]].
    a, b = np.array([[0.0], [1.0]]), np.array([[0.0], [2.0]])
    whole, values = kid_bootstrap(a, b, [(np.array([2.0, 1.0]), np.ones(2)), (np.array([2.0, 0.0]), np.ones(2))])
    assert whole == pytest.approx(1 + 1 - 2 * 30 / 4)
    assert values[0] == pytest.approx(1 + 1 - 2 * 32 / 6)  # within a: (16 - 12) / (9 - 5) = 1
    assert math.isnan(values[1])  # a replicate of one distinct vector has no within-set pair
    rng = np.random.default_rng(2)
    f1, f2 = rng.normal(size=(12, 32)), rng.normal(0.2, 1, size=(12, 32))
    assert kid_bootstrap(f1, f2)[0] == pytest.approx(kid_from_features(f1, f2, subsets=2, max_subset_size=12)["mean"],
                                                     rel=1e-5)


def test_bootstrap_weights_resample_each_set_and_pair_the_reference_draws():
    weights = bootstrap_weights(5, 7, 50, seed=3)
    assert len(weights) == 50 and all(w1.sum() == 5 and w2.sum() == 7 for w1, w2 in weights)
    other = bootstrap_weights(9, 7, 50, seed=3)
    assert all(np.array_equal(w2, v2) for (_, w2), (_, v2) in zip(weights, other))
    assert not all(np.array_equal(w1, weights[0][0]) for w1, _ in weights)
    assert percentile_interval(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
    assert percentile_interval(np.array([1.0, math.nan, 3.0]), 1.0) == (1.0, 3.0)
