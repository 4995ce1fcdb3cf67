"""The compressed-tensors side of an export: transform_config for the online rotations, NVFP4 /
MXFP4 checkpoints as llm-compressor writes them, and GPTQ codes stored as they are."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from smoothrot.arch.sites import resolve_sites
from smoothrot.core.fp4 import nvfp4_global_scale
from smoothrot.core.quantizers import quantize_weight_spec
from smoothrot.io.loader import load_pretrained, read_declaration
from smoothrot.io.verify import verify_export
from smoothrot.io.writer import ExportError, export_model
from smoothrot.methods.gptq import gptq_fused_weight
from smoothrot.schema.quant import get_scheme
from smoothrot.schema.rotation import Rotation
from tests.conftest import tiny_llama
from tests.unit.export_helpers import (
    CALIB,
    IDS,
    in_memory,
    logits,
    one_line,
    random_plans,
    rel,
)


def _online_only(tc: dict):
    """The declared transform config without the (already fused) weight-side transforms."""
    from compressed_tensors.transform import TransformConfig

    online = TransformConfig.model_validate(tc)
    for group in online.config_groups.values():
        group.apply = [a for a in group.apply if a.is_online()]
    return online


@pytest.mark.parametrize(("layer", "rotation", "group", "head_dim"), [
    ("down_proj", Rotation.full(), "smoothrot_full128", None),  # H over the 128 MLP channels
    ("o_proj", Rotation.full(), "smoothrot_full64", None),  # H over all 64 channels of 4 heads
    ("o_proj", Rotation.head(), "smoothrot_head16", 16),  # block-diagonal H over heads of 16
])
def test_power_of_two_rotation_is_declared_for_compressed_tensors(tmp_path, monkeypatch, layer,
                                                                  rotation, group, head_dim):
    from compressed_tensors.transform import apply_transform_config

    from smoothrot.arch import tables as mappings

    table = mappings.ARCHITECTURES["LlamaForCausalLM"]
    monkeypatch.setitem(mappings.ARCHITECTURES, "LlamaForCausalLM", dataclasses.replace(
        table, sites=tuple(dataclasses.replace(s, rotation=rotation) if s.name == layer else s
                           for s in table.sites)))
    model = tiny_llama(intermediate=128)
    ref = logits(model)
    path = export_model(model, random_plans(model, layers=(layer,)), tmp_path / "fused")
    config = json.loads((path / "config.json").read_text())
    tc = config["quantization_config"]["transform_config"]
    scheme = tc["config_groups"][group]
    assert scheme["type"] == "hadamard" and scheme["head_dim"] == head_dim
    prefix = "mlp" if layer == "down_proj" else "self_attn"
    names = [f"model.layers.{i}.{prefix}.{layer}" for i in range(2)]
    assert [(a["location"], a["inverse"], a["targets"]) for a in scheme["apply"]] == [
        ("input", False, names), ("weight_input", True, names)]
    assert read_declaration(path).transform_config_groups == (group,)
    # compressed-tensors itself, applying the declared online transform to a plain load,
    # computes the original function: its Sylvester H is smoothrot's H.
    plain = AutoModelForCausalLM.from_pretrained(path)
    apply_transform_config(plain, _online_only(tc))
    assert rel(logits(plain), ref) <= 1e-4


def test_load_pretrained_does_not_rotate_twice(tmp_path, monkeypatch):
    """If a loader already applied transform_config, load_pretrained adds no second H."""
    from compressed_tensors.transform import apply_transform_config

    model = tiny_llama(intermediate=128)
    ref = logits(model)
    path = export_model(model, random_plans(model), tmp_path / "fused")
    tc = json.loads((path / "config.json").read_text())["quantization_config"]["transform_config"]
    original = AutoModelForCausalLM.from_pretrained

    def loader_that_applies_transforms(*args, **kwargs):
        loaded = original(*args, **kwargs)
        apply_transform_config(loaded, _online_only(tc))
        return loaded

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loader_that_applies_transforms)
    loaded = load_pretrained(path)
    assert loaded.smoothrot_hooks == []
    assert rel(logits(loaded), ref) <= 1e-4


def test_non_power_of_two_rotation_is_declared_as_random_hadamard(tmp_path):
    """An order with no Sylvester matrix (MLP 96 = 12·8: a Paley factor) is a
    ``random-hadamard`` group whose stored weight is smoothrot's own H (times √n, ±1 entries),
    so compressed-tensors, applying the stored matrix, computes the original function."""
    from smoothrot.core.hadamard import hadamard_transform
    from smoothrot.io.runtime import load_without_smoothrot

    model = tiny_llama()
    ref = logits(model)
    path = export_model(model, random_plans(model), tmp_path / "fused")
    tc = json.loads((path / "config.json").read_text())["quantization_config"]["transform_config"]
    assert list(tc["config_groups"]) == ["smoothrot_full96"]
    scheme = tc["config_groups"]["smoothrot_full96"]
    assert scheme["type"] == "random-hadamard" and scheme["head_dim"] is None
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert [(a["location"], a["inverse"], a["targets"]) for a in scheme["apply"]] == [
        ("input", False, names), ("weight_input", True, names)]
    decl = read_declaration(path)
    assert decl.transform_config_groups == ("smoothrot_full96",)
    assert decl.transform_config_note is None  # a note only when nothing runs online
    assert decl.sites["model.layers.0.mlp.down_proj"].rotation == Rotation.full()
    stored = _ckpt(path, "model.layers.0.mlp.down_proj.smoothrot_full96_input.weight")
    h = torch.round(hadamard_transform(torch.eye(96, dtype=torch.float64)) * 96**0.5)
    assert torch.equal(stored.double(), h) and set(stored.unique().tolist()) == {-1.0, 1.0}
    assert rel(logits(load_without_smoothrot(path)), ref) <= 1e-4
    assert rel(logits(load_without_smoothrot(path, runtime="transformers")), ref) > 1e-3


def test_no_online_rotation_declares_no_transform_config(tmp_path):
    model = tiny_llama()
    plans = {name: dataclasses.replace(plan, rotation=Rotation.none())
             for name, plan in random_plans(model).items()}
    path = export_model(model, plans, tmp_path / "fused")
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    decl = read_declaration(path)
    assert decl.transform_config_groups == () and decl.transform_config_note


def _ckpt(path, key):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return f.get_tensor(key)


def _rotated_input_absmax(model, plans, ids):
    """max |x·H| at each down_proj input of the fused float model (what input_global_scale is)."""
    ref = in_memory(model, plans)
    amax = {}
    for rs in resolve_sites(ref, list(plans)):
        rs.linear.register_forward_pre_hook(
            lambda _m, a, name=rs.name: amax.__setitem__(
                name, max(amax.get(name, 0.0), float(a[0].abs().max()))))
    logits(ref, ids)
    return amax


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp4_reload_reproduces_the_fake_quant_model(tmp_path, fmt, dtype):
    model = tiny_llama()
    plans = random_plans(model)
    name = str(dtype).split(".")[1]
    path = export_model(model, plans, tmp_path / fmt, fmt=fmt, dtype=name, calibration=CALIB)
    loaded = load_pretrained(path)
    ref = in_memory(model, plans, get_scheme(fmt), dtype)
    for a, b in zip(resolve_sites(loaded, ["down_proj"]), resolve_sites(ref, ["down_proj"]),
                    strict=True):
        assert torch.equal(a.linear.weight, b.linear.weight)  # same E2M1 codes and scales
    assert torch.equal(logits(loaded), logits(ref))
    result = verify_export(path, model, IDS)
    assert result["passed"] and result["ppl_rel_diff"] == 0.0


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_checkpoint_is_what_compressed_tensors_writes(tmp_path, fmt):
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    model = tiny_llama()
    plans = random_plans(model)
    path = export_model(model, plans, tmp_path / fmt, fmt=fmt, calibration=CALIB)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    preset = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(
        fmt.upper(), list(plans))}).model_dump(exclude=["quant_method"])["config_groups"]
    assert (qc["format"], qc["quantization_status"]) == (f"{fmt}-pack-quantized", "compressed")
    assert qc["config_groups"]["group_0"].pop("format") == f"{fmt}-pack-quantized"
    assert preset["group_0"].pop("format") is None  # the preset leaves it to the compressor
    assert qc["config_groups"] == preset
    assert "lm_head" in qc["ignore"] and "model.layers.0.mlp.up_proj" in qc["ignore"]
    site = "model.layers.1.mlp.down_proj"
    packed, scale = _ckpt(path, f"{site}.weight_packed"), _ckpt(path, f"{site}.weight_scale")
    block = 16 if fmt == "nvfp4" else 32
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (64, 96 // 2)
    assert tuple(scale.shape) == (64, 96 // block)
    assert scale.dtype == (torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8)
    if fmt == "nvfp4":
        fused = resolve_sites(in_memory(model, plans), [site])[0].linear.weight
        assert torch.equal(_ckpt(path, f"{site}.weight_global_scale"),
                           nvfp4_global_scale(fused.abs().max()).reshape(1))
        amax = _rotated_input_absmax(model, plans, CALIB)[site]
        assert torch.equal(_ckpt(path, f"{site}.input_global_scale"),
                           nvfp4_global_scale(torch.tensor(amax)).reshape(1))
        # compressed-tensors' own decompression rounds the weight to bfloat16 (why load_pretrained
        # redoes it in float32): equal to ours after that rounding, not before.
        from transformers import CompressedTensorsConfig

        ct = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=CompressedTensorsConfig(dequantize=True))
        ours = load_pretrained(path).get_submodule(site).weight
        theirs = ct.get_submodule(site).weight
        assert torch.equal(theirs, ours.bfloat16().float()) and not torch.equal(theirs, ours)


def test_nvfp4_with_compressed_tensors_activations(tmp_path):
    """compressed-tensors' NVFP4 forward (static calibrated global input scale) after our
    rotation: not the fake-quant model's dynamic global scale, but of the same quality."""
    model = tiny_llama()
    plans = random_plans(model, decades=0.5)
    path = export_model(model, plans, tmp_path / "e", fmt="nvfp4", calibration=CALIB)
    with pytest.raises(ExportError, match="bfloat16") as info:
        load_pretrained(path, activation_quantizer="compressed-tensors")
    one_line(info)
    ct = logits(load_pretrained(path, dtype="bfloat16", activation_quantizer="compressed-tensors"))
    fake_quant = logits(in_memory(model, plans, get_scheme("nvfp4"), torch.bfloat16))
    ref = logits(model)
    assert torch.isfinite(ct).all() and not torch.equal(ct, fake_quant)
    assert rel(ct, ref) <= 1.5 * rel(fake_quant, ref)


