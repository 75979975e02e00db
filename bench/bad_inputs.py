"""Bad-input bench for data_preprocessing/prepare.py: a corpus of broken inputs, prepare.py run on each.

Every case is a small folder made here (its inputs, recipe and output folder). prepare.py runs on it as a
subprocess with a timeout, and the run's outcome is one of:
  processed            exit 0, nothing skipped
  skipped-with-reason  exit 0, the bad files are manifest rows with their reason
  clear error          exit 1 with one "error: ..." line (no traceback)
  HANG                 still running at the timeout
  TRACEBACK            a Python traceback, or a failure without an "error:" line
  FILES LOST           an input changed or vanished, or a previous processed set of unchanged sources changed
Each case also says which outcome a robust prepare.py gives, the text its error or skip reason must hold, and
(for some) a check of the result. Prints a table and totals; exits 1 on any HANG, TRACEBACK, FILES LOST or
unexpected outcome.

    python bench/bad_inputs.py [--folder=DIR --timeout_s=60 --jobs=2]
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from common.config import parse_config  # noqa: E402
from data_preprocessing import prepare  # noqa: E402
from data_preprocessing.make_phantoms import generate_frame  # noqa: E402

PREPARE = Path(__file__).resolve().parents[1] / "data_preprocessing" / "prepare.py"
FAILURES = ("HANG", "TRACEBACK", "FILES LOST")


@dataclass
class Config:
    folder: str = ""  # where the corpus is built and kept; empty = a temporary folder, removed at the end
    timeout_s: float = 60.0  # a prepare.py run still going after this long counts as a hang
    jobs: int = 2  # cases run at the same time


@dataclass
class Case:
    name: str
    root: Path  # the case's folder: everything in it except `out` is input, only ever to be read
    args: list[str]  # prepare.py arguments
    expect: str  # the outcome a robust prepare.py gives
    text: str  # must appear in the error line, or in a skipped row's reason
    out: Path
    check: Callable[[list[dict]], str] | None = None  # on the manifest rows: what is wrong, "" when right
    keep_out: bool = False  # the output folder holds a previous set (of unchanged sources) that must stay as it is
    max_file_bytes: int = 0  # > 0: no file prepare.py writes may grow beyond this (RLIMIT_FSIZE: a full disk)


@dataclass
class Result:
    case: Case
    outcome: str
    detail: str
    seconds: float
    expected: bool = False  # the outcome, text and check the case asks for


# ---------------------------------------------------------------- the corpus

def save(frame: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame).save(path)
    return path


def folder_recipe(root: Path, **options) -> Path:
    recipe = root / "recipe.json"
    recipe.write_text(json.dumps({"datasets": [{"name": "d", "adapter": "folder", "root": "data", "options": options}]}))
    return recipe


def csv_recipe(root: Path, table: str, **options) -> Path:
    recipe = root / "recipe.json"
    recipe.write_text(json.dumps({"datasets": [
        {"name": "t", "adapter": "csv", "root": table, "class": "kidney", "options": options}]}))
    return recipe


def ok_count(n: int) -> Callable[[list[dict]], str]:
    def check(rows: list[dict]) -> str:
        kept = sum(r["status"] == "ok" for r in rows)
        return "" if kept == n else f"{kept} images kept, expected {n}"
    return check


def build_cases(base: Path, frames: list[np.ndarray]) -> list[Case]:
    cases = []

    def case(name: str, recipe: Path, expect: str, text: str, args=(), out: Path | None = None, **kw) -> None:
        cases.append(Case(name, base / name, [f"--recipe={recipe}", *args], expect, text, out or base / name / "out", **kw))

    root = base / "symlink_loops"  # two loops once meant an endless walk; one listed every file 41 times
    for i in range(3):
        save(frames[i], root / "data" / "kidney" / f"s{i}.png")
    save(frames[3], root / "data" / "kidney" / "sub" / "s3.png")
    (root / "data" / "kidney" / "loop").symlink_to(".")
    (root / "data" / "kidney" / "sub" / "up").symlink_to("..")
    (root / "data" / "kidney" / "s0_alias.png").symlink_to("s0.png")
    case("symlink_loops", folder_recipe(root), "skipped-with-reason", "same file as", check=ok_count(4))

    root = base / "fifo_named_png"  # hashing opened the FIFO and waited for a writer forever
    save(frames[0], root / "data" / "kidney" / "a.png")
    os.mkfifo(root / "data" / "kidney" / "x.png")
    os.mkfifo(root / "data" / "kidney" / "IM0001")  # no suffix: DICOM sniffing opened it
    case("fifo_named_png", folder_recipe(root), "skipped-with-reason", "not a regular file: a named pipe", check=ok_count(1))

    root = base / "dev_zero_in_csv"  # hashing /dev/zero never ends
    save(frames[0], root / "a.png")
    (root / "labels.csv").write_text("path\na.png\n/dev/zero\n")
    case("dev_zero_in_csv", csv_recipe(root, "labels.csv", allow_paths_outside_root=True), "skipped-with-reason",
         "not a regular file: a device", check=ok_count(1))

    root = base / "csv_paths_outside"  # /etc/shadow was read and hashed
    save(frames[0], root / "table" / "a.png")
    save(frames[1], root / "private.png")
    (root / "table" / "labels.csv").write_text("path\na.png\n../private.png\n/etc/shadow\n")
    case("csv_paths_outside", csv_recipe(root, "table/labels.csv"), "skipped-with-reason",
         "leads outside the table's folder", check=ok_count(1))

    root = base / "exif_rotated_jpeg"  # a phone photo: pixels stored sideways plus an orientation tag
    save(frames[0], root / "data" / "kidney" / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # display turned 90 degrees clockwise
    Image.fromarray(np.rot90(frames[0])).save(root / "data" / "kidney" / "phone.jpg", exif=exif.tobytes(), quality=95)
    case("exif_rotated_jpeg", folder_recipe(root), "processed", "", check=same_images(root / "out", "upright.png", "phone.jpg"),
         args=["--near_duplicate_bits=-1"])  # the two files are one scan on purpose: both must be kept to compare

    root = base / "corrupt_files"
    good = save(frames[0], root / "data" / "kidney" / "good.png").read_bytes()
    bad = root / "data" / "kidney"
    (bad / "truncated.png").write_bytes(good[: len(good) // 3])
    Image.fromarray(frames[1]).save(bad / "full.jpg", quality=90)
    (bad / "truncated.jpg").write_bytes((bad / "full.jpg").read_bytes()[:2000])
    (bad / "full.jpg").unlink()
    (bad / "corrupt.dcm").write_bytes(bytes(128) + b"DICM" + os.urandom(300))
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.png").write_text("not an image\n")
    case("corrupt_files", folder_recipe(root), "skipped-with-reason", "truncated", check=all_skipped(
        ["truncated.png", "truncated.jpg", "corrupt.dcm", "empty.png", "text.png"], ok=1))

    root = base / "tiny_set_empty_val"  # unreadable files took split slots: val could end up empty
    for i in range(3):
        save(frames[i], root / "data" / "kidney" / f"s{i}.png")
        (root / "data" / "kidney" / f"broken{i}.png").write_bytes(b"")
    case("tiny_set_empty_val", folder_recipe(root), "skipped-with-reason", "empty file",
         args=["--val_frac=0.2", "--test_frac=0.2"], check=every_split)

    for name, entry, text in (("recipe_options_list", {"options": []}, "field 'options' must be an object or null"),
                              ("recipe_root_number", {"root": 5}, "field 'root' must be a string")):
        root = base / name
        (root / "data" / "kidney").mkdir(parents=True)
        recipe = root / "recipe.json"
        recipe.write_text(json.dumps({"datasets": [{"name": "d", "adapter": "folder", "root": "data", **entry}]}))
        case(name, recipe, "clear error", f"{recipe}, dataset #0: {text}")

    root = base / "recipe_fifo"  # reading the recipe waited for a writer forever
    root.mkdir()
    os.mkfifo(root / "recipe.json")
    case("recipe_fifo", root / "recipe.json", "clear error", "not a regular file: a named pipe")

    root = base / "out_is_a_file"
    save(frames[0], root / "data" / "kidney" / "a.png")
    (root / "processed").write_text("an existing file, not a folder\n")
    case("out_is_a_file", folder_recipe(root), "clear error", "exists and is not a folder", out=root / "processed")

    root = base / "out_unwritable"
    save(frames[0], root / "data" / "kidney" / "a.png")
    if os.geteuid() == 0:  # root writes through any mode bits; nobody may create files in /sys/kernel
        locked = Path("/sys/kernel")
    else:
        locked = root / "locked"
        locked.mkdir(mode=0o555)
    case("out_unwritable", folder_recipe(root), "clear error", "cannot write in", out=locked)

    root = base / "size_zero_on_existing_set"  # reprocessed into nothing and deleted every image, exit 0
    existing_set(root, frames)
    case("size_zero_on_existing_set", root / "recipe.json", "clear error", "--size=0: must be in [32, 4096]",
         args=["--size=0"], keep_out=True)

    root = base / "stale_temp_in_out"  # a killed atomic write's temp file stayed for ever
    existing_set(root, frames)
    stale = root / "out" / ".manifest.csv.k3j9_a2b.tmp"
    stale.write_bytes(b"half a manifest")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    case("stale_temp_in_out", root / "recipe.json", "processed", "",
         check=lambda rows: f"{stale.name} is still there" if stale.exists() else "")

    root = base / "foreign_manifest"  # an output folder holding someone else's manifest.csv
    save(frames[0], root / "data" / "kidney" / "a.png")
    save(frames[1], root / "out" / "train" / "kidney" / "keep.png")
    (root / "out" / "manifest.csv").write_text("file,label\nkeep.png,kidney\n")
    (root / "out" / "config.json").write_text("{}")
    case("foreign_manifest", folder_recipe(root), "clear error", "did not write", keep_out=True)

    # Folder ownership: a step never writes into an input, or into a folder another step (or someone) owns.
    root = base / "out_inside_dataset_root"  # a second run turned the first run's outputs into a class
    save(frames[0], root / "data" / "kidney" / "a.png")
    case("out_inside_dataset_root", folder_recipe(root), "clear error", "lies inside the input",
         out=root / "data" / "processed")

    root = base / "out_owned_by_another_step"  # train_vqvae.py's checkpoints were replaced
    save(frames[0], root / "data" / "kidney" / "a.png")
    (root / "out").mkdir()
    (root / "out" / ".owner.json").write_text(json.dumps({"step": "train_vqvae.py", "run": "r", "name": ""}))
    (root / "out" / "best.pth").write_bytes(b"a checkpoint")
    (root / "out" / "config.json").write_text(json.dumps({"data_dir": "data/processed"}))
    case("out_owned_by_another_step", folder_recipe(root), "clear error", "belongs to train_vqvae.py", keep_out=True)

    # Locks: a live run's lock keeps a second run off the folder; a dead run's lock is taken over.
    root = base / "out_locked_by_live_run"
    existing_set(root, frames)
    lock = {"pid": os.getpid(), "host": socket.gethostname(), "step": "prepare.py", "since": "now"}
    (root / "out" / ".lock").write_text(json.dumps(lock))
    case("out_locked_by_live_run", root / "recipe.json", "clear error", "is in use by prepare.py", keep_out=True)

    root = base / "stale_lock"
    save(frames[0], root / "data" / "kidney" / "a.png")
    (root / "out").mkdir()
    (root / "out" / ".lock").write_text(json.dumps({**lock, "pid": dead_pid()}))
    case("stale_lock", folder_recipe(root), "processed", "", check=ok_count(1))

    # The guarded reader: side files too deep, not UTF-8, or with keys no recipe has.
    for name, text, error in (("recipe_nested_deep", "[" * 100_000 + "]" * 100_000, "JSON nested deeper than"),
                              ("recipe_not_utf8", '{"datasets": "\udcff"}', "not UTF-8 text"),
                              ("recipe_unknown_top_key", '{"datasets": [{}], "dataset": []}',
                               "unknown top-level keys ['dataset']")):
        root = base / name
        root.mkdir()
        (root / "recipe.json").write_bytes(text.encode("utf-8", "surrogateescape"))
        case(name, root / "recipe.json", "clear error", error)

    # Constants: null or false where a value is meant, integers beyond 64 bits.
    root = base / "preset_false_fraction"  # false was taken as 0.0
    save(frames[0], root / "data" / "kidney" / "a.png")
    (root / "preset.json").write_text(json.dumps({"test_frac": False}))
    case("preset_false_fraction", folder_recipe(root), "clear error", "--test_frac: expected float, got False",
         args=[f"--config={root / 'preset.json'}"])
    root = base / "seed_beyond_64_bits"
    save(frames[0], root / "data" / "kidney" / "a.png")
    case("seed_beyond_64_bits", folder_recipe(root), "clear error", "outside the 64-bit integer range",
         args=[f"--seed={2**64}"])

    # A write that fails (a full disk) ends with one line naming the file; the previous set stays as it was.
    root = base / "disk_full"
    existing_set(root, frames)
    save(frames[2], root / "data" / "kidney" / "new.png")
    case("disk_full", root / "recipe.json", "clear error", "File too large", keep_out=True, max_file_bytes=1024)

    # Every file seen gets a manifest row; a name near the 255-byte limit still gets its temp file.
    root = base / "unsupported_files"  # an animated GIF and a note were passed over without a row
    save(frames[0], root / "data" / "kidney" / "a.png")
    Image.fromarray(frames[1]).save(root / "data" / "kidney" / "clip.gif", save_all=True,
                                    append_images=[Image.fromarray(frames[2])])
    (root / "data" / "kidney" / "notes.txt").write_text("acquired 2024\n")
    case("unsupported_files", folder_recipe(root), "skipped-with-reason", "not an image format",
         check=all_skipped(["clip.gif", "notes.txt"], ok=1))
    root = base / "long_file_name"  # the temp name passed 255 bytes: skipped as an OSError
    save(frames[0], root / "data" / "kidney" / ("k" * 240 + ".png"))
    case("long_file_name", folder_recipe(root), "processed", "", check=ok_count(1))
    return cases


def dead_pid() -> int:
    """The id of a process that has ended (a run killed without removing its lock)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def existing_set(root: Path, frames: list[np.ndarray]) -> None:
    """A processed set made by prepare itself (in this process), the way a finished earlier run left it."""
    for i in range(2):
        save(frames[i], root / "data" / "kidney" / f"s{i}.png")
    recipe = folder_recipe(root)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # keep the table readable
        prepare.run(prepare.Config(recipe=str(recipe), out=str(root / "out"), workers=1, scan_area_samples=0, contact_sheet_images=0))


