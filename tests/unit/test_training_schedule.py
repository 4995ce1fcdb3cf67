"""How long a site trains: the cosine learning-rate schedule and early stopping on the selection
loss plateau (train.schedule, train.patience, train.min_delta)."""

from __future__ import annotations

import math
import signal

import lightning as L
import pytest
import torch

from smoothrot.schema.config import TrainConfig
from smoothrot.schema.errors import ConfigError
from smoothrot.schema.quant import get_scheme
from smoothrot.training.fit import TrainProblem, fit_scales
from tests.unit.distributed_worker import training_problem
from tests.unit.test_resume import InterruptAt

W4A4 = get_scheme("w4a4")


@pytest.fixture(scope="module")
def problem() -> TrainProblem:
    p = training_problem()
    return TrainProblem(p["w"], p["init"], W4A4, p["x"], p["val"], seed=1)


class Record(L.Callback):
    """The learning rate of every optimizer step and the step of every validation in fit."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.val_steps: list[int] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self.val_steps.append(trainer.global_step)


def test_cosine_schedule_decays_to_zero_over_the_steps(problem) -> None:
    rec = Record()
    fit_scales(problem, TrainConfig(steps=8, lr=0.1, batch_tokens=32, val_every=4),
               callbacks=[rec])
    expected = [0.05 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert rec.lrs == pytest.approx(expected)
    rec = Record()
    fit_scales(problem, TrainConfig(steps=8, lr=0.1, batch_tokens=32, val_every=4,
                                    schedule="constant"), callbacks=[rec])
    assert rec.lrs == pytest.approx([0.1] * 8)


def test_a_plateau_stops_the_site_early_and_keeps_the_best_point(problem) -> None:
    """A relative improvement bar no validation can clear stops training after ``patience``
    validations; without patience every step runs. The best point is still the best seen."""
    cfg = TrainConfig(steps=40, lr=0.05, batch_tokens=32, val_every=5, schedule="constant")
    full = Record()
    _, full_loss = fit_scales(problem, cfg, callbacks=[full])
    assert full.val_steps == [5, 10, 15, 20, 25, 30, 35, 40]
    early = Record()
    strict = TrainConfig(**{**cfg.__dict__, "patience": 2, "min_delta": 0.99})
    _, early_loss = fit_scales(problem, strict, callbacks=[early])
    assert early.val_steps == [5, 10]  # two validations without a 99 % drop
    assert early_loss >= full_loss  # stopped early: it saw fewer points
    gentle = Record()  # a bar training clears at first: it runs until the gains fade
    fit_scales(problem, TrainConfig(**{**cfg.__dict__, "patience": 1, "min_delta": 0.01}),
               callbacks=[gentle])
    assert 5 < gentle.val_steps[-1] <= 40


def test_early_stopping_resumes_to_the_same_stop(problem, tmp_path) -> None:
    """The plateau counter is in the checkpoint: an interrupted run stops where an
    uninterrupted one does, with identical scales."""
    cfg = TrainConfig(steps=60, lr=0.05, batch_tokens=32, val_every=5, patience=2,
                      min_delta=0.05)
    reference, ref_loss = fit_scales(problem, cfg)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        fit_scales(problem, cfg, checkpoint_dir=tmp_path, callbacks=[InterruptAt(12)])
    assert signal.getsignal(signal.SIGINT) is handler
    scales, loss = fit_scales(problem, cfg, checkpoint_dir=tmp_path, resume=True)
    assert torch.equal(scales, reference) and loss == ref_loss


@pytest.mark.parametrize("bad", [{"schedule": "linear"}, {"patience": -1}, {"min_delta": 1.0}])
def test_bad_schedule_settings_are_one_line_errors(bad) -> None:
    with pytest.raises(ConfigError, match="train\\."):
        TrainConfig(**bad)


class Logged(L.Callback):
    """The names of the metrics Lightning collected by the end of fit."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.names = set(trainer.callback_metrics)


@pytest.mark.parametrize("bar", [False, True])
def test_training_loss_is_logged_only_for_the_progress_bar(problem, bar: bool) -> None:
    """The per-step log feeds the bar only (~0.7 ms of a ~14 ms step otherwise); the selection
    loss, which chooses the scales, is logged either way; the scales do not depend on it."""
    logged = Logged()
    cfg = TrainConfig(steps=4, lr=0.05, batch_tokens=32, val_every=2, progress_bar=bar)
    scales, _ = fit_scales(problem, cfg, callbacks=[logged])
    assert "val_loss" in logged.names
    assert ("train_loss" in logged.names) is bar
    other, _ = fit_scales(problem, TrainConfig(steps=4, lr=0.05, batch_tokens=32, val_every=2,
                                               progress_bar=not bar))
    assert torch.equal(scales, other)
