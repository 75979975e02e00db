"""The configuration convention shared by every script.

Each script declares its constants in one dataclass at its top, with a trailing comment per field:

    @dataclass
    class Config:
        out_dir: str = "runs/vqvae"  # where checkpoints and plots go
        epochs: int = 20             # passes over the training set

    cfg = parse_config(Config)

The command line overrides them as `--name=value`; `--config=FILE.json` loads a preset first (command-line
values win over it); `--help` prints every constant with its default and comment. `save_config` writes the
resolved values as JSON beside the script's artifacts.

A script's main starts with `script_config(Config, argv, validate)`: its validate function lists each constant's
allowed range once, declaratively, with the rules below (`check_constants(cfg, {"batch_size": at_least(1), ...})`),
so a bad value stops the script with a message naming the constant and the range before any file is touched.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import re
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Callable, NamedTuple, TypeVar

from common.io import SideFileError, atomic_write_json, read_json

C = TypeVar("C")

MAX_INT = 2**63 - 1  # the largest integer torch and numpy take
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A command-line override or preset file that does not fit the script's Config."""


def _field_comments(cls: type) -> dict[str, str]:
    """Trailing `# comment` of each field line in the dataclass source: the help text."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments = {}
    for line in source.splitlines():
        match = re.match(r"\s*(\w+)\s*:[^#]*#\s*(.*)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(name: str, text: Any, tp: Any) -> Any:
    """Turn a command-line string (or a JSON value from a preset) into a value of the field's type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text is None or (isinstance(text, str) and text.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _convert(name, text, inner[0])
    if text is None:  # a preset's null where the field is not optional: never the text "None" or a 0
        raise ConfigError(f"--{name}: expected {getattr(tp, '__name__', tp)}, got null")
    if tp is bool:
        if isinstance(text, bool):
            return text
        lowered = str(text).lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"--{name}: expected a boolean (true/false), got {text!r}")
    if tp in (int, float, str):
        # From a preset, only a JSON value of the field's kind: false is no 0, 5 is no path, 2.0 is no count.
        wrong_json = (isinstance(text, bool) or (tp is int and isinstance(text, float))
                      or (tp is str and not isinstance(text, str)) or isinstance(text, (list, dict)))
        if wrong_json:
            raise ConfigError(f"--{name}: expected {tp.__name__}, got {text!r}")
        try:
            value = tp(text)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name}: expected {tp.__name__}, got {text!r}") from None
        if tp is str and "\0" in value:  # no file name holds one; os calls would raise ValueError
            raise ConfigError(f"--{name}: must not contain a NUL character")
        if tp is float and not math.isfinite(value):
            raise ConfigError(f"--{name}: expected a finite number, got {text!r}")
        if tp is int and not -MAX_INT <= value <= MAX_INT:
            raise ConfigError(f"--{name}: {value} is outside the 64-bit integer range")
        return value
    if origin in (tuple, list):
        items = text
        if isinstance(text, str):
            stripped = text.strip().strip("[]()")
            items = [s.strip() for s in stripped.split(",") if s.strip()] if stripped else []
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"--{name}: expected a comma-separated list, got {text!r}")
        item_type = args[0] if args else str
        values = [_convert(name, item, item_type) for item in items]
        return tuple(values) if origin is tuple else values
    raise ConfigError(f"--{name}: unsupported field type {tp!r}")


