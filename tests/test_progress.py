import io
import subprocess
import sys

from tqdm import tqdm

import common.progress
from common.progress import progress


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
