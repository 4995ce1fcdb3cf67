"""NVFP4 / MXFP4 fake quantization: element and scale grids, agreement with compressed-tensors'
reference, idempotence, error bounds, block independence and STE gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smoothrot.core import fp4
from smoothrot.core.quantizers import (
    activation_quantizer,
    quantize_activation_spec,
    quantize_weight_spec,
    weight_quantizer,
)
from smoothrot.schema.errors import ConfigError
from smoothrot.schema.quant import QuantScheme, get_scheme

NVFP4 = get_scheme("nvfp4")
MXFP4 = get_scheme("mxfp4")
FP_SCHEMES = [NVFP4, MXFP4]
_SIGNED_E2M1 = torch.tensor(sorted({s * v for v in fp4.E2M1_VALUES for s in (-1.0, 1.0)}))


def _wide(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Rows spanning 6 decades plus one large outlier: exercises E4M3 range and clipping."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * torch.logspace(-4, 2, rows).unsqueeze(-1)
    x[rows // 2, 3] = 300.0
    return x


def _block_scales(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Per-element dequantization scale the quantizer uses (via its public ``params``)."""
    quant = weight_quantizer(scheme)
    xg = quant.grouped(x)
    scale = quant.params(xg, global_amax=quant.global_amax(x)).scale
    return scale.expand_as(xg).reshape(x.shape)


def test_e2m1_rounding_ties_and_saturation() -> None:
    cases = {0.0: 0.0, 0.2: 0.0, 0.25: 0.0, 0.26: 0.5, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0,
             2.5: 2.0, 3.5: 4.0, 4.9: 4.0, 5.0: 4.0, 5.1: 6.0, 7.0: 6.0, 1e9: 6.0}
    x = torch.tensor(list(cases))
    want = torch.tensor(list(cases.values()))
    assert torch.equal(fp4.round_e2m1(x), want)
    assert torch.equal(fp4.round_e2m1(-x), -want)


def test_e2m1_is_nearest_grid_value() -> None:
    x = torch.empty(20000).uniform_(-7, 7, generator=torch.Generator().manual_seed(0))
    q = fp4.round_e2m1(x)
    dist = (x.unsqueeze(1) - _SIGNED_E2M1).abs()
    assert torch.isin(q, _SIGNED_E2M1).all()
    assert torch.allclose((q - x).abs(), dist.min(dim=1).values)
    assert torch.equal(fp4.round_e2m1(_SIGNED_E2M1), _SIGNED_E2M1)


def test_e4m3_rounding_is_nearest_and_saturates() -> None:
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = codes[torch.isfinite(codes)].unique()
    assert grid.max() == fp4.E4M3_MAX and grid.numel() == 253  # ±0 collapse to one
    x = torch.empty(20000).uniform_(-460, 460, generator=torch.Generator().manual_seed(1))
    x = torch.cat([x, torch.logspace(-12, 2, 500), torch.tensor([1e6, -1e6])])
    q = fp4.round_e4m3(x)
    assert torch.isfinite(q).all()
    assert torch.isin(q, grid).all()
    nearest = (x.clamp(-448, 448).unsqueeze(1) - grid).abs().min(dim=1).values
    assert torch.allclose((q - x.clamp(-448, 448)).abs(), nearest, rtol=0, atol=0)


def test_mxfp4_scale_is_power_of_two_and_places_block_max() -> None:
    amax = torch.logspace(-20, 20, 4001, dtype=torch.float32)
    scale = fp4.mxfp4_scale(amax)
    mant, _ = torch.frexp(scale)
    assert torch.all(mant == 0.5), "power of two"
    ratio = amax / scale
    assert ratio.min() >= 3.5 and ratio.max() < 7.0


