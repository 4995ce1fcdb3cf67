"""Trained scales: a LightningModule refining log s of one site from the best policy.

Loss: mean over tokens of ||x·Wᵀ − Q(x′)·Q(W′)ᵀ||² with straight-through rounding (losses.py);
the parameterization (scales.py) keeps s positive, bounded and normalized, so every iterate is an
exactly equivalent transform. Validation on the selection split keeps the best scales seen,
including the initial ones, so training can only improve the selection error.

Interrupted training resumes *exactly* (same scales, bit for bit, as an uninterrupted run):

* the tokens of training step g are a pure function of ``(seed, g)`` (:class:`EpochTokenSampler`
  starts each epoch at the restored optimizer step), so the batch order never depends on how
  many steps ran before a restart;
* one Lightning epoch is ``val_every`` steps;
* validation and ``last.ckpt`` happen at epoch ends, the only place where Lightning 2.x restores
  the loop without replaying or skipping batches (mid-epoch it restarts the dataloader);
* a finished site writes ``final.safetensors`` (its scales, atomically) that a resumed run
  reuses instead of training again;
* both files carry a key of the inputs (weight, tokens, initial scales, hyperparameters), so a
  checkpoint from another model or config is refused instead of silently continued.

Data-parallel (distributed.py: DDP over the current process group) each rank trains on a fixed
slice of every batch and only rank 0 writes files; with the same number of processes resume is
still bit-exact.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import signal
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Sampler, TensorDataset
from torchmetrics import MeanMetric

from smoothrot.core.scales import LogScales
from smoothrot.distributed import (
    broadcast_object,
    is_rank_zero,
    rank,
    shard_bounds,
    trainer_kwargs,
    world_size,
)
from smoothrot.losses import output_loss, quantized_output
from smoothrot.schema.config import QuantScheme, TrainConfig

log = logging.getLogger(__name__)

LAST_CKPT = "last.ckpt"
FINAL_SCALES = "final.safetensors"


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed (other inputs, unreadable, or past ``train.steps``)."""


class ScaleFitModule(L.LightningModule):
    """Fits the smoothing scales of one linear layer under a fake-quant scheme."""

    def __init__(
        self,
        weight: torch.Tensor,
        init_scales: torch.Tensor,
        scheme: QuantScheme,
        rotate: bool | str = True,
        lr: float = 0.02,
        log_bound: float = 9.0,
        run_key: str = "",
    ) -> None:
        super().__init__()
        # Only plain values go into the checkpoint, so it loads with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["weight", "init_scales", "scheme"])
        self.scheme = scheme
        self.rotate = rotate
        self.lr = lr
        self.register_buffer("weight", weight.detach().float(), persistent=False)
        self.log_scales = LogScales(init_scales, log_bound)
        self.register_buffer("best_scales", self.log_scales.scales())
        self.register_buffer("best_val", torch.tensor(float("inf"), dtype=torch.float64))
        self.val_loss = MeanMetric()

    def _common_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        y_q = quantized_output(x, self.weight, self.log_scales(), self.rotate, self.scheme,
                               ste=True)
        loss = output_loss(y, y_q)
        if stage == "val":
            self.val_loss.update(loss, weight=x.shape[0])
        else:
            self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        return self._common_step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._common_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        value = self.val_loss.compute().double()
        self.val_loss.reset()
        # Already reduced over ranks by the metric; sync_dist only states it (and is exact).
        self.log("val_loss", value.float(), prog_bar=True, sync_dist=True)
        if value < self.best_val:
            self.best_val.copy_(value)
            self.best_scales.copy_(self.log_scales.scales())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.log_scales.parameters(), lr=self.lr)


