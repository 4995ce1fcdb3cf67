"""The int8 GEMM fast path of fake-quantized products (quantizers.integer_product): the codes are
RTN's, and the product agrees with the float product of the dequantized tensors."""

from __future__ import annotations

import pytest
import torch

from smoothrot.core.quantizers import (
    Quantizer,
    activation_quantizer,
    integer_product,
    weight_quantizer,
)
from smoothrot.core.transform import FULL
from smoothrot.losses import quantized_output
from smoothrot.methods.search import candidate_losses
from smoothrot.schema.quant import get_scheme


def _outlier_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 64, generator=gen)
    x[:, 3] *= 40.0  # an outlier channel
    return x, torch.randn(24, 64, generator=gen)


@pytest.mark.parametrize("q", [Quantizer("int", 4), Quantizer("int", 8),
                               Quantizer("int", 4, grid="compressed-tensors"),
                               Quantizer("int", 4, mse_clip=True), Quantizer("int", 4, clip=0.8)])
def test_codes_times_scales_is_the_fake_quantized_tensor(q: Quantizer) -> None:
    x, _ = _outlier_tensors()
    codes, scales = q.codes(x)
    assert codes.dtype == torch.int8 and scales.shape == (96, 1)
    assert torch.equal(codes.float() * scales, q(x))


@pytest.mark.parametrize("scheme", ["w4a4", "w8a8"])
@pytest.mark.parametrize("grid", ["max", "compressed-tensors"])
def test_integer_product_matches_the_float_product(scheme: str, grid: str) -> None:
    x, w = _outlier_tensors(1)
    aq = Quantizer("int", get_scheme(scheme).a_bits, grid=grid)
    wq = weight_quantizer(get_scheme(scheme))
    fast = integer_product(x, w, aq, wq)
    slow = aq(x) @ wq(w).T
    assert fast is not None
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5 * float(slow.abs().max()))
    batched = integer_product(torch.stack([x, 2 * x]), torch.stack([w, w / 3]), aq, wq)
    torch.testing.assert_close(batched[1], aq(2 * x) @ wq(w / 3).T, rtol=1e-5,
                               atol=1e-5 * float(slow.abs().max()))


def test_grouped_fp4_and_half_inputs_keep_the_float_path() -> None:
    x, w = _outlier_tensors()
    for name in ("w4a4-g128", "nvfp4", "mxfp4"):
        scheme = get_scheme(name)
        xs, ws = x.repeat(1, 2), w.repeat(1, 2)  # 128 channels: groups of 16, 32 or 128 fit
        assert integer_product(xs, ws, activation_quantizer(scheme),
                               weight_quantizer(scheme)) is None
    w4a4 = get_scheme("w4a4")
    assert integer_product(x.half(), w.half(), activation_quantizer(w4a4),
                           weight_quantizer(w4a4)) is None


def test_search_and_evaluation_scores_agree_with_the_straight_through_path() -> None:
    """The search (batched candidates) and held-out evaluation take the integer path; the
    trainer's straight-through forward takes the float one: same loss to float rounding."""
    x, w = _outlier_tensors(2)
    y = x @ w.T
    scheme = get_scheme("w4a4")
    cands = torch.rand(3, 64, generator=torch.Generator().manual_seed(3)) + 0.5
    fast = candidate_losses(x, y, w, cands, [scheme], FULL)[0]
    ste = torch.stack([(y - quantized_output(x, w, c, FULL, scheme, ste=True)).pow(2)
                       .sum(-1).mean() for c in cands])
    torch.testing.assert_close(fast, ste, rtol=1e-5, atol=0)
