"""Near-duplicate images: a perceptual hash per processed image and the images that repeat an earlier one.

The hash is imagehash's DCT pHash with hash_size 16 (the image at 64x64 grey, its 16x16 lowest 2D-DCT frequencies
against their median: 256 bits) of the processed 256 px image, so the same scan saved at another size, re-encoded as JPEG, or
cropped a little differently by two datasets' releases hashes alike, while speckle and small text barely count.
Two images of different subjects whose hashes differ in at most NEAR_DUPLICATE_BITS bits are one image:
prepare.py keeps the first (in recipe order) and drops the others before splitting (images of one subject stay
together in one split anyway, so frames of one clip are kept). The threshold is measured by
bench/bench_near_duplicates.py (distances of planted copies against those of distinct images).
"""
from __future__ import annotations

import imagehash
import numpy as np
from PIL import Image

HASH_SIZE = 16  # 256 bits: the 64-bit hash put different fetal heads and phantom hearts 4-6 bits apart
HASH_WORDS = HASH_SIZE * HASH_SIZE // 64
NEAR_DUPLICATE_BITS = 32  # Hamming distance (of 256 bits) at or below which two images are one (see the bench)


def perceptual_hash(image: Image.Image | np.ndarray) -> int:
    """256-bit DCT perceptual hash of an image (grey or RGB) as an int."""
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    bits = imagehash.phash(picture, hash_size=HASH_SIZE).hash.flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def repeats(hashes: list[int], max_bits: int, groups: list | None = None) -> dict[int, tuple[int, int]]:
    """{index: (index of the earlier kept image it repeats, distance)} for every hash within `max_bits` of an
    earlier kept one of another group (the nearest; the first of equals). Kept = not itself a repeat, so a chain
    of small steps does not drop images far from the one kept. Images of one group (a subject: frames of one
    clip, views of one lesion) never repeat each other: the split keeps them together anyway."""
    groups = list(range(len(hashes))) if groups is None else groups
    words = np.array([[(h >> (64 * k)) & (2**64 - 1) for k in range(HASH_WORDS)] for h in hashes], np.uint64)
    kept_index = np.empty(len(hashes), np.int64)
    kept_hash = np.empty((len(hashes), HASH_WORDS), np.uint64)
    n_kept = 0
    found = {}
    for i, h in enumerate(words):
        if n_kept:
            distances = np.unpackbits((kept_hash[:n_kept] ^ h).view(np.uint8), axis=1).sum(axis=1, dtype=np.int64)
            distances[[groups[j] == groups[i] for j in kept_index[:n_kept]]] = 64 * HASH_WORDS + 1  # never within
            nearest = int(np.argmin(distances))
            if distances[nearest] <= max_bits:
                found[i] = (int(kept_index[nearest]), int(distances[nearest]))
                continue
        kept_index[n_kept], kept_hash[n_kept] = i, h
        n_kept += 1
    return found
