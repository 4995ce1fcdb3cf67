"""GPTQ as a method wrapper: ``<base>+gptq`` keeps any method's scales, rotation and activation
clips and rounds the fused weight W·diag(s)·R offline by GPTQ (core/gptq.py), the damping (or
plain RTN) chosen per site on the selection split.

With ``gptq.sequential`` (default) each site is rounded on the inputs of the model quantized so
far (calibrate/sequential.py); otherwise on the float model's captured calibration rows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace

import torch

from smoothrot.arch.sites import ResolvedSite
from smoothrot.calibrate.capture import CaptureSpec, batch_size, fit_specs
from smoothrot.calibrate.sequential import LayerStep, RoundSite, gptq_sequential, round_layer
from smoothrot.core.gptq import (
    DEFAULT_ACT_AWARE,
    DEFAULT_DAMP_GRID,
    DEFAULT_RIDGE_GRID,
    GPTQChoice,
    Hessian,
    gptq_quantize,
    input_hessian,
    least_squares_target,
    refit_row_scales,
)
from smoothrot.core.quantizers import (
    quantize_activation_spec,
    quantize_weight_spec,
    weight_quantizer,
)
from smoothrot.core.transform import SiteTransform, transform_input, transform_weight
from smoothrot.losses import output_loss, quantized_output
from smoothrot.methods.context import SchemeContext
from smoothrot.methods.registry import Method, MethodResult
from smoothrot.progress import progress
from smoothrot.schema.config import GPTQConfig
from smoothrot.schema.quant import QuantScheme, with_act_clip
from smoothrot.surgery.plan import SitePlan

log = logging.getLogger(__name__)

GPTQ_SUFFIX = "+gptq"


@torch.no_grad()
def gptq_fused_weight(
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    transform: SiteTransform,
    x: torch.Tensor,
    scheme: QuantScheme,
    *,
    act_aware: bool = DEFAULT_ACT_AWARE,
    **kwargs: object,
) -> torch.Tensor:
    """GPTQ-rounded fused weight W·diag(s)·H from the site's raw calibration inputs ``x``.

    The inputs are moved to the same space (X·diag(s)⁻¹·H); with ``act_aware`` they are also
    fake-quantized as the scheme's activations are, so GPTQ sees what the kernel multiplies.
    ``kwargs`` go to :func:`gptq_quantize`.
    """
    w = weight.detach().float()
    s = None if scales is None else scales.float()
    xt = transform_input(x.detach().float(), s, transform)
    if act_aware:
        xt = quantize_activation_spec(xt, scheme)
    return gptq_quantize(transform_weight(w, s, transform), xt, scheme, **kwargs)  # type: ignore[arg-type]


@torch.no_grad()
def gptq_fused_weight_selected(
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    transform: SiteTransform,
    x: torch.Tensor,
    x_selection: torch.Tensor,
    scheme: QuantScheme,
    *,
    damps: tuple[float, ...] = DEFAULT_DAMP_GRID,
    act_aware: bool = DEFAULT_ACT_AWARE,
    float_inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    ridges: tuple[float, ...] = DEFAULT_RIDGE_GRID,
    token_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    refit: bool = False,
    **kwargs: object,
) -> GPTQChoice:
    """GPTQ of the fused weight with the damping that minimizes the selection-split loss.

    Candidates: GPTQ for each λ in ``damps`` (one Hessian from ``x``) and λ = ∞, i.e. RTN of the
    fused weight. The loss is the layer-output loss every other choice uses (losses.py), with
    activations quantized as the scheme says, so the result is never worse than RTN on the
    selection split; held-out tokens are not looked at.

    ``float_inputs`` (calibration, selection) are the float model's inputs at the same tokens as
    ``x`` and ``x_selection`` (the quantized model's): the wanted output is then the float
    model's, X·Wᵀ, and GPTQ of :func:`least_squares_target` on the quantized activations
    Q_a(X̃') joins the candidates (each ridge in ``ridges`` × each damping), so upstream error
    and this site's activation rounding are compensated in the weight where the selection
    split says it pays.

    ``token_weights`` (calibration, selection): one weight per row, by which the Hessian, the
    least-squares target and the selection loss weigh that token's squared error (rows scaled
    by √weight after the per-token activation rounding, which they leave unchanged).

    ``refit``: each GPTQ rounding also competes with its per-channel scales refitted to its
    codes on the same Hessian (:func:`refit_row_scales`, toward the weight it rounded), where
    the weight format can store a moved scale (``Quantizer.scale_is_free``; else ignored).
    """
    w = weight.detach().float()
    s = None if scales is None else scales.float()
    xs = x_selection.detach().float()
    y = (xs if float_inputs is None else float_inputs[1].detach().float()) @ w.T
    root_cal, root_sel = ((None, None) if token_weights is None else
                          tuple(t.detach().float().sqrt().unsqueeze(-1) for t in token_weights))

    def weighed(rows: torch.Tensor, root: torch.Tensor | None) -> torch.Tensor:
        return rows if root is None else rows * root

    def loss(wq: torch.Tensor) -> float:
        out = quantized_output(xs, w, s, transform, scheme, weight_q=wq)
        return float(output_loss(weighed(y, root_sel), weighed(out, root_sel)))

    fused = transform_weight(w, s, transform)
    rtn = quantize_weight_spec(fused, scheme)
    rtn_loss = loss(rtn)
    best = GPTQChoice(rtn, None, rtn_loss, rtn_loss)
    refit = refit and weight_quantizer(scheme).scale_is_free  # else the export cannot store it

    def consider(wq: torch.Tensor, damp: float, hess: Hessian, goal: torch.Tensor,
                 ridge: float | None = None) -> None:
        nonlocal best
        candidates = [(False, wq)]
        if refit:
            candidates.append((True, refit_row_scales(wq, hess, goal)))
        for refitted, candidate in candidates:
            value = loss(candidate)
            if value < best.selection_loss:
                best = GPTQChoice(candidate, damp, value, rtn_loss, ridge, refitted)

    xt = transform_input(x.detach().float(), s, transform)
    inputs = weighed(quantize_activation_spec(xt, scheme) if act_aware else xt, root_cal)
    hess = input_hessian(inputs)
    for damp in damps:
        consider(gptq_quantize(fused, hess, scheme, damp=damp, **kwargs),  # type: ignore[arg-type]
                 damp, hess, fused)
    if float_inputs is None:
        return best
    y_float = weighed(float_inputs[0].detach().float() @ w.T, root_cal)
    if act_aware:  # the inputs and Hessian above are already Q_a(X̃')'s
        xq = inputs
    else:
        xq = weighed(quantize_activation_spec(xt, scheme), root_cal)
        hess = input_hessian(xq)
    for ridge in ridges:
        goal = least_squares_target(fused, xq, y_float, ridge, hess)
        for damp in damps:
            consider(gptq_quantize(goal, hess, scheme, damp=damp, **kwargs),  # type: ignore[arg-type]
                     damp, hess, goal, ridge)
    return best


def site_rounder(ctx: SchemeContext, plans: Mapping[str, SitePlan]) -> RoundSite:
    """GPTQ of a site's fused weight under ``plans`` (its scales, rotation and activation
    clip), the variant chosen on the selection split: what ``+gptq`` rounds a site with."""

    def round_site(rs: ResolvedSite, x: torch.Tensor, x_sel: torch.Tensor,
                   float_inputs: tuple[torch.Tensor, torch.Tensor] | None,
                   token_weights: tuple[torch.Tensor, torch.Tensor] | None) -> GPTQChoice:
        plan = plans[rs.name]
        return gptq_fused_weight_selected(
            ctx.weights[rs.name], plan.scales, ctx.transform(rs, plan), x, x_sel,
            with_act_clip(ctx.scheme, plan.act_clip), float_inputs=float_inputs,
            token_weights=token_weights, refit=ctx.cfg.gptq.refit_scales)

    return round_site


def gptq_splits(cfg: GPTQConfig, splits: dict[str, CaptureSpec]) -> dict[str, CaptureSpec]:
    """The rows sequential GPTQ rounds on: ``splits`` (calibration rows kept as the trainers
    keep them), or every calibration token under ``gptq.all_tokens``."""
    if not cfg.all_tokens:
        return splits
    return {k: replace(v, keep_index=None) if k == "calibration" else v
            for k, v in splits.items()}


def round_layer_as_configured(ctx: SchemeContext, step: LayerStep, plans: Mapping[str, SitePlan],
                              splits: dict[str, CaptureSpec], round_site: RoundSite
                              ) -> dict[str, GPTQChoice]:
    """One walk step's sites rounded as ``+gptq`` rounds them under ``ctx.cfg.gptq`` (its rows,
    target and token weighting): for the methods that round inside their own layer walk."""
    cfg = ctx.cfg.gptq
    return round_layer(step, plans, ctx.scheme, gptq_splits(cfg, splits), round_site,
                       cfg.target == "model", cfg.weighting == "residual")


def rounding_error(weight: torch.Tensor, plan: SitePlan, transform: SiteTransform,
                   weight_q: torch.Tensor) -> torch.Tensor:
    """An offline rounding's error of the fused weight under ``plan``: W_q − W·diag(s)·R, what
    the block and KL losses hold fixed while the scales move."""
    return weight_q.float() - transform_weight(weight, plan.scales.float(), transform)


class WithGPTQ(Method):
    """``<base>+gptq``: the base method's plans with GPTQ-rounded fused weights."""

    rounding = "gptq"

    def __init__(self, base: Method, label: str | None = None) -> None:
        self.base = base.name
        self.name = base.name + GPTQ_SUFFIX
        self.label = label or f"{base.label} + GPTQ"
        self.requires = (base.name,)

    def fit(self, ctx: SchemeContext) -> MethodResult:
        base = ctx.results[self.base].plans
        round_site = site_rounder(ctx, base)
        with ctx.stage("gptq"):
            if ctx.cfg.gptq.sequential:
                specs = fit_specs(ctx.windows, ctx.cfg.data.train_tokens, ctx.cfg.seed)
                picks = gptq_sequential(
                    ctx.model, ctx.sites, base, ctx.scheme,
                    gptq_splits(ctx.cfg.gptq, {k: specs[k] for k in ("calibration", "selection")}),
                    batch_size(ctx.cfg.data.seq_len), round_site,
                    float_target=ctx.cfg.gptq.target == "model",
                    token_weights=ctx.cfg.gptq.weighting == "residual")
            else:
                picks = {rs.name: round_site(rs, ctx.data[rs.name].train_x,
                                             ctx.data[rs.name].selection_x, None, None)
                         for rs in progress(ctx.sites, desc=f"{ctx.scheme.name} {self.name}")}
        damps = [pick.damp for pick in picks.values()]
        ridges = [pick.ridge for pick in picks.values()]
        log.info("%s %s: damping per site %s (RTN kept on %d/%d), float-model target's ridge "
                 "per site %s, scales refitted on %d", ctx.scheme.name, self.name,
                 {d: damps.count(d) for d in dict.fromkeys(damps)}, damps.count(None),
                 len(damps), {r: ridges.count(r) for r in dict.fromkeys(ridges)},
                 sum(pick.refit for pick in picks.values()))
        return MethodResult(
            {s: replace(plan, weight_q=picks[s].weight_q) for s, plan in base.items()},
            selection_loss={s: pick.selection_loss for s, pick in picks.items()})
