"""Trained scales: the entry point that refines log s of one site from the best policy.

:class:`TrainProblem` is what is trained (one site's weight, tokens, initial scales, scheme,
input transform and seed); :func:`fit_scales` trains it under a :class:`TrainConfig` with the
LightningModule of module.py and returns the best scales on the selection split.

Interrupted training resumes *exactly* (same scales, bit for bit, as an uninterrupted run):

* the tokens of training step g are a pure function of ``(seed, g)`` (sampler.py);
* one Lightning epoch is ``val_every`` steps;
* validation and ``last.ckpt`` happen at epoch ends, the only place where Lightning 2.x restores
  the loop without replaying or skipping batches (mid-epoch it restarts the dataloader);
* a finished site's scales are stored and reused, and every file carries the run key
  (checkpoints.py), so a checkpoint of other inputs is refused.

Data-parallel (distributed.py: DDP over the current process group) each rank trains on a fixed
slice of every batch and only rank 0 writes files; with the same number of processes resume is
still bit-exact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from smoothrot.core.transform import FULL, SiteTransform
from smoothrot.distributed import (
    broadcast_object,
    is_rank_zero,
    rank,
    shard_bounds,
    trainer_kwargs,
    world_size,
)
from smoothrot.losses import native_bf16
from smoothrot.schema.config import TrainConfig
from smoothrot.schema.quant import QuantScheme
from smoothrot.training.checkpoints import RunCheckpoints, tensor_digest
from smoothrot.training.interrupt import interruptible
from smoothrot.training.module import EpochEndCheckpoint, ScaleFitModule
from smoothrot.training.sampler import EpochTokenSampler

log = logging.getLogger(__name__)

_VAL_BATCH = 4096  # selection rows per validation batch


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class TrainProblem:
    """One site's training problem: fit scales of ``weight`` on ``train_x``, select on ``val_x``.

    ``rotate`` is the site's input transform (rotation and scale tying); ``seed`` fixes the
    token order. ``start_loss``, the selection loss of ``init_scales`` when it is already known
    (the search scored them), replaces the validation of the starting point. ``data_digest``,
    :func:`data_digest` of the token sets when the caller already has it (several schemes
    train on the same tokens; hashing them is ~30 ms a site).
    """

    weight: torch.Tensor
    init_scales: torch.Tensor
    scheme: QuantScheme
    train_x: torch.Tensor
    val_x: torch.Tensor
    rotate: SiteTransform = FULL
    seed: int = 0
    start_loss: float | None = None
    data_digest: str | None = None

    def key(self, cfg: TrainConfig, bf16_grads: bool = False) -> str:
        """Identity of this run under ``cfg`` except its length (``steps``, unless the schedule
        depends on it): equal keys, same trajectory. ``bf16_grads``: whether the run computes
        the product's gradients in bfloat16 (``cfg.bf16_grads`` where the machine has them)."""
        data = self.data_digest or data_digest(self.train_x, self.val_x)
        tensors = tensor_digest(self.weight.float(), self.init_scales.double()) + data
        transform = repr(self.rotate)  # a frozen dataclass: its repr is its identity
        # A cosine schedule depends on the length; a constant one does not.
        schedule = cfg.schedule if cfg.schedule == "constant" else f"{cfg.schedule}@{cfg.steps}"
        return (f"{tensors}|{self.scheme!r}|rotate={transform}|lr={cfg.lr}|"
                f"batch={cfg.batch_tokens}|val_every={cfg.val_every}|bound={cfg.log_bound}|"
                f"schedule={schedule}|patience={cfg.patience}/{cfg.min_delta}|seed={self.seed}|"
                f"start={self.start_loss!r}|bf16_grads={bf16_grads}")


def data_digest(train_x: torch.Tensor, val_x: torch.Tensor) -> str:
    """The token sets' part of :meth:`TrainProblem.key`."""
    return tensor_digest(train_x.float(), val_x.float())


