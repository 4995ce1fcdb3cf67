import pytest
import torch

from smoothrot.core.quantizers import quantize_activation_spec, quantize_weight_spec
from smoothrot.core.scales import LogScales
from smoothrot.core.transform import IDENTITY
from smoothrot.methods.search import candidate_loss
from smoothrot.schema.quant import PRESET_SCHEMES


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


@pytest.mark.parametrize("name", sorted(PRESET_SCHEMES))
def test_only_mxfp4_breaks_scale_equivariance(name: str) -> None:
    """Q(c·z) = c·Q(z) on both sides for int grids and NVFP4, so the layer loss of c·s does not
    depend on c and the normalization of log s loses nothing. MXFP4's power-of-two block scales
    break it for c = 1.7 (not for c = 2), so its loss depends on c: ``scale_equivariant`` says
    which, and trained scales search c for MXFP4 (methods/trained.py)."""
    scheme = PRESET_SCHEMES[name]
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 128, generator=gen) * torch.logspace(-1, 1, 128)
    w = torch.randn(8, 128, generator=gen)
    s = torch.exp(torch.randn(128, generator=gen))

    def equivariant(c: float) -> bool:
        return all(torch.allclose(q(c * t, scheme), c * q(t, scheme), rtol=1e-5, atol=0)
                   for q, t in ((quantize_weight_spec, w), (quantize_activation_spec, z)))

    def loss(c: float) -> float:
        return candidate_loss(z, z @ w.T, w, c * s, scheme, IDENTITY)

    assert equivariant(2.0)
    assert equivariant(1.7) == scheme.scale_equivariant
    assert (loss(1.7) == pytest.approx(loss(1.0), rel=1e-4)) == scheme.scale_equivariant
    assert loss(2.0) == pytest.approx(loss(1.0), rel=1e-4)
