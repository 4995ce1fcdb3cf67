"""How to build an integer (±1) Hadamard matrix of order ``k``: the combinatorics behind
:mod:`smoothrot.core.hadamard`.

Kept apart from the public API because it is a different kind of code: pure, deterministic
integer constructions (CPU, int64, entries ±1, cached) with no float dtype, device, autograd or
CUDA concern, and checked exactly (``H Hᵀ = kI``) rather than to a tolerance. ``hadamard.py``
only asks two questions of it: which factor ``k`` to use for a size (:func:`decompose`) and the
matrix of that order (:func:`integer_hadamard`).

Constructions, in order of preference (:func:`plan`):

* Sylvester (k a power of two),
* Paley I: order q + 1 for a prime power q ≡ 3 (mod 4),
* Paley II: order 2(q + 1) for a prime power q ≡ 1 (mod 4),
* the Williamson array fed with stored symmetric Williamson sequences
  (``smoothrot/core/tables/williamson.json``; gives 92, 116 and 172 = 4·43, the last needed for
  11008 = 172·64),
* Kronecker products of the above.

Factors larger than :data:`MAX_BASE_ORDER` are not built, and some orders have no construction
here (e.g. 156, 188, 236, 428).
"""

from __future__ import annotations

import functools
import importlib.resources
import itertools
import json
import logging
import math

import torch

__all__ = [
    "MAX_BASE_ORDER",
    "HadamardSizeError",
    "Plan",
    "decompose",
    "integer_hadamard",
    "jacobsthal",
    "paley1",
    "paley2",
    "plan",
    "prime_power",
    "quadratic_character",
    "sylvester",
    "williamson",
    "williamson_data",
]

logger = logging.getLogger(__name__)

# Largest order of the dense factor H_k we build. Beyond this the dense k-part of the transform
# costs more than the rotation is worth and the Paley construction needs q*q memory.
MAX_BASE_ORDER = 4096

# Base matrices up to this order are re-verified (H H^T = kI) right after construction: cheap,
# and a wrong rotation would silently corrupt quantization.
_SELF_CHECK_MAX_ORDER = 256

Plan = tuple[str, int, int]


class HadamardSizeError(ValueError):
    """Raised when no Hadamard matrix of the requested order can be built."""


# ---------------------------------------------------------------------------------------------
# Number theory helpers
# ---------------------------------------------------------------------------------------------


def prime_power(q: int) -> tuple[int, int] | None:
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
def williamson_data() -> dict[int, tuple[str, str, str, str]]:
    """Stored Williamson sequences keyed by their length t (the matrix has order 4t)."""
    path = importlib.resources.files("smoothrot.core").joinpath("tables/williamson.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {int(t): tuple(seqs) for t, seqs in raw["orders"].items()}


@functools.lru_cache(maxsize=4096)
def plan(k: int) -> Plan | None:
    """How to build an integer Hadamard matrix of order ``k``, or None if we cannot.

    Returns ``(kind, a, b)``: ("sylvester", k, 0), ("paley1", q, 0), ("paley2", q, 0),
    ("williamson", t, 0) or ("kronecker", a, b) with ``a * b == k``.
    """
    if k < 1 or k > MAX_BASE_ORDER:
        return None
    if _is_power_of_two(k):
        return ("sylvester", k, 0)
    if k % 4:
        return None  # Hadamard orders > 2 are multiples of 4
    pp = prime_power(k - 1)
    if pp is not None and (k - 1) % 4 == 3:
        return ("paley1", k - 1, 0)
    q = k // 2 - 1
    pp = prime_power(q)
    if pp is not None and q % 4 == 1:
        return ("paley2", q, 0)
    if k // 4 in williamson_data():
        return ("williamson", k // 4, 0)
    for a in range(4, math.isqrt(k) + 1, 4):
        b, rem = divmod(k, a)
        if rem == 0 and b % 4 == 0 and plan(a) is not None and plan(b) is not None:
            return ("kronecker", a, b)
    return None


@functools.lru_cache(maxsize=4096)
def decompose(n: int) -> tuple[int, int] | None:
    """Return ``(k, m)`` with ``n == k * 2**m`` and the smallest buildable ``k``, or None."""
    if n < 1:
        return None
    for m in range(_two_adic(n), -1, -1):
        k = n >> m
        if plan(k) is not None:
            return k, m
    return None


# ---------------------------------------------------------------------------------------------
# Integer constructions (CPU, int64, entries +1/-1)
# ---------------------------------------------------------------------------------------------


def sylvester(size: int) -> torch.Tensor:
    """Sylvester's matrix of order ``size`` (a power of two): H[i, j] = (-1)**popcount(i & j)."""
    h = torch.ones(1, 1, dtype=torch.int64)
    base = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    while h.shape[0] < size:
        h = torch.kron(base, h)
    return h


@functools.lru_cache(maxsize=64)
def quadratic_character(p: int, e: int) -> tuple[int, ...]:
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


def jacobsthal(q: int) -> torch.Tensor:
    """Jacobsthal matrix Q[a, b] = chi(a - b) of GF(q), q a prime power."""
    pp = prime_power(q)
    if pp is None:
        raise ValueError(f"{q} is not a prime power")
    p, e = pp
    chi = torch.tensor(quadratic_character(p, e), dtype=torch.int64)
    codes = torch.arange(q, dtype=torch.int64)
    diff = torch.zeros(q, q, dtype=torch.int64)
    for j in range(e):
        digit = (codes // p**j) % p
        diff += ((digit[:, None] - digit[None, :]) % p) * p**j
    return chi[diff]


def paley1(q: int) -> torch.Tensor:
    """Paley I, order q + 1 for q ≡ 3 (mod 4): [[1, 1^T], [-1, Q + I]]."""
    jac = jacobsthal(q)
    h = torch.empty(q + 1, q + 1, dtype=torch.int64)
    h[0, :] = 1
    h[1:, 0] = -1
    h[1:, 1:] = jac + torch.eye(q, dtype=torch.int64)
    return h


def paley2(q: int) -> torch.Tensor:
    """Paley II, order 2(q + 1) for q ≡ 1 (mod 4), from the symmetric conference matrix C."""
    jac = jacobsthal(q)
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


def williamson(t: int) -> torch.Tensor:
    """Williamson array, order 4t, from four stored symmetric circulant blocks."""
    a, b, c, d = (
        _circulant(torch.tensor([1 if ch == "+" else -1 for ch in seq], dtype=torch.int64))
        for seq in williamson_data()[t]
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
def integer_hadamard(k: int) -> torch.Tensor:
    """Integer (+1/-1) Hadamard matrix of order ``k`` (CPU int64). Cached: do not modify."""
    how = plan(k)
    if how is None:
        raise HadamardSizeError(f"no Hadamard construction for order {k}")
    kind, a, b = how
    if kind == "sylvester":
        h = sylvester(a)
    elif kind == "paley1":
        h = paley1(a)
    elif kind == "paley2":
        h = paley2(a)
    elif kind == "williamson":
        h = williamson(a)
    else:
        h = torch.kron(integer_hadamard(a), integer_hadamard(b))
    logger.debug("built Hadamard factor of order %d via %s", k, how)
    if k <= _SELF_CHECK_MAX_ORDER:
        hf = h.to(torch.float64)  # exact: integer sums of magnitude <= k, far below 2**53
        if not torch.equal(hf @ hf.T, k * torch.eye(k, dtype=torch.float64)):
            raise RuntimeError(f"internal error: construction {how} is not Hadamard")
    return h
