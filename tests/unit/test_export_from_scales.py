"""A fit's scales file (every plan by scheme, method and site) and the exports made from it,
by the library and by the two CLIs."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from smoothrot.arch.sites import resolve_sites
from smoothrot.io.from_scales import export_from_scales_file
from smoothrot.io.loader import load_pretrained, plans_from_export, read_declaration
from smoothrot.io.scales_file import (
    ScalesEntry,
    ScalesFileError,
    read_scales_file,
    write_scales_file,
)
from smoothrot.io.verify import verify_export
from smoothrot.io.writer import ExportError
from smoothrot.models import model_fingerprint
from smoothrot.schema.quant import get_scheme
from smoothrot.schema.rotation import Rotation
from smoothrot.surgery.head_rotation import apply_head_rotations
from smoothrot.surgery.plan import SitePlan
from tests.conftest import tiny_llama
from tests.unit.export_helpers import (
    IDS,
    disk_full,
    in_memory,
    logits,
    one_line,
    random_plans,
)

ROOT = Path(__file__).resolve().parents[2]

# --- the scales file --------------------------------------------------------------------------


def _entries(model, scheme="w4a4", method="trained", drop=0, act_clips=None):
    """A fitted method plus the two methods without scales (rtn, hadamard)."""
    plans = random_plans(model)
    clips = act_clips or {}
    entries = [ScalesEntry(scheme, method, site, p.scales[:len(p.scales) - drop], p.rotation,
                           clips.get(site)) for site, p in plans.items()]
    entries += [ScalesEntry(scheme, m, site, None, rotation, 0.9)
                for m, rotation in (("rtn", Rotation.none()), ("hadamard", Rotation.full()))
                for site in plans]
    return plans, entries


def _write(path, model, entries, sites):
    path.parent.mkdir(exist_ok=True)
    write_scales_file(path, entries, model="tiny", model_fingerprint=model_fingerprint(model),
                      sites=sites)
    return path


def test_scales_file_round_trip(tmp_path):
    model = tiny_llama()
    plans, entries = _entries(model, act_clips={"model.layers.0.mlp.down_proj": 0.7})
    path = _write(tmp_path / "scales.safetensors", model, entries, list(plans))
    file = read_scales_file(path)
    assert (file.model, file.model_fingerprint) == ("tiny", model_fingerprint(model))
    assert file.sites == tuple(plans)
    assert file.schemes() == ["w4a4"] and file.methods("w4a4") == ["trained", "rtn", "hadamard"]
    trained = file.plans("w4a4", "trained")
    for site, plan in plans.items():
        assert torch.equal(trained[site].scales, plan.scales)
        assert trained[site].scales.dtype == torch.float64
        assert trained[site].rotation == plan.rotation
    assert [p.act_clip for p in trained.values()] == [0.7, None]
    for method, rotation in (("rtn", Rotation.none()), ("hadamard", Rotation.full())):
        got = file.plans("w4a4", method)
        assert all(p.scales is None and p.rotation == rotation and p.act_clip == 0.9
                   for p in got.values())
    with pytest.raises(ScalesFileError, match=r"no 'quantile' scales.*'w4a4/trained'") as info:
        file.plans("w4a4", "quantile")
    one_line(info)


def test_scales_file_refuses_duplicates_and_unknown_sites(tmp_path):
    model = tiny_llama()
    plans, entries = _entries(model)
    with pytest.raises(ValueError, match="two scales entries"):
        _write(tmp_path / "a.safetensors", model, entries + entries[:1], list(plans))
    with pytest.raises(ValueError, match="not in sites"):
        _write(tmp_path / "b.safetensors", model, entries, list(plans)[:1])
    assert list(tmp_path.iterdir()) == []


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    model = tiny_llama()
    plans, entries = _entries(model)
    good = _write(tmp_path / "good.safetensors", model, entries, list(plans)).read_bytes()
    files = {"garbage": b"this is not a safetensors file at all", "empty": b"",
             "truncated": good[:-100]}
    out = {name: tmp_path / name for name in files}
    for name, data in files.items():
        out[name].write_bytes(data)
    out["torch.save"] = tmp_path / "torch.pt"
    torch.save({"w4a4/trained/x": torch.ones(3)}, out["torch.save"])
    out["no index"] = tmp_path / "old.safetensors"  # the key-named layout without an index
    save_file({"w4a4/trained/x": torch.ones(3)}, str(out["no index"]),
              metadata={"model": "tiny", "model_fingerprint": "f", "sites": "[]"})
    return out


@pytest.mark.parametrize(("case", "words"), [
    ("garbage", ["not a readable safetensors file"]),
    ("empty", ["not a readable safetensors file"]),
    ("truncated", ["not a readable safetensors file"]),
    ("torch.save", ["not a readable safetensors file"]),
    ("no index", ["no smoothrot scales index", "fit_scales.py"]),
])
def test_unreadable_scales_files_are_one_line_errors(tmp_path, case, words):
    path = _bad_files(tmp_path)[case]
    with pytest.raises(ScalesFileError) as info:
        read_scales_file(path)
    one_line(info, str(path), *words)
    with pytest.raises(ScalesFileError, match="does not exist"):
        read_scales_file(tmp_path / "missing.safetensors")


def test_a_bad_index_record_names_the_record(tmp_path):
    model = tiny_llama()
    plans, entries = _entries(model)
    path = _write(tmp_path / "s.safetensors", model, entries, list(plans))
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    index = json.loads(meta["index"])
    index[1]["act_clip"] = 1.5
    save_file(tensors, str(path), metadata={**meta, "index": json.dumps(index)})
    with pytest.raises(ScalesFileError, match=r"index\[1\]\.act_clip=1\.5") as info:
        read_scales_file(path)
    one_line(info)


def test_save_scales_writes_every_plan_but_gptq_weights(tmp_path):
    """report.save_scales: every method's plans, RTN/Hadamard included; GPTQ-rounded ones not."""
    from smoothrot.job import FitResult, SchemeResult
    from smoothrot.methods.registry import MethodResult
    from smoothrot.report import save_scales
    from smoothrot.schema.config import FitConfig

    model = tiny_llama()
    plans = random_plans(model)
    rtn = {s: replace(p, scales=None, rotation=Rotation.none()) for s, p in plans.items()}
    gptq = {s: replace(p, weight_q=torch.zeros(64, 96)) for s, p in plans.items()}
    sr = SchemeResult(scheme="w4a4", results={"rtn": MethodResult(rtn),
                                              "trained": MethodResult(plans),
                                              "trained+gptq": MethodResult(gptq)})
    result = FitResult(config=FitConfig(), model_name="tiny",
                       model_fingerprint=model_fingerprint(model), sites=list(plans),
                       data_hash={}, tokens={}, float_perplexity=None, schemes=[sr], timings={})
    save_scales(result, tmp_path / "scales.safetensors")
    file = read_scales_file(tmp_path / "scales.safetensors")
    assert file.methods("w4a4") == ["rtn", "trained"]
    assert all(p.scales is None for p in file.plans("w4a4", "rtn").values())
    assert all(torch.equal(p.scales, plans[s].scales)
               for s, p in file.plans("w4a4", "trained").items())


