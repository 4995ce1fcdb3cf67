"""The bridge to compressed-tensors: how smoothrot's plans become what llm-compressor writes.

* Quantized formats: the linears of the planned sites get compressed-tensors quantization
  parameters computed by smoothrot's own quantizers (``core.quantizers``), so the compressor
  (``int-quantized``, ``nvfp4-`` / ``mxfp4-pack-quantized``) stores exactly the codes smoothrot's
  fake quant uses; GPTQ codes (``SitePlan.weight_q``) are stored as they are.
* Online rotations: declared as ``transform_config`` groups (input, plus the inverse on the
  already fused weight, as llm-compressor's SpinQuant R4 writes it) whose stored weights are
  smoothrot's own H for every size: vLLM and compressed-tensors then compute exactly x·H
  (docs/deployment.md).
* Reload: NVFP4 weights are dequantized again in the compute dtype (compressed-tensors rounds
  them to bfloat16), and a module a loader already rotates is recognized.

compressed-tensors is imported inside the functions: it is slow to import and only an export
or a reload needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from smoothrot.core import fp4
from smoothrot.core.quantizers import weight_quantizer
from smoothrot.core.transform import stored_hadamard
from smoothrot.schema.declaration import SiteDeclaration
from smoothrot.schema.export import FP4_FORMATS, ExportError
from smoothrot.schema.quant import QuantScheme
from smoothrot.schema.rotation import RotationKind

TRANSFORM_GROUP = "smoothrot"


@dataclass(frozen=True)
class TransformConfigs:
    """compressed-tensors transform configs of an export's online rotations: ``full`` (online
    input transform + inverse on the fused weight) for config.json, ``online`` (input only) to
    register the transform modules whose weights are saved, and ``weights``: per group the
    stored matrix (√n·H, ±1 entries: both loaders divide by √n); all empty with ``note`` when
    nothing runs online."""

    full: Any = None
    online: Any = None
    weights: Mapping[str, torch.Tensor] = field(default_factory=dict)
    note: str | None = None


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def transform_configs(
    sites: Mapping[str, SiteDeclaration], in_features: Mapping[str, int], precision: torch.dtype
) -> TransformConfigs:
    """The transform configs of the declared online rotations (``in_features`` per site).

    One group per Hadamard order and kind (``head_dim``: the block size of a block-diagonal
    rotation; None: H over the whole input), so every group has one matrix, as vLLM requires
    (it shares one tensor per group and size). Power-of-two orders are ``hadamard`` groups
    (Sylvester, the same matrix smoothrot uses: vLLM runs its fast kernel and ignores the stored
    weight); other orders are ``random-hadamard`` groups, which vLLM and compressed-tensors apply
    as a dense product with the *stored* weight, here smoothrot's own H.
    """
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    groups: dict[tuple[str, int, bool], list[str]] = {}
    for name, site in sites.items():
        if site.rotation.is_online():
            order = site.rotation.order(in_features[name])
            whole = site.rotation.kind is RotationKind.FULL
            groups.setdefault((site.rotation.kind.value, order, whole), []).extend(site.linears)
    if not groups:
        return TransformConfigs(note="no online rotation")
    full, online, weights = {}, {}, {}
    for (kind, order, whole), targets in groups.items():
        name = f"{TRANSFORM_GROUP}_{kind}{order}"
        kw = {"type": "hadamard" if _is_pow2(order) else "random-hadamard",
              "head_dim": None if whole else order, "precision": precision}
        inp = TransformArgs(targets=list(targets), location="input")
        fused = TransformArgs(targets=list(targets), location="weight_input", inverse=True)
        full[name] = TransformScheme(apply=[inp, fused], **kw)
        online[name] = TransformScheme(apply=[inp], **kw)
        weights[name] = stored_hadamard(order)
    return TransformConfigs(TransformConfig(config_groups=full),
                            TransformConfig(config_groups=online), weights)


def transform_group(module_name: str) -> str:
    """The group of a registered transform module or its weight (``<linear>.<group>_input``)."""
    return module_name.removesuffix(".weight").rpartition(".")[2].removesuffix("_input")


@torch.no_grad()
def set_transform_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Give every registered transform of a group in ``weights`` that matrix (a group's
    linears share one tensor, as vLLM's loader shares it)."""
    for name, module in model.named_modules():
        group = transform_group(name)
        if group in weights and isinstance(getattr(module, "weight", None), torch.Tensor):
            module.weight.copy_(weights[group].to(module.weight))


