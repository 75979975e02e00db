"""Near-duplicate images: a perceptual hash per processed image and the images that repeat an earlier one.

The hash is imagehash's DCT pHash (the image at 32x32 grey, its 8x8 lowest 2D-DCT frequencies against their
median: 64 bits) of the processed 256 px image, so the same scan saved at another size, re-encoded as JPEG, or
cropped a little differently by two datasets' releases hashes alike, while speckle and small text barely count.
Two images whose hashes differ in at most NEAR_DUPLICATE_BITS bits are one image: prepare.py keeps the first
(in recipe order) and drops the others before splitting. The threshold is measured by
bench/bench_near_duplicates.py (distances of planted copies against those of distinct images).
"""
from __future__ import annotations

import imagehash
import numpy as np
from PIL import Image

NEAR_DUPLICATE_BITS = 4  # Hamming distance (of 64 bits) at or below which two images are one (see the bench)


def perceptual_hash(image: Image.Image | np.ndarray) -> int:
    """64-bit DCT perceptual hash of an image (grey or RGB) as an int."""
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    bits = imagehash.phash(picture, hash_size=8).hash.flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def repeats(hashes: list[int], max_bits: int) -> dict[int, tuple[int, int]]:
    """{index: (index of the earlier kept image it repeats, distance)} for every hash within `max_bits` of an
    earlier kept one (the nearest; the first of equals). Kept = not itself a repeat, so a chain of small steps
    does not drop images far from the one kept."""
    kept_index = np.empty(len(hashes), np.int64)
    kept_hash = np.empty(len(hashes), np.uint64)
    n_kept = 0
    found = {}
    for i, h in enumerate(hashes):
        if n_kept:
            distances = np.bitwise_count(kept_hash[:n_kept] ^ np.uint64(h))
            nearest = int(np.argmin(distances))
            if distances[nearest] <= max_bits:
                found[i] = (int(kept_index[nearest]), int(distances[nearest]))
                continue
        kept_index[n_kept], kept_hash[n_kept] = i, h
        n_kept += 1
    return found
