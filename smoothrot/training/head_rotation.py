"""Learned per-head rotations R2: trained with the o_proj site's scales, then folded into the model.

For each o_proj site the trainable parameters are one orthogonal matrix per kv head (Cayley
parameterization, ``torch.nn.utils.parametrizations.orthogonal``, started at the identity, so
the starting point is the model as it is) and the site's log-scales (started at SmoothRot-max).
The loss is the site's straight-through fake-quant output loss (losses.py) with the rotation
applied to the input and the weight, x·R̂ and W·R̂ (R̂ = blockdiag of the heads' R_g): the
arithmetic of the folded model (surgery/head_rotation.py). The best rotation on the selection
split is kept, the identity included, so the site's loss can only fall. The scales are a means
of training only: every method fits its own scales on the rotated model afterwards. What the
loss does not see: v_proj's rows are mixed within each head, which changes v_proj's weight
grid (measured on the whole model, docs/whole_model.md).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric

from smoothrot.arch.sites import ResolvedSite
from smoothrot.calibrate.capture import CaptureSpec, batch_size, capture_splits, token_subset
from smoothrot.core.policies import smoothing_scales
from smoothrot.core.scales import LogScales
from smoothrot.core.stats import weight_absmax
from smoothrot.core.transform import ScaleTie, SiteTransform
from smoothrot.losses import output_loss, quantized_output
from smoothrot.progress import progress
from smoothrot.schema.config import HeadRotationConfig
from smoothrot.schema.quant import QuantScheme
from smoothrot.surgery.head_rotation import (
    apply_head_rotations,
    head_layout,
    head_sites,
    nearest_orthogonal,
    rotate_heads,
)
from smoothrot.training.fit import accelerator_of, scale_trainer
from smoothrot.training.interrupt import interruptible
from smoothrot.training.module import adam_with_schedule
from smoothrot.training.sampler import EpochTokenSampler

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class HeadRotationProblem:
    """One o_proj site: its weight, starting scales, transform (H, tying), head layout, scheme,
    training and selection rows of its input, and the seed of the token order."""

    weight: torch.Tensor
    init_scales: torch.Tensor
    transform: SiteTransform
    layout: ScaleTie
    scheme: QuantScheme
    train_x: torch.Tensor
    val_x: torch.Tensor
    seed: int = 0
    name: str = "head rotation"  # for the log


class HeadRotationModule(L.LightningModule):
    """Trains one rotation per kv head and the site's log-scales on the site's output loss."""

    def __init__(self, problem: HeadRotationProblem, cfg: HeadRotationConfig,
                 log_bound: float) -> None:
        super().__init__()
        self.problem, self.cfg = problem, cfg
        d = problem.layout.head_dim
        self.register_buffer("weight", problem.weight.detach().float(), persistent=False)
        self.log_scales = LogScales(problem.init_scales, log_bound)
        self.rotations = nn.ModuleList()
        for _ in range(problem.layout.kv_heads):
            holder = orthogonal(nn.Linear(d, d, bias=False), orthogonal_map="cayley")
            holder.weight = torch.eye(d)  # the identity: the model as it is
            self.rotations.append(holder)
        self.best_rotation = self.rotation().detach().double().clone()
        self.best_val = float("inf")
        self.start_val = float("nan")  # the identity's selection loss (the first validation)
        self.val_loss = MeanMetric()

    def rotation(self) -> torch.Tensor:
        """The current rotations, [kv_heads, head_dim, head_dim]."""
        return torch.stack([holder.weight for holder in self.rotations])

    def _loss(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        r, layout = self.rotation(), self.problem.layout
        y = x @ self.weight.T
        y_q = quantized_output(rotate_heads(x, r, layout), rotate_heads(self.weight, r, layout),
                               self.log_scales(),
                               self.problem.transform, self.problem.scheme, ste=train)
        return output_loss(y, y_q)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (x,) = batch
        loss = self._loss(x, train=True)
        self.log("train_rotation_loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        (x,) = batch
        self.val_loss.update(self._loss(x, train=False), weight=x.shape[0])

    def on_validation_epoch_end(self) -> None:
        value = float(self.val_loss.compute())
        self.val_loss.reset()
        self.log("val_rotation_loss", value, prog_bar=True)
        if math.isnan(self.start_val):
            self.start_val = value
        if value < self.best_val:
            self.best_val = value
            self.best_rotation = self.rotation().detach().double().clone()

    def configure_optimizers(self) -> dict:
        groups = [{"params": self.rotations.parameters(), "lr": self.cfg.lr},
                  {"params": self.log_scales.parameters(), "lr": self.cfg.scale_lr}]
        return adam_with_schedule(groups, self.cfg.lr, "cosine", self.cfg.steps)


def fit_head_rotation(problem: HeadRotationProblem, cfg: HeadRotationConfig, *,
                      log_bound: float = 9.0, accelerator: str = "cpu"
                      ) -> tuple[torch.Tensor, float]:
    """Train one site's rotations; returns (best rotations [kv, d, d] float64 on the CPU, best
    selection loss). The identity is validated first, so it is returned if training never beats
    it."""
    L.seed_everything(problem.seed, workers=True, verbose=False)
    module = HeadRotationModule(problem, cfg, log_bound)
    trainer = scale_trainer(cfg.steps, accelerator)  # one epoch of all steps, then validation
    # Whole batches as index tensors / one slice: each is gathered in one indexing op.
    train = DataLoader(TensorDataset(problem.train_x), batch_size=None, sampler=EpochTokenSampler(
        problem.train_x.shape[0], cfg.batch_tokens, max(cfg.steps, 1), problem.seed))
    validation = DataLoader(TensorDataset(problem.val_x), batch_size=None,
                            sampler=[slice(0, problem.val_x.shape[0])])
    interruptible(trainer, trainer.validate, model=module, dataloaders=validation, verbose=False)
    if cfg.steps > 0:
        interruptible(trainer, trainer.fit, model=module, train_dataloaders=train,
                      val_dataloaders=validation)
    log.info("%s: selection loss %.4g at the identity, %.4g learned (%+.1f %%; with the scales "
             "trained alongside)", problem.name, module.start_val, module.best_val,
             100 * (module.best_val / module.start_val - 1))
    return module.best_rotation.cpu(), module.best_val


def learn_head_rotations(model: nn.Module, sites: list[ResolvedSite],
                         windows: dict[str, torch.Tensor], cfg: HeadRotationConfig,
                         scheme: QuantScheme, *, train_tokens: int, seed: int,
                         log_bound: float = 9.0) -> dict[str, torch.Tensor]:
    """Learn R2 for every o_proj site among ``sites`` and fold it into ``model`` (in place);
    returns the folded rotations by site name (float64, orthogonal), for the export to replay.

    The rotations are learned on the float model's inputs (one calibration pass over the
    calibration and selection windows) and folded after all are learned.
    """
    targets = head_sites(sites)
    if not targets:
        log.warning("head_rotation.learn: no o_proj site among the fitted sites; nothing learned")
        return {}
    windows_c = windows["calibration"]
    keep = token_subset(windows_c.numel(), train_tokens, seed)
    specs = {"calibration": CaptureSpec(windows_c, keep, quantiles=()),  # rows and max only
             "selection": CaptureSpec(windows["selection"])}
    records = capture_splits(model, targets, specs, batch_size(windows_c.shape[1]))
    layout = head_layout(model)
    accelerator = accelerator_of(model)
    rotations = {}
    for rs in progress(targets, desc="head rotations"):
        record = records["calibration"][rs.name]
        weight = rs.weight.detach().float().cpu()  # the trainer moves it with the module
        tie = rs.transform.tied_max
        init = smoothing_scales(tie(record.max_abs()), tie(weight_absmax(weight)),
                                cfg.alpha, site=rs.name)
        problem = HeadRotationProblem(weight, init, rs.transform, layout, scheme, record.tokens(),
                                      records["selection"][rs.name].tokens(),
                                      seed=seed + rs.layer_index, name=rs.name)
        best, _ = fit_head_rotation(problem, cfg, log_bound=log_bound, accelerator=accelerator)
        rotations[rs.name] = nearest_orthogonal(best)  # what is folded, and recorded, exactly
    apply_head_rotations(model, rotations)
    return rotations

