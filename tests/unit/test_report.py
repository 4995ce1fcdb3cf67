"""Report arithmetic and files on a hand-made result (no model)."""

from dataclasses import replace

import torch

from smoothrot.evaluate import LayerError
from smoothrot.job import FitResult, SchemeResult
from smoothrot.methods.registry import MethodResult
from smoothrot.report import plot, summarize, summary_table, to_json, to_markdown
from smoothrot.schema.config import FitConfig
from smoothrot.schema.rotation import Rotation
from smoothrot.surgery.plan import SitePlan


def _plans(scales: bool) -> dict[str, SitePlan]:
    if not scales:
        return {s: SitePlan(None, Rotation.none()) for s in ("a", "b")}
    return {s: SitePlan(torch.rand(8, dtype=torch.float64) + 0.1, Rotation.full())
            for s in ("a", "b")}


def _scheme(name: str = "w4a4", factor: float = 1.0, gptq: bool = False) -> SchemeResult:
    sr = SchemeResult(scheme=name)
    sr.errors = {
        "rtn": {"a": LayerError(4.0 * factor, 0.4), "b": LayerError(2.0 * factor, 0.2)},
        "smoothrot_max": {"a": LayerError(2.0 * factor, 0.2), "b": LayerError(2.0 * factor, 0.1)},
        "trained": {"a": LayerError(1.0 * factor, 0.1), "b": LayerError(1.0 * factor, 0.05)},
    }
    sr.results = {"rtn": MethodResult(_plans(False)),
                  "smoothrot_max": MethodResult(_plans(True)),
                  "trained": MethodResult(_plans(True))}
    sr.perplexity = {"rtn": 30.0 * factor, "smoothrot_max": 20.0 * factor,
                     "trained": 15.0 * factor}
    if gptq:
        sr.errors["trained+gptq"] = {"a": LayerError(0.5 * factor, 0.05),
                                     "b": LayerError(0.5 * factor, 0.02)}
        trained = sr.results["trained"].plans
        sr.results["trained+gptq"] = MethodResult(
            {s: replace(p, weight_q=torch.zeros(4, 8)) for s, p in trained.items()})
        sr.perplexity["trained+gptq"] = 12.0 * factor
    assert sorted(sr.scales) == ["smoothrot_max", "trained"]  # GPTQ repeats no scales
    return sr


def _result(*schemes: SchemeResult) -> FitResult:
    return FitResult(config=FitConfig(), model_name="m", model_fingerprint="f", sites=["a", "b"],
                     data_hash={}, tokens={}, float_perplexity=10.0,
                     schemes=list(schemes) or [_scheme()], timings={})


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


def test_schemes_side_by_side_and_weight_quantizer_rows():
    result = _result(_scheme("w4a4", gptq=True), _scheme("nvfp4", factor=0.5, gptq=True))
    rows = {sr.scheme: summarize(sr) for sr in result.schemes}
    assert rows["w4a4"]["trained"]["weight_quantizer"] == "RTN, int4 sym per-channel"
    assert rows["w4a4"]["trained+gptq"]["weight_quantizer"] == "GPTQ, int4 sym per-channel"
    assert rows["nvfp4"]["trained+gptq"]["weight_quantizer"].startswith("GPTQ, NVFP4")
    assert rows["nvfp4"]["trained+gptq"]["mean_mse"] == 0.25
    assert rows["nvfp4"]["trained+gptq"]["pct_vs_max"] == -75.0
    md = to_markdown(result, [])
    assert "| trained + GPTQ | 0.5 (-75.0%) | 12.000 | 0.25 (-75.0%) | 6.000 |" in md
    assert "| W4A4 mean MSE | W4A4 ppl | NVFP4 mean MSE | NVFP4 ppl |" in md
    assert "| trained + GPTQ | GPTQ, int4 sym per-channel | 0.5 | -75.0% |" in md
    assert md.count("## Schemes side by side") == 1
    table = summary_table(result).splitlines()
    side = table[table.index(next(t for t in table if t.startswith("side by side"))):]
    assert side[0].split() == ["side", "by", "side", "W4A4", "MSE", "ppl", "NVFP4", "MSE", "ppl"]
    gptq_row = next(t for t in side if t.startswith("trained + GPTQ"))
    assert gptq_row.split()[3:] == ["0.5", "12.000", "0.25", "6.000"]
    summary = to_json(result)["schemes"]["nvfp4"]["summary"]["trained+gptq"]
    assert summary["perplexity"] == 6.0 and summary["weight_quantizer"].startswith("GPTQ")


def test_one_scheme_has_no_side_by_side_table():
    assert "side by side" not in to_markdown(_result(), []).lower()
    assert "side by side" not in summary_table(_result())


