"""Capture the inputs of smoothing sites with forward pre-hooks.

One pass over a split feeds streaming observers (max and exact top-k quantiles of |X|) and keeps a
fixed, seeded subset of token rows per site on the CPU, so memory is bounded by the token budget,
not by the amount of calibration text. Hooks are owned by a context manager and always removed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch
from torch import nn

from smoothrot.arch.sites import ResolvedSite
from smoothrot.core.stats import AbsMaxObserver, AbsQuantileObserver
from smoothrot.progress import progress

log = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised by the last site's hook: nothing after it is needed for calibration."""


@dataclass
class SiteRecord:
    """What one pass recorded for one site.

    Kept rows go straight into one buffer sized for the pass (``capacity`` rows, allocated at
    the first batch): each row is copied once, where a list of batches joined at the end
    copied every row twice.
    """

    absmax: AbsMaxObserver | None = None
    quantiles: AbsQuantileObserver | None = None
    capacity: int = 0
    buffer: torch.Tensor | None = None
    filled: int = 0

    def keep(self, x: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Append ``x[index]`` (all of ``x`` without ``index``), ``x`` [rows, n] float32 CPU."""
        count = x.shape[0] if index is None else index.numel()
        if self.filled + count > self.capacity:
            raise ValueError(f"{self.filled + count} rows reached a site that keeps at most "
                             f"{self.capacity}: total_tokens must count every token of the pass")
        if self.buffer is None:
            self.buffer = torch.empty(self.capacity, x.shape[1], dtype=x.dtype)
        out = self.buffer[self.filled : self.filled + count]
        if index is None:
            out.copy_(x)
        else:
            torch.index_select(x, 0, index, out=out)
        self.filled += count

    def max_abs(self) -> torch.Tensor:
        """Per-channel max |x| of the pass, float32 CPU: the quantile buffer's top where
        quantiles were recorded (the same value; a max observer beside it cost ~0.6 s a
        default run), else the max observer's."""
        if self.quantiles is not None:
            return self.quantiles.value(1.0)
        if self.absmax is None:
            raise ValueError("this capture recorded no statistics (quantiles=None)")
        return self.absmax.value()

    def tokens(self) -> torch.Tensor:
        """The kept input rows, [tokens, in_features] float32 on CPU."""
        return torch.empty(0) if self.buffer is None else self.buffer[: self.filled]

    def replace_rows(self, rows: torch.Tensor) -> None:
        """Make ``rows`` the kept rows (e.g. every rank's, merged)."""
        self.buffer, self.filled, self.capacity = rows, rows.shape[0], rows.shape[0]


def token_subset(total: int, keep: int | None, seed: int) -> torch.Tensor | None:
    """Sorted, seeded indices of ``keep`` token rows out of ``total`` (None keeps all)."""
    if keep is None or keep >= total:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=gen)[:keep].sort().values


