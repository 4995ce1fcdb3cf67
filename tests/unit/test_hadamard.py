"""Tests for smoothrot.core.hadamard and hadamard_constructions: exact constructions,
orthonormality and the fast transform."""

from __future__ import annotations

import importlib.resources
import json
import math

import pytest
import torch

from smoothrot.core import hadamard as hd
from smoothrot.core import hadamard_constructions as hc
from smoothrot.core.hadamard import (
    HadamardSizeError,
    hadamard_matrix,
    hadamard_transform,
    is_supported,
    supported_sizes_near,
)

# size -> expected smallest factor k (n = k * 2**m)
REQUIRED = {
    12: 12,
    20: 20,
    28: 28,
    36: 36,
    44: 44,
    576: 36,
    1024: 1,
    1536: 12,
    2048: 1,
    4096: 1,
    4864: 76,
    5632: 44,
    8192: 1,
    11008: 172,
    14336: 28,
    18944: 148,
}
DENSE_MAX = 1536  # sizes up to this are checked with the full dense matrix
UNSUPPORTED = [3, 6, 7, 10, 13696]
# Hadamard orders <= 200 that none of our constructions reach (4·39, 4·47).
MISSING_UP_TO_200 = {156, 188}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sylvester_row(i: int, size: int) -> torch.Tensor:
    j = torch.arange(size)
    popcount = torch.zeros(size, dtype=torch.int64)
    v = j & i
    while bool(v.any()):
        popcount += v & 1
        v = v >> 1
    return 1 - 2 * (popcount % 2)


def _assert_exact_hadamard(h: torch.Tensor) -> None:
    k = h.shape[0]
    assert h.dtype == torch.int64
    assert h.shape == (k, k)
    assert bool(((h == 1) | (h == -1)).all())
    if k <= 64:
        assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.int64))
    else:  # float64 BLAS is exact here (integer sums <= k << 2**53) and much faster
        hf = h.to(torch.float64)
        assert torch.equal(hf @ hf.T, k * torch.eye(k, dtype=torch.float64))


def _assert_exact_hadamard_int(h: torch.Tensor) -> None:
    k = h.shape[0]
    assert bool(((h == 1) | (h == -1)).all())
    assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.int64))


# --- decomposition and exact integer factors ---------------------------------------------------


@pytest.mark.parametrize("n", sorted(REQUIRED))
def test_required_sizes_decompose(n: int) -> None:
    assert is_supported(n)
    k, m = hc.decompose(n)
    assert k * 2**m == n
    assert k == REQUIRED[n]


@pytest.mark.parametrize("k", sorted({k for k in REQUIRED.values() if k > 1}))
def test_required_factors_are_exact_hadamard(k: int) -> None:
    # With H_k and Sylvester exact, kron(H_k, H_2^m) is Hadamard: this proves every required
    # size, including the ones too large for a dense float check below.
    _assert_exact_hadamard(hc.integer_hadamard(k))


def test_every_supported_factor_up_to_200_is_exact() -> None:
    for n in range(1, 201):
        dec = hc.decompose(n)
        assert (dec is not None) == (n in (1, 2) or (n % 4 == 0 and n not in MISSING_UP_TO_200))
        if dec is not None:
            _assert_exact_hadamard(hc.integer_hadamard(dec[0]))


@pytest.mark.parametrize(
    ("builder", "q"),
    [
        (hc.paley1, 7),
        (hc.paley1, 27),  # GF(3^3)
        (hc.paley1, 243),  # GF(3^5)
        (hc.paley1, 343),  # GF(7^3)
        (hc.paley2, 5),
        (hc.paley2, 9),  # GF(3^2)
        (hc.paley2, 25),  # GF(5^2)
        (hc.paley2, 49),  # GF(7^2)
        (hc.paley2, 125),  # GF(5^3)
    ],
)
def test_paley_constructions_exact(builder, q: int) -> None:
    h = builder(q)
    assert h.shape[0] == (q + 1 if builder is hc.paley1 else 2 * (q + 1))
    _assert_exact_hadamard(h)


def test_kronecker_plan_exact() -> None:
    # 144: 143 = 11·13 is no prime power and 71 ≡ 3 (mod 4), so only a Kronecker product works.
    assert hc.plan(144)[0] == "kronecker"
    _assert_exact_hadamard(hc.integer_hadamard(144))


def test_stored_williamson_data_is_exact() -> None:
    path = importlib.resources.files("smoothrot.core").joinpath("tables/williamson.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert raw["source"]
    assert "43" in raw["orders"]
    for t_str, seqs in raw["orders"].items():
        t = int(t_str)
        assert len(seqs) == 4
        for s in seqs:
            assert len(s) == t
            assert set(s) <= {"+", "-"}
            assert s[1:] == s[1:][::-1], "Williamson sequences must be symmetric"
        h = hc.williamson(t)
        assert h.shape == (4 * t, 4 * t)
        _assert_exact_hadamard_int(h)  # integer arithmetic, as the data file promises
        assert hc.plan(4 * t) is not None


# --- dense matrix -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, *sorted(n for n in REQUIRED if n <= DENSE_MAX)])
def test_dense_orthonormal(n: int) -> None:
    h = hadamard_matrix(n)
    assert h.shape == (n, n)
    assert h.dtype == torch.float64
    err = (h @ h.T - torch.eye(n, dtype=torch.float64)).abs().max().item()
    assert err <= 1e-12
    torch.testing.assert_close(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), rtol=0, atol=1e-15)


