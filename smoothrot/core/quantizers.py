"""Round-to-nearest (RTN) fake quantization with an optional straight-through estimator.

Fake quantization keeps tensors in floating point but snaps them to the grid a real kernel would
use, so accuracy can be measured (and scales trained) without low-bit kernels.

Everything goes through :class:`Quantizer` and :func:`quantize_weight_spec` /
:func:`quantize_activation_spec`: what a :class:`~smoothrot.schema.config.QuantScheme` describes:
integer (symmetric or asymmetric) or FP4 (NVFP4, MXFP4; see fp4.py) elements, one scale per row
or per group of ``g`` consecutive input channels, and optionally a per-group MSE search over clip
ratios. Every consumer (search, trainer, evaluation, surgery, GPTQ) goes through these, so a
scheme means the same thing everywhere. The plain integer case is symmetric RTN with one scale per
row over the last dim (weights ``[out, in]``: per output channel; activations
``[..., tokens, in]``: per token, dynamic), unchanged since W4A4/W8A8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from smoothrot.core import fp4
from smoothrot.schema.quant import ACT_GRIDS, QUANT_FORMATS

if TYPE_CHECKING:
    from smoothrot.schema.quant import QuantScheme

__all__ = [
    "FORMATS",
    "INT_BITS",
    "MSE_CLIP_GRID",
    "QParams",
    "Quantizer",
    "RoundSTE",
    "SymmetricIntSTE",
    "activation_quantizer",
    "check_group_size",
    "integer_product",
    "quantize_activation_spec",
    "quantize_weight_spec",
    "weight_quantizer",
]

# Bit widths an integer Quantizer accepts (a QuantScheme narrows this to 4 and 8).
INT_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)

_HALF_DTYPES = (torch.float16, torch.bfloat16)


class RoundSTE(torch.autograd.Function):
    """Round in the forward pass, pass the gradient through unchanged in the backward pass.

    ``torch.round`` has a zero gradient almost everywhere, which would stop any training of the
    inputs or scales; the straight-through estimator treats rounding as the identity instead.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output


class SymmetricIntSTE(torch.autograd.Function):
    """Symmetric int RTN of grouped ``xg`` [..., g] with straight-through rounding, as one node.

    The forward equals the composed ops of :class:`Quantizer` (scale ``clip·max|x|/steps`` kept
    in the graph, clamps, :class:`RoundSTE`) bit for bit, and so does the gradient up to float32
    rounding, except that at an exact tie for a group's max the scale's gradient goes to one of
    the tied entries (autograd's ``amax`` splits it). The composed ops record ~10 elementwise
    nodes per tensor; training on CPU is bound by that arithmetic, which this halves.
    """

    @staticmethod
    def forward(ctx: Any, xg: torch.Tensor, clip: float | torch.Tensor, steps: float,
                qmax: int, pre_clamp: bool) -> torch.Tensor:
        lo = -qmax - 1
        tiny = torch.finfo(xg.dtype).tiny
        amax, top = _absmax_where(xg)
        raw = clip * amax / steps
        scale = raw.clamp(min=tiny)
        u = xg / scale
        inside = None
        if _clamp_free(clip, steps, qmax):  # neither the clamp nor its mask: every gradient passes
            codes = u.round()
        elif pre_clamp:  # clamp first, then round: the gradient passes where u is in range
            inside = (u >= lo) & (u <= qmax)
            codes = u.clamp(lo, qmax).round_()
        else:  # round, then clamp: it passes where the rounded value is in range
            codes = u.round()
            inside = (codes >= lo) & (codes <= qmax)
            codes.clamp_(lo, qmax)
        ctx.save_for_backward(xg, u, codes, inside, top, raw >= tiny)
        ctx.clip, ctx.steps = clip, steps
        return codes * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xg, u, codes, inside, top, live = ctx.saved_tensors
        # out = codes(u)·scale with u = x/scale: ∂out/∂x = 1 where the clamp passes, and
        # ∂out/∂scale = codes − u (where it passes); the scale is clip·max|x|/steps.
        grad_x = grad.clone() if inside is None else torch.where(inside, grad, 0.0)
        grad_scale = (grad * codes).sum(dim=-1, keepdim=True) - (grad_x * u).sum(dim=-1,
                                                                                 keepdim=True)
        grad_amax = torch.where(live, grad_scale, 0.0) * ctx.clip / ctx.steps
        grad_x.scatter_add_(-1, top, torch.sign(xg.gather(-1, top)) * grad_amax)
        return grad_x, None, None, None, None


FORMATS: tuple[str, ...] = QUANT_FORMATS


