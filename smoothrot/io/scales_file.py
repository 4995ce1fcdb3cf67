"""A fit's scales file (``scales.safetensors``): every plan of every scheme and method, per site.

A plan is more than a tensor: RTN and Hadamard-only plans have no scales, every plan has a
rotation and may have its own activation clip. So the file carries, in its safetensors metadata,
a JSON index with one record per (scheme, method, site): the rotation, the clip and the name of
its float64 scales tensor (null: no scales). Readers go through the index only; the tensor names
(``<scheme>/<method>/<site>``) are for people and tools browsing the file and are never parsed.
Plans are rebuilt from the records as they were written, so the export needs no rule about which
methods have scales or rotate; a tensor the index does not name is refused (an edit, not a plan).
The fit settings an export re-applies (R1, its seed and kind, the target) are in the metadata too
(``fit``), so an export does not depend on a report.json that may belong to another run, and so
are the learned per-head rotations the fit folded into the model before any method
(``head_rotations``: o_proj site → the name of its float64 [kv_heads, d, d] tensor).

Offline-quantized weights (GPTQ's ``SitePlan.weight_q``) are not part of a scales file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from smoothrot.io.atomic import atomic_write
from smoothrot.schema.rotation import RESIDUAL_KINDS, Rotation
from smoothrot.schema.strict import (
    BOOLEAN,
    CLIP,
    INTEGER,
    NAMES,
    STRING,
    Check,
    checked,
    one_of,
    optional,
)
from smoothrot.schema.target import TARGETS
from smoothrot.surgery.plan import SitePlan

if TYPE_CHECKING:
    from smoothrot.schema.config import FitConfig

FILE_FORMAT = "smoothrot-scales"
FILE_VERSION = "1"
# The fit settings an export follows, by their config key: R1 (with its seed and kind) and the
# target. Keys not at the config's top level are found by FIT_SETTING_PATHS.
FIT_SETTINGS: dict[str, Check] = {"residual_rotation": BOOLEAN, "seed": INTEGER,
                                  "residual_kind": one_of(RESIDUAL_KINDS),
                                  "target": one_of(tuple(TARGETS))}
FIT_SETTING_PATHS: dict[str, tuple[str, ...]] = {"residual_kind": ("rotation", "residual_kind")}
# What a setting was before it was recorded (files written before the kind was kept: R1 was
# always of kind hadamard).
FIT_SETTING_DEFAULTS: dict[str, Any] = {"residual_kind": "hadamard"}


class ScalesFileError(ValueError):
    """A scales file is missing, unreadable or not what it claims; the message says which."""


@dataclass(frozen=True, eq=False)
class ScalesEntry:
    """One site's plan under one scheme and method (``scales`` None: no smoothing)."""

    scheme: str
    method: str
    site: str
    scales: torch.Tensor | None
    rotation: Rotation
    act_clip: float | None = None

    @property
    def tensor_name(self) -> str:
        """The name of its scales tensor in the file (a label; readers use the index)."""
        return f"{self.scheme}/{self.method}/{self.site}"

    def plan(self) -> SitePlan:
        return SitePlan(self.scales, self.rotation, act_clip=self.act_clip)


@dataclass(frozen=True)
class _IndexRecord:
    """How a :class:`ScalesEntry` is listed in the index (its scales by tensor name)."""

    scheme: str
    method: str
    site: str
    tensor: str | None
    rotation: dict[str, Any]
    act_clip: float | None


@dataclass(frozen=True)
class ScalesFile:
    """A scales file as read: the model it was fitted on, its sites and every entry."""

    path: Path
    model: str
    model_fingerprint: str
    sites: tuple[str, ...]
    entries: tuple[ScalesEntry, ...]
    fit: Mapping[str, Any] | None = None  # FIT_SETTINGS (None: written before they were kept)
    # Learned per-head rotations the plans were fitted after (o_proj site → [kv_heads, d, d]).
    head_rotations: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def schemes(self) -> list[str]:
        """The schemes, in the order they were fitted."""
        return list(dict.fromkeys(e.scheme for e in self.entries))

    def methods(self, scheme: str) -> list[str]:
        """The methods of ``scheme``, in the order they were written."""
        return list(dict.fromkeys(e.method for e in self.entries if e.scheme == scheme))

    def plans(self, scheme: str, method: str) -> dict[str, SitePlan]:
        """Every site's plan under ``scheme`` and ``method`` (one-line error if there are none
        or some site lacks one)."""
        found = {e.site: e.plan() for e in self.entries if (e.scheme, e.method) == (scheme, method)}
        if not found:
            have = [f"{s}/{m}" for s in self.schemes() for m in self.methods(s)]
            raise ScalesFileError(f"{self.path} has no {method!r} scales for scheme {scheme!r}; "
                                  f"it has {have}")
        missing = [site for site in self.sites if site not in found]
        if missing:
            raise ScalesFileError(f"{self.path}: {method!r} of {scheme} misses sites {missing}")
        return {site: found[site] for site in self.sites}


def fit_settings(config: FitConfig) -> dict[str, Any]:
    """The settings of ``config`` that an export of its scales must re-apply."""
    out = {}
    for key in FIT_SETTINGS:
        value: Any = config
        for name in FIT_SETTING_PATHS.get(key, (key,)):
            value = getattr(value, name)
        out[key] = value
    return out


