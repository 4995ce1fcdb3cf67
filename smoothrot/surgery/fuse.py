"""Model surgery, all in one place: fold, fuse, and attach the online rotation.

For a site (a source S feeding a group of linears L₁…L_k through elementwise ops only):

* S's output channels are divided by s, so the group's input becomes X·diag(s)⁻¹: rows of a
  linear (and its bias), a row range of a fused linear, an RMSNorm's γ (γ/s; signed γ is fine
  since s > 0, nothing divides by γ) or an offset norm's 1+γ (γ' = (1+γ)/s − 1);
* every Lᵢ's weight becomes Wᵢ·diag(s)·H (fused offline, in float64, cast back);
* H is applied to the group's input online by a forward pre-hook on each Lᵢ (full Hadamard, or
  block-diagonal over heads for o_proj), followed by activation fake quantization when a scheme
  is given. ``head_offline`` sites fold the per-head H into v_proj's rows instead (exact:
  attention mixes tokens, never a head's channels), so only the quantizer runs online.

Tied scales (GQA o_proj) have one entry per v_proj row; the o_proj columns use them expanded.
The float function of the model is unchanged (docs/equivalence.md); only quantization error moves.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from smoothrot.arch.tables import ResolvedSite
from smoothrot.core.quantizers import (
    quantize_activation,
    quantize_activation_spec,
    quantize_weight_spec,
)
from smoothrot.losses import TransformArg, as_transform, transform_weight
from smoothrot.schema.config import QuantScheme, with_act_clip


@dataclass(frozen=True)
class SitePlan:
    """How to transform one site: smoothing scales (None = no smoothing) and rotation.

    ``rotate`` switches the site's own rotation (from its table entry) on or off.
    ``weight_q``, if given, is the fused weight W·diag(s)·H already quantized offline (e.g. by
    GPTQ); it is stored instead of the scheme's round-to-nearest of the fused weight. For a group
    it is the concatenation of the linears' weights along the output dim (``rs.weight``).
    ``act_clip``, if given, replaces the scheme's activation clip ratio ``a_clip`` at this site's
    inputs (chosen per site on the selection split, ``search.act_clips``).
    """

    scales: torch.Tensor | None
    rotate: bool
    weight_q: torch.Tensor | None = None
    act_clip: float | None = None


class OnlineInputTransform:
    """Forward pre-hook: x ↦ Q_a(x·H) (each part optional).

    ``rotate`` is True (H over all channels), False, or an input transform (per-head H).
    Q_a is the ``scheme``'s activation quantizer when one is given (any format / group size),
    else symmetric per-token integer RTN with ``act_bits``.
    """

    def __init__(
        self,
        rotate: TransformArg,
        act_bits: int | None = None,
        act_clip: float = 1.0,
        scheme: QuantScheme | None = None,
    ) -> None:
        self.rotate = as_transform(rotate).rotate
        self.act_bits = act_bits
        self.act_clip = act_clip
        self.scheme = scheme

    def __call__(self, _module: nn.Module, args: tuple) -> tuple:
        x = self.rotate(args[0])
        if self.scheme is not None:
            x = quantize_activation_spec(x, self.scheme)
        elif self.act_bits is not None:
            x = quantize_activation(x, self.act_bits, self.act_clip)
        return (x, *args[1:])


def _check_scales(rs: ResolvedSite, scales: torch.Tensor) -> None:
    if scales.shape != (rs.n_scales,):
        raise ValueError(
            f"{rs.name}: scales have shape {tuple(scales.shape)}, expected ({rs.n_scales},); "
            "were they fitted on another model?"
        )
    if not torch.isfinite(scales).all() or (scales <= 0).any():
        raise ValueError(f"{rs.name}: scales must be positive and finite")


@torch.no_grad()
def fold_into_source(rs: ResolvedSite, scales: torch.Tensor | None, head_rotation: bool) -> None:
    """Divide the source's output channels by s (and rotate v_proj rows per head if asked)."""
    source = rs.smooth_from
    kind = rs.smooth_from_kind
    if kind in ("norm", "offset_norm"):
        if scales is None:
            return
        g = source.weight.double()
        g = g / scales if kind == "norm" else (1.0 + g) / scales - 1.0
        source.weight.copy_(g.to(source.weight.dtype))
        bias = getattr(source, "bias", None)
        if isinstance(bias, torch.Tensor):  # LayerNorm: n(x)·γ + β, both scale with the channel
            bias.copy_((bias.double() / scales).to(bias.dtype))
        return
    lo, hi = rs.rows or (0, source.out_features)
    w = source.weight[lo:hi].double()
    b = None if source.bias is None else source.bias[lo:hi].double()
    if scales is not None:
        w = w / scales.unsqueeze(1)
        b = None if b is None else b / scales
    if head_rotation:  # rows of v·blockdiag(H): W' = blockdiag(H)ᵀ·W, b' = b·blockdiag(H)
        rotate = rs.transform.rotate
        w = rotate(w.T).T
        b = None if b is None else rotate(b)
    source.weight[lo:hi] = w.to(source.weight.dtype)
    if b is not None:
        source.bias[lo:hi] = b.to(source.bias.dtype)


