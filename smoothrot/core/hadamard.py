"""Orthonormal Hadamard matrices and a fast Hadamard transform.

Rotating activations and weights by an orthonormal Hadamard matrix spreads outliers evenly over
all channels, which is what makes W4A4/W8A8 quantization after smoothing work. LLM hidden sizes
are rarely powers of two (11008, 14336, 18944, ...), so a size ``n`` is written as
``n = k * 2**m`` with the smallest ``k`` for which a Hadamard matrix ``H_k`` is known, and

    H_n = (H_k ⊗ H_{2**m}) / sqrt(n)        (Kronecker product, k-factor outer)

where ``H_{2**m}`` is Sylvester's matrix. ``H_k`` comes from, in order of preference:

* Sylvester (k a power of two),
* Paley I: order q + 1 for a prime power q ≡ 3 (mod 4),
* Paley II: order 2(q + 1) for a prime power q ≡ 1 (mod 4),
* the Williamson array fed with stored symmetric Williamson sequences
  (``smoothrot/core/tables/williamson.json``; gives 92, 116 and 172 = 4·43, the last needed for
  11008 = 172·64),
* Kronecker products of the above.

Factors larger than 4096 are not built (the dense k-part would dominate the cost), and some
orders have no construction here (e.g. 156, 188, 236, 428; so 13696 = 428·32 is unsupported).
Unsupported sizes raise :class:`HadamardSizeError` naming the nearest supported sizes and a
block size for a block-diagonal rotation.

The construction is deterministic, so every process builds the same rotation for the same
size. :func:`hadamard_transform` applies ``x @ hadamard_matrix(n)`` in O(n log n + n·k) with a
Walsh–Hadamard butterfly on the ``2**m`` part and a small dense matmul on the ``k`` part.
"""

from __future__ import annotations

import functools
import importlib.resources
import itertools
import json
import logging
import math
import operator

import torch

__all__ = [
    "HadamardSizeError",
    "hadamard_matrix",
    "hadamard_transform",
    "is_supported",
    "supported_sizes_near",
]

logger = logging.getLogger(__name__)

# Largest order of the dense factor H_k we build. Beyond this the dense k-part of the transform
# costs more than the rotation is worth and the Paley construction needs q*q memory.
_MAX_BASE_ORDER = 4096

# Base matrices up to this order are re-verified (H H^T = kI) right after construction: cheap,
# and a wrong rotation would silently corrupt quantization.
_SELF_CHECK_MAX_ORDER = 256

_HALF_DTYPES = (torch.float16, torch.bfloat16)

Plan = tuple[str, int, int]


class HadamardSizeError(ValueError):
    """Raised when no Hadamard matrix of the requested order can be built."""


# ---------------------------------------------------------------------------------------------
# Number theory helpers
# ---------------------------------------------------------------------------------------------


def _prime_power(q: int) -> tuple[int, int] | None:
    """Return ``(p, e)`` with ``q == p**e`` for a prime ``p``, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _two_adic(n: int) -> int:
    """Exponent of the largest power of two dividing ``n`` (n >= 1)."""
    return (n & -n).bit_length() - 1


# ---------------------------------------------------------------------------------------------
# Choosing a construction (pure arithmetic: cheap, no matrices built)
# ---------------------------------------------------------------------------------------------


@functools.cache
def _williamson_data() -> dict[int, tuple[str, str, str, str]]:
    """Stored Williamson sequences keyed by their length t (the matrix has order 4t)."""
    path = importlib.resources.files("smoothrot.core").joinpath("tables/williamson.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {int(t): tuple(seqs) for t, seqs in raw["orders"].items()}


@functools.lru_cache(maxsize=4096)
def _plan(k: int) -> Plan | None:
    """How to build an integer Hadamard matrix of order ``k``, or None if we cannot.

    Returns ``(kind, a, b)``: ("sylvester", k, 0), ("paley1", q, 0), ("paley2", q, 0),
    ("williamson", t, 0) or ("kronecker", a, b) with ``a * b == k``.
    """
    if k < 1 or k > _MAX_BASE_ORDER:
        return None
    if _is_power_of_two(k):
        return ("sylvester", k, 0)
    if k % 4:
        return None  # Hadamard orders > 2 are multiples of 4
    pp = _prime_power(k - 1)
    if pp is not None and (k - 1) % 4 == 3:
        return ("paley1", k - 1, 0)
    q = k // 2 - 1
    pp = _prime_power(q)
    if pp is not None and q % 4 == 1:
        return ("paley2", q, 0)
    if k // 4 in _williamson_data():
        return ("williamson", k // 4, 0)
    for a in range(4, math.isqrt(k) + 1, 4):
        b, rem = divmod(k, a)
        if rem == 0 and b % 4 == 0 and _plan(a) is not None and _plan(b) is not None:
            return ("kronecker", a, b)
    return None


@functools.lru_cache(maxsize=4096)
def _decompose(n: int) -> tuple[int, int] | None:
    """Return ``(k, m)`` with ``n == k * 2**m`` and the smallest buildable ``k``, or None."""
    if n < 1:
        return None
    for m in range(_two_adic(n), -1, -1):
        k = n >> m
        if _plan(k) is not None:
            return k, m
    return None


# ---------------------------------------------------------------------------------------------
# Integer constructions (CPU, int64, entries +1/-1)
# ---------------------------------------------------------------------------------------------


def _sylvester(size: int) -> torch.Tensor:
    """Sylvester's matrix of order ``size`` (a power of two): H[i, j] = (-1)**popcount(i & j)."""
    h = torch.ones(1, 1, dtype=torch.int64)
    base = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    while h.shape[0] < size:
        h = torch.kron(base, h)
    return h


