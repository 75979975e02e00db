import json
import subprocess
import sys
from dataclasses import dataclass

import pytest

from common.config import ConfigError, config_help, parse_config, preset_hint, save_config


@dataclass
class Config:
    out_dir: str = "runs/x"  # where outputs go
    epochs: int = 3  # passes over the data
    lr: float = 1e-3  # learning rate
    amp: bool = True  # mixed precision
    scales: tuple[int, ...] = (1, 2, 4)  # token map sizes
    resume: str | None = None  # checkpoint to resume from


def test_defaults_and_overrides():
    cfg = parse_config(Config, ["--epochs=7", "--lr=0.5", "--amp=false", "--scales=1,2,3", "--resume=a.pth"])
    assert (cfg.epochs, cfg.lr, cfg.amp, cfg.scales, cfg.resume) == (7, 0.5, False, (1, 2, 3), "a.pth")
    assert parse_config(Config, []) == Config()
    assert parse_config(Config, ["--resume=none"]).resume is None


@pytest.mark.parametrize("arg, message", [
    ("--epochs=three", "--epochs: expected int, got 'three'"),
    ("--amp=maybe", "--amp: expected a boolean"),
    ("--scales=1,x", "--scales: expected int"),
])
def test_wrong_type_is_a_clear_error(arg, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(Config, [arg])


def test_unknown_key_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        parse_config(Config, ["--epoch=3"])
    assert "unknown constant 'epoch'" in str(err.value)
    assert "out_dir, epochs, lr, amp, scales, resume" in str(err.value)
    with pytest.raises(ConfigError, match="not of the form --name=value"):
        parse_config(Config, ["epochs=3"])


def test_config_file_then_command_line(tmp_path):
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"epochs": 11, "lr": 0.1, "scales": [1, 5]}))
    cfg = parse_config(Config, [f"--config={preset}", "--lr=0.2"])
    assert (cfg.epochs, cfg.lr, cfg.scales) == (11, 0.2, (1, 5))
    preset.write_text(json.dumps({"epochs": 1.5}))
    with pytest.raises(ConfigError, match="expected int"):
        parse_config(Config, [f"--config={preset}"])
    preset.write_text(json.dumps({"nope": 1}))
    with pytest.raises(ConfigError, match=f"{preset}: unknown constant 'nope'"):
        parse_config(Config, [f"--config={preset}"])
    preset.write_text("{broken")
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_config(Config, [f"--config={preset}"])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(Config, [f"--config={tmp_path / 'missing.json'}"])


def test_saved_json_round_trips_as_a_preset(tmp_path):
    cfg = parse_config(Config, ["--epochs=5", "--scales=2,3"])
    path = save_config(cfg, tmp_path / "out")
    saved = json.loads(path.read_text())
    assert saved == {"out_dir": "runs/x", "epochs": 5, "lr": 1e-3, "amp": True, "scales": [2, 3], "resume": None}
    assert parse_config(Config, [f"--config={path}"]) == cfg


def test_help_lists_every_constant_with_default_and_comment():
    text = config_help(Config, "script.py")
    for line in ["--epochs=3  (int)  passes over the data", "--lr=0.001  (float)  learning rate",
                 "--scales=(1, 2, 4)", "--resume=None"]:
        assert line in text


def test_script_exits_with_message_on_bad_argument(tmp_path, repo_root):
    script = tmp_path / "script.py"
    script.write_text(
        "from dataclasses import dataclass\nfrom common.config import parse_config\n"
        "@dataclass\nclass Config:\n    epochs: int = 3  # passes\n"
        "print(parse_config(Config).epochs)\n"
    )
    env = {"PYTHONPATH": str(repo_root)}
    ok = subprocess.run([sys.executable, str(script), "--epochs=4"], capture_output=True, text=True, env=env)
    assert ok.stdout.strip() == "4"
    bad = subprocess.run([sys.executable, str(script), "--epoch=4"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "error: command line: unknown constant 'epoch'; valid names: epochs" in bad.stderr
    helped = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=env)
    assert helped.returncode == 0 and "--epochs=3  (int)  passes" in helped.stdout


def test_preset_hint_names_the_files_that_exist_and_the_presets_using_them(tmp_path):
    runs, presets = tmp_path / "runs", tmp_path / "configs"
    for folder in ("tokens_cpu", "tokens_gpu", "other"):
        (runs / folder).mkdir(parents=True)
    (runs / "tokens_cpu" / "t.npz").write_bytes(b"")
    (runs / "tokens_gpu" / "t.npz").write_bytes(b"")
    presets.mkdir()
    (presets / "var_cpu.json").write_text(json.dumps({"tokens": str(runs / "tokens_cpu" / "t.npz"), "epochs": 3}))
    (presets / "broken.json").write_text("{not json")
    hint = preset_hint(runs / "tokens" / "t.npz", runs=runs, presets=presets)
    assert hint == (f"; found {(runs / 'tokens_cpu' / 't.npz').as_posix()} (used by "
                    f"--config={(presets / 'var_cpu.json').as_posix()}); {(runs / 'tokens_gpu' / 't.npz').as_posix()}")
    assert preset_hint(runs / "nothing.npz", runs=runs, presets=presets) == ""
    assert preset_hint("x.npz", runs=tmp_path / "absent", presets=presets) == ""