@torch.no_grad()
def fuse_site(rs: ResolvedSite, scales: torch.Tensor | None, rotate: bool) -> None:
    """Fold diag(s)⁻¹ into the source and store Wᵢ·diag(s)·H in every linear, in place."""
    if scales is not None:
        _check_scales(rs, scales)
        scales = scales.double()
    fold_into_source(rs, scales, rotate and rs.site.rotation == "head_offline")
    transform = rs.transform if rotate else rs.transform.without_rotation()
    if scales is None and transform.rotation == "none":
        return  # nothing to fuse (RTN)
    for linear in rs.linears:
        w = transform_weight(linear.weight.double(), scales, transform)
        linear.weight.copy_(w.to(linear.weight.dtype))


def online_rotation(rs: ResolvedSite, rotate: bool) -> TransformArg:
    """What the pre-hook must still rotate at run time (nothing for offline-folded rotations)."""
    if not rotate or rs.site.rotation in ("none", "head_offline"):
        return False
    return rs.transform


def linear_weights_q(
    sites: Sequence[ResolvedSite], plans: Mapping[str, SitePlan]
) -> dict[nn.Module, torch.Tensor]:
    """Each linear's final offline-quantized weight (from its site's ``SitePlan.weight_q``).

    A linear can be a group member and another site's source (up_proj for down_proj, v_proj for
    o_proj); its site's ``weight_q`` was computed from the unfolded weight, so the other site's
    ``1/s`` row division is applied to it here, as :func:`fold_into_source` applies it to the
    float weight. For integer formats (per-row or per-group scales) this is exact: quantizing
    ``diag(d)·W`` row by row (RTN or GPTQ) gives ``diag(d)·Q(W)``. FP4 block scales are rounded
    to FP8, so there it is the nearest equivalent, not bit-identical.
    """
    folds: dict[nn.Module, list[tuple[ResolvedSite, SitePlan]]] = {}
    for rs in sites:
        if rs.name in plans and rs.smooth_from_kind == "linear_rows":
            folds.setdefault(rs.smooth_from, []).append((rs, plans[rs.name]))
    out: dict[nn.Module, torch.Tensor] = {}
    for rs in sites:
        weight_q = plans[rs.name].weight_q if rs.name in plans else None
        if weight_q is None:
            continue
        if weight_q.shape != (sum(lin.out_features for lin in rs.linears), rs.in_features):
            raise ValueError(
                f"{rs.name}: weight_q has shape {tuple(weight_q.shape)}, expected "
                f"{tuple(rs.weight.shape)}"
            )
        parts = weight_q.split([lin.out_features for lin in rs.linears])
        for linear, part in zip(rs.linears, parts, strict=True):
            w = part.double().clone()
            for src, src_plan in folds.get(linear, []):
                if src_plan.rotate and src.site.rotation == "head_offline":
                    raise ValueError(
                        f"{rs.name}: its offline-quantized (GPTQ) weights cannot take "
                        f"{src.name}'s offline per-head rotation (rows would leave the grid); "
                        "use the head_online rotation or RTN for this site"
                    )
                if src_plan.scales is not None:
                    lo, hi = src.rows or (0, linear.out_features)
                    w[lo:hi] = w[lo:hi] / src_plan.scales.double().unsqueeze(1)
            out[linear] = w.to(part.dtype)
    return out


def apply_plans(
    sites: Sequence[ResolvedSite],
    plans: Mapping[str, SitePlan],
    scheme: QuantScheme | None = None,
) -> list[torch.utils.hooks.RemovableHandle]:
    """Transform every site with a plan; with ``scheme``, fake-quantize weights and inputs too.

    All sites are fused before any weight is quantized: a linear can be both a group member
    (columns transformed) and a source (rows divided, e.g. up_proj, v_proj), and it must be
    quantized once, in its final form. Returns the hook handles (online rotation / activation
    quantization), one per linear of every planned site.
    """
    active = [(rs, plans[rs.name]) for rs in sites if rs.name in plans]
    weights_q = linear_weights_q(sites, plans)  # checked before anything is changed
    for rs, plan in active:
        fuse_site(rs, plan.scales, plan.rotate)
    for rs, plan in active:
        if plan.weight_q is not None:
            with torch.no_grad():
                for linear in rs.linears:
                    linear.weight.copy_(weights_q[linear].to(linear.weight))
        elif scheme is not None:
            with torch.no_grad():
                for linear in rs.linears:
                    linear.weight.copy_(quantize_weight_spec(linear.weight, scheme))
    handles = []
    for rs, plan in active:
        rotation = online_rotation(rs, plan.rotate)
        if rotation is not False or scheme is not None:
            hook = OnlineInputTransform(
                rotation, scheme=None if scheme is None else with_act_clip(scheme, plan.act_clip))
            handles += [linear.register_forward_pre_hook(hook) for linear in rs.linears]
    return handles


def site_parameters(rs: ResolvedSite) -> list[nn.Parameter]:
    """Every parameter a site's surgery may write (its linears and its source)."""
    params = []
    for module in (*rs.linears, rs.smooth_from):
        for name in ("weight", "bias"):
            p = getattr(module, name, None)
            if isinstance(p, torch.Tensor):
                params.append(p)
    return params


@contextmanager
def transformed(
    sites: Sequence[ResolvedSite],
    plans: Mapping[str, SitePlan],
    scheme: QuantScheme | None = None,
) -> Iterator[None]:
    """Temporarily apply :func:`apply_plans`; weights and hooks are restored on exit."""
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for rs in sites:
        if rs.name in plans:
            for p in site_parameters(rs):
                saved.setdefault(id(p), (p, p.detach().clone()))
    handles: list = []
    try:
        handles = apply_plans(sites, plans, scheme)
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for p, original in saved.values():
                p.copy_(original)
