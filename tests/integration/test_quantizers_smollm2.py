"""GPTQ and FP4 schemes on real SmolLM2 down_proj inputs (one test, small budget)."""

import pytest
import torch

from smoothrot.arch.sites import resolve_sites
from smoothrot.calibrate.capture import capture_sites, run_model
from smoothrot.core.policies import smoothing_scales
from smoothrot.core.stats import weight_absmax
from smoothrot.core.transform import FULL
from smoothrot.data.sources import load_documents
from smoothrot.data.splits import split_documents, token_windows
from smoothrot.evaluate import layer_error, perplexity
from smoothrot.methods.gptq import gptq_fused_weight
from smoothrot.schema.quant import get_scheme
from smoothrot.surgery.hooks import transformed
from smoothrot.surgery.plan import SitePlan

pytestmark = pytest.mark.integration


def test_gptq_beats_rtn_on_real_sites_and_fp4_model_runs(smollm2):
    """Layers 3 and 7 (real outliers): GPTQ of the smoothed, rotated weight has lower held-out
    output error than RTN for int W4A4 and NVFP4, and the model runs with GPTQ weights + FP4."""
    model, tok = smollm2
    splits = split_documents(load_documents("pydoc"), {"calibration": 0.5, "heldout": 0.2}, 0)
    win = {name: token_windows(tok, splits[name], n, 128, seed=0, split_name=name)
           for name, n in (("calibration", 24), ("heldout", 4))}
    sites = resolve_sites(model, [r"re:model\.layers\.(3|7)\.mlp\.down_proj"])
    recs = {}
    for name, w in win.items():
        with capture_sites(sites, total_tokens=w.numel()) as rec:
            run_model(model, w, 8, name)
        recs[name] = rec
    plans = {}
    for scheme in (get_scheme("w4a4"), get_scheme("nvfp4")):
        for rs in sites:
            w = rs.linear.weight.detach().float()
            x_cal, x_ho = recs["calibration"][rs.name].tokens(), recs["heldout"][rs.name].tokens()
            assert x_cal.shape[0] == 24 * 128
            s = smoothing_scales(x_cal.abs().amax(0), weight_absmax(w), 0.5, site=rs.name)
            assert rs.transform == FULL  # down_proj: full online H, untied scales
            wq = gptq_fused_weight(w, s, rs.transform, x_cal, scheme)
            e_gptq = layer_error(x_ho, w, s, rs.transform, scheme, weight_q=wq)
            e_rtn = layer_error(x_ho, w, s, rs.transform, scheme)
            assert e_gptq.mse < e_rtn.mse, (scheme.name, rs.name, e_gptq, e_rtn)
            plans[rs.name] = SitePlan(s, rs.rotation, weight_q=wq)
    with transformed(sites, plans, get_scheme("nvfp4")):
        ppl = perplexity(model, win["heldout"][:2])
    assert torch.isfinite(torch.tensor(ppl)) and ppl < 1e3
