"""What a site does to its input besides diag(s)⁻¹: the rotation R and the scale tying.

:class:`SiteTransform` is the tensor behaviour of a :class:`~smoothrot.schema.rotation.Rotation`
plus the grouped-query tying of o_proj's scales; the losses, the trainer, GPTQ and the surgery all
take one, so every method is scored and fused with the same arithmetic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from smoothrot.core.hadamard import hadamard_matrix, hadamard_transform
from smoothrot.schema.rotation import Rotation


@dataclass(frozen=True)
class ScaleTie:
    """Grouped-query tying: the scale vector has ``kv_heads·head_dim`` entries and o_proj's input
    channel (h, d) uses entry (h // (heads/kv_heads), d), because the channels of all query heads
    sharing a kv head come from one v_proj row, and a row can only be divided by one scale."""

    heads: int
    kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise ValueError(f"tied scales need heads ({self.heads}) divisible by kv_heads "
                             f"({self.kv_heads})")

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


@functools.lru_cache(maxsize=16)
def _tie_index(tie: ScaleTie) -> torch.Tensor:
    """Scale index of every input channel (h, d): (h // group)·head_dim + d."""
    h = torch.arange(tie.heads).repeat_interleave(tie.head_dim)
    d = torch.arange(tie.head_dim).repeat(tie.heads)
    return (h // tie.group) * tie.head_dim + d


def _blockwise(x: torch.Tensor, block: int) -> torch.Tensor:
    """x·blockdiag(H_block): the Hadamard transform of consecutive ``block``-channel slices."""
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"{n} channels are not a multiple of the rotation block {block}")
    return hadamard_transform(x.reshape(*x.shape[:-1], n // block, block)).reshape(x.shape)


@functools.lru_cache(maxsize=8)
def stored_hadamard(order: int) -> torch.Tensor:
    """√n·H as smoothrot computes x·H (±1 entries, float32): what an export stores."""
    return torch.round(hadamard_transform(torch.eye(order, dtype=torch.float64)) * order**0.5
                       ).float()


def dense_rotate(x: torch.Tensor, order: int) -> torch.Tensor:
    """x·R computed as compressed-tensors' transform does: (x @ √n·H) / √n in float32, blocks
    via unflatten. Bit for bit its arithmetic, so values on its activation grid's half-way
    points (±(2^b−1)/2 after scaling) round the same way."""
    w = stored_hadamard(order).to(x.device)
    xf = x.to(torch.float32)
    y = xf @ w if order == x.shape[-1] else (xf.unflatten(-1, (-1, order)) @ w).flatten(-2, -1)
    return (y / torch.tensor(order, dtype=torch.float64).sqrt()).to(x.dtype)


@dataclass(frozen=True)
class SiteTransform:
    """A site's rotation (any location: the math is the same) and optional scale tying.

    ``dense_input``: rotate activations with :func:`dense_rotate` (target compressed-tensors)
    instead of the fast transform; weights are always rotated exactly (float64 when fusing).
    """

    rotation: Rotation = Rotation()  # noqa: RUF009 - frozen, so one shared default is safe
    tie: ScaleTie | None = None
    dense_input: bool = False

    def with_rotation(self, rotation: Rotation) -> SiteTransform:
        return replace(self, rotation=rotation)

    def without_rotation(self) -> SiteTransform:
        """The same tying, no rotation (RTN / smoothing only)."""
        return replace(self, rotation=Rotation.none())

    def n_scales(self, in_features: int) -> int:
        """Length of the scale vector for ``in_features`` input channels."""
        return self.tie.kv_heads * self.tie.head_dim if self.tie else in_features

    def expand(self, scales: torch.Tensor) -> torch.Tensor:
        """Per-input-channel scales from (possibly tied) scale vectors ``[..., n_scales]``."""
        if self.tie is None:
            return scales
        return scales[..., _tie_index(self.tie).to(scales.device)]

    def tied_max(self, values: torch.Tensor) -> torch.Tensor:
        """Per-input-channel statistic reduced to the scale vector by max over tied channels."""
        if self.tie is None:
            return values
        t = self.tie
        return values.reshape(t.kv_heads, t.group, t.head_dim).amax(dim=1).reshape(-1)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x·R over the last dimension."""
        order = self.rotation.order(x.shape[-1])
        if order is None:
            return x
        return hadamard_transform(x) if order == x.shape[-1] else _blockwise(x, order)

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """x·R for activations: as the target's runtime computes it (see ``dense_input``)."""
        order = self.rotation.order(x.shape[-1])
        if order is None or not self.dense_input:
            return self.rotate(x)
        return dense_rotate(x, order)

    def matrix(self, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """R as a dense [n, n] matrix (x·R == rotate(x)); for offline use (export, unfusing)."""
        return self.rotate(torch.eye(n, dtype=dtype))

    def check(self, in_features: int) -> None:
        """Fail early (HadamardSizeError, ValueError) if this transform cannot be built."""
        order = self.rotation.order(in_features)
        if order is not None:
            hadamard_matrix(order)
            if in_features % order:
                raise ValueError(f"{in_features} channels are not a multiple of the rotation "
                                 f"block {order}")
        if self.tie and in_features != self.tie.heads * self.tie.head_dim:
            raise ValueError(f"tied scales expect {self.tie.heads}·{self.tie.head_dim} input "
                             f"channels, got {in_features}")


def transform_weight(
    weight: torch.Tensor, scales: torch.Tensor | None, t: SiteTransform
) -> torch.Tensor:
    """W·diag(s)·R (rows of W are output channels; tied scales expanded first)."""
    if scales is not None:
        weight = weight * t.expand(scales).to(weight.dtype)
    return t.rotate(weight)


def transform_input(
    x: torch.Tensor, scales: torch.Tensor | None, t: SiteTransform
) -> torch.Tensor:
    """X·diag(s)⁻¹·R."""
    if scales is not None:
        x = x / t.expand(scales).to(x.dtype)
    return t.rotate_input(x)


FULL = SiteTransform()
IDENTITY = SiteTransform(Rotation.none())
