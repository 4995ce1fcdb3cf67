"""smoothrot.json: what an export was made from (method, target, scale ranges, versions).

Provenance, not behaviour: nothing reads it back to compute; ``verify`` and the model card
quote it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from typing import Any

from smoothrot.surgery.plan import SitePlan


def _scales_summary(plans: Mapping[str, SitePlan]) -> dict[str, dict[str, float]]:
    out = {}
    for name, plan in plans.items():
        if plan.scales is None:
            continue
        log_s = plan.scales.double().log()
        out[name] = {
            "log_s_min": float(log_s.min()),
            "log_s_max": float(log_s.max()),
            "log_s_mean": float(log_s.mean()),
            "max_over_min": float((log_s.max() - log_s.min()).exp()),
        }
    return out


def package_versions() -> dict[str, str]:
    """Versions of the packages that wrote (and must read) an export."""
    out = {}
    for pkg in ("smoothrot", "torch", "transformers", "compressed-tensors", "safetensors"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def export_metadata(fmt: str, dtype: str, fingerprint: str, sites: list[str],
                    plans: Mapping[str, SitePlan],
                    provenance: Mapping[str, Any] | None) -> dict[str, Any]:
    """The smoothrot.json of an export."""
    return {
        "format": fmt,
        "dtype": dtype,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_model_fingerprint": fingerprint,
        "sites": sites,
        "scales_summary": _scales_summary(plans),
        "package_versions": package_versions(),
        **dict(provenance or {}),
    }
