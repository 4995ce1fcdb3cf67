"""Exports from a fit's scales file: what the CLIs (``fit_scales.py --export``, ``export.py``) do.

The plans come from the scales file as they were fitted (io/scales_file.py), so nothing here
knows which method smooths or rotates; the run's report.json adds provenance and the R1 setting.
The request checks run before a long fit, so a doomed export fails in seconds, not at the end.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoothrot.io.atomic import refuse_existing
from smoothrot.io.scales_file import read_scales_file
from smoothrot.io.writer import export_model
from smoothrot.models import model_fingerprint
from smoothrot.schema.export import ExportError

__all__ = ["export_from_scales_file"]

log = logging.getLogger(__name__)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _provenance(report: Mapping[str, Any] | None, scheme: str, method: str,
                scales_path: Path) -> dict[str, Any]:
    """Method, α/q per site, data hash and headline errors for smoothrot.json."""
    out: dict[str, Any] = {"method": method, "scheme": scheme, "scales_file": str(scales_path),
                           "scales_sha256": _file_sha256(scales_path)}
    if not report:
        return out
    sr = report.get("schemes", {}).get(scheme, {})
    choices = sr.get("choices", {})
    # Here, not at the top: the registry imports every method (Lightning too).
    from smoothrot.methods.registry import chosen_by

    source = chosen_by(method, choices)
    out["alpha_q"] = choices.get(source, {}) if source else {}
    if source and source != method:
        out["alpha_q_note"] = f"{method} scales start from the {source} choice"
    out["calibration_data_hash"] = report.get("data_hash")
    out["headline"] = {
        "float_perplexity": report.get("float_perplexity"),
        **sr.get("summary", {}).get(method, {}),
    }
    return out


def export_from_scales_file(
    scales_path: str | Path,
    fmt: str,
    out: str | Path,
    *,
    model: nn.Module,
    tokenizer: Any = None,
    method: str = "trained",
    scheme: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    report: Mapping[str, Any] | None = None,
    calibration: torch.Tensor | None = None,
    target: str | None = None,
) -> Path:
    """Export ``model`` with the ``method`` plans of ``scheme`` from a fit's scales file.

    ``scheme`` defaults to the format's (``w4a4``, ``w8a8``, ``nvfp4``, ...); for ``fused`` to
    the run's first scheme. ``report`` (the run's report.json) adds provenance and the R1
    setting; ``calibration`` token windows are needed by ``nvfp4`` (see :func:`export_model`).
    ``target`` (schema/target.py) fixes the activation arithmetic; default: the fit's own (from
    ``report``), else ``vllm``. Per-site activation clips in the scales file need ``research``.
    A scales file of another model (fingerprint or shapes) is a one-line error.
    """
    scales_path = Path(scales_path)
    refuse_existing(Path(out), overwrite)
    file = read_scales_file(scales_path)
    fingerprint = model_fingerprint(model)
    if file.model_fingerprint != fingerprint:
        raise ExportError(
            f"{scales_path} was fitted on {file.model} ({file.model_fingerprint}), "
            f"not on this model ({fingerprint}); pass the model it was fitted on"
        )
    if scheme is None:
        scheme = fmt if fmt != "fused" else next(iter(file.schemes()), "w4a4")
    plans = file.plans(scheme, method)
    config = (report or {}).get("config", {})
    if report is None:
        log.warning("no report.json for %s: exporting without provenance and assuming the fit "
                    "used no residual rotation", scales_path)
    residual_seed = config.get("seed", 0) if config.get("residual_rotation") else None
    provenance = _provenance(report, scheme, method, scales_path)
    provenance["source_model"] = file.model
    return export_model(
        model, plans, out, fmt=fmt, dtype=dtype,
        scheme=scheme if fmt != "fused" else None, tokenizer=tokenizer, overwrite=overwrite,
        residual_seed=residual_seed, provenance=provenance, calibration=calibration,
        target=target or config.get("target", "vllm"),
    )
