"""Bad inputs to the export, ``verify`` and the scales file (issue 17): nothing an export is
made from is ever removed, a changed export fails ``verify``, and every bad file is one line.

The CLIs run in-process (``train.export.main``, ``train.fit_scales.main``) with the tiny LLaMA of
tests/conftest.py standing in for the loaded model; the table of cases is docs/bad_inputs.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import smoothrot.job
import train.export as export_cli
import train.fit_scales as fit_cli
from smoothrot.io.from_scales import export_from_scales_file
from smoothrot.io.loader import load_pretrained, plans_from_export
from smoothrot.io.scales_file import ScalesFileError, read_scales_file, write_scales_file
from smoothrot.io.verify import verify_export
from smoothrot.io.writer import ExportError, export_model
from smoothrot.models import model_fingerprint
from smoothrot.surgery.plan import SitePlan
from tests.arch.tiny import tiny_model
from tests.conftest import tiny_llama
from tests.unit.export_helpers import IDS, disk_full, one_line, random_plans
from tests.unit.test_export_from_scales import _entries, _scales_file

ROOT = Path(__file__).resolve().parents[2]
DOWN = "model.layers.0.mlp.down_proj"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(capsys: pytest.CaptureFixture[str], main, *argv: str) -> tuple[int, str, str]:
    """Run a CLI quietly; the exit code, stdout, and stderr checked to hold no traceback."""
    capsys.readouterr()
    code = main(["-q", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def _error(capsys: pytest.CaptureFixture[str], main, *argv: str) -> str:
    """Run a CLI; assert exit code 2 and exactly one ``error: ...; ...`` line; return it."""
    code, _, err = _cli(capsys, main, *argv)
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and ";" in lines[0], err
    return lines[0]


@pytest.fixture
def export_cli_model(monkeypatch):
    """train/export.py with the tiny LLaMA as the loaded model and IDS as every window."""
    model = tiny_llama()
    monkeypatch.setattr(export_cli, "load_model", lambda *a, **k: (model, None))
    monkeypatch.setattr(export_cli, "_windows", lambda tokenizer, args, split="evaluation": IDS)
    return model


def _run_in_an_export(tmp_path: Path, model) -> Path:
    """A run folder (scales, report, checkpoints, another export) that is itself an export: a
    folder an overwrite would accept if it only asked "is this an export?"."""
    run = export_model(model, random_plans(model), tmp_path / "run")
    scales, _, report = _scales_file(run, model)
    (run / "report.json").write_text(json.dumps(report))
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    export_model(model, random_plans(model), run / "export-fused")
    return scales


# --- 1. nothing an export is made from is ever removed ----------------------------------------


@pytest.mark.parametrize("out", ["run", "parent"])
def test_overwrite_never_removes_the_run_folder(tmp_path, capsys, export_cli_model, out):
    scales = _run_in_an_export(tmp_path, export_cli_model)
    run = scales.parent
    target = run if out == "run" else tmp_path
    if out == "parent":  # the folder holding the run is an export too
        shutil.copy(run / "config.json", tmp_path / "config.json")
    before = _files(tmp_path)
    line = _error(capsys, export_cli.main, "export", "--scales", str(scales), "--format", "w4a4",
                  "--out", str(target), "--overwrite")
    assert "is or contains the scales file's folder" in line
    assert _files(tmp_path) == before


def test_overwrite_never_replaces_the_source_model(tmp_path, capsys, export_cli_model):
    """An export used as the source model (its folder is what load_model read) stays."""
    model = export_cli_model
    source = export_model(model, random_plans(model), tmp_path / "model")
    scales, _, _ = _scales_file(tmp_path / "run", model)
    before = _files(source)
    line = _error(capsys, export_cli.main, "export", "--scales", str(scales), "--format", "fused",
                  "--model", str(source), "--out", str(source), "--overwrite")
    assert "is or contains the model folder" in line
    model.name_or_path = str(source)  # as from_pretrained sets it: the library refuses too
    with pytest.raises(ExportError, match="the model folder") as info:
        export_model(model, random_plans(model), source, overwrite=True)
    one_line(info)
    assert _files(source) == before


@pytest.mark.parametrize("export_dir", ["same", "parent"])
def test_fit_export_never_replaces_its_output_dir(tmp_path, capsys, monkeypatch, export_dir):
    """``--export-dir`` equal to (or holding) ``--output-dir`` is refused before the fit, so the
    report and scales paths it prints afterwards exist."""
    out = export_model(tiny_llama(), random_plans(tiny_llama()), tmp_path / "out")
    (out / "report.json").write_text("{}")
    monkeypatch.setattr(smoothrot.job, "run_fit", disk_full)  # must not be reached
    target = out if export_dir == "same" else tmp_path
    shutil.copy(out / "config.json", tmp_path / "config.json")  # both are exports
    before = _files(tmp_path)
    line = _error(capsys, fit_cli.main, "--output-dir", str(out), "--export", "fused",
                  "--export-dir", str(target), "--overwrite")
    assert "the run's output folder" in line and "No space" not in line
    assert before.items() <= _files(tmp_path).items()  # all there (the run may add a lock)


# --- 2. verify: the stored bytes, then exact logits -------------------------------------------


def _edit_tensors(path: Path, edit) -> None:
    file = path / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        meta = f.metadata()
    edit(tensors)
    save_file(tensors, str(file), metadata=meta)


def _negate_int4_row(tensors: dict[str, torch.Tensor]) -> None:
    from compressed_tensors.compressors import pack_to_int32, unpack_from_int32

    key = f"{DOWN}.weight_packed"
    shape = torch.Size(tensors[f"{DOWN}.weight_shape"].tolist())
    codes = unpack_from_int32(tensors[key], 4, shape)
    codes[3] = (-codes[3]).clamp(-8, 7)
    tensors[key] = pack_to_int32(codes, 4)


def _scale_rows(tensors: dict[str, torch.Tensor]) -> None:
    tensors[f"{DOWN}.weight_scale"][:10] *= 1.5


def _declare_8_bit_activations(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    config["smoothrot"]["activation_quantization"]["num_bits"] = 8
    (path / "config.json").write_text(json.dumps(config))


TAMPERS = {
    "int4 row negated": (lambda p: _edit_tensors(p, _negate_int4_row),
                         f"model.safetensors: tensor '{DOWN}.weight_packed'"),
    "weight_scale rows x1.5": (lambda p: _edit_tensors(p, _scale_rows),
                               f"model.safetensors: tensor '{DOWN}.weight_scale'"),
    "activation bits 4 -> 8": (_declare_8_bit_activations, "config.json key 'smoothrot'"),
}


@pytest.fixture(scope="module")
def w4a4_export(tmp_path_factory):
    model = tiny_llama()
    path = export_model(model, random_plans(model), tmp_path_factory.mktemp("w4a4") / "e",
                        fmt="w4a4")
    return model, path


def test_verify_passes_a_clean_export_bit_for_bit(w4a4_export):
    model, path = w4a4_export
    result = verify_export(path, model, IDS)
    assert result["passed"] and result["max_abs_logit_diff"] == result["limit"] == 0.0


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_verify_fails_a_tampered_export(tmp_path, capsys, monkeypatch, w4a4_export, tamper):
    model, clean = w4a4_export
    edit, names = TAMPERS[tamper]
    path = Path(shutil.copytree(clean, tmp_path / "e"))
    edit(path)
    result = verify_export(path, model, IDS)
    assert result["passed"] is False and result["content"].startswith(names), result
    monkeypatch.setattr(export_cli, "load_model", lambda *a, **k: (model, None))
    monkeypatch.setattr(export_cli, "_windows", lambda *a, **k: IDS)
    code, out, _ = _cli(capsys, export_cli.main, "verify", str(path), "--model", "tiny")
    assert code == 1 and json.loads(out)["content"] == result["content"]


@pytest.mark.parametrize(("runtime", "quantizer"), [
    ("smoothrot", "smoothrot"), ("smoothrot", "compressed-tensors"),
    ("compressed-tensors", "smoothrot")])
@pytest.mark.parametrize("fmt", ["w8a8", "w4a4"])
def test_a_clean_reload_is_bit_exact_on_every_runtime(tmp_path, fmt, runtime, quantizer):
    """The reference rotates with the dense stored matrix only where compressed-tensors' runtime
    does (its transforms), so each combination reloads bit for bit."""
    model = tiny_llama()
    path = export_model(model, random_plans(model, layers=("all",), decades=1), tmp_path / "e",
                        fmt=fmt, target="compressed-tensors")
    result = verify_export(path, model, IDS, runtime=runtime, activation_quantizer=quantizer)
    assert result["passed"] and result["max_abs_logit_diff"] == 0.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_residual_rotated_half_precision_export_is_bit_exact(tmp_path, dtype):
    """R1 is rotated in float32 and rounded once, in the reference as in the writer."""
    model = tiny_llama()
    path = export_model(model, random_plans(model, layers=("all",), decades=1), tmp_path / "e",
                        fmt="w4a4", dtype=dtype, residual_seed=0)
    result = verify_export(path, model, IDS)
    assert result["passed"] and result["max_abs_logit_diff"] == 0.0


# --- 3. activation clips ----------------------------------------------------------------------


@pytest.mark.parametrize("clip", [1.5, 0.0, -0.5, float("nan")])
def test_activation_clip_outside_0_1_is_refused_at_export(tmp_path, clip):
    model = tiny_llama()
    plans = {site: SitePlan(p.scales, p.rotation, act_clip=clip)
             for site, p in random_plans(model).items()}
    with pytest.raises(ExportError, match="activation clip") as info:
        export_model(model, plans, tmp_path / "e", fmt="w4a4", target="research")
    one_line(info, DOWN, "(0, 1]")
    assert list(tmp_path.iterdir()) == []


# --- 4. bad files: one line -------------------------------------------------------------------


def _bad_scales(kind: str, good: Path, target: Path) -> None:
    data = good.read_bytes()
    if kind == "garbage":
        target.write_bytes(b"\0garbage" * 64)
    elif kind == "empty":
        target.write_bytes(b"")
    elif kind == "truncated":
        target.write_bytes(data[:len(data) - 8])
    else:  # a torch.save'd file (a pickle in a zip)
        torch.save({"scales": torch.ones(3)}, target)


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated", "torch.save"])
def test_unreadable_scales_file_is_one_line(tmp_path, capsys, export_cli_model, kind):
    good, _, _ = _scales_file(tmp_path, export_cli_model)
    bad = tmp_path / "bad" / "scales.safetensors"
    bad.parent.mkdir()
    _bad_scales(kind, good, bad)
    line = _error(capsys, export_cli.main, "export", "--scales", str(bad), "--format", "w4a4")
    assert "is not a readable safetensors file" in line and "fit_scales.py" in line


def test_a_tensor_the_scales_index_does_not_name_is_refused(tmp_path, capsys, export_cli_model):
    """A stray tensor (here a name without '/') is an edit, not a plan: refused."""
    good, _, _ = _scales_file(tmp_path, export_cli_model)
    with safe_open(str(good), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        meta = f.metadata()
    save_file({**tensors, "stray": torch.ones(3)}, str(good), metadata=meta)
    with pytest.raises(ScalesFileError, match="not in the scales index") as info:
        read_scales_file(good)
    one_line(info, "'stray'")
    line = _error(capsys, export_cli.main, "export", "--scales", str(good), "--format", "w4a4")
    assert "'stray'" in line and not (tmp_path / "export-w4a4").exists()


@pytest.mark.parametrize(("report", "words"), [
    ("[1, 2]", "is not a JSON object (got list)"),
    ("{", "is unreadable"),
    ('{"config": [1]}', "config must be a mapping"),
    ('{"schemes": 3}', "schemes must be a mapping"),
    ('{"config": {"residual_rotation": "yes"}}', "config.residual_rotation='yes' must be"),
])
def test_bad_report_json_is_one_line(tmp_path, capsys, export_cli_model, report, words):
    scales, _, _ = _scales_file(tmp_path, export_cli_model)
    (tmp_path / "report.json").write_text(report)
    line = _error(capsys, export_cli.main, "export", "--scales", str(scales), "--format", "w4a4")
    assert words in line and not (tmp_path / "export-w4a4").exists()


def _edit_declaration(edit):
    def apply(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        edit(config["smoothrot"])
        (path / "config.json").write_text(json.dumps(config))
    return apply


def _only_pickled_weights(path: Path) -> None:
    for file in path.glob("*.safetensors"):
        file.unlink()
    torch.save({"lm_head.weight": torch.zeros(2, 2)}, path / "pytorch_model.bin")


DAMAGED = {
    "site without linears": (_edit_declaration(lambda d: d["sites"][DOWN].pop("linears")),
                             "missing key 'linears'"),
    "site key re:(": (_edit_declaration(lambda d: d["sites"].update({"re:(": d["sites"][DOWN]})),
                      "the pattern 're:('"),
    "activation_clip x": (_edit_declaration(
        lambda d: d["sites"][DOWN].update(activation_clip="x")), "activation_clip='x'"),
    "num_bits removed": (_edit_declaration(lambda d: d["weight_quantization"].pop("num_bits")),
                         "missing key 'num_bits'"),
    "config.json garbage": (lambda p: (p / "config.json").write_text("{"), "is unreadable"),
    "garbage scales.safetensors": (
        lambda p: (p / "smoothrot" / "scales.safetensors").write_bytes(b"\0garbage" * 64),
        "scales.safetensors is not a readable safetensors file"),
    "only a pickled pytorch_model.bin": (_only_pickled_weights,
                                         "holds no safetensors weights (only pickled"),
}


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_damaged_export_is_one_line_and_fails_verify(tmp_path, capsys, monkeypatch, w4a4_export,
                                                    damage):
    """load_pretrained (and plans_from_export) fail in one line naming the damage; verify fails
    on the changed bytes first, without a traceback; pickled weights are never unpickled."""
    model, clean = w4a4_export
    edit, words = DAMAGED[damage]
    path = Path(shutil.copytree(clean, tmp_path / "e"))
    edit(path)
    load = torch.load

    def no_unpickling(file, *args, **kwargs):
        assert not str(file).endswith(".bin"), "torch.load called on pickled weights"
        return load(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ExportError) as info:
        load_pretrained(path)
        plans_from_export(path)  # the stored scales: only verify reads them
    one_line(info, words, "again")
    monkeypatch.setattr(export_cli, "load_model", lambda *a, **k: (model, None))
    monkeypatch.setattr(export_cli, "_windows", lambda *a, **k: IDS)
    code, out, err = _cli(capsys, export_cli.main, "verify", str(path), "--model", "tiny")
    assert code in (1, 2) and len(err.strip().splitlines()) <= 1, err
    if code == 1:
        assert json.loads(out)["passed"] is False


@pytest.mark.parametrize("metadata", ["[1, 2]", "{", ""])
def test_smoothrot_json_that_is_no_object_is_one_line(tmp_path, capsys, monkeypatch,
                                                      w4a4_export, metadata):
    model, clean = w4a4_export
    path = Path(shutil.copytree(clean, tmp_path / "e"))
    (path / "smoothrot.json").write_text(metadata)
    monkeypatch.setattr(export_cli, "load_model", lambda *a, **k: (model, None))
    line = _error(capsys, export_cli.main, "verify", str(path), "--model", "tiny")
    assert "smoothrot.json" in line and "export it again" in line


# --- 5. weak behaviour ------------------------------------------------------------------------


def test_a_killed_writers_temporary_folder_is_cleaned_by_the_next_export(tmp_path):
    """SIGKILL skips every cleanup; the next write into the folder removes what a dead writer on
    this host left (host and pid are in the name), never a live writer's."""
    code = ("import os, signal, sys\n"
            "from smoothrot.io.atomic import atomic_folder\n"
            "with atomic_folder(sys.argv[1]) as tmp:\n"
            "    (tmp / 'model.safetensors').write_bytes(b'x' * 1024)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "killed")], cwd=ROOT,
                          check=False)
    assert done.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".killed.tmp-{socket.gethostname()}-")
    live = tmp_path / f".other.tmp-{socket.gethostname()}-{os.getpid()}-abcd1234"
    live.mkdir()  # a writer still running (this one)
    model = tiny_llama()
    export_model(model, random_plans(model), tmp_path / "next")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "next"])


