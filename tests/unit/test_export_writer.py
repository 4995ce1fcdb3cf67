"""Exports reload to the same function (fused) / the same fake-quant model (w8a8, w4a4), and
requests that cannot be honoured fail in one line without leaving anything behind."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from smoothrot.arch.sites import resolve_sites
from smoothrot.io import writer
from smoothrot.io.atomic import TargetExistsError
from smoothrot.io.loader import load_pretrained, plans_from_export, read_declaration
from smoothrot.io.verify import verify_export
from smoothrot.io.writer import ExportError, export_model
from smoothrot.schema.quant import get_scheme
from smoothrot.schema.rotation import Rotation
from smoothrot.surgery.plan import SitePlan
from tests.conftest import tiny_llama
from tests.unit.export_helpers import (
    IDS,
    disk_full,
    in_memory,
    logits,
    one_line,
    random_plans,
    rel,
)

# --- fused ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "limit"), [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_fused_reload_gives_the_original_logits(tmp_path, dtype, limit):
    model = tiny_llama(dtype=dtype)
    ref = logits(model)
    plans = random_plans(model)
    path = export_model(model, plans, tmp_path / "fused", dtype=str(dtype).split(".")[1])
    assert torch.equal(logits(model), ref), "the exported model itself is not modified"
    loaded = load_pretrained(path)
    assert loaded.dtype == dtype and len(loaded.smoothrot_hooks) == 2
    assert rel(logits(loaded), ref) <= limit
    fused = in_memory(model, plans)
    for a, b in zip(resolve_sites(loaded, ["down_proj"]), resolve_sites(fused, ["down_proj"]),
                    strict=True):
        assert torch.equal(a.linear.weight, b.linear.weight)  # W·diag(s)·H, stored as computed
        assert torch.equal(a.smooth_from.weight, b.smooth_from.weight)  # up_proj rows / s
    for h in loaded.smoothrot_hooks:
        h.remove()
    assert rel(logits(loaded), ref) > 1e-3, "without the online H the function differs"


def test_verify_export_reports_pass(tmp_path):
    model = tiny_llama()
    path = export_model(model, random_plans(model), tmp_path / "fused")
    result = verify_export(path, model, IDS)
    assert result["passed"] and result["logit_rel_error"] <= 1e-4


@pytest.mark.parametrize("fmt", ["fused", "w4a4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_exports_match_the_in_memory_model_bit_for_bit(tmp_path, fmt, dtype):
    model = tiny_llama()
    plans = random_plans(model)
    name = str(dtype).split(".")[1]
    loaded = load_pretrained(export_model(model, plans, tmp_path / "e", fmt=fmt, dtype=name))
    ref = in_memory(model, plans, None if fmt == "fused" else get_scheme(fmt), dtype)
    assert loaded.dtype == dtype
    assert torch.equal(logits(loaded), logits(ref))


def test_all_site_kinds_round_trip(tmp_path):
    """qkv (norm γ), o_proj (H over all heads, tied GQA scales), gate_up and down_proj."""
    model = tiny_llama()
    ref = logits(model)
    plans = random_plans(model, layers=("all",))
    assert len(plans) == 8
    path = export_model(model, plans, tmp_path / "w8a8", fmt="w8a8")
    loaded = load_pretrained(path)
    assert torch.equal(logits(loaded), logits(in_memory(model, plans, get_scheme("w8a8"))))
    fused = load_pretrained(export_model(model, plans, tmp_path / "fused"))
    # float32 rounding only (without the online H it is > 1e-3): the fast transform's dense
    # 64-point block (hadamard._DENSE_BLOCK) sums 64 terms per output where the butterfly summed
    # pairs (1.0e-4 here vs 0.5e-4), and these random weights amplify it through two layers.
    assert rel(logits(fused), ref) <= 2e-4
    assert read_declaration(path).sites["model.layers.0.self_attn.o_proj"].rotation == (
        Rotation.full())


def test_residual_rotation_is_exported_with_untied_head(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                      max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    ref = logits(model)
    path = export_model(model, random_plans(model), tmp_path / "r1", residual_seed=0)
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert read_declaration(path).residual_rotation.untied_lm_head is True
    assert rel(logits(load_pretrained(path)), ref) <= 1e-4


# --- quantized (int) --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["w8a8", "w4a4"])
def test_quantized_reload_reproduces_the_fake_quant_model(tmp_path, fmt):
    from compressed_tensors.compressors import unpack_from_int32

    model = tiny_llama()
    plans = random_plans(model)
    bits = int(fmt[1])
    path = export_model(model, plans, tmp_path / fmt, fmt=fmt)
    loaded = load_pretrained(path)
    ref = in_memory(model, plans, get_scheme(fmt))
    for a, b in zip(resolve_sites(loaded, ["down_proj"]), resolve_sites(ref, ["down_proj"]),
                    strict=True):
        assert torch.equal(a.linear.weight, b.linear.weight)  # same RTN integers and scales
    assert torch.equal(logits(loaded), logits(ref))

    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    # int4 is pack-quantized (eight codes per int32), the int W4A4 layout vLLM reads
    layout = "int-quantized" if bits == 8 else "pack-quantized"
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == (
        "compressed-tensors", layout, "compressed")
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == list(plans) and group["format"] == layout
    assert {k: group["weights"][k]
            for k in ("num_bits", "type", "symmetric", "strategy", "dynamic")} == {
        "num_bits": bits, "type": "int", "symmetric": True, "strategy": "channel",
        "dynamic": False}
    assert {k: group["input_activations"][k]
            for k in ("num_bits", "type", "symmetric", "strategy", "dynamic")} == {
        "num_bits": bits, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    assert "lm_head" in qc["ignore"] and "model.layers.0.mlp.up_proj" in qc["ignore"]
    site = "model.layers.1.mlp.down_proj"
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        if bits == 8:
            q = f.get_tensor(f"{site}.weight")
            assert q.dtype == torch.int8
        else:
            assert f"{site}.weight" not in f.keys()  # noqa: SIM118
            packed = f.get_tensor(f"{site}.weight_packed")
            assert packed.dtype == torch.int32 and tuple(packed.shape) == (64, 96 // 8)
            shape = f.get_tensor(f"{site}.weight_shape").tolist()
            assert shape == [64, 96]
            q = unpack_from_int32(packed, bits, torch.Size(shape))
        assert int(q.min()) >= -(2 ** (bits - 1)) and int(q.max()) <= 2 ** (bits - 1) - 1
        assert f.get_tensor("model.layers.1.mlp.up_proj.weight").dtype == torch.float32
        scale = f.get_tensor(f"{site}.weight_scale")
    # the stored codes times the stored scales are the fake-quant model's weight
    assert torch.equal(q.float() * scale, ref.get_submodule(site).weight)
    stored = plans_from_export(path)
    assert all(torch.equal(stored[k].scales, plans[k].scales) for k in plans)
    assert all(stored[k].rotation == plans[k].rotation for k in plans)
    result = verify_export(path, model, IDS)
    assert result["passed"] and result["ppl_rel_diff"] == 0.0


@pytest.mark.parametrize("fmt", ["w8a8", "w4a4"])
def test_compressed_tensors_activation_quantizer(tmp_path, fmt):
    """compressed-tensors' own forward (dynamic scale max|x|/((2^b−1)/2)) after our rotation: a
    different grid from the fake-quant model's, of the same quality (docs/equivalence.md)."""
    model = tiny_llama()
    plans = random_plans(model, decades=0.5)
    path = export_model(model, plans, tmp_path / fmt, fmt=fmt)
    ct = logits(load_pretrained(path, activation_quantizer="compressed-tensors"))
    fake_quant = logits(in_memory(model, plans, get_scheme(fmt)))
    ref = logits(model)
    assert torch.isfinite(ct).all() and not torch.equal(ct, fake_quant)
    assert rel(ct, ref) <= 1.5 * rel(fake_quant, ref)
    unrotated = load_pretrained(path, activation_quantizer="compressed-tensors")
    for h in unrotated.smoothrot_hooks:
        h.remove()
    assert rel(logits(unrotated), ref) > 4 * rel(ct, ref), "the rotation is applied"


