"""Check that scan_area.py detects exactly what an earlier revision did, on the shared BUSI + HC18 samples.

Loads common/scan_area.py (data_preprocessing/scan_area.py before it moved) as it was at git revision `ref` next to
the working tree's, runs both on every image of the samples (HC18 with its declared bottom-right overlay box, as the
hc18 adapter does) and compares geometry, crop box, apex, annotation flags, the mask's bytes and the model image's
bytes (the same error, for a frame without a scan area). Prints every difference; exits 1 if there is one. A speed-up
of the detection must leave this at "0 differ".

    python bench/compare_scan_area.py --ref=05c6943 [--shared_dir=../shared/us_data]
"""
from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: find data_preprocessing/

from common.config import ConfigError, parse_config  # noqa: E402
from common.progress import progress  # noqa: E402
from common import scan_area  # noqa: E402
from data_preprocessing.readers import read_frames  # noqa: E402


@dataclass
class Config:
    ref: str = "HEAD"  # git revision whose scan_area.py is the reference
    shared_dir: str = "../shared/us_data"  # holds BUSI/ and HC18/


SCAN_AREA_PATHS = ("common/scan_area.py", "data_preprocessing/scan_area.py")


def load_revision(ref: str, folder: Path):
    """scan_area.py at git revision `ref`, imported as a module of its own."""
    for where in SCAN_AREA_PATHS:  # the module lived in data_preprocessing/ before it moved to common/
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{where}"], capture_output=True, text=True)
        if shown.returncode == 0:
            source = shown.stdout
            break
    else:
        raise ConfigError(f"--ref={ref}: git cannot show {' or '.join(SCAN_AREA_PATHS)} there: {shown.stderr.strip()}")
    path = folder / "scan_area_ref.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("scan_area_ref", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scan_area_ref"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def detection(module, frame: np.ndarray, corners: tuple[str, ...]) -> tuple | str:
    """Everything a detection decides, as comparable values; the error message when there is no scan area."""
    try:
        area = module.detect_scan_area(frame, overlay_corners=corners)
    except module.ScanAreaError as err:
        return str(err)
    image = module.to_model_image(frame, area)
    return (area.geometry, area.box, area.apex, area.annotations,
            hashlib.sha1(area.mask.tobytes()).hexdigest(), hashlib.sha1(image.tobytes()).hexdigest())


def main() -> None:
    cfg = parse_config(Config)
    shared = Path(cfg.shared_dir)
    hc18 = sorted((shared / "HC18" / "training_set").glob("*HC.png"))
    busi = sorted(p for p in (shared / "BUSI" / "data").glob("*/images/*.png") if "_mask" not in p.name)
    if not hc18 or not busi:
        raise SystemExit(f"error: no HC18 or BUSI images under {shared}: pass --shared_dir=PATH/us_data")
    with tempfile.TemporaryDirectory() as tmp:
        reference = load_revision(cfg.ref, Path(tmp))
        frames, differ = 0, 0
        for path, corners in progress([(p, ("bottom_right",)) for p in hc18] + [(p, ()) for p in busi],
                                      desc="compare", unit="file"):
            for key, frame in read_frames(path):
                frames += 1
                old, new = detection(reference, frame, corners), detection(scan_area, frame, corners)
                if old != new:
                    differ += 1
                    print(f"DIFFERS {path.name}{key}: {cfg.ref}: {old}\n    working tree: {new}")
    print(f"RESULT {frames} frames ({len(hc18)} HC18, {len(busi)} BUSI files): {differ} differ from {cfg.ref}")
    if differ:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
