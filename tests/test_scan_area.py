"""Scan-area detection: accuracy on phantoms with ground truth, behaviour on real HC18 / BUSI frames, errors.

scan_area.py's rules one helper at a time, on small drawn images with known answers (issue 16): colour and
graphics at their thresholds, components, holes, line fits, margins, overlay boxes, annotation marks, the
model image pixel by pixel, and every refusal with its message. The whole-frame behaviour on phantoms and
real frames is in test_scan_area.py."""
from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest
from PIL import Image

from common import scan_area as sa
from data_preprocessing import make_phantoms as mp
from data_preprocessing.readers import read_frames
from common.scan_area import ScanArea, ScanAreaError, detect_scan_area, to_model_image

REAL_STRIDE = 4  # every 4th real image keeps this file fast; the report gives full-set numbers


def _phantom_frames(n_subjects=5, n_frames=2, seed=101):
    for ci, organ in enumerate(mp.CLASSES):
        for s in range(n_subjects):
            subject = mp.sample_subject(organ, np.random.default_rng([seed, ci, s]))
            for k in range(n_frames):
                yield mp.render_frame(subject, np.random.default_rng([seed, ci, s, 1 + k]))


def test_phantom_scan_areas_match_ground_truth():
    ious, right = [], []
    for frame in _phantom_frames():
        area = detect_scan_area(frame.image)
        ious.append((area.mask & frame.mask).sum() / (area.mask | frame.mask).sum())
        right.append(area.geometry == frame.geometry)
        ys, xs = np.nonzero(area.mask)
        assert area.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert len(ious) >= 60
    assert np.mean(ious) >= 0.97, f"mean IoU {np.mean(ious):.4f}"
    assert np.mean(right) >= 0.99, f"fan/rect right for {np.mean(right):.1%}"


def test_phantom_annotations_are_reported():
    seen = {"calipers": [], "color": []}
    for frame in _phantom_frames(n_subjects=4, n_frames=1, seed=7):
        area = detect_scan_area(frame.image)
        for key in seen:
            seen[key].append((frame.annotations[key], area.annotations[key]))
    for key, pairs in seen.items():
        truth, found = np.array(pairs).T
        assert (truth == found).mean() >= 0.9, key


def test_model_image_is_clean_square_grey():
    frame = next(_phantom_frames(n_subjects=1, n_frames=1, seed=3))
    area = detect_scan_area(frame.image)
    for square in ("pad", "crop"):
        out = to_model_image(frame.image, area, size=256, square=square)
        assert out.shape == (256, 256, 3) and out.dtype == np.uint8
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
        assert out.mean() > 30
    with pytest.raises(ValueError, match="square"):
        to_model_image(frame.image, area, square="stretch")


def test_blank_and_tiny_images_raise():
    with pytest.raises(ScanAreaError, match="blank"):
        detect_scan_area(np.zeros((480, 640, 3), np.uint8))
    with pytest.raises(ScanAreaError, match="too small"):
        detect_scan_area(np.full((1, 1), 128, np.uint8))
    with pytest.raises(ScanAreaError, match="uint8"):
        detect_scan_area(np.zeros((64, 64), np.float32))


def _bar_rows(img: np.ndarray) -> np.ndarray:
    """HC18's grey-scale bar, found independently: the longest run of rows constant over columns 3..11."""
    flat = (img[:, 3:12] == img[:, 3:4]).all(axis=1) & (img[:, 3] > 24) & (img[:, 12] != img[:, 11])
    best, start = (0, 0), None
    for y, f in enumerate(np.append(flat, False)):
        if f and start is None:
            start = y
        elif not f and start is not None:
            best = max(best, (y - start, start))
            start = None
    return np.arange(best[1], best[1] + best[0])


def _black_box(img: np.ndarray):
    """HC18's bottom-right black overlay, found independently: its all-zero rows and columns."""
    h, w = img.shape
    zero = img == 0
    rows = np.flatnonzero(zero[:, int(w * 0.8):int(w * 0.95)].all(axis=1) & (np.arange(h) > h * 0.6))
    if len(rows) < 10:
        return None
    cols = np.flatnonzero(zero[rows[0]:rows[-1] + 1].all(axis=0))
    cols = cols[cols > w * 0.5]
    return (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1) if len(cols) else None


def test_hc18_fans_without_bar_or_black_box(shared_dir):
    paths = sorted((shared_dir / "us_data" / "HC18" / "training_set").glob("*HC.png"))
    if not paths:
        pytest.skip(f"no HC18 images under {shared_dir / 'us_data'}")
    fan, bar_kept, bars, box_clear, boxes = 0, 0, 0, 0, 0
    for path in paths[::REAL_STRIDE]:
        img = np.array(Image.open(path))
        area = detect_scan_area(img, overlay_corners=("bottom_right",))  # as the hc18 adapter declares
        fan += area.geometry == "fan"
        rows = _bar_rows(img)
        if len(rows) >= 20:
            bars += 1
            bar_kept += area.mask[rows, 3:12].any()
            out = to_model_image(img, area)[..., 0].astype(int)
            left = out[:, :6][out[:, :6].max(axis=1) > 0]
            if len(left) > 20:  # whatever shows at the left edge is not a smooth vertical ramp
                assert np.abs(np.diff(left[:, -1])).mean() > 0.5 or left.std() < 2, path.name
        black = _black_box(img)
        if black is not None:
            boxes += 1
            x0, y0, x1, y1 = black
            bx0, by0, bx1, by1 = area.box
            box_clear += not area.mask[y0:y1, x0:x1].any()
    n = len(paths[::REAL_STRIDE])
    assert fan / n >= 0.6, f"fan for {fan}/{n}"  # zoomed frames with no visible edge read as rect (see README)
    assert bar_kept / max(bars, 1) <= 0.08, f"grey bar kept in {bar_kept}/{bars}"  # full set: 5/192
    assert box_clear == boxes, f"black box cut off in {box_clear}/{boxes}"  # with the hint; full set: none kept