# --- safety: overflow, existing targets, failures mid-write, impossible requests --------------


@pytest.mark.parametrize(("channel_scale", "param"), [
    (1e9, "model.layers.0.mlp.down_proj.weight"),  # W·diag(s) grows
    (1e-9, "model.layers.0.mlp.up_proj.weight"),  # up rows / s grow
])
def test_fp16_overflow_is_a_one_line_error(tmp_path, channel_scale, param):
    model = tiny_llama()
    plans = random_plans(model, decades=0.0)
    site = "model.layers.0.mlp.down_proj"
    scales = plans[site].scales.clone()
    scales[3] = channel_scale
    plans[site] = replace(plans[site], scales=scales)
    with pytest.raises(ExportError) as info:
        export_model(model, plans, tmp_path / "fp16", dtype="float16")
    msg = one_line(info)
    assert msg.startswith(param) and "log_bound" in msg and "float32" in msg
    assert "65504" in msg or "6.55e+04" in msg
    assert list(tmp_path.iterdir()) == []
    export_model(model, plans, tmp_path / "fp32")  # the fix the message names works


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_existing_target_needs_overwrite(tmp_path):
    model = tiny_llama()
    target = tmp_path / "out"
    export_model(model, random_plans(model), target)  # an earlier export
    (target / "old.txt").write_text("old")
    with pytest.raises(TargetExistsError, match=r"already exists.*overwrite") as info:
        export_model(model, random_plans(model, seed=3), target)
    one_line(info)
    export_model(model, random_plans(model, seed=3), target, overwrite=True)
    assert not (target / "old.txt").exists() and (target / "config.json").is_file()
    assert torch.equal(plans_from_export(target)["model.layers.0.mlp.down_proj"].scales,
                       random_plans(model, seed=3)["model.layers.0.mlp.down_proj"].scales)
    # overwrite replaces an earlier export only, never another folder (a run, a model)
    other = tmp_path / "run"
    other.mkdir()
    (other / "old.txt").write_text("old")
    with pytest.raises(ExportError, match="is not a smoothrot export") as info:
        export_model(model, random_plans(model), other, overwrite=True)
    one_line(info, str(other))
    assert _files(other) == {"old.txt": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~mask  # not mkdtemp's 0700
    assert stat.S_IMODE((target / "model.safetensors").stat().st_mode) == 0o666 & ~mask


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("stage", ["save_pretrained", "metadata"])
def test_failure_mid_write_leaves_no_partial_folder(tmp_path, monkeypatch, stage, existing):
    model = tiny_llama()
    target = tmp_path / "out"
    if existing:
        export_model(model, random_plans(model, seed=3), target)  # an earlier export
        before = _files(target)
    if stage == "save_pretrained":
        def partial_then_full(self, save_directory, *args, **kwargs):
            (Path(save_directory) / "model.safetensors").write_bytes(b"\0" * 1024)  # partial
            disk_full()

        monkeypatch.setattr(PreTrainedModel, "save_pretrained", partial_then_full)
    else:
        monkeypatch.setattr(writer, "write_json", disk_full)  # after the weights were written
    with pytest.raises(OSError, match="No space left"):
        export_model(model, random_plans(model), target, overwrite=existing)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == (["out"] if existing else [])
    if existing:
        assert _files(target) == before  # the earlier export, untouched


def test_requests_that_cannot_be_honoured(tmp_path):
    model = tiny_llama()
    plans = random_plans(model)
    site = next(iter(plans))
    gptq = {site: replace(plans[site], weight_q=torch.randn(64, 96))}
    with pytest.raises(ExportError, match="'fused' cannot store") as info:
        export_model(model, gptq, tmp_path / "a")
    one_line(info)
    with pytest.raises(ExportError, match="not on the w4a4 grid") as info:
        export_model(model, gptq, tmp_path / "b", fmt="w4a4")
    one_line(info)
    with pytest.raises(ExportError, match="has shape") as info:
        export_model(model, {site: SitePlan(None, Rotation.full(),
                                            weight_q=torch.zeros(64, 95))},
                     tmp_path / "c", fmt="w4a4")
    one_line(info)
    with pytest.raises(ExportError, match="calibration token windows") as info:
        export_model(model, plans, tmp_path / "d", fmt="nvfp4")
    one_line(info)
    with pytest.raises(ExportError, match="needs an mxfp4 scheme") as info:
        export_model(model, plans, tmp_path / "e", fmt="mxfp4", scheme="nvfp4")
    one_line(info)
    with pytest.raises(ExportError, match="export as --format nvfp4") as info:
        export_model(model, plans, tmp_path / "f", fmt="w4a4", scheme="w4a4-g128")
    one_line(info)
    with pytest.raises(ExportError, match="rotation block 64") as info:  # 96 = 1.5·64
        export_model(model, {site: replace(plans[site], rotation=Rotation.block(64))},
                     tmp_path / "g")
    one_line(info)
    assert list(tmp_path.iterdir()) == []
