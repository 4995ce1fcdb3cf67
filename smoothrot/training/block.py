"""Scales trained against a decoder layer's output: the model-level objective.

Per-site training (module.py) fits each site to its own output, so an error counts the same
wherever the model amplifies or damps it. Here the sites of one decoder layer are trained
together on the layer's output: each site linear computes Q_a(x·diag(s)⁻¹·H)·Q_w(W·diag(s)·H)ᵀ
(straight-through rounding) from its trainable log-scales, the layer runs as usual around them
(attention, SwiGLU, residual sums), and the loss is the mean over tokens of ||f_q(h) − f(h)||²
(with ``loss: relative``, each token's over ||f(h)||²), the quantized layer's output against the
float layer's on the same input h (or, with
``target: model``, against the float model's own hidden state, so the layer also makes up for the
error it receives). The inputs h are the hidden states of the model quantized so far
(calibrate/sequential.walk_layers), so each layer is fitted to the inputs it will see. The
best scales on the selection split's block loss are kept, the initial ones included, so training
can only lower it.

The substitution computes what the fused, exported layer computes: a source's rows divided by s
(up_proj and v_proj rows, γ) are quantized per row, which scales with the row. Equal in float64
(tests/unit/test_block_training.py); in float32 the two orders of the arithmetic can round a few
4-bit activations to the neighbouring level.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from smoothrot.arch.sites import ResolvedSite
from smoothrot.calibrate.sequential import LayerStep
from smoothrot.core.scales import LogScales
from smoothrot.core.transform import SiteTransform
from smoothrot.losses import output_loss, relative_output_loss
from smoothrot.schema.config import BlockTrainConfig
from smoothrot.schema.quant import QuantScheme
from smoothrot.training.fit import scale_trainer
from smoothrot.training.module import adam_with_schedule
from smoothrot.training.substitution import fake_quant_forward, fit_substituted, linear_part

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class BlockProblem:
    """One decoder layer's training problem: its sites' starting scales, transforms and schemes
    (activation clip included), on the cached inputs of ``step``."""

    step: LayerStep
    init: dict[str, torch.Tensor]
    transforms: dict[str, SiteTransform]
    schemes: dict[str, QuantScheme]
    seed: int = 0
    # Per site: an offline rounding's error of its fused weight at ``init`` (W_q − W·diag(s₀)·H,
    # concatenated like ResolvedSite.weight), held fixed in the loss; None rounds by RTN.
    weight_errors: dict[str, torch.Tensor] | None = None
    # Per site: its offline-rounded fused weight, held fixed whatever the scales: they then move
    # the activation side only (methods/act_tuned.py). Exclusive with ``weight_errors``.
    weights_q: dict[str, torch.Tensor] | None = None


class BlockScaleFitModule(L.LightningModule):
    """Fits the scales of every site of one decoder layer to the layer's float output.

    A batch is the index of a cached input batch; ``targets`` holds the float layer's output
    for each, per split. The layer itself is not a submodule: it stays frozen, in eval mode, and
    out of the optimizer and any checkpoint.
    """

    def __init__(self, problem: BlockProblem, targets: dict[str, list[torch.Tensor]],
                 cfg: BlockTrainConfig, log_bound: float) -> None:
        super().__init__()
        self.problem = problem
        self.targets = targets
        self.cfg = cfg
        names = [rs.name for rs in problem.step.sites]
        # ModuleDict keys cannot hold dots: sites are keyed by position.
        self.log_scales = nn.ModuleDict(
            {str(i): LogScales(problem.init[name], log_bound) for i, name in enumerate(names)})
        self.best_scales = {name: problem.init[name].detach().double().clone() for name in names}
        self.best_val = float("inf")
        self.start_val: float | None = None  # the first validation's: the starting scales'
        self.val_loss = MeanMetric()

    def site_forward(self, rs: ResolvedSite, linear: nn.Linear
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The fake-quantized forward of one linear of site ``rs`` (for replaced_forwards)."""
        index = str([s.name for s in self.problem.step.sites].index(rs.name))
        return fake_quant_forward(self.log_scales[index], linear, self.problem.transforms[rs.name],
                                  self.problem.schemes[rs.name],
                                  linear_part(self.problem.weight_errors, rs, linear),
                                  linear_part(self.problem.weights_q, rs, linear))

    def _block_loss(self, index: int, split: str) -> torch.Tensor:
        step = self.problem.step
        out = step.run(step.inputs[split][index])
        target = self.targets[split][index].to(out.device)
        loss = relative_output_loss if self.cfg.loss == "relative" else output_loss
        return loss(target.reshape(-1, target.shape[-1]), out.reshape(-1, out.shape[-1]))

    def training_step(self, batch: int, batch_idx: int) -> torch.Tensor:
        loss = self._block_loss(int(batch), "calibration")
        self.log("train_block_loss", loss, prog_bar=True, batch_size=1)
        return loss

    def validation_step(self, batch: int, batch_idx: int) -> None:
        index = int(batch)
        tokens = self.targets["selection"][index].shape[:-1].numel()
        self.val_loss.update(self._block_loss(index, "selection"), weight=tokens)

    def on_validation_epoch_end(self) -> None:
        value = float(self.val_loss.compute())
        self.val_loss.reset()
        self.log("val_block_loss", value, prog_bar=True)
        if self.start_val is None:
            self.start_val = value
        if value < self.best_val:
            self.best_val = value
            self.best_scales = {rs.name: self.log_scales[str(i)].scales()
                                for i, rs in enumerate(self.problem.step.sites)}

    def configure_optimizers(self) -> dict:
        return adam_with_schedule(self.log_scales.parameters(), self.cfg.lr, "cosine",
                                  self.cfg.steps)