def _textured(grey: np.ndarray) -> np.ndarray:
    """Speckled tissue: 9x9 std > 6 and mean > 20 (UI at the left edge left out)."""
    g = grey.astype(np.float32)
    mean = cv2.blur(g, (9, 9))
    tex = (np.sqrt(np.maximum(cv2.blur(g * g, (9, 9)) - mean * mean, 0)) > 6) & (mean > 20)
    tex[:, :16] = False
    return tex


def test_busi_rectangles(shared_dir):
    paths = sorted((shared_dir / "us_data" / "BUSI" / "data").glob("*/images/*.png"))
    paths = [p for p in paths if "_mask" not in p.name]
    if not paths:
        pytest.skip(f"no BUSI images under {shared_dir / 'us_data'}")
    rect, covered, lost = 0, [], []
    for path in paths[::REAL_STRIDE]:
        img = np.array(Image.open(path).convert("RGB"))
        area = detect_scan_area(img)
        rect += area.geometry == "rect"
        covered.append(area.mask.mean())
        out = to_model_image(img, area)
        assert out.shape == (256, 256, 3)
        tissue = _textured(img.mean(axis=2))
        lost.append((tissue & ~area.mask).sum() / max(tissue.sum(), 1))
    n = len(paths[::REAL_STRIDE])
    # exactly-black fluid at an image edge must not read as an overlay box; full set: >2% in 0/210, max 0.6%
    assert max(lost) <= 0.03 and np.mean(np.array(lost) > 0.02) <= 0.05, f"tissue outside the mask: max {max(lost):.1%}"
    assert rect / n >= 0.9, f"rect for {rect}/{n}"
    assert np.median(covered) >= 0.9  # BUSI is already cropped to the image: the area is most of it


# Detections of a few real frames, pinned exactly (mask and model image as sha1 of their bytes): a speed-up of
# scan_area.py must leave them unchanged. One of each kind: fan with both side edges (apex), fan from the
# probe arc alone, rectangle, BUSI fan, BUSI rectangle with calipers.
PINNED = {
    "HC18/training_set/010_2HC.png": ("fan", (3, 1, 785, 442), (326.2137635650284, -1078.2837351279948), set(),
                                      "8e168cf8681633a7ecc440f115fe0ae89a4f38cb", "69338f4cedf7da4d28bd1937690f2c4f8840e6f3"),
    "HC18/training_set/030_HC.png": ("fan", (35, 32, 785, 442), None, set(),
                                     "7608290ae5c56e983a5ad9d70ff5effaf71b9951", "2eb515d3c14aec66fe428d796eccd3e042a34a41"),
    "HC18/training_set/001_HC.png": ("rect", (12, 1, 594, 539), None, set(),
                                     "725171977f54d0964d184198392969082f458987", "7dac3b266761b8508b3fb4e9cb8690f7ffd8d5aa"),
    "BUSI/data/malignant/images/malignant (101).png": (
        "fan", (0, 0, 883, 559), (432.29377250276076, -661.9120230366944), set(),
        "72250745484404d3e89c265c71f86c0557563815", "d0dcddc0dd633882b584a89ebca8e76627625fbe"),
    "BUSI/data/benign/images/benign (14).png": ("rect", (0, 0, 699, 531), None, {"calipers"},
                                                "260d62a0cc749728d1ff68a1a9551f482e708142", "987e55336de3f03d8a918e1415d03cc3687606b0"),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_real_frame_detection_is_pinned(shared_dir, name):
    path = shared_dir / "us_data" / name
    if not path.is_file():
        pytest.skip(f"{path} is absent from the shared samples")
    geometry, box, apex, flags, mask_sha1, image_sha1 = PINNED[name]
    (_, frame), = read_frames(path)
    area = detect_scan_area(frame, overlay_corners=("bottom_right",) if name.startswith("HC18") else ())
    assert (area.geometry, area.box) == (geometry, box)
    assert area.apex == (pytest.approx(apex, rel=1e-12, abs=1e-9) if apex else None)
    assert {k for k, v in area.annotations.items() if v} == flags
    assert hashlib.sha1(area.mask.tobytes()).hexdigest() == mask_sha1
    assert hashlib.sha1(to_model_image(frame, area).tobytes()).hexdigest() == image_sha1


def speckle(h: int, w: int, seed: int = 0, low: int = 60, high: int = 200) -> np.ndarray:
    """Tissue-like noise in which no two neighbours are equal (so nothing reads as a drawn run)."""
    g = np.random.default_rng(seed).integers(low, high, (h, w)).astype(np.int16)
    for _ in range(4):
        same = np.zeros((h, w), bool)
        same[:, 1:] |= g[:, 1:] == g[:, :-1]
        same[1:] |= g[1:] == g[:-1]
        g[same] = low + (g[same] - low + 37) % (high - low)
    return g.astype(np.uint8)


def test_colour_is_a_channel_spread_above_40_and_grey_the_truncated_mean():
    img = np.array([[[10, 20, 50], [10, 20, 51], [200, 0, 0], [7, 8, 8]]], np.uint8)
    grey, colour = sa._grey_and_colour(img)
    assert grey.tolist() == [[26, 27, 66, 7]] and grey.dtype == np.uint8
    assert colour.tolist() == [[False, True, True, False]]
    rgba = np.concatenate([img, np.full((1, 4, 1), 255, np.uint8)], axis=2)
    grey4, colour4 = sa._grey_and_colour(rgba)
    assert np.array_equal(grey4, grey) and np.array_equal(colour4, colour)
    plain = np.arange(12, dtype=np.uint8).reshape(3, 4)
    grey2, colour2 = sa._grey_and_colour(plain)
    assert grey2 is plain and colour2.shape == (3, 4) and colour2.dtype == bool and not colour2.any()


def test_images_that_are_not_uint8_grey_or_rgb_are_refused():
    with pytest.raises(ScanAreaError) as info:
        sa._grey_and_colour([[1, 2]])
    assert str(info.value) == "expected a uint8 numpy image, got list "
    with pytest.raises(ScanAreaError) as info:
        sa._grey_and_colour(np.zeros((4, 4), np.float32))
    assert str(info.value) == "expected a uint8 numpy image, got ndarray float32"
    for shape in ((4, 4, 2), (4, 4, 1), (2, 4, 4, 3), (8,)):
        with pytest.raises(ScanAreaError) as info:
            sa._grey_and_colour(np.zeros(shape, np.uint8))
        assert str(info.value) == f"expected an (H,W) grey or (H,W,3) RGB image, got shape {shape}"


def test_runs_of_six_equal_grey_values_brighter_than_24_are_graphics():
    g = speckle(24, 24)
    expected = np.zeros(g.shape, bool)
    g[2, 3:9] = 100  # six in a row: a drawn run
    expected[2, 3:9] = True
    g[5, 3:8] = 100  # five: speckle may do that
    g[8, 2:10] = 24  # long but dark: dark tissue may repeat values
    g[11, 2:10] = 25
    expected[11, 2:10] = True
    g[14:20, 20] = 200  # a vertical run of six
    expected[14:20, 20] = True
    g[14:19, 16] = 200  # and of five
    assert np.array_equal(sa._flat_runs(g), expected)


def test_disk_is_the_elliptic_element_of_side_2r_plus_1():
    assert np.array_equal(sa._disk(3), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7)))
    assert sa._disk(1).shape == (3, 3)


