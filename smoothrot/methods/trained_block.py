"""Trained against the block output: the ``trained`` scales refined, one decoder layer at a
time on the quantized model's inputs, to minimise the layer's output error rather than each
site's own (training/block.py). Reported beside ``trained``, whose per-site loss stays the
default."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

import torch

from smoothrot.calibrate.capture import CaptureSpec, fit_specs
from smoothrot.calibrate.sequential import LayerStep, walk_layers
from smoothrot.distributed import require_one_process
from smoothrot.methods.context import SchemeContext
from smoothrot.methods.gptq import round_layer_as_configured, rounding_error, site_rounder
from smoothrot.methods.registry import Method, MethodResult
from smoothrot.methods.trained import TRAINED
from smoothrot.schema.config import BlockTrainConfig
from smoothrot.schema.quant import with_act_clip
from smoothrot.surgery.plan import SitePlan
from smoothrot.training.block import BlockProblem, fit_block
from smoothrot.training.fit import accelerator_of


def training_splits(ctx: SchemeContext) -> dict[str, CaptureSpec]:
    """The calibration and selection windows a layer-output trainer walks."""
    specs = fit_specs(ctx.windows, ctx.cfg.data.train_tokens, ctx.cfg.seed)
    return {k: specs[k] for k in ("calibration", "selection")}


def layer_steps(ctx: SchemeContext, splits: dict[str, CaptureSpec], cfg: BlockTrainConfig,
                desc: str, float_stream: bool) -> Iterator[LayerStep]:
    """The sequential walk's layers that hold sites, batched ``cfg.batch_tokens`` at a time."""
    windows = max(1, math.ceil(cfg.batch_tokens / ctx.cfg.data.seq_len))
    for step in walk_layers(ctx.model, ctx.sites, ctx.scheme, splits, windows,
                            f"{ctx.scheme.name} {desc}", float_stream=float_stream):
        if step.sites:
            yield step


def layer_problem(ctx: SchemeContext, step: LayerStep, plans: dict[str, SitePlan],
                  **weights: dict[str, torch.Tensor] | None) -> BlockProblem:
    """One layer's training problem from its sites' starting plans (``weights``: the
    ``weight_errors`` or ``weights_q`` of :class:`BlockProblem`)."""
    return BlockProblem(
        step, {name: plan.scales for name, plan in plans.items()},
        {rs.name: ctx.transform(rs, plans[rs.name]) for rs in step.sites},
        {name: with_act_clip(ctx.scheme, plan.act_clip) for name, plan in plans.items()},
        seed=ctx.cfg.seed + step.index, **weights)


class TrainedBlock(Method):
    name = "trained_block"
    label = "trained (block output)"
    requires = (TRAINED.name,)

    def fit(self, ctx: SchemeContext) -> MethodResult:
        require_one_process(self.name)
        start = ctx.results[TRAINED.name].plans
        cfg = ctx.cfg.block_training
        splits = training_splits(ctx)
        accelerator = accelerator_of(ctx.model)
        gptq_float = cfg.weights == "gptq" and ctx.cfg.gptq.target == "model"
        scales = {}
        with ctx.stage("block training"):
            for step in layer_steps(ctx, splits, cfg, "block training",
                                    cfg.target == "model" or gptq_float):
                plans = {rs.name: start[rs.name] for rs in step.sites}
                errors = None
                if cfg.weights == "gptq":  # the layer as +gptq would round it at the start
                    rounded = round_layer_as_configured(ctx, step, plans, splits,
                                                        site_rounder(ctx, plans))
                    sites = {rs.name: rs for rs in step.sites}
                    errors = {name: rounding_error(ctx.weights[name], plans[name],
                                                   ctx.transform(sites[name], plans[name]),
                                                   choice.weight_q)
                              for name, choice in rounded.items()}
                problem = layer_problem(ctx, step, plans, weight_errors=errors)
                best, _ = fit_block(problem, cfg, log_bound=ctx.cfg.train.log_bound,
                                    accelerator=accelerator)
                scales.update(best)
                step.done.update({name: replace(plan, scales=best[name])
                                  for name, plan in plans.items()})
        return MethodResult(ctx.plans(scales, desc=self.name))


TRAINED_BLOCK = TrainedBlock()
