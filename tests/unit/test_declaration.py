"""The export declaration round-trips exactly and reads strictly: a bad key or value is one line
naming it (the loader adds the export's path)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from smoothrot.schema.declaration import (
    DECLARATION_VERSION,
    LOADER,
    ActivationQuantDeclaration,
    ExportDeclaration,
    ResidualDeclaration,
    SiteDeclaration,
    WeightQuantDeclaration,
)
from smoothrot.schema.errors import ConfigError
from smoothrot.schema.export import ExportConfig
from smoothrot.schema.quant import get_scheme
from smoothrot.schema.rotation import Rotation

DOWN = "model.layers.0.mlp.down_proj"
O_PROJ = "model.layers.0.self_attn.o_proj"


def _declaration(fmt: str = "w4a4") -> ExportDeclaration:
    scheme = None if fmt == "fused" else get_scheme(fmt)
    return ExportDeclaration(
        format=fmt, dtype="float32", loader=LOADER,
        sites={
            DOWN: SiteDeclaration((DOWN,), "model.layers.0.mlp.up_proj", "linear_rows", True,
                                  Rotation.full(), 0.85),
            O_PROJ: SiteDeclaration((O_PROJ,), "model.layers.0.self_attn.v_proj", "linear_rows",
                                    False, Rotation.head("offline", 16), None),
        },
        activation_quantization=None if scheme is None else ActivationQuantDeclaration.of(scheme),
        weight_quantization=None if scheme is None else WeightQuantDeclaration.of(scheme, "gptq"),
        transform_config_groups=("smoothrot_full96",), transform_config_note=None,
        residual_rotation=ResidualDeclaration(0, "hadamard", True),
        target="research",  # DOWN carries an activation clip
    )


@pytest.mark.parametrize("fmt", ["fused", "w4a4", "nvfp4"])
def test_round_trip(fmt):
    decl = _declaration(fmt)
    data = decl.to_dict()
    assert data["version"] == DECLARATION_VERSION == 2
    assert data["sites"][O_PROJ]["rotation"] == {"kind": "head", "location": "offline",
                                                 "block_size": 16}
    assert data["target"] == "research"
    assert ExportDeclaration.from_dict(copy.deepcopy(data)) == decl
    if fmt != "fused":
        assert decl.quant_scheme() == get_scheme(fmt) and decl.gptq
        assert data["activation_quantization"]["grid"] == get_scheme(fmt).a_grid
    assert decl.linears == [DOWN, O_PROJ]


def _edited(edit) -> dict:
    data = _declaration().to_dict()
    edit(data)
    return data


@pytest.mark.parametrize(("edit", "words"), [
    (lambda d: d["sites"][DOWN].pop("linears"), [f"sites['{DOWN}']", "missing key 'linears'"]),
    (lambda d: d["sites"][DOWN].update(activation_clip="x"),
     ["activation_clip='x'", "(0, 1]"]),
    (lambda d: d["sites"][DOWN].update(activation_clip=1.5), ["activation_clip=1.5", "(0, 1]"]),
    (lambda d: d["sites"][DOWN].update(activation_clip=0), ["activation_clip=0", "(0, 1]"]),
    (lambda d: d.update(online_rotation="online"), ["unknown key(s) ['online_rotation']"]),
    (lambda d: d["sites"][DOWN].update(rotation_size=96), ["unknown key(s) ['rotation_size']"]),
    (lambda d: d["weight_quantization"].pop("num_bits"),
     ["weight_quantization", "missing key 'num_bits'"]),
    (lambda d: d["activation_quantization"].update(num_bits=True), ["num_bits=True", "integer"]),
    (lambda d: d["sites"][DOWN].update(rotation="online"), ["rotation", "mapping"]),
    (lambda d: d["sites"][DOWN].update(rotation={"kind": "block", "location": "online",
                                                 "block_size": None}),
     [f"sites['{DOWN}'].rotation", "block_size"]),
    (lambda d: d["sites"][O_PROJ]["rotation"].update(block_size=None),
     ["rotation", "head_dim"]),
    (lambda d: d["sites"][DOWN].update(source_kind="rows"), ["source_kind='rows'", "linear_rows"]),
    (lambda d: d.update(format="int4"), ["format='int4'", "w4a4"]),
    (lambda d: d.update(weight_quantization=None), ["'w4a4' needs both"]),
    (lambda d: d.update(sites={}), ["sites={}", "non-empty"]),
    (lambda d: d.update(version=1), ["version 1 is not supported", "version 2"]),
    (lambda d: d.pop("version"), ["missing key 'version'"]),
])
def test_strict_errors_name_the_key(edit, words):
    with pytest.raises(ValueError) as info:
        ExportDeclaration.from_dict(_edited(edit))
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_not_a_mapping():
    with pytest.raises(ValueError, match="smoothrot must be a mapping, got list"):
        ExportDeclaration.from_dict([])


def test_schema_modules_need_no_torch():
    code = ("import sys, smoothrot.schema.declaration, smoothrot.schema.export; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_export_config_validates_formats_and_dtype():
    assert ExportConfig().formats == [] and ExportConfig(["w4a4", "fused"]).dtype == "float32"
    with pytest.raises(ConfigError, match=r"export\.formats has \['int4'\]; choose from"):
        ExportConfig(["w4a4", "int4"])
    with pytest.raises(ConfigError, match=r"export\.dtype='fp8' is not one of"):
        ExportConfig(dtype="fp8")
