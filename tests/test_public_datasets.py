"""The public datasets' adapters (adapters.py, bus_bra ... mmotu): on the real samples in ../shared/us_data (skipped
with the reason when absent) and on replica trees of the published layouts that have no sample here; subject,
class and every file set aside; unknown option keys and missing datasets in a recipe; near-duplicate removal
(near_duplicates.py) with its controls; and one small prepare.py run on real samples that checks no subject
straddles two splits and that a planted copy in another dataset is dropped while distinct images are kept."""
from __future__ import annotations

import csv
import io
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_preprocessing import make_phantoms
from data_preprocessing.adapters import ADAPTERS, RecipeError, check_options
from data_preprocessing.near_duplicates import NEAR_DUPLICATE_BITS, hamming, perceptual_hash, repeats
from data_preprocessing.prepare import Config, load_recipe, run


def touch(root: Path, *rels: str) -> None:
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")  # adapters look at names and label files only


def listed(adapter: str, root: Path, options: dict | None = None) -> tuple[dict[str, tuple], dict[str, str]]:
    """{relative path: (subject, class)} of the images, {relative path: reason} of the image files set aside.

    Files of formats no reader takes (label tables, notes, .raw halves) get their own row too, with one reason
    whatever the dataset (test_adapters.py): left out here, so that each test reads as its adapter's rules."""
    listing = ADAPTERS[adapter](root, options or {})
    return ({s.path.relative_to(root).as_posix(): (s.subject, s.cls) for s in listing.sources},
            {p.relative_to(root).as_posix(): r for p, r in listing.ignored
             if not r.startswith("not an image format read here")})


@pytest.fixture(scope="module")
def us_data(shared_dir: Path) -> Path:
    return shared_dir / "us_data"


def sample(us_data: Path, folder: str) -> Path:
    if not (us_data / folder).is_dir():
        pytest.skip(f"{us_data / folder} is absent")
    return us_data / folder


# ---------------------------------------------------------------- real samples (../shared/us_data)

def test_bus_bra_sample_subjects_are_the_case_column_and_findings_the_pathology(us_data):
    images, ignored = listed("bus_bra", sample(us_data, "BUS-BRA"), {"classes": "finding"})
    assert len(images) == 65 and not ignored
    assert len({s for s, _ in images.values()}) == 34  # SOURCE.md: 65 images of 34 cases
    assert images["BUSBRA/Images/bus_0001-l.png"] == images["BUSBRA/Images/bus_0001-r.png"] == ("case1", "breast_malignant")
    assert set(Counter(c for _, c in images.values())) == {"breast_benign", "breast_malignant"}
    assert {c for _, c in listed("bus_bra", us_data / "BUS-BRA")[0].values()} == {None}  # organ level: the recipe's class


def test_breast_lesions_usg_sample_findings_come_from_the_clinical_xlsx(us_data):
    images, ignored = listed("breast_lesions_usg", sample(us_data, "BrEaST"), {"classes": "finding"})
    assert Counter(c for _, c in images.values()) == {"breast_benign": 15, "breast_malignant": 15, "breast_normal": 4}
    assert images["BrEaST-Lesions_USG-images_and_masks/case001.png"] == ("case001", "breast_benign")
    assert not ignored


def test_bus_uclm_sample_subject_is_the_patient_prefix_and_finding_the_info_label(us_data):
    images, ignored = listed("bus_uclm", sample(us_data, "BUS-UCLM"), {"classes": "finding"})
    assert Counter(c for _, c in images.values()) == {"breast_benign": 14, "breast_malignant": 14, "breast_normal": 12}
    assert len({s for s, _ in images.values()}) == 15 and not ignored
    assert {s for p, (s, _) in images.items() if p.endswith("/ALWI_000.png")} == {"ALWI"}


def test_ccaui_tn3k_and_busi_samples(us_data):
    images, _ = listed("ccaui", sample(us_data, "CCAUI"))
    assert len(images) == 58 and len({s for s, _ in images.values()}) == 15  # 15 recordings
    images, _ = listed("tn3k", sample(us_data, "TN3K"))
    assert len(images) == 64 and images["tn3k/trainval-image/2815.jpg"] == ("trainval-image/2815", None)
    images, _ = listed("busi", sample(us_data, "BUSI"), {"classes": "finding"})
    assert Counter(c for _, c in images.values()) == {"breast_benign": 70, "breast_malignant": 70, "breast_normal": 70}


