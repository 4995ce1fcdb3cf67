"""The CLI end to end on the embedded SmolLM2 with a tiny budget: files, summary, exact resume.

The model comes from the session fixture (loading it is covered by test_models.py), so three
CLI runs cost one model load.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from smoothrot import job as pipeline
from smoothrot.io.scales_file import read_scales_file
from smoothrot.methods import trained
from smoothrot.training.checkpoints import FINAL_SCALES, LAST_CKPT
from train.fit_scales import main

pytestmark = pytest.mark.integration

# The first two layers: calibration stops after the last site, so the forward passes are short.
LAYERS = r"re:model\.layers\.(0|1)\.mlp\.down_proj"
SITES = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
METHODS = ["rtn", "hadamard", "smoothrot_max", "joint", "trained"]


@pytest.fixture
def loads(smollm2, monkeypatch) -> list[str]:
    """Serve the session's model to run_fit; records the names the CLI asked for."""
    names: list[str] = []

    def load(name: str, **kwargs: object):
        names.append(name)
        return smollm2

    monkeypatch.setattr(pipeline, "load_model", load)
    return names


def tiny_config(tmp_path: Path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"seq_len": 64, "calibration_samples": 8, "selection_samples": 2,
                 "heldout_samples": 2, "evaluation_samples": 2, "train_tokens": 512},
        "search": {"alphas": [0.4, 0.6], "quantiles": [0.999, 1.0]},
        "train": {"batch_tokens": 64, "val_every": 2, "lr": 0.02},
        "methods": METHODS,
    }))
    return str(path)


def argv(config: str, out: Path, *extra: str) -> list[str]:
    return ["--config", config, "--layers", LAYERS, "--schemes", "w4a4", "--steps", "4",
            "--output-dir", str(out), "--quiet", *extra]


class InterruptAt(L.Callback):
    """Ctrl-C before optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_cli_run_then_interrupted_and_resumed_run(loads, tmp_path, capsys, monkeypatch) -> None:
    config = tiny_config(tmp_path)

    # 1. An uninterrupted run into an existing folder: its own files are replaced, others kept.
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    (full / "report.md").write_text("stale report")
    assert main(argv(config, full)) == 0
    out = capsys.readouterr().out
    assert loads == ["embedded:smollm2"]
    for label in ("W4A4", "SmoothRot-max", "Hadamard-only", "joint (per layer)", "trained",
                  "float ppl", "report:"):
        assert label in out, label
    assert (full / "notes.txt").read_text() == "mine"
    assert (full / "report.md").read_text().startswith("# smoothrot fit report")
    for name in ("report.json", "scales.safetensors", "layer_error_w4a4.png", "scales_w4a4.png"):
        assert (full / name).stat().st_size > 0, name
    reference = read_scales_file(full / "scales.safetensors")
    assert reference.sites == SITES
    assert set(reference.methods("w4a4")) == set(METHODS)
    assert {e.method for e in reference.entries if e.scales is not None} == {
        m for m in METHODS if m not in ("rtn", "hadamard")}

    # 2. The same run, Ctrl-C in the second site's training: exit 130 and the --resume hint.
    real_fit = trained.fit_scales

    def interrupt_last_site(*args: object, **kwargs: object):
        if Path(kwargs["checkpoint_dir"]).name == SITES[1]:
            kwargs["callbacks"] = [InterruptAt(3)]  # after the checkpoint at step 2
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(trained, "fit_scales", interrupt_last_site)
    resumed = tmp_path / "resumed"
    assert main(argv(config, resumed, "--no-perplexity")) == 130
    assert "--resume" in capsys.readouterr().err
    ckpts = resumed / "checkpoints" / "w4a4"
    assert (ckpts / SITES[0] / FINAL_SCALES).is_file()
    assert (ckpts / SITES[1] / LAST_CKPT).is_file()
    assert not (ckpts / SITES[1] / FINAL_SCALES).exists()
    assert not (resumed / "scales.safetensors").exists()

    # 3. --resume: the finished site is not trained again, the other continues; same scales.
    monkeypatch.setattr(trained, "fit_scales", real_fit)
    trainers: list[object] = []

    class CountingTrainer(L.Trainer):
        def __init__(self, *args: object, **kwargs: object) -> None:
            trainers.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(L, "Trainer", CountingTrainer)
    assert main(argv(config, resumed, "--no-perplexity", "--resume")) == 0
    assert len(trainers) == 1  # only the interrupted site
    again = read_scales_file(resumed / "scales.safetensors")

    def entries(f):
        return {(e.scheme, e.method, e.site): e for e in f.entries}

    assert entries(again).keys() == entries(reference).keys()
    for key, e in entries(reference).items():
        other = entries(again)[key]
        assert (other.rotation, other.act_clip) == (e.rotation, e.act_clip), key
        assert (other.scales is None) == (e.scales is None), key
        assert e.scales is None or torch.equal(other.scales, e.scales), key
