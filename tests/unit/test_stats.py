"""Streaming observers must agree with full-data reductions (``amax`` / ``torch.quantile``)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smoothrot.core.stats import AbsMaxObserver, AbsQuantileObserver, weight_absmax

QUANTILES = (0.5, 0.9, 0.99, 0.999, 1.0)


def _random_splits(n: int, gen: torch.Generator, max_batch: int) -> list[int]:
    """Random batch sizes summing to ``n`` (includes empty batches now and then)."""
    sizes: list[int] = []
    left = n
    while left > 0:
        b = int(torch.randint(0, max_batch + 1, (1,), generator=gen))
        b = min(b, left)
        sizes.append(b)
        left -= b
    return sizes


def _feed(obs: AbsMaxObserver | AbsQuantileObserver, x: torch.Tensor, sizes: list[int]) -> None:
    for chunk in torch.split(x, sizes, dim=0):
        obs.update(chunk)


def _reference(x: torch.Tensor, q: float) -> torch.Tensor:
    return torch.quantile(x.abs().float(), q, dim=0, interpolation="linear")


# --------------------------------------------------------------------------- AbsMaxObserver


def test_absmax_matches_full_data() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1037, 24, generator=gen)
    obs = AbsMaxObserver(24)
    _feed(obs, x, _random_splits(1037, gen, 200))
    assert obs.count == 1037
    assert torch.equal(obs.value(), x.abs().amax(dim=0))
    assert obs.value().dtype == torch.float32


def test_absmax_accepts_leading_dims_and_half() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 16, generator=gen).to(torch.bfloat16)
    obs = AbsMaxObserver(16)
    obs.update(x)
    assert obs.count == 21
    assert torch.equal(obs.value(), x.float().abs().reshape(-1, 16).amax(dim=0))


def test_absmax_merge_equals_single_observer() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(500, 8, generator=gen)
    a, b, full = AbsMaxObserver(8), AbsMaxObserver(8), AbsMaxObserver(8)
    a.update(x[:123])
    b.update(x[123:])
    full.update(x)
    a.merge(b)
    assert a.count == full.count == 500
    assert torch.equal(a.value(), full.value())


def test_absmax_errors() -> None:
    obs = AbsMaxObserver(4)
    with pytest.raises(ValueError, match="no data"):
        obs.value()
    with pytest.raises(ValueError, match=r"4 channels.*5"):
        obs.update(torch.zeros(2, 5))
    x = torch.zeros(3, 4)
    x[1, 2] = float("nan")
    x[2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"2 non-finite.*channel index 2"):
        obs.update(x)
    with pytest.raises(ValueError, match=r"4 and 3"):
        obs.merge(AbsMaxObserver(3))


def test_finite_values_whose_sum_overflows_are_accepted() -> None:
    """The finiteness check reads the sum first; an overflowing sum of finite values is not a
    non-finite input."""
    x = torch.full((4, 3), 3e38)
    assert not torch.isfinite(x.sum())
    obs, quant = AbsMaxObserver(3), AbsQuantileObserver(3, [0.5], 4)
    obs.update(x)
    quant.update(x)
    assert torch.equal(obs.value(), torch.full((3,), 3e38))
    assert torch.equal(quant.value(0.5), torch.full((3,), 3e38))


def test_weight_absmax() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(12, 20, generator=gen, dtype=torch.float16)
    out = weight_absmax(w)
    assert out.shape == (20,)
    assert out.dtype == torch.float32
    assert torch.equal(out, w.float().abs().amax(dim=0))
    with pytest.raises(ValueError, match=r"\[out, in\]"):
        weight_absmax(torch.zeros(3))


# --------------------------------------------------------------------------- AbsQuantileObserver


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [1, 2, 7, 999, 2003])
def test_quantiles_match_torch_quantile(seed: int, n: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=gen) * torch.rand(10, generator=gen) * 5
    obs = AbsQuantileObserver(10, QUANTILES, total_tokens=n)
    _feed(obs, x, _random_splits(n, gen, 256))
    assert obs.count == n
    vals = obs.values()
    assert vals.shape == (len(QUANTILES), 10)
    for i, q in enumerate(QUANTILES):
        expected = _reference(x, q)
        assert torch.equal(obs.value(q), expected), q
        assert torch.equal(vals[i], expected), q


def test_quantiles_with_ties() -> None:
    """Integer data has many ties, so top-k membership is ambiguous but the values are not."""
    gen = torch.Generator().manual_seed(5)
    n = 1500
    x = torch.randint(-6, 7, (n, 9), generator=gen).float()
    x[:, 0] = 3.0  # a constant channel
    obs = AbsQuantileObserver(9, QUANTILES, total_tokens=n)
    _feed(obs, x, _random_splits(n, gen, 97))
    for q in QUANTILES:
        assert torch.equal(obs.value(q), _reference(x, q)), q


def test_quantiles_with_huge_outliers() -> None:
    gen = torch.Generator().manual_seed(6)
    n = 4000
    x = torch.randn(n, 16, generator=gen)
    rows = torch.randint(0, n, (6,), generator=gen)
    x[rows, 3] = 1e4
    x[rows[:2], 11] = -1e4
    obs = AbsQuantileObserver(16, QUANTILES, total_tokens=n)
    _feed(obs, x, _random_splits(n, gen, 333))
    for q in QUANTILES:
        assert torch.equal(obs.value(q), _reference(x, q)), q
    assert obs.value(1.0)[3] == 1e4
    # The outliers must not leak into the median.
    assert obs.value(0.5)[3] < 5


def test_quantiles_fewer_tokens_than_declared_and_extra_q() -> None:
    """N below total_tokens is fine, and any q >= q_min can be read, not just declared ones."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(611, 5, generator=gen)
    obs = AbsQuantileObserver(5, (0.9, 0.99), total_tokens=1000)
    _feed(obs, x, [128] * 4 + [99])
    for q in (0.9, 0.95, 0.99, 0.9999, 1.0):
        assert torch.equal(obs.value(q), _reference(x, q)), q


