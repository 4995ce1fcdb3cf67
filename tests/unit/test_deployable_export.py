"""Deployable exports: every online rotation is a compressed-tensors transform group with
smoothrot's own H stored, so transformers + compressed-tensors (as vLLM) computes the exported
function without smoothrot; plain transformers does not, and the folder says so.

All on the tiny LLaMA: hidden 64 (q/k/v, o_proj, gate/up rotate over 64 channels: ``hadamard``)
and MLP 96 = 12·8 (down_proj: ``random-hadamard``, a dense product with the stored matrix)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from smoothrot.arch.sites import resolve_sites, with_rotation_blocks
from smoothrot.core.hadamard import hadamard_transform
from smoothrot.core.quantizers import quantize_activation_spec, quantize_weight_spec
from smoothrot.io.atomic import TargetExistsError
from smoothrot.io.loader import read_declaration
from smoothrot.io.runtime import load_without_smoothrot
from smoothrot.io.verify import verify_export
from smoothrot.io.writer import ExportError, export_model
from smoothrot.schema.config import HeadRotationConfig
from smoothrot.schema.quant import get_scheme
from smoothrot.schema.rotation import Rotation
from smoothrot.schema.target import TARGETS
from smoothrot.surgery.head_rotation import HEAD_ROTATIONS_FILE
from smoothrot.surgery.plan import SitePlan
from smoothrot.training.head_rotation import learn_head_rotations
from tests.conftest import tiny_llama
from tests.unit.export_helpers import IDS, in_memory, logits, one_line, rel

FORMATS = ("fused", "w8a8", "w4a4")
HIDDEN, MLP = 64, 96


def _plans(model, sites=None, seed=3, **kwargs) -> dict[str, SitePlan]:
    """Random positive scales on every site (in [0.25, 4]), each site's own rotation."""
    gen = torch.Generator().manual_seed(seed)
    sites = resolve_sites(model, ["all"]) if sites is None else sites
    return {rs.name: SitePlan(4.0 ** (2 * torch.rand(rs.n_scales, generator=gen,
                                                      dtype=torch.float64) - 1),
                              rs.rotation, **kwargs)
            for rs in sites}


def _linears(model, sites) -> dict[str, list[str]]:
    """Qualified linear names of each resolved site."""
    names = {id(m): n for n, m in model.named_modules()}
    return {rs.name: [names[id(lin)] for lin in rs.linears] for rs in sites}


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - not a dict
    return out


