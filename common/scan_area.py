"""Find the ultrasound scan area in a screen capture, decide fan or rectangle, and cut it out clean.

`detect_scan_area(img)` returns a `ScanArea`: the geometric scan area (not the bright tissue: cysts, fluid,
shadows and a skull's interior stay inside), its geometry ('fan' or 'rect'), its bounding box and which
burned-in annotations (calipers, text, colour) lie inside it. `to_model_image(img, area)` blanks everything
outside the area, crops to it, squares it and resizes it with an anti-aliasing filter to the model's input.

How: coloured pixels are never tissue; synthetic graphics (grey-scale bars, filled UI boxes) show as runs
of identical grey values that speckle never has; tissue is the smoothed, non-black region that survives
an opening (which removes thin text, rulers and ticks), its largest component closed and hole-filled.
The outline of that region is then fitted: straight diverging side edges (robust line fits) and arcs
around their apex give a fan, built analytically so its edge is clean; otherwise the area is the box.
Black filled overlay rectangles inside the area (e.g. HC18's, which hide data) are cut off by shrinking
the box, so no artificial straight black edge reaches the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Sequence
from itertools import product

import cv2
import numpy as np
from PIL import Image

MIN_SIDE = 32  # px; smaller images cannot hold a scan area worth keeping
MIN_AREA_FRACTION = 0.03  # the scan area covers at least this share of the image
COLOUR_SATURATION = 40  # max-min over RGB above this is colour (UI, Doppler), never B-mode tissue
FLAT_RUN = 6  # px; runs of identical grey values this long (and not black) are drawn graphics, not speckle
GRAPHIC_MIN_GREY = 24  # dark tissue may legitimately repeat values, so only brighter runs count as graphics
TISSUE_ABOVE_BACKGROUND = 6  # grey levels above the background level that count as signal (after smoothing)
SLOPE_MIN = 0.06  # |dx/dy| of a side edge below this is a straight vertical side (rect), above a fan edge
FAN_GAIN_MIN = 0.01  # the fan model must explain the region better than its box by this IoU margin
BLACK = 1  # grey levels up to this are exact black: frame margins and filled overlay boxes, never speckle
MARGIN_LIT = 0.1  # a strip beside a rectangle with at least this share of non-black, non-graphic pixels is image
OCCLUDER_MIN_SIDE = 8  # px; black filled boxes or flat bars at least this wide and this big (next) are overlays
OCCLUDER_MIN_AREA = 400  # px
ARC_MIN_SAG = 4  # px; a top edge curved by this much over its width is a convex probe's arc
OCCLUDER_FILL = 0.97  # share of its box (within the area) a black region fills to count as a rectangle
MIN_KEPT_AFTER_CUT = 0.6  # cut occluders off only if at least this share of the area remains
MAX_CUT = 0.3  # an edge moves inward by at most this share of the box to cut an overlay off
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")  # where a dataset may declare an overlay box
CORNER_DARK = 10  # grey levels up to this are dark: a declared overlay box (exact black) or fluid beside it
CORNER_FILL = 0.97  # share of a declared overlay box's pixels that are dark or outside the area
CORNER_MARGIN = 0.06  # a declared box may end this share of the area's short side short of its corner
CORNER_REACH = 0.45  # a declared box spans at most this share of the area's width and height
CORNER_STEP = 3  # px between the box corners tried near the area's corner
CORNER_PASSES = 2  # cuts per declared corner
RANSAC_TRIALS = 150  # line hypotheses per side edge
CORNER_BLOCK = 16  # far corners per side of the blocks whose boxes are ruled out together


class ScanAreaError(ValueError):
    """No usable scan area in the image (too small, blank, or no tissue-like region)."""


@dataclass
class ScanArea:
    geometry: str  # "fan" or "rect"
    mask: np.ndarray  # bool (H,W): the geometric scan area
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive ends) of the mask
    annotations: dict[str, bool] = field(default_factory=dict)  # calipers / text / color burned in inside
    apex: tuple[float, float] | None = None  # (x, y) of a fan's apex, possibly outside the image


def _grey_and_colour(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        raise ScanAreaError(f"expected a uint8 numpy image, got {type(img).__name__} {getattr(img, 'dtype', '')}")
    if img.ndim == 3 and img.shape[2] in (3, 4):
        rgb = img[..., :3]
        colour = (rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)) > COLOUR_SATURATION
        return rgb.mean(axis=2).astype(np.uint8), colour
    if img.ndim == 2:
        return img, np.zeros(img.shape, bool)
    raise ScanAreaError(f"expected an (H,W) grey or (H,W,3) RGB image, got shape {img.shape}")


def _flat_runs(grey: np.ndarray) -> np.ndarray:
    """Pixels in horizontal or vertical runs of >= FLAT_RUN identical values: drawn graphics."""
    g = grey.astype(np.int16)
    flat = np.zeros(grey.shape, bool)
    for axis, kernel in ((1, np.ones((1, FLAT_RUN - 1), np.uint8)), (0, np.ones((FLAT_RUN - 1, 1), np.uint8))):
        same = (np.diff(g, axis=axis) == 0).astype(np.uint8)
        runs = cv2.morphologyEx(same, cv2.MORPH_OPEN, kernel).astype(bool)
        if axis == 1:
            flat[:, :-1] |= runs
            flat[:, 1:] |= runs
        else:
            flat[:-1] |= runs
            flat[1:] |= runs
    return flat & (grey > GRAPHIC_MIN_GREY)


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _tissue_region(grey: np.ndarray, not_tissue: np.ndarray) -> np.ndarray:
    """The largest non-black, non-graphic region, thin UI opened away, closed and hole-filled."""
    h, w = grey.shape
    scale = min(h, w)
    signal = np.where(not_tissue, 0, grey).astype(np.float32)
    dark = grey[grey < 48]
    background = int(np.bincount(dark, minlength=48).argmax()) if dark.size else 0
    k = max(3, scale // 80) | 1
    smooth = cv2.blur(signal, (k, k))
    cand = (smooth > background + TISSUE_ABOVE_BACKGROUND).astype(np.uint8)
    cand = cv2.morphologyEx(cand, cv2.MORPH_OPEN, _disk(max(2, scale // 90)))
    region = _big_components(cand, 0.1)  # fluid touching the edge may split the area into large parts
    pad = max(3, scale // 60)
    region = cv2.copyMakeBorder(region, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    region = cv2.morphologyEx(region, cv2.MORPH_CLOSE, _disk(pad))[pad:-pad, pad:-pad]
    region = _fill_holes(region)
    region = cv2.erode(region, np.ones((k, k), np.uint8))  # undo the blur's spread past bright edges
    # text blocks or labels touching the area survive the first opening; a wider one trims them off
    region = cv2.morphologyEx(region, cv2.MORPH_OPEN, _disk(max(3, scale // 40)))
    return _big_components(region, 0.1).astype(bool)


def _big_components(binary: np.ndarray, share: float) -> np.ndarray:
    """The connected components of at least `share` of the largest one's area (uint8 0/1)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=4)
    if n <= 1:
        raise ScanAreaError("no tissue-like region: the image is blank or holds only thin graphics")
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.zeros(n, np.uint8)  # a lookup table from label to kept (label 0, the background, never is)
    keep[1:] = areas >= share * areas.max()
    return keep[labels]


