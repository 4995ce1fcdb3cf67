"""Document-level disjoint splits and token windows.

Calibration (fitting smoothing scales), selection (choosing quantile policies), held-out checks and
the final evaluation must not see the same text, or the reported perplexity flatters the method.
This module therefore splits *whole groups of documents* into the four splits before any
tokenization: a document goes with every document it shares more than a little verbatim text with
(12-word shingles), since whole documents alone still leak text when documents quote or nest each
other. The deal is seeded so a run is reproducible, and a hash of each split's text is recorded
for provenance.

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
    "near_duplicate_groups",
    "shingles",
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
# Near-duplicate grouping: documents sharing >= 5 % of the smaller one's 12-word shingles go to
# one split. On pydoc this cuts the evaluation text's shingles found verbatim in calibration
# from 27.3 % to 0.08 % (seed 0; docs/configuration.md "How the splits are made").
SHINGLE_WORDS = 12
NEAR_DUPLICATE_SHARE = 0.05
_UNUSED = ""  # the room of fractions summing to < 1


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


def shingles(text: str, words: int = SHINGLE_WORDS) -> set[int]:
    """Hashes of every run of ``words`` consecutive whitespace-separated words of ``text``."""
    tokens = text.split()
    return {hash(tuple(tokens[i : i + words])) for i in range(len(tokens) - words + 1)}


def near_duplicate_groups(
    docs: Sequence[str], share: float = NEAR_DUPLICATE_SHARE
) -> list[list[str]]:
    """Documents grouped by shared text, each group in document order (groups by first member).

    Two documents are linked when at least ``share`` of the smaller one's 12-word shingles also
    occur in the other; groups are the connected components (union-find). Each shingle is
    counted against the first document that has it, so the cost is linear in the text (no pair
    loop over documents). Why: whole-document splits still share text when documents quote or
    nest each other (pydoc's ``compound`` topic contains ``if``, ``for``, ``try``, ...).
    """
    parent = list(range(len(docs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}  # shingle → the first document that has it
    sizes: list[int] = []
    for index, doc in enumerate(docs):
        own = shingles(doc)
        sizes.append(len(own))
        shared: dict[int, int] = {}
        for key in own:
            first = owner.setdefault(key, index)
            if first != index:
                shared[first] = shared.get(first, 0) + 1
        for other, count in shared.items():
            if count >= share * min(len(own), sizes[other]):
                parent[root(index)] = root(other)
    groups: dict[int, list[str]] = {}
    for index, doc in enumerate(docs):
        groups.setdefault(root(index), []).append(doc)
    return list(groups.values())


def _draw(room: Mapping[str, float], names: Sequence[str], rng: random.Random) -> str:
    """One of ``names``, with probability proportional to its room."""
    point = rng.random() * sum(room[name] for name in names)
    for name in names:
        point -= room[name]
        if point < 0:
            return name
    return names[-1]


def _assign(
    groups: Sequence[Sequence[str]], items: list[tuple[str, float]], seed: int
) -> dict[str, list[str]]:
    """Deal the groups, largest first (ties in seeded random order), each to a split drawn with
    probability proportional to its remaining room among the splits it fits in (else to the
    one with the most room).

    Largest first, so a large group still finds a split with room for it; drawn by room, so the
    shares come out as requested (pydoc, seeds 0-9: every split within 0.1 % of the text of its
    fraction) and which split gets which text still depends on the seed. Room left by fractions
    summing to < 1 is an unused pseudo-split whose documents are dropped.
    """
    rng = random.Random(seed)
    order = list(range(len(groups)))
    rng.shuffle(order)
    sizes = [sum(map(len, group)) for group in groups]
    total = sum(sizes)
    room = {name: fraction * total for name, fraction in items}
    room[_UNUSED] = max(0.0, total - sum(room.values()))
    order.sort(key=lambda index: -sizes[index])
    out: dict[str, list[str]] = {name: [] for name, _ in items}
    for index in order:
        fits = [name for name, left in room.items() if left >= sizes[index]]
        name = _draw(room, fits, rng) if fits else max(room, key=room.__getitem__)
        room[name] -= sizes[index]
        if name != _UNUSED:
            out[name].extend(groups[index])
    return out


def split_documents(
    docs: Sequence[str],
    fractions: Mapping[str, float],
    seed: int,
    *,
    max_doc_chars: int | None = None,
) -> dict[str, list[str]]:
    """Assign whole groups of near-duplicate documents to splits, so the splits share almost no
    text (pydoc: at most 0.08 % of a split's 12-word shingles occur in another, seeds 0-9).

    Documents are de-duplicated and grouped with their near-duplicates
    (:func:`near_duplicate_groups`: documents that quote or nest each other); the groups are
    dealt to the splits, largest first, each to a split drawn with ``random.Random(seed)`` in
    proportion to the room it has left (:func:`_assign`), so a group never straddles two
    splits. Fractions must be positive and sum to at most 1; any remainder is unused. If there
    are fewer groups than splits, or they are too coarse to give every split one, long
    documents are first cut into ~2000-character pieces at paragraph/line boundaries (and
    grouped again). ``max_doc_chars`` (off by default) cuts every longer document the same way
    up front, trading strict document-level disjointness for shares closer to the requested
    ones when a few documents dominate the text (pydoc's largest topic is ~13% of it).
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

    groups = near_duplicate_groups(unique)
    out = _assign(groups, items, seed) if len(groups) >= len(items) else None
    if out is None or any(not split_docs for split_docs in out.values()):
        pieces = list(dict.fromkeys(chunk_documents(unique, CHUNK_CHARS)))
        groups = near_duplicate_groups(pieces)
        logger.info(
            "cutting %d documents into %d pieces of <= %d chars (%d groups) so every split "
            "gets text",
            len(unique),
            len(pieces),
            CHUNK_CHARS,
            len(groups),
        )
        out = _assign(groups, items, seed)
    empty = [name for name, split_docs in out.items() if not split_docs]
    if empty:
        total = sum(len(doc) for doc in unique)
        raise ValueError(
            f"text too small to split: {total} chars in {len(groups)} groups of near-duplicate "
            f"text leave split(s) {', '.join(empty)} empty; give a larger text or larger "
            "fractions"
        )
    logger.info("%d documents in %d groups of near-duplicate text",
                sum(map(len, groups)), len(groups))
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
    tokenizer: Any, cfg: DataConfig, seed: int, names: Sequence[str] | None = None
) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
    """Every split's documents and the token windows of ``names`` (default: the splits
    ``cfg.fractions`` gives a share), as ``cfg`` describes them.

    The one recipe for a run's tokens, so the job, its export and the benchmarks all see exactly
    the same windows for the same config and seed.
    """
    splits = split_documents(load_documents(cfg.source), cfg.fractions, seed)
    windows = {
        name: token_windows(tokenizer, splits[name], getattr(cfg, f"{name}_samples"),
                            cfg.seq_len, seed=seed, split_name=name)
        for name in (splits if names is None else names)
    }
    return splits, windows


def text_hash(docs: Sequence[str]) -> str:
    """Short sha256 of the joined documents, recorded with results for provenance."""
    return hashlib.sha256(DOC_SEPARATOR.join(docs).encode("utf-8")).hexdigest()[:16]
