"""Learned per-head rotations R2 (training/head_rotation.py, surgery/head_rotation.py): the
head layout, the training decision (the identity unless training beats it) and the config."""

from __future__ import annotations

import pytest
import torch

from smoothrot.core.transform import IDENTITY, ScaleTie
from smoothrot.schema.config import HeadRotationConfig
from smoothrot.schema.errors import ConfigError
from smoothrot.schema.quant import get_scheme
from smoothrot.surgery.head_rotation import nearest_orthogonal, rotate_heads
from smoothrot.training.head_rotation import HeadRotationProblem, fit_head_rotation

LAYOUT = ScaleTie(heads=4, kv_heads=2, head_dim=8)


def test_rotate_heads_applies_each_kv_rotation_to_its_query_heads():
    gen = torch.Generator().manual_seed(1)
    r = torch.linalg.qr(torch.randn(2, 8, 8, generator=gen, dtype=torch.float64))[0]
    x = torch.randn(5, 32, generator=gen, dtype=torch.float64)
    full = torch.block_diag(r[0], r[0], r[1], r[1])  # heads 0, 1 read kv 0; heads 2, 3 kv 1
    assert torch.allclose(rotate_heads(x, r, LAYOUT), x @ full, atol=1e-14)
    with pytest.raises(ValueError, match=r"expected \(2, 8, 8\)"):
        rotate_heads(x, torch.zeros(4, 8, 8), LAYOUT)


def test_nearest_orthogonal_is_exactly_orthogonal():
    r = torch.linalg.qr(torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(0)))[0]
    q = nearest_orthogonal(r.float() + 1e-4)
    eye = torch.eye(8, dtype=torch.float64).expand(2, 8, 8)
    assert torch.allclose(q @ q.transpose(1, 2), eye, atol=1e-13)
    assert (q - r.double()).abs().max() < 1e-3


def _problem(seed: int = 0) -> HeadRotationProblem:
    """o_proj-like inputs with one outlier channel per head and no Hadamard after: a rotation
    within each head that spreads the outlier lowers the 4-bit error a lot."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1536, 32, generator=gen)
    x[:, ::8] *= 30.0
    w = torch.randn(16, 32, generator=gen) / 6
    ones = torch.ones(32, dtype=torch.float64)  # untied: one scale per input channel
    return HeadRotationProblem(w, ones, IDENTITY, LAYOUT, get_scheme("w4a4"), x[:1024],
                               x[1024:], seed=seed)


def test_training_lowers_the_selection_loss_and_stays_orthogonal():
    problem = _problem()
    _, start = fit_head_rotation(problem, HeadRotationConfig(learn=True, steps=0))
    rotation, loss = fit_head_rotation(problem, HeadRotationConfig(learn=True, steps=60,
                                                                   lr=0.05))
    assert loss < 0.7 * start
    eye = torch.eye(8, dtype=torch.float64).expand(2, 8, 8)
    assert torch.allclose(rotation @ rotation.transpose(1, 2), eye, atol=1e-5)
    assert not torch.allclose(rotation, eye, atol=1e-2)
    again, loss_again = fit_head_rotation(problem, HeadRotationConfig(learn=True, steps=60,
                                                                      lr=0.05))
    assert torch.equal(again, rotation) and loss_again == loss  # same seed, same result


def test_no_steps_keeps_the_identity():
    rotation, _ = fit_head_rotation(_problem(), HeadRotationConfig(learn=True, steps=0))
    assert torch.equal(rotation, torch.eye(8, dtype=torch.float64).expand(2, 8, 8))


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": 0.0}, "head_rotation.lr"), ({"steps": -1}, "head_rotation.steps"),
    ({"alpha": 1.5}, "head_rotation.alpha"), ({"scheme": "w3a3"}, "unknown scheme"),
    ({"learn": "yes"}, "head_rotation.learn")])
def test_bad_config_is_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        HeadRotationConfig(**kwargs)
    assert "\n" not in str(err.value)
