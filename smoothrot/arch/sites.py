"""Binding the architecture tables to one model: which modules each site is, and its transform.

:func:`resolve_sites` turns ``--layers`` patterns into :class:`ResolvedSite` records; whether the
residual stream was rotated (R1), and by which kind of Q, is an explicit argument, never state
read off the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from smoothrot.arch.tables import (
    ARCHITECTURES,
    ROW_SLICES,
    ArchitectureMap,
    ModelDims,
    SmoothingSite,
)
from smoothrot.core.transform import ScaleTie, SiteTransform
from smoothrot.schema.rotation import RESIDUAL_KINDS, Rotation, RotationKind

ALL = "all"


class UnsupportedArchitectureError(ValueError):
    """The model class has no mapping table."""


@dataclass(frozen=True, eq=False)
class ResolvedSite:
    """A site bound to modules of one model.

    ``name`` is the qualified site name (``model.layers.3.mlp.down_proj`` for one linear,
    ``model.layers.3.self_attn.qkv`` for a group). ``rows`` is the row range of ``smooth_from``
    that absorbs ``1/s`` (None: all rows / the norm). ``transform`` is the input transform the
    loss and the surgery use (rotation and scale tying).
    """

    name: str
    site: SmoothingSite
    layer_index: int
    linears: tuple[nn.Linear, ...]
    smooth_from: nn.Module
    rows: tuple[int, int] | None
    transform: SiteTransform

    @property
    def linear(self) -> nn.Linear:
        """The first linear of the group; its input is the group's input (hooks go here)."""
        return self.linears[0]

    @property
    def weight(self) -> torch.Tensor:
        """The group's weights concatenated along the output dim, [Σ out, in]."""
        if len(self.linears) == 1:
            return self.linears[0].weight
        return torch.cat([linear.weight for linear in self.linears])

    @property
    def in_features(self) -> int:
        return self.linears[0].in_features

    @property
    def n_scales(self) -> int:
        """Length of this site's scale vector (kv_heads·head_dim for tied o_proj scales)."""
        return self.transform.n_scales(self.in_features)

    @property
    def smooth_from_kind(self) -> str:
        return self.site.smooth_from_kind

    @property
    def rotation(self) -> Rotation:
        """The site's own rotation (its table entry, bound to the model; residual readers:
        none under a Hadamard R1)."""
        return self.transform.rotation


def architecture_of(model: nn.Module) -> ArchitectureMap:
    """The mapping table for ``model``'s class, or a one-line error listing supported ones."""
    cls = type(model).__name__
    try:
        return ARCHITECTURES[cls]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {cls} has no smoothing table; supported: {sorted(ARCHITECTURES)}. "
            "Add an ArchitectureMap to smoothrot/arch/tables.py (docs/adding_an_architecture.md)"
        ) from None


def _reads_residual(arch: ArchitectureMap, site: SmoothingSite) -> bool:
    """True if the site's linears read the residual stream (what R1 rotates)."""
    if arch.residual is None:
        return False
    return any(set(site.linears) <= set(feed.linears) for feed in arch.residual.readers)


def _site_transform(site: SmoothingSite, dims: ModelDims, hadamard_input: bool) -> SiteTransform:
    rotation = site.rotation.bound(dims.head_dim)
    if hadamard_input and rotation.kind is RotationKind.FULL:
        # R1 already rotated this input by Q = diag(σ)·H; a second H would undo it (H·H = I for
        # a symmetric H, so x·Q·H = x·diag(σ)), bringing the outliers back. A random orthogonal
        # Q is not undone by H: those sites keep theirs (placement "both").
        rotation = Rotation.none()
    tie = None
    if site.tie == "kv_heads" and dims.heads != dims.kv_heads:
        tie = ScaleTie(dims.heads, dims.kv_heads, dims.head_dim)
    return SiteTransform(rotation, tie)


def _source_size(rs_name: str, module: nn.Module, kind: str, rows: tuple[int, int] | None) -> int:
    if kind == "linear_rows":
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{rs_name}: smooth_from is {type(module).__name__}, not a Linear")
        return rows[1] - rows[0] if rows else module.out_features
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 1:
        raise ValueError(f"{rs_name}: smooth_from {type(module).__name__} has no 1-d weight γ")
    return weight.numel()


