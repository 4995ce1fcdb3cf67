"""The online half of the surgery: pre-hooks that rotate (and fake-quantize) a linear's input,
and applying site plans to a live model, permanently or for the length of a ``with`` block;
linears computed by a trainer's own (differentiable) forward for a while; and norms recomputed
in the model's own dtype, for float64 checks of exact math."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from smoothrot.arch.sites import ResolvedSite, architecture_of
from smoothrot.core.quantizers import (
    Quantizer,
    activation_quantizer,
    codes_product,
    integer_applies,
    quantize_activation_spec,
    quantize_weight_spec,
    weight_quantizer,
)
from smoothrot.core.transform import IDENTITY, SiteTransform
from smoothrot.schema.quant import QuantScheme, with_act_clip
from smoothrot.surgery.fuse import fuse_site, linear_weights_q
from smoothrot.surgery.plan import SitePlan


class OnlineInputTransform:
    """Forward pre-hook: x ↦ Q_a(x·R); R from ``transform`` (identity: none), Q_a the
    ``scheme``'s activation quantizer (any format / group size) when one is given."""

    def __init__(self, transform: SiteTransform, scheme: QuantScheme | None = None) -> None:
        self.transform = transform
        self.scheme = scheme

    def __call__(self, _module: nn.Module, args: tuple) -> tuple:
        x = self.transform.rotate_input(args[0])
        if self.scheme is not None:
            x = quantize_activation_spec(x, self.scheme)
        return (x, *args[1:])


class IntegerForward:
    """A quantized linear's forward as an integer W4A4 / W8A8 backend computes it: x·R
    quantized per token to int8 codes, one int8 GEMM with the weight's codes (int32 sums),
    then the per-token and per-channel scales and the bias in float32.

    Equal to the float product of the fake-quantized tensors (the pre-hook path) up to float32
    rounding, and on the CPU ~10× cheaper than that float32 GEMM (bench/README.md).
    """

    def __init__(self, linear: nn.Linear, transform: SiteTransform, x_quantizer: Quantizer,
                 w_codes: torch.Tensor, w_scales: torch.Tensor) -> None:
        self.transform = transform
        self.x_quantizer = x_quantizer
        self.w_codes, self.w_scales = w_codes, w_scales
        self.bias = linear.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x_t = self.transform.rotate_input(x)
        flat = x_t.reshape(-1, x_t.shape[-1])
        y = codes_product(*self.x_quantizer.codes(flat), self.w_codes, self.w_scales)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class _ForwardHandle:
    """Removes an :class:`IntegerForward` installed as a linear's instance ``forward``."""

    def __init__(self, linear: nn.Linear) -> None:
        self.linear = linear

    def remove(self) -> None:
        self.linear.__dict__.pop("forward", None)


def online_transform(rs: ResolvedSite, plan: SitePlan) -> SiteTransform:
    """What a site's pre-hook must still rotate at run time (identity for offline rotations)."""
    return rs.transform.with_rotation(plan.rotation) if plan.rotation.is_online() else IDENTITY


