"""Where smoothing scales are chosen: s_j = a_j^α / w_j^(1−α).

``a_j`` is a statistic of |X_:j| (max for the SmoothRot baseline, a q-quantile for the robust
policy) and ``w_j = max_i |W_ij|``. Both enter as absolute values (the reference SmoothRot code
takes a *signed* max of the weight, which breaks on negative columns), both are floored away from
zero, and the result is checked to be finite and positive so the transform stays invertible.
"""

from __future__ import annotations

import torch

MIN_STAT = 1e-5


class NonFiniteStatisticError(ValueError):
    """A channel statistic is NaN or inf; the message names the site and channel."""


def check_finite(values: torch.Tensor, what: str, site: str) -> None:
    """Raise a one-line error naming ``site`` and the first non-finite channel of ``values``."""
    bad = ~torch.isfinite(values)
    if bad.any():
        channel = int(bad.nonzero()[0, 0])
        raise NonFiniteStatisticError(
            f"{site}: {what} is {values[channel].item()} at channel {channel} "
            f"({int(bad.sum())} non-finite channels); check the model weights / inputs for "
            "inf or NaN"
        )


def smoothing_scales(
    act_stat: torch.Tensor,
    weight_stat: torch.Tensor,
    alpha: float,
    *,
    site: str = "layer",
    floor: float = MIN_STAT,
) -> torch.Tensor:
    """Per-channel scales s = a^α / w^(1−α), computed in float64 and returned as float64.

    Zero or constant-zero channels are floored at ``floor`` instead of producing 0 or inf.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    if act_stat.shape != weight_stat.shape:
        raise ValueError(
            f"{site}: activation statistic has {act_stat.shape[-1]} channels but the weight has "
            f"{weight_stat.shape[-1]} input channels"
        )
    check_finite(act_stat, "activation statistic", site)
    check_finite(weight_stat, "weight statistic", site)
    a = act_stat.double().abs().clamp_min(floor)
    w = weight_stat.double().abs().clamp_min(floor)
    s = torch.exp(alpha * a.log() - (1.0 - alpha) * w.log())
    check_finite(s, "smoothing scale", site)
    return s
