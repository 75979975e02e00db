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
