"""common/history.py: the records of a run, their series by key and their file."""
from __future__ import annotations

import json
from pathlib import Path

from common.history import History


def test_history_series_skip_missing_values_and_round_trip(tmp_path: Path) -> None:
    history = History()
    history.append(epoch=1, step=10, loss=0.5, kid=None)
    history.append(epoch=2, step=20, loss=0.25)
    history.append(epoch=3, step=30, loss=0.125, kid=0.01)
    assert history.series("loss") == ([1, 2, 3], [0.5, 0.25, 0.125])
    assert history.series("kid") == ([3], [0.01])
    assert history.series("loss", x="step") == ([10, 20, 30], [0.5, 0.25, 0.125])
    assert history.series("absent") == ([], [])
    path = tmp_path / "history.json"
    history.save(path)
    assert json.loads(path.read_text()) == history.records
    again = History.load(str(path))
    assert again.records == history.records and again.records is not history.records
    assert History.load(tmp_path / "none.json").records == []
    first = [{"epoch": 1}]
    copied = History(first)
    copied.append(epoch=2)
    assert first == [{"epoch": 1}]  # the given list is copied, not extended