@pytest.mark.parametrize("n", sorted(n for n in REQUIRED if n > DENSE_MAX))
def test_large_sizes_orthonormal_sampled_rows(n: int) -> None:
    # Row i of H is hadamard_transform(e_i); a sample of rows gives a block of H H^T.
    k, m = hc.decompose(n)
    size = 2**m
    rows = sorted(set(torch.randperm(n, generator=_gen(n))[:30].tolist()) | {0, n - 1})
    eye_rows = torch.zeros(len(rows), n, dtype=torch.float64)
    eye_rows[torch.arange(len(rows)), torch.tensor(rows)] = 1.0
    h_rows = hadamard_transform(eye_rows)
    gram = h_rows @ h_rows.T
    assert (gram - torch.eye(len(rows), dtype=torch.float64)).abs().max().item() <= 1e-12
    hk = hc.integer_hadamard(k)
    for r, got in zip(rows, h_rows, strict=True):
        expected = torch.kron(hk[r // size], _sylvester_row(r % size, size)).double()
        torch.testing.assert_close(got, expected / math.sqrt(n), rtol=0, atol=1e-12)


def test_hadamard_matrix_dtype_device_and_fresh_copy() -> None:
    h32 = hadamard_matrix(12, dtype=torch.float32, device="cpu")
    assert h32.dtype == torch.float32
    assert h32.device.type == "cpu"
    h32.zero_()  # must not corrupt any cache
    torch.testing.assert_close(
        hadamard_matrix(12, dtype=torch.float32), hadamard_matrix(12).float(), rtol=0, atol=0
    )
    torch.testing.assert_close(hadamard_matrix(1), torch.ones(1, 1, dtype=torch.float64))
    with pytest.raises(TypeError):
        hadamard_matrix(12, dtype=torch.int32)


def test_deterministic() -> None:
    a = hadamard_matrix(172 * 2)
    hc.integer_hadamard.cache_clear()
    hd._factor.cache_clear()
    b = hadamard_matrix(172 * 2)
    assert torch.equal(a, b)


# --- fast transform -----------------------------------------------------------------------------

# 256 and 2048: butterfly stages above the dense 128-point block (hadamard._DENSE_BLOCK).
TRANSFORM_SIZES = [1, 2, 8, 12, 20, 28, 36, 44, 64, 92, 172, 256, 576, 1536, 2048]
BATCH_SHAPES = [(), (3,), (2, 5)]


@pytest.mark.parametrize("n", TRANSFORM_SIZES)
@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_transform_matches_dense_float64(n: int, batch: tuple[int, ...]) -> None:
    x = torch.randn(*batch, n, dtype=torch.float64, generator=_gen(n))
    y = hadamard_transform(x)
    assert y.shape == x.shape
    assert y.dtype == torch.float64
    ref = x @ hadamard_matrix(n)
    assert (y - ref).abs().max().item() <= 1e-10


@pytest.mark.parametrize("n", TRANSFORM_SIZES)
@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_transform_matches_dense_float32(n: int, batch: tuple[int, ...]) -> None:
    x = torch.randn(*batch, n, generator=_gen(n))
    y = hadamard_transform(x)
    assert y.dtype == torch.float32
    ref = (x.double() @ hadamard_matrix(n)).float()
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel <= 1e-5


def test_transform_matches_dense_float32_large() -> None:
    n = 4864
    x = torch.randn(2, n, generator=_gen(1))
    ref = x @ hadamard_matrix(n, dtype=torch.float32)
    y = hadamard_transform(x)
    assert ((y - ref).norm() / ref.norm()).item() <= 1e-5


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("n", [12, 172, 1536, 11008])
def test_transform_half_precision(dtype: torch.dtype, tol: float, n: int) -> None:
    x = torch.randn(3, n, generator=_gen(n)).to(dtype)
    y = hadamard_transform(x)
    assert y.dtype == dtype
    assert y.shape == x.shape
    ref = hadamard_transform(x.double())
    assert ((y.double() - ref).norm() / ref.norm()).item() <= tol


@pytest.mark.parametrize("n", sorted(REQUIRED))
def test_transform_preserves_norm(n: int) -> None:
    x = torch.randn(2 if n > DENSE_MAX else 4, n, dtype=torch.float64, generator=_gen(n))
    y = hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    x32 = x.float()
    torch.testing.assert_close(
        hadamard_transform(x32).norm(dim=-1), x32.norm(dim=-1), rtol=1e-5, atol=0
    )


def test_transform_inverse_is_transpose() -> None:
    n = 172 * 4
    x = torch.randn(5, n, dtype=torch.float64, generator=_gen(3))
    y = hadamard_transform(x)
    torch.testing.assert_close(y @ hadamard_matrix(n).T, x, rtol=0, atol=1e-12)


def test_transform_edge_cases() -> None:
    empty = torch.zeros(0, 12)
    assert hadamard_transform(empty).shape == (0, 12)
    x = torch.randn(4, 12, generator=_gen(4))
    non_contiguous = x.T.contiguous().T
    assert not non_contiguous.is_contiguous()
    torch.testing.assert_close(hadamard_transform(non_contiguous), hadamard_transform(x))
    with pytest.raises(ValueError):
        hadamard_transform(torch.tensor(1.0))
    with pytest.raises(TypeError):
        hadamard_transform(torch.ones(4, dtype=torch.int64))


@pytest.mark.parametrize("n", [20, 64, 172 * 2])
def test_transform_is_differentiable(n: int) -> None:
    # With requires_grad the transform runs as an autograd Function; it must agree with the
    # no-grad path and give the right gradient (H^T applied to the upstream grad; the k-factor of
    # 20 and 172 is not symmetric, so a wrong transpose shows).
    x = torch.randn(2, n, dtype=torch.float64, generator=_gen(5), requires_grad=True)
    w = torch.randn(2, n, dtype=torch.float64, generator=_gen(6))
    y = hadamard_transform(x)
    with torch.no_grad():
        torch.testing.assert_close(y, hadamard_transform(x), rtol=0, atol=1e-12)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, w @ hadamard_matrix(n).T)


@pytest.mark.parametrize("n", [12, 20, 40])
def test_transform_gradient_passes_gradcheck_twice(n: int) -> None:
    x = torch.randn(3, n, dtype=torch.float64, generator=_gen(7), requires_grad=True)
    assert torch.autograd.gradcheck(hadamard_transform, (x,))
    assert torch.autograd.gradgradcheck(hadamard_transform, (x,))


def test_half_precision_gradient_flows() -> None:
    x = torch.randn(4, 24, generator=_gen(8)).to(torch.bfloat16).requires_grad_()
    hadamard_transform(x).float().pow(2).sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), 2 * x.detach().float(), rtol=0.05, atol=0.05)