def test_big_components_keep_those_of_a_tenth_of_the_largest_four_connected():
    b = np.zeros((30, 30), np.uint8)
    b[0:10, 0:10] = 1  # 100 px
    b[20:22, 0:5] = 1  # 10 px: a tenth, kept
    b[25:28, 0:3] = 1  # 9 px: dropped
    b[15, 15] = b[16, 16] = b[14, 14] = 1  # diagonal pixels: three components of 1 px under 4-connectivity
    kept = sa._big_components(b, 0.1)
    expected = np.zeros_like(b)
    expected[0:10, 0:10] = expected[20:22, 0:5] = 1
    assert kept.dtype == np.uint8 and np.array_equal(kept, expected)
    assert np.array_equal(sa._big_components(b, 0.09), expected | (b & (np.arange(30)[:, None] >= 25)))
    chain = np.zeros((30, 30), np.uint8)
    chain[0:10, 0:10] = 1
    chain[np.arange(15, 27), np.arange(15, 27)] = 1  # 12 px touching only at corners: 12 components of 1 px
    assert np.array_equal(sa._big_components(chain, 0.1), (np.arange(30)[:, None] < 10) & (np.arange(30)[None, :] < 10))
    with pytest.raises(ScanAreaError) as info:
        sa._big_components(np.zeros((5, 5), np.uint8), 0.1)
    assert str(info.value) == "no tissue-like region: the image is blank or holds only thin graphics"


def test_component_stats_are_cv2_s_rows_in_image_coordinates():
    b = np.zeros((40, 50), np.uint8)
    b[10:14, 20:27] = 1
    b[30, 40] = b[31, 41] = 1  # one component under 8-connectivity, two under 4
    for connectivity, n in ((4, 3), (8, 2)):
        stats = sa._component_stats(b, connectivity)
        assert len(stats) == n
        assert np.array_equal(stats, cv2.connectedComponentsWithStats(b, connectivity=connectivity)[2][1:])
    assert sa._component_stats(np.zeros((6, 6), np.uint8), 8).shape == (0, 5)


def test_holes_are_background_not_four_connected_to_the_border():
    b = np.zeros((9, 9), np.uint8)
    b[1:8, 1:8] = 1
    b[4:6, 4:6] = 0  # a hole
    b[1, 1] = 0  # a notch open to the border: stays background
    b[2, 2] = 0  # touches the notch only diagonally: a hole under 4-connectivity
    filled = sa._fill_holes(b)
    expected = b.copy()
    expected[4:6, 4:6] = 1
    expected[2, 2] = 1
    assert filled.dtype == np.uint8 and np.array_equal(filled, expected)


def test_a_line_fit_ignores_outliers_and_refits_the_inliers_exactly():
    ys = np.arange(0, 60, dtype=float)
    xs = 3.0 + 0.5 * ys
    xs[::10] += 9.0  # six outliers
    a, b, inliers = sa._fit_line(ys, xs, np.random.default_rng(0), tol=1.5)
    assert a == pytest.approx(3.0, abs=1e-9) and b == pytest.approx(0.5, abs=1e-9)
    assert np.array_equal(inliers, np.arange(60) % 10 != 0)
    near = xs.copy()
    near[1] = 3.0 + 0.5 + 1.4999  # within tol (strictly below): an inlier; the rest of the fit unchanged
    assert sa._fit_line(ys, near, np.random.default_rng(0), tol=1.5)[2][1]


def test_a_hypothesis_counts_only_points_strictly_within_tol_as_inliers():
    """A point exactly tol from the line through two sampled points (exact in binary) is no inlier of that
    hypothesis, so the least-squares refit sees the 20 points of the line alone."""
    ys = np.concatenate([np.arange(20.0), [10.0]])
    xs = np.concatenate([2.0 + 0.5 * np.arange(20.0), [2.0 + 0.5 * 10 + 1.5]])
    a, b, _ = sa._fit_line(ys, xs, np.random.default_rng(0), tol=1.5)
    assert a == pytest.approx(2.0, abs=1e-9) and b == pytest.approx(0.5, abs=1e-9)