@functools.lru_cache(maxsize=64)
def _quadratic_character(p: int, e: int) -> tuple[int, ...]:
    """Quadratic character of GF(p**e), indexed by element code.

    An element sum(c_i x^i) is coded as sum(c_i p^i), so field addition is digit-wise addition
    mod p. We search (deterministically) for a monic f of degree e for which x has multiplicative
    order q - 1 mod f; then f is primitive, the powers of x enumerate the nonzero elements, and
    x**i is a square iff i is even.
    """
    q = p**e
    for tail in itertools.product(range(p), repeat=e):  # f = x^e + sum(tail[i] x^i)
        if tail[0] == 0:
            continue  # x would not be a unit
        chi = [0] * q
        cur = [1] + [0] * (e - 1)
        for i in range(q - 1):
            code = sum(c * p**j for j, c in enumerate(cur))
            if i and code == 1:
                break  # order of x is smaller than q - 1: f is not primitive
            chi[code] = 1 if i % 2 == 0 else -1
            lead = cur[-1]  # multiply by x and reduce with x^e = -sum(tail[i] x^i)
            cur = [(prev - lead * t) % p for prev, t in zip([0, *cur[:-1]], tail, strict=True)]
        else:
            if cur == [1] + [0] * (e - 1):
                return tuple(chi)
    raise AssertionError(f"no primitive polynomial found for GF({p}^{e})")  # pragma: no cover


