"""common/progress.py on tqdm's clock set by hand: the 2 s gap between lines
and its exceptions, the 30 s lines of a bar without a total, and what counts as a terminal."""
from __future__ import annotations

import gc
import io
import subprocess
import sys

import pytest
from tqdm import tqdm

import common.progress
from common import progress as progress_module
from common.progress import LogLines, _is_terminal, progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_every_5_percent_without_carriage_returns(monkeypatch):
    monkeypatch.setattr(common.progress, "LOG_MIN_GAP_S", 0.0)  # this loop takes milliseconds
    log = io.StringIO()
    bar = progress(range(1000), desc="epoch 3/12", unit="img", file=log, leave=False)
    for i in bar:
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
    bar.close()
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert 20 <= len(lines) <= 22
    assert all(line.startswith("epoch 3/12: ") for line in lines)
    assert "100% 1000/1000" in lines[-1] and "loss=0.001" in lines[-1] and "img/s" in lines[-1]


def test_a_fast_loop_logs_its_start_and_end_only():
    log = io.StringIO()
    for _ in progress(range(1000), desc="prepare", file=log):
        pass
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "0% 0/1000" in lines[0] and "100% 1000/1000" in lines[1]


def test_manual_updates_write_and_unknown_total():
    log = io.StringIO()
    with progress(total=10, desc="sampling", file=log) as bar:
        for _ in range(10):
            bar.update()
        bar.write("point done", file=log)
    lines = log.getvalue().splitlines()
    assert lines[-2].startswith("sampling: 100% 10/10") and lines[-1] == "point done"  # no repeat after write

    log = io.StringIO()
    for _ in progress(iter(range(50)), desc="stream", file=log):
        pass
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("stream: 0it") and lines[-1].startswith("stream: 50it")


def test_a_loop_left_early_logs_where_it_stopped():
    log = io.StringIO()
    bar = progress(range(100), file=log)
    for i in bar:
        if i == 32:
            break
    bar.close()
    assert log.getvalue().splitlines()[-1].lstrip().startswith("32% 32/100")  # the items finished, not the 30% mark


def test_disabled_prints_nothing():
    log = io.StringIO()
    bar = progress(range(100), desc="rank 1", file=log, disable=True)
    for _ in bar:
        bar.set_postfix(loss="1")
    bar.close()
    assert log.getvalue() == ""


def test_on_a_terminal_it_is_the_tqdm_bar():
    screen = FakeTerminal()
    bar = progress(range(100), desc="epoch", file=screen, mininterval=0)
    for _ in bar:
        pass
    assert type(bar) is tqdm
    assert "\r" in screen.getvalue() and "epoch: 100%|" in screen.getvalue()


@pytest.mark.e2e
def test_a_redirected_script_log_stays_small(tmp_path, repo_root):
    script = ("from common.progress import progress\n"
              "for _ in progress(range(5000), desc='demo'):\n"
              "    pass\n")
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        subprocess.run([sys.executable, "-c", script], cwd=repo_root, stdout=log, stderr=subprocess.STDOUT, check=True)
    text = log_path.read_text()
    assert "\r" not in text and "demo: 100% 5000/5000" in text
    assert len(text) < 3000


class Clock:
    """tqdm's clock, moved by hand: seconds since the bar started."""

    def __init__(self, bar: tqdm) -> None:
        self.start, self.now = bar.start_t, 0.0
        bar._time = lambda: self.start + self.now


def lines_at(total: int | None, steps: list[tuple[float, int]]) -> list[str]:
    """Log lines of a bar updated by n items at each (elapsed s, n), then closed at the last time."""
    log = io.StringIO()
    bar = progress(total=total, desc="t", file=log)
    clock = Clock(bar)
    for elapsed, n in steps:
        clock.now = elapsed
        bar.update(n)
    bar.close()
    return log.getvalue().splitlines()