def test_a_line_fit_needs_points_five_rows_apart():
    ys = np.array([10.0, 11, 12, 13, 14])
    assert sa._fit_line(ys, ys * 2, np.random.default_rng(0), tol=1.5)[:2] == (0.0, 0.0)
    ys = np.array([10.0, 15.0])
    a, b, inl = sa._fit_line(ys, np.array([1.0, 6.0]), np.random.default_rng(0), tol=1.5)
    assert (a, b) == pytest.approx((-9.0, 1.0)) and inl.tolist() == [True, True]


def test_iou():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert sa._iou(a, b) == 0.0
    a[0, :3] = True
    b[0, 1:] = True
    assert sa._iou(a, b) == 0.5


def test_the_content_box_holds_everything_brighter_than_black():
    g = np.ones((12, 14), np.uint8)  # grey 1 is still black
    g[3, 4] = 2
    g[7, 9] = 2
    assert sa._content_box(g) == (4, 3, 10, 8)


def test_a_rectangle_grows_over_a_strip_that_is_at_least_a_tenth_lit():
    mask = np.zeros((40, 60), bool)
    mask[10:30, 20:40] = True
    lit = np.zeros((40, 60), bool)
    content = (10, 5, 50, 35)
    lit[10:12, 10:20] = True  # left strip 20x10: 20/200 = exactly a tenth
    lit[10:11, 40:50] = True  # right strip: 10/200, a twentieth
    lit[5, 20:39] = True  # top strip 5x20: 19/100
    lit[30:35, 20:22] = True  # bottom strip 5x20 (after widening to the left: 5x30): 10/150
    out = sa._widen_rect(lit, mask, content)
    expected = np.zeros_like(mask)
    expected[5:30, 10:40] = True
    assert np.array_equal(out, expected)
    lit[30:35, 20:23] = True  # 15/150: a tenth again
    expected[5:35, 10:40] = True
    assert np.array_equal(sa._widen_rect(lit, mask, content), expected)
    lit[10:11, 40:50] = False
    lit[10:30, 49] = True  # right strip 20/200: grown first, so the top and bottom strips are 40 wide and too dark
    expected = np.zeros_like(mask)
    expected[10:30, 10:50] = True
    assert np.array_equal(sa._widen_rect(lit, mask, content), expected)


def rect_frame() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """100x120 frame: a speckle rectangle [10:90, 10:110] on black; no drawn runs yet."""
    grey = np.zeros((100, 120), np.uint8)
    grey[10:90, 10:110] = speckle(80, 100, seed=1)
    mask = np.zeros(grey.shape, bool)
    mask[10:90, 10:110] = True
    return grey, np.zeros(grey.shape, bool), mask


def test_black_boxes_of_400_px_filling_their_box_are_occluders():
    grey, flat, mask = rect_frame()
    grey[20:30, 50:90] = 0  # 10x40 = 400 px
    grey[50:60, 20:59] = 0  # 10x39 = 390 px: too small
    grey[60:70, 70:72] = 0  # 10x2: opened away
    # found one pixel right of and below the box: cv2's opening with an even (10x10) kernel shifts by one
    assert sa._occluders(grey, flat, mask, "rect") == [(51, 21, 91, 31)]
    grey[30:60, 80:90] = 0  # the box becomes an L: 700 px in a 40x40 box
    assert sa._occluders(grey, flat, mask, "rect") == []
    grey, flat, mask = rect_frame()
    grey[80:90, 50:90] = 0  # on the area's bottom row
    grey[40:50, 70:110] = 0  # on its right-hand column
    assert sa._occluders(grey, flat, mask, "rect") == [(71, 41, 111, 51), (51, 81, 91, 91)]
    grey, flat, mask = rect_frame()
    grey[20:30, 20:60] = 0
    grey[30:40, 60:100] = 0  # two boxes touching at a corner: two occluders, not one half-filled box
    assert sa._occluders(grey, flat, mask, "rect") == [(21, 21, 61, 31), (61, 31, 101, 41)]


def test_a_black_box_filling_exactly_97_percent_of_its_box_is_an_occluder():
    grey, flat, mask = rect_frame()
    grey[20:45, 50:90] = 0  # 25 x 40 = 1000 px
    grey[20:23, 50:60] = 200  # a 30 px notch: 970 px, exactly 97%
    assert sa._occluders(grey, flat, mask, "rect") == [(51, 21, 91, 46)]
    grey[23, 50] = 200  # 969 px
    assert sa._occluders(grey, flat, mask, "rect") == []


def test_a_fan_s_black_corners_are_no_occluders_but_a_box_s_are():
    grey, flat, mask = rect_frame()
    grey[10:30, 10:40] = 0  # black in the top-left corner of the box
    fan = mask.copy()
    fan[10:30, 10:40] = False  # ... which a fan's mask leaves out
    assert sa._occluders(grey, flat, fan, "fan") == []
    assert sa._occluders(grey, flat, fan, "rect") == [(11, 11, 41, 31)]
    fan[10:30, 10:40] = True  # a fan whose area holds the black
    assert sa._occluders(grey, flat, fan, "fan") == [(11, 11, 41, 31)]


def test_drawn_bars_of_8_px_filling_their_box_are_occluders():
    grey, flat, mask = rect_frame()
    flat[40:48, 30:80] = True  # 8x50 = 400
    flat[60:67, 30:90] = True  # 7 high
    flat[70:78, 30:79] = True  # 8x49 = 392
    flat[0:8, 0:60] = True  # outside the area entirely
    assert sa._occluders(grey, flat, mask, "rect") == [(30, 40, 80, 48)]
    flat[48:60, 30:35] = True  # a leg below the bar: 400 + 60 px in a 20x50 box, not a filled bar
    assert sa._occluders(grey, flat, mask, "rect") == []
    flat[:] = False
    flat[30:60, 80:120] = True
    flat[45:60, 80:100] = False  # 900 px in a 30x40 box that reaches past the area: a drawn bar fills its whole box
    assert sa._occluders(grey, flat, mask, "rect") == []