def _jacobsthal(q: int) -> torch.Tensor:
    """Jacobsthal matrix Q[a, b] = chi(a - b) of GF(q), q a prime power."""
    pp = _prime_power(q)
    if pp is None:
        raise ValueError(f"{q} is not a prime power")
    p, e = pp
    chi = torch.tensor(_quadratic_character(p, e), dtype=torch.int64)
    codes = torch.arange(q, dtype=torch.int64)
    diff = torch.zeros(q, q, dtype=torch.int64)
    for j in range(e):
        digit = (codes // p**j) % p
        diff += ((digit[:, None] - digit[None, :]) % p) * p**j
    return chi[diff]


def _paley1(q: int) -> torch.Tensor:
    """Paley I, order q + 1 for q ≡ 3 (mod 4): [[1, 1^T], [-1, Q + I]]."""
    jac = _jacobsthal(q)
    h = torch.empty(q + 1, q + 1, dtype=torch.int64)
    h[0, :] = 1
    h[1:, 0] = -1
    h[1:, 1:] = jac + torch.eye(q, dtype=torch.int64)
    return h


def _paley2(q: int) -> torch.Tensor:
    """Paley II, order 2(q + 1) for q ≡ 1 (mod 4), from the symmetric conference matrix C."""
    jac = _jacobsthal(q)
    conf = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    conf[0, 1:] = 1
    conf[1:, 0] = 1
    conf[1:, 1:] = jac
    plus = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    minus = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    return torch.kron(conf, plus) + torch.kron(torch.eye(q + 1, dtype=torch.int64), minus)


def _circulant(first_row: torch.Tensor) -> torch.Tensor:
    t = first_row.numel()
    idx = (torch.arange(t)[None, :] - torch.arange(t)[:, None]) % t
    return first_row[idx]


def _williamson(t: int) -> torch.Tensor:
    """Williamson array, order 4t, from four stored symmetric circulant blocks."""
    a, b, c, d = (
        _circulant(torch.tensor([1 if ch == "+" else -1 for ch in seq], dtype=torch.int64))
        for seq in _williamson_data()[t]
    )
    return torch.cat(
        [
            torch.cat([a, b, c, d], dim=1),
            torch.cat([-b, a, -d, c], dim=1),
            torch.cat([-c, d, a, -b], dim=1),
            torch.cat([-d, -c, b, a], dim=1),
        ],
        dim=0,
    )


@functools.lru_cache(maxsize=64)
def _integer_hadamard(k: int) -> torch.Tensor:
    """Integer (+1/-1) Hadamard matrix of order ``k`` (CPU int64). Cached: do not modify."""
    plan = _plan(k)
    if plan is None:
        raise HadamardSizeError(f"no Hadamard construction for order {k}")
    kind, a, b = plan
    if kind == "sylvester":
        h = _sylvester(a)
    elif kind == "paley1":
        h = _paley1(a)
    elif kind == "paley2":
        h = _paley2(a)
    elif kind == "williamson":
        h = _williamson(a)
    else:
        h = torch.kron(_integer_hadamard(a), _integer_hadamard(b))
    logger.debug("built Hadamard factor of order %d via %s", k, plan)
    if k <= _SELF_CHECK_MAX_ORDER:
        hf = h.to(torch.float64)  # exact: integer sums of magnitude <= k, far below 2**53
        if not torch.equal(hf @ hf.T, k * torch.eye(k, dtype=torch.float64)):
            raise RuntimeError(f"internal error: construction {plan} is not Hadamard")
    return h


@functools.lru_cache(maxsize=64)
def _factor(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Unnormalised +1/-1 factor H_k in ``dtype`` on ``device`` (cached for the transform)."""
    return _integer_hadamard(k).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _as_order(n: int) -> int:
    if isinstance(n, bool):
        raise TypeError("Hadamard order must be an int, not bool")
    return operator.index(n)


def is_supported(n: int) -> bool:
    """Whether :func:`hadamard_matrix` / :func:`hadamard_transform` can handle size ``n``."""
    return _decompose(_as_order(n)) is not None


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
        if _decompose(c) is not None:
            below.append(c)
        c -= 1
    above: list[int] = []
    c = max(n + 1, 1)
    while len(above) < count:  # terminates: every power of two is supported
        if _decompose(c) is not None:
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
            if cand < n and cand > best and _decompose(cand) is not None:
                best = cand
    return best


def _require(n: int) -> tuple[int, int]:
    """Decompose ``n`` or raise a HadamardSizeError that says what to do instead."""
    n = _as_order(n)
    dec = _decompose(n)
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
    inner = _sylvester(1 << m).to(device=device, dtype=dtype)
    return torch.kron(outer, inner).mul_(1.0 / math.sqrt(n))


def _butterfly(y: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform (Sylvester order) along the last dim of y.

    Each stage combines the two halves of the index (top bit) and writes the result interleaved
    (as the lowest bit) into a ping-pong buffer. After log2(size) stages every bit has been
    transformed once and is back in place.
    """
    size = y.shape[-1]
    if size == 1 or y.numel() == 0:
        return y
    half = size // 2
    src = y.reshape(-1, size)
    first = torch.empty_like(src, memory_format=torch.contiguous_format)
    buffers = (first, torch.empty_like(first))
    for stage in range(size.bit_length() - 1):
        dst = buffers[stage % 2]
        pairs = src.reshape(-1, 2, half)
        out = dst.view(-1, half, 2)
        torch.add(pairs[:, 0], pairs[:, 1], out=out[..., 0])
        torch.sub(pairs[:, 0], pairs[:, 1], out=out[..., 1])
        src = dst
    return src.view(y.shape)


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


def _sylvester_part(y: torch.Tensor) -> torch.Tensor:
    """Unnormalised Sylvester transform of the last dim: the fused CUDA kernel where it applies
    (same Sylvester order, scale 1), else the torch butterfly."""
    size = y.shape[-1]
    kernel = _cuda_kernel() if y.is_cuda else None
    if kernel is None or y.dtype not in _KERNEL_DTYPES or not 1 < size <= _KERNEL_MAX_SIZE:
        return _butterfly(y)
    return kernel(y.reshape(-1, size).contiguous(), 1.0).reshape(y.shape)


def _apply(x: torch.Tensor, transpose: bool) -> torch.Tensor:
    """x @ H (or x @ Hᵀ) without autograd; x is [..., n] in a float32/float64 dtype."""
    n = x.shape[-1]
    k, m = _require(n)
    y = _sylvester_part(x.reshape(-1, k, 1 << m))
    if k > 1:
        # (x @ kron(A, B))[a-block] = Aᵀ·X·B with X = x viewed as [k, 2**m]; B is symmetric,
        # so x @ kron(A, B)ᵀ = A·X·B.
        a = _factor(k, x.dtype, x.device)
        y = torch.matmul(a if transpose else a.T, y)
    return (y * (1.0 / math.sqrt(n))).reshape(x.shape)


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
