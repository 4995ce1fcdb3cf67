"""Held-out measurements: per-site output error and model perplexity.

Both are computed on data no choice was made on (held-out tokens for layer errors, a disjoint
evaluation text for perplexity), so the report never scores a method on its own selection data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from smoothrot.core.transform import SiteTransform, transform_input, transform_weight
from smoothrot.losses import quantized_product
from smoothrot.progress import progress
from smoothrot.schema.quant import QuantScheme


@dataclass(frozen=True)
class LayerError:
    """Held-out error of one site under one method."""

    mse: float
    relative: float  # ||Y − Ŷ||² / ||Y||²


@dataclass(frozen=True)
class Reference:
    """X·Wᵀ of a site's held-out tokens and its sum of squares, computed once per site (in
    calibration) and shared by every method and scheme scored on those tokens."""

    y: torch.Tensor
    energy: float

    @classmethod
    def of(cls, y: torch.Tensor) -> Reference:
        """``y`` with its sum of squares (inf where it overflows float32, as the errors would)."""
        return cls(y, float(torch.sum(y * y)))


def layer_error(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    transform: SiteTransform,
    scheme: QuantScheme,
    batch_tokens: int = 4096,
    *,
    weight_q: torch.Tensor | None = None,
    reference: Reference | None = None,
) -> LayerError:
    """MSE of the fake-quantized output against X·Wᵀ, over all tokens and output channels.

    ``weight_q`` replaces the scheme's RTN of the fused weight W·diag(s)·H by a weight quantized
    offline (e.g. by GPTQ); activations are still quantized as the scheme says. ``reference``
    is X·Wᵀ when the caller already has it (one GEMM saved per method scored on the same X).
    """
    return layer_errors(x, weight, scales, transform, [(scheme, weight_q)], batch_tokens,
                        reference=reference)[0]


@torch.no_grad()
def layer_errors(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    transform: SiteTransform,
    variants: Sequence[tuple[QuantScheme, torch.Tensor | None]],
    batch_tokens: int = 4096,
    *,
    reference: Reference | None = None,
) -> list[LayerError]:
    """:func:`layer_error` of one site's scales and transform under each ``(scheme, weight_q)``.

    X·diag(s)⁻¹·R and W·diag(s)·R are computed once for all variants: a plan scored under
    every scheme of a run pays its rotation once (the rotation is ~40 % of an error's cost).
    """
    w = weight.float()
    s = None if scales is None else scales.float()
    weights_q = [None if w_q is None else w_q.float() for _, w_q in variants]
    w_t = (transform_weight(w, s, transform) if any(w_q is None for w_q in weights_q)
           else None)
    # Float32 sums of squared errors, accumulated as torchmetrics' MeanSquaredError does.
    sse = [torch.zeros((), dtype=torch.float32, device=x.device) for _ in variants]
    energy = 0.0
    for start in range(0, x.shape[0], batch_tokens):
        xb = x[start : start + batch_tokens].float()
        if reference is None:
            batch_ref = Reference.of(xb @ w.T)
            y, energy = batch_ref.y, energy + batch_ref.energy
        else:
            y = reference.y[start : start + batch_tokens].float()
        x_t = transform_input(xb, s, transform)
        for i, ((scheme, _), w_q) in enumerate(zip(variants, weights_q, strict=True)):
            # A fresh product: its error is formed in place, no [tokens, out] temporaries.
            error = quantized_product(x_t, w_t, scheme, weight_q=w_q).sub_(y)
            sse[i] = sse[i] + error.square_().sum()
    if reference is not None:
        energy = reference.energy
    out = []
    for total in sse:
        mse = float(total / (x.shape[0] * w.shape[0]))
        out.append(LayerError(mse=mse,
                              relative=mse / max(energy / x.shape[0] / w.shape[0], 1e-30)))
    return out


_NLL_CHUNK_BYTES = 16 << 20  # logits per cross-entropy call (bench/README.md)


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, desc: str = "ppl"
) -> float:
    """exp(mean next-token NLL) over ``windows`` [samples, seq_len]."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in progress(range(0, windows.shape[0], batch_size), desc=desc):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        # Next-token targets; the last position has none (ignored), so the [tokens, vocab] logits
        # are read in place rather than copied without their last row.
        targets = torch.nn.functional.pad(batch[:, 1:], (0, 1), value=-100).reshape(-1)
        flat = logits.reshape(-1, logits.shape[-1])
        # In row chunks whose log-softmax stays under the allocator's mmap threshold
        # (allocator.py): a whole batch's copy is a fresh mapping faulted in page by page.
        rows = max(1, _NLL_CHUNK_BYTES // (flat.shape[1] * flat.element_size()))
        for lo in range(0, flat.shape[0], rows):
            total_nll += float(torch.nn.functional.cross_entropy(
                flat[lo : lo + rows], targets[lo : lo + rows], reduction="sum",
                ignore_index=-100))
        total_tokens += batch[:, 1:].numel()
    value = math.exp(total_nll / total_tokens)
    if not math.isfinite(value):
        raise FloatingPointError(f"{desc}: perplexity is not finite (NLL {total_nll})")
    return value
