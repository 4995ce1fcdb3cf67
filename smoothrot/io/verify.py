"""Checking an export: its stored bytes, then a reload compared with the model it was written
from.

An export is only useful if it computes what the report measured. First every stored tensor and
config.json entry must hash to the digest the writer recorded (io/metadata.py): the reference
below is rebuilt from the export's own declaration and scales, so an edit to those would
otherwise change both sides alike. Then every format has a check with a stated limit
(docs/equivalence.md): the float logits for ``fused`` (float64: with norms in float64), and for
the quantized formats the logits of the in-memory fake-quant model, which a clean reload
reproduces bit for bit.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from smoothrot.arch.sites import resolve_sites, with_dense_rotations
from smoothrot.evaluate import perplexity
from smoothrot.io.loader import load_pretrained, plans_from_export, read_declaration
from smoothrot.io.metadata import DIGESTS_KEY, content_mismatch, read_metadata
from smoothrot.io.runtime import load_without_smoothrot
from smoothrot.models import resolve_dtype
from smoothrot.schema.export import ExportError
from smoothrot.schema.target import TARGETS
from smoothrot.surgery.head_rotation import HEAD_ROTATIONS_FILE, apply_head_rotations
from smoothrot.surgery.hooks import exact_norms, transformed
from smoothrot.surgery.plan import SitePlan
from smoothrot.surgery.residual import rotate_residual

__all__ = ["LOGIT_TOLERANCE", "verify_export"]

log = logging.getLogger(__name__)

# Relative Frobenius error of the fused logits (float64: with exact_norms), see
# docs/equivalence.md. Quantized reloads must equal the in-memory fake-quant model exactly.
LOGIT_TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}


def as_loaded(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy in ``dtype`` as from_pretrained would give it: parameters cast, buffers (RoPE
    frequencies) kept, where ``.to(dtype)`` would round them too."""
    out = copy.deepcopy(model).to(dtype)
    for (_, src), (_, dst) in zip(model.named_buffers(), out.named_buffers(), strict=True):
        dst.data = src.data.clone()
    return out


