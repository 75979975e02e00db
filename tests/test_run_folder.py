"""common/run_folder.py: output folders marked with their step, refused when another step's or an input's; locks
with stale-lock detection; resumes that refuse changed run settings. End to end on make_phantoms.py, prepare.py
and report.py (the steps that run in a second)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from common.run_folder import (LOCK, MARKER, RunFolderError, acquire_lock, check_same_run, claim_output_folder,
                               own_output_folder)
from data_preprocessing import make_phantoms, prepare
import report


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_is_marked_once_and_refused_to_another_step(tmp_path: Path) -> None:
    first = claim_output_folder(tmp_path / "a", "train_vqvae.py")
    assert json.loads((tmp_path / "a" / MARKER).read_text()) == first and first["step"] == "train_vqvae.py"
    assert claim_output_folder(tmp_path / "a", "train_vqvae.py") == first  # the same step again: its folder
    with pytest.raises(RunFolderError, match=rf"output folder {tmp_path / 'a'} belongs to train_vqvae.py .*, not to "
                                             r"train_var.py"):
        claim_output_folder(tmp_path / "a", "train_var.py")


def test_a_named_output_owns_its_folder(tmp_path: Path) -> None:
    claim_output_folder(tmp_path / "t", "tokenize_multiscale_maps.py", name="a.npz")
    with pytest.raises(RunFolderError, match="holds a.npz of tokenize_multiscale_maps.py, and b.npz would replace"):
        claim_output_folder(tmp_path / "t", "tokenize_multiscale_maps.py", name="b.npz")


@pytest.mark.parametrize("out, how", [("data", "is"), ("data/processed", "lies inside"), (".", "contains")])
def test_a_folder_that_is_contains_or_lies_in_an_input_is_refused(tmp_path: Path, out: str, how: str) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(RunFolderError, match=rf"output folder {tmp_path / out if out != '.' else tmp_path} {how} "
                                             rf"the input {tmp_path / 'data'}"):
        claim_output_folder(tmp_path / out, "prepare.py", [tmp_path / "data"])
    assert not (tmp_path / "data" / "processed").exists()


def test_a_shared_folder_may_contain_inputs_but_not_lie_in_one(tmp_path: Path) -> None:
    (tmp_path / "runs" / "var").mkdir(parents=True)
    claim_output_folder(tmp_path / "runs", "report.py", [tmp_path / "runs" / "var"], shared=True)
    with pytest.raises(RunFolderError, match="is the input"):
        claim_output_folder(tmp_path / "runs" / "var", "report.py", [tmp_path / "runs" / "var"], shared=True)


def test_unmarked_files_are_someone_elses_unless_they_are_the_steps_own(tmp_path: Path) -> None:
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "config.json").write_text('{"mine": 1}')
    (tmp_path / "user" / "notes.txt").write_text("x")
    with pytest.raises(RunFolderError, match=r"already holds files that prepare.py did not write"):
        claim_output_folder(tmp_path / "user", "prepare.py", config_keys=["out", "seed"])
    assert not (tmp_path / "user" / MARKER).exists()
    # written by this step before markers existed: its config.json holds (a subset of) its constants
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text('{"out": "x", "seed": 0}')
    (tmp_path / "old" / "manifest.csv").write_text("a\n")
    assert claim_output_folder(tmp_path / "old", "prepare.py", config_keys=["out", "seed", "size"])["step"] == "prepare.py"
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "t.npz").write_bytes(b"")
    assert claim_output_folder(tmp_path / "tok", "tokenize_multiscale_maps.py", name="t.npz")


@pytest.mark.e2e
def test_a_lock_keeps_a_second_run_off_and_a_dead_runs_lock_is_taken_over(tmp_path: Path) -> None:
    with own_output_folder(tmp_path / "o", "train_var.py"):
        held = json.loads((tmp_path / "o" / LOCK).read_text())
        assert (held["pid"], held["host"]) == (os.getpid(), socket.gethostname())
        parent = {**held, "pid": os.getppid()}  # alive, and not this process
        (tmp_path / "o" / LOCK).write_text(json.dumps(parent))
        with pytest.raises(RunFolderError, match=rf"{tmp_path / 'o'} is in use by train_var.py \(pid {os.getppid()}"):
            acquire_lock(tmp_path / "o", "train_var.py")
        (tmp_path / "o" / LOCK).write_text(json.dumps(held))
    assert not (tmp_path / "o" / LOCK).exists()  # released
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    (tmp_path / "o" / LOCK).write_text(json.dumps({**held, "pid": dead.pid}))
    assert acquire_lock(tmp_path / "o", "train_var.py") == tmp_path / "o" / LOCK  # stale: taken over
    (tmp_path / "o" / LOCK).write_text(json.dumps({**held, "host": "elsewhere"}))
    with pytest.raises(RunFolderError, match=r"in use by .* on host elsewhere.*delete"):
        acquire_lock(tmp_path / "o", "train_var.py")
    assert [p.name for p in (tmp_path / "o").iterdir() if p.name.endswith(".tmp")] == []


def test_a_changed_run_setting_is_refused_naming_it_unless_allowed() -> None:
    recorded = {"lr": 1e-4, "seed": 0, "epochs": 2, "classes": ["a", "b"]}
    current = {"lr": 2e-4, "seed": 0, "epochs": 5, "classes": ["b", "a"]}
    with pytest.raises(RunFolderError, match=r"last.pth: this run was started with other settings \(lr: 0.0001 -> "
                                             r"0.0002, classes: \['a', 'b'\] -> \['b', 'a'\]\).*--allow_changed_run"):
        check_same_run(recorded, current, ("lr", "seed", "classes"), "last.pth", allow_changed=False)
    assert check_same_run(recorded, current, ("lr", "seed", "classes"), "last.pth", allow_changed=True) == ["lr", "classes"]
    assert check_same_run(recorded, {**current, "lr": 1e-4, "classes": ["a", "b"]}, ("lr", "seed", "classes"), "x",
                          allow_changed=False) == []
    assert check_same_run({}, current, ("lr",), "x", allow_changed=False) == []  # an older record without it


def phantoms(out: Path, **overrides) -> None:
    make_phantoms.main(make_phantoms.Config(out=str(out), n_subjects_per_class=1, frames_per_subject=1, **overrides))


def test_steps_refuse_each_others_folders_and_lose_no_file(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "raw"
    phantoms(raw)
    before = files_of(raw)
    for out in (raw, raw / "processed"):  # its input, inside its input
        with pytest.raises(RunFolderError, match=rf"output folder {out} (is|lies inside) the input {raw}"):
            prepare.run(prepare.Config(phantom_dir=str(raw), out=str(out)))
    with pytest.raises(SystemExit):
        report.main([f"--out={raw / 'r.html'}", f"--data_dir={tmp_path / 'd'}"])
    assert f"error: output folder {raw} belongs to make_phantoms.py" in capsys.readouterr().err
    assert files_of(raw) == before and not (raw / "processed").exists()


def test_make_phantoms_refuses_another_seed_over_its_frames(tmp_path: Path) -> None:
    phantoms(tmp_path / "raw")
    before = files_of(tmp_path / "raw")
    with pytest.raises(SystemExit, match=r"config.json: this run was started with other settings \(seed: 0 -> 1\)"):
        phantoms(tmp_path / "raw", seed=1)
    assert files_of(tmp_path / "raw") == before
    phantoms(tmp_path / "raw", seed=1, allow_changed_run=True)
    assert json.loads((tmp_path / "raw" / "config.json").read_text())["seed"] == 1


def test_a_resume_check_compares_values_skips_keys_either_side_lacks_and_names_changes_in_key_order() -> None:
    # the same dict in two key orders, neither of them sorted
    recorded = {"phi": {"share": 4, "ratio": 0.5, "mode": "x"}, "scales": [1, 2], "gone": 1}
    current = {"phi": {"ratio": 0.5, "mode": "x", "share": 4}, "scales": [1, 2], "new": 2}
    assert check_same_run(recorded, current, ("phi", "scales", "gone", "new"), "x", allow_changed=False) == []
    changed = check_same_run({"a": 1, "b": 1, "c": 1}, {"c": 2, "b": 2, "a": 1}, ("c", "a", "b"), "x", True)
    assert changed == ["c", "b"]
    assert check_same_run({"a": 1}, {"a": 1}, ("a",), "x", allow_changed=True) == []
    with pytest.raises(RunFolderError) as err:
        check_same_run({"seed": 0, "lr": 1}, {"seed": 1, "lr": 2}, ("seed",), Path("run/last.pth"), allow_changed=False)
    assert str(err.value) == ("run/last.pth: this run was started with other settings (seed: 0 -> 1); resume with the "
                              "same values, start afresh in another output folder, or pass --allow_changed_run=true "
                              "to continue with the new ones")
