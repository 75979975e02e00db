"""Scores of a classifier on held-out images, their intervals, and the subject-level folds they are measured on.

Plain numpy/scipy with the textbook definitions (the tests pin each on hand-computed inputs):
- accuracy: share of correct predictions;
- balanced accuracy: mean over the classes present in the truth of each class's recall;
- macro-F1: mean over those classes of 2 TP / (2 TP + FP + FN);
- AUC: the Mann-Whitney probability that a random positive scores above a random negative (ties count one half),
  one-vs-rest per class for several classes;
- intervals: Student's t over seeds (a mean over a few training runs), or a percentile bootstrap that resamples
  whole subjects (images of one patient are not independent).
"""
from __future__ import annotations

import numpy as np
from scipy import stats

from common.sample_metrics import percentile_interval


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[t, p]: images of true class t predicted as p."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return counts


def per_class_recall_f1(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recall and F1 of each class from a confusion matrix; NaN for a class absent from the truth."""
    tp = np.diag(counts).astype(float)
    support = counts.sum(1)
    predicted = counts.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        f1 = np.where(support > 0, 2 * tp / (support + predicted), np.nan)
    return recall, f1


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """AUC of scores for a boolean positive mask (NaN when one side is empty)."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)  # average ranks: a tie counts one half
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) at every distinct threshold, from (0, 0) to (1, 1)."""
    positive = np.asarray(positive, bool)
    order = np.argsort(-np.asarray(scores), kind="stable")
    sorted_scores, hits = np.asarray(scores)[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(hits) - 1]
    tps, fps = np.cumsum(hits)[last_of_tie], np.cumsum(~hits)[last_of_tie]
    return (np.r_[0, fps] / max(1, (~positive).sum()), np.r_[0, tps] / max(1, positive.sum()))


def classification_scores(y_true: np.ndarray, probs: np.ndarray) -> dict[str, object]:
    """Accuracy, balanced accuracy, macro-F1, macro one-vs-rest AUC, and per class recall, F1 and AUC, of class
    probabilities probs (n, C) against labels y_true (n,); the prediction is the most probable class."""
    y_true = np.asarray(y_true)
    num_classes = probs.shape[1]
    counts = confusion_matrix(y_true, probs.argmax(1), num_classes)
    recall, f1 = per_class_recall_f1(counts)
    auc = np.array([roc_auc(y_true == c, probs[:, c]) for c in range(num_classes)])
    return {"accuracy": float(np.trace(counts) / counts.sum()), "balanced_accuracy": float(np.nanmean(recall)),
            "macro_f1": float(np.nanmean(f1)), "macro_auc": float(np.nanmean(auc)),
            "recall": recall.tolist(), "f1": f1.tolist(), "auc": auc.tolist(), "confusion": counts.tolist()}


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval of the mean of a few values, e.g. one per training seed; the bounds
    are NaN for a single value (no spread to measure)."""
    values = np.asarray(values, float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return mean, float(mean - half), float(mean + half)


def subject_bootstrap_auc(positive: np.ndarray, scores: np.ndarray, subjects: np.ndarray, rounds: int, seed: int,
                          level: float = 0.95) -> tuple[float, float, float]:
    """(AUC, low, high): the percentile interval of the AUC over `rounds` resamplings of whole subjects, drawn
    separately among the positives' and the negatives' subjects so that both sides keep their sizes."""
    positive, subjects = np.asarray(positive, bool), np.asarray(subjects)
    auc = roc_auc(positive, scores)
    rng = np.random.default_rng(seed)
    groups = []
    for side in (positive, ~positive):
        names, inverse = np.unique(subjects[side], return_inverse=True)
        groups.append([np.flatnonzero(side)[inverse == g] for g in range(len(names))])
    values = []
    for _ in range(rounds):
        picked = [np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
                  for members in groups]
        rows = np.concatenate(picked)
        values.append(roc_auc(np.r_[np.ones(len(picked[0]), bool), np.zeros(len(picked[1]), bool)], scores[rows]))
    low, high = percentile_interval(np.array(values), level)
    return auc, low, high


def subject_folds(subjects: np.ndarray, num_folds: int, seed: int) -> np.ndarray:
    """A fold index (0 .. num_folds-1) per item such that all items of one subject share a fold: subjects are
    shuffled (seeded), then each goes, largest first, to the fold with the fewest items so far."""
    names, inverse, sizes = np.unique(np.asarray(subjects), return_inverse=True, return_counts=True)
    if len(names) < num_folds:
        raise ValueError(f"{len(names)} subjects cannot fill {num_folds} folds")
    order = np.random.default_rng(seed).permutation(len(names))
    order = order[np.argsort(-sizes[order], kind="stable")]
    fold_of_subject = np.empty(len(names), np.int64)
    filled = np.zeros(num_folds, np.int64)
    for g in order:
        fold_of_subject[g] = int(np.argmin(filled))
        filled[fold_of_subject[g]] += sizes[g]
    return fold_of_subject[inverse]