@torch.no_grad()
def _compare_logits(reference: nn.Module, reloaded: nn.Module, windows: torch.Tensor,
                    batch_size: int) -> tuple[float, float]:
    """Relative Frobenius error and largest absolute difference of the reloaded model's logits
    over ``windows`` (NaN if any logit differs by NaN: torch.maximum keeps it)."""
    device = next(reference.parameters()).device
    num = den = 0.0
    worst = torch.zeros((), dtype=torch.float64)
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size].to(device)
        ref = reference(input_ids=ids, use_cache=False).logits.double()
        out = reloaded(input_ids=ids, use_cache=False).logits.double()
        num += float((out - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
        worst = torch.maximum(worst, (out - ref).abs().max().cpu())
    return (num / den) ** 0.5, float(worst)


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
    """Check an export's stored bytes, reload it and compare it with the original ``model`` on
    token ``windows``.

    First the digests in smoothrot.json: the first tensor or config.json entry that changed
    since the export was written fails the check (``content``). fused: relative Frobenius error
    of the logits against the untransformed model (limit by dtype: 1e-10 float64, computed with
    float64 norms, 1e-4 float32). Quantized formats: the logits must equal those of the in-memory
    fake-quant model built from the same plans (``max_abs_logit_diff`` 0; the perplexities are
    reported too). ``plans`` default to the export's stored scales; a GPTQ export needs the plans
    with their ``weight_q``, and its limit is the fused one of its dtype (its stored scales are
    refitted on the fused weight, within an ulp of GPTQ's).

    ``runtime`` (io/runtime.py): ``smoothrot`` reloads with :func:`load_pretrained`;
    ``compressed-tensors`` with transformers + compressed-tensors only (its forward, its
    transforms with the stored weights), compared with the in-memory model computed with
    compressed-tensors' arithmetic; ``transformers`` with a plain ``from_pretrained``, which
    fails whenever a rotation must run online. Returns the numbers and ``passed``.
    """
    path = Path(path)
    mismatch = content_mismatch(path, read_metadata(path).get(DIGESTS_KEY))
    if mismatch is not None:
        log.warning("verify %s: %s", path, mismatch)
        return {"path": str(path), "runtime": runtime, "content": mismatch, "passed": False,
                "note": "the export was changed after it was written; export it again"}
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
        with ExitStack() as stack:
            if decl.dtype == "float64":  # HF norms compute in float32 even in float64
                for m in (reference, reloaded):
                    stack.enter_context(exact_norms(m))
            rel, _ = _compare_logits(reference, reloaded, windows, batch_size)
        limit = LOGIT_TOLERANCE[decl.dtype]
        result = {"format": decl.format, "dtype": decl.dtype, "runtime": runtime,
                  "logit_rel_error": rel, "limit": limit, "passed": rel <= limit}
    else:
        plans = plans_from_export(path) if plans is None else plans
        if activation_quantizer == "compressed-tensors":  # it has no clips
            plans = {k: replace(p, act_clip=None) for k, p in plans.items()}
        r1 = decl.residual_rotation
        if r1 is not None or decl.head_rotations:
            # The plans were fitted on the rotated model (R1, then the learned R2: exact in
            # float), rotated in float32 (float64) and rounded to the export dtype once, as written.
            rotated = copy.deepcopy(model)
            if r1 is not None:
                rotated.to(torch.float64 if target == torch.float64 else torch.float32)
                rotate_residual(rotated, seed=r1.seed, kind=r1.kind)
            if decl.head_rotations:
                apply_head_rotations(rotated, load_file(str(path / HEAD_ROTATIONS_FILE)))
            reference = as_loaded(rotated, target)
        # compressed-tensors' runtime rotates with the stored matrix (a dense product)
        sites = with_dense_rotations(
            [rs for rs in resolve_sites(reference, list(plans),
                                        residual_kind=None if r1 is None else r1.kind)
             if rs.name in plans], runtime != "smoothrot")
        with transformed(sites, plans, scheme):
            logit_rel, diff = _compare_logits(reference, reloaded, windows, batch_size)
            ppl_memory = perplexity(reference, windows, batch_size, desc="in-memory ppl")
        ppl_reload = perplexity(reloaded, windows, batch_size, desc="reloaded ppl")
        result = {"format": decl.format, "dtype": decl.dtype, "runtime": runtime,
                  "activation_quantizer": activation_quantizer, "ppl_in_memory": ppl_memory,
                  "ppl_reloaded": ppl_reload,
                  "ppl_rel_diff": abs(ppl_reload - ppl_memory) / ppl_memory,
                  "logit_rel_error": logit_rel, "max_abs_logit_diff": diff}
        if decl.gptq:  # the stored scales are refitted on the fused weight: GPTQ's up to an ulp
            limit = LOGIT_TOLERANCE[decl.dtype]
            result.update(limit=limit, passed=logit_rel <= limit)
        else:
            result.update(limit=0.0, passed=diff == 0.0)
        if activation_quantizer != "smoothrot" and scheme.a_format != "int":
            # NVFP4's static calibrated input scale is not the in-memory dynamic one.
            result.update(limit=None, passed=math.isfinite(ppl_reload), note=(
                "compressed-tensors quantizes FP4 activations with the static calibrated global "
                "scale, not the in-memory dynamic one, so the logits cannot be compared exactly"))
    if runtime == "transformers" and any(s.rotation.is_online() for s in decl.sites.values()):
        result.update(passed=False, note=(
            "plain transformers ignores transform_config, so this export's online rotations did "
            "not run: it computes another function. Load it with smoothrot.load_pretrained, "
            "vLLM, or compressed-tensors' apply_transform_config (runtime compressed-tensors)"))
    log.info("verify %s: %s", path, result)
    return result
