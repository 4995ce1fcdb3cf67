"""Progress bars that follow the log level: shown while the ``smoothrot`` logger is at INFO (the
CLI's default), hidden under ``-q`` (WARNING) or in a library call with logging unconfigured —
one rule, no global switch and no patched tqdm."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def bars_enabled() -> bool:
    return logging.getLogger("smoothrot").isEnabledFor(logging.INFO)


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """``iterable`` wrapped in a transient tqdm bar when bars are enabled."""
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=not bars_enabled())


@contextmanager
def quiet_libraries(quiet: bool, verbose: bool) -> Iterator[None]:
    """Lightning's and transformers' loggers and bars at a command's verbosity (Lightning's INFO
    banners, once per trained site, only with ``verbose``; transformers' bars hidden when
    ``quiet``), restored after: the CLIs and benches also run in-process, in tests."""
    import lightning.pytorch  # noqa: F401 - sets its loggers' levels on import; ours go after
    from transformers.utils import logging as hf_logging

    names = ("lightning", "lightning.pytorch", "lightning.fabric")
    levels = {name: logging.getLogger(name).level for name in names}
    bars = hf_logging.is_progress_bar_enabled()
    for name in names:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for name, value in levels.items():
            logging.getLogger(name).setLevel(value)
        if quiet and bars:
            hf_logging.enable_progress_bar()
