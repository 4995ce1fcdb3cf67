"""Trained scales: a LightningModule refining log s of one site from the best policy.

Loss: mean over tokens of ||x·Wᵀ − Q(x′)·Q(W′)ᵀ||² with straight-through rounding (losses.py);
the parameterization (scales.py) keeps s positive, bounded and normalized, so every iterate is an
exactly equivalent transform. Validation on the selection split keeps the best scales seen,
including the initial ones, so training can only improve the selection error.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric

from smoothrot.config import QuantScheme, TrainConfig
from smoothrot.losses import output_loss, quantized_output
from smoothrot.scales import LogScales


class ScaleFitModule(L.LightningModule):
    """Fits the smoothing scales of one linear layer under a fake-quant scheme."""

    def __init__(
        self,
        weight: torch.Tensor,
        init_scales: torch.Tensor,
        scheme: QuantScheme,
        rotate: bool = True,
        lr: float = 0.02,
        log_bound: float = 9.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["weight", "init_scales"])
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
        y_q = quantized_output(x, self.weight, self.log_scales(), self.rotate, self.scheme, ste=True)
        loss = output_loss(y, y_q)
        if stage == "val":
            self.val_loss.update(loss, weight=x.shape[0])
        else:
            self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._common_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        value = self.val_loss.compute().double()
        self.val_loss.reset()
        self.log("val_loss", value.float(), prog_bar=True)
        if value < self.best_val:
            self.best_val.copy_(value)
            self.best_scales.copy_(self.log_scales.scales())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.log_scales.parameters(), lr=self.lr)


def _loader(x: torch.Tensor, y: torch.Tensor, batch: int, shuffle: bool, seed: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=shuffle, generator=gen)


def fit_scales(
    weight: torch.Tensor,
    init_scales: torch.Tensor,
    scheme: QuantScheme,
    train_x: torch.Tensor,
    val_x: torch.Tensor,
    cfg: TrainConfig,
    *,
    rotate: bool = True,
    seed: int = 0,
    accelerator: str = "cpu",
    checkpoint_dir: Path | None = None,
    resume: bool = False,
) -> tuple[torch.Tensor, float]:
    """Train scales for one site; returns (best scales float64, best selection loss).

    With ``resume`` and a ``last.ckpt`` in ``checkpoint_dir``, training continues from it.
    """
    L.seed_everything(seed, workers=True, verbose=False)
    module = ScaleFitModule(weight, init_scales, scheme, rotate, cfg.lr, cfg.log_bound)
    w = weight.detach().float()
    train = _loader(train_x, train_x @ w.T, cfg.batch_tokens, True, seed)
    val = _loader(val_x, val_x @ w.T, 4096, False, seed)
    callbacks = []
    if checkpoint_dir is not None:
        callbacks.append(
            ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, save_top_k=0,
                            every_n_train_steps=cfg.val_every)
        )
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=cfg.steps,
        val_check_interval=cfg.val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=checkpoint_dir is not None,
        callbacks=callbacks,
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        deterministic=True,
        inference_mode=False,  # metric state must stay updatable between validate() and fit()
        default_root_dir=checkpoint_dir,
    )
    ckpt = None
    if resume and checkpoint_dir is not None and (checkpoint_dir / "last.ckpt").is_file():
        ckpt = checkpoint_dir / "last.ckpt"
    else:
        trainer.validate(module, dataloaders=val, verbose=False)  # the initial point is a candidate
    if cfg.steps > 0:
        trainer.fit(module, train_dataloaders=train, val_dataloaders=val, ckpt_path=ckpt)
        trainer.validate(module, dataloaders=val, verbose=False)  # the final point too
    return module.best_scales.detach().cpu().clone(), float(module.best_val)
