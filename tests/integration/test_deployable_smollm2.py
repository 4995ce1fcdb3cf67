"""What compressed-tensors alone computes is what the report states (issue: deployable exports).

On the embedded SmolLM2, a down_proj run (all 30 sites, as the default job) and whole-model runs
(every linear; with R1, and with an online H at every linear's input instead, as
configs/whole_model_vllm.yaml) are fitted with target compressed-tensors, exported as fused, W8A8
and W4A4 from the fit, and reloaded with transformers + compressed-tensors only (its forward, its
transforms with the stored H; no smoothrot code in the forward pass). Each reload's perplexity on
the run's own evaluation windows is within 0.5 % of the number the report gives (float32).
"""

from __future__ import annotations

import copy
import json

import pytest

from smoothrot import job
from smoothrot.data.splits import split_windows
from smoothrot.evaluate import perplexity
from smoothrot.io.from_fit import export_fit
from smoothrot.io.runtime import load_without_smoothrot
from smoothrot.schema.config import config_from_dict

pytestmark = pytest.mark.integration

FORMATS = ["fused", "w8a8", "w4a4"]


def _budget(tmp_path, **overrides):
    return config_from_dict({
        "data": {"seq_len": 128, "calibration_samples": 4, "selection_samples": 2,
                 "heldout_samples": 2, "evaluation_samples": 4, "train_tokens": 256},
        "search": {"alphas": [0.5], "quantiles": [1.0]},
        "train": {"steps": 3, "batch_tokens": 64, "val_every": 1},
        "schemes": ["w8a8", "w4a4"], "target": "compressed-tensors",
        "output_dir": str(tmp_path),
        "export": {"formats": FORMATS, "method": "trained"},
        **overrides,
    })


@pytest.mark.parametrize(("layers", "r1"), [("down_proj", False), ("all", True), ("all", False)],
                         ids=["down_proj", "whole-model-r1", "whole-model-online"])
def test_compressed_tensors_alone_reproduces_the_report(smollm2, tmp_path, monkeypatch,
                                                        layers, r1):
    model, tok = smollm2
    monkeypatch.setattr(job, "load_model", lambda *a, **k: (copy.deepcopy(model), tok))
    whole = layers == "all"
    cfg = _budget(tmp_path, layers=[layers], residual_rotation=r1,
                  methods=["smoothrot_max"] if whole else ["trained"])
    if whole:
        cfg.export.method = "smoothrot_max"
    result = job.run_fit(cfg)
    paths = export_fit(result, model, tok)
    _, windows = split_windows(tok, cfg.data, cfg.seed, ["evaluation"])
    reported = {sr.scheme: sr.perplexity[cfg.export.method] for sr in result.schemes}
    reported["fused"] = result.float_perplexity
    for fmt, path in zip(FORMATS, paths, strict=True):
        served = load_without_smoothrot(path, runtime="compressed-tensors")
        ppl = perplexity(served, windows["evaluation"])
        assert abs(ppl - reported[fmt]) <= 0.005 * reported[fmt], (fmt, ppl, reported[fmt])
        config = json.loads((path / "config.json").read_text())
        groups = config["quantization_config"]["transform_config"]["config_groups"]
        assert groups, "the rotations are declared where compressed-tensors and vLLM read them"
        if fmt == "w4a4":
            assert config["quantization_config"]["format"] == "pack-quantized"
    # Plain transformers ignores transform_config: it computes another function.
    plain = perplexity(load_without_smoothrot(paths[0], runtime="transformers"),
                       windows["evaluation"])
    assert plain > 1.5 * reported["fused"]
