"""What a script's validate() says of a config: the tests of every script's constants share it."""
from __future__ import annotations

from typing import Any, Callable

from common.config import ConfigError


def refusal_of(validate: Callable[[Any], None], cfg: Any) -> str | None:
    """validate's ConfigError message for cfg, or None when it accepts it."""
    try:
        validate(cfg)
    except ConfigError as err:
        return str(err)
    return None


def assert_edges(refusal: Callable[..., str | None], table: dict[str, tuple[list, tuple[Any, str]]]) -> None:
    """Each constant of table (name -> (values accepted at its edges, (a refused value, the range its message
    names))) is accepted at its edges and refused just outside, with the message that names the range."""
    for name, (accepted, (bad, allowed)) in table.items():
        for value in accepted:
            assert refusal(**{name: value}) is None, (name, value)
        assert refusal(**{name: bad}) == f"--{name}={bad!r}: must be {allowed}", name