def test_buffer_is_bounded() -> None:
    n = 10_000
    obs = AbsQuantileObserver(4, (0.99,), total_tokens=n)
    # k = ceil((1 - q_min)·N) + 1 (the float32 rank guard may add at most one more).
    assert math.ceil((1 - 0.99) * n) + 1 <= obs.k <= math.ceil((1 - 0.99) * n) + 2
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(n, 4, generator=gen)
    for chunk in torch.split(x, 37):
        obs.update(chunk)
        held = obs._top.shape[1] + sum(t.shape[1] for t in obs._pending)
        assert held <= 2 * obs.k + 37
    assert torch.equal(obs.value(0.99), _reference(x, 0.99))
    assert obs._top.shape == (4, obs.k)


def test_quantile_merge_equals_single_observer() -> None:
    gen = torch.Generator().manual_seed(9)
    n = 1800
    x = torch.randn(n, 7, generator=gen)
    a = AbsQuantileObserver(7, QUANTILES, total_tokens=n)
    b = AbsQuantileObserver(7, QUANTILES, total_tokens=n)
    full = AbsQuantileObserver(7, QUANTILES, total_tokens=n)
    _feed(a, x[:1100], [300, 300, 500])
    _feed(b, x[1100:], [700])
    full.update(x)
    a.merge(b)
    assert a.count == n
    assert torch.equal(a.values(), full.values())
    for q in QUANTILES:
        assert torch.equal(a.value(q), _reference(x, q))


def test_quantile_errors() -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        AbsQuantileObserver(3, (0.5, 1.5), total_tokens=10)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        AbsQuantileObserver(3, (0.0,), total_tokens=10)
    obs = AbsQuantileObserver(3, (0.9,), total_tokens=100)
    with pytest.raises(ValueError, match="no data"):
        obs.value(0.9)
    with pytest.raises(ValueError, match=r"3 channels.*4"):
        obs.update(torch.zeros(5, 4))
    x = torch.ones(4, 3)
    x[3, 1] = float("-inf")
    with pytest.raises(ValueError, match=r"1 non-finite.*channel index 1"):
        obs.update(x)
    assert obs.count == 0  # a rejected batch must not be counted
    obs.update(torch.rand(50, 3))
    with pytest.raises(ValueError, match="below the smallest declared"):
        obs.value(0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        obs.value(1.2)
    with pytest.raises(ValueError, match="configurations"):
        obs.merge(AbsQuantileObserver(3, (0.5,), total_tokens=100))


def test_too_many_tokens_raises() -> None:
    gen = torch.Generator().manual_seed(10)
    obs = AbsQuantileObserver(2, (0.9, 1.0), total_tokens=100)
    obs.update(torch.randn(100, 2, generator=gen))
    obs.value(0.9)  # exact at the declared size
    obs.update(torch.randn(400, 2, generator=gen))
    with pytest.raises(ValueError, match="total_tokens=100"):
        obs.value(0.9)
    with pytest.raises(ValueError, match="total_tokens=100"):
        obs.values()
    # The max needs only the top value, so it stays exact.
    assert obs.value(1.0).shape == (2,)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=400),
    channels=st.integers(min_value=1, max_value=6),
    quantiles=st.lists(
        st.floats(min_value=0.01, max_value=1.0, allow_nan=False), min_size=1, max_size=4
    ),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    max_batch=st.integers(min_value=1, max_value=128),
    integer_data=st.booleans(),
    extra_tokens=st.integers(min_value=0, max_value=50),
)
def test_property_matches_torch_quantile(
    n: int,
    channels: int,
    quantiles: list[float],
    seed: int,
    max_batch: int,
    integer_data: bool,
    extra_tokens: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    if integer_data:
        x = torch.randint(-4, 5, (n, channels), generator=gen).float()
    else:
        x = torch.randn(n, channels, generator=gen)
    obs = AbsQuantileObserver(channels, quantiles, total_tokens=n + extra_tokens)
    _feed(obs, x, _random_splits(n, gen, max_batch))
    vals = obs.values()
    for i, q in enumerate(quantiles):
        assert torch.equal(vals[i], _reference(x, q)), q


def test_masked_by_channel_gathers_each_channels_values_in_row_order() -> None:
    """The filtered update's gather: per channel, the masked values in row order, then zeros."""
    from smoothrot.core.stats import _masked_by_channel

    gen = torch.Generator().manual_seed(11)
    values = torch.rand(50, 6, generator=gen) + 0.1
    mask = torch.rand(50, 6, generator=gen) > 0.8
    mask[:, 2] = False  # a channel with nothing to keep
    out = _masked_by_channel(values, mask)
    assert out.shape == (6, int(mask.sum(dim=0).max()))
    for c in range(6):
        kept = values[mask[:, c], c]
        assert torch.equal(out[c, : kept.numel()], kept)
        assert not out[c, kept.numel():].any()
    assert _masked_by_channel(values, torch.zeros_like(mask)).shape == (6, 0)
