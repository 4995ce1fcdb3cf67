"""Orthonormal Hadamard matrices and a fast Hadamard transform.

Rotating activations and weights by an orthonormal Hadamard matrix spreads outliers evenly over
all channels, which is what makes W4A4/W8A8 quantization after smoothing work. LLM hidden sizes
are rarely powers of two (11008, 14336, 18944, ...), so a size ``n`` is written as
``n = k * 2**m`` with the smallest ``k`` for which a Hadamard matrix ``H_k`` is known, and

    H_n = (H_k ⊗ H_{2**m}) / sqrt(n)        (Kronecker product, k-factor outer)

where ``H_{2**m}`` is Sylvester's matrix. ``H_k`` comes from Sylvester, Paley I/II, stored
Williamson sequences or Kronecker products of these (the integer constructions and the choice
among them live in :mod:`smoothrot.core.hadamard_constructions`).

This module is the float-facing part: the public API (sizes, the orthonormal matrix, the fast
transform with its autograd rule and the optional CUDA kernel); it sees the integer factor only
through ``decompose`` and ``integer_hadamard``, so the combinatorics can be read and tested
exactly on their own.

Factors larger than 4096 are not built (the dense k-part would dominate the cost), and some
orders have no construction (e.g. 156, 188, 236, 428; so 13696 = 428·32 is unsupported).
Unsupported sizes raise :class:`HadamardSizeError` naming the nearest supported sizes and a
block size for a block-diagonal rotation.

The construction is deterministic, so every process builds the same rotation for the same
size. :func:`hadamard_transform` applies ``x @ hadamard_matrix(n)`` in O(n log n + n·k) with a
Walsh–Hadamard butterfly on the ``2**m`` part (its low bits as one dense 128-point GEMM) and a
small dense matmul on the ``k`` part.
"""

from __future__ import annotations

import functools
import logging
import math
import operator

import torch

from smoothrot.core.hadamard_constructions import (
    HadamardSizeError,
    decompose,
    integer_hadamard,
    sylvester,
)

__all__ = [
    "HadamardSizeError",
    "hadamard_matrix",
    "hadamard_transform",
    "is_supported",
    "supported_sizes_near",
]

logger = logging.getLogger(__name__)

