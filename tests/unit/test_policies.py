import pytest
import torch

from smoothrot.core.policies import NonFiniteStatisticError, smoothing_scales


def test_formula_matches_definition():
    a = torch.tensor([1.0, 100.0, 0.5])
    w = torch.tensor([0.2, 0.1, 4.0])
    s = smoothing_scales(a, w, 0.5)
    assert torch.allclose(s, (a.double() ** 0.5) / (w.double() ** 0.5))


def test_absolute_values_signed_stats():
    """Signed statistics (e.g. a signed max of a weight column) must not give NaN."""
    a = torch.tensor([-3.0, 2.0])
    w = torch.tensor([-0.5, 0.5])
    s = smoothing_scales(a, w, 0.7)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.allclose(s, smoothing_scales(a.abs(), w.abs(), 0.7))


def test_zero_channels_are_floored():
    s = smoothing_scales(torch.zeros(4), torch.zeros(4), 0.5)
    assert torch.isfinite(s).all() and (s > 0).all()


def test_extreme_outliers_stay_finite():
    a = torch.tensor([1e5, 1e-9, 3.0])
    w = torch.tensor([1e-9, 1e5, 0.0])
    for alpha in (0.0, 0.3, 1.0):
        s = smoothing_scales(a, w, alpha)
        assert torch.isfinite(s).all() and (s > 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_statistic_names_site_and_channel(bad):
    a = torch.ones(5)
    a[3] = bad
    with pytest.raises(NonFiniteStatisticError, match=r"layers\.7.*channel 3"):
        smoothing_scales(a, torch.ones(5), 0.5, site="layers.7")


def test_alpha_range_and_shape():
    with pytest.raises(ValueError, match="alpha"):
        smoothing_scales(torch.ones(3), torch.ones(3), 1.5)
    with pytest.raises(ValueError, match="channels"):
        smoothing_scales(torch.ones(3), torch.ones(4), 0.5)
