"""Trained scales: log s refined by Adam on the straight-through fake-quant output loss
(smoothrot/training/), starting from the ``joint`` choice and its activation clips; the best
point on the selection split is kept. Under a scheme that is not scale-equivariant (MXFP4) the
global factor of s, which training holds fixed, is then searched (:func:`best_global_factor`).
With ``train.share_across_schemes`` a later scheme reuses the first scheme's trained scales
wherever they beat its own starting point on its selection loss, and trains only the rest."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from smoothrot.arch.sites import ResolvedSite
from smoothrot.core.transform import SiteTransform
from smoothrot.methods.context import SchemeContext
from smoothrot.methods.policy import JOINT
from smoothrot.methods.registry import Method, MethodResult
from smoothrot.methods.search import candidate_loss
from smoothrot.progress import progress
from smoothrot.schema.quant import QuantScheme, with_act_clip
from smoothrot.training.fit import TrainProblem, accelerator_of, data_digest, fit_scales

log = logging.getLogger(__name__)

# Global factors c tried for s → c·s: one period of a power-of-two grid (c and 2c quantize alike).
GLOBAL_FACTORS = tuple(2.0 ** (k / 16) for k in range(16))


@torch.no_grad()
def best_global_factor(scales: torch.Tensor, x_sel: torch.Tensor, weight: torch.Tensor,
                       scheme: QuantScheme, transform: SiteTransform) -> tuple[torch.Tensor, float]:
    """``c·scales`` for the c of :data:`GLOBAL_FACTORS` (1 included) with the lowest selection
    loss, and that loss.

    Training normalizes log s (core/scales.py) because the loss of an equivariant scheme does
    not depend on c. Under MXFP4 it does, with period 2 in c and several local minima, and the
    power-of-two block exponents carry no gradient: evaluating one period finds the best c
    exactly, which a straight-through gradient cannot.
    """
    x = x_sel.float()
    w = weight.float()
    y = x @ w.T
    losses = [candidate_loss(x, y, w, scales * c, scheme, transform) for c in GLOBAL_FACTORS]
    best = min(range(len(losses)), key=losses.__getitem__)
    return scales * GLOBAL_FACTORS[best], losses[best]


def _known_loss(start: MethodResult, site: str, scheme: QuantScheme, grid_scheme: QuantScheme
                ) -> float | None:
    """The search's selection loss of the starting scales where training would measure the same
    number: the site's activation clip is the scheme's own (the grid scores candidates under
    ``grid_scheme``) and the scheme is scale-equivariant (training normalizes log s, which
    moves the loss only under MXFP4)."""
    if scheme.a_clip != grid_scheme.a_clip or not scheme.scale_equivariant:
        return None
    return start.selection_loss.get(site)


_SHARED = "trained scales of the first scheme"


def _reused(ctx: SchemeContext, rs: ResolvedSite, start: MethodResult, scheme: QuantScheme
            ) -> tuple[torch.Tensor, float] | None:
    """The first scheme's trained scales for ``rs`` and their selection loss under ``scheme``,
    where ``train.share_across_schemes`` asks for them and they beat the starting point there."""
    shared = ctx.across.get(_SHARED) if ctx.cfg.train.share_across_schemes else None
    if shared is None or ctx.scheme == ctx.schemes[0] or not scheme.scale_equivariant:
        return None  # (a scheme that is not scale-equivariant also searches a global factor)
    plan, data = start.plans[rs.name], ctx.data[rs.name]
    x, w, transform = data.selection_x.float(), ctx.weights[rs.name], ctx.transform(rs, plan)
    y = x @ w.T
    loss = candidate_loss(x, y, w, shared[rs.name], scheme, transform)
    start_loss = _known_loss(start, rs.name, scheme, ctx.scheme)
    if start_loss is None:
        start_loss = candidate_loss(x, y, w, plan.scales, scheme, transform)
    # A copy: each scheme's plans own their tensors (the scales file refuses shared storage).
    return (shared[rs.name].clone(), loss) if loss <= start_loss else None


class Trained(Method):
    name = "trained"
    label = "trained"
    requires = (JOINT.name,)

    def fit(self, ctx: SchemeContext) -> MethodResult:
        start = ctx.results[JOINT.name]
        accelerator = accelerator_of(ctx.model)
        checkpoints = Path(ctx.cfg.output_dir) / "checkpoints" / ctx.scheme.name
        scales, losses = {}, {}
        reused = 0
        with ctx.stage("training"):
            for rs in progress(ctx.sites, desc=f"{ctx.scheme.name} training"):
                plan, data = start.plans[rs.name], ctx.data[rs.name]
                scheme = with_act_clip(ctx.scheme, plan.act_clip)
                kept = _reused(ctx, rs, start, scheme)
                if kept is not None:
                    scales[rs.name], losses[rs.name] = kept
                    reused += 1
                    continue
                problem = TrainProblem(
                    ctx.weights[rs.name], plan.scales, scheme, data.train_x, data.selection_x,
                    ctx.transform(rs, plan), seed=ctx.cfg.seed + rs.layer_index,
                    start_loss=_known_loss(start, rs.name, scheme, ctx.scheme),
                    data_digest=ctx.shared(f"data digest {rs.name}", lambda data=data: data_digest(
                        data.train_x, data.selection_x), across=True))
                scales[rs.name], losses[rs.name] = fit_scales(
                    problem, ctx.cfg.train, accelerator=accelerator,
                    checkpoint_dir=checkpoints / rs.name, resume=ctx.resume)
                if not problem.scheme.scale_equivariant:
                    scales[rs.name], losses[rs.name] = best_global_factor(
                        scales[rs.name], data.selection_x, problem.weight, problem.scheme,
                        problem.rotate)
        if ctx.cfg.train.share_across_schemes:
            if ctx.scheme == ctx.schemes[0]:
                ctx.across[_SHARED] = scales
            else:
                log.info("%s: the scales trained under %s reused at %d of %d sites (better than "
                         "the starting point on the selection split), trained at the rest",
                         ctx.scheme.name, ctx.schemes[0].name, reused, len(ctx.sites))
        return MethodResult(ctx.plans(scales, desc=self.name), selection_loss=losses)


TRAINED = Trained()
