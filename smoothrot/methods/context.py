"""What every method sees: one scheme's calibrated sites and the results of earlier methods."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from smoothrot.arch.sites import ResolvedSite
from smoothrot.core.transform import SiteTransform
from smoothrot.evaluate import Reference
from smoothrot.methods.search import select_act_clip
from smoothrot.progress import progress
from smoothrot.schema.config import FitConfig
from smoothrot.schema.quant import QuantScheme
from smoothrot.schema.rotation import Rotation
from smoothrot.surgery.plan import SitePlan
from smoothrot.timer import Timer

if TYPE_CHECKING:
    from smoothrot.methods.registry import MethodResult


@dataclass
class SiteData:
    """Calibration statistics and token sets of one site (CPU, float32)."""

    act_stats: dict[float, torch.Tensor]
    weight_stat: torch.Tensor
    train_x: torch.Tensor
    selection_x: torch.Tensor
    heldout_x: torch.Tensor
    # X·Wᵀ of heldout_x: computed once in calibration (it also checks the outputs are finite),
    # the reference of every method's held-out error under every scheme.
    heldout_ref: Reference


@dataclass
class SchemeContext:
    """One scheme's fitting problem: the model, its sites, their data and what is done so far.

    ``weights``: each site's float weight (CPU float32); ``results``: finished methods by name;
    shared work is computed once via :meth:`shared`: per scheme, or with ``across=True`` once
    for all the run's ``schemes`` (the (α, q) grid every policy method picks from: each
    candidate's rotation is the same under every scheme).
    """

    scheme: QuantScheme
    model: nn.Module
    sites: list[ResolvedSite]
    data: dict[str, SiteData]
    windows: dict[str, torch.Tensor]
    cfg: FitConfig
    timer: Timer
    resume: bool = False
    # Every scheme of the run, and the store the run's contexts share (one dict for all).
    schemes: tuple[QuantScheme, ...] = ()
    across: dict[str, Any] = field(default_factory=dict, repr=False)
    results: dict[str, MethodResult] = field(default_factory=dict)
    _shared: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # One CPU float32 copy of the site weights for every scheme of the run.
        self.weights = self.shared(
            "site weights", lambda: {rs.name: rs.weight.detach().cpu().float()
                                     for rs in self.sites}, across=True)
        if self.scheme not in self.schemes:
            self.schemes = (*self.schemes, self.scheme)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage of this scheme (``<scheme>: <name>`` in the report's timings)."""
        with self.timer.stage(f"{self.scheme.name}: {name}"):
            yield

    def shared(self, key: str, compute: Callable[[], Any], across: bool = False) -> Any:
        """``compute()`` once per scheme (``across``: once per run), then its cached value."""
        store = self.across if across else self._shared
        if key not in store:
            store[key] = compute()
        return store[key]

    @staticmethod
    def transform(rs: ResolvedSite, plan: SitePlan) -> SiteTransform:
        """The site's transform under ``plan`` (its rotation, the site's scale tying)."""
        return rs.transform.with_rotation(plan.rotation)

    def plans(self, scales: dict[str, torch.Tensor | None], rotate: bool = True,
              desc: str = "") -> dict[str, SitePlan]:
        """Plans for these scales (each site's own rotation, or none), with each site's
        activation clip ratio chosen on the selection split (``search.act_clips``; a one-entry
        grid is that clip everywhere, with no search)."""
        plans = {rs.name: SitePlan(scales[rs.name], rs.rotation if rotate else Rotation.none())
                 for rs in self.sites}
        grid = self.cfg.search.act_clips
        if len(grid) == 1:
            return {s: replace(p, act_clip=float(grid[0])) for s, p in plans.items()}
        with self.stage("activation clips"):
            return {
                rs.name: replace(plans[rs.name], act_clip=select_act_clip(
                    self.data[rs.name].selection_x, self.weights[rs.name], plans[rs.name].scales,
                    grid, self.scheme, self.transform(rs, plans[rs.name]))[0])
                for rs in progress(self.sites, desc=f"{self.scheme.name} {desc} clips")
            }

