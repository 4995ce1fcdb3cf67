"""Loading an export back as a working model, and the plans it was made from.

transformers (with compressed-tensors) loads the weights but ignores what must run online, so
:func:`load_pretrained` reads the declaration (:mod:`smoothrot.schema.declaration`) and attaches
each site's online rotation (and, for quantized formats, the activation quantizer) as pre-hooks,
with the same arithmetic as the in-memory surgery (surgery/hooks.py).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from smoothrot.arch.sites import resolve_sites
from smoothrot.core.transform import IDENTITY
from smoothrot.io.compressed_tensors import dequantize_nvfp4_exactly, has_ct_transform
from smoothrot.models import resolve_dtype
from smoothrot.schema.declaration import DECLARATION_KEY, ExportDeclaration, SiteDeclaration
from smoothrot.schema.export import (
    ACTIVATION_QUANTIZERS,
    EXPORT_SCALES_FILE,
    FP4_FORMATS,
    ExportError,
)
from smoothrot.schema.quant import with_act_clip
from smoothrot.surgery.hooks import OnlineInputTransform, online_transform
from smoothrot.surgery.plan import SitePlan

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["load_pretrained", "plans_from_export", "read_declaration", "require_safetensors"]

log = logging.getLogger(__name__)


def read_declaration(path: str | Path) -> ExportDeclaration:
    """The declaration in an export's config.json (one-line ExportError if absent or bad)."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{path} is not a model folder (no config.json)")
    try:
        data = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{config_path} is unreadable ({exc}); export it again") from None
    if not isinstance(data, dict) or DECLARATION_KEY not in data:
        raise ExportError(f"{path} is not a smoothrot export (config.json has no "
                          f"{DECLARATION_KEY!r} entry); load it with transformers directly")
    try:
        return ExportDeclaration.from_dict(data[DECLARATION_KEY])
    except ValueError as exc:
        raise ExportError(f"{path}: {exc}; the declaration was edited or written by another "
                          "tool or version: export it again") from None


def require_safetensors(path: Path) -> None:
    """Exports load from safetensors only (``use_safetensors=True``): a pickled
    ``pytorch_model.bin`` can run code when unpickled, so it is refused, not loaded."""
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("*.bin"))
        found = f"only pickled {pickled}" if pickled else "none"
        raise ExportError(f"{path} holds no safetensors weights ({found}; pickled weights are "
                          "never loaded); export it again")


def _site_plan(site: SiteDeclaration, scales: torch.Tensor | None) -> SitePlan:
    return SitePlan(scales if site.smoothed else None, site.rotation,
                    act_clip=site.activation_clip)


def plans_from_export(path: str | Path) -> dict[str, SitePlan]:
    """The site plans an export was made from (its stored scales, rotations and clips)."""
    decl = read_declaration(path)
    scales: dict[str, torch.Tensor] = {}
    file = Path(path) / EXPORT_SCALES_FILE
    if file.is_file():
        try:
            with safe_open(str(file), framework="pt") as f:
                scales = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        except SafetensorError as exc:
            raise ExportError(f"{file} is not a readable safetensors file ({exc}); export it "
                              "again") from None
    missing = [name for name, site in decl.sites.items() if site.smoothed and name not in scales]
    if missing:
        raise ExportError(f"{path}: {EXPORT_SCALES_FILE} lacks the scales of {missing}")
    return {name: _site_plan(site, scales.get(name)) for name, site in decl.sites.items()}


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence the expected load chatter (transform weights unknown to transformers, etc.)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def load_pretrained(
    path: str | Path,
    *,
    dtype: str | None = None,
    device: str = "cpu",
    activation_quantizer: str = "smoothrot",
) -> PreTrainedModel:
    """Load an export as a working model: weights via transformers (+ compressed-tensors), and
    the declared online rotation (and, for quantized formats, activation quantization) as hooks.

    ``activation_quantizer``: ``smoothrot`` (default) dequantizes the weights at load time and
    quantizes activations with smoothrot's fake quantizer (int: scale max|x|/(2^(b-1)−1);
    NVFP4: dynamic global scale), reproducing the in-memory fake-quant model exactly;
    ``compressed-tensors`` keeps compressed-tensors' own forward, whose int dynamic scale is
    max|x|/((2^b−1)/2) and whose NVFP4 global input scale is the calibrated static one.
    The hook handles are kept in ``model.smoothrot_hooks``.
    """
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path = Path(path)
    decl = read_declaration(path)
    if activation_quantizer not in ACTIVATION_QUANTIZERS:
        raise ExportError(f"activation_quantizer={activation_quantizer!r}; choose one of "
                          f"{list(ACTIVATION_QUANTIZERS)}")
    try:
        scheme = decl.quant_scheme()
    except ValueError as exc:
        raise ExportError(f"{path}: the declared quantization is no valid scheme: {exc}") from None
    if (decl.format in FP4_FORMATS and activation_quantizer == "compressed-tensors"
            and (dtype or decl.dtype) != "bfloat16"):
        raise ExportError(f"compressed-tensors decompresses {decl.format} weights to bfloat16, "
                          "which fails in a float model; pass dtype='bfloat16' or "
                          "activation_quantizer='smoothrot'")
    require_safetensors(path)
    kwargs = {"dtype": resolve_dtype(dtype) if dtype else "auto", "local_files_only": True,
              "use_safetensors": True}
    if scheme is not None and activation_quantizer == "smoothrot":
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if decl.format == "nvfp4" and activation_quantizer == "smoothrot":
        dequantize_nvfp4_exactly(model, path, decl.linears)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    own_quant = scheme if activation_quantizer == "smoothrot" else None
    if own_quant is None and scheme is not None and any(
            site.activation_clip not in (None, 1.0) for site in decl.sites.values()):
        log.warning("%s declares per-site activation clip ratios; compressed-tensors' activation "
                    "quantizer has none, so they are not applied (use activation_quantizer="
                    "'smoothrot' for the fitted model)", path)

    r1 = decl.residual_rotation
    resolved = {rs.name: rs for rs in resolve_sites(
        model, list(decl.sites), residual_kind=None if r1 is None else r1.kind)}
    names = {id(m): name for name, m in model.named_modules()}
    handles, skipped = [], 0
    for name, site in decl.sites.items():
        rs = resolved.get(name)
        linears = () if rs is None else tuple(names[id(lin)] for lin in rs.linears)
        if linears != site.linears:
            raise ExportError(f"{path}: site {name} declares linears {list(site.linears)} but the "
                              f"model's table gives {list(linears)}; was it exported by another "
                              "version?")
        transform = online_transform(rs, _site_plan(site, None))
        quant = None if own_quant is None else with_act_clip(own_quant, site.activation_clip)
        for linear in rs.linears:
            hook_transform = transform
            if not transform.rotation.is_identity and has_ct_transform(linear):
                hook_transform, skipped = IDENTITY, skipped + 1  # the loader rotates its input
            if hook_transform.rotation.is_identity and quant is None:
                continue
            hook = OnlineInputTransform(hook_transform, scheme=quant)
            handles.append(linear.register_forward_pre_hook(hook))
    if skipped:
        log.info("%d linears already rotated by compressed-tensors transforms", skipped)
    model.smoothrot_hooks = handles
    log.info("loaded %s export %s: %d online hooks (%s activations)", decl.format, path,
             len(handles), "no quantized" if scheme is None else activation_quantizer)
    return model
