"""Exports straight from a finished fit (the ``export`` section of a run's config): the plans
in memory, GPTQ weights included, and provenance from the result itself; no scales file or
report.json is read back. The request is checked before the fit, so a doomed export fails in
seconds, not at the end of a long run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoothrot.io.writer import check_target, export_model
from smoothrot.job import FitResult, SchemeResult
from smoothrot.methods.registry import BASELINE, chosen_by, get_method
from smoothrot.report import summarize
from smoothrot.schema.config import FitConfig
from smoothrot.schema.export import ExportError

__all__ = ["check_fit_export", "export_fit", "export_targets"]


def export_targets(cfg: FitConfig) -> dict[str, Path]:
    """Where each format goes: ``<output_dir>/export-<format>``, or ``export.dir`` (one format)."""
    formats = list(dict.fromkeys(cfg.export.formats))
    if cfg.export.dir is not None:
        if len(formats) != 1:
            raise ExportError("export.dir (--export-dir) takes one format; drop it to get "
                              "<output_dir>/export-<format> for each")
        return {formats[0]: Path(cfg.export.dir)}
    return {fmt: Path(cfg.output_dir) / f"export-{fmt}" for fmt in formats}


def _scheme_of(cfg: FitConfig, fmt: str) -> str:
    """The fitted scheme whose plans a format stores: ``export.scheme``, else the format's own
    (``w4a4``, ``nvfp4``, ...), for ``fused`` the run's first."""
    if cfg.export.scheme is not None:
        return cfg.export.scheme
    return cfg.schemes[0] if fmt == "fused" else fmt


def _inputs(cfg: FitConfig) -> dict[str, str]:
    """What an export of the run must never replace: the run folder and the model."""
    return {"the run's output folder": cfg.output_dir, "the run's model folder": cfg.model.name}


def check_fit_export(cfg: FitConfig) -> dict[str, Path]:
    """The export targets of ``cfg``, after one-line errors for anything that could not be
    written at the end (scheme not fitted, method not run, GPTQ into ``fused``, a target that is
    taken, not an export, the run or model folder (or holds one), or under a file)."""
    e = cfg.export
    if not e.formats:
        if e.dir is not None:
            raise ExportError("export.dir (--export-dir) needs export.formats (--export FORMAT)")
        return {}
    targets = export_targets(cfg)
    method = get_method(e.method)
    if e.method not in cfg.methods and e.method != BASELINE:
        raise ExportError(f"export.method {e.method} is not among the run's methods "
                          f"{cfg.methods}; add it to methods (--methods)")
    for fmt, target in targets.items():
        scheme = _scheme_of(cfg, fmt)
        if scheme not in cfg.schemes:
            raise ExportError(f"export {fmt} needs scheme {scheme} in schemes (--schemes; have "
                              f"{cfg.schemes}) or export.scheme (--export-scheme) naming a "
                              "fitted one")
        if fmt == "fused" and method.rounding != "rtn":
            raise ExportError(f"export.method {e.method} rounds weights offline, which the float "
                              "format 'fused' cannot store; export a quantized format")
        check_target(target, e.overwrite, _inputs(cfg))
    return targets


def _provenance(result: FitResult, sr: SchemeResult, method: str) -> dict[str, Any]:
    """Method, (α, q) per site, target, data hashes and headline numbers for smoothrot.json."""
    source = chosen_by(method, sr.choices)
    choices = sr.choices.get(source, {}) if source else {}
    out: dict[str, Any] = {
        "method": method, "scheme": sr.scheme, "target": result.config.target,
        "alpha_q": {s: {"alpha": c.alpha, "q": c.q} for s, c in choices.items()},
        "calibration_data_hash": result.data_hash, "source_model": result.model_name,
        "headline": {"float_perplexity": result.float_perplexity,
                     **summarize(sr).get(method, {})},
    }
    if choices and source != method:
        out["alpha_q_note"] = f"{method} scales start from the {source} choice"
    return out


def export_fit(result: FitResult, model: nn.Module, tokenizer: Any = None,
               calibration: torch.Tensor | None = None) -> list[Path]:
    """Write every export ``result.config`` asks for, from the fitted plans of ``model`` (the
    model as loaded: R1 is re-applied from the config). ``calibration`` windows: NVFP4's static
    input scales."""
    cfg = result.config
    by_scheme = {sr.scheme: sr for sr in result.schemes}
    paths = []
    for fmt, target in export_targets(cfg).items():
        sr = by_scheme[_scheme_of(cfg, fmt)]
        paths.append(export_model(
            model, sr.plans[cfg.export.method], target, fmt=fmt, dtype=cfg.export.dtype,
            scheme=sr.scheme if fmt != "fused" else None, target=cfg.target,
            tokenizer=tokenizer, overwrite=cfg.export.overwrite,
            residual_seed=cfg.seed if cfg.residual_rotation else None,
            residual_kind=cfg.rotation.residual_kind,
            provenance=_provenance(result, sr, cfg.export.method), calibration=calibration,
            inputs=_inputs(cfg), head_rotations=result.head_rotations))
    return paths