def test_diverged_perplexity_keeps_the_columns_apart():
    sr = _scheme()
    sr.perplexity["rtn"] = 5058452094.955
    table = summary_table(_result(sr, _scheme("w8a8"))).splitlines()
    row = next(t for t in table if t.startswith("RTN"))
    assert row.split()[1:5] == ["3", "+50.0%", "0.3000", "5.06e+09"]
    side = next(t for t in table[table.index(next(t for t in table if "side" in t)):]
                if t.startswith("RTN"))
    assert side.split()[1:] == ["3", "5.06e+09", "3", "30.000"]


def test_report_says_when_the_residual_stream_is_rotated():
    result = _result()
    assert "R1" not in to_markdown(result, [])
    result.config.residual_rotation = True
    assert "residual stream is rotated (R1" in to_markdown(result, [])


def test_report_says_when_the_grid_was_searched_coarse_to_fine():
    result = _result()
    assert "coarse to fine" not in to_markdown(result, [])
    result.config.search.alpha_window = 0.1
    assert "q < 1 only at the α's within 0.1 of SmoothRot-max's α" in to_markdown(result, [])


def test_report_and_summary_say_when_head_rotations_were_learned():
    result = _result()
    assert "R2" not in to_markdown(result, []) and "R2" not in summary_table(result)
    result.head_rotations = {"l0.o_proj": torch.eye(4), "l1.o_proj": torch.eye(4)}
    assert "rotations R2 are folded into v_proj and o_proj of 2 layers" in to_markdown(result, [])
    assert "learned per-head rotations R2 in 2 layers" in summary_table(result)


def test_gptq_rows_are_compared_with_smoothrot_max_gptq_when_it_ran():
    """A + GPTQ row against SmoothRot-max + GPTQ (same rounding); that row and the RTN rows
    against SmoothRot-max; without it, the note says GPTQ's gain is credited to the scales."""
    sr = _scheme(gptq=True)
    without = to_markdown(_result(sr), [])
    assert "smoothrot_max+gptq is missing" in without
    sr.errors["smoothrot_max+gptq"] = {"a": LayerError(1.0, 0.1), "b": LayerError(0.25, 0.02)}
    sr.results["smoothrot_max+gptq"] = sr.results["trained+gptq"]
    rows = summarize(sr)
    assert rows["trained+gptq"]["vs"] == "smoothrot_max+gptq"
    assert rows["trained+gptq"]["pct_vs_max"] == -20.0  # 0.5 against 0.625
    assert rows["trained+gptq"]["mean_layer_pct_vs_max"] == 25.0  # mean of -50 % and +100 %
    assert rows["smoothrot_max+gptq"]["vs"] == "smoothrot_max"
    assert rows["smoothrot_max+gptq"]["pct_vs_max"] == -68.75  # 0.625 against 2.0
    assert rows["trained"]["vs"] == "smoothrot_max" and rows["trained"]["pct_vs_max"] == -50.0
    layers = to_json(_result(sr))["schemes"]["w4a4"]["layers"]
    assert layers["b"]["trained+gptq"]["pct_vs_max"] == 100.0
    note = "each + GPTQ row against SmoothRot-max + GPTQ"
    assert note in to_markdown(_result(sr), []) and note in summary_table(_result(sr))


def test_report_says_gptq_rows_held_out_mse_misses_the_float_target():
    """Under gptq.target: model the note under a table with + GPTQ rows says their held-out
    MSE (float model's inputs) is not their measure; not under the default, nor without them."""
    caveat = "held-out MSE is measured on the float model's inputs"
    result = _result(_scheme(gptq=True))
    assert caveat not in to_markdown(result, [])
    result.config.gptq.target = "model"
    assert caveat in to_markdown(result, []) and caveat in summary_table(result)
    plain = _result(_scheme())
    plain.config.gptq.target = "model"
    assert caveat not in to_markdown(plain, [])


def test_a_long_method_label_keeps_the_columns_aligned():
    """The label column fits "trained (block) + GPTQ" (22 characters) with a gap of two, in
    both tables, so every number stays in its column."""
    sr = _scheme()
    sr.errors["trained_block+gptq"] = sr.errors["trained"]
    sr.results["trained_block+gptq"] = sr.results["trained"]
    table = summary_table(_result(sr, _scheme("w8a8"))).splitlines()
    width = len("trained (block) + GPTQ") + 2
    side = table.index(next(t for t in table if t.startswith("side by side")))
    methods = ("RTN", "SmoothRot-max", "trained")
    per_scheme = [t for t in table[:side] if t.startswith(methods)]
    side_by_side = [t for t in table[side:] if t.startswith(methods)]
    assert len(per_scheme) == 7 and len(side_by_side) == 4, table
    # The MSE column is 12 wide in the per-scheme tables, 14 in the side-by-side one.
    assert {len(t[:width + 12].rstrip()) for t in per_scheme} == {width + 12}, table
    assert {len(t[:width + 14].rstrip()) for t in side_by_side} == {width + 14}, table
