"""GPTQ, then the activation side tuned on the rounded layer: ``<base>+gptq+act``.

``+gptq`` rounds each site's fused weight W·diag(s)·H once; every later change of s would need a
new rounding. But 1/s lives in the site's *source* (a norm's γ, or the rows of v_proj / up_proj,
whose per-row grids scale with the row), so after rounding, the activation side's scales are still
free: the deployed layer computes Q_a(x·diag(s_a)⁻¹·H)·Ŵᵀ with Ŵ stored as GPTQ rounded it at
the base scales s, and s_a = s is that ``+gptq`` layer exactly. Here s_a is trained, one decoder
layer at a time in the sequential walk, against the layer's output (``act_tuning``: its
target, steps, learning rate and batch) with Ŵ held fixed, so the loss is the deployed layer's
own, with no re-rounding after it (what cost ``trained_kl`` its gain). Each layer is rounded on
the inputs of the layers before it *as tuned*, and the best point on the selection split is
kept, s_a = s included. Nothing changes for a backend: Ŵ is stored as any GPTQ weight, and
1/s_a folds where 1/s did.
"""

from __future__ import annotations

from dataclasses import replace

from smoothrot.distributed import require_one_process
from smoothrot.methods.context import SchemeContext
from smoothrot.methods.gptq import GPTQ_SUFFIX, round_layer_as_configured, site_rounder
from smoothrot.methods.registry import Method, MethodResult
from smoothrot.methods.trained_block import layer_problem, layer_steps, training_splits
from smoothrot.schema.errors import ConfigError
from smoothrot.surgery.plan import SitePlan
from smoothrot.training.block import fit_block
from smoothrot.training.fit import accelerator_of

ACT_SUFFIX = "+act"


class ActTunedGPTQ(Method):
    """``<base>+gptq+act``: the base's plans rounded by sequential GPTQ, then each layer's
    activation-side scales trained with the rounded weights held fixed."""

    rounding = "gptq"

    def __init__(self, base: Method, label: str | None = None) -> None:
        self.base = base.name
        self.name = base.name + GPTQ_SUFFIX + ACT_SUFFIX
        self.label = label or f"{base.label} + GPTQ + act-tuned"
        self.requires = (base.name,)

    def fit(self, ctx: SchemeContext) -> MethodResult:
        require_one_process(self.name)
        base = ctx.results[self.base].plans
        unscaled = [name for name, plan in base.items() if plan.scales is None]
        if unscaled:
            raise ConfigError(f"{self.name}: {self.base} has no scales at {unscaled[0]} to "
                              "tune; pick a base method with smoothing scales")
        cfg = ctx.cfg.act_tuning.as_block()
        splits = training_splits(ctx)
        gptq_float = ctx.cfg.gptq.target == "model"
        round_site = site_rounder(ctx, base)
        accelerator = accelerator_of(ctx.model)
        plans: dict[str, SitePlan] = {}
        with ctx.stage("gptq + activation tuning"):
            for step in layer_steps(ctx, splits, cfg, self.name,
                                    cfg.target == "model" or gptq_float):
                layer = {rs.name: base[rs.name] for rs in step.sites}
                rounded = round_layer_as_configured(ctx, step, layer, splits, round_site)
                problem = layer_problem(ctx, step, layer, weights_q={
                    name: choice.weight_q for name, choice in rounded.items()})
                best, _ = fit_block(problem, cfg, log_bound=ctx.cfg.train.log_bound,
                                    accelerator=accelerator)
                for name in layer:
                    step.done[name] = replace(step.done[name], scales=best[name])
                    plans[name] = step.done[name]
        return MethodResult(plans)
