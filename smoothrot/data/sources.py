"""Text sources: where a run's documents come from.

Sources work offline by default: ``pydoc`` uses the English help topics that ship with the Python
standard library (~465 KB), a local text file is split into paragraphs, and ``hf:...`` reads a
Hugging Face dataset when the hub (or a local cache) is reachable.

Kept apart from :mod:`smoothrot.data.splits` because reading text (files, the hub, its failure
modes and error messages) is independent of how the text is then divided and tokenized; every
source yields a plain list of non-empty documents.
"""

from __future__ import annotations

import codecs
import logging
import re
from contextlib import nullcontext
from pathlib import Path

from smoothrot.hub import hub_unusable, offline_mode

__all__ = [
    "PARAGRAPH_RE",
    "DataLoadError",
    "load_documents",
]

logger = logging.getLogger(__name__)

# A blank line (possibly with whitespace): the paragraph boundary of text files and long documents.
PARAGRAPH_RE = re.compile(r"\n[ \t\r\f\v]*\n")
# Control characters other than whitespace, and U+FFFD: a text file holds few of them, a binary
# file that happens to decode as UTF-8 many (above MAX_ODD_CHARS of its characters).
_ODD_CHAR_RE = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd]")
MAX_ODD_CHARS = 0.01
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


class DataLoadError(RuntimeError):
    """A text source could not be read (e.g. a hub dataset while offline)."""


def load_documents(source: str) -> list[str]:
    """Load a list of non-empty documents from ``source``.

    ``source`` is one of:

    * ``"pydoc"``: the standard library's ``pydoc_data.topics.topics`` values, sorted by key;
    * a local text file path: paragraphs separated by blank lines;
    * ``"hf:NAME[:CONFIG]:SPLIT[:COLUMN]"``: a Hugging Face dataset column (default ``text``).
      With three fields the middle one is CONFIG; to name a column without a config leave the
      config empty (``hf:NAME::SPLIT:COLUMN``). Slices such as ``test[:50%]`` are allowed.
    """
    source = str(source).strip()
    if source == "pydoc":
        return _load_pydoc()
    if source.startswith("hf:"):
        return _load_hf(source)
    path = Path(source).expanduser()
    if not path.exists():
        scheme = _SCHEME_RE.match(source)
        if scheme is not None:
            raise ValueError(
                f"unknown text source scheme {scheme.group(1)!r} in {source!r}; "
                "use 'pydoc', a local text file, or 'hf:NAME[:CONFIG]:SPLIT[:COLUMN]'"
            )
        raise FileNotFoundError(f"text source file not found: {source}")
    return _load_text_file(path)


def _load_pydoc() -> list[str]:
    """English help topics bundled with CPython: always available offline."""
    from pydoc_data.topics import topics

    docs = [topics[key].strip() for key in sorted(topics)]
    docs = [doc for doc in docs if doc]
    if not docs:  # pragma: no cover - only on a stripped-down Python build
        raise ValueError("pydoc_data.topics contains no text")
    logger.info("loaded %d pydoc topics (%d chars)", len(docs), sum(map(len, docs)))
    return docs


def _decode_text(raw: bytes, path: Path) -> str:
    """``raw`` as UTF-8 text, or a one-line error: a binary, UTF-16 or NUL-filled file decoded
    leniently would still tokenize, and the run would fit and report on noise."""
    fix = "pass a UTF-8 text file or 'pydoc'"
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataLoadError(f"text source {path} is UTF-16; convert it to UTF-8 (e.g. iconv -f "
                            "UTF-16 -t UTF-8) or pass 'pydoc'")
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataLoadError(f"text source {path} contains NUL bytes (first at byte {nul}): binary, "
                            f"or UTF-16 without a byte-order mark; {fix}")
    body = raw.removeprefix(codecs.BOM_UTF8)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = exc.start + len(raw) - len(body)
        raise DataLoadError(f"text source {path} is not UTF-8 (byte 0x{raw[at]:02x} at {at} is "
                            "invalid); convert it to UTF-8 or pass 'pydoc'") from None
    odd = len(_ODD_CHAR_RE.findall(text))
    if odd > MAX_ODD_CHARS * len(text):
        raise DataLoadError(f"text source {path} looks binary: {odd} of {len(text)} characters "
                            f"are control or replacement characters; {fix}")
    return text


def _load_text_file(path: Path) -> list[str]:
    """Paragraphs (blank-line separated) of a UTF-8 text file."""
    if path.is_dir():
        raise ValueError(f"text source {path} is a directory; pass a text file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataLoadError(f"cannot read text source {path}: {exc.strerror or exc}") from exc
    text = _decode_text(raw, path)
    docs = [para.strip() for para in PARAGRAPH_RE.split(text.replace("\r\n", "\n"))]
    docs = [doc for doc in docs if doc]
    if not docs:
        raise ValueError(
            f"text source {path} contains no text; pass a non-empty UTF-8 text file or 'pydoc'"
        )
    logger.info("loaded %d paragraphs from %s (%d chars)", len(docs), path, sum(map(len, docs)))
    return docs


def _split_fields(spec: str) -> list[str]:
    """Split on ':' except inside [...] so split slices like 'test[:10%]' survive."""
    fields, current, depth = [], [], 0
    for char in spec:
        if char == "[":
            depth += 1
        elif char == "]":
            depth = max(depth - 1, 0)
        if char == ":" and depth == 0:
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


def _parse_hf(source: str) -> tuple[str, str | None, str, str]:
    """Parse 'hf:NAME[:CONFIG]:SPLIT[:COLUMN]' into (name, config, split, column)."""
    fields = _split_fields(source[len("hf:") :])
    if len(fields) == 2:
        name, config, split, column = fields[0], None, fields[1], "text"
    elif len(fields) == 3:
        name, config, split, column = fields[0], fields[1], fields[2], "text"
    elif len(fields) == 4:
        name, config, split, column = fields
    else:
        raise ValueError(
            f"bad dataset source {source!r}; expected 'hf:NAME[:CONFIG]:SPLIT[:COLUMN]'"
        )
    if not name or not split or not column:
        raise ValueError(f"bad dataset source {source!r}; NAME, SPLIT and COLUMN must not be empty")
    return name, (config or None), split, column


def _load_hf(source: str) -> list[str]:
    """Non-empty rows of one column of a Hugging Face dataset split."""
    name, config, split, column = _parse_hf(source)
    offline = hub_unusable()  # then the cache only: no minute of retries
    try:
        import datasets

        with offline_mode() if offline else nullcontext():
            dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # the hub client raises many unrelated types when offline
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        why = "the hub is unreachable and it is not cached;" if offline else "offline?"
        raise DataLoadError(
            f"could not load dataset {name!r} (config={config}, split={split}): "
            f"{type(exc).__name__}: {first}; {why} use a local text file or 'pydoc' instead"
        ) from exc
    if column not in dataset.column_names:
        raise ValueError(
            f"dataset {name!r} has no column {column!r}; columns: {', '.join(dataset.column_names)}"
        )
    docs = [row.strip() for row in dataset[column] if isinstance(row, str) and row.strip()]
    if not docs:
        raise ValueError(f"dataset {name!r} split {split!r} column {column!r} contains no text")
    logger.info("loaded %d rows from %s (%d chars)", len(docs), source, sum(map(len, docs)))
    return docs