def same_images(out: Path, first: str, second: str) -> Callable[[list[dict]], str]:
    def check(rows: list[dict]) -> str:
        outputs = {Path(r["source"]).name: out / r["output"] for r in rows if r["status"] == "ok"}
        if set(outputs) != {first, second}:
            return f"kept {sorted(outputs)}, expected {first} and {second}"
        a, b = (np.asarray(Image.open(outputs[name]), dtype=np.float32) for name in (first, second))
        diff = float(np.abs(a - b).mean())
        return "" if diff < 8 else f"{second} differs from {first} by {diff:.0f} grey levels on average: not turned upright"
    return check


def all_skipped(names: list[str], ok: int) -> Callable[[list[dict]], str]:
    def check(rows: list[dict]) -> str:
        reasons = {Path(r["source"]).name: r["reason"] for r in rows if r["status"] == "skipped"}
        missing = [n for n in names if not reasons.get(n)]
        return f"no skip reason for {missing}" if missing else ok_count(ok)(rows)
    return check


def every_split(rows: list[dict]) -> str:
    splits = {r["split"] for r in rows if r["status"] == "ok"}
    return "" if splits == set(prepare.SPLITS) else f"images only in {sorted(splits)}"


# ---------------------------------------------------------------- running and judging

def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Every entry under root without opening anything but regular files (a FIFO would block)."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        if skip is not None and Path(folder) == skip.parent and skip.name in dirs:
            dirs.remove(skip.name)
        for name in dirs + files:
            path = Path(folder) / name
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                entries[str(path.relative_to(root))] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            elif stat.S_ISLNK(info.st_mode):
                entries[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif not stat.S_ISDIR(info.st_mode):
                entries[str(path.relative_to(root))] = ("special", stat.S_IFMT(info.st_mode))
    return entries


def lost(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    return sorted(name for name, entry in before.items() if after.get(name) != entry)


def read_manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def run_case(case: Case, timeout_s: float) -> Result:
    inputs = snapshot(case.root, skip=case.out)
    previous = snapshot(case.out) if case.keep_out else {}
    command = [sys.executable, str(PREPARE), *case.args, f"--out={case.out}", "--workers=1", "--scan_area_samples=0",
               "--contact_sheet_images=0"]
    start = time.perf_counter()

    def limit_file_size() -> None:  # a file growing past the limit fails with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (case.max_file_bytes, case.max_file_bytes))

    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=case.root,
                              preexec_fn=limit_file_size if case.max_file_bytes else None)
    except subprocess.TimeoutExpired:
        return Result(case, "HANG", f"still running after {timeout_s:.0f} s", time.perf_counter() - start)
    seconds = time.perf_counter() - start
    last_line = (proc.stderr.strip().splitlines() or [""])[-1]
    gone = lost(inputs, snapshot(case.root, skip=case.out))
    if case.keep_out:  # its sources did not change: no file of the previous set may change or go
        gone += lost(previous, snapshot(case.out))
    if gone:
        return Result(case, "FILES LOST", f"changed or gone: {', '.join(gone[:4])}", seconds)
    if "Traceback (most recent call last)" in proc.stderr or (proc.returncode != 0 and not last_line.startswith("error: ")):
        return Result(case, "TRACEBACK", last_line or f"exit status {proc.returncode}", seconds)
    if proc.returncode != 0:
        return judged(Result(case, "clear error", last_line, seconds), case.text in last_line)
    if not (case.out / "manifest.csv").is_file():
        return judged(Result(case, "processed", "exit status 0 but no manifest.csv written", seconds), False)
    rows = read_manifest(case.out)
    reasons = [r["reason"] for r in rows if r["status"] == "skipped"]
    problem = case.check(rows) if case.check else ""
    if reasons:
        matching = next((r for r in reasons if case.text in r), "")
        detail = problem or f"{len(reasons)} skipped, e.g. {matching or reasons[0]}"
        return judged(Result(case, "skipped-with-reason", detail, seconds), bool(matching) and not problem)
    kept = sum(r["status"] == "ok" for r in rows)
    return judged(Result(case, "processed", problem or f"{kept} images kept", seconds), not problem)


def judged(result: Result, right: bool) -> Result:
    result.expected = right and result.outcome == result.case.expect
    return result


def run_cases(folder: Path, timeout_s: float = 60.0, jobs: int = 2) -> list[Result]:
    """Build the corpus under folder and run prepare.py on every case; results in case order."""
    start = time.perf_counter()
    frames = [generate_frame("kidney", np.random.default_rng(i)).image for i in range(4)]
    cases = build_cases(folder, frames)
    print(f"{len(cases)} cases built in {time.perf_counter() - start:.1f} s under {folder}")
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(lambda c: run_case(c, timeout_s), cases))