def test_a_killed_writers_set_aside_export_is_put_back(tmp_path):
    """Killed between moving the old export aside and moving the new one in: the old comes
    back, it is not deleted."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is no longer running
    aside = tmp_path / f".e.old-{socket.gethostname()}-{dead.pid}-0123abcd"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    model = tiny_llama()
    export_model(model, random_plans(model), tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "other"]
    assert (tmp_path / "e" / "config.json").read_text() == "{}"


def test_outputs_have_the_modes_of_plain_files(tmp_path, capsys, export_cli_model):
    """Not mkstemp's 0600 / mkdtemp's 0700: what open() and mkdir() give under the umask."""
    mask = os.umask(0o022)
    try:
        scales, _, _ = _scales_file(tmp_path, export_cli_model)
        code, _, _ = _cli(capsys, export_cli.main, "export", "--scales", str(scales), "--format",
                          "w4a4")
    finally:
        os.umask(mask)
    assert code == 0
    out = tmp_path / "export-w4a4"
    assert stat.S_IMODE(scales.stat().st_mode) == 0o644
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()} == {0o644}
    assert {stat.S_IMODE(p.stat().st_mode) for p in (out, out / "smoothrot")} == {0o755}


def _fitted_scales(tmp_path: Path, model, **fit) -> Path:
    plans, entries = _entries(model)
    settings = {"residual_rotation": False, "seed": 0, "target": "vllm", **fit}
    path = tmp_path / "scales.safetensors"
    write_scales_file(path, entries, model="tiny", model_fingerprint=model_fingerprint(model),
                      sites=list(plans), fit=settings)
    return path


@pytest.mark.parametrize(("config", "words"), [
    ({"residual_rotation": True}, "residual_rotation=True but"),
    ({"seed": 3}, "seed=3 but"),
    ({"target": "research"}, "target='research' but"),
])
def test_a_report_that_disagrees_with_the_scales_file_is_refused(tmp_path, config, words):
    model = tiny_llama()
    scales = _fitted_scales(tmp_path, model)
    report = {"config": {"residual_rotation": False, "seed": 0, "target": "vllm", **config}}
    with pytest.raises(ExportError, match="was fitted with") as info:
        export_from_scales_file(scales, "fused", tmp_path / "e", model=model, report=report)
    one_line(info, words, "--report")
    with pytest.raises(ExportError, match="another run") as info:
        export_from_scales_file(scales, "fused", tmp_path / "e", model=model,
                                report={"sites": ["model.layers.9.mlp.down_proj"]})
    one_line(info)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scales.safetensors"]


def test_the_scales_file_carries_the_fit_settings(tmp_path):
    """A fit's scales file records R1 (and its seed) and the target: no report.json needed."""
    from smoothrot.job import FitResult, SchemeResult
    from smoothrot.methods.registry import MethodResult
    from smoothrot.report import save_scales
    from smoothrot.schema.config import FitConfig

    model = tiny_llama()
    plans = random_plans(model)
    result = FitResult(config=FitConfig(residual_rotation=True, seed=4), model_name="tiny",
                       model_fingerprint=model_fingerprint(model), sites=list(plans),
                       data_hash={}, tokens={}, float_perplexity=None, timings={},
                       schemes=[SchemeResult(scheme="w4a4",
                                             results={"trained": MethodResult(plans)})])
    save_scales(result, tmp_path / "scales.safetensors")
    scales = tmp_path / "scales.safetensors"
    assert read_scales_file(scales).fit == {"residual_rotation": True, "seed": 4,
                                            "residual_kind": "hadamard", "target": "vllm"}
    path = export_from_scales_file(scales, "fused", tmp_path / "e", model=model)
    decl = json.loads((path / "config.json").read_text())["smoothrot"]
    assert decl["residual_rotation"]["seed"] == 4


