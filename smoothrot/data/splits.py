"""Document-level disjoint splits and token windows.

Calibration (fitting smoothing scales), selection (choosing quantile policies), held-out checks and
the final evaluation must never see the same text, or the reported perplexity flatters the method.
This module therefore splits *whole documents* into the four splits before any tokenization, with
a seeded shuffle so a run is reproducible, and records a hash of each split's text for provenance.

Kept apart from :mod:`smoothrot.data.sources` (where the documents come from): everything here
works on a list of documents whatever its source, and :func:`split_windows` is the one place that
joins the two into a run's token windows.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from smoothrot.data.sources import PARAGRAPH_RE, load_documents

if TYPE_CHECKING:
    from smoothrot.schema.config import DataConfig

__all__ = [
    "CHUNK_CHARS",
    "DEFAULT_FRACTIONS",
    "DOC_SEPARATOR",
    "SPLITS",
    "chunk_documents",
    "split_documents",
    "split_windows",
    "text_hash",
    "token_windows",
]

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("calibration", "selection", "heldout", "evaluation")
DEFAULT_FRACTIONS: dict[str, float] = {
    "calibration": 0.55,
    "selection": 0.1,
    "heldout": 0.1,
    "evaluation": 0.25,
}
DOC_SEPARATOR = "\n\n"
CHUNK_CHARS = 2000


def _check_fractions(fractions: Mapping[str, float]) -> list[tuple[str, float]]:
    """Validate fractions; return (split, fraction) pairs in SPLITS order."""
    if not fractions:
        raise ValueError(f"no split fractions given; expected some of {', '.join(SPLITS)}")
    unknown = [name for name in fractions if name not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split name(s) {unknown}; allowed: {', '.join(SPLITS)}")
    items = [(name, float(fractions[name])) for name in SPLITS if name in fractions]
    bad = [f"{name}={value}" for name, value in items if not value > 0]
    if bad:
        raise ValueError(f"split fractions must be positive, got {', '.join(bad)}")
    total = sum(value for _, value in items)
    if total > 1 + 1e-9:
        raise ValueError(f"split fractions sum to {total:.4g} > 1: {dict(items)}")
    return items


def chunk_documents(docs: Sequence[str], max_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut documents longer than ``max_chars`` into pieces at paragraph, then line, boundaries.

    Used when there are too few documents to give every split one; a single paragraph or line
    longer than ``max_chars`` is hard-cut so a piece never exceeds the limit.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    pieces: list[str] = []
    for doc in docs:
        if len(doc) <= max_chars:
            pieces.append(doc)
            continue
        units: list[str] = []
        for para in PARAGRAPH_RE.split(doc):
            if len(para) <= max_chars:
                units.append(para)
                continue
            for line in para.split("\n"):
                units.extend(line[i : i + max_chars] for i in range(0, len(line), max_chars))
        current = ""
        for unit in units:
            if not unit.strip():
                continue
            if current and len(current) + len(DOC_SEPARATOR) + len(unit) > max_chars:
                pieces.append(current)
                current = unit
            else:
                current = f"{current}{DOC_SEPARATOR}{unit}" if current else unit
        if current:
            pieces.append(current)
    return [piece.strip() for piece in pieces if piece.strip()]


def _assign(docs: Sequence[str], items: list[tuple[str, float]], seed: int) -> dict[str, list[str]]:
    """Shuffle and give each document to the split whose share contains its midpoint."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    total = sum(len(doc) for doc in docs)
    bounds, acc = [], 0.0
    for _, fraction in items:
        acc += fraction
        bounds.append(acc * total)
    out: dict[str, list[str]] = {name: [] for name, _ in items}
    position = 0
    for index in order:
        doc = docs[index]
        middle = position + len(doc) / 2
        position += len(doc)
        for (name, _), bound in zip(items, bounds, strict=True):
            if middle < bound:
                out[name].append(doc)
                break
        # documents past the last bound (fractions summing to < 1) are left unused
    return out


