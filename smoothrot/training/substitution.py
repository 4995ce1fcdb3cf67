"""Training through a substituted model: site linears computed from trainable log-scales as the
fused, quantized export computes them, while the model around them stays frozen. Shared by the
layer-output (block.py) and next-token KL (model_kl.py) objectives."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import lightning as L
import torch
from torch import nn

from smoothrot.arch.sites import ResolvedSite
from smoothrot.core.scales import LogScales
from smoothrot.core.transform import SiteTransform, transform_weight
from smoothrot.losses import quantized_output
from smoothrot.schema.quant import QuantScheme
from smoothrot.surgery.hooks import replaced_forwards
from smoothrot.training.interrupt import interruptible


def fake_quant_forward(log_scales: LogScales, linear: nn.Linear, transform: SiteTransform,
                       scheme: QuantScheme, weight_error: torch.Tensor | None = None,
                       weight_q: torch.Tensor | None = None
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``linear`` as the fused, quantized export computes it, Q_a(x·diag(s)⁻¹·H)·Q_w(W·diag(s)·H)ᵀ
    (+ bias), with s from ``log_scales``: straight-through and float32 scales under autograd
    (training), the float64 scales the export fuses otherwise (scoring). With ``weight_error``
    the weight is not rounded here: W·diag(s)·H + ``weight_error``, an offline rounding's error
    (GPTQ's at the starting scales) held fixed while s moves. With ``weight_q`` the weight is
    that offline-rounded one whatever s is: s moves the activation side only (1/s folds into the
    source, whose rows or γ stay float or scale with their per-row grid)."""
    if weight_error is not None and weight_q is not None:
        raise ValueError("give a weight error (weight follows s) or a fixed weight, not both")
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    fixed = None if weight_q is None else weight_q.detach()

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        train = torch.is_grad_enabled()
        scales = log_scales() if train else log_scales.scales()
        weight_q = (fixed if weight_error is None
                    else transform_weight(weight, scales, transform) + weight_error)
        y = quantized_output(rows, weight, scales, transform, scheme, ste=train,
                             weight_q=weight_q)
        y = y if bias is None else y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return forward


def linear_part(per_site: dict[str, torch.Tensor] | None, rs: ResolvedSite,
                linear: nn.Linear) -> torch.Tensor | None:
    """``linear``'s rows of a per-site weight-shaped tensor (a rounding error or a rounded
    weight, stored concatenated like ``ResolvedSite.weight``), on the linear's device and
    dtype; None without one."""
    if per_site is None:
        return None
    parts = per_site[rs.name].split([lin.out_features for lin in rs.linears])
    return parts[rs.linears.index(linear)].to(linear.weight)


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode with no parameter taking gradients (they reach the scales only);
    its modes and flags restored after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    was_training = module.training
    try:
        module.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)


def fit_substituted(trainer: L.Trainer, module: L.LightningModule, part: nn.Module,
                    sites: Sequence[ResolvedSite], train: Iterable, validation: list[int],
                    *, steps: int, score_last: bool = False) -> None:
    """Fit ``module``'s scales with ``sites``' linears replaced by ``module.site_forward`` and
    ``part`` (the layer or model around them) frozen: the start is scored on ``validation``
    first, then ``steps`` steps validate at every epoch end; ``score_last`` scores the final
    scales once more (when the last steps ended mid-epoch)."""
    with frozen(part), replaced_forwards(sites, module.site_forward):
        interruptible(trainer, trainer.validate, model=module, dataloaders=validation,
                      verbose=False)
        if steps > 0:
            interruptible(trainer, trainer.fit, model=module, train_dataloaders=train,
                          val_dataloaders=validation)
            if score_last:
                interruptible(trainer, trainer.validate, model=module, dataloaders=validation,
                              verbose=False)
