"""common/tokens.py rules on small hand-made files: the scale layout of the token rows, what save_tokens stores, and
every check of save_tokens, is_token_file, made_from_of, load_tokens and the class names fed its bad input."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.tokens import TokenFileError, is_token_file, load_tokens, made_from_of, save_tokens, split_scales

SCALES = (1, 2, 3)


def write(path: Path, *, maps: list[np.ndarray] | None = None, labels: list[int] = (0, 1, 2),
          vqvae_config: object = None, classes: list[str] = ("a", "b", "c"), made_from: str = "") -> list[np.ndarray]:
    n = len(labels)
    if maps is None:
        maps = [(np.arange(n * pn * pn).reshape(n, pn, pn) + 10 * pn) % 40 for pn in SCALES]
    save_tokens(path, scales=SCALES, maps=maps, labels=np.array(labels), split=["train", "val", "train"][:n],
                source=[f"s{i}.png" for i in range(n)], vqvae_sha256="f" * 64,
                vqvae_config={"vocab_size": 40, "scales": list(SCALES)} if vqvae_config is None else vqvae_config,
                classes=list(classes), made_from=made_from)
    return maps


def refusal(*args: Path) -> str:
    """load_tokens' refusal of the file (and VQ-VAE checkpoint) given."""
    with pytest.raises(TokenFileError) as err:
        load_tokens(*args)
    return str(err.value)


