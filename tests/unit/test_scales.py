import torch

from smoothrot.core.scales import LogScales


def test_initialised_exactly():
    init = torch.logspace(-3, 4, 50, dtype=torch.float64)
    p = LogScales(init, bound=9.0)
    assert torch.allclose(p.scales(), init, rtol=1e-6)
    assert torch.allclose(p().double(), init, rtol=1e-5)


def test_bounded_positive_finite_under_any_parameters():
    init = torch.rand(32, dtype=torch.float64) + 0.5
    p = LogScales(init, bound=3.0)
    with torch.no_grad():
        p.phi.copy_(torch.randn(32) * 1e6)
    s = p.scales()
    center = float(p.center)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert (s.log() <= center + p.bound + 1e-9).all() and (s.log() >= center - p.bound - 1e-9).all()


def test_global_shift_is_a_null_direction():
    init = torch.rand(16, dtype=torch.float64) + 0.1
    p = LogScales(init, bound=9.0)
    before = p.scales()
    with torch.no_grad():
        p.phi.add_(5.0)
    assert torch.allclose(p.scales(), before)
    # and the gradient has no component along the all-ones direction
    loss = (p() * torch.arange(16.0)).sum()
    loss.backward()
    assert abs(float(p.phi.grad.sum())) < 1e-4