def full_mask(h: int = 100, w: int = 100) -> np.ndarray:
    return np.ones((h, w), bool)


def test_an_occluder_at_an_edge_is_cut_off_with_that_edge():
    expected = full_mask()
    expected[:, 90:] = False
    assert np.array_equal(sa._cut_occluders(full_mask(), [(90, 40, 100, 60)]), expected)
    expected = full_mask()
    expected[:12] = False  # top (88 rows kept) beats left (80 columns kept)
    assert np.array_equal(sa._cut_occluders(full_mask(), [(0, 0, 20, 12)]), expected)
    expected = full_mask()
    expected[:, :12] = False
    assert np.array_equal(sa._cut_occluders(full_mask(), [(0, 0, 12, 20)]), expected)
    expected = full_mask()
    expected[85:] = False
    assert np.array_equal(sa._cut_occluders(full_mask(), [(30, 85, 50, 100)]), expected)


def test_two_occluders_are_cut_by_the_best_pair_of_sides():
    expected = full_mask()
    expected[:10] = False
    expected[:, 95:] = False
    out = sa._cut_occluders(full_mask(), [(0, 0, 30, 10), (95, 20, 100, 50)])
    assert np.array_equal(out, expected)


def test_an_occluder_deep_inside_is_only_blanked():
    expected = full_mask()
    expected[40:60, 40:60] = False
    assert np.array_equal(sa._cut_occluders(full_mask(), [(40, 40, 60, 60)]), expected)
    expected = full_mask()
    expected[31:50, 31:69] = False  # 31 px from every side: beyond 30% of the box
    assert np.array_equal(sa._cut_occluders(full_mask(), [(31, 31, 69, 50)]), expected)


def test_an_occluder_that_only_a_deep_cut_removes_is_blanked():
    expected = full_mask()
    expected[20:100, 0:50] = False  # reaches 80 rows up from the bottom and 50 columns in from the left
    out = sa._cut_occluders(full_mask(), [(0, 20, 50, 100)])
    assert np.array_equal(out, expected)


def test_a_cut_that_keeps_under_60_percent_of_the_area_blanks_instead():
    mask = np.zeros((100, 100), bool)
    mask[:, 0:5] = True
    mask[:, 60:100] = True  # 4500 px; cutting at x = 75 keeps 2000 of them
    expected = mask.copy()
    expected[0:50, 75:] = False
    assert np.array_equal(sa._cut_occluders(mask, [(75, 0, 100, 50)]), expected)
    expected = full_mask()
    expected[:, 75:] = False  # 10000 px; the cut keeps 7500
    assert np.array_equal(sa._cut_occluders(full_mask(), [(75, 0, 100, 50)]), expected)


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


@pytest.mark.parametrize("corner,dark,box", [
    ("bottom_right", (slice(70, 90), slice(80, 110)), (10, 10, 110, 70)),  # wider than high: the rows go
    ("bottom_right", (slice(60, 90), slice(90, 110)), (10, 10, 90, 90)),  # higher than wide: the columns go
    ("top_left", (slice(10, 30), slice(10, 40)), (10, 30, 110, 90)),
    ("top_right", (slice(10, 25), slice(85, 110)), (10, 25, 110, 90)),
    ("bottom_left", (slice(70, 90), slice(10, 40)), (10, 10, 110, 70)),
    ("bottom_right", (slice(70, 85), slice(80, 110)), (10, 10, 110, 70)),  # 5 rows of image below the box: cut too
    ("bottom_right", (slice(60, 78), slice(80, 110)), (10, 10, 110, 90)),  # 12 rows below: not at the corner
    ("top_right", (slice(70, 90), slice(80, 110)), (10, 10, 110, 90)),  # not the declared corner
])
def test_a_declared_corner_box_is_cut_off_by_the_cheaper_edge(corner, dark, box):
    grey, _, mask = rect_frame()
    grey[dark] = 0
    out = sa._cut_corner_overlay(grey, mask, corner)
    assert box_of(out) == box
    assert np.array_equal(out, mask & (np.arange(100)[:, None] >= box[1]) & (np.arange(100)[:, None] < box[3])
                          & (np.arange(120)[None, :] >= box[0]) & (np.arange(120)[None, :] < box[2]))


def test_dark_fluid_beside_a_corner_box_goes_with_it():
    grey, _, mask = rect_frame()
    grey[70:90, 90:110] = 0  # 20x20 box
    grey[70:90, 80:90] = 10  # fluid as dark as CORNER_DARK
    assert box_of(sa._cut_corner_overlay(grey, mask, "bottom_right")) == (10, 10, 110, 70)
    grey[70:90, 80:90] = 11  # brighter: tissue, the box alone is cut (by its columns: 20 high, 20 wide, rows cost more)
    assert box_of(sa._cut_corner_overlay(grey, mask, "bottom_right")) == (10, 10, 90, 90)


def test_a_corner_box_already_outside_the_area_changes_nothing():
    grey, _, mask = rect_frame()
    grey[70:90, 80:110] = 0
    mask[70:90, 80:110] = False
    assert np.array_equal(sa._cut_corner_overlay(grey, mask, "bottom_right"), mask)
    _, _, plain = rect_frame()
    assert np.array_equal(sa._cut_corner_overlay(rect_frame()[0], plain, "bottom_right"), plain)


def test_a_corner_cut_that_would_keep_under_60_percent_only_blanks_the_box():
    grey, _, mask = rect_frame()
    mask[:, 10:75] = False
    mask[85:90, 10:75] = True  # most of the area is the right-hand part beside the box
    grey[55:90, 75:110] = 0  # 35 rows x 35 columns at the corner
    out = sa._cut_corner_overlay(grey, mask, "bottom_right")
    # the box takes in the columns left of it that lie outside the area, up to 44 columns (CORNER_REACH) wide
    assert np.array_equal(out, mask & ~((np.arange(100)[:, None] >= 55) & (np.arange(120)[None, :] >= 66)))
    assert out.sum() == 1855 and mask.sum() == 3125  # cutting every row from y = 55 on would keep 1575 (< 60%)


