"""Atomic writes: a file or a folder appears complete or not at all.

Everything is written beside its target first and renamed into place at the end; a failure
(a full disk, Ctrl-C, an exception) removes the temporary copy and leaves any previous target
untouched. The one place smoothrot writes outputs that a crash must not leave half-written.

A SIGKILL (or a power cut) skips that cleanup, so every temporary name carries its writer's host
and pid (``.<name>.tmp-<host>-<pid>-<random>``); the next write into the same folder removes the
temporaries of writers on this host that are no longer running, and puts back a target that was
moved aside (``.<name>.old-...``) but never replaced.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_HOST = socket.gethostname()
# A temporary (tmp) or set-aside (old) name of a writer on this host: target, kind, pid.
_TEMPORARY = re.compile(
    rf"^\.(?P<name>.+)\.(?P<kind>tmp|old)-{re.escape(_HOST)}-(?P<pid>\d+)-[a-z0-9_]+$")


class TargetExistsError(ValueError):
    """The target exists and the caller did not ask to replace it."""


def refuse_existing(path: Path, overwrite: bool) -> None:
    """One-line error if ``path`` exists and ``overwrite`` is off."""
    if path.exists() and not overwrite:
        raise TargetExistsError(
            f"{path} already exists; pass overwrite=True (--overwrite) to replace it"
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _prefix(path: Path, kind: str) -> str:
    """The start of a temporary name beside ``path``: the writer's host and pid mark it."""
    return f".{path.name}.{kind}-{_HOST}-{os.getpid()}-"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(folder: Path) -> None:
    """Remove what killed writers on this host left in ``folder``: their temporaries, and a
    set-aside old target whose replacement is in place; one that was never replaced goes back."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match is None or _running(int(match["pid"])):
            continue
        target = folder / match["name"]
        try:
            if match["kind"] == "old" and not target.exists():
                os.replace(entry, target)
                log.warning("restored %s, set aside by a writer that was killed", target)
            else:
                _remove(entry)
                log.info("removed %s, left by a writer that was killed", entry)
        except OSError as exc:  # gone already (another writer cleaned it), or not ours to remove
            log.debug("left %s: %s", entry, exc)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_modes(root: Path) -> None:
    """Give the finished folder the modes a plain mkdir/open would (mkdtemp makes it 0700)."""
    mask = _umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


@contextmanager
def atomic_folder(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` that becomes ``path`` only if the block succeeds.

    Replacing an existing target is two renames (old aside, new in), then the old is deleted.
    """
    path = Path(path)
    clean_stale(path.parent)
    refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_prefix(path, "tmp")))
    try:
        yield tmp
        _publish_modes(tmp)
        refuse_existing(path, overwrite)  # someone may have created it meanwhile
        old = None
        if path.exists():
            old = path.parent / f"{_prefix(path, 'old')}{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
        if old is not None:
            _remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    clean_stale(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_prefix(path, "tmp"))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Atomically write ``text`` to ``path``."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, data: Mapping[str, Any] | list[Any]) -> None:
    """Atomically write ``data`` as indented JSON."""
    write_text(path, json.dumps(data, indent=2) + "\n")