def attach_transforms(model: nn.Module, ct: TransformConfigs) -> None:
    """Register the online transforms on ``model`` (compressed-tensors' own
    ``apply_transform_config``) and give them smoothrot's matrices: what is saved with the
    export, and what a loader without smoothrot then applies."""
    from compressed_tensors.transform import apply_transform_config

    try:
        apply_transform_config(model, ct.online)
    except ValueError as exc:
        raise ExportError(f"compressed-tensors cannot build this rotation ({exc}); split it into "
                          "power-of-two blocks with rotation.block_size, e.g. 512") from None
    set_transform_weights(model, ct.weights)


def has_ct_transform(module: nn.Module) -> bool:
    """True if a loader already attached a compressed-tensors transform to this module."""
    try:
        from compressed_tensors.transform.factory.base import TransformBase
    except ImportError:  # pragma: no cover - compressed-tensors is a dependency
        return False
    return any(isinstance(child, TransformBase) for child in module.children())


def ct_scheme(scheme: QuantScheme, targets: list[str]) -> Any:
    """compressed-tensors' QuantizationScheme for ``scheme``: its own NVFP4 / MXFP4 preset, or
    per-channel int weights with dynamic per-token int activations."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationScheme,
        preset_name_to_scheme,
    )

    if scheme.w_format in FP4_FORMATS:
        return preset_name_to_scheme(scheme.w_format.upper(), targets)

    def args(bits: int, strategy: str, dynamic: bool) -> QuantizationArgs:
        return QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy=strategy,
                                dynamic=dynamic)

    return QuantizationScheme(targets=targets, weights=args(scheme.w_bits, "channel", False),
                              input_activations=args(scheme.a_bits, "token", True))


@torch.no_grad()
def _weight_params(
    weight: torch.Tensor, scheme: QuantScheme, weight_q: torch.Tensor | None, name: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weight to compress, compressed-tensors weight parameters) as core.quantizers has them.

    The scales are fitted on the fused float ``weight`` (in float32 for half weights, as
    fake_quant computes), so compressed-tensors' compressor reproduces fake_quant's codes. NVFP4's
    stored block scale is the E4M3 number S with scale = S / G (exact: rounding S/G·G to E4M3
    recovers S). ``weight_q`` (GPTQ) is compressed instead of the float weight; it must lie on the
    same grid, or (symmetric int) on one its own codes give, so the compressor stores its codes
    rather than new ones.
    """
    wf = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    quant = weight_quantizer(scheme)
    global_amax = quant.global_amax(wf)
    qp = quant.fit(quant.grouped(wf), global_amax)
    params = {"weight_scale": qp.scale.reshape(weight.shape[0], -1)}
    if scheme.w_format == "nvfp4":
        global_scale = fp4.nvfp4_global_scale(global_amax).reshape(1)
        params = {"weight_scale": fp4.round_e4m3(params["weight_scale"] * global_scale),
                  "weight_global_scale": global_scale}
    if weight_q is None:
        return wf, params
    wq = weight_q.detach().to(device=wf.device, dtype=wf.dtype)
    wg = quant.grouped(wq)
    on_grid = quant.quantize_with(wg, qp).reshape(wq.shape)
    if not torch.allclose(on_grid, wq, rtol=1e-5, atol=0.0):
        # Rounded on another grid than the stored float weight's (a least-squares target's,
        # or scales that moved after rounding): store the grid its codes lie on.
        own = quant.grid_of(wg)
        if own is not None:
            params = {"weight_scale": own.scale.reshape(weight.shape[0], -1)}
            on_grid = quant.quantize_with(wg, own).reshape(wq.shape)
    if not torch.allclose(on_grid, wq, rtol=1e-5, atol=0.0):
        raise ExportError(f"{name}: weight_q is not on the {scheme.name} grid of the fused weight "
                          "nor on any grid the format stores (grouped GPTQ fits each group when "
                          "reached): round with act_order or static_groups")
    return wq, params