_HALF_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=64)
def _factor(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Unnormalised +1/-1 factor H_k in ``dtype`` on ``device`` (cached for the transform)."""
    return integer_hadamard(k).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _as_order(n: int) -> int:
    if isinstance(n, bool):
        raise TypeError("Hadamard order must be an int, not bool")
    return operator.index(n)


def is_supported(n: int) -> bool:
    """Whether :func:`hadamard_matrix` / :func:`hadamard_transform` can handle size ``n``."""
    return decompose(_as_order(n)) is not None


def supported_sizes_near(n: int, count: int = 2) -> list[int]:
    """The ``count`` supported sizes nearest to ``n`` (``n`` itself excluded), ascending.

    Candidates are taken alternately below and above ``n`` (nearest first), so the default
    ``count=2`` gives the closest supported size below and the closest above; when nothing is
    left below, the rest comes from above.
    """
    n = _as_order(n)
    if count <= 0:
        return []
    below: list[int] = []
    c = n - 1
    while c >= 1 and len(below) < count:
        if decompose(c) is not None:
            below.append(c)
        c -= 1
    above: list[int] = []
    c = max(n + 1, 1)
    while len(above) < count:  # terminates: every power of two is supported
        if decompose(c) is not None:
            above.append(c)
        c += 1
    picked: list[int] = []
    i = j = 0
    while len(picked) < count:
        if i < len(below) and (len(picked) % 2 == 0 or j >= len(above)):
            picked.append(below[i])
            i += 1
        else:
            picked.append(above[j])
            j += 1
    return sorted(picked)


def _largest_supported_divisor(n: int) -> int:
    """Largest supported d < n dividing n (1 if none): a block size for block-diagonal use."""
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d:
            continue
        for cand in (d, n // d):
            if cand < n and cand > best and decompose(cand) is not None:
                best = cand
    return best


def _require(n: int) -> tuple[int, int]:
    """Decompose ``n`` or raise a HadamardSizeError that says what to do instead."""
    n = _as_order(n)
    dec = decompose(n)
    if dec is not None:
        return dec
    if n < 1:
        raise HadamardSizeError(f"Hadamard order must be positive, got n={n}")
    near = ", ".join(str(s) for s in supported_sizes_near(n))
    block = _largest_supported_divisor(n)
    if block > 1:
        hint = (
            f"use a block-diagonal Hadamard with a supported block size that divides {n} "
            f"(e.g. use a block size of {block})"
        )
    else:
        hint = f"no supported block size > 1 divides {n}; pad the dimension to a supported size"
    raise HadamardSizeError(
        f"no Hadamard matrix of order n={n} is available (nearest supported sizes: {near}); {hint}"
    )


def hadamard_matrix(
    n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """Orthonormal n×n Hadamard matrix H (H @ H.T == I), deterministic.

    ``H = kron(H_k, H_{2**m}) / sqrt(n)`` with the decomposition described in the module
    docstring. A fresh tensor is returned on every call (the full matrix is not cached: at
    n = 18944 it is 2.9 GB in float64).
    """
    k, m = _require(n)
    if not dtype.is_floating_point:
        raise TypeError(f"hadamard_matrix needs a floating dtype, got {dtype}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    outer = _factor(k, dtype, device)
    inner = sylvester(1 << m).to(device=device, dtype=dtype)
    return torch.kron(outer, inner).mul_(1.0 / math.sqrt(n))


# The last log2(_DENSE_BLOCK) butterfly stages combine pairs only 1..64 values apart: strided
# adds that run ~3x slower on CPU than one (..., 128) @ H_128 GEMM doing all of them at once
# (1536 = 12 * 128 at 2048 tokens, 2-core Xeon: 13.0 -> 3.7 ms). The GEMM sums in another order,
# so rotated values differ from the pure butterfly's at float rounding.
_DENSE_BLOCK = 128


@functools.lru_cache(maxsize=16)
def _sylvester_block(size: int, scale: float, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """``scale`` × the Sylvester matrix of the dense block, cached like :func:`_factor`."""
    return (sylvester(size).to(torch.float64) * scale).to(device=device, dtype=dtype)


def _butterfly(y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale`` × the Walsh–Hadamard transform (Sylvester order) along the last dim of y.

    ``H_{2^m} = H_{2^m / b} ⊗ H_b`` with ``b = min(2^m, _DENSE_BLOCK)``: the stages of the top
    bits run as a butterfly from the top bit down (each combines the pairs (i, i + h) within
    blocks of 2h into a ping-pong buffer, writing sums and differences as contiguous runs of
    h >= b values), the low bits as one dense GEMM with ``H_b``. The stages commute, so the
    order does not change the result beyond rounding. ``scale`` rides in the dense block (the
    orthonormal transform's 1/sqrt(n) costs no pass of its own).
    """
    size = y.shape[-1]
    if size == 1 or y.numel() == 0:
        return y * scale
    block = min(size, _DENSE_BLOCK)
    src = y.reshape(-1, size)
    buffers: list[torch.Tensor] = []
    h, stage = size // 2, 0
    while h >= block:
        if len(buffers) < 2:
            buffers.append(torch.empty_like(src, memory_format=torch.contiguous_format))
        dst = buffers[stage % 2]
        pairs = src.reshape(-1, size // (2 * h), 2, h)
        out = dst.view(-1, size // (2 * h), 2, h)
        torch.add(pairs[:, :, 0], pairs[:, :, 1], out=out[:, :, 0])
        torch.sub(pairs[:, :, 0], pairs[:, :, 1], out=out[:, :, 1])
        src, h, stage = dst, h // 2, stage + 1
    dense = _sylvester_block(block, scale, y.dtype, y.device)
    return torch.matmul(src.reshape(-1, block), dense).view(y.shape)


@functools.cache
def _cuda_kernel() -> object | None:
    """The fused CUDA kernel ``fast_hadamard_transform.hadamard_transform``, if installed."""
    try:
        from fast_hadamard_transform import hadamard_transform as kernel
    except ImportError:
        return None
    logger.info("using the fast-hadamard-transform CUDA kernel for power-of-two factors")
    return kernel


# The fused kernel's limits: float32/half inputs, power-of-two sizes up to 2**15.
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KERNEL_MAX_SIZE = 1 << 15


def _sylvester_part(y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale`` × the Sylvester transform of the last dim: the fused CUDA kernel where it
    applies (same Sylvester order and scale argument), else the torch butterfly."""
    size = y.shape[-1]
    kernel = _cuda_kernel() if y.is_cuda else None
    if kernel is None or y.dtype not in _KERNEL_DTYPES or not 1 < size <= _KERNEL_MAX_SIZE:
        return _butterfly(y, scale)
    return kernel(y.reshape(-1, size).contiguous(), scale).reshape(y.shape)


def _apply(x: torch.Tensor, transpose: bool) -> torch.Tensor:
    """x @ H (or x @ Hᵀ) without autograd; x is [..., n] in a float32/float64 dtype."""
    n = x.shape[-1]
    k, m = _require(n)
    y = _sylvester_part(x.reshape(-1, k, 1 << m), 1.0 / math.sqrt(n))
    if k > 1:
        # (x @ kron(A, B))[a-block] = Aᵀ·X·B with X = x viewed as [k, 2**m]; B is symmetric,
        # so x @ kron(A, B)ᵀ = A·X·B.
        a = _factor(k, x.dtype, x.device)
        y = torch.matmul(a if transpose else a.T, y)
    return y.reshape(x.shape)


class _Hadamard(torch.autograd.Function):
    """x ↦ x·H with the gradient g ↦ g·Hᵀ, itself a fast transform (and differentiable again).

    Letting autograd record the butterfly stage by stage costs a copy per stage; the transposed
    transform is the exact gradient at the cost of one forward.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor,
                transpose: bool) -> torch.Tensor:
        ctx.transpose = transpose
        return _apply(x, transpose)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _Hadamard.apply(grad, not ctx.transpose), None


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Return ``x @ hadamard_matrix(x.shape[-1])`` in O(n log n + n·k), same dtype/device as x.

    Works for any leading batch shape. float16/bfloat16 inputs are computed in float32 and cast
    back: the unnormalised butterfly sums grow by up to a factor n and would overflow float16.
    Differentiable (the gradient is the transposed fast transform).
    """
    if x.dim() == 0:
        raise ValueError("hadamard_transform needs at least one dimension")
    if not x.dtype.is_floating_point:
        raise TypeError(f"hadamard_transform needs a floating tensor, got {x.dtype}")
    _require(x.shape[-1])
    compute = torch.float32 if x.dtype in _HALF_DTYPES else x.dtype
    y = x.to(compute)
    if torch.is_grad_enabled() and y.requires_grad:
        y = _Hadamard.apply(y, False)
    else:
        y = _apply(y, False)
    return y.to(x.dtype)