def test_export_dir_under_a_file_fails_before_the_fit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(smoothrot.job, "run_fit", disk_full)  # must not be reached
    (tmp_path / "file").write_text("x")
    line = _error(capsys, fit_cli.main, "--output-dir", str(tmp_path / "out"), "--export",
                  "fused", "--export-dir", str(tmp_path / "file" / "export"))
    assert "is a file" in line and "No space" not in line


# --- 6. float64 verify of exact math ----------------------------------------------------------


def test_float64_verify_of_a_residual_rotated_export(tmp_path):
    """HF norms compute in float32 even in float64; with R1 that alone gave 1e-7 > 1e-10."""
    model = tiny_llama(dtype=torch.float64)
    path = export_model(model, random_plans(model, layers=("all",)), tmp_path / "r1",
                        dtype="float64", residual_seed=0)
    result = verify_export(path, model, IDS)
    assert result["passed"] and result["logit_rel_error"] <= result["limit"] == 1e-10


@pytest.mark.parametrize("residual_seed", [None, 0])
def test_float64_verify_of_a_gemma_export(tmp_path, residual_seed):
    """Gemma's 1+γ is rescaled by the fold; its float32 norm made exact math miss 1e-10. The
    source is loaded from disk, as a fit loads it (same attention implementation as the
    reload)."""
    tiny_model("gemma", torch.float64).save_pretrained(tmp_path / "gemma")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gemma", dtype=torch.float64).eval()
    path = export_model(model, random_plans(model, layers=("all",)), tmp_path / "e",
                        dtype="float64", residual_seed=residual_seed)
    result = verify_export(path, model, IDS % model.config.vocab_size)
    assert result["passed"] and result["logit_rel_error"] <= 1e-10