class EpochEndCheckpoint(L.Callback):
    """Writes ``last.ckpt`` at every epoch end (after its validation), nowhere else.

    An epoch end is where Lightning restores its loops exactly; Lightning writes the file
    through a temporary file, so a kill mid-save keeps the previous checkpoint.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            trainer.save_checkpoint(self.path, weights_only=False)  # with the optimizer state


def _derived_seed(seed: int, index: int) -> int:
    """A 63-bit seed that is a pure function of (seed, index), unrelated for neighbouring pairs."""
    digest = hashlib.sha256(f"smoothrot/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class EpochTokenSampler(Sampler[int]):
    """Token indices of one epoch of ``steps_per_epoch`` batches, a pure function of its first step.

    The token stream is an endless concatenation of permutations of all ``n`` tokens (pass k
    shuffled with a seed derived from (seed, k)); batch g is stream[g·B : (g+1)·B]. An epoch
    starting at optimizer step g0 yields batches g0 … g0+V−1. ``first_step`` reads g0 from the
    trainer (its ``global_step``, which a checkpoint restores exactly); without it g0 = epoch·V
    from :meth:`set_epoch`. Lightning's own epoch counter is not used: after a restart at an
    epoch end it is one ahead of the loop in Lightning 2.6, which would skip an epoch of data.

    Data-parallel, rank ``part`` of ``parts`` yields its fixed contiguous slice of every batch
    (:attr:`shard_size` indices), so batch g is still a pure function of (seed, g) and the ranks'
    slices concatenated are the 1-process batch.
    """

    def __init__(self, n: int, batch_size: int, steps_per_epoch: int, seed: int,
                 first_step: Callable[[], int] | None = None, part: int = 0,
                 parts: int = 1) -> None:
        if n < 1 or batch_size < parts or steps_per_epoch < 1 or not 0 <= part < parts:
            raise ValueError(
                f"EpochTokenSampler needs n, steps_per_epoch >= 1, batch_size >= parts and "
                f"0 <= part < parts, got {n}, {steps_per_epoch}, {batch_size}, {part}, {parts}"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = steps_per_epoch
        self.first_step = first_step
        self.epoch = 0
        self.lo, self.hi = shard_bounds(batch_size, part, parts)

    @property
    def shard_size(self) -> int:
        """Indices this rank takes from each batch (the DataLoader's batch size)."""
        return self.hi - self.lo

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.shard_size * self.steps_per_epoch

    def _pass(self, k: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_derived_seed(self.seed, k))
        return torch.randperm(self.n, generator=gen)

    def __iter__(self) -> Iterator[int]:
        if self.first_step is not None:
            step = self.first_step()
        else:
            step = self.epoch * self.steps_per_epoch
        start = step * self.batch_size
        stop = start + self.batch_size * self.steps_per_epoch
        out = []
        for k in range(start // self.n, (stop - 1) // self.n + 1):
            lo, hi = max(start - k * self.n, 0), min(stop - k * self.n, self.n)
            out.append(self._pass(k)[lo:hi])
        batches = torch.cat(out).view(self.steps_per_epoch, self.batch_size)
        return iter(batches[:, self.lo:self.hi].reshape(-1).tolist())


def _tensor_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


def run_key(
    weight: torch.Tensor,
    init_scales: torch.Tensor,
    scheme: QuantScheme,
    train_x: torch.Tensor,
    val_x: torch.Tensor,
    cfg: TrainConfig,
    rotate: bool | str,
    seed: int,
) -> str:
    """Identity of a training run except its length (``steps``): equal keys, same trajectory."""
    tensors = _tensor_digest(weight.float(), init_scales.double(), train_x.float(), val_x.float())
    return (f"{tensors}|{scheme!r}|rotate={rotate}|lr={cfg.lr}|batch={cfg.batch_tokens}|"
            f"val_every={cfg.val_every}|bound={cfg.log_bound}|seed={seed}")


def _save_final(path: Path, scales: torch.Tensor, best_val: float, key: str) -> None:
    """Write the finished site's scales atomically (a kill never leaves a half-written file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({"scales": scales.double().contiguous(),
                   "best_val": torch.tensor([best_val], dtype=torch.float64)},
                  tmp, metadata={"key": key})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_final(path: Path, key: str) -> tuple[torch.Tensor, float] | None:
    """The stored result of a finished run with this key, or None (absent, other key, broken)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get("key")
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        log.warning("ignoring unreadable %s (%s); training again", path, exc)
        return None
    if stored != key:
        return None
    return tensors["scales"], float(tensors["best_val"][0])


def _resume_point(path: Path, key: str, steps: int) -> Path | None:
    """``last.ckpt`` if it exists and belongs to this run; a one-line error if it cannot."""
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        stored, step = ckpt["hyper_parameters"]["run_key"], int(ckpt["global_step"])
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, ValueError,
            pickle.UnpicklingError) as exc:  # what torch.load raises on a damaged file
        raise ResumeError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it or rerun "
            "without --resume"
        ) from exc
    if stored != key:
        raise ResumeError(
            f"checkpoint {path} was written for another model, data or train config; rerun "
            "without --resume or use a new --output-dir"
        )
    if step > steps:
        raise ResumeError(
            f"checkpoint {path} is at step {step} but train.steps={steps}; rerun without "
            "--resume to train fewer steps"
        )
    return path


