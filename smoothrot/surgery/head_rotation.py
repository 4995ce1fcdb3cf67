"""Per-head rotations R2 of attention's value/output path, folded into the weights offline.

Head h's o_proj input is A_h·V_g(h) (g(h): its kv head): attention mixes tokens, never a head's
channels, so for any orthogonal R_g per kv head

    v_proj rows of kv head g:  W ← R_gᵀ·W,  b ← b·R_g     (v becomes v·R_g)
    o_proj columns of head h:  W ← W·R_g(h)                (its input is now A_h·V_g·R_g)

computes the same function. The quantizers see different values: o_proj's input channels (and
so its smoothing scales, which act per v_proj row) and v_proj's rows are mixed within each head.
This is SpinQuant's R2; here it is learned (training/head_rotation.py) and then part of the
model, before any site is smoothed. Folding runs in float64 on the nearest orthogonal matrix, so
the float function is unchanged to float64 rounding.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from smoothrot.arch.sites import ResolvedSite, resolve_sites
from smoothrot.arch.tables import ModelDims
from smoothrot.core.transform import ScaleTie

# Where an export keeps the folded rotations (float64, by o_proj site name): verify rebuilds the
# reference model it is checked against from them.
HEAD_ROTATIONS_FILE = "head_rotations.safetensors"

# A site whose scales are tied per kv head reads attention's per-head output (tables.py).
HEAD_TIE = "kv_heads"


def head_sites(sites: list[ResolvedSite]) -> list[ResolvedSite]:
    """The sites whose input is attention's per-head output (o_proj), by their table entry."""
    return [rs for rs in sites if rs.site.tie == HEAD_TIE and rs.smooth_from_kind == "linear_rows"]


def head_layout(model: nn.Module) -> ScaleTie:
    """Heads, kv heads and head_dim of ``model`` (one kv head per head without GQA)."""
    dims = ModelDims.from_config(model.config)
    return ScaleTie(dims.heads, dims.kv_heads, dims.head_dim)


def rotate_heads(x: torch.Tensor, r: torch.Tensor, layout: ScaleTie) -> torch.Tensor:
    """x·R̂ over the last dim, R̂ = blockdiag over query heads h of R_g(h) (o_proj's input
    rotation), one head_dim-sized product per head instead of an [n, n] one."""
    if r.shape != (layout.kv_heads, layout.head_dim, layout.head_dim):
        raise ValueError(f"head rotations have shape {tuple(r.shape)}, expected "
                         f"({layout.kv_heads}, {layout.head_dim}, {layout.head_dim})")
    heads = x.unflatten(-1, (layout.kv_heads, layout.group, layout.head_dim))
    return torch.einsum("...kgd,kde->...kge", heads, r.to(x)).flatten(-3)


def nearest_orthogonal(r: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrices closest to ``r`` [..., d, d] (polar factor, float64): a trained
    rotation is orthogonal to float32 rounding only, and folding must be exact."""
    u, _, vh = torch.linalg.svd(r.double())
    return u @ vh


@torch.no_grad()
def fold_head_rotation(rs: ResolvedSite, r: torch.Tensor, layout: ScaleTie) -> None:
    """Rotate v_proj's rows of each kv head by R_g and o_proj's columns of each head by R_g(h),
    in place (``rs``: an o_proj site, before any smoothing is fused into it)."""
    source, (linear,) = rs.smooth_from, rs.linears
    r = nearest_orthogonal(r.to(source.weight.device))  # learned rotations are kept on the CPU
    lo, hi = rs.rows or (0, source.out_features)
    d = layout.head_dim
    if hi - lo != layout.kv_heads * d or linear.in_features != layout.heads * d:
        raise ValueError(f"{rs.name}: {hi - lo} source rows and {linear.in_features} inputs do "
                         f"not fit {layout.kv_heads} kv heads and {layout.heads} heads of {d}")
    w = source.weight[lo:hi].double().reshape(layout.kv_heads, d, -1)
    source.weight[lo:hi] = (r.transpose(1, 2) @ w).reshape(hi - lo, -1).to(source.weight.dtype)
    if source.bias is not None:
        b = source.bias[lo:hi].double().reshape(layout.kv_heads, 1, d)
        source.bias[lo:hi] = (b @ r).reshape(-1).to(source.bias.dtype)
    linear.weight.copy_(rotate_heads(linear.weight.double(), r, layout).to(linear.weight.dtype))


def apply_head_rotations(model: nn.Module, rotations: Mapping[str, torch.Tensor]) -> None:
    """Fold learned rotations (by o_proj site name) into ``model``: the export replays what the
    fit did to its copy of the model."""
    layout = head_layout(model)
    sites = resolve_sites(model, list(rotations)) if rotations else []
    for rs in sites:
        fold_head_rotation(rs, rotations[rs.name], layout)
