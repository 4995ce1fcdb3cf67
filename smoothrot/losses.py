"""Where the loss is: the fake-quantized output of one smoothed, rotated linear layer.

For input tokens X [T, n] and weight W [m, n], a site with scales s and rotation H computes
Q_a(X·diag(s)⁻¹·H) · Q_w(W·diag(s)·H)ᵀ; its error is measured against the float output X·Wᵀ.
The same function serves the grid search, the trainer (with straight-through rounding) and the
held-out evaluation, so every method is scored by identical arithmetic.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace

import torch

from smoothrot.core.hadamard import hadamard_matrix, hadamard_transform
from smoothrot.core.quantizers import quantize_activation_spec, quantize_weight_spec
from smoothrot.schema.config import QuantScheme

INPUT_ROTATIONS = ("online", "head", "none")


@dataclass(frozen=True)
class InputTransform:
    """What a site does to its input besides diag(s)⁻¹: the rotation H and the scale tying.

    ``rotation``: ``online`` (H over all n channels), ``head`` (block-diagonal H over consecutive
    ``head_dim`` blocks: the attention output's heads) or ``none``.

    Tying (``heads`` > ``kv_heads``, grouped-query attention): the scale vector has
    ``kv_heads·head_dim`` entries and input channel (h, d) uses entry (h // (heads/kv_heads), d),
    because o_proj's input channels of all query heads sharing a kv head come from one v_proj
    row, and a row can only be divided by one scale.

    Passed to the loss functions (and through the trainer) as ``rotate``: ``True``/``False`` for
    the plain cases, else the string :attr:`arg`, a plain value that survives checkpoints.
    """

    rotation: str = "online"
    head_dim: int | None = None
    heads: int | None = None
    kv_heads: int | None = None

    def __post_init__(self) -> None:
        if self.rotation not in INPUT_ROTATIONS:
            raise ValueError(f"rotation {self.rotation!r} is not one of {INPUT_ROTATIONS}")
        if self.rotation == "head" and not self.head_dim:
            raise ValueError("a per-head rotation needs head_dim")
        if (self.heads is None) != (self.kv_heads is None):
            raise ValueError("tied scales need both heads and kv_heads")
        if self.heads is not None and (not self.head_dim or self.heads % self.kv_heads):
            raise ValueError(
                f"tied scales need head_dim and heads ({self.heads}) divisible by kv_heads "
                f"({self.kv_heads})"
            )

    @property
    def tied(self) -> bool:
        """True when several input channels share one scale (GQA o_proj)."""
        return self.heads is not None and self.heads != self.kv_heads

    @property
    def arg(self) -> bool | str:
        """The value passed as ``rotate``: a bool when that says everything, else a spec."""
        if not self.tied and self.rotation in ("online", "none"):
            return self.rotation == "online"
        parts = [self.rotation]
        if self.head_dim:
            parts.append(f"d={self.head_dim}")
        if self.tied:
            parts.append(f"tie={self.heads}/{self.kv_heads}")
        return ":".join(parts)

    def without_rotation(self) -> InputTransform:
        """The same tying, no rotation (RTN / smoothing-only)."""
        return replace(self, rotation="none")

    def n_scales(self, in_features: int) -> int:
        """Length of the scale vector for ``in_features`` input channels."""
        return self.kv_heads * self.head_dim if self.tied else in_features

    def expand(self, scales: torch.Tensor) -> torch.Tensor:
        """Per-input-channel scales from (possibly tied) scale vectors ``[..., n_scales]``."""
        if not self.tied:
            return scales
        return scales[..., _tie_index(self.heads, self.kv_heads, self.head_dim).to(scales.device)]

    def tied_max(self, values: torch.Tensor) -> torch.Tensor:
        """Per-input-channel statistic reduced to the scale vector by max over tied channels."""
        if not self.tied:
            return values
        g = self.heads // self.kv_heads
        return values.reshape(self.kv_heads, g, self.head_dim).amax(dim=1).reshape(-1)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x·H (``online``), x·blockdiag(H_d) (``head``) or x."""
        if self.rotation == "online":
            return hadamard_transform(x)
        if self.rotation == "head":
            n = x.shape[-1]
            if n % self.head_dim:
                raise ValueError(f"{n} channels are not a multiple of head_dim {self.head_dim}")
            blocks = x.reshape(*x.shape[:-1], n // self.head_dim, self.head_dim)
            return hadamard_transform(blocks).reshape(x.shape)
        return x

    def check(self, in_features: int) -> None:
        """Fail early (HadamardSizeError) if the rotation cannot be built for this size."""
        if self.rotation == "online":
            hadamard_matrix(in_features)
        elif self.rotation == "head":
            hadamard_matrix(self.head_dim)
            if in_features % self.head_dim:
                raise ValueError(f"{in_features} channels are not a multiple of {self.head_dim}")
        if self.tied and in_features != self.heads * self.head_dim:
            raise ValueError(
                f"tied scales expect {self.heads}·{self.head_dim} input channels, got {in_features}"
            )


_SPEC = re.compile(r"(online|head|none)(?::d=(\d+))?(?::tie=(\d+)/(\d+))?")

TransformArg = bool | str | InputTransform


@functools.lru_cache(maxsize=64)
def _parse(spec: str) -> InputTransform:
    m = _SPEC.fullmatch(spec)
    if m is None:
        raise ValueError(f"cannot parse input transform {spec!r}, e.g. 'online' or 'head:d=64'")
    rotation, d, heads, kv = m.groups()
    return InputTransform(rotation, int(d) if d else None, int(heads) if heads else None,
                          int(kv) if kv else None)


def as_transform(rotate: TransformArg) -> InputTransform:
    """Normalize a ``rotate`` argument: True (H over all channels), False, a spec or a transform."""
    if isinstance(rotate, InputTransform):
        return rotate
    if isinstance(rotate, bool):
        return _ONLINE if rotate else _NONE
    return _parse(rotate)


_ONLINE = InputTransform("online")
_NONE = InputTransform("none")


@functools.lru_cache(maxsize=16)
def _tie_index(heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Scale index of every input channel (h, d): (h // (heads/kv_heads))·head_dim + d."""
    group = heads // kv_heads
    h = torch.arange(heads).repeat_interleave(head_dim)
    d = torch.arange(head_dim).repeat(heads)
    return (h // group) * head_dim + d


def transform_weight(
    weight: torch.Tensor, scales: torch.Tensor | None, rotate: TransformArg
) -> torch.Tensor:
    """W·diag(s)·H (rows of W are output channels; tied scales expanded first)."""
    t = as_transform(rotate)
    if scales is not None:
        weight = weight * t.expand(scales).to(weight.dtype)
    return t.rotate(weight)


def transform_input(
    x: torch.Tensor, scales: torch.Tensor | None, rotate: TransformArg
) -> torch.Tensor:
    """X·diag(s)⁻¹·H."""
    t = as_transform(rotate)
    if scales is not None:
        x = x / t.expand(scales).to(x.dtype)
    return t.rotate(x)


def quantized_output(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    rotate: TransformArg,
    scheme: QuantScheme,
    *,
    ste: bool = False,
    weight_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Q_a(X') · Q_w(W')ᵀ; pass a precomputed ``weight_q`` to reuse it across token batches."""
    if weight_q is None:
        weight_q = quantize_weight_spec(transform_weight(weight, scales, rotate), scheme, ste=ste)
    x_q = quantize_activation_spec(transform_input(x, scales, rotate), scheme, ste=ste)
    return x_q @ weight_q.T


def output_loss(y_ref: torch.Tensor, y_q: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the squared output error ||x·Wᵀ − Q(x')·Q(W')ᵀ||²."""
    return (y_ref - y_q).pow(2).sum(dim=-1).mean()
