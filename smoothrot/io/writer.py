"""Writing an export: a model transformed by site plans, as a Hugging Face folder.

Formats (docs/equivalence.md has the math, README "Export" the usage):

* ``fused``: the float model after surgery (safetensors): diag(s)⁻¹ folded into each site's
  source, Wᵢ·diag(s)·R stored in the site's linears; only the online part of R is left to run,
  on the input of those linears.
* ``w8a8`` / ``w4a4``: compressed-tensors ``int-quantized`` (W8A8) / ``pack-quantized`` (W4A4,
  eight codes per int32) checkpoints whose integers are the same round-to-nearest of the fused
  weights that ``core.quantizers`` computes, with dynamic per-token activations declared as
  llm-compressor does. Only the planned sites are quantized.
* ``nvfp4`` / ``mxfp4``: compressed-tensors ``nvfp4-`` / ``mxfp4-pack-quantized`` checkpoints
  from its own presets; NVFP4 also stores static input global scales from calibration tokens.

Plans with offline-rounded weights (GPTQ, ``SitePlan.weight_q``) store those codes. What runs
online is declared in ``config.json["smoothrot"]`` (:mod:`smoothrot.schema.declaration`, read by
:func:`smoothrot.io.loader.load_pretrained`) and, where compressed-tensors can express it, as its
``transform_config`` (:mod:`smoothrot.io.compressed_tensors`). The folder is written atomically
(:mod:`smoothrot.io.atomic`): it appears complete or not at all.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from smoothrot.arch.sites import ResolvedSite, resolve_sites
from smoothrot.calibrate.capture import run_model
from smoothrot.io.atomic import atomic_folder, refuse_existing, write_json
from smoothrot.io.compressed_tensors import attach_transforms, quantize_sites, transform_configs
from smoothrot.io.metadata import DIGESTS_KEY, content_digests, export_metadata
from smoothrot.io.model_card import model_card
from smoothrot.models import model_fingerprint, resolve_dtype
from smoothrot.schema.declaration import (
    DECLARATION_KEY,
    LOADER,
    ActivationQuantDeclaration,
    ExportDeclaration,
    ResidualDeclaration,
    SiteDeclaration,
    WeightQuantDeclaration,
)
from smoothrot.schema.errors import ConfigError
from smoothrot.schema.export import (
    EXPORT_DTYPES,
    EXPORT_SCALES_FILE,
    FORMATS,
    FP4_FORMATS,
    METADATA_FILE,
    ExportError,
)
from smoothrot.schema.quant import QuantScheme, get_scheme
from smoothrot.schema.strict import CLIP
from smoothrot.schema.target import TARGETS, Target
from smoothrot.surgery.fuse import linear_weights_q
from smoothrot.surgery.head_rotation import HEAD_ROTATIONS_FILE, apply_head_rotations
from smoothrot.surgery.hooks import apply_plans, site_parameters
from smoothrot.surgery.plan import SitePlan

__all__ = ["ExportError", "check_representable", "check_target", "export_model"]

log = logging.getLogger(__name__)


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def _resolve_planned(
    model: nn.Module, plans: Mapping[str, SitePlan], residual_kind: str | None
) -> list[ResolvedSite]:
    """The sites named by ``plans`` (qualified site names), checked against the model."""
    if not plans:
        raise ExportError("nothing to export: no site plans given")
    sites = [rs for rs in resolve_sites(model, list(plans), residual_kind=residual_kind)
             if rs.name in plans]
    missing = sorted(set(plans) - {rs.name for rs in sites})
    if missing:
        raise ExportError(f"plans name {missing}, which are not qualified site names of this model")
    for rs in sites:
        plan = plans[rs.name]
        if plan.weight_q is not None and tuple(plan.weight_q.shape) != tuple(rs.weight.shape):
            raise ExportError(f"{rs.name}: weight_q has shape {tuple(plan.weight_q.shape)} but "
                              f"the site's fused weight is {tuple(rs.weight.shape)}")
        if plan.scales is not None and tuple(plan.scales.shape) != (rs.n_scales,):
            raise ExportError(
                f"{rs.name}: scales have shape {tuple(plan.scales.shape)} but the model needs "
                f"({rs.n_scales},); were they fitted on another model?"
            )
        try:
            rs.transform.with_rotation(plan.rotation).check(rs.in_features)
        except ValueError as exc:
            raise ExportError(f"{rs.name}: rotation {plan.rotation.describe()}: {exc}") from None
    return sites


def _site_declarations(
    model: nn.Module, sites: Sequence[ResolvedSite], plans: Mapping[str, SitePlan]
) -> dict[str, SiteDeclaration]:
    """What the declaration says per site: linears, source, what is folded, the rotation."""
    names = _module_names(model)
    return {
        rs.name: SiteDeclaration(
            linears=tuple(names[id(lin)] for lin in rs.linears),
            source=names[id(rs.smooth_from)], source_kind=rs.smooth_from_kind,
            smoothed=plans[rs.name].scales is not None, rotation=plans[rs.name].rotation,
            activation_clip=plans[rs.name].act_clip,
        )
        for rs in sites
    }


def _export_scheme(fmt: str, scheme: str | None) -> QuantScheme | None:
    """The quantization scheme of a quantized format; it must be what the format stores."""
    if fmt == "fused":
        return None
    try:
        qs = get_scheme(scheme or fmt)
    except ConfigError as exc:
        raise ExportError(str(exc)) from None
    if fmt in FP4_FORMATS:
        if (qs.w_format, qs.a_format) != (fmt, fmt):
            raise ExportError(f"format {fmt} needs an {fmt} scheme (weights and activations), "
                              f"got {qs.name!r}; pass --scheme {fmt}")
        return qs
    bits = int(fmt[1])
    if (qs.w_bits, qs.a_bits) != (bits, bits):
        raise ExportError(f"format {fmt} needs a W{bits}A{bits} scheme, got {qs.name!r}")
    plain = (qs.w_format == qs.a_format == "int" and qs.w_symmetric
             and qs.w_group_size is None and qs.a_group_size is None)
    if not plain:
        raise ExportError(
            f"scheme {qs.name!r} uses groups, asymmetry or FP4; format {fmt} writes per-channel "
            "symmetric int weights and per-token int activations (w8a8, w4a4, *-mse); FP4 "
            "schemes export as --format nvfp4 or mxfp4"
        )
    return qs


def _drop_gguf_marker(model: nn.Module) -> None:
    """A GGUF checkpoint is dequantized on load but keeps a quantizer that blocks saving."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        raise ExportError(f"export needs a float model; this one is quantized with {method}")
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@torch.no_grad()
def check_representable(
    model: nn.Module,
    sites: Sequence[ResolvedSite],
    plans: Mapping[str, SitePlan],
    dtype: torch.dtype,
) -> None:
    """One-line error if a fused weight would not be finite in ``dtype`` (e.g. > 65504 in fp16).

    Dry run: the sites' modules are copied in float64 and fused there, so the check sees the
    exact values before any rounding and the model is left untouched.
    """
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    modules = {id(m): m for rs in sites for m in (*rs.linears, rs.smooth_from)}
    copies = {key: copy.deepcopy(m).double() for key, m in modules.items()}
    origin = {}  # copied parameter -> the model's parameter name
    for key, m in modules.items():
        for (_, p), (_, q) in zip(m.named_parameters(), copies[key].named_parameters(),
                                  strict=True):
            origin[id(q)] = names.get(id(p), "?")
    probe = [replace(rs, linears=tuple(copies[id(lin)] for lin in rs.linears),
                     smooth_from=copies[id(rs.smooth_from)]) for rs in sites]
    for handle in apply_plans(probe, plans):
        handle.remove()
    limit = torch.finfo(dtype).max
    for rs in probe:
        for p in site_parameters(rs):
            value = float(p.detach().abs().max())
            if value > limit or value != value:
                raise ExportError(
                    f"{origin[id(p)]}: fused max |w| = {value:.4g} exceeds "
                    f"{str(dtype).removeprefix('torch.')}'s largest finite value {limit:.4g}; "
                    "lower train.log_bound (a narrower scale range) or export float32"
                )