def fit_scales(
    problem: TrainProblem,
    cfg: TrainConfig,
    *,
    accelerator: str = "cpu",
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    callbacks: list[L.Callback] | None = None,
) -> tuple[torch.Tensor, float]:
    """Train scales for one site; returns (best scales float64, best selection loss).

    With ``checkpoint_dir``, ``last.ckpt`` is saved every ``cfg.val_every`` steps and
    ``final.safetensors`` when the site is done. With ``resume``, a finished site is read back
    and an unfinished one continues from ``last.ckpt``; the result equals an uninterrupted run.
    Ctrl-C raises KeyboardInterrupt (Lightning alone would exit the process); ``callbacks`` are
    extra Lightning callbacks (tests use one to interrupt).
    """
    # Where the CPU has native bfloat16 GEMMs (GPUs train fast enough in float32).
    bf16_grads = cfg.bf16_grads and accelerator == "cpu" and native_bf16()
    key = problem.key(cfg, bf16_grads)
    folder = None if checkpoint_dir is None else Path(checkpoint_dir)
    files = ckpt = None
    if folder is not None:
        files = RunCheckpoints(folder, key, cfg.steps)
        if resume:  # rank 0 owns the files; every rank must take the same branch
            stored = broadcast_object(files.load_final() if is_rank_zero() else None)
            if stored is not None:
                log.info("%s: training already finished; reusing %s", folder, files.final)
                return stored
            # Lightning loads the checkpoint on every rank: multi-node needs a shared output dir.
            ckpt = files.resume_point()
        elif is_rank_zero():  # a fresh run must not leave stale files a later --resume would use
            files.clear()
        folder.mkdir(parents=True, exist_ok=True)

    L.seed_everything(problem.seed, workers=True, verbose=False)
    module = ScaleFitModule(problem.weight, problem.init_scales, problem.scheme, problem.rotate,
                            cfg.lr, cfg.log_bound, key, schedule=cfg.schedule,
                            total_steps=cfg.steps, patience=cfg.patience,
                            min_delta=cfg.min_delta, start_loss=problem.start_loss,
                            bf16_grads=bf16_grads)
    # The sampler reads the step when an epoch starts, after the Trainer below exists.
    train, val = _loaders(problem, cfg, first_step=lambda: trainer.global_step)
    all_callbacks = list(callbacks or [])
    if files is not None:
        all_callbacks.append(EpochEndCheckpoint(files.last))
    # One epoch = val_every steps (the sampler's length).
    trainer = scale_trainer(cfg.steps, accelerator, progress_bar=cfg.progress_bar,
                            callbacks=all_callbacks, root=folder)
    # The initial point is a candidate (a checkpoint, or the search, already holds its loss).
    if ckpt is None and problem.start_loss is None:
        interruptible(trainer, trainer.validate, model=module, dataloaders=val, verbose=False)
    if cfg.steps > 0:
        interruptible(trainer, trainer.fit, model=module, train_dataloaders=train,
                      val_dataloaders=val, ckpt_path=ckpt, weights_only=True)
        if trainer.global_step % cfg.val_every:  # a last partial epoch had no validation
            interruptible(trainer, trainer.validate, model=module, dataloaders=val,
                          verbose=False)
    best = module.best_scales.detach().cpu().clone()
    best_val = float(module.best_val)
    if files is not None and is_rank_zero():
        files.save_final(best, best_val)
    return best, best_val


def _loaders(
    problem: TrainProblem, cfg: TrainConfig, first_step: Callable[[], int]
) -> tuple[DataLoader, DataLoader]:
    """This rank's training batches and selection rows, each token with its target x·Wᵀ.

    Data-parallel each rank takes its slice of every batch and of the selection rows; DDP
    averages the gradients and the validation MeanMetric syncs, so all ranks decide alike.
    """
    w = problem.weight.detach().float()
    if world_size() > 1 and cfg.batch_tokens % world_size():
        log.warning("train.batch_tokens=%d is not a multiple of %d processes: unequal batch "
                    "shares weigh tokens unequally, so steps differ from a 1-process run",
                    cfg.batch_tokens, world_size())
    train_x, val_x = problem.train_x, problem.val_x
    sampler = EpochTokenSampler(train_x.shape[0], cfg.batch_tokens, cfg.val_every, problem.seed,
                                first_step=first_step, part=rank(), parts=world_size())
    train = DataLoader(TensorDataset(train_x, train_x @ w.T), batch_size=None, sampler=sampler)
    lo, hi = shard_bounds(val_x.shape[0])
    # Slices of 4096 rows: each batch is two views, not 4096 rows fetched and stacked one by one.
    val_x = val_x[lo:hi]
    chunks = [slice(i, i + _VAL_BATCH) for i in range(0, val_x.shape[0], _VAL_BATCH)]
    val = DataLoader(TensorDataset(val_x, val_x @ w.T), batch_size=None, sampler=chunks)
    return train, val


def accelerator_of(model: torch.nn.Module) -> str:
    """The Lightning accelerator for training beside ``model``: where its weights are."""
    return "gpu" if next(model.parameters()).is_cuda else "cpu"


def scale_trainer(
    steps: int,
    accelerator: str,
    *,
    progress_bar: bool = False,
    callbacks: list[L.Callback] | None = None,
    root: Path | None = None,
) -> L.Trainer:
    """The deterministic Trainer every scale fit runs in: ``steps`` optimizer steps, validation
    at each epoch end (one epoch = the training loader's length), no logger, no Lightning
    checkpoints, data-parallel over the current process group when there is one."""
    return L.Trainer(
        accelerator=accelerator,
        **trainer_kwargs(),
        max_steps=steps,
        check_val_every_n_epoch=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,  # EpochEndCheckpoint writes last.ckpt itself
        callbacks=callbacks,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        deterministic=True,
        use_distributed_sampler=False,  # keep our sampler: its order is what makes resume exact
        inference_mode=False,  # metric state must stay updatable between validate() and fit()
        default_root_dir=root,
    )