def test_label_only_samples_give_no_images_and_set_the_masks_aside(us_data):
    images, ignored = listed("kidneyus", sample(us_data, "kidneyUS"))
    assert not images and len(ignored) == 20
    assert all(r == "inside kidneyUS's mask folder 'reviewed_masks_1': a mask, not an image" for r in ignored.values())
    assert listed("camus", sample(us_data, "CAMUS")) == ({}, {})  # metadata only: Info_*.cfg, split lists


# ---------------------------------------------------------------- replicas of the layouts without a sample

def test_bus_uc_and_buid_replicas(tmp_path):
    touch(tmp_path / "uc", "BUS_UC/BUS_UC/Benign/images/01.png", "BUS_UC/BUS_UC/Benign/masks/01.png",
          "BUS_UC/BUS_UC/Malignant/images/01.png", "BUS_UC/BUS_UC/other/02.png")
    images, ignored = listed("bus_uc", tmp_path / "uc", {"classes": "finding"})
    assert images == {"BUS_UC/BUS_UC/Benign/images/01.png": ("benign/01", "breast_benign"),
                      "BUS_UC/BUS_UC/Malignant/images/01.png": ("malignant/01", "breast_malignant")}
    assert ignored == {"BUS_UC/BUS_UC/Benign/masks/01.png": "inside a 'masks' folder: mask/annotation, not an image",
                       "BUS_UC/BUS_UC/other/02.png": "not inside a Benign or Malignant folder: BUS_UC's finding unknown"}
    touch(tmp_path / "buid", "Benign/12 Benign Image.bmp", "Benign/12 Benign Mask.tif", "Benign/12 Benign Lesion.bmp",
          "Malignant/12 Malignant Image.bmp", "Malignant/notes.png")
    images, ignored = listed("buid", tmp_path / "buid")
    assert images == {"Benign/12 Benign Image.bmp": ("benign_12", None), "Malignant/12 Malignant Image.bmp": ("malignant_12", None)}
    assert ignored == {"Benign/12 Benign Mask.tif": "mask/annotation file (name ends in _mask/_Annotation/_gt/_seg), not an image",
                       "Benign/12 Benign Lesion.bmp": "BUID lesion file, not the B-mode image",
                       "Malignant/notes.png": "not named 'NNN Benign|Malignant Image': BUID case unknown"}


def test_tg3k_and_mmotu_replicas(tmp_path):
    touch(tmp_path / "tg", "tg3k/thyroid-image/0001.jpg", "tg3k/thyroid-mask/0001.jpg", "tg3k/thyroid-image/x1.jpg")
    images, ignored = listed("tg3k", tmp_path / "tg")
    assert images == {"tg3k/thyroid-image/0001.jpg": ("0001", None)}
    assert ignored == {"tg3k/thyroid-mask/0001.jpg": "inside tg3k's mask folder 'thyroid-mask': a mask, not an image",
                       "tg3k/thyroid-image/x1.jpg": "not thyroid-image/<number>: outside tg3k's published layout"}
    touch(tmp_path / "mm", "OTU_2d/images/7.JPG", "OTU_2d/annotations/7.PNG", "OTU_2d/annotations/7_binary.PNG",
          "OTU_CEUS/images/3.JPG")
    images, ignored = listed("mmotu", tmp_path / "mm")
    assert images == {"OTU_2d/images/7.JPG": ("7", None)}
    assert ignored["OTU_CEUS/images/3.JPG"] == "OTU_CEUS: contrast-enhanced ultrasound, not B-mode"
    assert len(ignored) == 3


def test_ddti_subjects_come_from_the_case_xml(tmp_path):
    touch(tmp_path, "1_1.jpg", "1_2.jpg", "2_1.jpg", "3_1.jpg", "x.jpg")
    (tmp_path / "1.xml").write_text("<?xml version='1.0'?><case><number>1</number><tirads>4a</tirads>"
                                    "<mark><image>1</image><svg>[]</svg></mark></case>")
    (tmp_path / "3.xml").write_text("<case><number>4</number></case>")
    images, ignored = listed("ddti", tmp_path)
    assert images == {"1_1.jpg": ("case1", None), "1_2.jpg": ("case1", None)}
    assert ignored == {"2_1.jpg": "no case file 2.xml beside it: DDTI case unknown",
                       "3_1.jpg": "3.xml is unreadable or has no <number>3</number>: DDTI case unknown",
                       "x.jpg": "not named N_M (case_image): DDTI case unknown"}


