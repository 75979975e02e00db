"""Per-epoch metrics of a training run, kept as a list of records and saved as JSON for plots and resume."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from common.io import atomic_write_json, read_json


class History:
    def __init__(self, records: list[dict[str, Any]] | None = None) -> None:
        self.records: list[dict[str, Any]] = list(records or [])

    def append(self, **record: Any) -> None:
        self.records.append(record)

    def series(self, key: str, x: str = "epoch") -> tuple[list[float], list[float]]:
        """(xs, ys) of the records that have `key`."""
        rows = [r for r in self.records if r.get(key) is not None]
        return [r[x] for r in rows], [r[key] for r in rows]

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.records)

    @classmethod
    def load(cls, path: str | Path) -> "History":
        path = Path(path)
        return cls(read_json(path)) if path.exists() else cls()
