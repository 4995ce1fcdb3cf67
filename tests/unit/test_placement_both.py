"""Rotation placement "both": R1 of kind random (a dense random orthogonal Q, folded offline) and
every residual reader (q/k/v, gate/up) keeping its own online Hadamard after its scales.

The float64 exactness of R1 random + online readers on every architecture is in
tests/arch/test_contract.py (the ``r1random+smooth`` cases); here: the config key, the fit, the
scales file, the export and its reload.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from smoothrot.arch.sites import resolve_sites
from smoothrot.io.from_scales import export_from_scales_file
from smoothrot.io.loader import read_declaration
from smoothrot.io.scales_file import read_scales_file, write_scales_file
from smoothrot.io.verify import verify_export
from smoothrot.io.writer import ExportError, export_model
from smoothrot.models import load_model, model_fingerprint
from smoothrot.schema.config import config_from_dict, config_to_dict
from smoothrot.schema.errors import ConfigError
from smoothrot.schema.rotation import Rotation
from smoothrot.surgery.residual import rotate_residual
from tests.conftest import tiny_llama
from tests.unit.export_helpers import IDS, one_line, random_plans
from tests.unit.test_bad_inputs import save_tiny_model, small_config
from tests.unit.test_export_from_scales import _entries
from train.fit_scales import main

READERS = ("self_attn.qkv", "mlp.gate_up")


# --- config ------------------------------------------------------------------------------------


def test_residual_kind_round_trips_through_the_config():
    cfg = config_from_dict({"residual_rotation": True, "rotation": {"residual_kind": "random"}})
    assert cfg.rotation.residual_kind == "random"
    assert config_to_dict(cfg)["rotation"]["residual_kind"] == "random"
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_from_dict({}).rotation.residual_kind == "hadamard"


@pytest.mark.parametrize(("data", "words"), [
    ({"residual_rotation": True, "rotation": {"residual_kind": "givens"}},
     ("rotation.residual_kind='givens'", "hadamard", "random")),
    ({"residual_rotation": True, "rotation": {"residual_kind": 1}},
     ("rotation.residual_kind=1", "a string")),
    ({"rotation": {"residual_kind": "random"}}, ("needs residual_rotation: true",)),
])
def test_a_bad_residual_kind_is_one_line(data, words):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


# --- sites -------------------------------------------------------------------------------------


def test_a_hadamard_r1_that_fell_back_to_random_keeps_the_readers_rotation():
    """No Hadamard of order 18: R1 is random, and the kind applied (not asked) decides."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=18, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, vocab_size=32, max_position_embeddings=16)).eval()
    result = rotate_residual(model, kind="hadamard")
    assert result.kind == "random"
    rotations = {rs.site.name: rs.rotation
                 for rs in resolve_sites(model, ["all"], residual_kind=result.kind)}
    assert rotations["qkv"] == rotations["gate_up"] == Rotation.full()


# --- export ------------------------------------------------------------------------------------


def test_float64_verify_of_a_both_export(tmp_path):
    """R1 random + an online H on every reader (and scales): the fused float64 export reloads
    within 1e-10 of the float model, and declares the kind."""
    model = tiny_llama(dtype=torch.float64)
    plans = random_plans(model, layers=("all",))
    assert all(plans[f"model.layers.0.{r}"].rotation == Rotation.full() for r in READERS)
    path = export_model(model, plans, tmp_path / "both", dtype="float64", residual_seed=0,
                        residual_kind="random")
    decl = read_declaration(path)
    assert decl.residual_rotation.kind == "random"
    assert decl.sites["model.layers.0.self_attn.qkv"].rotation == Rotation.full()
    result = verify_export(path, model, IDS)
    assert result["passed"] and result["logit_rel_error"] <= result["limit"] == 1e-10


def test_a_quantized_both_export_is_bit_exact(tmp_path):
    model = tiny_llama()
    path = export_model(model, random_plans(model, layers=("all",), decades=1), tmp_path / "e",
                        fmt="w4a4", residual_seed=0, residual_kind="random")
    result = verify_export(path, model, IDS)
    assert result["passed"] and result["max_abs_logit_diff"] == 0.0


# --- scales file -------------------------------------------------------------------------------


def _scales(tmp_path, model, **fit):
    plans, entries = _entries(model)
    path = tmp_path / "scales.safetensors"
    write_scales_file(path, entries, model="tiny", model_fingerprint=model_fingerprint(model),
                      sites=list(plans), fit={"residual_rotation": True, "seed": 0,
                                              "target": "vllm", **fit})
    return path


def test_a_scales_file_without_the_kind_reads_as_hadamard(tmp_path):
    """Written before the kind was kept: R1 was always a Hadamard."""
    assert read_scales_file(_scales(tmp_path, tiny_llama())).fit["residual_kind"] == "hadamard"


def test_a_report_that_disagrees_on_the_kind_is_refused(tmp_path):
    model = tiny_llama()
    scales = _scales(tmp_path, model, residual_kind="random")
    report = {"config": {"residual_rotation": True, "rotation": {"residual_kind": "hadamard"}}}
    with pytest.raises(ExportError, match="was fitted with") as info:
        export_from_scales_file(scales, "fused", tmp_path / "e", model=model, report=report)
    one_line(info, "rotation.residual_kind='hadamard' but", "--report")
    path = export_from_scales_file(scales, "fused", tmp_path / "e", model=model,
                                   report={"config": {"rotation": {"residual_kind": "random"}}})
    assert read_declaration(path).residual_rotation.kind == "random"


# --- the fit, end to end -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_the_fit_places_the_readers_rotation_by_the_kind(tmp_path, kind):
    """fit_scales.py with R1 of each kind: the readers' plans rotate only under a random R1,
    and the kind reaches report.json, the scales file and the export (which verifies)."""
    folder = save_tiny_model(tmp_path / "model")
    out = tmp_path / "out"
    config = small_config(tmp_path, folder, layers=["all"], residual_rotation=True,
                          rotation={"residual_kind": kind},
                          export={"formats": ["w4a4"], "method": "smoothrot_max"})
    assert main(["--config", str(config), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["rotation"]["residual_kind"] == kind
    file = read_scales_file(out / "scales.safetensors")
    assert file.fit["residual_kind"] == kind
    plans = file.plans("w4a4", "smoothrot_max")
    reader = Rotation.full() if kind == "random" else Rotation.none()
    assert all(plans[f"model.layers.{i}.{r}"].rotation == reader for i in (0, 1) for r in READERS)
    assert plans["model.layers.0.mlp.down_proj"].rotation == Rotation.full()
    decl = read_declaration(out / "export-w4a4")
    assert decl.residual_rotation.kind == kind
    model, tokenizer = load_model(str(folder))
    ids = tokenizer("def f(x): return x", return_tensors="pt").input_ids
    result = verify_export(out / "export-w4a4", model, ids)
    assert result["passed"] and result["max_abs_logit_diff"] == 0.0