def quantize_sites(
    model: nn.Module,
    linear_names: list[str],
    scheme: QuantScheme,
    weights_q: Mapping[str, torch.Tensor],
    input_amax: Mapping[str, torch.Tensor],
) -> Any:
    """Quantize the named linears in place with compressed-tensors; returns the ModelCompressor.

    The parameters are smoothrot's (:func:`_weight_params`); compressed-tensors' compressor for
    the scheme's format (int8: int-quantized, int4: pack-quantized, nvfp4- / mxfp4-pack-quantized)
    rounds and packs them.
    ``input_amax`` (NVFP4): max |x| of each linear's rotated input, for the static input scale.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
    )

    qcfg = QuantizationConfig(config_groups={"group_0": ct_scheme(scheme, linear_names)})
    apply_quantization_config(model, qcfg)
    for name in linear_names:
        linear = model.get_submodule(name)
        weight, params = _weight_params(linear.weight.detach(), scheme, weights_q.get(name), name)
        if name in input_amax:
            params["input_global_scale"] = fp4.nvfp4_global_scale(input_amax[name]).reshape(1)
        linear.weight.data = weight
        for key, value in params.items():
            setattr(linear, key, nn.Parameter(value.contiguous(), requires_grad=False))
        linear.quantization_status = QuantizationStatus.FROZEN
    # int4 as pack-quantized (eight codes per int32), the only int W4A4 layout vLLM reads
    # (CompressedTensorsWNA4Int); compressed-tensors would infer int-quantized (a byte a code).
    packed = scheme.w_format == "int" and scheme.w_bits == 4
    from loguru import logger  # compressed-tensors' logger

    logger.disable("compressed_tensors")  # it warns that it would have inferred int-quantized
    try:
        compressor = ModelCompressor.from_pretrained_model(
            model, quantization_format="pack-quantized" if packed else None)
    finally:
        logger.enable("compressed_tensors")
    compressor.compress_model(model)
    compressor.remove_decompression_hook(model)
    return compressor


def checkpoint_tensors(path: Path, keys: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    """Tensors of a (possibly sharded) safetensors checkpoint folder, by the name ``keys`` gives
    a stored key (None: not wanted; the first key of a name wins)."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - not a dict
                name = keys(key)
                if name is not None and name not in out:
                    out[name] = f.get_tensor(key)
    return out


def _require(path: Path, found: Mapping[str, torch.Tensor], wanted: set[str]) -> None:
    missing = sorted(wanted - set(found))
    if missing:
        raise ExportError(f"{path}: checkpoint lacks {missing[0]} (and {len(missing) - 1} more); "
                          "was it written by another tool?")


def stored_transform_weights(path: Path, groups: set[str]) -> dict[str, torch.Tensor]:
    """Per transform group, its stored weight (the checkpoint may keep a group's shared tensor
    under its first linear's name only)."""
    out = checkpoint_tensors(path, lambda k: transform_group(k)
                             if k.endswith("_input.weight") and transform_group(k) in groups
                             else None)
    _require(path, out, groups)
    return out


@torch.no_grad()
def dequantize_nvfp4_exactly(model: nn.Module, path: Path, linears: Sequence[str]) -> None:
    """Redo compressed-tensors' NVFP4 decompression of ``linears`` in the compute dtype.

    Its decompressor unpacks the E2M1 codes to bfloat16 and so rounds every dequantized weight
    E2M1·S/G to bfloat16 (≈0.2 % off in a float32 model); here the same unpack and dequantize
    functions run in float32 (float64 for float64 exports), as smoothrot's fake quant computes.
    """
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    args = preset_name_to_scheme("NVFP4", list(linears)).weights
    suffixes = ("weight_packed", "weight_scale", "weight_global_scale")
    wanted = {f"{n}.{s}" for n in linears for s in suffixes}
    tensors = checkpoint_tensors(path, lambda k: k if k in wanted else None)
    _require(path, tensors, wanted)
    for name in linears:
        weight = model.get_submodule(name).weight
        work = torch.float64 if weight.dtype == torch.float64 else torch.float32
        packed, scale, global_scale = (tensors[f"{name}.{s}"] for s in suffixes)
        codes = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=work)
        value = dequantize(codes, scale.to(work), args=args, global_scale=global_scale,
                           dtype=work)
        weight.copy_(value.to(device=weight.device, dtype=weight.dtype))
