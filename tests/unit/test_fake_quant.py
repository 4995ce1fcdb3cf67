"""RTN fake quantization: the per-row symmetric integer quantizer (grid, error bound, dtypes,
STE, pinned to the original W4A4/W8A8 arithmetic) and the scheme-level options (groups,
asymmetric, MSE clip search, scheme entry points)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smoothrot.core.quantizers import (
    INT_BITS,
    MSE_CLIP_GRID,
    Quantizer,
    RoundSTE,
    quantize_activation_spec,
    quantize_weight_spec,
)
from smoothrot.schema.errors import ConfigError
from smoothrot.schema.quant import PRESET_SCHEMES, QuantScheme, get_scheme


def _scale(x: torch.Tensor, bits: int, clip_ratio: float = 1.0) -> torch.Tensor:
    """The per-row scale the quantizer is documented to use (half inputs in float32)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    qmax = 2 ** (bits - 1) - 1
    amax = xf.abs().amax(dim=-1, keepdim=True)
    return (clip_ratio * amax / qmax).clamp(min=torch.finfo(xf.dtype).tiny)


def _reference(x: torch.Tensor, bits: int, clip_ratio: float = 1.0) -> torch.Tensor:
    """The original W4A4/W8A8 arithmetic written out: symmetric RTN, one scale per row.

    Stored results and exported scales depend on these exact numbers, so the library is compared
    to this bit for bit.
    """
    qmax = 2 ** (bits - 1) - 1
    scale = _scale(x, bits, clip_ratio)
    xf = x.to(scale.dtype)
    return (torch.clamp(torch.round(xf / scale), -qmax - 1, qmax) * scale).to(x.dtype)


def _scheme(**kw: object) -> QuantScheme:
    return QuantScheme("t", **{"w_bits": 4, "a_bits": 4, **kw})  # type: ignore[arg-type]


def _rtn(x: torch.Tensor, bits: int, clip_ratio: float = 1.0, ste: bool = False) -> torch.Tensor:
    """Per-row symmetric integer RTN through the library (any of INT_BITS, not only 4/8)."""
    return Quantizer("int", bits, clip=clip_ratio)(x, ste=ste)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Rows with very different magnitudes, so per-row scaling actually matters.
    return torch.randn(*shape, generator=gen) * torch.logspace(-3, 3, shape[-2]).unsqueeze(-1)


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_the_written_out_formula(bits: int, dtype: torch.dtype) -> None:
    x = _randn(16, 80, seed=bits).to(dtype)
    for clip in (1.0, 0.6):
        assert torch.equal(_rtn(x, bits, clip), _reference(x, bits, clip))
    scheme = _scheme(w_bits=8, a_bits=8) if bits == 8 else _scheme()
    if bits in (4, 8):  # what a scheme allows: both entry points are the same per-row RTN
        assert torch.equal(quantize_weight_spec(x, scheme), _reference(x, bits))
        assert torch.equal(quantize_activation_spec(x, scheme), _reference(x, bits))


@pytest.mark.parametrize("bits", INT_BITS)
def test_idempotent(bits: int) -> None:
    x = _randn(32, 64, seed=bits)
    q = _rtn(x, bits)
    assert torch.equal(_rtn(q, bits), q)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_error_within_half_step(bits: int) -> None:
    x = _randn(48, 96, seed=10 + bits)
    scale = _scale(x, bits)
    err = (_rtn(x, bits) - x).abs()
    assert torch.all(err <= scale / 2 * (1 + 1e-5) + 1e-30)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("clip_ratio", [1.0, 0.8, 0.5])
def test_values_on_grid(bits: int, clip_ratio: float) -> None:
    x = _randn(16, 300, seed=bits)
    qmax = 2 ** (bits - 1) - 1
    scale = _scale(x, bits, clip_ratio)
    codes = _rtn(x, bits, clip_ratio=clip_ratio) / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    codes = codes.round()
    assert codes.min() >= -qmax - 1
    assert codes.max() <= qmax
    for row in codes:
        assert row.unique().numel() <= 2**bits


