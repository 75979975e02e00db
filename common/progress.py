"""Progress bars that suit both a terminal and a log file.

On a terminal `progress` is the ordinary tqdm bar. Anywhere else (a redirected log, CI) tqdm's carriage-return
redraws would pile up in the file, so the bar prints a plain line instead, about every 5% of the total and at the
end (every 30 s when the total is unknown; never two lines within 2 s but the last), e.g. `epoch 3/12: 45% 27/60 [00:12<00:14, 2.1it/s, loss=0.123]`.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm import tqdm

LOG_STEPS = 20  # lines per bar with a known total: one every 5%
LOG_INTERVAL_S = 30.0  # seconds between lines without a total
LOG_MIN_GAP_S = 2.0  # a 5% mark is skipped when the last line is younger: a loop of a second logs its start and end


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LogLines(tqdm):
    """tqdm that writes whole lines ("\\n", never "\\r") at 5% marks and at close; tqdm still formats them."""

    monitor_interval = 0  # the monitor thread only tunes miniters, which this class fixes at 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._logged_mark = -1
        self._logged_n: float | None = None
        self._logged_at = -float("inf")
        kwargs.pop("dynamic_ncols", None)
        # ncols=0 is tqdm's own "no bar" layout; every update reaches display(), which picks the lines to print.
        super().__init__(*args, **{**kwargs, "ncols": 0, "mininterval": 0, "miniters": 1})

    def _mark(self) -> int:
        if self.total:
            return int(min(self.n, self.total) * LOG_STEPS // self.total)
        return int(self.format_dict["elapsed"] // LOG_INTERVAL_S)  # tqdm's clock, also before start_t is set

    def _log(self) -> None:
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
        self._logged_mark, self._logged_n, self._logged_at = self._mark(), self.n, self.format_dict["elapsed"]

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        # msg '' is tqdm erasing the bar (close, write); a printed line stays.
        finished = bool(self.total) and self.n >= self.total
        if msg is None and self._mark() > self._logged_mark \
                and (finished or self.format_dict["elapsed"] - self._logged_at >= LOG_MIN_GAP_S):
            self._log()
        return False  # nothing on screen for tqdm to move past or clear

    def clear(self, nolock: bool = False) -> None:
        pass

    def moveto(self, n: int) -> None:
        pass

    def close(self) -> None:
        if not getattr(self, "disable", True) and self.n != self._logged_n:  # tqdm may have failed in __init__
            self._log()  # the end, also for leave=False and for a loop left early
        self.leave = False  # stops tqdm's final redraw and newline
        super().close()


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on a terminal, log lines elsewhere (see the module doc); kwargs go to tqdm (leave, file, ...).

    `disable=True` prints nothing (e.g. `disable=not dist.is_main` on the other torchrun processes).
    """
    bar_class = tqdm if _is_terminal(kwargs.get("file") or sys.stderr) else LogLines
    return bar_class(iterable, total=total, desc=desc, unit=unit, disable=disable, **kwargs)
