"""Metrics of generated samples: token usage, diversity (MS-SSIM and in feature space), similarity to a teacher,
nearest neighbours, precision/recall and density/coverage, copy detection, bootstrap resampling.

Images are uint8 arrays (N, H, W, 3), square; features are float arrays (N, D). Every function is pure:
no files, no global state (torch's thread count is the caller's choice).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

# Wang, Simoncelli & Bovik (2003), as torchmetrics uses them: 11-px Gaussian window (sigma 1.5), 5 level weights.
MSSSIM_KERNEL = 11
MSSSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
PSNR_CAP = 100.0  # dB standing in for "identical", as train_vqvae.py reports it


def token_usage_entropy(maps: np.ndarray, vocab_size: int) -> tuple[float, float]:
    """Fraction of the codebook used at least once, and Shannon entropy (bits) of the token frequencies.

    `maps` holds the token ids of one scale, any shape. Both grow with the number of tokens counted, so
    compare sets of equal size (see matched_subsample).
    """
    maps = np.asarray(maps)
    if not np.issubdtype(maps.dtype, np.integer):
        raise ValueError(f"token maps must hold integer ids, got dtype {maps.dtype}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if maps.size == 0:
        raise ValueError("no tokens to count")
    low, high = int(maps.min()), int(maps.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), found {low}..{high}")
    counts = np.bincount(maps.ravel().astype(np.int64), minlength=vocab_size)
    p = counts[counts > 0] / maps.size
    return float((counts > 0).mean()), float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def matched_subsample(n_real: int, n: int, seed: int = 0) -> np.ndarray:
    """Sorted rows of a real set of n_real items to keep so that it has n items, like the generated set
    (all rows when it has no more than n): plug-in usage and entropy are only comparable at equal size."""
    if n_real < 0 or n < 0:
        raise ValueError(f"set sizes must be non-negative, got n_real={n_real}, n={n}")
    if n_real <= n:
        return np.arange(n_real)
    return np.sort(np.random.default_rng(seed).choice(n_real, size=n, replace=False))


def msssim_levels(side: int) -> int:
    """Number of MS-SSIM levels (at most 5) for square images of this side: the most whose coarsest level,
    side / 2^(L-1), is larger than the window less one (10 px) and that torchmetrics accepts.

    64 px -> 3, 128 -> 4, 256 -> 5; the counts change at 21, 44, 99 and 176 px.
    """
    for levels in range(len(MSSSIM_BETAS), 0, -1):
        fits = side > (MSSSIM_KERNEL - 1) * 2 ** (levels - 1)
        # torchmetrics checks side // (L-1)^2 > 10 instead: a few px more at 3 to 5 levels (44, 99, 176 px
        # rather than 41, 81, 161), which must hold too or it raises.
        accepted = side // max(1, levels - 1) ** 2 > MSSSIM_KERNEL - 1
        if fits and accepted:
            return levels
    raise ValueError(f"images of side {side} px are too small for MS-SSIM (the 11-px window needs more than 10 px)")


def msssim_betas(levels: int) -> tuple[float, ...]:
    """The standard level weights; with fewer levels, the finest `levels` of them rescaled to sum to 1."""
    if levels == len(MSSSIM_BETAS):
        return MSSSIM_BETAS  # unchanged: they sum to 1.0001, and 5 levels must match the published metric
    head = MSSSIM_BETAS[:levels]
    return tuple(b / sum(head) for b in head)


def sample_pairs(n: int, max_pairs: int, seed: int = 0) -> np.ndarray:
    """(P, 2) index pairs i < j: all n(n-1)/2 of them when there are at most max_pairs, else max_pairs distinct
    ones drawn with the seed (without listing all pairs, so n may be large)."""
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be positive, got {max_pairs}")
    total = n * (n - 1) // 2
    if total <= max_pairs:
        return np.array([(i, j) for j in range(n) for i in range(j)], dtype=np.int64).reshape(-1, 2)
    # Pair number k in the order (0,1), (0,2), (1,2), (0,3), ...: j is the largest with j(j-1)/2 <= k.
    ks = np.random.default_rng(seed).choice(total, size=max_pairs, replace=False)
    js = np.array([(1 + math.isqrt(1 + 8 * int(k))) // 2 for k in ks], dtype=np.int64)
    return np.stack([ks - js * (js - 1) // 2, js], axis=1)


def _check_images(images: np.ndarray, name: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name} must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"{name} must be square, got {images.shape[1]}x{images.shape[2]} px")


@torch.no_grad()
def diversity(images: np.ndarray, max_pairs: int = 2000, seed: int = 0, pairs_per_batch: int = 64,
              device: str | torch.device = "cpu") -> tuple[float, int]:
    """Mean of 1 - MS-SSIM over image pairs (see sample_pairs), and the number of pairs used.

    MS-SSIM is torchmetrics' on the RGB images in [0, 1] (colour tints count as differences) with
    msssim_levels(side) levels and msssim_betas weights. Its normalize="relu" clamps a negative similarity at any
    level to 0, so a pair with opposite structure scores MS-SSIM 0 (diversity 1) instead of NaN, which a
    negative number raised to a fractional beta would give. Fewer than 2 images: (nan, 0).
    On a CPU 2000 pairs take about 5 s at 64 px and 100 s at 256 px (one thread); `device` may be a GPU.
    """
    _check_images(images, "images")
    if pairs_per_batch < 1:
        raise ValueError(f"pairs_per_batch must be positive, got {pairs_per_batch}")
    if len(images) < 2:
        return math.nan, 0
    levels = msssim_levels(images.shape[1])
    betas = msssim_betas(levels)
    pairs = sample_pairs(len(images), max_pairs, seed)
    scores = []
    for start in range(0, len(pairs), pairs_per_batch):
        batch = pairs[start:start + pairs_per_batch]
        # Only the images of this batch become float tensors: memory stays bounded at 256 px.
        a, b = (torch.from_numpy(images[batch[:, k]]).to(device).permute(0, 3, 1, 2).float() / 255 for k in (0, 1))
        scores.append(multiscale_structural_similarity_index_measure(
            a, b, kernel_size=MSSSIM_KERNEL, sigma=1.5, data_range=1.0, betas=betas, normalize="relu",
            reduction="none").double())
    return float((1 - torch.cat(scores)).mean()), len(pairs)


def grey_uint8(images: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) uint8 -> (..., H, W) uint8, the rounded channel mean: the grey image that
    common.image_data.to_grey_uint8 (train_vqvae.py's PSNR/SSIM) gives for the same image in [-1, 1]."""
    return np.round(images.mean(axis=-1)).astype(np.uint8)


