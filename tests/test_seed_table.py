"""bench/seed_table.py: a sweep point over several seeds, each as a share of its own evaluation's RECON row."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import seed_table  # noqa: E402


def evaluation(folder: Path, recon: dict, nop: dict) -> Path:
    rows = [{"point": "RECON", "class": "all", **recon}, {"point": "NOP_cfg1", "class": "all", **nop},
            {"point": "NOP_cfg1", "class": "breast", "kid": 9.0}]  # class rows are not read
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"info": {}, "rows": rows}))
    return folder


def test_each_seed_is_a_share_of_its_own_recon_row(tmp_path: Path) -> None:
    recon_a = {"kid": 0.10, "kid_hi": 0.14, "recall_vs_recon": 0.8, "coverage_vs_recon": 0.5, "feature_diversity": 0.2}
    recon_b = {"kid": 0.12, "kid_hi": 0.13, "recall_vs_recon": 0.5, "coverage_vs_recon": 1.0, "feature_diversity": 0.1}
    nop_a = {"kid": 0.13, "recall_vs_recon": 0.4, "coverage_vs_recon": 0.5, "feature_diversity": 0.1, "copy_fraction": 0.0}
    nop_b = {"kid": 0.15, "recall_vs_recon": 0.5, "coverage_vs_recon": 0.7, "feature_diversity": 0.09,
             "copy_fraction": 0.25}
    tables = [seed_table.all_class_rows(evaluation(tmp_path / name, r, n))
              for name, r, n in (("a", recon_a, nop_a), ("b", recon_b, nop_b))]
    assert seed_table.sweep_points(tables[0]) == ["NOP_cfg1"]
    cells = dict(seed_table.point_cells(tables, "NOP_cfg1"))
    assert cells["recall vs recon"] == "75% (50, 100)"  # 0.4 / 0.8 and 0.5 / 0.5
    assert cells["coverage vs recon"] == "85% (100, 70)"
    assert cells["feature diversity"] == "70% (50, 90)"
    assert cells["KID (RECON's)"] == "0.140 (0.110)"
    assert cells["KID inside RECON's interval or below"] == "1 of 2"  # 0.13 <= 0.14; 0.15 > 0.13
    assert cells["copies"] == "25% at most"


def test_a_missing_recon_value_gives_nan_not_a_share(tmp_path: Path) -> None:
    assert math.isnan(seed_table.share({"recall_vs_recon": 0.5}, {"recall_vs_recon": None}, "recall_vs_recon"))
    assert math.isnan(seed_table.share({"recall_vs_recon": 0.5}, {"recall_vs_recon": 0.0}, "recall_vs_recon"))


def test_a_folder_without_an_evaluation_is_named(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"nothing.*not a finished eval_var.py folder"):
        seed_table.all_class_rows(tmp_path / "nothing")


def test_the_difference_over_seeds_is_welchs_interval() -> None:
    # Means 2 and 4; variances 1/3 and 4/3 of the mean; Welch's dof 2.94: 2 +- 4.155 (scipy.stats.ttest_ind).
    diff, low, high = seed_table.welch_interval(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0]), 0.95)
    assert (diff, low, high) == pytest.approx((2.0, -2.1554, 6.1554), abs=1e-4)
    assert math.isnan(seed_table.welch_interval(np.array([1.0]), np.array([2.0, 3.0]), 0.95)[1])