def rewrite(path: Path, **changes: np.ndarray | None) -> None:
    """Replace (or with None, drop) arrays of a saved token file, as an edit or damage would."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    np.savez(path, **arrays)


def test_rows_split_into_scales_coarse_to_fine(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    maps = write(path)
    ts = load_tokens(path)
    assert ts.scales == SCALES and len(ts) == 3
    assert ts.idx.dtype == np.int64 and ts.labels.dtype == np.int64
    assert ts.idx[1].tolist() == maps[0][1].ravel().tolist() + maps[1][1].ravel().tolist() + maps[2][1].ravel().tolist()
    for k in range(3):
        assert np.array_equal(ts.maps(k), maps[k])
    rows = ts.idx_list([2, 0])
    assert [t.dtype for t in rows] == [torch.int64] * 3
    for k, t in enumerate(rows):
        assert t.tolist() == maps[k][[2, 0]].tolist()
    idx = torch.arange(14, dtype=torch.int16).view(1, 14)
    parts = split_scales(idx, [1, 2, 3])
    assert [p.tolist() for p in parts] == [[[[0]]], [[[1, 2], [3, 4]]], [[[5, 6, 7], [8, 9, 10], [11, 12, 13]]]]
    assert parts[0].dtype == torch.int64


def test_select_keeps_the_rows_of_one_split_in_order(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    write(path)
    ts = load_tokens(path)
    train = ts.select("train")
    assert train.source.tolist() == ["s0.png", "s2.png"] and train.labels.tolist() == [0, 2]
    assert train.split.tolist() == ["train", "train"]
    assert np.array_equal(train.idx, ts.idx[[0, 2]])
    assert train.classes == ["a", "b", "c"] and train.scales == SCALES
    assert len(ts.select("test")) == 0


def test_what_save_tokens_stores(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    write(path, made_from="recipe")
    with np.load(path, allow_pickle=False) as data:
        assert data["map_2"].dtype == np.int16 and data["idx"].dtype == np.int16
        assert data["scales"].dtype == np.int64 and data["scales"].tolist() == [1, 2, 3]
        assert data["labels"].dtype == np.int64
        assert json.loads(str(data["vqvae_config"])) == {"scales": [1, 2, 3], "vocab_size": 40}
        assert str(data["vqvae_config"]).index("scales") < str(data["vqvae_config"]).index("vocab_size")  # sorted keys
        assert data["classes"].tolist() == ["a", "b", "c"] and str(data["vqvae_sha256"]) == "f" * 64
    assert json.loads((tmp_path / "classes.json").read_text()) == ["a", "b", "c"]
    assert made_from_of(path) == "recipe"


def test_save_tokens_refusals(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    good = [np.zeros((3, pn, pn), dtype=np.int64) for pn in SCALES]
    with pytest.raises(ValueError, match=r"t\.npz: 2 token maps for 3 scales"):
        write(path, maps=good[:2])
    with pytest.raises(ValueError, match=r"token map of scale 2 has shape \(2, 2, 2\), expected \(3, 2, 2\)"):
        write(path, maps=[good[0], good[1][:2], good[2]])
    for bad in (-1, 32768):
        maps = [m.copy() for m in good]
        maps[2][1, 2, 0] = bad
        with pytest.raises(ValueError, match="token ids of scale 3 do not fit int16"):
            write(path, maps=maps)
    assert not path.exists()
    maps = [m.copy() for m in good]
    maps[2][1, 2, 0] = 32767  # the largest int16 fits
    write(path, maps=maps, vqvae_config={"vocab_size": 32768})
    assert load_tokens(path).idx.max() == 32767


def test_is_token_file_and_made_from_of(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    assert not is_token_file(path) and made_from_of(path) is None  # missing
    write(path)
    assert is_token_file(path) and made_from_of(path) == ""
    rewrite(path, made_from=None)
    assert is_token_file(path) and made_from_of(path) is None
    rewrite(path, source=None)
    assert not is_token_file(path)  # one of the token arrays missing
    np.save(tmp_path / "one.npy", np.zeros(3))
    assert not is_token_file(tmp_path / "one.npy")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    assert not is_token_file(tmp_path / "junk.npz") and made_from_of(tmp_path / "junk.npz") is None


def test_load_tokens_refuses_each_inconsistency(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"

    def refused(message: str, **changes) -> None:
        write(path)
        rewrite(path, **changes)
        with pytest.raises(TokenFileError, match=message):
            load_tokens(path)

    refused(r"t\.npz: not a token file of this project: missing labels, vqvae_config", labels=None, vqvae_config=None)
    refused(r"not a token file of this project: missing map_2, map_3", map_2=None, map_3=None)
    refused(r"vqvae_config is not valid JSON", vqvae_config=np.asarray("{vocab"))
    refused(r"inconsistent shapes: idx \(3, 13\) \(expected \(3, 14\)\)",
            idx=np.zeros((3, 13), np.int16))
    refused(r"inconsistent shapes: .*split \(2,\)", split=np.asarray(["train", "val"]))
    refused(r"inconsistent shapes: .*source \(4,\)", source=np.asarray(["a", "b", "c", "d"]))
    with np.load(path, allow_pickle=False) as data:
        idx = data["idx"].copy()
    idx[2, 13] += 1
    refused(r"idx does not match the per-scale maps", idx=idx)
    for bad in (-1, 40):
        maps = [np.zeros((3, pn, pn), np.int16) for pn in SCALES]
        write(path, maps=maps)
        maps[1][0, 1, 1] = bad  # save_tokens refuses a negative id itself: edit the file
        rewrite(path, map_2=maps[1], idx=np.concatenate([m.reshape(3, -1) for m in maps], axis=1))
        with pytest.raises(TokenFileError, match=r"token ids outside \[0, 40\) of the VQ-VAE's codebook"):
            load_tokens(path)
    maps[1][0, 1, 1] = 39  # the last code is fine
    write(path, maps=maps)
    assert load_tokens(path).idx.max() == 39


@pytest.mark.parametrize("config, message", [
    ({"vocab_size": True}, "vqvae_config has vocab_size True, not a positive integer"),
    ({"vocab_size": 0}, "vqvae_config has vocab_size 0, not a positive integer"),
    ({"vocab_size": 4.5}, "vqvae_config has vocab_size 4.5, not a positive integer"),
    ({"vocab_size": 40, "scales": [1, 2]}, r"vqvae_config has scales \[1, 2\] but the file holds token maps of "
                                           r"scales \[1, 2, 3\]"),
    ("text", "vqvae_config is a JSON str, not the VQ-VAE's config object"),
])
def test_an_edited_vqvae_config_is_refused(tmp_path: Path, config: object, message: str) -> None:
    write(tmp_path / "t.npz", vqvae_config={"vocab_size": 40})
    rewrite(tmp_path / "t.npz", vqvae_config=np.asarray(json.dumps(config)))
    with pytest.raises(TokenFileError, match=r"t\.npz: " + message):
        load_tokens(tmp_path / "t.npz")


def test_vqvae_config_without_vocab_or_scales_bounds_ids_by_int16(tmp_path: Path) -> None:
    write(tmp_path / "t.npz", vqvae_config={})
    ts = load_tokens(tmp_path / "t.npz")
    assert ts.vqvae_config == {} and ts.idx.max() == 39


def test_labels_must_index_the_classes(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    write(path, labels=[2, 0, 2])  # the last class is a valid label
    assert load_tokens(path).labels.tolist() == [2, 0, 2]
    write(path, labels=[0, 3, 1])
    with pytest.raises(TokenFileError, match=r"label 3 has no class \(3 classes: \['a', 'b', 'c'\]\)"):
        load_tokens(path)
    write(path, labels=[0, -2, 1])
    with pytest.raises(TokenFileError, match=r"label -2 is negative"):
        load_tokens(path)


def test_classes_json_beside_the_file_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    write(path)
    beside = tmp_path / "classes.json"
    beside.write_text("[\"a\", ")
    with pytest.raises(TokenFileError, match=r"classes\.json: not valid JSON"):
        load_tokens(path)
    for bad in ({"a": 0}, ["a", 1, "c"]):
        beside.write_text(json.dumps(bad))
        with pytest.raises(TokenFileError, match=r"classes\.json: expected a JSON list of class names"):
            load_tokens(path)
    beside.write_text(json.dumps(["a", "b", "c"]))
    assert load_tokens(path).classes == ["a", "b", "c"]


def test_the_vqvae_checkpoint_is_checked_by_content(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    write(path)
    with pytest.raises(TokenFileError, match=r"vq\.pth: VQ-VAE checkpoint does not exist \(needed to check .*t\.npz\)"):
        load_tokens(path, tmp_path / "vq.pth")
    (tmp_path / "vq.pth").write_bytes(b"weights")
    with pytest.raises(TokenFileError, match=r"came from VQ-VAE sha ffffffffffff\.\.\., but .*vq\.pth has sha "):
        load_tokens(path, tmp_path / "vq.pth")
    rewrite(path, vqvae_sha256=np.asarray(hashlib.sha256(b"weights").hexdigest()))
    assert load_tokens(path, tmp_path / "vq.pth").vqvae_sha256 == hashlib.sha256(b"weights").hexdigest()


def test_a_pickled_made_from_is_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    write(path)
    rewrite(path, made_from=np.array([{"run": "code"}], dtype=object))  # np.savez pickles object arrays
    assert made_from_of(path) is None
    assert is_token_file(path)  # the names are all there; only load_tokens reads the arrays


def test_missing_single_array_and_pickled_files_are_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tok").mkdir(parents=True)
    (tmp_path / "runs" / "tok" / "gone.npz").write_bytes(b"")
    # the message names where a file of that name is
    assert refusal(tmp_path / "gone.npz") == (f"{tmp_path / 'gone.npz'}: token file does not exist; run "
                                              "tokenize_multiscale_maps.py first; found runs/tok/gone.npz")
    with open(tmp_path / "one.npz", "wb") as handle:
        np.save(handle, np.zeros(3))
    with pytest.raises(TokenFileError, match=r"one\.npz: holds a single array, not an npz archive of token arrays"):
        load_tokens(tmp_path / "one.npz")
    path = tmp_path / "t.npz"
    write(path)
    rewrite(path, source=np.array([{"a": 1}, 2, 3], dtype=object))  # pickled by np.savez
    with pytest.raises(TokenFileError, match=r"t\.npz: not a readable npz token file"):
        load_tokens(path)


def test_class_names_inside_and_beside_must_agree(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    write(path, classes=["a", "b", "c"])
    (tmp_path / "classes.json").unlink()
    assert load_tokens(path).classes == ["a", "b", "c"]  # the names inside suffice
    (tmp_path / "classes.json").write_text('["a", "b", "z"]')
    assert refusal(path) == (f"{path} holds classes ['a', 'b', 'c'] but {tmp_path / 'classes.json'} beside it lists "
                              "['a', 'b', 'z'] (written for another token file in this folder?); keep each token file "
                              "in its own folder, or re-run tokenize_multiscale_maps.py")
    rewrite(path, classes=None)
    (tmp_path / "classes.json").unlink()
    assert refusal(path) == (f"{tmp_path / 'classes.json'}: missing (written beside t.npz by "
                              "tokenize_multiscale_maps.py)")


def test_a_token_file_of_no_images_loads_empty(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    write(path, labels=[])
    ts = load_tokens(path)
    assert len(ts) == 0 and ts.idx.shape == (0, 14) and ts.maps(2).shape == (0, 3, 3)


def test_made_from_defaults_to_empty(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    save_tokens(path, scales=(1,), maps=[np.zeros((1, 1, 1), np.int16)], labels=np.array([0]), split=["train"],
                source=["s.png"], vqvae_sha256="f" * 64, vqvae_config={"vocab_size": 4}, classes=["a"])
    assert made_from_of(path) == ""


def test_without_a_vocab_size_ids_are_bounded_by_what_int16_holds(tmp_path: Path) -> None:
    """An edited file may hold wider ids than save_tokens writes: the bound of a config without vocab_size is
    exactly 32768, the int16 range tokenization stores."""
    path = tmp_path / "t.npz"
    for top, loads in ((32767, True), (32768, False)):
        maps = [np.zeros((3, pn, pn), np.int32) for pn in SCALES]
        write(path, maps=[m.astype(np.int16) for m in maps], vqvae_config={})
        maps[2][1, 2, 0] = top
        rewrite(path, map_3=maps[2], idx=np.concatenate([m.reshape(3, -1) for m in maps], axis=1))
        if loads:
            assert load_tokens(path).idx.max() == top
        else:
            assert refusal(path) == f"{path}: token ids outside [0, 32768) of the VQ-VAE's codebook"


def test_the_checksum_refusal_names_both_checksums_by_their_first_twelve_digits(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    write(path)
    (tmp_path / "vq.pth").write_bytes(b"weights")
    with pytest.raises(TokenFileError) as err:
        load_tokens(path, tmp_path / "vq.pth")
    actual = hashlib.sha256(b"weights").hexdigest()
    assert str(err.value) == (f"tokens in {path} came from VQ-VAE sha ffffffffffff..., but {tmp_path / 'vq.pth'} has "
                              f"sha {actual[:12]}...; re-run tokenize_multiscale_maps.py")


def test_vqvae_config_refusals_in_full(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    for config, middle in (({"vocab_size": 0}, "has vocab_size 0, not a positive integer (edited?)"),
                           ({"vocab_size": 40, "scales": [1, 2]}, "has scales [1, 2] but the file holds token maps "
                                                                  "of scales [1, 2, 3] (edited?)")):
        write(path)
        rewrite(path, vqvae_config=np.asarray(json.dumps(config)))
        assert refusal(path) == f"{path}: vqvae_config {middle}; re-run tokenize_multiscale_maps.py"


def test_format_and_augmented_copy_refusals_in_full(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    write(path)
    rewrite(path, format_version=np.asarray(3))
    assert refusal(path) == (f"{path}: token file format 3, newer than the 2 this code reads; update the code or "
                              "re-run tokenize_multiscale_maps.py")
    write(path)
    rewrite(path, aug_rows=np.array([1]))
    assert refusal(path) == (f"{path}: holds only one of aug_rows and aug_idx (damaged file); re-run "
                              "tokenize_multiscale_maps.py")
    for rows, ids, message in (([1, 1], np.zeros((2, 1, 14), np.int16), "aug_rows must be distinct rows in [0, 3) "
                                                                          "(damaged file)"),
                               ([2], np.full((1, 2, 14), 40, np.int16), "augmented token ids outside [0, 40) of the "
                                                                        "VQ-VAE's codebook")):
        write(path)
        rewrite(path, aug_rows=np.array(rows), aug_idx=ids)
        assert refusal(path) == f"{path}: {message}"
    write(path)
    rewrite(path, aug_rows=np.array([2]), aug_idx=np.full((1, 2, 14), 39, np.int16))
    ts = load_tokens(path)
    assert ts.aug_rows.tolist() == [2] and ts.aug_idx.shape == (1, 2, 14) and ts.num_copies == 3


def write_augmented(path: Path, aug_rows: list[int], copies: int = 2) -> list[np.ndarray]:
    """The file of write() plus `copies` augmented copies of the given rows: copy c of row r holds 100 r + 10 c + the
    position's scale number, so that every id says where it belongs."""
    aug = [np.array([[np.full((pn, pn), 100 * r + 10 * c + k) for c in range(1, copies + 1)] for r in aug_rows])
           for k, pn in enumerate(SCALES)]
    maps = [(np.arange(3 * pn * pn).reshape(3, pn, pn) + 10 * pn) % 40 for pn in SCALES]
    save_tokens(path, scales=SCALES, maps=maps, labels=np.array([0, 1, 2]), split=["train", "val", "train"],
                source=["s0.png", "s1.png", "s2.png"], vqvae_sha256="f" * 64,
                vqvae_config={"vocab_size": 400, "scales": list(SCALES)}, classes=["a", "b", "c"],
                aug_rows=np.array(aug_rows), aug_maps=aug if aug_rows else None)
    return aug