def test_an_unknown_corner_is_refused():
    grey, _, mask = rect_frame()
    with pytest.raises(ValueError) as info:
        sa._cut_corner_overlay(grey, mask, "middle")
    assert str(info.value) == "overlay corner must be one of top_left, top_right, bottom_left, bottom_right, got 'middle'"


def test_dark_first_rows_and_columns_at_the_corner_are_peeled_off():
    g = speckle(40, 50, seed=3)
    m = np.ones((40, 50), bool)
    g[0:2, 0:8] = 10
    expected = m.copy()
    expected[0:2] = False
    assert np.array_equal(sa._trim_dark_corner_edges(g, m), expected)
    assert m.all()  # the input is left alone
    g[0:30, 0:8] = 5  # dark deeper than 45% of the height: rows stop at 18, then columns 0..7 go
    expected = m.copy()
    expected[0:18] = False
    expected[:, 0:8] = False
    assert np.array_equal(sa._trim_dark_corner_edges(g, m), expected)
    m = np.zeros((50, 50), bool)
    m[3:45] = True  # 42 rows from row 3: the rows reach int(0.45 * 42) = 18 past the first
    g = speckle(50, 50, seed=3)
    g[3:40, 0:8] = 0
    expected = m.copy()
    expected[3:21] = False
    expected[:, 0:8] = False
    assert np.array_equal(sa._trim_dark_corner_edges(g, m), expected)
    short = np.zeros((40, 50), bool)
    short[:, 0:7] = True  # rows of 7 px: too short to judge; columns 0..2 (45% of 7) go
    g = np.zeros((40, 50), np.uint8)
    assert np.array_equal(sa._trim_dark_corner_edges(g, short), short & (np.arange(50)[None, :] >= 3))
    assert not sa._trim_dark_corner_edges(g, np.zeros((40, 50), bool)).any()


