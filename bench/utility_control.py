"""A control for eval_utility.py: a sweep folder whose "samples" are real held-out images, so that the detectability
AUC must come out near 0.5 (a detector that still separates them would be reading a cue of the pipeline, not of the
images). Its TSTR rows are meaningless by design: the "synthetic" images include the test split.

    python bench/utility_control.py --samples=runs/samples_real_findings_cpu --out=runs/control_real_as_synthetic
    python eval_utility.py --config=configs/utility_real_findings_cpu.json --samples=runs/control_real_as_synthetic \
        --ratios= --seeds=3

The val and test images of the sweep's processed set (other subjects than the training split) are saved at the
model's size, as sample_var.py saves its samples, under one no-prefix point, with the manifest and token file
eval_utility.py reads (the tokens are zeros: nothing reads them).
"""
from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find common/

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from common.config import parse_config  # noqa: E402
from common.image_data import list_classes, list_split, read_image  # noqa: E402
from common.io import atomic_save_npz, atomic_write_json, atomic_write_text  # noqa: E402
from common.plotting import save_image  # noqa: E402


@dataclass
class Config:
    samples: str = "runs/samples_real_findings_cpu"  # the sample_var.py folder to imitate (its config, classes, size)
    out: str = "runs/control_real_as_synthetic"  # the control sweep folder
    point: str = "NOP_cfg1.5"  # the name of its one sweep point


def main() -> None:
    cfg = parse_config(Config)
    samples, out = Path(cfg.samples), Path(cfg.out)
    config = json.loads((samples / "config.json").read_text())
    with np.load(samples / "samples_tokens.npz", allow_pickle=False) as tokens:
        vqvae_sha256, classes, idx_width = tokens["vqvae_sha256"], tokens["classes"], tokens["idx"].shape[1]
        with Image.open(samples / str(tokens["image_path"][0])) as first:
            size = first.width  # the model's side, at which sample_var.py saved its samples
    data = Path(config["data_dir"])
    if list_classes(data) != classes.tolist():
        raise SystemExit(f"error: {data} has classes {list_classes(data)}, but {samples} was sampled for "
                         f"{classes.tolist()}")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "point", "mode", "coarse_k", "guidance", "class", "label"])
    paths = []
    for split in ("val", "test"):
        for path, label in zip(*list_split(data, split, classes.tolist())):
            name = f"{cfg.point}/{classes[label]}/{split}_{path.stem}.png"
            save_image(read_image(path, size), out / name)
            writer.writerow([name, cfg.point, "NOP", 0, 1.5, classes[label], int(label)])
            paths.append(name)
    atomic_write_json(out / "config.json", config)
    atomic_write_text(out / "samples_manifest.csv", buffer.getvalue())
    atomic_save_npz(out / "samples_tokens.npz", idx=np.zeros((len(paths), idx_width), np.int16),
                    image_path=np.array(paths), vqvae_sha256=vqvae_sha256, classes=classes)
    print(f"wrote {len(paths)} real held-out images as sweep point {cfg.point} to {out}")


if __name__ == "__main__":
    main()
