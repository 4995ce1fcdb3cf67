"""glibc malloc settings for a process that allocates and frees large tensors in a loop.

PyTorch's CPU tensors come from glibc malloc. By default every block above 128 KiB is a fresh
``mmap`` (the threshold only rises after such blocks are freed) and freed memory at the top of
the heap goes back to the kernel, so a loop that allocates and frees activation-sized tensors
faults in every 4 KiB page again on each iteration. On SmolLM2 (2 cores), three plain forward
passes over 16384 tokens: 9.1 M minor page faults and 18.4 s a pass with the defaults, 2.5 M
and 15.8 s with :func:`tune_allocator`; the default fit_scales job 87 s → 76 s
(bench/README.md).

Process-wide, so the command-line entry points call it (at the edge), not library code; a user
who set glibc's own variables (``MALLOC_*_``, ``GLIBC_TUNABLES``) keeps them, and
``SMOOTHROT_MALLOC=off`` leaves the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Blocks up to this size come from the heap and are reused: glibc's largest accepted value
# (half its 64 MiB heap). Larger blocks (e.g. a batch's logits) stay separate mappings.
MMAP_THRESHOLD = 32 << 20
# Freed heap memory kept for reuse before any is returned to the kernel.
TRIM_THRESHOLD = 1 << 30

_USER_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                  "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")


def tune_allocator() -> bool:
    """Keep freed tensor memory in the process for reuse; returns whether the settings apply.

    A no-op (False) off glibc, when the user configured glibc malloc through its environment
    variables, or with ``SMOOTHROT_MALLOC=off``. Peak memory is unchanged; up to
    :data:`TRIM_THRESHOLD` of freed memory stays with the process until it exits.
    """
    if os.environ.get("SMOOTHROT_MALLOC", "").lower() in ("off", "0", "false", "no"):
        return False
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    applied = all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    if not applied:
        log.debug("glibc rejected the malloc settings; allocator defaults kept")
    return applied