def split_documents(
    docs: Sequence[str],
    fractions: Mapping[str, float],
    seed: int,
    *,
    max_doc_chars: int | None = None,
) -> dict[str, list[str]]:
    """Assign whole documents to splits so no text is shared between them.

    Documents are de-duplicated, shuffled with ``random.Random(seed)`` and laid end to end; each
    goes to the split (in ``SPLITS`` order) whose cumulative character share contains the
    document's midpoint. Fractions must be positive and sum to at most 1; any remainder is unused.
    If there are fewer documents than splits, or whole documents are too coarse to give every
    split one, long documents are first cut into ~2000-character pieces at paragraph/line
    boundaries. ``max_doc_chars`` (off by default) cuts every longer document the same way up
    front, trading strict document-level disjointness for shares closer to the requested ones
    when a few documents dominate the text (pydoc's largest topic is ~13% of it).
    Returns ``{split: [documents]}`` for the requested splits, in ``SPLITS`` order.
    """
    items = _check_fractions(fractions)
    non_empty = [doc for doc in docs if doc and doc.strip()]
    unique = list(dict.fromkeys(non_empty))
    if len(unique) < len(non_empty):
        logger.info("dropped %d duplicate documents before splitting", len(non_empty) - len(unique))
    if not unique:
        raise ValueError("no documents to split (the text is empty)")
    if max_doc_chars is not None:
        unique = list(dict.fromkeys(chunk_documents(unique, max_doc_chars)))

    out = _assign(unique, items, seed) if len(unique) >= len(items) else None
    if out is None or any(not split_docs for split_docs in out.values()):
        pieces = chunk_documents(unique, CHUNK_CHARS)
        logger.info(
            "cutting %d documents into %d pieces of <= %d chars so every split gets text",
            len(unique),
            len(pieces),
            CHUNK_CHARS,
        )
        out = _assign(pieces, items, seed)
    empty = [name for name, split_docs in out.items() if not split_docs]
    if empty:
        total = sum(len(doc) for doc in unique)
        raise ValueError(
            f"text too small to split: {total} chars leave split(s) {', '.join(empty)} empty; "
            "give a larger text or larger fractions"
        )
    for name, split_docs in out.items():
        logger.info(
            "split %s: %d documents, %d chars, hash %s",
            name,
            len(split_docs),
            sum(len(doc) for doc in split_docs),
            text_hash(split_docs),
        )
    return out


# --------------------------------------------------------------------------------------------
# Token windows
# --------------------------------------------------------------------------------------------


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without BOS/EOS, as a flat list."""
    # verbose=False silences the "sequence longer than model max length" warning: we cut windows.
    encoded = tokenizer(text, add_special_tokens=False, verbose=False)
    ids = encoded["input_ids"]
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).tolist()
    if ids and isinstance(ids[0], (list, tuple)):  # batched output for a single string
        return [int(token) for row in ids for token in row]
    return [int(token) for token in ids]


def token_windows(
    tokenizer: Any,
    docs: Sequence[str],
    n_samples: int | None,
    seq_len: int,
    *,
    seed: int,
    split_name: str,
) -> torch.Tensor:
    """Cut a split's text into ``n_samples`` non-overlapping token windows of ``seq_len``.

    The documents are joined with blank lines and tokenized once without special tokens, then cut
    into consecutive windows (the tail shorter than ``seq_len`` is dropped). ``n_samples`` windows
    are drawn without replacement with ``torch.Generator().manual_seed(seed)`` and returned in text
    order; ``n_samples`` of ``0`` or ``None`` returns all windows. Returns a ``LongTensor
    [n_samples, seq_len]``.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if n_samples is not None and (
        isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 0
    ):
        raise ValueError(f"n_samples must be a non-negative integer or None, got {n_samples!r}")
    if not docs:
        raise ValueError(f"{split_name} split has no documents")

    ids = _encode(tokenizer, DOC_SEPARATOR.join(docs))
    n_tokens = len(ids)
    n_windows = n_tokens // seq_len
    want = n_samples or n_windows
    if n_windows == 0 or want > n_windows:
        need = (
            f"n_samples*seq_len={want}*{seq_len}={want * seq_len}"
            if want
            else f"at least seq_len={seq_len}"
        )
        raise ValueError(
            f"{split_name} text has {n_tokens} tokens, need {need}; "
            f"lower n_samples/seq_len (config: data.{split_name}_samples, data.seq_len) or give "
            "a larger text"
        )

    windows = torch.tensor(ids[: n_windows * seq_len], dtype=torch.long).view(n_windows, seq_len)
    if want < n_windows:
        generator = torch.Generator().manual_seed(int(seed))
        chosen = torch.randperm(n_windows, generator=generator)[:want].sort().values
        windows = windows[chosen]
    logger.info(
        "%s: %d tokens -> %d of %d windows of %d tokens",
        split_name,
        n_tokens,
        want,
        n_windows,
        seq_len,
    )
    return windows.contiguous()


def split_windows(
    tokenizer: Any, cfg: DataConfig, seed: int, names: Sequence[str] = SPLITS
) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
    """Every split's documents and the token windows of ``names``, as ``cfg`` describes them.

    The one recipe for a run's tokens, so the job, its export and the benchmarks all see exactly
    the same windows for the same config and seed.
    """
    splits = split_documents(load_documents(cfg.source), cfg.fractions, seed)
    windows = {
        name: token_windows(tokenizer, splits[name], getattr(cfg, f"{name}_samples"),
                            cfg.seq_len, seed=seed, split_name=name)
        for name in names
    }
    return splits, windows


def text_hash(docs: Sequence[str]) -> str:
    """Short sha256 of the joined documents, recorded with results for provenance."""
    return hashlib.sha256(DOC_SEPARATOR.join(docs).encode("utf-8")).hexdigest()[:16]
