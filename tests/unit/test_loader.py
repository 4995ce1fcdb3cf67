"""Reading an export back: the declaration (one-line errors naming the export), the plans it was
made from, and refusing folders that are not smoothrot exports."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from smoothrot.io.loader import load_pretrained, plans_from_export, read_declaration
from smoothrot.io.writer import ExportError, export_model
from smoothrot.schema.rotation import Rotation
from smoothrot.surgery.plan import SitePlan
from tests.conftest import tiny_llama
from tests.unit.export_helpers import one_line, random_plans


def test_load_pretrained_rejects_a_plain_checkpoint(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "plain")
    with pytest.raises(ExportError, match="not a smoothrot export") as info:
        load_pretrained(tmp_path / "plain")
    one_line(info)
    with pytest.raises(ExportError, match=r"no config\.json") as info:
        read_declaration(tmp_path)
    one_line(info)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_llama()
    plans = random_plans(model, layers=("down_proj", "o_proj"))
    site = "model.layers.1.mlp.down_proj"
    plans[site] = SitePlan(None, Rotation.none(), act_clip=0.5)  # an RTN site, clipped
    path = export_model(model, plans, tmp_path_factory.mktemp("e") / "w4a4", fmt="w4a4",
                        target="research")  # clips: smoothrot's loader only
    return path, plans


def test_plans_from_export_are_the_plans_exported(exported):
    path, plans = exported
    stored = plans_from_export(path)
    assert list(stored) == list(plans)
    for name, plan in plans.items():
        got = stored[name]
        assert (got.rotation, got.act_clip, got.weight_q) == (plan.rotation, plan.act_clip, None)
        assert (got.scales is None and plan.scales is None) or torch.equal(got.scales, plan.scales)
    decl = read_declaration(path)
    assert decl.sites["model.layers.1.mlp.down_proj"].smoothed is False
    assert decl.quant_scheme().name == "w4a4"
    assert decl.target == "research"


def _edit_declaration(path, tmp_path, edit):
    """A copy of the export ``path`` whose declaration ``edit`` changed."""
    copy = tmp_path / "edited"
    shutil.copytree(path, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config["smoothrot"])
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(("edit", "words"), [
    (lambda d: d["sites"]["model.layers.0.mlp.down_proj"].update(activation_clip="x"),
     ["activation_clip='x'"]),
    (lambda d: d.update(version=1), ["version 1 is not supported"]),
    (lambda d: d["sites"]["model.layers.0.mlp.down_proj"].update(
        linears=["model.layers.0.mlp.up_proj"]), ["declares linears", "another version"]),
])
def test_a_bad_declaration_is_one_line_naming_the_export(exported, tmp_path, edit, words):
    path = _edit_declaration(exported[0], tmp_path, edit)
    with pytest.raises(ExportError) as info:
        load_pretrained(path)
    one_line(info, str(path), *words)


def test_unknown_activation_quantizer(exported):
    with pytest.raises(ExportError, match="choose one of") as info:
        load_pretrained(exported[0], activation_quantizer="vllm")
    one_line(info)