def apply_plans(
    sites: Sequence[ResolvedSite],
    plans: Mapping[str, SitePlan],
    scheme: QuantScheme | None = None,
    *,
    integer_gemm: bool = False,
) -> list[torch.utils.hooks.RemovableHandle | _ForwardHandle]:
    """Transform every site with a plan; with ``scheme``, fake-quantize weights and inputs too.

    All sites are fused before any weight is quantized: a linear can be both a group member
    (columns transformed) and a source (rows divided, e.g. up_proj, v_proj), and it must be
    quantized once, in its final form. With ``integer_gemm`` (the target's arithmetic,
    schema/target.py), where the scheme is per-row int on both sides (W4A4, W8A8) and the weight
    float32 on the CPU, the linear then runs as :class:`IntegerForward` (the weight still holds
    its dequantized RTN); otherwise a pre-hook rotates and fake-quantizes the input of the float
    linear. Returns the handles (hooks, integer forwards), one per linear of every planned site.
    """
    active = [(rs, plans[rs.name]) for rs in sites if rs.name in plans]
    weights_q = linear_weights_q(sites, plans)  # checked before anything is changed
    for rs, plan in active:
        fuse_site(rs, plan.scales, plan.rotation)
    integer: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor]] = {}
    for rs, plan in active:
        if plan.weight_q is not None:
            with torch.no_grad():
                for linear in rs.linears:
                    linear.weight.copy_(weights_q[linear].to(linear.weight))
        elif scheme is not None:
            aq, wq = activation_quantizer(scheme), weight_quantizer(scheme)
            with torch.no_grad():
                for linear in rs.linears:
                    if integer_gemm and integer_applies(linear.weight, aq, wq):
                        codes, scales = integer[linear] = wq.codes(linear.weight)
                        linear.weight.copy_(codes * scales)  # = quantize_weight_spec's values
                    else:
                        linear.weight.copy_(quantize_weight_spec(linear.weight, scheme))
    handles: list[torch.utils.hooks.RemovableHandle | _ForwardHandle] = []
    for rs, plan in active:
        if not (plan.rotation.is_online() or scheme is not None):
            continue
        act_scheme = None if scheme is None else with_act_clip(scheme, plan.act_clip)
        transform = online_transform(rs, plan)
        for linear in rs.linears:
            if linear in integer:
                assert act_scheme is not None
                linear.forward = IntegerForward(linear, transform,
                                                activation_quantizer(act_scheme), *integer[linear])
                handles.append(_ForwardHandle(linear))
            else:
                hook = OnlineInputTransform(transform, act_scheme)
                handles.append(linear.register_forward_pre_hook(hook))
    return handles


def site_parameters(rs: ResolvedSite) -> list[nn.Parameter]:
    """Every parameter a site's surgery may write (its linears and its source)."""
    params = []
    for module in (*rs.linears, rs.smooth_from):
        for name in ("weight", "bias"):
            p = getattr(module, name, None)
            if isinstance(p, torch.Tensor):
                params.append(p)
    return params


@contextmanager
def transformed(
    sites: Sequence[ResolvedSite],
    plans: Mapping[str, SitePlan],
    scheme: QuantScheme | None = None,
    *,
    integer_gemm: bool = False,
) -> Iterator[None]:
    """Temporarily apply :func:`apply_plans`; weights, hooks and forwards are restored on
    exit."""
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for rs in sites:
        if rs.name in plans:
            for p in site_parameters(rs):
                saved.setdefault(id(p), (p, p.detach().clone()))
    handles: list = []
    try:
        handles = apply_plans(sites, plans, scheme, integer_gemm=integer_gemm)
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for p, original in saved.values():
                p.copy_(original)


@contextmanager
def replaced_forwards(
    sites: Sequence[ResolvedSite],
    make_forward: Callable[[ResolvedSite, nn.Linear], Callable[[torch.Tensor], torch.Tensor]],
) -> Iterator[None]:
    """Run every linear of ``sites`` through ``make_forward(site, linear)`` for a while.

    The differentiable counterpart of :func:`transformed`: a trainer whose transform depends
    on parameters (trainable scales) computes each linear's fake-quantized output itself, with
    the model's weights left untouched; the original forwards come back on exit.
    """
    replaced: list[nn.Linear] = []
    try:
        for rs in sites:
            for linear in rs.linears:
                linear.forward = make_forward(rs, linear)  # an instance attribute shadows it
                replaced.append(linear)
        yield
    finally:
        for linear in replaced:
            del linear.forward


def norm_modules(model: nn.Module) -> list[nn.Module]:
    """Every RMSNorm of the model (its class name ends in RMSNorm)."""
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


@contextmanager
def exact_norms(model: nn.Module) -> Iterator[None]:
    """Recompute every RMSNorm in its input's dtype for the length of the block.

    transformers' RMSNorms upcast to float32 even in a float64 model, so a float64 model whose
    residual stream is rotated (R1) or whose norm weights were rescaled (Gemma's 1+γ) agrees
    with the original to float32's resolution only (~1e-7), not float64's: exact math would
    look like a fusion error.
    """
    offset = architecture_of(model).residual.norm_kind == "offset_rms"

    def hook(module: nn.Module, args: tuple, _output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        w = module.weight.to(x.dtype)
        return y * (1.0 + w if offset else w)

    # prepend: run before other hooks on the norm (R1 rotates Gemma-2 output norms online)
    handles = [m.register_forward_hook(hook, prepend=True) for m in norm_modules(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
