"""Exports from a fit's scales file: what the CLIs (``fit_scales.py --export``, ``export.py``) do.

The plans come from the scales file as they were fitted (io/scales_file.py), so nothing here
knows which method smooths or rotates, and so do the fit settings the export re-applies (R1, the
target); the run's report.json adds provenance, and must agree with the scales file where both
speak (model, sites, settings): a report of another run would silently export another model.
The request checks run before a long fit, so a doomed export fails in seconds, not at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoothrot.io.scales_file import (
    FIT_SETTING_DEFAULTS,
    FIT_SETTING_PATHS,
    FIT_SETTINGS,
    ScalesFile,
    read_scales_file,
)
from smoothrot.io.writer import check_target, export_model
from smoothrot.models import model_fingerprint
from smoothrot.schema.export import ExportError

__all__ = ["export_from_scales_file", "read_report"]

log = logging.getLogger(__name__)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_report(path: Path) -> dict[str, Any]:
    """A run's report.json (one-line ExportError if unreadable or not a JSON object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"report {path} is unreadable ({exc}); pass the run's report.json "
                          "(--report)") from None
    if not isinstance(data, dict):
        raise ExportError(f"report {path} is not a JSON object (got {type(data).__name__}); "
                          "pass the report.json written by train/fit_scales.py (--report)")
    return data


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ExportError(f"report.json: {where} must be a mapping, got {type(value).__name__}; "
                          "pass the report.json written by train/fit_scales.py (--report)")
    return value


def _fit_settings(report: Mapping[str, Any] | None, file: ScalesFile) -> dict[str, Any]:
    """The fit settings to re-apply: the scales file's, which the report must not contradict
    (nor its model and sites); the report's for a scales file written before they were kept."""
    if report is None:
        return dict(file.fit or {})
    for key, value in (("model_fingerprint", file.model_fingerprint), ("sites", list(file.sites))):
        if key in report and report[key] != value:
            raise ExportError(f"report.json's {key} is not that of {file.path} (a report of "
                              "another run?); pass the run's own report.json (--report)")
    config = _mapping(report.get("config", {}), "config")
    said = {}
    for key in FIT_SETTINGS:
        path = FIT_SETTING_PATHS.get(key, (key,))
        where, dotted = config, ".".join(path)  # e.g. rotation.residual_kind
        for parent in path[:-1]:
            where = _mapping(where.get(parent, {}), f"config.{parent}")
        if path[-1] not in where:
            continue
        value = said[key] = where[path[-1]]
        if not FIT_SETTINGS[key][0](value):
            raise ExportError(f"report.json: config.{dotted}={value!r} must be "
                              f"{FIT_SETTINGS[key][1]}; pass the run's own report.json (--report)")
        if file.fit is not None and value != file.fit[key]:
            raise ExportError(f"report.json says {dotted}={value!r} but {file.path} was fitted "
                              f"with {dotted}={file.fit[key]!r}; pass the run's own report.json "
                              "(--report)")
    return dict(file.fit or said)


def _provenance(report: Mapping[str, Any] | None, scheme: str, method: str,
                scales_path: Path) -> dict[str, Any]:
    """Method, α/q per site, data hash and headline errors for smoothrot.json."""
    out: dict[str, Any] = {"method": method, "scheme": scheme, "scales_file": str(scales_path),
                           "scales_sha256": _file_sha256(scales_path)}
    if not report:
        return out
    sr = _mapping(_mapping(report.get("schemes", {}), "schemes").get(scheme, {}),
                  f"schemes.{scheme}")
    choices = _mapping(sr.get("choices", {}), f"schemes.{scheme}.choices")
    # Here, not at the top: the registry imports every method (Lightning too).
    from smoothrot.methods.registry import chosen_by

    source = chosen_by(method, choices)
    out["alpha_q"] = choices.get(source, {}) if source else {}
    if source and source != method:
        out["alpha_q_note"] = f"{method} scales start from the {source} choice"
    out["calibration_data_hash"] = report.get("data_hash")
    summary = _mapping(sr.get("summary", {}), f"schemes.{scheme}.summary")
    out["headline"] = {
        "float_perplexity": report.get("float_perplexity"),
        **_mapping(summary.get(method, {}), f"schemes.{scheme}.summary.{method}"),
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
    inputs: Mapping[str, str | Path] | None = None,
) -> Path:
    """Export ``model`` with the ``method`` plans of ``scheme`` from a fit's scales file.

    ``scheme`` defaults to the format's (``w4a4``, ``w8a8``, ``nvfp4``, ...); for ``fused`` to
    the run's first scheme. ``report`` (the run's report.json) adds provenance (and the R1
    setting, for a scales file that does not record it; one that contradicts the scales file is
    refused); ``calibration`` token windows are needed by ``nvfp4`` (see :func:`export_model`).
    ``target`` (schema/target.py) fixes the activation arithmetic; default: the fit's own, else
    ``vllm``. Per-site activation clips in the scales file need ``research``. A scales file of
    another model (fingerprint or shapes) is a one-line error. ``overwrite`` never replaces the
    scales file's folder (the run), ``inputs`` (what → path, e.g. the report) or a folder
    holding them.
    """
    scales_path = Path(scales_path)
    inputs = {"the scales file's folder": scales_path.parent, **(inputs or {})}
    check_target(out, overwrite, inputs)
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
    settings = _fit_settings(report, file)
    if report is None:
        log.warning("no report.json for %s: exporting without provenance", scales_path)
    if not settings:
        log.warning("%s records no fit settings: assuming the fit used no residual rotation",
                    scales_path)
    residual_seed = settings.get("seed", 0) if settings.get("residual_rotation") else None
    residual_kind = settings.get("residual_kind", FIT_SETTING_DEFAULTS["residual_kind"])
    provenance = _provenance(report, scheme, method, scales_path)
    provenance["source_model"] = file.model
    return export_model(
        model, plans, out, fmt=fmt, dtype=dtype,
        scheme=scheme if fmt != "fused" else None, tokenizer=tokenizer, overwrite=overwrite,
        residual_seed=residual_seed, residual_kind=residual_kind, provenance=provenance,
        calibration=calibration,
        target=target or settings.get("target", "vllm"), inputs=inputs,
        head_rotations=file.head_rotations,
    )