# --- exports from it --------------------------------------------------------------------------


def _scales_file(tmp_path, model, scheme="w4a4", method="trained", drop=0, act_clips=None):
    plans, entries = _entries(model, scheme, method, drop, act_clips)
    path = _write(tmp_path / "scales.safetensors", model, entries, list(plans))
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
    path = export_from_scales_file(scales, "w4a4", tmp_path / "export-w4a4", model=model,
                                   report=report)
    meta = json.loads((path / "smoothrot.json").read_text())
    assert (meta["method"], meta["scheme"], meta["source_model"]) == ("trained", "w4a4", "tiny")
    assert meta["alpha_q"]["model.layers.0.mlp.down_proj"] == {"alpha": 0.5, "q": 0.99}
    assert meta["calibration_data_hash"] == {"calibration": "ab"}
    assert meta["headline"]["pct_vs_max"] == -20.0 and meta["headline"]["float_perplexity"] == 10
    assert len(meta["scales_sha256"]) == 64 and "torch" in meta["package_versions"]
    summary = meta["scales_summary"]["model.layers.0.mlp.down_proj"]
    assert summary["log_s_min"] < summary["log_s_mean"] < summary["log_s_max"]
    assert torch.equal(logits(load_pretrained(path)),
                       logits(in_memory(model, plans, get_scheme("w4a4"))))
    fused = export_from_scales_file(scales, "fused", tmp_path / "f", model=model)
    assert json.loads((fused / "smoothrot.json").read_text())["scheme"] == "w4a4"