def _gptq_plans(model, plans, scheme, **kwargs):
    """Plans whose fused weights are GPTQ-rounded on correlated random inputs."""
    gen = torch.Generator().manual_seed(3)
    out = {}
    for rs in resolve_sites(model, list(plans)):
        x = (torch.randn(256, 8, generator=gen) @ torch.randn(8, rs.in_features, generator=gen)
             + 0.1 * torch.randn(256, rs.in_features, generator=gen))
        plan = plans[rs.name]
        wq = gptq_fused_weight(rs.weight, plan.scales, rs.transform.with_rotation(plan.rotation),
                               x, scheme, **kwargs)
        out[rs.name] = dataclasses.replace(plan, weight_q=wq)
    return out


@pytest.mark.parametrize("fmt", ["w4a4", "nvfp4", "mxfp4"])
def test_gptq_codes_are_stored_not_requantized(tmp_path, fmt):
    model = tiny_llama()
    scheme = get_scheme(fmt)
    plans = _gptq_plans(model, random_plans(model, decades=0.5), scheme)
    path = export_model(model, plans, tmp_path / fmt, fmt=fmt, calibration=CALIB)
    loaded = load_pretrained(path)
    fused = in_memory(model, {k: dataclasses.replace(p, weight_q=None) for k, p in plans.items()})
    for a, b in zip(resolve_sites(loaded, list(plans)), resolve_sites(fused, list(plans)),
                    strict=True):
        wq = plans[a.name].weight_q
        assert rel(a.linear.weight, wq) <= 1e-6  # the GPTQ codes (scales equal up to 1 ulp)
        rtn = quantize_weight_spec(b.linear.weight, scheme)
        assert float((a.linear.weight != rtn).float().mean()) > 0.05  # not a re-quantization
    ref = in_memory(model, plans, scheme)
    assert rel(logits(loaded), logits(ref)) <= 1e-5
    assert read_declaration(path).gptq
    with pytest.raises(ExportError, match="GPTQ-rounded") as info:
        verify_export(path, model, IDS)
    one_line(info)
    result = verify_export(path, model, IDS, plans=plans)
    assert result["passed"] and result["ppl_rel_diff"] <= 1e-5
