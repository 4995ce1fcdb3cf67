"""The LightningModule that refines log s of one site, and the callback that checkpoints it.

Loss: mean over tokens of ||x·Wᵀ − Q(x′)·Q(W′)ᵀ||² with straight-through rounding (losses.py);
the parameterization (core/scales.py) keeps s positive, bounded and normalized, so every iterate
is an exactly equivalent transform. Validation on the selection split keeps the best scales seen,
including the initial ones, so training can only improve the selection error, and stops the site
early once that error has stopped falling (``patience``). The learning rate is constant or decays
along a cosine to zero at ``total_steps``.

Kept apart from the entry point (fit.py) so the math of one training step reads on its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torchmetrics import MeanMetric

from smoothrot.core.scales import LogScales
from smoothrot.core.transform import FULL, SiteTransform
from smoothrot.losses import output_loss, quantized_output
from smoothrot.schema.quant import QuantScheme


class ScaleFitModule(L.LightningModule):
    """Fits the smoothing scales of one linear layer under a fake-quant scheme.

    ``run_key`` is stored with the hyperparameters so a checkpoint names the run it belongs to
    (checkpoints.py checks it before resuming).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        init_scales: torch.Tensor,
        scheme: QuantScheme,
        rotate: SiteTransform = FULL,
        lr: float = 0.02,
        log_bound: float = 9.0,
        run_key: str = "",
        *,
        schedule: str = "constant",
        total_steps: int = 1,
        patience: int = 0,
        min_delta: float = 0.0,
        start_loss: float | None = None,
        bf16_grads: bool = False,
    ) -> None:
        super().__init__()
        # Only plain values go into the checkpoint, so it loads with torch.load(weights_only=True)
        # (``rotate`` is part of ``run_key``).
        self.save_hyperparameters(ignore=["weight", "init_scales", "scheme", "rotate"])
        self.scheme = scheme
        self.rotate = rotate
        self.lr = lr
        self.schedule = schedule
        self.total_steps = max(total_steps, 1)
        self.patience = patience
        self.min_delta = min_delta
        self.bf16_grads = bf16_grads  # the product's gradients in bfloat16 (losses.py)
        self.register_buffer("weight", weight.detach().float(), persistent=False)
        self.log_scales = LogScales(init_scales, log_bound)
        self.register_buffer("best_scales", self.log_scales.scales())
        # The starting scales are the best so far at their known loss, or at +inf until scored.
        best = math.inf if start_loss is None else start_loss
        self.register_buffer("best_val", torch.tensor(best, dtype=torch.float64))
        # Validations since the best loss last fell by min_delta; in the checkpoint, so a resumed
        # run stops where an uninterrupted one would.
        self.register_buffer("stale", torch.tensor(0, dtype=torch.int64))
        self.val_loss = MeanMetric()

    def _common_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        # Straight-through rounding only where there is a gradient to pass.
        y_q = quantized_output(x, self.weight, self.log_scales(), self.rotate, self.scheme,
                               ste=stage == "train", bf16_grads=self.bf16_grads)
        loss = output_loss(y, y_q)
        if stage == "val":
            self.val_loss.update(loss, weight=x.shape[0])
        elif self.trainer.progress_bar_callback is not None:  # the log only feeds the bar
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
        significant = value < self.best_val * (1 - self.min_delta)
        if value < self.best_val:
            self.best_val.copy_(value)
            self.best_scales.copy_(self.log_scales.scales())
        if self.trainer.state.fn != TrainerFn.FITTING:
            return
        self.stale.copy_(torch.zeros_like(self.stale) if significant else self.stale + 1)
        if self.patience and int(self.stale) >= self.patience:
            self.trainer.should_stop = True

    def configure_optimizers(self) -> dict:
        return adam_with_schedule(self.log_scales.parameters(), self.lr, self.schedule,
                                  self.total_steps)


def adam_with_schedule(params: Iterable[torch.nn.Parameter], lr: float, schedule: str,
                       total_steps: int) -> dict:
    """Lightning's optimizer config: Adam at ``lr``, constant or decayed along a cosine to zero
    at ``total_steps``."""
    optimizer = torch.optim.Adam(params, lr=lr)
    if schedule == "constant":
        return {"optimizer": optimizer}
    total = max(total_steps, 1)
    cosine = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


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