@pytest.mark.parametrize(("method", "rotation"), [("rtn", Rotation.none()),
                                                  ("hadamard", Rotation.full())])
def test_methods_without_scales_export_like_any_other(tmp_path, method, rotation):
    model = tiny_llama()
    scales, plans, _ = _scales_file(tmp_path, model)
    with pytest.raises(ExportError, match="activation clip") as info:  # 0.9: no vLLM clip
        export_from_scales_file(scales, "w4a4", tmp_path / method, model=model, method=method)
    one_line(info, "research")
    path = export_from_scales_file(scales, "w4a4", tmp_path / method, model=model, method=method,
                                   target="research")
    decl = read_declaration(path)
    assert all(not s.smoothed and s.rotation == rotation for s in decl.sites.values())
    expected = {s: SitePlan(None, rotation, act_clip=0.9) for s in plans}
    assert torch.equal(logits(load_pretrained(path)),
                       logits(in_memory(model, expected, get_scheme("w4a4"))))


def test_per_site_activation_clips_travel_to_the_export_and_back(tmp_path):
    """A fit's per-site clips (scales file) are declared per site and applied on reload."""
    model = tiny_llama()
    sites = [rs.name for rs in resolve_sites(model, ["down_proj"])]
    clips = dict(zip(sites, [0.7, 0.85], strict=True))
    scales, plans, report = _scales_file(tmp_path, model, act_clips=clips)
    path = export_from_scales_file(scales, "w4a4", tmp_path / "export-w4a4", model=model,
                                   report=report, target="research")
    assert read_declaration(path).target == "research"
    assert {s: e.activation_clip for s, e in read_declaration(path).sites.items()} == clips
    assert {s: p.act_clip for s, p in plans_from_export(path).items()} == clips
    clipped = {s: replace(p, act_clip=clips[s]) for s, p in plans.items()}
    reloaded = logits(load_pretrained(path))
    assert torch.equal(reloaded, logits(in_memory(model, clipped, get_scheme("w4a4"))))
    assert not torch.equal(reloaded, logits(in_memory(model, plans, get_scheme("w4a4"))))
    assert verify_export(path, model, IDS)["ppl_rel_diff"] == 0.0


def test_scales_of_another_model_are_one_line_errors(tmp_path):
    model = tiny_llama()
    scales, _, _ = _scales_file(tmp_path, model)
    with pytest.raises(ExportError, match="fitted on tiny") as info:  # fingerprint differs
        export_from_scales_file(scales, "fused", tmp_path / "a", model=tiny_llama(layers=3))
    one_line(info)
    short, _, _ = _scales_file(tmp_path / "short", model, drop=1)  # same fingerprint
    with pytest.raises(ExportError, match="another model") as info:
        export_from_scales_file(short, "fused", tmp_path / "b", model=model)
    one_line(info)
    with pytest.raises(ScalesFileError, match=r"no 'quantile' scales.*w4a4/trained") as info:
        export_from_scales_file(scales, "w4a4", tmp_path / "c", model=model, method="quantile")
    one_line(info)
    with pytest.raises(ExportError, match="W8A8 scheme"):
        export_from_scales_file(scales, "w8a8", tmp_path / "d", model=model, scheme="w4a4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scales.safetensors", "short"]


# --- CLIs -------------------------------------------------------------------------------------


def _import_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_cli_{name}", ROOT / "train" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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


