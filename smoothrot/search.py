"""(α, q) grid search on the selection split, per site and across sites.

Every candidate (α, q) of a site is scored by the same fake-quant output loss used everywhere
(losses.py) on selection tokens; the choices below only read that table:

* SmoothRot-max: q = 1 (max statistic), one α for all sites (the baseline);
* quantile: that α kept, each site its own q (the paper's quantile-only search);
* joint (global): one (α, q) for all sites;
* joint (per site): each site its own (α, q).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from smoothrot.config import QuantScheme
from smoothrot.fake_quant import quantize_weight_spec
from smoothrot.losses import TransformArg, output_loss, quantized_output, transform_weight
from smoothrot.policies import smoothing_scales


@dataclass(frozen=True)
class Choice:
    """A selected policy point for one site."""

    alpha: float
    q: float


@torch.no_grad()
def candidate_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    scheme: QuantScheme,
    rotate: TransformArg = True,
) -> float:
    """Selection loss of one candidate scale vector (with the site's rotation, default H)."""
    s = scales.float()
    w_q = quantize_weight_spec(transform_weight(weight, s, rotate), scheme)
    return float(output_loss(y, quantized_output(x, weight, s, rotate, scheme, weight_q=w_q)))


@torch.no_grad()
def grid_losses(
    x_sel: torch.Tensor,
    weight: torch.Tensor,
    act_stats: Mapping[float, torch.Tensor],
    weight_stat: torch.Tensor,
    alphas: Sequence[float],
    quantiles: Sequence[float],
    scheme: QuantScheme,
    site: str,
    rotate: TransformArg = True,
) -> torch.Tensor:
    """Selection loss for every (α, q): tensor [len(alphas), len(quantiles)] (float64).

    ``rotate``: the site's input transform (tied GQA scales, per-head H); default full H.
    """
    w = weight.float()
    x = x_sel.float()
    y = x @ w.T
    table = torch.empty(len(alphas), len(quantiles), dtype=torch.float64)
    for i, alpha in enumerate(alphas):
        for j, q in enumerate(quantiles):
            s = smoothing_scales(act_stats[q], weight_stat, alpha, site=site)
            table[i, j] = candidate_loss(x, y, w, s, scheme, rotate)
    return table


def select_policies(
    tables: Mapping[str, torch.Tensor], alphas: Sequence[float], quantiles: Sequence[float]
) -> dict[str, dict[str, Choice]]:
    """Turn per-site loss tables into the four policy choices {method: {site: Choice}}."""
    sites = list(tables)
    stacked = torch.stack([tables[s] for s in sites])  # [sites, α, q]
    mean = stacked.mean(dim=0)
    q_max = list(quantiles).index(1.0)
    a_star = int(mean[:, q_max].argmin())
    flat = int(mean.flatten().argmin())
    ja, jq = divmod(flat, len(quantiles))

    def same(alpha_i: int, q_j: int) -> dict[str, Choice]:
        return {s: Choice(alphas[alpha_i], quantiles[q_j]) for s in sites}

    per_site = {}
    for s in sites:
        a_i, q_j = divmod(int(tables[s].flatten().argmin()), len(quantiles))
        per_site[s] = Choice(alphas[a_i], quantiles[q_j])
    return {
        "smoothrot_max": same(a_star, q_max),
        "quantile": {s: Choice(alphas[a_star], quantiles[int(tables[s][a_star].argmin())])
                     for s in sites},
        "joint_global": same(ja, jq),
        "joint": per_site,
    }
