import json
import subprocess
import sys
from dataclasses import dataclass

import pytest

from common.config import (DEVICE, ConfigError, above, at_least, between, check_constants, check_output_folder,
                           config_help, each, one_of, parse_config, preset_hint, save_config, script_config)


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


def test_a_misspelt_name_gets_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown constant 'sclaes' \(did you mean 'scales'\?\)"):
        parse_config(Config, ["--sclaes=1,2"])
    with pytest.raises(ConfigError) as err:
        parse_config(Config, ["--zzz=1"])
    assert "did you mean" not in str(err.value)  # nothing close: no suggestion


@pytest.mark.parametrize("rule, good, bad, allowed", [
    (at_least(1), [1, 7], [0, -3], ">= 1"),
    (above(0), [1e-9, 2.0], [0.0, -1.0], "> 0"),
    (between(0, 1), [0.0, 1.0], [-0.1, 1.5], "in [0, 1]"),
    (between(0, 1, high_open=True), [0.0, 0.5], [1.0, -1.0], "in [0, 1)"),
    (one_of("a", "b"), ["a", "b"], ["c", ""], "one of a, b"),
    (each(at_least(1)), [(1,), (2, 3)], [(), (1, 0)], "a non-empty list of values >= 1"),
    (each(at_least(1), non_empty=False), [(), (4,)], [(0,)], "values >= 1"),
])
def test_range_rules(rule, good, bad, allowed):
    assert rule.allowed == allowed
    assert all(rule.ok(v) for v in good) and not any(rule.ok(v) for v in bad)


def test_check_constants_names_the_first_bad_constant_and_its_range():
    cfg = Config(epochs=0, lr=-1.0)
    check_constants(Config(), {"epochs": at_least(1), "lr": at_least(0)})
    with pytest.raises(ConfigError, match=r"^--epochs=0: must be >= 1$"):
        check_constants(cfg, {"epochs": at_least(1), "lr": at_least(0)})
    with pytest.raises(ConfigError, match=r"^--device='cuda:7': must be auto, cpu, or a cuda / mps device this machine"):
        check_constants(type("C", (), {"device": "cuda:7"})(), {"device": DEVICE})
    with pytest.raises(ConfigError, match=r"^--device='gpu': must be"):
        check_constants(type("C", (), {"device": "gpu"})(), {"device": DEVICE})
    check_constants(type("C", (), {"device": "cpu"})(), {"device": DEVICE})


def test_output_folder_must_be_a_writable_folder(tmp_path):
    assert check_output_folder("out_dir", tmp_path / "new" / "run").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=f"^--out_dir: {tmp_path / 'file'} exists and is not a folder$"):
        check_output_folder("out_dir", tmp_path / "file")
    with pytest.raises(ConfigError, match=f"^--out_dir: cannot write in {tmp_path / 'file' / 'run'} "):
        check_output_folder("out_dir", tmp_path / "file" / "run")
    assert (tmp_path / "file").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["file", "new"]


def test_script_config_ends_with_the_message_of_a_parse_or_range_error():
    def validate(cfg):
        check_constants(cfg, {"epochs": at_least(1)})

    assert script_config(Config, ["--epochs=2"], validate).epochs == 2
    with pytest.raises(SystemExit, match=r"^error: --epochs=0: must be >= 1$"):
        script_config(Config, ["--epochs=0"], validate)
    with pytest.raises(SystemExit, match=r"did you mean 'epochs'"):
        script_config(Config, ["--epoch=2"], validate)


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
    assert bad.returncode != 0 and ("error: command line: unknown constant 'epoch' (did you mean 'epochs'?); valid names: "
                                    "epochs") in bad.stderr
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
