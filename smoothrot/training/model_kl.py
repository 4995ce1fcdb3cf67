"""Scales trained against the model's next-token distribution: the end-to-end objective.

``trained_block`` (block.py) fits each decoder layer's output in turn, so an error counts the
same wherever later layers amplify or damp it. Here the log-scales of every site of the model are
trained at once on the KL divergence from the float model's next-token distribution to the
quantized model's, on the same calibration windows, so each site's error is weighted by what it
does to the logits. Every site linear computes what the fused, quantized export computes
(substitution.py: straight-through rounding of the activations; the weights rounded by RTN the
same way, or carrying an offline rounding's error, GPTQ's, held fixed); the float
distribution comes from the same model with the substitution switched off, one no-grad pass per
step, so no logits are stored. The best scales on the selection split's KL are kept, the
starting ones included, so training can only lower it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from smoothrot.arch.sites import ResolvedSite
from smoothrot.core.scales import LogScales
from smoothrot.core.transform import SiteTransform
from smoothrot.progress import bars_enabled
from smoothrot.schema.config import KLTrainConfig
from smoothrot.schema.quant import QuantScheme
from smoothrot.training.fit import scale_trainer
from smoothrot.training.module import adam_with_schedule
from smoothrot.training.sampler import EpochTokenSampler
from smoothrot.training.substitution import fake_quant_forward, fit_substituted, linear_part

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class KLProblem:
    """The whole model's training problem: every site's starting scales, transform and scheme
    (activation clip included), and the token windows (``calibration``, ``selection``) it is
    trained and selected on."""

    model: nn.Module
    sites: list[ResolvedSite]
    init: dict[str, torch.Tensor]
    transforms: dict[str, SiteTransform]
    schemes: dict[str, QuantScheme]
    windows: dict[str, torch.Tensor]
    # Per site: the offline rounding's error of its fused weight at ``init`` (W_q − W·diag(s₀)·H,
    # concatenated like ResolvedSite.weight), held fixed in the loss; None rounds by RTN.
    weight_errors: dict[str, torch.Tensor] | None = None
    seed: int = 0


def next_token_kl(logits_ref: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_ref ‖ p_q), the next-token distributions of the logits."""
    ref = F.log_softmax(logits_ref.float().flatten(0, -2), dim=-1)
    out = F.log_softmax(logits_q.float().flatten(0, -2), dim=-1)
    return F.kl_div(out, ref, reduction="batchmean", log_target=True)


class ModelKLFitModule(L.LightningModule):
    """Fits the scales of every site of the model to the float model's next-token distribution.

    A batch is a tensor of window indices. The model is not a submodule: it stays frozen, in
    eval mode, and out of the optimizer and any checkpoint.
    """

    def __init__(self, problem: KLProblem, cfg: KLTrainConfig, log_bound: float,
                 per_batch: int) -> None:
        super().__init__()
        self.problem = problem
        self.cfg = cfg
        self.selection_batches = torch.arange(problem.windows["selection"].shape[0]).split(
            per_batch)
        # ModuleDict keys cannot hold dots: sites are keyed by position.
        self.log_scales = nn.ModuleDict({str(i): LogScales(problem.init[rs.name], log_bound)
                                         for i, rs in enumerate(problem.sites)})
        self.best_scales = {rs.name: problem.init[rs.name].detach().double().clone()
                            for rs in problem.sites}
        self.best_val = float("inf")
        self.start_val = float("nan")
        self.val_loss = MeanMetric()
        self.float_pass = False

    def site_forward(self, rs: ResolvedSite, linear: nn.Linear
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
        """One linear of site ``rs``: plain during the float pass, else fake-quantized."""
        index = str([s.name for s in self.problem.sites].index(rs.name))
        quantized = fake_quant_forward(self.log_scales[index], linear,
                                       self.problem.transforms[rs.name],
                                       self.problem.schemes[rs.name],
                                       linear_part(self.problem.weight_errors, rs, linear))

        def forward(x: torch.Tensor) -> torch.Tensor:
            if self.float_pass:
                return F.linear(x, linear.weight.detach(),
                                None if linear.bias is None else linear.bias.detach())
            return quantized(x)

        return forward

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.problem.model(input_ids=ids.to(self.device), use_cache=False).logits

    def _kl(self, indices: torch.Tensor, split: str) -> torch.Tensor:
        windows = self.problem.windows[split]  # Lightning moves the batch of indices, not them
        ids = windows[indices.to(windows.device)]
        with torch.no_grad():
            self.float_pass = True
            try:
                ref = self._logits(ids)
            finally:
                self.float_pass = False
        return next_token_kl(ref, self._logits(ids))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._kl(batch, "calibration")
        self.log("train_kl", loss, prog_bar=True, batch_size=1)
        return loss

    def validation_step(self, batch: int, batch_idx: int) -> None:
        # A batch number, not a tensor: Lightning reads a list of tensors as many dataloaders.
        indices = self.selection_batches[int(batch)]
        self.val_loss.update(self._kl(indices, "selection"), weight=indices.numel())

    def on_validation_epoch_end(self) -> None:
        value = float(self.val_loss.compute())
        self.val_loss.reset()
        self.log("val_kl", value, prog_bar=True)
        log.info("step %d: selection KL %.4g", self.global_step, value)
        if math.isnan(self.start_val):  # the first validation scores the start
            self.start_val = value
        if value < self.best_val:
            self.best_val = value
            self.best_scales = {rs.name: self.log_scales[str(i)].scales()
                                for i, rs in enumerate(self.problem.sites)}

    def configure_optimizers(self) -> dict:
        return adam_with_schedule(self.log_scales.parameters(), self.cfg.lr, "cosine",
                                  self.cfg.steps)


@torch.enable_grad()
def fit_model_kl(problem: KLProblem, cfg: KLTrainConfig, *, log_bound: float,
                 accelerator: str = "cpu") -> tuple[dict[str, torch.Tensor], float, float]:
    """Train every site's scales on the next-token KL; returns (best scales per site, float64 on
    the CPU; the selection KL at the start; the best selection KL)."""
    seq_len = problem.windows["calibration"].shape[1]
    per_batch = max(1, -(-cfg.batch_tokens // seq_len))
    L.seed_everything(problem.seed, workers=True, verbose=False)
    module = ModelKLFitModule(problem, cfg, log_bound, per_batch)
    trainer = scale_trainer(cfg.steps, accelerator, progress_bar=bars_enabled())
    epoch = min(cfg.val_every, max(cfg.steps, 1))  # steps between two validations
    sampler = EpochTokenSampler(problem.windows["calibration"].shape[0],
                                min(per_batch, problem.windows["calibration"].shape[0]),
                                epoch, problem.seed, first_step=lambda: trainer.global_step)
    validation = list(range(len(module.selection_batches)))
    # Steps after the last full epoch would otherwise be trained and never scored.
    fit_substituted(trainer, module, problem.model, problem.sites, sampler, validation,
                    steps=cfg.steps, score_last=cfg.steps % epoch != 0)
    log.info("model KL on the selection split: %.4g at the start, %.4g kept",
             module.start_val, module.best_val)
    scales = {name: s.detach().cpu() for name, s in module.best_scales.items()}
    return scales, module.start_val, module.best_val