def fit_scales(
    weight: torch.Tensor,
    init_scales: torch.Tensor,
    scheme: QuantScheme,
    train_x: torch.Tensor,
    val_x: torch.Tensor,
    cfg: TrainConfig,
    *,
    rotate: bool | str = True,
    seed: int = 0,
    accelerator: str = "cpu",
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    callbacks: list[L.Callback] | None = None,
) -> tuple[torch.Tensor, float]:
    """Train scales for one site; returns (best scales float64, best selection loss).

    With ``checkpoint_dir``, ``last.ckpt`` is saved every ``cfg.val_every`` steps and
    ``final.safetensors`` when the site is done. With ``resume``, a finished site is read back
    and an unfinished one continues from ``last.ckpt``; the result equals an uninterrupted run.
    Ctrl-C raises KeyboardInterrupt (Lightning alone would exit the process). ``rotate`` is
    True/False or an input-transform spec string (``losses.as_transform``); ``callbacks`` are
    extra Lightning callbacks (tests use one to interrupt).
    """
    key = run_key(weight, init_scales, scheme, train_x, val_x, cfg, rotate, seed)
    ckpt = final = None
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        final = checkpoint_dir / FINAL_SCALES
        done_key = f"{key}|steps={cfg.steps}"
        if resume:  # rank 0 owns the files; every rank must take the same branch
            stored = broadcast_object(_load_final(final, done_key) if is_rank_zero() else None)
            if stored is not None:
                log.info("%s: training already finished; reusing %s", checkpoint_dir, final)
                return stored
            # Lightning loads the checkpoint on every rank: multi-node needs a shared output dir.
            ckpt = _resume_point(checkpoint_dir / LAST_CKPT, key, cfg.steps)
        elif is_rank_zero():  # a fresh run must not leave stale files a later --resume would use
            for stale in (final, checkpoint_dir / LAST_CKPT):
                stale.unlink(missing_ok=True)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)

    L.seed_everything(seed, workers=True, verbose=False)
    module = ScaleFitModule(weight, init_scales, scheme, rotate, cfg.lr, cfg.log_bound, key)
    w = weight.detach().float()
    # Data-parallel: each rank takes its slice of every batch and of the selection rows; DDP
    # averages the gradients and the validation MeanMetric syncs, so all ranks decide alike.
    if world_size() > 1 and cfg.batch_tokens % world_size():
        log.warning("train.batch_tokens=%d is not a multiple of %d processes: unequal batch "
                    "shares weigh tokens unequally, so steps differ from a 1-process run",
                    cfg.batch_tokens, world_size())
    sampler = EpochTokenSampler(train_x.shape[0], cfg.batch_tokens, cfg.val_every, seed,
                                first_step=lambda: trainer.global_step, part=rank(),
                                parts=world_size())
    train = DataLoader(TensorDataset(train_x, train_x @ w.T), batch_size=sampler.shard_size,
                       sampler=sampler)
    lo, hi = shard_bounds(val_x.shape[0])
    val = DataLoader(TensorDataset(val_x[lo:hi], val_x[lo:hi] @ w.T), batch_size=4096,
                     shuffle=False)
    all_callbacks = list(callbacks or [])
    if checkpoint_dir is not None:
        all_callbacks.append(EpochEndCheckpoint(checkpoint_dir / LAST_CKPT))
    trainer = L.Trainer(
        accelerator=accelerator,
        **trainer_kwargs(),
        max_steps=cfg.steps,
        check_val_every_n_epoch=1,  # one epoch = val_every steps (the sampler's length)
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,  # EpochEndCheckpoint writes last.ckpt itself
        callbacks=all_callbacks,
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        deterministic=True,
        use_distributed_sampler=False,  # keep our sampler: its order is what makes resume exact
        inference_mode=False,  # metric state must stay updatable between validate() and fit()
        default_root_dir=checkpoint_dir,
    )
    if ckpt is None:  # the initial point is a candidate (a checkpoint already holds its loss)
        _interruptible(trainer, trainer.validate, model=module, dataloaders=val, verbose=False)
    if cfg.steps > 0:
        _interruptible(trainer, trainer.fit, model=module, train_dataloaders=train,
                       val_dataloaders=val, ckpt_path=ckpt, weights_only=True)
        _interruptible(trainer, trainer.validate, model=module, dataloaders=val, verbose=False)
    best = module.best_scales.detach().cpu().clone()
    best_val = float(module.best_val)
    if final is not None and is_rank_zero():
        _save_final(final, best, best_val, done_key)
    return best, best_val


def _interruptible(trainer: L.Trainer, run: Callable[..., object], **kwargs: object) -> None:
    """Call ``trainer.fit`` / ``trainer.validate`` so that Ctrl-C surfaces as KeyboardInterrupt.

    On Ctrl-C Lightning shuts down, ignores SIGINT for good and calls ``sys.exit(1)``; callers
    (the CLI) need the KeyboardInterrupt to print the --resume hint, and a working Ctrl-C after.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        with warnings.catch_warnings():
            # Resuming from the checkpoint a shorter run wrote at its last step (not an epoch
            # end) is exact here: EpochTokenSampler starts from the restored global step.
            warnings.filterwarnings("ignore", message=".*checkpoint that ended before the epoch")
            run(**kwargs)
    except SystemExit:
        if not trainer.interrupted:
            raise
        if main_thread and handler is not None:
            signal.signal(signal.SIGINT, handler)
        raise KeyboardInterrupt from None
