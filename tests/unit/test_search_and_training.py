"""Grid search, policy selection, trained scales and held-out error on synthetic outlier data."""

from dataclasses import replace

import pytest
import torch

from smoothrot.core.policies import smoothing_scales
from smoothrot.core.stats import AbsMaxObserver, AbsQuantileObserver, weight_absmax
from smoothrot.core.transform import FULL, IDENTITY, ScaleTie, SiteTransform
from smoothrot.evaluate import layer_error
from smoothrot.losses import output_loss, quantized_output, relative_output_loss
from smoothrot.methods import search
from smoothrot.methods.policy import (
    pick_alpha_only,
    pick_joint,
    pick_joint_global,
    pick_max,
    pick_quantile,
)
from smoothrot.methods.registry import MethodResult
from smoothrot.methods.search import candidate_loss, candidate_losses, grid_losses
from smoothrot.methods.trained import GLOBAL_FACTORS, _known_loss, best_global_factor
from smoothrot.schema.config import TrainConfig
from smoothrot.schema.quant import QuantScheme, get_scheme, with_act_clip
from smoothrot.schema.rotation import Rotation
from smoothrot.training.fit import TrainProblem, fit_scales

W4A4 = get_scheme("w4a4")
W8A8 = get_scheme("w8a8")


def outlier_data(tokens: int = 1024, n: int = 96, m: int = 32, seed: int = 0):
    """Activations with a few large channels and rare huge spikes, like LLM down_proj inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g)
    x[:, :3] *= 30.0
    x[::97, 5] = 3000.0  # rare spikes: the max policy over-reacts to these
    w = torch.randn(m, n, generator=g) / n**0.5
    return x, w


def stats_of(x, quantiles):
    mx, qo = AbsMaxObserver(x.shape[1]), AbsQuantileObserver(x.shape[1], quantiles, x.shape[0])
    mx.update(x)
    qo.update(x)
    out = {q: qo.value(q) for q in quantiles}
    out[1.0] = mx.value()
    return out


def test_grid_and_selection():
    x, w = outlier_data()
    alphas, quantiles = [0.3, 0.5, 0.7], [0.9, 0.99, 1.0]
    stats = stats_of(x, quantiles)
    table = grid_losses(x, w, stats, weight_absmax(w), alphas, quantiles, [W4A4], "site")[0]
    assert table.shape == (3, 3) and torch.isfinite(table).all()
    s = smoothing_scales(stats[0.99], weight_absmax(w), 0.5)
    expected = float(output_loss(x @ w.T, quantized_output(x, w, s, FULL, W4A4)))
    assert abs(float(table[1, 1]) - expected) < 1e-5 * expected
    assert abs(candidate_loss(x, x @ w.T, w, s, W4A4) - expected) < 1e-5 * expected

    tables = {"a": torch.tensor([[3.0, 2.0, 5.0], [4.0, 1.0, 2.5]]),
              "b": torch.tensor([[1.0, 9.0, 1.0], [0.4, 0.5, 1.0]])}
    pickers = {"smoothrot_max": pick_max, "quantile": pick_quantile,
               "joint_global": pick_joint_global, "joint": pick_joint,
               "alpha_only": pick_alpha_only}
    ch = {m: pick(tables, [0.3, 0.5], [0.9, 0.99, 1.0]) for m, pick in pickers.items()}
    # q=1 column mean: [3.0, 1.75] -> α=0.5; then q at α=0.5: [3.0, 0.75, 1.75] -> 0.99
    assert {c.alpha for c in ch["smoothrot_max"].values()} == {0.5}
    assert {c.q for c in ch["smoothrot_max"].values()} == {1.0}
    # quantile keeps α=0.5 and picks q per site: a -> 0.99 (loss 1.0), b -> 0.9 (loss 0.4)
    assert {s: (c.alpha, c.q) for s, c in ch["quantile"].items()} == {"a": (0.5, 0.99),
                                                                       "b": (0.5, 0.9)}
    assert {(c.alpha, c.q) for c in ch["joint_global"].values()} == {(0.5, 0.99)}
    assert (ch["joint"]["a"].alpha, ch["joint"]["a"].q) == (0.5, 0.99)
    assert (ch["joint"]["b"].alpha, ch["joint"]["b"].q) == (0.5, 0.9)
    # α-only: q = 1 column per site, a: [5.0, 2.5] -> 0.5; b: [1.0, 1.0] -> the first, 0.3
    assert {s: (c.alpha, c.q) for s, c in ch["alpha_only"].items()} == {"a": (0.5, 1.0),
                                                                         "b": (0.3, 1.0)}


def test_alpha_only_is_the_argmin_of_independently_scored_max_policies():
    """α per site at q = 1: each site's α minimizes the selection loss of the max policy, scored
    here one α at a time with the plain loss (not the batched grid); joint, which may also move
    q, is at least as good on the selection split."""
    alphas, quantiles = [0.2, 0.35, 0.5, 0.65, 0.8], [0.99, 1.0]
    tables, chosen_loss = {}, {}
    for seed in range(4):
        x, w = outlier_data(tokens=512, seed=seed)  # seeds 0 and 1 prefer different α
        stats = stats_of(x, quantiles)
        site = f"site{seed}"
        tables[site] = grid_losses(x, w, stats, weight_absmax(w), alphas, quantiles, [W4A4],
                                   site)[0]
        losses = [float(output_loss(x @ w.T, quantized_output(
            x, w, smoothing_scales(stats[1.0], weight_absmax(w), a), FULL, W4A4)))
            for a in alphas]
        chosen_loss[site] = dict(zip(alphas, losses, strict=True))
    picked = pick_alpha_only(tables, alphas, quantiles)
    joint = pick_joint(tables, alphas, quantiles)
    for site, choice in picked.items():
        by_alpha = chosen_loss[site]
        assert choice.q == 1.0 and choice.alpha == min(by_alpha, key=by_alpha.__getitem__)
        j = joint[site]
        joint_loss = float(tables[site][alphas.index(j.alpha), quantiles.index(j.q)])
        assert by_alpha[choice.alpha] >= joint_loss * (1 - 1e-5)
    assert len({c.alpha for c in picked.values()}) > 1, "per-site α, not one global α"


def test_windowed_grid_scores_q_below_one_near_the_max_alpha_only():
    """Coarse to fine on real losses: the q = 1 column for every α, then q < 1 only within the
    window of each scheme's SmoothRot-max α; scored entries equal the whole grid's, the rest
    are +inf, and every picker whose whole-grid pick lies in the window picks it again."""
    alphas, quantiles = [0.2, 0.35, 0.5, 0.65, 0.8], [0.9, 0.99, 1.0]
    data = {f"site{seed}": outlier_data(tokens=512, seed=seed) for seed in range(3)}
    stats = {site: stats_of(x, quantiles) for site, (x, _) in data.items()}
    calls = []

    def score(a, q):
        calls.append((list(a), list(q)))
        return {site: grid_losses(x, w, stats[site], weight_absmax(w), a, q, [W4A4, W8A8], site)
                for site, (x, w) in data.items()}

    whole = score(alphas, quantiles)
    calls.clear()
    windowed = search.windowed_grid(score, alphas, quantiles, 0.15)
    centers = {pick_max({s: t[i] for s, t in whole.items()}, alphas, quantiles)["site0"].alpha
               for i in range(2)}
    near = [a for a in alphas if any(abs(a - c) <= 0.15 + 1e-9 for c in centers)]  # a grid step
    assert calls == [(alphas, [1.0]), (near, [0.9, 0.99])] and len(near) < len(alphas)
    for site, table in windowed.items():
        scored = torch.isfinite(table)
        assert scored[:, :, -1].all()  # q = 1: every α
        for i, a in enumerate(alphas):
            row = scored[:, i, :-1]
            assert bool(row.all()) == bool(row.any()) == (a in near)
        assert torch.equal(table[scored], whole[site][scored])
    pickers = (pick_max, pick_alpha_only, pick_quantile, pick_joint, pick_joint_global)
    checked = 0
    for i in range(2):
        full = {s: t[i] for s, t in whole.items()}
        cut = {s: t[i] for s, t in windowed.items()}
        for pick in pickers:
            expected = pick(full, alphas, quantiles)
            if all(c.q == 1.0 or c.alpha in near for c in expected.values()):
                assert pick(cut, alphas, quantiles) == expected, pick.__name__
                checked += 1
    assert checked == 2 * len(pickers)  # every pick of this data lies in the window
    assert search.windowed_grid(score, alphas, quantiles, None).keys() == whole.keys()
    assert calls[-1] == (alphas, quantiles)  # no window: the whole grid at once


@pytest.mark.parametrize("window", [-0.1, True, "0.1"])
def test_alpha_window_must_be_a_distance(window):
    from smoothrot.schema.config import ConfigError, SearchConfig

    with pytest.raises(ConfigError, match="alpha_window"):
        SearchConfig(alpha_window=window)


@pytest.mark.parametrize(
    ("scheme", "transform"),
    [
        (W4A4, FULL),
        (get_scheme("w8a8"), IDENTITY),
        (get_scheme("nvfp4"), FULL),
        (get_scheme("mxfp4"), SiteTransform(Rotation.head(block_size=32))),
        (QuantScheme("g32asym", 4, 4, w_group_size=32, w_symmetric=False, w_mse_clip=True),
         FULL),
        (W4A4, SiteTransform(Rotation.head(block_size=16), ScaleTie(6, 2, 16))),
    ],
    ids=["w4a4-full", "w8a8-none", "nvfp4-full", "mxfp4-head32", "g32asym-full",
         "w4a4-head16-tied"],
)
def test_batched_candidates_match_one_at_a_time(scheme: QuantScheme, transform: SiteTransform):
    """The vectorized search scores each candidate exactly as the per-candidate loss does."""
    x, w = outlier_data(tokens=256)
    gen = torch.Generator().manual_seed(3)
    n_scales = transform.n_scales(x.shape[1])
    assert n_scales == (32 if transform.tie else x.shape[1])
    cands = torch.exp(torch.randn(5, n_scales, generator=gen))
    batched = candidate_losses(x, x @ w.T, w, cands, [scheme], transform)[0]
    single = torch.stack([output_loss(x @ w.T, quantized_output(x, w, c, transform, scheme))
                          for c in cands])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=0)
    assert len(set(batched.tolist())) == 5  # candidates were not mixed up


def test_grid_is_the_same_whatever_the_chunk_size(monkeypatch):
    x, w = outlier_data(tokens=256)
    stats = stats_of(x, [0.99, 1.0])
    args = (x, w, stats, weight_absmax(w), [0.3, 0.6], [0.99, 1.0], [W4A4, W8A8], "site")
    whole = grid_losses(*args)
    monkeypatch.setattr(search, "_CHUNK_ELEMENTS", {"cpu": 1})  # one candidate per chunk
    torch.testing.assert_close(grid_losses(*args), whole, rtol=1e-6, atol=0)


def test_one_grid_for_several_schemes_equals_one_grid_per_scheme():
    """The run scores every scheme on the same rotated candidates: each scheme's table is the one
    a search of that scheme alone computes, and the schemes' tables differ."""
    x, w = outlier_data(tokens=256)
    stats = stats_of(x, [0.99, 1.0])
    args = (x, w, stats, weight_absmax(w), [0.3, 0.6], [0.99, 1.0])
    schemes = [W4A4, W8A8, get_scheme("w4a8")]
    together = grid_losses(*args, schemes, "site")
    assert together.shape == (3, 2, 2)
    for i, scheme in enumerate(schemes):
        torch.testing.assert_close(together[i], grid_losses(*args, [scheme], "site")[0],
                                   rtol=0, atol=0)
    assert (together[0] > 10 * together[1]).all()  # 4-bit activations: far larger errors


