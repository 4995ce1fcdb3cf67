"""Strict reading of JSON-like mappings into dataclasses: one-line errors naming the key.

Files smoothrot reads back (an export's declaration, a scales file's index) may come from another
version, another tool or a hand edit; a wrong key or value must fail where it is read, in one line
that names it, not as a KeyError or a wrong default far away. Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

Check = tuple[Callable[[Any], bool], str]  # (does the value fit, what it must be)


def _is_str(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_clip(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and 0 < value <= 1)


def is_names(value: Any) -> bool:
    """A list of non-empty strings."""
    return isinstance(value, list) and all(_is_str(v) for v in value)


def optional(check: Check) -> Check:
    """``check``, or null."""
    fits, expected = check
    return (lambda value: value is None or fits(value), f"null or {expected}")


def one_of(choices: tuple[Any, ...]) -> Check:
    return (lambda value: value in choices, f"one of {list(choices)}")


STRING: Check = (_is_str, "a non-empty string")
INTEGER: Check = (_is_int, "an integer")
BOOLEAN: Check = (lambda value: isinstance(value, bool), "true or false")
CLIP: Check = (_is_clip, "a number in (0, 1]")
NAMES: Check = (is_names, "a list of names")


def checked(cls: type, data: Any, where: str, checks: Mapping[str, Check]) -> dict[str, Any]:
    """``data`` as a mapping with exactly the fields of dataclass ``cls``, each passing its
    check (fields without one are parsed by the caller); one-line ValueError otherwise."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {names}")
    for name in names:
        if name not in data:
            raise ValueError(f"{where}: missing key {name!r}")
        if name in checks and not checks[name][0](data[name]):
            raise ValueError(f"{where}.{name}={data[name]!r} must be {checks[name][1]}")
    return dict(data)