def _h(n: int) -> torch.Tensor:
    """√n·H as smoothrot computes x·H: exactly ±1."""
    return torch.round(hadamard_transform(torch.eye(n, dtype=torch.float64)) * math.sqrt(n))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The model, its all-site plans and one compressed-tensors-target export per format."""
    model = tiny_llama()
    sites = resolve_sites(model, ["all"])
    plans = _plans(model, sites)
    root = tmp_path_factory.mktemp("deployable")
    paths = {fmt: export_model(model, plans, root / fmt, fmt=fmt, target="compressed-tensors")
             for fmt in FORMATS}
    return model, sites, plans, paths


def test_the_tiny_model_has_both_kinds_of_rotation(setup):
    _, sites, _, _ = setup
    sizes = {rs.name.rpartition(".")[2]: rs.in_features for rs in sites}
    assert sizes == {"qkv": HIDDEN, "o_proj": HIDDEN, "gate_up": HIDDEN, "down_proj": MLP}
    assert all(rs.rotation == Rotation.full() and rs.rotation.is_online() for rs in sites)
    assert len(sites) == 8 and sum(len(rs.linears) for rs in sites) == 14


@pytest.mark.parametrize("fmt", FORMATS)
def test_transform_config_declares_every_online_rotation(setup, fmt):
    from compressed_tensors.transform import TransformConfig
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    model, sites, _, paths = setup
    path = paths[fmt]
    tc = _config(path)["quantization_config"]["transform_config"]
    parsed = TransformConfig.model_validate(tc)
    assert sorted(parsed.config_groups) == [f"smoothrot_full{HIDDEN}", f"smoothrot_full{MLP}"]
    linears = _linears(model, sites)
    expected = {HIDDEN: sorted(n for site, names in linears.items()
                               if not site.endswith("down_proj") for n in names),
                MLP: sorted(n for site, names in linears.items()
                            if site.endswith("down_proj") for n in names)}
    assert len(expected[HIDDEN]) == 12 and len(expected[MLP]) == 2
    covered = []
    for order, kind in ((HIDDEN, "hadamard"), (MLP, "random-hadamard")):
        group = parsed.config_groups[f"smoothrot_full{order}"]
        assert group.type == kind and group.head_dim is None
        assert [(a.location.value if hasattr(a.location, "value") else a.location, a.inverse)
                for a in group.apply] == [("input", False), ("weight_input", True)]
        for args in group.apply:
            assert sorted(args.targets) == expected[order]
        covered += group.apply[0].targets
    # exactly the linears with online rotations, each in one group
    assert sorted(covered) == sorted(n for names in linears.values() for n in names)
    assert read_declaration(path).transform_config_groups == (f"smoothrot_full{HIDDEN}",
                                                              f"smoothrot_full{MLP}")
    # the stored matrices are smoothrot's H (times √n), under the linears of their group
    tensors = _tensors(path)
    for order in (HIDDEN, MLP):
        group = f"smoothrot_full{order}"
        keys = [k for k in tensors if k.endswith(f"{group}_input.weight")]
        assert keys and all(k.rpartition(f".{group}_input")[0] in expected[order] for k in keys)
        for key in keys:
            stored = tensors[key]
            assert stored.dtype == torch.float32 and stored.shape == (order, order)
            assert torch.equal(stored.double(), _h(order))
            assert torch.equal(stored.abs(), torch.ones(order, order))
            assert torch.equal(stored.double() @ stored.double().T,
                               order * torch.eye(order, dtype=torch.float64))
    # for the power-of-two group vLLM uses its own Sylvester matrix: it must be the stored one
    sylvester = deterministic_hadamard_matrix(HIDDEN, dtype=torch.float64)
    assert torch.equal(sylvester, _h(HIDDEN))
    assert not any(k.endswith("_input.weight") and "smoothrot_full" not in k for k in tensors)


@pytest.mark.parametrize(("fmt", "layout", "dtype", "per_int"), [
    ("w4a4", "pack-quantized", torch.int32, 8),
    ("w8a8", "int-quantized", torch.int8, 1),
])
def test_quantized_layout(setup, fmt, layout, dtype, per_int):
    model, sites, _, paths = setup
    qc = _config(paths[fmt])["quantization_config"]
    assert qc["format"] == layout
    assert qc["config_groups"]["group_0"]["format"] == layout
    assert qc["quantization_status"] == "compressed"
    bits = int(fmt[1])
    group = qc["config_groups"]["group_0"]
    assert (group["weights"]["num_bits"], group["input_activations"]["num_bits"]) == (bits, bits)
    assert group["weights"]["strategy"] == "channel"
    assert (group["input_activations"]["strategy"], group["input_activations"]["dynamic"]) == (
        "token", True)
    tensors = _tensors(paths[fmt])
    key = "weight_packed" if per_int > 1 else "weight"
    for names in _linears(model, sites).values():
        for name in names:
            w = model.get_submodule(name).weight
            stored = tensors[f"{name}.{key}"]
            assert stored.dtype == dtype
            assert tuple(stored.shape) == (w.shape[0], w.shape[1] // per_int)
            assert tensors[f"{name}.weight_scale"].shape == (w.shape[0], 1)
    if per_int == 1:  # int8 codes: the full symmetric range is used, never -128
        codes = tensors["model.layers.0.mlp.down_proj.weight"]
        assert int(codes.abs().max()) == 127 and int(codes.min()) >= -127


def test_fused_has_no_quantization_scheme(setup):
    qc = _config(setup[3]["fused"])["quantization_config"]
    assert not qc.get("config_groups") and "format" not in qc
    assert qc["transform_config"]["config_groups"]


def test_fused_is_exact_through_compressed_tensors_only(setup):
    model, _, _, paths = setup
    ref = logits(model)
    ct = load_without_smoothrot(paths["fused"], runtime="compressed-tensors")
    assert not any("smoothrot" in type(m).__module__ for m in ct.modules())
    assert rel(logits(ct), ref) <= 1e-5
    plain = load_without_smoothrot(paths["fused"], runtime="transformers")
    assert rel(logits(plain), ref) > 0.1
    assert not any(n.endswith("_input") for n, _ in plain.named_modules())


@pytest.mark.parametrize("fmt", ["fused", "w8a8"])
def test_verify_with_compressed_tensors_runtime(setup, fmt):
    model, _, _, paths = setup
    result = verify_export(paths[fmt], model, IDS, runtime="compressed-tensors")
    assert result["passed"] is True and result["runtime"] == "compressed-tensors"
    if fmt == "fused":
        assert result["logit_rel_error"] <= 1e-5
    else:
        assert result["activation_quantizer"] == "compressed-tensors"
        assert result["max_abs_logit_diff"] == result["limit"] == 0.0  # bit for bit
    bad = verify_export(paths[fmt], model, IDS, runtime="transformers")
    assert bad["passed"] is False and "transform_config" in bad["note"]
    key = "logit_rel_error" if fmt == "fused" else "ppl_rel_diff"
    assert bad[key] > max(10 * result[key], bad["limit"])


def test_verify_w4a4_with_compressed_tensors_runtime(setup):
    """W4A4 on compressed-tensors' grid: each token's negative abs-max lands on a rounding tie
    (-7.5 → -8 half to even, or -7 one ulp off), so a 1e-7 difference between two exact
    rotations flips that code. The reference rotates activations as compressed-tensors does
    (core/transform.py dense_rotate), so the reload is bit-exact, not just within the limit;
    plain transformers fails with the transform_config note."""
    model, _, plans, paths = setup
    result = verify_export(paths["w4a4"], model, IDS, runtime="compressed-tensors")
    assert result["activation_quantizer"] == "compressed-tensors"
    assert result["passed"] and result["ppl_rel_diff"] == 0.0
    bad = verify_export(paths["w4a4"], model, IDS, runtime="transformers")
    assert bad["passed"] is False and "transform_config" in bad["note"]
    assert bad["ppl_rel_diff"] > bad["limit"]
    # the logits tell the two apart clearly (a random model's perplexity hardly does)
    memory = logits(in_memory(model, plans, TARGETS["compressed-tensors"].scheme(
        get_scheme("w4a4"))))
    ct = rel(logits(load_without_smoothrot(paths["w4a4"], runtime="compressed-tensors")), memory)
    plain = rel(logits(load_without_smoothrot(paths["w4a4"], runtime="transformers")), memory)
    assert ct <= 0.4 and plain > 1.0 and plain > 3 * ct


def test_dense_rotation_is_compressed_tensors_transform_bit_for_bit():
    """dense_rotate computes what compressed-tensors' transform module computes from the stored
    √n·H, bit for bit (whole input and blocks), and the same rotation as the fast transform."""
    from compressed_tensors.transform import (
        TransformArgs,
        TransformConfig,
        TransformScheme,
        apply_transform_config,
    )

    from smoothrot.core.transform import FULL, dense_rotate, stored_hadamard

    torch.manual_seed(0)
    for n, head_dim in ((96, None), (96, 32), (64, None)):
        linear = torch.nn.Sequential(torch.nn.Linear(n, 4))
        kind = "hadamard" if (head_dim or n) & ((head_dim or n) - 1) == 0 else "random-hadamard"
        apply_transform_config(linear, TransformConfig(config_groups={"g": TransformScheme(
            type=kind, head_dim=head_dim, apply=[TransformArgs(targets=["Linear"],
                                                               location="input")])}))
        module = linear[0].g_input
        with torch.no_grad():
            module.weight.copy_(stored_hadamard(head_dim or n))
        x = torch.randn(2, 5, n) * 3
        assert torch.equal(module(x), dense_rotate(x, head_dim or n))
        if head_dim is None:
            assert torch.allclose(dense_rotate(x, n), FULL.rotate(x), atol=1e-5)


@pytest.mark.parametrize("fmt", ["w4a4", "w8a8"])
def test_compressed_tensors_forward_is_smoothrots_arithmetic(setup, fmt):
    """Given the same rotated inputs (compressed-tensors' own transforms on the fused export),
    smoothrot's weight codes and compressed-tensors-grid activations are bit for bit what the
    quantized export computes with compressed-tensors alone; vLLM's max grid is not."""
    model, sites, _, paths = setup
    names = [n for group in _linears(model, sites).values() for n in group]
    reloaded = logits(load_without_smoothrot(paths[fmt], runtime="compressed-tensors"))
    for target, same in (("compressed-tensors", True), ("vllm", False)):
        scheme = TARGETS[target].scheme(get_scheme(fmt))
        ref = load_without_smoothrot(paths["fused"], runtime="compressed-tensors")
        with torch.no_grad():
            for name in names:
                linear = ref.get_submodule(name)
                linear.weight.copy_(quantize_weight_spec(linear.weight, scheme))
                linear.register_forward_pre_hook(  # after compressed-tensors' rotation hook
                    lambda _m, args, s=scheme: (quantize_activation_spec(args[0], s), *args[1:]))
        assert torch.equal(logits(ref), reloaded) is same
        if not same:
            assert rel(reloaded, logits(ref)) > 1e-3


def test_verify_w4a4_without_online_rotation_is_exact(tmp_path):
    """No online rotation, no float difference: the compressed-tensors runtime reproduces the
    in-memory W4A4 model on its grid exactly, whichever target wrote the export."""
    model = tiny_llama()
    plans = {k: SitePlan(p.scales, Rotation.none()) for k, p in _plans(model).items()}
    for target in ("compressed-tensors", "vllm"):
        path = export_model(model, plans, tmp_path / target, fmt="w4a4", target=target)
        assert not _config(path)["quantization_config"].get("transform_config")
        for runtime in ("compressed-tensors", "transformers"):
            result = verify_export(path, model, IDS, runtime=runtime)
            assert result["passed"] is True and result["ppl_rel_diff"] == 0.0
            assert "note" not in result


def test_block_rotations_are_hadamard_groups_and_exact(tmp_path):
    model = tiny_llama()
    sites = with_rotation_blocks(resolve_sites(model, ["all"]), 32)
    assert {rs.rotation for rs in sites} == {Rotation.block(32)}
    plans = _plans(model, sites)
    path = export_model(model, plans, tmp_path / "blocks", target="compressed-tensors")
    groups = _config(path)["quantization_config"]["transform_config"]["config_groups"]
    assert list(groups) == ["smoothrot_block32"]
    assert {(g["type"], g["head_dim"]) for g in groups.values()} == {("hadamard", 32)}
    assert len(groups["smoothrot_block32"]["apply"][0]["targets"]) == 14
    stored = [t for k, t in _tensors(path).items() if k.endswith("smoothrot_block32_input.weight")]
    assert stored and all(torch.equal(t.double(), _h(32)) for t in stored)
    ref = logits(model)
    assert rel(logits(load_without_smoothrot(path, runtime="compressed-tensors")), ref) <= 1e-5
    assert rel(logits(load_without_smoothrot(path, runtime="transformers")), ref) > 0.1
    # the block plans are another function than the full ones: the declaration is not ignored
    assert read_declaration(path).sites["model.layers.0.mlp.down_proj"].rotation == (
        Rotation.block(32))


@pytest.mark.parametrize("target", ["vllm", "compressed-tensors"])
def test_activation_clips_need_target_research(tmp_path, target):
    model = tiny_llama()
    plans = _plans(model, act_clip=0.8)
    with pytest.raises(ExportError, match="clip") as info:
        export_model(model, plans, tmp_path / "e", fmt="w4a4", target=target)
    one_line(info, "research")
    assert list(tmp_path.iterdir()) == []


def test_activation_clips_export_with_target_research(tmp_path):
    model = tiny_llama()
    plans = _plans(model, act_clip=0.8)
    path = export_model(model, plans, tmp_path / "e", fmt="w4a4", target="research")
    decl = read_declaration(path)
    assert decl.target == "research"
    assert {s.activation_clip for s in decl.sites.values()} == {0.8}
    assert "Per-site activation clips" in (path / "README.md").read_text()


def test_overwrite_never_replaces_a_folder_that_is_not_an_export(tmp_path):
    model = tiny_llama()
    plans = _plans(model)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a smoothrot export") as info:
        export_model(model, plans, folder, overwrite=True)
    one_line(info)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "keep me"
    # a model folder (config.json without the smoothrot declaration) is no export either
    model.config.to_json_file(str(folder / "config.json"))
    before = (folder / "config.json").read_text()
    with pytest.raises(ExportError, match="not a smoothrot export"):
        export_model(model, plans, folder, overwrite=True)
    assert (folder / "config.json").read_text() == before
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary left behind


def test_overwrite_replaces_an_earlier_export(tmp_path):
    model = tiny_llama()
    path = export_model(model, _plans(model), tmp_path / "e", fmt="w4a4")
    assert any(k.endswith("weight_packed") for k in _tensors(path))
    with pytest.raises(TargetExistsError, match="already exists"):
        export_model(model, _plans(model, seed=4), path, fmt="fused")
    assert read_declaration(path).format == "w4a4"
    export_model(model, _plans(model, seed=4), path, fmt="fused", overwrite=True)
    assert read_declaration(path).format == "fused"
    assert not any(k.endswith(("weight_packed", "weight_scale")) for k in _tensors(path))
    assert json.loads((path / "smoothrot.json").read_text())["format"] == "fused"
    assert rel(logits(load_without_smoothrot(path)), logits(model)) <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_model_card_warns_about_plain_transformers(setup, tmp_path):
    for fmt, path in setup[3].items():
        card = (path / "README.md").read_text()
        assert card.startswith(f"# smoothrot {fmt} export")
        assert "transformers ignores `transform_config`" in card
        assert "do not use" in card
        assert "**compressed-tensors**" in card  # the target it was written for
    # without an online rotation there is nothing to ignore: no warning
    model = tiny_llama()
    plans = {k: SitePlan(p.scales, Rotation.none()) for k, p in _plans(model).items()}
    path = export_model(model, plans, tmp_path / "none")
    card = (path / "README.md").read_text()
    assert "ignores `transform_config`" not in card and "do not use" not in card
    assert "Online rotations: none" in card and "**vllm**" in card
    assert rel(logits(load_without_smoothrot(path, runtime="transformers")),
               logits(model)) <= 1e-5


def test_learned_head_rotations_export_and_reload_through_compressed_tensors(tmp_path):
    """R2 learned on a copy of the model and folded into it; the plans fitted on that copy;
    the export replays R2 on the model as loaded, stores it beside the weights, and reloads
    through transformers + compressed-tensors alone bit for bit (its W4A4 grid), perplexity
    included."""
    model = tiny_llama()
    rotated = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(4)
    windows = {"calibration": torch.randint(0, 96, (4, 12), generator=gen),
               "selection": torch.randint(0, 96, (2, 12), generator=gen)}
    learned = learn_head_rotations(
        rotated, resolve_sites(rotated, ["all"]), windows,
        HeadRotationConfig(learn=True, steps=3, batch_tokens=16), get_scheme("w4a4"),
        train_tokens=32, seed=0)
    eye = torch.eye(16, dtype=torch.float64)
    assert learned and all(r.shape == (2, 16, 16) for r in learned.values())
    assert all(torch.allclose(r @ r.transpose(1, 2), eye.expand_as(r), atol=1e-12)
               for r in learned.values())
    plans = _plans(rotated)
    path = export_model(model, plans, tmp_path / "r2", fmt="w4a4", target="compressed-tensors",
                        head_rotations=learned)
    assert read_declaration(path).head_rotations == tuple(sorted(learned))
    result = verify_export(path, model, IDS, runtime="compressed-tensors")
    assert result["passed"] and result["max_abs_logit_diff"] == 0.0
    assert result["ppl_rel_diff"] == 0.0
    stored = load_file(str(path / HEAD_ROTATIONS_FILE))
    assert all(torch.equal(stored[k], learned[k]) for k in learned)
