"""Progress bars that follow the log level: shown while the ``smoothrot`` logger is at INFO (the
CLI's default), hidden under ``-q`` (WARNING) or in a library call with logging unconfigured —
one rule, no global switch and no patched tqdm."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def bars_enabled() -> bool:
    return logging.getLogger("smoothrot").isEnabledFor(logging.INFO)


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """``iterable`` wrapped in a transient tqdm bar when bars are enabled."""
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=not bars_enabled())