def _component_stats(binary: np.ndarray, connectivity: int) -> np.ndarray:
    """cv2's per-component stats rows (x, y, width, height, area; background left out) of a uint8 image.

    Labelled on the box around the non-zero pixels only: the same components in the same (raster) order,
    their positions shifted back to the image's, and much less to scan where they are few."""
    x, y, w, h = cv2.boundingRect(binary)
    if w == 0:
        return np.zeros((0, 5), np.int32)
    stats = cv2.connectedComponentsWithStats(binary[y:y + h, x:x + w], connectivity=connectivity)[2][1:]
    stats[:, cv2.CC_STAT_LEFT] += x
    stats[:, cv2.CC_STAT_TOP] += y
    return stats


def _fill_holes(binary: np.ndarray) -> np.ndarray:
    """`binary` (uint8 0/1) with its holes filled: background not 4-connected to the image's border becomes 1.

    One flood fill from a zero frame around the image reaches exactly the background that touches the border
    (scipy's binary_fill_holes with its default 4-connectivity, at a fraction of its cost)."""
    framed = cv2.copyMakeBorder(binary, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    cv2.floodFill(framed, None, (0, 0), 2, flags=4)
    return (framed[1:-1, 1:-1] != 2).astype(np.uint8)


def _fit_line(ys: np.ndarray, xs: np.ndarray, rng: np.random.Generator, tol: float) -> tuple[float, float, np.ndarray]:
    """Robust fit x = a + b*y (RANSAC, then least squares on the inliers)."""
    pairs = np.array([rng.choice(len(ys), 2, replace=False) for _ in range(RANSAC_TRIALS)])
    pairs = pairs[np.abs(ys[pairs[:, 1]] - ys[pairs[:, 0]]) >= 5]  # too close in y to give a slope
    best = None
    if len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        b = (xs[j] - xs[i]) / (ys[j] - ys[i])
        a = xs[i] - b * ys[i]
        inliers = np.abs(xs - (a[:, None] + b[:, None] * ys)) < tol
        best = inliers[inliers.sum(axis=1).argmax()]  # the first trial with the most inliers
    if best is None or best.sum() < 2:
        return 0.0, 0.0, np.zeros(len(ys), bool)
    b, a = np.polyfit(ys[best], xs[best], 1)
    return float(a), float(b), np.abs(xs - (a + b * ys)) < tol


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _fit_geometry(region: np.ndarray) -> tuple[str, np.ndarray, tuple[float, float] | None]:
    """Rectangle (the region's box) or fan (side lines, apex, arcs) that best explains the region."""
    h, w = region.shape
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = np.zeros_like(region)
    box[y0:y1, x0:x1] = True
    rng = np.random.default_rng(0)  # RANSAC samples: fixed, so detection is deterministic
    tol = max(1.5, min(h, w) / 300)
    band = rows[(rows >= y0 + 0.08 * (y1 - y0)) & (rows <= y1 - 1 - 0.08 * (y1 - y0))]
    left = region[band].argmax(axis=1)
    right = w - 1 - region[band, ::-1].argmax(axis=1)
    sides = {}
    for name, xs, clipped, sign in (("left", left, left <= x0 + 1, -1), ("right", right, right >= x1 - 2, 1)):
        keep = ~clipped
        if keep.sum() < max(20, 0.2 * len(band)):
            continue
        a, b, inl = _fit_line(band[keep].astype(float), xs[keep].astype(float), rng, tol)
        if sign * b > SLOPE_MIN and inl.sum() >= max(20, 0.2 * len(band)):
            sides[name] = (a, b)
    if not sides:
        return _arc_only_fan(region, box, (x0, y0, x1, y1))
    yy, xx = np.arange(h)[:, None], np.arange(w)[None, :]  # broadcast: the same values as full grids
    fan = box.copy()
    if "left" in sides:
        fan &= xx >= sides["left"][0] + sides["left"][1] * yy - 0.5
    if "right" in sides:
        fan &= xx <= sides["right"][0] + sides["right"][1] * yy + 0.5
    apex = None
    if len(sides) == 2:
        (al, bl), (ar, br) = sides["left"], sides["right"]
        ay = (ar - al) / (bl - br)
        apex = (al + bl * ay, ay)
    if apex is not None and apex[1] < y0 + 0.2 * (y1 - y0):
        r = np.hypot(xx - apex[0], yy - apex[1])
        inside = region & fan
        y_in, x_in = np.nonzero(inside)
        t_in, r_in = np.arctan2(x_in - apex[0], y_in - apex[1]), r[inside]
        bins = np.linspace(t_in.min(), t_in.max(), 33)
        idx = np.clip(np.digitize(t_in, bins) - 1, 0, 31).astype(np.uint8)
        # group the pixels by bin, keeping their raster order, so each bin is one slice (argmin/argmax pick
        # the same first extreme as on the bin's pixels in place)
        order = np.argsort(idx, kind="stable")
        r_in, y_in = r_in[order], y_in[order]
        ends = np.cumsum(np.bincount(idx, minlength=32))
        rmin = np.full(32, np.nan)
        rmax = np.full(32, np.nan)
        ymin_at = np.full(32, np.nan)
        ymax_at = np.full(32, np.nan)
        for k in range(2, 30):  # the outer bins meet the side edges, where radii are not the arcs'
            start = ends[k - 1]
            if ends[k] - start < 5:
                continue
            i_min, i_max = start + np.argmin(r_in[start:ends[k]]), start + np.argmax(r_in[start:ends[k]])
            rmin[k], rmax[k] = r_in[i_min], r_in[i_max]
            ymin_at[k], ymax_at[k] = y_in[i_min], y_in[i_max]
        top_ok = np.isfinite(rmin) & (ymin_at > y0 + 1)
        bottom_ok = np.isfinite(rmax) & (ymax_at < y1 - 2)
        if top_ok.sum() >= 6:
            fan &= r >= np.median(rmin[top_ok]) - 0.5
        if bottom_ok.sum() >= 6:
            fan &= r <= np.percentile(rmax[bottom_ok], 75) + 0.5
    if _iou(fan, region) < _iou(box, region) + FAN_GAIN_MIN:
        return "rect", box, None
    return "fan", fan, apex


def _arc_only_fan(region: np.ndarray, box: np.ndarray, bounds: tuple[int, int, int, int]):
    """A zoomed sector whose side edges lie outside the image: a fan if its top edge is a probe arc."""
    x0, y0, x1, y1 = bounds
    cols = np.arange(x0, x1)
    top = region[:, x0:x1].argmax(axis=0)
    sel = region[:, x0:x1].any(axis=0) & (top > y0 + 1) & (top < y0 + 0.4 * (y1 - y0))
    if sel.sum() < 0.5 * (x1 - x0):
        return "rect", box, None
    xs, ys = cols[sel].astype(float), top[sel].astype(float)
    inl = np.ones(len(xs), bool)
    for _ in range(3):  # dark near-field tissue pushes the top edge down: refit without those columns
        c2, c1, c0 = np.polyfit(xs[inl], ys[inl], 2)
        inl = np.abs(ys - np.polyval((c2, c1, c0), xs)) < 3
    half_span = (xs[inl].max() - xs[inl].min()) / 2 if inl.sum() > 2 else 0
    if c2 >= 0 or -c2 * half_span ** 2 < ARC_MIN_SAG or inl.mean() < 0.7:
        return "rect", box, None
    radius = 1 / (-2 * c2)
    cx = -c1 / (2 * c2)
    cy = c0 - c1 ** 2 / (4 * c2) - radius
    yy, xx = np.arange(region.shape[0])[:, None], np.arange(region.shape[1])[None, :]
    fan = box & (np.hypot(xx - cx, yy - cy) >= radius - 0.5)
    if _iou(fan, region) <= _iou(box, region):
        return "rect", box, None
    return "fan", fan, (float(cx), float(cy))


def _content_box(grey: np.ndarray) -> tuple[int, int, int, int]:
    """Bounds of the rows and columns holding anything brighter than exact black (frame margins left out)."""
    lit = grey > BLACK
    rows = np.flatnonzero(lit.any(axis=1))
    cols = np.flatnonzero(lit.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _widen_rect(lit: np.ndarray, mask: np.ndarray, content: tuple[int, int, int, int]) -> np.ndarray:
    """A rectangle's box grown to the content's edge on each side where the strip between holds image.

    Images already cropped to the scan area (BUSI) and zoomed frames (HC18) end in dark bands of fluid or
    weak speckle that the tissue threshold drops; a real margin around a scan area is black but for thin
    graphics and text."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    x0, y0, x1, y1 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
    cx0, cy0, cx1, cy1 = content
    if cx0 < x0 and lit[y0:y1, cx0:x0].mean() >= MARGIN_LIT:
        x0 = cx0
    if x1 < cx1 and lit[y0:y1, x1:cx1].mean() >= MARGIN_LIT:
        x1 = cx1
    if cy0 < y0 and lit[cy0:y0, x0:x1].mean() >= MARGIN_LIT:
        y0 = cy0
    if y1 < cy1 and lit[y1:cy1, x0:x1].mean() >= MARGIN_LIT:
        y1 = cy1
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = True
    return out


def _occluders(grey: np.ndarray, flat: np.ndarray, mask: np.ndarray, geometry: str) -> list[tuple[int, int, int, int]]:
    """Filled black boxes (e.g. anonymised panels, text boxes) and drawn bars inside the area, as boxes."""
    found = []
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    boxed = np.zeros_like(mask)
    boxed[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
    within = mask if geometry == "fan" else boxed  # a fan's black corners are outside it, a box's are not
    for cand, side in (((grey <= BLACK) & within, 10), (flat, 5)):  # black boxes; drawn bars (whole, even if
        cand = cv2.morphologyEx(cand.astype(np.uint8), cv2.MORPH_OPEN, np.ones((side, side), np.uint8))
        for x, y, bw, bh, area in _component_stats(cand, 4):  # only partly in the area)
            inside = within[y:y + bh, x:x + bw].sum()
            if (min(bw, bh) >= OCCLUDER_MIN_SIDE and area >= OCCLUDER_MIN_AREA and inside
                    and area >= OCCLUDER_FILL * (inside if side == 10 else bw * bh)):
                found.append((int(x), int(y), int(x + bw), int(y + bh)))
    return found


def _cut_occluders(mask: np.ndarray, occluders: list[tuple[int, int, int, int]]) -> np.ndarray:
    """The largest-area box of the mask that leaves every occluder out (each one cut off by one side)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    bx0, by0, bx1, by1 = cols[0], rows[0], cols[-1] + 1, rows[-1] + 1
    integral = cv2.integral(mask.astype(np.uint8))
    total = integral[-1, -1]
    # an overlay near an edge is cut off with that edge; one deep inside is only blanked (cutting costs too much)
    reach = MAX_CUT * np.array([bx1 - bx0, bx1 - bx0, by1 - by0, by1 - by0])
    blank = [o for o in occluders if min(o[2] - bx0, bx1 - o[0], o[3] - by0, by1 - o[1]) > reach.min()]
    occluders = [o for o in occluders if o not in blank]
    mask = mask.copy()
    for ox0, oy0, ox1, oy1 in blank:
        mask[oy0:oy1, ox0:ox1] = False
    best, best_area = None, -1
    for choice in product(range(4), repeat=len(occluders)):
        x0, y0, x1, y1 = bx0, by0, bx1, by1
        for (ox0, oy0, ox1, oy1), side in zip(occluders, choice):
            if (ox1 - bx0, bx1 - ox0, oy1 - by0, by1 - oy0)[side] > reach[side]:
                x0 = x1  # this side would cut too deep: not a candidate
            elif side == 0:
                x0 = max(x0, ox1)
            elif side == 1:
                x1 = min(x1, ox0)
            elif side == 2:
                y0 = max(y0, oy1)
            else:
                y1 = min(y1, oy0)
        if x1 <= x0 or y1 <= y0:
            continue
        area = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        if area > best_area:
            best, best_area = (x0, y0, x1, y1), area
    if best is None or best_area < MIN_KEPT_AFTER_CUT * total:
        out = mask.copy()
        for ox0, oy0, ox1, oy1 in occluders:
            out[oy0:oy1, ox0:ox1] = False
        return out
    x0, y0, x1, y1 = best
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    return out


def _trim_dark_corner_edges(g: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Peel rows off the top and columns off the left of `m` (the declared corner, flipped to the top-left)
    while their pixels nearest the corner are dark: the box's first row or column can survive the earlier
    steps by a pixel or two, which would leave a thin black line along the cut."""
    m = m.copy()
    for axis_m, axis_g in ((m, g), (m.T, g.T)):
        lines = np.flatnonzero(axis_m.any(axis=1))
        if not len(lines):
            return m
        limit = int(lines[0]) + int(CORNER_REACH * (lines[-1] + 1 - lines[0]))
        for line in range(int(lines[0]), limit):
            first = axis_g[line][axis_m[line]][:OCCLUDER_MIN_SIDE]  # the line's pixels nearest the corner
            if len(first) < OCCLUDER_MIN_SIDE or (first > CORNER_DARK).any():
                break
            axis_m[line] = False
    return m


def _corner_blocks_open(integral: np.ndarray, near_y: np.ndarray, near_x: np.ndarray, far_y: np.ndarray,
                        far_x: np.ndarray) -> np.ndarray:
    """(near_y, near_x) bool: whether any box from that near corner to a far corner may pass the fill test.

    The far corners are taken in CORNER_BLOCK x CORNER_BLOCK blocks; a box ending in a block holds at least the
    lit pixels of the box ending at the block's first allowed corner (boxes from one corner nest) and covers at
    most the area of the one ending at its last, so a block where even these fail holds no passing box."""
    starts_y, starts_x = np.arange(0, len(far_y), CORNER_BLOCK), np.arange(0, len(far_x), CORNER_BLOCK)
    last_y = far_y[np.minimum(starts_y + CORNER_BLOCK - 1, len(far_y) - 1)] - near_y[:, None]  # (near, block) heights
    last_x = far_x[np.minimum(starts_x + CORNER_BLOCK - 1, len(far_x) - 1)] - near_x[:, None]
    first_y = np.minimum(np.maximum(far_y[starts_y], near_y[:, None] + OCCLUDER_MIN_SIDE), far_y[-1])
    first_x = np.minimum(np.maximum(far_x[starts_x], near_x[:, None] + OCCLUDER_MIN_SIDE), far_x[-1])
    fewest = (integral[first_y[:, None, :, None], first_x[None, :, None, :]]
              - integral[first_y[:, None, :], near_x[None, :, None]][..., None]
              - integral[near_y[:, None, None], first_x[None, :, :]][:, :, None, :]
              + integral[near_y[:, None], near_x[None, :]][..., None, None])
    largest = last_y[:, None, :, None] * last_x[None, :, None, :]
    allowed = (last_y >= OCCLUDER_MIN_SIDE)[:, None, :, None] & (last_x >= OCCLUDER_MIN_SIDE)[None, :, None, :]
    return (allowed & (fewest <= (1 - CORNER_FILL) * largest)).any(axis=(2, 3))


def _cut_corner_overlay(grey: np.ndarray, mask: np.ndarray, corner: str) -> np.ndarray:
    """The mask with a dark overlay box declared at `corner` (e.g. "bottom_right") cut off by one edge.

    The box is the largest rectangle, ending within a small margin of that corner of the mask's box (a
    strip of image may lie beyond it), whose pixels are nearly all dark or outside the mask; the mask's
    bottom/top edge moves past its top/bottom or its right/left edge past its left/right side, whichever
    loses fewer non-dark pixels. Dark fluid cut with it is no loss to the model."""
    if corner not in CORNERS:
        raise ValueError(f"overlay corner must be one of {', '.join(CORNERS)}, got {corner!r}")
    flip_y, flip_x = corner.startswith("bottom"), corner.endswith("right")
    # work on a view flipped so the declared corner is the top-left one
    unflip = (slice(None, None, -1 if flip_y else 1), slice(None, None, -1 if flip_x else 1))
    g, m = grey[unflip], mask[unflip]
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    by0, bx0, by1, bx1 = int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1
    lit = m & (g > CORNER_DARK)
    integral = cv2.integral(lit.astype(np.uint8))  # int32: exact, the image holds far fewer than 2**31 pixels
    margin = max(OCCLUDER_MIN_SIDE, int(CORNER_MARGIN * min(by1 - by0, bx1 - bx0)))
    far_y = np.arange(by0 + OCCLUDER_MIN_SIDE, by0 + int(CORNER_REACH * (by1 - by0)) + 1)
    far_x = np.arange(bx0 + OCCLUDER_MIN_SIDE, bx0 + int(CORNER_REACH * (bx1 - bx0)) + 1)
    near_y = np.arange(by0, by0 + margin + 1, CORNER_STEP)
    near_x = np.arange(bx0, bx0 + margin + 1, CORNER_STEP)
    far = integral[far_y[:, None], far_x[None, :]]  # the far corners' sums, gathered once for every near corner
    hopeful = (_corner_blocks_open(integral, near_y, near_x, far_y, far_x) if len(far_y) and len(far_x)
               else np.zeros((len(near_y), len(near_x)), bool))  # a box too small to reach OCCLUDER_MIN_SIDE
    best, best_area = None, 0
    for (iy, y0), (ix, x0) in product(enumerate(near_y.tolist()), enumerate(near_x.tolist())):
        if not hopeful[iy, ix]:  # no box from this near corner passes
            continue
        # Only boxes larger than the best so far can win (ties keep the earlier one): their far corner lies at
        # least this far out, so the rows and columns before it are skipped; argmax's first maximum is unchanged.
        height, width = int(far_y[-1]) - y0, int(far_x[-1]) - x0
        if height * width <= best_area:
            continue
        i0 = np.searchsorted(far_y, y0 + max(OCCLUDER_MIN_SIDE, best_area // width + 1))
        j0 = np.searchsorted(far_x, x0 + max(OCCLUDER_MIN_SIDE, best_area // height + 1))
        ys, xs = far_y[i0:], far_x[j0:]
        sub = far[i0:, j0:]
        above = integral[ys, x0] - integral[y0, x0]
        left = integral[y0, xs]
        # Far corners come in blocks: a box ending anywhere in a block holds at least the lit pixels of the one
        # ending at the block's first corner and has at most the area of the one ending at its last, so a block
        # where even that cannot pass is skipped; only the rows and columns of the other blocks are counted.
        last_y = ys[np.minimum(np.arange(CORNER_BLOCK - 1, len(ys) + CORNER_BLOCK - 1, CORNER_BLOCK), len(ys) - 1)]
        last_x = xs[np.minimum(np.arange(CORNER_BLOCK - 1, len(xs) + CORNER_BLOCK - 1, CORNER_BLOCK), len(xs) - 1)]
        fewest = sub[::CORNER_BLOCK, ::CORNER_BLOCK] - above[::CORNER_BLOCK, None] - left[None, ::CORNER_BLOCK]
        open_blocks = fewest <= (1 - CORNER_FILL) * ((last_y - y0)[:, None] * (last_x - x0)[None, :])
        rows_in = np.flatnonzero(np.repeat(open_blocks.any(axis=1), CORNER_BLOCK)[:len(ys)])
        cols_in = np.flatnonzero(np.repeat(open_blocks.any(axis=0), CORNER_BLOCK)[:len(xs)])
        if not len(rows_in) or not len(cols_in):
            continue
        n_lit = sub[rows_in[:, None], cols_in[None, :]] - above[rows_in, None] - left[None, cols_in]
        area = (ys[rows_in] - y0)[:, None] * (xs[cols_in] - x0)[None, :]
        area = np.where(n_lit <= (1 - CORNER_FILL) * area, area, 0)
        i, j = np.unravel_index(area.argmax(), area.shape)
        if area[i, j] > best_area:
            best, best_area = (x0, y0, int(xs[cols_in[j]]), int(ys[rows_in[i]])), int(area[i, j])
    if best is None:
        return _trim_dark_corner_edges(g, m)[unflip]
    x0, y0, x1, y1 = best
    if not (m[y0:y1, x0:x1] & (g[y0:y1, x0:x1] <= CORNER_DARK)).any():
        return _trim_dark_corner_edges(g, m)[unflip]  # the box lies outside the area already
    lose_rows = integral[y1, -1] - integral[0, -1]  # everything above the box's far edge
    lose_cols = integral[-1, x1] - integral[-1, 0]
    m = m.copy()
    if lose_rows <= lose_cols:
        m[:y1] = False
    else:
        m[:, :x1] = False
    if m.sum() < MIN_KEPT_AFTER_CUT * mask.sum():
        m = mask[unflip].copy()
        m[y0:y1, x0:x1] = False  # cutting costs too much: only blank it
    return _trim_dark_corner_edges(g, m)[unflip]


def _annotations(grey: np.ndarray, colour: np.ndarray, mask: np.ndarray) -> dict[str, bool]:
    """Burned-in marks inside the area: colour blobs (Doppler), caliper crosses, rows of glyphs (text)."""
    inner = cv2.erode(mask.astype(np.uint8), _disk(3)).astype(bool)  # the edge itself is not a mark
    col = (colour & inner).astype(np.uint8)
    stats = _component_stats(col, 8)
    color = bool(len(stats) and stats[:, cv2.CC_STAT_AREA].max() >= 120)
    tophat = cv2.morphologyEx(grey, cv2.MORPH_TOPHAT, np.ones((7, 7), np.uint8))
    marks = ((((grey >= 170) & (tophat >= 60)) | colour) & inner).astype(np.uint8)
    horiz = cv2.morphologyEx(marks, cv2.MORPH_OPEN, np.ones((1, 9), np.uint8))
    vert = cv2.morphologyEx(marks, cv2.MORPH_OPEN, np.ones((9, 1), np.uint8))
    cross = cv2.dilate(horiz, np.ones((3, 3), np.uint8)) & cv2.dilate(vert, np.ones((3, 3), np.uint8))
    stats = _component_stats(cross, 8)
    calipers = bool(((stats[:, cv2.CC_STAT_WIDTH] <= 6) & (stats[:, cv2.CC_STAT_HEIGHT] <= 6)).any())
    glyphs = cv2.dilate(marks, np.ones((3, 2), np.uint8))
    x, y, w, h = cv2.boundingRect(glyphs)  # labelled up to the marks' far ends: same origin, so same centroids
    _, _, stats, cents = cv2.connectedComponentsWithStats(glyphs[:y + h + 1, :x + w + 1], connectivity=8)
    ok = ((stats[1:, cv2.CC_STAT_HEIGHT] >= 6) & (stats[1:, cv2.CC_STAT_HEIGHT] <= 30)
          & (stats[1:, cv2.CC_STAT_WIDTH] <= 30) & (stats[1:, cv2.CC_STAT_AREA] >= 8))
    boxes = stats[1:][ok]
    centres = cents[1:][ok]
    text = False
    for i in range(len(boxes)):
        same_row = (np.abs(centres[:, 1] - centres[i, 1]) <= 4) & (np.abs(centres[:, 0] - centres[i, 0]) <= 40)
        heights = boxes[same_row, cv2.CC_STAT_HEIGHT]
        if same_row.sum() >= 3 and heights.max() - heights.min() <= 6:
            text = True
            break
    return {"calipers": calipers, "text": text, "color": color}


def detect_scan_area(img: np.ndarray, overlay_corners: Sequence[str] = ()) -> ScanArea:
    """The scan area of a uint8 (H,W) grey or (H,W,3) RGB frame; raises ScanAreaError if there is none.

    `overlay_corners` names corners ("bottom_right", ...) where the dataset is known to draw a dark
    overlay box (e.g. HC18's anonymisation panel): it is found there and cut off, whatever its shape
    against the fluid beside it, which the generic (conservative) box detection may leave."""
    grey, colour = _grey_and_colour(img)
    h, w = grey.shape
    if min(h, w) < MIN_SIDE:
        raise ScanAreaError(f"image is {h}x{w} px: too small to hold a scan area (need at least {MIN_SIDE} px a side)")
    if int(grey.max()) <= TISSUE_ABOVE_BACKGROUND:
        raise ScanAreaError(f"image is blank (max grey {int(grey.max())}): no scan area")
    flat = _flat_runs(grey)
    region = _tissue_region(grey, colour | flat)
    if region.sum() < MIN_AREA_FRACTION * h * w:
        raise ScanAreaError(f"largest tissue-like region covers {region.mean():.1%} of the image: no scan area")
    geometry, mask, apex = _fit_geometry(region)
    content = _content_box(grey)
    if geometry == "rect":
        mask = _widen_rect((grey > BLACK + 2) & ~(colour | flat), mask, content)
    cx0, cy0, cx1, cy1 = content
    mask[:, :cx0] = mask[:, cx1:] = mask[:cy0] = mask[cy1:] = False  # the fit may overshoot into black margins
    occluders = _occluders(grey, flat, mask, geometry)
    if occluders:
        mask = _cut_occluders(mask, occluders)
    for corner, _ in product(overlay_corners, range(CORNER_PASSES)):  # a box merged with dark background
        mask = _cut_corner_overlay(grey, mask, corner)  # may come off in pieces
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    return ScanArea(geometry=geometry, mask=mask, box=box, annotations=_annotations(grey, colour, mask), apex=apex)


def to_model_image(img: np.ndarray, area: ScanArea, size: int = 256, square: str = "pad") -> np.ndarray:
    """Grey scan area, black outside its mask, cropped, made square ('pad' or 'crop'), resized: uint8 (size,size,3)."""
    if square not in ("pad", "crop"):
        raise ValueError(f"square must be 'pad' or 'crop', got {square!r}")
    grey, _ = _grey_and_colour(img)
    if grey.shape != area.mask.shape:
        raise ScanAreaError(f"image is {grey.shape} but the scan area mask is {area.mask.shape}")
    x0, y0, x1, y1 = area.box
    crop = np.where(area.mask[y0:y1, x0:x1], grey[y0:y1, x0:x1], 0)
    h, w = crop.shape
    if square == "pad":
        side = max(h, w)
        out = np.zeros((side, side), np.uint8)
        out[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = crop
    else:
        side = min(h, w)
        out = crop[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(out)).resize((size, size), Image.LANCZOS))
    return np.repeat(resized[..., None], 3, axis=2)