def _clamp_free(clip: float | torch.Tensor, steps: float, qmax: int) -> bool:
    """Whether symmetric RTN at scale clip·max|x|/steps keeps every code in range: a fixed clip
    ≥ steps/qmax gives |x|/scale ≤ steps/clip ≤ qmax (vLLM's max|x|/qmax grid at clip 1), so the
    clamp to the codes' range would change nothing."""
    return not isinstance(clip, torch.Tensor) and steps <= clip * qmax


def _absmax(xg: torch.Tensor) -> torch.Tensor:
    """max |x| over the last dim (kept), as max(max x, −min x): two reductions, no |x| copy
    (faster than ``abs().amax`` on the CPU; equal values)."""
    return torch.maximum(xg.amax(dim=-1, keepdim=True), xg.amin(dim=-1, keepdim=True).neg())


def _absmax_where(xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """max |x| over the last dim (kept) and an index where it is, without a |x| copy."""
    hi, hi_at = xg.max(dim=-1, keepdim=True)
    lo, lo_at = xg.min(dim=-1, keepdim=True)
    positive = hi >= -lo
    return torch.where(positive, hi, -lo), torch.where(positive, hi_at, lo_at)

# Clip ratios tried by the MSE search, largest first (ties keep the larger range). 1.0 is in the
# grid, so the search can never be worse than plain RTN on the tensor it searches.
MSE_CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))


