"""Every YAML in configs/ runs end to end through the CLI with a tiny budget (torchgeo-style:
a shipped config is a test), and a config with an ``export`` section reproduces its export."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from smoothrot import job, models
from train.fit_scales import main

pytestmark = pytest.mark.integration

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
# Budgets only: every other key (methods, schemes, target, R1, act clips, ...) as shipped.
TINY = {
    "data": {"seq_len": 32, "calibration_samples": 2, "selection_samples": 1,
             "heldout_samples": 1, "evaluation_samples": 1, "train_tokens": 64},
    "train": {"steps": 2, "batch_tokens": 32, "val_every": 1},
    "block_training": {"steps": 2, "batch_tokens": 32},
    "head_rotation": {"steps": 2, "batch_tokens": 32},
}


@pytest.fixture
def serve_model(smollm2, monkeypatch):
    """The session's model for every load (a copy: R1 rotates a model in place)."""
    model, tok = smollm2

    def load(*_args: object, **_kwargs: object):
        return copy.deepcopy(model), tok

    monkeypatch.setattr(job, "load_model", load)
    monkeypatch.setattr(models, "load_model", load)


def tiny(path: Path, out: Path, **extra: object) -> Path:
    data = yaml.safe_load(path.read_text())
    for section, values in TINY.items():
        data.setdefault(section, {}).update(values)
    layers = data.get("layers", ["down_proj"])
    # One decoder layer of the same sites (all sites of it for "all").
    data["layers"] = [r"re:model\.layers\.0\..*" if layers == ["all"] else
                      rf"re:model\.layers\.0\..*{layers[0]}"]
    data.update(output_dir=str(out), **extra)
    tiny_path = out.parent / f"{path.stem}-tiny.yaml"
    tiny_path.write_text(yaml.safe_dump(data))
    return tiny_path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_runs(path, tmp_path, serve_model):
    out = tmp_path / "run"
    assert main(["--config", str(tiny(path, out)), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    cfg = yaml.safe_load(path.read_text())
    assert report["target"] == cfg.get("target", "vllm")
    assert list(report["schemes"]) == cfg.get("schemes", ["w4a4", "w8a8"])
    for scheme in report["schemes"].values():
        requested = set(cfg.get("methods", [])) | {"smoothrot_max"}
        assert requested <= set(scheme["summary"])
        for row in scheme["summary"].values():
            assert row["mean_mse"] == row["mean_mse"] and row["mean_mse"] >= 0  # no NaN
    wanted = cfg.get("perplexity_methods")  # a list, or a mapping per scheme (default.yaml)
    for name, scheme in report["schemes"].items():
        allowed = wanted.get(name) if isinstance(wanted, dict) else wanted
        if cfg.get("perplexity", True) and allowed is not None:
            assert set(scheme["perplexity"]) == set(allowed) & set(scheme["summary"])


def test_export_section_reproduces_the_export(tmp_path, serve_model):
    """fit_scales.py --config X writes X's export (a GPTQ method, straight from the fit), and
    the same YAML run again gives the same exported tensors."""
    from safetensors.torch import load_file

    config = CONFIGS[[p.stem for p in CONFIGS].index("quick")]
    exports = []
    for run in ("a", "b"):
        out = tmp_path / run
        export = {"formats": ["w4a4"], "method": "smoothrot_max+gptq"}
        assert main(["--config", str(tiny(config, out, export=export,
                                          methods=["smoothrot_max+gptq"])), "--quiet"]) == 0
        folder = out / "export-w4a4"
        declaration = json.loads((folder / "config.json").read_text())["smoothrot"]
        assert declaration["weight_quantization"]["rounding"] == "gptq"
        assert json.loads((folder / "smoothrot.json").read_text())["method"] == (
            "smoothrot_max+gptq")
        exports.append(load_file(str(folder / "model.safetensors")))
    a, b = exports
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)