@pytest.mark.parametrize("scheme", FP_SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("side", ["weights", "input_activations"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_compressed_tensors_reference(scheme: QuantScheme, side: str, seed: int) -> None:
    """Bit-identical to compressed-tensors' own fake quantization of its NVFP4/MXFP4 presets
    (what vLLM checkpoints hold; NVFP4 global scale from the same tensor's abs-max)."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    args = getattr(preset_name_to_scheme(scheme.name.upper(), ["Linear"]), side)
    x = _wide(24, 256, seed)
    g = args.group_size
    gs = generate_gparam(x.min(), x.max()) if scheme.w_format == "nvfp4" else None
    xg = x.reshape(x.shape[0], -1, g)
    scale, zp = calculate_qparams(xg.amin(-1), xg.amax(-1), args, global_scale=gs)
    ref = fake_quantize(x, scale, zp, args, global_scale=gs)
    fn = quantize_weight_spec if side == "weights" else quantize_activation_spec
    assert torch.equal(fn(x, scheme), ref)


@pytest.mark.parametrize("scheme", FP_SCHEMES, ids=lambda s: s.name)
def test_values_on_scaled_grid_and_scale_grids(scheme: QuantScheme) -> None:
    w = _wide(16, 320, 3)
    q = quantize_weight_spec(w, scheme)
    scale = _block_scales(w, scheme)
    assert _on_e2m1_grid(q / scale)
    if scheme.w_format == "nvfp4":
        gs = fp4.nvfp4_global_scale(w.abs().amax())
        stored = scale * gs  # the E4M3 numbers a checkpoint stores
        assert torch.allclose(stored, fp4.round_e4m3(stored), rtol=1e-6, atol=0)
        assert stored.max() <= fp4.E4M3_MAX * (1 + 1e-6)
    else:
        mant, _ = torch.frexp(scale)
        assert torch.all(mant == 0.5)


def _on_e2m1_grid(codes: torch.Tensor) -> bool:
    """Codes q/scale are E2M1 values up to float32 division rounding."""
    return torch.allclose(codes, fp4.round_e2m1(codes), rtol=1e-5, atol=1e-6)


def test_mxfp4_idempotent() -> None:
    for seed in range(4):
        w = _wide(12, 256, seed)
        q = quantize_weight_spec(w, MXFP4)
        assert torch.equal(quantize_weight_spec(q, MXFP4), q)
        a = quantize_activation_spec(w, MXFP4)
        assert torch.equal(quantize_activation_spec(a, MXFP4), a)


def test_nvfp4_idempotent_while_block_scales_are_e4m3_normal() -> None:
    """Re-quantizing reproduces the result (to float32 rounding of the global scale) as long as
    every block scale is an E4M3 normal number (block max ≥ ~3.5e-5 of the tensor max)."""
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(12, 256, generator=gen) * torch.logspace(-2, 1, 12).unsqueeze(-1)
        for fn in (quantize_weight_spec, quantize_activation_spec):
            q = fn(w, NVFP4)
            assert torch.allclose(fn(q, NVFP4), q, rtol=1e-6, atol=0)
    # Subnormal block scales round by up to 50%: such blocks can change when re-quantized (the
    # same happens in compressed-tensors; docs/quantizers.md).
    w = _wide(12, 256, 0)
    q = quantize_weight_spec(w, NVFP4)
    assert not torch.allclose(quantize_weight_spec(q, NVFP4), q, rtol=1e-3, atol=0)


@pytest.mark.parametrize("scheme", FP_SCHEMES, ids=lambda s: s.name)
def test_error_bound(scheme: QuantScheme) -> None:
    """|x − q| ≤ one scale step (E2M1's widest half-gap, 4..6) plus what clipping at 6 costs."""
    w = _wide(20, 256, 4)
    q = quantize_weight_spec(w, scheme)
    scale = _block_scales(w, scheme)
    g = scheme.w_group_size
    amax = w.abs().reshape(20, -1, g).amax(-1, keepdim=True)
    amax = amax.expand(20, 256 // g, g).reshape(20, 256)
    bound = scale + (amax - fp4.E2M1_MAX * scale).clamp(min=0)
    assert torch.all((q - w).abs() <= bound * (1 + 1e-6))
    if scheme.w_format == "mxfp4":  # the block max sits below 7 steps: at most one step off
        assert torch.all((q - w).abs() <= scale)
    # Relative error of a 4-bit float with per-16/32 scales: a few percent of the signal.
    assert (q - w).pow(2).sum() < 0.02 * w.pow(2).sum()


@pytest.mark.parametrize("scheme", FP_SCHEMES, ids=lambda s: s.name)
def test_blocks_are_independent(scheme: QuantScheme) -> None:
    """Changing one block changes no other block (NVFP4: as long as the tensor max stays)."""
    g = scheme.w_group_size
    w = _wide(6, 4 * g, 5)
    q = quantize_weight_spec(w, scheme)
    v = w.clone()
    v[1, g : 2 * g] *= 1e-3  # shrink a block that does not hold the tensor max
    v[4, 2 * g] = 5.0 * w[4, 2 * g : 3 * g].abs().max()
    qv = quantize_weight_spec(v, scheme)
    changed = torch.zeros_like(w, dtype=torch.bool)
    changed[1, g : 2 * g] = True
    changed[4, 2 * g : 3 * g] = True
    assert torch.equal(qv[~changed], q[~changed])
    assert not torch.equal(qv[changed], q[changed])


def test_mxfp4_tokens_independent_and_nvfp4_global_is_per_tensor() -> None:
    x = torch.randn(3, 8, 64, generator=torch.Generator().manual_seed(6))
    y = x.clone()
    y[0, 2, 5] = 1e4
    same = torch.ones(3, 8, dtype=torch.bool)
    same[0, 2] = False
    qx, qy = quantize_activation_spec(x, MXFP4), quantize_activation_spec(y, MXFP4)
    assert torch.equal(qy[same], qx[same])
    # NVFP4: one FP32 global scale for the whole tensor, so each token's result equals
    # quantizing it alone with the tensor's global abs-max.
    quant = activation_quantizer(NVFP4)
    q = quantize_activation_spec(x, NVFP4)
    gmax = x.abs().amax()
    tok = x[1, 4]
    alone = quant.quantize_with(quant.grouped(tok), quant.params(quant.grouped(tok),
                                                                 global_amax=gmax))
    assert torch.equal(q[1, 4], alone.reshape(-1))


@pytest.mark.parametrize("scheme", FP_SCHEMES, ids=lambda s: s.name)
def test_ste_forward_equal_and_gradient_finite(scheme: QuantScheme) -> None:
    w = _wide(8, 128, 7).requires_grad_(True)
    out = quantize_weight_spec(w, scheme, ste=True)
    assert torch.equal(out.detach(), quantize_weight_spec(w.detach(), scheme))
    (out * torch.linspace(-1, 1, 128)).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    x = (torch.randn(4, 5, 128, generator=torch.Generator().manual_seed(8)) * 3).requires_grad_()
    quantize_activation_spec(x, scheme, ste=True).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # Without the STE rounding is flat: the gradient through round_e2m1 alone is zero.
    z = torch.linspace(-5, 5, 50, requires_grad=True)
    fp4.round_e2m1(z, ste=True).sum().backward()
    assert z.grad is not None and torch.equal(z.grad, torch.ones(50))


def test_zero_tensor_and_half_dtype() -> None:
    for scheme in FP_SCHEMES:
        assert torch.equal(quantize_weight_spec(torch.zeros(4, 64), scheme), torch.zeros(4, 64))
        w = _wide(8, 64, 9)
        for dtype in (torch.float16, torch.bfloat16):
            q = quantize_weight_spec(w.to(dtype), scheme)
            assert q.dtype == dtype
            assert torch.equal(q, quantize_weight_spec(w.to(dtype).float(), scheme).to(dtype))


def test_fp_scheme_validation() -> None:
    with pytest.raises(ConfigError, match="nvfp4 needs w_bits=4 and w_group_size=16"):
        QuantScheme("bad", 4, 4, w_format="nvfp4", w_group_size=32)
    with pytest.raises(ConfigError, match="mxfp4 needs a_bits=4 and a_group_size=32"):
        QuantScheme("bad", 4, 8, a_format="mxfp4", a_group_size=32)
    with pytest.raises(ConfigError, match="asymmetric weights need w_format='int'"):
        QuantScheme("bad", 4, 4, w_format="nvfp4", w_group_size=16, w_symmetric=False)
    with pytest.raises(ConfigError, match="fp8"):
        QuantScheme("bad", 4, 4, w_format="fp8")
    with pytest.raises(ValueError, match="group size 16 does not divide the input size 40"):
        quantize_weight_spec(torch.ones(2, 40), NVFP4)


_FLOATS = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_subnormal=False)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.lists(_FLOATS, min_size=32, max_size=32), min_size=1, max_size=4),
    scheme=st.sampled_from(FP_SCHEMES),
)
def test_property_finite_on_grid_bounded(rows: list[list[float]], scheme: QuantScheme) -> None:
    x = torch.tensor(rows, dtype=torch.float32)
    q = quantize_weight_spec(x, scheme)
    assert torch.isfinite(q).all()
    scale = _block_scales(x, scheme)
    assert _on_e2m1_grid(q / scale)
    amax = x.abs().reshape(x.shape[0], -1, scheme.w_group_size).amax(-1, keepdim=True)
    amax = amax.expand(-1, -1, scheme.w_group_size).reshape(x.shape)
    bound = scale + (amax - fp4.E2M1_MAX * scale).clamp(min=0)
    assert torch.all((q - x).abs() <= bound * (1 + 1e-5))
    if scheme.w_format == "mxfp4":
        assert torch.equal(quantize_weight_spec(q, scheme), q)


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "w4a4-g128-mse", "w4a4-g128-asym"])
def test_trainer_loss_gives_scale_gradients(name: str) -> None:
    """The trainer's straight-through loss (losses.quantized_output) under the new schemes:
    finite, nonzero gradients w.r.t. log s, and forward equal to the evaluation path."""
    from smoothrot.core.transform import FULL
    from smoothrot.losses import output_loss, quantized_output

    scheme = get_scheme(name)
    gen = torch.Generator().manual_seed(10)
    n = 256
    x = torch.randn(64, n, generator=gen) * torch.exp(torch.randn(n, generator=gen))
    w = torch.randn(32, n, generator=gen) / n**0.5
    log_s = (0.3 * torch.randn(n, generator=gen)).requires_grad_(True)
    y_ste = quantized_output(x, w, log_s.exp(), FULL, scheme, ste=True)
    y_eval = quantized_output(x, w, log_s.detach().exp(), FULL, scheme)
    assert torch.allclose(y_ste.detach(), y_eval, rtol=1e-5, atol=1e-6)
    output_loss(x @ w.T, y_ste).backward()
    assert log_s.grad is not None
    assert torch.isfinite(log_s.grad).all() and log_s.grad.abs().sum() > 0