def psnr_ssim(reference: np.ndarray, image: np.ndarray) -> tuple[float, float]:
    """PSNR (dB, capped at 100) and SSIM of two grey uint8 (H, W) images, as train_vqvae.py measures them:
    scikit-image with data_range=255 and its default SSIM (7x7 uniform window, sample covariance, K1=0.01, K2=0.03)."""
    with np.errstate(divide="ignore"):  # identical images: MSE 0, infinite PSNR, capped below
        psnr = peak_signal_noise_ratio(reference, image, data_range=255)
    return min(PSNR_CAP, float(psnr)), float(structural_similarity(reference, image, data_range=255))


SSIM_WINDOW = 7  # scikit-image's default window side, which psnr_ssim uses


def masked_psnr_ssim(reference: np.ndarray, image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """psnr_ssim restricted to the pixels where `mask` (H, W) is True, e.g. the scan area: the black outside it is
    easy to reproduce and would inflate both. PSNR from the mean squared error over the masked pixels; SSIM the
    mean of scikit-image's SSIM map (the same settings as psnr_ssim) over the masked pixels, leaving out the
    3-px border that scikit-image's own mean leaves out too. An empty mask scores (nan, nan)."""
    if not reference.shape == image.shape == mask.shape:
        raise ValueError(f"shapes differ: reference {reference.shape}, image {image.shape}, mask {mask.shape}")
    if not mask.any():
        return math.nan, math.nan
    err = (reference.astype(np.float64) - image.astype(np.float64))[mask]
    mse = float(np.mean(err ** 2))
    psnr = PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0 ** 2 / mse))
    _, ssim_map = structural_similarity(reference, image, data_range=255, full=True)
    pad = (SSIM_WINDOW - 1) // 2
    inner = np.zeros_like(mask)
    inner[pad:-pad, pad:-pad] = mask[pad:-pad, pad:-pad]
    return psnr, float(ssim_map[inner].mean()) if inner.any() else math.nan


