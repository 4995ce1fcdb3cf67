"""Model surgery, all in one place: fold, fuse, and attach the online rotation.

For a site (previous layer P feeding linear L through elementwise ops only):

* P's output rows are divided by s (so L's input becomes X·diag(s)⁻¹),
* L's weight becomes W·diag(s)·H (fused offline, in float64, cast back),
* H is applied to L's input online by a forward pre-hook, followed by activation fake
  quantization when a scheme is given.

The float function of the model is unchanged (docs/equivalence.md); only quantization error moves.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from smoothrot.config import QuantScheme
from smoothrot.fake_quant import quantize_activation, quantize_weight
from smoothrot.hadamard import hadamard_transform
from smoothrot.losses import transform_weight
from smoothrot.mappings import ResolvedSite


@dataclass(frozen=True)
class SitePlan:
    """How to transform one site: smoothing scales (None = no smoothing) and rotation."""

    scales: torch.Tensor | None
    rotate: bool


class OnlineInputTransform:
    """Forward pre-hook: x ↦ Q_a(x·H) (each part optional)."""

    def __init__(self, rotate: bool, act_bits: int | None = None, act_clip: float = 1.0) -> None:
        self.rotate = rotate
        self.act_bits = act_bits
        self.act_clip = act_clip

    def __call__(self, _module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if self.rotate:
            x = hadamard_transform(x)
        if self.act_bits is not None:
            x = quantize_activation(x, self.act_bits, self.act_clip)
        return (x, *args[1:])


@torch.no_grad()
def fuse_site(rs: ResolvedSite, scales: torch.Tensor | None, rotate: bool) -> None:
    """Fold diag(s)⁻¹ into the previous layer's output rows and store W·diag(s)·H in place."""
    if scales is not None:
        if scales.shape != (rs.linear.in_features,):
            raise ValueError(
                f"{rs.name}: scales have shape {tuple(scales.shape)}, expected "
                f"({rs.linear.in_features},); were they fitted on another model?"
            )
        if not torch.isfinite(scales).all() or (scales <= 0).any():
            raise ValueError(f"{rs.name}: scales must be positive and finite")
        prev = rs.smooth_from
        inv = (1.0 / scales.double()).unsqueeze(1)
        prev.weight.copy_((prev.weight.double() * inv).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.copy_((prev.bias.double() * inv.squeeze(1)).to(prev.bias.dtype))
    w = transform_weight(rs.linear.weight.double(), None if scales is None else scales.double(), rotate)
    rs.linear.weight.copy_(w.to(rs.linear.weight.dtype))


def apply_plans(
    sites: Sequence[ResolvedSite],
    plans: Mapping[str, SitePlan],
    scheme: QuantScheme | None = None,
) -> list[torch.utils.hooks.RemovableHandle]:
    """Transform every site with a plan; with ``scheme``, fake-quantize weights and inputs too.

    Returns the hook handles (online rotation / activation quantization).
    """
    handles = []
    for rs in sites:
        plan = plans.get(rs.name)
        if plan is None:
            continue
        fuse_site(rs, plan.scales, plan.rotate)
        act_bits = None
        if scheme is not None:
            with torch.no_grad():
                rs.linear.weight.copy_(quantize_weight(rs.linear.weight, scheme.w_bits, scheme.w_clip))
            act_bits = scheme.a_bits
        if plan.rotate or act_bits is not None:
            hook = OnlineInputTransform(plan.rotate, act_bits, scheme.a_clip if scheme else 1.0)
            handles.append(rs.linear.register_forward_pre_hook(hook))
    return handles


@contextmanager
def transformed(
    sites: Sequence[ResolvedSite],
    plans: Mapping[str, SitePlan],
    scheme: QuantScheme | None = None,
) -> Iterator[None]:
    """Temporarily apply :func:`apply_plans`; weights and hooks are restored on exit."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    for rs in sites:
        if rs.name in plans:
            for module in (rs.linear, rs.smooth_from):
                for p in (module.weight, module.bias):
                    if p is not None:
                        saved.append((p, p.detach().clone()))
    handles: list = []
    try:
        handles = apply_plans(sites, plans, scheme)
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for p, original in saved:
                p.copy_(original)