def write_scales_file(
    path: str | Path,
    entries: Iterable[ScalesEntry],
    *,
    model: str,
    model_fingerprint: str,
    sites: Sequence[str],
    fit: Mapping[str, Any] | None = None,
    head_rotations: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Atomically write ``entries`` (scales as float64) with their index to ``path``; ``fit``:
    the run's :func:`fit_settings`; ``head_rotations``: the learned per-head rotations."""
    entries = list(entries)
    _check_entries(entries, sites)
    tensors = {e.tensor_name: e.scales.detach().double().cpu().contiguous()
               for e in entries if e.scales is not None}
    if len(tensors) != sum(e.scales is not None for e in entries):
        raise ValueError("two scales entries share a tensor name; a scheme or method name "
                         "contains '/'")
    index = [{"scheme": e.scheme, "method": e.method, "site": e.site,
              "tensor": None if e.scales is None else e.tensor_name,
              "rotation": e.rotation.to_dict(), "act_clip": e.act_clip} for e in entries]
    meta = {"format": FILE_FORMAT, "version": FILE_VERSION, "model": model,
            "model_fingerprint": model_fingerprint, "sites": json.dumps(list(sites)),
            "index": json.dumps(index)}
    if fit is not None:
        meta["fit"] = json.dumps(_checked_fit(dict(fit)))
    if head_rotations:
        names = {site: f"head_rotation/{site}" for site in sorted(head_rotations)}
        tensors.update({name: head_rotations[site].detach().double().cpu().contiguous()
                        for site, name in names.items()})
        meta["head_rotations"] = json.dumps(names)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _check_entries(entries: Sequence[ScalesEntry], sites: Sequence[str]) -> None:
    """Each (scheme, method, site) once, and only for the file's sites."""
    seen: set[tuple[str, str, str]] = set()
    for e in entries:
        key = (e.scheme, e.method, e.site)
        if key in seen:
            raise ValueError(f"two scales entries for {key}")
        if e.site not in sites:
            raise ValueError(f"scales entry {key} names a site that is not in sites")
        seen.add(key)


def _checked_fit(fit: Any) -> dict[str, Any]:
    """``fit`` as a mapping of exactly the FIT_SETTINGS keys, each valid (one-line error); a key
    of FIT_SETTING_DEFAULTS it lacks takes its default."""
    if isinstance(fit, dict):
        fit = {**{k: v for k, v in FIT_SETTING_DEFAULTS.items() if k not in fit}, **fit}
    if not isinstance(fit, dict) or set(fit) != set(FIT_SETTINGS):
        raise ValueError(f"fit settings must be a mapping of {list(FIT_SETTINGS)}, got {fit!r}")
    for key, (fits, expected) in FIT_SETTINGS.items():
        if not fits(fit[key]):
            raise ValueError(f"fit.{key}={fit[key]!r} must be {expected}")
    return fit


def _entry(record: Any, where: str, tensors: dict[str, torch.Tensor]) -> ScalesEntry:
    r = checked(_IndexRecord, record, where, {
        "scheme": STRING, "method": STRING, "site": STRING, "tensor": optional(STRING),
        "act_clip": optional(CLIP),
    })
    if r["tensor"] is not None and r["tensor"] not in tensors:
        raise ValueError(f"{where}: tensor {r['tensor']!r} is not in the file")
    try:
        rotation = Rotation.from_dict(r["rotation"])
    except ValueError as exc:
        raise ValueError(f"{where}.rotation: {exc}") from None
    scales = None if r["tensor"] is None else tensors[r["tensor"]]
    return ScalesEntry(r["scheme"], r["method"], r["site"], scales, rotation, r["act_clip"])


def read_scales_file(path: str | Path) -> ScalesFile:
    """Read and check a scales file written by :func:`write_scales_file` (one-line errors)."""
    path = Path(path)
    if not path.is_file():
        raise ScalesFileError(f"scales file {path} does not exist; run train/fit_scales.py first")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except SafetensorError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ScalesFileError(f"{path} is not a readable safetensors file ({first}); pass the "
                              "scales.safetensors written by train/fit_scales.py") from None
    if meta.get("format") != FILE_FORMAT or "index" not in meta:
        raise ScalesFileError(f"{path} has no smoothrot scales index in its metadata (written by "
                              "another tool or an older smoothrot); run train/fit_scales.py again")
    if meta.get("version") != FILE_VERSION:
        raise ScalesFileError(f"{path}: scales file version {meta.get('version')!r} is not "
                              f"supported (this smoothrot reads version {FILE_VERSION})")
    missing = [key for key in ("model", "model_fingerprint", "sites") if key not in meta]
    if missing:
        raise ScalesFileError(f"{path}: the metadata lacks {missing}; not a complete scales file")
    try:
        sites = json.loads(meta["sites"])
        index = json.loads(meta["index"])
        if not NAMES[0](sites):
            raise ValueError(f"sites={sites!r} must be {NAMES[1]}")
        if not isinstance(index, list):
            raise ValueError(f"index must be a list, got {type(index).__name__}")
        entries = tuple(_entry(r, f"index[{i}]", tensors) for i, r in enumerate(index))
        _check_entries(entries, sites)
        fit = _checked_fit(json.loads(meta["fit"])) if "fit" in meta else None
        rotation_names = json.loads(meta.get("head_rotations", "{}"))
        if not (isinstance(rotation_names, dict)
                and all(isinstance(v, str) and v in tensors for v in rotation_names.values())):
            raise ValueError("head_rotations must map sites to tensors of the file")
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ScalesFileError(f"{path}: bad scales index: {exc}") from None
    stray = sorted(set(tensors) - {r["tensor"] for r in index} - set(rotation_names.values()))
    if stray:
        raise ScalesFileError(f"{path}: tensor(s) {stray[:3]} are not in the scales index (the "
                              "file was edited or written by another tool); run "
                              "train/fit_scales.py again")
    return ScalesFile(path, meta["model"], meta["model_fingerprint"], tuple(sites), entries, fit,
                      {site: tensors[name] for site, name in rotation_names.items()})
