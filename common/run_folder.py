"""Which step and run an output folder belongs to, which process writes it now, and whether a resume is the same run.

Every script wraps its work in `own_output_folder(folder, step, inputs)`:
- the folder gets a marker, .owner.json {"step", "run", "name"}, written atomically when first claimed; a folder
  marked by another step (or, for a named output such as a token file, by another file of the same step) is
  refused, naming both;
- a folder that is, contains or lies inside one of the step's inputs is refused, naming both (a step that writes one
  file among others', `shared`, only checks that its folder is not and does not lie inside an input);
- an unmarked folder that already holds files is refused unless they are this step's own (written before markers
  existed: a config.json with this step's constants, or only the file names the step writes), since
  writing there would replace someone else's files;
- a lock file, .lock {"pid", "host", "step"}, is held while the block runs: a second run on the folder is refused;
  a lock whose process is dead (same host) is stale and taken over.

`check_same_run` refuses a resume whose run-defining settings differ from the checkpoint's, naming each, unless the
user passes --allow_changed_run=true.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

from common.io import SideFileError, atomic_write_json, read_json

MARKER = ".owner.json"
LOCK = ".lock"


class RunFolderError(RuntimeError):
    """An output folder this step must not write into, or a resume that would silently change the run."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_not_an_input(folder: str | Path, inputs: Iterable[str | Path], shared: bool = False) -> None:
    """Refuse an output folder that is, lies inside or (unless shared) contains one of the inputs, naming both; done
    by claim_output_folder, and by a step on its own before anything makes the folder."""
    folder = Path(folder).resolve()
    for given in inputs:
        if not given:  # an optional input not given
            continue
        source = Path(given).resolve()
        if _inside(folder, source):
            how = "is" if folder == source else "lies inside"
            raise RunFolderError(f"output folder {folder} {how} the input {given}; its outputs would mix with or "
                                 "replace the input: choose another output folder")
        if not shared and _inside(source, folder):
            raise RunFolderError(f"output folder {folder} contains the input {given}; its outputs would mix with "
                                 "or replace the input: choose another output folder")


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The owner marker of a folder, or None when it has none."""
    path = Path(folder) / MARKER
    if not path.exists():
        return None
    try:
        marker = read_json(path)
    except SideFileError as err:
        raise RunFolderError(f"{err}; it marks which step owns the folder: choose another output folder") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("step"), str):
        raise RunFolderError(f"{path}: not an owner marker of this project; choose another output folder")
    return marker


def _is_own_unmarked(folder: Path, config_keys: Iterable[str], own_files: Iterable[str]) -> bool:
    """Whether an unmarked folder holds only this step's files: nothing (hidden files aside), only the names it
    writes, or a config.json of this step's constants."""
    entries = {p.name for p in folder.iterdir() if not p.name.startswith(".")} if folder.is_dir() else set()
    if entries <= set(own_files):
        return True
    try:
        config = read_json(folder / "config.json")
    except SideFileError:
        return False
    keys = set(config_keys)  # an older version of the step wrote fewer constants, none of another step's
    return isinstance(config, dict) and set(config) <= keys and 2 * len(config) >= len(keys)


