"""Report arithmetic and files on a hand-made result (no model)."""

import torch

from smoothrot.config import FitConfig
from smoothrot.evaluate import LayerError
from smoothrot.pipeline import FitResult, SchemeResult
from smoothrot.report import plot, summarize


def _result() -> FitResult:
    sites = ["a", "b"]
    sr = SchemeResult(scheme="w4a4")
    sr.errors = {
        "rtn": {"a": LayerError(4.0, 0.4), "b": LayerError(2.0, 0.2)},
        "smoothrot_max": {"a": LayerError(2.0, 0.2), "b": LayerError(2.0, 0.1)},
        "trained": {"a": LayerError(1.0, 0.1), "b": LayerError(1.0, 0.05)},
    }
    sr.scales = {m: {s: torch.rand(8, dtype=torch.float64) + 0.1 for s in sites}
                 for m in ("smoothrot_max", "trained")}
    sr.perplexity = {"rtn": 30.0, "smoothrot_max": 20.0, "trained": 15.0}
    return FitResult(config=FitConfig(), model_name="m", model_fingerprint="f", sites=sites,
                     data_hash={}, tokens={}, float_perplexity=10.0, schemes=[sr], timings={})


def test_summary_percentages_are_relative_to_smoothrot_max():
    rows = summarize(_result().schemes[0])
    assert rows["trained"]["mean_mse"] == 1.0
    assert rows["trained"]["pct_vs_max"] == -50.0
    assert rows["rtn"]["pct_vs_max"] == 50.0
    assert rows["rtn"]["mean_layer_pct_vs_max"] == 50.0  # mean of +100 % and 0 %
    assert rows["trained"]["perplexity"] == 15.0


def test_plots_are_written_atomically(tmp_path):
    files = plot(_result(), tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["layer_error_w4a4.png", "scales_w4a4.png"]  # no temp files left behind
    assert all((tmp_path / n).read_bytes()[:4] == b"\x89PNG" for n in names)
    assert len(files) == 2