def test_clipping_saturates_large_values() -> None:
    x = torch.tensor([[-10.0, -1.0, 0.5, 2.0, 10.0]])
    q = _rtn(x, 4, clip_ratio=0.5)
    scale = 0.5 * 10.0 / 7
    assert q[0, -1] == pytest.approx(7 * scale)
    assert q[0, 0] == pytest.approx(-8 * scale)  # the negative side has one more level


def test_zero_rows_give_zeros() -> None:
    x = _randn(4, 32, seed=1)
    x[2] = 0.0
    for ste in (False, True):
        q = _rtn(x, 4, ste=ste)
        assert torch.isfinite(q).all()
        assert torch.equal(q[2], torch.zeros(32))
    assert torch.equal(_rtn(torch.zeros(3, 8), 8), torch.zeros(3, 8))


def test_rows_are_independent() -> None:
    x = _randn(2, 5, 40, seed=2)
    q = quantize_activation_spec(x, _scheme())
    for b in range(2):
        for t in range(5):
            assert torch.equal(q[b, t], _reference(x[b, t], 4))
    # A huge outlier in one token must not change any other token.
    y = x.clone()
    y[0, 3, 7] = 1e6
    qy = quantize_activation_spec(y, _scheme())
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3] = False
    assert torch.equal(qy[mask], q[mask])


def test_w8_much_more_accurate_than_w4() -> None:
    w = _randn(64, 256, seed=3)
    err4 = (quantize_weight_spec(w, _scheme()) - w).pow(2).mean()
    err8 = (quantize_weight_spec(w, _scheme(w_bits=8)) - w).pow(2).mean()
    # Each extra bit halves the step (quarters the MSE): expect roughly 4^4 = 256x.
    assert err8 * 100 < err4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_preserved(dtype: torch.dtype) -> None:
    x = _randn(8, 64, seed=4).to(dtype)
    q = _rtn(x, 4)
    assert q.dtype == dtype
    if dtype != torch.float64:
        # Half inputs are quantized in float32, then cast back once.
        assert torch.equal(q, _rtn(x.float(), 4).to(dtype))


def test_ste_forward_matches_plain() -> None:
    x = _randn(8, 64, seed=5)
    for clip in (1.0, 0.7):
        assert torch.equal(
            _rtn(x, 4, clip_ratio=clip, ste=True), _rtn(x, 4, clip_ratio=clip)
        )


def test_ste_gradient() -> None:
    x = _randn(6, 50, seed=6).requires_grad_(True)
    _rtn(x, 4, ste=True).sum().backward()
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
    _rtn(y, 4).sum().backward()
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
    _rtn(y, bits, clip_ratio=clip, ste=True).sum().backward()
    assert y.grad is not None
    argmax = y.detach().abs().argmax(dim=-1, keepdim=True)
    not_max = torch.ones_like(y.grad, dtype=torch.bool).scatter(-1, argmax, False)
    assert torch.equal(y.grad[not_max], x.grad[not_max])


def test_half_input_gradient_dtype() -> None:
    x = _randn(4, 32, seed=8).to(torch.bfloat16).requires_grad_(True)
    _rtn(x, 8, ste=True).float().sum().backward()
    assert x.grad is not None
    assert x.grad.dtype == torch.bfloat16
    assert torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("bits", [0, 1, 9, 16, True])
def test_invalid_bits(bits: int) -> None:
    with pytest.raises(ValueError, match=rf"bits={bits}.*2\.\.8"):
        Quantizer("int", bits)


@pytest.mark.parametrize("clip_ratio", [0.0, -0.5, 1.01, float("nan")])
@pytest.mark.parametrize("fmt", ["int", "nvfp4"])
def test_invalid_clip_ratio(clip_ratio: float, fmt: str) -> None:
    with pytest.raises(ValueError, match=r"clip_ratio=.*\(0, 1\]"):
        Quantizer(fmt, 4, group_size=16, clip=clip_ratio)