def test_a_5_percent_mark_within_2_s_of_the_last_line_waits_but_the_end_never_does() -> None:
    # tqdm shows the bar at n = 0 when it starts: logged. 1 s: mark 1, too soon; 2 s: the gap is reached.
    lines = lines_at(100, [(1.0, 5), (1.99, 1), (2.0, 1), (2.5, 93)])
    assert [line.split()[2] for line in lines] == ["0/100", "7/100", "100/100"]
    # the mark of 7 items is 1 (7 * 20 // 100): a later update within the same mark prints nothing
    lines = lines_at(100, [(3.0, 5), (9.0, 1), (20.0, 4)])
    assert [line.split()[2] for line in lines] == ["0/100", "5/100", "10/100"]


def test_without_a_total_a_line_every_30_s() -> None:
    lines = lines_at(None, [(10.0, 1), (29.9, 1), (30.0, 1), (59.0, 1), (60.5, 1), (61.0, 1)])
    assert [line.split()[1] for line in lines] == ["0it", "3it", "5it", "6it"]


def test_closing_right_after_a_line_does_not_repeat_it() -> None:
    log = io.StringIO()
    with progress(total=4, desc="d", file=log) as bar:
        Clock(bar).now = 5.0
        bar.update(4)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("d:   0% 0/4") and lines[1].startswith("d: 100% 4/4")


def test_more_items_than_the_total_stay_at_the_last_mark() -> None:
    log = io.StringIO()
    bar = progress(total=10, desc="t", file=log)
    clock = Clock(bar)
    clock.now = 5.0
    bar.update(10)
    clock.now = 10.0
    bar.update(3)  # mark min(13, 10) * 20 // 10 = 20, already logged: no line until the close
    assert [line.split()[2] for line in log.getvalue().splitlines()] == ["0/10", "10/10"]
    bar.close()
    assert log.getvalue().splitlines()[-1].startswith("t: 13it [00:10")


def test_a_bar_gets_no_redraws_and_no_layout_of_its_own() -> None:
    log = io.StringIO()
    bar = progress(range(3), desc="x", unit="img", file=log, dynamic_ncols=True, ncols=80, leave=True)
    assert type(bar) is LogLines and bar.ncols == 0 and bar.mininterval == 0 and bar.miniters == 1
    assert bar.unit == "img" and bar.desc == "x" and not bar.dynamic_ncols
    assert LogLines.monitor_interval == 0
    list(bar)
    bar.clear()
    bar.moveto(3)
    bar.close()
    assert log.getvalue().splitlines()[-1].startswith("x: 100% 3/3") and not log.getvalue().endswith("\n\n")


class Closed(io.StringIO):
    def isatty(self) -> bool:
        raise ValueError("I/O operation on closed file")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_what_counts_as_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _is_terminal(Terminal()) and not _is_terminal(io.StringIO())
    assert not _is_terminal(Closed()) and not _is_terminal(object())
    assert _is_terminal(type("One", (), {"isatty": lambda self: 1})()) is True
    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = progress(range(2))
    assert type(bar) is tqdm
    bar.close()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = progress(range(2))
    assert type(bar) is LogLines
    bar.close()
    assert type(progress(range(2), file=Terminal(), disable=True)) is tqdm


def test_the_constants() -> None:
    assert (progress_module.LOG_STEPS, progress_module.LOG_INTERVAL_S, progress_module.LOG_MIN_GAP_S) == (20, 30.0, 2.0)


class BadLength:
    def __iter__(self):
        return iter([])

    def __len__(self) -> int:
        raise ValueError("no length")


def test_a_bar_whose_tqdm_init_failed_is_collected_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    # tqdm's __del__ calls close() on a bar its __init__ left half-built (no `disable`, no `n`)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    try:
        progress(BadLength(), file=io.StringIO())
    except ValueError as err:
        assert str(err) == "no length"
    gc.collect()
    assert unraisable == []