def test_kidneyus_camus_aul_and_abdomenus_replicas(tmp_path):
    touch(tmp_path / "k", "kidneyUS_images_14_june_2022/kidneyUS_images_14_june_2022/100_IM-0246-0030_anon.png",
          "kidneyUS_images_14_june_2022/kidneyUS_images_14_june_2022/100_IM-0246-0082_anon.png",
          "kidneyUS_images_14_june_2022/kidneyUS_images_14_june_2022/11_IM-0288-0017-0002_anon.png",
          "labels/reviewed_masks_1/capsule/11_IM-0288-0017-0002_anon.png")
    images, ignored = listed("kidneyus", tmp_path / "k")
    assert sorted(images.values()) == [("100", None), ("100", None), ("11", None)] and len(ignored) == 1
    touch(tmp_path / "c", "training/patient0001/patient0001_2CH_ED.mhd", "training/patient0001/patient0001_2CH_ED.raw",
          "training/patient0001/patient0001_2CH_ED_gt.mhd", "database_nifti/patient0002/patient0002_4CH_half_sequence.nii.gz")
    images, ignored = listed("camus", tmp_path / "c")
    assert images == {"database_nifti/patient0002/patient0002_4CH_half_sequence.nii.gz": ("patient0002", None),
                      "training/patient0001/patient0001_2CH_ED.mhd": ("patient0001", None)}
    assert list(ignored) == ["training/patient0001/patient0001_2CH_ED_gt.mhd"]
    touch(tmp_path / "a", "Benign/image/12.jpg", "Normal/image/13.jpg", "Benign/12.jpg")
    images, ignored = listed("aul", tmp_path / "a")
    assert images == {"Benign/image/12.jpg": ("benign/12", None), "Normal/image/13.jpg": ("normal/13", None)}
    assert ignored == {"Benign/12.jpg": "not <Normal|Benign|Malignant>/image/<file>: outside AUL's published layout"}
    touch(tmp_path / "u", "abdominal_US/abdominal_US/RUS/images/train/im1.png",
          "abdominal_US/abdominal_US/RUS/annotations/train/im1.png", "abdominal_US/abdominal_US/AUS/images/test/s1.png")
    images, ignored = listed("abdomenus", tmp_path / "u")
    assert images == {"abdominal_US/abdominal_US/RUS/images/train/im1.png": ("RUS/train/im1", None)}
    assert ignored["abdominal_US/abdominal_US/AUS/images/test/s1.png"] == \
        "simulated (AUS) image: used only with options.simulated = true"
    assert len(listed("abdomenus", tmp_path / "u", {"simulated": True})[0]) == 2


def test_breast_replicas_refuse_what_their_label_files_cannot_place(tmp_path):
    touch(tmp_path / "bra", "BUSBRA/Images/bus_0001-l.png", "BUSBRA/Images/bus_0002-s.png")
    (tmp_path / "bra" / "BUSBRA" / "bus_data.csv").write_text("ID,Case,Pathology\nbus_0001-l,1,benign\n")
    images, ignored = listed("bus_bra", tmp_path / "bra")
    assert list(images) == ["BUSBRA/Images/bus_0001-l.png"]
    assert ignored["BUSBRA/Images/bus_0002-s.png"].startswith("no row with a Case for 'bus_0002-s' in ")
    uclm = tmp_path / "uclm" / "BUS-UCLM"
    touch(uclm, "images/ALWI_000.png", "images/ALWI_001.png", "images/x.png", "masks/ALWI_000.png")
    (uclm / "INFO.csv").write_bytes("Image;Label\r\nALWI_000.png;Benign\r\n".encode("utf-8-sig"))
    images, ignored = listed("bus_uclm", tmp_path / "uclm", {"classes": "finding"})
    assert images == {"BUS-UCLM/images/ALWI_000.png": ("ALWI", "breast_benign")}
    assert ignored["BUS-UCLM/images/ALWI_001.png"] == f"no row for ALWI_001.png in {uclm / 'INFO.csv'}"
    assert len(ignored) == 3
    with pytest.raises(RecipeError, match=r"bus_bra adapter: no bus_data.csv under .*: the dataset's label file"):
        ADAPTERS["bus_bra"](tmp_path / "uclm", {})
    touch(tmp_path / "breast", "case001.png", "case001_tumor.png", "case002_other1.png", "scan.png")
    images, ignored = listed("breast_lesions_usg", tmp_path / "breast")
    assert images == {"case001.png": ("case001", None)}
    assert set(ignored.values()) == {"BrEaST lesion mask (caseNNN_tumor / caseNNN_otherK), not an image",
                                     "not named caseNNN: BrEaST patient unknown"}


