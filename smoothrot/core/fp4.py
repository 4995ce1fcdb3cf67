"""FP4 (E2M1) block formats as deployed on Blackwell-class kernels: NVFP4 and MXFP4.

Both store 4-bit E2M1 elements, whose magnitudes are {0, 0.5, 1, 1.5, 2, 3, 4, 6}, and one scale
per block of consecutive values along the last (input) dim:

* NVFP4: blocks of 16; the block scale is an FP8 E4M3 number, multiplied by one FP32 global
  scale per tensor. The global scale maps the tensor's abs-max onto E4M3-max · E2M1-max
  (448 · 6), so block scales use the whole E4M3 range (llm-compressor / compressed-tensors:
  ``global = 448·6 / amax``; ``block = e4m3(global · amax_block / 6)``; dequant scale
  ``block / global``).
* MXFP4 (OCP microscaling): blocks of 32; the scale is a power of two (E8M0). As in
  compressed-tensors, the block abs-max is rounded to a power of two (up when its mantissa is at
  least 1.75) and divided by 2² (E2M1's largest power of two), so the largest element lands in
  [3.5, 7) and anything above 6 saturates.

Everything is emulated in float32: the returned tensors hold exactly the values a kernel would
see. Rounding may go through a straight-through estimator (``ste=True``) so scales can be trained
through it. Grouping and scale selection policy (clip ratios, MSE search) live in fake_quant.py.
"""

from __future__ import annotations

import torch

__all__ = [
    "E2M1_MAX",
    "E2M1_VALUES",
    "E4M3_MAX",
    "mxfp4_scale",
    "nvfp4_global_scale",
    "nvfp4_scale",
    "round_e2m1",
    "round_e4m3",
]

E2M1_MAX = 6.0
E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E4M3_MAX = 448.0
_E4M3_EPS = 0.125  # torch.finfo(float8_e4m3fn).eps
_MX_ELEMENT_EMAX = 2  # floor(log2(E2M1_MAX)): the largest power of two E2M1 holds
_E8M0_EXP_RANGE = (-127, 127)


def _ste(x: torch.Tensor, rounded: torch.Tensor, ste: bool) -> torch.Tensor:
    """``rounded`` in the forward pass; with ``ste`` the identity's gradient in the backward."""
    return x + (rounded - x).detach() if ste else rounded


def round_e2m1(x: torch.Tensor, ste: bool = False) -> torch.Tensor:
    """Nearest E2M1 value (ties to the even code, saturating at ±6), e.g. 0.75 → 1, 5 → 4.

    The step is 0.5 below 2, 1 in [2, 4) and 2 above, so rounding |x|/step to an integer picks
    the nearest value; ``torch.round`` breaks ties to even, which is the even E2M1 code here too.
    Values beyond ±6 get zero gradient under ``ste`` (saturated, like the integer clamp).
    """
    clipped = x.clamp(-E2M1_MAX, E2M1_MAX)
    with torch.no_grad():
        mag = clipped.abs()
        step = torch.where(mag < 2.0, 0.5, torch.where(mag < 4.0, 1.0, 2.0)).to(x.dtype)
        rounded = torch.sign(clipped) * (torch.round(mag / step) * step).clamp(max=E2M1_MAX)
    return _ste(clipped, rounded, ste)


def round_e4m3(x: torch.Tensor, ste: bool = False) -> torch.Tensor:
    """Nearest FP8 E4M3 (``float8_e4m3fn``) value, saturating at ±448 instead of giving NaN."""
    clipped = x.clamp(-E4M3_MAX, E4M3_MAX)
    with torch.no_grad():
        rounded = clipped.float().to(torch.float8_e4m3fn).to(x.dtype)
    return _ste(clipped, rounded, ste)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """FP32 global scale ``448·6 / amax`` (1 for an all-zero tensor, as compressed-tensors)."""
    amax = amax.float().clamp(min=torch.finfo(torch.float32).tiny)
    scale = (E4M3_MAX * E2M1_MAX) / amax
    return torch.where(torch.isfinite(scale), scale, torch.ones_like(scale))


def nvfp4_scale(
    block_amax: torch.Tensor, global_scale: torch.Tensor, ste: bool = False
) -> torch.Tensor:
    """Dequantization scale of NVFP4 blocks: ``e4m3(global · amax/6) / global``.

    A block whose E4M3 scale underflows to 0 dequantizes to 0 on hardware; as in
    compressed-tensors the zero is replaced by E4M3's epsilon (0.125), a step so large against
    such a block (|x|·global < 6·2⁻¹⁰) that all its values round to 0, without dividing by 0.
    """
    stored = round_e4m3(global_scale * (block_amax / E2M1_MAX), ste=ste)
    stored = torch.where(stored == 0, _E4M3_EPS, stored)
    return stored / global_scale


@torch.no_grad()
def mxfp4_scale(block_amax: torch.Tensor) -> torch.Tensor:
    """Power-of-two (E8M0) dequantization scale of MXFP4 blocks.

    ``frexp`` gives amax = m·2^e with m in [0.5, 1); the block max rounds up to 2^e when
    m ≥ 0.875 (mantissa ≥ 1.75, compressed-tensors' rule), else down to 2^(e−1), and the scale
    is that power of two over 2² so the block max lands at 3.5 ≤ amax/scale < 7.
    """
    mant, exp = torch.frexp(block_amax.float())
    exp = exp - 1 + (mant >= 0.875).to(exp.dtype) - _MX_ELEMENT_EMAX
    exp = exp.clamp(*_E8M0_EXP_RANGE)
    return torch.ldexp(torch.ones_like(block_amax, dtype=torch.float32), exp).to(block_amax.dtype)
