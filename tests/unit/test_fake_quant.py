"""Symmetric per-row RTN fake quantization: grid, error bound, dtypes and STE gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smoothrot.fake_quant import (
    SUPPORTED_BITS,
    RoundSTE,
    fake_quantize,
    quantize_activation,
    quantize_weight,
)


def _scale(x: torch.Tensor, bits: int, clip_ratio: float = 1.0) -> torch.Tensor:
    """The per-row scale the quantizer is documented to use (float32)."""
    xf = x.float()
    qmax = 2 ** (bits - 1) - 1
    amax = xf.abs().amax(dim=-1, keepdim=True)
    return (clip_ratio * amax / qmax).clamp(min=torch.finfo(torch.float32).tiny)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Rows with very different magnitudes, so per-row scaling actually matters.
    return torch.randn(*shape, generator=gen) * torch.logspace(-3, 3, shape[-2]).unsqueeze(-1)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_idempotent(bits: int) -> None:
    x = _randn(32, 64, seed=bits)
    q = fake_quantize(x, bits)
    assert torch.equal(fake_quantize(q, bits), q)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_error_within_half_step(bits: int) -> None:
    x = _randn(48, 96, seed=10 + bits)
    scale = _scale(x, bits)
    err = (fake_quantize(x, bits) - x).abs()
    assert torch.all(err <= scale / 2 * (1 + 1e-5) + 1e-30)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("clip_ratio", [1.0, 0.8, 0.5])
def test_values_on_grid(bits: int, clip_ratio: float) -> None:
    x = _randn(16, 300, seed=bits)
    qmax = 2 ** (bits - 1) - 1
    scale = _scale(x, bits, clip_ratio)
    codes = fake_quantize(x, bits, clip_ratio=clip_ratio) / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    codes = codes.round()
    assert codes.min() >= -qmax - 1
    assert codes.max() <= qmax
    for row in codes:
        assert row.unique().numel() <= 2**bits


def test_clipping_saturates_large_values() -> None:
    x = torch.tensor([[-10.0, -1.0, 0.5, 2.0, 10.0]])
    q = fake_quantize(x, 4, clip_ratio=0.5)
    scale = 0.5 * 10.0 / 7
    assert q[0, -1] == pytest.approx(7 * scale)
    assert q[0, 0] == pytest.approx(-8 * scale)  # the negative side has one more level


def test_zero_rows_give_zeros() -> None:
    x = _randn(4, 32, seed=1)
    x[2] = 0.0
    for ste in (False, True):
        q = fake_quantize(x, 4, ste=ste)
        assert torch.isfinite(q).all()
        assert torch.equal(q[2], torch.zeros(32))
    assert torch.equal(fake_quantize(torch.zeros(3, 8), 8), torch.zeros(3, 8))


def test_rows_are_independent() -> None:
    x = _randn(2, 5, 40, seed=2)
    q = quantize_activation(x, 4)
    for b in range(2):
        for t in range(5):
            assert torch.equal(q[b, t], fake_quantize(x[b, t], 4))
    # A huge outlier in one token must not change any other token.
    y = x.clone()
    y[0, 3, 7] = 1e6
    qy = quantize_activation(y, 4)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3] = False
    assert torch.equal(qy[mask], q[mask])


def test_w8_much_more_accurate_than_w4() -> None:
    w = _randn(64, 256, seed=3)
    err4 = (quantize_weight(w, 4) - w).pow(2).mean()
    err8 = (quantize_weight(w, 8) - w).pow(2).mean()
    # Each extra bit halves the step (quarters the MSE): expect roughly 4^4 = 256x.
    assert err8 * 100 < err4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_preserved(dtype: torch.dtype) -> None:
    x = _randn(8, 64, seed=4).to(dtype)
    q = fake_quantize(x, 4)
    assert q.dtype == dtype
    if dtype != torch.float64:
        # Half inputs are quantized in float32, then cast back once.
        assert torch.equal(q, fake_quantize(x.float(), 4).to(dtype))


def test_ste_forward_matches_plain() -> None:
    x = _randn(8, 64, seed=5)
    for clip in (1.0, 0.7):
        assert torch.equal(
            fake_quantize(x, 4, clip_ratio=clip, ste=True), fake_quantize(x, 4, clip_ratio=clip)
        )


def test_ste_gradient() -> None:
    x = _randn(6, 50, seed=6).requires_grad_(True)
    fake_quantize(x, 4, ste=True).sum().backward()
    grad = x.grad
    assert grad is not None
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    # Entries that do not set the row max only see d(q·s)/dx = s·(1/s) = 1 exactly: the
    # scale-path gradient lands on the argmax entry alone.
    argmax = x.detach().abs().argmax(dim=-1, keepdim=True)
    not_max = torch.ones_like(grad, dtype=torch.bool).scatter(-1, argmax, False)
    assert torch.equal(grad[not_max], torch.ones_like(grad[not_max]))
    # The plain (non-STE) path is flat almost everywhere, which is why training needs the STE.
    y = x.detach().clone().requires_grad_(True)
    fake_quantize(y, 4).sum().backward()
    assert y.grad is not None
    assert torch.equal(y.grad[not_max], torch.zeros_like(y.grad[not_max]))


def test_ste_gradient_with_detached_scale_is_identity_inside_range() -> None:
    """Rebuild Q with a constant scale: the gradient is exactly 1 inside, 0 where clipped."""
    bits, clip = 4, 0.5
    qmax = 2 ** (bits - 1) - 1
    x = _randn(6, 50, seed=7).requires_grad_(True)
    scale = _scale(x.detach(), bits, clip)
    out = torch.clamp(RoundSTE.apply(x / scale), -qmax - 1, qmax) * scale
    out.sum().backward()
    assert x.grad is not None
    inside = ((x.detach() / scale).round() >= -qmax - 1) & ((x.detach() / scale).round() <= qmax)
    assert torch.equal(x.grad[inside], torch.ones_like(x.grad[inside]))
    assert torch.equal(x.grad[~inside], torch.zeros_like(x.grad[~inside]))
    assert (~inside).any()
    # The real function agrees on clipped, non-argmax entries: the clamp blocks their gradient.
    y = x.detach().clone().requires_grad_(True)
    fake_quantize(y, bits, clip_ratio=clip, ste=True).sum().backward()
    assert y.grad is not None
    argmax = y.detach().abs().argmax(dim=-1, keepdim=True)
    not_max = torch.ones_like(y.grad, dtype=torch.bool).scatter(-1, argmax, False)
    assert torch.equal(y.grad[not_max], x.grad[not_max])


def test_half_input_gradient_dtype() -> None:
    x = _randn(4, 32, seed=8).to(torch.bfloat16).requires_grad_(True)
    fake_quantize(x, 8, ste=True).float().sum().backward()
    assert x.grad is not None
    assert x.grad.dtype == torch.bfloat16
    assert torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("bits", [0, 1, 9, 16, True])
def test_invalid_bits(bits: int) -> None:
    with pytest.raises(ValueError, match=rf"bits={bits}.*2\.\.8"):
        fake_quantize(torch.ones(2, 2), bits)


@pytest.mark.parametrize("clip_ratio", [0.0, -0.5, 1.01, float("nan")])
def test_invalid_clip_ratio(clip_ratio: float) -> None:
    with pytest.raises(ValueError, match=r"clip_ratio=.*\(0, 1\]"):
        fake_quantize(torch.ones(2, 2), 4, clip_ratio=clip_ratio)


_FLOATS = st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_subnormal=False)


@settings(max_examples=80, deadline=None)
@given(
    rows=st.integers(1, 40).flatmap(
        lambda cols: st.lists(
            st.lists(_FLOATS, min_size=cols, max_size=cols), min_size=1, max_size=6
        )
    ),
    bits=st.sampled_from(SUPPORTED_BITS),
)
def test_property_idempotent_and_half_step(rows: list[list[float]], bits: int) -> None:
    x = torch.tensor(rows, dtype=torch.float32)
    q = fake_quantize(x, bits)
    assert torch.isfinite(q).all()
    assert torch.equal(fake_quantize(q, bits), q)
    err = (q - x).abs()
    assert torch.all(err <= _scale(x, bits) / 2 * (1 + 1e-5) + 1e-30)
