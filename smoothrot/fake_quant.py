"""Symmetric round-to-nearest (RTN) fake quantization with an optional straight-through estimator.

Fake quantization keeps tensors in floating point but snaps them to the integer grid a real
kernel would use, so accuracy can be measured (and scales trained) without integer kernels.
Scales are per row over the last dim: weights ``[out, in]`` get one scale per output channel,
activations ``[..., tokens, in]`` one scale per token, computed on the fly (dynamic).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "SUPPORTED_BITS",
    "RoundSTE",
    "fake_quantize",
    "quantize_activation",
    "quantize_weight",
]

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)

_HALF_DTYPES = (torch.float16, torch.bfloat16)


class RoundSTE(torch.autograd.Function):
    """Round in the forward pass, pass the gradient through unchanged in the backward pass.

    ``torch.round`` has a zero gradient almost everywhere, which would stop any training of the
    inputs or scales; the straight-through estimator treats rounding as the identity instead.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output


def _validate(bits: int, clip_ratio: float) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(
            f"bits={bits!r} is not supported; allowed: {SUPPORTED_BITS[0]}..{SUPPORTED_BITS[-1]}"
        )
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio={clip_ratio!r} is out of range; allowed: (0, 1]")


def fake_quantize(
    x: torch.Tensor, bits: int, clip_ratio: float = 1.0, ste: bool = False
) -> torch.Tensor:
    """Symmetric per-row RTN fake quantization over the last dim.

    ``scale = clip_ratio·max|x_row| / qmax`` with ``qmax = 2^(bits-1) - 1`` and
    ``q = clamp(round(x/scale), -qmax-1, qmax)``; returns ``q·scale`` in the dtype of ``x``.
    Half-precision inputs are computed in float32 so the scale and the rounding are not
    distorted by fp16/bf16 arithmetic. All-zero rows stay zero (the scale is clamped to the
    smallest positive normal float instead of 0, which would give NaN).

    With ``ste=True`` rounding uses :class:`RoundSTE` and the scale stays in the graph, so the
    gradient w.r.t. ``x`` flows both through ``x/scale`` and through the max-based scale;
    values clipped by the clamp get zero gradient through it.
    """
    _validate(bits, clip_ratio)
    if not x.is_floating_point():
        raise TypeError(f"fake_quantize expects a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0:
        raise ValueError("fake_quantize expects at least 1 dim (rows over the last dim)")
    xf = x.to(torch.float32) if x.dtype in _HALF_DTYPES else x
    qmax = 2 ** (bits - 1) - 1
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = (clip_ratio * amax / qmax).clamp(min=torch.finfo(xf.dtype).tiny)
    scaled = xf / scale
    q = RoundSTE.apply(scaled) if ste else torch.round(scaled)
    q = torch.clamp(q, -qmax - 1, qmax)
    return (q * scale).to(x.dtype)


def quantize_weight(
    w: torch.Tensor, bits: int, clip_ratio: float = 1.0, ste: bool = False
) -> torch.Tensor:
    """Fake-quantize a Linear weight ``[out, in]`` with one scale per output channel."""
    return fake_quantize(w, bits, clip_ratio=clip_ratio, ste=ste)


def quantize_activation(
    x: torch.Tensor, bits: int, clip_ratio: float = 1.0, ste: bool = False
) -> torch.Tensor:
    """Fake-quantize activations ``[..., tokens, in]`` with a dynamic scale per token."""
    return fake_quantize(x, bits, clip_ratio=clip_ratio, ste=ste)
