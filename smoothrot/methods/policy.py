"""The policy methods: SmoothRot's s = a^α / w^(1−α) with (α, q) picked on the selection split.

All five read one grid of selection losses per site and scheme (every α × activation quantile
q, computed once per run) and differ only in how they pick from it:

===================  ====================================================================
``smoothrot_max``    the baseline: q = 1 (max |X|), one α for all sites (lowest mean loss)
``alpha_only``       q = 1, α per site (the ablation: ``joint`` without the quantile)
``quantile``         the baseline's α, q per site
``joint_global``     one (α, q) for all sites
``joint``            (α, q) per site
===================  ====================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from smoothrot.core.policies import smoothing_scales
from smoothrot.methods.context import SchemeContext
from smoothrot.methods.registry import Method, MethodResult
from smoothrot.methods.search import Choice, grid_losses, windowed_grid
from smoothrot.progress import progress

# site → selection loss [len(alphas), len(quantiles)]; +inf where a window left it unscored
Tables = Mapping[str, torch.Tensor]
Picker = Callable[[Tables, Sequence[float], Sequence[float]], dict[str, Choice]]


def _max_alpha(tables: Tables, quantiles: Sequence[float]) -> int:
    """Index of the α with the lowest mean loss over sites at q = 1."""
    mean = torch.stack(list(tables.values())).mean(dim=0)
    return int(mean[:, list(quantiles).index(1.0)].argmin())


def pick_max(tables: Tables, alphas: Sequence[float], quantiles: Sequence[float]
             ) -> dict[str, Choice]:
    a = alphas[_max_alpha(tables, quantiles)]
    return {s: Choice(a, 1.0) for s in tables}


def pick_alpha_only(tables: Tables, alphas: Sequence[float], quantiles: Sequence[float]
                    ) -> dict[str, Choice]:
    """α per site on the q = 1 column: what per-site α alone gains, so ``joint``'s gain over
    it is the quantile's share."""
    j = list(quantiles).index(1.0)
    return {s: Choice(alphas[int(t[:, j].argmin())], 1.0) for s, t in tables.items()}


def pick_quantile(tables: Tables, alphas: Sequence[float], quantiles: Sequence[float]
                  ) -> dict[str, Choice]:
    i = _max_alpha(tables, quantiles)
    return {s: Choice(alphas[i], quantiles[int(t[i].argmin())]) for s, t in tables.items()}


def pick_joint_global(tables: Tables, alphas: Sequence[float], quantiles: Sequence[float]
                      ) -> dict[str, Choice]:
    mean = torch.stack(list(tables.values())).mean(dim=0)
    i, j = divmod(int(mean.flatten().argmin()), len(quantiles))
    return {s: Choice(alphas[i], quantiles[j]) for s in tables}


def pick_joint(tables: Tables, alphas: Sequence[float], quantiles: Sequence[float]
               ) -> dict[str, Choice]:
    out = {}
    for s, t in tables.items():
        i, j = divmod(int(t.flatten().argmin()), len(quantiles))
        out[s] = Choice(alphas[i], quantiles[j])
    return out


def policy_grid(ctx: SchemeContext) -> dict[str, torch.Tensor]:
    """Every site's selection-loss table under ``ctx.scheme``, computed once per run for all
    its schemes (they score the same rotated candidates)."""
    targets: dict[str, torch.Tensor] = {}  # X·Wᵀ of each site's selection tokens, for the search

    def score(alphas: Sequence[float], quantiles: Sequence[float]) -> dict[str, torch.Tensor]:
        tables = {}
        for rs in progress(ctx.sites, desc=f"grid search ({len(alphas)}×{len(quantiles)})"):
            x, w = ctx.data[rs.name].selection_x, ctx.weights[rs.name]
            if rs.name not in targets:
                targets[rs.name] = x.float() @ w.T
            tables[rs.name] = grid_losses(x, w, ctx.data[rs.name].act_stats,
                                          ctx.data[rs.name].weight_stat, alphas, quantiles,
                                          ctx.schemes, rs.name, rs.transform, targets[rs.name])
        return tables

    def compute() -> dict[str, dict[str, torch.Tensor]]:
        search = ctx.cfg.search
        with ctx.timer.stage("search (all schemes)"):
            tables = windowed_grid(score, search.alphas, search.quantiles, search.alpha_window)
        return {scheme.name: {site: t[i] for site, t in tables.items()}
                for i, scheme in enumerate(ctx.schemes)}
    return ctx.shared("policy grid", compute, across=True)[ctx.scheme.name]


class PolicyMethod(Method):
    """A policy method: scales from the (α, q) its picker chooses on the grid."""

    def __init__(self, name: str, label: str, pick: Picker) -> None:
        self.name, self.label, self.pick = name, label, pick

    def fit(self, ctx: SchemeContext) -> MethodResult:
        alphas, quantiles = ctx.cfg.search.alphas, ctx.cfg.search.quantiles
        tables = policy_grid(ctx)
        choices = self.pick(tables, alphas, quantiles)
        scales = {s: smoothing_scales(ctx.data[s].act_stats[c.q], ctx.data[s].weight_stat,
                                      c.alpha, site=s) for s, c in choices.items()}
        loss = {s: float(tables[s][alphas.index(c.alpha), quantiles.index(c.q)])
                for s, c in choices.items()}
        return MethodResult(ctx.plans(scales, desc=self.name), choices, loss)


SMOOTHROT_MAX = PolicyMethod("smoothrot_max", "SmoothRot-max", pick_max)
ALPHA_ONLY = PolicyMethod("alpha_only", "α per layer (q = 1)", pick_alpha_only)
QUANTILE = PolicyMethod("quantile", "quantile", pick_quantile)
JOINT_GLOBAL = PolicyMethod("joint_global", "joint (global)", pick_joint_global)
JOINT = PolicyMethod("joint", "joint (per layer)", pick_joint)