# --- unsupported sizes --------------------------------------------------------------------------


@pytest.mark.parametrize("n", UNSUPPORTED)
def test_unsupported_sizes_raise(n: int) -> None:
    assert not is_supported(n)
    with pytest.raises(HadamardSizeError, match=rf"\b{n}\b") as info:
        hadamard_matrix(n)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(HadamardSizeError, match=rf"\b{n}\b"):
        hadamard_transform(torch.zeros(2, n))


def test_unsupported_message_suggests_block_size() -> None:
    with pytest.raises(HadamardSizeError, match="block size of 128"):
        hadamard_matrix(13696)
    with pytest.raises(HadamardSizeError, match="nearest supported sizes"):
        hadamard_matrix(6)


@pytest.mark.parametrize("n", [0, -4])
def test_nonpositive_sizes(n: int) -> None:
    assert not is_supported(n)
    with pytest.raises(HadamardSizeError):
        hadamard_matrix(n)


@pytest.mark.parametrize("n", [3, 7, 13696, 11008, 100])
def test_supported_sizes_near(n: int) -> None:
    near = supported_sizes_near(n)
    assert len(near) == 2
    assert near[0] < n < near[1]
    assert all(is_supported(s) for s in near)
    # nothing supported strictly between them other than n itself
    assert all(not is_supported(s) for s in range(near[0] + 1, near[1]) if s != n)
    four = supported_sizes_near(n, count=4)
    assert len(four) == 4 and four == sorted(four)
    assert all(is_supported(s) and s != n for s in four)


def test_supported_sizes_near_small() -> None:
    assert supported_sizes_near(7) == [4, 8]
    assert supported_sizes_near(1) == [2, 4]
    assert supported_sizes_near(5, count=3) == [2, 4, 8]
    assert supported_sizes_near(5, count=0) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [12, 172 * 64, 148 * 128])
def test_transform_cuda_matches_cpu(dtype: torch.dtype, n: int) -> None:
    x = torch.randn(3, n, generator=_gen(n)).to(dtype)
    y = hadamard_transform(x.cuda())
    assert y.device.type == "cuda"
    assert y.dtype == dtype
    ref = hadamard_transform(x.double())
    tol = 1e-5 if dtype == torch.float32 else 1.5e-2
    assert ((y.cpu().double() - ref).norm() / ref.norm()).item() <= tol
    h = hadamard_matrix(12, dtype=dtype, device="cuda")
    assert h.device.type == "cuda"
    assert h.dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available() or hd._cuda_kernel() is None,
                    reason="needs CUDA and the fast-hadamard-transform package")
@pytest.mark.parametrize("n", [64, 1536, 14336])
def test_cuda_kernel_matches_the_butterfly(n: int) -> None:
    x = torch.randn(5, n, generator=_gen(n)).cuda()
    k = n // (n & -n)
    fused = hd._sylvester_part(x.reshape(5, k, n // k))
    torch.testing.assert_close(fused, hd._butterfly(x.reshape(5, k, n // k)),
                               rtol=1e-5, atol=1e-4)
