"""Every preset in configs/ loads into its script's constants and passes that script's checks; the real-data recipe
points at the BUSI and HC18 samples of ../shared."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

import eval_utility
import report
import sample_var
import train_var
import train_vqvae
from common.config import parse_config
from data_preprocessing import prepare
from data_preprocessing.adapters import ADAPTERS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCRIPTS = {"vqvae": train_vqvae, "var": train_var, "sample": sample_var, "report": report, "utility": eval_utility}
PRESETS = sorted(p for p in CONFIGS.glob("*.json") if not p.name.startswith("recipe_"))


def test_every_preset_belongs_to_a_script() -> None:
    assert {p.name.split("_")[0] for p in PRESETS} == set(SCRIPTS)
    assert {p.stem.split("_", 1)[1] for p in PRESETS} == {"cpu", "gpu", "real_cpu", "real_findings_cpu",
                                                                "finetune_gpu", "perceptual_gpu"}


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_passes_its_script_s_checks(preset: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the output folders the checks create land here
    # The LPIPS files are checked by lpips_problem's own tests; a GPU box installs them for this preset.
    monkeypatch.setattr(train_vqvae, "lpips_problem", lambda: None)
    script = SCRIPTS[preset.name.split("_")[0]]
    script.validate(parse_config(script.Config, [f"--config={preset}"]))


def test_real_data_recipe_reads_busi_and_hc18_from_shared(shared_dir: Path) -> None:
    specs = prepare.load_recipe(prepare.Config(recipe=str(CONFIGS / "recipe_busi_hc18.json")))
    assert [(s.name, s.adapter, s.cls) for s in specs] == [("busi", "busi", "breast"),
                                                                 ("hc18", "hc18", "fetal_head")]
    assert [s.root.resolve() for s in specs] == [(shared_dir / "us_data" / d).resolve() for d in ("BUSI", "HC18")]


def test_findings_recipe_gives_busi_s_finding_as_the_class(shared_dir: Path) -> None:
    specs = prepare.load_recipe(prepare.Config(recipe=str(CONFIGS / "recipe_busi_findings_hc18.json")))
    assert [(s.name, s.adapter, s.cls, s.options) for s in specs] == [
        ("busi", "busi", None, {"classes": "finding"}), ("hc18", "hc18", "fetal_head", {})]
    listing = ADAPTERS["busi"](specs[0].root, specs[0].options)
    assert Counter(s.cls for s in listing.sources) == {"breast_benign": 70, "breast_malignant": 70, "breast_normal": 70}
    assert all(s.cls.removeprefix("breast_") in s.path.name for s in listing.sources)


def test_gpu_presets_leave_the_precision_to_the_card(repo_root):
    """A hard-coded bf16 would be refused on pre-Ampere cards: the presets say auto (bf16 or fp16 + loss scaling)."""
    import json
    presets = sorted((repo_root / "configs").glob("*_gpu.json"))
    assert [p.name for p in presets] == ["sample_gpu.json", "var_finetune_gpu.json", "var_gpu.json", "vqvae_gpu.json",
                                         "vqvae_perceptual_gpu.json"]
    assert {p.name: json.loads(p.read_text())["precision"] for p in presets} == {p.name: "auto" for p in presets}
