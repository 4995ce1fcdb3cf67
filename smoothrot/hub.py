"""Whether the Hugging Face hub can be used right now, decided in about a second.

The machines this project runs on are usually offline. The hub clients then retry every request
with back-off: an uncached model id or ``hf:`` dataset costs about a minute and dozens of log
lines before failing. One short TCP probe of the endpoint decides up front instead, so an
uncached source fails at once with one line and a cached one loads from the cache.

Torch-free; shared by model loading (:mod:`smoothrot.models`) and text sources
(:mod:`smoothrot.data.sources`).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from unittest import mock
from urllib.parse import urlsplit

__all__ = ["PROBE_TIMEOUT_S", "hub_offline", "hub_unusable", "offline_mode"]

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
_TRUTHY = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """The user's offline switches, read at call time (the hub clients read them at import)."""
    return any(
        os.environ.get(var, "").strip().lower() in _TRUTHY
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _endpoint() -> tuple[str, int]:
    """Host and port of the hub endpoint (``HF_ENDPOINT`` when set)."""
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_unusable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when offline is switched on or the endpoint does not accept a TCP connection within
    ``timeout`` seconds (no DNS, no route, a firewall)."""
    if hub_offline():
        return True
    host, port = _endpoint()
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        logger.info("the hub (%s:%d) is unreachable (%s); using the local cache only", host, port,
                    exc)
        return True
    return False


@contextmanager
def offline_mode() -> Iterator[None]:
    """The hub clients' offline mode for the duration of a call.

    ``huggingface_hub`` and ``datasets`` copy ``HF_HUB_OFFLINE`` into module constants when
    they are imported, so a decision taken later (the probe failed) has to set those copies;
    they are restored on exit. Requests then fail at once instead of being retried.
    """
    from huggingface_hub import constants

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(constants, "HF_HUB_OFFLINE", True))
        try:
            import datasets.config
        except ImportError:
            pass
        else:
            stack.enter_context(mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True))
        yield
