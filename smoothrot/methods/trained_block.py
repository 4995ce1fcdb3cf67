"""Trained against the block output: the ``trained`` scales refined, one decoder layer at a
time on the quantized model's inputs, to minimise the layer's output error rather than each
site's own (training/block.py). Reported beside ``trained``, whose per-site loss stays the
default."""

from __future__ import annotations

import math
from dataclasses import replace

from smoothrot.calibrate.capture import fit_specs
from smoothrot.calibrate.sequential import round_layer, walk_layers
from smoothrot.distributed import require_one_process
from smoothrot.methods.context import SchemeContext
from smoothrot.methods.gptq import rounding_error, site_rounder
from smoothrot.methods.registry import Method, MethodResult
from smoothrot.methods.trained import TRAINED
from smoothrot.schema.quant import with_act_clip
from smoothrot.training.block import BlockProblem, fit_block
from smoothrot.training.fit import accelerator_of


class TrainedBlock(Method):
    name = "trained_block"
    label = "trained (block output)"
    requires = (TRAINED.name,)

    def fit(self, ctx: SchemeContext) -> MethodResult:
        require_one_process(self.name)
        start = ctx.results[TRAINED.name].plans
        cfg = ctx.cfg.block_training
        specs = fit_specs(ctx.windows, ctx.cfg.data.train_tokens, ctx.cfg.seed)
        windows = max(1, math.ceil(cfg.batch_tokens / ctx.cfg.data.seq_len))
        accelerator = accelerator_of(ctx.model)
        splits = {k: specs[k] for k in ("calibration", "selection")}
        gptq_float = cfg.weights == "gptq" and ctx.cfg.gptq.target == "model"
        scales = {}
        with ctx.stage("block training"):
            for step in walk_layers(ctx.model, ctx.sites, ctx.scheme, splits, windows,
                                    f"{ctx.scheme.name} block training",
                                    float_stream=cfg.target == "model" or gptq_float):
                if not step.sites:
                    continue
                plans = {rs.name: start[rs.name] for rs in step.sites}
                transforms = {rs.name: ctx.transform(rs, plans[rs.name]) for rs in step.sites}
                errors = None
                if cfg.weights == "gptq":  # the layer as +gptq would round it at the start
                    rounded = round_layer(step, plans, ctx.scheme, splits,
                                          site_rounder(ctx, plans), gptq_float)
                    errors = {name: rounding_error(ctx.weights[name], plans[name],
                                                   transforms[name], choice.weight_q)
                              for name, choice in rounded.items()}
                problem = BlockProblem(
                    step, {name: plan.scales for name, plan in plans.items()}, transforms,
                    {name: with_act_clip(ctx.scheme, plan.act_clip)
                     for name, plan in plans.items()},
                    seed=ctx.cfg.seed + step.index, weight_errors=errors)
                best, _ = fit_block(problem, cfg, log_bound=ctx.cfg.train.log_bound,
                                    accelerator=accelerator)
                scales.update(best)
                step.done.update({name: replace(plan, scales=best[name])
                                  for name, plan in plans.items()})
        return MethodResult(ctx.plans(scales, desc=self.name))


TRAINED_BLOCK = TrainedBlock()
