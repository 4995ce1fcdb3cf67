"""Exports reload to the same function (fused) / the same fake-quant model (w8a8, w4a4, nvfp4,
mxfp4, RTN or GPTQ weights)."""

from __future__ import annotations

import copy
import dataclasses
import errno
import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from smoothrot.arch.sites import resolve_sites
from smoothrot.core.fp4 import nvfp4_global_scale
from smoothrot.core.gptq import gptq_fused_weight
from smoothrot.core.quantizers import quantize_weight_spec
from smoothrot.io import export as ex
from smoothrot.io.export import ExportError, export_model, load_pretrained
from smoothrot.job import FitResult, SchemeResult
from smoothrot.models import model_fingerprint
from smoothrot.report import save_scales
from smoothrot.schema.config import FitConfig, get_scheme
from smoothrot.surgery.hooks import apply_plans
from smoothrot.surgery.plan import SitePlan
from tests.conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[2]
IDS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(5))


def _plans(model, layers=("down_proj",), decades=4.0, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return {rs.name: SitePlan(10 ** ((torch.rand(rs.n_scales, generator=gen,
                                                 dtype=torch.float64) - 0.5) * decades), True)
            for rs in resolve_sites(model, list(layers))}


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _in_memory(model, plans, scheme=None, dtype=None):
    """The model smoothrot evaluates: fused (and fake-quantized) in memory, in ``dtype``."""
    ref = copy.deepcopy(model) if dtype is None else ex._as_loaded(model, dtype)
    apply_plans(resolve_sites(ref, list(plans)), plans, scheme)
    return ref


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


# --- fused ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "limit"), [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_fused_reload_gives_the_original_logits(tmp_path, dtype, limit):
    model = tiny_llama(dtype=dtype)
    ref = _logits(model)
    plans = _plans(model)
    path = export_model(model, plans, tmp_path / "fused", dtype=str(dtype).split(".")[1])
    assert torch.equal(_logits(model), ref), "the exported model itself is not modified"
    loaded = load_pretrained(path)
    assert loaded.dtype == dtype and len(loaded.smoothrot_hooks) == 2
    assert _rel(_logits(loaded), ref) <= limit
    fused = _in_memory(model, plans)
    for a, b in zip(resolve_sites(loaded, ["down_proj"]), resolve_sites(fused, ["down_proj"]),
                    strict=True):
        assert torch.equal(a.linear.weight, b.linear.weight)  # W·diag(s)·H, stored as computed
        assert torch.equal(a.smooth_from.weight, b.smooth_from.weight)  # up_proj rows / s
    for h in loaded.smoothrot_hooks:
        h.remove()
    assert _rel(_logits(loaded), ref) > 1e-3, "without the online H the function differs"


def test_verify_export_reports_pass(tmp_path):
    model = tiny_llama()
    path = export_model(model, _plans(model), tmp_path / "fused")
    result = ex.verify_export(path, model, IDS)
    assert result["passed"] and result["logit_rel_error"] <= 1e-4


@pytest.mark.parametrize("fmt", ["fused", "w4a4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_exports_match_the_in_memory_model_bit_for_bit(tmp_path, fmt, dtype):
    model = tiny_llama()
    plans = _plans(model)
    name = str(dtype).split(".")[1]
    loaded = load_pretrained(export_model(model, plans, tmp_path / "e", fmt=fmt, dtype=name))
    ref = _in_memory(model, plans, None if fmt == "fused" else get_scheme(fmt), dtype)
    assert loaded.dtype == dtype
    assert torch.equal(_logits(loaded), _logits(ref))


# --- quantized --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["w8a8", "w4a4"])
def test_quantized_reload_reproduces_the_fake_quant_model(tmp_path, fmt):
    model = tiny_llama()
    plans = _plans(model)
    bits = int(fmt[1])
    path = export_model(model, plans, tmp_path / fmt, fmt=fmt)
    loaded = load_pretrained(path)
    ref = _in_memory(model, plans, get_scheme(fmt))
    for a, b in zip(resolve_sites(loaded, ["down_proj"]), resolve_sites(ref, ["down_proj"]),
                    strict=True):
        assert torch.equal(a.linear.weight, b.linear.weight)  # same RTN integers and scales
    assert torch.equal(_logits(loaded), _logits(ref))

    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == (
        "compressed-tensors", "int-quantized", "compressed")
    group = qc["config_groups"]["group_0"]
    targets = list(plans)
    assert group["targets"] == targets
    assert {k: group["weights"][k]
            for k in ("num_bits", "type", "symmetric", "strategy", "dynamic")} == {
        "num_bits": bits, "type": "int", "symmetric": True, "strategy": "channel",
        "dynamic": False}
    assert {k: group["input_activations"][k]
            for k in ("num_bits", "type", "symmetric", "strategy", "dynamic")} == {
        "num_bits": bits, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    assert "lm_head" in qc["ignore"] and "model.layers.0.mlp.up_proj" in qc["ignore"]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.1.mlp.down_proj.weight")
        assert q.dtype == torch.int8
        assert int(q.min()) >= -(2 ** (bits - 1)) and int(q.max()) <= 2 ** (bits - 1) - 1
        assert f.get_tensor("model.layers.1.mlp.up_proj.weight").dtype == torch.float32
        assert "model.layers.1.mlp.down_proj.weight_scale" in f.keys()  # noqa: SIM118
    stored = ex.plans_from_export(path)
    assert all(torch.equal(stored[k].scales, plans[k].scales) for k in plans)
    result = ex.verify_export(path, model, IDS)
    assert result["passed"] and result["ppl_rel_diff"] == 0.0


@pytest.mark.parametrize("fmt", ["w8a8", "w4a4"])
def test_compressed_tensors_activation_quantizer(tmp_path, fmt):
    """compressed-tensors' own forward (dynamic scale max|x|/((2^b−1)/2)) after our rotation: a
    different grid from the fake-quant model's, of the same quality (docs/equivalence.md)."""
    model = tiny_llama()
    plans = _plans(model, decades=0.5)
    path = export_model(model, plans, tmp_path / fmt, fmt=fmt)
    ct = _logits(load_pretrained(path, activation_quantizer="compressed-tensors"))
    fake_quant = _logits(_in_memory(model, plans, get_scheme(fmt)))
    ref = _logits(model)
    assert torch.isfinite(ct).all() and not torch.equal(ct, fake_quant)
    assert _rel(ct, ref) <= 1.5 * _rel(fake_quant, ref)
    unrotated = load_pretrained(path, activation_quantizer="compressed-tensors")
    for h in unrotated.smoothrot_hooks:
        h.remove()
    assert _rel(_logits(unrotated), ref) > 4 * _rel(ct, ref), "the rotation is applied"


# --- transform_config (compressed-tensors' declaration of the online rotation) ----------------


@pytest.mark.parametrize(("layer", "rotation", "group", "head_dim"), [
    ("down_proj", "online", "smoothrot", None),  # H over the 128 MLP channels
    ("o_proj", "online", "smoothrot", None),  # H over all 64 channels of the 4 heads
    ("o_proj", "head_online", "smoothrot_head16", 16),  # block-diagonal H over heads of 16
])
def test_power_of_two_rotation_is_declared_for_compressed_tensors(tmp_path, monkeypatch, layer,
                                                                  rotation, group, head_dim):
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    from smoothrot.arch import tables as mappings

    table = mappings.ARCHITECTURES["LlamaForCausalLM"]
    monkeypatch.setitem(mappings.ARCHITECTURES, "LlamaForCausalLM", dataclasses.replace(
        table, sites=tuple(dataclasses.replace(s, rotation=rotation) if s.name == layer else s
                           for s in table.sites)))
    model = tiny_llama(intermediate=128)
    ref = _logits(model)
    path = export_model(model, _plans(model, layers=(layer,)), tmp_path / "fused")
    config = json.loads((path / "config.json").read_text())
    tc = config["quantization_config"]["transform_config"]
    scheme = tc["config_groups"][group]
    assert scheme["type"] == "hadamard" and scheme["head_dim"] == head_dim
    prefix = "mlp" if layer == "down_proj" else "self_attn"
    names = [f"model.layers.{i}.{prefix}.{layer}" for i in range(2)]
    assert [(a["location"], a["inverse"], a["targets"]) for a in scheme["apply"]] == [
        ("input", False, names), ("weight_input", True, names)]
    assert config["smoothrot"]["transform_config_groups"] == [group]
    # compressed-tensors itself, applying the declared online transform to a plain load,
    # computes the original function: its Sylvester H is smoothrot's H.
    plain = AutoModelForCausalLM.from_pretrained(path)
    online = TransformConfig.model_validate(tc)
    for g in online.config_groups.values():
        g.apply = [a for a in g.apply if a.is_online()]
    apply_transform_config(plain, online)
    assert _rel(_logits(plain), ref) <= 1e-4


def test_load_pretrained_does_not_rotate_twice(tmp_path, monkeypatch):
    """If a loader already applied transform_config, load_pretrained adds no second H."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    model = tiny_llama(intermediate=128)
    ref = _logits(model)
    path = export_model(model, _plans(model), tmp_path / "fused")
    tc = json.loads((path / "config.json").read_text())["quantization_config"]["transform_config"]
    original = AutoModelForCausalLM.from_pretrained

    def loader_that_applies_transforms(*args, **kwargs):
        loaded = original(*args, **kwargs)
        online = TransformConfig.model_validate(tc)
        for group in online.config_groups.values():
            group.apply = [a for a in group.apply if a.is_online()]
        apply_transform_config(loaded, online)
        return loaded

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loader_that_applies_transforms)
    loaded = load_pretrained(path)
    assert loaded.smoothrot_hooks == []
    assert _rel(_logits(loaded), ref) <= 1e-4


def test_non_power_of_two_rotation_is_declared_for_smoothrot_only(tmp_path):
    model = tiny_llama()  # MLP 96 = 12·8: a Paley factor, no Sylvester matrix
    path = export_model(model, _plans(model), tmp_path / "fused")
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    decl = config["smoothrot"]
    assert decl["transform_config_groups"] == []
    assert "not a power of two" in decl["transform_config_note"]
    assert decl["sites"]["model.layers.0.mlp.down_proj"]["online_rotation"] == "online"
    assert decl["sites"]["model.layers.0.mlp.down_proj"]["rotation_size"] == 96


def test_all_site_kinds_round_trip(tmp_path):
    """qkv (norm γ), o_proj (H over all heads, tied GQA scales), gate_up and down_proj."""
    model = tiny_llama()
    ref = _logits(model)
    plans = _plans(model, layers=("all",))
    assert len(plans) == 8
    path = export_model(model, plans, tmp_path / "w8a8", fmt="w8a8")
    loaded = load_pretrained(path)
    assert torch.equal(_logits(loaded), _logits(_in_memory(model, plans, get_scheme("w8a8"))))
    fused = load_pretrained(export_model(model, plans, tmp_path / "fused"))
    assert _rel(_logits(fused), ref) <= 1e-4
    decl = json.loads((path / "config.json").read_text())["smoothrot"]
    assert decl["sites"]["model.layers.0.self_attn.o_proj"]["online_rotation"] == "online"


def test_residual_rotation_is_exported_with_untied_head(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                      max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    ref = _logits(model)
    path = export_model(model, _plans(model), tmp_path / "r1", residual_seed=0)
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["smoothrot"]["residual_rotation"]["untied_lm_head"] is True
    assert _rel(_logits(load_pretrained(path)), ref) <= 1e-4


# --- safety: overflow, existing targets, failures mid-write -----------------------------------


@pytest.mark.parametrize(("channel_scale", "param"), [
    (1e9, "model.layers.0.mlp.down_proj.weight"),  # W·diag(s) grows
    (1e-9, "model.layers.0.mlp.up_proj.weight"),  # up rows / s grow
])
def test_fp16_overflow_is_a_one_line_error(tmp_path, channel_scale, param):
    model = tiny_llama()
    plans = _plans(model, decades=0.0)
    scales = plans["model.layers.0.mlp.down_proj"].scales.clone()
    scales[3] = channel_scale
    plans["model.layers.0.mlp.down_proj"] = SitePlan(scales, True)
    with pytest.raises(ExportError) as info:
        export_model(model, plans, tmp_path / "fp16", dtype="float16")
    msg = _one_line(info)
    assert msg.startswith(param) and "log_bound" in msg and "float32" in msg
    assert "65504" in msg or "6.55e+04" in msg
    assert list(tmp_path.iterdir()) == []
    export_model(model, plans, tmp_path / "fp32")  # the fix the message names works


def test_existing_target_needs_overwrite(tmp_path):
    model = tiny_llama()
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(ExportError, match=r"already exists.*overwrite") as info:
        export_model(model, _plans(model), target)
    _one_line(info)
    export_model(model, _plans(model), target, overwrite=True)
    assert not (target / "old.txt").exists() and (target / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~mask  # not mkdtemp's 0700
    assert stat.S_IMODE((target / "model.safetensors").stat().st_mode) == 0o666 & ~mask


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("writer", ["save_pretrained", "metadata"])
def test_failure_mid_write_leaves_no_partial_folder(tmp_path, monkeypatch, writer, existing):
    model = tiny_llama()
    target = tmp_path / "out"
    if existing:
        target.mkdir()
        (target / "old.txt").write_text("old")
    if writer == "save_pretrained":
        original = PreTrainedModel.save_pretrained

        def partial_then_full(self, save_directory, *args, **kwargs):
            (Path(save_directory) / "model.safetensors").write_bytes(b"\0" * 1024)  # partial
            _disk_full()

        monkeypatch.setattr(PreTrainedModel, "save_pretrained", partial_then_full)
        assert original is not partial_then_full
    else:
        monkeypatch.setattr(ex, "_write_json", _disk_full)  # after the weights were written
    with pytest.raises(OSError, match="No space left"):
        export_model(model, _plans(model), target, overwrite=existing)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == (["out"] if existing else [])
    if existing:
        assert [p.name for p in target.iterdir()] == ["old.txt"]


def test_load_pretrained_rejects_a_plain_checkpoint(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "plain")
    with pytest.raises(ExportError, match="not a smoothrot export") as info:
        load_pretrained(tmp_path / "plain")
    _one_line(info)


def _ckpt(path, key):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return f.get_tensor(key)


def _rotated_input_absmax(model, plans, ids):
    """max |x·H| at each down_proj input of the fused float model (what input_global_scale is)."""
    ref = _in_memory(model, plans)
    amax = {}
    for rs in resolve_sites(ref, list(plans)):
        rs.linear.register_forward_pre_hook(
            lambda _m, a, name=rs.name: amax.__setitem__(
                name, max(amax.get(name, 0.0), float(a[0].abs().max()))))
    _logits(ref, ids)
    return amax


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp4_reload_reproduces_the_fake_quant_model(tmp_path, fmt, dtype):
    model = tiny_llama()
    plans = _plans(model)
    name = str(dtype).split(".")[1]
    path = export_model(model, plans, tmp_path / fmt, fmt=fmt, dtype=name, calibration=CALIB)
    loaded = load_pretrained(path)
    ref = _in_memory(model, plans, get_scheme(fmt), dtype)
    for a, b in zip(resolve_sites(loaded, ["down_proj"]), resolve_sites(ref, ["down_proj"]),
                    strict=True):
        assert torch.equal(a.linear.weight, b.linear.weight)  # same E2M1 codes and scales
    assert torch.equal(_logits(loaded), _logits(ref))
    result = ex.verify_export(path, model, IDS)
    assert result["passed"] and result["ppl_rel_diff"] == 0.0


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_checkpoint_is_what_compressed_tensors_writes(tmp_path, fmt):
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    model = tiny_llama()
    plans = _plans(model)
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
        fused = resolve_sites(_in_memory(model, plans), [site])[0].linear.weight
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
    plans = _plans(model, decades=0.5)
    path = export_model(model, plans, tmp_path / "e", fmt="nvfp4", calibration=CALIB)
    with pytest.raises(ExportError, match="bfloat16") as info:
        load_pretrained(path, activation_quantizer="compressed-tensors")
    _one_line(info)
    ct = _logits(load_pretrained(path, dtype="bfloat16", activation_quantizer="compressed-tensors"))
    fake_quant = _logits(_in_memory(model, plans, get_scheme("nvfp4"), torch.bfloat16))
    ref = _logits(model)
    assert torch.isfinite(ct).all() and not torch.equal(ct, fake_quant)
    assert _rel(ct, ref) <= 1.5 * _rel(fake_quant, ref)


def _gptq_plans(model, plans, scheme, **kwargs):
    """Plans whose fused weights are GPTQ-rounded on correlated random inputs."""
    gen = torch.Generator().manual_seed(3)
    out = {}
    for rs in resolve_sites(model, list(plans)):
        x = (torch.randn(256, 8, generator=gen) @ torch.randn(8, rs.in_features, generator=gen)
             + 0.1 * torch.randn(256, rs.in_features, generator=gen))
        wq = gptq_fused_weight(rs.weight, plans[rs.name].scales, rs.transform.arg, x, scheme,
                               **kwargs)
        out[rs.name] = SitePlan(plans[rs.name].scales, True, weight_q=wq)
    return out


@pytest.mark.parametrize("fmt", ["w4a4", "nvfp4", "mxfp4"])
def test_gptq_codes_are_stored_not_requantized(tmp_path, fmt):
    model = tiny_llama()
    scheme = get_scheme(fmt)
    plans = _gptq_plans(model, _plans(model, decades=0.5), scheme)
    path = export_model(model, plans, tmp_path / fmt, fmt=fmt, calibration=CALIB)
    loaded = load_pretrained(path)
    fused = _in_memory(model, {k: SitePlan(p.scales, True) for k, p in plans.items()})
    for a, b in zip(resolve_sites(loaded, list(plans)), resolve_sites(fused, list(plans)),
                    strict=True):
        wq = plans[a.name].weight_q
        assert _rel(a.linear.weight, wq) <= 1e-6  # the GPTQ codes (scales equal up to 1 ulp)
        rtn = quantize_weight_spec(b.linear.weight, scheme)
        assert float((a.linear.weight != rtn).float().mean()) > 0.05  # not a re-quantization
    ref = _in_memory(model, plans, scheme)
    assert _rel(_logits(loaded), _logits(ref)) <= 1e-5
    decl = ex.read_declaration(path)
    assert decl["weight_quantization"]["rounding"] == "gptq"
    with pytest.raises(ExportError, match="GPTQ-rounded") as info:
        ex.verify_export(path, model, IDS)
    _one_line(info)
    result = ex.verify_export(path, model, IDS, plans=plans)
    assert result["passed"] and result["ppl_rel_diff"] <= 1e-5


def test_gptq_and_fp4_requests_that_cannot_be_honoured(tmp_path):
    model = tiny_llama()
    plans = _plans(model)
    site = next(iter(plans))
    gptq = {site: SitePlan(plans[site].scales, True, weight_q=torch.randn(64, 96))}
    with pytest.raises(ExportError, match="'fused' cannot store") as info:
        export_model(model, gptq, tmp_path / "a")
    _one_line(info)
    with pytest.raises(ExportError, match="not on the w4a4 grid") as info:
        export_model(model, gptq, tmp_path / "b", fmt="w4a4")
    _one_line(info)
    with pytest.raises(ExportError, match="has shape") as info:
        export_model(model, {site: SitePlan(None, True, weight_q=torch.zeros(64, 95))},
                     tmp_path / "c", fmt="w4a4")
    _one_line(info)
    with pytest.raises(ExportError, match="calibration token windows") as info:
        export_model(model, plans, tmp_path / "d", fmt="nvfp4")
    _one_line(info)
    with pytest.raises(ExportError, match="needs an mxfp4 scheme") as info:
        export_model(model, plans, tmp_path / "e", fmt="mxfp4", scheme="nvfp4")
    _one_line(info)
    with pytest.raises(ExportError, match="export as --format nvfp4") as info:
        export_model(model, plans, tmp_path / "f", fmt="w4a4", scheme="w4a4-g128")
    _one_line(info)
    with pytest.raises(ExportError, match="not kept in the scales file") as info:
        ex.check_export_request(["nvfp4"], {"nvfp4": tmp_path / "g"}, ["nvfp4"],
                                ["trained+gptq"], "trained+gptq", "float32", False)
    _one_line(info)
    assert list(tmp_path.iterdir()) == []


# --- from a fit's scales.safetensors ----------------------------------------------------------


def _scales_file(tmp_path, model, method="trained", scheme="w4a4", drop=0, act_clips=None):
    plans = _plans(model)
    sr = SchemeResult(scheme=scheme, scales={method: {k: p.scales[:len(p.scales) - drop]
                                                      for k, p in plans.items()}},
                      act_clips={} if act_clips is None else {method: act_clips})
    result = FitResult(config=FitConfig(), model_name="tiny", model_fingerprint=
                       model_fingerprint(model), sites=list(plans), data_hash={"calibration": "ab"},
                       tokens={}, float_perplexity=None, schemes=[sr], timings={})
    path = tmp_path / "scales.safetensors"
    path.parent.mkdir(exist_ok=True)
    save_scales(result, path)
    report = {"model": "tiny", "data_hash": {"calibration": "ab"},
              "config": {"schemes": [scheme], "seed": 0, "residual_rotation": False},
              "float_perplexity": 10.0,
              "schemes": {scheme: {"choices": {"joint": {k: {"alpha": 0.5, "q": 0.99}
                                                        for k in plans}},
                                   "summary": {method: {"mean_mse": 1.5, "pct_vs_max": -20.0}}}}}
    return path, plans, report


def test_export_from_scales_file_with_provenance(tmp_path):
    model = tiny_llama()
    scales, plans, report = _scales_file(tmp_path, model)
    path = ex.export_from_scales_file(scales, "w4a4", tmp_path / "export-w4a4", model=model,
                                      report=report)
    meta = json.loads((path / "smoothrot.json").read_text())
    assert (meta["method"], meta["scheme"], meta["source_model"]) == ("trained", "w4a4", "tiny")
    assert meta["alpha_q"]["model.layers.0.mlp.down_proj"] == {"alpha": 0.5, "q": 0.99}
    assert meta["calibration_data_hash"] == {"calibration": "ab"}
    assert meta["headline"]["pct_vs_max"] == -20.0 and meta["headline"]["float_perplexity"] == 10
    assert len(meta["scales_sha256"]) == 64 and "torch" in meta["package_versions"]
    summary = meta["scales_summary"]["model.layers.0.mlp.down_proj"]
    assert summary["log_s_min"] < summary["log_s_mean"] < summary["log_s_max"]
    assert torch.equal(_logits(load_pretrained(path)),
                       _logits(_in_memory(model, plans, get_scheme("w4a4"))))
    fused = ex.export_from_scales_file(scales, "fused", tmp_path / "f", model=model)
    assert json.loads((fused / "smoothrot.json").read_text())["scheme"] == "w4a4"


def test_per_site_activation_clips_travel_to_the_export_and_back(tmp_path):
    """A fit's per-site clips (scales file) are declared per site and applied on reload."""
    model = tiny_llama()
    sites = [rs.name for rs in resolve_sites(model, ["down_proj"])]
    clips = dict(zip(sites, [0.7, 0.85], strict=True))
    scales, plans, report = _scales_file(tmp_path, model, act_clips=clips)
    path = ex.export_from_scales_file(scales, "w4a4", tmp_path / "export-w4a4", model=model,
                                      report=report)
    declared = ex.read_declaration(path)["sites"]
    assert {s: e["activation_clip"] for s, e in declared.items()} == clips
    stored = ex.plans_from_export(path)
    assert {s: p.act_clip for s, p in stored.items()} == clips
    clipped = {s: SitePlan(p.scales, True, act_clip=clips[s]) for s, p in plans.items()}
    reloaded = _logits(load_pretrained(path))
    assert torch.equal(reloaded, _logits(_in_memory(model, clipped, get_scheme("w4a4"))))
    assert not torch.equal(reloaded, _logits(_in_memory(model, plans, get_scheme("w4a4"))))
    assert ex.verify_export(path, model, IDS)["ppl_rel_diff"] == 0.0


def test_scales_of_another_model_are_one_line_errors(tmp_path):
    model = tiny_llama()
    scales, _, _ = _scales_file(tmp_path, model)
    with pytest.raises(ExportError, match="fitted on tiny") as info:  # fingerprint differs
        ex.export_from_scales_file(scales, "fused", tmp_path / "a", model=tiny_llama(layers=3))
    _one_line(info)
    short, _, _ = _scales_file(tmp_path / "short", model, drop=1)  # same fingerprint
    with pytest.raises(ExportError, match="another model") as info:
        ex.export_from_scales_file(short, "fused", tmp_path / "b", model=model)
    _one_line(info)
    with pytest.raises(ExportError, match=r"no 'quantile' scales.*w4a4/trained") as info:
        ex.export_from_scales_file(scales, "w4a4", tmp_path / "c", model=model,
                                   method="quantile")
    _one_line(info)
    with pytest.raises(ExportError, match="W8A8 scheme"):
        ex.export_from_scales_file(scales, "w8a8", tmp_path / "d", model=model, scheme="w4a4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scales.safetensors", "short"]


# --- CLIs -------------------------------------------------------------------------------------


def _import_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_cli_{name}", ROOT / "train" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_cli_constants_match_the_library():
    cli = _import_script("export")
    fit = _import_script("fit_scales")
    assert cli.FORMATS == ex.FORMATS == fit.EXPORT_FORMATS
    assert cli.EXPORT_DTYPES == ex.EXPORT_DTYPES == fit.EXPORT_DTYPES
    assert cli.ACTIVATION_QUANTIZERS == ex.ACTIVATION_QUANTIZERS


def test_export_cli_export_verify_and_mismatch(tmp_path, monkeypatch, capsys):
    cli = _import_script("export")
    model = tiny_llama()
    scales, _, _ = _scales_file(tmp_path, model)
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: (model, None))
    monkeypatch.setattr(cli, "_windows", lambda tokenizer, args, split="evaluation": IDS)
    assert cli.main(["-q", "export", "--scales", str(scales), "--format", "w4a4", "--verify"]) == 0
    out = tmp_path / "export-w4a4"
    assert (out / "config.json").is_file() and "load_pretrained" in capsys.readouterr().out
    assert cli.main(["-q", "verify", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True
    assert cli.main(["-q", "export", "--scales", str(scales), "--format", "w4a4"]) == 2
    assert "already exists" in capsys.readouterr().err
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: (tiny_llama(layers=3), None))
    assert cli.main(["-q", "export", "--scales", str(scales), "--format", "fused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "fitted on" in err and "\n" not in err


def test_export_cli_nvfp4_calibrates_on_the_calibration_split(tmp_path, monkeypatch, capsys):
    cli = _import_script("export")
    model = tiny_llama()
    scales, _, _ = _scales_file(tmp_path, model, scheme="nvfp4")
    splits = []
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: (model, None))
    monkeypatch.setattr(cli, "_windows",
                        lambda tokenizer, args, split="evaluation": splits.append(split) or IDS)
    assert cli.main(["-q", "export", "--scales", str(scales), "--format", "nvfp4",
                     "--verify"]) == 0
    assert splits == ["calibration", "evaluation"]
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["ppl_rel_diff"] == 0.0


@pytest.mark.parametrize(("argv", "message"), [
    (["--export", "w8a8", "--schemes", "w4a4"], "needs scheme w8a8"),
    (["--export", "fused", "w4a4", "--export-dir", "x"], "takes one format"),
    (["--export", "fused", "--export-method", "quantile", "--methods", "joint"],
     "not among the run's methods"),
    (["--export-dir", "x"], "needs --export"),
])
def test_fit_scales_checks_export_flags_before_the_run(tmp_path, monkeypatch, capsys, argv,
                                                       message):
    import smoothrot.job

    fit = _import_script("fit_scales")
    monkeypatch.setattr(smoothrot.job, "run_fit", _disk_full)  # must not be reached
    assert fit.main([*argv, "--output-dir", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and "No space" not in err


def test_fit_scales_refuses_an_existing_export_without_overwrite(tmp_path, monkeypatch, capsys):
    import smoothrot.job

    fit = _import_script("fit_scales")
    (tmp_path / "export-fused").mkdir()
    monkeypatch.setattr(smoothrot.job, "run_fit", _disk_full)
    assert fit.main(["--export", "fused", "--output-dir", str(tmp_path), "-q"]) == 2
    assert "already exists" in capsys.readouterr().err