def test_augmented_copies_are_stored_per_row_and_scale_and_follow_their_rows(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    write_augmented(path, [2, 0])
    with np.load(path, allow_pickle=False) as data:
        assert data["aug_rows"].dtype == np.int64 and data["aug_rows"].tolist() == [2, 0]
        assert data["aug_idx"].dtype == np.int16 and data["aug_idx"].shape == (2, 2, 14)
        assert data["aug_idx"][0, 1].tolist() == [220] + [221] * 4 + [222] * 9  # row 2, copy 2, scales in order
        assert int(data["format_version"]) == 2
    ts = load_tokens(path)
    assert ts.num_copies == 3
    train = ts.select("train")
    assert train.aug_rows.tolist() == [1, 0]  # rows 2 and 0 of the file are rows 1 and 0 of the train split
    copies = train.copies()
    assert copies.shape == (2, 3, 14) and copies.dtype == np.int16
    assert np.array_equal(copies[:, 0], ts.idx[[0, 2]]) and copies[0, 1, 0] == 10 and copies[1, 2, 13] == 222
    part = ts.take(np.array([1, 2]))
    assert part.aug_rows.tolist() == [1] and part.aug_idx[0, 0, 0] == 210  # row 2 is now row 1, its copies with it
    assert part.labels.tolist() == [1, 2] and part.source.tolist() == ["s1.png", "s2.png"]
    assert part.split.tolist() == ["val", "train"] and np.array_equal(part.idx, ts.idx[[1, 2]])
    with pytest.raises(TokenFileError) as err:
        part.copies()
    assert str(err.value) == "1 of 2 rows have augmented copies; all or none must"
    val = ts.take(np.array([1]))
    assert val.num_copies == 1 and val.aug_idx.shape == (0, 2, 14)  # no row with copies: one copy, the row itself
    assert np.array_equal(val.copies(), ts.idx[[1], None].astype(np.int16))
    write_augmented(path, [])  # none given: a file without the augmented arrays
    with np.load(path, allow_pickle=False) as data:
        assert "aug_rows" not in data.files and "aug_idx" not in data.files
    assert load_tokens(path).num_copies == 1


def test_save_tokens_refuses_augmented_copies_that_do_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"

    def save_refusal(**changes) -> str:
        args = dict(scales=SCALES, maps=[np.zeros((3, pn, pn), np.int64) for pn in SCALES], labels=np.array([0, 1, 2]),
                    split=["train"] * 3, source=["a", "b", "c"], vqvae_sha256="f", vqvae_config={},
                    classes=["a", "b", "c"],
                    aug_rows=np.array([0, 2]), aug_maps=[np.zeros((2, 3, pn, pn), np.int64) for pn in SCALES])
        args.update(changes)
        with pytest.raises(ValueError) as err:
            save_tokens(path, **args)
        return str(err.value)

    assert save_refusal(aug_maps=[np.zeros((2, 3, 1, 1)), np.zeros((2, 2, 2, 2)), np.zeros((2, 3, 3, 3))]) == \
        f"{path}: augmented maps of scale 2 have shape (2, 2, 2, 2), expected (2, 3, 2, 2)"
    assert save_refusal(aug_maps=None) == f"{path}: aug_rows given without one (M, A >= 1, pn, pn) map per scale"
    assert save_refusal(aug_maps=[np.zeros((2, 3, pn, pn)) for pn in SCALES[:2]]) == \
        f"{path}: aug_rows given without one (M, A >= 1, pn, pn) map per scale"
    assert save_refusal(aug_maps=[np.zeros((2, 0, pn, pn)) for pn in SCALES]) == \
        f"{path}: aug_rows given without one (M, A >= 1, pn, pn) map per scale"
    for rows in ([0, 3], [-1, 2], [2, 2]):
        assert save_refusal(aug_rows=np.array(rows)) == f"{path}: aug_rows must be distinct rows in [0, 3)"
    assert not path.exists()


def test_augmented_arrays_are_checked_by_shape_and_come_back_as_int16(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    write(path)
    plain = load_tokens(path)
    assert plain.aug_rows.dtype == np.int64 and plain.aug_idx.dtype == np.int16 and plain.aug_idx.shape == (0, 0, 14)
    assert len(plain.select("train")) == 2 and plain.select("train").aug_idx.shape == (0, 0, 14)
    assert plain.copies().dtype == np.int16 and plain.copies().shape == (3, 1, 14)
    for rows, ids, shape in (([2], np.zeros((1, 2, 13), np.int16), "(1, 2, 13) for aug_rows (1,); expected (M, A, 14)"),
                             ([2], np.zeros((1, 14), np.int16), "(1, 14) for aug_rows (1,); expected (M, A, 14)"),
                             ([[2]], np.zeros((1, 2, 14), np.int16), "(1, 2, 14) for aug_rows (1, 1); expected (M, A, "
                                                                     "14)")):
        write(path)
        rewrite(path, aug_rows=np.array(rows), aug_idx=ids)
        assert refusal(path) == f"{path}: augmented copies of shape {shape} for (M,)"
    write(path)
    rewrite(path, aug_rows=np.array([3]), aug_idx=np.zeros((1, 2, 14), np.int16))  # row 3 of 3 rows
    with pytest.raises(TokenFileError, match=r"aug_rows must be distinct rows in \[0, 3\)"):
        load_tokens(path)
    write(path)
    rewrite(path, aug_idx=np.zeros((1, 2, 14), np.int16))  # the copies without their rows
    with pytest.raises(TokenFileError, match="holds only one of aug_rows and aug_idx"):
        load_tokens(path)
    write(path)
    rewrite(path, aug_rows=np.array([2]), aug_idx=np.full((1, 2, 14), 7, np.int32))  # wider on disk, as an edit makes
    assert load_tokens(path).aug_idx.dtype == np.int16


def test_a_single_augmented_copy_per_row_is_stored(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    write_augmented(path, [0, 2], copies=1)
    ts = load_tokens(path)
    assert ts.num_copies == 2 and ts.aug_idx[1, 0, 0] == 210


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_save_and_load_round_trip_and_shape_checks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    maps = [rng.integers(0, 10, (3, pn, pn)) for pn in (1, 2, 3)]
    path = tmp_path / "t.npz"
    save_tokens(path, scales=(1, 2, 3), maps=maps, labels=np.array([0, 1, 0]), split=["train", "val", "train"],
                source=["a.png", "b.png", "c.png"], vqvae_sha256="abc", vqvae_config={"vocab_size": 10}, classes=["x", "y"])
    ts = load_tokens(path)
    assert all(np.array_equal(ts.maps(k), m) for k, m in enumerate(maps))
    assert ts.select("train").source.tolist() == ["a.png", "c.png"]
    assert [t.shape for t in ts.idx_list([2])] == [(1, 1, 1), (1, 2, 2), (1, 3, 3)]
    with pytest.raises(ValueError, match=r"token map of scale 3 has shape \(3, 2, 2\)"):
        save_tokens(path, scales=(1, 2, 3), maps=[maps[0], maps[1], maps[1]], labels=np.zeros(3), split=["train"] * 3,
                    source=["a"] * 3, vqvae_sha256="", vqvae_config={}, classes=["x"])


def tiny_tokens(path: Path, classes: list[str], labels: list[int] | None = None,
                vqvae_config: dict | None = None) -> None:
    labels = [0, 1, 0] if labels is None else labels
    rng = np.random.default_rng(0)
    save_tokens(path, scales=(1, 2), maps=[rng.integers(0, 10, (3, pn, pn)) for pn in (1, 2)], labels=np.array(labels),
                split=["train", "val", "test"], source=["a.png", "b.png", "c.png"], vqvae_sha256="abc",
                vqvae_config={"vocab_size": 10, "scales": [1, 2]} if vqvae_config is None else vqvae_config,
                classes=classes)


def test_two_token_files_in_one_folder_keep_their_own_classes(tmp_path: Path) -> None:
    first, second = tmp_path / "first.npz", tmp_path / "second.npz"
    tiny_tokens(first, ["breast", "liver"])
    tiny_tokens(second, ["liver", "breast", "heart"])  # rewrites the shared classes.json
    assert load_tokens(second).classes == ["liver", "breast", "heart"]
    with pytest.raises(TokenFileError) as err:  # not silently relabelled with the second file's names
        load_tokens(first)
    assert str(err.value).startswith(f"{first} holds classes ['breast', 'liver'] but {tmp_path / 'classes.json'} "
                                     "beside it lists ['liver', 'breast', 'heart']")
    (tmp_path / "classes.json").unlink()
    assert load_tokens(first).classes == ["breast", "liver"]  # the names inside suffice


def test_a_token_file_without_class_names_inside_still_loads_through_classes_json(tmp_path: Path) -> None:
    path = tmp_path / "old.npz"
    tiny_tokens(path, ["breast", "liver"])
    with np.load(path, allow_pickle=False) as raw:
        arrays = {k: raw[k] for k in raw.files if k != "classes"}
    np.savez(path, **arrays)  # the format before the names were stored inside
    assert load_tokens(path).classes == ["breast", "liver"]
    (tmp_path / "classes.json").unlink()
    with pytest.raises(TokenFileError, match=r"classes\.json: missing \(written beside old\.npz"):
        load_tokens(path)


@pytest.mark.parametrize("labels, vqvae_config, message", [
    ([0, -1, 1], None, r"t\.npz: label -1 is negative"),
    ([0, 2, 1], None, r"t\.npz: label 2 has no class \(2 classes"),
    ([0, 1, 0], [10, 2], r"t\.npz: vqvae_config is a JSON list, not the VQ-VAE's config object \(edited\?\)"),
    ([0, 1, 0], {"vocab_size": "ten"}, r"t\.npz: vqvae_config has vocab_size 'ten', not a positive integer"),
    ([0, 1, 0], {"vocab_size": 10, "scales": [1, 3]}, r"t\.npz: vqvae_config has scales \[1, 3\] but the file holds "
                                                      r"token maps of scales \[1, 2\]"),
])
def test_bad_labels_or_an_edited_vqvae_config_are_named(tmp_path: Path, labels, vqvae_config, message) -> None:
    tiny_tokens(tmp_path / "t.npz", ["x", "y"], labels=labels, vqvae_config=vqvae_config)
    with pytest.raises(TokenFileError, match=message):
        load_tokens(tmp_path / "t.npz")


def test_augmented_copies_round_trip_and_old_and_newer_formats(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    maps = [rng.integers(0, 10, (3, pn, pn)) for pn in (1, 2)]
    aug = [rng.integers(0, 10, (2, 3, pn, pn)) for pn in (1, 2)]  # rows 0 and 2 (train), 3 copies each
    path = tmp_path / "t.npz"
    common = dict(scales=(1, 2), maps=maps, labels=np.array([0, 1, 0]), split=["train", "val", "train"],
                  source=["a.png", "b.png", "c.png"], vqvae_sha256="abc", vqvae_config={"vocab_size": 10}, classes=["x", "y"])
    save_tokens(path, **common, aug_rows=np.array([0, 2]), aug_maps=aug)
    ts = load_tokens(path)
    assert ts.num_copies == 4 and len(ts.select("val").aug_rows) == 0 and ts.select("val").num_copies == 1
    copies = ts.select("train").copies()
    assert np.array_equal(copies[:, 0], ts.idx[[0, 2]])
    assert np.array_equal(copies[1, 2], np.concatenate([aug[0][1, 1].ravel(), aug[1][1, 1].ravel()]))
    with pytest.raises(TokenFileError, match="1 of 2 rows have augmented copies"):
        ts.take(np.array([0, 1])).copies()
    # A reader of format 1 (without the augmented arrays) sees exactly the un-augmented set.
    with np.load(path, allow_pickle=False) as raw:
        arrays = {k: raw[k] for k in raw.files}
    old = tmp_path / "old" / "t.npz"
    old.parent.mkdir()
    np.savez(old, **{k: v for k, v in arrays.items() if k not in ("aug_rows", "aug_idx", "format_version")})
    assert np.array_equal(load_tokens(old).idx, ts.idx) and load_tokens(old).num_copies == 1
    np.savez(path, **{**arrays, "format_version": np.asarray(3)})
    with pytest.raises(TokenFileError, match="token file format 3, newer than the 2 this code reads"):
        load_tokens(path)
    np.savez(path, **{**arrays, "aug_rows": np.array([0, 5])})
    with pytest.raises(TokenFileError, match=r"aug_rows must be distinct rows in \[0, 3\)"):
        load_tokens(path)
    np.savez(path, **{k: v for k, v in arrays.items() if k != "aug_idx"})
    with pytest.raises(TokenFileError, match="only one of aug_rows and aug_idx"):
        load_tokens(path)
