"""Sequential calibration on the real SmolLM2: same records as the whole-model pass, also with
weights streamed from a safetensors copy."""

import pytest
import torch

from smoothrot.arch.sites import resolve_sites
from smoothrot.calibrate.capture import CaptureSpec, capture_splits, token_subset
from smoothrot.calibrate.sequential import capture_sequential
from smoothrot.calibrate.weights import SafetensorsWeights
from smoothrot.data.sources import load_documents
from smoothrot.data.splits import split_documents, token_windows
from smoothrot.models import empty_model, save_float_checkpoint

pytestmark = pytest.mark.integration


def _assert_same(a, b):
    for site, rec in a.items():
        assert torch.equal(rec.tokens(), b[site].tokens()), site
        assert torch.equal(rec.max_abs(), b[site].max_abs()), site
        assert torch.equal(rec.quantiles.value(0.99), b[site].quantiles.value(0.99)), site


def test_sequential_equals_whole_model_on_smollm2(smollm2, tmp_path):
    model, tok = smollm2
    docs = split_documents(load_documents("pydoc"), {"calibration": 0.5}, 0)["calibration"]
    windows = token_windows(tok, docs, 3, 64, seed=0, split_name="calibration")
    specs = {"calibration": CaptureSpec(windows, token_subset(windows.numel(), 50, 0),
                                        (0.99, 1.0))}
    sites = resolve_sites(model, ["all"])
    assert len(sites) == 120
    whole = capture_splits(model, sites, specs, batch_size=2)["calibration"]
    _assert_same(whole, capture_sequential(model, sites, specs, batch_size=2)["calibration"])

    save_float_checkpoint(model, tmp_path)
    streamed = empty_model(tmp_path)
    got = capture_sequential(streamed, resolve_sites(streamed, ["all"]), specs, batch_size=2,
                             weights=SafetensorsWeights(tmp_path))["calibration"]
    _assert_same(whole, got)
    assert all(p.is_meta for p in streamed.parameters())