def test_rotation_and_smoothing_reduce_error_on_outliers():
    x, w = outlier_data()
    rtn = layer_error(x, w, None, IDENTITY, W4A4)
    had = layer_error(x, w, None, FULL, W4A4)
    s = smoothing_scales(stats_of(x, [1.0])[1.0], weight_absmax(w), 0.5)
    smooth = layer_error(x, w, s, FULL, W4A4)
    assert had.mse < rtn.mse and smooth.mse < had.mse
    assert 0 < smooth.relative < 1


def test_trained_scales_improve_selection_and_are_deterministic(tmp_path):
    x, w = outlier_data(tokens=1536)
    train_x, val_x, test_x = x[:768], x[768:1152], x[1152:]
    init = smoothing_scales(stats_of(train_x, [1.0])[1.0], weight_absmax(w), 0.5)
    cfg = TrainConfig(steps=40, lr=0.05, batch_tokens=256, val_every=10)
    init_val = candidate_loss(val_x, val_x @ w.T, w, init, W4A4)
    problem = TrainProblem(w, init, W4A4, train_x, val_x, seed=3)
    s1, best1 = fit_scales(problem, cfg)
    s2, best2 = fit_scales(problem, cfg, checkpoint_dir=tmp_path / "ck")
    assert torch.equal(s1, s2) and best1 == best2
    assert (tmp_path / "ck" / "last.ckpt").is_file()
    assert torch.isfinite(s1).all() and (s1 > 0).all()
    assert best1 < init_val  # training found something better than the policy
    assert abs(candidate_loss(val_x, val_x @ w.T, w, s1, W4A4) - best1) < 1e-3 * best1
    assert (layer_error(test_x, w, s1, FULL, W4A4).mse
            < layer_error(test_x, w, init, FULL, W4A4).mse)


