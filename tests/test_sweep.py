"""common/sweep.py: a sample_var.py folder read back, and one written by an older version refused by name."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.sweep import SweepError, load_sweep

HEADER = "path,point,mode,coarse_k,guidance,class,label"


def write_sweep(folder: Path, header: str = HEADER) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"data_dir": "data", "teacher_split": "test"}))
    rows = ["NOP_cfg1.5/a/s000.png,NOP_cfg1.5,NOP,0,1.5,a,0", "TP_K1_cfg1.5/b/t00_s00.png,TP_K1_cfg1.5,TP,1,1.5,b,1"]
    (folder / "samples_manifest.csv").write_text("\n".join([header, *rows]) + "\n")
    np.savez(folder / "samples_tokens.npz", idx=np.arange(6, dtype=np.int16).reshape(2, 3),
             image_path=np.array([r.split(",")[0] for r in rows]), vqvae_sha256=np.array("ab"),
             classes=np.array(["a", "b"]))
    return folder


def test_a_sweep_reads_back_its_rows_tokens_and_points(tmp_path: Path) -> None:
    sweep = load_sweep(write_sweep(tmp_path / "s"))
    assert sweep.points == ["NOP_cfg1.5", "TP_K1_cfg1.5"] and sweep.classes == ["a", "b"]
    assert sweep.rows[1]["guidance"] == "1.5" and sweep.idx.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert sweep.idx.dtype == np.int64 and sweep.vqvae_sha256 == "ab" and sweep.config["teacher_split"] == "test"


def test_a_sweep_of_an_older_sample_var_is_refused_naming_the_file_and_the_renamed_column(tmp_path: Path) -> None:
    folder = write_sweep(tmp_path / "old", HEADER.replace("guidance", "cfg"))
    with pytest.raises(SweepError) as err:
        load_sweep(folder)
    assert str(err.value) == (f"{folder / 'samples_manifest.csv'}: written by an older sample_var.py (column 'cfg', "
                              "now 'guidance'); re-run sample_var.py into a new folder")
    folder = write_sweep(tmp_path / "cut", HEADER.replace(",mode", ""))
    with pytest.raises(SweepError) as err:
        load_sweep(folder)
    assert str(err.value) == f"{folder / 'samples_manifest.csv'}: not sample_var.py's manifest (columns ['mode'] missing)"
