"""What a method decides for one site: :class:`SitePlan` (scales, rotation, offline weights, clip).

Methods produce plans (smoothrot/methods/), the surgery applies them (fuse.py, hooks.py) and the
export writes them (smoothrot/io/); nothing else describes a site's transform.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smoothrot.schema.rotation import Rotation


@dataclass(frozen=True)
class SitePlan:
    """How to transform one site.

    ``scales``: smoothing scales (None = no smoothing). ``rotation``: the rotation applied (the
    site's own, ``ResolvedSite.rotation``, or ``Rotation.none()`` for RTN). ``weight_q``, if
    given, is the fused weight W·diag(s)·R already quantized offline (e.g. by GPTQ); it is stored
    instead of the scheme's round-to-nearest of the fused weight. For a group it is the
    concatenation of the linears' weights along the output dim (``rs.weight``). ``act_clip``, if
    given, replaces the scheme's activation clip ratio ``a_clip`` at this site's inputs.
    """

    scales: torch.Tensor | None
    rotation: Rotation
    weight_q: torch.Tensor | None = None
    act_clip: float | None = None