@pytest.mark.parametrize("scheme", [W4A4, W8A8])
def test_known_start_loss_replaces_the_first_validation(scheme):
    """The search's loss of the starting scales is what the first validation measures (to the
    rounding that normalizing log s moves: 1e-4 at 8 bits), so passing it gives the run that
    validates them; a start loss no step can reach keeps the starting scales (normalized as
    training holds them)."""
    x, w = outlier_data(tokens=1536)
    train_x, val_x = x[:768], x[768:1152]
    init = smoothing_scales(stats_of(train_x, [1.0])[1.0], weight_absmax(w), 0.5)
    cfg = TrainConfig(steps=20, lr=0.05, batch_tokens=256, val_every=10)
    problem = TrainProblem(w, init, scheme, train_x, val_x, seed=3)
    known = candidate_loss(val_x, val_x @ w.T, w, init, scheme)
    validated = fit_scales(problem, TrainConfig(**{**cfg.__dict__, "steps": 0}))[1]
    assert validated == pytest.approx(known, rel=1e-3)
    scales, best = fit_scales(problem, cfg)
    skipped, skipped_best = fit_scales(replace(problem, start_loss=known), cfg)
    assert torch.equal(scales, skipped) and best == skipped_best < known
    unreachable, zero = fit_scales(replace(problem, start_loss=0.0), cfg)
    assert zero == 0.0
    torch.testing.assert_close(unreachable / unreachable[0], init.double() / init[0],
                               rtol=1e-5, atol=0)