def marked(seed: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    grey = speckle(120, 160, seed=seed, low=60, high=120)
    return grey, np.zeros(grey.shape, bool), np.ones(grey.shape, bool)


def test_a_colour_blob_of_120_px_inside_is_colour():
    grey, colour, mask = marked()
    colour[40:52, 40:50] = True  # 120 px
    assert sa._annotations(grey, colour, mask)["color"] is True
    colour[40:52, 40:50] = False
    colour[40:47, 40:57] = True  # 119 px
    assert sa._annotations(grey, colour, mask)["color"] is False
    colour[40:52, 40:50] = True
    assert sa._annotations(grey, colour, mask & (np.arange(160)[None, :] >= 60))["color"] is False  # outside


def test_a_small_bright_cross_is_calipers_and_a_line_is_not():
    grey, colour, mask = marked()
    grey[60, 50:61] = 230
    grey[55:66, 55] = 230  # an 11 px cross
    assert sa._annotations(grey, colour, mask) == {"calipers": True, "text": False, "color": False}
    grey, colour, mask = marked()
    grey[60, 40:80] = 230
    assert sa._annotations(grey, colour, mask)["calipers"] is False
    grey, colour, mask = marked()
    grey[60, 50:61] = 169  # below 170: not a mark
    grey[55:66, 55] = 169
    assert sa._annotations(grey, colour, mask)["calipers"] is False


def test_three_glyphs_in_a_row_are_text():
    grey, colour, mask = marked()
    for x in (40, 52, 64):
        grey[50:60, x:x + 2] = 230  # 2x10 strokes, 12 px apart
    assert sa._annotations(grey, colour, mask) == {"calipers": False, "text": True, "color": False}
    grey[50:60, 64:66] = marked()[0][50:60, 64:66]
    assert sa._annotations(grey, colour, mask)["text"] is False  # two glyphs are no text
    grey[45:60, 64:66] = 230  # a third glyph 15 high: heights differ by 5, still a row
    assert sa._annotations(grey, colour, mask)["text"] is True
    grey[40:60, 64:66] = 230  # 20 high: not the same type size
    assert sa._annotations(grey, colour, mask)["text"] is False
    grey[40:60, 64:66] = marked()[0][40:60, 64:66]
    grey[55:65, 64:66] = 230  # the same size 5 rows lower: another row
    assert sa._annotations(grey, colour, mask)["text"] is False


def test_frames_too_small_blank_or_without_tissue_are_refused():
    with pytest.raises(ScanAreaError) as info:
        detect_scan_area(np.full((31, 40), 128, np.uint8))
    assert str(info.value) == "image is 31x40 px: too small to hold a scan area (need at least 32 px a side)"
    with pytest.raises(ScanAreaError) as info:
        detect_scan_area(np.full((40, 31, 3), 128, np.uint8))
    assert str(info.value) == "image is 40x31 px: too small to hold a scan area (need at least 32 px a side)"
    with pytest.raises(ScanAreaError) as info:
        detect_scan_area(np.full((64, 64), 6, np.uint8))
    assert str(info.value) == "image is blank (max grey 6): no scan area"
    small = np.zeros((200, 200), np.uint8)
    small[90:120, 90:120] = speckle(30, 30)
    with pytest.raises(ScanAreaError, match=r"^largest tissue-like region covers \d\.\d% of the image: no scan area$"):
        detect_scan_area(small)


def test_a_speckle_rectangle_on_black_is_a_rect_with_its_box():
    grey = np.zeros((120, 160), np.uint8)
    grey[15:105, 20:150] = speckle(90, 130, seed=5)
    area = detect_scan_area(grey)
    expected = np.zeros(grey.shape, bool)
    expected[15:105, 20:150] = True
    assert (area.geometry, area.box, area.apex) == ("rect", (20, 15, 150, 105), None)
    assert np.array_equal(area.mask, expected)
    assert area.annotations == {"calipers": False, "text": False, "color": False}


def sector(h: int, w: int, apex: tuple[float, float], r0: float, r1: float, half_angle: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(xx - apex[0], yy - apex[1])
    t = np.arctan2(xx - apex[0], yy - apex[1])
    return (r >= r0) & (r <= r1) & (np.abs(t) <= half_angle)


def test_a_speckle_sector_is_a_fan_with_its_apex():
    truth = sector(240, 320, (160, -30), 60, 250, np.radians(35))
    grey = np.where(truth, speckle(240, 320, seed=6), 0).astype(np.uint8)
    area = detect_scan_area(grey)
    assert area.geometry == "fan"
    assert area.apex == pytest.approx((160, -30), abs=3)
    assert sa._iou(area.mask, truth) >= 0.98
    assert area.box == box_of(area.mask)


def test_a_zoomed_sector_with_only_its_arc_in_view_is_a_fan():
    truth = sector(200, 200, (100, -300), 330, 600, np.radians(60)) & (np.arange(200)[:, None] < 190)
    grey = np.where(truth, speckle(200, 200, seed=7), 0).astype(np.uint8)
    area = detect_scan_area(grey)
    assert area.geometry == "fan" and area.apex == pytest.approx((100, -300), abs=15)
    assert sa._iou(area.mask, truth) >= 0.97


def test_the_model_image_is_the_masked_box_padded_or_cropped_to_a_square():
    img = np.arange(1, 81, dtype=np.uint8).reshape(8, 10)
    mask = np.zeros((8, 10), bool)
    mask[2:6, 1:7] = True
    mask[2, 1] = False
    area = ScanArea("rect", mask, (1, 2, 7, 6))
    crop = np.where(mask[2:6, 1:7], img[2:6, 1:7], 0)
    padded = np.zeros((6, 6), np.uint8)
    padded[1:5] = crop  # 4 rows, 6 columns: one black row above and below
    out = to_model_image(img, area, size=6, square="pad")
    assert out.shape == (6, 6, 3) and np.array_equal(out[..., 0], padded) and np.array_equal(out[..., 2], padded)
    assert np.array_equal(to_model_image(img, area, size=4, square="crop")[..., 1], crop[:, 1:5])
    tall = ScanArea("rect", mask.T.copy(), (2, 1, 6, 7))
    padded_tall = np.zeros((6, 6), np.uint8)
    padded_tall[:, 1:5] = np.where(mask.T[1:7, 2:6], img.T[1:7, 2:6], 0)
    assert np.array_equal(to_model_image(np.ascontiguousarray(img.T), tall, size=6)[..., 0], padded_tall)
    assert np.array_equal(to_model_image(np.ascontiguousarray(img.T), tall, size=4, square="crop")[..., 0],
                          padded_tall[1:5, 1:5])
    big = to_model_image(img, area, size=12, square="pad")
    from PIL import Image
    assert np.array_equal(big[..., 0], np.asarray(Image.fromarray(padded).resize((12, 12), Image.LANCZOS)))
    rgb = np.repeat(img[..., None], 3, axis=2)
    assert np.array_equal(to_model_image(rgb, area, size=6), out)


def test_the_model_image_refuses_a_bad_square_mode_and_a_mask_of_another_size():
    img = np.zeros((8, 10), np.uint8)
    area = ScanArea("rect", np.ones((8, 10), bool), (0, 0, 10, 8))
    with pytest.raises(ValueError) as info:
        to_model_image(img, area, square="stretch")
    assert str(info.value) == "square must be 'pad' or 'crop', got 'stretch'"
    with pytest.raises(ScanAreaError) as info:
        to_model_image(np.zeros((10, 8), np.uint8), area)
    assert str(info.value) == "image is (10, 8) but the scan area mask is (8, 10)"


def drawn_frame(kind: str) -> np.ndarray:
    if kind == "fan":
        truth = sector(240, 320, (160, -30), 60, 250, np.radians(35))
        return np.where(truth, speckle(240, 320, seed=6), 0).astype(np.uint8)
    if kind == "arc":
        truth = sector(200, 200, (100, -300), 330, 600, np.radians(60)) & (np.arange(200)[:, None] < 190)
        return np.where(truth, speckle(200, 200, seed=7), 0).astype(np.uint8)
    truth = sector(240, 320, (160, -30), 60, 250, np.radians(40))
    grey = np.where(truth, speckle(240, 320, seed=8), 0).astype(np.uint8)
    grey[20:200, 3:12] = np.linspace(30, 250, 180).astype(np.uint8)[:, None]  # a grey-scale bar at the left
    grey[180:220, 230:300] = 0  # a black overlay box at the bottom right, inside the fan
    return grey


# The drawn frames' detections pinned exactly (like test_scan_area.py's real frames): geometry, box, apex, mask sha1.
DRAWN = {
    ("fan", ()): ("fan", (20, 22, 301, 221), (159.99999999999983, -29.394882982943216),
                  "0d200d71f7e3aa07acc5667e90fefd5a78921c0c"),
    ("arc", ()): ("fan", (0, 15, 200, 190), (99.99999999999996, -299.32839252525685),
                  "f5aadfda91a6e9e0042624b20c6bb83174e994c4"),
    ("boxed", ("bottom_right",)): ("fan", (12, 19, 304, 180), (159.99054529628447, -29.428444475528785),
                                   "6e094bd894a8eaa4b2ff169e3b5182089ba14e8d"),
    ("boxed", ()): ("fan", (12, 19, 319, 181), (159.99054529628447, -29.428444475528785),
                    "8018b1725fed7c59ae60da9192638bdde62dfb96"),
}


@pytest.mark.parametrize("kind,corners", sorted(DRAWN))
def test_drawn_frame_detection_is_pinned(kind, corners):
    import hashlib

    geometry, box, apex, mask_sha1 = DRAWN[(kind, corners)]
    grey = drawn_frame(kind)
    area = detect_scan_area(grey, overlay_corners=corners)
    assert (area.geometry, area.box) == (geometry, box)
    assert area.apex == pytest.approx(apex, rel=1e-12, abs=1e-9)
    assert hashlib.sha1(area.mask.tobytes()).hexdigest() == mask_sha1
    if kind == "boxed":
        assert not area.mask[:, 3:12].any()  # the grey-scale bar is never scan area
        assert area.mask[180:220, 230:300].any() == (not corners)  # the declared box is cut off


def offset_mask() -> np.ndarray:
    """An area whose box (20, 10, 110, 90) starts away from the image's corner: cut depths count from its edges."""
    mask = np.zeros((100, 120), bool)
    mask[10:90, 20:110] = True
    return mask


@pytest.mark.parametrize("occluder,gone", [
    ((100, 40, 110, 60), (slice(None), slice(100, None))),  # 10 px from the right edge: the right edge moves
    ((20, 10, 45, 20), (slice(None, 20), slice(None))),  # top-left: the top (keeps 6300 px) beats the left (5200)
    ((50, 40, 80, 60), (slice(40, 60), slice(50, 80))),  # 50 px from every edge: blanked
    ((50, 66, 80, 70), (slice(66, None), slice(None))),  # exactly 24 px (30% of the height) from the bottom: cut
    ((50, 65, 80, 70), (slice(65, 70), slice(50, 80))),  # 25 px: blanked
])
def test_occluder_cuts_are_measured_from_the_area_s_own_box(occluder, gone):
    expected = offset_mask()
    expected[gone] = False
    assert np.array_equal(sa._cut_occluders(offset_mask(), [occluder]), expected)


def test_a_dark_strip_beside_the_rectangle_leaves_it_as_it_is():
    mask = np.zeros((40, 60), bool)
    mask[10:30, 20:40] = True
    lit = np.zeros((40, 60), bool)
    lit[10:11, 10:20] = True  # left strip 10/200: too dark
    lit[10:30, 40:42] = True  # right strip 40/200
    lit[5:10, 20:23] = True  # top strip, once the right one is in: 15/150, exactly a tenth
    expected = np.zeros_like(mask)
    expected[5:30, 20:50] = True
    assert np.array_equal(sa._widen_rect(lit, mask, (10, 5, 50, 30)), expected)
    assert np.array_equal(sa._widen_rect(lit, mask, (20, 10, 40, 30)), mask)  # content = the box: nothing to add


def test_the_60_percent_rule_counts_the_area_s_last_row_and_column():
    mask = np.zeros((100, 100), bool)
    mask[:, 80:] = True  # 2000 px along the right edge, down to the last row
    mask[0:37, 0:80] = True
    mask[37, 0:20] = True  # 2980 px left of x = 80: a cut there keeps 2980 < 0.6 * 4980 = 2988
    expected = mask.copy()
    expected[0:60, 80:] = False  # so the overlay is only blanked
    assert np.array_equal(sa._cut_occluders(mask, [(80, 0, 100, 60)]), expected)


def test_a_left_overlay_of_an_area_away_from_the_corner_is_cut_by_the_left_edge():
    expected = offset_mask()
    expected[:, :40] = False  # 20 px in from the area's left edge at x = 20, not 40 px from the image's
    assert np.array_equal(sa._cut_occluders(offset_mask(), [(20, 30, 40, 60)]), expected)


def test_cuts_from_two_sides_count_the_pixels_of_the_box_left_between_them():
    expected = full_mask()
    expected[:20] = False
    expected[:, :22] = False  # keeps 78 x 80 = 6240 of 10000 px: above 60%, so cut
    assert np.array_equal(sa._cut_occluders(full_mask(), [(40, 0, 60, 20), (0, 40, 22, 60)]), expected)


def test_of_two_equal_cuts_the_first_side_wins():
    expected = full_mask()
    expected[:, :20] = False  # left and top both keep 8000 px; left comes first
    assert np.array_equal(sa._cut_occluders(full_mask(), [(0, 0, 20, 20)]), expected)


def test_a_cut_keeping_exactly_60_percent_is_made():
    mask = np.zeros((100, 100), bool)
    mask[:, 80:] = True
    mask[0:37, 0:80] = True
    mask[37, 0:40] = True  # 3000 of 5000 px left of x = 80
    expected = mask.copy()
    expected[:, 80:] = False
    assert np.array_equal(sa._cut_occluders(mask, [(80, 0, 100, 60)]), expected)


@pytest.mark.parametrize("mask_parts,occluder,kept", [
    # a bottom-left overlay 30 px from the left edge (past 30% of the 90 px width) and 20 px from the bottom: the
    # bottom edge moves, though a left cut would keep more of an area that is dense along the bottom
    (((slice(70, 90), slice(20, 110)), (slice(10, 70), slice(50, 110))), (20, 70, 50, 90), (20, 10, 110, 70)),
    # its mirror image: 30 px from the right edge
    (((slice(70, 90), slice(20, 110)), (slice(10, 70), slice(20, 80))), (80, 70, 110, 90), (20, 10, 110, 70)),
    # 27 px from the bottom (past 30% of the 80 px height) and 20 px from the left: the left edge moves
    (((slice(10, 90), slice(20, 40)), (slice(10, 63), slice(40, 110))), (20, 63, 40, 90), (40, 10, 110, 90)),
])
def test_each_side_s_cut_depth_is_bounded_by_the_area_s_own_width_or_height(mask_parts, occluder, kept):
    """The box (20, 10, 110, 90) starts away from the image's corner, so a reach computed from the sum of its
    edges' coordinates instead of their difference would allow the deeper, cheaper cut."""
    mask = np.zeros((100, 120), bool)
    for part in mask_parts:
        mask[part] = True
    x0, y0, x1, y1 = kept
    expected = np.zeros_like(mask)
    expected[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    assert np.array_equal(sa._cut_occluders(mask, [occluder]), expected)
