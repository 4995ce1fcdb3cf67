"""Running a Lightning stage so that Ctrl-C reaches the caller as KeyboardInterrupt.

On Ctrl-C Lightning shuts down, ignores SIGINT for good and calls ``sys.exit(1)``; callers (the
CLI) need the KeyboardInterrupt to print the --resume hint, and a working Ctrl-C after.
"""

from __future__ import annotations

import signal
import threading
import warnings
from collections.abc import Callable

import lightning as L


def interruptible(trainer: L.Trainer, run: Callable[..., object], **kwargs: object) -> None:
    """Call ``run(**kwargs)`` (``trainer.fit`` / ``trainer.validate``); Ctrl-C raises
    KeyboardInterrupt and restores the SIGINT handler Lightning replaced."""
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        with warnings.catch_warnings():
            # Resuming from the checkpoint a shorter run wrote at its last step (not an epoch
            # end) is exact here: EpochTokenSampler starts from the restored global step.
            warnings.filterwarnings("ignore", message=".*checkpoint that ended before the epoch")
            run(**kwargs)
    except SystemExit:
        if not trainer.interrupted:
            raise
        if main_thread and handler is not None:
            signal.signal(signal.SIGINT, handler)
        raise KeyboardInterrupt from None