def test_known_start_loss_only_where_training_would_measure_it():
    """The search's loss starts training only under the grid's own clip and an equivariant
    scheme; a site clip (target research) or MXFP4 (whose loss moves with log s's
    normalization) validates the start instead."""
    start = MethodResult({}, selection_loss={"s": 0.5})
    assert _known_loss(start, "s", W4A4, W4A4) == 0.5
    assert _known_loss(start, "other", W4A4, W4A4) is None
    assert _known_loss(start, "s", with_act_clip(W4A4, 0.9), W4A4) is None
    assert _known_loss(start, "s", get_scheme("mxfp4"), get_scheme("mxfp4")) is None


def test_act_clip_search_clips_heavy_tails_and_keeps_flat_inputs():
    """4-bit per-token grids: clipping pays on heavy-tailed (Laplace) tokens; on ±1 tokens every
    entry sits at the max, so any clip below 1 only adds error. The choice is the grid's argmin."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=gen)
    sign = torch.randint(0, 2, (512, 64), generator=gen).float() * 2 - 1
    laplace = torch.empty(512, 64).exponential_(generator=gen) * sign
    flat = torch.randint(0, 2, (512, 64), generator=gen).float() * 2 - 1
    clips = [1.0, 0.9, 0.8, 0.7, 0.6]
    for x, expect_clipped in ((laplace, True), (flat, False)):
        clip, loss = search.select_act_clip(x, w, None, clips, W4A4, transform=IDENTITY)
        losses = [float(output_loss(x @ w.T, quantized_output(
            x, w, None, IDENTITY, QuantScheme("c", 4, 4, a_clip=c)))) for c in clips]
        assert clip == clips[losses.index(min(losses))]
        assert loss == pytest.approx(min(losses), rel=1e-5)
        assert (clip < 1.0) == expect_clipped
        if expect_clipped:
            assert min(losses) < 0.95 * losses[0]
    assert search.select_act_clip(laplace, w, None, [0.7], W4A4, transform=IDENTITY)[0] == 0.7


def test_mxfp4_global_factor_is_chosen_on_selection_and_holds_on_held_out():
    """Under MXFP4 the loss of c·s depends on c (period 2): the factor searched on selection
    tokens also lowers the error on held-out tokens (int grids: c changes nothing, test_scales)."""
    mxfp4 = get_scheme("mxfp4")
    x, w = outlier_data(tokens=1536, n=256, seed=2)  # a site where c = 1 is a bad phase
    x_sel, x_ho = x[:768], x[768:]
    s = smoothing_scales(stats_of(x_sel, [1.0])[1.0], weight_absmax(w), 0.5).double()
    picked, loss = best_global_factor(s, x_sel, w, mxfp4, FULL)
    c = float((picked / s).mean())
    assert min(abs(c - f) for f in GLOBAL_FACTORS[1:]) < 1e-9  # one of the grid, not 1
    assert loss < 0.9 * candidate_loss(x_sel, x_sel @ w.T, w, s, mxfp4)
    assert layer_error(x_ho, w, picked, FULL, mxfp4).mse < 0.9 * layer_error(
        x_ho, w, s, FULL, mxfp4).mse


def test_relative_output_loss_counts_every_token_alike():
    """Each token's squared error over its reference's squared norm, averaged: scaling one token
    (an attention sink) and its error by 1000 leaves it unchanged, where the plain loss grows
    by 10⁶; a zero reference counts its raw error instead of dividing by zero."""
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(8, 16, generator=gen)
    out = ref + 0.1 * torch.randn(8, 16, generator=gen)
    expected = ((out - ref).pow(2).sum(-1) / ref.pow(2).sum(-1)).mean()
    torch.testing.assert_close(relative_output_loss(ref, out), expected)
    big = torch.ones(8, 1)
    big[0] = 1000.0
    torch.testing.assert_close(relative_output_loss(ref * big, out * big), expected)
    assert output_loss(ref * big, out * big) > 1e5 * output_loss(ref, out)
    zero = torch.zeros(1, 16)
    loss = relative_output_loss(torch.cat([ref, zero]), torch.cat([out, zero + 0.5]))
    torch.testing.assert_close(loss, (expected * 8 + 16 * 0.25) / 9)
