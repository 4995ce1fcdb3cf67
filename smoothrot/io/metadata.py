"""smoothrot.json: what an export was made from (method, target, scale ranges, versions), and
SHA-256 digests of what it stores.

Provenance, not behaviour: nothing reads it back to compute; ``verify`` and the model card
quote it. The digests (``sha256``: each top-level entry of config.json, the declaration among
them, and every tensor of every safetensors file) let ``verify`` tell an export from an edited
one: a reload can only be compared with a reference built from the same declaration and scales,
so a changed bit width, a flipped weight row or a rescaled ``weight_scale`` would otherwise pass.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from smoothrot.schema.export import METADATA_FILE, ExportError
from smoothrot.surgery.plan import SitePlan

DIGESTS_KEY = "sha256"
_BLOCK = 1 << 24


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


def _json_digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def _unreadable(file: Path, why: str) -> ExportError:
    return ExportError(f"{file} is not a readable safetensors file ({why}); export it again")


def safetensors_digests(file: Path) -> dict[str, str]:
    """SHA-256 of each tensor of a safetensors file (its dtype, shape and raw bytes), read
    through the header alone: any dtype, no tensor is built."""
    size = file.stat().st_size
    with file.open("rb") as f:
        start = f.read(8)
        n = int.from_bytes(start, "little") if len(start) == 8 else -1
        if not 0 < n <= size - 8:
            raise _unreadable(file, "bad header length")
        try:
            header = json.loads(f.read(n))
            tensors = {}
            for name, info in header.items():
                if name != "__metadata__":
                    begin, end = info["data_offsets"]
                    tensors[name] = (info["dtype"], info["shape"], begin, end)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _unreadable(file, f"bad header: {exc!r}") from None
        out = {}
        for name, (dtype, shape, begin, end) in sorted(tensors.items()):
            if not (isinstance(begin, int) and isinstance(end, int)
                    and 0 <= begin <= end <= size - 8 - n):
                raise _unreadable(file, f"tensor {name} lies outside the file")
            digest = hashlib.sha256(f"{dtype}{shape}".encode())
            f.seek(8 + n + begin)
            for offset in range(begin, end, _BLOCK):
                digest.update(f.read(min(_BLOCK, end - offset)))
            out[name] = digest.hexdigest()
    return out


def content_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """What ``verify`` recomputes: per top-level key of config.json and per tensor of every
    ``*.safetensors`` (by file, relative to ``folder``), a SHA-256."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{folder}/config.json is unreadable ({exc}); export it again") from None
    if not isinstance(config, dict):
        raise ExportError(f"{folder}/config.json is not a JSON object; export it again")
    return {
        "config.json": {key: _json_digest(value) for key, value in config.items()},
        "tensors": {file.relative_to(folder).as_posix(): safetensors_digests(file)
                    for file in sorted(folder.rglob("*.safetensors"))},
    }


def _first_difference(recorded: Mapping[str, Any], actual: Mapping[str, Any],
                      what: str) -> str | None:
    for key in sorted(set(recorded) | set(actual)):
        if key not in actual:
            return f"{what} {key!r} is missing"
        if key not in recorded:
            return f"{what} {key!r} was not written by the export"
        if recorded[key] != actual[key]:
            return f"{what} {key!r} differs from what was written"
    return None


def content_mismatch(folder: Path, recorded: Any) -> str | None:
    """The first stored entry of ``folder`` whose digest is not the ``recorded`` one (None:
    all equal): a config.json key, a safetensors file, or a tensor of one."""
    if not (isinstance(recorded, dict) and isinstance(recorded.get("config.json"), dict)
            and isinstance(recorded.get("tensors"), dict)):
        return f"{METADATA_FILE} has no valid {DIGESTS_KEY!r} entry"
    actual = content_digests(folder)
    found = (_first_difference(recorded["config.json"], actual["config.json"], "config.json key")
             or _first_difference(dict.fromkeys(recorded["tensors"]),  # which files, first
                                  dict.fromkeys(actual["tensors"]), "file"))
    if found is not None:
        return found
    for file, tensors in sorted(actual["tensors"].items()):
        expected = recorded["tensors"][file]
        found = _first_difference(expected if isinstance(expected, dict) else {}, tensors,
                                  f"{file}: tensor")
        if found is not None:
            return found
    return None


def read_metadata(path: Path) -> dict[str, Any]:
    """An export's smoothrot.json (one-line ExportError if absent, unreadable or no object)."""
    file = path / METADATA_FILE
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path} has no {METADATA_FILE}; it was not written by smoothrot's "
                          "export (export it again)") from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{file} is unreadable ({exc}); export it again") from None
    if not isinstance(data, dict):
        raise ExportError(f"{file} is not a JSON object (got {type(data).__name__}); export it "
                          "again")
    return data