def print_table(results: list[Result]) -> None:
    width = max(len(r.case.name) for r in results)
    print(f"{'case':{width}s}  {'outcome':19s}  {'expected':19s}  {'s':>5s}  detail")
    for r in results:
        mark = "" if r.expected else "  <-- UNEXPECTED"
        print(f"{r.case.name:{width}s}  {r.outcome:19s}  {r.case.expect:19s}  {r.seconds:5.1f}  {r.detail[:110]}{mark}")
    counts = {name: sum(r.outcome == name for r in results) for name in
              ("processed", "skipped-with-reason", "clear error") + FAILURES}
    print("totals: " + ", ".join(f"{n} {name}" for name, n in counts.items())
          + f"; {sum(not r.expected for r in results)} unexpected of {len(results)} cases")


def main() -> None:
    cfg = parse_config(Config)
    with tempfile.TemporaryDirectory(prefix="bad_inputs_") as tmp:
        folder = Path(cfg.folder or tmp)
        if cfg.folder and folder.exists() and any(folder.iterdir()):
            raise SystemExit(f"error: --folder={folder} is not empty: the corpus needs an empty or new folder")
        results = run_cases(folder, cfg.timeout_s, cfg.jobs)
        print_table(results)
    if any(r.outcome in FAILURES or not r.expected for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
