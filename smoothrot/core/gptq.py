"""GPTQ: round a linear weight column by column, pushing each column's rounding error onto the
columns not yet rounded, so the layer *output* on calibration inputs moves as little as possible.

For inputs X [T, n] and weight W [m, n], GPTQ minimizes ||X·Wᵀ − X·Ŵᵀ||² over quantized Ŵ
greedily: with H = XᵀX (damped by λ·mean diag H, so it is invertible with few tokens),
quantizing column i to q_i and then updating the remaining columns F by

    W_F ← W_F − (w_i − q_i) / [H_F⁻¹]_ii · [H_F⁻¹]_{i,F}

is the exact optimal (OBQ) re-fit of the still-free columns. All [H_F⁻¹] rows needed are the rows
of the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU): [H_F⁻¹]_{i,F} / [H_F⁻¹]_ii = U_{i,F} / U_ii.
Updates are applied lazily per block of 128 columns (one matrix product per block), and columns
may be visited in decreasing order of diag H ("act-order").

The quantizer is the scheme's own (fake_quant.Quantizer): per-channel parameters come from the
whole weight up front; group parameters from the group's current (already updated) weights when
the sweep reaches it, or from the original weights ("static groups", forced with act-order so a
group's columns share one scale whatever order they are visited in). So the output lies on exactly
the grid that RTN with the same scheme would use; only the rounding decisions differ.

In smoothrot GPTQ runs on the fused weight W' = W·diag(s)·R with inputs in the same space
X' = X·diag(s)⁻¹·R (smoothrot/methods/gptq.py, which also picks the damping per site).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from smoothrot.core.quantizers import (
    QParams,
    Quantizer,
    check_group_size,
)
from smoothrot.core.quantizers import weight_quantizer as _weight_quantizer
from smoothrot.schema.quant import QuantScheme

__all__ = [
    "DEFAULT_ACT_AWARE",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_DAMP",
    "DEFAULT_DAMP_GRID",
    "DEFAULT_RIDGE_GRID",
    "GPTQChoice",
    "Hessian",
    "gptq_quantize",
    "input_hessian",
    "least_squares_target",
    "refit_row_scales",
]

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 128
DEFAULT_DAMP = 0.01
# Measured on SmolLM2 down_proj (docs/quantizers.md): the Hessian from quantized inputs Q_a(X')
# was no better than from the float X' on the selection split, so the simpler float is default.
DEFAULT_ACT_AWARE = False
# Damping candidates of gptq_fused_weight_selected (λ relative to mean diag H); RTN is λ = ∞.
DEFAULT_DAMP_GRID = (0.01, 0.1, 1.0)
# Ridge of the float-model target (least_squares_target), relative to mean diag H: ρ = 1 was
# the choice at most sites of SmolLM2 under a 0.1/1/10 × damping grid, which gained nothing in
# perplexity over one ridge per damping (docs/whole_model.md) at 3× the GPTQ runs.
DEFAULT_RIDGE_GRID = (1.0,)
_MAX_DAMP_RETRIES = 6


@dataclass(frozen=True)
class Hessian:
    """Sum over calibration tokens of x·xᵀ ([n, n], float64) and the token count."""

    matrix: torch.Tensor
    tokens: int

    def __post_init__(self) -> None:
        m = self.matrix
        if m.dim() != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"a Hessian must be square [n, n], got {tuple(m.shape)}")


def input_hessian(x: torch.Tensor) -> Hessian:
    """XᵀX over all tokens of ``x`` [..., n] (float64, so many tokens can be summed safely)."""
    x2 = x.detach().reshape(-1, x.shape[-1]).double()
    return Hessian(x2.T @ x2, x2.shape[0])


@torch.no_grad()
def least_squares_target(
    weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor, ridge: float = 1.0,
    hessian: Hessian | None = None,
) -> torch.Tensor:
    """The weight W* [m, n] that best maps the inputs ``x`` [T, n] to the outputs ``y`` [T, m].

    GPTQ fits Ŵ to W on the inputs the layer will get, x̃: it minimizes ||x̃·(W − Ŵ)ᵀ||². When
    the wanted output is another, y = x·Wᵀ from the float model's inputs x ≠ x̃ (upstream
    layers and this layer's activations are quantized), then ||x̃·Ŵᵀ − y||² = ||x̃·(W* − Ŵ)ᵀ||²
    + const for the least-squares W*, so GPTQ of W* on the same Hessian x̃ᵀx̃ minimizes the
    error against y (GPTAQ's asymmetric calibration, as a change of target). A ridge toward W,
    ρ relative to mean diag(x̃ᵀx̃) as GPTQ's damping is, keeps few tokens from overfitting W*:

        W*ᵀ = Wᵀ + (x̃ᵀx̃ + ρ·mean diag·I)⁻¹ · (x̃ᵀy − x̃ᵀx̃·Wᵀ)

    ``hessian``: x̃ᵀx̃ when the caller already has it (GPTQ rounds W* on it), so the token-long
    products are one, x̃ᵀy, not three; float64 keeps the difference exact enough.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"least_squares_target needs x [T, n] and y [T, m], got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    h = (input_hessian(x) if hessian is None else hessian).matrix
    w64 = weight.double()
    rhs = x.double().T @ y.double() - h @ w64.T
    damped = h + ridge * float(torch.diag(h).mean()) * torch.eye(h.shape[0], dtype=h.dtype,
                                                                 device=h.device)
    return (w64 + torch.linalg.solve(damped, rhs).T).to(weight.dtype)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λ·mean diag H · I)⁻¹; λ grows 10x while H is singular."""
    h = h.clone()
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0  # inputs never seen: no correlation to exploit, plain RTN for them
    mean_diag = float(torch.diag(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam = damp
    for _ in range(_MAX_DAMP_RETRIES):
        chol, info = torch.linalg.cholesky_ex(h + lam * mean_diag * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                if lam != damp:
                    log.warning("GPTQ: Hessian needed damping %.3g (asked %.3g)", lam, damp)
                return upper
        lam = max(10.0 * lam, 1e-4)
    raise ValueError(f"GPTQ: the Hessian is not positive definite even with damping {lam:g}")


def _column_params(qp: QParams, index: int) -> QParams:
    """Parameters of group ``index`` of a ``[m, groups, 1]`` fit, shaped ``[m, 1]``."""
    zero = None if qp.zero is None else qp.zero[:, index]
    return QParams(qp.scale[:, index], zero)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian_or_inputs: Hessian | torch.Tensor,
    scheme: QuantScheme | Quantizer,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    damp: float = DEFAULT_DAMP,
    act_order: bool = True,
    static_groups: bool = False,
) -> torch.Tensor:
    """GPTQ-rounded weight ``[m, n]`` (dequantized, in ``weight``'s dtype) under ``scheme``.

    ``hessian_or_inputs`` is a :class:`Hessian` or the calibration inputs ``[..., n]`` in the
    weight's input space. ``damp`` is λ relative to mean diag H. With ``act_order`` (default)
    columns go in decreasing diag H and group parameters come from the original weight
    (compressed-tensors' ``actorder="weight"``: the stored format is unchanged). Without it,
    groups are fitted when reached unless ``static_groups``; that textbook variant can lose to
    RTN when error compensation inflates a later group's range (docs/quantizers.md).
    The weight is not modified.
    """
    if weight.dim() != 2:
        raise ValueError(f"gptq_quantize expects a [out, in] weight, got {tuple(weight.shape)}")
    if not damp >= 0.0:
        raise ValueError(f"damp={damp} must be >= 0")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    quant = scheme if isinstance(scheme, Quantizer) else _weight_quantizer(scheme)
    hess = hessian_or_inputs if isinstance(hessian_or_inputs, Hessian) else input_hessian(
        hessian_or_inputs)
    n = weight.shape[1]
    if hess.matrix.shape[0] != n:
        raise ValueError(f"Hessian is {tuple(hess.matrix.shape)} but the weight has {n} inputs")
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(work).clone()
    g = check_group_size(n, quant.group_size, "GPTQ weight")
    grouped = g < n
    static = grouped and (static_groups or act_order)
    global_amax = quant.global_amax(w)

    h = hess.matrix.to(device=w.device, dtype=torch.float64)
    perm = torch.arange(n, device=w.device)
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        h = h[perm][:, perm]
    upper = _inverse_cholesky(h, damp).to(work)
    if grouped and not static:
        block_size = max(g, block_size // g * g)  # a group never straddles two blocks

    fixed = None
    if not grouped:
        fixed = _column_params(quant.fit(quant.grouped(w), global_amax), 0)
    elif static:
        all_groups = quant.fit(quant.grouped(w), global_amax)
    w = w[:, perm]
    out = torch.zeros_like(w)
    qp = fixed
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static:
                qp = _column_params(all_groups, int(perm[col]) // g)
            elif grouped and col % g == 0:
                qp = _column_params(quant.fit(w1[:, i : i + g].unsqueeze(1), global_amax), 0)
            assert qp is not None
            wcol = w1[:, i : i + 1]
            qcol = quant.quantize_with(wcol, qp)
            out[:, col : col + 1] = qcol
            err = (wcol - qcol) / u1[i, i]
            w1[:, i:] -= err @ u1[i : i + 1, i:]
            err1[:, i : i + 1] = err
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]
    inverse = torch.argsort(perm)
    return out[:, inverse].to(weight.dtype)


@torch.no_grad()
def refit_row_scales(weight_q: torch.Tensor, hessian: Hessian, goal: torch.Tensor) -> torch.Tensor:
    """``weight_q`` [m, n] with each row r times the factor a_r that best fits row r of ``goal``
    on the inputs behind ``hessian``: a_r = q_r·H·g_rᵀ / q_r·H·q_rᵀ, minimizing (a·q_r − g_r)·H·
    (a·q_r − g_r)ᵀ.

    GPTQ keeps the scale the weight's observer chose before rounding, but once error
    compensation has moved the codes the best per-channel scale for them is another: the codes
    stay integers, only the stored per-channel scale moves (the export stores the grid the
    codes lie on). Rows the inputs never reach, or with a factor ≤ 0, keep theirs.
    """
    h = hessian.matrix.to(device=weight_q.device, dtype=torch.float64)
    q64 = weight_q.double()
    hq = q64 @ h
    num = (hq * goal.double()).sum(dim=1)
    den = (hq * q64).sum(dim=1)
    factor = torch.where((den > 0) & (num > 0), num / den.clamp_min(torch.finfo(h.dtype).tiny),
                         torch.ones_like(num))
    return (q64 * factor.unsqueeze(1)).to(weight_q.dtype)


@dataclass(frozen=True)
class GPTQChoice:
    """The selected rounding of one fused weight: ``damp`` None means RTN was kept; ``ridge``
    not None means GPTQ rounded the least-squares fit to the float model's output with that
    ridge (:func:`least_squares_target`), None that it rounded the weight itself; ``refit``
    that its per-channel scales were refitted to the codes (:func:`refit_row_scales`)."""

    weight_q: torch.Tensor
    damp: float | None
    selection_loss: float
    rtn_selection_loss: float
    ridge: float | None = None
    refit: bool = False
