"""common/classification_metrics.py against numbers computed by hand on tiny inputs, and the subject-fold rule."""
from __future__ import annotations

import numpy as np
import pytest

from common.classification_metrics import (classification_scores, confusion_matrix, roc_auc, roc_curve,
                                           subject_bootstrap_auc, subject_folds, t_interval)

# Six test images of three classes. Confusion (rows true, columns predicted): [[2, 1, 0], [0, 1, 1], [0, 0, 1]].
Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
Y_PRED = np.array([0, 0, 1, 1, 2, 2])


def one_hot_probs(pred: np.ndarray, num_classes: int) -> np.ndarray:
    probs = np.full((len(pred), num_classes), 0.1)
    probs[np.arange(len(pred)), pred] = 0.8
    return probs


def test_confusion_matrix_counts_true_rows_and_predicted_columns() -> None:
    assert confusion_matrix(Y_TRUE, Y_PRED, 3).tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_accuracy_balanced_accuracy_and_macro_f1_by_hand() -> None:
    scores = classification_scores(Y_TRUE, one_hot_probs(Y_PRED, 3))
    assert scores["accuracy"] == pytest.approx(4 / 6)
    # recalls 2/3, 1/2, 1/1: the mean weights each class equally, unlike accuracy
    assert scores["recall"] == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert scores["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # F1 = 2TP / (2TP + FP + FN): class 0: 4 / (4 + 0 + 1); class 1: 2 / (2 + 1 + 1); class 2: 2 / (2 + 1 + 0)
    assert scores["f1"] == pytest.approx([4 / 5, 1 / 2, 2 / 3])
    assert scores["macro_f1"] == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)


def test_a_class_absent_from_the_truth_is_left_out_of_the_means() -> None:
    scores = classification_scores(np.array([0, 0, 1]), one_hot_probs(np.array([0, 2, 1]), 3))
    assert np.isnan(scores["recall"][2]) and np.isnan(scores["auc"][2])
    assert scores["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)


def test_auc_counts_pairs_and_half_a_tie() -> None:
    # positives 0.9, 0.4 against negatives 0.8, 0.4, 0.1: 0.9 wins 3; 0.4 loses to 0.8, ties 0.4, beats 0.1
    positive = np.array([True, False, True, False, False])
    scores = np.array([0.9, 0.8, 0.4, 0.4, 0.1])
    assert roc_auc(positive, scores) == pytest.approx(4.5 / 6)
    assert roc_auc(positive, -scores) == pytest.approx(1 - 4.5 / 6)
    assert np.isnan(roc_auc(np.ones(3, bool), np.arange(3.0)))


def test_one_vs_rest_auc_of_each_class() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.2, 0.6, 0.2], [0.1, 0.3, 0.6]])
    y = np.array([0, 1, 1, 2])
    scores = classification_scores(y, probs)
    # class 0: positive 0.7 above all negatives (0.5, 0.2, 0.1): 1. class 1: positives 0.4, 0.6 against
    # negatives 0.2, 0.3: 1. class 2: positive 0.6 above 0.1, 0.1, 0.2: 1. Then swap to make class 1 imperfect.
    assert scores["auc"] == pytest.approx([1.0, 1.0, 1.0])
    probs[0, 1] = 0.5  # a class-0 image now scores 0.5 for class 1: beats positive 0.4, below 0.6
    assert classification_scores(y, probs)["auc"][1] == pytest.approx(3 / 4)
    assert classification_scores(y, probs)["macro_auc"] == pytest.approx((1 + 3 / 4 + 1) / 3)


def test_roc_curve_steps_through_each_distinct_threshold() -> None:
    positive = np.array([True, False, True, False, False])
    fpr, tpr = roc_curve(positive, np.array([0.9, 0.8, 0.4, 0.4, 0.1]))
    # thresholds 0.9, 0.8, 0.4 (one positive and one negative tied), 0.1
    assert fpr.tolist() == pytest.approx([0, 0, 1 / 3, 2 / 3, 1])
    assert tpr.tolist() == pytest.approx([0, 1 / 2, 1 / 2, 1, 1])
    assert np.trapezoid(tpr, fpr) == pytest.approx(4.5 / 6)  # the area is the AUC, ties as a diagonal


def test_t_interval_over_seeds_by_hand() -> None:
    mean, low, high = t_interval(np.array([1.0, 2.0, 3.0]))
    half = 4.302653 * 1.0 / np.sqrt(3)  # t(0.975, 2 df) * sd / sqrt(n)
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half), abs=1e-5)
    mean, low, high = t_interval(np.array([0.5]))
    assert mean == 0.5 and np.isnan(low) and np.isnan(high)


def test_subject_bootstrap_resamples_whole_subjects() -> None:
    # Negatives: subject A's ten images all score above every positive, subject B's ten below; twenty positives in
    # the middle. AUC 0.5; with only two negative subjects a resample may hold A twice (AUC 0) or B twice (AUC 1),
    # an image-level bootstrap would wrongly give a narrow interval around 0.5.
    positive = np.r_[np.zeros(20, bool), np.ones(20, bool)]
    scores = np.r_[np.full(10, 0.9), np.full(10, 0.1), np.full(20, 0.5)]
    subjects = np.array(["A"] * 10 + ["B"] * 10 + [f"p{i}" for i in range(20)])
    auc, low, high = subject_bootstrap_auc(positive, scores, subjects, rounds=200, seed=0)
    assert (auc, low, high) == pytest.approx((0.5, 0.0, 1.0))
    separated = subject_bootstrap_auc(positive, np.r_[np.zeros(20), np.ones(20)], subjects, rounds=50, seed=0)
    assert separated == pytest.approx((1.0, 1.0, 1.0))


def test_no_subject_is_in_two_folds_and_folds_are_balanced() -> None:
    rng = np.random.default_rng(0)
    subjects = np.array([f"s{i}" for i in rng.integers(0, 40, 200)])
    fold = subject_folds(subjects, 3, seed=1)
    for name in np.unique(subjects):
        assert len(np.unique(fold[subjects == name])) == 1, name
    sizes = np.bincount(fold, minlength=3)
    assert sizes.max() - sizes.min() <= np.unique(subjects, return_counts=True)[1].max()
    assert (subject_folds(subjects, 3, seed=1) == fold).all()
    assert not (subject_folds(subjects, 3, seed=2) == fold).all()


def test_fewer_subjects_than_folds_is_refused() -> None:
    with pytest.raises(ValueError, match="2 subjects cannot fill 3 folds"):
        subject_folds(np.array(["a", "a", "b"]), 3, seed=0)
