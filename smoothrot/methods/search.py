"""(α, q) grid search on the selection split, per site and across sites.

Every candidate (α, q) of a site is scored by the same fake-quant output loss used everywhere
(losses.py) on selection tokens; the choices below only read that table:

* SmoothRot-max: q = 1 (max statistic), one α for all sites (the baseline);
* α per site at q = 1 (``alpha_only``): the ablation that isolates the quantile's share;
* quantile: that α kept, each site its own q (the paper's quantile-only search);
* joint (global): one (α, q) for all sites;
* joint (per site): each site its own (α, q).

With a window (``search.alpha_window``, :func:`windowed_grid`) the q < 1 candidates are scored
only near SmoothRot-max's α; the rest of the table is +inf, which no pick can choose.

Once a site's scales are fixed, :func:`select_act_clip` picks its activation clip ratio from
``search.act_clips`` by the same loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from smoothrot.core.policies import smoothing_scales
from smoothrot.core.quantizers import quantize_weight_spec
from smoothrot.core.transform import FULL, SiteTransform, transform_input, transform_weight
from smoothrot.losses import output_loss, quantized_output, quantized_product
from smoothrot.schema.quant import QuantScheme, with_act_clip


@dataclass(frozen=True)
class Choice:
    """A selected policy point for one site."""

    alpha: float
    q: float


# Elements of the largest per-chunk tensor [candidates, tokens, n] in the batched search. On CPU
# large batches lose more to cache misses than they save in per-op overhead (measured on a
# down_proj-sized site, 2048 tokens × 1536 channels, 40 candidates: 2.6 s with one candidate per
# chunk, 3.7 s with 16), so CPU batches stay small; GPUs get wide batches (256 MB float32).
_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


@torch.no_grad()
def candidate_losses(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    schemes: Sequence[QuantScheme],
    transform: SiteTransform = FULL,
) -> torch.Tensor:
    """Selection losses [S, C] of C candidate scale vectors ``scales`` [C, n_scales] under each
    of S schemes, batched.

    Each (scheme, candidate) gets exactly the arithmetic of
    :func:`~smoothrot.losses.quantized_output` (per-row quantizers; NVFP4 global scales per
    candidate); the transformed input and weight of a candidate are computed once for all
    schemes.
    """
    s = scales.float()[:, None, :]
    x_t = transform_input(x, s, transform)
    w_t = transform_weight(weight, s, transform)
    # Each product is a fresh tensor: its error is formed in place ((ŷ − y)² = (y − ŷ)² exactly).
    return torch.stack([quantized_product(x_t, w_t, scheme, batch_dims=1).sub_(y).square_()
                        .sum(dim=-1).mean(dim=-1) for scheme in schemes])


def candidate_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    scheme: QuantScheme,
    transform: SiteTransform = FULL,
) -> float:
    """Selection loss of one candidate scale vector (with the site's rotation, default H)."""
    return float(candidate_losses(x, y, weight, scales[None], [scheme], transform)[0, 0])


@torch.no_grad()
def grid_losses(
    x_sel: torch.Tensor,
    weight: torch.Tensor,
    act_stats: Mapping[float, torch.Tensor],
    weight_stat: torch.Tensor,
    alphas: Sequence[float],
    quantiles: Sequence[float],
    schemes: Sequence[QuantScheme],
    site: str,
    transform: SiteTransform = FULL,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Selection loss for every scheme and (α, q): [len(schemes), len(alphas), len(quantiles)]
    (float64); ``y``: X·Wᵀ of the selection tokens, where the caller scores the site twice.

    All candidates of the site are scored in batched tensor ops, in chunks whose size is bounded
    per device type by ``_CHUNK_ELEMENTS``; every scheme scores the same transformed candidates
    (the rotation is the larger part of a candidate's cost). ``transform``: the site's input
    transform (tied GQA scales, per-head H).
    """
    w = weight.float()
    x = x_sel.float()
    y = x @ w.T if y is None else y
    scales = torch.stack([smoothing_scales(act_stats[q], weight_stat, alpha, site=site).float()
                          for alpha in alphas for q in quantiles])
    budget = _CHUNK_ELEMENTS.get(x.device.type, _CHUNK_ELEMENTS["cpu"])
    chunk = max(1, budget // max(1, x.numel() + w.numel()))
    losses = [candidate_losses(x, y, w, part, schemes, transform) for part in scales.split(chunk)]
    return torch.cat(losses, dim=1).double().reshape(len(schemes), len(alphas), len(quantiles))


# Scores the grid (α's × q's) of every site: {site: losses [schemes, α's, q's]}.
GridScorer = Callable[[Sequence[float], Sequence[float]], dict[str, torch.Tensor]]


def windowed_grid(score: GridScorer, alphas: Sequence[float], quantiles: Sequence[float],
                  window: float | None) -> dict[str, torch.Tensor]:
    """Every site's selection-loss table [schemes, len(alphas), len(quantiles)], coarse to fine.

    Without a ``window`` the whole grid is scored. With one, first the q = 1 column (every α:
    what SmoothRot-max and α-per-site pick from), then q < 1 only at the α's within ``window``
    of each scheme's SmoothRot-max α; unscored entries are +inf. ``quantiles`` holds 1.0 (as
    :class:`~smoothrot.schema.config.SearchConfig` ensures). Each entry is scored as in the whole
    grid (bit for bit in the CPU's one-candidate chunks), so a pick inside the window is the
    whole grid's pick.
    """
    if window is None:
        return score(alphas, quantiles)
    alphas, quantiles = list(alphas), list(quantiles)
    at_max = score(alphas, [1.0])  # site -> [schemes, α's, 1]
    mean = torch.stack(list(at_max.values())).mean(dim=0)[..., 0]  # [schemes, α's]
    centers = [alphas[int(i)] for i in mean.argmin(dim=1)]
    near = [a for a in alphas if any(abs(a - c) <= window + 1e-9 for c in centers)]
    lower = [q for q in quantiles if q < 1.0]
    fine = score(near, lower) if lower else {}
    rows = torch.tensor([alphas.index(a) for a in near])[:, None]
    cols = torch.tensor([quantiles.index(q) for q in lower])
    tables = {}
    for site, column in at_max.items():
        table = column.new_full((column.shape[0], len(alphas), len(quantiles)), math.inf)
        table[:, :, quantiles.index(1.0)] = column[..., 0]
        if lower:
            table[:, rows, cols] = fine[site]
        tables[site] = table
    return tables


@torch.no_grad()
def select_act_clip(
    x_sel: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    clips: Sequence[float],
    scheme: QuantScheme,
    transform: SiteTransform = FULL,
    weight_q: torch.Tensor | None = None,
) -> tuple[float, float]:
    """The activation clip ratio of ``clips`` with the lowest selection loss, and that loss.

    Per-token 4-bit grids are set by each token's largest entry, so the bulk of the entries get
    a few levels only; clipping the largest ones (scale ``clip·max|x|``) trades their error for
    a finer grid. The weight (``weight_q``, or the scheme's RTN of the fused weight) is fixed.
    Ties go to the first candidate.
    """
    w = weight.float()
    x = x_sel.float()
    s = None if scales is None else scales.float()
    w_q = (quantize_weight_spec(transform_weight(w, s, transform), scheme) if weight_q is None
           else weight_q.float())
    y = x @ w.T
    losses = [float(output_loss(y, quantized_output(x, w, s, transform, with_act_clip(scheme, c),
                                                    weight_q=w_q)))
              for c in clips]
    best = min(range(len(clips)), key=losses.__getitem__)
    return float(clips[best]), losses[best]