def _step_order(batches: int, steps: int, seed: int) -> list[int]:
    """Which cached batch each step trains on: seeded passes over all batches, each shuffled."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps:
        order += torch.randperm(batches, generator=gen).tolist()
    return order[:steps]


@torch.no_grad()
def _float_outputs(step: LayerStep, target: str = "layer") -> dict[str, list[torch.Tensor]]:
    """What the layer is fitted to, per cached batch (before any site is replaced): the float
    layer's output on the quantized model's input (``layer``), or the float model's own output
    of the layer, which the walk computed (``model``)."""
    if target == "layer":
        return {split: [step.run(batch).cpu() for batch in batches]
                for split, batches in step.inputs.items()}
    if step.float_outputs is None:
        raise ValueError("target 'model' needs the float stream: walk_layers(float_stream=True)")
    return step.float_outputs


def fit_block(problem: BlockProblem, cfg: BlockTrainConfig, *, log_bound: float,
              accelerator: str = "cpu") -> tuple[dict[str, torch.Tensor], float]:
    """Train the scales of one layer's sites; returns (best scales per site, float64 on the CPU,
    and the best selection block loss)."""
    step = problem.step
    targets = _float_outputs(step, cfg.target)
    L.seed_everything(problem.seed, workers=True, verbose=False)
    module = BlockScaleFitModule(problem, targets, cfg, log_bound)
    trainer = scale_trainer(cfg.steps, accelerator)  # one epoch: all steps, then validation
    order = _step_order(len(step.inputs["calibration"]), cfg.steps, problem.seed)
    validation = list(range(len(step.inputs["selection"])))
    fit_substituted(trainer, module, step.layer, step.sites, order, validation, steps=cfg.steps)
    start = module.start_val if module.start_val is not None else module.best_val
    log.info("layer %d: block loss %.4g (%.4g at the start, %+.2f %%)", step.index,
             module.best_val, start, 100 * (module.best_val / start - 1) if start else 0.0)
    return {name: s.detach().cpu() for name, s in module.best_scales.items()}, module.best_val
