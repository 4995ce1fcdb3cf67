"""Held-out errors: each distinct plan of a site is scored once per scheme, and methods whose
plans coincide report the very same error."""

from __future__ import annotations

import json

import smoothrot.job as job
from tests.unit.test_bad_inputs import small_config, tiny_model  # noqa: F401 (fixture)
from train.fit_scales import main


def test_coinciding_plans_are_scored_once(tmp_path, monkeypatch, tiny_model) -> None:  # noqa: F811
    """With the grid at α 0.5, q = 1 only, every policy method picks SmoothRot-max's scales."""
    calls: list[object] = []

    def counting(*args, **kwargs):
        calls.append(args[2])
        return layer_error(*args, **kwargs)

    layer_error = job.layer_error
    monkeypatch.setattr(job, "layer_error", counting)
    config = small_config(tmp_path, tiny_model,
                          methods=["smoothrot_max", "alpha_only", "quantile", "joint"])
    assert main(["--config", str(config), "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    scheme = report["schemes"]["w4a4"]
    sites = report["sites"]
    assert set(scheme["summary"]) == {"smoothrot_max", "alpha_only", "quantile", "joint"}
    assert len(calls) == len(sites)  # one plan per site, not four
    rows = {m: scheme["layers"][sites[0]][m] for m in
            ("smoothrot_max", "alpha_only", "quantile", "joint")}
    assert len({json.dumps(r, sort_keys=True) for r in rows.values()}) == 1
    assert rows["smoothrot_max"]["mse"] > 0