# ---------------------------------------------------------------- options and recipes

def test_unknown_option_keys_are_refused_with_the_recipe_and_the_key(tmp_path):
    recipe = tmp_path / "recipe.json"
    (tmp_path / "d").mkdir()
    recipe.write_text(json.dumps({"datasets": [{"name": "mine", "adapter": "folder", "root": "d",
                                                "options": {"subjet": "parent"}}]}))
    with pytest.raises(RecipeError) as err:
        load_recipe(Config(recipe=str(recipe)))
    assert str(err.value) == (f"recipe {recipe}, dataset #0 (mine): unknown option 'subjet' for the folder adapter "
                              "(it accepts subject)")
    with pytest.raises(RecipeError, match=r"unknown option 'classes' for the tn3k adapter \(it accepts no options\)"):
        check_options("tn3k", {"classes": "finding"})
    with pytest.raises(RecipeError, match="busi adapter: options.classes must be 'organ' or 'finding', got 'lesion'"):
        ADAPTERS["busi"](tmp_path / "d", {"classes": "lesion"})
    recipe.write_text(json.dumps({"datasets": [{"name": "b", "adapter": "busi", "root": "d", "class": "breast",
                                                "options": {"classes": "finding"}}]}))
    with pytest.raises(RecipeError, match='"class" would override the finding-level classes'):
        load_recipe(Config(recipe=str(recipe)))


def test_the_six_organ_recipe_lists_every_brief_dataset_and_reports_the_missing_ones(repo_root, tmp_path):
    specs = load_recipe(Config(recipe=str(repo_root / "configs" / "recipe_six_organs.json")))
    classes = defaultdict(set)
    for spec in specs:
        classes[spec.cls].add(spec.adapter)
    assert classes == {"kidney": {"kidneyus"}, "fetal_head": {"hc18"}, "thyroid": {"tn3k", "tg3k", "ddti"},
                       "breast": {"busi", "bus_bra", "buid", "breast_lesions_usg", "bus_uc", "bus_uclm"},
                       "heart": {"camus"}, "liver": {"aul", "abdomenus"}}
    # a recipe whose second dataset is absent runs on the first and names the second
    touch(tmp_path / "tg", "tg3k/thyroid-image/0001.jpg")
    Image.fromarray(phantom(0)).save(tmp_path / "tg" / "tg3k" / "thyroid-image" / "0001.jpg")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"data_root": ".", "datasets": [
        {"name": "tg3k", "adapter": "tg3k", "root": "tg", "class": "thyroid"},
        {"name": "ddti", "adapter": "ddti", "root": "DDTI", "class": "thyroid"}]}))
    stats = run(Config(recipe=str(recipe), out=str(tmp_path / "out"), workers=1, scan_area_samples=0,
                       contact_sheet_images=0))
    assert stats["ok"] == 1 and stats["missing"] == ["ddti"]


# ---------------------------------------------------------------- near-duplicates