@torch.no_grad()
def _input_absmax(model: nn.Module, names: Sequence[str], windows: torch.Tensor,
                  batch_size: int = 4) -> dict[str, torch.Tensor]:
    """max |x| over ``windows`` of each named linear's input as its kernel sees it, i.e. after
    the online rotation hooks already registered (the static part of NVFP4 activations)."""
    amax = {name: torch.zeros((), dtype=torch.float32) for name in names}

    def recorder(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            value = args[0].detach().abs().amax().float().cpu()
            amax[name] = torch.maximum(amax[name], value)
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(recorder(n)) for n in names]
    try:
        run_model(model, windows, batch_size, "input global scales")
    finally:
        for handle in handles:
            handle.remove()
    return amax


def _prepared_copy(
    model: nn.Module, target: torch.dtype, residual_seed: int | None, residual_kind: str,
    head_rotations: Mapping[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, ResidualDeclaration | None]:
    """A savable copy in ``target`` dtype, with the R1 residual rotation re-applied if asked
    (of ``residual_kind``; the declaration records the kind applied), then the learned head
    rotations, in the order the fit applied them."""
    work = copy.deepcopy(model)
    _drop_gguf_marker(work)
    residual = None
    if residual_seed is not None:
        from smoothrot.surgery.residual import rotate_residual

        work.to(torch.float64 if target == torch.float64 else torch.float32)
        rot = rotate_residual(work, seed=residual_seed, kind=residual_kind)
        if rot.handles:
            raise ExportError("this architecture's residual rotation needs online hooks after "
                              "output norms, which the export cannot declare yet")
        residual = ResidualDeclaration(residual_seed, rot.kind, rot.untied_lm_head)
    if head_rotations:
        apply_head_rotations(work, head_rotations)
    return work.to(target), residual


def _refuse_non_export(path: Path) -> None:
    """--overwrite replaces an earlier export only, never a run folder or a model."""
    if not path.exists():
        return
    config = path / "config.json"
    try:
        data = json.loads(config.read_text())
        is_export = isinstance(data, dict) and DECLARATION_KEY in data
    except (OSError, ValueError):
        is_export = False
    if not is_export:
        raise ExportError(f"{path} exists and is not a smoothrot export; overwrite replaces "
                          "exports only, so pick another target folder")


def _refuse_inputs(path: Path, inputs: Mapping[str, str | Path]) -> None:
    """Replacing ``path`` removes everything in it: it must not be, or hold, an input (be it,
    even before it exists: a run folder is created later; a hub id is no folder to hold)."""
    target = path.resolve()
    for what, item in inputs.items():
        if not item:
            continue
        resolved = Path(item).resolve()
        if target == resolved or (resolved.exists() and target in resolved.parents):
            raise ExportError(f"export target {path} is or contains {what} {item}; pick another "
                              "target folder (--out, --export-dir)")


def _refuse_unwritable(path: Path) -> None:
    """The target's nearest existing folder must be a writable folder (checked before the
    work, not when the folder is created at the end)."""
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise ExportError(f"cannot create export folder {path}: {parent} is a file; pick "
                          "another target folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot create export folder {path}: {parent} is not writable; pick "
                          "another target folder")


def check_target(path: str | Path, overwrite: bool,
                 inputs: Mapping[str, str | Path] | None = None) -> None:
    """One-line errors for a target the export must not or cannot write: taken (without
    ``overwrite``), not an earlier export (``overwrite`` replaces exports only), one of the
    command's ``inputs`` (what → path) or a folder holding one, or not creatable (under a file,
    read-only)."""
    path = Path(path)
    refuse_existing(path, overwrite)
    _refuse_non_export(path)
    _refuse_inputs(path, inputs or {})
    _refuse_unwritable(path)


def _check_plans(qscheme: QuantScheme | None, plans: Mapping[str, SitePlan],
                 calibration: torch.Tensor | None, target: Target) -> None:
    """One-line errors for plans and calibration the format or target cannot take or needs."""
    for site, plan in plans.items():
        if plan.act_clip is not None and not CLIP[0](plan.act_clip):
            raise ExportError(f"{site}: activation clip {plan.act_clip!r} must be {CLIP[1]} (a "
                              "ratio of max |x|); fix or drop the plan's act_clip")
    clipped = sorted(s for s, p in plans.items() if p.act_clip not in (None, 1.0))
    if qscheme is not None and clipped and not target.act_clips:
        raise ExportError(
            f"{len(clipped)} sites carry activation clip ratios (e.g. {clipped[0]}), which "
            f"{target.name} cannot apply (dynamic activation quantization has no clip); fit "
            "without search.act_clips, or export with target research (smoothrot's loader only)")
    if qscheme is None and any(p.weight_q is not None for p in plans.values()):
        raise ExportError("plans carry offline-quantized weights (GPTQ), which the float format "
                          "'fused' cannot store; export a quantized format, e.g. w4a4 or nvfp4")
    if qscheme is not None and qscheme.a_format == "nvfp4" and calibration is None:
        raise ExportError("nvfp4 stores static input global scales; pass calibration token "
                          "windows (calibration=..., the fit's calibration split)")


def export_model(
    model: nn.Module,
    plans: Mapping[str, SitePlan],
    path: str | Path,
    *,
    fmt: str = "fused",
    dtype: str = "float32",
    scheme: str | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
    residual_seed: int | None = None,
    residual_kind: str = "hadamard",
    provenance: Mapping[str, Any] | None = None,
    calibration: torch.Tensor | None = None,
    target: str = "vllm",
    inputs: Mapping[str, str | Path] | None = None,
    head_rotations: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` transformed by ``plans`` (qualified site name → SitePlan) to ``path``.

    The model itself is not modified (a copy is fused). ``scheme`` picks the quantizer of a
    quantized format (default: the format's preset), with ``target``'s activation arithmetic
    (schema/target.py); per-site activation clips need ``target="research"`` (no backend
    applies them). Plans with ``weight_q`` (GPTQ) store those
    codes (quantized formats only). ``calibration`` token windows ``[samples, seq_len]`` give
    NVFP4's static input global scales (max |x·R| per linear; required for ``nvfp4``).
    ``residual_seed`` re-applies the R1 residual rotation the scales were fitted under, of
    ``residual_kind`` (the fit's ``rotation.residual_kind``). ``head_rotations`` (o_proj site
    → [kv_heads, d, d]) re-applies the learned per-head rotations the fit folded in after R1.
    ``provenance`` (method, α/q, data hash, headline errors, ...) goes into ``smoothrot.json``,
    with the SHA-256 of every stored tensor and config entry (what ``verify`` checks).
    ``overwrite`` replaces an earlier export only, never the model's own folder or ``inputs``
    (what → path: the run folder, the scales file, ...) or a folder holding one. Returns the
    path.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {list(FORMATS)}")
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"unsupported export dtype {dtype!r}; choose one of "
                          f"{list(EXPORT_DTYPES)}")
    check_target(path, overwrite,
                 {"the model folder": getattr(model, "name_or_path", ""), **(inputs or {})})
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    qscheme = _export_scheme(fmt, scheme)
    qscheme = None if qscheme is None else TARGETS[target].scheme(qscheme)
    _check_plans(qscheme, plans, calibration, TARGETS[target])
    torch_dtype = resolve_dtype(dtype)

    # The copy is fused in the export dtype, as apply_plans fuses a model loaded in that dtype
    # (float64 arithmetic, one rounding), so the reload matches the in-memory model bit for bit.
    # GPTQ weights replace the fused float weights only when compressed (their scales come from
    # the float weights).
    work, residual = _prepared_copy(model, torch_dtype, residual_seed, residual_kind,
                                     head_rotations)
    kind = None if residual is None else residual.kind
    sites = _resolve_planned(work, plans, kind)
    names = _module_names(work)
    weights_q = {names[id(lin)]: w for lin, w in linear_weights_q(sites, plans).items()}
    handles = apply_plans(sites, {k: replace(p, weight_q=None) for k, p in plans.items()})
    try:
        if not all(torch.isfinite(p).all() for rs in sites for p in site_parameters(rs)):
            # Overflowed in the cast: redo the fusion in float64 on a fresh copy to name the
            # parameter and its value (rare path, so the common one fuses once).
            fresh, _ = _prepared_copy(model, torch_dtype, residual_seed, residual_kind,
                                     head_rotations)
            check_representable(fresh, _resolve_planned(fresh, plans, kind), plans, torch_dtype)
            raise ExportError(f"fused weights are not finite in {dtype}; export float32")
        declared = _site_declarations(work, sites, plans)
        linears = [name for site in declared.values() for name in site.linears]
        input_amax = ({} if calibration is None or qscheme is None or qscheme.a_format != "nvfp4"
                      else _input_absmax(work, linears, calibration))
    finally:
        for handle in handles:
            handle.remove()  # the online part is declared in config.json instead
    precision = torch.float64 if torch_dtype == torch.float64 else torch.float32
    ct = transform_configs(declared, {rs.name: rs.in_features for rs in sites}, precision)
    if ct.online is not None:
        attach_transforms(work, ct)  # registers the transform weights to save
    compressor = None
    if qscheme is not None:
        compressor = quantize_sites(work, linears, qscheme, weights_q, input_amax)
        compressor.transform_config = ct.full
    elif ct.full is not None:
        from compressed_tensors.compressors import ModelCompressor

        compressor = ModelCompressor(transform_config=ct.full)

    declaration = ExportDeclaration(
        format=fmt, dtype=dtype, loader=LOADER, sites=declared,
        activation_quantization=None if qscheme is None else ActivationQuantDeclaration.of(qscheme),
        weight_quantization=None if qscheme is None else WeightQuantDeclaration.of(
            qscheme, "gptq" if weights_q else "rtn"),
        transform_config_groups=tuple(sorted(ct.full.config_groups)) if ct.full else (),
        transform_config_note=ct.note, residual_rotation=residual, target=target,
        head_rotations=tuple(sorted(head_rotations or {})),
    )
    scales = {name: p.scales.detach().double().cpu().contiguous()
              for name, p in plans.items() if p.scales is not None}
    meta = export_metadata(fmt, dtype, model_fingerprint(model), list(declared), plans,
                           provenance)
    with atomic_folder(path, overwrite) as tmp:
        work.save_pretrained(tmp)
        if compressor is not None:
            compressor.update_config(str(tmp))
        config = json.loads((tmp / "config.json").read_text())
        config[DECLARATION_KEY] = declaration.to_dict()
        write_json(tmp / "config.json", config)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if scales:
            (tmp / EXPORT_SCALES_FILE).parent.mkdir()
            save_file(scales, str(tmp / EXPORT_SCALES_FILE),
                      metadata={"format": "site -> s (float64)"})
        if head_rotations:
            save_file({k: v.double().contiguous() for k, v in head_rotations.items()},
                      str(tmp / HEAD_ROTATIONS_FILE),
                      metadata={"format": "o_proj site -> R2 [kv_heads, d, d] (float64)"})
        (tmp / "README.md").write_text(model_card(declaration, meta))
        write_json(tmp / METADATA_FILE, {**meta, DIGESTS_KEY: content_digests(tmp)})
    log.info("exported %s (%s, %s, %d sites) to %s", fmt, dtype,
             "compressed-tensors transform + smoothrot" if ct.full else "smoothrot declaration",
             len(declared), path)
    return path