def _bind(model: nn.Module, arch: ArchitectureMap, dims: ModelDims, index: int,
          layer: nn.Module, site: SmoothingSite, residual_kind: str | None) -> ResolvedSite:
    name = f"{arch.layers}.{index}.{site.path}"
    linears = tuple(layer.get_submodule(p) for p in site.linears)
    if len({lin.in_features for lin in linears}) != 1:
        raise ValueError(f"{name}: the linears {site.linears} do not share one input size")
    rows = ROW_SLICES[site.smooth_from_rows](dims) if site.smooth_from_rows else None
    source = layer.get_submodule(site.smooth_from)
    transform = _site_transform(site, dims,
                                residual_kind == "hadamard" and _reads_residual(arch, site))
    n_scales = transform.n_scales(linears[0].in_features)
    size = _source_size(name, source, site.smooth_from_kind, rows)
    if size != n_scales:
        raise ValueError(
            f"{name}: {site.smooth_from} gives {size} channels but the site needs {n_scales}; "
            f"the {type(model).__name__} table does not fit this model"
        )
    return ResolvedSite(name, site, index, linears, source, rows, transform)


def _matches(pattern: str, site: SmoothingSite, qualified: str, members: list[str]) -> bool:
    if pattern == ALL:
        return True
    if pattern.startswith("re:"):
        return any(re.fullmatch(pattern[3:], q) is not None for q in (qualified, *members))
    return pattern in (site.name, qualified, *members)


def resolve_sites(model: nn.Module, patterns: list[str], *,
                  residual_kind: str | None = None) -> list[ResolvedSite]:
    """Bind the requested sites to modules, in layer order (table order inside a layer).

    A pattern is ``all``, a site name (``down_proj``, ``qkv``: every layer), a qualified site name
    (``model.layers.11.mlp.down_proj``, ``model.layers.0.self_attn.qkv``), the qualified name of
    any linear of a group (``model.layers.0.self_attn.k_proj``) or a regex prefixed with ``re:``.
    ``residual_kind`` is the kind of the R1 the model carries (surgery/residual.py; pass
    ``ResidualRotation.kind``, what was applied, not what was asked for), None without R1. With
    ``"hadamard"`` sites reading the residual stream (q/k/v, gate/up) get no rotation of their
    own (H·H = I would undo R1); with ``"random"`` they keep it.
    """
    if residual_kind not in (None, *RESIDUAL_KINDS):
        raise ValueError(f"residual_kind={residual_kind!r} must be None (no R1) or one of "
                         f"{list(RESIDUAL_KINDS)}")
    arch = architecture_of(model)
    dims = ModelDims.from_config(model.config)
    layers = model.get_submodule(arch.layers)
    resolved: list[ResolvedSite] = []
    used: set[str] = set()
    for index, layer in enumerate(layers):
        for site in arch.sites:
            qualified = f"{arch.layers}.{index}.{site.path}"
            members = [f"{arch.layers}.{index}.{p}" for p in site.linears]
            hits = [p for p in patterns if _matches(p, site, qualified, members)]
            if not hits:
                continue
            used.update(hits)
            resolved.append(_bind(model, arch, dims, index, layer, site, residual_kind))
    unused = [p for p in patterns if p not in used]
    if unused:
        names = [ALL, *dict.fromkeys(s.name for s in arch.sites)]
        raise ValueError(
            f"--layers {unused} matched no smoothing site in {type(model).__name__}; use a site "
            f"name {names}, a name like {arch.layers}.0.{arch.sites[-1].path}, or 're:<regex>'"
        )
    return resolved


def pow2_block(n: int, cap: int) -> int:
    """The largest power of two that divides ``n`` and is at most ``cap``."""
    return min(n & -n, 1 << (cap.bit_length() - 1))


def with_rotation_blocks(sites: list[ResolvedSite], block_size: int | None) -> list[ResolvedSite]:
    """``sites`` with every full Hadamard over n channels split into block-diagonal Hadamards of
    the largest power of two dividing n, at most ``block_size`` (1536 → 3·512, 576 → 9·64 for
    512): backends run power-of-two blocks with a fast kernel. None leaves them as they are."""
    if block_size is None:
        return list(sites)
    out = []
    for rs in sites:
        block = pow2_block(rs.in_features, block_size)
        if rs.rotation.kind is RotationKind.FULL and block != rs.in_features:
            rs = replace(rs, transform=rs.transform.with_rotation(Rotation.block(block)))
        out.append(rs)
    return out


def with_dense_rotations(sites: list[ResolvedSite], dense: bool) -> list[ResolvedSite]:
    """``sites`` rotating activations as compressed-tensors' runtime does (``dense``), or with
    the fast transform."""
    return [replace(rs, transform=replace(rs.transform, dense_input=dense)) for rs in sites]
