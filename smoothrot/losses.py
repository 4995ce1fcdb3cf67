"""Where the loss is: the fake-quantized output of one smoothed, rotated linear layer.

For input tokens X [T, n] and weight W [m, n], a site with scales s and rotation H computes
Q_a(X·diag(s)⁻¹·H) · Q_w(W·diag(s)·H)ᵀ; its error is measured against the float output X·Wᵀ.
The same function serves the grid search, the trainer (with straight-through rounding) and the
held-out evaluation, so every method is scored by identical arithmetic.
"""

from __future__ import annotations

import torch

from smoothrot.core.quantizers import (
    activation_quantizer,
    integer_product,
    quantize_activation_spec,
    quantize_weight_spec,
    weight_quantizer,
)
from smoothrot.core.transform import SiteTransform, transform_input, transform_weight
from smoothrot.schema.quant import QuantScheme


def quantized_output(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    transform: SiteTransform,
    scheme: QuantScheme,
    *,
    ste: bool = False,
    weight_q: torch.Tensor | None = None,
    batch_dims: int = 0,
    bf16_grads: bool = False,
) -> torch.Tensor:
    """Q_a(X') · Q_w(W')ᵀ; ``weight_q`` is a weight quantized offline (e.g. by GPTQ).

    ``batch_dims`` leading dims of ``scales`` (e.g. [C, 1, n]) index independent candidates
    (NVFP4 takes its global scale per candidate). ``bf16_grads``: see :func:`quantized_product`.
    """
    x_t = transform_input(x, scales, transform)
    w_t = None if weight_q is not None else transform_weight(weight, scales, transform)
    return quantized_product(x_t, w_t, scheme, ste=ste, batch_dims=batch_dims, weight_q=weight_q,
                             bf16_grads=bf16_grads)


def quantized_product(
    x_t: torch.Tensor,
    w_t: torch.Tensor | None,
    scheme: QuantScheme,
    *,
    ste: bool = False,
    batch_dims: int = 0,
    weight_q: torch.Tensor | None = None,
    bf16_grads: bool = False,
) -> torch.Tensor:
    """Q_a(X')·Q_w(W')ᵀ of an already transformed input X' and weight W'; ``weight_q``, a
    weight quantized offline, replaces Q_w(W') (``w_t`` is then unused).

    ``bf16_grads`` (with ``ste``): the product's two backward GEMMs in bfloat16
    (:class:`Bf16GradProduct`); the product itself, the loss, stays float32.

    Without ``ste`` (nothing to differentiate) per-row int schemes take the exact int8 GEMM
    (:func:`~smoothrot.core.quantizers.integer_product`); otherwise, or where it does not apply,
    the float product of the dequantized tensors. Split from :func:`quantized_output` so several
    schemes can score one transformed input (the search's candidates, the held-out errors).
    """
    if weight_q is not None:
        x_q = quantize_activation_spec(x_t, scheme, ste=ste, batch_dims=batch_dims)
        return x_q @ weight_q.transpose(-1, -2)
    assert w_t is not None, "quantized_product needs w_t or weight_q"
    if not ste:
        product = integer_product(x_t, w_t, activation_quantizer(scheme), weight_quantizer(scheme))
        if product is not None:
            return product
    w_q = quantize_weight_spec(w_t, scheme, ste=ste, batch_dims=batch_dims)
    x_q = quantize_activation_spec(x_t, scheme, ste=ste, batch_dims=batch_dims)
    if ste and bf16_grads:
        return Bf16GradProduct.apply(x_q, w_q)
    return x_q @ w_q.transpose(-1, -2)


class Bf16GradProduct(torch.autograd.Function):
    """a·bᵀ in float32 whose gradients g·b and gᵀ·a are computed in bfloat16 (then float32).

    A training step's straight-through gradient only steers Adam on log s, whose update is
    normalized per coordinate: bfloat16's 3 significant digits in the gradient of the product
    change nothing the selection split can see (bench/README.md), and on CPUs with native
    bfloat16 GEMMs (AMX) the two backward GEMMs cost ~4× less than in float32, ~13 % of a step.
    The forward, the loss, is float32, so every loss value (and validation) is unchanged.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, a: torch.Tensor,
                b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return a @ b.transpose(-1, -2)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = ctx.saved_tensors
        g = grad.to(torch.bfloat16)
        grad_a = (g @ b.to(torch.bfloat16)).to(a.dtype)
        grad_b = (g.transpose(-1, -2) @ a.to(torch.bfloat16)).to(b.dtype)
        return grad_a, grad_b


def native_bf16() -> bool:
    """Whether this machine's CPU has native bfloat16 GEMMs (AMX or AVX512-BF16), where
    :class:`Bf16GradProduct` pays; without them bfloat16 is emulated."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # private probes: absent in another torch release
        return False


def output_loss(y_ref: torch.Tensor, y_q: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the squared output error ||x·Wᵀ − Q(x')·Q(W')ᵀ||²."""
    return (y_ref - y_q).pow(2).sum(dim=-1).mean()


def relative_output_loss(y_ref: torch.Tensor, y_q: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||y_ref − y_q||² / ||y_ref||²: every token's error relative to its
    size. A decoder layer's output is the residual stream, where a few tokens (attention sinks)
    are thousands of times larger than the rest; the next layer normalizes each token, so it
    sees this error, not the raw one. Tokens whose reference is zero count their raw error."""
    size = y_ref.pow(2).sum(dim=-1)
    size = torch.where(size > 0, size, torch.ones_like(size))
    return ((y_ref - y_q).pow(2).sum(dim=-1) / size).mean()
