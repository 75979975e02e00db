"""One row per sweep point over several training seeds: each eval_var.py evaluation's numbers as a share of its own
RECON row (every seed has its own tokenizer, so its own ceiling), their mean and each seed's, and how many seeds'
KID lies inside RECON's interval or below it. The table issue 25's candidates are compared in.

    python bench/seed_table.py --evals=runs/s0/samples/eval,runs/s1/samples/eval,runs/s2/samples/eval
    python bench/seed_table.py --evals=... --label="prefix_weight 0.3" --markdown=true   # a row per point, markdown
    python bench/seed_table.py --evals=<seeds of A> --versus=<seeds of B>   # is B - A detectable over the seeds?

Reads metrics.json (all-classes rows) of every evaluation; the points must be the same in all of them. --versus
gives, per point and number, the difference of the seed means with its Welch t interval (`level`): the seeds are
the replicates, so the interval covers what a training run changes, which eval_var.py's bootstrap does not.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find common/

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from common.config import parse_config  # noqa: E402
from common.io import SideFileError, read_json  # noqa: E402

SHARES = {"recall_vs_recon": "recall vs recon", "coverage_vs_recon": "coverage vs recon",
          "feature_diversity": "feature diversity"}  # each a share of the same evaluation's RECON row


@dataclass
class Config:
    evals: str = ""  # comma-separated eval_var.py output folders, one per training seed
    label: str = ""  # first column of the markdown rows (e.g. the candidate's setting)
    markdown: bool = False  # print markdown table rows instead of the aligned text table
    versus: str = ""  # comma-separated evaluations of another setting (B): per point, B - A over the seeds
    level: float = 0.95  # --versus: confidence level of the difference's interval


def all_class_rows(folder: Path) -> dict[str, dict]:
    try:
        rows = read_json(folder / "metrics.json")["rows"]
        return {r["point"]: r for r in rows if r["class"] == "all"}
    except (SideFileError, OSError, KeyError, TypeError) as err:
        raise SystemExit(f"{folder}: not a finished eval_var.py folder (metrics.json): {err}") from None


def share(row: dict, recon: dict, metric: str) -> float:
    """row's metric over RECON's (NaN where either is missing or RECON's is 0)."""
    value, ceiling = _number(row.get(metric)), _number(recon.get(metric))
    return value / ceiling if ceiling and not math.isnan(ceiling) else math.nan


def point_cells(tables: list[dict[str, dict]], point: str) -> list[tuple[str, str]]:
    """(column name, text) of one sweep point over the evaluations (one per seed)."""
    cells = []
    for metric, name in SHARES.items():
        values = np.array([share(t[point], t["RECON"], metric) for t in tables]) * 100
        cells.append((name, f"{np.nanmean(values):.0f}% ({', '.join(f'{v:.0f}' for v in values)})"))
    kid, recon_kid = ([_number(t[row].get("kid")) for t in tables] for row in (point, "RECON"))
    inside = sum(k <= _number(t["RECON"].get("kid_hi")) for k, t in zip(kid, tables))  # NaN compares False
    cells.append(("KID (RECON's)", f"{np.mean(kid):.3f} ({np.mean(recon_kid):.3f})"))
    cells.append(("KID inside RECON's interval or below", f"{inside} of {len(tables)}"))
    copies = [_number(t[point].get("copy_fraction")) for t in tables]
    cells.append(("copies", f"{np.nanmax(copies):.0%} at most" if not np.all(np.isnan(copies)) else "n/a"))
    return cells


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


def seed_values(tables: list[dict[str, dict]], point: str) -> dict[str, np.ndarray]:
    """Per number, its value in each evaluation: the shares of RECON, KID, and KID less RECON's."""
    values = {name: np.array([share(t[point], t["RECON"], metric) for t in tables]) for metric, name in SHARES.items()}
    values["KID"] = np.array([_number(t[point].get("kid")) for t in tables])
    values["KID - RECON's KID"] = values["KID"] - np.array([_number(t["RECON"].get("kid")) for t in tables])
    return values


def welch_interval(a: np.ndarray, b: np.ndarray, level: float) -> tuple[float, float, float]:
    """mean(b) - mean(a) and its Welch t interval (scipy's, unequal variances); NaN bounds with fewer than 2 values
    a side."""
    diff = float(np.mean(b) - np.mean(a))
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan, math.nan
    interval = stats.ttest_ind(b, a, equal_var=False).confidence_interval(level)
    return diff, float(interval.low), float(interval.high)


def load_tables(spec: str, flag: str) -> tuple[list[Path], list[dict[str, dict]], list[str]]:
    folders = [Path(f) for f in spec.split(",") if f]
    if not folders:
        raise SystemExit(f"{flag}: give at least one eval_var.py output folder")
    tables = [all_class_rows(f) for f in folders]
    points = sweep_points(tables[0])
    for folder, table in zip(folders, tables):
        if "RECON" not in table or sweep_points(table) != points:
            raise SystemExit(f"{folder}: its points differ from {folders[0]}'s ({points}), or it has no RECON row")
    return folders, tables, points


def main() -> None:
    config = parse_config(Config)
    if not 0 < config.level < 1:
        raise SystemExit(f"--level: must be in (0, 1), got {config.level}")
    folders, tables, points = load_tables(config.evals, "--evals")
    if config.versus:
        _, others, other_points = load_tables(config.versus, "--versus")
        if other_points != points:
            raise SystemExit(f"--versus: its points {other_points} differ from --evals' {points}")
        print(f"B - A over the seeds ({len(tables)} against {len(others)}), {100 * config.level:g}% Welch t interval")
        for point in points:
            a, b = seed_values(tables, point), seed_values(others, point)
            for name in a:
                diff, low, high = welch_interval(a[name], b[name], config.level)
                verdict = "no detectable difference" if not low > 0 and not high < 0 else "detectable"
                print(f"{point:<14} {name:<20} A {np.mean(a[name]):.3f}  B {np.mean(b[name]):.3f}  B - A {diff:+.3f} "
                      f"[{low:+.3f}, {high:+.3f}]  {verdict}")
        return
    if not config.markdown:
        print(f"{len(folders)} evaluations; each number a share of the same evaluation's RECON row: mean (per seed)")
    for point in points:
        cells = point_cells(tables, point)
        if config.markdown:
            print("| " + " | ".join([config.label, point, str(len(folders))] + [c[1] for c in cells]) + " |")
        else:
            print(f"{point}: " + "; ".join(f"{name} {value}" for name, value in cells))


def sweep_points(table: dict[str, dict]) -> list[str]:
    return [p for p in table if p not in ("REAL", "REAL_TRAIN", "RECON")]


if __name__ == "__main__":
    main()
