"""common/config.py pinned down rule by rule: each range rule's boundaries and message, each conversion, each
refusal. The rules are built inside the test bodies (not in parametrize lists), so that a mutation tool that
switches code per test sees them (see docs/testing.md).

Property-based tests (hypothesis) of the config layer of every script: whatever value a command line or a preset
gives a constant, parsing and validation end in a Config of sound values or in one ConfigError, never in another
exception, a non-finite number, an integer torch cannot hold, or null where a value is meant."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import eval_var
import report
import sample_var
import tokenize_multiscale_maps
import train_var
import train_vqvae
from common import config as config_module
from common.config import (DEVICE, MAX_INT, PRECISION, ConfigError, above, at_least, between, check_constants,
                           check_output_folder, config_help, each, one_of, parse_config, preset_hint, save_config,
                           script_config)
from data_preprocessing import make_phantoms, prepare


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


@pytest.mark.e2e
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


@dataclass
class Knobs:
    rate: float = 0.5  # a rate
    count: int = 2
    flag: bool = False  # a switch
    sizes: tuple[int, ...] = (1, 2)  # sizes
    names: list[str] = field(default_factory=lambda: ["a"])  # names
    path: str | None = None  # maybe a path
    limit: int | None = None  # maybe a limit
    weird: dict = field(default_factory=dict)  # no converter for this type


def test_boundaries_and_messages_of_every_range_rule():
    rule = at_least(2)
    assert (rule.ok(2), rule.ok(1.999), rule.allowed) == (True, False, ">= 2")
    rule = above(0.5)
    assert (rule.ok(0.5), rule.ok(0.5001), rule.ok(0.4), rule.allowed) == (False, True, False, "> 0.5")
    rule = between(1, 3)
    assert [rule.ok(v) for v in (0.99, 1, 2, 3, 3.01)] == [False, True, True, True, False]
    assert rule.allowed == "in [1, 3]"
    rule = between(1, 3, high_open=True)
    assert [rule.ok(v) for v in (0.99, 1, 2.99, 3)] == [False, True, True, False]
    assert rule.allowed == "in [1, 3)"
    rule = one_of("x", 4)
    assert (rule.ok("x"), rule.ok(4), rule.ok("4"), rule.allowed) == (True, True, False, "one of x, 4")
    rule = each(between(0, 1))
    assert [rule.ok(v) for v in ((), (0.5,), (0, 1), (0.5, 2))] == [False, True, True, False]
    assert rule.allowed == "a non-empty list of values in [0, 1]"
    rule = each(at_least(1), non_empty=False)
    assert [rule.ok(v) for v in ((), (1,), (0,))] == [True, True, False]
    assert rule.allowed == "values >= 1"
    assert each(at_least(1)).ok([3, 4]) and not each(at_least(1)).ok([3, 0])


def test_device_and_precision_rules():
    assert DEVICE.ok("auto") and DEVICE.ok("cpu")
    assert not DEVICE.ok("gpu") and not DEVICE.ok("cuda:1000")
    assert config_module._device_available("cpu") and not config_module._device_available("meta:0")
    with mock.patch("torch.cuda.is_available", return_value=True), mock.patch("torch.cuda.device_count", return_value=2):
        assert [config_module._device_available(n) for n in ("cuda", "cuda:1", "cuda:2")] == [True, True, False]
    with mock.patch("torch.cuda.is_available", return_value=True), mock.patch("torch.cuda.device_count", return_value=1):
        assert [config_module._device_available(n) for n in ("cuda", "cuda:0", "cuda:1")] == [True, True, False]
    with mock.patch("torch.cuda.is_available", return_value=False), mock.patch("torch.cuda.device_count", return_value=2):
        assert not config_module._device_available("cuda:0")
    with mock.patch("torch.backends.mps.is_available", return_value=True):
        assert config_module._device_available("mps")
    with mock.patch("torch.backends.mps.is_available", return_value=False):
        assert not config_module._device_available("mps")
    assert [PRECISION.ok(p) for p in ("auto", "bf16", "fp16", "fp32", "fp8")] == [True] * 4 + [False]


def test_each_conversion_and_its_refusal():
    cfg = parse_config(Knobs, ["--path=NULL", "--sizes=[3, 4]", "--names=(p,q)", "--flag=ON", "--count=-3"])
    assert (cfg.path, cfg.sizes, cfg.names, cfg.flag, cfg.count) == (None, (3, 4), ["p", "q"], True, -3)
    assert parse_config(Knobs, ["--path="]).path is None
    assert parse_config(Knobs, ["--path=a=b"]).path == "a=b"  # the value may hold '='
    assert parse_config(Knobs, ["--names=Xa,bX"]).names == ["Xa", "bX"]  # only brackets are stripped
    assert parse_config(Knobs, ["--sizes=[]"]).sizes == ()
    assert parse_config(Knobs, ["--sizes=5"]).sizes == (5,)
    assert [parse_config(Knobs, [f"--flag={v}"]).flag for v in ("1", "yes", "true", "0", "no", "off")] == \
        [True, True, True, False, False, False]
    with pytest.raises(ConfigError, match=r"^--count: expected int, got True$"):
        config_module._convert("count", True, int)
    with pytest.raises(ConfigError, match=r"^--count: expected int, got 2.0$"):
        config_module._convert("count", 2.0, int)
    assert config_module._convert("rate", 2, float) == 2.0
    with pytest.raises(ConfigError, match=r"^--sizes: expected a comma-separated list, got 3$"):
        config_module._convert("sizes", 3, tuple[int, ...])
    assert config_module._convert("sizes", [1, "2"], tuple[int, ...]) == (1, 2)
    assert config_module._convert("names", "a,b", typing.List) == ["a", "b"]  # a bare list holds strings
    assert config_module._convert("sizes", [1, 2], list[int]) == [1, 2]
    with pytest.raises(ConfigError, match=r"^--weird: unsupported field type <class 'dict'>$"):
        parse_config(Knobs, ["--weird=x"])
    with pytest.raises(ConfigError, match=r"^--limit: expected int, got 'x'$"):  # the inner type names the constant
        parse_config(Knobs, ["--limit=x"])
    assert parse_config(Knobs, ["--limit=4"]).limit == 4


def test_unknown_names_and_the_preset_refusals(tmp_path):
    with pytest.raises(ConfigError, match=r"^command line: unknown constant 'cont' \(did you mean 'count'\?\)"):
        parse_config(Knobs, ["--cont=1"])
    with pytest.raises(ConfigError) as err:
        parse_config(Knobs, ["--zzz=1"])
    assert str(err.value) == ("command line: unknown constant 'zzz'; valid names: rate, count, flag, sizes, names, path, "
                              "limit, weird")
    assert parse_config(Knobs, ["--rate=0.25"]).rate == 0.25
    preset = tmp_path / "p.json"
    preset.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=rf"^--config: {preset} must hold a JSON object of constants$"):
        parse_config(Knobs, [f"--config={preset}"])
    # a dash in a name reads as an underscore, as on most command lines
    @dataclass
    class Dashed:
        num_workers: int = 0  # workers

    assert parse_config(Dashed, ["--num-workers=3"]).num_workers == 3

    @dataclass
    class WithClassVar:
        KIND: typing.ClassVar[str] = "vqvae"  # annotated, but not a constant of the command line
        epochs: int = 1  # passes

    with pytest.raises(ConfigError, match=r"^command line: unknown constant 'KIND'; valid names: epochs$"):
        parse_config(WithClassVar, ["--KIND=var"])


def test_help_exits_zero_with_the_constants(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/some/where/train_x.py"])
    for flag in ("-h", "--help"):
        with pytest.raises(SystemExit) as stop:
            parse_config(Knobs, [flag])
        assert stop.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith("usage: python train_x.py [--config=FILE.json] [--name=value ...]\n\nconstants:\n")
    lines = config_help(Knobs, "p.py").split("\n")
    assert lines[:3] == ["usage: python p.py [--config=FILE.json] [--name=value ...]", "", "constants:"]
    assert lines[3] == "  --rate=0.5  (float)  a rate"
    assert lines[4] == "  --count=2  (int)"  # no comment: no trailing spaces
    assert lines[7] == "  --names=['a']  (list)  names"
    assert lines[8] == "  --path=None  (str | None)  maybe a path"
    assert lines[9] == "  --limit=None  (int | None)  maybe a limit"
    assert config_help(Knobs).startswith("usage: python  [--config")
    monkeypatch.setattr(sys, "argv", [])  # embedded interpreters may have no argv[0]
    with pytest.raises(SystemExit):
        parse_config(Knobs, ["--help"])
    assert capsys.readouterr().out.startswith("usage: python  [--config")


def test_sys_argv_is_read_when_no_argv_is_given(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog.py", "--count=7"])
    assert parse_config(Knobs).count == 7
    monkeypatch.setattr(sys, "argv", ["prog.py", "--count=x"])
    with pytest.raises(SystemExit) as stop:
        parse_config(Knobs)
    assert stop.value.code == "error: --count: expected int, got 'x'"
    monkeypatch.setattr(sys, "argv", ["prog.py", "--count=9"])
    assert script_config(Knobs, None, lambda cfg: None).count == 9


def test_check_constants_and_output_folder_refusals(tmp_path):
    check_constants(Knobs(), {"rate": between(0, 1), "count": at_least(1)})
    with pytest.raises(ConfigError, match=r"^--count=0: must be >= 1$"):
        check_constants(Knobs(count=0), {"rate": between(0, 1), "count": at_least(1)})
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("k")
    assert check_output_folder("out_dir", existing) == existing
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]  # the probe file leaves nothing behind
    if os.geteuid() != 0:  # root writes anywhere: the read-only case only bites other users
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match=rf"^--out_dir: cannot write in {locked} \(Permission denied\)$"):
            check_output_folder("out_dir", locked)
    with mock.patch("tempfile.TemporaryFile", side_effect=OSError("no space")):
        with pytest.raises(ConfigError, match=rf"^--out_dir: cannot write in {existing} \(no space\)$"):
            check_output_folder("out_dir", existing)
    with mock.patch("tempfile.TemporaryFile", side_effect=OSError(28, "No space left on device")):
        with pytest.raises(ConfigError, match=r"\(No space left on device\)$"):
            check_output_folder("out_dir", existing)
    with mock.patch("tempfile.TemporaryFile") as probe:
        check_output_folder("out_dir", existing)
    assert probe.call_args.kwargs == {"dir": existing}


def test_save_config_default_name_and_preset_hint_defaults(tmp_path, monkeypatch):
    assert save_config(Knobs(), tmp_path).name == "config.json"
    assert json.loads((tmp_path / "config.json").read_text())["sizes"] == [1, 2]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "best.pth").write_bytes(b"")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "one.json").write_text(json.dumps({"vqvae": "runs/a/best.pth"}))
    (tmp_path / "configs" / "two.json").write_text(json.dumps({"vqvae": "runs/a/best.pth"}))
    assert preset_hint("runs/b/best.pth") == \
        "; found runs/a/best.pth (used by --config=configs/one.json, configs/two.json)"
    (tmp_path / "runs_file").write_text("")
    assert preset_hint("best.pth", runs="runs_file") == ""


SCRIPTS = {"train_var": (train_var.Config, train_var.validate), "train_vqvae": (train_vqvae.Config, train_vqvae.validate),
           "tokenize": (tokenize_multiscale_maps.Config, tokenize_multiscale_maps.validate),
           "sample_var": (sample_var.Config, sample_var.validate), "eval_var": (eval_var.Config, eval_var.validate),
           "report": (report.Config, report.validate), "prepare": (prepare.Config, prepare.check_config),
           "make_phantoms": (make_phantoms.Config, make_phantoms.validate)}


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))


VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=3), SCALARS, max_size=2))


def sound(value: object, tp: object) -> bool:
    """Whether a parsed value is of the field's type, finite and within 64 bits."""
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType")):
        return value is None or sound(value, next(a for a in typing.get_args(tp) if a is not type(None)))
    if typing.get_origin(tp) is tuple:
        return isinstance(value, tuple) and all(sound(v, typing.get_args(tp)[0]) for v in value)
    if tp is float:
        return isinstance(value, float) and math.isfinite(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool) and -MAX_INT <= value <= MAX_INT
    if tp is str:
        return isinstance(value, str) and "\0" not in value
    return isinstance(value, tp)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("properties")


