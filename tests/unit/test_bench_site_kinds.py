"""bench/site_kinds.py: per-site-kind means of the held-out errors, one column per run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_site_kinds", ROOT / "bench" / "site_kinds.py")
site_kinds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(site_kinds)


def _run(folder: Path, qkv: tuple[float, float], down: tuple[float, float]) -> Path:
    folder.mkdir()
    layers = {f"model.layers.{i}.self_attn.qkv": {"m": {"mse": qkv[i], "relative": qkv[i] / 10}}
              for i in range(2)}
    layers |= {f"model.layers.{i}.mlp.down_proj": {"m": {"mse": down[i], "relative": 0.5}}
               for i in range(2)}
    report = {"schemes": {"w4a4": {"summary": {"m": {}}, "layers": layers}}}
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_means_per_site_kind_side_by_side(tmp_path, capsys) -> None:
    a = _run(tmp_path / "a", (1.0, 3.0), (10.0, 20.0))
    b = _run(tmp_path / "b", (4.0, 8.0), (10.0, 20.0))
    assert site_kinds.main([str(a), str(b)]) == 0
    lines = capsys.readouterr().out.splitlines()
    qkv = next(line for line in lines if "| qkv |" in line)
    down = next(line for line in lines if "| down_proj |" in line)
    assert "| 2 (0.2000) | 6 (0.6000) |" in qkv  # means of 1, 3 and of 4, 8
    assert "| 15 (0.5000) | 15 (0.5000) |" in down


def test_a_scheme_missing_from_a_run_is_refused(tmp_path, capsys) -> None:
    a = _run(tmp_path / "a", (1.0, 3.0), (10.0, 20.0))
    assert site_kinds.main([str(a), "--scheme", "w8a8"]) == 2
    assert "scheme 'w8a8'" in capsys.readouterr().err


def test_a_method_the_first_run_lacks_still_gets_its_rows(tmp_path, capsys) -> None:
    a = _run(tmp_path / "a", (1.0, 3.0), (10.0, 20.0))
    b = _run(tmp_path / "b", (4.0, 8.0), (10.0, 20.0))
    report = json.loads((b / "report.json").read_text())
    for methods in report["schemes"]["w4a4"]["layers"].values():
        methods["other"] = methods.pop("m")
    (b / "report.json").write_text(json.dumps(report))
    assert site_kinds.main([str(a), str(b), "--methods", "m", "other"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| other | qkv | - | 6 (0.6000) |" in lines
    assert "| m | qkv | 2 (0.2000) | - |" in lines
