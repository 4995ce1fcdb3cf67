"""Interrupted training resumes to bit-identical scales; finished sites are not retrained."""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch

from smoothrot.schema.config import TrainConfig
from smoothrot.schema.quant import get_scheme
from smoothrot.training.checkpoints import FINAL_SCALES, LAST_CKPT, ResumeError
from smoothrot.training.fit import TrainProblem, data_digest, fit_scales
from smoothrot.training.sampler import EpochTokenSampler
from tests.unit.distributed_worker import training_problem

W4A4 = get_scheme("w4a4")
CFG = TrainConfig(steps=13, lr=0.05, batch_tokens=64, val_every=5)


@pytest.fixture(scope="module")
def problem() -> dict[str, torch.Tensor]:
    return training_problem()


def _problem(p: dict[str, torch.Tensor]) -> TrainProblem:
    return TrainProblem(p["w"], p["init"], W4A4, p["x"], p["val"], seed=1)


def _fit(
    p: dict[str, torch.Tensor], cfg: TrainConfig = CFG, **kwargs: object
) -> tuple[torch.Tensor, float]:
    return fit_scales(_problem(p), cfg, **kwargs)


@pytest.fixture(scope="module")
def reference(problem) -> tuple[torch.Tensor, float]:
    """An uninterrupted run without checkpoints."""
    return _fit(problem)


class InterruptAt(L.Callback):
    """Raise KeyboardInterrupt (what Ctrl-C does) before optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def _indices(sampler: EpochTokenSampler) -> list[int]:
    """One epoch's token indices in order (the sampler yields one index tensor per step)."""
    batches = list(sampler)
    assert len(batches) == len(sampler) and all(b.dtype == torch.int64 for b in batches)
    return torch.cat(batches).tolist()


def test_sampler_is_a_pure_function_of_the_first_step() -> None:
    a = EpochTokenSampler(n=10, batch_size=4, steps_per_epoch=3, seed=5)
    assert len(a) == 3  # one epoch = steps_per_epoch batches
    epochs = []
    for e in range(4):
        a.set_epoch(e)
        epochs.append(_indices(a))
    assert all(len(ep) == 12 for ep in epochs)
    assert [len(b) for b in a] == [4, 4, 4]
    stream = [i for ep in epochs for i in ep]
    for k in range(4):  # every pass over the 10 tokens is a permutation
        assert sorted(stream[10 * k : 10 * (k + 1)]) == list(range(10))
    assert stream[:10] != stream[10:20]  # passes are shuffled differently
    step = [0]
    b = EpochTokenSampler(n=10, batch_size=4, steps_per_epoch=3, seed=5, first_step=lambda: step[0])
    for s in (6, 3, 0, 9):  # any order of calls: the result depends only on the first step
        step[0] = s
        assert _indices(b) == stream[4 * s : 4 * s + 12]
    assert _indices(EpochTokenSampler(10, 4, 3, seed=6)) != epochs[0]


@pytest.mark.parametrize("stop", [3, 7, 10])
def test_interrupt_then_resume_gives_identical_scales(problem, reference, tmp_path, stop) -> None:
    """Ctrl-C before the first checkpoint, mid-epoch, and right at an epoch boundary."""
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _fit(problem, checkpoint_dir=tmp_path, callbacks=[InterruptAt(stop)])
    assert signal.getsignal(signal.SIGINT) is handler  # Lightning set SIG_IGN; we restore it
    assert not (tmp_path / FINAL_SCALES).exists()
    assert (tmp_path / LAST_CKPT).is_file() == (stop >= CFG.val_every)
    scales, best = _fit(problem, checkpoint_dir=tmp_path, resume=True)
    assert torch.equal(scales, reference[0]) and best == reference[1]
    assert (tmp_path / FINAL_SCALES).is_file()


