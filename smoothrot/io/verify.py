"""Checking an export: reload it and compare it with the model it was written from.

An export is only useful if it computes what the report measured, so every format has a check
with a stated limit (docs/equivalence.md): the float logits for ``fused``, the perplexity of the
in-memory fake-quant model for the quantized formats.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoothrot.arch.sites import resolve_sites, with_dense_rotations
from smoothrot.evaluate import perplexity
from smoothrot.io.loader import load_pretrained, plans_from_export, read_declaration
from smoothrot.io.runtime import load_without_smoothrot
from smoothrot.models import resolve_dtype
from smoothrot.schema.export import ExportError
from smoothrot.schema.target import TARGETS
from smoothrot.surgery.hooks import transformed
from smoothrot.surgery.plan import SitePlan
from smoothrot.surgery.residual import rotate_residual

__all__ = ["LOGIT_TOLERANCE", "PPL_TOLERANCE", "verify_export"]

log = logging.getLogger(__name__)

# Relative Frobenius error of the logits (fused) and relative perplexity difference to the
# in-memory fake-quant model (quantized), see docs/equivalence.md.
LOGIT_TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}
PPL_TOLERANCE = 0.005


def as_loaded(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy in ``dtype`` as from_pretrained would give it: parameters cast, buffers (RoPE
    frequencies) kept, where ``.to(dtype)`` would round them too."""
    out = copy.deepcopy(model).to(dtype)
    for (_, src), (_, dst) in zip(model.named_buffers(), out.named_buffers(), strict=True):
        dst.data = src.data.clone()
    return out


@torch.no_grad()
def _logit_error(reference: nn.Module, reloaded: nn.Module, windows: torch.Tensor,
                 batch_size: int) -> float:
    """Relative Frobenius error of the reloaded model's logits over ``windows``."""
    device = next(reference.parameters()).device
    num = den = 0.0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size].to(device)
        ref = reference(input_ids=ids, use_cache=False).logits.double()
        out = reloaded(input_ids=ids, use_cache=False).logits.double()
        num += float((out - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return (num / den) ** 0.5


@torch.no_grad()
def verify_export(
    path: str | Path,
    model: nn.Module,
    windows: torch.Tensor,
    *,
    activation_quantizer: str = "smoothrot",
    runtime: str = "smoothrot",
    batch_size: int = 4,
    plans: Mapping[str, SitePlan] | None = None,
) -> dict[str, Any]:
    """Reload an export and compare it with the original ``model`` on token ``windows``.

    fused: relative Frobenius error of the logits against the untransformed model (limit by
    dtype: 1e-10 float64, 1e-4 float32). Quantized formats: perplexity against the in-memory
    fake-quant model built from the same plans (limit 0.5 % relative). ``plans`` default to the
    export's stored scales; a GPTQ export needs the plans with their ``weight_q``.

    ``runtime`` (io/runtime.py): ``smoothrot`` reloads with :func:`load_pretrained`;
    ``compressed-tensors`` with transformers + compressed-tensors only (its forward, its
    transforms with the stored weights), compared with the in-memory model computed with
    compressed-tensors' arithmetic; ``transformers`` with a plain ``from_pretrained``, which
    fails whenever a rotation must run online. Returns the numbers and ``passed``.
    """
    decl = read_declaration(path)
    if decl.gptq and plans is None:
        raise ExportError(f"{path} holds GPTQ-rounded weights; pass the plans with their weight_q "
                          "to compare it with the in-memory model")
    device = str(next(model.parameters()).device)
    if runtime == "smoothrot":
        reloaded = load_pretrained(path, activation_quantizer=activation_quantizer,
                                   device=device)
    else:
        reloaded = load_without_smoothrot(path, runtime=runtime, device=device)
        activation_quantizer = "compressed-tensors"
    target = resolve_dtype(decl.dtype)
    same = next(model.parameters()).dtype == target
    reference = model if same else as_loaded(model, target)
    scheme = decl.quant_scheme()
    if scheme is not None and activation_quantizer == "compressed-tensors":
        scheme = TARGETS["compressed-tensors"].scheme(scheme)  # the grid that runtime computes
    if scheme is None:
        rel = _logit_error(reference, reloaded, windows, batch_size)
        limit = LOGIT_TOLERANCE[decl.dtype]
        result = {"format": decl.format, "dtype": decl.dtype, "runtime": runtime,
                  "logit_rel_error": rel, "limit": limit, "passed": rel <= limit}
    else:
        plans = plans_from_export(path) if plans is None else plans
        if activation_quantizer == "compressed-tensors":  # it has no clips
            plans = {k: replace(p, act_clip=None) for k, p in plans.items()}
        r1 = decl.residual_rotation
        if r1 is not None:  # the plans were fitted on the rotated model (R1 is exact in float)
            reference = copy.deepcopy(reference)
            rotate_residual(reference, seed=r1.seed, kind=r1.kind)
        sites = with_dense_rotations(
            [rs for rs in resolve_sites(reference, list(plans), residual_rotated=r1 is not None)
             if rs.name in plans], activation_quantizer == "compressed-tensors")
        with transformed(sites, plans, scheme):
            ppl_memory = perplexity(reference, windows, batch_size, desc="in-memory ppl")
        ppl_reload = perplexity(reloaded, windows, batch_size, desc="reloaded ppl")
        rel = abs(ppl_reload - ppl_memory) / ppl_memory
        result = {"format": decl.format, "dtype": decl.dtype, "runtime": runtime,
                  "activation_quantizer": activation_quantizer, "ppl_in_memory": ppl_memory,
                  "ppl_reloaded": ppl_reload, "ppl_rel_diff": rel, "limit": PPL_TOLERANCE,
                  "passed": rel <= PPL_TOLERANCE}
        if activation_quantizer != "smoothrot" and scheme.a_format != "int":
            # NVFP4's static calibrated input scale is not the in-memory dynamic one.
            result.update(limit=None, passed=math.isfinite(ppl_reload), note=(
                "compressed-tensors quantizes FP4 activations with the static calibrated global "
                "scale; the 0.5 % limit applies to int formats and the smoothrot runtime"))
    if runtime == "transformers" and any(s.rotation.is_online() for s in decl.sites.values()):
        result.update(passed=False, note=(
            "plain transformers ignores transform_config, so this export's online rotations did "
            "not run: it computes another function. Load it with smoothrot.load_pretrained, "
            "vLLM, or compressed-tensors' apply_transform_config (runtime compressed-tensors)"))
    log.info("verify %s: %s", path, result)
    return result
