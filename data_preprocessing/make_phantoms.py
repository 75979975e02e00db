"""Synthetic ultrasound phantoms: the built-in default data set, six organ classes.

Each frame comes from a small physical model, not a drawing: an echogenicity and attenuation map of the
organ's anatomy (lesions, cysts, vessels, skull, heart chambers...) scales a field of random scatterers,
which is convolved with an axial-lateral point-spread function (Gaussian-modulated cosine along depth,
Gaussian across), envelope-detected (analytic signal via FFT along depth), attenuated with depth
(cumulative along each beam, so cysts enhance and skull or air shadow what lies below), compensated by
the time-gain control, log-compressed and scan-converted. Linear probes (breast, thyroid) give a
rectangle; convex (kidney, fetal_head, liver) and phased (heart) probes are simulated in (depth, angle)
and scan-converted to a fan. The scan area sits on a larger black canvas with scanner-UI clutter (text,
depth ruler, grey-scale bar, coloured logo) and sometimes calipers, labels or colour Doppler inside it.

A subject is one random anatomy seen through one scanner set-up; its frames differ by small probe motion
and fresh speckle. Every frame's random stream derives from (seed, class, subject, frame), so the output
is byte-identical for the same seed whatever the number of workers, and an interrupted run resumes.

    python data_preprocessing/make_phantoms.py --out=data/raw_phantoms --n_subjects_per_class=20

writes OUT/<class>/<subject>_f<k>.png (RGB canvas), OUT/<class>/<subject>_f<k>_mask.png (ground-truth scan
area, 0/255), OUT/labels.csv (path,class,subject,geometry) and OUT/config.json.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find common/


@dataclass
class Config:
    out: str = "data/raw_phantoms"  # output folder (created); existing frames are kept and skipped (resume)
    n_subjects_per_class: int = 20  # distinct random anatomies per organ class
    frames_per_subject: int = 5  # frames per subject: small probe motion and fresh speckle between them
    seed: int = 0  # master seed; each frame's stream derives from (seed, class, subject, frame)
    workers: int = 1  # worker processes (the output does not depend on it)
    allow_changed_run: bool = False  # add to a folder made with another seed (its frames stay as they are)


# What defines the phantom set: a frame depends on the seed only, so frames of another seed already in out would mix
# with new ones (more subjects or frames per subject only add frames).
RUN_KEYS = ("seed",)


import csv  # noqa: E402
import io  # noqa: E402
import time  # noqa: E402
from multiprocessing import Pool  # noqa: E402
from typing import Callable  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import scipy.fft  # noqa: E402
from scipy.ndimage import gaussian_filter, gaussian_filter1d  # noqa: E402

from common.config import (SEED, ConfigError, at_least, check_constants, check_output_folder, config_dict,  # noqa: E402
                           save_config, script_config)
from common.io import SideFileError, atomic_write_bytes, atomic_write_text, os_error_line, read_json  # noqa: E402
from common.progress import progress  # noqa: E402
from common.run_folder import RunFolderError, check_same_run, own_output_folder  # noqa: E402

CLASSES = ("breast", "thyroid", "kidney", "fetal_head", "liver", "heart")
PROBE = {"breast": "linear", "thyroid": "linear", "kidney": "convex", "fetal_head": "convex",
         "liver": "convex", "heart": "phased"}
CANVAS_H = (480, 640)  # canvas height range (px); the scan area and the UI sit on it
CANVAS_W = (640, 860)  # canvas width range (px)
N_DEPTH = 384  # samples along each beam (axial)
N_LINES = 224  # beams (lateral); speckle is simulated on this grid, then scan-converted
FLUID = 0.004  # backscatter amplitude of fluid relative to soft tissue (about -48 dB): near black
NOISE_FLOOR = 0.1  # receiver noise and clutter amplitude (relative to soft tissue): fluid shows faint grey
cv2.setNumThreads(1)  # one core per worker; the speed target is per core


@dataclass
class PhantomFrame:
    image: np.ndarray  # uint8 (H,W,3) RGB canvas
    mask: np.ndarray  # bool (H,W) ground-truth scan area
    geometry: str  # "fan" or "rect"
    annotations: dict[str, bool] = field(default_factory=dict)  # burned-in calipers / text / color inside


# ----------------------------------------------------------------------------------------------------------
# Anatomy building blocks, all in millimetres: X lateral (0 = probe centre), Z depth below the probe face.

def _ellipse(X, Z, cx, cz, a, b, angle=0.0, wobble=()):
    """Normalised distance to an (optionally irregular) ellipse: < 1 inside."""
    c, s = np.cos(angle), np.sin(angle)
    u, v = (X - cx) * c + (Z - cz) * s, -(X - cx) * s + (Z - cz) * c
    d = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    if wobble:
        phi = np.arctan2(v, u)
        d = d / (1.0 + sum(amp * np.cos(k * phi + ph) for k, amp, ph in wobble))
    return d


def _inside(d, soft=0.06):
    """Soft indicator of d < 1 (blurred edge of relative width `soft`)."""
    return np.clip((1.0 - d) / soft + 0.5, 0.0, 1.0)


def _ring(d, thickness):
    """Soft indicator of the shell |d - 1| < thickness (relative units)."""
    return np.clip(1.0 - np.abs(d - 1.0) / thickness, 0.0, 1.0)


def _wobble(rng, strength):
    return tuple((k, strength * rng.uniform(0.3, 1.0) / k, rng.uniform(0, 2 * np.pi)) for k in range(2, 6))


class _Texture:
    """A smooth random field over the anatomy (fixed per subject), sampled wherever the probe looks."""

    def __init__(self, rng, extent, cells=40, smooth=2.0, contrast=0.3):
        grid = gaussian_filter(rng.standard_normal((cells, cells)), smooth, mode="wrap")
        self.grid = np.exp(grid * contrast / (grid.std() + 1e-9)).astype(np.float32)
        self.x0, self.x1, self.z1 = -extent[0], extent[0], extent[1]

    def __call__(self, X, Z):
        n = self.grid.shape[0] - 1
        u = ((X - self.x0) * (n / (self.x1 - self.x0))).astype(np.float32)
        v = (Z * (n / self.z1)).astype(np.float32)
        return cv2.remap(self.grid, u, v, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _layer_depth(X, base, amp, freq, phase):
    return base + amp * np.sin(freq * X + phase)


# ----------------------------------------------------------------------------------------------------------
# Organs: sample_<organ>(rng, extent) -> anatomy dict; echo_<organ>(anat, X, Z) -> (echo, attenuation dB/mm).

def sample_breast(rng, extent):
    w, d = extent
    return dict(
        tex=_Texture(rng, extent, contrast=0.35), fat=_Texture(rng, extent, cells=60, smooth=1.5, contrast=0.5),
        skin=rng.uniform(1.2, 2.2), fat_base=rng.uniform(6, 12), fat_amp=rng.uniform(1, 3),
        fat_f=rng.uniform(0.1, 0.3), fat_ph=rng.uniform(0, 6), muscle_base=d * rng.uniform(0.62, 0.8),
        muscle_amp=rng.uniform(1, 3), muscle_f=rng.uniform(0.05, 0.15), muscle_ph=rng.uniform(0, 6),
        lesion=rng.random() < 0.75, cyst=rng.random() < 0.35,
        lx=rng.uniform(-0.3, 0.3) * w, lz=d * rng.uniform(0.35, 0.55), la=rng.uniform(4, 10),
        lb=rng.uniform(3, 7), lang=rng.uniform(-0.4, 0.4), lwob=_wobble(rng, rng.uniform(0.02, 0.25)),
    )


def echo_breast(a, X, Z):
    tex = a["tex"](X, Z)
    fat_line = _layer_depth(X, a["fat_base"], a["fat_amp"], a["fat_f"], a["fat_ph"])
    muscle_line = _layer_depth(X, a["muscle_base"], a["muscle_amp"], a["muscle_f"], a["muscle_ph"])
    echo = 1.5 * tex  # fibroglandular tissue
    fat = np.clip((fat_line - Z) / 1.0 + 0.5, 0, 1)
    echo = echo * (1 - fat) + 0.45 * a["fat"](X, Z) * fat
    muscle = np.clip((Z - muscle_line) / 1.0 + 0.5, 0, 1)
    striation = 0.8 * (1 + 0.6 * np.sin(Z * 2.2 + 0.3 * np.sin(X * 0.2)) ** 8)
    echo = echo * (1 - muscle) + striation * muscle
    echo = np.where(Z < a["skin"], 3.0, echo)
    atten = np.full_like(echo, 0.09)
    if a["lesion"]:
        d = _ellipse(X, Z, a["lx"], a["lz"], a["la"], a["lb"], a["lang"], a["lwob"])
        m = _inside(d)
        if a["cyst"]:
            echo = echo * (1 - m) + FLUID * m
            atten = atten - 0.08 * m  # fluid barely attenuates: posterior enhancement
        else:
            echo = echo * (1 - m) + 0.2 * m
            atten = atten + 0.25 * m  # solid, dense lesion: posterior shadow
    return echo, atten


def sample_thyroid(rng, extent):
    w, d = extent
    side = rng.choice([-1, 1])
    return dict(
        tex=_Texture(rng, extent, cells=60, smooth=1.2, contrast=0.18), skin=rng.uniform(1.0, 2.0),
        strap=rng.uniform(5, 8), tr_z=rng.uniform(13, 16), tr_r=rng.uniform(5, 6.5),
        lobe_a=rng.uniform(9, 13), lobe_b=rng.uniform(7, 10), lobe_x=rng.uniform(12, 16), lobe_z=rng.uniform(14, 18),
        car_r=rng.uniform(3, 4.5), car_dx=rng.uniform(7, 10), nodule=rng.random() < 0.5, nod_side=side,
        nod_r=rng.uniform(2.5, 6), nod_echo=rng.choice([0.3, 0.7, FLUID]), depth=d,
    )


def echo_thyroid(a, X, Z):
    tex = a["tex"](X, Z)
    echo = 0.9 * tex
    atten = np.full_like(echo, 0.1)
    echo = np.where(Z < a["strap"], 0.45 * tex, echo)  # strap muscles: darker band
    for s in (-1, 1):
        lobe = _inside(_ellipse(X, Z, s * a["lobe_x"], a["lobe_z"], a["lobe_a"], a["lobe_b"], s * 0.25))
        echo = echo * (1 - lobe) + 2.0 * tex * lobe
        d = _ellipse(X, Z, s * (a["lobe_x"] + a["car_dx"]), a["lobe_z"] + 2, a["car_r"], a["car_r"])
        echo = echo * (1 - _inside(d)) + FLUID * _inside(d) + 2.5 * _ring(d, 0.12)
        atten = atten - 0.09 * _inside(d)
    isthmus = _inside(_ellipse(X, Z, 0, a["tr_z"] - a["tr_r"] - 1.5, a["lobe_x"], 2.5))
    echo = echo * (1 - isthmus) + 2.0 * isthmus
    d = _ellipse(X, Z, 0, a["tr_z"], a["tr_r"], a["tr_r"])
    air = (Z > a["tr_z"] - a["tr_r"] * 0.6) & (d < 1)
    echo = np.where(d < 1, 0.4, echo) + 6.0 * _ring(d, 0.1) * (Z < a["tr_z"])
    atten = np.where(air, 0.6, atten)  # air in the trachea: a dark shadow behind it
    if a["nodule"]:
        d = _ellipse(X, Z, a["nod_side"] * a["lobe_x"], a["lobe_z"], a["nod_r"], a["nod_r"] * 0.8)
        echo = echo * (1 - _inside(d)) + a["nod_echo"] * _inside(d) + 0.8 * _ring(d, 0.1)
    echo = np.where(Z < a["skin"], 3.0, echo)
    return echo, atten


def sample_kidney(rng, extent):
    w, d = extent
    return dict(
        tex=_Texture(rng, extent, contrast=0.25), sinus=_Texture(rng, extent, cells=30, smooth=1.0, contrast=0.6),
        wall=rng.uniform(12, 20), kx=rng.uniform(-10, 10), kz=d * rng.uniform(0.45, 0.6), ka=rng.uniform(45, 58),
        kb=rng.uniform(22, 30), kang=rng.uniform(-0.35, 0.35), n_pyr=int(rng.integers(5, 8)),
        cyst=rng.random() < 0.2, cyst_t=rng.uniform(0, 2 * np.pi), depth=d,
    )


def echo_kidney(a, X, Z):
    tex = a["tex"](X, Z)
    echo = 1.1 * tex  # liver / spleen window above and around
    atten = np.full_like(echo, 0.07)
    wall = np.clip((a["wall"] - Z) / 1.0, 0, 1)  # abdominal wall: muscle with bright fascia lines
    echo = echo * (1 - wall) + wall * (0.5 + 2.0 * (np.sin(Z * 1.1) > 0.85))
    d = _ellipse(X, Z, a["kx"], a["kz"], a["ka"], a["kb"], a["kang"])
    fat = _inside(d / 1.18)
    echo = echo * (1 - fat) + 1.8 * tex * fat  # perirenal fat: bright
    kidney = _inside(d, 0.03)
    echo = echo * (1 - kidney) + 0.55 * kidney + 2.5 * _ring(d, 0.025)
    c, s = np.cos(a["kang"]), np.sin(a["kang"])
    for i in range(a["n_pyr"]):
        t = np.pi * (0.15 + 0.7 * i / max(a["n_pyr"] - 1, 1)) * (1 if i % 2 else -1)
        px = a["kx"] + 0.62 * (a["ka"] * np.cos(t) * c - a["kb"] * np.sin(t) * s)
        pz = a["kz"] + 0.62 * (a["ka"] * np.cos(t) * s + a["kb"] * np.sin(t) * c)
        p = _inside(_ellipse(X, Z, px, pz, 7, 5, t + a["kang"])) * kidney
        echo = echo * (1 - p) + 0.22 * p  # medullary pyramids
    sinus = _inside(_ellipse(X, Z, a["kx"], a["kz"], a["ka"] * 0.55, a["kb"] * 0.4, a["kang"], ((3, 0.08, 0.5),)))
    echo = echo * (1 - sinus) + 2.8 * a["sinus"](X, Z) * sinus
    if a["cyst"]:
        dc = _ellipse(X, Z, a["kx"] + 0.8 * a["ka"] * np.cos(a["cyst_t"]) * c,
                      a["kz"] + 0.8 * a["kb"] * np.sin(a["cyst_t"]), 8, 8)
        echo = echo * (1 - _inside(dc)) + FLUID * _inside(dc)
        atten = atten - 0.06 * _inside(dc)
    return echo, atten


def sample_fetal_head(rng, extent):
    w, d = extent
    return dict(
        tex=_Texture(rng, extent, contrast=0.3), brain=_Texture(rng, extent, cells=50, smooth=1.2, contrast=0.5),
        wall=rng.uniform(12, 25), hx=rng.uniform(-12, 12), hz=d * rng.uniform(0.45, 0.58), ha=rng.uniform(38, 50),
        hb=rng.uniform(30, 38), hang=rng.uniform(-0.5, 0.5), skull=rng.uniform(2.0, 3.2),
        placenta=rng.random() < 0.5, pl_side=rng.choice([-1, 1]), fluid_r=rng.uniform(1.2, 1.45), depth=d,
    )


def echo_fetal_head(a, X, Z):
    tex = a["tex"](X, Z)
    echo = 1.0 * tex  # uterine wall / maternal tissue
    atten = np.full_like(echo, 0.06)
    wall = np.clip((Z - a["wall"]) / 1.5, 0, 1)
    echo = echo * (1 - wall) + wall * (1.3 * tex)
    d = _ellipse(X, Z, a["hx"], a["hz"], a["ha"], a["hb"], a["hang"])
    fluid = _inside(d / a["fluid_r"], 0.1) * wall
    echo = echo * (1 - fluid) + FLUID * fluid  # amniotic fluid around the head
    atten = atten - 0.05 * fluid
    if a["placenta"]:
        pl = _inside(_ellipse(X, Z, a["pl_side"] * 40, a["wall"] + 8, 45, 10)) * wall
        echo = echo * (1 - pl) + 1.6 * tex * pl
    head = _inside(d, 0.02)
    echo = echo * (1 - head) + 0.35 * a["brain"](X, Z) * head
    rel = a["skull"] / a["hb"]
    echo = echo + 9.0 * _ring(d, rel)
    atten = atten + 0.35 * _ring(d, rel)  # bone: partial shadow behind the far skull
    c, s = np.cos(a["hang"]), np.sin(a["hang"])
    u, v = (X - a["hx"]) * c + (Z - a["hz"]) * s, -(X - a["hx"]) * s + (Z - a["hz"]) * c
    falx = np.clip(1 - np.abs(v) / 0.8, 0, 1) * (np.abs(u) < a["ha"] * 0.85)
    echo = echo + 2.5 * falx  # midline echo
    for side in (-1, 1):
        th = _inside(_ellipse(u, v, -0.1 * a["ha"], side * 0.2 * a["hb"], 0.16 * a["ha"], 0.1 * a["hb"]))
        echo = echo * (1 - th) + 0.15 * th  # thalami
    csp = _inside(_ellipse(u, v, 0.3 * a["ha"], 0, 0.08 * a["ha"], 0.06 * a["hb"]))
    return echo * (1 - csp) + FLUID * csp, atten


def sample_liver(rng, extent):
    w, d = extent
    vessels = [(rng.uniform(-0.5, 0.5) * w, rng.uniform(0.25, 0.7) * d, rng.uniform(5, 16), rng.uniform(2.5, 6),
                rng.uniform(0, np.pi), rng.random() < 0.5) for _ in range(int(rng.integers(3, 7)))]
    return dict(
        tex=_Texture(rng, extent, cells=50, smooth=1.0, contrast=0.2), wall=rng.uniform(15, 25), vessels=vessels,
        dia_z=d * rng.uniform(0.75, 0.95), dia_r=rng.uniform(150, 300), dia_x=rng.uniform(-40, 40),
        gb=rng.random() < 0.4, gbx=rng.uniform(-30, 30), gbz=d * rng.uniform(0.35, 0.5), depth=d,
    )


def echo_liver(a, X, Z):
    tex = a["tex"](X, Z)
    echo = 1.3 * tex
    atten = np.full_like(echo, 0.08)
    wall = np.clip((a["wall"] - Z) / 1.0, 0, 1)
    echo = echo * (1 - wall) + wall * (0.5 + 2.0 * (np.sin(Z * 0.9) > 0.8))
    for vx, vz, length, radius, ang, portal in a["vessels"]:
        d = _ellipse(X, Z, vx, vz, length, radius * 1.2, ang)
        echo = echo * (1 - _inside(d)) + FLUID * _inside(d) + (2.5 if portal else 0.0) * _ring(d, 0.25)
        atten = atten - 0.05 * _inside(d)
    dd = np.hypot(X - a["dia_x"], Z - (a["dia_z"] + a["dia_r"])) - a["dia_r"]
    echo = np.where(dd < 0, 0.4 * tex, echo) + 7.0 * np.clip(1 - np.abs(dd) / 1.5, 0, 1)  # diaphragm, lung below
    if a["gb"]:
        d = _ellipse(X, Z, a["gbx"], a["gbz"], 22, 11, 0.4)
        echo = echo * (1 - _inside(d)) + FLUID * _inside(d) + 1.5 * _ring(d, 0.05)
        atten = atten - 0.07 * _inside(d)
    return echo, atten


def sample_heart(rng, extent):
    w, d = extent
    return dict(
        tex=_Texture(rng, extent, cells=40, smooth=1.5, contrast=0.3), scale=rng.uniform(0.85, 1.1),
        tilt=rng.uniform(-0.2, 0.2), cx=rng.uniform(-8, 8), depth=d, phase=rng.uniform(0, 2 * np.pi),
    )


def echo_heart(a, X, Z):
    tex = a["tex"](X, Z)
    k, d = a["scale"], a["depth"]
    c, s = np.cos(a["tilt"]), np.sin(a["tilt"])
    u, v = (X - a["cx"]) * c + Z * s, -(X - a["cx"]) * s + Z * c  # heart axis along the beam from the apex
    echo = 0.35 * tex  # lung/blood-pool clutter around
    atten = np.full_like(echo, 0.05)
    heart = _inside(_ellipse(u, v, 0, d * 0.52, 52 * k, d * 0.47))
    echo = echo * (1 - heart) + 1.6 * tex * heart  # myocardium
    squeeze = 1 + 0.05 * np.sin(a["phase"])
    chambers = [(-14, 0.38, 12, 0.22), (16, 0.4, 10, 0.2), (-15, 0.77, 12, 0.13), (16, 0.77, 11, 0.13)]
    for cx, cz, ca, cb in chambers:  # LV, RV, LA, RA of an apical four-chamber view
        dc = _ellipse(u, v, cx * k, d * cz, ca * k * squeeze, d * cb * squeeze, wobble=((3, 0.04, cx),))
        echo = echo * (1 - _inside(dc, 0.1)) + FLUID * _inside(dc, 0.1)
        atten = atten - 0.04 * _inside(dc)
    valves = np.clip(1 - np.abs(v - d * 0.6) / 1.2, 0, 1) * (np.abs(np.abs(u) - 14 * k) < 7 * k)
    echo = echo + 3.0 * valves
    peri = _ring(_ellipse(u, v, 0, d * 0.52, 52 * k, d * 0.47), 0.03)
    return echo + 4.0 * peri, atten


ORGANS: dict[str, tuple[Callable, Callable]] = {
    "breast": (sample_breast, echo_breast), "thyroid": (sample_thyroid, echo_thyroid),
    "kidney": (sample_kidney, echo_kidney), "fetal_head": (sample_fetal_head, echo_fetal_head),
    "liver": (sample_liver, echo_liver), "heart": (sample_heart, echo_heart),
}

# ----------------------------------------------------------------------------------------------------------
# Subject: probe geometry, scan conversion, canvas layout and UI, fixed for all of its frames.


@dataclass
class Subject:
    organ: str
    geometry: str
    depth: float  # mm imaged along each beam
    X: np.ndarray  # (N_DEPTH, N_LINES) mm, sample positions before probe motion
    Z: np.ndarray
    anatomy: dict
    canvas: np.ndarray  # uint8 (H,W,3) with the UI already drawn
    mask: np.ndarray  # bool (H,W)
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the scan area on the canvas
    map_x: np.ndarray | None  # scan-conversion maps (fan) from box pixels to (line, sample)
    map_y: np.ndarray | None
    psf: np.ndarray  # (N_DEPTH,) complex filter on the depth spectrum: PSF times analytic-signal mask
    lateral_sigma: float  # beams
    psf_gain: float  # rms envelope of unit white scatterers through this PSF: soft tissue is 0 dB
    tgc_slope: float  # dB/mm of TGC; the anatomy's attenuation is mostly compensated
    dyn_range: float  # dB shown between black and white
    gain: float  # dB
    font_color: tuple[int, int, int]
    inside_text: str | None
    calipers: bool
    doppler: bool


def _probe_geometry(organ, rng):
    """Beam sample positions in mm, imaged depth and geometry."""
    probe = PROBE[organ]
    if probe == "linear":
        depth, width = rng.uniform(35, 55), rng.uniform(38, 50)
        Z, X = np.meshgrid(np.linspace(0, depth, N_DEPTH), np.linspace(-width / 2, width / 2, N_LINES), indexing="ij")
        return "rect", depth, X, Z, dict(width=width)
    if probe == "convex":
        depth, r0, half = rng.uniform(110, 170), rng.uniform(35, 60), np.radians(rng.uniform(28, 38))
    else:
        depth, r0, half = rng.uniform(130, 170), rng.uniform(0.5, 3), np.radians(rng.uniform(38, 45))
    r, t = np.meshgrid(np.linspace(r0, r0 + depth, N_DEPTH), np.linspace(-half, half, N_LINES), indexing="ij")
    return "fan", depth, r * np.sin(t), r * np.cos(t) - r0, dict(r0=r0, half=half)


def _psf_filter(rng):
    """Depth-spectrum filter of a Gaussian-modulated cosine pulse, keeping positive frequencies (analytic)."""
    f = scipy.fft.fftfreq(N_DEPTH)  # cycles per sample
    f0, bw = rng.uniform(0.16, 0.24), rng.uniform(0.05, 0.08)
    return (2.0 * np.exp(-0.5 * ((f - f0) / bw) ** 2) * (f > 0)).astype(np.complex64)


def _fan_maps(geo, depth, height):
    """Scan-conversion maps and mask for a fan whose bounding box is `height` px tall."""
    r0, half = geo["r0"], geo["half"]
    z_top, z_bot = r0 * np.cos(half), r0 + depth  # from the apex
    scale = (height - 1) / (z_bot - z_top)
    width = int(2 * (r0 + depth) * np.sin(half) * scale) + 1
    v, u = np.mgrid[0:height, 0:width].astype(np.float32)
    x, z = (u - (width - 1) / 2) / scale, v / scale + z_top
    r, t = np.hypot(x, z), np.arctan2(x, z)
    map_y = (r - r0) / depth * (N_DEPTH - 1)
    map_x = (t + half) / (2 * half) * (N_LINES - 1)
    mask = (r >= r0) & (r <= r0 + depth) & (np.abs(t) <= half)
    return map_x.astype(np.float32), map_y.astype(np.float32), mask


VENDORS = ("SONOVIEW", "EchoStar", "MEDIX US", "ULTRA-7", "AcuScan")
PRESETS = {"breast": ("BREAST", "SMALL PARTS"), "thyroid": ("THYROID", "SMALL PARTS"), "kidney": ("RENAL", "ABD"),
           "fetal_head": ("OB 2/3", "OB"), "liver": ("ABD", "LIVER"), "heart": ("CARDIAC", "ADULT ECHO")}
INSIDE_LABELS = {"breast": ("RT UOQ", "LT 2:00", "RT AXILLA"), "thyroid": ("RT LOBE", "LT TRV", "ISTHMUS"),
                 "kidney": ("RT KID", "LT KIDNEY", "LONG"), "fetal_head": ("BPD", "HC", "FETAL HEAD"),
                 "liver": ("LIVER", "RT LOBE", "PV"), "heart": ("A4C", "APICAL", "4CH")}
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _draw_ui(canvas, box, depth, organ, rng, font_color):
    """Scanner clutter around the scan area: text, depth ruler, grey-scale bar, coloured logo."""
    H, W = canvas.shape[:2]
    x0, y0, x1, y1 = box
    lines = [rng.choice(VENDORS), f"{rng.choice(PRESETS[organ])}", f"MI {rng.uniform(0.2, 1.4):.1f}  TIs {rng.uniform(0.1, 0.9):.1f}",
             f"{int(rng.integers(1, 13)):02d}/{int(rng.integers(1, 29)):02d}/20{int(rng.integers(10, 25))}",
             f"FR {int(rng.integers(12, 60))}Hz", f"G {int(rng.integers(30, 80))}", f"{depth / 10:.1f} cm"]
    scale = rng.uniform(0.38, 0.5)
    tx = int(rng.integers(4, 12))
    for i, text in enumerate(lines[: int(rng.integers(4, len(lines) + 1))]):
        cv2.putText(canvas, text, (tx, 16 + i * int(26 * scale + 8)), FONT, scale, font_color, 1, cv2.LINE_AA)
    # depth ruler: a vertical line with cm ticks beside the scan area, labels every 5 cm (2 cm if shallow)
    rx = min(x1 + int(rng.integers(6, 14)), W - 30)
    px_per_cm = (y1 - y0) / (depth / 10)
    cv2.line(canvas, (rx, y0), (rx, y1 - 1), (200, 200, 200), 1)
    label_every = 1 if depth < 60 else 5
    for cm in range(int(depth / 10) + 1):
        y = int(round(y0 + cm * px_per_cm))
        major = cm % label_every == 0
        cv2.line(canvas, (rx, y), (rx + (7 if major else 4), y), (200, 200, 200), 1)
        if major and cm:
            cv2.putText(canvas, str(cm), (rx + 9, y + 4), FONT, 0.35, (200, 200, 200), 1, cv2.LINE_AA)
    # grey-scale bar, sometimes touching the scan area (as HC18's does)
    bh, bw = int(rng.integers(60, 200)), int(rng.integers(7, 14))
    if rng.random() < 0.3 and x0 - bw - 1 >= 0:
        bx = x0 - bw - int(rng.integers(0, 3))
    else:
        bx = int(rng.integers(2, max(3, min(x0, W - x1) - bw - 2))) if x0 > bw + 4 else W - bw - 4
    by = int(rng.integers(y0, max(y0 + 1, min(y1, H) - bh)))
    ramp = np.linspace(255, 20, bh).astype(np.uint8)[:, None, None]
    canvas[by: by + bh, bx: bx + bw] = ramp
    # coloured vendor logo in the top-right corner area
    lc = tuple(int(c) for c in rng.integers(40, 256, 3))
    lc = (lc[0], 255 - lc[0] // 2, 60)[:: 1 if rng.random() < 0.5 else -1]
    lx, ly = W - int(rng.integers(60, 90)), int(rng.integers(8, 24))
    cv2.circle(canvas, (lx, ly + 8), 9, lc, -1, cv2.LINE_AA)
    cv2.putText(canvas, rng.choice(["US", "E", "S"]), (lx + 14, ly + 14), FONT, 0.5, lc, 1, cv2.LINE_AA)
    # focus marker and a bottom status text
    fy = int(y0 + rng.uniform(0.3, 0.7) * (y1 - y0))
    cv2.fillPoly(canvas, [np.array([[rx - 7, fy - 4], [rx - 1, fy], [rx - 7, fy + 4]], np.int32)], (220, 220, 220))
    if H - y1 > 18:
        cv2.putText(canvas, f"Cine {int(rng.integers(1, 400))}", (tx, H - 6), FONT, 0.4, font_color, 1, cv2.LINE_AA)


def sample_subject(organ: str, rng: np.random.Generator) -> Subject:
    """One random anatomy, probe set-up and screen layout."""
    geometry, depth, X, Z, geo = _probe_geometry(organ, rng)
    H, W = int(rng.integers(CANVAS_H[0], CANVAS_H[1] + 1)), int(rng.integers(CANVAS_W[0], CANVAS_W[1] + 1))
    extent = (float(np.abs(X).max()) + 15, depth + 10)
    anatomy = ORGANS[organ][0](rng, extent)
    height = int(H * rng.uniform(0.72, 0.9))
    if geometry == "rect":
        width = int(round(height * geo["width"] / depth))
        if width > W - 180:
            height = int(height * (W - 180) / width)
            width = W - 180
        map_x = map_y = None
        local = np.ones((height, width), bool)
    else:
        map_x, map_y, local = _fan_maps(geo, depth, height)
        if local.shape[1] > W - 180:
            map_x, map_y, local = _fan_maps(geo, depth, int(height * (W - 180) / local.shape[1]))
        height, width = local.shape
    x0 = int(rng.integers(max(90, (W - width) // 2 - 60), min(W - width - 90, (W - width) // 2 + 60) + 1))
    y0 = int(rng.integers(8, H - height - 8 + 1))
    box = (x0, y0, x0 + width, y0 + height)
    mask = np.zeros((H, W), bool)
    mask[y0: y0 + height, x0: x0 + width] = local
    canvas = np.zeros((H, W, 3), np.uint8)
    font_color = (255, 255, 255) if rng.random() < 0.6 else tuple(int(c) for c in rng.integers(150, 256, 3))
    _draw_ui(canvas, box, depth, organ, rng, font_color)
    psf, lateral_sigma = _psf_filter(rng), rng.uniform(0.8, 1.4)
    canvas[mask] = 0  # the UI never overlaps the scan area (only deliberate annotations do)
    return Subject(
        organ=organ, geometry=geometry, depth=depth, X=X.astype(np.float32), Z=Z.astype(np.float32),
        anatomy=anatomy, canvas=canvas, mask=mask, box=box, map_x=map_x, map_y=map_y, psf=psf,
        lateral_sigma=lateral_sigma, psf_gain=float(np.sqrt(np.mean(np.abs(psf) ** 2) / (2 * np.sqrt(np.pi) * lateral_sigma))), tgc_slope=rng.uniform(0.85, 1.0), dyn_range=rng.uniform(45, 60),
        gain=rng.uniform(-3, 3), font_color=font_color,
        inside_text=str(rng.choice(INSIDE_LABELS[organ])) if rng.random() < 0.25 else None,
        calipers=bool(rng.random() < 0.3), doppler=bool(organ in ("thyroid", "kidney", "liver", "heart") and rng.random() < 0.12),
    )


# ----------------------------------------------------------------------------------------------------------
# Frame: probe motion, acoustics, scan conversion, burned-in annotations.


def _beamform(subject: Subject, rng: np.random.Generator) -> np.ndarray:
    """Log-compressed B-mode image (N_DEPTH, N_LINES) in [0,1] of the anatomy under a slightly moved probe."""
    shift_x, shift_z, rot = rng.normal(0, 1.0), rng.normal(0, 0.6), rng.normal(0, 0.02)
    c, s = np.cos(rot), np.sin(rot)
    # the anatomy is smooth on the speckle scale: evaluate it on a 2x coarser grid, then interpolate
    X = c * subject.X[::2, ::2] - s * subject.Z[::2, ::2] + shift_x
    Z = s * subject.X[::2, ::2] + c * subject.Z[::2, ::2] + shift_z
    echo, atten = (cv2.resize(np.asarray(m, np.float32), (N_LINES, N_DEPTH), interpolation=cv2.INTER_LINEAR)
                   for m in ORGANS[subject.organ][1](subject.anatomy, X, Z))
    scatter = rng.standard_normal((N_DEPTH, N_LINES), dtype=np.float32) * echo.astype(np.float32)
    scatter = gaussian_filter1d(scatter, subject.lateral_sigma, axis=1, mode="constant")  # lateral beam profile
    analytic = scipy.fft.ifft(scipy.fft.fft(scatter, axis=0) * subject.psf[:, None], axis=0)  # RF pulse + Hilbert
    envelope = np.abs(analytic) / subject.psf_gain
    dz = subject.depth / (N_DEPTH - 1)
    loss_db = 2.0 * np.cumsum(atten, axis=0) * dz  # two-way, along each beam: shadows and enhancement
    tgc_db = 2.0 * subject.tgc_slope * 0.07 * subject.Z  # the operator's TGC undoes the mean soft-tissue loss
    envelope = envelope * 10 ** ((tgc_db - loss_db + subject.gain) / 20)
    noise = NOISE_FLOOR * np.abs(rng.standard_normal((N_DEPTH, N_LINES)) + 1j * rng.standard_normal((N_DEPTH, N_LINES)))
    db = 20 * np.log10(envelope + noise + 1e-6)
    top = 0.6 * subject.dyn_range  # soft tissue (echo 1, 0 dB) shows at 40% grey; fluid and noise are black
    return np.clip((db - (top - subject.dyn_range)) / subject.dyn_range, 0, 1)


def _annotate(image, subject, rng):
    """Burn calipers, a text label or colour Doppler into the scan area, as scanners do."""
    x0, y0, x1, y1 = subject.box
    inside = np.argwhere(subject.mask[y0:y1, x0:x1])
    marks = {"calipers": False, "text": False, "color": False}
    if subject.calipers:
        colour = (255, 255, 0) if rng.random() < 0.3 else (255, 255, 255)
        p, q = (inside[rng.integers(len(inside))] for _ in range(2))
        pts = [(int(x0 + a[1]), int(y0 + a[0])) for a in (p, q)]
        for x, y in pts:
            cv2.line(image, (x - 6, y), (x + 6, y), colour, 1)
            cv2.line(image, (x, y - 6), (x, y + 6), colour, 1)
        n = int(np.hypot(pts[1][0] - pts[0][0], pts[1][1] - pts[0][1]) // 8)
        for i in range(1, n):
            t = i / n
            cv2.circle(image, (int(pts[0][0] + t * (pts[1][0] - pts[0][0])), int(pts[0][1] + t * (pts[1][1] - pts[0][1]))), 1, colour, -1)
        marks["calipers"] = True
    if subject.inside_text:
        cy, cx = inside[int(len(inside) * rng.uniform(0.75, 0.95))]
        cv2.putText(image, subject.inside_text, (int(x0 + cx - 20), int(y0 + cy)), FONT, 0.5, subject.font_color, 1, cv2.LINE_AA)
        marks["text"] = True
    if subject.doppler:
        cy, cx = inside[int(len(inside) * rng.uniform(0.3, 0.6))]
        blob = np.zeros(image.shape[:2], np.uint8)
        cv2.ellipse(blob, (int(x0 + cx), int(y0 + cy)), (int(rng.integers(10, 25)), int(rng.integers(6, 15))),
                    float(rng.uniform(0, 180)), 0, 360, 1, -1)
        flow = blob.astype(bool) & subject.mask
        colour = np.array([220, 30, 20] if rng.random() < 0.5 else [30, 60, 230], np.uint8)
        image[flow] = colour
        marks["color"] = True
    return marks


def render_frame(subject: Subject, rng: np.random.Generator) -> PhantomFrame:
    """One frame of the subject: fresh speckle and a small probe motion."""
    bmode = (_beamform(subject, rng) * 255).astype(np.float32)
    x0, y0, x1, y1 = subject.box
    if subject.geometry == "fan":
        local = cv2.remap(bmode, subject.map_x, subject.map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    else:
        local = cv2.resize(bmode, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    local = np.clip(local + 0.5, 0, 255).astype(np.uint8)
    image = subject.canvas.copy()
    region = image[y0:y1, x0:x1]
    np.maximum(region, (local * subject.mask[y0:y1, x0:x1])[..., None], out=region)  # canvas is 0 in the mask
    marks = _annotate(image, subject, rng)
    return PhantomFrame(image=image, mask=subject.mask.copy(), geometry=subject.geometry, annotations=marks)


def generate_frame(organ: str, rng: np.random.Generator) -> PhantomFrame:
    """A single frame of a fresh random subject of `organ` (in-memory; used by tests and notebooks)."""
    if organ not in ORGANS:
        raise ValueError(f"unknown organ {organ!r}; choose one of {', '.join(CLASSES)}")
    return render_frame(sample_subject(organ, rng), rng)


# ----------------------------------------------------------------------------------------------------------
# Command line: every (class, subject) is one task with its own random streams.


def _png_bytes(image: np.ndarray) -> bytes:
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])  # fast; files ~10% larger
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()


def frame_name(subject: int, frame: int) -> str:
    return f"s{subject:04d}_f{frame}"


def _make_subject(task: tuple[str, int, int, str, int]) -> int:
    """Write the frames of one subject that are not on disk yet; returns the number written."""
    out, class_index, subject_index, organ, n_frames = task
    paths = [(Path(out) / organ / f"{frame_name(subject_index, k)}.png", Path(out) / organ / f"{frame_name(subject_index, k)}_mask.png")
             for k in range(n_frames)]
    todo = [k for k, (img, msk) in enumerate(paths) if not (img.exists() and msk.exists())]
    if not todo:
        return 0
    subject = sample_subject(organ, np.random.default_rng([_SEED, class_index, subject_index]))
    for k in todo:
        frame = render_frame(subject, np.random.default_rng([_SEED, class_index, subject_index, 1 + k]))
        atomic_write_bytes(paths[k][1], _png_bytes(frame.mask.astype(np.uint8) * 255))
        atomic_write_bytes(paths[k][0], _png_bytes(frame.image))
    return len(todo)


_SEED = 0  # set in each worker from the Config (a module global so Pool tasks stay small tuples)


def _init_worker(seed: int) -> None:
    global _SEED
    _SEED = seed
    cv2.setNumThreads(1)


def validate(cfg: Config) -> None:
    """Every constant in its allowed range, and out a folder this process can write, before a frame is drawn."""
    check_constants(cfg, {"n_subjects_per_class": at_least(1), "frames_per_subject": at_least(1), "seed": SEED,
                          "workers": at_least(1)})
    if not cfg.out:
        raise ConfigError("--out is empty: it must name the output folder")
    check_output_folder("out", cfg.out)


def main(cfg: Config) -> None:
    try:
        validate(cfg)
        with own_output_folder(cfg.out, "make_phantoms.py", config_keys=vars(cfg)):
            make(cfg)
    except (ConfigError, RunFolderError, SideFileError) as err:
        raise SystemExit(f"error: {err}") from None
    except OSError as err:
        raise SystemExit(f"error: {os_error_line(err)}") from None


def make(cfg: Config) -> None:
    """main's work, in an output folder this run owns and holds the lock of."""
    out = Path(cfg.out)
    previous = out / "config.json"
    if previous.exists():
        recorded = read_json(previous)
        if isinstance(recorded, dict):
            check_same_run(recorded, config_dict(cfg), RUN_KEYS, previous, cfg.allow_changed_run)
    save_config(cfg, out)
    tasks = [(str(out), ci, s, organ, cfg.frames_per_subject) for ci, organ in enumerate(CLASSES)
             for s in range(cfg.n_subjects_per_class)]
    start, written = time.perf_counter(), 0
    with progress(total=len(tasks) * cfg.frames_per_subject, desc="phantoms", unit="frame") as bar:
        if cfg.workers > 1:
            with Pool(cfg.workers, initializer=_init_worker, initargs=(cfg.seed,)) as pool:
                for n in pool.imap_unordered(_make_subject, tasks):
                    written += n
                    bar.update(cfg.frames_per_subject)
        else:
            _init_worker(cfg.seed)
            for task in tasks:
                written += _make_subject(task)
                bar.update(cfg.frames_per_subject)
    elapsed = time.perf_counter() - start
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["path", "class", "subject", "geometry"])
    for _, _, s, organ, n in tasks:
        for k in range(n):
            writer.writerow([f"{organ}/{frame_name(s, k)}.png", organ, f"{organ}_{frame_name(s, k).split('_')[0]}",
                             "rect" if PROBE[organ] == "linear" else "fan"])
    atomic_write_text(out / "labels.csv", rows.getvalue())
    total = len(tasks) * cfg.frames_per_subject
    if written:
        print(f"wrote {written} new frames ({total} total) to {out} in {elapsed:.1f} s: "
              f"{written / elapsed:.1f} frames/s with {cfg.workers} worker(s)")
    else:
        print(f"all {total} frames were already in {out}; labels.csv written only if it changed")


if __name__ == "__main__":
    main(script_config(Config, None, validate))
