"""Property-based tests (hypothesis) of the config layer of every script: whatever value a command line or a preset
gives a constant, parsing and validation end in a Config of sound values or in one ConfigError, never in another
exception, a non-finite number, an integer torch cannot hold, or null where a value is meant."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eval_var
import report
import sample_var
import tokenize_multiscale_maps
import train_var
import train_vqvae
from common.config import MAX_INT, ConfigError, parse_config
from data_preprocessing import make_phantoms, prepare

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