def teacher_similarity(samples: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample PSNR and SSIM (psnr_ssim, on grey_uint8 images) of samples (N, H, W, 3) against one
    reference image (H, W, 3), e.g. the teacher or its reconstruction."""
    _check_images(samples, "samples")
    _check_images(reference[None], "reference")
    if samples.shape[1:] != reference.shape:
        raise ValueError(f"samples of shape {samples.shape[1:]} do not match the reference of shape {reference.shape}")
    ref = grey_uint8(reference)
    scores = np.array([psnr_ssim(ref, s) for s in grey_uint8(samples)], dtype=np.float64).reshape(-1, 2)
    return scores[:, 0], scores[:, 1]


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ValueError(f"{name}: every feature vector must be finite and non-zero for a cosine similarity")
    return x / norms


def nearest_neighbours(query: np.ndarray, bank: np.ndarray, exclude_self: bool = False,
                       chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity of each query vector (Nq, D) to its nearest bank vector (Nb, D), and that vector's index.

    exclude_self: the query is the bank, and a row's own index is skipped. Queries are scored `chunk` rows at a
    time, so beside the inputs memory holds one (chunk, Nb) float32 block.
    """
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(f"expected feature matrices (Nq, D) and (Nb, D), got {query.shape} and {bank.shape}")
    if exclude_self and query.shape[0] != bank.shape[0]:
        raise ValueError(f"exclude_self needs the query to be the bank, got {len(query)} and {len(bank)} rows")
    if len(bank) < (2 if exclude_self else 1):
        raise ValueError(f"the bank has {len(bank)} vectors: no neighbour to find")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    q, b = _unit_rows(query, "query"), _unit_rows(bank, "bank")
    sims = np.empty(len(q), dtype=np.float32)
    index = np.empty(len(q), dtype=np.int64)
    for start in range(0, len(q), chunk):
        block = q[start:start + chunk] @ b.T
        if exclude_self:
            rows = np.arange(len(block))
            block[rows, start + rows] = -np.inf
        best = block.argmax(axis=1)
        index[start:start + len(block)] = best
        sims[start:start + len(block)] = block[np.arange(len(block)), best]
    return sims, index


# Feature-space metrics: fidelity and coverage (k-nearest-neighbour balls), diversity, copy detection.


def _counts(weights: np.ndarray | None, n: int, name: str) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (n,) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"{name}: expected {n} non-negative weights, not all 0, got shape {weights.shape}")
    return weights


