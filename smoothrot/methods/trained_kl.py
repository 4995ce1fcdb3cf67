"""Trained against the model's next-token distribution: the ``trained_block`` scales refined
for every site of the model at once, on the KL divergence from the float model's distribution
(training/model_kl.py). The weights in the loss are the ones the deployed model has: the GPTQ
rounding of ``trained_block + GPTQ``, its error held fixed while the scales move; ``+gptq``
then rounds the new fused weights afresh. Reported beside ``trained`` and ``trained_block``."""

from __future__ import annotations

from smoothrot.distributed import require_one_process
from smoothrot.methods.context import SchemeContext
from smoothrot.methods.gptq import GPTQ_SUFFIX, rounding_error
from smoothrot.methods.registry import Method, MethodResult
from smoothrot.methods.trained_block import TRAINED_BLOCK
from smoothrot.schema.quant import with_act_clip
from smoothrot.training.fit import accelerator_of
from smoothrot.training.model_kl import KLProblem, fit_model_kl

START = TRAINED_BLOCK.name + GPTQ_SUFFIX


class TrainedKL(Method):
    name = "trained_kl"
    label = "trained (model KL)"
    requires = (START,)

    def fit(self, ctx: SchemeContext) -> MethodResult:
        require_one_process(self.name)
        start = ctx.results[START].plans
        transforms = {rs.name: ctx.transform(rs, start[rs.name]) for rs in ctx.sites}
        errors = {name: rounding_error(ctx.weights[name], plan, transforms[name], plan.weight_q)
                  for name, plan in start.items()}
        problem = KLProblem(
            ctx.model, ctx.sites, {name: plan.scales for name, plan in start.items()},
            transforms,
            {name: with_act_clip(ctx.scheme, plan.act_clip) for name, plan in start.items()},
            {split: ctx.windows[split] for split in ("calibration", "selection")},
            weight_errors=errors, seed=ctx.cfg.seed)
        accelerator = accelerator_of(ctx.model)
        with ctx.stage("KL training"):
            scales, _, _ = fit_model_kl(problem, ctx.cfg.kl_training,
                                        log_bound=ctx.cfg.train.log_bound,
                                        accelerator=accelerator)
        return MethodResult(ctx.plans(scales, desc=self.name))


TRAINED_KL = TrainedKL()
