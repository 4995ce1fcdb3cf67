"""The ``export`` section of a run's config is checked before the fit (io/from_fit.py): a request
that could not be written at the end fails in seconds with one line naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from smoothrot.io.atomic import TargetExistsError
from smoothrot.io.from_fit import check_fit_export, export_targets
from smoothrot.schema.config import config_from_dict
from smoothrot.schema.errors import ConfigError
from smoothrot.schema.export import ExportError
from tests.unit.export_helpers import one_line


def _cfg(tmp_path: Path, export: dict | None = None, **top):
    data = {"output_dir": str(tmp_path / "run"), "schemes": ["w4a4", "w8a8"],
            "methods": ["rtn", "joint", "trained", "joint+gptq"], **top}
    if export is not None:
        data["export"] = export
    return config_from_dict(data)


def test_no_export_requested(tmp_path):
    cfg = _cfg(tmp_path)
    assert cfg.export.formats == []
    assert check_fit_export(cfg) == {} and export_targets(cfg) == {}


def test_default_targets_are_per_format_folders_of_the_run(tmp_path):
    cfg = _cfg(tmp_path, {"formats": ["w4a4", "fused", "w8a8", "w4a4"]})
    run = tmp_path / "run"
    expected = {"w4a4": run / "export-w4a4", "fused": run / "export-fused",
                "w8a8": run / "export-w8a8"}
    assert export_targets(cfg) == expected
    assert list(export_targets(cfg)) == ["w4a4", "fused", "w8a8"]  # order kept, repeats dropped
    assert check_fit_export(cfg) == expected
    assert not run.exists()  # checking writes nothing


def test_export_dir_takes_one_format(tmp_path):
    cfg = _cfg(tmp_path, {"formats": ["w8a8"], "dir": str(tmp_path / "deploy")})
    assert export_targets(cfg) == {"w8a8": tmp_path / "deploy"}
    assert check_fit_export(cfg) == {"w8a8": tmp_path / "deploy"}
    cfg = _cfg(tmp_path, {"formats": ["w8a8", "w4a4"], "dir": str(tmp_path / "deploy")})
    for check in (export_targets, check_fit_export):
        with pytest.raises(ExportError, match="takes one format") as info:
            check(cfg)
        one_line(info, "export.dir")
    cfg = _cfg(tmp_path, {"dir": str(tmp_path / "deploy")})
    with pytest.raises(ExportError, match=r"needs export\.formats") as info:
        check_fit_export(cfg)
    one_line(info)


@pytest.mark.parametrize(("schemes", "export", "words"), [
    (["w8a8"], {"formats": ["w4a4"]}, ["export w4a4 needs scheme w4a4", "['w8a8']"]),
    (["w4a4"], {"formats": ["fused"], "scheme": "w8a8"}, ["export fused needs scheme w8a8"]),
    (["w4a4"], {"formats": ["w8a8"], "scheme": "w8a8-mse"}, ["needs scheme w8a8-mse"]),
])
def test_scheme_not_fitted(tmp_path, schemes, export, words):
    cfg = _cfg(tmp_path, export, schemes=schemes)
    with pytest.raises(ExportError) as info:
        check_fit_export(cfg)
    one_line(info, *words, "schemes")


def test_scheme_defaults(tmp_path):
    # fused takes the run's first scheme, a quantized format its own; export.scheme overrides
    assert check_fit_export(_cfg(tmp_path, {"formats": ["fused"]}, schemes=["w8a8"]))
    assert check_fit_export(_cfg(tmp_path, {"formats": ["w8a8"], "scheme": "w8a8-mse"},
                                 schemes=["w8a8-mse"]))


def test_method_not_among_the_runs(tmp_path):
    cfg = _cfg(tmp_path, {"formats": ["w4a4"], "method": "trained"}, methods=["rtn", "joint"])
    with pytest.raises(ExportError, match=r"export\.method trained is not among") as info:
        check_fit_export(cfg)
    one_line(info, "['rtn', 'joint']", "--methods")
    # the baseline always runs
    cfg = _cfg(tmp_path, {"formats": ["w4a4"], "method": "smoothrot_max"}, methods=["rtn"])
    assert check_fit_export(cfg) == {"w4a4": tmp_path / "run" / "export-w4a4"}
    with pytest.raises(ConfigError, match="unknown method 'trainned'"):
        check_fit_export(_cfg(tmp_path, {"formats": ["w4a4"], "method": "trainned"}))


def test_gptq_method_cannot_go_into_fused(tmp_path):
    cfg = _cfg(tmp_path, {"formats": ["fused"], "method": "joint+gptq"})
    with pytest.raises(ExportError, match="rounds weights offline") as info:
        check_fit_export(cfg)
    one_line(info, "joint+gptq", "fused")
    # a quantized format stores the GPTQ codes
    cfg = _cfg(tmp_path, {"formats": ["w4a4"], "method": "joint+gptq"})
    assert list(check_fit_export(cfg)) == ["w4a4"]
    cfg = _cfg(tmp_path, {"formats": ["w4a4", "fused"], "method": "joint+gptq"})
    with pytest.raises(ExportError, match="'fused' cannot store"):
        check_fit_export(cfg)


def test_target_cannot_be_the_run_or_model_folder(tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(tmp_path, {"formats": ["w4a4"], "dir": str(run)})
    with pytest.raises(ExportError, match="is or contains the run's output folder") as info:
        check_fit_export(cfg)
    one_line(info, "--export-dir")
    # the same folder spelled differently is still the output folder
    cfg = _cfg(tmp_path, {"formats": ["w4a4"], "dir": str(run / ".." / "run")})
    with pytest.raises(ExportError, match="output folder"):
        check_fit_export(cfg)
    model_dir = tmp_path / "my-model"
    cfg = _cfg(tmp_path, {"formats": ["fused"], "dir": str(model_dir)},
               model={"name": str(model_dir)})
    with pytest.raises(ExportError, match="is or contains the run's model folder") as info:
        check_fit_export(cfg)
    one_line(info)


def test_existing_target_needs_overwrite(tmp_path):
    target = tmp_path / "run" / "export-w8a8"
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("x")
    cfg = _cfg(tmp_path, {"formats": ["fused", "w8a8"]})
    with pytest.raises(TargetExistsError, match="already exists") as info:
        check_fit_export(cfg)
    one_line(info, str(target), "--overwrite")
    cfg = _cfg(tmp_path, {"formats": ["fused", "w8a8"], "overwrite": True})
    with pytest.raises(ExportError, match="not a smoothrot export"):  # before the fit, now
        check_fit_export(cfg)
    (target / "config.json").write_text('{"smoothrot": {}}')  # an earlier export
    assert check_fit_export(cfg)["w8a8"] == target
    assert (target / "keep.txt").read_text() == "x"  # checking removes nothing