@pytest.mark.parametrize("script", SCRIPTS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_value_parses_to_sound_constants_or_one_config_error(script: str, workdir: Path, data: st.DataObject):
    cls, validate = SCRIPTS[script]
    hints = typing.get_type_hints(cls)
    name = data.draw(st.sampled_from([f.name for f in dataclasses.fields(cls)]), label="constant")
    value = data.draw(VALUES, label="value")
    via_preset = data.draw(st.booleans(), label="via preset")
    preset = workdir / f"{script}.json"
    if via_preset:
        preset.write_text(json.dumps({name: value}))
        argv = [f"--config={preset}"]
    else:
        argv = [f"--{name}={value}"]
    cwd = os.getcwd()
    os.chdir(workdir)  # relative output folders that validate makes land here
    try:
        cfg = parse_config(cls, argv)
        assert all(sound(getattr(cfg, f), hints[f]) for f in hints), cfg
        validate(cfg)
    except ConfigError:
        pass
    finally:
        os.chdir(cwd)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), min_size=1, max_size=4))
def test_guidance_sweep_points_are_distinct_once_named(values: list[float]) -> None:
    config = parse_config(sample_var.Config, [f"--guidance={','.join(repr(v) for v in values)}"])
    names = [f"{g:g}" for g in config.guidance]
    try:
        sample_var.validate(config)
        assert len(set(names)) == len(names)
    except ConfigError as err:
        assert len(set(names)) < len(names) and "distinct" in str(err)


@pytest.mark.parametrize("argv, message", [
    (["--coarse_ks=1,1"], "--coarse_ks=(1, 1): must be distinct values (also once rounded for names)"),
    (["--guidance=1,1.0000001"], "--guidance=(1.0, 1.0000001): must be distinct values"),
    (["--guidance=inf"], "--guidance: expected a finite number, got 'inf'"),
    (["--seed=4294967296"], "--seed=4294967296: must be in [0, 4294967295]"),
])
def test_sample_var_refuses_duplicate_points_and_unbounded_values(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        sample_var.validate(parse_config(sample_var.Config, argv))
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("preset, message", [({"out": None}, "--out: expected str, got null"),
                                             ({"test_frac": False}, "--test_frac: expected float, got False"),
                                             ({"seed": 2.0}, "--seed: expected int, got 2.0"),
                                             ({"out": 5}, "--out: expected str, got 5"),
                                             ({"out": "a\0b"}, "--out: must not contain a NUL character")])
def test_presets_give_no_null_false_or_number_where_another_kind_is_meant(tmp_path: Path, preset: dict,
                                                                          message: str) -> None:
    (tmp_path / "p.json").write_text(json.dumps(preset))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(prepare.Config, [f"--config={tmp_path / 'p.json'}"])