def claim_output_folder(folder: str | Path, step: str, inputs: Iterable[str | Path] = (), name: str = "",
                        config_keys: Iterable[str] = (), own_files: Iterable[str] = (), shared: bool = False) -> dict:
    """Check that step may write into folder (see the module's docstring) and mark it as step's; returns the marker.

    name: the one output file that owns the folder (a token file: its classes.json is the folder's); config_keys:
    the step's constants (its config.json); own_files: the names it writes; shared: the step writes one file into a
    folder that may hold others' (report.py)."""
    folder = Path(folder).resolve()
    check_not_an_input(folder, inputs, shared)
    marker = read_marker(folder)
    if marker is not None:
        if marker["step"] != step:
            raise RunFolderError(f"output folder {folder} belongs to {marker['step']} (see {folder / MARKER}), not "
                                 f"to {step}; writing here would replace its files: choose another output folder")
        if marker.get("name", "") != name:
            raise RunFolderError(f"output folder {folder} holds {marker.get('name')} of {step}, and {name} would "
                                 f"replace the files they share: give each its own folder")
        return marker
    if not shared and not _is_own_unmarked(folder, config_keys, {*own_files, name} - {""}):
        raise RunFolderError(f"output folder {folder} already holds files that {step} did not write (no {MARKER}); "
                             "writing here could replace them: choose a new or empty folder")
    marker = {"step": step, "run": uuid.uuid4().hex, "name": name}
    try:
        atomic_write_json(folder / MARKER, marker)
    except OSError as err:
        raise RunFolderError(f"cannot write in {folder} ({err.strerror or err})") from None
    return marker


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def acquire_lock(folder: str | Path, step: str) -> Path:
    """Create folder/.lock for this process, atomically (a complete file linked into place, or nothing); a lock of a
    live process is a RunFolderError, one whose process is gone from this host is replaced."""
    lock = Path(folder) / LOCK
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "step": step, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = lock.with_name(f"{LOCK}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    atomic_write_json(tmp, mine)
    try:
        for _ in range(2):
            try:
                os.link(tmp, lock)
                return lock
            except FileExistsError:
                try:
                    held = read_json(lock)
                except SideFileError:
                    held = None
                if not isinstance(held, dict):
                    raise RunFolderError(f"{lock}: a lock file that is not this project's; if no run uses "
                                         f"{lock.parent}, delete it") from None
                same_host = held.get("host") == mine["host"]
                pid = held.get("pid")
                if not same_host:
                    raise RunFolderError(f"{lock.parent} is in use by {held.get('step')} (pid {pid} on host "
                                         f"{held.get('host')}, since {held.get('since')}); if that run is over, "
                                         f"delete {lock}") from None
                if isinstance(pid, int) and pid != mine["pid"] and _alive(pid):
                    raise RunFolderError(f"{lock.parent} is in use by {held.get('step')} (pid {pid}, since "
                                         f"{held.get('since')}); wait for it to finish or stop it") from None
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()  # stale: its process is gone
        raise RunFolderError(f"{lock}: another run took the folder meanwhile")
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def release_lock(lock: Path) -> None:
    """Remove the lock if it is still this process's."""
    try:
        held = read_json(lock)
    except SideFileError:
        return
    if isinstance(held, dict) and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


@contextlib.contextmanager
def own_output_folder(folder: str | Path, step: str, inputs: Iterable[str | Path] = (), *, active: bool = True,
                      **claim: Any) -> Iterator[dict | None]:
    """claim_output_folder (made, once checked, if missing) and hold its lock for the block; active=False (the other processes of
    a torchrun, which write nothing) does neither. Yields the marker."""
    if not active:
        yield None
        return
    if Path(folder).exists() and not Path(folder).is_dir():
        raise RunFolderError(f"output folder {folder}: exists and is not a folder")
    marker = claim_output_folder(folder, step, inputs, **claim)
    lock = acquire_lock(folder, step)
    try:
        yield marker
    finally:
        release_lock(lock)


def check_same_run(recorded: dict[str, Any], current: dict[str, Any], keys: Iterable[str], source: str | Path,
                   allow_changed: bool) -> list[str]:
    """The run-defining keys whose current value differs from the recorded one (keys a record lacks are skipped).
    Any difference is a RunFolderError naming each, unless allow_changed (the user said so); returns them."""
    changed = [k for k in keys if k in recorded and k in current
               and json.dumps(recorded[k], sort_keys=True) != json.dumps(current[k], sort_keys=True)]
    if changed and not allow_changed:
        listed = ", ".join(f"{k}: {recorded[k]!r} -> {current[k]!r}" for k in changed)
        raise RunFolderError(f"{source}: this run was started with other settings ({listed}); resume with the same "
                             "values, start afresh in another output folder, or pass --allow_changed_run=true to "
                             "continue with the new ones")
    return changed
