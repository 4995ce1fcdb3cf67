"""Held-out errors: each distinct transformed input of a site is computed once for every scheme
and method that scores it, each distinct (input, scheme) is scored once, and the shared
computation gives the errors separate calls give."""

from __future__ import annotations

import json

import pytest
import torch

import smoothrot.job as job
from smoothrot.core.transform import FULL
from smoothrot.evaluate import Reference, layer_error, layer_errors
from smoothrot.schema.quant import get_scheme, with_act_clip
from tests.unit.test_bad_inputs import small_config, tiny_model  # noqa: F401 (fixture)
from train.fit_scales import main

POLICIES = ["smoothrot_max", "alpha_only", "quantile", "joint"]


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Variants scored per call of job.layer_errors (one call per distinct input)."""
    calls: list[int] = []
    original = job.layer_errors

    def counting(*args, **kwargs):
        calls.append(len(args[4]))
        return original(*args, **kwargs)

    monkeypatch.setattr(job, "layer_errors", counting)
    return calls


def test_coinciding_plans_are_scored_once(tmp_path, monkeypatch, tiny_model) -> None:  # noqa: F811
    """With the grid at α 0.5, q = 1 only, every policy method picks SmoothRot-max's scales."""
    calls = _count_calls(monkeypatch)
    config = small_config(tmp_path, tiny_model, methods=POLICIES)
    assert main(["--config", str(config), "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    scheme = report["schemes"]["w4a4"]
    sites = report["sites"]
    assert set(scheme["summary"]) == set(POLICIES)
    assert calls == [1] * len(sites)  # one plan per site, not four
    rows = {m: scheme["layers"][sites[0]][m] for m in POLICIES}
    assert len({json.dumps(r, sort_keys=True) for r in rows.values()}) == 1
    assert rows["smoothrot_max"]["mse"] > 0


def test_schemes_share_the_transformed_input(tmp_path, monkeypatch, tiny_model) -> None:  # noqa: F811
    """Hadamard-only and SmoothRot-max have one plan under both schemes: one input per plan
    and site, scored under two schemes; RTN (no transform) likewise."""
    calls = _count_calls(monkeypatch)
    config = small_config(tmp_path, tiny_model, schemes=["w4a4", "w8a8"],
                          methods=["rtn", "hadamard", "smoothrot_max"])
    assert main(["--config", str(config), "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    sites = report["sites"]
    assert calls == [2] * (3 * len(sites))
    w4, w8 = (report["schemes"][s]["layers"][sites[0]] for s in ("w4a4", "w8a8"))
    for m in ("rtn", "hadamard", "smoothrot_max"):
        assert w8[m]["mse"] < w4[m]["mse"]  # 8 bits: a different, smaller error


def test_shared_input_equals_separate_calls() -> None:
    """layer_errors over several variants (schemes, an offline weight, a clip) equals one
    layer_error per variant, in tokens batches too."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 64, generator=gen) * torch.linspace(0.1, 8, 64)
    w = torch.randn(48, 64, generator=gen) / 8
    s = torch.rand(64, generator=gen) + 0.5
    w4, w8 = get_scheme("w4a4"), get_scheme("w8a8")
    w_q = torch.randn(48, 64, generator=gen) / 8
    variants = [(w4, None), (w8, None), (w4, w_q), (with_act_clip(w4, 0.9), None)]
    ref = Reference.of(x @ w.T)
    shared = layer_errors(x, w, s, FULL, variants, batch_tokens=40, reference=ref)
    for (scheme, wq), got in zip(variants, shared, strict=True):
        alone = layer_error(x, w, s, FULL, scheme, batch_tokens=40, weight_q=wq)
        assert got.mse == pytest.approx(alone.mse, rel=1e-6)
        assert got.relative == pytest.approx(alone.relative, rel=1e-6)
    assert len({e.mse for e in shared}) == len(variants)
