"""Throughput of the whole preprocessing step (data_preprocessing/prepare.py) on this machine.

Generates phantom frames into a temporary folder, then times prepare (read, scan area, crop, resize, write,
manifest, plots) on them, and a no-op re-run; then the same on the shared BUSI + HC18 samples when present.

    python bench/bench_preprocess.py [--n_subjects_per_class=4 --frames_per_subject=5 --workers=0]
"""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import parse_config  # noqa: E402
from data_preprocessing import make_phantoms  # noqa: E402
from data_preprocessing.prepare import Config as PrepareConfig  # noqa: E402
from data_preprocessing.prepare import run  # noqa: E402


@dataclass
class Config:
    n_subjects_per_class: int = 4  # phantom subjects per class (6 classes)
    frames_per_subject: int = 5  # phantom frames per subject
    workers: int = 0  # prepare's worker processes; 0 = one per CPU core
    shared_dir: str = "../shared/us_data"  # BUSI + HC18 samples, timed too when present


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (prepare's workers, once joined)."""
    return sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for field in ("ru_utime", "ru_stime"))


def timed(label: str, prepare_cfg: PrepareConfig, workers: int) -> None:
    load = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), cpu_seconds()
    stats = run(prepare_cfg)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    start = time.perf_counter()
    again = run(prepare_cfg)
    rerun = time.perf_counter() - start
    assert again["processed"] == 0
    print(f"RESULT {label}: {stats['ok']} images kept ({stats['skipped']} skipped) from {stats['files']} files in "
          f"{seconds:.1f} s = {stats['files'] / seconds:.1f} files/s, {stats['ok'] / seconds:.1f} images/s "
          f"(whole step incl. manifest and plots, {workers} workers), {cpu / max(stats['ok'], 1):.3f} CPU s/image; "
          f"re-run with nothing new: {rerun:.1f} s; load average {load:.1f} before")


def main() -> None:
    cfg = parse_config(Config)
    workers = cfg.workers or os.cpu_count() or 1
    print(f"{os.cpu_count()} CPU cores, {workers} workers")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw_phantoms"
        make_phantoms.main(make_phantoms.Config(out=str(raw), n_subjects_per_class=cfg.n_subjects_per_class,
                                                frames_per_subject=cfg.frames_per_subject, workers=workers))
        timed("phantoms", PrepareConfig(phantom_dir=str(raw), out=str(Path(tmp) / "phantoms_out"), workers=workers), workers)

        shared = Path(cfg.shared_dir)
        if (shared / "BUSI").is_dir() and (shared / "HC18").is_dir():
            busi = {"name": "busi", "adapter": "busi", "root": str((shared / "BUSI").resolve()), "class": "breast"}
            hc18 = {"name": "hc18", "adapter": "hc18", "root": str((shared / "HC18").resolve()), "class": "fetal_head"}
            # HC18 alone: its 800x540 frames are the size the throughput target is stated for
            for label, datasets in (("shared HC18", [hc18]), ("shared BUSI+HC18", [busi, hc18])):
                name = label.split()[1].replace("+", "_")
                recipe = Path(tmp) / f"recipe_{name}.json"
                recipe.write_text(json.dumps({"datasets": datasets}))
                timed(label, PrepareConfig(recipe=str(recipe), out=str(Path(tmp) / f"out_{name}"), workers=workers), workers)
        else:
            print(f"{shared} has no BUSI/ and HC18/: shared-data timing skipped")


if __name__ == "__main__":
    main()
