"""Range checks of numeric settings, run before any long work: an error names the setting and its value."""
from __future__ import annotations

import math
from typing import Iterable

from omegaconf import DictConfig, OmegaConf


def _get(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key, throw_on_missing=True)
    if value is None:
        raise ValueError(f"setting {key} is missing (null)")
    return value


def _number(cfg: DictConfig, key: str) -> float:
    value = _get(cfg, key)
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is not a number")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} is not a number") from None
    if not math.isfinite(x):
        raise ValueError(f"{key}={value!r} is not finite")
    return x


def check_positive(cfg: DictConfig, keys: Iterable[str]) -> None:
    """Every ``key`` is a finite number > 0."""
    for key in keys:
        if _number(cfg, key) <= 0:
            raise ValueError(f"{key}={_get(cfg, key)!r} must be > 0")


def check_non_negative(cfg: DictConfig, keys: Iterable[str]) -> None:
    for key in keys:
        if _number(cfg, key) < 0:
            raise ValueError(f"{key}={_get(cfg, key)!r} must be >= 0")


def check_count(cfg: DictConfig, keys: Iterable[str], minimum: int = 1) -> None:
    """Every ``key`` is an integer >= ``minimum``."""
    for key in keys:
        x = _number(cfg, key)
        if x != int(x) or x < minimum:
            raise ValueError(f"{key}={_get(cfg, key)!r} must be an integer >= {minimum}")


def check_choice(cfg: DictConfig, key: str, choices: Iterable[str], default: str | None) -> str:
    """``key`` (``default`` where the config has none) is one of ``choices``; returns it."""
    value, choices = OmegaConf.select(cfg, key, default=default), list(choices)
    if value not in choices:
        raise ValueError(f"{key}={value!r} must be one of {choices}")
    return value


def check_fraction(cfg: DictConfig, key: str, default: float) -> float:
    """``key`` (``default`` where the config has none) is a number in [0, 1); returns it."""
    value = OmegaConf.select(cfg, key, default=default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{key}={value!r} must be a number in [0, 1)")
    return value
