"""bench/bad_inputs.py end to end: prepare.py on every broken input gives the outcome a robust step gives,
and never hangs, crashes with a traceback or loses a file."""
from __future__ import annotations

import pytest

from bench.bad_inputs import FAILURES, run_cases


@pytest.mark.e2e  # prepare.py in a subprocess per case
def test_bad_input_corpus(tmp_path):
    results = run_cases(tmp_path, timeout_s=60, jobs=2)
    assert {r.case.name: r.outcome for r in results} == {
        "symlink_loops": "skipped-with-reason",
        "fifo_named_png": "skipped-with-reason",
        "dev_zero_in_csv": "skipped-with-reason",
        "csv_paths_outside": "skipped-with-reason",
        "exif_rotated_jpeg": "processed",
        "corrupt_files": "skipped-with-reason",
        "tiny_set_empty_val": "skipped-with-reason",
        "recipe_options_list": "clear error",
        "recipe_root_number": "clear error",
        "recipe_fifo": "clear error",
        "out_is_a_file": "clear error",
        "out_unwritable": "clear error",
        "size_zero_on_existing_set": "clear error",
        "stale_temp_in_out": "processed",
        "foreign_manifest": "clear error",
        "out_inside_dataset_root": "clear error",
        "out_owned_by_another_step": "clear error",
        "out_locked_by_live_run": "clear error",
        "stale_lock": "processed",
        "recipe_nested_deep": "clear error",
        "recipe_not_utf8": "clear error",
        "recipe_unknown_top_key": "clear error",
        "preset_false_fraction": "clear error",
        "seed_beyond_64_bits": "clear error",
        "disk_full": "clear error",
        "unsupported_files": "skipped-with-reason",
        "long_file_name": "processed",
    }
    assert [r.case.name for r in results if r.outcome in FAILURES] == []  # no HANG, TRACEBACK or FILES LOST
    # Each outcome with the right error text or skip reason, and the case's own check (images kept, splits, ...).
    assert [(r.case.name, r.detail) for r in results if not r.expected] == []