def check_group_size(in_features: int, group_size: int | None, what: str = "tensor") -> int:
    """The group size actually used (``in_features`` for per-row), or a one-line ValueError."""
    if group_size is None:
        return in_features
    if in_features % group_size:
        raise ValueError(
            f"{what}: group size {group_size} does not divide the input size {in_features}; "
            f"choose a group size that divides {in_features} or use per-channel (group None)"
        )
    return group_size


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of a grouped tensor ``[..., groups, g]``.

    ``scale`` is the dequantization multiplier ``[..., groups, 1]`` (for NVFP4 already
    ``e4m3 block scale / global scale``); ``zero`` the integer zero point (asymmetric int only).
    """

    scale: torch.Tensor
    zero: torch.Tensor | None = None


@dataclass(frozen=True)
class Quantizer:
    """One tensor's RTN quantizer; the behaviour behind a scheme's ``w_*`` or ``a_*`` fields.

    ``params`` and ``quantize_with`` are separate so GPTQ can fit parameters on a group once and
    then quantize one column at a time with identical arithmetic.
    """

    fmt: str = "int"
    bits: int = 4
    group_size: int | None = None
    symmetric: bool = True
    clip: float = 1.0
    mse_clip: bool = False
    grid: str = "max"  # symmetric int only; schema/quant.py ACT_GRIDS

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"format {self.fmt!r} is not supported; allowed: {FORMATS}")
        if self.fmt == "int":
            if isinstance(self.bits, bool) or self.bits not in INT_BITS:
                raise ValueError(f"bits={self.bits!r} is not supported; "
                                 f"allowed: {INT_BITS[0]}..{INT_BITS[-1]}")
        elif self.bits != 4 or not self.symmetric or self.group_size is None:
            raise ValueError(f"{self.fmt} is 4-bit, symmetric and block-scaled (group size set)")
        if not 0.0 < self.clip <= 1.0:
            raise ValueError(f"clip_ratio={self.clip!r} is out of range; allowed: (0, 1]")
        if self.grid not in ACT_GRIDS:
            raise ValueError(f"grid={self.grid!r} is not one of {ACT_GRIDS}")

    # -- grouping ---------------------------------------------------------------------------
    def grouped(self, x: torch.Tensor, what: str = "tensor") -> torch.Tensor:
        """View ``[..., n]`` as ``[..., n/g, g]`` (per-row: ``[..., 1, n]``)."""
        if x.dim() == 0:
            raise ValueError("fake quantization expects at least 1 dim (rows over the last dim)")
        g = check_group_size(x.shape[-1], self.group_size, what)
        return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)

    def global_amax(self, x: torch.Tensor, batch_dims: int = 0) -> torch.Tensor | None:
        """The per-tensor abs-max NVFP4's FP32 global scale is derived from (else None).

        With ``batch_dims`` leading dims, one abs-max per batch entry, shaped to broadcast
        against the grouped tensor ``[*batch, ..., groups, g]``.
        """
        if self.fmt != "nvfp4":
            return None
        if batch_dims == 0:
            return x.abs().amax()
        amax = x.abs().flatten(batch_dims).amax(dim=-1)
        return amax.reshape(*amax.shape, *([1] * (x.dim() - batch_dims + 1)))

    # -- parameters -------------------------------------------------------------------------
    def params(
        self,
        xg: torch.Tensor,
        clip: float | torch.Tensor | None = None,
        global_amax: torch.Tensor | None = None,
        ste: bool = False,
    ) -> QParams:
        """Scales (and zero points) of grouped ``xg`` with clip ratio ``clip`` (per group ok)."""
        clip = self.clip if clip is None else clip
        if self.fmt == "int" and self.symmetric:
            amax = _absmax(xg)
            return QParams((clip * amax / self._steps).clamp(min=torch.finfo(xg.dtype).tiny))
        if self.fmt == "int":
            levels = 2**self.bits - 1
            hi = xg.amax(dim=-1, keepdim=True).clamp(min=0) * clip
            lo = xg.amin(dim=-1, keepdim=True).clamp(max=0) * clip
            scale = ((hi - lo) / levels).clamp(min=torch.finfo(xg.dtype).tiny)
            return QParams(scale, torch.round((-lo / scale).detach()))
        amax = xg.abs().amax(dim=-1, keepdim=True) * clip
        if self.fmt == "mxfp4":
            return QParams(fp4.mxfp4_scale(amax.detach()))
        if global_amax is None:
            global_amax = xg.abs().amax()
        return QParams(fp4.nvfp4_scale(amax, fp4.nvfp4_global_scale(global_amax), ste=ste))

    @property
    def _steps(self) -> float:
        """Symmetric int: max|x| maps to this many steps. "max": the original W4A4/W8A8
        arithmetic (pinned by tests/unit/test_fake_quant.py); "compressed-tensors": half a step
        wider, the grid then clamped to [-2^(b-1), 2^(b-1) - 1]."""
        return self._qmax if self.grid == "max" else (2**self.bits - 1) / 2

    @property
    def _qmax(self) -> int:
        """Symmetric int: the largest code (the smallest is ``-qmax - 1``)."""
        return 2 ** (self.bits - 1) - 1

    def _symmetric_codes(self, x: torch.Tensor, qp: QParams, ste: bool) -> torch.Tensor:
        """The integer levels (as floats) symmetric int RTN maps ``x`` to."""
        qmax = self._qmax
        scaled = x / qp.scale
        if not (ste or scaled.requires_grad):  # nothing to differentiate: in place, no copies
            # Rounding a value clamped to integer bounds stays inside them: one clamp suffices.
            return scaled.clamp_(-qmax - 1, qmax).round_()
        if self.grid != "max":  # clamp first, then round half to even
            scaled = torch.clamp(scaled, -qmax - 1, qmax)
        q = RoundSTE.apply(scaled) if ste else torch.round(scaled)
        return torch.clamp(q, -qmax - 1, qmax)

    def quantize_with(self, x: torch.Tensor, qp: QParams, ste: bool = False) -> torch.Tensor:
        """Dequantized RTN of ``x`` with given parameters (broadcast against ``x``)."""
        if self.fmt != "int":
            return fp4.round_e2m1(x / qp.scale, ste=ste) * qp.scale
        if self.symmetric:
            codes = self._symmetric_codes(x, qp, ste)
            if ste or codes.requires_grad:
                return codes * qp.scale
            return codes.mul_(qp.scale)  # a fresh tensor of this call's: no second copy
        assert qp.zero is not None
        scaled = x / qp.scale
        q = RoundSTE.apply(scaled) if ste else torch.round(scaled)
        return (torch.clamp(q + qp.zero, 0, 2**self.bits - 1) - qp.zero) * qp.scale

    @property
    def per_row_int8(self) -> bool:
        """Whether RTN is an int8-representable code times one scale per row (what
        :func:`integer_product` needs): symmetric int, at most 8 bits, no groups."""
        return self.fmt == "int" and self.symmetric and self.group_size is None

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RTN of ``x`` [..., n] as int8 codes and per-row scales [..., 1] (float32), equal to
        ``self(x)`` = codes · scales; only for :attr:`per_row_int8` quantizers."""
        if not self.per_row_int8:
            raise ValueError(f"{self} has no per-row int8 codes")
        xg = x.float()[..., None, :]
        qp = self.fit(xg)
        if self._codes_in_range:  # the clamp would change nothing: one pass less
            codes = (xg / qp.scale).round_()
        else:
            codes = self._symmetric_codes(xg, qp, ste=False)
        return codes[..., 0, :].to(torch.int8), qp.scale[..., 0, :]

    @property
    def _codes_in_range(self) -> bool:
        """Whether RTN at the fitted scale never reaches the clamp (:func:`_clamp_free` at the
        fixed clip; the MSE clip picks ratios below 1)."""
        return not self.mse_clip and _clamp_free(self.clip, self._steps, self._qmax)

    @property
    def scale_is_free(self) -> bool:
        """Whether every positive scale is a grid this format stores (symmetric int): a
        rounding's grid can then be read back from its values (:meth:`grid_of`), so its scale may
        move after rounding. FP4's block scales are e4m3 or powers of two; asymmetric int's grid
        is refitted from min / max at export."""
        return self.fmt == "int" and self.symmetric

    @torch.no_grad()
    def grid_of(self, xg: torch.Tensor) -> QParams | None:
        """Symmetric int: parameters of a grid grouped ``xg`` already lies on, per group the
        finest step max|x|/k (k ≤ 2^(b-1)) putting every value on an integer code within the
        codes' range; None if some group lies on none (or another format).

        An offline rounding's grid need not be the one :meth:`fit` gives the float weight it is
        stored with (GPTQ of a least-squares target fits the target's grid; activation-tuned
        scales move the fused weight after rounding); the codes fix it up to float rounding.
        """
        if not self.scale_is_free:
            return None
        qmax = self._qmax
        amax = _absmax(xg)
        scale = torch.zeros_like(amax)
        for k in range(1, qmax + 2):  # ascending: the largest valid k (finest step) wins
            step = amax / k
            codes = xg / step
            level = codes.round()
            ok = (((codes - level).abs() <= 1e-3) & (level >= -qmax - 1) & (level <= qmax)
                  ).all(dim=-1, keepdim=True)
            scale = torch.where(ok, step, scale)
        zero = amax == 0
        if not bool(((scale > 0) | zero).all()):
            return None
        return QParams(torch.where(zero, torch.finfo(xg.dtype).tiny, scale))

    def fit(
        self, xg: torch.Tensor, global_amax: torch.Tensor | None = None, ste: bool = False
    ) -> QParams:
        """Parameters for grouped ``xg``: the fixed clip, or per group the MSE-best grid ratio."""
        if not self.mse_clip:
            return self.params(xg, global_amax=global_amax, ste=ste)
        return self.params(xg, self._best_clip(xg, global_amax), global_amax, ste=ste)

    @torch.no_grad()
    def _best_clip(self, xg: torch.Tensor, global_amax: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """Per group, the ratio of :data:`MSE_CLIP_GRID` with the least error on ``xg``."""
        xd = xg.detach()
        best_err = torch.full((*xd.shape[:-1], 1), float("inf"), dtype=xd.dtype,
                              device=xd.device)
        best_clip = torch.ones_like(best_err)
        for ratio in MSE_CLIP_GRID:
            q = self.quantize_with(xd, self.params(xd, ratio, global_amax))
            err = (q - xd).pow(2).sum(dim=-1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_clip = torch.where(better, ratio, best_clip)
        return best_clip

    # -- whole tensors ----------------------------------------------------------------------
    def __call__(
        self, x: torch.Tensor, ste: bool = False, what: str = "tensor", batch_dims: int = 0
    ) -> torch.Tensor:
        """Fake-quantize ``x`` over its last dim; the result has ``x``'s shape and dtype.

        ``batch_dims`` leading dims index independent tensors (e.g. search candidates): only
        NVFP4's per-tensor global scale looks beyond a row, and it is taken per batch entry.
        Half-precision inputs are computed in float32 (so fp16/bf16 arithmetic does not distort
        scales or rounding) and cast back once. All-zero rows stay zero (integer scales are
        clamped to the smallest positive normal float instead of 0). With ``ste`` rounding is
        :class:`RoundSTE` and the scale stays in the graph, so the gradient flows through
        ``x/scale`` and through the max-based scale; values the clamp clips get none through it.
        """
        if not x.is_floating_point():
            raise TypeError(f"fake quantization expects a floating-point tensor, got {x.dtype}")
        xf = x.to(torch.float32) if x.dtype in _HALF_DTYPES else x
        xg = self.grouped(xf, what)
        if ste and self.fmt == "int" and self.symmetric and torch.is_grad_enabled():
            clip = self._best_clip(xg) if self.mse_clip else self.clip
            out = SymmetricIntSTE.apply(xg, clip, self._steps, self._qmax, self.grid != "max")
            return out.reshape(x.shape).to(x.dtype)
        qp = self.fit(xg, self.global_amax(xf, batch_dims), ste=ste)
        return self.quantize_with(xg, qp, ste=ste).reshape(x.shape).to(x.dtype)


# Largest reduction length whose int8·int8 sums cannot overflow int32 (128² per product).
_INT32_SAFE_N = 2**31 // 2**14


def integer_applies(x: torch.Tensor, x_quantizer: Quantizer, w_quantizer: Quantizer) -> bool:
    """Whether :func:`integer_product` computes Q(x)·Q(w)ᵀ of such an ``x``: both sides
    :attr:`~Quantizer.per_row_int8`, float32 on the CPU (where the int8 GEMM is ~5–10× faster
    than float32), and a reduction short enough for int32 sums."""
    return (x_quantizer.per_row_int8 and w_quantizer.per_row_int8 and x.device.type == "cpu"
            and x.dtype == torch.float32 and x.shape[-1] <= _INT32_SAFE_N)


def integer_product(
    x: torch.Tensor, w: torch.Tensor, x_quantizer: Quantizer, w_quantizer: Quantizer
) -> torch.Tensor | None:
    """Q(x)·Q(w)ᵀ for ``x`` [..., T, n] and ``w`` [..., m, n] from an int8 GEMM with int32
    accumulation, or None where that does not apply (:func:`integer_applies`; half-precision
    inputs take the float path).

    Exact where the float32 product of the dequantized tensors rounds (sums of up to n products
    of codes): results agree with ``Q(x) @ Q(w).T`` to float32 rounding, not bit for bit.
    """
    if not (integer_applies(x, x_quantizer, w_quantizer) and w.dtype == torch.float32
            and x.dim() == w.dim()):
        return None
    return codes_product(*x_quantizer.codes(x), *w_quantizer.codes(w))


def codes_product(
    cx: torch.Tensor, sx: torch.Tensor, cw: torch.Tensor, sw: torch.Tensor
) -> torch.Tensor:
    """(cx·sx)·(cw·sw)ᵀ for int8 codes ``cx`` [..., T, n], ``cw`` [..., m, n] and their per-row
    float32 scales [..., T, 1], [..., m, 1]: the integer sums of one int8 GEMM (int32), then the
    scales, as an integer backend's epilogue applies them."""
    if cx.shape[:-2].numel() == 1:  # one product (the common case): no stacking copy
        acc = torch._int_mm(cx.reshape(cx.shape[-2:]), cw.reshape(cw.shape[-2:]).T)
    else:  # batched candidates [*batch, T, n] x [*batch, m, n]: one GEMM each
        acc = torch.stack([torch._int_mm(a, b.T)
                           for a, b in zip(cx.flatten(0, -3), cw.flatten(0, -3), strict=True)])
    acc = acc.reshape(*cx.shape[:-1], cw.shape[-2])
    # int32 · float32 promotes to float32: the sums are converted and scaled in one pass.
    return torch.mul(acc, sx).mul_(sw.transpose(-1, -2))


def weight_quantizer(scheme: QuantScheme) -> Quantizer:
    """The weight side of a scheme (groups along the input dim of ``[out, in]``)."""
    return Quantizer(scheme.w_format, scheme.w_bits, scheme.w_group_size, scheme.w_symmetric,
                     scheme.w_clip, scheme.w_mse_clip)


def activation_quantizer(scheme: QuantScheme) -> Quantizer:
    """The activation side of a scheme: dynamic, per token (or per group within a token)."""
    return Quantizer(scheme.a_format, scheme.a_bits, scheme.a_group_size, True, scheme.a_clip,
                     grid=scheme.a_grid)


def quantize_weight_spec(
    w: torch.Tensor, scheme: QuantScheme, ste: bool = False, batch_dims: int = 0
) -> torch.Tensor:
    """Fake-quantize a Linear weight ``[*batch, out, in]`` as ``scheme`` says (RTN, MSE clip).

    With the MSE search, clip ratios are chosen without gradient and then held fixed, so under
    ``ste`` the gradient is that of RTN at the chosen ratio.
    """
    return weight_quantizer(scheme)(w, ste=ste, what=f"scheme {scheme.name!r} weight",
                                    batch_dims=batch_dims)


def quantize_activation_spec(
    x: torch.Tensor, scheme: QuantScheme, ste: bool = False, batch_dims: int = 0
) -> torch.Tensor:
    """Fake-quantize activations ``[*batch, ..., tokens, in]`` dynamically as ``scheme`` says.

    NVFP4's global scale is the abs-max of the whole tensor passed in, per batch entry
    (deployments calibrate it statically per tensor; it only decides where E4M3 block scales
    underflow).
    """
    return activation_quantizer(scheme)(x, ste=ste, what=f"scheme {scheme.name!r} activation",
                                        batch_dims=batch_dims)
