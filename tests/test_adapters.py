"""data_preprocessing/adapters.py rules on small folder trees made here: which files each adapter lists, in what
order, with which subject, class, geometry and overlay corners, which it sets aside and why, and every refusal of
a bad option or label table."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from data_preprocessing.adapters import (ADAPTERS, RecipeError, Source, camus, csv_labels, folder, hc18,
                                         label_file_reason, stem, walk_images)

MASK_REASON = "mask/annotation file (name ends in _mask/_Annotation/_gt/_seg), not an image"


def touch(root: Path, *rels: str) -> None:
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")  # adapters look at names only


def rel_rows(listing, root: Path) -> list[tuple[str, str, str | None, str, tuple[str, ...]]]:
    return [(s.path.relative_to(root).as_posix(), s.subject, s.cls, s.geometry, s.overlay_corners)
            for s in listing.sources]


def test_the_stem_drops_one_format_suffix_and_nifti_s_double_one_whole():
    assert stem(Path("d/a.b.png")) == "a.b"
    assert stem(Path("d/p_2CH.nii.gz")) == "p_2CH"
    assert stem(Path("d/p.NII.GZ")) == "p"
    assert stem(Path("d/IM0001")) == "IM0001"


@pytest.mark.parametrize("name", ["a_mask.png", "a_mask_1.png", "a-Mask2.png", "a mask.png", "a.gt.png",
                                  "a_seg.png", "a_segmentation.png", "a_annotations.png", "a_Annotation.png",
                                  "mask.png", "a_masks-3.png", "a_gt 12.png"])
def test_names_ending_in_a_mask_word_are_label_files(tmp_path, name):
    assert label_file_reason(tmp_path / name, tmp_path) == MASK_REASON


@pytest.mark.parametrize("name", ["amask.png", "a_masked.png", "a_mask_1b.png", "a_mask__1.png", "gtx.png",
                                  "a_mask.x.png", "segment.png"])
def test_names_with_a_mask_word_elsewhere_are_images(tmp_path, name):
    assert label_file_reason(tmp_path / name, tmp_path) is None


def test_hidden_files_and_files_in_mask_folders_are_label_files(tmp_path):
    assert label_file_reason(tmp_path / "k" / "._a.png", tmp_path) == \
        "hidden file (e.g. macOS '._' metadata), not an image"
    assert label_file_reason(tmp_path / "k" / "Masks" / "a.png", tmp_path) == \
        "inside a 'Masks' folder: mask/annotation, not an image"
    assert label_file_reason(tmp_path / "GT" / "p1" / "a.png", tmp_path) == \
        "inside a 'GT' folder: mask/annotation, not an image"
    # only the folders below the root count: a root that lives inside a "masks" folder holds images
    root = tmp_path / "masks" / "set"
    assert label_file_reason(root / "k" / "a.png", root) is None
    # a path outside the root (a label table's ../ row) is judged by all its folders
    assert label_file_reason(tmp_path / "masks" / "a.png", tmp_path / "other") == \
        "inside a 'masks' folder: mask/annotation, not an image"


def test_walk_lists_readable_files_sorted_and_sets_label_files_aside_in_walk_order(tmp_path):
    touch(tmp_path, "b/2.png", "b/10.png", "a/z.dcm", "a/mask/m.png", "a/y_mask.png", "a/notes.txt", "c.nii.gz",
          "a/.hidden.png", "a/README")
    listing = walk_images(tmp_path)
    assert rel_rows(listing, tmp_path) == [("c.nii.gz", "c", None, "", ()), ("a/z.dcm", "z", None, "", ()),
                                           ("b/10.png", "10", None, "", ()), ("b/2.png", "2", None, "", ())]
    assert [(p.relative_to(tmp_path).as_posix(), r) for p, r in listing.ignored] == [
        ("a/.hidden.png", "hidden file (e.g. macOS '._' metadata), not an image"),
        ("a/README", "not an image format read here (no suffix)"),
        ("a/notes.txt", "not an image format read here (.txt)"),
        ("a/y_mask.png", MASK_REASON),
        ("a/mask/m.png", "inside a 'mask' folder: mask/annotation, not an image")]


def test_walk_refuses_a_root_that_is_not_a_folder(tmp_path):
    touch(tmp_path, "a.png")
    for root in (tmp_path / "a.png", tmp_path / "missing"):
        with pytest.raises(RecipeError) as err:
            walk_images(root)
        assert str(err.value) == f"dataset root {root} is not a folder"


def test_hc18_subjects_join_a_frame_s_numbered_views_within_their_folder(tmp_path):
    touch(tmp_path, "training_set/010_HC.png", "training_set/010_3HC.png", "training_set/7_hc.png",
          "training_set/010_HC_Annotation.png", "training_set/abc_HC.png", "training_set/010_HCx.png",
          "test_set/010_HC.png")
    listing = hc18(tmp_path, {})
    corner = ("bottom_right",)
    assert rel_rows(listing, tmp_path) == [
        ("test_set/010_HC.png", "test_set/010", None, "", corner),
        ("training_set/010_3HC.png", "training_set/010", None, "", corner),
        ("training_set/010_HC.png", "training_set/010", None, "", corner),
        ("training_set/010_HCx.png", "010_HCx", None, "", corner),
        ("training_set/7_hc.png", "training_set/7", None, "", corner),
        ("training_set/abc_HC.png", "abc_HC", None, "", corner)]
    assert [(p.name, r) for p, r in listing.ignored] == [("010_HC_Annotation.png", MASK_REASON)]
    assert {s.overlay_corners for s in hc18(tmp_path, {"overlay_corners": ["top_left", "bottom_left"]}).sources} \
        == {("top_left", "bottom_left")}
    assert {s.overlay_corners for s in hc18(tmp_path, {"overlay_corners": []}).sources} == {()}


@pytest.mark.parametrize("corners", ["bottom_right", ["bottom_right", "middle"], [3], ("bottom_right",)])
def test_hc18_refuses_overlay_corners_that_are_not_a_list_of_corners(tmp_path, corners):
    touch(tmp_path, "training_set/010_HC.png")
    with pytest.raises(RecipeError) as err:
        hc18(tmp_path, {"overlay_corners": corners})
    assert str(err.value) == ("hc18 adapter: options.overlay_corners must be a list of top_left, top_right, "
                              f"bottom_left, bottom_right, got {corners!r}")


def test_camus_subject_is_the_innermost_patient_folder_else_the_name_s_patient_prefix(tmp_path):
    touch(tmp_path, "db/Patient0002/patient0001/a_4CH_ED.nii.gz", "db/patient0003/x/b.nii.gz",
          "db/patientX/patient0004_2CH_ES.mhd", "c.nii.gz", "db/patient0003/x/b_gt.nii.gz")
    listing = camus(tmp_path, {})
    assert rel_rows(listing, tmp_path) == [
        ("db/Patient0002/patient0001/a_4CH_ED.nii.gz", "patient0001", None, "", ()),
        ("db/patient0003/x/b.nii.gz", "patient0003", None, "", ()),
        ("db/patientX/patient0004_2CH_ES.mhd", "patient0004", None, "", ())]
    assert [(p.name, r) for p, r in listing.ignored] == [
        ("b_gt.nii.gz", MASK_REASON),
        ("c.nii.gz", "neither in a patientNNNN folder nor named patientNNNN_...: CAMUS patient unknown")]
    touch(tmp_path, "PATIENT0005/x_2CH.nii.gz")
    assert Source(tmp_path / "PATIENT0005/x_2CH.nii.gz", "PATIENT0005") in camus(tmp_path, {}).sources


def test_folder_class_is_the_first_folder_and_subject_the_stem_or_the_file_s_folder(tmp_path):
    touch(tmp_path, "kidney/p1/v/a.png", "kidney/b.png", "liver/p2/a.png", "loose.png", "liver/p2/a_mask.png")
    by_stem = folder(tmp_path, {})
    assert rel_rows(by_stem, tmp_path) == [("kidney/b.png", "b", "kidney", "", ()),
                                           ("kidney/p1/v/a.png", "a", "kidney", "", ()),
                                           ("liver/p2/a.png", "a", "liver", "", ())]
    assert [(p.relative_to(tmp_path).as_posix(), r) for p, r in by_stem.ignored] == [  # the walk's, then the loose
        ("liver/p2/a_mask.png", MASK_REASON),
        ("loose.png", "directly in the dataset root: the folder adapter needs root/<class>/file")]
    assert [s.subject for s in folder(tmp_path, {"subject": "parent"}).sources] == ["kidney", "kidney/p1/v",
                                                                                    "liver/p2"]
    with pytest.raises(RecipeError) as err:
        folder(tmp_path, {"subject": "patient"})
    assert str(err.value) == "folder adapter: options.subject must be 'stem' or 'parent', got 'patient'"


def test_a_label_table_gives_class_subject_and_geometry_per_row(tmp_path):
    touch(tmp_path, "set/i/a.png", "set/i/b.png", "set/i/c.png")
    (tmp_path / "set" / "labels.csv").write_text(
        "path,class,subject,geometry\n i/a.png , kidney , p1 , fan \ni/c_mask.png,liver,p2,rect\n,liver,p3,fan\n"
        "i/b.png,,,\ni/c.png,liver,p2,rect\n")
    folder_ = (tmp_path / "set").absolute()
    listing = csv_labels(tmp_path / "set", {})
    assert listing.sources == [Source(folder_ / "i/a.png", "p1", "kidney", "fan"),
                               Source(folder_ / "i/b.png", "b", None, ""),
                               Source(folder_ / "i/c.png", "p2", "liver", "rect")]  # rows after set-aside ones count
    assert listing.ignored == [(folder_ / "i/c_mask.png", MASK_REASON),
                               (folder_, f"line 4 of {folder_ / 'labels.csv'}: empty 'path' cell")]
    assert csv_labels(tmp_path / "set" / "labels.csv", {}).sources == listing.sources  # the table itself as root


def test_a_label_table_s_file_and_column_names_come_from_the_options(tmp_path):
    touch(tmp_path, "a.png")
    (tmp_path / "t.csv").write_text("file,organ,patient,probe\na.png,kidney,p7,fan\n")
    options = {"file": "t.csv", "path_col": "file", "class_col": "organ", "subject_col": "patient",
               "geometry_col": "probe"}
    assert ADAPTERS["csv"](tmp_path, options).sources == [Source(tmp_path.absolute() / "a.png", "p7", "kidney", "fan")]
    del options["geometry_col"]
    assert ADAPTERS["csv"](tmp_path, options).sources == [Source(tmp_path.absolute() / "a.png", "p7", "kidney", "")]


def test_label_table_refusals_name_the_option_or_the_table(tmp_path):
    def refusal(root: Path, options: dict) -> str:
        with pytest.raises(RecipeError) as err:
            csv_labels(root, options)
        return str(err.value)

    for key in ("file", "path_col", "class_col", "subject_col", "geometry_col"):
        assert refusal(tmp_path, {key: 3}) == f"csv adapter: options.{key} must be a string, got 3"
    assert refusal(tmp_path, {"allow_paths_outside_root": 1}) == \
        "csv adapter: options.allow_paths_outside_root must be true or false, got 1"
    assert refusal(tmp_path, {}) == f"csv adapter: label table {tmp_path / 'labels.csv'} does not exist"
    (tmp_path / "labels.csv").write_text("file,class\na.png,kidney\n")
    assert refusal(tmp_path, {}) == (f"csv adapter: {tmp_path / 'labels.csv'} has no 'path' column "
                                     "(columns: file, class)")
    (tmp_path / "labels.csv").write_bytes(b"path,class\n\xff\xfe\x00a.png,kidney\n")
    assert refusal(tmp_path, {}) == (f"csv adapter: {tmp_path / 'labels.csv'}: not UTF-8 text "
                                     "(byte 11: invalid start byte)")  # the guarded reader's words
    (tmp_path / "labels.csv").unlink()
    os.mkfifo(tmp_path / "labels.csv")  # refused from its stat, never opened: no hang
    assert refusal(tmp_path, {}) == f"csv adapter: label table {tmp_path / 'labels.csv'} does not exist"
    (tmp_path / "labels.csv").unlink()
    (tmp_path / "labels.csv").write_text("")
    assert refusal(tmp_path, {}) == f"csv adapter: {tmp_path / 'labels.csv'} has no 'path' column (columns: )"


def test_every_adapter_is_registered_under_its_recipe_name():
    assert list(ADAPTERS)[:6] == ["busi", "hc18", "camus", "echonet", "folder", "csv"]
    assert ADAPTERS["hc18"] is hc18 and ADAPTERS["camus"] is camus and ADAPTERS["folder"] is folder
    assert ADAPTERS["csv"] is csv_labels
    assert all(adapter.__name__ == name for name, adapter in ADAPTERS.items() if name != "csv")


def test_a_label_table_cell_is_read_as_written_line_breaks_included(tmp_path):
    """The csv module reads quoted line breaks as written only from a file opened with newline=""."""
    touch(tmp_path, "a.png")
    (tmp_path / "labels.csv").write_bytes(b'path,subject\r\na.png,"p\r\n1"\r\n')
    assert [s.subject for s in csv_labels(tmp_path, {}).sources] == ["p\r\n1"]