def knn_radii(features: np.ndarray, k: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Euclidean distance of each row (N, D) to its k-th nearest other row: the radius of its k-NN ball.

    groups: a label per row (its subject); a row's neighbours are then taken from other groups only. Frames of one
    subject are near-duplicates, not independent draws: with k below a subject's frame count, every ball would
    measure the jitter between frames, not the distribution (on the phantom demo's val split, 5 frames of 2 subjects
    per class, even the reconstructions' coverage was 0.13)."""
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    d = torch.cdist(x, x)
    labels = np.arange(len(x)) if groups is None else np.asarray(groups)
    if labels.shape != (len(x),):
        raise ValueError(f"expected a group per row ({len(x)}), got shape {labels.shape}")
    others = _fewest_others(len(x), groups)
    if not 1 <= k <= others:
        raise ValueError(f"k-NN balls need 1 <= k <= {others} (the fewest rows outside a row's group), got k={k}")
    same = torch.from_numpy(labels[:, None] == labels[None, :])  # the row itself included
    return d.masked_fill(same, math.inf).kthvalue(k, dim=1).values.numpy()


def _fewest_others(n: int, groups: np.ndarray | None) -> int:
    """The fewest rows outside any row's group (n - 1 without groups): the largest k a k-NN ball can have."""
    if groups is None:
        return n - 1
    _, counts = np.unique(np.asarray(groups), return_counts=True)
    return n - int(counts.max()) if n else 0


def fidelity_coverage(generated: np.ndarray, real: np.ndarray, k: int = 3, generated_weights: np.ndarray | None = None,
                      real_weights: np.ndarray | None = None, generated_groups: np.ndarray | None = None,
                      real_groups: np.ndarray | None = None) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) and density and coverage (Naeem et al. 2020) of
    generated features (N, D) against real ones (M, D), with k-NN balls (Euclidean, ties inside).

    precision: share of generated vectors inside some real vector's ball (fidelity; a memoriser scores high);
    recall: share of real vectors inside some generated vector's ball (coverage of the real set by the generated
    one's own, possibly inflated, balls); density: real balls holding a generated vector, per generated vector,
    over k (about 1 for matching sets, above 1 where samples crowd real images); coverage: share of real balls
    holding a generated vector (a mode-collapsed model scores low). Precision and recall equal torch-fidelity's
    prc_features_to_metric. Weights (each vector's count in a bootstrap replicate, 0 = left out) weigh the averages
    and the balls that count, while every ball keeps its radius in the whole set: a replicate's repeats would
    otherwise enlarge the radii and shift every replicate upwards. Groups (subjects, see knn_radii) bound each
    set's balls by other subjects' vectors. Fewer than k vectors outside a row's group: NaN.
    """
    return fidelity_coverage_replicates(generated, real, k, [(generated_weights, real_weights)], generated_groups,
                                        real_groups)[0]


def fidelity_coverage_replicates(generated: np.ndarray, real: np.ndarray, k: int,
                                 weights: list[tuple[np.ndarray | None, np.ndarray | None]],
                                 generated_groups: np.ndarray | None = None,
                                 real_groups: np.ndarray | None = None) -> list[dict[str, float]]:
    """fidelity_coverage for each (generated_weights, real_weights) pair of `weights` (a bootstrap's replicates):
    the distances and the balls do not depend on the weights, so they are computed once."""
    generated, real = np.asarray(generated, np.float32), np.asarray(real, np.float32)
    if generated.ndim != 2 or real.ndim != 2 or generated.shape[1] != real.shape[1]:
        raise ValueError(f"expected feature matrices (N, D) and (M, D), got {generated.shape} and {real.shape}")
    counts = [(_counts(w_1, len(generated), "generated"), _counts(w_2, len(real), "real")) for w_1, w_2 in weights]
    if min(_fewest_others(len(generated), generated_groups), _fewest_others(len(real), real_groups)) < k:
        return [dict.fromkeys(("precision", "recall", "density", "coverage"), math.nan) for _ in counts]
    r_gen, r_real = knn_radii(generated, k, generated_groups), knn_radii(real, k, real_groups)
    d = torch.cdist(torch.from_numpy(generated), torch.from_numpy(real)).numpy()  # (N, M)
    in_real_ball = d <= r_real[None, :]  # generated i inside real j's ball
    in_gen_ball = d <= r_gen[:, None]  # real j inside generated i's ball
    out = []
    for w_gen, w_real in counts:
        held_by_real = in_real_ball & (w_real[None, :] > 0)  # balls of images left out of the replicate do not count
        out.append({"precision": float(np.average(held_by_real.any(axis=1), weights=w_gen)),
                    "recall": float(np.average((in_gen_ball & (w_gen[:, None] > 0)).any(axis=0), weights=w_real)),
                    "density": float(np.average((held_by_real * w_real[None, :]).sum(axis=1), weights=w_gen) / k),
                    "coverage": float(np.average(held_by_real.any(axis=0), weights=w_real))})
    return out


def feature_diversity(features: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean cosine distance (1 - cosine similarity) over pairs of distinct vectors (N, D): how different a set's
    images are in feature space, where speckle noise moves little. Weights count repeated vectors (a bootstrap
    replicate), whose pairs with themselves are left out. Fewer than 2 distinct vectors: NaN."""
    if len(features) < 2:
        return math.nan
    w = _counts(weights, len(features), "features")
    unit = _unit_rows(features, "features").astype(np.float64)
    sim = unit @ unit.T
    pair_weight = np.outer(w, w)
    np.fill_diagonal(pair_weight, 0)
    return float(1 - (sim * pair_weight).sum() / pair_weight.sum())


def token_agreement(query: np.ndarray, bank: np.ndarray, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """For each query token row (Nq, L), the largest share of positions equal to a bank row (Nb, L), and that
    row's index: 1.0 is an exact copy of the bank row's token maps."""
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1] or len(bank) == 0:
        raise ValueError(f"expected token rows (Nq, L) and a non-empty (Nb, L), got {query.shape} and {bank.shape}")
    best = np.empty(len(query))
    index = np.empty(len(query), dtype=np.int64)
    for start in range(0, len(query), chunk):
        share = (query[start:start + chunk, None, :] == bank[None, :, :]).mean(axis=2)  # (chunk, Nb)
        index[start:start + len(share)] = share.argmax(axis=1)
        best[start:start + len(share)] = share.max(axis=1)
    return best, index


def class_thresholds(held_out: np.ndarray, labels: np.ndarray, num_classes: int, margin: float = 0.0) -> np.ndarray:
    """Per class, the largest similarity m a held-out image of the class has to the training set, moved `margin` of
    the way to an exact copy (similarity 1): m + margin (1 - m). A sample above it is closer to a training image
    than any unseen image of its class came, by that margin (the maximum of a few held-out images is a noisy
    bound: another held-out set exceeds it often). NaN for a class without held-out images (never flagged)."""
    held_out, labels = np.asarray(held_out, np.float64), np.asarray(labels)
    top = np.array([held_out[labels == c].max() if np.any(labels == c) else math.nan for c in range(num_classes)])
    return top + margin * (1 - top)


def above_threshold(similarity: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Which items are strictly more similar than their class's threshold (never where the threshold is NaN)."""
    limit = np.asarray(thresholds, np.float64)[np.asarray(labels)]
    with np.errstate(invalid="ignore"):
        return np.asarray(similarity, np.float64) > limit


def bootstrap_weights(n_1: int, n_2: int, replicates: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Counts (w_1 (n_1,), w_2 (n_2,)) of each replicate of a bootstrap over both sets: every set resampled with
    replacement to its own size. Each set has its own random stream, so two evaluations against the same
    reference with the same seed resample the reference alike and their replicates pair up."""
    rng_1, rng_2 = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2])
    return [(np.bincount(rng_1.integers(n_1, size=n_1), minlength=n_1).astype(np.float64),
             np.bincount(rng_2.integers(n_2, size=n_2), minlength=n_2).astype(np.float64)) for _ in range(replicates)]


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` interval of bootstrap values (NaN replicates, from too few distinct items, left out)."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return math.nan, math.nan
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)