def phantom(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    organ = make_phantoms.CLASSES[seed % len(make_phantoms.CLASSES)]
    return make_phantoms.generate_frame(organ, rng).image


def altered(image: np.ndarray) -> list[np.ndarray]:
    """A JPEG re-encoding, a 60% copy scaled back up, a brighter copy and a copy cropped by 2 px a side."""
    picture = Image.fromarray(image).convert("L")
    side = picture.size[0]
    buffer = io.BytesIO()
    picture.save(buffer, format="jpeg", quality=70)
    return [np.asarray(Image.open(buffer)),
            np.asarray(picture.resize((side * 3 // 5, side * 3 // 5)).resize((side, side))),
            np.clip(np.asarray(picture, np.float32) * 1.08, 0, 255).astype(np.uint8),
            np.asarray(picture.crop((2, 2, side - 2, side - 2)).resize((side, side)))]


def square(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).convert("L").resize((256, 256)))


def test_planted_copies_are_near_duplicates_and_distinct_phantoms_are_not():
    images = [square(phantom(seed)) for seed in range(12)]
    hashes = [perceptual_hash(image) for image in images]
    for image, h in zip(images, hashes):
        assert all(hamming(h, perceptual_hash(copy)) <= NEAR_DUPLICATE_BITS for copy in altered(image))
    assert min(hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]) > NEAR_DUPLICATE_BITS
    assert repeats(hashes, NEAR_DUPLICATE_BITS) == {}
    planted = hashes + [perceptual_hash(altered(images[3])[0])]
    assert repeats(planted, NEAR_DUPLICATE_BITS) == {12: (3, hamming(hashes[3], planted[12]))}


def test_repeats_keep_the_first_and_compare_with_kept_images_only():
    assert repeats([0b0, 0b1, 0b11, 0b111, 0b1111], 1) == {1: (0, 1), 3: (2, 1)}  # 0b11 is 2 bits from 0b0: kept
    assert repeats([5, 5, 5], 0) == {1: (0, 0), 2: (0, 0)}


def test_prepare_keeps_subjects_in_one_split_and_drops_a_planted_copy_from_another_dataset(us_data, tmp_path):
    """Real BUS-BRA (cases of 2 images) and CCAUI (recordings of 4 frames) samples, and a BUSI-shaped replica
    holding a rescaled, re-encoded copy of one BUS-BRA image beside two distinct images."""
    bra, ccaui = sample(us_data, "BUS-BRA"), sample(us_data, "CCAUI")
    pick = [p for p in sorted((bra / "BUSBRA" / "Images").glob("*.png")) if p.stem[4:8] in ("0001", "0002", "0003", "0004")]
    (tmp_path / "bra" / "BUSBRA" / "Images").mkdir(parents=True)
    shutil.copy(bra / "BUSBRA" / "bus_data.csv", tmp_path / "bra" / "BUSBRA")
    for p in pick:
        (tmp_path / "bra" / "BUSBRA" / "Images" / p.name).symlink_to(p)
    frames = sorted((ccaui / "Common Carotid Artery Ultrasound Images" / "US images").glob("*.png"))[:12]
    (tmp_path / "ccaui" / "US images").mkdir(parents=True)
    for p in frames:
        (tmp_path / "ccaui" / "US images" / p.name).symlink_to(p)
    busi = tmp_path / "busi" / "benign"
    busi.mkdir(parents=True)
    copy = Image.open(pick[0]).convert("RGB")
    copy.resize((copy.width * 3 // 4, copy.height * 3 // 4)).save(busi / "benign (1).jpg", quality=80)
    for i, seed in enumerate((1, 2), start=2):
        Image.fromarray(phantom(seed * 6)).save(busi / f"benign ({i}).png")  # breast phantoms: distinct images
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"datasets": [
        {"name": "bus_bra", "adapter": "bus_bra", "root": "bra", "class": "breast"},
        {"name": "ccaui", "adapter": "ccaui", "root": "ccaui", "class": "carotid"},
        {"name": "busi", "adapter": "busi", "root": "busi", "class": "breast"}]}))
    out = tmp_path / "out"
    stats = run(Config(recipe=str(recipe), out=str(out), workers=2, scan_area_samples=0, contact_sheet_images=0,
                       val_frac=0.25, test_frac=0.25))
    with open(out / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    dropped = [r for r in rows if r["reason"].startswith("near-duplicate of ")]
    assert [Path(r["source"]).name for r in dropped] == ["benign (1).jpg"] and stats["near_duplicates"] == 1
    assert dropped[0]["reason"].startswith(f"near-duplicate of bus_bra: {pick[0].name} (another dataset, ")
    assert dropped[0]["split"] == "" and not any(out.glob("*/breast/busi__benign (1)*"))
    assert stats["ok"] == len(pick) + len(frames) + 2  # every distinct image kept
    splits = defaultdict(set)
    for r in rows:
        if r["status"] == "ok":
            splits[(r["dataset"], r["subject"])].add(r["split"])
    assert all(len(s) == 1 for s in splits.values()), "a subject straddles splits"
    assert len([k for k in splits if k[0] == "ccaui"]) == len({p.name.split("_slice")[0] for p in frames})
    assert {s for (d, _), group in splits.items() if d != "busi" for s in group} == {"train", "val", "test"}
