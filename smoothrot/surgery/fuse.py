"""Fold and unfold: the offline half of the surgery, side by side, in float64.

For a site (a source S feeding a group of linears L₁…L_k through elementwise ops only):

* S's output channels are divided by s, so the group's input becomes X·diag(s)⁻¹: rows of a
  linear (and its bias), a row range of a fused linear, an RMSNorm's γ (γ/s; signed γ is fine
  since s > 0, nothing divides by γ) or an offset norm's 1+γ (γ' = (1+γ)/s − 1);
* every Lᵢ's weight becomes Wᵢ·diag(s)·R (fused offline, in float64, cast back);
* an offline rotation (per-head H on o_proj's input) is folded into the source's rows too
  (exact: attention mixes tokens, never a head's channels); an online one runs as a hook
  (hooks.py).

:func:`unfuse_site` is the exact inverse (R orthonormal: R⁻¹ = Rᵀ). Tied scales (GQA o_proj)
have one entry per v_proj row; the o_proj columns use them expanded. The float function of the
model is unchanged (docs/equivalence.md); only quantization error moves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from smoothrot.arch.sites import ResolvedSite
from smoothrot.core.transform import transform_weight
from smoothrot.schema.rotation import Rotation
from smoothrot.surgery.plan import SitePlan


def _check_scales(rs: ResolvedSite, scales: torch.Tensor) -> None:
    if scales.shape != (rs.n_scales,):
        raise ValueError(
            f"{rs.name}: scales have shape {tuple(scales.shape)}, expected ({rs.n_scales},); "
            "were they fitted on another model?"
        )
    if not torch.isfinite(scales).all() or (scales <= 0).any():
        raise ValueError(f"{rs.name}: scales must be positive and finite")


def _rows(rs: ResolvedSite) -> tuple[int, int]:
    """The source rows that absorb 1/s (all of a linear's rows, or a fused linear's slice)."""
    return rs.rows or (0, rs.smooth_from.out_features)


@torch.no_grad()
def fold_into_source(rs: ResolvedSite, scales: torch.Tensor | None, rotation: Rotation) -> None:
    """Divide the source's output channels by s; an offline rotation also rotates its rows."""
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
    lo, hi = _rows(rs)
    w = source.weight[lo:hi].double()
    b = None if source.bias is None else source.bias[lo:hi].double()
    if scales is not None:
        w = w / scales.unsqueeze(1)
        b = None if b is None else b / scales
    if rotation.is_offline():  # rows of v·R: W' = Rᵀ·W, b' = b·R
        rotate = rs.transform.with_rotation(rotation).rotate
        w = rotate(w.T).T
        b = None if b is None else rotate(b)
    source.weight[lo:hi] = w.to(source.weight.dtype)
    if b is not None:
        source.bias[lo:hi] = b.to(source.bias.dtype)


@torch.no_grad()
def fuse_site(rs: ResolvedSite, scales: torch.Tensor | None, rotation: Rotation) -> None:
    """Fold diag(s)⁻¹ into the source and store Wᵢ·diag(s)·R in every linear, in place."""
    if scales is not None:
        _check_scales(rs, scales)
        scales = scales.to(rs.linears[0].weight.device, torch.float64)  # plans keep them on the CPU
    fold_into_source(rs, scales, rotation)
    if scales is None and rotation.is_identity:
        return  # nothing to fuse (RTN)
    transform = rs.transform.with_rotation(rotation)
    for linear in rs.linears:
        w = transform_weight(linear.weight.double(), scales, transform)
        linear.weight.copy_(w.to(linear.weight.dtype))


@torch.no_grad()
def unfuse_site(rs: ResolvedSite, scales: torch.Tensor | None, rotation: Rotation) -> None:
    """Undo :func:`fuse_site` in place: Wᵢ = Wᵢ'·Rᵀ·diag(s)⁻¹, the source's rows times s.

    Recovers the original weights of an export from its stored scales (e.g. to refit them).
    """
    device = rs.linears[0].weight.device  # plans keep scales on the CPU
    s = None if scales is None else scales.to(device, torch.float64)
    transform = rs.transform.with_rotation(rotation)
    m = transform.matrix(rs.in_features).to(device)
    s_in = None if s is None else transform.expand(s)
    for linear in rs.linears:
        w = linear.weight.double() @ m.T
        if s_in is not None:
            w = w / s_in
        linear.weight.copy_(w.to(linear.weight.dtype))
    source = rs.smooth_from
    if rs.smooth_from_kind in ("norm", "offset_norm"):
        if s is not None:
            g = source.weight.double()
            g = g * s if rs.smooth_from_kind == "norm" else (1.0 + g) * s - 1.0
            source.weight.copy_(g.to(source.weight.dtype))
        return
    lo, hi = _rows(rs)
    w = source.weight[lo:hi].double()
    b = None if source.bias is None else source.bias[lo:hi].double()
    if rotation.is_offline():  # fused rows were Rᵀ·(W/s)
        mh = transform.matrix(hi - lo).to(device)
        w = mh @ w
        b = None if b is None else b @ mh.T
    if s is not None:
        w = w * s.unsqueeze(1)
        b = None if b is None else b * s
    source.weight[lo:hi] = w.to(source.weight.dtype)
    if b is not None:
        source.bias[lo:hi] = b.to(source.bias.dtype)


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
                if src_plan.rotation.is_offline():
                    raise ValueError(
                        f"{rs.name}: its offline-quantized (GPTQ) weights cannot take "
                        f"{src.name}'s offline per-head rotation (rows would leave the grid); "
                        "use an online per-head rotation or RTN for this site"
                    )
                if src_plan.scales is not None:
                    lo, hi = _rows(src)
                    w[lo:hi] = w[lo:hi] / src_plan.scales.to(w.device, torch.float64)[:, None]
            out[linear] = w.to(part.dtype)
    return out