def config_help(cls: type, prog: str = "") -> str:
    """Every constant of the Config with its type, default and comment."""
    comments = _field_comments(cls)
    hints = _resolved_types(cls)
    lines = [f"usage: python {prog} [--config=FILE.json] [--name=value ...]", "", "constants:"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        type_name = getattr(hints[f.name], "__name__", str(hints[f.name]))
        lines.append(f"  --{f.name}={default!r}  ({type_name})  {comments.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def _apply(cls: type, values: dict[str, Any], overrides: dict[str, Any], source: str) -> None:
    hints = _resolved_types(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    for name, raw in overrides.items():
        if name not in hints or name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown constant {name!r}{hint}; valid names: {', '.join(valid)}")
        values[name] = _convert(name, raw, hints[name])


def parse_config(cls: type[C], argv: list[str] | None = None) -> C:
    """Build a Config from its defaults, an optional `--config=FILE.json` preset and `--name=value` overrides.

    `--help` prints the constants and exits. Unknown names and wrong types raise ConfigError, which
    names the valid constants; reading sys.argv (argv=None) they end the process with that message instead.
    """
    if argv is None:
        try:
            return parse_config(cls, sys.argv[1:])
        except ConfigError as err:
            raise SystemExit(f"error: {err}") from None
    prog = Path(sys.argv[0]).name if sys.argv else ""
    if any(a in ("-h", "--help") for a in argv):
        print(config_help(cls, prog))
        raise SystemExit(0)
    cli: dict[str, str] = {}
    preset_path = None
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form --name=value (see --help)")
        name, value = arg[2:].split("=", 1)
        if name == "config":
            preset_path = value
        else:
            cli[name.replace("-", "_")] = value
    values: dict[str, Any] = {}
    if preset_path is not None:
        try:
            preset = read_json(preset_path)
        except SideFileError as err:
            raise ConfigError(f"--config: preset {err}") from None
        if not isinstance(preset, dict):
            raise ConfigError(f"--config: {preset_path} must hold a JSON object of constants")
        _apply(cls, values, preset, preset_path)
    _apply(cls, values, cli, "command line")
    return cls(**values)


class Rule(NamedTuple):
    """An allowed range: `ok(value)` says whether a value is in it, `allowed` says what it is ("must be ...")."""
    ok: Callable[[Any], bool]
    allowed: str


def at_least(low: float) -> Rule:
    return Rule(lambda v: v >= low, f">= {low}")


def above(low: float) -> Rule:
    return Rule(lambda v: v > low, f"> {low}")


def between(low: float, high: float, high_open: bool = False) -> Rule:
    """[low, high], or [low, high) with high_open."""
    if high_open:
        return Rule(lambda v: low <= v < high, f"in [{low}, {high})")
    return Rule(lambda v: low <= v <= high, f"in [{low}, {high}]")


# Seeds go to numpy's legacy seeding too, which takes 0..2**32 - 1.
SEED = Rule(lambda v: 0 <= v <= 2**32 - 1, "in [0, 4294967295]")


def distinct(label: Callable[[Any], str] = str) -> Rule:
    """No two items of a list constant alike once written as label writes them (the names sweep points get)."""
    return Rule(lambda v: len({label(x) for x in v}) == len(v), "distinct values (also once rounded for names)")


def one_of(*choices: Any) -> Rule:
    return Rule(lambda v: v in choices, f"one of {', '.join(map(str, choices))}")


def each(rule: Rule, non_empty: bool = True) -> Rule:
    """Every item of a list constant within `rule` (and at least one item)."""
    return Rule(lambda v: (len(v) > 0 or not non_empty) and all(rule.ok(x) for x in v),
                ("a non-empty list of values " if non_empty else "values ") + rule.allowed)


def _device_available(name: str) -> bool:
    import torch  # here only: prepare.py, which has no device, starts ~1.5 s sooner without it

    try:
        device = torch.device(name)
    except RuntimeError:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    if device.type == "mps":
        return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return device.type == "cpu"


# The device constant: a name torch knows and a device this machine has (checked here, not as a traceback later).
DEVICE = Rule(lambda v: v == "auto" or _device_available(v), "auto, cpu, or a cuda / mps device this machine has")
PRECISION = one_of("auto", "bf16", "fp16", "fp32")


def check_constants(cfg: Any, rules: dict[str, Rule]) -> None:
    """Raise ConfigError naming the first constant outside its rule: `--name=value: must be <allowed>`."""
    for name, rule in rules.items():
        value = getattr(cfg, name)
        if not rule.ok(value):
            raise ConfigError(f"--{name}={value!r}: must be {rule.allowed}")


def check_output_folder(name: str, folder: str | Path) -> Path:
    """The output folder of constant `name` is a folder this process can write (made if missing): checked before
    the long work, so a typo or a read-only disk fails at once rather than at the first checkpoint."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--{name}: {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ConfigError(f"--{name}: cannot write in {folder} ({err.strerror or err})") from None
    return folder


def script_config(cls: type[C], argv: list[str] | None, validate: Callable[[C], None]) -> C:
    """What a script's main starts with: parse_config, then validate(cfg). A ConfigError from either ends the
    process with its message (no traceback), before any input is read or output written."""
    try:
        cfg = parse_config(cls, sys.argv[1:] if argv is None else argv)
        validate(cfg)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    return cfg


def config_dict(cfg: Any) -> dict[str, Any]:
    """The resolved constants as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save_config(cfg: Any, out_dir: str | Path, name: str = "config.json") -> Path:
    """Write the resolved configuration as JSON beside the script's artifacts (atomically)."""
    path = Path(out_dir) / name
    atomic_write_json(path, config_dict(cfg))
    return path


def preset_hint(missing: str | Path, runs: str | Path = "runs", presets: str | Path = "configs") -> str:
    """For an input that does not exist: the files of the same name under runs/ and the presets that name them."""
    found = sorted(Path(runs).glob(f"**/{Path(missing).name}")) if Path(runs).is_dir() else []
    if not found:
        return ""
    users: dict[Path, list[str]] = {f: [] for f in found}
    for preset in sorted(Path(presets).glob("*.json")):
        try:
            values = read_json(preset)
        except SideFileError:
            continue
        for f in found:
            if isinstance(values, dict) and any(isinstance(v, str) and Path(v) == f for v in values.values()):
                users[f].append(preset.as_posix())
    listed = "; ".join(f"{f.as_posix()}" + (f" (used by --config={', '.join(u)})" if u else "") for f, u in users.items())
    return f"; found {listed}"