_FLOATS = st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_subnormal=False)


@settings(max_examples=80, deadline=None)
@given(
    rows=st.integers(1, 40).flatmap(
        lambda cols: st.lists(
            st.lists(_FLOATS, min_size=cols, max_size=cols), min_size=1, max_size=6
        )
    ),
    bits=st.sampled_from(INT_BITS),
)
def test_property_idempotent_and_half_step(rows: list[list[float]], bits: int) -> None:
    x = torch.tensor(rows, dtype=torch.float32)
    q = _rtn(x, bits)
    assert torch.isfinite(q).all()
    assert torch.equal(_rtn(q, bits), q)
    err = (q - x).abs()
    assert torch.all(err <= _scale(x, bits) / 2 * (1 + 1e-5) + 1e-30)


# --------------------------------------------------------------------------------------------
# Scheme-level quantizers.


def _heavy(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Student-t-like rows (rare large values): where clipping pays off, like real weights."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, cols, generator=gen)
    chi = torch.randn(rows, cols, 3, generator=gen).pow(2).mean(-1).sqrt()
    return z / chi * torch.logspace(-2, 1, rows).unsqueeze(-1)


@pytest.mark.parametrize("name", ["w4a4", "w8a8"])
def test_plain_schemes_bit_identical_to_the_original_arithmetic(name: str) -> None:
    """The original presets give exactly the written-out per-row formula, weights and inputs."""
    scheme = get_scheme(name)
    w = _randn(40, 96, seed=11)
    x = _randn(3, 20, 96, seed=12)
    assert torch.equal(quantize_weight_spec(w, scheme), _reference(w, scheme.w_bits))
    assert torch.equal(quantize_activation_spec(x, scheme), _reference(x, scheme.a_bits))
    clipped = dataclasses.replace(scheme, w_clip=0.8, a_clip=0.9)
    assert torch.equal(quantize_weight_spec(w, clipped), _reference(w, scheme.w_bits, 0.8))
    assert torch.equal(quantize_activation_spec(x, clipped), _reference(x, scheme.a_bits, 0.9))
    wh = w.to(torch.bfloat16).requires_grad_(True)
    out = quantize_weight_spec(wh, scheme, ste=True)
    assert torch.equal(out, _reference(wh.detach(), scheme.w_bits))
    out.float().sum().backward()
    assert wh.grad is not None and wh.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("group", [16, 32, 64])
def test_groups_are_rows_of_their_own(group: int) -> None:
    """Group g: exactly per-row RTN applied to every run of g input channels."""
    w = _randn(12, 128, seed=13)
    q = quantize_weight_spec(w, _scheme(w_group_size=group))
    ref = _reference(w.reshape(12, 128 // group, group), 4).reshape(12, 128)
    assert torch.equal(q, ref)
    x = _randn(2, 6, 128, seed=14)
    qa = quantize_activation_spec(x, _scheme(a_group_size=group))
    assert torch.equal(qa, _reference(x.reshape(2, 6, -1, group), 4).reshape(x.shape))
    # Smaller groups track local ranges: lower error than one scale per row.
    assert (q - w).pow(2).sum() < (quantize_weight_spec(w, _scheme()) - w).pow(2).sum()


def test_group_size_must_divide_input() -> None:
    with pytest.raises(ValueError, match=r"group size 128 does not divide the input size 96"):
        quantize_weight_spec(torch.ones(4, 96), get_scheme("w4a4-g128"))
    with pytest.raises(ValueError, match=r"group size 32 does not divide the input size 40"):
        quantize_activation_spec(torch.ones(2, 40), _scheme(a_group_size=32))
    with pytest.raises(ConfigError, match=r"w_group_size=1 must be None"):
        _scheme(w_group_size=1)
    with pytest.raises(ConfigError, match=r"a_group_size=True must be None"):
        _scheme(a_group_size=True)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group", [None, 32])
def test_asymmetric_grid_zero_and_bound(bits: int, group: int | None) -> None:
    x = _randn(10, 64, seed=20 + bits) + 0.7 * _randn(10, 64, seed=30).abs()  # skewed rows
    quant = Quantizer("int", bits, group, symmetric=False)
    xg = quant.grouped(x)
    qp = quant.params(xg)
    assert qp.zero is not None
    q = quant(x)
    codes = quant.grouped(q) / qp.scale + qp.zero
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= 0 and codes.round().max() <= 2**bits - 1
    assert torch.all((quant.grouped(q) - xg).abs() <= qp.scale / 2 * (1 + 1e-4))
    # Zero is exactly representable (padding and ReLU zeros stay zero).
    y = x.clone()
    y[:, 5] = 0.0
    assert torch.all(quant(y)[:, 5] == 0)


def test_asymmetric_beats_symmetric_on_one_sided_rows() -> None:
    w = _randn(16, 128, seed=40).abs()
    sym = quantize_weight_spec(w, _scheme())
    asym = quantize_weight_spec(w, _scheme(w_symmetric=False))
    assert (asym - w).pow(2).sum() < 0.5 * (sym - w).pow(2).sum()


@pytest.mark.parametrize("kw", [{}, {"w_group_size": 32}, {"w_symmetric": False},
                                {"w_format": "nvfp4", "w_group_size": 16},
                                {"w_format": "mxfp4", "w_group_size": 32}],
                         ids=["row", "g32", "asym", "nvfp4", "mxfp4"])
def test_mse_clip_is_the_per_group_argmin_over_the_grid(kw: dict) -> None:
    """Brute force: every group's error equals the least error over the ratio grid."""
    w = _heavy(8, 128, seed=41)
    plain = _scheme(**kw)
    searched = dataclasses.replace(plain, w_mse_clip=True)
    q = quantize_weight_spec(w, searched)
    quant = Quantizer(plain.w_format, 4, plain.w_group_size, plain.w_symmetric)
    wg = quant.grouped(w)
    per_ratio = torch.stack([
        (quant.quantize_with(wg, quant.params(wg, r, quant.global_amax(w))) - wg).pow(2).sum(-1)
        for r in MSE_CLIP_GRID
    ])
    err = (quant.grouped(q) - wg).pow(2).sum(-1)
    assert torch.allclose(err, per_ratio.min(dim=0).values, rtol=1e-6, atol=0)
    rtn = (quantize_weight_spec(w, plain) - w).pow(2).sum()
    # Clipping heavy tails pays off for integer grids; FP4 blocks of 16/32 gain less.
    gain = 0.9 if plain.w_format == "int" else 1.0
    assert (q - w).pow(2).sum() < gain * rtn
    assert (per_ratio.argmin(dim=0) > 0).any(), "some group chose a ratio below 1"


def test_mse_clip_never_worse_and_ste_forward_equal() -> None:
    for seed in range(5):
        w = _randn(6, 64, seed=50 + seed)
        for base in ("w4a4", "w4a4-g128", "w8a8"):
            plain = get_scheme(base)
            searched = dataclasses.replace(plain, w_mse_clip=True,
                                           w_group_size=plain.w_group_size and 32)
            ref = dataclasses.replace(searched, w_mse_clip=False)
            q = quantize_weight_spec(w, searched)
            e_rtn = (quantize_weight_spec(w, ref) - w).pow(2).reshape(6, -1).sum(-1)
            assert torch.all((q - w).pow(2).reshape(6, -1).sum(-1) <= e_rtn)
    w = _heavy(6, 64, seed=60).requires_grad_(True)
    scheme = get_scheme("w4a4-mse")
    out = quantize_weight_spec(w, scheme, ste=True)
    assert torch.equal(out.detach(), quantize_weight_spec(w.detach(), scheme))
    out.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_presets_and_validation() -> None:
    for name in ("w4a4-g128", "w4a4-g128-mse", "w4a4-mse", "w4a4-g128-asym", "nvfp4", "mxfp4"):
        assert get_scheme(name).name == name
    assert get_scheme("NVFP4") is PRESET_SCHEMES["nvfp4"]
    with pytest.raises(ConfigError, match=r"unknown scheme 'w4a4-g7'.*'nvfp4'"):
        get_scheme("w4a4-g7")
    with pytest.raises(ConfigError, match=r"w_mse_clip searches the clip ratio"):
        _scheme(w_mse_clip=True, w_clip=0.9)
    with pytest.raises(ValueError, match=r"format 'fp8' is not supported"):
        Quantizer("fp8")


def _composed_ste(q: Quantizer, x: torch.Tensor) -> torch.Tensor:
    """The straight-through RTN written as its composed ops (params, RoundSTE, clamps), which
    autograd differentiates node by node: the reference SymmetricIntSTE must reproduce."""
    xg = q.grouped(x)
    clip = q._best_clip(xg) if q.mse_clip else q.clip
    return q.quantize_with(xg, q.params(xg, clip, ste=True), ste=True).reshape(x.shape)


@pytest.mark.parametrize("grid", ["max", "compressed-tensors"])
@pytest.mark.parametrize(("bits", "clip", "group", "mse"), [
    (4, 1.0, None, False), (8, 1.0, None, False), (4, 0.6, None, False),
    (4, 1.0, 16, False), (4, 1.0, None, True), (3, 0.8, 8, True)])
def test_fused_ste_equals_the_composed_ops(grid, bits, clip, group, mse) -> None:
    """Forward bit for bit; gradient to float32 rounding (clipped entries, the scale's path to
    each group's max, MSE-chosen clips, an all-zero row and batch dims included)."""
    q = Quantizer("int", bits, group, True, clip, mse, grid=grid)
    x = _randn(3, 5, 64, seed=11) * torch.rand(64, generator=torch.Generator().manual_seed(2)) * 4
    x[0, 1] = 0.0  # an all-zero row: its scale is clamped, the rounding passes the gradient
    g = _randn(3, 5, 64, seed=12)
    fused_x, ref_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fused, ref = q(fused_x, ste=True), _composed_ste(q, ref_x)
    assert type(fused.grad_fn.next_functions[0][0]).__name__ == "SymmetricIntSTEBackward"
    assert torch.equal(fused, ref)
    fused.backward(g)
    ref.backward(g)
    assert (fused_x.grad - ref_x.grad).abs().max() <= 1e-5 * ref_x.grad.abs().max()
    assert torch.equal(fused_x.grad[0, 1], g[0, 1])
    # The scale's gradient is not negligible: without it the two would differ.
    inside = torch.where(ref_x.grad != 0, 1.0, 0.0)
    assert (ref_x.grad - inside * g).abs().max() > 1e-3


@pytest.mark.parametrize("clip_ratio", [1.0, 0.7])
def test_grid_of_recovers_the_grid_a_rounding_lies_on(clip_ratio: float) -> None:
    """Values rounded on one grid (here RTN of another tensor's, clipped: codes saturate) give
    back parameters that reproduce them; a grid finer than any row's codes allow is refused,
    and so is a row on no grid; zero rows keep a positive scale."""
    quant = Quantizer("int", 4)
    other = _randn(6, 64, seed=1)
    scale = _scale(other, 4, clip_ratio)
    values = torch.clamp(torch.round(_randn(6, 64, seed=2) / scale), -8, 7) * scale
    values[5] = 0.0
    qp = quant.grid_of(quant.grouped(values))
    assert qp is not None and bool((qp.scale > 0).all())
    again = quant.quantize_with(quant.grouped(values), qp).reshape(values.shape)
    torch.testing.assert_close(again, values, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(qp.scale[:5, 0, 0], scale[:5, 0], rtol=1e-6, atol=0.0)
    off = values.clone()
    off[0, 0] += scale[0, 0] * 0.37
    assert quant.grid_of(quant.grouped(off)) is None
    assert Quantizer("nvfp4", 4, group_size=16).grid_of(values.reshape(6, 4, 16)) is None
