"""Trained scales: log s refined by Adam on the straight-through fake-quant output loss
(smoothrot/training/), starting from the ``joint`` choice and its activation clips; the best
point on the selection split is kept."""

from __future__ import annotations

from pathlib import Path

from smoothrot.methods.context import SchemeContext
from smoothrot.methods.policy import JOINT
from smoothrot.methods.registry import Method, MethodResult
from smoothrot.progress import progress
from smoothrot.schema.quant import with_act_clip
from smoothrot.training.fit import TrainProblem, fit_scales


class Trained(Method):
    name = "trained"
    label = "trained"
    requires = (JOINT.name,)

    def fit(self, ctx: SchemeContext) -> MethodResult:
        start = ctx.results[JOINT.name].plans
        accelerator = "gpu" if next(ctx.model.parameters()).is_cuda else "cpu"
        checkpoints = Path(ctx.cfg.output_dir) / "checkpoints" / ctx.scheme.name
        scales, losses = {}, {}
        with ctx.stage("training"):
            for rs in progress(ctx.sites, desc=f"{ctx.scheme.name} training"):
                plan, data = start[rs.name], ctx.data[rs.name]
                problem = TrainProblem(
                    ctx.weights[rs.name], plan.scales, with_act_clip(ctx.scheme, plan.act_clip),
                    data.train_x, data.selection_x, ctx.transform(rs, plan),
                    seed=ctx.cfg.seed + rs.layer_index)
                scales[rs.name], losses[rs.name] = fit_scales(
                    problem, ctx.cfg.train, accelerator=accelerator,
                    checkpoint_dir=checkpoints / rs.name, resume=ctx.resume)
        return MethodResult(ctx.plans(scales, desc=self.name), selection_loss=losses)


TRAINED = Trained()