def test_finished_site_is_not_retrained(problem, reference, tmp_path, monkeypatch) -> None:
    first = _fit(problem, checkpoint_dir=tmp_path)
    assert torch.equal(first[0], reference[0])

    def no_trainer(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished site must not build a Trainer")

    monkeypatch.setattr(L, "Trainer", no_trainer)
    again = _fit(problem, checkpoint_dir=tmp_path, resume=True)
    assert torch.equal(again[0], reference[0]) and again[1] == reference[1]


def test_more_steps_continue_from_the_checkpoint(problem, tmp_path) -> None:
    """Resuming with a larger train.steps equals a fresh run of that length (a constant
    learning rate; a cosine schedule depends on the length, so its checkpoint is refused)."""
    constant = replace(CFG, schedule="constant")
    longer = replace(constant, steps=20)
    _fit(problem, constant, checkpoint_dir=tmp_path)
    resumed = _fit(problem, longer, checkpoint_dir=tmp_path, resume=True)
    fresh = _fit(problem, longer)
    assert torch.equal(resumed[0], fresh[0]) and resumed[1] == fresh[1]
    _fit(problem, checkpoint_dir=tmp_path / "cosine")
    with pytest.raises(ResumeError) as exc:
        _fit(problem, replace(CFG, steps=20), checkpoint_dir=tmp_path / "cosine", resume=True)
    _one_line_error(exc, "without --resume")


def _one_line_error(excinfo: pytest.ExceptionInfo[BaseException], *words: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_resume_refuses_a_checkpoint_of_other_inputs(problem, tmp_path) -> None:
    with pytest.raises(KeyboardInterrupt):
        _fit(problem, checkpoint_dir=tmp_path, callbacks=[InterruptAt(7)])
    other = TrainConfig(steps=CFG.steps, lr=0.1, batch_tokens=CFG.batch_tokens,
                        val_every=CFG.val_every)
    with pytest.raises(ResumeError) as exc:
        _fit(problem, other, checkpoint_dir=tmp_path, resume=True)
    _one_line_error(exc, str(tmp_path / LAST_CKPT), "another model", "without --resume")
    with pytest.raises(ResumeError) as exc:  # the same checkpoint, another layer's weight
        fit_scales(replace(_problem(problem), weight=problem["w"] * 2), CFG,
                   checkpoint_dir=tmp_path, resume=True)
    _one_line_error(exc, "another model")


def test_resume_refuses_fewer_steps_than_the_checkpoint(problem, tmp_path) -> None:
    constant = replace(CFG, schedule="constant")  # its key does not include the length
    with pytest.raises(KeyboardInterrupt):
        _fit(problem, constant, checkpoint_dir=tmp_path, callbacks=[InterruptAt(12)])
    shorter = replace(constant, steps=5 - 1)
    with pytest.raises(ResumeError) as exc:
        _fit(problem, shorter, checkpoint_dir=tmp_path, resume=True)
    _one_line_error(exc, "at step 10", "train.steps=4")


def test_damaged_checkpoint_is_a_one_line_error(problem, tmp_path) -> None:
    (tmp_path / LAST_CKPT).write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(ResumeError) as exc:
        _fit(problem, checkpoint_dir=tmp_path, resume=True)
    _one_line_error(exc, "unreadable", "delete it")


def test_fresh_run_ignores_stale_files(problem, reference, tmp_path: Path) -> None:
    """Without --resume old files are replaced, so a later --resume cannot pick them up."""
    (tmp_path / LAST_CKPT).write_bytes(b"stale")
    (tmp_path / FINAL_SCALES).write_bytes(b"stale")
    scales, best = _fit(problem, checkpoint_dir=tmp_path)
    assert torch.equal(scales, reference[0]) and best == reference[1]
    again = _fit(problem, checkpoint_dir=tmp_path, resume=True)
    assert torch.equal(again[0], reference[0])


def test_a_precomputed_data_digest_names_the_same_run(problem) -> None:
    """Schemes share one digest of the token sets (methods/trained.py): the key must not change,
    and other tokens must still give another key."""
    plain = _problem(problem)
    given = replace(plain, data_digest=data_digest(problem["x"], problem["val"]))
    assert given.key(CFG) == plain.key(CFG)
    assert replace(plain, train_x=problem["x"] * 2).key(CFG) != plain.key(CFG)
