"""Property tests of the equivalence X·diag(s)⁻¹·H·(W·diag(s)·H)ᵀ = X·Wᵀ (docs/equivalence.md).

Random shapes, random positive scales spanning up to 14 decades, float64. The tested
floating-point bound, per output element (t, o), with u = 2⁻⁵³ and κ = max s / min s:

    |Y'ₜₒ − Yₜₒ| ≤ c(n)·u·(‖xₜ⊘s‖·‖wₒ⊙s‖ + ‖xₜ‖·‖wₒ‖) ≤ c(n)·u·(1 + κ)·‖xₜ‖·‖wₒ‖,
    c(n) = 3n + 2·log2(n) + 8,

so the relative tolerance grows with κ = 10^(log-range of s in decades), not with s itself.
"""

from __future__ import annotations

import copy
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smoothrot.arch.sites import resolve_sites
from smoothrot.core.hadamard import is_supported
from smoothrot.core.transform import FULL, transform_input, transform_weight
from smoothrot.surgery.fuse import fuse_site, unfuse_site
from smoothrot.surgery.hooks import apply_plans
from smoothrot.surgery.plan import SitePlan
from tests.conftest import tiny_llama

U = 2.0**-53
SIZES = [n for n in range(1, 137) if is_supported(n)]  # 1, 2, 4, 8, 12, 16, ..., 136


def c_n(n: int) -> float:
    """The constant of the tested bound (first-order rounding-error analysis, with slack)."""
    return 3 * n + 2 * math.log2(n) + 8


def log_uniform_scales(n: int, decades: float, gen: torch.Generator) -> torch.Tensor:
    """Positive scales whose log10 is uniform over a range of ``decades`` around 0."""
    return 10 ** ((torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * decades)


@settings(max_examples=60, deadline=None)
@given(n=st.sampled_from(SIZES), tokens=st.integers(1, 6), outs=st.integers(1, 6),
       decades=st.floats(0.0, 14.0), seed=st.integers(0, 2**31 - 1))
def test_linear_equivalence_within_the_stated_bound(n, tokens, outs, decades, seed):
    gen = torch.Generator().manual_seed(seed)
    s = log_uniform_scales(n, decades, gen)
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64)
    w = torch.randn(outs, n, generator=gen, dtype=torch.float64)
    y = x @ w.T
    y_fused = transform_input(x, s, FULL) @ transform_weight(w, s, FULL).T
    scaled = (x / s).norm(dim=1, keepdim=True) * (w * s).norm(dim=1)[None]
    plain = x.norm(dim=1, keepdim=True) * w.norm(dim=1)[None]
    err = (y_fused - y).abs()
    assert (err <= c_n(n) * U * (scaled + plain)).all()
    kappa = float(s.max() / s.min())
    assert (err <= c_n(n) * U * (1 + kappa) * plain).all()


def test_relative_error_grows_with_the_scale_range():
    """The bound is not vacuous: the error really grows with κ = max s / min s."""
    gen = torch.Generator().manual_seed(0)
    n = 96
    x = torch.randn(64, n, generator=gen, dtype=torch.float64)
    w = torch.randn(32, n, generator=gen, dtype=torch.float64)
    z = torch.rand(n, generator=gen, dtype=torch.float64)
    z = (z - z.min()) / (z.max() - z.min())  # log10 s spans exactly `decades`
    y = x @ w.T
    errors = {}
    for decades in (0, 6, 12):
        s = 10 ** (z * decades)
        y_fused = transform_input(x, s, FULL) @ transform_weight(w, s, FULL).T
        errors[decades] = float((y_fused - y).norm() / y.norm())
        assert errors[decades] <= c_n(n) * U * (1 + 10.0**decades) * 8  # ‖x‖‖w‖/‖y‖ ≲ 8 here
    assert errors[6] > 1e3 * errors[0] and errors[12] > 1e3 * errors[6], errors


@settings(max_examples=25, deadline=None)
@given(decades=st.floats(0.0, 12.0), seed=st.integers(0, 2**31 - 1))
def test_swiglu_fold_into_up_proj_is_exact(decades, seed):
    """down(act(gate x) ⊙ (up x)/s) with W·diag(s)·H and online H equals the original MLP."""
    model = tiny_llama(layers=1, dtype=torch.float64)
    mlp = model.model.layers[0].mlp
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 64, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        ref = mlp(x)
    sites = resolve_sites(model, ["down_proj"])
    s = log_uniform_scales(96, decades, gen)
    w = mlp.down_proj.weight.detach().clone()
    handles = apply_plans(sites, {sites[0].name: SitePlan(s, sites[0].rotation)})
    with torch.no_grad():
        out = mlp(x)
    for handle in handles:
        handle.remove()
    # h/s carries the up_proj row rounding (relative u per element, hidden = 64 terms).
    scaled = (h / s).norm(dim=1, keepdim=True) * (w * s).norm(dim=1)[None]
    plain = h.norm(dim=1, keepdim=True) * w.norm(dim=1)[None]
    assert ((out - ref).abs() <= (c_n(96) + 64) * U * (scaled + plain)).all()


@settings(max_examples=20, deadline=None)
@given(decades=st.floats(0.0, 10.0), seed=st.integers(0, 2**31 - 1),
       layers=st.sampled_from([["down_proj"], ["all"]]))
def test_fuse_then_unfuse_gives_back_the_weights(decades, seed, layers):
    """Every site kind (norm γ, v rows with tied GQA scales, up rows) is undone exactly."""
    model = tiny_llama(layers=1, dtype=torch.float64)
    original = copy.deepcopy(model.state_dict())
    sites = resolve_sites(model, layers)
    gen = torch.Generator().manual_seed(seed)
    plans = {rs.name: SitePlan(log_uniform_scales(rs.n_scales, decades, gen), rs.rotation)
             for rs in sites}
    for rs in sites:
        fuse_site(rs, plans[rs.name].scales, rs.rotation)
    assert any(not torch.equal(v, original[k]) for k, v in model.state_dict().items())
    for rs in reversed(sites):
        unfuse_site(rs, plans[rs.name].scales, rs.rotation)
    kappa = max(float(p.scales.max() / p.scales.min()) for p in plans.values())
    for key, value in model.state_dict().items():
        ref = original[key]
        if ref.dim() != 2:  # norm γ: multiplied then divided by s, 2 roundings per element
            assert torch.allclose(value, ref, rtol=4 * U, atol=0), key
            continue
        n = ref.shape[1]
        # Row-wise: the rotation mixes the row, so the error is relative to the row's norm.
        tol = c_n(n) * U * (1 + kappa) * ref.norm(dim=1, keepdim=True)
        assert ((value - ref).abs() <= tol).all(), key

