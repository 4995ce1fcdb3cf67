"""Exports of the real embedded SmolLM2 (down_proj: 1536 = 12·128, a Paley factor) reload exactly.

A few layers keep each test fast; the same checks on all 30 layers are `train/export.py verify`.
"""

from __future__ import annotations

import logging

import pytest
import torch

from smoothrot.arch.sites import resolve_sites
from smoothrot.calibrate.capture import capture_sites, run_model
from smoothrot.core.policies import smoothing_scales
from smoothrot.core.stats import weight_absmax
from smoothrot.data.sources import load_documents
from smoothrot.data.splits import split_documents, token_windows
from smoothrot.evaluate import perplexity
from smoothrot.io.loader import load_pretrained
from smoothrot.io.writer import export_model
from smoothrot.schema.quant import get_scheme
from smoothrot.surgery.hooks import transformed
from smoothrot.surgery.plan import SitePlan

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)
LAYERS = r"re:model\.layers\.(2|15|29)\.mlp\.down_proj"


@pytest.fixture(scope="module")
def setup(smollm2):
    """Max-policy scales (α = 0.5) of 3 layers from 4×64 calibration tokens; 4×64 eval tokens."""
    model, tok = smollm2
    splits = split_documents(load_documents("pydoc"), {"calibration": 0.5, "evaluation": 0.2}, 0)
    windows = {name: token_windows(tok, splits[name], 4, 64, seed=0, split_name=name)
               for name in ("calibration", "evaluation")}
    sites = resolve_sites(model, [LAYERS])
    with capture_sites(sites, total_tokens=windows["calibration"].numel(), keep_rows=False,
                       quantiles=[0.99]) as rec:
        run_model(model, windows["calibration"], 4, "calib")
    plans = {rs.name: SitePlan(smoothing_scales(rec[rs.name].max_abs(),
                                                weight_absmax(rs.weight), 0.5), rs.rotation)
             for rs in sites}
    return model, tok, sites, plans, windows["evaluation"], windows["calibration"]


def test_fused_float32_export_reloads_with_the_original_logits(setup, tmp_path):
    model, tok, _, plans, ids, _ = setup
    kappa = max(float(p.scales.max() / p.scales.min()) for p in plans.values())
    path = export_model(model, plans, tmp_path / "fused", tokenizer=tok)
    loaded = load_pretrained(path)
    with torch.no_grad():
        ref = model(input_ids=ids[:2]).logits.double()
        out = loaded(input_ids=ids[:2]).logits.double()
    rel = float((out - ref).norm() / ref.norm())
    log.warning("SmolLM2 fused float32 export: logits rel. error %.3g (max s/min s = %.3g)",
                rel, kappa)
    assert rel <= 1e-4
    assert (path / "tokenizer.json").is_file()


@pytest.mark.parametrize("fmt", ["w4a4", "w8a8", "nvfp4"])
def test_quantized_export_reloads_with_the_fake_quant_perplexity(setup, tmp_path, fmt):
    model, _, sites, plans, ids, calib = setup
    ids = ids[:2]
    path = export_model(model, plans, tmp_path / fmt, fmt=fmt, calibration=calib)
    with transformed(sites, plans, get_scheme(fmt)):
        ppl_memory = perplexity(model, ids)
    ppl_reload = perplexity(load_pretrained(path), ids)
    log.warning("SmolLM2 %s: ppl in memory %.4f, reloaded %.4f", fmt, ppl_memory, ppl_reload)
    assert abs(ppl_reload - ppl_memory) / ppl_memory <= (0.0 if fmt == "nvfp4" else 0.005)
    if fmt == "w4a4":  # compressed-tensors' own activation grid: same weights, other levels
        ppl_ct = perplexity(load_pretrained(path, activation_quantizer="compressed-tensors"), ids)
        log.warning("SmolLM2 %s with compressed-tensors activations: ppl %.4f", fmt, ppl_ct)
        assert ppl_ct < 2 * ppl_memory