@contextmanager
def capture_sites(
    sites: Sequence[ResolvedSite],
    *,
    total_tokens: int,
    keep_index: torch.Tensor | None = None,
    keep_rows: bool = True,
    quantiles: Sequence[float] | None = None,
    stop_forward: bool = True,
) -> Iterator[dict[str, SiteRecord]]:
    """Attach pre-hooks recording each site's input; yields ``{site name: SiteRecord}``.

    Rows are counted in the order tokens reach the hook (batch-major, then position), so
    ``keep_index`` selects the same tokens at every site. A group of linears sharing one input
    (q/k/v) is captured once, at its first linear. With ``stop_forward`` the forward pass stops
    once every site has seen the batch, whatever order the sites run in; sequential calibration
    turns it off because it needs the layer's output. ``total_tokens`` counts the stream's
    tokens: it sizes the quantile buffers and, without ``keep_index``, the kept-row buffer (a
    data-parallel rank sees a share of them; the buffer's pages past it are never touched).
    """
    records: dict[str, SiteRecord] = {}
    handles = []
    seen: set[str] = set()
    for rs in sites:
        n = rs.in_features
        rec = SiteRecord(capacity=total_tokens if keep_index is None else keep_index.numel())
        observer: AbsQuantileObserver | AbsMaxObserver | None = None
        if quantiles:  # the max is the quantile buffer's top: no second observer
            observer = rec.quantiles = AbsQuantileObserver(n, quantiles, total_tokens)
        elif quantiles is not None:  # () records the max only
            observer = rec.absmax = AbsMaxObserver(n)
        records[rs.name] = rec
        offset = [0]

        def hook(_mod: nn.Module, args: tuple, rec: SiteRecord = rec, name: str = rs.name,
                 offset: list[int] = offset,
                 observer: AbsQuantileObserver | AbsMaxObserver | None = observer) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()
            start = offset[0]
            offset[0] += x.shape[0]
            if observer is not None:
                try:
                    observer.update(x)
                except ValueError as exc:  # non-finite inputs: name the site and the way out
                    raise ValueError(
                        f"{name}: {exc}; the model computes inf/NaN before this layer: check "
                        "its weights, or load it in float32 (model.dtype)"
                    ) from None
            if keep_rows:
                if keep_index is None:
                    rec.keep(x)
                else:
                    lo, hi = torch.searchsorted(keep_index, torch.tensor([start, offset[0]]))
                    if hi > lo:
                        rec.keep(x, keep_index[lo:hi] - start)
            seen.add(name)
            if stop_forward and len(seen) == len(records):
                seen.clear()
                raise StopForward

        handles.append(rs.linear.register_forward_pre_hook(hook))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class CaptureSpec:
    """What to record on one split: its token windows, which rows to keep, which statistics.

    ``quantiles`` (None: no statistics) are the exact quantiles of |X| observed besides the max;
    ``keep_index`` (from :func:`token_subset`, None: all rows) selects the rows kept for training.
    """

    windows: torch.Tensor
    keep_index: torch.Tensor | None = None
    quantiles: tuple[float, ...] | None = None
    # Tokens of the whole stream when ``windows`` is one process's share (distributed.py): the
    # quantile buffers are sized for it so the merged statistics stay exact.
    stream_tokens: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.windows.numel() if self.stream_tokens is None else self.stream_tokens


def capture_splits(
    model: nn.Module,
    sites: Sequence[ResolvedSite],
    specs: dict[str, CaptureSpec],
    batch_size: int,
) -> dict[str, dict[str, SiteRecord]]:
    """Record every split with the whole model resident: ``{split: {site: SiteRecord}}``."""
    records = {}
    for split, spec in specs.items():
        with capture_sites(sites, total_tokens=spec.total_tokens, keep_index=spec.keep_index,
                           quantiles=spec.quantiles) as records[split]:
            run_model(model, spec.windows, batch_size, split)
    return records


@torch.no_grad()
def run_model(model: nn.Module, windows: torch.Tensor, batch_size: int, desc: str) -> None:
    """Forward ``windows`` [samples, seq_len] through the model batch by batch (outputs dropped)."""
    device = next(model.parameters()).device
    for start in progress(range(0, windows.shape[0], batch_size), desc=desc):
        batch = windows[start : start + batch_size].to(device)
        with suppress(StopForward):
            model(input_ids=batch, use_cache=False)


def batch_size(seq_len: int) -> int:
    """Windows per forward pass: about 2048 tokens."""
    return max(1, 2048 // seq_len)


def fit_specs(windows: dict[str, torch.Tensor], train_tokens: int, seed: int,
              quantiles: Sequence[float] | None = None) -> dict[str, CaptureSpec]:
    """A fit's three captures: calibration (``train_tokens`` seeded training rows, and the
    statistics when ``quantiles`` are given), selection and held-out (all rows)."""
    calib = windows["calibration"]
    keep = token_subset(calib.numel(), train_tokens, seed)
    return {
        "calibration": CaptureSpec(calib, keep, None if quantiles is None else tuple(quantiles)),
        "selection": CaptureSpec(windows["selection"]),
        "heldout": CaptureSpec(windows["heldout"]),
    }