def test_export_cli_target_carries_clipped_fits_to_research_only(tmp_path, monkeypatch, capsys):
    """A fit with per-site activation clips exports with --target research; the default target
    (vllm, no activation clip) refuses it in one line and leaves nothing behind."""
    cli = _import_script("export")
    model = tiny_llama()
    sites = [rs.name for rs in resolve_sites(model, ["down_proj"])]
    clips = dict(zip(sites, [0.7, 0.85], strict=True))
    scales, _, _ = _scales_file(tmp_path, model, act_clips=clips)
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: (model, None))
    monkeypatch.setattr(cli, "_windows", lambda tokenizer, args, split="evaluation": IDS)
    argv = ["-q", "export", "--scales", str(scales), "--format", "w4a4"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "activation clip" in err and "research" in err and "\n" not in err
    assert not (tmp_path / "export-w4a4").exists()
    assert cli.main([*argv, "--target", "research", "--verify"]) == 0
    decl = read_declaration(tmp_path / "export-w4a4")
    assert decl.target == "research"
    assert {s: e.activation_clip for s, e in decl.sites.items()} == clips


@pytest.mark.parametrize(("argv", "message"), [
    (["--export", "w8a8", "--schemes", "w4a4"], "needs scheme w8a8"),
    (["--export", "w4a4", "--schemes", "w4a4-mse"], "export.scheme (--export-scheme)"),
    (["--export", "w4a4", "--schemes", "w4a4-mse", "--export-scheme", "w4a4"],
     "needs scheme w4a4"),
    (["--export", "fused", "w4a4", "--export-dir", "x"], "takes one format"),
    (["--export", "fused", "--export-method", "quantile", "--methods", "joint"],
     "not among the run's methods"),
    (["--export-dir", "x"], "needs export.formats (--export FORMAT)"),
])
def test_fit_scales_checks_export_flags_before_the_run(tmp_path, monkeypatch, capsys, argv,
                                                       message):
    import smoothrot.job

    fit = _import_script("fit_scales")
    monkeypatch.setattr(smoothrot.job, "run_fit", disk_full)  # must not be reached
    assert fit.main([*argv, "--output-dir", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and "No space" not in err


def test_fit_scales_export_scheme_flag_names_the_fitted_scheme(tmp_path, monkeypatch, capsys):
    """``--export w4a4`` of a w4a4-mse-only run passes the early check with --export-scheme
    and reaches the fit (here a full disk), where without the flag it stops before."""
    import smoothrot.job

    fit = _import_script("fit_scales")
    monkeypatch.setattr(smoothrot.job, "run_fit", disk_full)
    argv = ["--export", "w4a4", "--schemes", "w4a4-mse", "--output-dir", str(tmp_path), "-q"]
    assert fit.main([*argv, "--export-scheme", "w4a4-mse"]) == 2
    assert "No space" in capsys.readouterr().err
    assert fit.main(argv) == 2
    assert "No space" not in capsys.readouterr().err


def test_fit_scales_refuses_an_existing_export_without_overwrite(tmp_path, monkeypatch, capsys):
    import smoothrot.job

    fit = _import_script("fit_scales")
    (tmp_path / "export-fused").mkdir()
    monkeypatch.setattr(smoothrot.job, "run_fit", disk_full)
    assert fit.main(["--export", "fused", "--output-dir", str(tmp_path), "-q"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_head_rotations_travel_through_the_scales_file_to_the_export(tmp_path):
    """A fit that learned per-head rotations records them with its scales; an export from the
    scales file replays them on the model as loaded, declares them, and reloads (smoothrot and
    compressed-tensors alone) as the in-memory rotated model computes."""
    model = tiny_llama()
    gen = torch.Generator().manual_seed(7)
    rotations = {rs.name: torch.linalg.qr(torch.randn(2, 16, 16, generator=gen,
                                                      dtype=torch.float64))[0]
                 for rs in resolve_sites(model, ["o_proj"])}
    rotated = tiny_llama()
    apply_head_rotations(rotated, rotations)
    plans = random_plans(rotated)
    entries = [ScalesEntry("w4a4", "trained", site, p.scales, p.rotation)
               for site, p in plans.items()]
    path = tmp_path / "run" / "scales.safetensors"
    path.parent.mkdir()
    write_scales_file(path, entries, model="tiny", model_fingerprint=model_fingerprint(model),
                      sites=list(plans), head_rotations=rotations)
    read = read_scales_file(path)
    assert set(read.head_rotations) == set(rotations)
    assert all(torch.equal(read.head_rotations[k], rotations[k]) for k in rotations)
    export = export_from_scales_file(path, "w4a4", tmp_path / "e", model=model)
    assert read_declaration(export).head_rotations == tuple(sorted(rotations))
    assert torch.equal(logits(load_pretrained(export)),
                       logits(in_memory(rotated, plans, get_scheme("w4a4"))))
    for runtime in ("smoothrot", "compressed-tensors"):
        assert verify_export(export, model, IDS, runtime=runtime)["passed"]
    # the same scales without the rotations describe another model
    bare = tmp_path / "bare" / "scales.safetensors"
    bare.parent.mkdir()
    write_scales_file(bare, entries, model="tiny", model_fingerprint=model_fingerprint(model),
                      sites=list(plans))
    other = export_from_scales_file(bare, "w4a4", tmp_path / "o", model=model)
    assert not torch.equal(logits(load_pretrained(other)), logits(load_pretrained(export)))
