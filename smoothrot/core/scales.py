"""The equivalence-preserving parameterization of trainable smoothing scales.

The transform X·diag(s)⁻¹·H · (W·diag(s)·H)ᵀ = X·Wᵀ holds for every positive finite s, so the
parameterization only has to guarantee that, plus what deployment needs:

* positive and finite: s = exp(log s);
* bounded: log s = c + B·tanh(v / B) stays within c ± B, so fused weights cannot overflow fp16;
* normalized: v = φ − mean(φ) + m₀ removes the direction φ + const, along which the quantized
  loss is invariant for scale-equivariant quantizers (int grids, NVFP4), so Adam cannot drift
  along it. MXFP4 is not equivariant (power-of-two block scales): the trained method searches
  that factor after training instead (methods/trained.py, docs/equivalence.md section 4).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LogScales(nn.Module):
    """Trainable log-scales initialised exactly at ``init`` (a positive vector)."""

    def __init__(self, init: torch.Tensor, bound: float) -> None:
        super().__init__()
        init = init.detach().double()
        if not torch.isfinite(init).all() or (init <= 0).any():
            raise ValueError("initial scales must be positive and finite")
        log_init = init.log()
        center = float(log_init.mean())
        spread = float((log_init - center).abs().max())
        # The bound must leave room around the initial point or atanh saturates.
        self.bound = max(bound, spread + math.log(10.0))
        v0 = self.bound * torch.atanh((log_init - center) / self.bound)
        self.register_buffer("center", torch.tensor(center, dtype=torch.float64), persistent=True)
        self.register_buffer("offset", v0.mean(), persistent=True)
        self.phi = nn.Parameter(v0.float())

    def log_scales(self) -> torch.Tensor:
        v = self.phi - self.phi.mean() + self.offset.to(self.phi.dtype)
        return self.center.to(self.phi.dtype) + self.bound * torch.tanh(v / self.bound)

    def forward(self) -> torch.Tensor:
        """Current scales s (float32, positive, bounded)."""
        return torch.exp(self.log_scales())

    def scales(self) -> torch.Tensor:
        """Current scales in float64, detached, for export and evaluation."""
        with torch.no_grad():
            v = self.phi.double() - self.phi.double().mean() + self.offset
            return torch.exp(self.center + self.bound * torch.tanh(v / self.bound))
