"""train.bf16_grads: the training product's gradients in bfloat16, its value (the loss) and every
score in float32; on only where the CPU has native bfloat16 GEMMs, and part of the resume key."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import smoothrot.training.fit as fit
from smoothrot.core.transform import FULL
from smoothrot.losses import Bf16GradProduct, output_loss, quantized_output
from smoothrot.schema.config import TrainConfig
from smoothrot.schema.quant import get_scheme


def _site(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 64, generator=gen) * torch.linspace(0.1, 8, 64)
    w = torch.randn(48, 64, generator=gen) / 8
    s = torch.rand(64, generator=gen) + 0.5
    return x, w, s


def test_product_value_is_float32_and_gradients_are_close() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(32, 64, generator=gen, requires_grad=True)
    b = torch.randn(16, 64, generator=gen, requires_grad=True)
    g = torch.randn(32, 16, generator=gen)
    out = Bf16GradProduct.apply(a, b)
    assert torch.equal(out, a @ b.T)
    ga, gb = torch.autograd.grad(out, (a, b), g)
    ref_a, ref_b = torch.autograd.grad(a @ b.T, (a, b), g)
    for got, ref in ((ga, ref_a), (gb, ref_b)):
        assert got.dtype == torch.float32
        assert not torch.equal(got, ref)  # rounded: the bfloat16 path ran
        assert torch.allclose(got, ref, rtol=0, atol=2e-2 * float(ref.abs().max()))


def test_training_loss_is_unchanged_and_its_gradient_close() -> None:
    x, w, s = _site()
    scheme = get_scheme("w4a4")
    grads, losses = [], []
    for bf16 in (False, True):
        scales = s.clone().requires_grad_(True)
        loss = output_loss(x @ w.T, quantized_output(x, w, scales, FULL, scheme, ste=True,
                                                     bf16_grads=bf16))
        (grad,) = torch.autograd.grad(loss, scales)
        grads.append(grad)
        losses.append(float(loss.detach()))
    assert losses[0] == losses[1]
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cosine > 0.999
    assert not torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("native", [True, False])
def test_used_where_native_and_in_the_key(monkeypatch, native: bool) -> None:
    """The flag reaches the module only on a CPU with native bfloat16, and the resume key
    tells the two trajectories apart."""
    monkeypatch.setattr(fit, "native_bf16", lambda: native)
    made: list[bool] = []
    module_cls = fit.ScaleFitModule

    def recording(*args, **kwargs):
        made.append(kwargs["bf16_grads"])
        return module_cls(*args, **kwargs)

    monkeypatch.setattr(fit, "ScaleFitModule", recording)
    x, w, s = _site()
    problem = fit.TrainProblem(w, s, get_scheme("w4a4"), x, x[:64], FULL, seed=0)
    cfg = TrainConfig(steps=4, batch_tokens=32, val_every=2)
    start = output_loss(x[:64] @ w.T, quantized_output(x[:64], w, s, FULL, get_scheme("w4a4")))
    _, best = fit.fit_scales(problem, cfg)
    fit.fit_scales(problem, dataclasses.replace(cfg, bf16_grads=False))
    assert made == [native, False]
    assert best <= float(start) * (1 + 1e-6)
    assert problem.key(cfg, True) != problem.key(cfg, False)
