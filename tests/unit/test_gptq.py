"""GPTQ: exact agreement with a textbook greedy least-squares reference, exhaustive search on a
1×4 layer, held-out error never above RTN's, and the wiring used by the pipeline."""

from __future__ import annotations

import itertools

import pytest
import torch

from smoothrot.arch.sites import resolve_sites
from smoothrot.core.gptq import (
    Hessian,
    gptq_quantize,
    input_hessian,
    least_squares_target,
    refit_row_scales,
)
from smoothrot.core.quantizers import (
    QParams,
    Quantizer,
    quantize_activation_spec,
    quantize_weight_spec,
)
from smoothrot.core.transform import (
    FULL,
    IDENTITY,
    SiteTransform,
    transform_input,
    transform_weight,
)
from smoothrot.evaluate import layer_error
from smoothrot.methods.gptq import gptq_fused_weight, gptq_fused_weight_selected
from smoothrot.schema.quant import QuantScheme, get_scheme
from smoothrot.surgery.hooks import transformed
from smoothrot.surgery.plan import SitePlan
from tests.conftest import tiny_llama


def _inputs(tokens: int, n: int, seed: int, mix_seed: int = 100) -> torch.Tensor:
    """Correlated inputs: shared mixing (same distribution for train and held-out), uneven
    channel scales and two outlier channels, like real activations."""
    mix = torch.Generator().manual_seed(mix_seed + n)
    a = torch.randn(n, n, generator=mix) / n**0.5 + 0.5 * torch.eye(n)
    scale = torch.exp(torch.randn(n, generator=mix))
    scale[[1, n // 2]] *= 8.0
    z = torch.randn(tokens, n, generator=torch.Generator().manual_seed(seed))
    return (z @ a) * scale


def _weight(m: int, n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + seed)
    return (torch.randn(m, n, generator=gen) * torch.logspace(-1, 0.5, m).unsqueeze(-1)).to(dtype)


def _out_err(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return float((x @ (w - wq).T).pow(2).sum())


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    return h + damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)


def _reference_gptq(w: torch.Tensor, h: torch.Tensor, quant: Quantizer, order: list[int],
                    static: bool) -> torch.Tensor:
    """Greedy OBQ written the slow, obvious way (float64).

    Visit columns in ``order``; round the current value of each; then re-fit all columns not yet
    rounded by least squares given the rounded ones: Ŵ_F = W_F + E_Q·H_QF·H_FF⁻¹.
    """
    n = w.shape[1]
    g = quant.group_size or n
    cur, q = w.clone(), torch.zeros_like(w)
    gmax = quant.global_amax(w)
    full = quant.fit(quant.grouped(w), gmax)
    done: list[int] = []
    for c in order:
        if g == n or static:
            qp = QParams(full.scale[:, c // g], None if full.zero is None else full.zero[:, c // g])
        elif c % g == 0:
            fit = quant.fit(cur[:, c : c + g].unsqueeze(1), gmax)
            qp = QParams(fit.scale[:, 0], None if fit.zero is None else fit.zero[:, 0])
        q[:, c : c + 1] = quant.quantize_with(cur[:, c : c + 1], qp)
        done.append(c)
        free = [j for j in range(n) if j not in done]
        if free:
            e = w[:, done] - q[:, done]
            cur[:, free] = w[:, free] + e @ h[done][:, free] @ torch.linalg.inv(h[free][:, free])
    return q


@pytest.mark.parametrize(
    ("group", "act_order", "block"),
    [(None, False, 5), (None, True, 4), (4, False, 8), (4, False, 3), (4, True, 5), (3, False, 6)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_greedy_least_squares_reference(group, act_order, block, seed) -> None:
    """Cholesky rows + lazy block updates compute exactly the greedy OBQ sequence."""
    m, n, damp = 3, 12, 0.01
    w = _weight(m, n, seed, torch.float64)
    x = _inputs(64, n, seed).double()
    quant = Quantizer("int", 3, group, symmetric=group != 3)  # g=3 also covers asymmetric
    h = _damped(x.T @ x, damp)
    order = list(range(n))
    if act_order:
        order = torch.argsort(torch.diag(x.T @ x), descending=True, stable=True).tolist()
    ref = _reference_gptq(w, h, quant, order, static=act_order and group is not None)
    out = gptq_quantize(w, x, quant, block_size=block, damp=damp, act_order=act_order)
    assert out.dtype == torch.float64
    assert torch.allclose(out, ref, rtol=0, atol=1e-12), (out - ref).abs().max()
    assert not torch.equal(out, quant(w)), "the reference case must differ from RTN"


def test_exhaustive_one_row_four_columns() -> None:
    """All 16⁴ code vectors of a 1×4 int4 weight with its fixed per-row scale.

    Greedy GPTQ is not globally optimal (on 1×4 layers it often keeps RTN's codes), but: its
    calibration error lies between the exhaustive optimum and RTN's, and its last column is the
    exact optimum given the first three (a 1-D convex quadratic in that code)."""
    quant = Quantizer("int", 4)
    codes = torch.tensor(list(itertools.product(range(-8, 8), repeat=4)), dtype=torch.float64)
    improved = 0
    for seed in range(10):
        w = _weight(1, 4, seed, torch.float64)
        x = _inputs(32, 4, seed).double()
        h = _damped(x.T @ x, 0.01)
        scale = quant.params(quant.grouped(w)).scale[:, 0]
        diff = w - codes * scale
        errs = ((diff @ h) * diff).sum(-1)
        g = gptq_quantize(w, Hessian(x.T @ x, 32), quant, damp=0.01, act_order=False)
        g_codes = (g / scale).round()
        assert torch.allclose(g / scale, g_codes, atol=1e-9)
        e_gptq = float(((w - g) @ h @ (w - g).T).squeeze())
        e_rtn = float(((w - quant(w)) @ h @ (w - quant(w)).T).squeeze())
        assert float(errs.min()) <= e_gptq * (1 + 1e-12) <= e_rtn * (1 + 1e-12), seed
        same_prefix = (codes[:, :3] == g_codes[:, :3]).all(dim=1)
        assert float(errs[same_prefix].min()) == pytest.approx(e_gptq, rel=1e-12), seed
        improved += e_gptq < e_rtn * (1 - 1e-9)
    assert improved >= 1, "some case must make GPTQ differ from RTN"


def _schemes() -> list[tuple[str, QuantScheme | Quantizer]]:
    return [
        ("int4-row", get_scheme("w4a4")),
        ("int4-g32", Quantizer("int", 4, 32)),
        ("int4-g32-asym", Quantizer("int", 4, 32, symmetric=False)),
        ("int4-row-mse", get_scheme("w4a4-mse")),
        ("nvfp4", get_scheme("nvfp4")),
        ("mxfp4", get_scheme("mxfp4")),
        ("int8-row", get_scheme("w8a8")),
    ]


@pytest.mark.parametrize(("name", "scheme"), _schemes(), ids=[n for n, _ in _schemes()])
@pytest.mark.parametrize(("m", "n"), [(8, 64), (12, 96)])
@pytest.mark.parametrize("act_order", [False, True])
def test_heldout_error_not_above_rtn(name, scheme, m, n, act_order) -> None:
    """On held-out inputs from the same distribution, GPTQ ≤ RTN for every case and seed
    (act-order, or natural order with static groups; dynamic groups: docs/quantizers.md)."""
    for seed in range(3):
        w = _weight(m, n, seed)
        x_cal, x_ho = _inputs(16 * n, n, seed), _inputs(2048, n, seed + 50)
        rtn = scheme(w) if isinstance(scheme, Quantizer) else quantize_weight_spec(w, scheme)
        out = gptq_quantize(w, x_cal, scheme, act_order=act_order, static_groups=True,
                            block_size=32)
        assert torch.isfinite(out).all()
        e_rtn, e_gptq = _out_err(x_ho, w, rtn), _out_err(x_ho, w, out)
        assert e_gptq <= e_rtn, (name, seed, e_gptq, e_rtn)


def test_identity_hessian_is_rtn_and_inputs_equal_hessian() -> None:
    w = _weight(8, 64, 3)
    x = _inputs(512, 64, 3)
    eye = Hessian(torch.eye(64, dtype=torch.float64), 1)
    for name, scheme in _schemes():
        rtn = scheme(w) if isinstance(scheme, Quantizer) else quantize_weight_spec(w, scheme)
        assert torch.equal(gptq_quantize(w, eye, scheme, damp=0.0), rtn), name
    s = get_scheme("w4a4")
    assert torch.equal(gptq_quantize(w, x, s), gptq_quantize(w, input_hessian(x), s))
    assert torch.equal(gptq_quantize(w, x.reshape(8, 64, 64), s), gptq_quantize(w, x, s))


def test_dead_inputs_and_singular_hessian() -> None:
    """Channels never active and far fewer tokens than inputs: finite, and dead columns RTN."""
    w = _weight(4, 64, 4)
    x = _inputs(16, 64, 4)
    x[:, 7] = 0.0
    scheme = get_scheme("w4a4")
    out = gptq_quantize(w, x, scheme)
    assert torch.isfinite(out).all()
    # Damping 0 on a rank-16 Hessian: the factorization retries with more damping.
    out0 = gptq_quantize(w, x, scheme, damp=0.0)
    assert torch.isfinite(out0).all()


def test_argument_errors() -> None:
    w = _weight(4, 64, 5)
    with pytest.raises(ValueError, match=r"Hessian is .* but the weight has 64 inputs"):
        gptq_quantize(w, torch.ones(10, 32), get_scheme("w4a4"))
    with pytest.raises(ValueError, match="group size 128 does not divide the input size 64"):
        gptq_quantize(w, torch.ones(10, 64), get_scheme("w4a4-g128"))
    with pytest.raises(ValueError, match="square"):
        Hessian(torch.ones(3, 4), 1)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(w, torch.ones(10, 64), get_scheme("w4a4"), damp=-1.0)


@pytest.mark.parametrize("name", ["w4a4", "w4a4-g128", "nvfp4"])
def test_fused_weight_through_layer_error(name: str) -> None:
    """The pipeline's path: GPTQ on W·diag(s)·H with inputs X·diag(s)⁻¹·H, scored by
    layer_error (activations quantized by the scheme) beats RTN of the same fused weight."""
    scheme = get_scheme(name)
    n = 128
    w = _weight(16, n, 6)
    x_cal, x_ho = _inputs(2048, n, 6), _inputs(2048, n, 60)
    s = torch.exp(torch.randn(n, generator=torch.Generator().manual_seed(7)) * 0.5)
    for act_aware in (False, True):
        wq = gptq_fused_weight(w, s, FULL, x_cal, scheme, act_aware=act_aware)
        xt = transform_input(x_cal, s, FULL)
        if act_aware:
            xt = quantize_activation_spec(xt, scheme)
        assert torch.equal(wq, gptq_quantize(transform_weight(w, s, FULL), xt, scheme))
        e_gptq = layer_error(x_ho, w, s, FULL, scheme, weight_q=wq)
        e_rtn = layer_error(x_ho, w, s, FULL, scheme)
        assert e_gptq.mse < e_rtn.mse, (act_aware, e_gptq, e_rtn)


def test_siteplan_weight_q_is_stored_and_restored() -> None:
    model = tiny_llama()
    sites = resolve_sites(model, ["model.layers.0.mlp.down_proj"])
    rs = sites[0]
    before = rs.linear.weight.detach().clone()
    scheme = get_scheme("w4a4")
    fused = transform_weight(before, None, FULL)
    wq = gptq_quantize(fused, _inputs(512, 96, 8), scheme)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(9))
    plan = SitePlan(None, rs.rotation, weight_q=wq)
    with torch.no_grad(), transformed(sites, {rs.name: plan}, scheme):
        assert torch.equal(rs.linear.weight, wq)
        assert torch.isfinite(model(input_ids=ids).logits).all()
    assert torch.equal(rs.linear.weight, before)
    with pytest.raises(ValueError, match="weight_q has shape"), \
            transformed(sites, {rs.name: SitePlan(None, rs.rotation, weight_q=wq[:, :8])}, scheme):
        pass


def test_selected_damping_is_the_selection_argmin_and_holds_on_held_out() -> None:
    """Damping is chosen on the selection split with RTN (λ = ∞) as a candidate. The choice is
    the argmin of losses recomputed here one candidate at a time, and it generalizes: matched
    calibration data picks GPTQ, which beats RTN on held-out tokens; calibration data from
    another distribution keeps RTN, which beats that GPTQ weight on held-out tokens."""
    scheme = get_scheme("w4a4")
    n = 64
    w = _weight(12, n, 11)
    x_sel, x_ho = _inputs(1024, n, 11), _inputs(2048, n, 15)

    def selection_loss(wq: torch.Tensor, transform: SiteTransform) -> float:
        x_q = quantize_activation_spec(transform_input(x_sel, None, transform), scheme)
        return float((x_sel @ w.T - x_q @ wq.T).pow(2).sum(-1).mean())

    def held_out(wq: torch.Tensor, transform: SiteTransform) -> float:
        return layer_error(x_ho, w, None, transform, scheme, weight_q=wq).mse

    def candidates(x_cal: torch.Tensor, damps: tuple[float, ...], transform: SiteTransform
                   ) -> dict[float | None, torch.Tensor]:
        """RTN (None) and GPTQ per damping of the fused weight on transformed inputs."""
        fused, xt = transform_weight(w, None, transform), transform_input(x_cal, None, transform)
        return {None: quantize_weight_spec(fused, scheme)} | {
            d: gptq_quantize(fused, xt, scheme, damp=d) for d in damps}

    x_cal = _inputs(1024, n, 12)
    good = gptq_fused_weight_selected(w, None, FULL, x_cal, x_sel, scheme)
    cands = candidates(x_cal, (0.01, 0.1, 1.0), FULL)
    losses = {d: selection_loss(wq, FULL) for d, wq in cands.items()}
    assert good.damp == min(losses, key=losses.__getitem__) and good.damp is not None
    assert good.selection_loss == pytest.approx(losses[good.damp], rel=1e-5)
    assert torch.equal(good.weight_q, cands[good.damp])
    assert held_out(good.weight_q, FULL) < held_out(cands[None], FULL)
    # Calibration tokens that excite 4 channels only: GPTQ believes the other channels are
    # free and dumps the rounding error there, which the selection tokens expose.
    x_bad = 1e-3 * torch.randn(256, n, generator=torch.Generator().manual_seed(13))
    x_bad[:, :4] = 10.0 * torch.randn(256, 4, generator=torch.Generator().manual_seed(14))
    bad = gptq_fused_weight_selected(w, None, IDENTITY, x_bad, x_sel, scheme, damps=(0.001,))
    rtn, rejected = candidates(x_bad, (0.001,), IDENTITY).values()
    assert bad.damp is None and torch.equal(bad.weight_q, rtn)
    assert held_out(rtn, IDENTITY) < held_out(rejected, IDENTITY)


def test_least_squares_target_fits_the_wanted_outputs() -> None:
    """W* reproduces W when the outputs are x·Wᵀ, finds another weight's outputs with no
    damping, and stays at W under heavy damping (ridge toward W)."""
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(512, 16, generator=gen, dtype=torch.float64)
    w, other = (torch.randn(8, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(least_squares_target(w, x, x @ w.T), w, rtol=0, atol=1e-10)
    torch.testing.assert_close(least_squares_target(w, x, x @ other.T, ridge=0.0), other,
                               rtol=0, atol=1e-10)
    far = least_squares_target(w, x, x @ other.T, ridge=1e6)
    assert float((far - w).abs().max()) < 1e-4 < float((other - w).abs().max())
    # x̃ᵀy − x̃ᵀx̃·Wᵀ, with the caller's Hessian or its own, is the textbook x̃ᵀ(y − x̃·Wᵀ)
    y, h = x @ other.T, x.T @ x
    textbook = w + torch.linalg.solve(h + 0.5 * h.diagonal().mean() * torch.eye(16, dtype=h.dtype),
                                      x.T @ (y - x @ w.T)).T
    for hessian in (None, input_hessian(x)):
        torch.testing.assert_close(least_squares_target(w, x, y, ridge=0.5, hessian=hessian),
                                   textbook, rtol=0, atol=1e-12)
    wrong = least_squares_target(w, x, y, ridge=0.5, hessian=input_hessian(2 * x))
    assert float((wrong - textbook).abs().max()) > 1e-3  # the given Hessian is the one used
    with pytest.raises(ValueError, match=r"needs x \[T, n\] and y \[T, m\]"):
        least_squares_target(w, x, (x @ w.T)[:10])


def test_float_model_target_compensates_upstream_error() -> None:
    """When the site's inputs carry an upstream error (x̃ = x·diag(g) + noise), rounding toward
    the float model's outputs x·Wᵀ is chosen on the selection split and lowers the held-out
    error against those outputs well below plain GPTQ, which fits x̃·Wᵀ; without the float
    inputs the choice is plain GPTQ's."""
    scheme = get_scheme("w4a4")
    n = 64
    w = _weight(12, n, 22)
    gain = 1.0 + 0.2 * torch.randn(n, generator=torch.Generator().manual_seed(23))

    def upstream(x: torch.Tensor, seed: int) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        return x * gain + 0.05 * x.std(0) * noise

    x_cal, x_sel, x_ho = _inputs(2048, n, 24), _inputs(1024, n, 25), _inputs(2048, n, 26)
    q_cal, q_sel, q_ho = upstream(x_cal, 27), upstream(x_sel, 28), upstream(x_ho, 29)

    def held_out(wq: torch.Tensor) -> float:
        x_q = quantize_activation_spec(transform_input(q_ho, None, FULL), scheme)
        return float((x_ho @ w.T - x_q @ wq.T).pow(2).sum(-1).mean())

    plain = gptq_fused_weight_selected(w, None, FULL, q_cal, q_sel, scheme)
    comp = gptq_fused_weight_selected(w, None, FULL, q_cal, q_sel, scheme,
                                      float_inputs=(x_cal, x_sel))
    assert plain.ridge is None and comp.ridge is not None
    assert comp.selection_loss <= comp.rtn_selection_loss
    assert held_out(comp.weight_q) < 0.5 * held_out(plain.weight_q), (
        held_out(comp.weight_q), held_out(plain.weight_q))


def test_token_weights_keep_a_huge_token_from_deciding_the_rounding() -> None:
    """Calibration rows with a few tokens 300× the others' size (attention sinks): unweighted,
    GPTQ fits those; weighing each token by 1 / its size² fits the rest, whose held-out error
    falls. Unit weights change nothing (the rows scale after the per-token activation rounding,
    which a positive factor leaves as it was)."""
    scheme = get_scheme("w4a4")
    n = 64
    w = _weight(16, n, 31)
    sink = _inputs(64, n, 32, mix_seed=7) * 300.0  # their own direction, as sinks have
    x_cal = torch.cat([_inputs(960, n, 33), sink])
    x_sel, x_ho = _inputs(1024, n, 34), _inputs(2048, n, 35)
    size = x_cal.pow(2).sum(-1)
    weights = (size.mean() / size, torch.ones(x_sel.shape[0]))
    plain = gptq_fused_weight_selected(w, None, FULL, x_cal, x_sel, scheme, damps=(0.01,))
    ones = gptq_fused_weight_selected(w, None, FULL, x_cal, x_sel, scheme, damps=(0.01,),
                                      token_weights=(torch.ones(1024), weights[1]))
    assert torch.equal(ones.weight_q, plain.weight_q)
    weighted = gptq_fused_weight_selected(w, None, FULL, x_cal, x_sel, scheme, damps=(0.01,),
                                          token_weights=weights)

    def held_out(wq: torch.Tensor) -> float:
        return layer_error(x_ho, w, None, FULL, scheme, weight_q=wq).mse

    assert weighted.damp is not None and plain.damp is not None
    assert held_out(weighted.weight_q) < 0.9 * held_out(plain.weight_q), (
        held_out(weighted.weight_q), held_out(plain.weight_q))
    # The selection loss is weighted too: a zero weight makes a token's error not count.
    bad = x_sel.clone()
    bad[0] *= 1e4
    zero = torch.ones(x_sel.shape[0])
    zero[0] = 0.0
    skip = gptq_fused_weight_selected(w, None, FULL, x_cal, bad, scheme, damps=(0.01,),
                                      token_weights=(weights[0], zero))
    assert torch.equal(skip.weight_q, weighted.weight_q)
    assert skip.selection_loss <= weighted.selection_loss  # the 10⁴× token's error not counted


def test_refit_row_scales_fits_each_row_on_the_hessian() -> None:
    """The refitted rows are the codes times the least-squares factor: never a worse fit in the
    Hessian's norm (row by row), exactly c when the goal is c × the rounding, rows the inputs
    never reach untouched, and still on a grid the export can store."""
    scheme = get_scheme("w4a4-mse")
    n = 64
    w, x = _weight(16, n, 41), _inputs(2048, n, 42)
    x[:, 5] = 0.0  # a channel the inputs never reach
    hess = input_hessian(x)
    wq = gptq_quantize(w, hess, scheme)
    refit = refit_row_scales(wq, hess, w)

    def row_errors(candidate: torch.Tensor) -> torch.Tensor:
        return (x @ (w - candidate).T).pow(2).sum(0)

    before, after = row_errors(wq), row_errors(refit)
    assert bool((after <= before * (1 + 1e-6)).all())
    assert float(after.sum()) < 0.98 * float(before.sum()), (float(after.sum()),
                                                              float(before.sum()))
    factor = torch.linspace(0.5, 2.0, 16).unsqueeze(1)
    torch.testing.assert_close(refit_row_scales(wq, hess, wq * factor), wq * factor)
    dead = torch.zeros(4, n)
    dead[:, 5] = 1.0  # only the unreached channel: no fit possible, the row stays
    assert torch.equal(refit_row_scales(dead, hess, 3.0 * dead), dead)
    quant = Quantizer("int", 4, None, True)
    grid = quant.grid_of(quant.grouped(refit))
    assert grid is not None
    torch.testing.assert_close(quant.quantize_with(quant.grouped(refit), grid).reshape(refit.shape),
                               refit)


def test_refit_scales_join_the_selection() -> None:
    """With ``refit`` each GPTQ rounding also competes with its refitted scales: the selection
    loss never rises, here a refitted rounding wins, and its held-out error is lower too; formats
    that cannot store a moved scale (asymmetric int, FP4) round as without it."""
    scheme = get_scheme("w4a4-mse")
    n = 128
    w = _weight(32, n, 3)
    x_cal, x_sel, x_ho = _inputs(2048, n, 4), _inputs(1024, n, 5), _inputs(4096, n, 6)
    plain = gptq_fused_weight_selected(w, None, FULL, x_cal, x_sel, scheme)
    refit = gptq_fused_weight_selected(w, None, FULL, x_cal, x_sel, scheme, refit=True)
    assert not plain.refit and refit.refit and refit.damp is not None
    assert refit.selection_loss < plain.selection_loss

    def held_out(wq: torch.Tensor) -> float:
        return layer_error(x_ho, w, None, FULL, scheme, weight_q=wq).mse

    assert held_out(refit.weight_q) < held_out(plain.weight_q)
    for name in ("w4a4-g128-asym", "nvfp4"):  # grids whose scale the export cannot move
        other = get_scheme(name)
        kept = gptq_fused_weight_selected(w, None, FULL, x_cal, x_sel, other)
        asked = gptq_fused_weight_selected(w, None, FULL, x_cal, x_sel, other, refit=True)
        assert not asked.refit and torch.equal(asked.weight_q, kept.weight_q)
